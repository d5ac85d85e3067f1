//! The server's integration tests, one module per area, linked into one test binary (one link of the
//! whole dependency graph instead of one per file: CI's build time and disk stay small). Run one area with
//! `cargo nextest run -p voicegate-server --test integration <module>::`.

mod common;
mod listen_support;

mod admin_key;
mod auth;
mod auth_jwks_url;
mod bad_input_matrix;
mod billing_lifecycle;
mod config_docs;
mod config_refusals;
mod conversation_transcripts;
mod dashboards_prometheus;
mod drain_sigterm;
mod drain_uploads;
mod fair_use_evidence;
mod health_metrics;
mod limits_admission;
mod limits_auth_throttle;
mod limits_listen_pace;
mod limits_sync_uploads;
mod listen_bad_input;
mod listen_stream;
mod listen_transcripts;
mod listen_transport;
mod log_format;
mod metrics_docs;
mod metrics_e2e;
mod request_timeouts;
mod restricted_realtime;
mod server_drain;
mod sessions_across_nodes;
mod stripe_webhook;
mod stripe_webhook_engine;
mod stt_config;
mod stt_deepgram;
mod stt_openai;
mod sync_backfill;
mod sync_e2e;
mod sync_file_status;
mod sync_gates;
mod sync_transcripts;
mod sync_v2;
mod sync_v2_crash;
mod sync_v2_lanes;
mod sync_v2_spool;
mod upload;
mod upload_real_server;
