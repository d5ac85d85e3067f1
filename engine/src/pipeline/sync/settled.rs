//! A sync settled up to its transcription ([`Settled`]), and what any outcome reports.

use super::transcribe::{self, SpanWork};
use super::{SyncOutcome, SyncReport, SyncServices};
use crate::policy::SttAllowance;

/// A sync whose speech is metered and whose conversations are written; transcribing its spans is what is
/// left ([`Settled::transcribe`]).
pub struct Settled {
    pub(super) outcome: SyncOutcome,
    pub(super) uid: String,
    pub(super) stt: SttAllowance,
    /// The conversations the sync created or updated.
    pub(super) touched: Vec<String>,
    pub(super) work: Vec<SpanWork>,
}

impl Settled {
    /// The outcome before transcription: `transcript_status` is `pending` when spans are to be transcribed
    /// ([`Settled::transcribing`]), absent otherwise.
    pub fn outcome(&self) -> &SyncOutcome {
        &self.outcome
    }

    /// Whether [`Settled::transcribe`] has spans to send (a provider other than `none`, and spans).
    pub fn transcribing(&self) -> bool {
        self.outcome.report().transcript_status.is_some()
    }

    /// Transcribes the spans (`transcribe.rs`) and returns the final outcome.
    pub async fn transcribe(self, services: &SyncServices) -> SyncOutcome {
        let Settled {
            mut outcome,
            uid,
            stt,
            touched,
            work,
        } = self;
        if work.is_empty() {
            return outcome;
        }
        let transcribed = transcribe::transcribe(services, &uid, stt, &touched, work).await;
        let report = outcome.report_mut();
        report.transcript_status = transcribed.status;
        report.stt_ms = transcribed.stt_ms;
        outcome
    }
}

impl SyncOutcome {
    /// The report, whatever the outcome.
    pub fn report(&self) -> &SyncReport {
        match self {
            SyncOutcome::Done(report)
            | SyncOutcome::NoValidFiles { report, .. }
            | SyncOutcome::BackfillAllowanceExhausted { report, .. } => report,
        }
    }

    fn report_mut(&mut self) -> &mut SyncReport {
        match self {
            SyncOutcome::Done(report)
            | SyncOutcome::NoValidFiles { report, .. }
            | SyncOutcome::BackfillAllowanceExhausted { report, .. } => report,
        }
    }
}
