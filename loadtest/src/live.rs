//! Counters every task bumps while the run goes on (for the progress bar), and the bar itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Default)]
pub struct Live {
    pub streams_active: AtomicUsize,
    pub streams_peak: AtomicUsize,
    pub streams_done: AtomicUsize,
    pub frames_sent: AtomicU64,
    pub events: AtomicU64,
    pub errors: AtomicU64,
    pub uploads_done: AtomicU64,
    pub files_done: AtomicU64,
}

impl Live {
    pub fn stream_opened(&self) {
        let now = self.streams_active.fetch_add(1, Relaxed) + 1;
        self.streams_peak.fetch_max(now, Relaxed);
    }

    pub fn stream_closed(&self) {
        self.streams_active.fetch_sub(1, Relaxed);
    }
}

/// A progress line redrawn twice a second until `stop` is dropped or the task is aborted.
pub fn spawn_progress(
    live: Arc<Live>,
    hidden: bool,
    streams: usize,
    uploads: u64,
) -> tokio::task::JoinHandle<()> {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            bar.set_message(format!(
                "streams {}/{} (peak {}, done {}) · frames sent {} · events {} · uploads {}/{} · files {} · errors {}",
                live.streams_active.load(Relaxed),
                streams,
                live.streams_peak.load(Relaxed),
                live.streams_done.load(Relaxed),
                live.frames_sent.load(Relaxed),
                live.events.load(Relaxed),
                live.uploads_done.load(Relaxed),
                uploads,
                live.files_done.load(Relaxed),
                live.errors.load(Relaxed),
            ));
            bar.tick();
        }
    })
}
