//! An OpenAI-compatible chat-completions classifier.
//!
//! `POST {base_url}/chat/completions` with the model, a conservative system prompt and the usage snapshot as
//! JSON; the reply's message content must be one JSON object (markdown fences tolerated) with exactly the
//! fields below, scores within 0–1. Anything else is [`ClassifierError::Malformed`], a failure, never score 0.
//! The client speaks HTTP and HTTPS through the node's one outbound client ([`crate::outbound::Outbound`]: its
//! TLS configuration and `VOICEGATE_TLS_CA_FILE`), with the classifier's own timeout on every request.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use crate::fair_use::classifier::{Classifier, ClassifierError, UsageSnapshot};
use crate::policy::{ClassifierSettings, Evidence, UsageType, Verdict};

pub const PROMPT_VERSION: &str = "vg-2";

/// The newest sessions the prompt carries (the reference's 30; the rest of the window is in the totals).
pub const PROMPT_SESSIONS: usize = 30;

const SYSTEM_PROMPT: &str = "You review whether an account of a personal wearable voice recorder is misused. \
Be extremely conservative: personal use, meetings, lectures and live events score 0.0-0.3. A score of 0.7 or \
more requires BOTH very high volume AND a non-personal purpose (audiobooks, podcasts, prerecorded media, TV or \
films played to the device, commercial transcription). The user message is JSON: rolling speech totals (ms) \
and the recent sessions in audio time (lane realtime, sync_fresh or sync_backfill; audio_ms; speech_ms; \
speech_density = speech share of the session's audio; longest_speech_ms). Replayed media is dense and continuous \
for hours; a person's conversations, meetings and calls leave pauses. Reply with ONE JSON object and nothing else: \
{\"misuse_score\": number 0-1, \"usage_type\": one of none|audiobook|podcast|prerecorded|tv_movie|commercial|unknown, \
\"confidence\": number 0-1, \"evidence\": [{\"conversation_id\": string (a session id), \"title\": string, \"reason\": string}], \
\"reasoning\": string}";

/// The model's answer, exactly.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelVerdict {
    misuse_score: f64,
    usage_type: UsageType,
    confidence: f64,
    evidence: Vec<Evidence>,
    reasoning: String,
}

#[derive(Debug, Deserialize)]
struct ChatResponse {
    choices: Vec<ChatChoice>,
}

#[derive(Debug, Deserialize)]
struct ChatChoice {
    message: ChatMessage,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    content: Option<String>,
}

/// The chat-completions classifier.
#[derive(Clone)]
pub struct OpenAiClassifier {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for OpenAiClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OpenAiClassifier")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish()
    }
}

impl OpenAiClassifier {
    /// The classifier `settings` describe, calling through `http` (the node's outbound client,
    /// [`crate::outbound::Outbound::http`]).
    pub fn new(settings: &ClassifierSettings, http: reqwest::Client) -> Self {
        OpenAiClassifier {
            http,
            url: format!(
                "{}/chat/completions",
                settings.base_url.trim_end_matches('/')
            ),
            model: settings.model.clone(),
            api_key: settings.api_key.clone(),
            timeout: Duration::from_millis(settings.timeout_ms),
        }
    }

    async fn call(self, snapshot: UsageSnapshot) -> Result<Verdict, ClassifierError> {
        let mut snapshot = snapshot;
        snapshot.sessions.truncate(PROMPT_SESSIONS);
        let user = serde_json::to_string(&snapshot)
            .map_err(|e| ClassifierError::Snapshot(e.to_string()))?;
        let body = json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
            "response_format": {"type": "json_object"},
        });
        let mut req = self.http.post(&self.url).timeout(self.timeout).json(&body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClassifierError::Transport(e.without_url().to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ClassifierError::Status(status.as_u16()));
        }
        let chat: ChatResponse = resp.json().await.map_err(|e| {
            ClassifierError::Malformed(format!("response body: {}", e.without_url()))
        })?;
        let content = chat
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .ok_or_else(|| ClassifierError::Malformed("no message content".to_owned()))?;
        parse_verdict(&content, &self.model)
    }
}

impl Classifier for OpenAiClassifier {
    fn classify(
        &self,
        snapshot: UsageSnapshot,
    ) -> BoxFuture<'static, Result<Verdict, ClassifierError>> {
        Box::pin(self.clone().call(snapshot))
    }
}

/// Validate the model's message content: one JSON object with exactly the expected fields, scores in 0–1.
pub fn parse_verdict(content: &str, model: &str) -> Result<Verdict, ClassifierError> {
    let text = strip_fences(content);
    let v: ModelVerdict =
        serde_json::from_str(text).map_err(|e| ClassifierError::Malformed(e.to_string()))?;
    for (name, x) in [
        ("misuse_score", v.misuse_score),
        ("confidence", v.confidence),
    ] {
        if !(0.0..=1.0).contains(&x) {
            return Err(ClassifierError::Malformed(format!(
                "{name} {x} is outside 0-1"
            )));
        }
    }
    Ok(Verdict {
        misuse_score: v.misuse_score,
        usage_type: v.usage_type,
        confidence: v.confidence,
        evidence: v.evidence,
        reasoning: v.reasoning,
        model: format!("{model} ({PROMPT_VERSION})"),
        classifier_failed: None,
    }
    .normalised())
}

fn strip_fences(s: &str) -> &str {
    let t = s.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let rest = rest.strip_prefix("json").unwrap_or(rest);
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"misuse_score":0.9,"usage_type":"audiobook","confidence":0.8,
        "evidence":[{"conversation_id":"c1","title":"Ch. 1","reason":"narration"}],"reasoning":"long narration"}"#;

    #[test]
    fn a_valid_object_parses_with_or_without_fences() {
        let v = parse_verdict(GOOD, "m").unwrap();
        assert_eq!((v.misuse_score, v.usage_type), (0.9, UsageType::Audiobook));
        let fenced = format!("```json\n{GOOD}\n```");
        assert_eq!(parse_verdict(&fenced, "m").unwrap(), v);
    }

    #[test]
    fn anything_else_is_malformed_never_a_benign_score() {
        for bad in [
            "",
            "not json",
            r#"{"misuse_score":0.9}"#,
            r#"{"misuse_score":1.5,"usage_type":"none","confidence":0.5,"evidence":[],"reasoning":""}"#,
            r#"{"misuse_score":0.1,"usage_type":"karaoke","confidence":0.5,"evidence":[],"reasoning":""}"#,
            r#"{"misuse_score":0.1,"usage_type":"none","confidence":0.5,"evidence":[],"reasoning":"","x":1}"#,
        ] {
            assert!(
                matches!(parse_verdict(bad, "m"), Err(ClassifierError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
