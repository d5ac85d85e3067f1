//! A sync v2 job's record (stored as JSON by [`voicegate_engine::store::sync_jobs`]) and the status body
//! `GET /v2/sync-local-files/{job_id}` answers with (`docs/api.md`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// `queued` → `running` → `completed` | `partial_failure` | `failed` (the reference's words). A job whose
/// backdated files wait for tomorrow's allowance, or whose run the server must retry, is `queued` again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    PartialFailure,
    Failed,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::PartialFailure | JobStatus::Failed
        )
    }
}

/// Where a running job is (the reference's `stage`). VoiceGate decodes and segments a file in one pass
/// (`decoding`: the reference's `decoding` and `vad`), then meters it, writes its conversations and
/// transcribes its spans (`processing`: the reference's `processing` and `stt_llm`); a job moves through
/// both once per file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStage {
    Decoding,
    Processing,
}

/// One file's state in its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileState {
    /// Not settled yet (or to be settled again after a crash: metering is keyed by content).
    Pending,
    /// Settled (its result is final: ok, truncated, duplicate or failed).
    Done,
    /// Backdated speech past today's allowance: runs again once the job resumes.
    Deferred,
}

/// One spooled file of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    /// The name the client sent.
    pub name: String,
    /// The file in the job's spool folder.
    pub spool_name: String,
    pub sha256: String,
    pub bytes: u64,
    /// `sync_fresh`, `sync_backfill` or `too_old`, judged at upload from the name (`unknown` when the name
    /// is invalid: the file then fails on its own).
    pub lane: String,
    pub state: FileState,
    /// Decoded in the current run (its segments are known).
    #[serde(default)]
    pub decoded: bool,
    /// The file's conversation segments, once decoded.
    pub segments: u64,
    /// The file's v1 result (`files[]` of the v1 body), once settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// Why a job failed as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// Time spent per stage, summed over the job's files and runs (the reference's `stage_timings`, with
/// VoiceGate's two stages: `decode_ms` includes the VAD, `processing_ms` the transcription).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimings {
    pub decode_ms: u64,
    pub processing_ms: u64,
    pub total_ms: u64,
}

/// Which endpoint made a job. A v1 upload is a job too, run at once by the request's node under its lease
/// (`crate::sync`): its files are settled once (no deferral, no background retry of a failed file: the v1
/// answer tells the client what to retry), and only its transcription may outlive the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    #[default]
    V2,
    V1,
}

/// A job, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub uid: String,
    pub status: JobStatus,
    pub stage: Option<JobStage>,
    /// Conversations created now are locked (the credit lock read at upload).
    pub locked: bool,
    /// `?conversation_id=` of the upload.
    pub target: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// When a queued job runs again (deferred backdated files, or a retry after a server-side failure).
    pub resumes_at_ms: Option<u64>,
    /// Runs started (a crash, a drain or a deferral starts another).
    pub attempts: u32,
    pub files: Vec<JobFile>,
    pub new_memories: Vec<String>,
    pub updated_memories: Vec<String>,
    pub speech_ms: u64,
    pub metered_speech_ms: u64,
    pub stt_ms: u64,
    /// The worst transcription status so far (`done`, `pending`, `budget_exhausted`, `failed`).
    pub transcript_status: Option<String>,
    pub timings: StageTimings,
    pub error: Option<JobError>,
    #[serde(default)]
    pub origin: Origin,
}

impl JobRecord {
    /// A new job's record, queued at `now`: nothing run, metered or transcribed yet. `conversations` is the
    /// upload's credit lock and `?conversation_id=` target.
    pub fn queued(
        job_id: String,
        uid: String,
        files: Vec<JobFile>,
        conversations: (bool, Option<String>),
        now: u64,
        origin: Origin,
    ) -> JobRecord {
        let (locked, target) = conversations;
        JobRecord {
            job_id,
            uid,
            status: JobStatus::Queued,
            stage: None,
            locked,
            target,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            resumes_at_ms: None,
            attempts: 0,
            files,
            new_memories: Vec::new(),
            updated_memories: Vec::new(),
            speech_ms: 0,
            metered_speech_ms: 0,
            stt_ms: 0,
            transcript_status: None,
            timings: StageTimings::default(),
            error: None,
            origin,
        }
    }

    /// Whether the job holds backdated files (the backfill lane).
    pub fn is_backfill(&self) -> bool {
        self.files.iter().any(|f| f.lane == "sync_backfill")
    }

    pub fn total_segments(&self) -> u64 {
        self.files.iter().map(|f| f.segments).sum()
    }

    fn file_failed(f: &JobFile) -> bool {
        f.result
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(Value::as_str)
            == Some("failed")
    }

