//! The sync scenario: uploaders, each a distinct user, posting device files to `/v1/sync-local-files`
//! (or, with `--v2`, to `/v2/sync-local-files`, polling each job until it ends: its `result` is v1's body).
//!
//! Upload `i` of an uploader carries clip `(uploader + i) % clips` without its first `i / clips` packets,
//! so no user ever uploads the same bytes twice (the server meters a content hash once) and the check can
//! rebuild every file from `(clip, skip)`. File names are Omi device names stamped in the recent past,
//! one recording after the other.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::{Authenticator, unix_now};
use crate::cli::Nodes;
use crate::corpus::Corpus;
use crate::live::Live;

pub struct SyncCtx {
    pub corpus: Arc<Corpus>,
    pub client: reqwest::Client,
    pub nodes: Nodes,
    /// The number of the first uploader's user: uploader u is user `first_user + u` and sends its round r
    /// to node `first_user + u + r + 1` (a user's realtime streams start on node `first_user + u`).
    pub first_user: usize,
    pub auth: Authenticator,
    pub files: usize,
    pub rounds: usize,
    pub request_timeout: Duration,
    /// Through v2 (a job, polled) instead of v1.
    pub v2: bool,
    /// With v2: submit every round at once, then poll the jobs at the server's `poll_after_ms`.
    pub pipeline: bool,
    /// Files named this many days old (`--backdate-days`), refusals of the backfill allowance expected.
    pub backdate_days: Option<(u64, u64)>,
    /// Between the starts of an uploader's rounds (`--round-interval`; zero: back to back).
    pub round_interval: Duration,
    /// `--survive-node-loss`: an upload that got no answer is sent again until answered.
    pub survive_node_loss: bool,
    pub live: Arc<Live>,
}

/// One file the uploader sent, enough to rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SentFile {
    pub clip: usize,
    pub skip: usize,
}

#[derive(Debug, Default)]
pub struct UploaderOutcome {
    pub user: String,
    /// Files of requests the server answered 200/207 (those it may have metered).
    pub files_sent: Vec<SentFile>,
    /// When each of `files_sent` was answered.
    pub files_told_at: Vec<Instant>,
    /// With `--survive-node-loss`: files of uploads never answered (the server may have metered them),
    /// uploads sent again, and when an upload's connection failed.
    pub files_unanswered: Vec<SentFile>,
    pub retries: u64,
    pub breaks: Vec<Instant>,
    pub requests_ok: u64,
    pub files_ok: u64,
    pub files_failed: u64,
    pub audio_ms_ok: u64,
    /// Sum of the responses' `speech_ms`.
    pub speech_ms: u64,
    pub latencies_us: Vec<u64>,
    pub errors: Vec<String>,
    /// With `--pipeline`: when the server finished this uploader's last job (its `finished_at_ms`).
    pub last_finished_unix_ms: Option<u64>,
    /// With `--backdate-days`: uploads refused whole, and files refused in answered uploads, for the
    /// backfill allowance (`backfill_allowance_exhausted`).
    pub refused_uploads: u64,
    pub refused_files: u64,
}

/// The refusal `--backdate-days` expects once the day's backfill allowance is spent.
pub const BACKFILL_REFUSAL: &str = "backfill_allowance_exhausted";

#[derive(Deserialize)]
struct SyncResponse {
    /// A refusal's code (v1 answers 429 `backfill_allowance_exhausted` with the files' results).
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    speech_ms: u64,
    #[serde(default)]
    files: Vec<FileResult>,
}

