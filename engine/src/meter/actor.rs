//! The per-user meter actor: owns the user's view (store base + its own pending deltas), the pending
//! deltas, the sealed batch being flushed, and the idempotency keys it knows.
//!
//! Store I/O is serialized per actor (one load or one flush at a time), so a snapshot and a batch never
//! race: a loaded base plus the sealed batch plus pending is exact. Recording never waits for the store.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::messages::{
    BatchDone, FlushReport, MeterError, RecordOutcome, RecordSpeech, RecordStatus, Retire, Take,
    TakeBatch, UsageTotals, UserMsg,
};
use super::pending::{Pending, add_sorted};
use super::placement::place_speech;
use super::registry::Shared;
use super::window::MinuteWindow;
use crate::store::{
    ApplyOutcome, Batch, Delta, KeyedDelta, StoreError, StoreTime, UserSnapshot, WriterId,
};
use crate::telemetry;
use crate::time::{MonthKey, month_of_ms};

/// A sealed batch: sent, or waiting to be sent again. Never merged with newer deltas.
struct Sealed {
    /// `None` while the flusher (or a direct flush) holds it.
    batch: Option<Batch>,
    speech_ms: u64,
    entries: usize,
    attempts: u32,
    retry_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Io {
    Idle,
    Loading,
    Flushing,
}

pub struct UserMeter {
    uid: Arc<str>,
    id: u64,
    shard: usize,
    shared: Arc<Shared>,
    writer: WriterId,
    next_seq: u64,
    view: MinuteWindow,
    view_months: Vec<(MonthKey, u64)>,
    hydrated: bool,
    pending: Pending,
    sealed: Option<Sealed>,
    io: Io,
    /// Idempotency keys metered within the retention → unix ms they were learned.
    known_keys: HashMap<Box<str>, u64>,
    /// Keys of the sealed batch (held or out at the store).
    in_flight_keys: Vec<Box<str>>,
    last_activity: Instant,
    last_refresh: Instant,
    load_attempts: u32,
    next_load_at: Option<Instant>,
    needs_reload: bool,
    registered: bool,
    retire_requested: bool,
    /// Left the registry; `Retire` queued behind every message sent before.
    retired: bool,
    retire_seen: bool,
    flush_waiters: Vec<oneshot::Sender<Result<FlushReport, MeterError>>>,
    flush_progress: FlushReport,
    last_flush_error: Option<StoreError>,
    refresh_waiters: Vec<oneshot::Sender<Result<(), MeterError>>>,
    /// What this actor added to its shard's pending gauges.
    accounted_ms: u64,
    accounted_entries: usize,
    entries_at_total_check: usize,
    records_since_total_check: u32,
    over_total: bool,
    unreported_ms: [u64; 3],
    // Fair-use state (stage, case, STT budget) is not here: it lives in the fair-use store, read and changed
    // only through `crate::fair_use::FairUseLedger` (load → pure policy → compare-and-set commit).
}

impl UserMeter {
    pub(crate) fn new(uid: Arc<str>, id: u64, shard: usize, shared: Arc<Shared>) -> Self {
        let now = Instant::now();
        Self {
            uid,
            id,
            shard,
            shared,
            writer: WriterId::random(),
            next_seq: 1,
            view: MinuteWindow::new(),
            view_months: Vec::new(),
            hydrated: false,
            pending: Pending::default(),
            sealed: None,
            io: Io::Idle,
            known_keys: HashMap::new(),
            in_flight_keys: Vec::new(),
            last_activity: now,
            last_refresh: now,
            load_attempts: 0,
            next_load_at: None,
            needs_reload: false,
            registered: false,
            retire_requested: false,
            retired: false,
            retire_seen: false,
            flush_waiters: Vec::new(),
            flush_progress: FlushReport::default(),
            last_flush_error: None,
            refresh_waiters: Vec::new(),
            accounted_ms: 0,
            accounted_entries: 0,
            entries_at_total_check: usize::MAX,
            records_since_total_check: 0,
            over_total: false,
            unreported_ms: [0; 3],
        }
    }

    fn store_time(&self, now_ms: u64) -> StoreTime {
        StoreTime {
            now_ms,
            retention_ms: self.shared.config.retention_ms(),
        }
    }

    fn is_clean(&self) -> bool {
        self.pending.is_empty() && self.sealed.is_none()
    }

