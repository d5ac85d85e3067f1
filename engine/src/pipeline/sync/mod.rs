//! The sync use case: device files uploaded after the fact (`POST /v1/sync-local-files`), beside the live
//! pipeline. The server admits the request (entitlement for `sync`, before the body), saves the body to temp
//! files and maps the [`SyncOutcome`] to a response (`server/src/sync.rs`); everything between is here:
//!
//! 1. [`analyse`] (blocking, parallel on the rayon pool): every file's name (codec, timestamp) is checked and
//!    the content decoded and VAD-segmented; a bad file fails only itself.
//! 2. [`settle`], per good file: the backfill decision ([`crate::policy::backfill`]): too old is refused,
//!    backfill is charged to today's allowance ([`crate::store::backfill`]) before it is metered and
//!    refunded when it turns out not to be metered. Then the file's raw (pre-merge) speech is metered under
//!    its content SHA-256: a re-upload never meters twice.
//! 3. The daily STT budget (throttle, restrict) never refuses a sync: the speech is metered and the
//!    conversations written as always; what the budget does not cover is stored `budget_exhausted` (step 5).
//! 4. Merged segments (120 s rule, ≥ [`MIN_SEGMENT_MS`]) become spans of conversations, created or merged
//!    per user.
//! 5. With a speech-to-text provider, each span is transcribed (`transcribe.rs`): segments stored with its
//!    conversation, a per-span `transcript_status`, spans already `done` never sent (nor charged) again.
//!    The upload's temp files must stay readable until [`settle`] returns.
//!
//! Credits exhausted do not stop a sync: the conversations are locked.

mod files;
mod settled;
#[cfg(test)]
mod tests;
mod transcribe;

use std::collections::BTreeSet;
use std::sync::Arc;

use self::files::failed;
pub use self::files::{Analysed, FileResult, SyncFile, analyse};
pub use self::settled::Settled;
use self::transcribe::SpanWork;
pub use self::transcribe::{BUSY_BACKOFF, decode_span};
use crate::conversation::{ConversationError, ConversationStore, TranscriptStatus, Upsert};
use crate::fair_use::FairUse;
use crate::meter::{RecordSpeech, RecordStatus, SpeechAmount, SpeechSource};
use crate::pipeline::offline::FileAnalysis;
use crate::policy::backfill::{self, BackfillConfig, Lane};
use crate::policy::{SessionLane, SessionMeasures, SessionSummary, SttAllowance};
use crate::store::backfill::{BackfillLedger, Charge};
use crate::stt::{ProviderKind, SttProvider};
use crate::telemetry::{SYNC_AUDIO_SECONDS_TOTAL, SYNC_FILES_BY_LANE_TOTAL, SYNC_FILES_TOTAL};
use crate::time::{Clock, Span, samples_to_ms};

/// Merged segments shorter than this are not conversation content (the reference's 1 s rule).
pub const MIN_SEGMENT_MS: u64 = 1_000;

/// The services a sync uses. Cheap to clone.
#[derive(Clone)]
pub struct SyncServices {
    pub fair_use: FairUse,
    pub conversations: Arc<dyn ConversationStore>,
    /// The backfill decision's settings and its per-user, per-UTC-day ledger.
    pub backfill: BackfillConfig,
    pub backfill_ledger: Arc<dyn BackfillLedger>,
    pub clock: Arc<dyn Clock>,
    /// The node's speech-to-text provider; `None` (or the `none` provider) transcribes nothing.
    pub stt: Option<Arc<dyn SttProvider>>,
    /// Audio sent before each speech run (`VOICEGATE_STT_PREROLL_MS`), as for a live session.
    pub stt_preroll_ms: u64,
    /// No span starts transcribing once a run has spent this long on transcription
    /// (`VOICEGATE_SYNC_STT_WAIT_SECS`): the rest is stored `pending`, and a re-upload transcribes it. Nobody
    /// waits on a job's transcription (a v1 answer waits at most `VOICEGATE_SYNC_V1_TRANSCRIPT_WAIT_SECS`), so
    /// this only bounds one run against a stalled provider.
    pub stt_wait: std::time::Duration,
    /// The wait before a span the provider's queue refused (`queue_full`) is offered again within the run
    /// ([`BUSY_BACKOFF`] in production; tests shorten it).
    pub stt_busy: crate::time::Backoff,
}

/// One admitted sync request.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub uid: String,
    /// Content created now is locked (the entitlement's credit lock, read at admission).
    pub locked: bool,
    /// The entitlement's STT allowance, read at admission.
    pub stt: SttAllowance,
    /// Attach every span to this conversation when it exists (and is the caller's).
    pub target: Option<String>,
    /// When the files arrived (epoch ms): decides each file's lane and the backfill allowance's day. A v2
    /// job resumed later keeps its upload's arrival, so a file fresh at upload stays fresh.
    pub arrival_ms: u64,
}