#[derive(Deserialize)]
struct FileResult {
    /// The failure's stable code (`status: failed`).
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

pub fn device_file_name(ts: u64) -> String {
    format!("audio_omi_opus_16000_1_fs160_{ts}.bin")
}

/// One round's request body: its files, what was sent, and their audio.
fn round_form(
    ctx: &SyncCtx,
    index: usize,
    round: usize,
    first_ts: u64,
) -> (Form, Vec<SentFile>, u64) {
    let clips = ctx.corpus.clips.len();
    let mut form = Form::new();
    let mut batch = Vec::with_capacity(ctx.files);
    let mut audio_ms = 0;
    for k in 0..ctx.files {
        let i = round * ctx.files + k;
        let file = SentFile {
            clip: (index + i) % clips,
            skip: i / clips,
        };
        let (bytes, ms) = ctx.corpus.device_file(file.clip, file.skip);
        audio_ms += ms;
        let len = bytes.len() as u64;
        let ts = match ctx.backdate_days {
            // Spread over the range; later within its day (never past the range's oldest day).
            Some((lo, hi)) => {
                let days = lo + (i as u64 * 7) % (hi - lo + 1);
                unix_now().saturating_sub(days * 86_400) + (i as u64 % 3_600)
            }
            None => first_ts + 45 * i as u64,
        };
        let part = Part::stream_with_length(reqwest::Body::from(bytes), len)
            .file_name(device_file_name(ts));
        form = form.part("files", part);
        batch.push(file);
    }
    (form, batch, audio_ms)
}

/// Counts one answered upload (v1's body, or a v2 job's `result`) into the outcome.
fn record_answer(
    ctx: &SyncCtx,
    out: &mut UploaderOutcome,
    resp: SyncResponse,
    batch: Vec<SentFile>,
    audio_ms: u64,
    latency_us: u64,
) {
    out.latencies_us.push(latency_us);
    if resp.code.as_deref() == Some(BACKFILL_REFUSAL) {
        // Refused past the allowance; the files that fitted before it ran out were metered.
        out.refused_uploads += 1;
    } else {
        out.requests_ok += 1;
        out.audio_ms_ok += audio_ms;
    }
    out.speech_ms += resp.speech_ms;
    let answered = resp.files.len();
    if answered != batch.len() {
        out.errors.push("upload_file_count_mismatch".into());
        ctx.live.errors.fetch_add(1, Relaxed);
    }
    ctx.live.files_done.fetch_add(answered as u64, Relaxed);
    for (i, file) in batch.into_iter().enumerate() {
        let result = resp.files.get(i);
        let code = match result.and_then(|f| f.error.as_ref()) {
            None => {
                out.files_ok += 1;
                // Only what the server metered is expected by the accounting check.
                out.files_sent.push(file);
                out.files_told_at.push(Instant::now());
                continue;
            }
            Some(_) if result.and_then(|f| f.code.as_ref()).is_some() => {
                result.and_then(|f| f.code.clone()).unwrap_or_default()
            }
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => o
                .get("code")
                .and_then(|c| c.as_str())
                .unwrap_or("unknown")
                .to_owned(),
            Some(_) => "unknown".into(),
        };
        if ctx.backdate_days.is_some() && code == BACKFILL_REFUSAL {
            out.refused_files += 1;
            continue;
        }
        out.files_failed += 1;
        out.errors.push(format!("file_{code}"));
        ctx.live.errors.fetch_add(1, Relaxed);
    }
}

/// Runs one uploader's rounds one after the other (or, with `--pipeline`, submits them all and then
/// polls the jobs).
pub async fn run_uploader(ctx: Arc<SyncCtx>, index: usize, user: String) -> UploaderOutcome {
    let mut out = UploaderOutcome {
        user,
        ..UploaderOutcome::default()
    };
    let total = ctx.files * ctx.rounds;
    // Recordings end a minute ago, 45 s apart (about one fixture each).
    let first_ts = unix_now().saturating_sub(60 + 45 * total as u64);
    let header = match ctx.auth.header(&out.user) {
        Ok(h) => h,
        Err(e) => {
            out.errors.push(e);
            ctx.live.errors.fetch_add(1, Relaxed);
            return out;
        }
    };
    if ctx.v2 && ctx.pipeline {
        run_pipelined(&ctx, index, first_ts, &header, &mut out).await;
        return out;
    }
    let rounds_started = Instant::now();
    for round in 0..ctx.rounds {
        if !ctx.round_interval.is_zero() {
            tokio::time::sleep_until(rounds_started + ctx.round_interval * round as u32).await;
        }
        let started = Instant::now();
        let mut backoff = RESEND_FIRST;
        let mut attempt = 0;
        let (result, batch, audio_ms) = loop {
            // The same files each time (names and bytes depend only on the round): a resend is a retry.
            let (form, batch, audio_ms) = round_form(&ctx, index, round, first_ts);
            let node = ctx.nodes.pick(ctx.first_user + index + round + 1 + attempt);
            let result = upload(&ctx, node, header.clone(), form).await;
            match result {
                Err(kind)
                    if ctx.survive_node_loss
                        && unanswered(&kind)
                        && started.elapsed() + backoff < ctx.request_timeout =>
                {
                    // A connection that broke under the request: the node may have died just now (a
                    // refused connect comes later, while it is down).
                    if kind == "request_failed" {
                        out.breaks.push(Instant::now());
                    }
                    out.retries += 1;
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESEND_MAX);
                }
                // A resend refused because the user's earlier attempts still hold their places on the
                // server (an upload the client gave up on runs to its end there): retryable, after the
                // refusal's Retry-After (5 s), as the app does.
                Err(kind)
                    if ctx.survive_node_loss
                        && attempt > 0
                        && kind == "upload_http_429_too_many_uploads"
                        && started.elapsed() + TOO_MANY_UPLOADS_RETRY < ctx.request_timeout =>
                {
                    out.retries += 1;
                    attempt += 1;
                    tokio::time::sleep(TOO_MANY_UPLOADS_RETRY).await;
                }
                result => break (result, batch, audio_ms),
            }
        };
        ctx.live.uploads_done.fetch_add(1, Relaxed);
        match result {
            Ok(resp) => {
                let us = started.elapsed().as_micros() as u64;
                record_answer(&ctx, &mut out, resp, batch, audio_ms, us);
            }
            Err(kind) => {
                if ctx.survive_node_loss {
                    out.files_unanswered.extend(batch);
                }
                out.errors.push(kind);
                ctx.live.errors.fetch_add(1, Relaxed);
            }
        }
    }
    out
}

