//! Recording speech into the actor's view and pending deltas, and reading its totals.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::UserMeter;
use crate::meter::messages::{RecordOutcome, RecordSpeech, RecordStatus, UsageTotals};
use crate::meter::pending::add_sorted;
use crate::meter::placement::place_speech;
use crate::meter::under_caps::under_caps_at;
use crate::policy::SoftCaps;
use crate::store::{Delta, KeyedDelta};
use crate::telemetry;
use crate::time::month_of_ms;

impl UserMeter {
    /// Current totals (view = base + sealed + pending).
    pub(super) fn totals(&mut self, now_ms: u64) -> UsageTotals {
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
            known: matches!(self.hydration, super::Hydration::Known { .. }),
            under_caps_at_ms: None,
            under_ceiling_at_ms: None,
        }
    }

    /// When the view's totals fall back under `caps` (`None` when `totals` exceed none). The buckets are
    /// copied out only then, so a read under the caps costs nothing more.
    pub(super) fn under_caps_at(
        &self,
        caps: &SoftCaps,
        totals: &UsageTotals,
        now_ms: u64,
    ) -> Option<u64> {
        if caps.triggered(&totals.rolling).is_empty() {
            return None;
        }
        let buckets: Vec<_> = self.view.buckets().collect();
        under_caps_at(&buckets, caps, now_ms)
    }

    pub(super) fn view_add(&mut self, delta: &Delta) {
        for &(minute, ms) in &delta.buckets {
            if self.view.add(minute, ms).is_err() {
                debug!(uid = %self.k.uid, minute, "bucket outside the window span, not shown in totals");
            }
        }
        for &(month, ms) in &delta.months {
            add_sorted(&mut self.view_months, month, ms);
        }
    }

    pub(super) fn view_sub(&mut self, delta: &Delta) {
        for &(minute, ms) in &delta.buckets {
            self.view.sub(minute, ms);
        }
        for &(month, ms) in &delta.months {
            if let Some(e) = self.view_months.iter_mut().find(|e| e.0 == month) {
                e.1 = e.1.saturating_sub(ms);
            }
        }
    }

    fn key_is_known(&self, key: &str) -> bool {
        self.known_keys.contains_key(key)
            || self.k.pending.has_key(key)
            || self.k.in_flight_keys.iter().any(|k| &**k == key)
    }

    /// Meters a record; computes the totals after it only when someone waits for them.
    pub(super) fn record(
        &mut self,
        rec: RecordSpeech,
        reply: Option<oneshot::Sender<RecordOutcome>>,
        ctx: &mut Context<Self>,
    ) {
        let now = self.k.shared.clock().now_ms();
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
        let shared = Arc::clone(&self.k.shared);
        let config = shared.config();
        let entries = self.k.pending.entries();
        // The total over all shards is read when this actor's pending changed since the last look, or
        // every 256 records (a realtime stream adding to the same minute changes nothing), keeping other
        // shards' cache lines out of the hot path; the total can overshoot by a record per actor.
        let check = &mut self.total_check;
        check.records_since += 1;
        if entries != check.entries_at || check.records_since >= 256 {
            check.entries_at = entries;
            check.records_since = 0;
            check.over = shared.pending_entries_total() >= config.max_pending_total as i64;
        }
        if entries >= config.max_pending_per_user || check.over {
            metrics::counter!(telemetry::METER_RECORDS_DROPPED_TOTAL, "reason" => "pending_full")
                .increment(1);
            warn!(uid = %self.k.uid, speech_ms = ms, pending_entries = entries, "Meter pending memory full: record dropped.");
            return RecordStatus::Dropped;
        }
        let month = month_of_ms(now);
        match &rec.idempotency_key {
            None => {
                let (view, pending) = (&mut self.view, &mut self.k.pending);
                place_speech(rec.audio_start_ms, ms, now, |minute, part| {
                    pending.add_bucket(minute, part);
                    let _ = view.add(minute, part);
                });
                self.k.pending.add_month(month, ms);
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
                self.k.pending.add_keyed(KeyedDelta {
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
}