/// What a sync did, file by file: the response body (`docs/api.md`), and the fields a refusal adds so the
/// client knows what the request did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// Conversations created and updated (sorted, without repeats).
    pub new_memories: Vec<String>,
    pub updated_memories: Vec<String>,
    /// Speech found in the good files.
    pub speech_ms: u64,
    /// Speech metered by this request (0 for content metered before).
    pub metered_speech_ms: u64,
    pub locked: bool,
    /// The worst transcription status of the request's spans (`done`, `pending`, `budget_exhausted`,
    /// `failed`); absent when nothing was to be transcribed (no provider, no span).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript_status: Option<TranscriptStatus>,
    /// STT charged to the user's daily counter by this request (what the provider received).
    pub stt_ms: u64,
    pub files: Vec<FileResult>,
}

impl SyncReport {
    /// Whether every file succeeded.
    pub fn all_ok(&self) -> bool {
        self.files.iter().all(|r| r.status != "failed")
    }
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Some file succeeded; its speech is metered and in conversations ([`SyncReport::all_ok`] says whether
    /// every file did).
    Done(SyncReport),
    /// No file succeeded. `server_side`: some failure was the server's (retry the upload); otherwise no file
    /// was valid.
    NoValidFiles {
        report: SyncReport,
        server_side: bool,
    },
    /// Some files did not fit today's backfill allowance; what fitted was metered and joined
    /// conversations (a retry of those is a duplicate). Retry the rest after `retry_after_s` (the next UTC
    /// midnight).
    BackfillAllowanceExhausted {
        report: SyncReport,
        retry_after_s: u64,
    },
}

/// Why a file failed, for the request's outcome.
enum Failure {
    /// The file's own fault: final.
    Client,
    /// The server's (decode pool, meter, ledger): the client retries.
    Server,
    /// Today's backfill allowance is used up.
    Allowance,
}

/// The request's files settled so far.
#[derive(Default)]
struct Tally {
    results: Vec<FileResult>,
    spans: Vec<Span>,
    /// The spans again, with what transcribing them needs.
    work: Vec<SpanWork>,
    speech_ms: u64,
    metered_ms: u64,
    server_failures: usize,
    allowance_refused: usize,
    limitless: bool,
}

impl Tally {
    fn fail(&mut self, result: FileResult, why: Failure) {
        match why {
            Failure::Client => {}
            Failure::Server => self.server_failures += 1,
            Failure::Allowance => self.allowance_refused += 1,
        }
        self.results.push(result);
    }

