//! `timerdb admin`: status, membership and placement of a cluster, through any member.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use timerdb_client::DEFAULT_SERVER;
use timerdb_proto::admin::v1 as pb;
use timerdb_proto::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

/// `timerdb admin`
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Any member: host:port or a URL.
    #[arg(long, env = "TIMERDB_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Members, leader, term, and every range with owner, epoch, lease left, low-water-mark
    /// lag, timers in memory and fires per second.
    Status,
    /// Bootstrap a cluster of members started with --node-id only: ID=host:port,...
    Init {
        /// The members, e.g. 1=10.0.0.1:7420,2=10.0.0.2:7420,3=10.0.0.3:7420.
        members: String,
    },
    /// Add a running member (started with --node-id ID --advertise ADDR).
    AddNode {
        /// Its id.
        id: u64,
        /// Its host:port.
        addr: String,
    },
    /// Remove a member that owns nothing (drain it first).
    RemoveNode {
        /// Its id.
        id: u64,
    },
    /// Return a drained (or gone) member to service: it is active again and the slots
    /// are spread over it (a drain lasts until this, even across restarts).
    Activate {
        /// Its id.
        id: u64,
    },
    /// Move every range away from a member and wait until it runs none; it can then stop
    /// with nothing lost and nothing fired twice.
    Drain {
        /// Its id.
        id: u64,
        /// Return once the change is made, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait.
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Place slots START..END (END inclusive) on a member.
    MoveRange {
        /// START..END, e.g. 0..63.
        range: String,
        /// The member.
        #[arg(long)]
        to: u64,
    },
    /// Spread the slots evenly over the active members now.
    Rebalance,
}

async fn connect(server: &str) -> anyhow::Result<AdminClient<Channel>> {
    let channel = timerdb_client::endpoint(server)
        .context("--server")?
        .connect()
        .await
        .with_context(|| format!("--server: cannot reach a TimerDB node at {server}"))?;
    Ok(AdminClient::new(channel))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code(), s.message())
}

/// `START..END`, both inclusive.
fn parse_range(v: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("range {v:?}: write START..END with END inclusive, e.g. 0..63");
    let (a, b) = v.split_once("..").ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a > b {
        bail!("range {v:?}: START is after END");
    }
    Ok((a, b))
}

fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "leader": s.leader,
        "term": s.term,
        "members": s.members.iter().map(|m| json!({
            "id": m.id,
            "address": m.address,
            "state": m.state,
            "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
        })).collect::<Vec<_>>(),
        "ranges": s.ranges.iter().map(|r| json!({
            "start": r.start,
            "end": r.end,
            "owner": r.owner,
            "epoch": r.epoch,
            "lease_left_ms": r.lease_left_ms,
            "low_water_lag_ms": r.low_water_lag_ms,
            "in_memory": r.in_memory,
            "fired_per_s": r.fired_per_s,
        })).collect::<Vec<_>>(),
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_status(s: &pb::StatusReply) {
    println!(
        "leader: {}   term: {}   (answered by node {})",
        opt(s.leader),
        s.term,
        s.answered_by
    );
    println!(
        "\n{:>4}  {:<22} {:<9} {:>16}",
        "id", "address", "state", "heartbeat_ms_ago"
    );
    for m in &s.members {
        println!(
            "{:>4}  {:<22} {:<9} {:>16}",
            m.id,
            m.address,
            m.state,
            opt(m.last_heartbeat_ms_ago)
        );
    }
    println!(
        "\n{:>11}  {:>5} {:>6} {:>13} {:>16} {:>9} {:>11}",
        "slots", "owner", "epoch", "lease_left_ms", "low_water_lag_ms", "in_memory", "fired_per_s"
    );
    for r in &s.ranges {
        println!(
            "{:>11}  {:>5} {:>6} {:>13} {:>16} {:>9} {:>11}",
            format!("{}..{}", r.start, r.end),
            opt(r.owner),
            r.epoch,
            opt(r.lease_left_ms),
            opt(r.low_water_lag_ms),
            opt(r.in_memory),
            r.fired_per_s
                .map_or_else(|| "-".into(), |f| format!("{f:.1}"))
        );
    }
}

