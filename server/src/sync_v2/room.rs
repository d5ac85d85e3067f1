//! Room in the spool, checked before an upload's body is read (the per-user byte quota is the job store's,
//! checked when the job is created):
//!
//! - the spool's bytes (`VOICEGATE_SYNC_SPOOL_MAX_BYTES`): what the last measurement found under the spool
//!   (jobs' files and uploads being written, every node's when the spool is shared), plus the jobs this node
//!   queued since, plus what the uploads being read on this node reserved;
//! - the free space of the spool's file system (`VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`), read at each upload.
//!
//! An upload reserves its declared `Content-Length` (the request limit when it declares none: a body is never
//! longer than its declared length) until its job is queued or it is refused; a refused upload's files are
//! removed with its batch, so a refusal never leaves bytes behind. The measurement runs every
//! [`MEASURE_EVERY`] (the worker pool's loop calls [`SpoolRoom::measure`]); between two, space freed by
//! ended jobs is seen late (the refusal's `Retry-After` covers it) and uploads other nodes queued are not
//! seen: the bound holds per node exactly, and across nodes sharing a spool within one measurement period.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use voicegate_engine::telemetry::SYNC_SPOOL_BYTES;

/// How often the spool's bytes are measured.
pub const MEASURE_EVERY: Duration = Duration::from_secs(10);
/// Folder levels under the spool that are walked (`<job>/<file>`, `incoming/<upload>/<file>`).
const MAX_DEPTH: usize = 3;

/// The spool's room on this node. Shared (`Arc`) by the upload route and the worker pool.
#[derive(Debug)]
pub struct SpoolRoom {
    dir: PathBuf,
    max_bytes: u64,
    min_free_bytes: u64,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Bytes under the spool at the last measurement.
    measured: u64,
    /// Bytes of the jobs this node queued since the last measurement started.
    added: u64,
    /// Bytes reserved by the uploads being read on this node.
    reserved: u64,
}

impl Counts {
    fn in_spool(self) -> u64 {
        self.measured.saturating_add(self.added)
    }
}

/// Why an upload does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpoolFull {
    #[error(
        "the sync spool holds {used} bytes; this upload's {bytes} would pass VOICEGATE_SYNC_SPOOL_MAX_BYTES \
         ({max}); retry once queued jobs have ended"
    )]
    Spool { used: u64, bytes: u64, max: u64 },
    #[error(
        "the sync spool's volume has {available} bytes free; this upload's {bytes} would leave less than \
         VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES ({min_free}); retry once queued jobs have ended"
    )]
    Volume {
        available: u64,
        bytes: u64,
        min_free: u64,
    },
}

impl SpoolFull {
    /// The setting that refused (the refusal's `limit` field) and its value.
    pub fn limit(&self) -> (&'static str, u64) {
        match self {
            SpoolFull::Spool { max, .. } => ("VOICEGATE_SYNC_SPOOL_MAX_BYTES", *max),
            SpoolFull::Volume { min_free, .. } => {
                ("VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES", *min_free)
            }
        }
    }
}

