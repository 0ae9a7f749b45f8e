//! The cluster map: who is a member, who owns which slots, and under which epoch. It is the
//! replicated state machine's whole state; [`ClusterMap::apply`] is a pure function of the
//! map and a [`Command`], so every node that applies the same log holds the same map.
//!
//! Ownership is kept per slot (an owner and an epoch each); [`ClusterMap::ranges`] joins
//! neighbouring slots with the same owner and epoch into the ranges operators see.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in the cluster (1, 2, 3, ...).
pub type NodeId = u64;

/// How members keep their ranges: every `heartbeat_ms` a member asks the leader to renew its
/// lease; a renewal is good for `lease_ms` from the moment the member asked. The leader moves
/// the ranges of a member it has not heard from for `failure_ms`, which must exceed
/// `lease_ms + drift_ms` so that the old lease has ended, on any clock within the drift,
/// before anyone else is told to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettings {
    /// How often a member renews its lease.
    pub heartbeat_ms: u64,
    /// How long a renewal lasts, from when the member asked for it.
    pub lease_ms: u64,
    /// The largest disagreement between two members' measures of elapsed time over one
    /// lease that the cluster tolerates.
    pub drift_ms: u64,
    /// Silence after which the leader moves a member's ranges away.
    pub failure_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 200,
            lease_ms: 1_000,
            drift_ms: 200,
            failure_ms: 1_300,
        }
    }
}

impl LeaseSettings {
    /// Checks the settings keep the safety argument true; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 > self.lease_ms {
            return Err(format!(
                "cluster.heartbeat = {} ms must be above 0 and at most half of cluster.lease \
                 ({} ms), so a lease is renewed at least twice before it ends",
                self.heartbeat_ms, self.lease_ms
            ));
        }
        if self.failure_ms <= self.lease_ms + self.drift_ms {
            return Err(format!(
                "cluster.failure_timeout = {} ms must exceed cluster.lease + cluster.drift \
                 ({} ms): a silent member's lease must have ended before its ranges move",
                self.failure_ms,
                self.lease_ms + self.drift_ms
            ));
        }
        Ok(())
    }
}

/// Where a member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Added; receives ranges at the next rebalance.
    Joining,
    /// Owns its share of the ranges.
    Active,
    /// Giving its ranges away; receives none.
    Draining,
    /// Silent for longer than the failure timeout, or removed: owns nothing. A member that
    /// speaks again becomes active.
    Gone,
}

impl MemberState {
    /// Its lower-case name, as the admin CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Gone => "gone",
        }
    }
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The address its gRPC services listen on (`host:port`).
    pub addr: String,
    /// Where it stands.
    pub state: MemberState,
    /// Draining because it is stopping gracefully ([`Command::Leave`]), not because an
    /// operator drained it: it becomes active again when it restarts ([`Command::Rejoin`]).
    #[serde(default)]
    pub leaving: bool,
}

/// How a new owner may start on a slot it gained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handover {
    /// Nobody may still hold it: the slot had no owner, or its owner was declared gone
    /// after the failure timeout, so its lease has ended.
    Immediate,
    /// The previous owner may still hold a lease renewed before it learned of the move:
    /// the new owner waits one lease plus the drift after it learns of the move.
    AfterLease,
}

/// Ownership of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotOwner {
    /// Who owns it (none before the first assignment).
    pub owner: Option<NodeId>,
    /// Fencing token: raised every time the slot changes hands, never reused.
    pub epoch: u64,
    /// How the current owner may start.
    pub handover: Handover,
    /// For [`Handover::AfterLease`]: the previous owner and the epoch it held the slot
    /// under, whose [`Command::Released`] lets the new owner start at once.
    #[serde(default)]
    pub from: Option<(NodeId, u64)>,
}

/// A maximal run of slots with one owner and one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First slot.
    pub start: u32,
    /// Last slot (inclusive).
    pub end: u32,
    /// Owner, if any.
    pub owner: Option<NodeId>,
    /// Epoch of the assignment.
    pub epoch: u64,
    /// How the owner may start.
    pub handover: Handover,
}

