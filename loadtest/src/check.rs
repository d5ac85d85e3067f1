//! The accounting check: for every user, the speech the server metered (status API) against the sum of
//! what its sessions and uploads reported (must be equal), and against the engine's own offline pipeline
//! over the exact audio the user sent (must agree within 1%).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::audio::resample::TARGET_RATE;
use voicegate_engine::audio::vad::SileroModel;
use voicegate_engine::pipeline::offline::{analyze, format_for_name};
use voicegate_engine::pipeline::stream::{PipelineConfig, SpeechPipeline};
use voicegate_engine::time::samples_to_ms;

use crate::auth::Authenticator;
use crate::cli::Nodes;
use crate::corpus::Corpus;
use crate::sync::{SentFile, device_file_name, request_error_kind};

/// Relative tolerance between the metered speech and the offline pipeline.
pub const OFFLINE_TOLERANCE: f64 = 0.01;

/// What one user sent and was told.
#[derive(Debug, Default, Clone)]
pub struct UserTraffic {
    pub user: String,
    /// Realtime sessions as (start clip, frames sent).
    pub sessions: Vec<(usize, u64)>,
    pub files: Vec<SentFile>,
    /// Σ `metadata.speech_ms` + Σ upload `speech_ms`.
    pub reported_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct UserCheck {
    pub user: String,
    pub server_ms: Option<u64>,
    pub reported_ms: u64,
    pub offline_ms: u64,
    pub ok: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct CheckReport {
    pub users: usize,
    pub users_failed: usize,
    /// Which status field was compared (`month_ms`, else `weekly_ms`).
    pub status_field: String,
    pub server_ms: u64,
    pub reported_ms: u64,
    pub offline_ms: u64,
    /// Σ |server − reported| over users: must be 0.
    pub server_vs_reported_abs_ms: u64,
    /// Σ (reported − offline) and Σ |reported − offline| over users.
    pub reported_minus_offline_ms: i64,
    pub reported_vs_offline_abs_ms: u64,
    /// Largest per-user |reported − offline| / offline.
    pub worst_offline_ratio: f64,
    pub offline_secs: f64,
    pub passed: bool,
    /// Up to 20 failing users.
    pub failures: Vec<UserCheck>,
}

#[derive(Deserialize)]
struct Status {
    speech_ms: StatusSpeech,
}

#[derive(Deserialize)]
struct StatusSpeech {
    #[serde(default)]
    month_ms: Option<u64>,
    #[serde(default)]
    weekly_ms: Option<u64>,
}

pub async fn run(
    corpus: Arc<Corpus>,
    traffic: Vec<UserTraffic>,
    client: reqwest::Client,
    nodes: &Nodes,
    auth: &Authenticator,
    settle: Duration,
) -> CheckReport {
    let started = Instant::now();
    let offline = {
        let corpus = corpus.clone();
        let traffic = traffic.clone();
        tokio::task::spawn_blocking(move || offline_per_user(&corpus, &traffic))
            .await
            .unwrap_or_else(|_| Err("offline pipeline panicked".into()))
    };
    let offline_secs = started.elapsed().as_secs_f64();
    let offline = match offline {
        Ok(o) => o,
        Err(e) => {
            eprintln!("accounting check: {e}");
            return CheckReport {
                users: traffic.len(),
                users_failed: traffic.len(),
                ..CheckReport::default()
            };
        }
    };
    let deadline = Instant::now() + settle;
    let server: Vec<(Option<u64>, &'static str)> =
        futures_util::stream::iter(traffic.iter().enumerate().map(|(k, t)| {
            let client = client.clone();
            // User k's first stream went to node k (one stream per user): its status is read on the next.
            let url = nodes.pick(k + 1);
            async move { settled_status(&client, url, auth, t, deadline).await }
        }))
        .buffered(32)
        .collect()
        .await;
    let mut report = CheckReport {
        users: traffic.len(),
        offline_secs,
        status_field: server
            .iter()
            .find(|(ms, _)| ms.is_some())
            .map(|(_, f)| (*f).to_owned())
            .unwrap_or_default(),
        ..CheckReport::default()
    };
    for ((t, (server_ms, _)), offline_ms) in traffic.iter().zip(server).zip(offline) {
        let diff = t.reported_ms.abs_diff(offline_ms);
        let ratio = if offline_ms == 0 {
            if diff == 0 { 0.0 } else { 1.0 }
        } else {
            diff as f64 / offline_ms as f64
        };
        let ok = server_ms == Some(t.reported_ms) && ratio <= OFFLINE_TOLERANCE;
        report.server_ms += server_ms.unwrap_or(0);
        report.reported_ms += t.reported_ms;
        report.offline_ms += offline_ms;
        report.server_vs_reported_abs_ms +=
            server_ms.map_or(t.reported_ms, |s| s.abs_diff(t.reported_ms));
        report.reported_minus_offline_ms += t.reported_ms as i64 - offline_ms as i64;
        report.reported_vs_offline_abs_ms += diff;
        report.worst_offline_ratio = report.worst_offline_ratio.max(ratio);
        if !ok {
            report.users_failed += 1;
            if report.failures.len() < 20 {
                report.failures.push(UserCheck {
                    user: t.user.clone(),
                    server_ms,
                    reported_ms: t.reported_ms,
                    offline_ms,
                    ok,
                });
            }
        }
    }
    report.passed = report.users_failed == 0;
    report
}

/// The user's metered speech, re-read until it equals what was reported or the deadline passes
/// (the meter may still be folding in the last second of a session).
async fn settled_status(
    client: &reqwest::Client,
    url: &str,
    auth: &Authenticator,
    t: &UserTraffic,
    deadline: Instant,
) -> (Option<u64>, &'static str) {
    let mut last = (None, "");
    loop {
        if let Ok(v) = status(client, url, auth, &t.user).await {
            last = v;
        }
        if last.0 == Some(t.reported_ms) || Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn status(
    client: &reqwest::Client,
    url: &str,
    auth: &Authenticator,
    user: &str,
) -> Result<(Option<u64>, &'static str), String> {
    let resp = client
        .get(format!("{url}/v1/fair-use/status"))
        .header(reqwest::header::AUTHORIZATION, auth.header(user)?)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| request_error_kind(&e))?;
    if !resp.status().is_success() {
        return Err(format!("status_http_{}", resp.status().as_u16()));
    }
    let body = resp.bytes().await.map_err(|e| request_error_kind(&e))?;
    let s: Status = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(match (s.speech_ms.month_ms, s.speech_ms.weekly_ms) {
        (Some(m), _) => (Some(m), "month_ms"),
        (None, w) => (w, "weekly_ms"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Audio {
    Session { start: usize, frames: u64 },
    File(SentFile),
}

/// Offline speech per user. Identical audio (same start clip and length, or the same file) is analysed
/// once: at a fixed duration most streams send one of a dozen sequences.
fn offline_per_user(corpus: &Corpus, traffic: &[UserTraffic]) -> Result<Vec<u64>, String> {
    let model = SileroModel::shared().map_err(|e| e.to_string())?;
    let cfg = PipelineConfig::default();
    let unique: HashSet<Audio> = traffic
        .iter()
        .flat_map(|t| {
            t.sessions
                .iter()
                .map(|&(start, frames)| Audio::Session { start, frames })
                .chain(t.files.iter().map(|&f| Audio::File(f)))
        })
        .collect();
    let unique: Vec<Audio> = unique.into_iter().collect();
    let results: Result<HashMap<Audio, u64>, String> = unique
        .par_iter()
        .map(|&a| {
            let ms = match a {
                Audio::Session { start, frames } => {
                    session_speech_ms(corpus, start, frames, &cfg, model.clone())?
                }
                Audio::File(f) => file_speech_ms(corpus, f, &cfg)?,
            };
            Ok((a, ms))
        })
        .collect();
    let results = results?;
    Ok(traffic
        .iter()
        .map(|t| {
            let s: u64 = t
                .sessions
                .iter()
                .map(|&(start, frames)| results[&Audio::Session { start, frames }])
                .sum();
            let f: u64 = t.files.iter().map(|&f| results[&Audio::File(f)]).sum();
            s + f
        })
        .collect())
}

/// The speech the engine's pipeline finds in the first `frames` frames a stream sent.
pub fn session_speech_ms(
    corpus: &Corpus,
    start: usize,
    frames: u64,
    cfg: &PipelineConfig,
    model: Arc<SileroModel>,
) -> Result<u64, String> {
    let codec = Codec::opus(TARGET_RATE).ok_or("no 16 kHz opus codec")?;
    let mut p = SpeechPipeline::for_codec(codec, cfg, model).map_err(|e| e.to_string())?;
    let mut events = Vec::new();
    for n in 0..frames {
        p.push_payload(corpus.frame(start, n), &mut events)
            .map_err(|e| e.to_string())?;
        events.clear();
    }
    p.finish(&mut events).map_err(|e| e.to_string())?;
    Ok(samples_to_ms(p.speech_samples(), TARGET_RATE))
}

fn file_speech_ms(corpus: &Corpus, f: SentFile, cfg: &PipelineConfig) -> Result<u64, String> {
    let (bytes, _) = corpus.device_file(f.clip, f.skip);
    let name = device_file_name(1_750_000_000);
    let format = format_for_name(&name).map_err(|e| e.to_string())?;
    let a = analyze(&name, &bytes[..], &format, cfg);
    match a.error {
        Some(e) => Err(format!("offline analysis of clip {}: {e}", f.clip)),
        None => Ok(a.speech_ms),
    }
}
