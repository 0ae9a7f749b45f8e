//! Three members in one process, each serving the internal services on its own loopback
//! port: they elect a leader, spread the slots, renew leases, move the ranges of a member
//! that goes silent and give it ranges again when it returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use timerdb_raft::map::{Command, Handover, MemberState};
use timerdb_raft::{ClusterConfig, ClusterNode, Error, NodeId, Refusal};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;

struct Member {
    node: ClusterNode,
    server: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    addrs: Vec<(NodeId, String)>,
    members: Vec<Option<Member>>,
    /// Each member's wall-clock offset (ms), by id - 1.
    clock_offsets: Vec<i64>,
    /// Lease settings of the new cluster (the default unless a test sets them).
    lease: Option<timerdb_raft::map::LeaseSettings>,
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        Self::start_with_clocks(&vec![0; n as usize]).await
    }

    /// One member per entry of `clock_offsets`, its wall clock that far off (ms).
    async fn start_with_clocks(clock_offsets: &[i64]) -> Cluster {
        Self::start_with(clock_offsets, None).await
    }

    async fn start_with(
        clock_offsets: &[i64],
        lease: Option<timerdb_raft::map::LeaseSettings>,
    ) -> Cluster {
        let n = clock_offsets.len();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<(NodeId, String)> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string()))
            .collect();
        let mut c = Cluster {
            _dir: dir,
            addrs,
            members: Vec::new(),
            clock_offsets: clock_offsets.to_vec(),
            lease,
        };
        for (i, l) in listeners.into_iter().enumerate() {
            let m = c.member(i as u64 + 1, l).await;
            c.members.push(Some(m));
        }
        c
    }

    fn raft_dir(&self, id: NodeId) -> PathBuf {
        self._dir.path().join(format!("node-{id}"))
    }

    async fn member(&self, id: NodeId, listener: TcpListener) -> Member {
        let addr = self.addrs[id as usize - 1].1.clone();
        let mut config = ClusterConfig::new(id, addr, self.raft_dir(id));
        config.initial_members = self.addrs.clone();
        config.wall_clock_offset_ms = self.clock_offsets[id as usize - 1];
        if let Some(lease) = self.lease {
            config.lease = lease;
        }
        let node = ClusterNode::start(config).await.unwrap();
        let (raft, cluster) = (node.raft_service(), node.cluster_service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(raft)
                .add_service(cluster)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Member { node, server, stop }
    }

    fn node(&self, id: NodeId) -> &ClusterNode {
        &self.members[id as usize - 1]
            .as_ref()
            .expect("running")
            .node
    }

    /// Stops a member as a crash would look to the others: it answers nothing more.
    /// Returns the stopped member, whose last lease can still be read.
    async fn stop(&mut self, id: NodeId) -> ClusterNode {
        let mut m = self.members[id as usize - 1].take().expect("running");
        // Raft first, so nothing answers from here on; then the server, which closes the
        // connections peers hold to it (aborting only its accept loop would leave them
        // served by their own tasks, unlike a dead process).
        m.node.shutdown().await;
        let _ = m.stop.send(());
        if tokio::time::timeout(Duration::from_secs(2), &mut m.server)
            .await
            .is_err()
        {
            m.server.abort();
        }
        m.node
    }

    async fn restart(&mut self, id: NodeId) {
        let addr: SocketAddr = self.addrs[id as usize - 1].1.parse().unwrap();
        let listener = TcpListener::bind(addr).await.unwrap();
        let m = self.member(id, listener).await;
        self.members[id as usize - 1] = Some(m);
    }

    fn running(&self) -> impl Iterator<Item = &ClusterNode> {
        self.members.iter().flatten().map(|m| &m.node)
    }

    /// Waits until every running member's map satisfies `ok`.
    async fn wait_for(&self, what: &str, ok: impl Fn(&timerdb_raft::ClusterMap) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.running().all(|n| ok(&n.map().borrow().map)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never: {what}; maps: {:#?}",
                self.running()
                    .map(|n| n.map().borrow().map.ranges())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn shares(map: &timerdb_raft::ClusterMap) -> Vec<usize> {
    map.members
        .keys()
        .map(|id| map.slots_of(*id).len())
        .collect()
}

/// A range moved away from member 2 waits out member 2's lease on member 1, until member 2
/// says it stopped acting on it (`release`): then member 1 may start at once. A member
/// that never reported it understands the command (not upgraded) blocks releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_range_is_usable_at_once_by_its_new_owner() {
    let c = Cluster::start(3).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.running().any(|n| n.lease_until().is_none()) {
        assert!(Instant::now() < deadline, "leases never granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every member has renewed (and reported what it understands) at least once more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = c.node(2).map().borrow().map.ranges_of(2)[0];
    c.node(1)
        .propose(Command::MoveRange {
            start: held.start,
            end: held.end,
            to: 1,
        })
        .await
        .unwrap();
    let gained = |n: &ClusterNode| {
        n.owned()
            .into_iter()
            .find(|o| o.range.start == held.start && o.range.end == held.end)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiting = loop {
        if let Some(o) = gained(c.node(1)) {
            break o;
        }
        assert!(Instant::now() < deadline, "member 1 never saw the move");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(waiting.range.handover, Handover::AfterLease);
    assert!(
        waiting.usable_at > Instant::now() + Duration::from_millis(500),
        "it waits out member 2's lease"
    );
    c.node(2)
        .release(held.start, held.end, held.epoch)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(o) = gained(c.node(1))
            && o.range.handover == Handover::Immediate
        {
            assert!(o.range.epoch > waiting.range.epoch, "a new epoch");
            assert!(o.usable_at <= Instant::now() + Duration::from_millis(50));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the release never reached member 1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A member that never renews (so never said it understands releases) blocks them.
    c.node(1)
        .propose(Command::AddMember {
            id: 9,
            addr: "127.0.0.1:9".into(),
        })
        .await
        .unwrap();
    let mine = c.node(3).map().borrow().map.ranges_of(3)[0];
    let refused = c
        .node(3)
        .release(mine.start, mine.end, mine.epoch)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Refused(Refusal::Invalid(why)) if why.contains("[9]")),
        "{refused:?}"
    );
}

/// Five members renewing every 20 ms (250 renewals a second at the leader) share the
/// leader's quorum checks: at most one per 20 ms, each answering every renewal that
/// arrived before it began, and every member keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_share_the_leader_s_quorum_checks() {
    let lease = timerdb_raft::map::LeaseSettings {
        heartbeat_ms: 20,
        ..Default::default()
    };
    let c = Cluster::start_with(&[0; 5], Some(lease)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.running().any(|n| n.lease_until().is_none()) {
        assert!(Instant::now() < deadline, "leases never granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = c.running().find(|n| n.is_leader()).expect("a leader");
    let (grants_before, checks_before) = leader.lease_work();
    let started = Instant::now();
    let until = started + Duration::from_secs(3);
    while Instant::now() < until {
        for n in c.running() {
            assert!(
                n.lease_until().is_some(),
                "member {} lost its lease",
                n.id()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (grants, checks) = leader.lease_work();
    let (grants, checks) = (grants - grants_before, checks - checks_before);
    let most = started.elapsed().as_millis() as u64 / 20 + 2;
    eprintln!("{grants} renewals granted on {checks} quorum checks in 3 s (at most {most})");
    assert!(
        checks <= most,
        "{checks} quorum checks, more than one per 20 ms"
    );
    assert!(
        2 * grants >= 3 * checks,
        "{grants} renewals on {checks} quorum checks: not shared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_spread_every_slot_and_hold_leases() {
    let c = Cluster::start(3).await;
    c.wait_for("every slot owned, evenly", |m| {
        m.fully_owned() && shares(m) == vec![86, 85, 85]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.running().any(|n| n.lease_until().is_none()) {
        assert!(Instant::now() < deadline, "leases never granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in c.running() {
        let owned = n.owned();
        assert_eq!(owned.len(), 1, "one contiguous range each: {owned:?}");
        // Nobody owned them before: usable at once.
        assert_eq!(owned[0].range.handover, Handover::Immediate);
        assert!(owned[0].usable_at <= Instant::now());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_s_ranges_move_to_the_others_and_come_back_when_it_returns() {
    let mut c = Cluster::start(3).await;
    c.wait_for("every slot owned", |m| m.fully_owned()).await;
    // A follower, so the election is not part of what is measured.
    let leader = c.node(1).leader().unwrap().0;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let its_slots = c.node(victim).map().borrow().map.slots_of(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.node(victim).lease_until().is_some(), "a lease");

    let stopped = Instant::now();
    let gone = c.stop(victim).await;
    // Its last renewal: nothing renews it any more.
    let last_lease = gone.lease_until().expect("still within its last lease");
    c.wait_for("the silent member's slots move", |m| {
        m.members[&victim].state == MemberState::Gone
            && m.fully_owned()
            && m.slots_of(victim).is_empty()
    })
    .await;
    let moved_at = Instant::now();
    let lease = c.node(leader).map().borrow().map.lease;
    // Not before its lease has ended, with the drift allowed on top; and soon.
    assert!(
        moved_at >= last_lease + Duration::from_millis(lease.drift_ms),
        "moved {:?} before its lease ended",
        (last_lease + Duration::from_millis(lease.drift_ms)) - moved_at
    );
    let moved_after = moved_at - stopped;
    // How soon is a benchmark figure (docs/design.md), not something to fail on here.
    eprintln!("a silent member's ranges moved {moved_after:?} after it stopped");
    // The new owners may start at once: the old lease has ended.
    for n in c.running() {
        for r in n.owned() {
            if its_slots.contains(&r.range.start) {
                assert_eq!(r.range.handover, Handover::Immediate);
                assert!(r.usable_at <= Instant::now());
            }
        }
    }

    let restarted = Instant::now();
    c.restart(victim).await;
    c.wait_for("the member returns and gets its share", |m| {
        m.members[&victim].state == MemberState::Active && shares(m) == vec![86, 85, 85]
    })
    .await;
    // Its own map caught up with the leader's (until then it replays its old one, and holds
    // no lease: a renewal needs a map as recent as the leader's).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mine, leaders) = (
            c.node(victim).map().borrow().index,
            c.node(leader).map().borrow().index,
        );
        if mine >= leaders && c.node(victim).lease_until().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim} never caught up: {mine} < {leaders}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Taken from live members: it waits one lease plus the drift before starting.
    let back = c.node(victim).owned();
    assert!(!back.is_empty());
    let wait = Duration::from_millis(lease.lease_ms + lease.drift_ms);
    for r in back {
        assert_eq!(r.range.handover, Handover::AfterLease);
        assert!(
            r.usable_at >= restarted + wait,
            "usable {:?} after the restart, before a lease plus the drift",
            r.usable_at - restarted
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_s_ranges_move_after_a_new_leader_is_elected() {
    let mut c = Cluster::start(3).await;
    c.wait_for("every slot owned", |m| m.fully_owned()).await;
    let old = c.node(1).leader().unwrap().0;
    let stopped = Instant::now();
    c.stop(old).await;
    c.wait_for("the old leader's slots move", |m| {
        m.fully_owned() && m.slots_of(old).is_empty()
    })
    .await;
    let moved_after = stopped.elapsed();
    let new = c.running().next().unwrap().leader().unwrap().0;
    assert_ne!(new, old);
    eprintln!("leader {old} stopped; its ranges moved after {moved_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_commands_and_a_refusal_names_its_reason() {
    let c = Cluster::start(3).await;
    c.wait_for("every slot owned", |m| m.fully_owned()).await;
    let leader = c.node(1).leader().unwrap().0;
    let follower = c.node((1..=3).find(|id| *id != leader).unwrap());
    follower
        .propose(Command::MoveRange {
            start: 0,
            end: 9,
            to: 3,
        })
        .await
        .unwrap();
    c.wait_for("slots 0..=9 on member 3", |m| {
        (0..=9).all(|s| m.owner_of(s) == Some(3))
    })
    .await;
    let e = follower
        .propose(Command::MoveRange {
            start: 0,
            end: 1,
            to: 9,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Refused(Refusal::UnknownMember(9))),
        "{e}"
    );
    assert!(e.to_string().contains("no member 9"), "{e}");
}

/// Member 3's wall clock runs 1.5 s ahead (the lease drift allowed is 0.2 s): every member
/// measures the leader's clock against its own at each lease renewal, and the leader names
/// the members that are surely further off than the drift (member 3, or, should member 3
/// lead, the other two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_clock_is_off_is_measured_and_named_by_the_leader() {
    let c = Cluster::start_with_clocks(&[0, 0, 1_500]).await;
    c.wait_for("every slot owned", |m| m.fully_owned()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let leader = c.running().find(|n| n.is_leader()).map(|n| n.id());
        if let Some(l) = leader
            && !c.node(l).skewed_members().is_empty()
            && c.running()
                .filter(|n| n.id() != l)
                .all(|n| n.clock_offset().is_some())
        {
            break l;
        }
        assert!(Instant::now() < deadline, "no clock measured or named");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expected: Vec<NodeId> = if leader == 3 { vec![1, 2] } else { vec![3] };
    assert_eq!(c.node(leader).skewed_members(), expected);
    let own = |id: NodeId| c.clock_offsets[id as usize - 1];
    for n in c.running().filter(|n| n.id() != leader) {
        let m = n.clock_offset().unwrap();
        let truth = own(leader) - own(n.id());
        assert!(
            (m.offset_ms - truth).unsigned_abs() <= m.error_ms + 50,
            "member {} measured {m:?}, the truth is {truth} ms",
            n.id()
        );
    }
    assert!(
        c.node(leader).clock_offset().is_none(),
        "the leader is the reference"
    );
}

#[test]
fn a_clock_is_named_only_when_surely_beyond_the_drift() {
    use timerdb_raft::ClockOffset;
    let at = |offset_ms, error_ms| ClockOffset {
        offset_ms,
        error_ms,
    };
    assert!(!at(150, 10).beyond(200));
    assert!(!at(-250, 60).beyond(200));
    assert!(at(-261, 60).beyond(200));
    assert!(at(1_500, 5).beyond(200));
}
