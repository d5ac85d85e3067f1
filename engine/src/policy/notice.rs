//! User-facing texts for each stage: the status message and the notification a stage change sends.

use serde::{Deserialize, Serialize};

use crate::policy::{CapKind, CaseRef, RollingTotals, SoftCaps, Stage};

pub const SUPPORT_EMAIL: &str = "team@basedhardware.com";

/// A notification for a stage change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub stage: Stage,
    pub title: String,
    pub body: String,
    pub case_ref: Option<CaseRef>,
}

/// The notification sent on entering `stage` (none for `none`: decay to none is silent).
pub fn notice_for(stage: Stage, case_ref: Option<&CaseRef>) -> Option<Notice> {
    let (title, body) = match stage {
        Stage::None => return None,
        Stage::Warning => (
            "Fair Use Notice",
            "Your usage is unusually high. VoiceGate is meant for personal conversations; continued heavy use may \
             reduce transcription. See Settings > Plan & Usage.",
        ),
        Stage::Throttle => (
            "Transcription Quality Reduced",
            "Cloud transcription is temporarily limited to a daily budget. It resets automatically. Contact \
             team@basedhardware.com and quote the case reference.",
        ),
        Stage::Restrict => (
            "Transcription Limit Reached",
            "Cloud transcription is temporarily limited and uploads over the fair-use limits are refused. \
             On-device transcription continues. Contact team@basedhardware.com.",
        ),
    };
    Some(Notice {
        stage,
        title: title.to_owned(),
        body: with_ref(body, case_ref),
        case_ref: case_ref.cloned(),
    })
}

/// The status view's message for a stage.
pub fn status_message(stage: Stage, case_ref: Option<&CaseRef>) -> String {
    let text = match stage {
        Stage::None => "Your usage is within normal limits.",
        Stage::Warning => {
            "Your usage is unusually high. VoiceGate is meant for personal conversations."
        }
        Stage::Throttle => {
            "Cloud transcription is temporarily reduced to a daily budget. Contact team@basedhardware.com."
        }
        Stage::Restrict => {
            "Cloud transcription is temporarily limited and uploads over the limits are refused. Contact \
             team@basedhardware.com."
        }
    };
    with_ref(text, case_ref)
}

/// The shares of a cap, in percent, at which the user is told (once each per crossing, across sessions and
/// nodes: the fair-use store keeps which were told, cleared when the usage falls back under the level).
pub const THRESHOLD_LEVELS: [u8; 2] = [80, 100];

/// A usage threshold reached: `level_pct` of the user's cap on one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThresholdNotice {
    pub cap: CapKind,
    pub level_pct: u8,
    pub speech_ms: u64,
    pub limit_ms: u64,
    pub message: String,
}

impl ThresholdNotice {
    /// The store's name of this (cap, level): `daily:80`.
    pub fn key(&self) -> String {
        threshold_key(self.cap, self.level_pct)
    }
}

/// The store's name of a (cap, level).
pub fn threshold_key(cap: CapKind, level_pct: u8) -> String {
    format!("{}:{level_pct}", cap.as_str())
}

/// Every (cap, level) the totals reach (speech ≥ level % of the cap, some speech at all), in the order
/// daily, 3-day, weekly and ascending level.
pub fn thresholds_reached(caps: &SoftCaps, totals: &RollingTotals) -> Vec<ThresholdNotice> {
    let mut out = Vec::new();
    for (cap, speech_ms) in [
        (CapKind::Daily, totals.daily_ms),
        (CapKind::ThreeDay, totals.three_day_ms),
        (CapKind::Weekly, totals.weekly_ms),
    ] {
        let limit_ms = caps.limit_ms(cap);
        for level_pct in THRESHOLD_LEVELS {
            let reached = speech_ms > 0
                && u128::from(speech_ms) * 100 >= u128::from(limit_ms) * u128::from(level_pct);
            if reached {
                out.push(ThresholdNotice {
                    cap,
                    level_pct,
                    speech_ms,
                    limit_ms,
                    message: threshold_message(cap, level_pct, limit_ms),
                });
            }
        }
    }
    out
}

/// The highest level reached per window (what the status shows).
pub fn highest_per_window(reached: Vec<ThresholdNotice>) -> Vec<ThresholdNotice> {
    let mut out: Vec<ThresholdNotice> = Vec::new();
    for n in reached {
        match out.last_mut() {
            Some(last) if last.cap == n.cap => *last = n,
            _ => out.push(n),
        }
    }
    out
}

