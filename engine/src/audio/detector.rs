//! Speech runs from VAD window probabilities: hysteresis with a minimum run and a hangover.
//!
//! A run starts at the first window whose probability is at least `threshold`. It continues while
//! windows stay above `neg_threshold`; once they fall below, the run ends at the first low window
//! **if** the low stretch lasts at least `hangover` samples (shorter dips are bridged). A finished run
//! shorter than `min_speech` is discarded as a click. A kept run is then widened by `pad` at each edge
//! (never before the previous run's end, never past the audio seen; `pad` is at most `hangover`, so a
//! padded end is always audio already classified). Everything is in samples at 16 kHz.

use super::vad::{WINDOW, WindowProb};
use crate::time::Span;

/// Detector parameters (samples at 16 kHz).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorParams {
    pub threshold: f32,
    pub neg_threshold: f32,
    pub min_speech: u64,
    pub hangover: u64,
    /// Added before a run's first and after its last speech window (at most `hangover`).
    pub pad: u64,
}

impl Default for DetectorParams {
    fn default() -> Self {
        DetectorParams {
            threshold: 0.5,
            neg_threshold: 0.35,
            // Measured on the fixtures and the development corpus (docs/metering.md, "What counts as speech").
            min_speech: 1_600,
            hangover: 1_600,
            pad: 128,
        }
    }
}

/// An event from the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeechEvent {
    /// Speech began at this sample offset (emitted once the run is confirmed long enough).
    Started(u64),
    /// A run finished.
    Ended(Span),
}

/// Streaming detector state.
#[derive(Debug, Clone)]
pub struct SpeechDetector {
    params: DetectorParams,
    /// Start of the current run, if in speech.
    run_start: Option<u64>,
    /// Start of the current low stretch inside a run.
    low_start: Option<u64>,
    /// Whether `Started` was emitted for the current run.
    announced: bool,
    /// End of the last window seen.
    last_end: u64,
    /// End of the last run handed out (a padded start never reaches before it).
    prev_end: u64,
}

impl SpeechDetector {
    pub fn new(params: DetectorParams) -> SpeechDetector {
        SpeechDetector {
            params,
            run_start: None,
            low_start: None,
            announced: false,
            last_end: 0,
            prev_end: 0,
        }
    }

    fn pad(&self) -> u64 {
        self.params.pad.min(self.params.hangover)
    }

    /// Where the run that started (unpadded) at `start` begins once padded.
    fn padded_start(&self, start: u64) -> u64 {
        start.saturating_sub(self.pad()).max(self.prev_end)
    }

    /// Feed one window's probability; events are appended to `out`.
    pub fn push(&mut self, w: WindowProb, out: &mut Vec<SpeechEvent>) {
        let end = w.start + WINDOW as u64;
        self.last_end = end;
        match self.run_start {
            None => {
                if w.prob >= self.params.threshold {
                    self.run_start = Some(w.start);
                    self.low_start = None;
                    self.announced = false;
                }
            }
            Some(start) => {
                if w.prob < self.params.neg_threshold {
                    let low = *self.low_start.get_or_insert(w.start);
                    if end - low >= self.params.hangover {
                        self.close(start, low, out);
                    }
                } else if w.prob >= self.params.threshold || self.low_start.is_none() {
                    self.low_start = None;
                }
            }
        }
        if let Some(start) = self.run_start
            && !self.announced
            && self.low_start.is_none()
            && end - start >= self.params.min_speech
        {
            self.announced = true;
            out.push(SpeechEvent::Started(self.padded_start(start)));
        }
    }

    fn close(&mut self, start: u64, end: u64, out: &mut Vec<SpeechEvent>) {
        if end - start >= self.params.min_speech {
            let start = self.padded_start(start);
            if !self.announced {
                out.push(SpeechEvent::Started(start));
            }
            let end = end.saturating_add(self.pad()).min(self.last_end).max(end);
            out.push(SpeechEvent::Ended(Span::new(start, end)));
            self.prev_end = end;
        }
        self.run_start = None;
        self.low_start = None;
        self.announced = false;
    }

    /// End of stream: close an open run at the start of its low stretch (or at the last window's end).
    pub fn finish(&mut self, out: &mut Vec<SpeechEvent>) {
        if let Some(start) = self.run_start {
            let end = self.low_start.unwrap_or(self.last_end);
            self.close(start, end, out);
        }
    }

    /// Samples of the open run that are certain to be counted when it closes: an announced run (already at
    /// least `min_speech` long) ends no earlier than the start of its current low stretch, or the last
    /// window's end when there is none. Never decreases while the run stays open, and the closed run's
    /// length is at least the last value (so metering it early never overcounts).
    pub fn committed_open(&self) -> u64 {
        match self.run_start {
            Some(start) if self.announced => self
                .low_start
                .unwrap_or(self.last_end)
                .saturating_sub(self.padded_start(start)),
            _ => 0,
        }
    }

