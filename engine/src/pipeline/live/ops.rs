//! The store operations a live session asks for ([`StoreOp`], plain data from the core) and their
//! execution against the engine's services (the driver's I/O), answered as [`OpResult`].

use std::sync::Arc;

use super::LiveServices;
use crate::conversation::{self, ConversationStore, SegmentsAdded, TranscriptSegment, Upsert};
use crate::fair_use::{FairUseStatus, PlanRecord};
use crate::meter::{RecordSpeech, RecordStatus, SpeechAmount, SpeechSource};
use crate::policy::SessionSummary;
use crate::policy::notice::ThresholdNotice;
use crate::telemetry as t;
use crate::time::Span;

/// What the core wants done in the store; one runs at a time, in order, so records never overlap.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// Meter `delta_ms` more speech (bringing the session's metered total to `total_ms`) and record
    /// `stt_ms` of forwarded STT.
    Meter {
        delta_ms: u64,
        total_ms: u64,
        stt_ms: u64,
        /// How `stt_ms` splits by the provider that took the audio (the driver fills it from its stream);
        /// empty: all of it to the session's provider.
        stt_by_provider: Vec<(&'static str, u64)>,
        now_ms: u64,
        /// The session's evidence to (re)write, once per evidence interval and at the end.
        evidence: Option<Box<SessionSummary>>,
    },
    /// Re-read the user's status (plan, rolling totals, stage, lock, STT allowance).
    Status { first: bool },
    /// Write one closed conversation (`locked` as the session knew it when the write started).
    Conversation {
        spans: Vec<Span>,
        speech_ms: u64,
        locked: bool,
    },
    /// Add final transcript segments to the written conversation `id`.
    Transcript {
        id: String,
        segments: Vec<TranscriptSegment>,
    },
}

/// A finished [`StoreOp`].
#[derive(Debug, Clone)]
pub enum OpResult {
    Meter {
        /// The cumulative speech (ms) this record brought the meter to, if it was accepted.
        metered_to: Option<u64>,
        /// STT ms recorded (0 when none was sent or the record failed).
        stt_recorded: u64,
        /// Whether the evidence sent was written (false when none was sent).
        evidence_written: bool,
    },
    Status {
        first: bool,
        status: Box<FairUseStatus>,
        /// The thresholds to tell the client now (not told before by any session).
        announce: Vec<ThresholdNotice>,
    },
    Conversation {
        /// The conversation id, or the store's error code.
        stored: Result<String, &'static str>,
        speech_ms: u64,
        locked: bool,
    },
    Transcript {
        /// What the store did, or its error code (`conversation_not_found`: deleted meanwhile).
        stored: Result<SegmentsAdded, &'static str>,
    },
}

/// Runs one operation for `uid`.
pub async fn execute(services: Arc<LiveServices>, uid: Arc<str>, op: StoreOp) -> OpResult {
    match op {
        StoreOp::Meter {
            delta_ms,
            total_ms,
            stt_ms,
            stt_by_provider,
            now_ms,
            evidence,
        } => {
            let stt = if stt_by_provider.is_empty() {
                vec![(services.stt.kind().name(), stt_ms)]
            } else {
                stt_by_provider
            };
            let mut done = meter(&services, &uid, delta_ms, total_ms, &stt, now_ms).await;
            if let (
                Some(summary),
                OpResult::Meter {
                    evidence_written, ..
                },
            ) = (evidence, &mut done)
            {
                *evidence_written = services.fair_use.record_session(&uid, &summary).await;
            }
            done
        }
        StoreOp::Status { first } => {
            let plan = services.plans.get(&uid).await;
            let record = match &plan {
                Ok(p) => PlanRecord::Known(p.as_deref()),
                Err(e) => {
                    tracing::warn!(message = "Plan lookup failed; credits unavailable.", uid = %uid, error = %e);
                    PlanRecord::Unavailable
                }
            };
            let status = services.fair_use.status(&uid, record).await;
            let announce = services.fair_use.claim_thresholds(&uid, &status).await;
            OpResult::Status {
                first,
                status: Box::new(status),
                announce,
            }
        }
        StoreOp::Conversation {
            spans,
            speech_ms,
            locked,
        } => {
            let stored =
                upsert_conversation(services.conversations.as_ref(), &uid, locked, spans).await;
            OpResult::Conversation {
                stored,
                speech_ms,
                locked,
            }
        }
        StoreOp::Transcript { id, segments } => {
            let stored = services
                .conversations
                .add_segments(&uid, &id, segments)
                .await
                .map_err(|e| {
                    tracing::warn!(message = "Adding realtime transcript segments failed.", uid = %uid, error = %e);
                    e.code()
                });
            OpResult::Transcript { stored }
        }
    }
}

