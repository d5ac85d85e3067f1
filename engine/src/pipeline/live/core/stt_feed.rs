//! The session core's side of the STT feed: the feed's ranges clipped to the STT allowance, charged by the
//! samples they hold, and turned into [`SttCommand`]s (see `super::super::feed`).

use super::{SessionCore, ms};
use crate::pipeline::live::contract::SttCommand;
use crate::pipeline::live::events::LiveEvent;
use crate::pipeline::live::feed::{Feed, Raw};
use crate::pipeline::live::gate::Gate;
use crate::stt::ProviderKind;
use crate::telemetry as t;

impl SessionCore {
    /// The session has a provider: from now on it keeps its recent audio and forwards speech runs' samples
    /// while they run ([`SttCommand::Audio`]), charged by what it forwards. Call it once, before any frame.
    pub fn enable_stt_feed(&mut self, provider: ProviderKind) {
        self.pipeline.enable_tap(self.cfg.stt.tap_samples());
        let detector = self.cfg.pipeline.detector;
        self.stt.feed = Some(Feed::new(self.cfg.stt, detector.hangover, detector.pad));
        self.stt.provider = provider;
    }

    /// STT charged so far (ms): speech runs allowed (`none`), or the samples forwarded (a provider).
    pub fn stt_forwarded_ms(&self) -> u64 {
        self.stt.forwarded_ms
    }

    /// Gives back the charge of `samples` the provider refused as they were handed over (not taken, never
    /// sent). They belong to the commands just taken, so their charge is still unrecorded: the driver
    /// calls this before any store operation starts, and before it takes the events.
    pub fn refund_stt(&mut self, samples: u64) {
        if samples == 0 {
            return;
        }
        let Some(feed) = self.stt.feed.as_mut() else {
            return;
        };
        let before_ms = ms(feed.sent);
        feed.sent = feed.sent.saturating_sub(samples);
        let back = before_ms - ms(feed.sent);
        if back == 0 {
            return;
        }
        self.stt.forwarded_ms = self.stt.forwarded_ms.saturating_sub(back);
        self.stt.unrecorded_ms = self.stt.unrecorded_ms.saturating_sub(back);
        if let Gate::Budget(b) = &mut self.stt.gate {
            b.forwarded_since_check_ms = b.forwarded_since_check_ms.saturating_sub(back);
            // The release that used the budget up announced it; the driver refunds before it sends
            // events, so that announcement is still here: withdrawn, and armed again for when the
            // budget is really used up.
            if b.remaining() > 0 && self.stt.exhausted_announced {
                let before = self.out.len();
                self.out
                    .retain(|e| !matches!(e, LiveEvent::SttBudgetExhausted { .. }));
                if self.out.len() < before {
                    self.stt.exhausted_announced = false;
                }
            }
        }
        metrics::counter!(t::LISTEN_STT_REFUSED_MS_TOTAL).increment(back);
    }

    /// With a provider: whether a second of audio arrived since the feed last looked (see
    /// [`Feed::lagging`]).
    pub(super) fn stt_lagging(&self) -> bool {
        match (&self.stt.feed, self.pipeline.tap()) {
            (Some(feed), Some(tap)) => feed.lagging(tap.end()),
            _ => false,
        }
    }

    /// Why transcription is closed by the session's own gate (`None`: open, or not known yet).
    pub fn stt_gate_reason(&self) -> Option<&'static str> {
        match self.stt.gate {
            Gate::Closed(reason) => Some(reason.code()),
            Gate::Budget(b) if b.remaining() == 0 => Some("budget_exhausted"),
            Gate::Pending | Gate::Unlimited | Gate::Budget(_) => None,
        }
    }

    /// Moves what the feed has ready into commands, clipped to the allowance; nothing while the gate is
    /// still unknown. Audio that left the tap before it could go is counted (`reason="ring"`).
    pub(super) fn release_stt(&mut self) {
        let Some(feed) = self.stt.feed.as_mut() else {
            return;
        };
        let Some(tap) = self.pipeline.tap() else {
            return;
        };
        let offered = feed.advance(tap.end());
        if offered > 0 {
            metrics::counter!(t::STT_AUDIO_IN_SAMPLES_TOTAL, "provider" => self.stt.provider.name())
                .increment(offered);
        }
        if self.stt.gate == Gate::Pending {
            return;
        }
        let mut charged_ms = 0;
        let mut lost = 0u64;
        let mut sent = feed.sent;
        let before_ms = ms(sent);
        for raw in feed.take() {
            match raw {
                Raw::Audio { start, end } => {
                    let from = start.max(tap.oldest());
                    lost += from - start.min(from);
                    let want = end.saturating_sub(from);
                    let n = want.min(allowed_samples(&self.stt.gate, sent, charged_ms));
                    if n == 0 {
                        continue;
                    }
                    self.stt_out.push(SttCommand::Audio {
                        start: from,
                        end: from + n,
                    });
                    sent += n;
                    charged_ms = ms(sent) - before_ms;
                }
                Raw::EndOfRun => self.stt_out.push(SttCommand::EndOfRun),
            }
        }
        feed.sent = sent;
        if lost > 0 {
            metrics::counter!(t::STT_DROPPED_SAMPLES_TOTAL, "provider" => self.stt.provider.name(), "reason" => "ring")
                .increment(lost);
        }
        if charged_ms > 0 {
            self.stt.forwarded_ms += charged_ms;
            self.stt.unrecorded_ms += charged_ms;
            metrics::counter!(t::LISTEN_STT_FORWARDED_MS_TOTAL).increment(charged_ms);
            if let Gate::Budget(b) = &mut self.stt.gate {
                b.forwarded_since_check_ms += charged_ms;
            }
        }
        self.announce_exhausted();
    }
}

/// Samples that may still go, given `sent` samples charged as `ms(sent)` and `pending_ms` charged in this
/// release but not yet added to the gate: the most that keeps the charge within the budget's remaining ms.
fn allowed_samples(gate: &Gate, sent: u64, pending_ms: u64) -> u64 {
    match gate {
        Gate::Unlimited => u64::MAX,
        Gate::Pending | Gate::Closed(_) => 0,
        Gate::Budget(b) => {
            let remaining = b.remaining().saturating_sub(pending_ms);
            // ms() rounds half up: ms(s) <= m exactly when s <= 16 m + 7.
            let max_total = (ms(sent) + remaining) * 16 + 7;
            max_total.saturating_sub(sent)
        }
    }
}
