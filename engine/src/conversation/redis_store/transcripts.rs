//! The transcript side of the Redis conversation store: segments added to a conversation, the statuses
//! of its sync spans, and reading them back (keys in the parent module's documentation).

use super::*;

/// KEYS: the conversation's bucket, its transcript (or its span statuses: the same guarded write). ARGV: the conversation's `"id":"…"` as serialised, the
/// most segments, then (segment id, JSON) pairs. Returns {stored, refused}, or {-1, 0} when the
/// conversation is not in its bucket.
pub(super) const ADD_SEGMENTS_LUA: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if (not s) or (not string.find(s, ARGV[1], 1, true)) then return {-1, 0} end
local max = tonumber(ARGV[2])
local stored, refused = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 or redis.call('HLEN', KEYS[2]) < max then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    stored = stored + 1
  else
    refused = refused + 1
  end
end
return {stored, refused}
";

impl RedisConversationStore {
    pub(super) async fn add_inner(
        &self,
        uid: &str,
        id: &str,
        segments: Vec<TranscriptSegment>,
    ) -> Result<SegmentsAdded, ConversationError> {
        check_segments(&segments)?;
        let day = Conversation::day_of_id(id).ok_or(ConversationError::NotFound)?;
        if segments.is_empty() {
            return Ok(SegmentsAdded::default());
        }
        let mut inv = self.add_segments.prepare_invoke();
        inv.key(bucket_key(uid, day))
            .key(transcript_key(uid, id))
            .arg(id_needle(id))
            .arg(MAX_SEGMENTS_PER_CONVERSATION);
        for seg in &segments {
            inv.arg(&seg.id)
                .arg(serde_json::to_string(seg).map_err(corrupt)?);
        }
        let mut conn = self.conn.clone();
        let (stored, refused): (i64, i64) =
            inv.invoke_async(&mut conn).await.map_err(store_error)?;
        if stored < 0 {
            return Err(ConversationError::NotFound);
        }
        Ok(SegmentsAdded {
            stored: stored.unsigned_abs(),
            refused: refused.unsigned_abs(),
        })
    }

    pub(super) async fn set_statuses_inner(
        &self,
        uid: &str,
        id: &str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> Result<(), ConversationError> {
        let day = Conversation::day_of_id(id).ok_or(ConversationError::NotFound)?;
        if statuses.is_empty() {
            return Ok(());
        }
        // The segments' guarded write: refused once the conversation left its bucket (deleted).
        let mut inv = self.add_segments.prepare_invoke();
        inv.key(bucket_key(uid, day))
            .key(status_key(uid, id))
            .arg(id_needle(id))
            .arg(MAX_SPAN_STATUSES_PER_CONVERSATION);
        for (key, status) in &statuses {
            inv.arg(key).arg(status.as_str());
        }
        let mut conn = self.conn.clone();
        let (stored, _refused): (i64, i64) =
            inv.invoke_async(&mut conn).await.map_err(store_error)?;
        if stored < 0 {
            return Err(ConversationError::NotFound);
        }
        Ok(())
    }

    pub(super) async fn statuses_inner(
        &self,
        uid: &str,
        id: &str,
    ) -> Result<BTreeMap<String, TranscriptStatus>, ConversationError> {
        if Conversation::day_of_id(id).is_none() {
            return Ok(BTreeMap::new());
        }
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(status_key(uid, id))
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        all.into_iter()
            .map(|(k, v)| match TranscriptStatus::parse(&v) {
                Some(s) => Ok((k, s)),
                None => Err(ConversationError::Corrupt(format!(
                    "unknown transcript status {v:?}"
                ))),
            })
            .collect()
    }

    pub(super) async fn transcript_inner(
        &self,
        uid: &str,
        id: &str,
    ) -> Result<Vec<TranscriptSegment>, ConversationError> {
        if Conversation::day_of_id(id).is_none() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(transcript_key(uid, id))
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut segments = values
            .iter()
            .map(|v| serde_json::from_str(v).map_err(corrupt))
            .collect::<Result<Vec<TranscriptSegment>, _>>()?;
        sort_segments(&mut segments);
        Ok(segments)
    }
}
