//! The meter actor driven through its facade, without a server: restarts after a panic, store panics, and
//! the bounded mailbox's backpressure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::Semaphore;

use crate::meter::messages::MAILBOX_CAPACITY;
use crate::meter::{Meter, MeterConfig, MeterError, RecordSpeech, SpeechAmount, SpeechSource};
use crate::store::{
    ApplyResults, Batch, MemoryStore, Store, StoreError, StoreTime, UserSnapshot, WriterId,
};
use crate::time::{Clock, MS_PER_DAY, MS_PER_HOUR, TokioClock};

/// 2026-11-27T12:00:00Z
const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;

fn config() -> MeterConfig {
    MeterConfig {
        shards: 0,
        // Flushes happen when a test asks for them.
        flush_interval: Duration::from_secs(3600),
        ..MeterConfig::default()
    }
}

fn rec(ms: u64) -> RecordSpeech {
    RecordSpeech::new("u", SpeechAmount::Ms(ms), T0, SpeechSource::Realtime)
}

fn stored_ms(store: &MemoryStore) -> u64 {
    let at = StoreTime {
        now_ms: T0,
        retention_ms: 8 * MS_PER_DAY,
        keys_retention_ms: 8 * MS_PER_DAY,
    };
    store.snapshot("u", at).buckets.iter().map(|b| b.1).sum()
}

/// A clock double that panics on the read after it is armed (the actor reads it first in every record).
struct PanickingClock {
    inner: Arc<TokioClock>,
    armed: AtomicBool,
}

impl Clock for PanickingClock {
    fn now_ms(&self) -> u64 {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("test double: the clock panics once");
        }
        self.inner.now_ms()
    }
}

#[actix::test]
async fn a_panicking_actor_is_restarted_in_place_with_its_pending_speech_and_rehydrates() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(PanickingClock {
        inner: TokioClock::new(T0),
        armed: AtomicBool::new(false),
    });
    let meter = Meter::start(config(), store.clone() as Arc<dyn Store>, clock.clone());
    meter.record_and_read(rec(1_000)).await.unwrap();
    meter.flush_user("u").await.unwrap();
    meter.record_and_read(rec(500)).await.unwrap();
    assert_eq!(
        stored_ms(&store),
        1_000,
        "the 500 ms are pending, not stored"
    );

    clock.armed.store(true, Ordering::SeqCst);
    let lost = meter.record_and_read(rec(250)).await;
    assert!(
        matches!(lost, Err(MeterError::ActorGone)),
        "the record that panicked gets no answer: {lost:?}"
    );
    assert_eq!(meter.actor_restarts(), 1);
    assert_eq!(meter.live_actors(), 1, "the same actor, restarted in place");

    // Re-hydrated: the base from the store plus the pending deltas kept across the restart.
    meter.refresh_user("u").await.unwrap();
    let totals = meter.totals("u").await.unwrap();
    assert!(totals.known);
    assert_eq!(totals.rolling.daily_ms, 1_500);
    assert_eq!(meter.pending_speech_ms(), 500);
    // The same address keeps serving, and the kept deltas reach the store exactly once.
    meter.record_and_read(rec(100)).await.unwrap();
    let flushed = meter.flush_user("u").await.unwrap();
    assert_eq!(flushed.speech_ms, 600);
    assert_eq!(stored_ms(&store), 1_600);
    assert_eq!(meter.pending_speech_ms(), 0);
}

/// A store double: a [`MemoryStore`] whose `load` panics while `panic_loads` is set, and waits for a
/// permit of `gate` when one is given.
struct DoubleStore {
    inner: Arc<MemoryStore>,
    panic_loads: AtomicBool,
    gate: Option<Arc<Semaphore>>,
    loads: AtomicUsize,
}

impl Store for DoubleStore {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        async move {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _pass = gate.acquire().await;
            }
            if self.panic_loads.load(Ordering::SeqCst) {
                panic!("test double: the store panics");
            }
            self.inner.load(uid, writer, at).await
        }
        .boxed()
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        self.inner.apply(batches, at)
    }

    fn kind(&self) -> &'static str {
        "double"
    }
}

fn double(gate: Option<Arc<Semaphore>>, panic_loads: bool) -> Arc<DoubleStore> {
    Arc::new(DoubleStore {
        inner: Arc::new(MemoryStore::new()),
        panic_loads: AtomicBool::new(panic_loads),
        gate,
        loads: AtomicUsize::new(0),
    })
}

