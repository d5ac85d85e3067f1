//! VoiceGate engine: everything between device audio and a fair-use decision, with no HTTP.
//!
//! - `audio`: the `.bin` container, device file names, codecs, resampling, VAD and speech segments.
//! - `pipeline`: one sync upload (offline) or one realtime session (live) from bytes to metered speech.
//! - `meter`: per-user actors holding rolling speech windows, with exactly-once write-behind to a `store`.
//! - `policy`: pure fair-use decisions (caps, stages, entitlement); `fair_use`: the fair-use service (the
//!   [`fair_use::FairUse`] handle, the ledger, the cap supervisor actor and its classifiers).
//! - `store`, `conversation`: the outside state (Redis or in memory) behind traits; `lease`: the slots of
//!   per-user limits this node holds in the store, with their heartbeat.
//! - `config`: the engine's one [`config::ConfigError`] and the clap value parser of every setting (the
//!   settings, e.g. [`meter::MeterArgs`], [`policy::FairUseArgs`], live beside their modules).
//! - `outbound`: the one outbound HTTP/websocket client ([`outbound::Outbound`], rustls, one CA setting).
//! - `time`: the leaf module for time and units ([`time::Clock`], ms ↔ samples, [`time::Span`]).
//!
//! Who messages whom on which thread, where each state lives and where the bounded queues are:
//! `docs/architecture.md`.

pub mod audio;
pub mod config;
pub mod conversation;
pub mod events;
pub mod fair_use;
pub mod lease;
pub mod meter;
pub mod outbound;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod stt;
pub mod telemetry;
pub mod threads;
pub mod time;
