//! Fair-use state, events and the cooldown lock, against real Redis and the in-memory store alike
//! (omi §7 G70 lock semantics, C44 compare-and-delete release).

use std::sync::Arc;

use voicegate_engine::policy::{
    CaseRef, EventKind, FairUseEvent, SessionLane, SessionMeasures, SessionSummary, Stage,
    StageState,
};
use voicegate_engine::store::fair_use::{
    CommitOutcome, CooldownLock, FairUseStore, MAX_EVENTS_PER_USER, MAX_SESSIONS_PER_USER,
    MemoryCooldownLock, MemoryFairUseStore, SESSION_RETENTION_MS, STT_LEDGER_RETENTION_DAYS,
};
use voicegate_engine::store::fair_use_redis::{RedisCooldownLock, RedisFairUseStore, lock_key};
use voicegate_engine::store::test_redis::RedisServer;

const NOW: u64 = 1_790_000_000_000;
const HOLD: u64 = 43_200_000;

fn event(n: u64, to: Stage) -> FairUseEvent {
    let s = StageState::default();
    let (_, mut e) = voicegate_engine::policy::admin_set_stage(
        &s,
        &Default::default(),
        to,
        "test",
        NOW + n,
        CaseRef::from_bits(n),
    );
    e.kind = EventKind::AdminSetStage;
    e
}

async fn redis() -> (RedisServer, redis::aio::ConnectionManager) {
    let server = RedisServer::start().expect("redis-server");
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    (server, conn)
}

