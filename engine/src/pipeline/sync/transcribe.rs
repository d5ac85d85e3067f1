//! A sync upload's transcription: each merged span of its files (120 s merge, 300 s split, ≥ 1 s) is decoded
//! again from the upload's temp file, sent through the provider's batch path with its speech runs, and its
//! segments stored with the conversation it joined, with a per-span status (`done`, `pending`,
//! `budget_exhausted`, `failed`) keyed by `<content sha256>:<start ms>-<end ms>` (times in the file).
//!
//! - A span already `done` (an earlier upload of the same content) is skipped: nothing is sent or charged
//!   twice. Any other status is retried by a re-upload.
//! - What the provider received (`forwarded_samples`) is charged to the user's daily STT counter. Under a
//!   daily budget a span is sent only when its speech fits what is left; beyond it: `budget_exhausted`.
//! - A run stays bounded: no span starts after [`SyncServices::stt_wait`] (`VOICEGATE_SYNC_STT_WAIT_SECS`;
//!   the rest is `pending`), and one span is at most 300 s of audio.
//! - A span the provider's queue refuses (`queue_full`: the node's engine or request bound is taken by
//!   other work) is offered again within the run after [`SyncServices::stt_busy`]'s backoff
//!   ([`BUSY_BACKOFF`]: 1 s, doubling to 15 s, jittered), keeping its decoded audio, until it is taken or
//!   the next attempt would start past `stt_wait` (then `pending`, for a re-upload). A run holds at most
//!   one decoded span while it waits, as it does while the provider has it: the job's memory is what it
//!   was, and the burst is absorbed instead of turned into work for the app.
//! - Segment ids are `<span key>:<n>`: a retry replaces, never duplicates.
//! - Each speech run goes with a pre-roll before it (`VOICEGATE_STT_PREROLL_MS`) and [`HANGOVER_MS`] after
//!   it, within the span, as a live session sends it; that padded audio is what is charged.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audio::codec::{Codec, DecodeError, Decoder};
use crate::audio::container::{MAX_OPUS_RECORD, MAX_PCM_RECORD, Next, RecordReader};
use crate::audio::resample::{Resampler, TARGET_RATE};
use crate::conversation::{ConversationStore, TranscriptSegment, TranscriptStatus, dedup_key};
use crate::policy::{SttAllowance, SttDenied};
use crate::stt::chunk::pad_runs;
use crate::stt::{BatchRequest, ProviderKind, SttError, SttProvider};
use crate::telemetry;
use crate::time::{Backoff, Span, samples_to_ms};

use super::SyncServices;

/// Audio after each speech run that goes with it (a live session's detector hangover, docs/stt.md).
pub const HANGOVER_MS: u64 = 100;

/// The wait before a span the provider's queue refused is offered again: 1 s, the ceiling doubling per
/// attempt to 15 s (the house [`Backoff`], full jitter). A pre-recorded request takes seconds and the local
/// engine transcribes a 300-s span in about two minutes on one thread, so a queue frees within a few
/// attempts; jitter keeps the runs of a burst of uploads from offering their spans in lock-step.
pub const BUSY_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));

/// One merged span of one file, to transcribe.
#[derive(Debug, Clone)]
pub(super) struct SpanWork {
    /// `<sha256>:<start ms>-<end ms>`, times relative to the file's start.
    pub(super) key: String,
    pub(super) path: PathBuf,
    pub(super) codec: Codec,
    /// The stretch decoded: the span in 16 kHz samples from the file's start, widened by the pre-roll and
    /// hangover (the file may end sooner: the decoder stops there).
    pub(super) samples: (u64, u64),
    /// The speech runs inside it, relative to its first sample.
    pub(super) runs: Vec<(u64, u64)>,
    /// The span in absolute epoch ms (as the conversation holds it).
    pub(super) abs: Span,
    /// Absolute epoch ms of the first decoded sample (`samples.0`): results' times count from it.
    pub(super) from_ms: u64,
}

