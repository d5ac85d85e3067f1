//! Downstream events (`docs/api.md`, "Downstream events"): what the rest of the system learns without
//! polling: a sync v2 job ended; a conversation was created or updated; a user's conversations were
//! unlocked by a payment.
//!
//! - [`Events`]: the publisher every part of the engine holds. `publish` never blocks and never fails the
//!   caller: the event goes into a bounded queue; a full queue drops it, counted
//!   (`voicegate_events_dropped_total{reason="queue_full"}`).
//! - With Redis: one task appends the queue to the stream [`STREAM_KEY`] (`XADD … MAXLEN ~ <max>`), retrying
//!   a failed append with the house [`Backoff`] up to [`MAX_TRIES`] times, then dropping it, counted
//!   (`reason="store_failed"`). Consumers read the stream with a consumer group; delivery is **at least
//!   once**: `(type, id, version)` is the idempotency key.
//! - Without Redis: a bounded in-process broadcast ([`Events::subscribe`]); a receiver that falls behind
//!   loses the oldest events and is told how many (tokio's `Lagged`).
//!
//! [`ConversationEvents`] wraps a [`ConversationStore`] so that every write path (sync v1 and v2, live
//! sessions, payments) publishes without knowing about it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::conversation::{
    Conversation, ConversationError, ConversationPage, ConversationStore, SegmentsAdded,
    TranscriptSegment, TranscriptStatus, Upsert, UpsertOutcome,
};
use crate::store::connection::RedisConnection;
use crate::telemetry::{EVENTS_DROPPED_TOTAL, EVENTS_PUBLISHED_TOTAL};
use crate::time::{Backoff, Clock};

/// The Redis stream of downstream events (not a user's key: one cluster slot).
pub const STREAM_KEY: &str = "vg:events";
/// Events waiting for the Redis append, at most.
pub const QUEUE: usize = 4_096;
/// Appends tried per event before it is dropped (counted).
pub const MAX_TRIES: u32 = 5;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A sync v2 job reached `completed`, `partial_failure` or `failed` (`id`: the job id).
    SyncJobEnded,
    /// A conversation was created (`id`: the conversation id).
    ConversationCreated,
    /// Spans were added to a conversation, or it was touched again by a retry (`id`: the conversation id).
    ConversationUpdated,
    /// A payment unlocked the user's conversations (`id`: the uid; `data.count`: how many were locked).
    ConversationsUnlocked,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SyncJobEnded => "sync_job_ended",
            EventKind::ConversationCreated => "conversation_created",
            EventKind::ConversationUpdated => "conversation_updated",
            EventKind::ConversationsUnlocked => "conversations_unlocked",
        }
    }
}

/// One event. `(kind, id, version)` identifies it: a consumer that saw it already skips it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub kind: EventKind,
    pub uid: String,
    pub id: String,
    /// Increases with each change of `id` (the write's time in ms).
    pub version: u64,
    /// Kind-specific fields (a job's `status`, `speech_ms`, …).
    pub data: serde_json::Value,
}

/// The publisher. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    sink: Sink,
}

#[derive(Clone)]
enum Sink {
    Redis(mpsc::Sender<Event>),
    Local(broadcast::Sender<Event>),
}

impl Events {
    /// Events appended to [`STREAM_KEY`], trimmed to about `max_len` entries. Starts the appending task on
    /// the current tokio runtime.
    pub fn redis(conn: RedisConnection, max_len: u64) -> Events {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(append(conn, rx, max_len));
        Events {
            sink: Sink::Redis(tx),
        }
    }

    /// Events in a bounded in-process broadcast (the embedded single-node store).
    pub fn local() -> Events {
        let (tx, _) = broadcast::channel(QUEUE);
        Events {
            sink: Sink::Local(tx),
        }
    }

    /// Queues `event`; never blocks (a full queue drops it, counted).
    pub fn publish(&self, event: Event) {
        let kind = event.kind.as_str();
        match &self.sink {
            Sink::Redis(tx) => {
                if tx.try_send(event).is_err() {
                    metrics::counter!(EVENTS_DROPPED_TOTAL, "reason" => "queue_full").increment(1);
                    return;
                }
            }
            // No receiver is not a loss: nobody in this process consumes events.
            Sink::Local(tx) => {
                let _ = tx.send(event);
            }
        }
        metrics::counter!(EVENTS_PUBLISHED_TOTAL, "type" => kind).increment(1);
    }

