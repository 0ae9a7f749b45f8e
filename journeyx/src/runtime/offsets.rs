//! Which offset of each partition may be committed: only the contiguous prefix of events
//! whose processing finished. Events of one partition finish out of order (they are spread
//! over the queues by user), so a finished event past an unfinished one waits.

use std::collections::{BTreeSet, HashMap};

/// A partition of the events topic.
pub type Partition = i32;

/// The processed prefix of every assigned partition.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<Partition, Part>,
}

#[derive(Debug, Default)]
struct Part {
    /// Dispatched and not finished yet.
    open: BTreeSet<i64>,
    /// The offset after the last one dispatched.
    next: Option<i64>,
    /// What was last committed (the next offset to read).
    committed: Option<i64>,
}

impl Offsets {
    /// An event at `offset` of `partition` was handed to a queue.
    pub fn started(&mut self, partition: Partition, offset: i64) {
        let p = self.parts.entry(partition).or_default();
        p.open.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Its processing finished (effects, state and all).
    pub fn finished(&mut self, partition: Partition, offset: i64) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.open.remove(&offset);
        }
    }

    /// The partition was revoked: what is still open there is not committed by this
    /// process (the next owner reads it again).
    pub fn revoke(&mut self, partition: Partition) {
        self.parts.remove(&partition);
    }

    /// Offsets to commit now (the next offset to read, per partition), for the partitions
    /// whose processed prefix grew since the last call; marks them committed.
    pub fn to_commit(&mut self) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in &mut self.parts {
            let Some(next) = p.next else { continue };
            let upto = p.open.first().copied().unwrap_or(next);
            if p.committed.is_none_or(|c| upto > c) {
                p.committed = Some(upto);
                out.push((partition, upto));
            }
        }
        out.sort_unstable();
        out
    }

    /// Events dispatched and not finished, over every partition.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.open.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contiguous_processed_prefix_is_committed() {
        let mut o = Offsets::default();
        for off in 10..15 {
            o.started(0, off);
        }
        o.started(1, 7);
        assert_eq!(
            o.to_commit(),
            vec![(0, 10), (1, 7)],
            "nothing processed yet"
        );
        assert!(o.to_commit().is_empty(), "nothing new");
        o.finished(0, 12);
        o.finished(0, 11);
        assert!(o.to_commit().is_empty(), "10 is still open");
        o.finished(0, 10);
        assert_eq!(o.to_commit(), vec![(0, 13)]);
        o.finished(0, 13);
        o.finished(0, 14);
        o.finished(1, 7);
        assert_eq!(o.to_commit(), vec![(0, 15), (1, 8)]);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_revoked_partition_commits_nothing_more() {
        let mut o = Offsets::default();
        o.started(3, 100);
        o.started(3, 101);
        o.finished(3, 101);
        assert_eq!(o.to_commit(), vec![(3, 100)]);
        o.revoke(3);
        o.finished(3, 100);
        assert!(o.to_commit().is_empty());
        assert_eq!(o.in_flight(), 0);
    }
}
