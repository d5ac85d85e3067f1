//! A conversation store that holds one user's writes until a gate opens: a test holds that user's sync jobs
//! in their `processing` stage (their files stay spooled, the jobs stay open) for as long as it needs.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use voicegate_engine::conversation::{
    Conversation, ConversationError, ConversationPage, ConversationStore, SegmentsAdded,
    TranscriptSegment, TranscriptStatus, Upsert, UpsertOutcome,
};

/// The engine's conversation store, with `uid`'s upserts held until the gate opens (`true`).
pub struct Gated {
    pub inner: Arc<dyn ConversationStore>,
    pub uid: &'static str,
    pub open: watch::Receiver<bool>,
}

impl ConversationStore for Gated {
    fn upsert(&self, req: Upsert) -> BoxFuture<'_, Result<UpsertOutcome, ConversationError>> {
        let mut open = self.open.clone();
        let held = req.uid == self.uid;
        Box::pin(async move {
            if held {
                let _ = open.wait_for(|o| *o).await;
            }
            self.inner.upsert(req).await
        })
    }
    fn get<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Conversation>, ConversationError>> {
        self.inner.get(uid, id)
    }
    fn list<'a>(
        &'a self,
        uid: &'a str,
        limit: usize,
        offset: usize,
    ) -> BoxFuture<'a, Result<ConversationPage, ConversationError>> {
        self.inner.list(uid, limit, offset)
    }
    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        self.inner.unlock_all(uid)
    }
    fn add_segments<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        segments: Vec<TranscriptSegment>,
    ) -> BoxFuture<'a, Result<SegmentsAdded, ConversationError>> {
        self.inner.add_segments(uid, id, segments)
    }
    fn transcript<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<TranscriptSegment>, ConversationError>> {
        self.inner.transcript(uid, id)
    }
    fn set_span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> BoxFuture<'a, Result<(), ConversationError>> {
        self.inner.set_span_statuses(uid, id, statuses)
    }
    fn span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<
        'a,
        Result<std::collections::BTreeMap<String, TranscriptStatus>, ConversationError>,
    > {
        self.inner.span_statuses(uid, id)
    }
    fn delete<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ConversationError>> {
        self.inner.delete(uid, id)
    }
    fn delete_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        self.inner.delete_all(uid)
    }
}
