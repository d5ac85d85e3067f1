//! The startup check of `VOICEGATE_REDIS_WAIT_REPLICAS`: asking for replica acknowledgement of each flush
//! from a store that cannot give it would fail every flush, so the server refuses to start instead.
//!
//! - One Redis: `INFO replication` must say `role:master` with at least that many `connected_slaves`.
//! - A Redis Cluster: `CLUSTER NODES` (from any seed) must show, for every master that serves slots, at
//!   least that many replicas of it that are not failing.
//! - A store that cannot be reached at startup is not a refusal (the server starts while Redis is down, by
//!   design): the caller logs it, and flushes fail as `not_replicated` until the replicas answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::RedisStoreConfig;
use super::connection::RedisConnection;

/// Why the replica check did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaCheckError {
    /// The store answered, and it cannot acknowledge as asked: refuse to start.
    #[error("VOICEGATE_REDIS_WAIT_REPLICAS={wanted} but {what}: set it to 0 or add replicas")]
    TooFew { wanted: u32, what: String },
    /// The store could not be asked (down, refused, timed out): start, and say so.
    #[error("could not check the replicas of the store: {0}")]
    Unreachable(String),
}

/// Checks that the store of `config` can acknowledge writes on `config.wait_replicas` replicas (a no-op
/// when 0). Blocking, bounded by `timeout` per connection and per reply: call it once at startup.
pub fn check_replicas(
    config: &RedisStoreConfig,
    timeout: Duration,
) -> Result<(), ReplicaCheckError> {
    let wanted = config.wait_replicas;
    if wanted == 0 {
        return Ok(());
    }
    let unreachable = |e: redis::RedisError| ReplicaCheckError::Unreachable(e.to_string());
    if config.cluster_nodes.is_empty() {
        let client = redis::Client::open(config.url.as_str()).map_err(unreachable)?;
        let mut conn = client
            .get_connection_with_timeout(timeout)
            .map_err(unreachable)?;
        conn.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut conn)
            .map_err(unreachable)?;
        single_has_replicas(&info, wanted)
    } else {
        let client = redis::cluster::ClusterClientBuilder::new(config.cluster_nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(unreachable)?;
        let mut conn = client.get_connection().map_err(unreachable)?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut conn)
            .map_err(unreachable)?;
        cluster_has_replicas(&nodes, wanted)
    }
}

/// `INFO replication` of a single instance: a master with at least `wanted` connected replicas.
fn single_has_replicas(info: &str, wanted: u32) -> Result<(), ReplicaCheckError> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    let role = field("role").unwrap_or_default();
    if role != "master" {
        return Err(ReplicaCheckError::TooFew {
            wanted,
            what: format!("the store is not a master (role {role:?})"),
        });
    }
    let connected: u32 = field("connected_slaves")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if connected < wanted {
        return Err(ReplicaCheckError::TooFew {
            wanted,
            what: format!("the store has {connected} connected replicas"),
        });
    }
    Ok(())
}

/// A master serving slots, from `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MasterRow {
    id: String,
    addr: String,
    /// Inclusive slot ranges it serves (slots being imported or migrated, `[…]`, are not listed).
    slots: Vec<(u16, u16)>,
    /// Its replicas not flagged `fail` / `fail?`.
    healthy_replicas: u32,
}

/// The masters serving slots in `CLUSTER NODES` (masters flagged failing are left out).
fn cluster_masters(nodes: &str) -> Vec<MasterRow> {
    // Each line: <id> <ip:port@cport> <flags> <master id or -> <ping> <pong> <epoch> <link> <slot>...
    let rows: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8)
        .collect();
    let failing = |flags: &str| flags.split(',').any(|f| f == "fail" || f == "fail?");
    rows.iter()
        .filter(|f| f[2].split(',').any(|x| x == "master") && !failing(f[2]) && f.len() > 8)
        .map(|m| {
            let healthy = rows
                .iter()
                .filter(|r| r[3] == m[0] && !failing(r[2]))
                .count();
            let slots = m[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| {
                    let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                    Some((lo.parse().ok()?, hi.parse().ok()?))
                })
                .collect();
            MasterRow {
                id: m[0].to_owned(),
                addr: m[1].to_owned(),
                slots,
                healthy_replicas: u32::try_from(healthy).unwrap_or(u32::MAX),
            }
        })
        .collect()
}

/// `CLUSTER NODES`: every master serving slots has at least `wanted` replicas that are not failing.
fn cluster_has_replicas(nodes: &str, wanted: u32) -> Result<(), ReplicaCheckError> {
    let masters = cluster_masters(nodes);
    if masters.is_empty() {
        return Err(ReplicaCheckError::TooFew {
            wanted,
            what: "the cluster reports no master serving slots".to_owned(),
        });
    }
    match masters.iter().find(|m| m.healthy_replicas < wanted) {
        Some(m) => Err(ReplicaCheckError::TooFew {
            wanted,
            what: format!(
                "cluster master {} has {} healthy replicas",
                m.addr, m.healthy_replicas
            ),
        }),
        None => Ok(()),
    }
}

