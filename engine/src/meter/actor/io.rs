//! The actor's store I/O: handing batches to the flusher, direct flushes, loads, and their answers.

use std::panic::AssertUnwindSafe;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::time::Instant;
use tracing::warn;

use super::{Hydration, Io, Sealed, UserMeter};
use crate::meter::messages::{MeterError, Take};
use crate::store::{ApplyOutcome, Batch, Delta, StoreError, UserSnapshot};
use crate::telemetry;

/// A store call that panicked, as a failed call (the actor never sees the panic).
fn panicked() -> StoreError {
    StoreError::Protocol("store call panicked".into())
}

impl UserMeter {
    /// Hands out the batch to flush: the sealed one again, or the pending deltas sealed as batch `n + 1`.
    pub(super) fn take_batch(&mut self, force: bool) -> Take {
        if self.k.io != Io::Idle {
            return Take::NotNow;
        }
        if let Some(sealed) = &mut self.k.sealed {
            if !force && sealed.retry_at.is_some_and(|t| Instant::now() < t) {
                return Take::NotNow;
            }
            let Some(batch) = sealed.batch.take() else {
                return Take::NotNow;
            };
            if sealed.backoff.attempts() > 0 {
                metrics::counter!(telemetry::METER_FLUSH_RETRIES_TOTAL).increment(1);
            }
            self.k.io = Io::Flushing;
            return Take::Batch(batch);
        }
        if self.k.pending.is_empty() {
            self.k.in_flush_set = false;
            return Take::Clean;
        }
        let entries = self.k.pending.entries();
        let speech_ms = self.k.pending.speech_ms();
        let (plain, keyed) = self.k.pending.take();
        let batch = Batch {
            uid: self.k.uid.clone(),
            writer: self.k.writer,
            seq: self.k.next_seq,
            plain,
            keyed,
        };
        self.k.next_seq += 1;
        self.k.in_flight_keys = batch
            .keyed
            .iter()
            .map(|k| k.key.clone().into_boxed_str())
            .collect();
        self.k.sealed = Some(Sealed {
            batch: None,
            speech_ms,
            entries,
            backoff: self.k.shared.config().backoff(),
            retry_at: None,
        });
        self.k.io = Io::Flushing;
        for (i, ms) in self.unreported_ms.iter_mut().enumerate() {
            if *ms > 0 {
                let source = ["realtime", "sync", "other"][i];
                metrics::counter!(telemetry::METER_SPEECH_MS_TOTAL, "source" => source)
                    .increment(*ms);
                *ms = 0;
            }
        }
        Take::Batch(batch)
    }

    pub(super) fn on_batch_done(
        &mut self,
        batch: Batch,
        result: Result<ApplyOutcome, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        self.k.io = Io::Idle;
        let now = self.k.shared.clock().now_ms();
        match result {
            Ok(outcome) => {
                let mut rejected_ms = 0;
                match &outcome {
                    ApplyOutcome::Applied { rejected_keys } => {
                        for keyed in &batch.keyed {
                            if rejected_keys.contains(&keyed.key) {
                                metrics::counter!(telemetry::METER_RECORDS_DEDUPLICATED_TOTAL)
                                    .increment(1);
                                rejected_ms += keyed.delta.bucket_ms();
                                self.view_sub(&keyed.delta);
                            }
                        }
                    }
                    ApplyOutcome::Duplicate => {
                        // Applied by an earlier attempt whose reply was lost. Which keyed deltas that attempt
                        // skipped is unknown here, so reload the base.
                        metrics::counter!(telemetry::METER_BATCHES_DEDUPLICATED_TOTAL).increment(1);
                        if let Hydration::Known { reload, .. } = &mut self.hydration {
                            *reload = true;
                        }
                    }
                }
                for keyed in &batch.keyed {
                    self.known_keys
                        .insert(keyed.key.clone().into_boxed_str(), now);
                }
                self.k.sealed = None;
                self.k.in_flight_keys.clear();
                self.k.flush_progress.batches += 1;
                self.k.flush_progress.speech_ms += batch.speech_ms() - rejected_ms;
            }
            Err(e) => {
                let reason = e.reason();
                metrics::counter!(telemetry::METER_FLUSH_ERRORS_TOTAL, "reason" => reason)
                    .increment(1);
                let fresh = self.k.shared.config().backoff();
                let sealed = self.k.sealed.get_or_insert(Sealed {
                    batch: None,
                    speech_ms: batch.speech_ms(),
                    entries: 0,
                    backoff: fresh,
                    retry_at: None,
                });
                let backoff = sealed.backoff.next_delay();
                sealed.retry_at = Some(Instant::now() + backoff);
                warn!(uid = %self.k.uid, error = %e, seq = batch.seq, attempts = sealed.backoff.attempts(), pending_ms = self.k.accounted_ms, "Meter flush failed; will retry.");
                sealed.batch = Some(batch);
                if !self.k.flush_waiters.is_empty() {
                    self.k.last_flush_error = Some(e);
                }
                self.mark_dirty(ctx);
            }
        }
        self.sync_accounting();
        self.drive(ctx);
    }