fn done(json_out: bool, what: &str, r: pb::ChangeReply) {
    if json_out {
        println!("{}", json!({"ok": true, "applied_index": r.applied_index}));
    } else {
        println!("{what} (cluster map at log index {})", r.applied_index);
    }
}

/// Waits until member `id` owns no slot and runs no range.
async fn wait_drained(
    client: &mut AdminClient<Channel>,
    id: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = client
            .status(pb::StatusRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        let owns = s.ranges.iter().filter(|r| r.owner == Some(id)).count();
        let address = s
            .members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.address.clone())
            .with_context(|| format!("no member {id}"))?;
        let runs = if owns == 0 {
            match connect(&address).await {
                Ok(mut c) => c
                    .node_stats(pb::NodeStatsRequest {})
                    .await
                    .map(|r| r.into_inner().ranges.len())
                    .unwrap_or(0),
                // Not answering: it runs nothing.
                Err(_) => 0,
            }
        } else {
            owns
        };
        if owns == 0 && runs == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("node {id} still owns {owns} ranges (runs {runs}) after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs an admin command; output goes to stdout.
pub async fn run(a: AdminArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.server).await?;
    match a.command {
        AdminCommand::Status => {
            let s = client
                .status(pb::StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if a.json {
                println!("{}", status_json(&s));
            } else {
                print_status(&s);
            }
        }
        AdminCommand::Init { members } => {
            let r = client
                .init(pb::InitRequest { members })
                .await
                .map_err(status_error)?;
            done(a.json, "cluster bootstrapped", r.into_inner());
        }
        AdminCommand::AddNode { id, addr } => {
            let r = client
                .add_node(pb::AddNodeRequest { id, address: addr })
                .await
                .map_err(status_error)?;
            done(
                a.json,
                &format!("node {id} added; slots spread again"),
                r.into_inner(),
            );
        }
        AdminCommand::RemoveNode { id } => {
            let r = client
                .remove_node(pb::NodeRequest { id })
                .await
                .map_err(status_error)?;
            done(a.json, &format!("node {id} removed"), r.into_inner());
        }
        AdminCommand::Drain {
            id,
            no_wait,
            timeout,
        } => {
            let timeout = humantime::parse_duration(&timeout)
                .with_context(|| format!("--timeout {timeout:?}: expected a duration like 5m"))?;
            let r = client
                .drain(pb::NodeRequest { id })
                .await
                .map_err(status_error)?;
            if !no_wait {
                wait_drained(&mut client, id, timeout).await?;
            }
            let what = if no_wait {
                format!("node {id} is draining")
            } else {
                format!("node {id} is drained: it owns and runs nothing, and may stop")
            };
            done(a.json, &what, r.into_inner());
        }
        AdminCommand::Activate { id } => {
            let r = client
                .activate(pb::NodeRequest { id })
                .await
                .map_err(status_error)?;
            done(
                a.json,
                &format!("node {id} is active: slots are moving to it"),
                r.into_inner(),
            );
        }
        AdminCommand::MoveRange { range, to } => {
            let (start, end) = parse_range(&range)?;
            let r = client
                .move_range(pb::MoveRangeRequest { start, end, to })
                .await
                .map_err(status_error)?;
            done(
                a.json,
                &format!("slots {start}..{end} placed on node {to}"),
                r.into_inner(),
            );
        }
        AdminCommand::Rebalance => {
            let r = client
                .rebalance(pb::RebalanceRequest {})
                .await
                .map_err(status_error)?;
            done(a.json, "slots spread evenly", r.into_inner());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_inclusive_and_bad_ones_are_named() {
        assert_eq!(parse_range("0..63").unwrap(), (0, 63));
        assert_eq!(parse_range("5..5").unwrap(), (5, 5));
        assert!(
            parse_range("9..3")
                .unwrap_err()
                .to_string()
                .contains("START is after END")
        );
        assert!(
            parse_range("a..b")
                .unwrap_err()
                .to_string()
                .contains("START..END")
        );
    }
}