/// `INFO replication` of one instance: its replicas that are `state=online` (0 when it is not a master).
fn single_online_replicas(info: &str) -> u32 {
    if !info.lines().any(|l| l.trim() == "role:master") {
        return 0;
    }
    let online = info
        .lines()
        .filter(|l| {
            l.strip_prefix("slave")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                && l.contains("state=online")
        })
        .count();
    u32::try_from(online).unwrap_or(u32::MAX)
}

/// How long a view of the store's replicas is used before the next flush reads it again.
const VIEW_REFRESH: Duration = Duration::from_secs(1);
/// After a `WAIT` came back short, no `WAIT` goes to that master for this long (a replica that died is
/// flagged failing only after the cluster's node timeout; meanwhile each `WAIT` would hold the node's
/// connection to that master for the whole `VOICEGATE_REDIS_WAIT_TIMEOUT_MS`).
const SHORT_HOLD: Duration = Duration::from_secs(5);

/// What a node knows of the replicas of the masters it writes to, so that a flush sends no `WAIT` that
/// cannot succeed: a `WAIT` blocks the node's one multiplexed connection to that master until enough
/// replicas acknowledge or its timeout passes, and every other call to that master (plan and fair-use
/// reads, leases, status) waits behind it. Read (at most once per [`VIEW_REFRESH`], by the flush that finds
/// it stale) from `INFO replication` on one Redis or `CLUSTER NODES` on a cluster; a master whose `WAIT`
/// came back short is held for [`SHORT_HOLD`]. A view that could not be read lets every `WAIT` go (the
/// timeout bounds it, as before).
pub(super) struct ReplicaView {
    wanted: u32,
    state: Mutex<ViewState>,
}

#[derive(Default)]
struct ViewState {
    /// `None`: one Redis (`single` is its replica count); `Some`: a cluster's masters.
    masters: Option<Vec<MasterRow>>,
    single: Option<u32>,
    read_at: Option<Instant>,
    reading: bool,
    /// Master id (`"single"` for one Redis) -> no `WAIT` to it before this instant; the replicas its last
    /// `WAIT` counted.
    held: HashMap<String, (Instant, u32)>,
}

const SINGLE: &str = "single";