    /// Current totals (view = base + sealed + pending).
    fn totals(&mut self, now_ms: u64) -> UsageTotals {
        self.view
            .prune_before(self.store_time(now_ms).first_kept_minute());
        let rolling = self.view.totals(now_ms);
        let month = month_of_ms(now_ms);
        let month_ms = self
            .view_months
            .iter()
            .find(|&&(m, _)| m == month)
            .map_or(0, |&(_, ms)| ms);
        UsageTotals {
            rolling,
            month,
            month_ms,
            known: self.hydrated,
        }
    }

    fn view_add(&mut self, delta: &Delta) {
        for &(minute, ms) in &delta.buckets {
            if self.view.add(minute, ms).is_err() {
                debug!(uid = %self.uid, minute, "bucket outside the window span, not shown in totals");
            }
        }
        for &(month, ms) in &delta.months {
            add_sorted(&mut self.view_months, month, ms);
        }
    }

    fn view_sub(&mut self, delta: &Delta) {
        for &(minute, ms) in &delta.buckets {
            self.view.sub(minute, ms);
        }
        for &(month, ms) in &delta.months {
            if let Some(e) = self.view_months.iter_mut().find(|e| e.0 == month) {
                e.1 = e.1.saturating_sub(ms);
            }
        }
    }

    /// Brings the shard's pending gauges in line with this actor's pending and sealed deltas.
    fn sync_accounting(&mut self) {
        let sealed_ms = self.sealed.as_ref().map_or(0, |s| s.speech_ms);
        let sealed_entries = self.sealed.as_ref().map_or(0, |s| s.entries);
        let ms = self.pending.speech_ms() + sealed_ms;
        let entries = self.pending.entries() + sealed_entries;
        self.shared.shard_counters(self.shard).adjust(
            ms as i64 - self.accounted_ms as i64,
            entries as i64 - self.accounted_entries as i64,
        );
        self.accounted_ms = ms;
        self.accounted_entries = entries;
    }

    fn mark_dirty(&mut self, ctx: &mut Context<Self>) {
        if !self.registered {
            self.registered = true;
            self.shared.register_dirty(self.id, ctx.address());
        }
    }

    fn key_is_known(&self, key: &str) -> bool {
        self.known_keys.contains_key(key)
            || self.pending.has_key(key)
            || self.in_flight_keys.iter().any(|k| &**k == key)
    }

    /// Meters a record; computes the totals after it only when someone waits for them.
    fn record(
        &mut self,
        rec: RecordSpeech,
        reply: Option<oneshot::Sender<RecordOutcome>>,
        ctx: &mut Context<Self>,
    ) {
        let now = self.shared.clock.now_ms();
        let ms = rec.amount.to_ms();
        let status = self.record_inner(&rec, ms, now, ctx);
        self.sync_accounting();
        if let Some(reply) = reply {
            let totals = self.totals(now);
            let _ = reply.send(RecordOutcome { status, totals });
        }
    }

    fn record_inner(
        &mut self,
        rec: &RecordSpeech,
        ms: u64,
        now: u64,
        ctx: &mut Context<Self>,
    ) -> RecordStatus {
        if ms == 0 {
            return RecordStatus::Empty;
        }
        if let Some(key) = &rec.idempotency_key
            && self.key_is_known(key)
        {
            metrics::counter!(telemetry::METER_RECORDS_DEDUPLICATED_TOTAL).increment(1);
            return RecordStatus::Duplicate;
        }
        let config = &self.shared.config;
        let entries = self.pending.entries();
        // The total over all shards is read when this actor's pending changed since the last look, or
        // every 256 records (a realtime stream adding to the same minute changes nothing), keeping other
        // shards' cache lines out of the hot path; the total can overshoot by a record per actor.
        self.records_since_total_check += 1;
        if entries != self.entries_at_total_check || self.records_since_total_check >= 256 {
            self.entries_at_total_check = entries;
            self.records_since_total_check = 0;
            self.over_total =
                self.shared.pending_entries_total() >= config.max_pending_total as i64;
        }
        if entries >= config.max_pending_per_user || self.over_total {
            metrics::counter!(telemetry::METER_RECORDS_DROPPED_TOTAL, "reason" => "pending_full")
                .increment(1);
            warn!(uid = %self.uid, speech_ms = ms, pending_entries = self.pending.entries(), "Meter pending memory full: record dropped.");
            return RecordStatus::Dropped;
        }
        let month = month_of_ms(now);
        match &rec.idempotency_key {
            None => {
                let (view, pending) = (&mut self.view, &mut self.pending);
                place_speech(rec.audio_start_ms, ms, now, |minute, part| {
                    pending.add_bucket(minute, part);
                    let _ = view.add(minute, part);
                });
                self.pending.add_month(month, ms);
            }
            Some(key) => {
                let mut delta = Delta {
                    buckets: Vec::new(),
                    months: vec![(month, ms)],
                };
                place_speech(rec.audio_start_ms, ms, now, |minute, part| {
                    delta.buckets.push((minute, part))
                });
                for &(minute, part) in &delta.buckets {
                    let _ = self.view.add(minute, part);
                }
                self.pending.add_keyed(KeyedDelta {
                    key: key.clone(),
                    delta,
                });
            }
        }
        add_sorted(&mut self.view_months, month, ms);
        self.unreported_ms[rec.source.index()] += ms;
        self.mark_dirty(ctx);
        RecordStatus::Recorded
    }