/// A change to the map. Commands are what the Raft log holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the map: the slot count of the store and the first members, all active, with
    /// the slots spread evenly over them.
    Init {
        /// Slots of the store.
        slots: u32,
        /// The first members and their addresses.
        members: Vec<(NodeId, String)>,
        /// Lease settings.
        lease: LeaseSettings,
    },
    /// Adds a member (joining) or updates its address.
    AddMember {
        /// Its id.
        id: NodeId,
        /// Its address.
        addr: String,
    },
    /// Stops giving a member ranges and moves its ranges away.
    Drain {
        /// The member.
        id: NodeId,
    },
    /// Declares a member gone (the leader heard nothing from it for the failure timeout)
    /// and moves its ranges to the others at once.
    MarkGone {
        /// The member.
        id: NodeId,
    },
    /// A member stopping gracefully hands its ranges to the others: it drains, and is
    /// active again when it restarts. Does nothing to a member that is draining or gone
    /// already, nor when no other member is active.
    Leave {
        /// The member.
        id: NodeId,
    },
    /// A gone member speaks again, or a member that left at its shutdown restarted: it is
    /// active again. A member an operator drained stays draining.
    Rejoin {
        /// The member.
        id: NodeId,
    },
    /// An operator returns a draining (or gone) member to service: it is active again and
    /// the slots are spread over it (`timerdb admin activate`).
    Activate {
        /// The member.
        id: NodeId,
    },
    /// Removes a member that owns nothing.
    RemoveMember {
        /// The member.
        id: NodeId,
    },
    /// Places slots `start..=end` on `to`.
    MoveRange {
        /// First slot.
        start: u32,
        /// Last slot (inclusive).
        end: u32,
        /// New owner.
        to: NodeId,
    },
    /// Spreads the slots evenly over the active and joining members now (joining ones
    /// become active).
    Rebalance,
    /// Member `id` has stopped acting on the slots `start..=end` it held under `epoch`
    /// (its range is stopped: no fire, no ownership write follows). Those of them still
    /// waiting for its lease to end ([`Handover::AfterLease`], from `id` at `epoch`) may
    /// start at once: they get a new epoch, handed over [`Handover::Immediate`].
    Released {
        /// The member that held the slots.
        id: NodeId,
        /// First slot.
        start: u32,
        /// Last slot (inclusive).
        end: u32,
        /// The epoch it held them under.
        epoch: u64,
    },
}

/// Why a command was refused. The map is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The map exists already.
    #[error("the cluster is already initialised")]
    AlreadyInitialised,
    /// The map does not exist yet.
    #[error(
        "the cluster is not initialised: start the nodes with --initial-members or run `timerdb admin init`"
    )]
    NotInitialised,
    /// No such member.
    #[error("no member {0}; `timerdb admin status` lists the members")]
    UnknownMember(NodeId),
    /// The member still owns slots.
    #[error("member {id} still owns {slots} slots: drain it first (`timerdb admin drain {id}`)")]
    StillOwns {
        /// The member.
        id: NodeId,
        /// How many slots it owns.
        slots: usize,
    },
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

/// The replicated cluster map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Slot count (0 until initialised).
    pub slots: u32,
    /// Members by id.
    pub members: BTreeMap<NodeId, Member>,
    /// Owner of each slot, indexed by slot.
    pub owners: Vec<SlotOwner>,
    /// The last epoch handed out.
    pub last_epoch: u64,
    /// Lease settings.
    pub lease: LeaseSettings,
}

impl ClusterMap {
    /// Whether the map exists.
    pub fn is_initialised(&self) -> bool {
        self.slots > 0
    }

    /// Applies a command: the map changes, or the command is refused and nothing changes.
    pub fn apply(&mut self, command: &Command) -> Result<(), Refusal> {
        let mut next = self.clone();
        next.apply_in_place(command)?;
        *self = next;
        Ok(())
    }