impl ReplicaView {
    pub(super) fn new(wanted: u32) -> Self {
        ReplicaView {
            wanted,
            state: Mutex::new(ViewState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the store's replicas again when the view is older than [`VIEW_REFRESH`] (one caller reads;
    /// the others use the view they find). A failed read keeps the old view until the next refresh.
    pub(super) async fn refresh(&self, conn: &RedisConnection) {
        {
            let mut st = self.state();
            if st.reading || st.read_at.is_some_and(|t| t.elapsed() < VIEW_REFRESH) {
                return;
            }
            st.reading = true;
        }
        let mut conn = conn.clone();
        let read = if conn.is_cluster() {
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
                .map(|nodes| (Some(cluster_masters(&nodes)), None))
        } else {
            redis::cmd("INFO")
                .arg("replication")
                .query_async::<String>(&mut conn)
                .await
                .map(|info| (None, Some(single_online_replicas(&info))))
        };
        let mut st = self.state();
        st.reading = false;
        st.read_at = Some(Instant::now());
        match read {
            Ok((masters, single)) => {
                st.masters = masters;
                st.single = single;
            }
            Err(error) => {
                tracing::debug!(message = "Could not read the store's replicas; WAIT is sent as before.", %error);
            }
        }
    }

    /// The master (id, healthy replicas) serving `slot` (`None`: one Redis), if the view knows it.
    fn master_of(st: &ViewState, slot: Option<u16>) -> Option<(String, Option<u32>)> {
        match (slot, &st.masters) {
            (Some(slot), Some(masters)) => masters
                .iter()
                .find(|m| m.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
                .map(|m| (m.id.clone(), Some(m.healthy_replicas))),
            (None, _) => Some((SINGLE.to_owned(), st.single)),
            (Some(_), None) => None,
        }
    }

    /// The master the view puts `slot` on (its id), or the slot itself when the view does not know it.
    pub(super) fn group(&self, slot: u16) -> String {
        match Self::master_of(&self.state(), Some(slot)) {
            Some((id, _)) => id,
            None => format!("slot {slot}"),
        }
    }

    /// `Some(replicas)` when no `WAIT` should go to the master of `slot` (`None`: one Redis): the view
    /// shows it with fewer than the wanted replicas, or its last `WAIT` came back short (held).
    pub(super) fn skip(&self, slot: Option<u16>) -> Option<u32> {
        let st = self.state();
        let (id, replicas) = Self::master_of(&st, slot)?;
        if let Some(n) = replicas
            && n < self.wanted
        {
            return Some(n);
        }
        match st.held.get(&id) {
            Some(&(until, acked)) if Instant::now() < until => Some(acked),
            _ => None,
        }
    }

    /// A `WAIT` to the master of `slot` came back with `acked` replicas, too few: hold that master, and read
    /// the view again.
    pub(super) fn short(&self, slot: Option<u16>, acked: u32) {
        let mut st = self.state();
        if let Some((id, _)) = Self::master_of(&st, slot) {
            st.held.insert(id, (Instant::now() + SHORT_HOLD, acked));
        }
        st.held.retain(|_, (until, _)| Instant::now() < *until);
        st.read_at = None;
    }
}

/// The Redis Cluster hash slot of `key` (CRC16-XMODEM of its hash tag, or of the whole key, mod 16384):
/// what Redis computes, to find the master of a user's keys in the view.
pub(super) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16_384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_needs_enough_connected_replicas() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=127.0.0.1\r\n";
        assert_eq!(single_has_replicas(info, 1), Ok(()));
        let err = single_has_replicas(info, 2).unwrap_err();
        assert!(
            err.to_string().contains("has 1 connected replicas"),
            "{err}"
        );
        let replica = "# Replication\r\nrole:slave\r\nmaster_host:x\r\n";
        assert!(
            single_has_replicas(replica, 1)
                .unwrap_err()
                .to_string()
                .contains("not a master")
        );
    }

    #[test]
    fn every_cluster_master_needs_healthy_replicas() {
        let nodes = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8191
b 127.0.0.1:7001@17001 master - 0 0 2 connected 8192-16383
c 127.0.0.1:7002@17002 slave a 0 0 1 connected
d 127.0.0.1:7003@17003 slave b 0 0 2 connected
";
        assert_eq!(cluster_has_replicas(nodes, 1), Ok(()));
        let failed = nodes.replace("slave b", "slave,fail b");
        let err = cluster_has_replicas(&failed, 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("127.0.0.1:7001@17001 has 0 healthy"),
            "{err}"
        );
        assert!(cluster_has_replicas("", 1).is_err());
    }

    #[test]
    fn the_view_finds_each_slots_master_and_its_healthy_replicas() {
        let nodes = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-100 200 [300->-b]
b 127.0.0.1:7001@17001 master - 0 0 2 connected 101-199 201-299 301-16383
c 127.0.0.1:7002@17002 slave a 0 0 1 connected
d 127.0.0.1:7003@17003 slave,fail b 0 0 2 connected
";
        let masters = cluster_masters(nodes);
        assert_eq!(masters.len(), 2);
        assert_eq!(masters[0].slots, vec![(0, 100), (200, 200)]);
        assert_eq!(masters[0].healthy_replicas, 1);
        assert_eq!(masters[1].healthy_replicas, 0);

        let view = ReplicaView::new(1);
        view.state().masters = Some(masters);
        assert_eq!(view.skip(Some(50)), None, "a's replica is healthy");
        assert_eq!(view.skip(Some(150)), Some(0), "b's replica is failing");
        assert_eq!(view.skip(Some(300)), None, "unknown slot: WAIT as before");
        // A short WAIT holds that master (and no other).
        view.short(Some(50), 0);
        assert_eq!(view.skip(Some(50)), Some(0));
        assert_eq!(view.skip(Some(200)), Some(0), "the same master");
        assert!(view.state().read_at.is_none(), "read again");
    }

    #[test]
    fn one_redis_counts_its_online_replicas() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=1,state=online,offset=1,lag=0\r\n\
            slave1:ip=127.0.0.1,port=2,state=wait_bgsave,offset=0,lag=0\r\n";
        assert_eq!(single_online_replicas(info), 1);
        assert_eq!(single_online_replicas("role:slave\r\nmaster_host:x\r\n"), 0);
        let view = ReplicaView::new(1);
        assert_eq!(view.skip(None), None, "not read yet: WAIT as before");
        view.state().single = Some(0);
        assert_eq!(view.skip(None), Some(0));
    }

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // The examples of the Redis Cluster specification (`CLUSTER KEYSLOT`).
        assert_eq!(key_slot("somekey"), 11_058);
        assert_eq!(key_slot("foo{hash_tag}"), 2_515);
        assert_eq!(
            key_slot("{user1000}.following"),
            key_slot("{user1000}.followers")
        );
        // Only the first `{`…`}` counts: `{bar` is the tag here.
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }
}
