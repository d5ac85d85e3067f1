//! The C allocator's own account of the heap, exported at every scrape of `GET /metrics`.
//!
//! The process's resident set (RSS) counts the bytes the program holds *and* the freed bytes the
//! allocator keeps for reuse without giving the pages back; only the allocator can tell them apart.
//! glibc's `mallinfo2()` walks its arenas' free lists (under their locks, as a trim does; a scrape comes
//! every 15 s or so) and reports both, so an operator reading a rising RSS can tell memory kept by the
//! program (`in_use` rising) from memory the allocator retains (`free` rising), which is what the chaos
//! soak's RSS judgement needs (`docs/reliability.md`). On a libc without `mallinfo2` (musl, not Linux)
//! the series are not exported.
//!
//! **Trimming.** glibc gives freed memory back to the kernel only from the top of its main heap; what is
//! freed inside an arena (every worker thread allocates from one) stays resident until reused. After a
//! load peak that is most of the process: the chaos soak read 74.6 MB resident with 8.1 MB in use and
//! 35.9 MB freed and held (`docs/reliability.md`). [`trim_forever`] calls `malloc_trim(0)` every
//! `VOICEGATE_HEAP_TRIM_SECS` (60), which releases the pages of every arena's free chunks
//! (`madvise(MADV_DONTNEED)`; the chunks stay in the allocator's bins and a reuse faults the page back in).
//! A page-returning allocator (jemalloc's decay) would do it continuously, but replacing the allocator
//! under every measured figure of `docs/performance.md` is a larger change than one call a minute whose
//! cost is measured (`voicegate_process_heap_trim_seconds`).

use std::time::Duration;

use voicegate_engine::telemetry::{PROCESS_HEAP_BYTES, PROCESS_HEAP_TRIM_SECONDS};

/// Sets `voicegate_process_heap_bytes{state}` from the allocator's current account.
pub fn observe() {
    if let Some(h) = read() {
        metrics::gauge!(PROCESS_HEAP_BYTES, "state" => "in_use").set(h.in_use as f64);
        metrics::gauge!(PROCESS_HEAP_BYTES, "state" => "free").set(h.free as f64);
    }
}

/// Every `every`, gives the pages of the allocator's free chunks back to the kernel, on a blocking thread
/// (the trim holds each arena's lock while it walks it, so not on a runtime worker); the time each took is
/// recorded. Runs until the runtime stops.
pub async fn trim_forever(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing to give back at startup.
    tick.tick().await;
    loop {
        tick.tick().await;
        match tokio::task::spawn_blocking(trim).await {
            Ok(Some(took)) => {
                metrics::histogram!(PROCESS_HEAP_TRIM_SECONDS).record(took.as_secs_f64());
            }
            Ok(None) => return,
            Err(error) => tracing::warn!(message = "The heap trim task failed.", %error),
        }
    }
}

/// Gives the free chunks' pages back; how long that took, or `None` where the C library cannot.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> Option<Duration> {
    let began = std::time::Instant::now();
    // SAFETY: malloc_trim(0) only releases pages of free chunks under the allocator's own locks; it is
    // safe to call from any thread at any time (glibc documents it MT-Safe).
    unsafe { libc::malloc_trim(0) };
    Some(began.elapsed())
}

/// Gives the free chunks' pages back; how long that took, or `None` where the C library cannot.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> Option<Duration> {
    None
}

/// The heap as glibc's allocator sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes in chunks handed out and not yet freed: from the arenas (`uordblks`) and in chunks of their
    /// own mapping (`hblkhd`, allocations above the mmap threshold).
    pub in_use: u64,
    /// Bytes in freed chunks the arenas hold for reuse (`fordblks`): resident until reused or trimmed.
    pub free: u64,
}

/// The allocator's account, where the C library has one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn read() -> Option<Heap> {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; glibc has had it since
    // 2.33 (Debian 12 ships 2.36). mallinfo(3) marks it "MT-Unsafe init const:mallopt": not while the
    // allocator initialises (long done by the first scrape) nor alongside mallopt(3), which this program
    // never calls; otherwise it reads the arenas under their own locks.
    let m = unsafe { libc::mallinfo2() };
    Some(Heap {
        in_use: (m.uordblks as u64).saturating_add(m.hblkhd as u64),
        free: m.fordblks as u64,
    })
}

/// The allocator's account, where the C library has one.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn read() -> Option<Heap> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn an_allocation_held_shows_in_use_and_its_release_does_not() {
        let before = read().expect("glibc has mallinfo2");
        // Above glibc's mmap threshold (128 KiB by default, rising to at most 32 MiB as large blocks are
        // freed), so it is counted whichever arena or mapping serves it.
        let block = vec![1u8; 64 << 20];
        let held = read().expect("glibc has mallinfo2");
        assert!(
            held.in_use >= before.in_use + (60 << 20),
            "{before:?} → {held:?}"
        );
        drop(std::hint::black_box(block));
        let after = read().expect("glibc has mallinfo2");
        assert!(
            after.in_use + (60 << 20) <= held.in_use,
            "{held:?} → {after:?}"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace()
            .nth(1)
            .expect("a number")
            .parse()
            .expect("KiB")
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_gives_freed_pages_back_that_free_alone_keeps() {
        // 64 MiB in 4-KiB blocks (below the mmap threshold: from an arena), touched, then a block after them
        // so that the freed ones are not at the heap's top (which free() itself would give back).
        let blocks: Vec<Box<[u8; 4096]>> = (0..16_384).map(|i| Box::new([i as u8; 4096])).collect();
        let pin = Box::new([7u8; 4096]);
        let held = rss_kib();
        drop(std::hint::black_box(blocks));
        let freed = rss_kib();
        let heap = read().expect("glibc has mallinfo2");
        assert!(heap.free >= 60 << 20, "{heap:?}: the freed blocks are held");
        assert!(
            freed + 8 * 1024 > held,
            "free() alone kept them: {held} → {freed} KiB"
        );
        let took = trim().expect("glibc has malloc_trim");
        let trimmed = rss_kib();
        assert!(
            trimmed + 48 * 1024 < freed,
            "the trim gave them back: {freed} → {trimmed} KiB in {took:?}"
        );
        assert_eq!(std::hint::black_box(pin)[0], 7);
    }
}