#[actix::test]
async fn a_store_call_that_panics_is_a_failed_call_and_the_actor_lives_on() {
    let store = double(None, true);
    let meter = Meter::start(
        config(),
        store.clone() as Arc<dyn Store>,
        TokioClock::new(T0),
    );
    let outcome = meter.record_and_read(rec(700)).await.unwrap();
    assert!(
        !outcome.totals.known,
        "the hydration failed: totals unknown"
    );
    assert!(matches!(
        meter.refresh_user("u").await,
        Err(MeterError::Store(StoreError::Protocol(_)))
    ));
    store.panic_loads.store(false, Ordering::SeqCst);
    meter.refresh_user("u").await.unwrap();
    let totals = meter.totals("u").await.unwrap();
    assert!(totals.known);
    assert_eq!(totals.rolling.daily_ms, 700, "nothing recorded was lost");
    assert_eq!(
        meter.actor_restarts(),
        0,
        "a store panic is not the actor's"
    );
    assert!(store.loads.load(Ordering::SeqCst) >= 3);
}

#[actix::test]
async fn a_full_mailbox_makes_senders_wait_and_loses_nothing() {
    // The actor's first load holds its mailbox (it answers once hydrated): nothing is handled until the
    // gate opens, so its mailbox fills.
    let gate = Arc::new(Semaphore::new(0));
    let store = double(Some(Arc::clone(&gate)), false);
    let config = MeterConfig {
        hydrate_timeout: Duration::from_secs(60),
        ..config()
    };
    let meter = Meter::start(config, store.clone() as Arc<dyn Store>, TokioClock::new(T0));
    let total = MAILBOX_CAPACITY + 10;
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = actix::spawn({
        let (meter, sent) = (meter.clone(), Arc::clone(&sent));
        async move {
            for _ in 0..total {
                meter.record(rec(10)).await;
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    // Synchronised on the event itself: the first send that found the mailbox full.
    tokio::time::timeout(Duration::from_secs(10), async {
        while meter.mailbox_blocked() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a sender blocks on the full mailbox");
    assert_eq!(
        sent.load(Ordering::SeqCst),
        MAILBOX_CAPACITY,
        "exactly a mailbox of records went in; the next one waits"
    );
    gate.add_permits(1_000);
    sender.await.unwrap();
    let totals = meter.totals("u").await.unwrap();
    assert!(totals.known);
    assert_eq!(
        totals.rolling.daily_ms,
        10 * total as u64,
        "every record was metered: backpressure, not drops"
    );
    assert!(meter.mailbox_blocked() >= 1);
}

/// A store that wants replica acknowledgement (`VOICEGATE_REDIS_WAIT_REPLICAS`) whose replicas are gone
/// while `unreplicated` is set: each batch runs on the "master" (the memory store) and is answered
/// `not_replicated`, as the Redis store answers.
struct UnreplicatedStore {
    inner: Arc<MemoryStore>,
    unreplicated: AtomicBool,
}

impl Store for UnreplicatedStore {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        self.inner.load(uid, writer, at)
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        async move {
            let results = self.inner.apply(batches, at).await?;
            if !self.unreplicated.load(Ordering::SeqCst) {
                return Ok(results);
            }
            Ok(results
                .into_iter()
                .map(|r| {
                    r.and(Err(StoreError::TooFewReplicas {
                        replicas: 0,
                        wanted: 1,
                    }))
                })
                .collect())
        }
        .boxed()
    }

    fn kind(&self) -> &'static str {
        "unreplicated"
    }

    fn acknowledges_replicas(&self) -> bool {
        true
    }
}

#[actix::test]
async fn with_replica_acknowledgement_a_batch_the_master_holds_stays_pending_until_acknowledged() {
    let store = Arc::new(UnreplicatedStore {
        inner: Arc::new(MemoryStore::new()),
        unreplicated: AtomicBool::new(true),
    });
    let meter = Meter::start(
        config(),
        store.clone() as Arc<dyn Store>,
        TokioClock::new(T0),
    );
    meter.record_and_read(rec(1_000)).await.unwrap();
    assert!(meter.flush_user("u").await.is_err(), "not acknowledged");
    assert_eq!(stored_ms(&store.inner), 1_000, "ran on the master");

    // A refresh reads the master's snapshot, which holds the batch: that is not an acknowledgement (a
    // failover now would lose it), so it stays pending, and it counts once in the totals.
    meter.refresh_user("u").await.unwrap();
    assert_eq!(meter.pending_speech_ms(), 1_000);
    let totals = meter.totals("u").await.unwrap();
    assert_eq!(totals.rolling.daily_ms, 1_000);

    // The replicas are back: the retry is a no-op on the master, and acknowledged.
    store.unreplicated.store(false, Ordering::SeqCst);
    meter.flush_user("u").await.unwrap();
    assert_eq!(meter.pending_speech_ms(), 0);
    assert_eq!(stored_ms(&store.inner), 1_000);
    meter.refresh_user("u").await.unwrap();
    assert_eq!(meter.totals("u").await.unwrap().rolling.daily_ms, 1_000);
}
