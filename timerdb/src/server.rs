//! Runs one TimerDB node: store, sink, scheduler, gRPC API, health, reflection, metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use timerdb_proto::v1::timer_service_server::TimerServiceServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::AdminService;
use crate::api::TimerApi;
use crate::cluster::Member;
use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::{Error, Result, sink, store};

/// Largest gRPC request accepted: room for a full batch of typical timers.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Runs a node until SIGTERM or Ctrl-C, then shuts down gracefully. Metrics are served
/// only if the caller installed a recorder (the binary does, see [`crate::metrics::install`]).
pub async fn run(config: Config) -> Result<()> {
    run_until(config, shutdown_signal()).await
}

/// Runs a node until `shutdown` completes: stops accepting calls, lets in-flight fires
/// finish, records progress, and closes the store.
pub async fn run_until(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let mut node = start(config).await?;
    tokio::select! {
        () = shutdown => node.shutdown().await,
        // The server ended by itself (an error): report it.
        ended = &mut node.task => {
            node.stop = None;
            ended.map_err(|e| Error::Internal(format!("node task: {e}")))?
        }
    }
}

/// A node running in this process, as [`start`] returns it.
pub struct NodeHandle {
    /// The address its gRPC API listens on (the port is the bound one when the
    /// configuration asked for port 0).
    pub addr: SocketAddr,
    /// Its scheduler (the slot ranges it owns, what it holds in memory).
    pub scheduler: Arc<Scheduler>,
    /// Its cluster membership, when it is a member.
    pub cluster: Option<timerdb_raft::ClusterNode>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl NodeHandle {
    /// Stops the node gracefully (no new calls; in-flight fires finish; progress recorded;
    /// store closed) and waits until it has.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::Internal(format!("node task: {e}")))?
    }
}

/// Starts a node in this process: opens its store and sink, takes every slot, binds its
/// listener, and serves until [`NodeHandle::shutdown`]. Several nodes may run in one
/// process (each on its own store); none installs a metrics recorder.
pub async fn start(config: Config) -> Result<NodeHandle> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Config(format!("listen = {}: {e}", config.listen)))?;
    start_on(config, listener).await
}

