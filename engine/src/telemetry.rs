//! Every metric name VoiceGate exports, in one place (`voicegate_<noun>_<unit>[_total]`).
//! No metric carries a uid or any other unbounded label; `reason` labels take a few fixed words.

// --- HTTP server (server crate) ---

/// Histogram, labels `route` (the matched pattern, or `unmatched`), `method`, `status` (class: `2xx`…`5xx`).
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "voicegate_http_request_duration_seconds";
/// Counter, label `phase` (`body_idle`: no body byte within `VOICEGATE_BODY_IDLE_TIMEOUT_SECS`,
/// `body_total`: the body not complete within `VOICEGATE_BODY_TIMEOUT_SECS`): requests answered 408.
pub const HTTP_REQUEST_TIMEOUTS_TOTAL: &str = "voicegate_http_request_timeouts_total";
/// Counter, label `reason` (the stable auth error code, e.g. `token_expired`).
pub const AUTH_REJECTIONS_TOTAL: &str = "voicegate_auth_rejections_total";
/// Counter, label `kind` (`token`: bearer tokens, `admin_key`: `X-Admin-Key`): requests answered 429
/// `too_many_auth_failures` because their client address failed authentication too often
/// (`VOICEGATE_AUTH_FAILURES_PER_MINUTE`).
pub const AUTH_THROTTLED_TOTAL: &str = "voicegate_auth_throttled_total";
/// Counter, label `kind`: failed authentications of an address the throttle had no room to track
/// (`VOICEGATE_AUTH_THROTTLE_MAX_ADDRESSES` full of recent failures): not throttled, should stay 0.
pub const AUTH_THROTTLE_UNTRACKED_TOTAL: &str = "voicegate_auth_throttle_untracked_total";
/// Counter, label `result` (`ok`; failures: `status` (not a 2xx), `unreachable` (connect, TLS, timeout),
/// `too_large` (body over 256 KiB), `invalid` (not a JWK set with an RS256 key)): fetches of a
/// `VOICEGATE_JWKS` URL. A failed fetch keeps the keys in use.
pub const JWKS_REFRESH_TOTAL: &str = "voicegate_jwks_refresh_total";
/// Gauge: RS256 keys held from the `VOICEGATE_JWKS` URL; 0 while none was ever fetched (RS256 tokens
/// answered 503 `auth_keys_unavailable`).
pub const JWKS_KEYS: &str = "voicegate_jwks_keys";
/// Counter, label `reason` (the stable upload error code, e.g. `upload_file_too_large`).
pub const UPLOAD_REJECTIONS_TOTAL: &str = "voicegate_upload_rejections_total";
/// Counter, label `outcome` (`applied`, `duplicate`, `ignored`, `bad_signature`, `failed`).
pub const STRIPE_WEBHOOKS_TOTAL: &str = "voicegate_stripe_webhooks_total";
/// Gauge: 1 when the last store health check succeeded, 0 otherwise.
pub const STORE_UP: &str = "voicegate_store_up";
/// Gauge: 0 starting, 1 ready, 2 draining.
pub const SERVER_STATE: &str = "voicegate_server_state";
/// Gauge: open realtime listen sessions.
pub const LISTEN_SESSIONS_ACTIVE: &str = "voicegate_listen_sessions_active";
/// Counter, label `reason`: listen sessions refused at connect: `per_user_limit`, `draining`, and the
/// node's capacity (all three answered 503 `at_capacity`): `at_capacity` (`VOICEGATE_WS_MAX_SESSIONS`), `cpu`
/// (the capacity the node measured from its CPU), `tick_lag` (too many late session-seconds), `ramp` (the
/// capacity is not measured yet and this second's new sessions reached `VOICEGATE_ADMISSION_RAMP_PER_SEC`).
pub const LISTEN_SESSIONS_REFUSED_TOTAL: &str = "voicegate_listen_sessions_refused_total";
/// Counter, label `transport` (`pipeline`: the socket read by its session's pipeline thread, the usual
/// path; `http_worker`: an upgrade on a connection that already carried a request): listen sessions started.
pub const LISTEN_SESSIONS_OPENED_TOTAL: &str = "voicegate_listen_sessions_opened_total";
/// Histogram: seconds the drain took, by `outcome` (`complete`, `timed_out`).
pub const DRAIN_DURATION_SECONDS: &str = "voicegate_drain_duration_seconds";

