//! VoiceGate server: the HTTP and websocket edge of the engine.
//!
//! - `config`: every flag, env var and default of `voicegate serve`; `serve`: startup, app, drain.
//! - `auth` (bearer tokens, dev mode), `admin` (`X-Admin-Key`), `error` (one mapping to statuses and codes).
//! - `upload` (streaming multipart with limits), `stripe` (webhook signature and events), `sessions`
//!   (listen admission and drain), `timeouts` (head, body progress and whole-body 408s), `health` (`/healthz`, `/readyz`), `prometheus` (`/metrics`, latency).

pub mod admin;
pub mod admission;
pub mod auth;
pub mod client_addr;
pub mod config;
pub mod drain;
pub mod engine;
pub mod error;
pub mod health;
pub mod heap;
pub mod listen;
pub mod part_headers;
pub mod plans_admin;
pub mod prometheus;
pub mod routes;
pub mod serve;
pub mod sessions;
pub mod stripe;
pub mod stt;
pub mod stt_admin;
pub mod sync;
pub mod sync_v2;
pub mod throttle;
pub mod timeouts;
pub mod upload;
pub mod upload_slots;

pub use config::ServeConfig;
pub use error::ApiError;
pub use serve::{ServeError, ServerBuilder, run};
