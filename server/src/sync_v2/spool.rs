//! The spool's folders: `<spool>/<job id>/` holds a job's files and an `owner` file (the uid, so a folder
//! can be matched to its record without the client), `<spool>/incoming/` the uploads being written.
//!
//! A job's folder is removed when the job ends. [`sweep`] removes the ones left behind: a node that died
//! between a job's end and the removal, or a record that expired (or was deleted) before its job ran.
//! Each node sweeps every [`SWEEP_EVERY`]; folders younger than [`MIN_AGE`] are never touched (an upload
//! between its rename and its record).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use voicegate_engine::store::sync_jobs::SyncJobStore;

use super::record::JobRecord;

/// The file naming a job folder's user.
pub const OWNER_FILE: &str = "owner";
/// How often a node sweeps the spool.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Folders modified more recently than this are left alone.
pub const MIN_AGE: Duration = Duration::from_secs(3_600);

/// Writes the owner file of a job's folder.
pub fn write_owner(dir: &Path, uid: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(OWNER_FILE), uid)
}

/// Removes the job folders under `spool` older than `min_age` whose record is gone or final. Returns how
/// many were removed. A store error keeps the folder (the next sweep decides).
pub async fn sweep(spool: &Path, store: &dyn SyncJobStore, min_age: Duration) -> usize {
    let spool_dir = spool.to_path_buf();
    let candidates =
        match tokio::task::spawn_blocking(move || old_job_folders(&spool_dir, min_age)).await {
            Ok(c) => c,
            Err(_) => return 0,
        };
    let mut removed = 0;
    for (dir, job_id, uid) in candidates {
        let keep = match store.get(&uid, &job_id).await {
            Ok(Some(text)) => serde_json::from_str::<JobRecord>(&text)
                .map(|r| !r.status.is_terminal())
                .unwrap_or(true),
            Ok(None) => false,
            Err(_) => true,
        };
        if keep {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed += 1,
            Err(error) => {
                tracing::warn!(message = "Removing a stale sync spool folder failed.", dir = %dir.display(), %error);
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            message = "Removed stale sync spool folders.",
            folders = removed
        );
    }
    removed
}

/// (folder, job id, uid) of the job folders not modified for `min_age`. Folders without an owner file
/// are not the spool's (or not finished being made) and are left alone.
fn old_job_folders(spool: &Path, min_age: Duration) -> Vec<(PathBuf, String, String)> {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let job_id = e.file_name().to_str()?.to_owned();
            let modified = e.metadata().ok()?.modified().ok()?;
            if !path.is_dir() || now.duration_since(modified).unwrap_or_default() < min_age {
                return None;
            }
            let uid = std::fs::read_to_string(path.join(OWNER_FILE)).ok()?;
            Some((path, job_id, uid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use voicegate_engine::store::sync_jobs::{CreateLimits, MemorySyncJobStore};

    #[actix::test]
    async fn folders_of_live_jobs_stay_and_orphans_or_finished_ones_go() {
        let spool = tempfile::tempdir().unwrap();
        let store = MemorySyncJobStore::new();
        let limits = CreateLimits {
            max_open_per_user: 10,
            max_bytes_per_user: u64::MAX,
            retention_ms: u64::MAX / 4,
        };
        let record = |status: &str| {
            format!(
                r#"{{"job_id":"j","uid":"u","status":"{status}","stage":null,"locked":false,"target":null,
                "created_at_ms":0,"updated_at_ms":0,"finished_at_ms":null,"resumes_at_ms":null,"attempts":0,
                "files":[],"new_memories":[],"updated_memories":[],"speech_ms":0,"metered_speech_ms":0,
                "stt_ms":0,"transcript_status":null,"timings":{{"decode_ms":0,"processing_ms":0,"total_ms":0}},
                "error":null}}"#
            )
        };
        store
            .create("u", "live", &record("queued"), 0, 1, limits)
            .await
            .unwrap();
        store
            .create("u", "done", &record("completed"), 0, 1, limits)
            .await
            .unwrap();
        for id in ["live", "done", "orphan"] {
            let dir = spool.path().join(id);
            std::fs::create_dir(&dir).unwrap();
            write_owner(&dir, "u").unwrap();
        }
        std::fs::create_dir(spool.path().join("incoming")).unwrap(); // no owner: not a job's
        // Too young: nothing is touched.
        assert_eq!(
            sweep(spool.path(), &store, Duration::from_secs(3_600)).await,
            0
        );
        assert_eq!(sweep(spool.path(), &store, Duration::ZERO).await, 2);
        assert!(spool.path().join("live").exists());
        assert!(!spool.path().join("done").exists());
        assert!(!spool.path().join("orphan").exists());
        assert!(spool.path().join("incoming").exists());
    }
}