    fn apply_in_place(&mut self, command: &Command) -> Result<(), Refusal> {
        if !self.is_initialised() && !matches!(command, Command::Init { .. }) {
            return Err(Refusal::NotInitialised);
        }
        match command {
            Command::Init {
                slots,
                members,
                lease,
            } => {
                if self.is_initialised() {
                    return Err(Refusal::AlreadyInitialised);
                }
                if *slots == 0 || members.is_empty() {
                    return Err(Refusal::Invalid(
                        "a cluster needs at least one slot and one member".into(),
                    ));
                }
                lease.validate().map_err(Refusal::Invalid)?;
                self.slots = *slots;
                self.lease = *lease;
                self.owners = vec![
                    SlotOwner {
                        owner: None,
                        epoch: 0,
                        handover: Handover::Immediate,
                        from: None,
                    };
                    *slots as usize
                ];
                for (id, addr) in members {
                    self.members.insert(
                        *id,
                        Member {
                            addr: addr.clone(),
                            state: MemberState::Active,
                            leaving: false,
                        },
                    );
                }
                self.rebalance();
            }
            Command::AddMember { id, addr } => {
                let member = self.members.entry(*id).or_insert(Member {
                    addr: addr.clone(),
                    state: MemberState::Joining,
                    leaving: false,
                });
                member.addr = addr.clone();
            }
            Command::Drain { id } => {
                let member = self.member_mut(*id)?;
                member.state = MemberState::Draining;
                member.leaving = false;
                self.rebalance();
            }
            Command::Leave { id } => {
                // Only while another member is active to take the ranges: of members
                // leaving all at once, the last stops with them.
                let others = self.another_can_take_over(*id);
                let member = self.member_mut(*id)?;
                if others && matches!(member.state, MemberState::Active | MemberState::Joining) {
                    member.state = MemberState::Draining;
                    member.leaving = true;
                    self.rebalance();
                }
            }
            Command::MarkGone { id } => {
                self.member_mut(*id)?.state = MemberState::Gone;
                // Its slots start at once elsewhere (its lease has ended: failure timeout >
                // lease + drift); slots the rebalance takes from live members still wait.
                self.rebalance();
            }
            Command::Rejoin { id } => {
                // A gone member, or one that left at its shutdown, rejoins: one an operator
                // drained stays draining.
                let member = self.member_mut(*id)?;
                if member.state == MemberState::Gone
                    || (member.state == MemberState::Draining && member.leaving)
                {
                    member.state = MemberState::Active;
                    member.leaving = false;
                    self.rebalance();
                }
            }
            Command::Activate { id } => match self.member_mut(*id)?.state {
                MemberState::Active => {}
                MemberState::Joining => {
                    return Err(Refusal::Invalid(format!(
                        "member {id} is still joining: it becomes active once it has caught up \
                         with the cluster"
                    )));
                }
                MemberState::Draining | MemberState::Gone => {
                    let member = self.member_mut(*id)?;
                    member.state = MemberState::Active;
                    member.leaving = false;
                    self.rebalance();
                }
            },
            Command::RemoveMember { id } => {
                self.member_mut(*id)?;
                let slots = self.slots_of(*id).len();
                if slots > 0 {
                    return Err(Refusal::StillOwns { id: *id, slots });
                }
                self.members.remove(id);
            }
            Command::MoveRange { start, end, to } => {
                if start > end || *end >= self.slots {
                    return Err(Refusal::Invalid(format!(
                        "range {start}..{end} is not within slots 0..{} (END is inclusive)",
                        self.slots - 1
                    )));
                }
                let state = self.member_mut(*to)?.state;
                if !matches!(state, MemberState::Active | MemberState::Joining) {
                    return Err(Refusal::Invalid(format!(
                        "member {to} is {}: only active or joining members take ranges",
                        state.as_str()
                    )));
                }
                self.member_mut(*to)?.state = MemberState::Active;
                let gives = (*start..=*end).map(|slot| (slot, *to)).collect();
                self.give(gives);
            }
            Command::Rebalance => self.rebalance(),
            Command::Released {
                id,
                start,
                end,
                epoch,
            } => {
                if start > end || *end >= self.slots {
                    return Err(Refusal::Invalid(format!(
                        "range {start}..{end} is not within slots 0..{} (END is inclusive)",
                        self.slots - 1
                    )));
                }
                // A new epoch per run of released slots with one owner and one epoch, so
                // a range never mixes the two kinds of handover.
                let mut run: Option<(u32, Option<NodeId>, u64)> = None;
                for slot in *start..=*end {
                    let o = self.owners[slot as usize];
                    if o.handover != Handover::AfterLease || o.from != Some((*id, *epoch)) {
                        continue;
                    }
                    if run != Some((slot.wrapping_sub(1), o.owner, o.epoch)) {
                        self.last_epoch += 1;
                    }
                    run = Some((slot, o.owner, o.epoch));
                    self.owners[slot as usize] = SlotOwner {
                        owner: o.owner,
                        epoch: self.last_epoch,
                        handover: Handover::Immediate,
                        from: None,
                    };
                }
            }
        }
        Ok(())
    }