/// First wait before an unanswered upload is sent again (`--survive-node-loss`), doubled per attempt up
/// to the next.
const RESEND_FIRST: Duration = Duration::from_millis(500);
const RESEND_MAX: Duration = Duration::from_secs(5);
/// The `Retry-After` of a 429 `too_many_uploads` (`server/src/upload_slots.rs`).
const TOO_MANY_UPLOADS_RETRY: Duration = Duration::from_secs(5);

/// Whether a failed upload's error kind means the server gave no answer about the files (connection
/// lost or refused, timeout, the node draining or its store unavailable), so sending them again is how a
/// client learns their fate; a refusal with a code (a 4xx) is an answer.
fn unanswered(kind: &str) -> bool {
    matches!(
        kind,
        "connect_failed" | "request_failed" | "request_timeout" | "upload_unparsable_response"
    ) || kind.starts_with("upload_http_5")
        || kind.starts_with("upload_http_408")
}

/// A submitted v2 job the pipelined uploader still polls.
struct Pending<'a> {
    node: &'a str,
    id: String,
    batch: Vec<SentFile>,
    audio_ms: u64,
    submitted_unix_ms: u64,
}

/// `--pipeline`: what an app does with v2. Every round is submitted as soon as the previous one is
/// accepted (202), then the open jobs are polled every `poll_after_ms` the server asks for. A job's latency
/// is from its submission to the server's `finished_at_ms` (not to the poll that saw it), and the run's
/// wall time ends at the last `finished_at_ms`, so the 3-s polling does not blur the throughput.
async fn run_pipelined(
    ctx: &SyncCtx,
    index: usize,
    first_ts: u64,
    header: &str,
    out: &mut UploaderOutcome,
) {
    let deadline = Instant::now() + ctx.request_timeout;
    let mut pending = Vec::with_capacity(ctx.rounds);
    let mut poll_after = POLL;
    for round in 0..ctx.rounds {
        let (form, batch, audio_ms) = round_form(ctx, index, round, first_ts);
        let node = ctx.nodes.pick(ctx.first_user + index + round + 1);
        let submitted_unix_ms = unix_now_ms();
        match submit_v2(ctx, node, header, form).await {
            Ok((id, after)) => {
                poll_after = after;
                pending.push(Pending {
                    node,
                    id,
                    batch,
                    audio_ms,
                    submitted_unix_ms,
                });
            }
            Err(kind) => {
                ctx.live.uploads_done.fetch_add(1, Relaxed);
                out.errors.push(kind);
                ctx.live.errors.fetch_add(1, Relaxed);
            }
        }
    }
    while !pending.is_empty() {
        if Instant::now() > deadline {
            for _ in pending.drain(..) {
                out.errors.push("request_timeout".into());
                ctx.live.errors.fetch_add(1, Relaxed);
            }
            break;
        }
        tokio::time::sleep(poll_after).await;
        let mut still = Vec::with_capacity(pending.len());
        for p in pending {
            match poll_v2(ctx, p.node, header, &p.id).await {
                Ok(None) => still.push(p),
                Ok(Some((resp, finished_unix_ms))) => {
                    ctx.live.uploads_done.fetch_add(1, Relaxed);
                    let us = finished_unix_ms.saturating_sub(p.submitted_unix_ms) * 1_000;
                    out.last_finished_unix_ms =
                        out.last_finished_unix_ms.max(Some(finished_unix_ms));
                    record_answer(ctx, out, resp, p.batch, p.audio_ms, us);
                }
                Err(kind) => {
                    ctx.live.uploads_done.fetch_add(1, Relaxed);
                    out.errors.push(kind);
                    ctx.live.errors.fetch_add(1, Relaxed);
                }
            }
        }
        pending = still;
    }
}

