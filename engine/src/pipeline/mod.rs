//! Pipelines: one sync upload (offline analysis, and the sync use case around it) or one realtime session
//! (live), over a shared speech pipeline.
pub mod labels;
pub mod live;
pub mod offline;
pub mod stream;
pub mod sync;
pub mod tap;