    /// The in-process events from now on (`None` with Redis: read the stream).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        match &self.sink {
            Sink::Local(tx) => Some(tx.subscribe()),
            Sink::Redis(_) => None,
        }
    }
}

/// The Redis appender: one event at a time, in order.
async fn append(mut conn: RedisConnection, mut rx: mpsc::Receiver<Event>, max_len: u64) {
    while let Some(event) = rx.recv().await {
        let data = event.data.to_string();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut tries = 0;
        loop {
            tries += 1;
            let result: Result<String, redis::RedisError> = redis::cmd("XADD")
                .arg(STREAM_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len.max(1))
                .arg("*")
                .arg("type")
                .arg(event.kind.as_str())
                .arg("uid")
                .arg(&event.uid)
                .arg("id")
                .arg(&event.id)
                .arg("version")
                .arg(event.version)
                .arg("data")
                .arg(&data)
                .query_async(&mut conn)
                .await;
            match result {
                Ok(_) => break,
                Err(error) if tries >= MAX_TRIES => {
                    tracing::warn!(message = "A downstream event could not be appended; dropped.", kind = event.kind.as_str(), id = %event.id, %error);
                    metrics::counter!(EVENTS_DROPPED_TOTAL, "reason" => "store_failed")
                        .increment(1);
                    break;
                }
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        }
    }
}

/// A conversation store that publishes its writes (see the module docs).
pub struct ConversationEvents {
    inner: Arc<dyn ConversationStore>,
    events: Events,
    clock: Arc<dyn Clock>,
}

impl ConversationEvents {
    pub fn new(inner: Arc<dyn ConversationStore>, events: Events, clock: Arc<dyn Clock>) -> Self {
        ConversationEvents {
            inner,
            events,
            clock,
        }
    }

    fn publish(&self, kind: EventKind, uid: &str, id: &str, data: serde_json::Value) {
        self.events.publish(Event {
            kind,
            uid: uid.to_owned(),
            id: id.to_owned(),
            version: self.clock.now_ms(),
            data,
        });
    }
}

impl ConversationStore for ConversationEvents {
    fn upsert(&self, req: Upsert) -> BoxFuture<'_, Result<UpsertOutcome, ConversationError>> {
        Box::pin(async move {
            let uid = req.uid.clone();
            let locked = req.locked;
            let outcome = self.inner.upsert(req).await?;
            let data = serde_json::json!({ "locked": locked });
            for id in &outcome.new {
                self.publish(EventKind::ConversationCreated, &uid, id, data.clone());
            }
            for id in &outcome.updated {
                self.publish(EventKind::ConversationUpdated, &uid, id, data.clone());
            }
            Ok(outcome)
        })
    }

    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        Box::pin(async move {
            let n = self.inner.unlock_all(uid).await?;
            if n > 0 {
                self.publish(
                    EventKind::ConversationsUnlocked,
                    uid,
                    uid,
                    serde_json::json!({ "count": n }),
                );
            }
            Ok(n)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::MemoryConversationStore;
    use crate::time::{ManualClock, Span};

    #[actix::test]
    async fn conversation_writes_and_unlocks_are_published_in_process() {
        let clock = ManualClock::new(1_790_000_000_000);
        let events = Events::local();
        let mut rx = events.subscribe().unwrap();
        let store = ConversationEvents::new(
            Arc::new(MemoryConversationStore::new(clock.clone())),
            events.clone(),
            clock.clone(),
        );
        let upsert = |locked| Upsert {
            uid: "u".into(),
            spans: vec![Span {
                start: 1_789_999_000_000,
                end: 1_789_999_010_000,
            }],
            locked,
            source: "omi".into(),
            target: None,
        };
        let first = store.upsert(upsert(true)).await.unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!(ev.kind, EventKind::ConversationCreated);
        assert_eq!(ev.id, first.new[0]);
        assert_eq!(ev.data["locked"], true);
        store.upsert(upsert(true)).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap().kind,
            EventKind::ConversationUpdated
        );
        assert_eq!(store.unlock_all("u").await.unwrap(), 1);
        let ev = rx.recv().await.unwrap();
        assert_eq!(ev.kind, EventKind::ConversationsUnlocked);
        assert_eq!(ev.data["count"], 1);
        // Nothing more to unlock: no event.
        assert_eq!(store.unlock_all("u").await.unwrap(), 0);
        assert!(rx.try_recv().is_err());
    }
}
