//! The Redis store: one `EVALSHA` of `meter_apply.lua` per user batch, many users per pipeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::connection::{LazyCluster, RedisConnection, transaction};
use super::replicas::{ReplicaView, key_slot};
use redis::{RedisError, ServerErrorKind, Value};

use super::keys;
use super::{
    ApplyOutcome, ApplyResults, Batch, Delta, Store, StoreError, StoreTime, UserSnapshot, WriterId,
};
use crate::time::{Minute, MonthKey};

const METER_SCRIPT: &str = include_str!("meter_apply.lua");
/// TTL backstop of a user's metering keys beyond the retention passed by the caller.
const TTL_SLACK_S: u64 = 24 * 3600;
/// Month totals outlive the longest month; older months are pruned by the script anyway.
const MONTH_TTL_S: u64 = 40 * 24 * 3600;

/// Connection settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db`. `VOICEGATE_REDIS_URL` (read by the server). Unused in cluster mode.
    pub url: String,
    /// Seed URLs of a Redis Cluster (`VOICEGATE_REDIS_CLUSTER_NODES`); empty: the single instance at `url`.
    pub cluster_nodes: Vec<String>,
    /// Each connection attempt times out after this.
    pub connect_timeout: Duration,
    /// Each reply times out after this (the meter also bounds whole calls).
    pub response_timeout: Duration,
    /// Replica acknowledgement of each flush (`VOICEGATE_REDIS_WAIT_REPLICAS`; 0 = off): after a pipeline of
    /// meter scripts, `WAIT` on the same connection (so to the master of the users' slot) for this many
    /// replicas; fewer within `wait_timeout` fails the flush ([`StoreError::NotReplicated`]), which the meter
    /// retries (the retry is a no-op where the script ran), so an acknowledged batch survives a failover.
    pub wait_replicas: u32,
    /// Longest `WAIT` for the replicas (`VOICEGATE_REDIS_WAIT_TIMEOUT_MS`).
    pub wait_timeout: Duration,
}

impl RedisStoreConfig {
    /// A Redis Cluster reached through `seeds` (`redis://host:port` of some of its nodes).
    pub fn cluster(seeds: Vec<String>) -> Self {
        Self {
            cluster_nodes: seeds,
            ..Self::new(String::new())
        }
    }

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster_nodes: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
        }
    }
}

/// [`Store`] on Redis (or Redis Cluster: every key of a user shares the `{uid}` hash tag).
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    script_sha: String,
    /// False until the script was loaded through this store (and again after a `NOSCRIPT`), so the
    /// first pipeline does not bounce off an empty script cache.
    script_loaded: Arc<AtomicBool>,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    /// Which masters can acknowledge (with `wait_replicas`): no `WAIT` goes where it cannot succeed.
    replicas: Arc<ReplicaView>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("script_sha", &self.script_sha)
            .finish_non_exhaustive()
    }
}

pub(super) fn store_error(e: RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Script(e.to_string())
    }
}

impl RedisStore {
    /// Creates the store without waiting for Redis: the connection is made (and remade) on demand, so
    /// the engine starts, and meters into memory, while Redis is down.
    pub fn new(config: &RedisStoreConfig) -> Result<Self, StoreError> {
        let conn = if config.cluster_nodes.is_empty() {
            let client = redis::Client::open(config.url.as_str())
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            RedisConnection::Single(
                ConnectionManager::new_lazy_with_config(client, manager_config)
                    .map_err(store_error)?,
            )
        } else {
            RedisConnection::Cluster(
                LazyCluster::new(
                    &config.cluster_nodes,
                    config.connect_timeout,
                    config.response_timeout,
                )
                .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            )
        };
        let script_sha = redis::Script::new(METER_SCRIPT).get_hash().to_string();
        Ok(Self {
            conn,
            script_sha,
            script_loaded: Arc::new(AtomicBool::new(false)),
            wait_replicas: config.wait_replicas,
            replicas: Arc::new(ReplicaView::new(config.wait_replicas)),
            wait_timeout_ms: config
                .wait_timeout
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        })
    }

    /// A clone of the connection (other stores of the engine share it).
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// SHA1 of the metering script (what `EVALSHA` calls; visible in `INFO commandstats`).
    pub fn script_sha(&self) -> &str {
        &self.script_sha
    }