// --- Leases (engine::lease: per-user limits counted across nodes) ---

/// Counter, labels `kind` (the limit: `listen_session`, …) and `outcome` (`granted`, `refused`,
/// `unavailable`: the store did not answer in time): lease acquires.
pub const LEASE_ACQUIRES_TOTAL: &str = "voicegate_lease_acquires_total";
/// Counter, label `outcome` (`extended`; `restored`: the slot had expired in the store and was free again;
/// `lost`: it had expired and others filled the limit; `failed`: no answer): heartbeat refreshes of held leases.
pub const LEASE_REFRESHES_TOTAL: &str = "voicegate_lease_refreshes_total";
/// Counter, label `outcome` (`released`, `failed`, `queue_full`: not sent, the slot expires within the TTL):
/// leases given back.
pub const LEASE_RELEASES_TOTAL: &str = "voicegate_lease_releases_total";
/// Gauge, label `kind`: leases this node holds (backed by the store or not yet).
pub const LEASES_HELD: &str = "voicegate_leases_held";

// --- Metering (engine::meter, engine::store) ---

/// Gauge: user meter actors currently alive (hydrated or not, including retiring ones).
pub const METER_LIVE_ACTORS: &str = "voicegate_meter_live_actors";
/// Gauge: speech ms recorded but not yet acknowledged by the store (pending + in flight).
pub const METER_PENDING_SPEECH_MS: &str = "voicegate_meter_pending_speech_ms";
/// Counter, label `source` (`realtime`, `sync`, `other`): speech ms accepted by the meter.
pub const METER_SPEECH_MS_TOTAL: &str = "voicegate_meter_speech_ms_total";
/// Histogram: seconds one write-behind flush round took (one pipeline per chunk of dirty users).
pub const METER_FLUSH_DURATION_SECONDS: &str = "voicegate_meter_flush_duration_seconds";
/// Counter, label `reason` (`unavailable`, `timeout`, `script`): failed flush attempts of one user batch.
pub const METER_FLUSH_ERRORS_TOTAL: &str = "voicegate_meter_flush_errors_total";
/// Counter: user batches sent again after a failed or timed-out attempt.
pub const METER_FLUSH_RETRIES_TOTAL: &str = "voicegate_meter_flush_retries_total";
/// Counter: batches the store had already applied (a retry after an applied-but-timed-out flush).
pub const METER_BATCHES_DEDUPLICATED_TOTAL: &str = "voicegate_meter_batches_deduplicated_total";
/// Counter: records not metered again because their idempotency key was already metered.
pub const METER_RECORDS_DEDUPLICATED_TOTAL: &str = "voicegate_meter_records_deduplicated_total";
/// Counter, label `reason` (`pending_full`, `bucket_overflow`): records (or ms) the meter had to drop.
pub const METER_RECORDS_DROPPED_TOTAL: &str = "voicegate_meter_records_dropped_total";
/// Counter, label `reason` (`unavailable`, `timeout`): failed hydrations or refreshes of a user's base.
pub const METER_HYDRATION_ERRORS_TOTAL: &str = "voicegate_meter_hydration_errors_total";
/// Histogram: seconds a record (or read) waited for room in a user actor's full mailbox (the meter's
/// backpressure: never a drop). Its `_count` is how many sends found a mailbox full.
pub const METER_MAILBOX_BLOCKED_SECONDS: &str = "voicegate_meter_mailbox_blocked_seconds";
/// Counter, label `reason` (`panic`): user meter actors restarted in place (pending deltas kept, base
/// re-hydrated from the store).
pub const METER_ACTOR_RESTARTS_TOTAL: &str = "voicegate_meter_actor_restarts_total";

// --- Fair use (engine::policy, engine::supervisor) ---

