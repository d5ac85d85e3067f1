//! The retry storm (`--retry-storm N`, beside any scenario): clients that retry a refused sync upload
//! immediately, to show what a refusal costs the server while real traffic runs.
//!
//! - Arming, before the scenario's traffic: each storm client is a user of its own (`{prefix}storm{k}`),
//!   set to the fair-use **restrict** stage through the admin API, then given fresh device files through
//!   `POST /v1/sync-local-files` (1, 2, 4, … 16 per upload) until an upload is refused 429
//!   `fair_use_restricted`: restricted and over a cap, whatever the server's caps are (a low cap keeps
//!   this short). Then the storm's own request (a fixed body of `--storm-files` fresh files, re-sent as
//!   is, as a retrying device re-sends its file) must be refused 429 `fair_use_restricted` too, or the
//!   run stops (exit code 3).
//! - The storm, `--storm-after` seconds into the scenario: every client sends its request `N` times, each
//!   as soon as the previous answer arrived, on one keep-alive connection (reopened only when the server
//!   closes it; the report counts connections). Every answer must be 429 `fair_use_restricted`; anything
//!   else is counted by kind and fails the run.
//! - The server's CPU over the storm window, with `--server-pid` (`VOICEGATE_SERVER_PID`, which
//!   `measure.sh` exports): the sum of its threads' on-CPU time (`/proc/<pid>/task/*/schedstat`, ns),
//!   so the CPU per refusal is not limited by 10 ms clock ticks. It is all the server did in the window:
//!   clean only when nothing else runs (`realtime --streams 0`).
//!
//! The arming uploads are metered; the storm users join the accounting check with them, so the check
//! also proves that the refused retries metered nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::{Authenticator, unix_now};
use crate::cli::Nodes;
use crate::corpus::Corpus;
use crate::http1;
use crate::report::{StormReport, quantiles};
use crate::sync::{SentFile, device_file_name};

/// The refusal the storm must get, and only it.
pub const REFUSAL_CODE: &str = "fair_use_restricted";
/// Files uploaded while arming before giving up: ~128 min of audio, ~61 min of speech (14 s a fixture on
/// average), under the default daily cap of 120 min; the error then says to lower the cap.
const MAX_ARMING_FILES: usize = 256;
/// Largest arming upload, in files.
const MAX_ARMING_BATCH: usize = 16;
const MULTIPART_BOUNDARY: &str = "voicegate-loadtest-storm-8f3a";

pub struct StormCtx {
    pub corpus: Arc<Corpus>,
    pub nodes: Nodes,
    pub auth: Authenticator,
    pub admin_key: String,
    pub prefix: String,
    pub clients: usize,
    pub files: usize,
    pub timeout: Duration,
}

/// What arming one user took.
#[derive(Debug, Default, Clone)]
pub struct Arming {
    pub user: String,
    pub uploads: u64,
    /// The files the server accepted (and metered).
    pub files: Vec<SentFile>,
    /// Σ upload `speech_ms`: at least the cap that refuses the user.
    pub speech_ms: u64,
    /// Σ `speech_ms` before the last accepted upload: below that cap.
    pub speech_before_last_ms: u64,
    /// `Retry-After` of the storm request's first refusal.
    pub retry_after_s: Option<u64>,
}

/// A storm client ready to fire: its user restricted over a cap, its request refused once.
pub struct Armed {
    pub arming: Arming,
    client: http1::Client,
    request: Vec<u8>,
}

impl Armed {
    pub fn request_bytes(&self) -> usize {
        self.request.len()
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    speech_ms: u64,
}

fn answer(resp: &http1::Response) -> Answer {
    serde_json::from_slice(&resp.body).unwrap_or(Answer {
        code: None,
        speech_ms: 0,
    })
}

/// `None` for the refusal the storm wants, else the answer's kind for the report.
fn refusal_miss(resp: &http1::Response) -> Option<String> {
    match (resp.status, answer(resp).code) {
        (429, Some(code)) if code == REFUSAL_CODE => None,
        (status, Some(code)) => Some(format!("http_{status}_{code}")),
        (status, None) => Some(format!("http_{status}")),
    }
}

/// A multipart body of `files` under the `files` field, and its content type.
fn multipart(files: &[(String, bytes::Bytes)]) -> (String, Vec<u8>) {
    let mut body = Vec::with_capacity(files.iter().map(|(_, b)| b.len() + 200).sum());
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{MULTIPART_BOUNDARY}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={MULTIPART_BOUNDARY}"),
        body,
    )
}

/// Device files `first..first + n` of a user: file `j` is clip `j % clips` without its first `j / clips`
/// packets (content distinct per file), recorded 45 s apart back from two minutes ago.
fn device_files(
    corpus: &Corpus,
    first: usize,
    n: usize,
    newest_ts: u64,
) -> Vec<(SentFile, String, bytes::Bytes)> {
    let clips = corpus.clips.len();
    (first..first + n)
        .map(|j| {
            let file = SentFile {
                clip: j % clips,
                skip: j / clips,
            };
            let (bytes, _) = corpus.device_file(file.clip, file.skip);
            let name = device_file_name(newest_ts.saturating_sub(45 * j as u64));
            (file, name, bytes)
        })
        .collect()
}