impl SpoolRoom {
    pub fn new(dir: PathBuf, max_bytes: u64, min_free_bytes: u64) -> Arc<Self> {
        Arc::new(SpoolRoom {
            dir,
            max_bytes,
            min_free_bytes,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `bytes` for an upload about to be read, or says why it does not fit.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, SpoolFull> {
        // Read outside the lock (a network volume may answer slowly).
        let available = self.available();
        let mut counts = self.counts();
        let used = counts.in_spool().saturating_add(counts.reserved);
        if used.saturating_add(bytes) > self.max_bytes {
            return Err(SpoolFull::Spool {
                used,
                bytes,
                max: self.max_bytes,
            });
        }
        // Uploads being read have written part of their reservation already: counting all of it again is
        // the safe side.
        if let Some(available) = available
            && available
                .saturating_sub(counts.reserved)
                .saturating_sub(bytes)
                < self.min_free_bytes
        {
            return Err(SpoolFull::Volume {
                available,
                bytes,
                min_free: self.min_free_bytes,
            });
        }
        counts.reserved = counts.reserved.saturating_add(bytes);
        Ok(Reservation {
            room: Arc::clone(self),
            bytes,
        })
    }

    /// Bytes available to this process on the spool's file system; `None` when the check is off or the
    /// volume cannot be read (then writing the upload decides: 503 `sync_spool_unavailable`).
    fn available(&self) -> Option<u64> {
        if self.min_free_bytes == 0 {
            return None;
        }
        match rustix::fs::statvfs(&self.dir) {
            Ok(st) => Some(st.f_bavail.saturating_mul(st.f_frsize)),
            Err(error) => {
                tracing::warn!(message = "Reading the sync spool's free space failed.", dir = %self.dir.display(), %error);
                None
            }
        }
    }

    /// Measures the bytes under the spool (on the blocking pool) and publishes them.
    pub async fn measure(&self) {
        let added_before = self.counts().added;
        let dir = self.dir.clone();
        let Ok(measured) = tokio::task::spawn_blocking(move || dir_bytes(&dir, MAX_DEPTH)).await
        else {
            return;
        };
        let mut counts = self.counts();
        counts.measured = measured;
        // Jobs queued while the walk ran may be in it or not: keep them (the safe side) until the next one.
        counts.added = counts.added.saturating_sub(added_before);
        publish(*counts);
    }
}

fn publish(counts: Counts) {
    metrics::gauge!(SYNC_SPOOL_BYTES).set(counts.in_spool() as f64);
}

/// Bytes of the regular files under `dir`, `depth` folder levels down (links are not followed).
fn dir_bytes(dir: &Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_file() => m.len(),
            Ok(m) if m.is_dir() && depth > 0 => dir_bytes(&e.path(), depth - 1),
            _ => 0,
        })
        .sum()
}

/// Room held for one upload; given back when dropped unless [`committed`](Self::commit).
#[derive(Debug)]
pub struct Reservation {
    room: Arc<SpoolRoom>,
    bytes: u64,
}

impl Reservation {
    /// The upload became a queued job holding `stored` bytes in the spool.
    pub fn commit(self, stored: u64) {
        let mut counts = self.room.counts();
        counts.added = counts.added.saturating_add(stored);
        publish(*counts);
        // `self` drops here (after the guard): the reservation is given back.
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut counts = self.room.counts();
        counts.reserved = counts.reserved.saturating_sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_hold_room_until_given_back_and_commits_stay_until_measured() {
        let dir = tempfile::tempdir().unwrap();
        let room = SpoolRoom::new(dir.path().to_path_buf(), 100, 0);
        let a = room.reserve(60).unwrap();
        assert_eq!(
            room.reserve(41).unwrap_err(),
            SpoolFull::Spool {
                used: 60,
                bytes: 41,
                max: 100
            }
        );
        drop(a);
        let b = room.reserve(100).unwrap();
        drop(b);
        room.reserve(70).unwrap().commit(70);
        assert!(matches!(
            room.reserve(31),
            Err(SpoolFull::Spool { used: 70, .. })
        ));
        room.reserve(30).unwrap();
    }

    #[actix::test]
    async fn a_measurement_counts_the_files_under_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let room = SpoolRoom::new(dir.path().to_path_buf(), 100, 0);
        room.reserve(50).unwrap().commit(50);
        std::fs::create_dir_all(dir.path().join("job/sub")).unwrap();
        std::fs::write(dir.path().join("job/0000.bin"), [0u8; 20]).unwrap();
        std::fs::write(dir.path().join("job/sub/x"), [0u8; 5]).unwrap();
        room.measure().await;
        // The job queued before the walk is now in the measurement (25 bytes), not counted apart.
        assert!(room.reserve(75).is_ok());
        assert!(matches!(
            room.reserve(76),
            Err(SpoolFull::Spool { used: 25, .. })
        ));
    }

    #[test]
    fn the_volume_keeps_its_free_space_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let room = SpoolRoom::new(dir.path().to_path_buf(), u64::MAX, u64::MAX / 2);
        assert!(matches!(room.reserve(1), Err(SpoolFull::Volume { .. })));
        let room = SpoolRoom::new(dir.path().to_path_buf(), u64::MAX, 1);
        assert!(room.reserve(1).is_ok());
    }
}