/// Counter, label `to` (`none`, `warning`, `throttle`, `restrict`): committed stage changes.
pub const FAIR_USE_STAGE_TRANSITIONS_TOTAL: &str = "voicegate_fair_use_stage_transitions_total";
/// Counter, label `action` (`queued`, `deduplicated`, `skipped_restrict`, `followed_up`): cap breaches the
/// supervisor received (`followed_up`: a user still over a cap when the cooldown ended, classified again).
pub const FAIR_USE_BREACHES_TOTAL: &str = "voicegate_fair_use_breaches_total";
/// Counter, label `result` (`escalated`, `unchanged`): classifications applied.
pub const FAIR_USE_CLASSIFICATIONS_TOTAL: &str = "voicegate_fair_use_classifications_total";
/// Counter, label `reason` (`error`, `malformed`, `not_configured`, `snapshot`, `panic`, `timeout`, `lock`,
/// `apply`): failed classifier runs (each is retried later with backoff).
pub const FAIR_USE_CLASSIFIER_FAILURES_TOTAL: &str = "voicegate_fair_use_classifier_failures_total";
/// Counter, label `source` (`realtime`, `sync`): session evidence writes that failed (the summary a realtime
/// session rewrites each minute and at its end, or a sync file's once metered; the classifiers then see less
/// of that user's week until the next write).
pub const FAIR_USE_EVIDENCE_ERRORS_TOTAL: &str = "voicegate_fair_use_evidence_errors_total";
/// Counter, label `reason` (the last failure: `error`, `malformed`, `not_configured`, `timeout`, `panic`):
/// breaches whose classifier failed `VOICEGATE_CLASSIFIER_MAX_FAILURES` times, classified by the heuristic
/// instead (the verdict carries `classifier_failed`).
pub const FAIR_USE_CLASSIFIER_FALLBACKS_TOTAL: &str =
    "voicegate_fair_use_classifier_fallbacks_total";
/// Gauge: classifier tasks in flight.
pub const FAIR_USE_CLASSIFIER_IN_FLIGHT: &str = "voicegate_fair_use_classifier_in_flight";
/// Gauge: classifier jobs waiting for a slot.
pub const FAIR_USE_CLASSIFIER_QUEUED: &str = "voicegate_fair_use_classifier_queued";
/// Histogram: seconds one classifier task took (success or failure).
pub const FAIR_USE_CLASSIFIER_DURATION_SECONDS: &str =
    "voicegate_fair_use_classifier_duration_seconds";

// --- Sync uploads and conversations (server sync route, engine::conversation) ---

