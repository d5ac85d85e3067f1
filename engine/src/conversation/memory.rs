//! The embedded in-memory conversation store (single node, not durable), for `voicegate serve` without Redis
//! and for tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;

use super::logic::{apply_upsert, days_to_read, page, unlock_bucket};
use super::{
    Conversation, ConversationError, ConversationPage, ConversationStore, Upsert, UpsertOutcome,
    normalise_spans,
};
use crate::time::{Clock, SystemClock};

type Buckets = BTreeMap<u64, Vec<Conversation>>;

/// Conversations in process memory, one mutex for all users (upserts are short and rare next to audio).
pub struct MemoryConversationStore {
    users: Mutex<HashMap<String, Buckets>>,
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

    fn users(&self) -> MutexGuard<'_, HashMap<String, Buckets>> {
        // Every write replaces whole values after the pure merge succeeded: a poisoned map is consistent.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn upsert_now(&self, req: &Upsert) -> Result<UpsertOutcome, ConversationError> {
        let spans = normalise_spans(req.spans.clone())?;
        let days = days_to_read(&spans, req.target.as_deref());
        let now = self.clock.now_ms();
        let mut users = self.users();
        let stored = users.entry(req.uid.clone()).or_default();
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
        let found = Conversation::day_of_id(id).and_then(|day| {
            self.users()
                .get(uid)
                .and_then(|b| b.get(&day))
                .and_then(|b| b.iter().find(|c| c.id == id).cloned())
        });
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
            .map(|b| b.values().flatten().cloned().collect())
            .unwrap_or_default();
        let result = page(all, limit, offset);
        Box::pin(async move { Ok(result) })
    }

    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        let now = self.clock.now_ms();
        let n = self
            .users()
            .get_mut(uid)
            .map(|b| b.values_mut().map(|v| unlock_bucket(v, now)).sum())
            .unwrap_or(0);
        Box::pin(async move { Ok(n) })
    }
}