    /// Hands out the batch to flush: the sealed one again, or the pending deltas sealed as batch `n + 1`.
    fn take_batch(&mut self, force: bool) -> Take {
        if self.io != Io::Idle {
            return Take::NotNow;
        }
        if let Some(sealed) = &mut self.sealed {
            if !force && sealed.retry_at.is_some_and(|t| Instant::now() < t) {
                return Take::NotNow;
            }
            let Some(batch) = sealed.batch.take() else {
                return Take::NotNow;
            };
            if sealed.attempts > 0 {
                metrics::counter!(telemetry::METER_FLUSH_RETRIES_TOTAL).increment(1);
            }
            self.io = Io::Flushing;
            return Take::Batch(batch);
        }
        if self.pending.is_empty() {
            self.registered = false;
            return Take::Clean;
        }
        let entries = self.pending.entries();
        let speech_ms = self.pending.speech_ms();
        let (plain, keyed) = self.pending.take();
        let batch = Batch {
            uid: self.uid.clone(),
            writer: self.writer,
            seq: self.next_seq,
            plain,
            keyed,
        };
        self.next_seq += 1;
        self.in_flight_keys = batch
            .keyed
            .iter()
            .map(|k| k.key.clone().into_boxed_str())
            .collect();
        self.sealed = Some(Sealed {
            batch: None,
            speech_ms,
            entries,
            attempts: 0,
            retry_at: None,
        });
        self.io = Io::Flushing;
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

    fn on_batch_done(
        &mut self,
        batch: Batch,
        result: Result<ApplyOutcome, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        self.io = Io::Idle;
        let now = self.shared.clock.now_ms();
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
                        self.needs_reload = true;
                    }
                }
                for keyed in &batch.keyed {
                    self.known_keys
                        .insert(keyed.key.clone().into_boxed_str(), now);
                }
                self.sealed = None;
                self.in_flight_keys.clear();
                self.flush_progress.batches += 1;
                self.flush_progress.speech_ms += batch.speech_ms() - rejected_ms;
            }
            Err(e) => {
                let reason = e.reason();
                metrics::counter!(telemetry::METER_FLUSH_ERRORS_TOTAL, "reason" => reason)
                    .increment(1);
                let sealed = self.sealed.get_or_insert(Sealed {
                    batch: None,
                    speech_ms: batch.speech_ms(),
                    entries: 0,
                    attempts: 0,
                    retry_at: None,
                });
                sealed.attempts += 1;
                let backoff = self.shared.config.backoff(sealed.attempts);
                sealed.retry_at = Some(Instant::now() + backoff);
                warn!(uid = %self.uid, error = %e, seq = batch.seq, attempts = sealed.attempts, pending_ms = self.accounted_ms, "Meter flush failed; will retry.");
                sealed.batch = Some(batch);
                if !self.flush_waiters.is_empty() {
                    self.last_flush_error = Some(e);
                }
                self.mark_dirty(ctx);
            }
        }
        self.sync_accounting();
        self.drive(ctx);
    }

    /// Starts whatever store I/O is due, answers waiters, and retires the actor when it may.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.io != Io::Idle {
            return;
        }
        if !self.flush_waiters.is_empty() {
            if self.is_clean() {
                let report = std::mem::take(&mut self.flush_progress);
                for w in self.flush_waiters.drain(..) {
                    let _ = w.send(Ok(report));
                }
            } else if let Some(e) = self.last_flush_error.take() {
                for w in self.flush_waiters.drain(..) {
                    let _ = w.send(Err(MeterError::Store(e.clone())));
                }
            } else {
                self.start_direct_flush(ctx);
                return;
            }
        }
        if self.load_due() {
            self.start_load(ctx, false);
            return;
        }
        if self.retire_requested && !self.retired && self.is_clean() {
            self.retired = true;
            self.shared
                .leave_registry(self.shard, &self.uid, &ctx.address());
            ctx.address().do_send(Retire);
            return;
        }
        if self.retire_seen && self.is_clean() {
            ctx.stop();
        }
    }

    fn load_due(&self) -> bool {
        if !self.refresh_waiters.is_empty() || self.needs_reload {
            return true;
        }
        if !self.hydrated {
            return self.next_load_at.is_none_or(|t| Instant::now() >= t);
        }
        self.last_activity > self.last_refresh
            && self.last_refresh.elapsed() >= self.shared.config.refresh_interval
    }

    fn start_direct_flush(&mut self, ctx: &mut Context<Self>) {
        let Take::Batch(batch) = self.take_batch(true) else {
            return;
        };
        self.sync_accounting();
        let store = self.shared.store.clone();
        let at = self.store_time(self.shared.clock.now_ms());
        let limit = self.shared.config.store_timeout;
        let fut = async move {
            let result =
                match tokio::time::timeout(limit, store.apply(std::slice::from_ref(&batch), at))
                    .await
                {
                    Err(_) => Err(StoreError::Timeout),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(mut results)) => results
                        .pop()
                        .unwrap_or(Err(StoreError::Protocol("no reply".into()))),
                };
            (batch, result)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(|(batch, result), act, ctx| act.on_batch_done(batch, result, ctx)),
        );
    }

    /// Loads the user's base. The first load blocks the mailbox (the actor answers only once hydrated or
    /// once the hydration timed out); later ones run beside it.
    fn start_load(&mut self, ctx: &mut Context<Self>, first: bool) {
        self.io = Io::Loading;
        self.needs_reload = false;
        let store = self.shared.store.clone();
        let uid = self.uid.clone();
        let writer = self.writer;
        let at = self.store_time(self.shared.clock.now_ms());
        let limit = if first {
            self.shared.config.hydrate_timeout
        } else {
            self.shared.config.store_timeout
        };
        let fut = async move {
            match tokio::time::timeout(limit, store.load(&uid, writer, at)).await {
                Err(_) => Err(StoreError::Timeout),
                Ok(r) => r,
            }
        };
        let fut = fut
            .into_actor(self)
            .map(|result, act, ctx| act.on_loaded(result, ctx));
        if first {
            ctx.wait(fut);
        } else {
            ctx.spawn(fut);
        }
    }

    fn on_loaded(&mut self, result: Result<UserSnapshot, StoreError>, ctx: &mut Context<Self>) {
        self.io = Io::Idle;
        match result {
            Ok(snapshot) => {
                self.apply_snapshot(snapshot);
                for w in self.refresh_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::METER_HYDRATION_ERRORS_TOTAL, "reason" => e.reason())
                    .increment(1);
                if self.hydrated {
                    self.last_refresh = Instant::now();
                } else {
                    self.load_attempts += 1;
                    let backoff = self.shared.config.backoff(self.load_attempts);
                    self.next_load_at = Some(Instant::now() + backoff);
                    warn!(uid = %self.uid, error = %e, attempts = self.load_attempts, "Meter hydration failed; totals unknown until it succeeds.");
                    ctx.run_later(backoff, |act, ctx| act.drive(ctx));
                }
                for w in self.refresh_waiters.drain(..) {
                    let _ = w.send(Err(MeterError::Store(e.clone())));
                }
            }
        }
        self.sync_accounting();
        self.drive(ctx);
    }

    /// view = snapshot + sealed batch (unless the snapshot already holds it) + pending.
    fn apply_snapshot(&mut self, snapshot: UserSnapshot) {
        let now = self.shared.clock.now_ms();
        self.known_keys.clear();
        for (key, at) in snapshot.idempotency_keys {
            self.known_keys.insert(key.into_boxed_str(), at);
        }
        if let Some(sealed) = &self.sealed
            && let Some(batch) = &sealed.batch
            && snapshot.writer_seq >= batch.seq
        {
            // The store applied it (a reply was lost): it is part of the snapshot. Acknowledge it.
            metrics::counter!(telemetry::METER_BATCHES_DEDUPLICATED_TOTAL).increment(1);
            self.sealed = None;
            self.in_flight_keys.clear();
        }
        let already: Vec<String> = self
            .pending
            .keyed()
            .iter()
            .filter(|k| self.known_keys.contains_key(k.key.as_str()))
            .map(|k| k.key.clone())
            .collect();
        for key in already {
            self.pending.remove_key(&key);
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
        if let Some(batch) = self.sealed.as_ref().and_then(|s| s.batch.clone()) {
            self.view_add(&batch.plain);
            // A keyed delta the store will reject is subtracted when the batch's answer comes back.
            for keyed in &batch.keyed {
                self.view_add(&keyed.delta);
            }
        }
        let plain = self.pending.plain().clone();
        self.view_add(&plain);
        let keyed: Vec<Delta> = self
            .pending
            .keyed()
            .iter()
            .map(|k| k.delta.clone())
            .collect();
        for delta in &keyed {
            self.view_add(delta);
        }
        self.view.prune_before(first_kept);
        self.hydrated = true;
        self.load_attempts = 0;
        self.next_load_at = None;
        self.last_refresh = Instant::now();
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        let now = self.shared.clock.now_ms();
        let cutoff = now.saturating_sub(self.shared.config.retention_ms());
        self.known_keys.retain(|_, &mut at| at >= cutoff);
        if !self.retire_requested
            && self.last_activity.elapsed() >= self.shared.config.idle_passivation
        {
            debug!(uid = %self.uid, "Meter actor idle: passivating.");
            self.retire_requested = true;
        }
        self.drive(ctx);
    }
}

