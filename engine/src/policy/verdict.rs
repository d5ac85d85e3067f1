//! A classifier's verdict on a user's recent usage (plain data; produced by `crate::supervisor`).

use serde::{Deserialize, Serialize};

/// What the usage looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageType {
    #[default]
    None,
    Audiobook,
    Podcast,
    Prerecorded,
    TvMovie,
    Commercial,
    Unknown,
}

impl UsageType {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageType::None => "none",
            UsageType::Audiobook => "audiobook",
            UsageType::Podcast => "podcast",
            UsageType::Prerecorded => "prerecorded",
            UsageType::TvMovie => "tv_movie",
            UsageType::Commercial => "commercial",
            UsageType::Unknown => "unknown",
        }
    }
}

/// One piece of evidence the classifier cites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub conversation_id: String,
    pub title: String,
    pub reason: String,
}

/// At most this many evidence entries are kept (the reference's cut).
pub const MAX_EVIDENCE: usize = 10;

/// A successful classification. A failed one is an error, never a verdict with score 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// 0.0–1.0; the stage gate passes at `>=` the configured threshold (default 0.7).
    pub misuse_score: f64,
    pub usage_type: UsageType,
    /// 0.0–1.0.
    pub confidence: f64,
    pub evidence: Vec<Evidence>,
    pub reasoning: String,
    /// Which classifier produced it (`heuristic-v2`, or the chat model's name).
    pub model: String,
    /// Set when the configured classifier failed `max_failures` times in a row for this breach and the
    /// heuristic's verdict was applied instead: the last failure's reason and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_failed: Option<String>,
}

impl Verdict {
    /// Scores clamped to 0–1 (NaN → 0) and evidence cut to [`MAX_EVIDENCE`].
    pub fn normalised(mut self) -> Verdict {
        self.misuse_score = clamp_unit(self.misuse_score);
        self.confidence = clamp_unit(self.confidence);
        self.evidence.truncate(MAX_EVIDENCE);
        self
    }
}

fn clamp_unit(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_clamps_scores_and_cuts_evidence() {
        let e = Evidence {
            conversation_id: "c".into(),
            title: "t".into(),
            reason: "r".into(),
        };
        let v = Verdict {
            misuse_score: 1.7,
            usage_type: UsageType::Podcast,
            confidence: f64::NAN,
            evidence: vec![e; 12],
            reasoning: String::new(),
            model: "m".into(),
            classifier_failed: None,
        }
        .normalised();
        assert_eq!(
            (v.misuse_score, v.confidence, v.evidence.len()),
            (1.0, 0.0, MAX_EVIDENCE)
        );
    }
}