    fn report(&self, locked: bool, new: Vec<String>, updated: Vec<String>) -> SyncReport {
        SyncReport {
            new_memories: dedup(new),
            updated_memories: dedup(updated),
            speech_ms: self.speech_ms,
            metered_speech_ms: self.metered_ms,
            locked,
            transcript_status: None,
            stt_ms: 0,
            files: self.results.clone(),
        }
    }
}

/// Meters the analysed files, keyed by their content, writes their conversations, then transcribes their
/// spans ([`settle_speech`] then [`Settled::transcribe`]). Fails only when the conversations cannot be written
/// (the speech is metered then: the client retries the upload).
pub async fn settle(
    services: &SyncServices,
    request: SyncRequest,
    analysed: Vec<Analysed>,
) -> Result<SyncOutcome, ConversationError> {
    Ok(settle_speech(services, request, analysed)
        .await?
        .transcribe(services)
        .await)
}

/// The first part of [`settle`]: the backfill decision and the meter per file, then the conversations.
pub async fn settle_speech(
    services: &SyncServices,
    request: SyncRequest,
    analysed: Vec<Analysed>,
) -> Result<Settled, ConversationError> {
    let uid = request.uid.as_str();
    let locked = request.locked;
    let mut tally = Tally::default();
    // The lane is the upload's (its arrival); the allowance's day and Retry-After are today's (a deferred
    // v2 job runs again on a later day).
    let at = At {
        arrival_ms: request.arrival_ms,
        now_ms: services.clock.now_ms(),
    };
    for a in analysed {
        settle_file(services, uid, a, at, &mut tally).await;
    }
    for r in &tally.results {
        let s = if r.status == "failed" { "failed" } else { "ok" };
        metrics::counter!(SYNC_FILES_TOTAL, "status" => s).increment(1);
    }
    let good = tally
        .results
        .iter()
        .filter(|r| r.status != "failed")
        .count();
    let nothing = |outcome| Settled {
        outcome,
        uid: request.uid.clone(),
        stt: request.stt,
        touched: Vec::new(),
        work: Vec::new(),
    };
    if good == 0 && tally.allowance_refused > 0 {
        return Ok(nothing(SyncOutcome::BackfillAllowanceExhausted {
            report: tally.report(locked, Vec::new(), Vec::new()),
            retry_after_s: backfill::retry_after_s(at.now_ms),
        }));
    }
    if good == 0 {
        return Ok(nothing(SyncOutcome::NoValidFiles {
            report: tally.report(locked, Vec::new(), Vec::new()),
            server_side: tally.server_failures > 0,
        }));
    }

    let source = if tally.limitless { "limitless" } else { "omi" };
    let outcome = services
        .conversations
        .upsert(Upsert {
            uid: uid.to_owned(),
            spans: std::mem::take(&mut tally.spans),
            locked,
            source: source.to_owned(),
            target: request.target.clone().filter(|s| !s.is_empty()),
        })
        .await?;
    let touched: Vec<String> = outcome
        .new
        .iter()
        .chain(&outcome.updated)
        .cloned()
        .collect();
    let provider_on = services
        .stt
        .as_ref()
        .is_some_and(|p| p.kind() != ProviderKind::None);
    let work = if provider_on {
        std::mem::take(&mut tally.work)
    } else {
        Vec::new()
    };
    let mut report = tally.report(locked, outcome.new, outcome.updated);
    if !work.is_empty() {
        report.transcript_status = Some(TranscriptStatus::Pending);
    }
    let outcome = if tally.allowance_refused > 0 {
        // What fitted was metered and joined conversations; the rest waits for the next UTC day.
        SyncOutcome::BackfillAllowanceExhausted {
            report,
            retry_after_s: backfill::retry_after_s(at.now_ms),
        }
    } else {
        SyncOutcome::Done(report)
    };
    Ok(Settled {
        outcome,
        uid: request.uid,
        stt: request.stt,
        touched,
        work,
    })
}

/// When files are settled: their upload's arrival (the lane) and now (the allowance's day).
#[derive(Clone, Copy)]
struct At {
    arrival_ms: u64,
    now_ms: u64,
}

/// One analysed file: the backfill decision, the meter, and its spans.
async fn settle_file(services: &SyncServices, uid: &str, a: Analysed, at: At, tally: &mut Tally) {
    let fa = match a.analysis {
        Ok(fa) => fa,
        Err((code, error, server_side)) => {
            let why = if server_side {
                Failure::Server
            } else {
                Failure::Client
            };
            tally.fail(failed(a.name, code, error, 0), why);
            return;
        }
    };
    metrics::counter!(SYNC_AUDIO_SECONDS_TOTAL).increment(fa.duration_ms / 1000);
    let today = backfill::utc_day(at.now_ms);
    let charged = match charge_backfill(services, uid, &a.name, &fa, a.start_ms, at).await {
        Ok(charged) => charged,
        Err((result, why)) => {
            tally.fail(result, why);
            return;
        }
    };
    // The evidence first: a breach this file causes is classified with the file in view.
    record_evidence(services, uid, (&a.sha256, a.start_ms), &fa, at).await;
    let rec = RecordSpeech::new(
        uid,
        SpeechAmount::Samples {
            samples: fa.speech_samples,
            rate_hz: 16_000,
        },
        a.start_ms,
        SpeechSource::Sync,
    )
    .with_idempotency_key(format!("sync:{}", a.sha256));
    let recorded = services.fair_use.record(rec).await;
    let unmetered = !matches!(&recorded, Ok(o) if o.status == RecordStatus::Recorded);
    if charged > 0
        && unmetered
        && let Err(error) = services.backfill_ledger.refund(uid, today, charged).await
    {
        tracing::warn!(message = "Refunding the backfill allowance failed.", uid, %error);
    }
    let status = match recorded {
        Ok(o) => o.status,
        Err(e) => {
            tracing::warn!(message = "Metering a sync file failed.", uid, file = %a.name, error = %e);
            tally.fail(
                failed(
                    a.name,
                    "metering_unavailable",
                    "the speech could not be metered; retry the upload".into(),
                    fa.duration_ms,
                ),
                Failure::Server,
            );
            return;
        }
    };
    let whole = if fa.truncated_at.is_some() {
        "truncated"
    } else {
        "ok"
    };
    let file_status = match status {
        RecordStatus::Recorded => {
            tally.metered_ms += fa.speech_ms;
            whole
        }
        RecordStatus::Empty => whole,
        RecordStatus::Duplicate => "duplicate",
        RecordStatus::Dropped => {
            tally.fail(
                failed(
                    a.name,
                    "metering_overloaded",
                    "the meter is over its memory bound; retry the upload".into(),
                    fa.duration_ms,
                ),
                Failure::Server,
            );
            return;
        }
    };
    tally.limitless |= a.limitless;
    tally.speech_ms += fa.speech_ms;
    let merged = fa
        .merged_segments_ms
        .iter()
        .filter(|[s, e]| e.saturating_sub(*s) >= MIN_SEGMENT_MS);
    tally.spans.extend(merged.clone().map(|[s, e]| Span {
        start: a.start_ms + s,
        end: a.start_ms + e,
    }));
    if let Some(codec) = a.codec {
        tally.work.extend(merged.map(|m| {
            SpanWork::new(
                &a.sha256,
                (a.path.clone(), codec),
                a.start_ms,
                *m,
                &fa.raw_spans,
                services.stt_preroll_ms,
            )
        }));
    }
    tally.results.push(FileResult {
        file: a.name,
        status: file_status,
        speech_ms: fa.speech_ms,
        duration_ms: fa.duration_ms,
        code: fa.truncation_code,
        truncated_at: fa.truncated_at,
        error: None,
        warnings: fa.warnings,
    });
}

/// A file's evidence for fair use, in its recording's time, written just before its speech is metered; its
/// id is its content hash, so a re-upload (a retry after a metering failure, a duplicate) rewrites its own
/// entry. A failure is counted by the facade and does not fail the file.
async fn record_evidence(
    services: &SyncServices,
    uid: &str,
    (sha256, start_ms): (&str, u64),
    fa: &FileAnalysis,
    at: At,
) {
    let lane = match backfill::lane(start_ms, at.arrival_ms, &services.backfill) {
        Lane::Backfill => SessionLane::SyncBackfill,
        Lane::Fresh | Lane::TooOld => SessionLane::SyncFresh,
    };
    let longest = fa.raw_spans.iter().map(Span::len).max().unwrap_or(0);
    let summary = SessionSummary::new(
        &format!("sync:{}", sha256.get(..24).unwrap_or(sha256)),
        lane,
        SessionMeasures {
            started_at_ms: start_ms,
            audio_ms: fa.duration_ms,
            speech_ms: fa.speech_ms,
            longest_speech_ms: samples_to_ms(longest, 16_000),
            speech_runs: fa.raw_spans.len() as u64,
        },
        at.now_ms,
        false,
    );
    services.fair_use.record_session(uid, &summary).await;
}

/// The backfill decision (DESIGN §3): too old is refused; backfill is charged to today's allowance before
/// it is metered. Returns the ms charged (0 for fresh speech), or the file's failure.
async fn charge_backfill(
    services: &SyncServices,
    uid: &str,
    name: &str,
    fa: &FileAnalysis,
    start_ms: u64,
    at: At,
) -> Result<u64, (FileResult, Failure)> {
    let lane = backfill::lane(start_ms, at.arrival_ms, &services.backfill);
    metrics::counter!(SYNC_FILES_BY_LANE_TOTAL, "lane" => lane.label()).increment(1);
    match lane {
        Lane::Fresh => Ok(0),
        Lane::TooOld => Err((
            failed(
                name.to_owned(),
                "recording_too_old",
                format!(
                    "recorded more than {} days before its upload (VOICEGATE_BACKFILL_LOOKBACK_DAYS)",
                    services.backfill.lookback_ms / 86_400_000
                ),
                fa.duration_ms,
            ),
            Failure::Client,
        )),
        Lane::Backfill => {
            let allowance = services.backfill.allowance_ms;
            let today = backfill::utc_day(at.now_ms);
            match services
                .backfill_ledger
                .charge(uid, today, fa.speech_ms, allowance)
                .await
            {
                Ok(Charge::Granted { .. }) => Ok(fa.speech_ms),
                Ok(Charge::Exhausted { used_ms }) => Err((
                    failed(
                        name.to_owned(),
                        "backfill_allowance_exhausted",
                        format!(
                            "{} ms of speech recorded over 24 h ago does not fit today's backfill allowance \
                             ({used_ms} of {allowance} ms used, VOICEGATE_BACKFILL_ALLOWANCE_MS); retry after the next UTC midnight",
                            fa.speech_ms
                        ),
                        fa.duration_ms,
                    ),
                    Failure::Allowance,
                )),
                Err(e) => {
                    // The allowance cannot be checked: backfill waits (fresh speech is unaffected).
                    tracing::warn!(message = "Charging the backfill allowance failed.", uid, error = %e);
                    Err((
                        failed(
                            name.to_owned(),
                            "metering_unavailable",
                            "the backfill allowance could not be checked; retry the upload".into(),
                            fa.duration_ms,
                        ),
                        Failure::Server,
                    ))
                }
            }
        }
    }
}

fn dedup(ids: Vec<String>) -> Vec<String> {
    ids.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}
