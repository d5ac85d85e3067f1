//! Every Redis key VoiceGate writes, in one place.
//!
//! Each key of a user carries the `{uid}` hash tag, so all of a user's keys hash to one Redis Cluster slot
//! and one Lua script may touch them all. All keys of a uid start with the same `vg:{<uid>}` prefix, so even
//! a uid containing `}` yields the same tag for every key of that uid.

/// Hash: field = minute index (`unix_seconds / 60`), value = speech ms in that minute.
pub fn speech_buckets(uid: &str) -> String {
    format!("vg:{{{uid}}}:speech")
}

/// Sorted set: member = minute index, score = minute index. Lets the script prune old buckets in
/// O(log n) instead of scanning the hash.
pub fn speech_minutes(uid: &str) -> String {
    format!("vg:{{{uid}}}:minutes")
}

/// Hash: field = month (`yyyymm`, UTC), value = speech ms charged in that month (month of arrival).
pub fn month_usage(uid: &str) -> String {
    format!("vg:{{{uid}}}:month")
}

/// Hash: field = writer id (32 hex digits), value = the highest batch sequence applied for that writer.
pub fn writer_seqs(uid: &str) -> String {
    format!("vg:{{{uid}}}:writers")
}

/// Sorted set: member = writer id, score = unix ms of its last applied batch (drives writer pruning).
pub fn writer_seen(uid: &str) -> String {
    format!("vg:{{{uid}}}:writer_seen")
}

/// Sorted set: member = idempotency key (e.g. a sync file's content hash), score = unix ms it was metered.
pub fn idempotency_keys(uid: &str) -> String {
    format!("vg:{{{uid}}}:idem")
}

/// Sorted set: member = lease holder id, score = unix ms the holder's lease expires (`store::lease`).
/// One key per limited thing: `vg:{uid}:lease:<kind>` for a per-user limit (e.g. listen sessions),
/// `vg:{uid}:lease:<kind>:<id>` for one job of the user.
pub fn lease(uid: &str, kind: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("vg:{{{uid}}}:lease:{kind}:{id}"),
        None => format!("vg:{{{uid}}}:lease:{kind}"),
    }
}

/// STRING: a sync v2 job's record (JSON, the server's model), expiring after the job retention.
pub fn sync_job(uid: &str, job_id: &str) -> String {
    format!("vg:{{{uid}}}:syncjob:{job_id}")
}

/// Sorted set: member = job id, score = created ms: the user's unfinished sync v2 jobs (the per-user quota).
pub fn sync_jobs_open(uid: &str) -> String {
    format!("vg:{{{uid}}}:syncjobs:open")
}

/// Hash: job id → bytes of the job's spooled files, for each entry of [`sync_jobs_open`] (the per-user
/// spool quota); written and removed with it.
pub fn sync_jobs_bytes(uid: &str) -> String {
    format!("vg:{{{uid}}}:syncjobs:bytes")
}

/// Sorted set: member = `<lane>\t<uid>\t<job id>`, score = due ms: the sync v2 jobs every node's workers
/// run. Not a user's key (one cluster slot); touched a few times per job.
pub const SYNC_JOB_QUEUE: &str = "vg:syncjobs:queue";

/// The keys of the metering script, in its `KEYS[1..6]` order.
pub fn meter_script_keys(uid: &str) -> [String; 6] {
    [
        speech_buckets(uid),
        speech_minutes(uid),
        month_usage(uid),
        writer_seqs(uid),
        writer_seen(uid),
        idempotency_keys(uid),
    ]
}

/// Redis Cluster hash tag of a key: the text between the first `{` and the next `}`.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_user_shares_one_hash_tag() {
        for uid in ["u1", "a:b", "weird}uid", "x{y"] {
            let keys = meter_script_keys(uid);
            let tag = hash_tag(&keys[0]);
            assert!(tag.is_some(), "{uid}");
            for key in &keys {
                assert_eq!(hash_tag(key), tag, "{key}");
            }
        }
        assert_eq!(hash_tag(&speech_buckets("u1")), Some("u1"));
        for uid in ["u1", "weird}uid"] {
            assert_eq!(
                hash_tag(&lease(uid, "listen_session", None)),
                hash_tag(&speech_buckets(uid))
            );
            assert_eq!(
                hash_tag(&sync_jobs_bytes(uid)),
                hash_tag(&sync_jobs_open(uid))
            );
            assert_eq!(
                hash_tag(&lease(uid, "sync_job", Some("j{1}"))),
                hash_tag(&speech_buckets(uid))
            );
        }
    }
}
