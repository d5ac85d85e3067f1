//! The store's scripts on a real Redis Cluster (3 masters and 3 replicas started by
//! `loadtest/redis-cluster.sh`): each user's metering batch, load, lease and backfill charge runs on the
//! master of the user's slot with no CROSSSLOT or MOVED error (every key of one call carries the `{uid}`
//! hash tag), while one pipeline of several users' scripts sent to one master is refused for the users
//! whose slot lives elsewhere (why a cluster client must group a flush by slot). Then the store's cluster
//! client (`RedisStoreConfig::cluster`, seeds only) flushes many users in one `apply` and reads them back.

use std::sync::Arc;

use voicegate_engine::store::backfill::{BackfillLedger, Charge, RedisBackfillLedger};
use voicegate_engine::store::fair_use::FairUseStore;
use voicegate_engine::store::lease::{LeaseKey, LeaseOutcome, LeaseStore, RedisLeaseStore};
use voicegate_engine::store::test_redis::RedisCluster;
use voicegate_engine::store::{
    ApplyOutcome, Batch, Delta, RedisStore, RedisStoreConfig, Store, StoreError, StoreTime,
    WriterId, keys,
};
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, minute_of_ms};

const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;

fn store_on(port: u16) -> RedisStore {
    RedisStore::new(&RedisStoreConfig::new(format!("redis://127.0.0.1:{port}/")))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn at() -> StoreTime {
    StoreTime {
        now_ms: T0,
        retention_ms: 8 * MS_PER_DAY,
        keys_retention_ms: 8 * MS_PER_DAY,
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
    let cluster = RedisCluster::start().unwrap_or_else(|e| panic!("{e}"));
    let mut masters_used = std::collections::BTreeSet::new();
    let mut by_master: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for i in 0..24u64 {
        let uid = format!("cluster-user-{i}");
        let port = cluster
            .master_for(&keys::speech_buckets(&uid))
            .unwrap_or_else(|e| panic!("{e}"));
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

#[tokio::test]
async fn the_cluster_client_applies_many_users_in_one_call_and_reads_them_back() {
    let cluster = RedisCluster::start().unwrap_or_else(|e| panic!("{e}"));
    // Two seeds: the client discovers the other nodes.
    let seeds = cluster.urls()[..2].to_vec();
    let store =
        RedisStore::new(&RedisStoreConfig::cluster(seeds)).unwrap_or_else(|e| panic!("{e}"));
    let uids: Vec<String> = (0..60).map(|i| format!("cl-{i}")).collect();
    let batches: Vec<Batch> = uids
        .iter()
        .enumerate()
        .map(|(i, u)| batch(u, 100 + i as u64))
        .collect();
    let first = store
        .apply(&batches, at())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), 60);
    assert!(
        first
            .iter()
            .all(|r| matches!(r, Ok(ApplyOutcome::Applied { .. }))),
        "{first:?}"
    );
    let again = store
        .apply(&batches, at())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        again
            .iter()
            .all(|r| matches!(r, Ok(ApplyOutcome::Duplicate))),
        "{again:?}"
    );
    let leases = RedisLeaseStore::new(store.connection());
    for (i, uid) in uids.iter().enumerate() {
        let snap = store
            .load(uid, WriterId(7), at())
            .await
            .unwrap_or_else(|e| panic!("{uid}: {e}"));
        assert_eq!(
            snap.buckets,
            vec![(minute_of_ms(T0), 100 + i as u64)],
            "{uid}"
        );
        assert_eq!(snap.writer_seq, 1, "{uid}");
        let key = LeaseKey::user("listen_session", uid.as_str());
        assert_eq!(
            leases.acquire(&key, "n1", 1, T0, 30_000).await.ok(),
            Some(LeaseOutcome::Granted {
                held: 1,
                renewed: false
            })
        );
        assert_eq!(
            leases.acquire(&key, "n2", 1, T0, 30_000).await.ok(),
            Some(LeaseOutcome::Refused { held: 1 })
        );
    }
    let masters: std::collections::BTreeSet<u16> = uids
        .iter()
        .map(|u| cluster.master_for(&keys::speech_buckets(u)).unwrap_or(0))
        .collect();
    assert_eq!(masters.len(), 3, "the users live on all three masters");
    assert!(store.ping().await.is_ok());
}

#[tokio::test]
async fn transactions_right_after_a_failover_follow_the_slot_to_its_new_master() {
    // A load (MULTI … EXEC) and the STT counter's INCRBY + PEXPIRE are transactions, which redis-rs does
    // not redirect: right after a failover they abort with MOVED while its slot map is stale. The store
    // reads the slot once (following the redirect, which rebuilds the map) and sends them again.
    let cluster = RedisCluster::start().unwrap_or_else(|e| panic!("{e}"));
    let store = RedisStore::new(&RedisStoreConfig::cluster(cluster.urls()))
        .unwrap_or_else(|e| panic!("{e}"));
    let fair_use =
        voicegate_engine::store::fair_use_redis::RedisFairUseStore::new(store.connection());
    let uids: Vec<String> = (0..30).map(|i| format!("fo-{i}")).collect();
    let batches: Vec<Batch> = uids.iter().map(|u| batch(u, 250)).collect();
    let applied = store
        .apply(&batches, at())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        applied
            .iter()
            .all(|r| matches!(r, Ok(ApplyOutcome::Applied { .. })))
    );
    for uid in &uids {
        assert_eq!(
            fair_use
                .add_stt_ms(uid, 1, &[("local", 10)])
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            10
        );
    }
    // Every master's slots move to its replica: whatever slot a user lives in, the map is now stale.
    for which in 0..3 {
        cluster.failover(which).unwrap_or_else(|e| panic!("{e}"));
    }
    for uid in &uids {
        let snap = store
            .load(uid, WriterId(7), at())
            .await
            .unwrap_or_else(|e| panic!("{uid}: load after the failover: {e}"));
        assert_eq!(snap.buckets, vec![(minute_of_ms(T0), 250)], "{uid}");
        assert_eq!(
            fair_use
                .add_stt_ms(uid, 1, &[("local", 5)])
                .await
                .unwrap_or_else(|e| panic!("{uid}: {e}")),
            15,
            "{uid}: applied once"
        );
    }
}
