//! The startup check of `VOICEGATE_REDIS_WAIT_REPLICAS`: asking for replica acknowledgement of each flush
//! from a store that cannot give it would fail every flush, so the server refuses to start instead.
//!
//! - One Redis: `INFO replication` must say `role:master` with at least that many `connected_slaves`.
//! - A Redis Cluster: `CLUSTER NODES` (from any seed) must show, for every master that serves slots, at
//!   least that many replicas of it that are not failing.
//! - A store that cannot be reached at startup is not a refusal (the server starts while Redis is down, by
//!   design): the caller logs it, and flushes fail as `not_replicated` until the replicas answer.

use std::time::Duration;

use super::RedisStoreConfig;

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

/// `CLUSTER NODES`: every master serving slots has at least `wanted` replicas that are not failing.
fn cluster_has_replicas(nodes: &str, wanted: u32) -> Result<(), ReplicaCheckError> {
    // Each line: <id> <ip:port@cport> <flags> <master id or -> <ping> <pong> <epoch> <link> <slot>...
    let rows: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8)
        .collect();
    let failing = |flags: &str| flags.split(',').any(|f| f == "fail" || f == "fail?");
    let mut masters = 0;
    for m in rows
        .iter()
        .filter(|f| f[2].split(',').any(|x| x == "master") && !failing(f[2]) && f.len() > 8)
    {
        masters += 1;
        let replicas = rows
            .iter()
            .filter(|r| r[3] == m[0] && !failing(r[2]))
            .count();
        if replicas < wanted as usize {
            return Err(ReplicaCheckError::TooFew {
                wanted,
                what: format!("cluster master {} has {replicas} healthy replicas", m[1]),
            });
        }
    }
    if masters == 0 {
        return Err(ReplicaCheckError::TooFew {
            wanted,
            what: "the cluster reports no master serving slots".to_owned(),
        });
    }
    Ok(())
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
}
