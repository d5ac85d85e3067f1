//! The store's scripts on a real Redis Cluster (3 masters and 3 replicas started by
//! `loadtest/redis-cluster.sh`): each user's metering batch, load, lease and backfill charge runs on the
//! master of the user's slot with no CROSSSLOT or MOVED error (every key of one call carries the `{uid}`
//! hash tag), while one pipeline of several users' scripts sent to one master is refused for the users
//! whose slot lives elsewhere (why a cluster client must group a flush by slot).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use voicegate_engine::store::backfill::{BackfillLedger, Charge, RedisBackfillLedger};
use voicegate_engine::store::lease::{LeaseKey, LeaseOutcome, LeaseStore, RedisLeaseStore};
use voicegate_engine::store::{
    ApplyOutcome, Batch, Delta, RedisStore, RedisStoreConfig, Store, StoreError, StoreTime,
    WriterId, keys,
};
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, minute_of_ms};

const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;

/// A cluster owned by the test, stopped (by its pid files) on drop.
struct Cluster {
    dir: PathBuf,
    ports: Vec<u16>,
}

fn script() -> String {
    format!(
        "{}/../loadtest/redis-cluster.sh",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A free loopback port whose cluster-bus port (+10000) is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
        if port > 55_000 || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "voicegate-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut ports = Vec::new();
        for _ in 0..6 {
            let p = free_cluster_port(&ports);
            ports.push(p);
        }
        let cluster = Cluster { dir, ports };
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&cluster.dir)
            .args(cluster.ports.iter().map(u16::to_string))
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "redis-cluster.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.ports[0].to_string())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the master serving `key`'s slot (from `CLUSTER KEYSLOT` and `CLUSTER NODES`).
    fn master_for(&self, key: &str) -> u16 {
        let slot: u16 = self
            .cli(&["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("keyslot {key}: {e}"));
        for line in self.cli(&["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let port: u16 = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("node address in {line}"));
            for range in &fields[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) else {
                    continue;
                };
                if (lo..=hi).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no master serves slot {slot}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn store_on(port: u16) -> RedisStore {
    RedisStore::new(&RedisStoreConfig::new(format!("redis://127.0.0.1:{port}/")))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn at() -> StoreTime {
    StoreTime {
        now_ms: T0,
        retention_ms: 8 * MS_PER_DAY,
    }
}

fn batch(uid: &str, ms: u64) -> Batch {
    Batch {
        uid: Arc::from(uid),
        writer: WriterId(7),
        seq: 1,
        plain: Delta {
            buckets: vec![(minute_of_ms(T0), ms)],
            months: vec![(202611, ms)],
        },
        keyed: vec![],
    }
}

#[tokio::test]
async fn every_users_scripts_run_on_the_master_of_their_slot_and_a_pipeline_across_slots_is_refused()
 {
    let cluster = Cluster::start();
    let mut masters_used = std::collections::BTreeSet::new();
    let mut by_master: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for i in 0..24u64 {
        let uid = format!("cluster-user-{i}");
        let port = cluster.master_for(&keys::speech_buckets(&uid));
        masters_used.insert(port);
        by_master.entry(port).or_default().push(uid.clone());
        let store = store_on(port);

        let b = batch(&uid, 1_000 + i);
        let first = store.apply(std::slice::from_ref(&b), at()).await;
        let first = first.unwrap_or_else(|e| panic!("{uid}: {e}")).pop();
        assert!(
            matches!(first, Some(Ok(ApplyOutcome::Applied { .. }))),
            "{uid} on {port}: {first:?}"
        );
        let again = store.apply(std::slice::from_ref(&b), at()).await;
        let again = again.unwrap_or_else(|e| panic!("{uid}: {e}")).pop();
        assert!(
            matches!(again, Some(Ok(ApplyOutcome::Duplicate))),
            "{again:?}"
        );
        let snap = store
            .load(&uid, WriterId(7), at())
            .await
            .unwrap_or_else(|e| panic!("{uid}: {e}"));
        assert_eq!(snap.buckets, vec![(minute_of_ms(T0), 1_000 + i)]);
        assert_eq!(snap.writer_seq, 1);

        let leases = RedisLeaseStore::new(store.connection());
        let key = LeaseKey::user("listen_session", uid.as_str());
        let got = leases
            .acquire(&key, "node-1", 4, T0, 30_000)
            .await
            .unwrap_or_else(|e| panic!("{uid}: {e}"));
        assert_eq!(
            got,
            LeaseOutcome::Granted {
                held: 1,
                renewed: false
            }
        );

        let ledger = RedisBackfillLedger::new(store.connection());
        let charged = ledger
            .charge(&uid, 20_000, 500, 1_000)
            .await
            .unwrap_or_else(|e| panic!("{uid}: {e}"));
        assert_eq!(charged, Charge::Granted { used_ms: 500 });
    }
    assert_eq!(masters_used.len(), 3, "24 users spread over the 3 masters");

    // One pipeline, two users, sent to the first user's master: the other user's script is refused there.
    let mut masters = by_master.iter();
    let (Some((&port_a, users_a)), Some((_, users_b))) = (masters.next(), masters.next()) else {
        panic!("two masters");
    };
    let mixed = [batch(&users_a[0], 1), batch(&users_b[0], 1)];
    let mut mixed = mixed;
    for b in &mut mixed {
        b.seq = 2;
    }
    let results = store_on(port_a)
        .apply(&mixed, at())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(results[0], Ok(ApplyOutcome::Applied { .. })),
        "{results:?}"
    );
    assert!(
        matches!(&results[1], Err(StoreError::Script(m)) if m.to_lowercase().contains("moved")),
        "{results:?}"
    );
}