impl Actor for UserMeter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.actor_started(self.shard);
        ctx.run_interval(self.shared.config.actor_tick(), |act, ctx| act.on_tick(ctx));
        self.start_load(ctx, true);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if !self.is_clean() {
            metrics::counter!(telemetry::METER_RECORDS_DROPPED_TOTAL, "reason" => "stopped")
                .increment(1);
            warn!(uid = %self.uid, pending_ms = self.accounted_ms, "Meter actor stopped with unflushed speech.");
        }
        self.pending = Pending::default();
        self.sealed = None;
        self.sync_accounting();
        self.shared.actor_stopped(self.shard);
    }
}

impl Handler<UserMsg> for UserMeter {
    type Result = ();

    fn handle(&mut self, msg: UserMsg, ctx: &mut Self::Context) {
        self.last_activity = Instant::now();
        if !matches!(msg, UserMsg::Passivate) && !self.retired {
            // Activity cancels a passivation that has not left the registry yet.
            self.retire_requested = false;
        }
        match msg {
            UserMsg::Record(rec, reply) => self.record(rec, reply, ctx),
            UserMsg::ReadTotals(reply) => {
                let now = self.shared.clock.now_ms();
                let _ = reply.send(self.totals(now));
            }
            UserMsg::FlushNow(reply) => {
                self.flush_waiters.push(reply);
                self.drive(ctx);
            }
            UserMsg::RefreshNow(reply) => {
                self.refresh_waiters.push(reply);
                self.drive(ctx);
            }
            UserMsg::Passivate => {
                self.retire_requested = true;
                self.drive(ctx);
            }
        }
    }
}

impl Handler<TakeBatch> for UserMeter {
    type Result = MessageResult<TakeBatch>;

    fn handle(&mut self, msg: TakeBatch, _ctx: &mut Self::Context) -> Self::Result {
        let take = self.take_batch(msg.force);
        self.sync_accounting();
        MessageResult(take)
    }
}

impl Handler<BatchDone> for UserMeter {
    type Result = ();

    fn handle(&mut self, msg: BatchDone, ctx: &mut Self::Context) {
        self.on_batch_done(msg.batch, msg.result, ctx);
    }
}

impl Handler<Retire> for UserMeter {
    type Result = ();

    fn handle(&mut self, _msg: Retire, ctx: &mut Self::Context) {
        self.retire_seen = true;
        self.drive(ctx);
    }
}