async fn meter(
    services: &LiveServices,
    uid: &Arc<str>,
    delta_ms: u64,
    total_ms: u64,
    stt: &[(&'static str, u64)],
    now_ms: u64,
) -> OpResult {
    let stt_ms = stt.iter().map(|(_, ms)| ms).sum::<u64>();
    let mut metered_to = None;
    if delta_ms > 0 {
        let rec = RecordSpeech::new(
            Arc::clone(uid),
            SpeechAmount::Ms(delta_ms),
            now_ms,
            SpeechSource::Realtime,
        );
        match services.fair_use.record(rec).await {
            // `Dropped`: the meter's pending memory is full (the store is down); the speech is not
            // metered, so it stays the session's to send again the next second.
            Ok(outcome) if outcome.status == RecordStatus::Dropped => {
                tracing::warn!(message = "Realtime speech not metered: meter pending memory full.", uid = %uid, delta_ms);
                metrics::counter!(t::LISTEN_METER_ERRORS_TOTAL, "reason" => "dropped").increment(1);
            }
            Ok(_) => metered_to = Some(total_ms),
            Err(e) => {
                // Kept pending: the next second (or the finish) sends it again.
                tracing::warn!(message = "Metering realtime speech failed.", uid = %uid, error = %e);
                metrics::counter!(t::LISTEN_METER_ERRORS_TOTAL, "reason" => "meter").increment(1);
            }
        }
    }
    let mut stt_recorded = 0;
    if stt_ms > 0 {
        match services
            .fair_use
            .record_stt(uid, stt, services.stt.paid())
            .await
        {
            Ok(_) => stt_recorded = stt_ms,
            Err(e) => {
                tracing::warn!(message = "Recording STT usage failed.", uid = %uid, error = %e);
                metrics::counter!(t::LISTEN_METER_ERRORS_TOTAL, "reason" => "stt").increment(1);
            }
        }
    }
    OpResult::Meter {
        metered_to,
        stt_recorded,
        evidence_written: false,
    }
}

/// Creates or merges a realtime conversation: the first span finds (or starts) it, the rest join it by id,
/// so a long silence inside one realtime conversation never splits it.
async fn upsert_conversation(
    store: &dyn ConversationStore,
    uid: &str,
    locked: bool,
    spans: Vec<Span>,
) -> Result<String, &'static str> {
    let mut rest = spans.into_iter();
    let first = rest.next().ok_or("empty")?;
    let req = |spans, target| Upsert {
        uid: uid.to_owned(),
        spans,
        locked,
        source: "realtime".to_owned(),
        target,
    };
    let log = |e: &conversation::ConversationError| {
        tracing::warn!(message = "Realtime conversation upsert failed.", uid, error = %e);
        e.code()
    };
    let out = store
        .upsert(req(vec![first], None))
        .await
        .map_err(|e| log(&e))?;
    let id = out
        .new
        .first()
        .or(out.updated.first())
        .cloned()
        .ok_or("no_id")?;
    let rest: Vec<_> = rest.collect();
    if !rest.is_empty() {
        store
            .upsert(req(rest, Some(id.clone())))
            .await
            .map_err(|e| log(&e))?;
    }
    Ok(id)
}
