//! Conversations: the user's recordings grouped in time, with the paywall lock.
//!
//! VoiceGate keeps the conversation *index* (ids, time spans, lock flag, source) and, beside it, each
//! conversation's transcript ([`transcript`]: final segments added by id, bounded, and the transcription status
//! of its sync spans). Sync uploads and realtime sessions both go through [`ConversationStore::upsert`], which
//! creates or merges, serialised per user so retries and parallel uploads never duplicate a conversation:
//!
//! - A span (absolute epoch ms) joins a conversation when it overlaps it or lies within
//!   [`MERGE_GAP_MS`] of it (the reference's "closest conversation to the timestamps"), as long as the
//!   conversation stays within [`MAX_CONVERSATION_MS`]; otherwise it starts a new one. With a `target` id (the
//!   sync `conversation_id` parameter) every span joins that conversation when it exists.
//! - A span already present (start and end equal after rounding to 10 ms) is a duplicate and changes nothing:
//!   a re-upload answers the same ids under `updated_memories`.
//! - A locked request locks the conversations it touches; only [`ConversationStore::unlock_all`] (a payment)
//!   clears locks, all of a user's at once (the reference's all-or-nothing unlock).
//!
//! Storage is bucketed by the UTC day a conversation started (`day-id` ids), so an upsert reads only the days
//! around its spans and a user's history never has to fit one value.
//!
//! Retention: conversations and transcripts are kept until deleted: one by its owner
//! ([`ConversationStore::delete`]) or all of a user's ([`ConversationStore::delete_all`], the admin route).

mod logic;
mod memory;
mod redis_store;
pub mod transcript;

use crate::time::Span;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use logic::{DAY_MS, apply_upsert, day_of, days_to_read};
pub use memory::MemoryConversationStore;
pub use redis_store::RedisConversationStore;
pub use transcript::{SegmentsAdded, TranscriptSegment, TranscriptStatus};

/// Spans closer than this to a conversation join it (the reference's merge distance for sync).
pub const MERGE_GAP_MS: u64 = 120_000;
/// A conversation never grows beyond this length (the reference's longest realtime conversation, 4 h).
pub const MAX_CONVERSATION_MS: u64 = 4 * 3_600_000;
/// Spans one upsert may carry (a sync request of 64 files yields far fewer).
pub const MAX_SPANS_PER_UPSERT: usize = 10_000;
/// Spans one conversation keeps; beyond it a new conversation starts.
pub const MAX_SPANS_PER_CONVERSATION: usize = 5_000;
/// Largest page of [`ConversationStore::list`].
pub const MAX_LIST_LIMIT: usize = 200;

/// The duplicate key of a span: both ends rounded to 10 ms (the reference rounds to 0.01 s).
pub fn dedup_key(span: &Span) -> (u64, u64) {
    ((span.start + 5) / 10, (span.end + 5) / 10)
}

/// One conversation as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// The recorded spans in absolute UTC epoch ms, sorted by start.
    pub spans: Vec<Span>,
    pub is_locked: bool,
    /// `omi`, `limitless`, `realtime`, …
    pub source: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Conversation {
    /// The recorded time (sum of span lengths; spans never overlap).
    pub fn recorded_ms(&self) -> u64 {
        self.spans.iter().map(Span::len).sum()
    }

    /// The UTC day (since the epoch) of the bucket this conversation lives in, from its id.
    pub fn day_of_id(id: &str) -> Option<u64> {
        let (day, rest) = id.split_once('-')?;
        if rest.is_empty()
            || rest.len() > 64
            || !rest.bytes().all(|b| b.is_ascii_alphanumeric())
            || day.len() > 7
        {
            return None;
        }
        day.parse().ok()
    }
}

/// What to create or merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upsert {
    pub uid: String,
    pub spans: Vec<Span>,
    pub locked: bool,
    pub source: String,
    /// Attach every span to this conversation when it exists (and is the caller's).
    pub target: Option<String>,
}

/// The ids touched: `new` were created, `updated` received spans or were all-duplicates. Sorted, unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpsertOutcome {
    pub new: Vec<String>,
    pub updated: Vec<String>,
}

