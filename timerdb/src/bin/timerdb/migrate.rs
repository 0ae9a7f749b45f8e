//! `timerdb migrate`: creates or upgrades a Scylla/Cassandra schema, then exits.

use clap::Args;
use timerdb::store::scylla;

/// `timerdb migrate`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Store URL: scylla://host:9042/keyspace[?replication_factor=3&...].
    #[arg(long, env = "TIMERDB_STORE")]
    pub store: String,
}

/// Applies the migrations the keyspace lacks and says which.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    if args.store.starts_with("embedded:") {
        println!("embedded stores need no migration; they are set up on first start");
        return Ok(());
    }
    let url = scylla::ScyllaUrl::parse(&args.store)?;
    let session = scylla::connect(&url).await?;
    let applied = scylla::migrate(&session, &url).await?;
    if applied.is_empty() {
        println!("keyspace {} is up to date", url.keyspace);
    } else {
        println!("keyspace {}: applied migrations {applied:?}", url.keyspace);
    }
    Ok(())
}
