//! The STT feed of a live session: which stretches of the kept audio ([`AudioTap`]) go to the provider.
//!
//! A speech run is forwarded *while it runs*: from its start minus the pre-roll, then everything the
//! session receives while the run is open, then, when it ends, the detector's hangover after its end and
//! an end-of-run mark. The feed only decides stream ranges ([`Raw`]); the session core clips them to the
//! STT allowance and turns them into [`super::SttCommand`]s, and the driver reads the samples from the tap.
//! While the session's STT gate is still unknown (the first status read), ranges wait here, bounded.
//!
//! [`AudioTap`]: crate::pipeline::tap::AudioTap

use std::time::Duration;

use crate::audio::resample::TARGET_RATE;

/// Ranges and marks waiting for the gate, at most; past this the oldest is let go (counted as `ring`
/// drops by the core when it finds its audio gone). Contiguous ranges merge, so this is ~128 runs.
const MAX_WAITING: usize = 256;

/// A stretch of stream audio or a mark, not yet clipped to the allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Raw {
    /// Samples `[start, end)` at 16 kHz.
    Audio { start: u64, end: u64 },
    /// The run ended (after its hangover).
    EndOfRun,
}

/// How a session forwards speech to its provider (the server's flags; docs/stt.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedConfig {
    /// Audio before a run's start that goes with it (`VOICEGATE_STT_PREROLL_MS`, default 300 ms).
    pub preroll: Duration,
    /// Audio the session keeps for the pre-roll and the detector's confirmation delay; also the most a
    /// single tick may bring without losing the start of a run (more is counted as a `ring` drop).
    pub keep: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            preroll: Duration::from_millis(300),
            keep: Duration::from_millis(3_000),
        }
    }
}

impl FeedConfig {
    /// Samples the session's tap must hold: the pre-roll plus `keep`.
    pub fn tap_samples(&self) -> usize {
        to_samples(self.preroll + self.keep) as usize
    }
}

fn to_samples(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 32) * u64::from(TARGET_RATE) / 1000
}

#[derive(Debug)]
pub(super) struct Feed {
    preroll: u64,
    /// Audio after a run's (padded) end that goes with it: the detector's hangover beyond the padding.
    tail: u64,
    /// Everything before this was forwarded or passed over.
    cursor: u64,
    open: bool,
    waiting: Vec<Raw>,
    /// The tap's end at the last [`Feed::advance`].
    seen: u64,
    /// Samples handed to the provider's stream so far (what the session charges).
    pub sent: u64,
}

impl Feed {
    /// `hangover` and `pad` are the detector's, in samples.
    pub fn new(cfg: FeedConfig, hangover: u64, pad: u64) -> Feed {
        Feed {
            preroll: to_samples(cfg.preroll),
            tail: hangover.saturating_sub(pad),
            cursor: 0,
            open: false,
            waiting: Vec::with_capacity(8),
            seen: 0,
            sent: 0,
        }
    }

    /// A run was confirmed starting at `start`: it is forwarded from `start - preroll` (never audio
    /// already forwarded).
    pub fn started(&mut self, start: u64) {
        self.open = true;
        self.cursor = self.cursor.max(start.saturating_sub(self.preroll));
    }

    /// The run ended at `end` (padded); `received` is the end of the audio the session holds.
    pub fn ended(&mut self, end: u64, received: u64) {
        let to = end.saturating_add(self.tail).min(received);
        self.range_to(to);
        self.wait(Raw::EndOfRun);
        self.open = false;
    }

    /// While a run is open, everything received so far goes. Returns the samples received since the last
    /// call (the audio offered to the gate: `voicegate_stt_audio_in_samples_total`).
    pub fn advance(&mut self, received: u64) -> u64 {
        let new = received.saturating_sub(self.seen);
        self.seen = self.seen.max(received);
        if self.open {
            self.range_to(received);
        }
        new
    }

    /// Whether a second or more arrived since the last [`Feed::advance`]: one tick bringing a burst (a
    /// fast client, a lagging pipeline) then runs the VAD step and releases audio every second, so the
    /// start of a run never leaves the tap before it is forwarded.
    pub fn lagging(&self, received: u64) -> bool {
        received.saturating_sub(self.seen) >= u64::from(TARGET_RATE)
    }

    /// Ranges and marks ready to be clipped and sent (drained).
    pub fn take(&mut self) -> std::vec::Drain<'_, Raw> {
        self.waiting.drain(..)
    }

    fn range_to(&mut self, to: u64) {
        if to <= self.cursor {
            return;
        }
        let start = self.cursor;
        self.cursor = to;
        if let Some(Raw::Audio { end, .. }) = self.waiting.last_mut()
            && *end == start
        {
            *end = to;
            return;
        }
        self.wait(Raw::Audio { start, end: to });
    }

    fn wait(&mut self, raw: Raw) {
        if self.waiting.len() >= MAX_WAITING {
            self.waiting.remove(0);
        }
        self.waiting.push(raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed() -> Feed {
        // 300 ms pre-roll = 4800 samples; hangover 1600, pad 128: tail 1472.
        Feed::new(FeedConfig::default(), 1_600, 128)
    }

    #[test]
    fn a_run_goes_with_its_preroll_while_it_runs_then_its_hangover() {
        let mut f = feed();
        assert_eq!(f.advance(20_000), 20_000, "all of it is offered");
        assert!(f.take().next().is_none(), "no run, nothing goes");
        f.started(16_000);
        assert_eq!(f.advance(21_000), 1_000, "only what is new");
        assert_eq!(
            f.take().collect::<Vec<_>>(),
            vec![Raw::Audio {
                start: 11_200,
                end: 21_000
            }]
        );
        f.advance(25_000);
        f.ended(30_000, 40_000);
        assert_eq!(
            f.take().collect::<Vec<_>>(),
            vec![
                Raw::Audio {
                    start: 21_000,
                    end: 31_472
                },
                Raw::EndOfRun
            ]
        );
        f.advance(50_000);
        assert!(f.take().next().is_none(), "after the run, nothing goes");
    }

    #[test]
    fn the_preroll_never_resends_audio_and_waiting_ranges_merge() {
        let mut f = feed();
        f.started(1_000);
        f.advance(5_000);
        f.advance(9_000);
        f.ended(9_000, 9_500);
        // The next run starts 2000 samples later: its pre-roll stops at what went already.
        f.started(11_500);
        f.advance(12_000);
        assert_eq!(
            f.take().collect::<Vec<_>>(),
            vec![
                Raw::Audio {
                    start: 0,
                    end: 9_500
                },
                Raw::EndOfRun,
                Raw::Audio {
                    start: 9_500,
                    end: 12_000
                },
            ]
        );
    }

    #[test]
    fn the_tap_holds_the_preroll_and_three_seconds() {
        assert_eq!(FeedConfig::default().tap_samples(), 52_800);
    }
}
