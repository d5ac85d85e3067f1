//! Every default of the server, in one place.

/// `VOICEGATE_BIND`.
pub const BIND: &str = "127.0.0.1:8080";
/// `VOICEGATE_STRIPE_TOLERANCE_SECS`: Stripe's own recommendation.
pub const STRIPE_TOLERANCE_SECS: u64 = 300;
/// `VOICEGATE_UPLOAD_MAX_FILE_BYTES`: 64 MiB, about 35 min of 16 kHz PCM or hours of Opus.
pub const UPLOAD_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// `VOICEGATE_UPLOAD_MAX_FILES`.
pub const UPLOAD_MAX_FILES: usize = 64;
/// `VOICEGATE_UPLOAD_MAX_REQUEST_BYTES`: 256 MiB; also bounds the temp storage one request can hold.
pub const UPLOAD_MAX_REQUEST_BYTES: u64 = 256 * 1024 * 1024;
/// `VOICEGATE_WS_MAX_MESSAGE_BYTES`: 64 KiB, far above one Opus packet (≤ 4 KiB) or 1 s of 16 kHz PCM.
pub const WS_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// `VOICEGATE_WS_SESSIONS_PER_USER`.
pub const WS_SESSIONS_PER_USER: usize = 4;
/// `VOICEGATE_WS_MAX_SESSIONS`: listen sessions one node holds at most (each ~40 KiB and a socket; the
/// same bound actix-server put on connections per worker).
pub const WS_MAX_SESSIONS: usize = 25_000;
/// `VOICEGATE_ADMISSION_CPU_PERCENT`: sessions may use 85 % of the process's cores; the rest is headroom for the
/// bursts a one-second estimate does not see (docs/performance.md, "Admission control").
pub const ADMISSION_CPU_PERCENT: u32 = 85;
/// `VOICEGATE_ADMISSION_LAG_MS`: the listen latency objective (p99 of frame → event ≤ 250 ms).
pub const ADMISSION_LAG_MS: u64 = 250;
/// `VOICEGATE_ADMISSION_LATE_PERCENT`: runs that met the objective had 0–1.4 % of session-seconds late, runs
/// past the knee 7–12 % (docs/performance.md, session 10).
pub const ADMISSION_LATE_PERCENT: f64 = 2.0;
/// `VOICEGATE_ADMISSION_WINDOW_SECS`.
pub const ADMISSION_WINDOW_SECS: u64 = 10;
/// `VOICEGATE_ADMISSION_MIN_SESSIONS`: below 20 sessions a node's CPU is mostly its own fixed work, and one
/// slow session-second is 5 % of a window.
pub const ADMISSION_MIN_SESSIONS: usize = 20;
/// `VOICEGATE_ADMISSION_RAMP_PER_SEC`: while the capacity is unknown, 50 new sessions a second bring a node
/// past `ADMISSION_MIN_SESSIONS` within the first second (the capacity is known a second or two later), hold
/// a reconnect storm of a restarted node to ~100-150 sessions before the CPU rule decides (a 2-core node
/// here serves 300-400), and stay above what a load harness ramping 1,500 streams over 30 s asks.
pub const ADMISSION_RAMP_PER_SEC: u32 = 50;
/// `VOICEGATE_LEASE_TTL_SECS`: a per-user limit's slot (e.g. a listen session) not refreshed for this
/// long is free again: how long a crashed node's sessions still count.
pub const LEASE_TTL_SECS: u64 = 30;
/// `VOICEGATE_LEASE_TIMEOUT_MS`: longest wait for the store when taking a slot, before the decision's
/// failure mode applies.
pub const LEASE_TIMEOUT_MS: u64 = 1_000;
/// `VOICEGATE_REDIS_WAIT_REPLICAS`: off (a flush is acknowledged once the master ran it).
pub const REDIS_WAIT_REPLICAS: u32 = 0;
/// `VOICEGATE_REDIS_WAIT_TIMEOUT_MS`: a replica on the same network acknowledges in about a millisecond;
/// this only bounds a flush while a replica is away (the flush then fails and is retried).
pub const REDIS_WAIT_TIMEOUT_MS: u64 = 500;
/// `VOICEGATE_DRAIN_TIMEOUT_SECS`.
pub const DRAIN_TIMEOUT_SECS: u64 = 30;
/// `VOICEGATE_HEADER_TIMEOUT_SECS`: time from a connection (or the previous response) to a complete
/// request head.
pub const HEADER_TIMEOUT_SECS: u64 = 5;
/// `VOICEGATE_BODY_IDLE_TIMEOUT_SECS`: longest wait for the next byte of a request body.
pub const BODY_IDLE_TIMEOUT_SECS: u64 = 10;
/// `VOICEGATE_BODY_TIMEOUT_SECS`: the whole body of one request (a 256 MiB upload at ~4 Mbit/s).
pub const BODY_TIMEOUT_SECS: u64 = 600;
/// `VOICEGATE_BACKFILL_ALLOWANCE_MS`: backfill speech (sync files recorded over 24 h before arrival)
/// metered per user per UTC day: 4 speech-hours.
pub const BACKFILL_ALLOWANCE_MS: u64 = 4 * 3_600_000;
/// `VOICEGATE_BACKFILL_LOOKBACK_DAYS`: sync files recorded longer ago are refused `recording_too_old`.
pub const BACKFILL_LOOKBACK_DAYS: u64 = 30;
/// `VOICEGATE_WORKERS`: 0 = half the CPUs, at least one.
pub const WORKERS: usize = 0;
/// `VOICEGATE_WS_IDLE_TIMEOUT_SECS`: the reference's inactivity timeout.
pub const WS_IDLE_TIMEOUT_SECS: u64 = 90;
/// `VOICEGATE_LISTEN_THREADS`: 0 = one per CPU.
pub const LISTEN_THREADS: usize = 0;
/// `VOICEGATE_LISTEN_TICK_MS`: how often a session runs its pipeline on what arrived.
pub const LISTEN_TICK_MS: u64 = 50;
/// `VOICEGATE_LISTEN_BUFFER_MS`: audio one session's ring holds before frames are dropped.
pub const LISTEN_BUFFER_MS: u64 = 2_000;
/// `VOICEGATE_LISTEN_MAX_PACE`: a device streams at 1x; 4x leaves room for catching up after a stall.
pub const LISTEN_MAX_PACE: f64 = 4.0;
/// `VOICEGATE_LISTEN_BURST_MS`: a reconnecting device's backlog taken in at once (30 s of audio).
pub const LISTEN_BURST_MS: u64 = 30_000;
/// `VOICEGATE_SYNC_UPLOADS_PER_USER`.
pub const SYNC_UPLOADS_PER_USER: usize = 2;
/// `VOICEGATE_SYNC_MAX_UPLOADS`: each holds a descriptor and up to 256 MiB of temp storage.
pub const SYNC_MAX_UPLOADS: usize = 64;
/// `VOICEGATE_SYNC_WORKERS`: on 2 cores, two jobs keep the decode pool busy while one waits on the store.
pub const SYNC_WORKERS: usize = 2;
/// `VOICEGATE_SYNC_V1_WAIT_SECS`: a v1 upload's speech is settled well within this (decode runs at ~1,300
/// audio-s per s per core, so even the largest upload the limits admit is a few seconds of work); past it
/// the answer is 202 with the job instead of holding the connection.
pub const SYNC_V1_WAIT_SECS: u64 = 120;
/// `VOICEGATE_SYNC_V1_TRANSCRIPT_WAIT_SECS`: a short upload's transcript comes back in the answer, a long
/// one's is `pending` and finished by the job (the reference held v1 connections for the whole
/// transcription: minutes).
pub const SYNC_V1_TRANSCRIPT_WAIT_SECS: u64 = 30;
/// `VOICEGATE_SYNC_STT_WAIT_SECS`: an hour of transcription per job run. It was 60 s while v1 held its
/// connection through the transcription; a job's transcription has no client waiting on it (the local engine
/// needs ~20 min for an hour of speech on one core, stt-notes.md).
pub const SYNC_STT_WAIT_SECS: u64 = 3_600;
/// `VOICEGATE_SYNC_BACKFILL_WORKERS`: one of them, so fresh uploads always find a free worker.
pub const SYNC_BACKFILL_WORKERS: usize = 1;
/// `VOICEGATE_SYNC_BACKFILL_JOBS_PER_USER` (DESIGN §3: backfill's own per-user concurrency).
pub const SYNC_BACKFILL_JOBS_PER_USER: usize = 1;
/// `VOICEGATE_SYNC_JOBS_PER_USER`: 50 uploads of up to 64 files.
pub const SYNC_JOBS_PER_USER: usize = 50;
/// `VOICEGATE_SYNC_QUEUE_MAX`.
pub const SYNC_QUEUE_MAX: usize = 10_000;
/// `VOICEGATE_SYNC_SPOOL_BYTES_PER_USER`: 2 GiB of one user's unfinished jobs' files, on all nodes: 8
/// requests at `VOICEGATE_UPLOAD_MAX_REQUEST_BYTES` (256 MiB) or 32 files at `VOICEGATE_UPLOAD_MAX_FILE_BYTES`
/// (64 MiB), about 18 hours of 16 kHz PCM and far more of Opus: a device's whole backlog after days offline
/// fits, while the 50 jobs of `VOICEGATE_SYNC_JOBS_PER_USER` at 256 MiB each (12.5 GiB) would not be one
/// user's to take. Must be at least `VOICEGATE_UPLOAD_MAX_REQUEST_BYTES` (else a full-size upload never fits).
pub const SYNC_SPOOL_BYTES_PER_USER: u64 = 2 * 1024 * 1024 * 1024;
/// `VOICEGATE_SYNC_SPOOL_MAX_BYTES`: 32 GiB, 16 users at their full quota or 128 full-size requests; the
/// volume's own free space is guarded apart (`VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`).
pub const SYNC_SPOOL_MAX_BYTES: u64 = 32 * 1024 * 1024 * 1024;
/// `VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`: 1 GiB left free on the spool's file system (logs, Redis
/// snapshots, the system's own temp files often share it).
pub const SYNC_SPOOL_MIN_FREE_BYTES: u64 = 1024 * 1024 * 1024;
/// `VOICEGATE_SYNC_JOB_RETENTION_SECS`: 7 days.
pub const SYNC_JOB_RETENTION_SECS: u64 = 7 * 86_400;
/// `VOICEGATE_AUTH_FAILURES_PER_MINUTE`: a burst of this many, then this many a minute.
pub const AUTH_FAILURES_PER_MINUTE: u32 = 30;
/// `VOICEGATE_AUTH_THROTTLE_MAX_ADDRESSES`: ~100 bytes each.
pub const AUTH_THROTTLE_MAX_ADDRESSES: usize = 100_000;
/// `VOICEGATE_STT_LOCAL_THREADS`: one model (~140–180 MB idle, ~1.5 GB while transcribing a 10 s chunk, plus
/// the engine's leak of ~14–17 MB per second of audio transcribed: docs/stt.md, "The local provider").
pub const STT_LOCAL_THREADS: usize = 1;
/// `VOICEGATE_STT_LOCAL_QUEUE_CHUNKS`: one worker transcribes ~2.6 s of audio a second (docs/stt.md), so
/// 32 chunks of up to 10 s are already minutes of work: a chunk that found a place is transcribed late,
/// one that did not is refused before it is charged.
pub const STT_LOCAL_QUEUE_CHUNKS: usize = 32;
/// `VOICEGATE_STT_LOCAL_MAX_RSS_MB`: a worker's engine process is replaced past this. A 10 s chunk needs
/// ~1.5 GB at its peak on top of the leak; 3 GB lets a process transcribe ~100 s of audio between
/// replacements, a 0.3 s model load each (docs/stt.md, "The local provider").
pub const STT_LOCAL_MAX_RSS_MB: u64 = 3_072;
/// `VOICEGATE_STT_FALLBACK_SECS`: a minute on the fallback after each failure of the primary, long enough
/// not to flap on a provider that fails every few seconds, short enough to come back soon after a fix.
pub const STT_FALLBACK_SECS: u64 = 60;
/// `VOICEGATE_HEAP_TRIM_SECS`: how often the allocator's freed pages go back to the kernel (server/src/heap.rs).
pub const HEAP_TRIM_SECS: u64 = 60;
/// `VOICEGATE_STT_PREROLL_MS`: audio sent before each speech run (the detector confirms a run late).
pub const STT_PREROLL_MS: u64 = 300;
/// `VOICEGATE_JWKS_REFRESH_MIN_SECS`: a JWKS URL answering `max-age=0` (or a tiny one) is still fetched at
/// most once a minute on schedule.
pub const JWKS_REFRESH_MIN_SECS: u64 = 60;
/// `VOICEGATE_JWKS_REFRESH_MAX_SECS`: a day; Google's key URL says `max-age` of about 6 h.
pub const JWKS_REFRESH_MAX_SECS: u64 = 86_400;