async fn state_store_contract(store: Arc<dyn FairUseStore>) {
    let fresh = store.load("u").await.unwrap();
    assert_eq!((fresh.version, fresh.state.stage), (0, Stage::None));

    let warning = StageState {
        stage: Stage::Warning,
        updated_at_ms: NOW,
        ..Default::default()
    };
    let e1 = event(1, Stage::Warning);
    assert_eq!(
        store
            .commit("u", 0, &warning, std::slice::from_ref(&e1))
            .await
            .unwrap(),
        CommitOutcome::Committed { version: 1 }
    );
    // A writer that read version 0 loses and must re-read.
    assert_eq!(
        store
            .commit("u", 0, &StageState::default(), &[])
            .await
            .unwrap(),
        CommitOutcome::Conflict { current: 1 }
    );
    let loaded = store.load("u").await.unwrap();
    assert_eq!((loaded.version, &loaded.state), (1, &warning));

    let e2 = event(2, Stage::Throttle);
    let throttle = StageState {
        stage: Stage::Throttle,
        ..warning.clone()
    };
    assert!(matches!(
        store
            .commit("u", 1, &throttle, std::slice::from_ref(&e2))
            .await
            .unwrap(),
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(
        store.events("u", 10).await.unwrap(),
        vec![e2.clone(), e1.clone()],
        "newest first"
    );
    assert_eq!(
        store.find_case(&e1.case_ref).await.unwrap().as_deref(),
        Some("u")
    );
    assert_eq!(
        store.find_case(&CaseRef::from_bits(999)).await.unwrap(),
        None
    );
    assert_eq!(
        store.flagged(None, 10).await.unwrap(),
        vec![("u".to_owned(), Stage::Throttle)]
    );
    assert!(
        store
            .flagged(Some(Stage::Restrict), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Back to none leaves the flagged index; events are trimmed to the newest MAX_EVENTS_PER_USER.
    let many: Vec<FairUseEvent> = (10..10 + MAX_EVENTS_PER_USER as u64 + 5)
        .map(|n| event(n, Stage::None))
        .collect();
    assert!(matches!(
        store
            .commit("u", 2, &StageState::default(), &many)
            .await
            .unwrap(),
        CommitOutcome::Committed { .. }
    ));
    assert!(store.flagged(None, 10).await.unwrap().is_empty());
    let kept = store.events("u", 1_000).await.unwrap();
    assert_eq!(kept.len(), MAX_EVENTS_PER_USER);
    assert_eq!(kept.first(), many.last());

    // STT day counters: per user and per UTC day.
    assert_eq!(store.stt_ms("u", 20_000).await.unwrap(), 0);
    assert_eq!(
        store
            .add_stt_ms("u", 20_000, &[("deepgram", 1_500)])
            .await
            .unwrap(),
        1_500
    );
    assert_eq!(
        store
            .add_stt_ms("u", 20_000, &[("deepgram", 500)])
            .await
            .unwrap(),
        2_000
    );
    assert_eq!(store.stt_ms("u", 20_000).await.unwrap(), 2_000);
    assert_eq!(
        store.stt_ms("u", 20_001).await.unwrap(),
        0,
        "a new day starts at 0"
    );
    assert_eq!(store.stt_ms("other", 20_000).await.unwrap(), 0);
}

async fn lock_contract(lock: Arc<dyn CooldownLock>) {
    assert!(
        lock.try_acquire("u", "a", NOW, HOLD).await.unwrap(),
        "first acquire"
    );
    assert!(
        !lock.try_acquire("u", "b", NOW + 1, HOLD).await.unwrap(),
        "second acquire fails (G70)"
    );
    assert!(
        !lock.release("u", "b").await.unwrap(),
        "wrong token leaves it (G70)"
    );
    assert!(
        !lock
            .try_acquire("u", "c", NOW + HOLD - 1, HOLD)
            .await
            .unwrap(),
        "held until the cooldown ends"
    );
    assert!(
        lock.release("u", "a").await.unwrap(),
        "right token releases"
    );
    assert!(
        lock.try_acquire("u", "d", NOW + 2, HOLD).await.unwrap(),
        "acquirable again"
    );
    // Expiry is decided by the caller's now, not by when the store forgets the key.
    assert!(
        lock.try_acquire("u", "e", NOW + 2 + HOLD, HOLD)
            .await
            .unwrap(),
        "free once now passes the hold"
    );
    assert!(
        !lock.release("u", "d").await.unwrap(),
        "a stale token cannot release the new holder"
    );
    // A token that is a prefix of the holder's is not the holder.
    assert!(lock.try_acquire("p", "tok-1", NOW, HOLD).await.unwrap());
    assert!(!lock.release("p", "tok").await.unwrap());
}

#[tokio::test]
async fn memory_state_store_keeps_the_contract() {
    state_store_contract(Arc::new(MemoryFairUseStore::new())).await;
}

#[tokio::test]
async fn redis_state_store_keeps_the_contract() {
    let (_server, conn) = redis().await;
    state_store_contract(Arc::new(RedisFairUseStore::new(conn))).await;
}

#[tokio::test]
async fn memory_lock_keeps_the_contract() {
    lock_contract(Arc::new(MemoryCooldownLock::new())).await;
}

#[tokio::test]
async fn redis_lock_keeps_the_contract_and_its_key_carries_the_uid_hash_tag() {
    let (server, conn) = redis().await;
    lock_contract(Arc::new(RedisCooldownLock::new(conn))).await;
    assert_eq!(
        voicegate_engine::store::keys::hash_tag(&lock_key("u")),
        Some("u")
    );
    let ttl: i64 = server
        .command(&["PTTL", &lock_key("u")])
        .unwrap()
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(
        ttl > 0 && ttl <= HOLD as i64,
        "the TTL only collects garbage: {ttl}"
    );
}

#[tokio::test]
async fn concurrent_redis_commits_from_one_version_let_exactly_one_win() {
    let (_server, conn) = redis().await;
    let store = RedisFairUseStore::new(conn);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let st = StageState {
                stage: Stage::Warning,
                updated_at_ms: i,
                ..Default::default()
            };
            s.commit("race", 0, &st, &[event(i, Stage::Warning)])
                .await
                .unwrap()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), CommitOutcome::Committed { .. }) {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(store.events("race", 100).await.unwrap().len(), 1);
}

fn summary(id: &str, end_ago_ms: u64, audio_ms: u64) -> SessionSummary {
    SessionSummary::new(
        id,
        SessionLane::Realtime,
        SessionMeasures {
            started_at_ms: NOW - end_ago_ms - audio_ms,
            audio_ms,
            speech_ms: audio_ms / 2,
            longest_speech_ms: 5_000,
            speech_runs: 3,
        },
        NOW,
        false,
    )
}

async fn session_evidence_contract(store: Arc<dyn FairUseStore>) {
    const MIN: u64 = 60_000;
    assert!(store.sessions("u", 0, 10).await.unwrap().is_empty());
    store
        .record_session("u", &summary("a", 90 * MIN, 10 * MIN), NOW)
        .await
        .unwrap();
    store
        .record_session("u", &summary("b", 30 * MIN, 10 * MIN), NOW)
        .await
        .unwrap();
    store
        .record_session("other", &summary("c", 0, MIN), NOW)
        .await
        .unwrap();
    let ids = |v: Vec<SessionSummary>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.sessions("u", 0, 10).await.unwrap()),
        ["b", "a"],
        "newest end first"
    );
    assert_eq!(
        ids(store.sessions("u", 0, 1).await.unwrap()),
        ["b"],
        "limit"
    );
    assert_eq!(
        ids(store.sessions("u", NOW - 60 * MIN, 10).await.unwrap()),
        ["b"],
        "ended before `since` is left out"
    );
    // An open session rewritten as it goes replaces its own entry.
    let grown = summary("a", 5 * MIN, 95 * MIN);
    store.record_session("u", &grown, NOW).await.unwrap();
    let all = store.sessions("u", 0, 10).await.unwrap();
    assert_eq!(ids(all.clone()), ["a", "b"]);
    assert_eq!(all[0], grown, "the JSON round-trips");
    // Past the retention (by end, audio time) a session is forgotten on the next write, and one that ends
    // before it is not kept at all.
    let later = NOW + SESSION_RETENTION_MS - 20 * MIN;
    store
        .record_session("u", &summary("old", SESSION_RETENTION_MS + MIN, MIN), later)
        .await
        .unwrap();
    assert_eq!(
        ids(store.sessions("u", 0, 10).await.unwrap()),
        ["a"],
        "b ended 30 min before NOW"
    );
    // Bounded: the oldest by end go first.
    for i in 0..MAX_SESSIONS_PER_USER + 5 {
        let s = summary(
            &format!("n{i:04}"),
            (MAX_SESSIONS_PER_USER + 5 - i) as u64,
            1,
        );
        store.record_session("bulk", &s, NOW).await.unwrap();
    }
    let kept = store.sessions("bulk", 0, usize::MAX >> 1).await.unwrap();
    assert_eq!(kept.len(), MAX_SESSIONS_PER_USER);
    assert_eq!(kept.last().map(|s| s.id.as_str()), Some("n0005"));
    assert_eq!(
        ids(store.sessions("other", 0, 10).await.unwrap()),
        ["c"],
        "per user"
    );
}

#[tokio::test]
async fn memory_session_evidence_keeps_the_contract() {
    session_evidence_contract(Arc::new(MemoryFairUseStore::new())).await;
}

#[tokio::test]
async fn redis_session_evidence_keeps_the_contract_in_the_users_slot() {
    let (_server, conn) = redis().await;
    session_evidence_contract(Arc::new(RedisFairUseStore::new(conn.clone()))).await;
    let mut conn = conn;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("vg:{u}:fu:session*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("vg:{u}:fu:sessions")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl as u64 <= SESSION_RETENTION_MS, "{ttl}");
}

/// Usage thresholds: each reached (cap, level) is answered once while it stays reached; a level the usage
/// fell back under is forgotten and answered again on its next crossing; users are apart.
async fn thresholds_contract(store: Arc<dyn FairUseStore>) {
    let keys = |ks: &[&str]| ks.iter().map(|k| (*k).to_owned()).collect::<Vec<String>>();
    let claim = |uid: &'static str, ks: Vec<String>| {
        let store = Arc::clone(&store);
        async move { store.claim_thresholds(uid, &ks).await.unwrap() }
    };
    assert!(claim("t", keys(&[])).await.is_empty());
    assert_eq!(claim("t", keys(&["daily:80"])).await, keys(&["daily:80"]));
    assert!(
        claim("t", keys(&["daily:80"])).await.is_empty(),
        "told once"
    );
    assert_eq!(
        claim("t", keys(&["daily:80", "daily:100", "weekly:80"])).await,
        keys(&["daily:100", "weekly:80"])
    );
    // The daily total fell back under 100 % (still over 80 %): 100 is forgotten, then told again.
    assert!(
        claim("t", keys(&["daily:80", "weekly:80"]))
            .await
            .is_empty()
    );
    assert_eq!(
        claim("t", keys(&["daily:80", "daily:100", "weekly:80"])).await,
        keys(&["daily:100"])
    );
    // Another user is apart.
    assert_eq!(
        claim("other", keys(&["daily:80"])).await,
        keys(&["daily:80"])
    );
    // All fell back: nothing kept; the next crossing is told again.
    assert!(claim("t", keys(&[])).await.is_empty());
    assert_eq!(claim("t", keys(&["daily:80"])).await, keys(&["daily:80"]));
}

#[tokio::test]
async fn memory_thresholds_are_told_once_per_crossing() {
    thresholds_contract(Arc::new(MemoryFairUseStore::new())).await;
}

#[tokio::test]
async fn redis_thresholds_are_told_once_per_crossing_in_the_users_slot() {
    let (_server, conn) = redis().await;
    thresholds_contract(Arc::new(RedisFairUseStore::new(conn.clone()))).await;
    let mut conn = conn;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("vg:{t}:fu:thresholds")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl as u64 <= SESSION_RETENTION_MS, "{ttl}");
}

