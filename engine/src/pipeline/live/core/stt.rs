//! The session core's STT gate: status reads (usage, stage and lock changes, the STT allowance), and what
//! of each speech run is forwarded to the STT stream; speech that ends before the first read waits for it.

use super::{SessionCore, ms};
use crate::fair_use::FairUseStatus;
use crate::pipeline::live::events::LiveEvent;
use crate::pipeline::live::gate::Gate;
use crate::policy::SttAllowance;
use crate::policy::notice::ThresholdNotice;
use crate::telemetry as t;
use crate::time::Span;

/// Speech runs that ended before the first entitlement read; past this many the rest are not forwarded
/// (an unknown entitlement fails closed). A run is at least 250 ms: 256 runs is over a minute of speech.
const MAX_DEFERRED_STT: usize = 256;

/// STT accounting: the gate, what was forwarded, and what the meter has not recorded yet.
#[derive(Debug)]
pub(super) struct Stt {
    pub(super) gate: Gate,
    pub(super) forwarded_ms: u64,
    pub(super) unrecorded_ms: u64,
    pub(super) exhausted_announced: bool,
    /// Speech runs (and their ms) waiting for the first entitlement read ([`Gate::Pending`]).
    pub(super) deferred: Vec<(Span, u64)>,
    /// With a provider: the audio forwarded (charged by the samples sent, pre-roll and hangover
    /// included; `stt_feed`). Without (`none`), speech runs are charged as they end and nothing is kept.
    pub(super) feed: Option<crate::pipeline::live::feed::Feed>,
    pub(super) provider: crate::stt::ProviderKind,
}

impl SessionCore {
    /// Forwards what the STT allowance permits of one speech run.
    pub(super) fn forward_stt(&mut self, span: Span, speech_ms: u64) {
        if let Some(feed) = self.stt.feed.as_mut() {
            // With a provider the run's audio went (or goes now) through the feed, charged as sent.
            let received = self.pipeline.tap().map_or(span.end, |t| t.end());
            feed.ended(span.end, received);
            return;
        }
        let Some(allowed) = self.stt.gate.allows(speech_ms) else {
            if self.stt.deferred.len() < MAX_DEFERRED_STT {
                self.stt.deferred.push((span, speech_ms));
            }
            return;
        };
        if allowed > 0 {
            self.stt.forwarded_ms += allowed;
            self.stt.unrecorded_ms += allowed;
            metrics::counter!(t::LISTEN_STT_FORWARDED_MS_TOTAL).increment(allowed);
            if let Gate::Budget(b) = &mut self.stt.gate {
                b.forwarded_since_check_ms += allowed;
            }
        }
        self.announce_exhausted();
    }

    pub(super) fn announce_exhausted(&mut self) {
        let Gate::Budget(b) = self.stt.gate else {
            return;
        };
        if b.remaining() > 0 || self.stt.exhausted_announced {
            return;
        }
        self.stt.exhausted_announced = true;
        self.out.push(LiveEvent::SttBudgetExhausted {
            frames_received: self.frames_seen,
            used_ms: b.used_at_check_ms + b.forwarded_since_check_ms,
            daily_limit_ms: b.daily_limit_ms,
            resets_at_ms: b.resets_at_ms,
        });
    }

    /// Applies a status read: the usage event, stage/lock changes, and the STT allowance (which releases
    /// speech deferred until the first read).
    pub(super) fn apply_status(
        &mut self,
        first: bool,
        status: FairUseStatus,
        announce: Vec<ThresholdNotice>,
    ) {
        if !first {
            self.out.push(LiveEvent::Usage {
                frames_received: self.frames_seen,
                session_speech_ms: ms(self.pipeline.speech_samples()),
                speech_ms: status.speech_ms,
                stage: status.stage,
            });
        }
        let changed = (status.stage, status.locked) != (self.stage, self.locked);
        self.stage = status.stage;
        self.locked = status.locked;
        if changed {
            self.out.push(LiveEvent::FairUse {
                frames_received: self.frames_seen,
                stage: status.stage,
                locked: status.locked,
            });
        }
        for n in announce {
            self.out.push(LiveEvent::UsageThreshold {
                frames_received: self.frames_seen,
                cap: n.cap,
                level_pct: n.level_pct,
                speech_ms: n.speech_ms,
                limit_ms: n.limit_ms,
                message: n.message,
            });
        }
        self.apply_allowance(status.stt);
        for (span, speech_ms) in std::mem::take(&mut self.stt.deferred) {
            self.forward_stt(span, speech_ms);
        }
        self.release_stt();
    }

    fn apply_allowance(&mut self, stt: SttAllowance) {
        // What this session forwarded but has not yet recorded is not in the store's `used_ms`.
        let pending = self.stt.unrecorded_ms;
        self.stt.gate = Gate::resolve(stt, pending);
        match self.stt.gate {
            Gate::Budget(b) if b.remaining() == 0 => self.announce_exhausted(),
            // Budget available again (a new day, a stage change): re-arm the announcement.
            _ => self.stt.exhausted_announced = false,
        }
    }
}
