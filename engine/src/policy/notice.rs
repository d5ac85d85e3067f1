//! User-facing texts for each stage: the status message and the notification a stage change sends.

use serde::{Deserialize, Serialize};

use crate::policy::{CaseRef, Stage};

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
        assert!(notice_for(Stage::None, Some(&r)).is_none());
    }

    #[test]
    fn status_messages_carry_the_reference_keywords() {
        assert!(status_message(Stage::None, None).contains("normal limits"));
        assert!(status_message(Stage::Warning, None).contains("personal conversations"));
        assert!(status_message(Stage::Throttle, None).contains("temporarily reduced"));
        assert!(status_message(Stage::Restrict, None).contains(SUPPORT_EMAIL));
    }
}