    fn member_mut(&mut self, id: NodeId) -> Result<&mut Member, Refusal> {
        self.members.get_mut(&id).ok_or(Refusal::UnknownMember(id))
    }

    /// Whether a member other than `id` is active or joining, so that ranges `id` hands
    /// over have somewhere to go (a graceful leave needs one).
    pub fn another_can_take_over(&self, id: NodeId) -> bool {
        self.members
            .iter()
            .any(|(m, x)| *m != id && matches!(x.state, MemberState::Active | MemberState::Joining))
    }

    /// The slots `id` owns.
    pub fn slots_of(&self, id: NodeId) -> Vec<u32> {
        (0..self.slots)
            .filter(|&s| self.owners[s as usize].owner == Some(id))
            .collect()
    }

    /// Gives each `(slot, to)` to its new owner under a new epoch, one epoch per run of
    /// neighbouring slots going to the same owner with the same handover (so a moved block
    /// stays one range). A slot `to` owns already is left as it is. The handover is
    /// decided per slot: at once when the previous owner cannot hold a lease (none, or
    /// gone: declared so only after the failure timeout), after a lease otherwise.
    fn give(&mut self, mut gives: Vec<(u32, NodeId)>) {
        gives.sort_unstable();
        let mut run: Option<(u32, NodeId, Handover)> = None;
        for (slot, to) in gives {
            let o = self.owners[slot as usize];
            if o.owner == Some(to) {
                continue;
            }
            let previous_holds_lease = o
                .owner
                .and_then(|p| self.members.get(&p))
                .is_some_and(|m| m.state != MemberState::Gone);
            let handover = if previous_holds_lease {
                Handover::AfterLease
            } else {
                Handover::Immediate
            };
            if run != Some((slot.wrapping_sub(1), to, handover)) {
                self.last_epoch += 1;
            }
            run = Some((slot, to, handover));
            self.owners[slot as usize] = SlotOwner {
                owner: Some(to),
                epoch: self.last_epoch,
                handover,
                from: (handover == Handover::AfterLease)
                    .then(|| o.owner.map(|p| (p, o.epoch)))
                    .flatten(),
            };
        }
    }