#[test]
fn the_documented_bounds_are_the_stores_bounds() {
    // docs/fair-use.md §1.1 and §6: at most 500 sessions for 8 days after their end; 200 events.
    assert_eq!(MAX_SESSIONS_PER_USER, 500);
    assert_eq!(SESSION_RETENTION_MS, 8 * 86_400_000);
    assert_eq!(MAX_EVENTS_PER_USER, 200);
}

/// `docs/fair-use.md` §6 as Redis holds it: the keys, their types and fields, and their expiries.
#[tokio::test]
async fn redis_keys_are_the_documented_ones() {
    let (_server, conn) = redis().await;
    let store = RedisFairUseStore::new(conn.clone());
    let warning = StageState {
        stage: Stage::Warning,
        updated_at_ms: NOW,
        ..Default::default()
    };
    let e1 = event(1, Stage::Warning);
    store
        .commit("k", 0, &warning, std::slice::from_ref(&e1))
        .await
        .unwrap();
    store
        .add_stt_ms("k", 20_000, &[("deepgram", 1_500)])
        .await
        .unwrap();
    let mut conn = conn;
    let cmd = |name: &str, key: &str| {
        let mut c = redis::cmd(name);
        c.arg(key);
        c
    };
    let kind: String = cmd("TYPE", "vg:{k}:fu:state")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    let fields: Vec<String> = cmd("HKEYS", "vg:{k}:fu:state")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields.len(), 2);
    assert!(fields.contains(&"v".to_owned()) && fields.contains(&"s".to_owned()));
    let day_ms: i64 = 86_400_000;
    for key in ["vg:{k}:fu:state", "vg:{k}:fu:events"] {
        let ttl: i64 = cmd("PTTL", key).query_async(&mut conn).await.unwrap();
        assert!(ttl > 399 * day_ms && ttl <= 400 * day_ms, "{key}: {ttl}");
    }
    let kind: String = cmd("TYPE", "vg:{k}:fu:events")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "list");
    let used: u64 = cmd("GET", "vg:{k}:fu:stt:20000")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(used, 1_500);
    let ttl: i64 = cmd("PTTL", "vg:{k}:fu:stt:20000")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > day_ms && ttl <= 2 * day_ms, "{ttl}");
    let owner: String = cmd("GET", &format!("vg:fu:case:{}", e1.case_ref))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner, "k");
    let flagged: String = redis::cmd("HGET")
        .arg("vg:fu:flagged")
        .arg("k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(flagged, "warning");
}

