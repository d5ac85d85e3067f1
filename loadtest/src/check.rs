//! The accounting check: for every user, the speech the server metered (status API) against the sum of
//! what its sessions and uploads reported (must be equal), and against the engine's own offline pipeline
//! over the exact audio the user sent (must agree within 1%).
//!
//! With `--survive-node-loss` (a chaos run) a node may die under the user's sessions and uploads, so what it
//! reported is not all it sent. The check then compares the status API with the offline pipeline over
//! everything the user sent (every session, broken ones too, and every file of an upload, answered or not):
//! the server may never meter more than that (**doubled** = Σ max(0, server − sent), must be 0), and what it
//! metered less (**lost**) must lie within the bound of what a node's loss may cost (`docs/reliability.md`):
//! per broken session up to [`BROKEN_SESSION_BOUND_MS`] of its speech, every file never answered, and the
//! sessions and uploads told within [`TOLD_BEFORE_LOSS`] before a connection broke.

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

/// Speech a session on a node that died may lose (`docs/reliability.md`): what its session had not yet
/// recorded (it records every `meter_interval`, 1 s), what its meter actor had recorded but not flushed
/// (`VOICEGATE_METER_FLUSH_INTERVAL_MS`, 1 s), and the open run's uncertain tail with the audio in flight
/// (under 1 s).
pub const BROKEN_SESSION_BOUND_MS: u64 = 3_000;
/// A session or upload told (metadata, 200) this long before a connection broke may not have been flushed
/// yet: twice the flush interval.
pub const TOLD_BEFORE_LOSS: Duration = Duration::from_secs(2);

/// Audio a user sent: one realtime session (frames `first..first + frames` of the stream that starts at
/// clip `start`), or one device file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audio {
    Session {
        start: usize,
        first: u64,
        frames: u64,
    },
    File(SentFile),
}

/// What one user sent and was told.
#[derive(Debug, Default, Clone)]
pub struct UserTraffic {
    pub user: String,
    /// Realtime sessions that ended with their metadata, and files of answered uploads that the server
    /// metered ([`Audio::Session`], [`Audio::File`]).
    pub told: Vec<Audio>,
    /// When each entry of `told` was told (only kept with `--survive-node-loss`).
    pub told_at: Vec<Option<Instant>>,
    /// Sessions whose connection broke before their metadata, and files of uploads never answered
    /// (`--survive-node-loss`).
    pub broken: Vec<Audio>,
    /// Σ `metadata.speech_ms` + Σ upload `speech_ms`.
    pub reported_ms: u64,
}

impl UserTraffic {
    pub fn tell(&mut self, audio: Audio, at: Option<Instant>) {
        self.told.push(audio);
        self.told_at.push(at);
    }
}