    /// Segments of settled files (successful + failed).
    pub fn processed_segments(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.state == FileState::Done)
            .map(|f| f.segments)
            .sum()
    }

    pub fn failed_segments(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.state == FileState::Done && Self::file_failed(f))
            .map(|f| f.segments)
            .sum()
    }

    pub fn failed_files(&self) -> usize {
        self.files
            .iter()
            .filter(|f| f.state == FileState::Done && Self::file_failed(f))
            .count()
    }

    /// The terminal status once every file is settled.
    pub fn final_status(&self) -> JobStatus {
        let failed = self.failed_files();
        if self.files.is_empty() || failed == 0 {
            JobStatus::Completed
        } else if failed == self.files.len() {
            JobStatus::Failed
        } else {
            JobStatus::PartialFailure
        }
    }

    /// Errors of failed files, as the reference lists them (at most 10 strings).
    fn errors(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|f| Self::file_failed(f))
            .filter_map(|f| {
                let r = f.result.as_ref()?;
                let code = r.get("code").and_then(Value::as_str).unwrap_or("failed");
                Some(format!("{}: {code}", f.name))
            })
            .take(10)
            .collect()
    }

    /// The v1 body of the job's files (`result` of a terminal job).
    fn result(&self) -> Value {
        let files: Vec<Value> = self.files.iter().filter_map(|f| f.result.clone()).collect();
        let mut body = json!({
            "new_memories": self.new_memories,
            "updated_memories": self.updated_memories,
            "speech_ms": self.speech_ms,
            "metered_speech_ms": self.metered_speech_ms,
            "locked": self.locked,
            "stt_ms": self.stt_ms,
            "files": files,
            "total_segments": self.total_segments(),
            "failed_segments": self.failed_segments(),
            "errors": self.errors(),
            "stage_timings": self.timings,
        });
        if let (Some(status), Some(obj)) = (&self.transcript_status, body.as_object_mut()) {
            obj.insert("transcript_status".into(), json!(status));
        }
        body
    }

    /// Files per lane (`sync_fresh`, `sync_backfill`, …) and per state.
    fn lanes(&self) -> Value {
        let mut lanes = Map::new();
        for f in &self.files {
            let entry = lanes
                .entry(f.lane.clone())
                .or_insert_with(|| json!({"files": 0, "done": 0, "deferred": 0}));
            let bump = |v: &mut Value, k: &str| {
                if let Some(n) = v.get_mut(k) {
                    *n = json!(n.as_u64().unwrap_or(0) + 1);
                }
            };
            bump(entry, "files");
            match f.state {
                FileState::Done => bump(entry, "done"),
                FileState::Deferred => bump(entry, "deferred"),
                FileState::Pending => {}
            }
        }
        Value::Object(lanes)
    }

    /// The status body (`docs/api.md`).
    pub fn view(&self) -> Value {
        let processed = self.processed_segments();
        let failed = self.failed_segments();
        let mut body = json!({
            "job_id": self.job_id,
            "status": self.status,
            "stage": self.stage,
            "total_files": self.files.len(),
            "processed_files": self.files.iter().filter(|f| f.state == FileState::Done).count(),
            "decoded_files": self.files.iter().filter(|f| f.decoded || f.state == FileState::Done).count(),
            "total_segments": self.total_segments(),
            "processed_segments": processed,
            "successful_segments": processed - failed,
            "failed_segments": failed,
            "speech_ms": self.speech_ms,
            "lanes": self.lanes(),
            "attempts": self.attempts,
            "origin": self.origin,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
            "resumes_at_ms": self.resumes_at_ms,
            "poll_after_ms": if self.status.is_terminal() { Value::Null } else { json!(POLL_AFTER_MS) },
        });
        if let Some(obj) = body.as_object_mut() {
            if self.status.is_terminal() {
                obj.insert("result".into(), self.result());
                obj.insert("finished_at_ms".into(), json!(self.finished_at_ms));
            }
            if let Some(e) = &self.error {
                obj.insert("error".into(), json!(e));
            }
        }
        body
    }
}

/// How soon a client polls again (the reference's 3 s).
pub const POLL_AFTER_MS: u64 = 3_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn file(state: FileState, status: Option<&str>, segments: u64) -> JobFile {
        JobFile {
            name: "f.bin".into(),
            spool_name: "0.bin".into(),
            sha256: "00".into(),
            bytes: 1,
            lane: "sync_fresh".into(),
            state,
            decoded: false,
            segments,
            result: status.map(|s| json!({"file": "f.bin", "status": s, "code": "bad"})),
        }
    }

    fn record(files: Vec<JobFile>) -> JobRecord {
        JobRecord {
            status: JobStatus::Running,
            attempts: 1,
            ..JobRecord::queued("j".into(), "u".into(), files, (false, None), 0, Origin::V2)
        }
    }

    #[test]
    fn counts_and_final_status_follow_the_files() {
        let r = record(vec![
            file(FileState::Done, Some("ok"), 2),
            file(FileState::Done, Some("failed"), 1),
            file(FileState::Pending, None, 3),
        ]);
        assert_eq!(r.total_segments(), 6);
        assert_eq!(r.processed_segments(), 3);
        assert_eq!(r.failed_segments(), 1);
        assert_eq!(r.final_status(), JobStatus::PartialFailure);
        let v = r.view();
        assert_eq!(v["successful_segments"], 2);
        assert_eq!(v["lanes"]["sync_fresh"]["done"], 2);
        assert!(v.get("result").is_none());
        let all_failed = record(vec![file(FileState::Done, Some("failed"), 0)]);
        assert_eq!(all_failed.final_status(), JobStatus::Failed);
        assert_eq!(record(vec![]).final_status(), JobStatus::Completed);
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let r = record(vec![file(FileState::Deferred, None, 1)]);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<JobRecord>(&text).unwrap(), r);
    }
}