impl SpanWork {
    /// The span of `merged_ms` (file-relative ms) of a file starting at `start_ms` with raw runs `raw`
    /// (file-relative 16 kHz samples), each padded with `preroll_ms` before and [`HANGOVER_MS`] after.
    pub(super) fn new(
        sha256: &str,
        (path, codec): (PathBuf, Codec),
        start_ms: u64,
        merged_ms: [u64; 2],
        raw: &[Span],
        preroll_ms: u64,
    ) -> SpanWork {
        let per_ms = u64::from(TARGET_RATE) / 1000;
        let (pre, post) = (preroll_ms.saturating_mul(per_ms), HANGOVER_MS * per_ms);
        // The decoded stretch reaches the pre-roll of the span's first run and the hangover of its last (the
        // merged span runs from the first run's start to the last run's end).
        let (s, e) = (merged_ms[0] * per_ms, merged_ms[1] * per_ms);
        let (from, to) = (s.saturating_sub(pre), e + post);
        let runs: Vec<(u64, u64)> = raw
            .iter()
            .filter(|r| r.end > s && r.start < e)
            .map(|r| (r.start.max(s) - from, r.end.min(e) - from))
            .collect();
        SpanWork {
            key: format!("{sha256}:{}-{}", merged_ms[0], merged_ms[1]),
            path,
            codec,
            samples: (from, to),
            runs: pad_runs(&runs, pre, post, to - from),
            abs: Span {
                start: start_ms + merged_ms[0],
                end: start_ms + merged_ms[1],
            },
            from_ms: start_ms + samples_to_ms(from, TARGET_RATE),
        }
    }

    fn speech_samples(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }
}

/// What the request's transcription did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Transcribed {
    /// The worst status of the request's spans (`None`: nothing to transcribe, or no provider).
    pub(super) status: Option<TranscriptStatus>,
    /// STT ms charged to the user by this request.
    pub(super) stt_ms: u64,
}

/// Transcribes the spans the request put into conversations (`ids`: the conversations it touched).
pub(super) async fn transcribe(
    services: &SyncServices,
    uid: &str,
    allowance: SttAllowance,
    ids: &[String],
    work: Vec<SpanWork>,
) -> Transcribed {
    let Some(provider) = services
        .stt
        .clone()
        .filter(|p| p.kind() != ProviderKind::None)
    else {
        return Transcribed::default();
    };
    if work.is_empty() {
        return Transcribed::default();
    }
    let store = services.conversations.as_ref();
    let owners = owners(store, uid, ids).await;
    let mut budget_ms = match allowance {
        SttAllowance::Unlimited => None,
        SttAllowance::Remaining { remaining_ms, .. } => Some(remaining_ms),
        SttAllowance::None { .. } => Some(0),
    };
    // Paid STT fails closed on an unknown entitlement, and closes over the hard ceiling: the spans wait
    // (`pending`) for a re-upload.
    let closed = matches!(
        allowance,
        SttAllowance::None {
            reason: SttDenied::EntitlementUnknown
                | SttDenied::SpeechCeiling
                | SttDenied::SpendCeiling,
            ..
        }
    );
    let began = Instant::now();
    let mut out = Transcribed::default();
    let mut known: HashMap<String, BTreeMap<String, TranscriptStatus>> = HashMap::new();
    for span in work {
        let Some(id) = owners.get(&dedup_key(&span.abs)) else {
            tracing::warn!(message = "A sync span is in no conversation it touched.", uid, key = %span.key);
            continue;
        };
        if !known.contains_key(id) {
            let statuses = store.span_statuses(uid, id).await.unwrap_or_else(|e| {
                tracing::warn!(message = "Reading span statuses failed.", uid, error = %e);
                BTreeMap::new()
            });
            known.insert(id.clone(), statuses);
        }
        if known
            .get(id)
            .and_then(|k| k.get(&span.key))
            .is_some_and(|s| *s == TranscriptStatus::Done)
        {
            out.status = out.status.max(Some(TranscriptStatus::Done));
            continue;
        }
        let speech_ms = samples_to_ms(span.speech_samples(), TARGET_RATE);
        let status = if closed || began.elapsed() >= services.stt_wait {
            TranscriptStatus::Pending
        } else if budget_ms.is_some_and(|left| left < speech_ms) {
            TranscriptStatus::BudgetExhausted
        } else {
            let (status, charged) =
                offered_until_taken(services, provider.as_ref(), (uid, id), &span, began).await;
            out.stt_ms += charged;
            budget_ms = budget_ms.map(|left| left.saturating_sub(charged));
            status
        };
        if let Err(e) = store
            .set_span_statuses(uid, id, vec![(span.key.clone(), status)])
            .await
        {
            tracing::warn!(message = "Storing a span status failed.", uid, error = %e);
        }
        out.status = out.status.max(Some(status));
    }
    out
}