fn upload_request(
    authority: &str,
    header: &str,
    files: &[(SentFile, String, bytes::Bytes)],
) -> Vec<u8> {
    let named: Vec<(String, bytes::Bytes)> = files
        .iter()
        .map(|(_, n, b)| (n.clone(), b.clone()))
        .collect();
    let (content_type, body) = multipart(&named);
    http1::request(
        "POST",
        authority,
        "/v1/sync-local-files",
        &[("Authorization", header), ("Content-Type", &content_type)],
        &body,
    )
}

/// Arms every storm client, one after the other; an error says what the server must be given.
pub async fn arm(ctx: &StormCtx) -> Result<Vec<Armed>, String> {
    let mut armed = Vec::with_capacity(ctx.clients);
    for k in 0..ctx.clients {
        armed.push(arm_client(ctx, k).await?);
    }
    Ok(armed)
}

async fn arm_client(ctx: &StormCtx, k: usize) -> Result<Armed, String> {
    let user = format!("{}storm{k}", ctx.prefix);
    let authority = http1::authority(ctx.nodes.pick(k))?;
    let mut client = http1::Client::new(authority.clone(), ctx.timeout);
    let header = ctx.auth.header(&user)?;
    restrict(&mut client, &ctx.admin_key, &user).await?;

    let newest_ts = unix_now().saturating_sub(120);
    let mut arming = Arming {
        user: user.clone(),
        ..Arming::default()
    };
    let mut batch = 1;
    loop {
        let sent = arming.files.len();
        if sent >= MAX_ARMING_FILES {
            return Err(format!(
                "retry storm: {user} restricted and still admitted after {sent} files ({} ms of speech): \
                 the server's fair-use caps are above that; lower them (e.g. FAIR_USE_DAILY_SPEECH_MS=300000)",
                arming.speech_ms
            ));
        }
        let files = device_files(&ctx.corpus, sent, batch, newest_ts);
        let resp = client
            .send(&upload_request(&authority, &header, &files))
            .await
            .map_err(|kind| format!("retry storm: arming upload for {user} failed: {kind}"))?;
        match resp.status {
            200 | 207 => {
                arming.uploads += 1;
                arming.speech_before_last_ms = arming.speech_ms;
                arming.speech_ms += answer(&resp).speech_ms;
                arming.files.extend(files.into_iter().map(|(f, _, _)| f));
                batch = (batch * 2).min(MAX_ARMING_BATCH);
            }
            _ => match refusal_miss(&resp) {
                None => break,
                Some(kind) => {
                    return Err(format!(
                        "retry storm: arming upload for {user} answered {kind}: {}",
                        String::from_utf8_lossy(&resp.body)
                    ));
                }
            },
        }
    }

    // The storm's own request: fresh files, never metered, refused before its body is read.
    let files = device_files(&ctx.corpus, arming.files.len(), ctx.files.max(1), newest_ts);
    let request = upload_request(&authority, &header, &files);
    let first = client
        .send(&request)
        .await
        .map_err(|kind| format!("retry storm: the first storm request of {user} failed: {kind}"))?;
    if let Some(kind) = refusal_miss(&first) {
        return Err(format!(
            "retry storm: the first storm request of {user} was answered {kind}, not 429 {REFUSAL_CODE}: {}",
            String::from_utf8_lossy(&first.body)
        ));
    }
    arming.retry_after_s = first.retry_after_s;
    Ok(Armed {
        arming,
        client,
        request,
    })
}

async fn restrict(client: &mut http1::Client, admin_key: &str, user: &str) -> Result<(), String> {
    let req = http1::request(
        "POST",
        client.authority(),
        &format!("/v1/admin/fair-use/user/{user}/set-stage?stage=restrict"),
        &[("X-Admin-Key", admin_key)],
        b"",
    );
    let resp = client
        .send(&req)
        .await
        .map_err(|kind| format!("retry storm: set-stage for {user} failed: {kind}"))?;
    if resp.status != 200 {
        return Err(format!(
            "retry storm: set-stage restrict for {user} answered {}{}: {}",
            resp.status,
            if resp.status == 403 {
                " (start the server with ADMIN_KEY and give the harness the same key, --admin-key or ADMIN_KEY)"
            } else {
                ""
            },
            String::from_utf8_lossy(&resp.body)
        ));
    }
    Ok(())
}

/// One storm client's retries.
#[derive(Debug, Default)]
struct Fired {
    refusals: u64,
    other: Vec<String>,
    latencies_us: Vec<u64>,
    connections: u64,
}

/// What the storm did; `arming` per client, in order.
#[derive(Debug)]
pub struct StormOutcome {
    pub arming: Vec<Arming>,
    pub report: StormReport,
}

