//! The sync v2 job store, both implementations through the same scenarios (the Redis one against a real
//! `redis-server`): the per-user quotas of open jobs and of spooled bytes (released when a job finishes or
//! is an orphan, never by taking it off the queue), the run queue, and the oldest job due per lane.

use voicegate_engine::store::RedisStore;
use voicegate_engine::store::RedisStoreConfig;
use voicegate_engine::store::sync_jobs::{
    CreateLimits, Created, DueJob, MemorySyncJobStore, OldestDue, QueuedJob, SyncJobStore,
};
use voicegate_engine::store::sync_jobs_redis::RedisSyncJobStore;
use voicegate_engine::store::test_redis::RedisServer;

const T0: u64 = 1_795_737_600_000;
/// Long enough that no record expires in Redis (real time) while a test runs.
const RETENTION: u64 = 3_600_000;
const LIMITS: CreateLimits = CreateLimits {
    max_open_per_user: 3,
    max_bytes_per_user: 1_000,
    retention_ms: RETENTION,
};

fn redis() -> (RedisServer, RedisSyncJobStore) {
    let server = RedisServer::start().expect("redis-server starts");
    let store = RedisStore::new(&RedisStoreConfig::new(server.url())).expect("store");
    (server, RedisSyncJobStore::new(store.connection()))
}

fn job(uid: &str, id: &str, backfill: bool) -> QueuedJob {
    QueuedJob {
        uid: uid.into(),
        job_id: id.into(),
        backfill,
    }
}

async fn create(s: &dyn SyncJobStore, uid: &str, id: &str, bytes: u64, now: u64) -> Created {
    s.create(uid, id, "{}", bytes, now, LIMITS)
        .await
        .expect("create")
}

/// The byte quota counts a user's open jobs only, is released by a finish (not by an unqueue) and by the
/// orphan rule, and is checked after the jobs quota.
async fn byte_quota_is_per_user_and_released_where_the_job_count_is(s: &dyn SyncJobStore) {
    assert_eq!(create(s, "u", "a", 600, T0).await, Created::Created);
    assert_eq!(
        create(s, "u", "b", 500, T0 + 1).await,
        Created::UserBytesFull { bytes: 600 }
    );
    // Another user's bytes are their own.
    assert_eq!(create(s, "v", "x", 900, T0 + 2).await, Created::Created);
    // Up to the quota exactly.
    assert_eq!(create(s, "u", "b", 400, T0 + 3).await, Created::Created);
    assert_eq!(
        create(s, "u", "c", 1, T0 + 4).await,
        Created::UserBytesFull { bytes: 1_000 }
    );
    assert_eq!(create(s, "u", "c", 0, T0 + 5).await, Created::Created);
    // Three open jobs: the jobs quota answers first.
    assert_eq!(
        create(s, "u", "d", 0, T0 + 6).await,
        Created::UserQuotaFull { open: 3 }
    );
    // A refused create left nothing behind.
    assert_eq!(s.get("u", "d").await.expect("get"), None);

    // The finished job's bytes are released; taking a job off the queue releases nothing.
    let a = job("u", "a", false);
    s.schedule(&a, T0).await.expect("schedule");
    s.finish(&a, "{\"done\":1}", RETENTION)
        .await
        .expect("finish");
    assert_eq!(
        s.get("u", "a").await.expect("get").as_deref(),
        Some("{\"done\":1}")
    );
    let b = job("u", "b", false);
    s.schedule(&b, T0).await.expect("schedule");
    s.unqueue(&b).await.expect("unqueue");
    assert_eq!(
        create(s, "u", "e", 601, T0 + 7).await,
        Created::UserBytesFull { bytes: 400 }
    );
    assert_eq!(create(s, "u", "e", 600, T0 + 8).await, Created::Created);

    // Open entries older than the retention are orphans: dropped with their bytes.
    assert_eq!(
        create(s, "u", "f", 1_000, T0 + RETENTION + 10).await,
        Created::Created
    );
    assert_eq!(
        create(s, "u", "g", 1, T0 + RETENTION + 11).await,
        Created::UserBytesFull { bytes: 1_000 }
    );
}

