//! Ground-truth labels (the fixtures' `NAME.json` beside `NAME.bin`) and how far an analysis is from them.
//!
//! A label says how much speech a clip holds (`total_speech_ms`, `speech_spans_ms`) and where sounds that
//! are not speech are (`nonspeech_events`: alarms, doors, typing, hum, music). The score of an analysis is
//! its per-clip metering error and the speech it metered inside those events (outside labelled speech),
//! so any corpus in this format can be scored with `voicegate analyze --json`.

use serde::{Deserialize, Serialize};

/// The parts of a label file that scoring reads; other fields are ignored.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Label {
    pub total_speech_ms: u64,
    #[serde(default)]
    pub speech_spans_ms: Vec<[u64; 2]>,
    #[serde(default)]
    pub nonspeech_events: Vec<LabelEvent>,
}

/// A labelled sound that is not speech.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LabelEvent {
    #[serde(default)]
    pub kind: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// An analysis measured against its label (ms).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelScore {
    /// The label's speech.
    pub label_speech_ms: u64,
    /// Metered minus labelled speech.
    pub error_ms: i64,
    /// `error_ms` in percent of the label's speech; `None` for a clip without speech.
    pub error_pct: Option<f64>,
    /// Metered speech that lies inside labelled speech spans (when the label has spans).
    pub overlap_ms: u64,
    /// Labelled non-speech events and the metered speech inside them, outside labelled speech.
    pub events: u64,
    pub events_ms: u64,
    pub metered_in_events_ms: u64,
}

impl Label {
    /// Parse a label file's text.
    pub fn from_json(text: &str) -> Result<Label, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Score metered speech `speech_ms` with raw runs `raw_ms` (`[start, end)` in ms) against this label.
    pub fn score(&self, speech_ms: u64, raw_ms: &[[u64; 2]]) -> LabelScore {
        let speech = normalise(&self.speech_spans_ms);
        let events = normalise(
            &self
                .nonspeech_events
                .iter()
                .map(|e| [e.start_ms, e.end_ms])
                .collect::<Vec<_>>(),
        );
        let raw = normalise(raw_ms);
        let in_events = intersection(&raw, &events);
        let error_ms = speech_ms as i64 - self.total_speech_ms as i64;
        LabelScore {
            label_speech_ms: self.total_speech_ms,
            error_ms,
            error_pct: (self.total_speech_ms > 0)
                .then(|| error_ms as f64 * 100.0 / self.total_speech_ms as f64),
            overlap_ms: length(&intersection(&raw, &speech)),
            events: self.nonspeech_events.len() as u64,
            events_ms: length(&events),
            metered_in_events_ms: length(&in_events) - length(&intersection(&in_events, &speech)),
        }
    }
}

/// Sorted, non-overlapping, non-empty spans.
fn normalise(spans: &[[u64; 2]]) -> Vec<[u64; 2]> {
    let mut v: Vec<[u64; 2]> = spans.iter().copied().filter(|s| s[1] > s[0]).collect();
    v.sort_unstable();
    let mut out: Vec<[u64; 2]> = Vec::with_capacity(v.len());
    for s in v {
        match out.last_mut() {
            Some(last) if s[0] <= last[1] => last[1] = last[1].max(s[1]),
            _ => out.push(s),
        }
    }
    out
}

/// Intersection of two normalised span lists.
fn intersection(a: &[[u64; 2]], b: &[[u64; 2]]) -> Vec<[u64; 2]> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i][0].max(b[j][0]);
        let end = a[i][1].min(b[j][1]);
        if start < end {
            out.push([start, end]);
        }
        if a[i][1] < b[j][1] {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn length(spans: &[[u64; 2]]) -> u64 {
    spans.iter().map(|s| s[1] - s[0]).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(total: u64, speech: &[[u64; 2]], events: &[[u64; 2]]) -> Label {
        Label {
            total_speech_ms: total,
            speech_spans_ms: speech.to_vec(),
            nonspeech_events: events
                .iter()
                .map(|e| LabelEvent {
                    kind: "door".into(),
                    start_ms: e[0],
                    end_ms: e[1],
                })
                .collect(),
        }
    }

    #[test]
    fn error_is_metered_minus_label_in_ms_and_percent() {
        let s = label(1000, &[[0, 1000]], &[]).score(950, &[[20, 970]]);
        assert_eq!(s.error_ms, -50);
        assert_eq!(s.error_pct, Some(-5.0));
        assert_eq!(s.overlap_ms, 950);
    }

    #[test]
    fn a_clip_without_speech_has_no_percentage() {
        let s = label(0, &[], &[[0, 500]]).score(120, &[[100, 220]]);
        assert_eq!(s.error_pct, None);
        assert_eq!(s.error_ms, 120);
        assert_eq!(s.metered_in_events_ms, 120);
        assert_eq!((s.events, s.events_ms), (1, 500));
    }

    #[test]
    fn speech_in_events_excludes_labelled_speech_and_counts_overlaps_once() {
        // Event 0..1000 overlaps speech 800..1200; raw 500..1100 is 300 ms in the event outside speech.
        let l = label(400, &[[800, 1200]], &[[0, 1000], [900, 1000]]);
        let s = l.score(600, &[[500, 1100]]);
        assert_eq!(s.metered_in_events_ms, 300);
        assert_eq!(s.events_ms, 1000);
        assert_eq!(s.overlap_ms, 300);
    }

    #[test]
    fn a_fixture_label_parses_and_extra_fields_are_ignored() {
        let l = Label::from_json(r#"{"id":"d01","total_speech_ms":5,"speech_spans_ms":[[1,6]]}"#)
            .unwrap();
        assert_eq!(l, label(5, &[[1, 6]], &[]));
        assert!(Label::from_json(r#"{"speech_spans_ms":[]}"#).is_err());
    }
}