/// Counter, label `outcome` (`ok`, `partial`, `running`: 202 with the job still settling, `failed`, `rejected`): v1 sync upload requests by result.
pub const SYNC_REQUESTS_TOTAL: &str = "voicegate_sync_requests_total";
/// Gauge: sync uploads in progress on this node (from admission to the answer).
pub const SYNC_UPLOADS_ACTIVE: &str = "voicegate_sync_uploads_active";
/// Counter, label `reason`: sync uploads refused for a limit. Before their body was read:
/// `per_user_limit` (429 `too_many_uploads`), `at_capacity` (503 `uploads_at_capacity`), `queue_full` (v2:
/// 503 `sync_queue_full`), `spool_full` (v1 and v2: 507 `sync_spool_full`, the spool's bytes or its volume's free
/// space); once the body is in the spool (v1 and v2): `jobs_per_user` (429 `too_many_sync_jobs`),
/// `spool_user_quota` (429 `sync_spool_user_quota`).
pub const SYNC_UPLOADS_REFUSED_TOTAL: &str = "voicegate_sync_uploads_refused_total";
/// Counter, label `lane` (`sync_fresh`, `sync_backfill`, `too_old`): analysed sync files by the backfill
/// decision (DESIGN §3).
pub const SYNC_FILES_BY_LANE_TOTAL: &str = "voicegate_sync_files_by_lane_total";
/// Counter, label `type` (`sync_job_ended`, `conversation_created`, `conversation_updated`,
/// `conversations_unlocked`): downstream events queued for the stream or the in-process channel.
pub const EVENTS_PUBLISHED_TOTAL: &str = "voicegate_events_published_total";
/// Counter, label `reason` (`queue_full`, `store_failed`): downstream events dropped.
pub const EVENTS_DROPPED_TOTAL: &str = "voicegate_events_dropped_total";
/// Counter, label `lane` (`sync_fresh`, `sync_backfill`): sync jobs created (v2 uploads accepted with 202, and v1 uploads, each run as a job).
pub const SYNC_JOBS_CREATED_TOTAL: &str = "voicegate_sync_jobs_created_total";
/// Counter, labels `status` (`completed`, `partial_failure`, `failed`) and `lane`: sync jobs (v1 and v2) ended.
pub const SYNC_JOBS_TOTAL: &str = "voicegate_sync_jobs_total";
/// Gauge, label `lane`: sync jobs running on this node (the pool's v2 jobs and the v1 uploads' own).
pub const SYNC_JOBS_RUNNING: &str = "voicegate_sync_jobs_running";
/// Gauge: sync v2 jobs in the queue on all nodes (due or deferred), as this node last read it (each second).
pub const SYNC_JOBS_QUEUED: &str = "voicegate_sync_jobs_queued";
/// Gauge, label `lane` (`sync_fresh`, `sync_backfill`): seconds since the oldest sync v2 job waiting in that
/// lane on all nodes became due (0 when none waits). A job deferred to a later time is not waiting until
/// then, nor is a running one. Read by every node every 5 s: take the `max` over nodes.
pub const SYNC_OLDEST_QUEUED_JOB_AGE_SECONDS: &str = "voicegate_sync_oldest_queued_job_age_seconds";
/// Gauge: bytes in the sync v2 spool (`VOICEGATE_SYNC_SPOOL_DIR`: jobs' files and uploads being written)
/// as this node counts them: measured every 10 s, plus the jobs this node queued since. Nodes sharing a
/// spool report the same volume: take the `max` over them.
pub const SYNC_SPOOL_BYTES: &str = "voicegate_sync_spool_bytes";
/// Counter, label `status` (`ok`, `failed`): files of sync uploads by result.
pub const SYNC_FILES_TOTAL: &str = "voicegate_sync_files_total";
/// Counter: seconds of audio decoded from sync uploads.
pub const SYNC_AUDIO_SECONDS_TOTAL: &str = "voicegate_sync_audio_seconds_total";
/// Histogram: seconds one sync upload spent decoding and VAD-segmenting its files (all files, in parallel).
pub const SYNC_PROCESS_DURATION_SECONDS: &str = "voicegate_sync_process_duration_seconds";
/// Counter: conversation upserts that lost a compare-and-set to a concurrent writer and retried.
pub const CONVERSATION_CONFLICTS_TOTAL: &str = "voicegate_conversation_conflicts_total";
/// Counter: conversations unlocked by payments.
pub const CONVERSATIONS_UNLOCKED_TOTAL: &str = "voicegate_conversations_unlocked_total";

// --- Realtime listen sessions (server listen route, engine::pipeline::live) ---