/// Which conversation holds each span (by its duplicate key).
async fn owners(
    store: &dyn ConversationStore,
    uid: &str,
    ids: &[String],
) -> HashMap<(u64, u64), String> {
    let mut owners = HashMap::new();
    for id in ids {
        match store.get(uid, id).await {
            Ok(Some(c)) => {
                for s in &c.spans {
                    owners.insert(dedup_key(s), c.id.clone());
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(message = "Reading a conversation failed.", uid, error = %e),
        }
    }
    owners
}

/// Decodes one span and offers it to the provider until it is taken ([`one_span`]), waiting
/// [`SyncServices::stt_busy`]'s backoff after each `queue_full`, as long as the next attempt starts before
/// the run's `stt_wait` (counted from `began`); returns its status and the STT ms charged.
async fn offered_until_taken(
    services: &SyncServices,
    provider: &dyn SttProvider,
    (uid, id): (&str, &str),
    span: &SpanWork,
    began: Instant,
) -> (TranscriptStatus, u64) {
    let (path, codec, range) = (span.path.clone(), span.codec, span.samples);
    let samples: Arc<[f32]> = match tokio::task::spawn_blocking(move || {
        decode_span(&path, codec, range)
    })
    .await
    {
        Ok(Ok(samples)) => Arc::from(samples),
        Ok(Err(error)) => {
            tracing::warn!(message = "Decoding a sync span failed.", uid, key = %span.key, %error);
            return (TranscriptStatus::Failed, 0);
        }
        Err(error) => {
            tracing::warn!(message = "The span decoder task failed.", uid, %error);
            return (TranscriptStatus::Pending, 0);
        }
    };
    let mut busy = services.stt_busy;
    loop {
        match one_span(services, provider, (uid, id), span, samples.clone()).await {
            Offered::Settled(status, charged) => return (status, charged),
            Offered::Busy => {
                let delay = busy.next_delay();
                if began.elapsed() + delay >= services.stt_wait {
                    // Counted once, as what a live chunk refused counts: the speech the span would send.
                    metrics::counter!(
                        telemetry::STT_DROPPED_SAMPLES_TOTAL,
                        "provider" => provider.kind().name(),
                        "reason" => "queue_full"
                    )
                    .increment(span.speech_samples());
                    return (TranscriptStatus::Pending, 0);
                }
                metrics::counter!(
                    telemetry::STT_RETRIES_TOTAL,
                    "provider" => provider.kind().name(),
                    "reason" => "queue_full"
                )
                .increment(1);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What offering a span to the provider came to.
enum Offered {
    /// Taken, answered or failed: its status and the STT ms charged.
    Settled(TranscriptStatus, u64),
    /// Refused at once, `queue_full`: nothing was sent or charged; it can be offered again.
    Busy,
}

/// Transcribes, charges and stores one decoded span.
async fn one_span(
    services: &SyncServices,
    provider: &dyn SttProvider,
    (uid, id): (&str, &str),
    span: &SpanWork,
    samples: Arc<[f32]>,
) -> Offered {
    let offered = samples.len() as u64;
    let request = BatchRequest {
        samples,
        speech: span.runs.clone(),
        language: "en".to_owned(),
    };
    let output = match provider.transcribe_batch(request) {
        Ok(ticket) => ticket.recv().await,
        Err(e) => Err(e),
    };
    let output = match output {
        Ok(output) => output,
        Err(SttError::QueueFull { .. }) => return Offered::Busy,
        Err(error) => {
            tracing::warn!(message = "Transcribing a sync span failed.", uid, key = %span.key, %error);
            return Offered::Settled(TranscriptStatus::Failed, 0);
        }
    };
    // The span is what the gate offered the provider (the file's silence between spans never is; a
    // refused or failed span is no audio in: nothing of it was forwarded either).
    metrics::counter!(telemetry::STT_AUDIO_IN_SAMPLES_TOTAL, "provider" => provider.kind().name())
        .increment(offered);
    let charged = samples_to_ms(output.forwarded_samples, TARGET_RATE);
    // Charged to the provider that took the span (with a fallback, either side).
    let (taker, paid) = output
        .provider
        .map_or((provider.kind(), provider.paid()), |k| (k, k.is_paid()));
    if charged > 0
        && let Err(error) = services
            .fair_use
            .record_stt(uid, &[(taker.name(), charged)], paid)
            .await
    {
        tracing::warn!(message = "Recording sync STT usage failed.", uid, %error);
    }
    let segments: Vec<TranscriptSegment> = output
        .results
        .iter()
        .filter(|r| !r.text.trim().is_empty())
        .enumerate()
        .map(|(n, r)| {
            TranscriptSegment::new(
                format!("{}:{n}", span.key),
                &r.text,
                r.speaker.unwrap_or(0),
                span.from_ms + r.start_ms,
                span.from_ms + r.end_ms,
            )
        })
        .collect();
    match services.conversations.add_segments(uid, id, segments).await {
        Ok(_) => Offered::Settled(TranscriptStatus::Done, charged),
        Err(error) => {
            tracing::warn!(message = "Storing sync transcript segments failed.", uid, %error);
            Offered::Settled(TranscriptStatus::Failed, charged)
        }
    }
}

/// The 16 kHz samples `[start, end)` of a saved device file, decoded again from its start (the analysis
/// kept no audio). Blocking. A corrupt packet is skipped as the analysis skipped it, so positions agree.
pub fn decode_span(
    path: &PathBuf,
    codec: Codec,
    (start, end): (u64, u64),
) -> Result<Vec<f32>, String> {
    let file = File::open(path).map_err(|e| format!("temp file unreadable: {e}"))?;
    let max = if codec.is_opus() {
        MAX_OPUS_RECORD
    } else {
        MAX_PCM_RECORD
    };
    let mut records = RecordReader::new(BufReader::new(file), max);
    let mut decoder = Decoder::new(codec).map_err(|e| e.to_string())?;
    let mut resampler = if codec.sample_rate() == TARGET_RATE {
        None
    } else {
        Some(Resampler::new(codec.sample_rate()).map_err(|e| e.to_string())?)
    };
    let cap = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
    let mut out = Vec::with_capacity(cap);
    let (mut native, mut at16, mut buf) = (Vec::new(), Vec::new(), Vec::new());
    let mut pos = 0u64;
    let keep = |chunk: &[f32], pos: &mut u64, out: &mut Vec<f32>| {
        let (from, to) = (*pos, *pos + chunk.len() as u64);
        if to > start && from < end {
            let a = (start.max(from) - from) as usize;
            let b = (end.min(to) - from) as usize;
            out.extend_from_slice(&chunk[a..b]);
        }
        *pos = to;
    };
    loop {
        if pos >= end {
            break;
        }
        match records.next_record(&mut buf) {
            Ok(Next::Record { .. }) => {}
            Ok(Next::End | Next::Truncated(_)) => break,
            Err(e) => return Err(format!("reading the file failed: {e}")),
        }
        native.clear();
        match decoder.decode(&buf, &mut native) {
            Ok(_) => {}
            Err(DecodeError::Packet(_)) => continue,
            Err(e) => return Err(e.to_string()),
        }
        match resampler.as_mut() {
            None => keep(&native, &mut pos, &mut out),
            Some(r) => {
                at16.clear();
                r.push(&native, &mut at16).map_err(|e| e.to_string())?;
                keep(&at16, &mut pos, &mut out);
            }
        }
    }
    if pos < end
        && let Some(r) = resampler.as_mut()
    {
        at16.clear();
        r.finish(&mut at16).map_err(|e| e.to_string())?;
        keep(&at16, &mut pos, &mut out);
    }
    Ok(out)
}
