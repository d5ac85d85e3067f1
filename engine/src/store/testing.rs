//! Fault injection for tests (feature `test-util`): a store wrapper whose calls fail before reaching the
//! inner store, or *after* it applied them (the reply is lost, like a timeout after Redis ran the script).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use futures_util::future::{BoxFuture, FutureExt};

use super::{ApplyResults, Batch, Store, StoreError, StoreTime, UserSnapshot, WriterId};

/// Wraps a store and fails a seeded, configurable share of its calls.
pub struct FaultyStore<S> {
    inner: S,
    rng: Mutex<u64>,
    /// Percent of `apply` calls failing before the inner store sees them.
    fail_before_pct: AtomicU32,
    /// Percent of `apply` calls applied by the inner store whose reply is then lost.
    fail_after_pct: AtomicU32,
    /// Percent of `load` calls failing.
    fail_load_pct: AtomicU32,
    applied_then_failed: AtomicU64,
    failed_before: AtomicU64,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S, seed: u64) -> Self {
        Self {
            inner,
            rng: Mutex::new(seed ^ 0x9E37_79B9_7F4A_7C15),
            fail_before_pct: AtomicU32::new(0),
            fail_after_pct: AtomicU32::new(0),
            fail_load_pct: AtomicU32::new(0),
            applied_then_failed: AtomicU64::new(0),
            failed_before: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn set_fault_rates(&self, fail_before_pct: u32, fail_after_pct: u32, fail_load_pct: u32) {
        self.fail_before_pct
            .store(fail_before_pct, Ordering::SeqCst);
        self.fail_after_pct.store(fail_after_pct, Ordering::SeqCst);
        self.fail_load_pct.store(fail_load_pct, Ordering::SeqCst);
    }

    /// Apply calls the inner store ran whose reply was then dropped.
    pub fn applied_then_failed(&self) -> u64 {
        self.applied_then_failed.load(Ordering::SeqCst)
    }

    pub fn failed_before(&self) -> u64 {
        self.failed_before.load(Ordering::SeqCst)
    }

    fn roll(&self, pct: &AtomicU32) -> bool {
        let pct = pct.load(Ordering::SeqCst);
        if pct == 0 {
            return false;
        }
        let mut state = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % 100) < u64::from(pct)
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        async move {
            if self.roll(&self.fail_load_pct) {
                return Err(StoreError::Unavailable("injected load failure".into()));
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
        async move {
            if self.roll(&self.fail_before_pct) {
                self.failed_before.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::Unavailable(
                    "injected failure before apply".into(),
                ));
            }
            let result = self.inner.apply(batches, at).await;
            if result.is_ok() && self.roll(&self.fail_after_pct) {
                self.applied_then_failed.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::Timeout);
            }
            result
        }
        .boxed()
    }

    fn kind(&self) -> &'static str {
        "faulty"
    }

    fn acknowledges_replicas(&self) -> bool {
        self.inner.acknowledges_replicas()
    }
}