/// Counter: binary websocket frames received by listen sessions (keepalives included).
pub const LISTEN_FRAMES_TOTAL: &str = "voicegate_listen_frames_total";
/// Counter, label `reason` (`ring_full`: a frame larger than the session's whole frame queue; `too_large`:
/// an Opus packet over the record limit): listen frames dropped before the pipeline. A pipeline that
/// falls behind never drops: the frame waits and the client is slowed through TCP.
pub const LISTEN_FRAMES_DROPPED_TOTAL: &str = "voicegate_listen_frames_dropped_total";
/// Counter: times a listen session started holding frames back because its client sends audio faster
/// than `VOICEGATE_LISTEN_MAX_PACE` × real time beyond the `VOICEGATE_LISTEN_BURST_MS` burst (the frames
/// wait, then the socket is not read: the client is slowed through TCP, nothing is dropped).
pub const LISTEN_PACE_LIMITED_TOTAL: &str = "voicegate_listen_pace_limited_total";
/// Histogram: how late a listen session's pipeline tick ran after its scheduled time, the worst of each
/// session-second (one observation per session per second, and one for its last part-second). Measured
/// on 2 cores: median ~70 ms and p99 ~0.4 s at 1,200 streams (within capacity), p99 seconds past it.
/// Since a lagging session slows its client through TCP instead of dropping frames, this is the node's
/// overload signal.
pub const LISTEN_TICK_LAG_SECONDS: &str = "voicegate_listen_tick_lag_seconds";
/// Gauge: listen sessions this node estimates it holds within `VOICEGATE_ADMISSION_CPU_PERCENT` of its CPU, from
/// its CPU per open session over `VOICEGATE_ADMISSION_WINDOW_SECS` (renewed every second); NaN while unknown
/// (fewer than `VOICEGATE_ADMISSION_MIN_SESSIONS` open, or the rule off). Sessions past it are refused.
pub const LISTEN_CAPACITY_SESSIONS: &str = "voicegate_listen_capacity_sessions";
/// Gauge: the process's CPU time over the admission window divided by the cores available to it (0–1).
pub const NODE_CPU_UTILISATION_RATIO: &str = "voicegate_node_cpu_utilisation_ratio";
/// Gauge: the cores the process could have over the admission window: those available to it (affinity mask,
/// cgroup quota), but no more than it used plus what its CPUs left idle (below the cores: a neighbour on
/// them took the rest). The CPU rule's capacity is `VOICEGATE_ADMISSION_CPU_PERCENT` of this.
pub const NODE_CPU_AVAILABLE_CORES: &str = "voicegate_node_cpu_available_cores";
/// Gauge, by `state`: the C allocator's heap at the last scrape (glibc's `mallinfo2`; absent on other C
/// libraries). `in_use`: bytes handed out and not freed; `free`: freed bytes the allocator keeps for reuse,
/// resident until reused or trimmed. RSS minus both is code, stacks and other mappings.
pub const PROCESS_HEAP_BYTES: &str = "voicegate_process_heap_bytes";
/// Histogram: how long each periodic trim of the allocator's free pages took (`VOICEGATE_HEAP_TRIM_SECS`;
/// glibc's `malloc_trim`, on a blocking thread: an allocating thread may wait for an arena meanwhile).
pub const PROCESS_HEAP_TRIM_SECONDS: &str = "voicegate_process_heap_trim_seconds";
/// Gauge: the share of the admission window's listen session-seconds whose worst tick ran later than
/// `VOICEGATE_ADMISSION_LAG_MS` (0–1). Above `VOICEGATE_ADMISSION_LATE_PERCENT` new sessions are refused.
pub const LISTEN_LATE_SESSION_SECONDS_RATIO: &str = "voicegate_listen_late_session_seconds_ratio";
/// Counter: ms of audio decoded by listen sessions (added when a session ends).
pub const LISTEN_AUDIO_MS_TOTAL: &str = "voicegate_listen_audio_ms_total";
/// Counter, label `type` (`speech_started`, `speech_ended`, `usage`, `fair_use`, `stt_budget_exhausted`,
/// `conversation_closed`, `frames_dropped`, `metadata`): events produced by listen sessions.
pub const LISTEN_EVENTS_TOTAL: &str = "voicegate_listen_events_total";
/// Counter: speech ms forwarded to STT by listen sessions (within their STT allowance).
pub const LISTEN_STT_FORWARDED_MS_TOTAL: &str = "voicegate_listen_stt_forwarded_ms_total";
/// Counter: ms of STT charge given back to listen sessions because the provider refused the audio as it
/// was handed over (no place in its queue: never sent). What sessions were charged is forwarded − refused.
pub const LISTEN_STT_REFUSED_MS_TOTAL: &str = "voicegate_listen_stt_refused_ms_total";
/// Counter, label `reason` (`invalid_json`, `unknown_type`): client text frames ignored.
pub const LISTEN_TEXT_IGNORED_TOTAL: &str = "voicegate_listen_text_ignored_total";
/// Counter, label `reason` (`close_stream`, `client_closed`, `idle`, `drain`, `too_large`, `protocol`,
/// `pipeline_error`, `bad_params`): how listen sessions ended.
pub const LISTEN_SESSIONS_CLOSED_TOTAL: &str = "voicegate_listen_sessions_closed_total";
/// Counter, label `reason` (`decoder_failed`, `resampler_failed`, `vad_failed`): live pipelines that failed.
pub const LISTEN_PIPELINE_ERRORS_TOTAL: &str = "voicegate_listen_pipeline_errors_total";
/// Counter, label `reason` (`meter`, `stt`, `dropped`: the meter's pending memory was full, so the record
/// was not metered): failed meter or STT-usage records (the speech stays the session's and is sent again
/// the next second).
pub const LISTEN_METER_ERRORS_TOTAL: &str = "voicegate_listen_meter_errors_total";
/// Counter, label `reason` (the conversation store's error code): failed realtime conversation writes;
/// each is retried with jittered backoff (250 ms up to 10 s) while the session lives.
pub const LISTEN_CONVERSATION_ERRORS_TOTAL: &str = "voicegate_listen_conversation_errors_total";
/// Counter, label `reason` (`queue_full`: more than 64 conversations of one session unwritten, the oldest
/// dropped; `session_ended`: still failing after the session's last three attempts): realtime
/// conversations never written.
pub const LISTEN_CONVERSATIONS_DROPPED_TOTAL: &str = "voicegate_listen_conversations_dropped_total";
/// Counter, label `reason` (the conversation store's error code): failed writes of realtime transcript
/// segments to their conversation; each is retried with jittered backoff (250 ms up to 10 s) while the
/// session lives.
pub const LISTEN_TRANSCRIPT_ERRORS_TOTAL: &str = "voicegate_listen_transcript_errors_total";
/// Counter, label `reason` (`queue_full`: more final segments waiting than a session holds, the oldest
/// dropped; `conversation_full`: the conversation holds 10,000 segments; `conversation_gone`: deleted
/// before its segments were written; `no_conversation`: no conversation covers their time;
/// `session_ended`: still unwritten after the session's last attempts): final transcript segments of
/// realtime sessions never stored with their conversation.
pub const LISTEN_SEGMENTS_DROPPED_TOTAL: &str = "voicegate_listen_segments_dropped_total";