    /// Whether a run is open.
    pub fn in_speech(&self) -> bool {
        self.run_start.is_some()
    }
}

/// Run a detector over a whole list of windows and return the raw spans.
pub fn detect(params: DetectorParams, windows: &[WindowProb]) -> Vec<Span> {
    let mut d = SpeechDetector::new(params);
    let mut events = Vec::new();
    for w in windows {
        d.push(*w, &mut events);
    }
    d.finish(&mut events);
    events
        .into_iter()
        .filter_map(|e| match e {
            SpeechEvent::Ended(s) => Some(s),
            SpeechEvent::Started(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(probs: &[f32]) -> Vec<WindowProb> {
        probs
            .iter()
            .enumerate()
            .map(|(i, &p)| WindowProb {
                start: (i * WINDOW) as u64,
                prob: p,
            })
            .collect()
    }

    fn params() -> DetectorParams {
        DetectorParams {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_speech: 2 * WINDOW as u64,
            hangover: 2 * WINDOW as u64,
            pad: 0,
        }
    }

    #[test]
    fn a_run_ends_at_the_first_low_window_after_a_full_hangover() {
        let spans = detect(params(), &windows(&[0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]));
        assert_eq!(spans, vec![Span::new(512, 4 * 512)]);
    }

    #[test]
    fn committed_speech_of_an_open_run_grows_and_never_exceeds_the_closed_run() {
        let p = params();
        let mut d = SpeechDetector::new(p);
        let mut out = Vec::new();
        let probs: Vec<f32> =
            [vec![0.9; 200], vec![0.1; 20], vec![0.9; 50], vec![0.1; 200]].concat();
        let closed = |out: &[SpeechEvent]| -> u64 {
            out.iter()
                .filter_map(|e| match e {
                    SpeechEvent::Ended(s) => Some(s.len()),
                    _ => None,
                })
                .sum()
        };
        let mut last = 0;
        let mut saw_open = false;
        for w in windows(&probs) {
            d.push(w, &mut out);
            saw_open |= d.committed_open() > 0;
            // What a realtime session meters: finished runs plus the open run's committed part.
            let certain = closed(&out) + d.committed_open();
            assert!(
                certain >= last,
                "certain speech went back from {last} to {certain}"
            );
            last = certain;
        }
        d.finish(&mut out);
        assert!(saw_open);
        assert_eq!(d.committed_open(), 0);
        assert_eq!(closed(&out), last, "after the end, certain = counted");
    }

    #[test]
    fn a_kept_run_is_padded_at_both_edges_but_never_into_the_previous_run() {
        let p = DetectorParams {
            pad: 100,
            ..params()
        };
        let probs = [0.0, 0.9, 0.9, 0.0, 0.0, 0.9, 0.9, 0.0, 0.0];
        let spans = detect(p, &windows(&probs));
        assert_eq!(
            spans,
            vec![
                Span::new(512 - 100, 3 * 512 + 100),
                Span::new(5 * 512 - 100, 7 * 512 + 100)
            ]
        );
        // At the stream's start and end the padding stops at the audio.
        let spans = detect(p, &windows(&[0.9, 0.9, 0.9]));
        assert_eq!(spans, vec![Span::new(0, 3 * 512)]);
        // Padding never exceeds the hangover, so a padded end is audio already classified.
        let wide = DetectorParams {
            pad: 10_000,
            ..params()
        };
        assert_eq!(
            detect(wide, &windows(&probs))[0],
            Span::new(0, 3 * 512 + 2 * 512)
        );
    }

    #[test]
    fn a_short_dip_is_bridged() {
        let spans = detect(params(), &windows(&[0.9, 0.9, 0.1, 0.9, 0.9, 0.0, 0.0]));
        assert_eq!(spans, vec![Span::new(0, 5 * 512)]);
    }

    #[test]
    fn a_click_shorter_than_min_speech_is_dropped() {
        assert!(detect(params(), &windows(&[0.1, 0.9, 0.1, 0.1, 0.1])).is_empty());
    }

    #[test]
    fn an_open_run_is_closed_at_the_end() {
        assert_eq!(
            detect(params(), &windows(&[0.9, 0.9, 0.9])),
            vec![Span::new(0, 3 * 512)]
        );
    }

    #[test]
    fn between_thresholds_keeps_but_does_not_start_speech() {
        assert!(detect(params(), &windows(&[0.4, 0.4, 0.4])).is_empty());
        assert_eq!(
            detect(params(), &windows(&[0.9, 0.4, 0.4, 0.0, 0.0])),
            vec![Span::new(0, 3 * 512)]
        );
    }
}
