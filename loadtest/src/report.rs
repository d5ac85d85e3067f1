//! The end-of-run report: JSON (`--json`) and a human table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::check::CheckReport;

/// Latency quantiles in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Quantiles of microsecond samples (3 significant figures, up to an hour).
pub fn quantiles<'a>(samples: impl IntoIterator<Item = &'a u64>) -> Quantiles {
    let Ok(mut h) = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) else {
        return Quantiles::default();
    };
    for &v in samples {
        h.saturating_record(v.max(1));
    }
    if h.is_empty() {
        return Quantiles::default();
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    Quantiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p95_ms: ms(h.value_at_quantile(0.95)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1_000.0,
    }
}

#[derive(Debug, Default, Serialize)]
pub struct RealtimeReport {
    pub streams: usize,
    pub pace: f64,
    pub duration_s: f64,
    pub streams_connected: usize,
    /// Connected, sent every frame, got `metadata`, no error.
    pub streams_held: usize,
    pub peak_concurrent: usize,
    pub frames_sent: u64,
    /// Σ final `metadata.frames_received`.
    pub frames_acknowledged: u64,
    /// Sent but not acknowledged (streams with metadata only).
    pub frames_lost: u64,
    /// Σ `metadata.frames_dropped` (the server's ring buffer overflowed).
    pub frames_dropped: u64,
    /// `--survive-node-loss`: sessions whose connection broke before their metadata (the stream went on
    /// in a new one), the frames they carried, and connection attempts that failed and were tried again.
    pub sessions_broken: usize,
    pub frames_in_broken_sessions: u64,
    pub reconnect_attempts: u64,
    /// `--retry-refused`: streams the nodes never admitted in that time, streams admitted after at least
    /// one refusal, the 503 refusals of upgrades in all, and the `Retry-After` range they carried (s).
    pub streams_refused: usize,
    pub streams_admitted_after_refusal: usize,
    pub upgrade_refusals: u64,
    pub refusal_retry_after_s: Option<(u64, u64)>,
    pub events: u64,
    /// Transcript messages (segment arrays, with a speech-to-text provider) and the segments in them.
    pub transcript_messages: u64,
    pub transcript_segments: u64,
    pub audio_s_sent: f64,
    pub audio_s_per_s: f64,
    /// Event receipt − send time of the frame the event names.
    pub latency: Quantiles,
    /// The same, by event type (types that occurred only).
    pub latency_by_event: BTreeMap<String, Quantiles>,
    /// TCP connect + websocket handshake.
    pub connection_setup: Quantiles,
    /// `CloseStream` → `metadata`.
    pub close_to_metadata: Quantiles,
    pub wall_s: f64,
    /// The `--max-p99-ms` verdict, when one was asked for.
    pub latency_objective: Option<LatencyObjective>,
}

/// `--max-p99-ms`: the frame → event p99 against the objective.
#[derive(Debug, Default, Serialize)]
pub struct LatencyObjective {
    pub max_p99_ms: f64,
    pub p99_ms: f64,
    pub met: bool,
}