    pub(super) fn start_direct_flush(&mut self, ctx: &mut Context<Self>) {
        let Take::Batch(batch) = self.take_batch(true) else {
            return;
        };
        self.sync_accounting();
        let store = self.k.shared.store().clone();
        let at = self.store_time(self.k.shared.clock().now_ms());
        let limit = self.k.shared.config().store_timeout;
        let fut = async move {
            let apply =
                AssertUnwindSafe(store.apply(std::slice::from_ref(&batch), at)).catch_unwind();
            let result = match tokio::time::timeout(limit, apply).await {
                Err(_) => Err(StoreError::Timeout),
                Ok(Err(_)) => Err(panicked()),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Ok(Ok(mut results))) => results
                    .pop()
                    .unwrap_or(Err(StoreError::Protocol("no reply".into()))),
            };
            (batch, result)
        };
        ctx.spawn(fut.into_actor(self).map(|(batch, result), act, ctx| {
            act.supervised(ctx, |act, ctx| act.on_batch_done(batch, result, ctx))
        }));
    }

    /// Loads the user's base. The first load blocks the mailbox (the actor answers only once hydrated or
    /// once the hydration timed out); later ones (refreshes, a restart's) run beside it.
    pub(super) fn start_load(&mut self, ctx: &mut Context<Self>, first: bool) {
        self.k.io = Io::Loading;
        if let Hydration::Known { reload, .. } = &mut self.hydration {
            *reload = false;
        }
        let store = self.k.shared.store().clone();
        let uid = self.k.uid.clone();
        let writer = self.k.writer;
        let at = self.store_time(self.k.shared.clock().now_ms());
        let limit = if first {
            self.k.shared.config().hydrate_timeout
        } else {
            self.k.shared.config().store_timeout
        };
        let fut = async move {
            let load = AssertUnwindSafe(store.load(&uid, writer, at)).catch_unwind();
            match tokio::time::timeout(limit, load).await {
                Err(_) => Err(StoreError::Timeout),
                Ok(Err(_)) => Err(panicked()),
                Ok(Ok(r)) => r,
            }
        };
        let fut = fut
            .into_actor(self)
            .map(|result, act, ctx| act.supervised(ctx, |act, ctx| act.on_loaded(result, ctx)));
        if first {
            ctx.wait(fut);
        } else {
            ctx.spawn(fut);
        }
    }

    fn on_loaded(&mut self, result: Result<UserSnapshot, StoreError>, ctx: &mut Context<Self>) {
        self.k.io = Io::Idle;
        match result {
            Ok(snapshot) => {
                self.apply_snapshot(snapshot);
                for w in self.k.refresh_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::METER_HYDRATION_ERRORS_TOTAL, "reason" => e.reason())
                    .increment(1);
                match &mut self.hydration {
                    Hydration::Known { last_refresh, .. } => *last_refresh = Instant::now(),
                    Hydration::Unknown { backoff, next_at } => {
                        let delay = backoff.next_delay();
                        *next_at = Some(Instant::now() + delay);
                        warn!(uid = %self.k.uid, error = %e, attempts = backoff.attempts(), "Meter hydration failed; totals unknown until it succeeds.");
                        ctx.run_later(delay, |act, ctx| act.supervised(ctx, Self::drive));
                    }
                }
                for w in self.k.refresh_waiters.drain(..) {
                    let _ = w.send(Err(MeterError::Store(e.clone())));
                }
            }
        }
        self.sync_accounting();
        self.drive(ctx);
    }

    /// view = snapshot + sealed batch (unless the snapshot already holds it) + pending.
    fn apply_snapshot(&mut self, snapshot: UserSnapshot) {
        let now = self.k.shared.clock().now_ms();
        self.known_keys.clear();
        for (key, at) in snapshot.idempotency_keys {
            self.known_keys.insert(key.into_boxed_str(), at);
        }
        let mut sealed_in_snapshot = false;
        if let Some(sealed) = &self.k.sealed
            && let Some(batch) = &sealed.batch
            && snapshot.writer_seq >= batch.seq
        {
            if self.k.shared.store().acknowledges_replicas() {
                // The master applied it, but its replicas may not hold it (a short `WAIT`): it stays sealed
                // until an `apply` acknowledges it (a no-op there), and counts once in the view.
                sealed_in_snapshot = true;
            } else {
                // The store applied it (a reply was lost): it is part of the snapshot. Acknowledge it.
                metrics::counter!(telemetry::METER_BATCHES_DEDUPLICATED_TOTAL).increment(1);
                self.k.sealed = None;
                self.k.in_flight_keys.clear();
            }
        }
        let already: Vec<String> = self
            .k
            .pending
            .keyed()
            .iter()
            .filter(|k| self.known_keys.contains_key(k.key.as_str()))
            .map(|k| k.key.clone())
            .collect();
        for key in already {
            self.k.pending.remove_key(&key);
            metrics::counter!(telemetry::METER_RECORDS_DEDUPLICATED_TOTAL).increment(1);
        }
        self.view.clear();
        self.view_months.clear();
        let first_kept = self.store_time(now).first_kept_minute();
        let base = Delta {
            buckets: snapshot.buckets,
            months: snapshot.months,
        };
        self.view_add(&base);
        if let Some(batch) = self.k.sealed.as_ref().and_then(|s| s.batch.clone())
            && !sealed_in_snapshot
        {
            self.view_add(&batch.plain);
            // A keyed delta the store will reject is subtracted when the batch's answer comes back.
            for keyed in &batch.keyed {
                self.view_add(&keyed.delta);
            }
        }
        let plain = self.k.pending.plain().clone();
        self.view_add(&plain);
        let keyed: Vec<Delta> = self
            .k
            .pending
            .keyed()
            .iter()
            .map(|k| k.delta.clone())
            .collect();
        for delta in &keyed {
            self.view_add(delta);
        }
        self.view.prune_before(first_kept);
        self.hydration = Hydration::Known {
            last_refresh: Instant::now(),
            reload: false,
        };
    }
}
