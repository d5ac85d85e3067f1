//! The embedded in-memory conversation store (single node, not durable), for `voicegate serve` without Redis
//! and for tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;

use super::logic::{apply_upsert, days_to_read, page, unlock_bucket};
use super::transcript::{
    MAX_SEGMENTS_PER_CONVERSATION, MAX_SPAN_STATUSES_PER_CONVERSATION, SegmentsAdded,
    TranscriptSegment, TranscriptStatus, check_segments, sort_segments,
};
use super::{
    Conversation, ConversationError, ConversationPage, ConversationStore, Upsert, UpsertOutcome,
    normalise_spans,
};
use crate::time::{Clock, SystemClock};

type Buckets = BTreeMap<u64, Vec<Conversation>>;

/// One user's conversations (day buckets) and their transcripts (conversation id → segment id → segment).
#[derive(Default)]
struct User {
    buckets: Buckets,
    transcripts: HashMap<String, BTreeMap<String, TranscriptSegment>>,
    /// Conversation id → span key → transcription status.
    statuses: HashMap<String, BTreeMap<String, TranscriptStatus>>,
}

impl User {
    fn find(&self, id: &str) -> Option<&Conversation> {
        let day = Conversation::day_of_id(id)?;
        self.buckets.get(&day)?.iter().find(|c| c.id == id)
    }
}

/// Conversations in process memory, one mutex for all users (upserts are short and rare next to audio).
pub struct MemoryConversationStore {
    users: Mutex<HashMap<String, User>>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryConversationStore {
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl MemoryConversationStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryConversationStore {
            users: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn users(&self) -> MutexGuard<'_, HashMap<String, User>> {
        // Every write replaces whole values after the pure merge succeeded: a poisoned map is consistent.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn upsert_now(&self, req: &Upsert) -> Result<UpsertOutcome, ConversationError> {
        let spans = normalise_spans(req.spans.clone())?;
        let days = days_to_read(&spans, req.target.as_deref());
        let now = self.clock.now_ms();
        let mut users = self.users();
        let stored = &mut users.entry(req.uid.clone()).or_default().buckets;
        // Work on a copy of the buckets read, then write back: the same shape as the Redis store.
        let mut read: Buckets = days
            .iter()
            .filter_map(|d| stored.get(d).map(|b| (*d, b.clone())))
            .collect();
        let (outcome, changed) = apply_upsert(&mut read, req, now)?;
        for day in changed {
            if let Some(bucket) = read.remove(&day) {
                stored.insert(day, bucket);
            }
        }
        Ok(outcome)
    }

    fn add_now(
        &self,
        uid: &str,
        id: &str,
        segments: Vec<TranscriptSegment>,
    ) -> Result<SegmentsAdded, ConversationError> {
        check_segments(&segments)?;
        let mut users = self.users();
        let user = users.get_mut(uid).ok_or(ConversationError::NotFound)?;
        if user.find(id).is_none() {
            return Err(ConversationError::NotFound);
        }
        let kept = user.transcripts.entry(id.to_owned()).or_default();
        let mut added = SegmentsAdded::default();
        for seg in segments {
            if kept.contains_key(&seg.id) || kept.len() < MAX_SEGMENTS_PER_CONVERSATION {
                kept.insert(seg.id.clone(), seg);
                added.stored += 1;
            } else {
                added.refused += 1;
            }
        }
        Ok(added)
    }

    fn set_statuses_now(
        &self,
        uid: &str,
        id: &str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> Result<(), ConversationError> {
        let mut users = self.users();
        let user = users.get_mut(uid).ok_or(ConversationError::NotFound)?;
        if user.find(id).is_none() {
            return Err(ConversationError::NotFound);
        }
        let kept = user.statuses.entry(id.to_owned()).or_default();
        for (key, status) in statuses {
            if kept.contains_key(&key) || kept.len() < MAX_SPAN_STATUSES_PER_CONVERSATION {
                kept.insert(key, status);
            }
        }
        Ok(())
    }

    fn delete_now(&self, uid: &str, id: &str) -> bool {
        let mut users = self.users();
        let Some(user) = users.get_mut(uid) else {
            return false;
        };
        user.transcripts.remove(id);
        user.statuses.remove(id);
        let Some(bucket) = Conversation::day_of_id(id).and_then(|d| user.buckets.get_mut(&d))
        else {
            return false;
        };
        let before = bucket.len();
        bucket.retain(|c| c.id != id);
        before != bucket.len()
    }
}

impl ConversationStore for MemoryConversationStore {
    fn upsert(&self, req: Upsert) -> BoxFuture<'_, Result<UpsertOutcome, ConversationError>> {
        let result = self.upsert_now(&req);
        Box::pin(async move { result })
    }

    fn get<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Conversation>, ConversationError>> {
        let found = self.users().get(uid).and_then(|u| u.find(id).cloned());
        Box::pin(async move { Ok(found) })
    }

    fn list<'a>(
        &'a self,
        uid: &'a str,
        limit: usize,
        offset: usize,
    ) -> BoxFuture<'a, Result<ConversationPage, ConversationError>> {
        let all: Vec<Conversation> = self
            .users()
            .get(uid)
            .map(|u| u.buckets.values().flatten().cloned().collect())
            .unwrap_or_default();
        let result = page(all, limit, offset);
        Box::pin(async move { Ok(result) })
    }

    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        let now = self.clock.now_ms();
        let n = self
            .users()
            .get_mut(uid)
            .map(|u| u.buckets.values_mut().map(|v| unlock_bucket(v, now)).sum())
            .unwrap_or(0);
        Box::pin(async move { Ok(n) })
    }

    fn add_segments<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        segments: Vec<TranscriptSegment>,
    ) -> BoxFuture<'a, Result<SegmentsAdded, ConversationError>> {
        let result = self.add_now(uid, id, segments);
        Box::pin(async move { result })
    }

    fn transcript<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<TranscriptSegment>, ConversationError>> {
        let mut segments: Vec<TranscriptSegment> = self
            .users()
            .get(uid)
            .and_then(|u| u.transcripts.get(id))
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        sort_segments(&mut segments);
        Box::pin(async move { Ok(segments) })
    }

    fn set_span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> BoxFuture<'a, Result<(), ConversationError>> {
        let result = self.set_statuses_now(uid, id, statuses);
        Box::pin(async move { result })
    }

    fn span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, TranscriptStatus>, ConversationError>> {
        let found = self
            .users()
            .get(uid)
            .and_then(|u| u.statuses.get(id).cloned())
            .unwrap_or_default();
        Box::pin(async move { Ok(found) })
    }

    fn delete<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ConversationError>> {
        let deleted = self.delete_now(uid, id);
        Box::pin(async move { Ok(deleted) })
    }

    fn delete_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        let n = self.users().remove(uid).map_or(0, |u| {
            u.buckets.values().map(|b| b.len() as u64).sum::<u64>()
        });
        Box::pin(async move { Ok(n) })
    }
}
