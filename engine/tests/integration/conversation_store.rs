//! The conversation store contract, in memory and against a real redis-server: create-or-merge, idempotent
//! retries, per-user isolation, unlock-all, no duplicates under concurrent writers on two "nodes", and
//! transcripts: added by segment id (bounded), refused for a missing or another user's conversation, gone
//! with their conversation when it is deleted (one, or all of a user's).

use std::sync::Arc;

use voicegate_engine::conversation::transcript::MAX_SEGMENTS_PER_CONVERSATION;
use voicegate_engine::conversation::{
    ConversationError, ConversationStore, MemoryConversationStore, RedisConversationStore,
    SegmentsAdded, TranscriptSegment, TranscriptStatus, Upsert,
};
use voicegate_engine::store::plans::{
    MemoryPlanStore, PlanRecordValue, PlanSet, PlanStore, RedisPlanStore,
};
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

    // Locked speech next to an unlocked conversation starts its own (a conversation holds one lock state),
    // and later locked speech joins it.
    let locked = store
        .upsert(upsert("a", &[(140_000, 150_000)], true))
        .await
        .unwrap();
    assert_eq!((locked.new.len(), locked.updated.len()), (1, 0));
    let more = store
        .upsert(upsert("a", &[(155_000, 160_000)], true))
        .await
        .unwrap();
    assert_eq!(more.updated, locked.new);
    let c = store.get("a", &locked.new[0]).await.unwrap().unwrap();
    assert!(c.is_locked);
    assert_eq!(c.spans.len(), 2);
    assert_eq!(
        (c.started_at_ms, c.finished_at_ms),
        (T0 + 140_000, T0 + 160_000)
    );
    let open = store.get("a", &first.new[0]).await.unwrap().unwrap();
    assert!(!open.is_locked, "the unlocked conversation stays unlocked");

    let page = store.list("a", 10, 0).await.unwrap();
    assert_eq!(page.conversations.len(), 3);
    assert!(!page.more);
    assert!(page.conversations[0].started_at_ms > page.conversations[1].started_at_ms);
    let page = store.list("a", 1, 0).await.unwrap();
    assert!(page.more);

    // Unlock clears all of a's locks, and only a's.
    assert_eq!(store.unlock_all("a").await.unwrap(), 1);
    assert_eq!(store.unlock_all("a").await.unwrap(), 0);
    assert!(
        !store
            .get("a", &locked.new[0])
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

fn segment(id: &str, start: u64, text: &str) -> TranscriptSegment {
    TranscriptSegment::new(id.into(), text, 0, T0 + start, T0 + start + 900)
}

async fn transcript_contract(store: Arc<dyn ConversationStore>) {
    let a = store
        .upsert(upsert("a", &[(0, 30_000), (700_000, 720_000)], false))
        .await
        .unwrap();
    let (first, second) = (&a.new[0], &a.new[1]);
    assert!(store.transcript("a", first).await.unwrap().is_empty());
    let added = store
        .add_segments(
            "a",
            first,
            vec![
                segment("s-2", 5_000, "second"),
                segment("s-1", 1_000, "first"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        added,
        SegmentsAdded {
            stored: 2,
            refused: 0
        }
    );
    // A retry (the same ids) replaces, never duplicates.
    store
        .add_segments("a", first, vec![segment("s-1", 1_000, "first, corrected")])
        .await
        .unwrap();
    let t = store.transcript("a", first).await.unwrap();
    let texts: Vec<&str> = t.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(texts, ["first, corrected", "second"], "in time order");
    // Another user's conversation, or a missing one, takes nothing and shows nothing.
    for (uid, id) in [("b", first.as_str()), ("a", "20000-ffff"), ("a", "../x")] {
        let err = store
            .add_segments(uid, id, vec![segment("x", 0, "intruder")])
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConversationError::NotFound),
            "{uid} {id}: {err}"
        );
    }
    assert!(store.transcript("b", first).await.unwrap().is_empty());
    // Span statuses: set by key (the same key replaces), the owner's only.
    assert!(store.span_statuses("a", first).await.unwrap().is_empty());
    let set = |id: &str, uid: &str, key: &str, s: TranscriptStatus| {
        let (store, id, uid, key) = (store.clone(), id.to_owned(), uid.to_owned(), key.to_owned());
        async move { store.set_span_statuses(&uid, &id, vec![(key, s)]).await }
    };
    set(first, "a", "h:0-1000", TranscriptStatus::Pending)
        .await
        .unwrap();
    set(first, "a", "h:2000-3000", TranscriptStatus::BudgetExhausted)
        .await
        .unwrap();
    set(first, "a", "h:0-1000", TranscriptStatus::Done)
        .await
        .unwrap();
    set(second, "a", "h:5000-9000", TranscriptStatus::Failed)
        .await
        .unwrap();
    let st = store.span_statuses("a", first).await.unwrap();
    assert_eq!(
        st.into_iter().collect::<Vec<_>>(),
        [
            ("h:0-1000".to_owned(), TranscriptStatus::Done),
            ("h:2000-3000".to_owned(), TranscriptStatus::BudgetExhausted)
        ]
    );
    assert!(matches!(
        set(first, "b", "h:0-1000", TranscriptStatus::Done).await,
        Err(ConversationError::NotFound)
    ));
    assert!(store.span_statuses("b", first).await.unwrap().is_empty());
    // Bounded: past the limit new ids are refused (counted by the caller), known ids still replace.
    let many: Vec<TranscriptSegment> = (0..MAX_SEGMENTS_PER_CONVERSATION)
        .map(|i| segment(&format!("m-{i}"), 40_000, "w"))
        .collect();
    let mut stored = 0;
    let mut refused = 0;
    for chunk in many.chunks(1_000) {
        let r = store
            .add_segments("a", second, chunk.to_vec())
            .await
            .unwrap();
        stored += r.stored;
        refused += r.refused;
    }
    assert_eq!((stored, refused), (MAX_SEGMENTS_PER_CONVERSATION as u64, 0));
    let over = store
        .add_segments(
            "a",
            second,
            vec![
                segment("m-0", 40_000, "again"),
                segment("extra", 41_000, "no room"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        over,
        SegmentsAdded {
            stored: 1,
            refused: 1
        }
    );

    // Only the owner deletes; the transcript goes with the conversation, and late segments find nothing.
    assert!(!store.delete("b", first).await.unwrap());
    assert!(store.delete("a", first).await.unwrap());
    assert!(!store.delete("a", first).await.unwrap());
    assert!(store.get("a", first).await.unwrap().is_none());
    assert!(store.transcript("a", first).await.unwrap().is_empty());
    assert!(store.span_statuses("a", first).await.unwrap().is_empty());
    assert!(matches!(
        store
            .add_segments("a", first, vec![segment("late", 2_000, "late")])
            .await,
        Err(ConversationError::NotFound)
    ));
    assert!(matches!(
        set(first, "a", "h:0-1000", TranscriptStatus::Done).await,
        Err(ConversationError::NotFound)
    ));
    assert_eq!(store.span_statuses("a", second).await.unwrap().len(), 1);
    assert!(store.transcript("a", first).await.unwrap().is_empty());
    assert!(
        store.get("a", second).await.unwrap().is_some(),
        "the other stays"
    );

    // All of a user's: conversations and transcripts; another user's stay.
    let b = store
        .upsert(upsert("b", &[(0, 10_000)], false))
        .await
        .unwrap();
    assert_eq!(store.delete_all("a").await.unwrap(), 1);
    assert_eq!(store.list("a", 10, 0).await.unwrap().conversations.len(), 0);
    assert!(store.transcript("a", second).await.unwrap().is_empty());
    assert!(store.span_statuses("a", second).await.unwrap().is_empty());
    assert!(store.get("b", &b.new[0]).await.unwrap().is_some());
    assert_eq!(store.delete_all("a").await.unwrap(), 0);
    // A user starts again after an erasure.
    let again = store
        .upsert(upsert("a", &[(0, 30_000)], false))
        .await
        .unwrap();
    assert_eq!(again.new.len(), 1);
}

#[tokio::test]
async fn memory_store_keeps_the_transcript_contract() {
    transcript_contract(Arc::new(MemoryConversationStore::default())).await;
}

#[tokio::test]
async fn redis_store_keeps_the_transcript_contract() {
    let (_server, conn) = redis().await;
    transcript_contract(Arc::new(RedisConversationStore::new(conn))).await;
}

async fn plan_contract(store: Arc<dyn PlanStore>) {
    assert_eq!(store.get("u").await.unwrap(), None);
    let change = |plan: &str, event: &str, at: u64| PlanRecordValue {
        plan: plan.into(),
        updated_at_ms: T0,
        event_id: event.into(),
        source_at_ms: at,
    };
    let v = change("unlimited", "evt_1", T0);
    assert_eq!(store.set("u", &v).await.unwrap(), PlanSet::Stored);
    assert_eq!(
        store.set("u", &v).await.unwrap(),
        PlanSet::Duplicate,
        "the same event applies once"
    );
    assert_eq!(store.get("u").await.unwrap().as_deref(), Some("unlimited"));
    assert_eq!(store.get("other").await.unwrap(), None);
    // A cancellation that happened later wins; a renewal that happened before it and arrives after does not.
    let cancel = change("basic", "evt_3", T0 + 2_000);
    assert_eq!(store.set("u", &cancel).await.unwrap(), PlanSet::Stored);
    let late = change("unlimited", "evt_2", T0 + 1_000);
    assert_eq!(store.set("u", &late).await.unwrap(), PlanSet::Stale);
    assert_eq!(store.get("u").await.unwrap().as_deref(), Some("basic"));
    assert_eq!(
        store.set("u", &late).await.unwrap(),
        PlanSet::Duplicate,
        "marked"
    );
}

#[tokio::test]
async fn plan_stores_keep_the_contract() {
    plan_contract(Arc::new(MemoryPlanStore::default())).await;
    let (_server, conn) = redis().await;
    plan_contract(Arc::new(RedisPlanStore::new(conn))).await;
}