impl LatencyObjective {
    /// The verdict for `latency` against `max_p99_ms`. No event at all is no evidence: not met.
    pub fn judge(max_p99_ms: f64, latency: &Quantiles) -> Self {
        LatencyObjective {
            max_p99_ms,
            p99_ms: latency.p99_ms,
            met: latency.count > 0 && latency.p99_ms <= max_p99_ms,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub uploaders: usize,
    pub files_per_upload: usize,
    pub rounds: usize,
    /// Through v2 with every round submitted at once (`--pipeline`): latency and `wall_s` end at the
    /// server's `finished_at_ms`.
    pub pipeline: bool,
    /// `--backdate-days`: the range, and the uploads and files refused for the backfill allowance.
    pub backdate_days: Option<(u64, u64)>,
    pub uploads_refused_backfill: u64,
    pub files_refused_backfill: u64,
    pub uploads_ok: u64,
    pub uploads_failed: u64,
    pub files_ok: u64,
    pub files_failed: u64,
    /// `--survive-node-loss`: uploads sent again after no answer (same files).
    pub uploads_resent: u64,
    pub uploads_per_s: f64,
    pub files_per_s: f64,
    pub audio_s: f64,
    pub audio_s_per_s: f64,
    pub latency: Quantiles,
    pub wall_s: f64,
}

/// The retry storm (`--retry-storm`): refusals of restricted users over a cap, retried immediately.
#[derive(Debug, Default, Serialize)]
pub struct StormReport {
    pub clients: usize,
    pub retries_per_client: u64,
    /// Files in the body every retry re-sends.
    pub files_per_request: usize,
    /// One request, head and body.
    pub request_bytes: u64,
    /// Arming: the uploads (and their files) that took the storm users over a cap, metered.
    pub arming_uploads: u64,
    pub arming_files: u64,
    /// The refusing cap lies above this much speech (the users' before their last accepted upload)…
    pub cap_above_ms: u64,
    /// …and at most this much (their speech when refused).
    pub cap_at_most_ms: u64,
    /// `Retry-After` of the first client's first refusal (before the storm).
    pub first_retry_after_s: Option<u64>,
    /// When the storm began, from the start of the scenario's traffic.
    pub started_after_s: f64,
    /// Answers received (refusals and anything else).
    pub answers: u64,
    /// 429 `fair_use_restricted`: every retry must be one.
    pub refusals: u64,
    /// Anything else, by kind (`storm_http_<status>_<code>`, `storm_<io error>`); also in `errors`.
    pub other_answers: BTreeMap<String, u64>,
    /// TCP connections opened during the storm (1 per client when the server keeps them alive).
    pub connections: u64,
    /// Request sent → answer read, connection setup included when one was opened.
    pub latency: Quantiles,
    pub wall_s: f64,
    pub refusals_per_s: f64,
    /// The server process whose CPU was read (`--server-pid`), if any.
    pub server_pid: Option<u32>,
    /// Its threads' on-CPU time over the storm window: everything it did then, concurrent traffic too.
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` / `refusals`, µs: the cost of a refusal when the storm ran alone.
    pub server_cpu_us_per_refusal: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub url: String,
    pub users_prefix: String,
    pub realtime: Option<RealtimeReport>,
    pub sync: Option<SyncReport>,
    pub storm: Option<StormReport>,
    pub errors: BTreeMap<String, u64>,
    pub accounting: Option<CheckReport>,
    /// `--check-stt`: the providers' audio against the sessions' `stt_forwarded_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stt: Option<crate::stt_check::SttCheck>,
    /// No traffic error, no frame lost or dropped, the accounting check passed (or was skipped) and the
    /// latency objective, if any, was met.
    pub passed: bool,
}

fn q_row(out: &mut String, name: &str, q: &Quantiles) {
    let _ = writeln!(
        out,
        "  {name:<22} n={:<8} p50 {:>9.1} ms  p95 {:>9.1} ms  p99 {:>9.1} ms  max {:>9.1} ms",
        q.count, q.p50_ms, q.p95_ms, q.p99_ms, q.max_ms
    );
}

fn storm_rows(o: &mut String, s: &StormReport) {
    let _ = writeln!(
        o,
        "retry storm: {} client(s) × {} immediate retries of {} file(s) ({} bytes a request), {:.1} s into the run ({:.2} s wall)",
        s.clients,
        s.retries_per_client,
        s.files_per_request,
        s.request_bytes,
        s.started_after_s,
        s.wall_s
    );
    let _ = writeln!(
        o,
        "  armed with {} uploads ({} files): the cap is above {} ms and at most {} ms of speech; first Retry-After {}",
        s.arming_uploads,
        s.arming_files,
        s.cap_above_ms,
        s.cap_at_most_ms,
        s.first_retry_after_s
            .map_or_else(|| "none".to_owned(), |r| format!("{r} s"))
    );
    let _ = writeln!(
        o,
        "  answers {}  429 fair_use_restricted: {}  other {}  connections opened {}  ({:.0} refusals/s)",
        s.answers,
        s.refusals,
        s.other_answers.values().sum::<u64>(),
        s.connections,
        s.refusals_per_s
    );
    q_row(o, "refusal latency", &s.latency);
    match (s.server_pid, s.server_cpu_s, s.server_cpu_us_per_refusal) {
        (Some(pid), Some(cpu), Some(per)) => {
            let _ = writeln!(
                o,
                "  server CPU in the storm window: {:.3} s = {per:.1} µs per refusal (pid {pid}; all the server did meanwhile)",
                cpu
            );
        }
        (Some(pid), _, _) => {
            let _ = writeln!(o, "  server CPU: not readable for pid {pid}");
        }
        (None, _, _) => {
            let _ = writeln!(
                o,
                "  server CPU: not measured (--server-pid / VOICEGATE_SERVER_PID unset)"
            );
        }
    }
}

impl Report {
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "scenario {} against {} (users {}…)",
            self.scenario, self.url, self.users_prefix
        );
        if let Some(r) = &self.realtime {
            let _ = writeln!(
                o,
                "realtime: {} streams × {:.0} s at pace {} ({:.1} s wall)",
                r.streams, r.duration_s, r.pace, r.wall_s
            );
            let _ = writeln!(
                o,
                "  streams connected {}  held {}  peak concurrent {}",
                r.streams_connected, r.streams_held, r.peak_concurrent
            );
            let _ = writeln!(
                o,
                "  frames sent {}  acknowledged {}  lost {}  dropped by server {}  events {}",
                r.frames_sent, r.frames_acknowledged, r.frames_lost, r.frames_dropped, r.events
            );
            if r.transcript_messages > 0 {
                let _ = writeln!(
                    o,
                    "  transcript messages {}  segments {}",
                    r.transcript_messages, r.transcript_segments
                );
            }
            if r.upgrade_refusals > 0 {
                let (lo, hi) = r.refusal_retry_after_s.unwrap_or_default();
                let _ = writeln!(
                    o,
                    "  refused 503: {} answers (Retry-After {lo}–{hi} s); streams never admitted {}, admitted after a refusal {}",
                    r.upgrade_refusals, r.streams_refused, r.streams_admitted_after_refusal
                );
            }
            if r.sessions_broken > 0 || r.reconnect_attempts > 0 {
                let _ = writeln!(
                    o,
                    "  sessions broken {} ({} frames)  reconnect attempts failed {}",
                    r.sessions_broken, r.frames_in_broken_sessions, r.reconnect_attempts
                );
            }
            let _ = writeln!(
                o,
                "  audio sent {:.0} s  ({:.1} audio s per s)",
                r.audio_s_sent, r.audio_s_per_s
            );
            q_row(&mut o, "frame→event latency", &r.latency);
            for (kind, q) in &r.latency_by_event {
                q_row(&mut o, &format!("  {kind}"), q);
            }
            q_row(&mut o, "connection setup", &r.connection_setup);
            q_row(&mut o, "CloseStream→metadata", &r.close_to_metadata);
            if let Some(l) = &r.latency_objective {
                let _ = writeln!(
                    o,
                    "  latency objective: p99 {:.1} ms against {:.1} ms: {}",
                    l.p99_ms,
                    l.max_p99_ms,
                    if l.met { "met" } else { "MISSED" }
                );
            }
        }
        if let Some(s) = &self.sync {
            let _ = writeln!(
                o,
                "sync: {} uploaders × {} files × {} rounds ({:.1} s wall)",
                s.uploaders, s.files_per_upload, s.rounds, s.wall_s
            );
            let _ = writeln!(
                o,
                "  uploads ok {}  failed {}  files ok {}  failed {}",
                s.uploads_ok, s.uploads_failed, s.files_ok, s.files_failed
            );
            if s.uploads_resent > 0 {
                let _ = writeln!(
                    o,
                    "  uploads sent again after no answer {}",
                    s.uploads_resent
                );
            }
            if let Some((lo, hi)) = s.backdate_days {
                let _ = writeln!(
                    o,
                    "  named {lo}-{hi} days old: refused for the backfill allowance {} uploads, {} files",
                    s.uploads_refused_backfill, s.files_refused_backfill
                );
            }
            let _ = writeln!(
                o,
                "  {:.2} uploads/s  {:.1} files/s  {:.0} audio s  {:.1} audio s per s",
                s.uploads_per_s, s.files_per_s, s.audio_s, s.audio_s_per_s
            );
            q_row(&mut o, "upload latency", &s.latency);
        }
        if let Some(s) = &self.storm {
            storm_rows(&mut o, s);
        }
        if self.errors.is_empty() {
            let _ = writeln!(o, "errors: none");
        } else {
            let _ = writeln!(o, "errors:");
            for (k, v) in &self.errors {
                let _ = writeln!(o, "  {k:<40} {v}");
            }
        }
        match &self.accounting {
            None => {
                let _ = writeln!(o, "accounting check: skipped");
            }
            Some(c) => {
                let _ = writeln!(
                    o,
                    "accounting check ({} users, status field {}): {}",
                    c.users,
                    c.status_field,
                    if c.passed { "PASSED" } else { "FAILED" }
                );
                let _ = writeln!(
                    o,
                    "  metered {} ms  reported {} ms  offline {} ms ({:.1} s to compute)",
                    c.server_ms, c.reported_ms, c.offline_ms, c.offline_secs
                );
                match &c.node_loss {
                    None => {
                        let _ = writeln!(
                            o,
                            "  Σ|metered − reported| {} ms (must be 0)  Σ(reported − offline) {} ms  Σ|reported − offline| {} ms  worst user {:.3}% (limit 1%)",
                            c.server_vs_reported_abs_ms,
                            c.reported_minus_offline_ms,
                            c.reported_vs_offline_abs_ms,
                            c.worst_offline_ratio * 100.0
                        );
                    }
                    Some(n) => {
                        // What was reported leaves out broken sessions and resent duplicates: the
                        // judgement is against everything sent.
                        let _ = writeln!(
                            o,
                            "  node loss: {} sessions broken, {} files unanswered; doubled {} ms (must be 0)  lost {} ms, at most {} ms per broken session of a user (bound {} ms: broken sessions {}, unanswered files {}, told within 2 s before a break {})",
                            n.sessions_broken,
                            n.files_unanswered,
                            n.doubled_ms,
                            n.lost_ms,
                            n.worst_lost_per_broken_session_ms,
                            n.lost_bound_ms,
                            n.bound_broken_sessions_ms,
                            n.bound_unanswered_files_ms,
                            n.bound_told_before_loss_ms
                        );
                    }
                }
                for f in &c.failures {
                    let _ = writeln!(
                        o,
                        "  ✗ {}: metered {:?} reported {} offline {}",
                        f.user, f.server_ms, f.reported_ms, f.offline_ms
                    );
                }
            }
        }
        if let Some(s) = &self.stt {
            let _ = writeln!(
                o,
                "speech-to-text check ({} sessions): {}\n  charged {} ms  received by the providers {:.1} ms  (|Δ| {} samples, {} allowed)  fell behind {:.1} ms",
                s.sessions,
                if s.passed { "PASSED" } else { "FAILED" },
                s.told_ms,
                s.provider_ms,
                s.diff_samples,
                s.allowed_samples,
                s.dropped_ms
            );
        }
        let _ = writeln!(o, "result: {}", if self.passed { "PASS" } else { "FAIL" });
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_known_samples() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let q = quantiles(&samples);
        assert_eq!(q.count, 1000);
        assert!((q.p50_ms - 500.0).abs() < 1.0, "{}", q.p50_ms);
        assert!((q.p99_ms - 990.0).abs() < 1.0, "{}", q.p99_ms);
        assert!((q.max_ms - 1000.0).abs() < 1.0, "{}", q.max_ms);
    }

    #[test]
    fn latency_objective_verdicts() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let q = quantiles(&samples);
        assert!(!LatencyObjective::judge(250.0, &q).met);
        assert!(LatencyObjective::judge(990.5, &q).met);
        assert!(!LatencyObjective::judge(250.0, &quantiles(&[])).met);
    }

    #[test]
    fn no_samples_give_zero_quantiles() {
        let q = quantiles(&[]);
        assert_eq!(q.count, 0);
        assert_eq!(q.max_ms, 0.0);
    }
}