fn due(job: &QueuedJob, due_ms: u64) -> Option<DueJob> {
    Some(DueJob {
        job: job.clone(),
        due_ms,
    })
}

/// Due jobs come earliest first; a deferred job is not due, and is not the oldest waiting one; a job the
/// caller skips (running) is not either.
async fn queue_and_oldest_due_per_lane(s: &dyn SyncJobStore) {
    assert_eq!(
        s.oldest_due(T0, &[]).await.expect("oldest"),
        OldestDue::default()
    );
    let a = job("u", "a", false);
    let b = job("u", "b", true);
    let c = job("w", "c", false);
    let d = job("w", "d", true);
    s.schedule(&a, T0 + 10).await.expect("schedule");
    s.schedule(&b, T0 + 20).await.expect("schedule");
    s.schedule(&c, T0 + 5_000).await.expect("schedule");
    s.schedule(&d, T0 + 15).await.expect("schedule");
    assert_eq!(s.queued().await.expect("queued"), 4);
    assert_eq!(
        s.due(T0 + 100, 10).await.expect("due"),
        vec![a.clone(), d.clone(), b.clone()]
    );
    assert_eq!(
        s.oldest_due(T0 + 100, &[]).await.expect("oldest"),
        OldestDue {
            fresh: due(&a, T0 + 10),
            backfill: due(&d, T0 + 15),
        }
    );
    assert_eq!(
        s.oldest_due(T0 + 12, &[]).await.expect("oldest"),
        OldestDue {
            fresh: due(&a, T0 + 10),
            backfill: None,
        }
    );
    // `d` runs: `b` is the oldest backfill job waiting.
    assert_eq!(
        s.oldest_due(T0 + 100, std::slice::from_ref(&d))
            .await
            .expect("oldest")
            .backfill,
        due(&b, T0 + 20)
    );
    // Ended: the only other fresh job is deferred to T0 + 5 s.
    s.finish(&a, "{}", RETENTION).await.expect("finish");
    assert_eq!(
        s.oldest_due(T0 + 100, &[]).await.expect("oldest"),
        OldestDue {
            fresh: None,
            backfill: due(&d, T0 + 15),
        }
    );
    assert_eq!(
        s.oldest_due(T0 + 6_000, &[]).await.expect("oldest").fresh,
        due(&c, T0 + 5_000)
    );
}

/// A backfill job behind more due fresh jobs than one read of the queue holds is still found.
async fn oldest_due_looks_past_a_long_run_of_one_lane(s: &dyn SyncJobStore) {
    for i in 0..1_200 {
        s.schedule(&job("u", &format!("f{i:04}"), false), T0 + i)
            .await
            .expect("schedule");
    }
    let late = job("w", "late", true);
    s.schedule(&late, T0 + 2_000).await.expect("schedule");
    s.schedule(&job("w", "future", true), T0 + 9_000)
        .await
        .expect("schedule");
    assert_eq!(
        s.oldest_due(T0 + 5_000, &[]).await.expect("oldest"),
        OldestDue {
            fresh: due(&job("u", "f0000", false), T0),
            backfill: due(&late, T0 + 2_000),
        }
    );
}

#[tokio::test]
async fn memory_store_byte_quota_is_per_user_and_released_where_the_job_count_is() {
    byte_quota_is_per_user_and_released_where_the_job_count_is(&MemorySyncJobStore::new()).await;
}

#[tokio::test]
async fn redis_store_byte_quota_is_per_user_and_released_where_the_job_count_is() {
    let (_server, store) = redis();
    byte_quota_is_per_user_and_released_where_the_job_count_is(&store).await;
}

#[tokio::test]
async fn memory_store_queue_and_oldest_due_per_lane() {
    let s = MemorySyncJobStore::new();
    queue_and_oldest_due_per_lane(&s).await;
    oldest_due_looks_past_a_long_run_of_one_lane(&MemorySyncJobStore::new()).await;
}

#[tokio::test]
async fn redis_store_queue_and_oldest_due_per_lane() {
    let (_server, store) = redis();
    queue_and_oldest_due_per_lane(&store).await;
    let (_server, store) = redis();
    oldest_due_looks_past_a_long_run_of_one_lane(&store).await;
}