/// Milliseconds since the epoch (the clock the server's `finished_at_ms` uses, on the same machine).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn upload(
    ctx: &SyncCtx,
    node: &str,
    header: String,
    form: Form,
) -> Result<SyncResponse, String> {
    if ctx.v2 {
        return upload_v2(ctx, node, header, form).await;
    }
    let resp = ctx
        .client
        .post(format!("{node}/v1/sync-local-files"))
        .header(reqwest::header::AUTHORIZATION, header.as_str())
        .multipart(form)
        .timeout(ctx.request_timeout)
        .send()
        .await
        .map_err(|e| request_error_kind(&e))?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| request_error_kind(&e))?;
    if status == 429 {
        // The backfill allowance ran out: the body still reports every file (what fitted was metered;
        // without `--backdate-days` the refused files count as errors, the metered ones are checked).
        if let Ok(resp) = serde_json::from_slice::<SyncResponse>(&body)
            && resp.code.as_deref() == Some(BACKFILL_REFUSAL)
        {
            return Ok(resp);
        }
    }
    if status == 202 {
        // Not settled within the server's v1 wait (or its run stopped, e.g. on a store error): the job goes
        // on (here or on another node) and the app follows it on v2 (`docs/api.md`).
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["job_id"].as_str().map(str::to_owned))
            .ok_or_else(|| "upload_no_job_id".to_owned())?;
        return follow_job(ctx, node, &header, &id).await;
    }
    if status != 200 && status != 207 {
        // The refusal's code names the kind (`upload_http_429_fair_use_restricted`).
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        return Err(match code {
            Some(code) => format!("upload_http_{status}_{code}"),
            None => format!("upload_http_{status}"),
        });
    }
    serde_json::from_slice(&body).map_err(|_| "upload_unparsable_response".to_owned())
}

