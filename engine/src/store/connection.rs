//! The one Redis connection every Redis store of a node shares: a single instance (redis-rs's
//! `ConnectionManager`: reconnects on its own) or a Redis Cluster (redis-rs's async cluster connection:
//! routes each command by its key's slot, follows MOVED / ASK, retries node failures with bounded backoff).
//!
//! Both are made without waiting for Redis (the engine starts, and meters into memory, while Redis is down):
//! the cluster connection is opened on first use, and again after a failed attempt.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A single-instance or cluster connection. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(LazyCluster),
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        RedisConnection::Single(conn)
    }
}

impl RedisConnection {
    /// True for a Redis Cluster (one pipeline must then stay within one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// Sends `cmd` to the master serving `slot` on a cluster (on the node's connection to it, where that
    /// slot's scripts went); to the one instance otherwise.
    pub async fn query_slot_master(&mut self, cmd: Cmd, slot: u16) -> Result<Value, RedisError> {
        match self {
            RedisConnection::Single(conn) => cmd.query_async(conn).await,
            RedisConnection::Cluster(lazy) => {
                let Some(slot) = Slot::new(slot) else {
                    return Err(RedisError::from((
                        redis::ErrorKind::Client,
                        "slot out of range",
                        slot.to_string(),
                    )));
                };
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
                let mut conn = lazy.connection().await?;
                conn.route_command(cmd, RoutingInfo::SingleNode(route))
                    .await
            }
        }
    }
}

/// A cluster connection opened on first use.
#[derive(Clone)]
pub struct LazyCluster {
    client: Arc<ClusterClient>,
    conn: Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
}

impl LazyCluster {
    /// `seeds`: `redis://host:port` URLs of some cluster nodes (the others are discovered).
    pub fn new(
        seeds: &[String],
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(500)
            .build()?;
        Ok(LazyCluster {
            client: Arc::new(client),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_async_connection().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(lazy) => async move {
                let mut conn = lazy.connection().await?;
                conn.req_packed_command(cmd).await
            }
            .boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(lazy) => async move {
                let mut conn = lazy.connection().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }
            .boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(conn) => conn.get_db(),
            RedisConnection::Cluster(_) => 0,
        }
    }
}

/// Transactions tried again after a redirect or a transient cluster state (waits of 20, 40, … 1,280 ms:
/// 2.5 s in all, about a failover's election on a cluster with a 2 s node timeout).
const REDIRECTED_TRANSACTION_RETRIES: usize = 7;

/// Runs `pipe`, an atomic pipeline (`MULTI` … `EXEC`) whose keys all live in the slot of `slot_key`.
///
/// redis-rs follows MOVED / ASK for commands and scripts (a MOVED also has it rebuild its slot map, in the
/// background), but not inside a transaction: after a failover or a resharding the queued commands abort
/// with the redirect (`EXECABORT`) while the map is stale, and nothing makes it rebuild. So on a cluster
/// a redirected transaction sends one plain read of the slot (`EXISTS slot_key`), which follows the
/// redirect and starts the rebuild, then the transaction again once the map has it: a few times with a
/// short wait. A redirected transaction ran nothing, so sending it again is safe. (Found by the replay
/// oracle on a cluster, `meter_oracle::replayed_event_logs_meter_exactly_once_on_a_cluster`.) The
/// transient refusals redis-rs waits out and retries for plain commands (`CLUSTERDOWN`, `TRYAGAIN`,
/// `MASTERDOWN`, `LOADING`; `READONLY` from a master just demoted) abort a transaction the same way, and
/// are tried again the same way (a CI run under load saw `CLUSTERDOWN` for a moment after a failover).
pub async fn transaction<T: redis::FromRedisValue>(
    conn: &mut RedisConnection,
    pipe: &Pipeline,
    slot_key: &str,
) -> Result<T, RedisError> {
    let mut reply = pipe.query_async(conn).await;
    let mut wait = Duration::from_millis(20);
    for _ in 0..REDIRECTED_TRANSACTION_RETRIES {
        match &reply {
            Err(e) if conn.is_cluster() && redirected_transaction(e) => {
                let _: bool = redis::cmd("EXISTS").arg(slot_key).query_async(conn).await?;
                tokio::time::sleep(wait).await;
                wait *= 2;
                reply = pipe.query_async(conn).await;
            }
            _ => break,
        }
    }
    reply
}

/// A transaction whose commands were redirected to another node (`MOVED` / `ASK` inside `MULTI`), or refused
/// for a transient cluster state: it ran nothing, and may run once the cluster has settled.
fn redirected_transaction(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort)
        && e.clone().into_server_errors().is_some_and(|errs| {
            errs.iter().any(|(_, err)| {
                matches!(
                    err.kind(),
                    Some(
                        redis::ServerErrorKind::Moved
                            | redis::ServerErrorKind::Ask
                            | redis::ServerErrorKind::ClusterDown
                            | redis::ServerErrorKind::TryAgain
                            | redis::ServerErrorKind::MasterDown
                            | redis::ServerErrorKind::BusyLoading
                            | redis::ServerErrorKind::ReadOnly
                    )
                )
            })
        })
}
