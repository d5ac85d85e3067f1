//! The messages a user meter actor handles, and what they answer.

use std::sync::Arc;

use actix::Message;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::policy::{RollingTotals, SoftCaps};
use crate::store::{Batch, StoreError};
use crate::time::MonthKey;
use crate::time::samples_to_ms;

/// How much speech a record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpeechAmount {
    Ms(u64),
    /// Converted to ms once, rounding to the nearest ms.
    Samples {
        samples: u64,
        rate_hz: u32,
    },
}

impl SpeechAmount {
    pub fn to_ms(self) -> u64 {
        match self {
            SpeechAmount::Ms(ms) => ms,
            SpeechAmount::Samples { samples, rate_hz } => samples_to_ms(samples, rate_hz),
        }
    }
}

/// Where the speech came from. All sources share one pool; the source only labels metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpeechSource {
    Realtime,
    Sync,
    Other,
}

impl SpeechSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SpeechSource::Realtime => "realtime",
            SpeechSource::Sync => "sync",
            SpeechSource::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A user's metered totals as the actor sees them (store base + its own pending deltas).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub rolling: RollingTotals,
    /// The current UTC month (`yyyymm`) and the speech ms charged in it.
    pub month: MonthKey,
    pub month_ms: u64,
    /// False while the actor could not load the user's base from the store: the totals then hold only
    /// this actor's own pending speech. Callers must admit audio, apply no caps and treat credits as
    /// unavailable.
    pub known: bool,
    /// When read with caps ([`Meter::totals_against`](super::Meter::totals_against)) and a cap is
    /// exceeded: the earliest instant (Unix ms) at which, with no new speech, none is
    /// ([`under_caps_at`](super::under_caps_at)). `None` otherwise.
    pub under_caps_at_ms: Option<u64>,
    /// Read against a hard ceiling too, and the rolling 24 h total is over it: the instant it falls back
    /// to the ceiling with no new speech. `None` otherwise.
    pub under_ceiling_at_ms: Option<u64>,
}

/// What [`Meter::totals_against`](super::Meter::totals_against) computes the moments of: when the totals
/// fall back under `caps`, and when the rolling 24 h falls back to `ceiling_ms` (0 = no ceiling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalsAgainst {
    pub caps: SoftCaps,
    pub ceiling_ms: u64,
}

/// What happened to one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordStatus {
    /// Metered (pending until the next flush).
    Recorded,
    /// Zero ms: nothing to meter.
    Empty,
    /// Its idempotency key was already metered: not counted again.
    Duplicate,
    /// Dropped because pending memory is full (counted in a metric and logged).
    Dropped,
}

/// The answer to a record: its status and the user's totals after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordOutcome {
    pub status: RecordStatus,
    pub totals: UsageTotals,
}

/// Command: meter speech for a user.
#[derive(Clone, Debug)]
pub struct RecordSpeech {
    pub uid: Arc<str>,
    pub amount: SpeechAmount,
    /// Unix ms of the audio's own start (sync: file timestamp + offset; realtime: arrival time).
    pub audio_start_ms: u64,
    pub source: SpeechSource,
    /// Meter this record at most once per user within the retention (e.g. a sync file's content hash).
    pub idempotency_key: Option<String>,
}

impl RecordSpeech {
    pub fn new(
        uid: impl Into<Arc<str>>,
        amount: SpeechAmount,
        audio_start_ms: u64,
        source: SpeechSource,
    ) -> Self {
        Self {
            uid: uid.into(),
            amount,
            audio_start_ms,
            source,
            idempotency_key: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What a flush of one user did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Batches the store acknowledged.
    pub batches: u32,
    /// Speech ms in those batches.
    pub speech_ms: u64,
}

/// Errors of the meter facade.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MeterError {
    #[error("the user's meter actor stopped before answering")]
    ActorGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Facade messages one user actor may have queued at once (its mailbox slots, handed out by the registry).
/// A user's senders are its sessions (one record or read in flight each) and its uploads and requests, so
/// 64 is only reached when the actor's thread is far behind; then senders wait.
pub(crate) const MAILBOX_CAPACITY: usize = 64;

/// A facade message in one of its actor's mailbox slots (the slot is given back when the actor dropped the
/// envelope, i.e. handled the message). Delivered with `do_send` while the registry lock is held, so it is
/// never lost to a retiring actor; answers come back through a oneshot.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Envelope {
    pub msg: UserMsg,
    /// `None` for the control messages outside the bound (see `registry`).
    pub slot: Option<OwnedSemaphorePermit>,
}

impl Envelope {
    pub(crate) fn new(msg: UserMsg, slot: Option<OwnedSemaphorePermit>) -> Self {
        Envelope { msg, slot }
    }
}

/// What the facade asks of a user's actor.
pub(crate) enum UserMsg {
    Record(RecordSpeech, Option<oneshot::Sender<RecordOutcome>>),
    /// With caps: also compute `under_caps_at_ms` (and `under_ceiling_at_ms`) when exceeded.
    ReadTotals(Option<TotalsAgainst>, oneshot::Sender<UsageTotals>),
    FlushNow(oneshot::Sender<Result<FlushReport, MeterError>>),
    RefreshNow(oneshot::Sender<Result<(), MeterError>>),
    Passivate,
}

/// Flusher → actor: hand over the batch to flush (the retried one, or the pending deltas sealed).
#[derive(Message)]
#[rtype(result = "Take")]
pub(crate) struct TakeBatch {
    /// Ignore the retry backoff (shutdown, explicit flush of all).
    pub force: bool,
}

pub(crate) enum Take {
    Batch(Batch),
    /// Dirty, but busy with store I/O or backing off.
    NotNow,
    /// Nothing to flush: the flusher forgets the actor until it registers again.
    Clean,
}

/// Flusher → actor: the store's answer for the batch it took.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct BatchDone {
    pub batch: Batch,
    pub result: Result<crate::store::ApplyOutcome, StoreError>,
}

/// Actor → itself, after leaving the registry: every message sent before is already in the mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Retire;