/// Starts a node like [`start`] on a listener the caller bound (tests bind port 0 first,
/// so that cluster members know each other's addresses before any starts).
pub async fn start_on(config: Config, listener: tokio::net::TcpListener) -> Result<NodeHandle> {
    config.validate()?;
    let store = store::open(&config.store, config.store_options.clone()).await?;
    let sink = sink::open(&config.sink).await?;
    let layout = store.layout();
    let cluster = match &config.cluster {
        Some(c) => Some(start_member(c, layout.slots).await?),
        None => None,
    };
    let mut scheduler_config = config.scheduler.clone();
    // A member fires and writes ownership records for a range only while its lease holds
    // and its map still gives it the range (the member is made after its scheduler).
    let member_cell: Arc<std::sync::OnceLock<std::sync::Weak<Member>>> = Arc::default();
    if cluster.is_some() {
        let cell = member_cell.clone();
        scheduler_config.authority = Some(crate::scheduler::Authority(Arc::new(
            move |range, epoch| {
                cell.get()
                    .and_then(std::sync::Weak::upgrade)
                    .is_some_and(|m| m.may_act(range, epoch))
            },
        )));
    }
    let scheduler = Scheduler::new(store.clone(), sink.clone(), scheduler_config);
    let member = cluster
        .clone()
        .map(|node| Member::new(node, scheduler.clone(), config.scheduler.lookahead));
    if let (Some(m), Some(c)) = (&member, &config.cluster) {
        let _ = member_cell.set(Arc::downgrade(m));
        m.set_release_ranges(c.release_ranges);
    }
    let reporter = tokio::spawn(report_metrics(scheduler.clone(), cluster.clone()));
    let follower = match &member {
        // A cluster member runs the ranges the cluster map gives it, while its lease holds.
        Some(member) => Some(tokio::spawn(member.clone().follow_ownership())),
        // A single node owns every slot.
        None => {
            scheduler.assign(vec![layout.all_slots()]).await?;
            None
        }
    };

    let bound = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;

    let api = TimerApi::new(
        store.clone(),
        sink.clone(),
        scheduler.clone(),
        config.limits.clone(),
    )
    .with_member(member.clone());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // A single node serves from here on; a member once it holds a lease.
    let readiness = match &cluster {
        Some(node) => {
            health_reporter
                .set_not_serving::<TimerServiceServer<TimerApi>>()
                .await;
            Some(tokio::spawn(track_readiness(
                node.clone(),
                health_reporter.clone(),
            )))
        }
        None => {
            health_reporter
                .set_serving::<TimerServiceServer<TimerApi>>()
                .await;
            None
        }
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(timerdb_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    tracing::info!(
        grpc = %bound,
        metrics = ?config.metrics_listen,
        store = %config.store,
        sink = %config.sink,
        slots = layout.slots,
        bucket_ms = layout.bucket_ms,
        "timerdb ready"
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let node_scheduler = scheduler.clone();
    let node_cluster = cluster.clone();
    let raft_service = cluster.as_ref().map(|c| c.raft_service());
    let cluster_service = cluster.as_ref().map(|c| c.cluster_service());
    let admin_addr = config
        .cluster
        .as_ref()
        .map(|c| c.advertise.clone())
        .unwrap_or_else(|| bound.to_string());
    let admin = AdminService::new(member.clone(), scheduler.clone(), admin_addr).into_server();
    if let (Some(c), Some(node)) = (&config.cluster, &cluster)
        && let Some(join) = c.join.clone()
    {
        tokio::spawn(join_cluster(node.clone(), join, c.advertise.clone()));
    }
    if let Some(node) = &cluster {
        tokio::spawn(rejoin_after_leaving(node.clone()));
    }
    // Before the server stops answering (Raft and lease renewals go through it too), a
    // member stopping gracefully hands its ranges to the others.
    let leaving = match (&member, &config.cluster) {
        (Some(m), Some(c)) => Some((m.clone(), c.leave_timeout, health_reporter.clone())),
        _ => None,
    };
    let stopped = async move {
        let _ = stopped.await;
        // Stopped for good before the last word on readiness is written.
        if let Some(tracker) = readiness {
            tracker.abort();
            let _ = tracker.await;
        }
        if let Some((member, timeout, health)) = leaving {
            health
                .set_not_serving::<TimerServiceServer<TimerApi>>()
                .await;
            leave_cluster(&member, timeout).await;
        }
    };
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                name_the_message_limit::<tonic::body::Body>,
            ))
            .add_service(health)
            .add_service(reflection)
            .add_optional_service(raft_service)
            .add_optional_service(cluster_service)
            .add_service(admin)
            .add_service(
                TimerServiceServer::new(api)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped)
            .await;
        tracing::info!("timerdb stopping: no new calls; finishing in-flight fires");
        health_reporter
            .set_not_serving::<TimerServiceServer<TimerApi>>()
            .await;
        // Writes already under way finish and hand off first, so the progress each range
        // records at its stop covers their timers too.
        let waited = std::time::Instant::now();
        while !node_scheduler.writes().is_empty()
            && waited.elapsed() < config.scheduler.shutdown_timeout
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if let Some(f) = follower {
            f.abort();
        }
        reporter.abort();
        node_scheduler.shutdown().await;
        // The lease is renewed until the ranges have stopped and recorded their progress.
        if let Some(node) = &node_cluster {
            node.shutdown().await;
        }
        store.close().await?;
        tracing::info!("timerdb stopped");
        served.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
    });
    Ok(NodeHandle {
        addr: bound,
        scheduler,
        cluster,
        stop: Some(stop),
        task,
    })
}

async fn start_member(
    c: &crate::config::ClusterSettings,
    slots: u32,
) -> Result<timerdb_raft::ClusterNode> {
    let mut config = timerdb_raft::ClusterConfig::new(c.node_id, &c.advertise, &c.raft_dir);
    config.initial_members = c.initial_members.clone();
    config.slots = slots;
    config.lease = c.lease;
    timerdb_raft::ClusterNode::start(config)
        .await
        .map_err(|e| Error::Config(format!("cluster member {}: {e}", c.node_id)))
}

