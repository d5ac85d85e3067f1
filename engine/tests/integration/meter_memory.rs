//! Memory of a live meter actor holding a day of minute buckets (issue acceptance: ≤ 16 KiB).
//! Measured with a counting global allocator: the live heap growth of 2000 live actors, each with 1440
//! one-minute buckets, divided by 2000 (so it includes the actix context, mailbox, timer, registry entry
//! and the actor's state, and excludes transient buffers already freed). The resident-set growth is
//! printed too (it also holds freed-but-retained allocator memory from the transient pending deltas).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use voicegate_engine::meter::{Meter, MeterConfig, RecordSpeech, SpeechAmount, SpeechSource};
use voicegate_engine::store::{
    ApplyOutcome, ApplyResults, Batch, Store, StoreError, StoreTime, UserSnapshot, WriterId,
};
use voicegate_engine::time::ManualClock;
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR};

const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;
const ACTORS: usize = 2000;

/// Accepts everything and keeps nothing, so only the actors' memory grows.
struct NullStore;

impl Store for NullStore {
    fn load<'a>(
        &'a self,
        _: &'a str,
        _: WriterId,
        _: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        async { Ok(UserSnapshot::default()) }.boxed()
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        _: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        let n = batches.len();
        async move {
            Ok(vec![
                Ok(ApplyOutcome::Applied {
                    rejected_keys: vec![]
                });
                n
            ])
        }
        .boxed()
    }

    fn kind(&self) -> &'static str {
        "null"
    }
}

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[actix::test]
async fn a_live_actor_with_a_day_of_minute_buckets_costs_at_most_16_kib() {
    let config = MeterConfig {
        shards: 0,
        flush_interval: Duration::from_secs(3600),
        ..MeterConfig::default()
    };
    let meter = Meter::start(config, Arc::new(NullStore), ManualClock::new(T0));
    // Warm up allocator arenas and the runtime with a few actors first.
    for i in 0..50 {
        meter
            .record(RecordSpeech::new(
                format!("warm{i}"),
                SpeechAmount::Ms(MS_PER_DAY),
                T0 - MS_PER_DAY,
                SpeechSource::Sync,
            ))
            .await;
    }
    meter.flush_all().await;
    let before = rss_bytes();
    let live_before = LIVE.load(Ordering::Relaxed);
    for i in 0..ACTORS {
        // One record spanning the last 24 h: 1440 full minute buckets.
        let uid = format!("user-{i:05}");
        meter
            .record(RecordSpeech::new(
                uid,
                SpeechAmount::Ms(MS_PER_DAY),
                T0 - MS_PER_DAY,
                SpeechSource::Sync,
            ))
            .await;
    }
    let t = meter.totals("user-00000").await.unwrap();
    assert_eq!(t.rolling.daily_ms, MS_PER_DAY);
    for _ in 0..100 {
        meter.flush_all().await;
        if meter.pending_speech_ms() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(meter.pending_speech_ms(), 0);
    assert_eq!(meter.live_actors(), ACTORS + 50);
    let rss_per_actor = rss_bytes().saturating_sub(before) / ACTORS as u64;
    let per_actor = (LIVE.load(Ordering::Relaxed) - live_before).max(0) as u64 / ACTORS as u64;
    println!(
        "memory per live actor with 1440 minute buckets: {per_actor} bytes live heap ({rss_per_actor} bytes RSS growth incl. freed transients)"
    );
    assert!(per_actor <= 16 * 1024, "{per_actor} bytes per actor");
}