/// The node-loss judgement of one run (`--survive-node-loss`).
#[derive(Debug, Serialize, Default)]
pub struct NodeLoss {
    /// Sessions that broke before their metadata; files of uploads never answered.
    pub sessions_broken: usize,
    pub files_unanswered: usize,
    /// When connections broke, seconds after the check's first break (up to 20, distinct to 0.1 s).
    pub breaks_s: Vec<f64>,
    /// Σ over users of max(0, server − offline over everything sent): must be 0.
    pub doubled_ms: u64,
    /// Σ over users of max(0, offline over everything sent − server).
    pub lost_ms: u64,
    /// Σ over users of what a loss may cost: the bound `lost_ms` is judged against, per user.
    pub lost_bound_ms: u64,
    /// The largest loss of one user with broken sessions, per broken session.
    pub worst_lost_per_broken_session_ms: u64,
    /// Of the bound: broken sessions (each up to `BROKEN_SESSION_BOUND_MS`), unanswered files, and
    /// sessions and files told within `TOLD_BEFORE_LOSS` before a break.
    pub bound_broken_sessions_ms: u64,
    pub bound_unanswered_files_ms: u64,
    pub bound_told_before_loss_ms: u64,
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
    /// With `--survive-node-loss`: the node-loss judgement (then `server_vs_reported_abs_ms` and the offline
    /// comparison of what was reported are informative only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_loss: Option<NodeLoss>,
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

/// Runs the check. `breaks` is `Some` with `--survive-node-loss` (when connections broke, maybe none):
/// the node-loss judgement instead of the exact one.
pub async fn run(
    corpus: Arc<Corpus>,
    traffic: Vec<UserTraffic>,
    client: reqwest::Client,
    nodes: &Nodes,
    auth: &Authenticator,
    settle: Duration,
    breaks: Option<Vec<Instant>>,
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
    let survive = breaks.is_some();
    let deadline = Instant::now() + settle;
    let server: Vec<(Option<u64>, &'static str)> =
        futures_util::stream::iter(
            traffic.iter().zip(&offline).enumerate().map(|(k, (t, o))| {
                let client = client.clone();
                // User k's first stream went to node k (one stream per user): its status is read on the next
                // (and on the ones after it while that one does not answer: a node may be gone).
                // Exact: the server settles at what it reported. After a node's loss: at most everything sent.
                let target = if survive {
                    Settle::AtMost(o.told_ms + o.broken_ms)
                } else {
                    Settle::Exactly(t.reported_ms)
                };
                async move {
                    settled_status(&client, nodes, k + 1, auth, &t.user, target, deadline).await
                }
            }),
        )
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
    let mut loss = breaks.as_ref().map(|b| NodeLoss {
        breaks_s: distinct_offsets(b),
        ..NodeLoss::default()
    });
    for ((t, (server_ms, _)), o) in traffic.iter().zip(server).zip(&offline) {
        let offline_ms = o.told_ms + o.broken_ms;
        let diff = t.reported_ms.abs_diff(offline_ms);
        let ratio = if offline_ms == 0 {
            if diff == 0 { 0.0 } else { 1.0 }
        } else {
            diff as f64 / offline_ms as f64
        };
        let ok = match (&mut loss, &breaks) {
            (Some(loss), Some(breaks)) => {
                let server = server_ms.unwrap_or(0);
                let told_before_loss = o.told_before_loss_ms(t, breaks);
                let bound = o.broken_bound_ms + o.unanswered_ms + told_before_loss;
                let doubled = server.saturating_sub(offline_ms);
                let lost = offline_ms.saturating_sub(server);
                loss.sessions_broken += o.sessions_broken;
                loss.files_unanswered += o.files_unanswered;
                loss.doubled_ms += doubled;
                loss.lost_ms += lost;
                loss.lost_bound_ms += bound;
                if o.sessions_broken > 0 {
                    loss.worst_lost_per_broken_session_ms = loss
                        .worst_lost_per_broken_session_ms
                        .max(lost / o.sessions_broken as u64);
                }
                loss.bound_broken_sessions_ms += o.broken_bound_ms;
                loss.bound_unanswered_files_ms += o.unanswered_ms;
                loss.bound_told_before_loss_ms += told_before_loss;
                server_ms.is_some() && doubled == 0 && lost <= bound
            }
            _ => server_ms == Some(t.reported_ms) && ratio <= OFFLINE_TOLERANCE,
        };
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
    report.node_loss = loss;
    report.passed = report.users_failed == 0;
    report
}

/// The break times as seconds after the first, distinct to 0.1 s, at most 20.
fn distinct_offsets(breaks: &[Instant]) -> Vec<f64> {
    let Some(first) = breaks.iter().min() else {
        return Vec::new();
    };
    let mut tenths: Vec<u64> = breaks
        .iter()
        .map(|b| b.duration_since(*first).as_millis() as u64 / 100)
        .collect();
    tenths.sort_unstable();
    tenths.dedup();
    tenths.truncate(20);
    tenths.into_iter().map(|t| t as f64 / 10.0).collect()
}

/// What the status API must settle at.
#[derive(Clone, Copy)]
enum Settle {
    /// What was reported: re-read until equal (the meter may still be folding in a session's last second).
    Exactly(u64),
    /// At most this (everything sent, after a node's loss): re-read until equal, or until the value held
    /// still for [`STABLE`].
    AtMost(u64),
}

/// How long a value below everything sent must hold still to count as settled (flush and refresh
/// intervals are 1 s).
const STABLE: Duration = Duration::from_secs(4);

/// The user's metered speech, re-read until it settles (see [`Settle`]) or the deadline passes.
async fn settled_status(
    client: &reqwest::Client,
    nodes: &Nodes,
    mut node: usize,
    auth: &Authenticator,
    user: &str,
    target: Settle,
    deadline: Instant,
) -> (Option<u64>, &'static str) {
    let mut last = (None, "");
    let mut since = Instant::now();
    loop {
        match status(client, nodes.pick(node), auth, user).await {
            Ok(v) => {
                if v.0 != last.0 {
                    since = Instant::now();
                }
                last = v;
            }
            Err(_) => node += 1,
        }
        let settled = match target {
            Settle::Exactly(ms) => last.0 == Some(ms),
            Settle::AtMost(ms) => {
                last.0 == Some(ms) || (last.0.is_some() && since.elapsed() >= STABLE)
            }
        };
        if settled || Instant::now() >= deadline {
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

/// One user's offline speech, split as the judgements need it.
#[derive(Debug, Default)]
struct UserOffline {
    /// Σ over `told`.
    told_ms: u64,
    /// Each entry of `told`, in order.
    told_each: Vec<u64>,
    /// Σ over `broken`: sessions and unanswered files.
    broken_ms: u64,
    /// Σ over broken sessions of min(speech, `BROKEN_SESSION_BOUND_MS`).
    broken_bound_ms: u64,
    /// Σ over unanswered files.
    unanswered_ms: u64,
    sessions_broken: usize,
    files_unanswered: usize,
}

impl UserOffline {
    /// The speech of what was told within `TOLD_BEFORE_LOSS` before one of `breaks`.
    fn told_before_loss_ms(&self, t: &UserTraffic, breaks: &[Instant]) -> u64 {
        t.told_at
            .iter()
            .zip(&self.told_each)
            .filter(|(at, _)| {
                at.is_some_and(|at| {
                    breaks
                        .iter()
                        .any(|b| *b >= at && b.duration_since(at) <= TOLD_BEFORE_LOSS)
                })
            })
            .map(|(_, ms)| ms)
            .sum()
    }
}

/// Offline speech per user. Identical audio (same start clip and length, or the same file) is analysed
/// once: at a fixed duration most streams send one of a dozen sequences.
fn offline_per_user(corpus: &Corpus, traffic: &[UserTraffic]) -> Result<Vec<UserOffline>, String> {
    let model = SileroModel::shared().map_err(|e| e.to_string())?;
    let cfg = PipelineConfig::default();
    let unique: HashSet<Audio> = traffic
        .iter()
        .flat_map(|t| t.told.iter().chain(&t.broken).copied())
        .collect();
    let unique: Vec<Audio> = unique.into_iter().collect();
    let results: Result<HashMap<Audio, u64>, String> = unique
        .par_iter()
        .map(|&a| {
            let ms = match a {
                Audio::Session {
                    start,
                    first,
                    frames,
                } => session_speech_ms(corpus, start, first, frames, &cfg, model.clone())?,
                Audio::File(f) => file_speech_ms(corpus, f, &cfg)?,
            };
            Ok((a, ms))
        })
        .collect();
    let results = results?;
    Ok(traffic
        .iter()
        .map(|t| {
            let told_each: Vec<u64> = t.told.iter().map(|a| results[a]).collect();
            let mut o = UserOffline {
                told_ms: told_each.iter().sum(),
                told_each,
                ..UserOffline::default()
            };
            for a in &t.broken {
                let ms = results[a];
                o.broken_ms += ms;
                match a {
                    Audio::Session { .. } => {
                        o.sessions_broken += 1;
                        o.broken_bound_ms += ms.min(BROKEN_SESSION_BOUND_MS);
                    }
                    Audio::File(_) => {
                        o.files_unanswered += 1;
                        o.unanswered_ms += ms;
                    }
                }
            }
            o
        })
        .collect())
}

/// The speech the engine's pipeline finds in frames `first..first + frames` of the stream that starts at
/// clip `start` (one session's audio).
pub fn session_speech_ms(
    corpus: &Corpus,
    start: usize,
    first: u64,
    frames: u64,
    cfg: &PipelineConfig,
    model: Arc<SileroModel>,
) -> Result<u64, String> {
    let codec = Codec::opus(TARGET_RATE).ok_or("no 16 kHz opus codec")?;
    let mut p = SpeechPipeline::for_codec(codec, cfg, model).map_err(|e| e.to_string())?;
    let mut events = Vec::new();
    for n in first..first + frames {
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