    /// Spreads the slots evenly over the active and joining members, moving as few as it
    /// can: each keeps what it owns up to its share; the rest go, lowest slot first, to the
    /// members below their share, lowest id first. Deterministic, as the log needs.
    fn rebalance(&mut self) {
        let takers: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| matches!(m.state, MemberState::Active | MemberState::Joining))
            .map(|(id, _)| *id)
            .collect();
        for id in &takers {
            if let Some(m) = self.members.get_mut(id) {
                m.state = MemberState::Active;
            }
        }
        if takers.is_empty() {
            // Nobody to take them: slots stay with their owners (a draining last member
            // keeps firing rather than dropping everything).
            return;
        }
        let n = takers.len();
        let base = self.slots as usize / n;
        let extra = self.slots as usize % n;
        let share: BTreeMap<NodeId, usize> = takers
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, base + usize::from(i < extra)))
            .collect();
        let mut kept: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut free = Vec::new();
        for slot in 0..self.slots {
            match self.owners[slot as usize].owner {
                Some(o)
                    if share.contains_key(&o) && kept.get(&o).copied().unwrap_or(0) < share[&o] =>
                {
                    *kept.entry(o).or_insert(0) += 1;
                }
                _ => free.push(slot),
            }
        }
        let mut free = free.into_iter();
        let mut gives = Vec::new();
        for id in &takers {
            let missing = share[id] - kept.get(id).copied().unwrap_or(0);
            gives.extend(free.by_ref().take(missing).map(|slot| (slot, *id)));
        }
        self.give(gives);
    }

    /// The map's ranges: maximal runs of slots with one owner and epoch, in slot order.
    pub fn ranges(&self) -> Vec<Range> {
        let mut out: Vec<Range> = Vec::new();
        for (slot, o) in self.owners.iter().enumerate() {
            let slot = slot as u32;
            match out.last_mut() {
                Some(r) if r.owner == o.owner && r.epoch == o.epoch && r.end + 1 == slot => {
                    r.end = slot;
                }
                _ => out.push(Range {
                    start: slot,
                    end: slot,
                    owner: o.owner,
                    epoch: o.epoch,
                    handover: o.handover,
                }),
            }
        }
        out
    }

    /// The ranges `id` owns.
    pub fn ranges_of(&self, id: NodeId) -> Vec<Range> {
        self.ranges()
            .into_iter()
            .filter(|r| r.owner == Some(id))
            .collect()
    }

    /// Whether every slot has an owner.
    pub fn fully_owned(&self) -> bool {
        self.is_initialised() && self.owners.iter().all(|o| o.owner.is_some())
    }

    /// The owner of `slot`, if any.
    pub fn owner_of(&self, slot: u32) -> Option<NodeId> {
        self.owners.get(slot as usize).and_then(|o| o.owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> ClusterMap {
        let mut m = ClusterMap::default();
        m.apply(&Command::Init {
            slots: 256,
            members: vec![(1, "a:1".into()), (2, "b:2".into()), (3, "c:3".into())],
            lease: LeaseSettings::default(),
        })
        .unwrap();
        m
    }

    fn counts(m: &ClusterMap) -> Vec<usize> {
        m.members.keys().map(|id| m.slots_of(*id).len()).collect()
    }

    #[test]
    fn init_spreads_every_slot_evenly_in_contiguous_ranges() {
        let m = three();
        assert!(m.fully_owned());
        assert_eq!(counts(&m), vec![86, 85, 85]);
        let ranges = m.ranges();
        let spans: Vec<_> = ranges.iter().map(|r| (r.start, r.end, r.owner)).collect();
        assert_eq!(
            spans,
            vec![(0, 85, Some(1)), (86, 170, Some(2)), (171, 255, Some(3))]
        );
        assert!(ranges.iter().all(|r| r.handover == Handover::Immediate));
    }

    #[test]
    fn a_gone_member_s_slots_move_at_once_and_come_back_after_a_lease() {
        let mut m = three();
        let before = m.clone();
        m.apply(&Command::MarkGone { id: 2 }).unwrap();
        assert_eq!(m.slots_of(2), Vec::<u32>::new());
        assert_eq!(counts(&m), vec![128, 0, 128]);
        // Only node 2's slots moved, each under a new, larger epoch, to start at once.
        for s in 0..256 {
            let (a, b) = (before.owners[s], m.owners[s]);
            if a.owner == Some(2) {
                assert!(b.epoch > before.last_epoch);
                assert_eq!(b.handover, Handover::Immediate);
            } else {
                assert_eq!(a, b);
            }
        }
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(counts(&m), vec![86, 85, 85]);
        // Slots taken from live members wait for the lease they may still hold.
        assert!(
            m.slots_of(2)
                .iter()
                .all(|&s| m.owners[s as usize].handover == Handover::AfterLease)
        );
    }

    #[test]
    fn a_joining_member_gets_its_share_at_the_next_rebalance_and_drain_empties_a_member() {
        let mut m = three();
        m.apply(&Command::AddMember {
            id: 4,
            addr: "d:4".into(),
        })
        .unwrap();
        assert_eq!(m.members[&4].state, MemberState::Joining);
        assert_eq!(m.slots_of(4).len(), 0);
        m.apply(&Command::Rebalance).unwrap();
        assert_eq!(counts(&m), vec![64, 64, 64, 64]);
        m.apply(&Command::Drain { id: 1 }).unwrap();
        assert_eq!(counts(&m), vec![0, 86, 85, 85]);
        let e = m.apply(&Command::RemoveMember { id: 2 }).unwrap_err();
        assert!(e.to_string().contains("still owns 86 slots"), "{e}");
        m.apply(&Command::RemoveMember { id: 1 }).unwrap();
        assert!(!m.members.contains_key(&1));
    }

    #[test]
    fn move_range_places_inclusive_ranges_and_refuses_bad_ones_unchanged() {
        let mut m = three();
        m.apply(&Command::MoveRange {
            start: 0,
            end: 9,
            to: 3,
        })
        .unwrap();
        assert!((0..=9).all(|s| m.owner_of(s) == Some(3)));
        let before = m.clone();
        for (cmd, words) in [
            (
                Command::MoveRange {
                    start: 5,
                    end: 256,
                    to: 1,
                },
                "not within slots 0..255",
            ),
            (
                Command::MoveRange {
                    start: 0,
                    end: 1,
                    to: 9,
                },
                "no member 9",
            ),
            (Command::Drain { id: 7 }, "no member 7"),
        ] {
            let e = m.apply(&cmd).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
            assert_eq!(m, before);
        }
    }

    /// A member that stopped a range it held releases it: the slots still waiting for its
    /// lease, and only those it held under that epoch, start at once under a new epoch;
    /// a release for another epoch or member changes nothing.
    #[test]
    fn a_released_range_starts_at_once_under_a_new_epoch() {
        let mut m = three();
        let held = m.ranges_of(2)[0];
        m.apply(&Command::MoveRange {
            start: held.start,
            end: held.end,
            to: 1,
        })
        .unwrap();
        let moved = m.owners[held.start as usize];
        assert_eq!(moved.handover, Handover::AfterLease);
        assert_eq!(moved.from, Some((2, held.epoch)));
        let before = m.clone();
        for stale in [
            Command::Released {
                id: 2,
                start: held.start,
                end: held.end,
                epoch: held.epoch + 100,
            },
            Command::Released {
                id: 3,
                start: held.start,
                end: held.end,
                epoch: held.epoch,
            },
        ] {
            m.apply(&stale).unwrap();
            assert_eq!(m, before, "{stale:?} changes nothing");
        }
        assert!(matches!(
            m.apply(&Command::Released {
                id: 2,
                start: 10,
                end: 256,
                epoch: held.epoch
            }),
            Err(Refusal::Invalid(_))
        ));
        // Released over more slots than it held: only its own change.
        m.apply(&Command::Released {
            id: 2,
            start: 0,
            end: 255,
            epoch: held.epoch,
        })
        .unwrap();
        for s in 0..256usize {
            let (a, b) = (before.owners[s], m.owners[s]);
            if (held.start..=held.end).contains(&(s as u32)) {
                assert_eq!(b.owner, Some(1));
                assert_eq!(b.handover, Handover::Immediate, "slot {s}");
                assert!(b.epoch > a.epoch, "slot {s}: a new epoch");
                assert_eq!(b.epoch, m.owners[held.start as usize].epoch, "one epoch");
            } else {
                assert_eq!(a, b, "slot {s} untouched");
            }
        }
        let r = m
            .ranges_of(1)
            .into_iter()
            .find(|r| r.start == held.start)
            .expect("the released slots form a range of member 1");
        assert_eq!((r.end, r.handover), (held.end, Handover::Immediate));
    }

    /// A member declared gone has its slots started at once elsewhere; slots the same
    /// rebalance takes from a live member wait for that member's lease.
    #[test]
    fn only_a_gone_member_s_slots_move_without_waiting() {
        let mut m = three();
        m.apply(&Command::MoveRange {
            start: 0,
            end: 200,
            to: 1,
        })
        .unwrap();
        let before = m.clone();
        m.apply(&Command::MarkGone { id: 3 }).unwrap();
        assert_eq!(counts(&m), vec![128, 128, 0]);
        for s in 0..256usize {
            let (a, b) = (before.owners[s], m.owners[s]);
            if a == b {
                continue;
            }
            let want = if a.owner == Some(3) {
                Handover::Immediate
            } else {
                Handover::AfterLease
            };
            assert_eq!(b.handover, want, "slot {s}: {a:?} -> {b:?}");
        }
        // Ranges never mix the two kinds.
        for r in m.ranges() {
            for s in r.start..=r.end {
                assert_eq!(m.owners[s as usize].handover, r.handover);
            }
        }
    }

    #[test]
    fn rejoin_brings_back_a_gone_member_but_does_not_undo_a_drain() {
        let mut m = three();
        m.apply(&Command::Drain { id: 2 }).unwrap();
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Draining);
        assert!(m.slots_of(2).is_empty());
        m.apply(&Command::MarkGone { id: 2 }).unwrap();
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Active);
    }

    #[test]
    fn a_member_that_left_at_shutdown_rejoins_but_an_operators_drain_holds() {
        let mut m = three();
        m.apply(&Command::Leave { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Draining);
        assert!(m.members[&2].leaving);
        assert!(m.slots_of(2).is_empty(), "its ranges went to the others");
        // Its slots came from a live member: each new owner waits out its lease.
        assert!(m.owners.iter().all(|o| o.owner != Some(2)));
        // Leaving twice changes nothing.
        let before = m.clone();
        m.apply(&Command::Leave { id: 2 }).unwrap();
        assert_eq!(m, before);
        // Restarted, it asks to rejoin: active, with an even share again.
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Active);
        assert!(!m.members[&2].leaving);
        assert!((85..=86).contains(&m.slots_of(2).len()));
        // An operator's drain is not undone by a restart, even of a member that was
        // leaving when it was drained.
        m.apply(&Command::Leave { id: 2 }).unwrap();
        m.apply(&Command::Drain { id: 2 }).unwrap();
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Draining);
        // Nor does leaving turn a drained member into one that rejoins.
        m.apply(&Command::Leave { id: 2 }).unwrap();
        assert!(!m.members[&2].leaving);
        m.apply(&Command::Rejoin { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Draining);
        // Members leaving all at once: the last active one stays, with every slot.
        m.apply(&Command::Leave { id: 1 }).unwrap();
        let before = m.clone();
        m.apply(&Command::Leave { id: 3 }).unwrap();
        assert_eq!(m, before, "the last active member does not leave");
        assert_eq!(m.slots_of(3).len(), 256);
    }

    #[test]
    fn activate_undoes_a_drain_and_refuses_a_joining_member() {
        let mut m = three();
        m.apply(&Command::Drain { id: 2 }).unwrap();
        assert!(m.slots_of(2).is_empty());
        let before = m.clone();
        m.apply(&Command::Activate { id: 2 }).unwrap();
        assert_eq!(m.members[&2].state, MemberState::Active);
        let got = m.slots_of(2).len();
        assert!((85..=86).contains(&got), "an even share again: {got}");
        // Its slots come from live members: they wait out the old owners' leases, and
        // each moved slot has a new epoch.
        for s in m.slots_of(2) {
            let o = &m.owners[s as usize];
            assert_eq!(o.handover, Handover::AfterLease);
            assert!(o.epoch > before.owners[s as usize].epoch);
        }
        let again = m.clone();
        m.apply(&Command::Activate { id: 2 }).unwrap();
        assert_eq!(
            m.owners, again.owners,
            "activating an active member changes nothing"
        );
        m.apply(&Command::AddMember {
            id: 9,
            addr: "h:9".into(),
        })
        .unwrap();
        assert!(matches!(
            m.apply(&Command::Activate { id: 9 }),
            Err(Refusal::Invalid(_))
        ));
        assert_eq!(
            m.apply(&Command::Activate { id: 7 }),
            Err(Refusal::UnknownMember(7))
        );
    }

    #[test]
    fn epochs_only_grow() {
        let mut m = three();
        let mut last = m.last_epoch;
        for cmd in [
            Command::MarkGone { id: 1 },
            Command::Rejoin { id: 1 },
            Command::MoveRange {
                start: 3,
                end: 4,
                to: 2,
            },
        ] {
            let before = m.clone();
            m.apply(&cmd).unwrap();
            for s in 0..256 {
                if m.owners[s] != before.owners[s] {
                    assert!(m.owners[s].epoch > last);
                }
            }
            last = m.last_epoch;
        }
    }

    #[test]
    fn lease_settings_that_break_the_argument_are_named() {
        let bad = LeaseSettings {
            failure_ms: 1_000,
            ..LeaseSettings::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("cluster.failure_timeout")
        );
        let bad = LeaseSettings {
            heartbeat_ms: 600,
            ..LeaseSettings::default()
        };
        assert!(bad.validate().unwrap_err().contains("cluster.heartbeat"));
        let mut m = ClusterMap::default();
        assert_eq!(m.apply(&Command::Rebalance), Err(Refusal::NotInitialised));
    }
}