/// A page of a user's conversations, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConversationPage {
    pub conversations: Vec<Conversation>,
    /// More exist after this page.
    pub more: bool,
}

/// Errors of the conversation store.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error("conversation store unavailable: {0}")]
    Unavailable(String),
    #[error("conversation store busy: {0} concurrent writers kept conflicting")]
    Contended(u32),
    #[error("conversation data is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The conversation does not exist (any more) for this user.
    #[error("no such conversation")]
    NotFound,
}

impl ConversationError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ConversationError::Unavailable(_) => "conversation_store_unavailable",
            ConversationError::Contended(_) => "conversation_store_busy",
            ConversationError::Corrupt(_) => "conversation_store_corrupt",
            ConversationError::Invalid(_) => "conversation_invalid",
            ConversationError::NotFound => "conversation_not_found",
        }
    }
}

/// Where conversations live. Implementations serialise writes per user (also across nodes for Redis).
pub trait ConversationStore: Send + Sync + 'static {
    /// Create or merge. Idempotent: the same spans again change nothing and answer the same ids.
    fn upsert(&self, req: Upsert) -> BoxFuture<'_, Result<UpsertOutcome, ConversationError>>;
    /// One of `uid`'s conversations (`None` when missing or another user's: indistinguishable).
    fn get<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Conversation>, ConversationError>>;
    /// `uid`'s conversations, newest first.
    fn list<'a>(
        &'a self,
        uid: &'a str,
        limit: usize,
        offset: usize,
    ) -> BoxFuture<'a, Result<ConversationPage, ConversationError>>;
    /// Clears the lock of every conversation of `uid`; returns how many were locked. Idempotent.
    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>>;
    /// Adds final transcript segments to one of `uid`'s conversations, by segment id (the same id again
    /// replaces: retries are idempotent); past [`transcript::MAX_SEGMENTS_PER_CONVERSATION`] new ids are
    /// refused. [`ConversationError::NotFound`] when the conversation is missing or another user's.
    fn add_segments<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        segments: Vec<TranscriptSegment>,
    ) -> BoxFuture<'a, Result<SegmentsAdded, ConversationError>>;
    /// The transcript of one of `uid`'s conversations, in time order (empty when it has none or is missing).
    fn transcript<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<TranscriptSegment>, ConversationError>>;
    /// Sets the transcription status of stretches of one of `uid`'s conversations, by key (a sync span's
    /// `<content sha256>:<start ms>-<end ms>`; the same key again replaces). Past
    /// [`transcript::MAX_SPAN_STATUSES_PER_CONVERSATION`] new keys are ignored. [`ConversationError::NotFound`]
    /// when the conversation is missing or another user's.
    fn set_span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> BoxFuture<'a, Result<(), ConversationError>>;
    /// The span statuses of one of `uid`'s conversations (empty when it has none or is missing).
    fn span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<
        'a,
        Result<std::collections::BTreeMap<String, TranscriptStatus>, ConversationError>,
    >;
    /// Deletes one of `uid`'s conversations with its transcript; `false` when there was none.
    fn delete<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ConversationError>>;
    /// Deletes every conversation of `uid` with their transcripts; returns how many conversations.
    fn delete_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>>;
}

/// Validates and normalises spans: drops empty ones, sorts, bounds the count.
pub fn normalise_spans(mut spans: Vec<Span>) -> Result<Vec<Span>, ConversationError> {
    if spans.len() > MAX_SPANS_PER_UPSERT {
        return Err(ConversationError::Invalid(format!(
            "{} spans in one request (at most {MAX_SPANS_PER_UPSERT})",
            spans.len()
        )));
    }
    spans.retain(|s| s.end > s.start);
    spans.sort_unstable();
    spans.dedup_by_key(|s| dedup_key(s));
    Ok(spans)
}

/// A fresh conversation id in the bucket of `day`: `<day>-<32 hex>`.
pub fn new_id(day: u64) -> String {
    let n: u128 = rand::random();
    format!("{day}-{n:032x}")
}
