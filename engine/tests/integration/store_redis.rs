//! The Redis store's script against a real `redis-server`, and its agreement with the memory store.

use std::sync::Arc;

use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{
    ApplyOutcome, Batch, Delta, KeyedDelta, MemoryStore, RedisStore, RedisStoreConfig, Store,
    StoreTime, WriterId, keys,
};
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, minute_of_ms};

const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;
const RETENTION: u64 = 8 * MS_PER_DAY;

fn at(now_ms: u64) -> StoreTime {
    StoreTime {
        now_ms,
        retention_ms: RETENTION,
        keys_retention_ms: RETENTION,
    }
}

fn redis() -> (RedisServer, RedisStore) {
    let server = RedisServer::start().expect("redis-server starts");
    let store = RedisStore::new(&RedisStoreConfig::new(server.url())).expect("store");
    (server, store)
}

fn delta(buckets: &[(u32, u64)], month_ms: u64) -> Delta {
    Delta {
        buckets: buckets.to_vec(),
        months: if month_ms > 0 {
            vec![(202611, month_ms)]
        } else {
            vec![]
        },
    }
}

fn batch(uid: &str, writer: u128, seq: u64, plain: Delta, keyed: Vec<KeyedDelta>) -> Batch {
    Batch {
        uid: Arc::from(uid),
        writer: WriterId(writer),
        seq,
        plain,
        keyed,
    }
}

async fn apply_one(store: &dyn Store, b: Batch, now: u64) -> ApplyOutcome {
    store
        .apply(std::slice::from_ref(&b), at(now))
        .await
        .expect("apply")
        .pop()
        .expect("one result")
        .expect("ok")
}

#[tokio::test]
async fn a_batch_applies_once_and_its_retry_is_a_no_op() {
    let (_server, store) = redis();
    let m = minute_of_ms(T0);
    let b = batch("u", 7, 1, delta(&[(m, 5_000)], 5_000), vec![]);
    assert_eq!(
        apply_one(&store, b.clone(), T0).await,
        ApplyOutcome::Applied {
            rejected_keys: vec![]
        }
    );
    assert_eq!(
        apply_one(&store, b.clone(), T0).await,
        ApplyOutcome::Duplicate
    );
    let older = batch("u", 7, 0, delta(&[(m, 1)], 1), vec![]);
    assert_eq!(
        apply_one(&store, older, T0).await,
        ApplyOutcome::Duplicate,
        "at or below the applied seq"
    );
    let snap = store.load("u", WriterId(7), at(T0)).await.unwrap();
    assert_eq!(snap.buckets, vec![(m, 5_000)]);
    assert_eq!(snap.months, vec![(202611, 5_000)]);
    assert_eq!(snap.writer_seq, 1);
}

#[tokio::test]
async fn a_keyed_delta_meters_once_across_writers() {
    let (_server, store) = redis();
    let m = minute_of_ms(T0);
    let keyed = |ms| {
        vec![KeyedDelta {
            key: "file-hash".into(),
            delta: delta(&[(m, ms)], ms),
        }]
    };
    let a = batch("u", 1, 1, Delta::default(), keyed(3_000));
    let b = batch("u", 2, 1, delta(&[(m, 10)], 10), keyed(3_000));
    assert_eq!(
        apply_one(&store, a, T0).await,
        ApplyOutcome::Applied {
            rejected_keys: vec![]
        }
    );
    assert_eq!(
        apply_one(&store, b, T0).await,
        ApplyOutcome::Applied {
            rejected_keys: vec!["file-hash".into()]
        }
    );
    let snap = store.load("u", WriterId(1), at(T0)).await.unwrap();
    assert_eq!(snap.buckets, vec![(m, 3_010)]);
    assert_eq!(snap.idempotency_keys, vec![("file-hash".to_string(), T0)]);
}

#[tokio::test]
async fn apply_prunes_what_fell_out_of_the_retention_at_the_callers_now() {
    let (_server, store) = redis();
    let old = minute_of_ms(T0);
    let b1 = batch(
        "u",
        1,
        1,
        delta(&[(old, 1_000)], 1_000),
        vec![KeyedDelta {
            key: "k".into(),
            delta: delta(&[(old, 5)], 5),
        }],
    );
    apply_one(&store, b1, T0).await;
    let later = T0 + RETENTION + 60_000;
    let b2 = batch("u", 2, 1, delta(&[(minute_of_ms(later), 2_000)], 0), vec![]);
    apply_one(&store, b2, later).await;
    let snap = store.load("u", WriterId(1), at(later)).await.unwrap();
    assert_eq!(snap.buckets, vec![(minute_of_ms(later), 2_000)]);
    assert!(
        snap.idempotency_keys.is_empty(),
        "keys forgotten after the retention"
    );
    assert_eq!(snap.writer_seq, 0, "writer 1 forgotten after the retention");
}