/// Once a second: the running ranges' figures, and a member's view of itself and the map.
async fn report_metrics(scheduler: Arc<Scheduler>, cluster: Option<timerdb_raft::ClusterNode>) {
    use timerdb_raft::map::MemberState;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = crate::timer::now_ms();
        let report = scheduler.report();
        let slots: usize = report
            .iter()
            .map(|r| (r.range.last - r.range.first + 1) as usize)
            .sum();
        let oldest = report.iter().map(|r| r.low_water_ms).min().unwrap_or(now);
        crate::metrics::ranges(
            slots,
            std::time::Duration::from_millis(now.saturating_sub(oldest)),
        );
        if let Some(node) = &cluster {
            let applied = node.map().borrow().clone();
            let lease_left = node
                .lease_until()
                .map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
                .unwrap_or_default();
            let states = [
                MemberState::Joining,
                MemberState::Active,
                MemberState::Draining,
                MemberState::Gone,
            ];
            let members: Vec<(&'static str, usize)> = states
                .iter()
                .map(|s| {
                    let n = applied
                        .map
                        .members
                        .values()
                        .filter(|m| m.state == *s)
                        .count();
                    (s.as_str(), n)
                })
                .collect();
            let unowned = applied
                .map
                .owners
                .iter()
                .filter(|o| o.owner.is_none())
                .count();
            crate::metrics::clock_offset(node.clock_offset().map_or(0, |c| -c.offset_ms));
            let (grants, checks) = node.lease_work();
            crate::metrics::lease_work(grants, checks);
            crate::metrics::cluster(
                lease_left,
                applied.map.slots_of(node.id()).len(),
                unowned,
                node.is_leader(),
                &members,
            );
        }
    }
}