/// How often a v2 job is polled (a real client polls every `poll_after_ms`, 3 s; every 50 ms cost the
/// server 5 % more CPU per audio second in the 20-uploader run).
const POLL: Duration = Duration::from_millis(200);

/// A v2 upload: 202, then the job polled every 200 ms until it ends (within the request timeout).
async fn upload_v2(
    ctx: &SyncCtx,
    node: &str,
    header: String,
    form: Form,
) -> Result<SyncResponse, String> {
    let (id, _) = submit_v2(ctx, node, &header, form).await?;
    follow_job(ctx, node, &header, &id).await
}

/// A job polled every 200 ms until it ends (within the request timeout).
async fn follow_job(
    ctx: &SyncCtx,
    node: &str,
    header: &str,
    id: &str,
) -> Result<SyncResponse, String> {
    let deadline = Instant::now() + ctx.request_timeout;
    loop {
        if Instant::now() > deadline {
            return Err("request_timeout".into());
        }
        tokio::time::sleep(POLL).await;
        if let Some((resp, _)) = poll_v2(ctx, node, header, id).await? {
            return Ok(resp);
        }
    }
}

/// `POST /v2/sync-local-files`: the job's id and the `poll_after_ms` the server asks for.
async fn submit_v2(
    ctx: &SyncCtx,
    node: &str,
    header: &str,
    form: Form,
) -> Result<(String, Duration), String> {
    let resp = ctx
        .client
        .post(format!("{node}/v2/sync-local-files"))
        .header(reqwest::header::AUTHORIZATION, header)
        .multipart(form)
        .timeout(ctx.request_timeout)
        .send()
        .await
        .map_err(|e| request_error_kind(&e))?;
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|_| "upload_unparsable_response".to_owned())?;
    if status != 202 {
        return Err(format!("upload_http_{status}"));
    }
    let id = body["job_id"]
        .as_str()
        .ok_or_else(|| "upload_no_job_id".to_owned())?
        .to_owned();
    let after = body["poll_after_ms"]
        .as_u64()
        .map_or(POLL, Duration::from_millis);
    Ok((id, after))
}

/// One status read: `None` while the job runs, its `result` and `finished_at_ms` once it ended.
async fn poll_v2(
    ctx: &SyncCtx,
    node: &str,
    header: &str,
    id: &str,
) -> Result<Option<(SyncResponse, u64)>, String> {
    let resp = ctx
        .client
        .get(format!("{node}/v2/sync-local-files/{id}"))
        .header(reqwest::header::AUTHORIZATION, header)
        .timeout(ctx.request_timeout)
        .send()
        .await
        .map_err(|e| request_error_kind(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("job_poll_http_{status}"));
    }
    let job: serde_json::Value = resp
        .json()
        .await
        .map_err(|_| "job_unparsable_response".to_owned())?;
    match job["status"].as_str() {
        Some("completed" | "partial_failure") => {
            let finished = job["finished_at_ms"].as_u64().unwrap_or_else(unix_now_ms);
            serde_json::from_value(job["result"].clone())
                .map(|r| Some((r, finished)))
                .map_err(|_| "job_unparsable_result".to_owned())
        }
        Some("failed") => {
            let code = job["error"]["code"].as_str().unwrap_or("files_failed");
            Err(format!("job_failed_{code}"))
        }
        _ => Ok(None),
    }
}

pub fn request_error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "request_timeout".into()
    } else if e.is_connect() {
        "connect_failed".into()
    } else {
        "request_failed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voicegate_engine::audio::filename::parse_sync_name;

    #[test]
    fn device_file_names_parse_as_omi_opus_16k() {
        let now = unix_now();
        let (spec, ts_ms) = parse_sync_name(&device_file_name(now - 100), now).unwrap();
        assert_eq!(spec.codec.sample_rate(), 16_000);
        assert!(spec.codec.is_opus());
        assert_eq!(ts_ms, (now - 100) * 1000);
    }
}