/// A sync file's content hash outlives the buckets: kept the backfill lookback + 2 days (32 days here
/// against the 8 days of buckets and writers), in both stores, so a backdated recording uploaded again
/// three weeks later is still a duplicate (DESIGN §3).
#[tokio::test]
async fn idempotency_keys_are_kept_their_own_longer_retention() {
    let (_server, redis) = redis();
    let memory = MemoryStore::new();
    let long = |now_ms| StoreTime {
        now_ms,
        retention_ms: RETENTION,
        keys_retention_ms: 32 * MS_PER_DAY,
    };
    for store in [&redis as &dyn Store, &memory as &dyn Store] {
        let m = minute_of_ms(T0);
        let keyed = || {
            vec![KeyedDelta {
                key: "backdated-file".into(),
                delta: delta(&[(m, 4_000)], 4_000),
            }]
        };
        let first = batch("u", 1, 1, Delta::default(), keyed());
        let applied = store.apply(&[first], long(T0)).await.unwrap();
        assert_eq!(
            applied[0].as_ref().unwrap(),
            &ApplyOutcome::Applied {
                rejected_keys: vec![]
            }
        );
        // 21 days later: the buckets and the writer are pruned, the key is not.
        let later = T0 + 21 * MS_PER_DAY;
        let again = batch("u", 2, 1, Delta::default(), keyed());
        let applied = store.apply(&[again], long(later)).await.unwrap();
        assert_eq!(
            applied[0].as_ref().unwrap(),
            &ApplyOutcome::Applied {
                rejected_keys: vec!["backdated-file".into()]
            },
            "re-upload after 21 days metered again"
        );
        let snap = store.load("u", WriterId(1), long(later)).await.unwrap();
        assert!(snap.buckets.is_empty());
        assert_eq!(
            snap.idempotency_keys,
            vec![("backdated-file".to_string(), T0)]
        );
        // Past the keys' retention, the key is forgotten too.
        let snap = store
            .load("u", WriterId(1), long(T0 + 33 * MS_PER_DAY))
            .await
            .unwrap();
        assert!(snap.idempotency_keys.is_empty());
    }
}

#[tokio::test]
async fn every_key_written_carries_the_uid_hash_tag() {
    let (server, store) = redis();
    let m = minute_of_ms(T0);
    let b = batch(
        "user-42",
        1,
        1,
        delta(&[(m, 1)], 1),
        vec![KeyedDelta {
            key: "k".into(),
            delta: delta(&[(m, 1)], 1),
        }],
    );
    apply_one(&store, b, T0).await;
    let reply = server.command(&["KEYS", "*"]).unwrap();
    let names: Vec<&str> = reply.lines().filter(|l| l.starts_with("vg:")).collect();
    assert_eq!(names.len(), 6, "{reply}");
    for name in names {
        assert_eq!(keys::hash_tag(name), Some("user-42"), "{name}");
    }
}

#[tokio::test]
async fn a_restarted_redis_keeps_the_data_and_the_script_is_reloaded() {
    let mut server = RedisServer::start_durable().expect("redis-server starts");
    let store = RedisStore::new(&RedisStoreConfig::new(server.url())).unwrap();
    let m = minute_of_ms(T0);
    apply_one(
        &store,
        batch("u", 1, 1, delta(&[(m, 1_000)], 1_000), vec![]),
        T0,
    )
    .await;
    server.restart().unwrap();
    // The first call after the restart may see the dropped connection; the meter retries it.
    let b2 = batch("u", 1, 2, delta(&[(m, 500)], 500), vec![]);
    let mut outcome = store.apply(std::slice::from_ref(&b2), at(T0)).await;
    if outcome.is_err() {
        outcome = store.apply(std::slice::from_ref(&b2), at(T0)).await;
    }
    assert_eq!(
        outcome.unwrap().pop().unwrap().unwrap(),
        ApplyOutcome::Applied {
            rejected_keys: vec![]
        }
    );
    let snap = store.load("u", WriterId(1), at(T0)).await.unwrap();
    assert_eq!(snap.buckets, vec![(m, 1_500)]);
    assert_eq!(snap.writer_seq, 2);
}

#[tokio::test]
async fn one_pipeline_carries_one_script_call_per_user() {
    let (server, store) = redis();
    let m = minute_of_ms(T0);
    let batches: Vec<Batch> = (0..100)
        .map(|i| {
            batch(
                &format!("u{i}"),
                1,
                1,
                delta(&[(m, 10), (m + 1, 20)], 30),
                vec![],
            )
        })
        .collect();
    let before = server.command_calls("evalsha").unwrap();
    let results = store.apply(&batches, at(T0 + 120_000)).await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(server.command_calls("evalsha").unwrap() - before, 100);
}

#[tokio::test]
async fn redis_and_memory_stores_agree() {
    let (_server, redis) = redis();
    let memory = MemoryStore::new();
    let mut state = 0x1234_5678u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut now = T0;
    for step in 0..300u64 {
        now += next(4 * MS_PER_HOUR);
        let uid = format!("u{}", next(3));
        let writer = next(3) as u128;
        let seq = 1 + next(step + 1);
        let mut buckets: Vec<(u32, u64)> = (0..1 + next(3))
            .map(|_| {
                (
                    minute_of_ms(now.saturating_sub(next(9 * MS_PER_DAY))),
                    1 + next(5_000),
                )
            })
            .collect();
        buckets.sort();
        buckets.dedup_by_key(|b| b.0);
        let keyed = if next(3) == 0 {
            vec![KeyedDelta {
                key: format!("k{}", next(5)),
                delta: delta(&[(minute_of_ms(now), 1 + next(100))], 7),
            }]
        } else {
            vec![]
        };
        let b = batch(&uid, writer, seq, delta(&buckets, 1 + next(100)), keyed);
        let r = apply_one(&redis, b.clone(), now).await;
        let m = apply_one(&memory, b, now).await;
        assert_eq!(r, m, "step {step}");
    }
    for uid in ["u0", "u1", "u2"] {
        for w in 0..3 {
            let r = redis.load(uid, WriterId(w), at(now)).await.unwrap();
            let m = memory.load(uid, WriterId(w), at(now)).await.unwrap();
            assert_eq!(r, m, "{uid} writer {w}");
        }
    }
}