/// A member stopping gracefully: hands its ranges to the others first
/// ([`timerdb_raft::map::Command::Leave`], the drain path: each new owner starts once this
/// member's lease on the range has ended, and this member stops the range and records its
/// progress before that), so they fire nothing twice. Waits at most `timeout`; does nothing
/// when `timeout` is zero or no other member is active (nobody could take the ranges: the
/// last member of a stopping cluster).
async fn leave_cluster(member: &Member, timeout: std::time::Duration) {
    use timerdb_raft::map::{Command, MemberState};
    let node = member.node();
    let me = node.id();
    if timeout.is_zero() {
        return;
    }
    if !node.map().borrow().map.another_can_take_over(me) {
        tracing::info!(
            node = me,
            "cluster.leave: no other active member; stopping with its ranges"
        );
        return;
    }
    tracing::info!(
        node = me,
        ?timeout,
        "cluster.leave: handing every range to the others"
    );
    let started = std::time::Instant::now();
    let handed = tokio::time::timeout(timeout, async {
        node.propose(Command::Leave { id: me }).await?;
        let mut map = node.map();
        loop {
            let (draining, kept, owns) = {
                let applied = map.borrow();
                let m = &applied.map;
                let state = m.members.get(&me).map(|m| m.state);
                let others = m.another_can_take_over(me);
                (
                    state == Some(MemberState::Draining),
                    // What makes the leave change nothing (once this map has applied it).
                    !others || state == Some(MemberState::Gone),
                    !m.slots_of(me).is_empty(),
                )
            };
            if draining && !owns && member.runs_nothing() {
                return Ok::<bool, timerdb_raft::Error>(true);
            }
            // The cluster kept it: the others are leaving too, or gone. (Until this
            // member's map has applied the leave, it still looks active: wait.)
            if !draining && kept {
                return Ok(false);
            }
            tokio::select! {
                _ = map.changed() => {}
                () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
        }
    })
    .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match handed {
        Ok(Ok(true)) => tracing::info!(
            node = me,
            elapsed_ms,
            "cluster.leave: every range handed over"
        ),
        Ok(Ok(false)) => tracing::info!(
            node = me,
            "cluster.leave: no other member is active to take its ranges; stopping with them"
        ),
        Ok(Err(e)) => tracing::warn!(
            node = me,
            error = %e,
            "cluster.leave: could not leave; stopping with its ranges (the others take them \
             over after the failure timeout)"
        ),
        Err(_) => tracing::warn!(
            node = me,
            elapsed_ms,
            "cluster.leave: timed out; stopping with the ranges it still runs (the others take \
             them over after the failure timeout)"
        ),
    }
}

/// A member that left the cluster at its last shutdown asks to be active again, once its
/// map knows it (gone members are brought back by the leader when they speak again).
/// Keeps a member's `timerdb.v1.TimerService` health status SERVING while it holds a lease
/// from the leader, NOT_SERVING otherwise: before the cluster formed, or cut off from a
/// quorum, a member is not ready (a Kubernetes Service sends calls to the other members;
/// its fires stopped at lease end anyway). The overall status (service "") stays SERVING
/// while the process runs: liveness.
async fn track_readiness(
    node: timerdb_raft::ClusterNode,
    health: tonic_health::server::HealthReporter,
) {
    let mut serving = None;
    loop {
        let ready = node.lease_until().is_some();
        if serving != Some(ready) {
            if ready {
                health.set_serving::<TimerServiceServer<TimerApi>>().await;
            } else {
                health
                    .set_not_serving::<TimerServiceServer<TimerApi>>()
                    .await;
            }
            tracing::info!(
                ready,
                "cluster.readiness: holds a lease from the leader: {ready}"
            );
            serving = Some(ready);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn rejoin_after_leaving(node: timerdb_raft::ClusterNode) {
    use timerdb_raft::map::{Command, MemberState};
    let me = node.id();
    let mut map = node.map();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let state = map
            .borrow()
            .map
            .members
            .get(&me)
            .map(|m| (m.state, m.leaving));
        match state {
            Some((MemberState::Draining, true)) => break,
            // Known and not leaving: nothing to do.
            Some(_) => return,
            None => {}
        }
        tokio::select! {
            _ = map.changed() => {}
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
    loop {
        match node.propose(Command::Rejoin { id: me }).await {
            Ok(()) => {
                tracing::info!(
                    node = me,
                    "cluster.rejoin: back after leaving at the last shutdown"
                );
                return;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(node = me, error = %e, "cluster.rejoin: not yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(node = me, error = %e, "cluster.rejoin: gave up");
                return;
            }
        }
    }
}

/// `--join ADDR`: asks the member at ADDR to add this node, until it has (a restarted
/// member that is in the cluster already is added again harmlessly).
async fn join_cluster(node: timerdb_raft::ClusterNode, join: String, advertise: String) {
    use timerdb_proto::admin::v1 as pb;
    loop {
        if node
            .map()
            .borrow()
            .map
            .members
            .get(&node.id())
            .is_some_and(|m| m.addr == advertise)
        {
            return;
        }
        let result = match timerdb_raft::network::channel(&join, std::time::Duration::from_secs(30))
        {
            Ok(ch) => pb::admin_client::AdminClient::new(ch)
                .add_node(pb::AddNodeRequest {
                    id: node.id(),
                    address: advertise.clone(),
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => tracing::info!(via = %join, "cluster.join: added"),
            Err(e) => {
                tracing::warn!(via = %join, error = %e, "cluster.join: not added yet; retrying")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// tonic refuses a request over the decoding limit with `OUT_OF_RANGE` in its own words;
/// bad input gets `INVALID_ARGUMENT` naming the limit and what to do. No handler answers
/// `OUT_OF_RANGE`, so every such status is that refusal (sent before any handler ran, in
/// the response headers).
fn name_the_message_limit<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11") {
        let found = headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .and_then(|m| m.split("found ").nth(1))
            .and_then(|m| m.split(' ').next())
            .map(|n| format!("{n} bytes"))
            .unwrap_or_else(|| "too large".into());
        let message = format!(
            "the call is {found}, over the largest call the server takes ({MAX_MESSAGE_BYTES} \
             bytes, 64 MiB); split the batch into smaller SetTimeouts calls"
        );
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
        if let Ok(v) = tonic::codegen::http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", v);
        }
    }
    response
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
