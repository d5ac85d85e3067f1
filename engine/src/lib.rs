//! VoiceGate engine: everything between device audio and a fair-use decision, with no HTTP.
//!
//! - `audio`: the `.bin` container, device file names, codecs, resampling, VAD and speech segments.
//! - `pipeline`: one sync upload (offline) or one realtime session (live) from bytes to metered speech.
//! - `meter`: per-user actors holding rolling speech windows, with exactly-once write-behind to a `store`.
//! - `policy`: pure fair-use decisions (caps, stages, entitlement); `supervisor`: the cap supervisor actor.

pub mod audio;
pub mod conversation;
pub mod meter;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod stt;
pub mod supervisor;
pub mod telemetry;
pub mod threads;
