//! Notices to users on stage changes, behind a trait (push notifications live in the server).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::policy::notice::Notice;

/// Delivers a notice. Must not block: implementations that do I/O spawn it.
pub trait Notifier: Send + Sync + 'static {
    fn notify(&self, uid: &str, notice: &Notice);
}

/// The default: a structured log line, and the latest notice per user kept for the status API.
#[derive(Debug, Clone, Default)]
pub struct LogNotifier {
    latest: Arc<Mutex<HashMap<String, Notice>>>,
}

impl LogNotifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest notice sent to `uid` (what the status view shows next to the stage).
    pub fn latest(&self, uid: &str) -> Option<Notice> {
        // Whole-value inserts only: a poisoned map is still consistent.
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .cloned()
    }
}

impl Notifier for LogNotifier {
    fn notify(&self, uid: &str, notice: &Notice) {
        tracing::info!(
            message = "Fair-use notice.",
            uid,
            stage = notice.stage.as_str(),
            case_ref = notice.case_ref.as_ref().map(|c| c.as_str()),
            title = %notice.title,
        );
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid.to_owned(), notice.clone());
    }
}