    /// `PING`: a health check for readiness bodies.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(store_error)
    }

    async fn load_script(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(METER_SCRIPT)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        if sha != self.script_sha {
            return Err(StoreError::Protocol(format!(
                "script sha {sha} != {}",
                self.script_sha
            )));
        }
        self.script_loaded.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn pipeline(&self, batches: &[Batch], at: StoreTime, wait: bool) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let ttl = at.retention_ms.max(at.keys_retention_ms) / 1000 + TTL_SLACK_S;
        for batch in batches {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&self.script_sha).arg(6);
            for key in keys::meter_script_keys(&batch.uid) {
                cmd.arg(key);
            }
            cmd.arg(batch.writer.to_hex())
                .arg(batch.seq)
                .arg(at.now_ms)
                .arg(at.first_kept_minute())
                .arg(at.now_ms.saturating_sub(at.retention_ms))
                .arg(at.first_kept_month())
                .arg(ttl)
                .arg(MONTH_TTL_S)
                .arg(at.keys_cutoff_ms());
            push_delta(&mut cmd, &batch.plain);
            cmd.arg(batch.keyed.len());
            for keyed in &batch.keyed {
                cmd.arg(&keyed.key);
                push_delta(&mut cmd, &keyed.delta);
            }
            pipe.add_command(cmd);
        }
        if wait {
            // Same connection, after the scripts: the master of their slot answers once this many replicas
            // hold every write made on the connection so far (or the timeout passes).
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout_ms);
        }
        pipe
    }

    async fn apply_batches(
        &self,
        batches: &[Batch],
        at: StoreTime,
    ) -> Result<ApplyResults, StoreError> {
        if self.wait_replicas > 0 {
            self.replicas.refresh(&self.conn).await;
        }
        if !self.conn.is_cluster() {
            return self.apply_pipeline(batches, at, Some(None)).await;
        }
        if self.wait_replicas > 0 {
            return self.apply_acknowledged_on_cluster(batches, at).await;
        }
        // A cluster pipeline must stay within one slot: one script call per user, all in flight at once (the
        // cluster connection pipelines them per node).
        let calls = batches.iter().map(|b| self.apply_one(b, at, true));
        Ok(futures_util::future::join_all(calls).await)
    }

    /// One user's script (and `WAIT`, if `wait` and replicas are asked for) in its own pipeline.
    async fn apply_one(
        &self,
        batch: &Batch,
        at: StoreTime,
        wait: bool,
    ) -> Result<ApplyOutcome, StoreError> {
        let wait = wait.then(|| Some(key_slot(&keys::writer_seqs(&batch.uid))));
        match self
            .apply_pipeline(std::slice::from_ref(batch), at, wait)
            .await
        {
            Ok(mut one) => one
                .pop()
                .unwrap_or_else(|| Err(StoreError::Protocol("no reply".into()))),
            Err(e) => Err(e),
        }
    }

    /// A cluster flush with `WAIT`: the users grouped by the master the view puts their slot on. A `WAIT`
    /// blocks the node's connection to its master until the replicas answer or its timeout passes, and the
    /// pipelines of one flush queue behind each other there: so each group sends one user's script and
    /// `WAIT` first, and the others' with `WAIT` only if that one was acknowledged (one timeout per master
    /// and flush at worst, not one per user). A master the view knows cannot acknowledge gets no `WAIT`.
    /// Each user's script and `WAIT` stay in one pipeline: a failover between them makes the pipeline fail
    /// and run again, whole, on the new master.
    async fn apply_acknowledged_on_cluster(
        &self,
        batches: &[Batch],
        at: StoreTime,
    ) -> Result<ApplyResults, StoreError> {
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, b) in batches.iter().enumerate() {
            let slot = key_slot(&keys::writer_seqs(&b.uid));
            groups.entry(self.replicas.group(slot)).or_default().push(i);
        }
        let runs = groups.into_values().map(|members| async move {
            let results = self.apply_group(batches, &members, at).await;
            members.into_iter().zip(results).collect::<Vec<_>>()
        });
        let mut results: Vec<Option<Result<ApplyOutcome, StoreError>>> = vec![None; batches.len()];
        for (i, r) in futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
        {
            results[i] = Some(r);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Protocol("no reply".into()))))
            .collect())
    }

    /// The users `members` of one master: see [`Self::apply_acknowledged_on_cluster`].
    async fn apply_group(
        &self,
        batches: &[Batch],
        members: &[usize],
        at: StoreTime,
    ) -> ApplyResults {
        let Some((&first, rest)) = members.split_first() else {
            return Vec::new();
        };
        let slot = key_slot(&keys::writer_seqs(&batches[first].uid));
        let too_few = match self.replicas.skip(Some(slot)) {
            Some(replicas) => Some(replicas),
            None => {
                let probe = self.apply_one(&batches[first], at, true).await;
                let short = match &probe {
                    Err(StoreError::NotReplicated { acked, .. }) => Some(*acked),
                    _ => None,
                };
                let wait = short.is_none();
                let others = rest.iter().map(|&i| self.apply_one(&batches[i], at, wait));
                let mut results = vec![probe];
                results.extend(futures_util::future::join_all(others).await);
                return match short {
                    Some(acked) => results
                        .into_iter()
                        .enumerate()
                        .map(|(n, r)| {
                            if n > 0 {
                                self.not_acknowledged(r, acked)
                            } else {
                                r
                            }
                        })
                        .collect(),
                    None => results,
                };
            }
        };
        let calls = members
            .iter()
            .map(|&i| self.apply_one(&batches[i], at, false));
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| self.not_acknowledged(r, too_few.unwrap_or(0)))
            .collect()
    }

    /// A script that ran without a `WAIT` toward a master that cannot acknowledge: not acknowledged.
    fn not_acknowledged(
        &self,
        result: Result<ApplyOutcome, StoreError>,
        replicas: u32,
    ) -> Result<ApplyOutcome, StoreError> {
        result.and(Err(StoreError::TooFewReplicas {
            replicas,
            wanted: self.wait_replicas,
        }))
    }

    /// `batches` in one pipeline; with `wait` (`Some(Some(slot))`: the users' slot on a cluster,
    /// `Some(None)`: one Redis; `None`: no `WAIT`) and replicas asked for, `WAIT` after the scripts, unless the view says that master cannot
    /// acknowledge (then the scripts run and each batch that ran fails [`StoreError::TooFewReplicas`]).
    async fn apply_pipeline(
        &self,
        batches: &[Batch],
        at: StoreTime,
        wait: Option<Option<u16>>,
    ) -> Result<ApplyResults, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let wait = if self.wait_replicas == 0 { None } else { wait };
        let too_few = wait.and_then(|slot| self.replicas.skip(slot));
        let send_wait = wait.is_some() && too_few.is_none();
        let pipe = self.pipeline(batches, at, send_wait);
        if !self.script_loaded.load(Ordering::Relaxed) {
            self.load_script().await?;
        }
        for attempt in 0..2 {
            let mut conn = self.conn.clone();
            let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(store_error)?;
            let acked = if send_wait { replies.pop() } else { None };
            if replies.len() != batches.len() {
                return Err(StoreError::Protocol(format!(
                    "{} replies for {} batches",
                    replies.len(),
                    batches.len()
                )));
            }
            let no_script = replies
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript)));
            if no_script && attempt == 0 {
                self.script_loaded.store(false, Ordering::Relaxed);
                // Redis restarted (or flushed its script cache): load and resend. Resending is safe even
                // for batches that ran: (writer, seq) makes them no-ops.
                self.load_script().await?;
                continue;
            }
            // Not acknowledged (a short `WAIT`, or none sent to a master that cannot acknowledge): each batch
            // whose script ran fails with why; a script's own failure is kept (it says what to fix).
            let unacknowledged = match acked {
                Some(acked) => self.check_acknowledged(acked, wait.flatten()).err(),
                None => too_few.map(|replicas| StoreError::TooFewReplicas {
                    replicas,
                    wanted: self.wait_replicas,
                }),
            };
            return Ok(replies
                .into_iter()
                .map(parse_apply_reply)
                .map(|r| match &unacknowledged {
                    Some(e) => r.and(Err(e.clone())),
                    None => r,
                })
                .collect());
        }
        Err(StoreError::Script("NOSCRIPT after SCRIPT LOAD".into()))
    }

    /// The `WAIT` reply: enough replicas, or [`StoreError::NotReplicated`] (the scripts ran on the master, but
    /// an acknowledgement now could be lost by a failover: the caller keeps the batch and retries it).
    /// A short reply holds that master in the view (`slot`: the users' slot on a cluster).
    fn check_acknowledged(&self, reply: Value, slot: Option<u16>) -> Result<(), StoreError> {
        let wanted = self.wait_replicas;
        match reply {
            Value::Int(n) if n >= i64::from(wanted) => Ok(()),
            // Counted by the meter as `voicegate_meter_flush_errors_total{reason="not_replicated"}`.
            Value::Int(n) => {
                let acked = u32::try_from(n.max(0)).unwrap_or(0);
                self.replicas.short(slot, acked);
                Err(StoreError::NotReplicated {
                    acked,
                    wanted,
                    timeout_ms: self.wait_timeout_ms,
                })
            }
            Value::ServerError(e) => Err(StoreError::Script(format!("WAIT: {e}"))),
            other => Err(StoreError::Protocol(format!(
                "unexpected WAIT reply {other:?}"
            ))),
        }
    }

    async fn load_user(
        &self,
        uid: &str,
        writer: WriterId,
        at: StoreTime,
    ) -> Result<UserSnapshot, StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hgetall(keys::speech_buckets(uid))
            .hgetall(keys::month_usage(uid))
            .zrangebyscore_withscores(keys::idempotency_keys(uid), at.keys_cutoff_ms(), "+inf")
            .hget(keys::writer_seqs(uid), writer.to_hex());
        // The user's keys read together (a flush script never lands between them).
        let reply: Result<LoadReply, _> =
            transaction(&mut conn, &pipe, &keys::writer_seqs(uid)).await;
        let (buckets, months, keys_scored, writer_seq) = reply.map_err(store_error)?;
        let first = at.first_kept_minute();
        let mut buckets: Vec<(Minute, u64)> =
            buckets.into_iter().filter(|&(m, _)| m >= first).collect();
        buckets.sort_unstable();
        let mut months: Vec<(MonthKey, u64)> = months.into_iter().collect();
        months.sort_unstable();
        let mut idempotency_keys: Vec<(String, u64)> = keys_scored
            .into_iter()
            .map(|(k, t)| (k, t as u64))
            .collect();
        idempotency_keys.sort();
        Ok(UserSnapshot {
            buckets,
            months,
            idempotency_keys,
            writer_seq: writer_seq.unwrap_or(0),
        })
    }
}