/// Fires `retries` immediate retries from every armed client at once and measures the window
/// (`started_after_s` counts from `scenario_started`).
pub async fn fire(
    armed: Vec<Armed>,
    retries: u64,
    files: usize,
    server_pid: Option<u32>,
    scenario_started: Instant,
) -> StormOutcome {
    let clients = armed.len();
    let request_bytes = armed.first().map_or(0, |a| a.request_bytes());
    let cpu_before = server_pid.and_then(server_cpu_ns);
    let started = Instant::now();
    let handles: Vec<_> = armed
        .into_iter()
        .map(|a| tokio::spawn(fire_client(a, retries)))
        .collect();
    let mut arming = Vec::with_capacity(clients);
    let mut fired = Vec::with_capacity(clients);
    for h in handles {
        match h.await {
            Ok((a, f)) => {
                arming.push(a);
                fired.push(f);
            }
            Err(_) => fired.push(Fired {
                other: vec!["task_panicked".into()],
                ..Fired::default()
            }),
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_after = server_pid.and_then(server_cpu_ns);
    let refusals: u64 = fired.iter().map(|f| f.refusals).sum();
    let mut other_answers = BTreeMap::new();
    for kind in fired.iter().flat_map(|f| f.other.iter()) {
        *other_answers.entry(kind.clone()).or_insert(0) += 1;
    }
    let server_cpu_s = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9),
        _ => None,
    };
    let report = StormReport {
        clients,
        retries_per_client: retries,
        files_per_request: files,
        request_bytes: request_bytes as u64,
        arming_uploads: arming.iter().map(|a| a.uploads).sum(),
        arming_files: arming.iter().map(|a| a.files.len() as u64).sum(),
        cap_above_ms: arming
            .iter()
            .map(|a| a.speech_before_last_ms)
            .max()
            .unwrap_or(0),
        cap_at_most_ms: arming.iter().map(|a| a.speech_ms).min().unwrap_or(0),
        first_retry_after_s: arming.first().and_then(|a| a.retry_after_s),
        started_after_s: started.duration_since(scenario_started).as_secs_f64(),
        answers: fired.iter().map(|f| f.latencies_us.len() as u64).sum(),
        refusals,
        other_answers,
        connections: fired.iter().map(|f| f.connections).sum(),
        latency: quantiles(fired.iter().flat_map(|f| f.latencies_us.iter())),
        wall_s,
        refusals_per_s: refusals as f64 / wall_s.max(1e-9),
        server_pid,
        server_cpu_s,
        server_cpu_us_per_refusal: server_cpu_s
            .filter(|_| refusals > 0)
            .map(|s| s * 1e6 / refusals as f64),
    };
    StormOutcome { arming, report }
}

async fn fire_client(mut a: Armed, retries: u64) -> (Arming, Fired) {
    let mut f = Fired {
        latencies_us: Vec::with_capacity(retries as usize),
        ..Fired::default()
    };
    let connections_before = a.client.connections;
    for _ in 0..retries {
        let sent = Instant::now();
        match a.client.send(&a.request).await {
            Ok(resp) => {
                f.latencies_us.push(sent.elapsed().as_micros() as u64);
                match refusal_miss(&resp) {
                    None => f.refusals += 1,
                    Some(kind) => f.other.push(format!("storm_{kind}")),
                }
            }
            Err(kind) => f.other.push(format!("storm_{kind}")),
        }
    }
    f.connections = a.client.connections - connections_before;
    (a.arming, f)
}

/// The on-CPU time of every thread of `pid` so far, ns (`/proc/<pid>/task/*/schedstat`, first field).
/// Threads that ended are not counted: the server's threads live as long as it does.
pub fn server_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> http1::Response {
        http1::Response {
            status,
            body: body.as_bytes().to_vec(),
            retry_after_s: None,
        }
    }

    #[test]
    fn only_a_429_fair_use_restricted_is_the_refusal() {
        assert_eq!(
            refusal_miss(&resp(429, r#"{"code":"fair_use_restricted"}"#)),
            None
        );
        assert_eq!(
            refusal_miss(&resp(429, r#"{"code":"too_many_uploads"}"#)).as_deref(),
            Some("http_429_too_many_uploads")
        );
        assert_eq!(
            refusal_miss(&resp(200, r#"{"speech_ms":5}"#)).as_deref(),
            Some("http_200")
        );
        assert_eq!(
            refusal_miss(&resp(502, "<html>")).as_deref(),
            Some("http_502")
        );
    }

    #[test]
    fn own_cpu_time_reads_and_grows() {
        let pid = std::process::id();
        let before = server_cpu_ns(pid).unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(server_cpu_ns(pid).unwrap() > before);
    }

    #[test]
    fn multipart_bodies_frame_every_file() {
        let (ct, body) = multipart(&[
            ("a.bin".into(), bytes::Bytes::from_static(b"AA")),
            ("b.bin".into(), bytes::Bytes::from_static(b"BB")),
        ]);
        assert!(ct.ends_with(MULTIPART_BOUNDARY));
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.matches("name=\"files\"").count(), 2);
        assert!(text.contains(
            "filename=\"b.bin\"\r\nContent-Type: application/octet-stream\r\n\r\nBB\r\n"
        ));
        assert!(text.ends_with(&format!("--{MULTIPART_BOUNDARY}--\r\n")));
    }
}
