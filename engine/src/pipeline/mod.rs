//! Pipelines: one sync upload (offline) or one realtime session (live), over a shared speech pipeline.
pub mod labels;
pub mod live;
pub mod offline;
pub mod stream;