/// Replies of the load pipeline: buckets, months, idempotency keys with scores, the writer's seq.
type LoadReply = (
    HashMap<Minute, u64>,
    HashMap<MonthKey, u64>,
    Vec<(String, f64)>,
    Option<u64>,
);

fn push_delta(cmd: &mut redis::Cmd, delta: &Delta) {
    cmd.arg(delta.buckets.len());
    for &(minute, ms) in &delta.buckets {
        cmd.arg(minute).arg(ms);
    }
    cmd.arg(delta.months.len());
    for &(month, ms) in &delta.months {
        cmd.arg(month).arg(ms);
    }
}

fn parse_apply_reply(value: Value) -> Result<ApplyOutcome, StoreError> {
    let items = match value {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(StoreError::Script(e.to_string())),
        other => {
            return Err(StoreError::Protocol(format!(
                "unexpected script reply {other:?}"
            )));
        }
    };
    match items.first() {
        Some(Value::Int(0)) => Ok(ApplyOutcome::Duplicate),
        Some(Value::Int(1)) => {
            let rejected_keys = items[1..]
                .iter()
                .map(|v| match v {
                    Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
                    other => Err(StoreError::Protocol(format!(
                        "unexpected rejected key {other:?}"
                    ))),
                })
                .collect::<Result<_, _>>()?;
            Ok(ApplyOutcome::Applied { rejected_keys })
        }
        other => Err(StoreError::Protocol(format!(
            "unexpected script status {other:?}"
        ))),
    }
}

impl Store for RedisStore {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        self.load_user(uid, writer, at).boxed()
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        self.apply_batches(batches, at).boxed()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn acknowledges_replicas(&self) -> bool {
        self.wait_replicas > 0
    }
}