// --- Speech-to-text providers (engine::stt) ---
// Label `provider` is one of `local`, `deepgram`, `openai`, `none` (`VOICEGATE_STT`).

/// Counter, label `provider`: 16 kHz samples handed to a provider (counted at the FFI call or socket write;
/// exactly what users are charged). Audio seconds sent = this / 16,000.
pub const STT_FORWARDED_SAMPLES_TOTAL: &str = "voicegate_stt_forwarded_samples_total";
/// Gauge: seconds of audio sent to paid providers today (UTC), all users and nodes together, as this node
/// last read or added it; only while `VOICEGATE_STT_DAILY_SPEND_CEILING_SECONDS` is on. At the ceiling, paid
/// transcription is closed (`spend_ceiling`) until midnight.
pub const STT_SPEND_TODAY_SECONDS: &str = "voicegate_stt_spend_today_seconds";
/// Gauge: `VOICEGATE_STT_DAILY_SPEND_CEILING_SECONDS`, exported only while it is on (alerts compare
/// `voicegate_stt_spend_today_seconds` with it).
pub const STT_SPEND_CEILING_SECONDS: &str = "voicegate_stt_spend_ceiling_seconds";
/// Gauge: the UTC day (days since 1970-01-01) `voicegate_stt_spend_today_seconds` counts: a node that has not
/// read the spend since midnight still shows yesterday's, so alerts keep only the nodes whose day is today
/// (`voicegate_stt_spend_day * 86400 + 86400 > time()`).
pub const STT_SPEND_DAY: &str = "voicegate_stt_spend_day";
/// Counter, label `provider`: 16 kHz samples offered to the speech gate of a provider: all the decoded audio
/// of live sessions whose STT stream is open (speech or not, counted as the session decodes it), plus the
/// decoded spans of sync uploads handed to the provider. What would have been sent without the gate:
/// seconds saved by gating = (this − `voicegate_stt_forwarded_samples_total`) / 16,000.
pub const STT_AUDIO_IN_SAMPLES_TOTAL: &str = "voicegate_stt_audio_in_samples_total";
/// Histogram, label `provider`: seconds from the detector's end of a speech run (wall time on the live
/// session) to the first final transcript result covering that end reaching the session. Buckets 0.1–30 s.
pub const STT_FINAL_LATENCY_SECONDS: &str = "voicegate_stt_final_latency_seconds";
/// Counter, labels `provider`, `reason` (`queue_full`: the provider's bounded queue was full, for live audio
/// as it was handed over (`local`, `deepgram`: refused, so not charged; `openai`: a whole chunk), for a sync
/// span once its run stops offering it; `closed`: the session had gone before its audio reached the engine; `ring`: a live session's kept audio moved on
/// before a run's start could be forwarded; `provider_down`: a remote provider could not be reached while
/// the audio was kept, and the run moved on): samples that never reached the engine.
pub const STT_DROPPED_SAMPLES_TOTAL: &str = "voicegate_stt_dropped_samples_total";
/// Counter, label `provider`: 16 kHz samples written again (deepgram: the open utterance after a
/// reconnect, a sync span's audio on a retry that went out; openai: a chunk's audio on a retry that went
/// out), already counted in `voicegate_stt_forwarded_samples_total` when first sent: never charged to the
/// user.
pub const STT_RESENT_SAMPLES_TOTAL: &str = "voicegate_stt_resent_samples_total";
/// Counter, labels `provider`, `reason` (`rate_limited`, `engine`, `network`, `queue_full`): requests sent
/// again after a failure a later attempt could fix (openai: `VOICEGATE_OPENAI_RETRIES`; deepgram: a sync
/// span's pre-recorded request, twice at most; `queue_full`: a sync span the provider's queue refused,
/// offered again after a backoff). A chunk whose retries all failed is counted once more in
/// `voicegate_stt_errors_total`.
pub const STT_RETRIES_TOTAL: &str = "voicegate_stt_retries_total";
/// Counter, labels `what` (`stream_open`: a new live stream opened on it because the primary is failing;
/// `stream_switch`: a live stream moved onto it, to the fallback on a primary failure or back to the
/// primary at a speech run's start after the cool-down; `span`: a sync span sent to the fallback), `to`
/// (a provider name): the fallback's work (`VOICEGATE_STT_FALLBACK`; exported at 0 when one is set).
pub const STT_FALLBACK_TOTAL: &str = "voicegate_stt_fallback_total";
/// Counter, labels `provider`, `outcome` (`opened`; `refused`: the provider answered the connect with an
/// HTTP error such as 401, 402, 429; `failed`: unreachable, TLS or timeout; `lost`: closed mid-stream):
/// connections of a remote streaming provider.
pub const STT_CONNECTIONS_TOTAL: &str = "voicegate_stt_connections_total";
/// Counter, label `provider`: results a provider could not deliver because the session's bounded results
/// channel was full.
pub const STT_RESULTS_DROPPED_TOTAL: &str = "voicegate_stt_results_dropped_total";
/// Counter, labels `provider`, `reason` (`engine`, `unauthorized`, `payment`, `rate_limited`, `network`,
/// `protocol`, `bad_request`): provider errors. Every reason a provider can report is exported at 0 from
/// startup (local: `engine`; deepgram: the other six; openai: all seven).
pub const STT_ERRORS_TOTAL: &str = "voicegate_stt_errors_total";
/// Gauge, label `provider`: work waiting for the provider (local: chunks and sync spans waiting for a
/// worker; deepgram: audio chunks waiting in the streams' channels for their connection; openai: chunks
/// held, waiting for a request slot or in flight). 0 from startup.
pub const STT_QUEUE_DEPTH: &str = "voicegate_stt_queue_depth";
/// Histogram, label `provider`: seconds a chunk waited for a worker (openai: for a request slot) (how far transcription is behind).
pub const STT_QUEUE_WAIT_SECONDS: &str = "voicegate_stt_queue_wait_seconds";
/// Counter, label `provider`: chunks that waited longer than the lateness threshold (local: 2 s).
pub const STT_LATE_CHUNKS_TOTAL: &str = "voicegate_stt_late_chunks_total";
/// Histogram, label `provider`: seconds the engine (or the provider's request) took per chunk.
pub const STT_ENGINE_DURATION_SECONDS: &str = "voicegate_stt_engine_duration_seconds";
/// Counter, labels `provider` (local), `reason` (`memory`: its resident memory passed
/// `VOICEGATE_STT_LOCAL_MAX_RSS_MB`; `exited`: it died or broke the protocol during a chunk; `timeout`: it
/// took no input or gave no answer within 5 minutes and was killed): the local engine's child process was replaced.
pub const STT_ENGINE_RESTARTS_TOTAL: &str = "voicegate_stt_engine_restarts_total";