#[allow(clippy::cast_precision_loss)] // display only
fn threshold_message(cap: CapKind, level_pct: u8, limit_ms: u64) -> String {
    let window = match cap {
        CapKind::Daily => "the last 24 hours",
        CapKind::ThreeDay => "the last 3 days",
        CapKind::Weekly => "the last 7 days",
    };
    let hours = (limit_ms as f64 / 3_600_000.0 * 10.0).round() / 10.0;
    if level_pct >= 100 {
        format!(
            "You have reached the fair-use level of {hours} speech-hours in {window}. Recording continues; \
             usage well above it is reviewed."
        )
    } else {
        format!(
            "You have used {level_pct}% of the fair-use level of {hours} speech-hours in {window}."
        )
    }
}

fn with_ref(text: &str, case_ref: Option<&CaseRef>) -> String {
    match case_ref {
        Some(r) => format!("{text} Reference: {r}"),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_match_the_reference_and_none_sends_nothing() {
        let r = CaseRef::from_bits(1);
        assert_eq!(
            notice_for(Stage::Warning, None).map(|n| n.title).as_deref(),
            Some("Fair Use Notice")
        );
        assert!(
            notice_for(Stage::Throttle, Some(&r))
                .is_some_and(|n| n.body.ends_with("FU-000000000001"))
        );
        assert_eq!(
            notice_for(Stage::Restrict, None)
                .map(|n| n.title)
                .as_deref(),
            Some("Transcription Limit Reached")
        );
        assert_eq!(
            notice_for(Stage::Throttle, None)
                .map(|n| n.title)
                .as_deref(),
            Some("Transcription Quality Reduced")
        );
        assert!(notice_for(Stage::None, Some(&r)).is_none());
    }

    #[test]
    fn thresholds_are_reached_at_80_and_100_percent_of_each_cap_and_the_status_shows_the_highest() {
        let caps = SoftCaps::default(); // 2 / 8 / 10 h
        let at = |d, t, w| {
            thresholds_reached(
                &caps,
                &RollingTotals {
                    daily_ms: d,
                    three_day_ms: t,
                    weekly_ms: w,
                },
            )
            .iter()
            .map(ThresholdNotice::key)
            .collect::<Vec<_>>()
        };
        assert!(at(0, 0, 0).is_empty());
        assert!(at(5_759_999, 0, 0).is_empty(), "just under 80 % of 2 h");
        assert_eq!(at(5_760_000, 5_760_000, 5_760_000), ["daily:80"]);
        assert_eq!(
            at(7_200_000, 7_200_000, 7_200_000),
            ["daily:80", "daily:100"]
        );
        assert_eq!(
            at(7_200_000, 28_800_000, 28_800_000),
            ["daily:80", "daily:100", "3day:80", "3day:100", "weekly:80"]
        );
        let top = highest_per_window(thresholds_reached(
            &caps,
            &RollingTotals {
                daily_ms: 7_200_000,
                three_day_ms: 7_200_000,
                weekly_ms: 28_800_000,
            },
        ));
        assert_eq!(
            top.iter().map(ThresholdNotice::key).collect::<Vec<_>>(),
            ["daily:100", "weekly:80"]
        );
        assert!(top[0].message.contains("reached") && top[0].message.contains("2 speech-hours"));
        assert!(top[1].message.contains("80%") && top[1].message.contains("7 days"));
        // Silence never notifies, even against a cap of 0 (an operator's setting); any speech is past it.
        let zero = SoftCaps {
            daily_ms: 0,
            three_day_ms: 0,
            weekly_ms: 0,
        };
        assert!(thresholds_reached(&zero, &RollingTotals::default()).is_empty());
        let one = RollingTotals {
            daily_ms: 1,
            three_day_ms: 0,
            weekly_ms: 0,
        };
        assert_eq!(
            thresholds_reached(&zero, &one)
                .iter()
                .map(ThresholdNotice::key)
                .collect::<Vec<_>>(),
            ["daily:80", "daily:100"]
        );
    }

    #[test]
    fn status_messages_carry_the_reference_keywords() {
        assert!(status_message(Stage::None, None).contains("normal limits"));
        assert!(status_message(Stage::Warning, None).contains("personal conversations"));
        assert!(status_message(Stage::Throttle, None).contains("temporarily reduced"));
        assert!(status_message(Stage::Restrict, None).contains(SUPPORT_EMAIL));
    }
}