/// The spend ceiling's count: one per UTC day for all users, added to and read back.
async fn spend_contract(store: Arc<dyn FairUseStore>) {
    assert_eq!(store.spend_ms(20_000).await.unwrap(), 0);
    assert_eq!(store.add_spend_ms(20_000, 1_500).await.unwrap(), 1_500);
    assert_eq!(store.add_spend_ms(20_000, 500).await.unwrap(), 2_000);
    assert_eq!(store.spend_ms(20_000).await.unwrap(), 2_000);
    assert_eq!(store.spend_ms(20_001).await.unwrap(), 0, "a day of its own");
}

#[tokio::test]
async fn memory_spend_is_counted_per_utc_day() {
    spend_contract(Arc::new(MemoryFairUseStore::new())).await;
}

#[tokio::test]
async fn redis_spend_is_counted_per_utc_day_on_one_key_that_expires() {
    let (_server, conn) = redis().await;
    spend_contract(Arc::new(RedisFairUseStore::new(conn.clone()))).await;
    let mut conn = conn;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("vg:stt:spend:20000")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 86_400_000 && ttl <= 2 * 86_400_000, "{ttl}");
}

/// The per-provider STT ledger: each charge's parts by provider, per user and UTC day, read back by a day
/// range across a month's end; the day's counter gets their sum in the same write.
async fn ledger_contract(store: Arc<dyn FairUseStore>) {
    // 20,818 is 2026-12-31, 20,819 is 2027-01-01.
    let (dec31, jan1) = (20_818, 20_819);
    assert_eq!(
        store
            .add_stt_ms("led", dec31, &[("deepgram", 1_000), ("local", 250)])
            .await
            .unwrap(),
        1_250
    );
    store
        .add_stt_ms("led", dec31, &[("deepgram", 500)])
        .await
        .unwrap();
    store
        .add_stt_ms("led", jan1, &[("openai", 40), ("none", 0)])
        .await
        .unwrap();
    store
        .add_stt_ms("other", jan1, &[("openai", 9)])
        .await
        .unwrap();
    assert_eq!(store.stt_ms("led", dec31).await.unwrap(), 1_750);
    let rows: Vec<(u64, String, u64)> = store
        .stt_ledger("led", dec31 - 3, jan1)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.day, r.provider, r.ms))
        .collect();
    assert_eq!(
        rows,
        [
            (dec31, "deepgram".to_string(), 1_500),
            (dec31, "local".to_string(), 250),
            (jan1, "openai".to_string(), 40),
        ],
        "a zero part writes nothing; another user's rows stay theirs"
    );
    let jan_only = store.stt_ledger("led", jan1, jan1 + 30).await.unwrap();
    assert_eq!(jan_only.len(), 1);
    assert!(
        store
            .stt_ledger("nobody", 0, jan1)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn memory_stt_ledger_keeps_each_providers_part_per_day() {
    ledger_contract(Arc::new(MemoryFairUseStore::new())).await;
}

#[tokio::test]
async fn redis_stt_ledger_keeps_each_providers_part_per_day_in_a_month_hash_that_expires() {
    let (_server, conn) = redis().await;
    ledger_contract(Arc::new(RedisFairUseStore::new(conn.clone()))).await;
    let mut conn = conn;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("vg:{led}:fu:sttledger:202612")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 99 * 86_400_000 && ttl <= STT_LEDGER_RETENTION_DAYS as i64 * 86_400_000,
        "{ttl}"
    );
    let field: u64 = redis::cmd("HGET")
        .arg("vg:{led}:fu:sttledger:202701")
        .arg("20819:openai")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(field, 40);
}
