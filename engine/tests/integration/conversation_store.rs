//! The conversation store contract, in memory and against a real redis-server: create-or-merge, idempotent
//! retries, per-user isolation, unlock-all, and no duplicates under concurrent writers on two "nodes".

use std::sync::Arc;

use voicegate_engine::conversation::{
    ConversationStore, MemoryConversationStore, RedisConversationStore, Upsert,
};
use voicegate_engine::store::plans::{MemoryPlanStore, PlanRecordValue, PlanStore, RedisPlanStore};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::time::Span;

const T0: u64 = 1_790_000_000_000;

fn upsert(uid: &str, spans: &[(u64, u64)], locked: bool) -> Upsert {
    Upsert {
        uid: uid.into(),
        spans: spans
            .iter()
            .map(|&(s, e)| Span {
                start: T0 + s,
                end: T0 + e,
            })
            .collect(),
        locked,
        source: "omi".into(),
        target: None,
    }
}

async fn redis() -> (RedisServer, redis::aio::ConnectionManager) {
    let server = RedisServer::start().expect("redis-server");
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    (server, conn)
}

async fn contract(store: Arc<dyn ConversationStore>) {
    // Two spans 70 s apart merge; one 10 min later starts another conversation.
    let first = store
        .upsert(upsert(
            "a",
            &[(0, 30_000), (100_000, 130_000), (700_000, 720_000)],
            false,
        ))
        .await
        .unwrap();
    assert_eq!(first.new.len(), 2);
    assert!(first.updated.is_empty());

    // A retry changes nothing and answers the same ids as updated.
    let again = store
        .upsert(upsert(
            "a",
            &[(0, 30_000), (100_000, 130_000), (700_000, 720_000)],
            false,
        ))
        .await
        .unwrap();
    assert!(again.new.is_empty());
    assert_eq!(again.updated, first.new);

    // Another user never sees or joins a's conversations.
    let b = store
        .upsert(upsert("b", &[(0, 30_000)], true))
        .await
        .unwrap();
    assert_eq!(b.new.len(), 1);
    assert!(store.get("a", &b.new[0]).await.unwrap().is_none());
    assert!(store.get("b", &first.new[0]).await.unwrap().is_none());

    // A locked request locks what it touches.
    let locked = store
        .upsert(upsert("a", &[(140_000, 150_000)], true))
        .await
        .unwrap();
    assert_eq!(locked.updated.len(), 1);
    let c = store.get("a", &locked.updated[0]).await.unwrap().unwrap();
    assert!(c.is_locked);
    assert_eq!(c.spans.len(), 3);
    assert_eq!((c.started_at_ms, c.finished_at_ms), (T0, T0 + 150_000));

    let page = store.list("a", 10, 0).await.unwrap();
    assert_eq!(page.conversations.len(), 2);
    assert!(!page.more);
    assert!(page.conversations[0].started_at_ms > page.conversations[1].started_at_ms);
    let page = store.list("a", 1, 0).await.unwrap();
    assert!(page.more);

    // Unlock clears all of a's locks, and only a's.
    assert_eq!(store.unlock_all("a").await.unwrap(), 1);
    assert_eq!(store.unlock_all("a").await.unwrap(), 0);
    assert!(
        !store
            .get("a", &locked.updated[0])
            .await
            .unwrap()
            .unwrap()
            .is_locked
    );
    assert!(store.get("b", &b.new[0]).await.unwrap().unwrap().is_locked);

    // A target id takes every span.
    let mut to_target = upsert("a", &[(3_600_000, 3_610_000)], false);
    to_target.target = Some(first.new[0].clone());
    let t = store.upsert(to_target).await.unwrap();
    assert!(t.new.is_empty());
    assert_eq!(t.updated.len(), 1);
    assert_eq!(
        store
            .get("a", &t.updated[0])
            .await
            .unwrap()
            .unwrap()
            .finished_at_ms,
        T0 + 3_610_000
    );
    // Garbage ids are just missing.
    assert!(store.get("a", "../etc").await.unwrap().is_none());
    assert!(store.get("a", "99999999-x").await.unwrap().is_none());
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryConversationStore::default())).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let (_server, conn) = redis().await;
    contract(Arc::new(RedisConversationStore::new(conn))).await;
}

/// 40 concurrent retries of the same upload on two independent store instances (two nodes, no shared local
/// lock) create exactly one set of conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_on_two_nodes_never_duplicate() {
    let (_server, conn) = redis().await;
    let nodes = [
        Arc::new(RedisConversationStore::new(conn.clone())),
        Arc::new(RedisConversationStore::new(conn)),
    ];
    let spans = [(0, 30_000), (60_000, 90_000), (900_000, 930_000)];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = nodes[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            store.upsert(upsert("u", &spans, false)).await.unwrap()
        }));
    }
    let mut created = Vec::new();
    for t in tasks {
        let o = t.await.unwrap();
        created.extend(o.new);
    }
    created.sort();
    assert_eq!(
        created.len(),
        2,
        "exactly one creation per conversation: {created:?}"
    );
    let page = nodes[0].list("u", 50, 0).await.unwrap();
    assert_eq!(page.conversations.len(), 2);
    assert_eq!(
        page.conversations
            .iter()
            .map(|c| c.spans.len())
            .sum::<usize>(),
        3
    );
}

async fn plan_contract(store: Arc<dyn PlanStore>) {
    assert_eq!(store.get("u").await.unwrap(), None);
    let v = PlanRecordValue {
        plan: "unlimited".into(),
        updated_at_ms: T0,
        event_id: "evt_1".into(),
    };
    assert!(store.set("u", &v).await.unwrap());
    assert!(
        !store.set("u", &v).await.unwrap(),
        "the same event applies once"
    );
    assert_eq!(store.get("u").await.unwrap().as_deref(), Some("unlimited"));
    assert_eq!(store.get("other").await.unwrap(), None);
}

#[tokio::test]
async fn plan_stores_keep_the_contract() {
    plan_contract(Arc::new(MemoryPlanStore::default())).await;
    let (_server, conn) = redis().await;
    plan_contract(Arc::new(RedisPlanStore::new(conn))).await;
}
