//! The streaming multipart reader of `POST /v1/sync-local-files`.
//!
//! - Each `files` part streams to its own file in a per-request temp directory; nothing is held in memory
//!   beyond one write buffer, and the client's file name is never used as a path.
//! - Limits (bytes per file, files per request, bytes per request) are enforced while streaming and answer 413
//!   naming the limit; a body with no `files` part answers 400.
//! - The SHA-256 of each file is computed while it streams (the metering idempotency key).
//! - The returned [`UploadBatch`] owns the temp directory: dropping it removes every file, on every path
//!   (a body timeout drops the request, and with it the batch, at once).
//! - Temp folders are named `voicegate-upload-<pid>.<process start>.<server>-<random>` in
//!   `VOICEGATE_UPLOAD_DIR` (default: the system temp directory). A drain removes its server's folders still
//!   present once requests are stopped ([`sweep_own`]); startup removes folders whose process no longer
//!   runs ([`sweep_leftovers`]: the pid is gone, or now names a process started at another time). Nothing
//!   else in that directory is touched: a sync spool must live in a directory of its own.

use std::io::Write;
use std::path::{Path, PathBuf};

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, web};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use voicegate_engine::telemetry::UPLOAD_REJECTIONS_TOTAL;

use crate::config::ServeConfig;

/// The name prefix of every upload temp folder (followed by its owner: `<pid>.<process start>.<server>-`).
pub const TEMP_PREFIX: &str = "voicegate-upload-";

/// Numbers the servers of one process (tests run several), so a drain sweeps only its own folders.
static SERVERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The multipart field that carries audio files (the reference's name).
pub const FILES_FIELD: &str = "files";
/// Bytes buffered before a write is handed to the blocking pool.
const WRITE_CHUNK: usize = 256 * 1024;

/// The limits of one upload request.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    pub max_file_bytes: u64,
    pub max_files: usize,
    pub max_request_bytes: u64,
    /// Parent of the per-request temp directories; `None` = the system temp directory.
    pub dir: Option<PathBuf>,
    /// `voicegate-upload-<pid>.<process start>.<server>-`: the name prefix of this server's temp folders.
    pub folder_prefix: String,
}

impl UploadLimits {
    pub fn from_config(cfg: &ServeConfig) -> Self {
        UploadLimits {
            max_file_bytes: cfg.upload_max_file_bytes,
            max_files: cfg.upload_max_files,
            max_request_bytes: cfg.upload_max_request_bytes,
            dir: cfg.upload_dir.clone(),
            folder_prefix: own_prefix(),
        }
    }
}

/// One uploaded file, saved in the batch's temp directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFile {
    /// The file name the client sent (may be empty or invalid: the caller validates it and fails only this file).
    pub name: String,
    /// Where the content is; valid while the [`UploadBatch`] lives.
    pub path: PathBuf,
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
}

impl SavedFile {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// The files of one request. Dropping it deletes them.
#[derive(Debug)]
pub struct UploadBatch {
    pub files: Vec<SavedFile>,
    dir: TempDir,
}

impl UploadBatch {
    /// The temp directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Moves the batch's directory to `dest` and returns the files at their new paths. On one file system
    /// it is a rename, so a crash leaves either the temp folder (swept at the next start) or the whole
    /// destination. Across file systems (a v1 upload read under `VOICEGATE_UPLOAD_DIR` into a spool on
    /// another volume) the files are first copied into a folder of the same temp name under `staging` (the
    /// spool's `incoming`, on the destination's file system, swept like any upload temp folder), which is then
    /// renamed to `dest`. Blocking: call it off the async workers.
    pub fn persist(self, dest: &Path, staging: &Path) -> std::io::Result<Vec<SavedFile>> {
        let from = self.dir.path().to_path_buf();
        match std::fs::rename(&from, dest) {
            // Renamed: the temp guard must not delete anything now (the old path no longer exists).
            Ok(()) => {
                let _ = self.dir.keep();
            }
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                let name = from.file_name().unwrap_or_default();
                copy_flat(&from, &staging.join(name), dest)?;
                // `self.dir` deletes the source when dropped below.
            }
            Err(e) => return Err(e),
        }
        Ok(self
            .files
            .into_iter()
            .map(|mut f| {
                if let Ok(rel) = f.path.strip_prefix(&from) {
                    f.path = dest.join(rel);
                }
                f
            })
            .collect())
    }
}

/// Copies the files of the flat folder `from` into `part`, then renames that to `dest`.
fn copy_flat(from: &Path, part: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(part)?;
    let copied = (|| {
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), part.join(entry.file_name()))?;
            }
        }
        std::fs::rename(part, dest)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(part);
    }
    copied
}

/// The name and value of a limit that was hit (reported in the 413 body as `limit` / `limit_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitInfo {
    pub name: &'static str,
    pub value: u64,
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("body must be multipart/form-data: {0}")]
    NotMultipart(String),
    #[error("no `files` part in the upload")]
    Empty,
    #[error("malformed multipart body: {0}")]
    Malformed(String),
    #[error(
        "file {file:?} exceeds the per-file limit of {limit} bytes (VOICEGATE_UPLOAD_MAX_FILE_BYTES)"
    )]
    FileTooLarge { file: String, limit: u64 },
    #[error("more than {limit} files in one request (VOICEGATE_UPLOAD_MAX_FILES)")]
    TooManyFiles { limit: usize },
    #[error("request exceeds the limit of {limit} bytes (VOICEGATE_UPLOAD_MAX_REQUEST_BYTES)")]
    RequestTooLarge { limit: u64 },
    #[error("temporary storage failed: {0}")]
    Storage(String),
}

impl UploadError {
    pub fn code(&self) -> &'static str {
        match self {
            UploadError::NotMultipart(_) => "upload_not_multipart",
            UploadError::Empty => "upload_empty",
            UploadError::Malformed(_) => "upload_malformed",
            UploadError::FileTooLarge { .. } => "upload_file_too_large",
            UploadError::TooManyFiles { .. } => "upload_too_many_files",
            UploadError::RequestTooLarge { .. } => "upload_request_too_large",
            UploadError::Storage(_) => "upload_storage_failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            UploadError::NotMultipart(_) | UploadError::Empty | UploadError::Malformed(_) => {
                StatusCode::BAD_REQUEST
            }
            UploadError::FileTooLarge { .. }
            | UploadError::TooManyFiles { .. }
            | UploadError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The limit that was hit, for a 413.
    pub fn limit(&self) -> Option<LimitInfo> {
        match self {
            UploadError::FileTooLarge { limit, .. } => Some(LimitInfo {
                name: "VOICEGATE_UPLOAD_MAX_FILE_BYTES",
                value: *limit,
            }),
            UploadError::TooManyFiles { limit } => Some(LimitInfo {
                name: "VOICEGATE_UPLOAD_MAX_FILES",
                value: *limit as u64,
            }),
            UploadError::RequestTooLarge { limit } => Some(LimitInfo {
                name: "VOICEGATE_UPLOAD_MAX_REQUEST_BYTES",
                value: *limit,
            }),
            _ => None,
        }
    }
}

/// Reads an upload request into temp files, enforcing `limits`.
///
/// A declared `Content-Length` over the request limit is refused before any byte is read.
pub async fn read_upload(
    req: &HttpRequest,
    payload: web::Payload,
    limits: &UploadLimits,
) -> Result<UploadBatch, UploadError> {
    let result = read_upload_inner(req, payload, limits).await;
    if let Err(e) = &result {
        metrics::counter!(UPLOAD_REJECTIONS_TOTAL, "reason" => e.code()).increment(1);
    }
    result
}

async fn read_upload_inner(
    req: &HttpRequest,
    payload: web::Payload,
    limits: &UploadLimits,
) -> Result<UploadBatch, UploadError> {
    read_multipart(req.headers(), payload, limits).await
}

/// The reader behind [`read_upload`] on any body stream (the `multipart` fuzz target drives it with
/// arbitrary bytes). Runs on an actix system (the file writes use `web::block`).
pub async fn read_multipart<S>(
    headers: &actix_web::http::header::HeaderMap,
    payload: S,
    limits: &UploadLimits,
) -> Result<UploadBatch, UploadError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, actix_web::error::PayloadError>>
        + Unpin
        + 'static,
{
    let declared = headers
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_request_bytes) {
        return Err(UploadError::RequestTooLarge {
            limit: limits.max_request_bytes,
        });
    }
    // A NUL in one part's headers must fail that file only (`crate::part_headers`).
    let content_type = headers
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = crate::part_headers::boundary(content_type).unwrap_or("");
    let payload = crate::part_headers::NulInPartHeaders::new(payload, boundary);
    let mut multipart = Multipart::new(headers, payload);
    let dir = make_temp_dir(limits.dir.as_deref(), &limits.folder_prefix)?;
    let mut files = Vec::new();
    let mut request_bytes: u64 = 0;
    let mut saw_part = false;
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(|e| part_error(e, saw_part))?;
        saw_part = true;
        let is_file = field.name() == Some(FILES_FIELD);
        if !is_file {
            // Other fields are read and discarded, but still count against the request limit.
            while let Some(chunk) = field.next().await {
                let chunk = chunk.map_err(|e| UploadError::Malformed(e.to_string()))?;
                request_bytes = add_request_bytes(request_bytes, chunk.len(), limits)?;
            }
            continue;
        }
        if files.len() >= limits.max_files {
            return Err(UploadError::TooManyFiles {
                limit: limits.max_files,
            });
        }
        let name = field
            .content_disposition()
            .and_then(|cd| cd.get_filename())
            .unwrap_or_default()
            .replace(char::from(crate::part_headers::NUL_STAND_IN), "\0");
        let path = dir.path().join(format!("{:04}.bin", files.len()));
        let mut sink = FileSink::create(&path)?;
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| UploadError::Malformed(e.to_string()))?;
            request_bytes = add_request_bytes(request_bytes, chunk.len(), limits)?;
            if sink.size + chunk.len() as u64 > limits.max_file_bytes {
                return Err(UploadError::FileTooLarge {
                    file: name,
                    limit: limits.max_file_bytes,
                });
            }
            sink.push(&chunk).await?;
        }
        let (size, sha256) = sink.finish().await?;
        files.push(SavedFile {
            name,
            path,
            size,
            sha256,
        });
    }
    if files.is_empty() {
        return Err(UploadError::Empty);
    }
    Ok(UploadBatch { files, dir })
}

fn part_error(e: actix_multipart::MultipartError, saw_part: bool) -> UploadError {
    use actix_multipart::MultipartError as E;
    match e {
        E::ContentTypeMissing
        | E::ContentTypeParse
        | E::ContentTypeIncompatible
        | E::BoundaryMissing => UploadError::NotMultipart(e.to_string()),
        // A body that ends before its first part is an empty upload, not a protocol error.
        E::Incomplete if !saw_part => UploadError::Empty,
        other => UploadError::Malformed(other.to_string()),
    }
}

fn add_request_bytes(total: u64, more: usize, limits: &UploadLimits) -> Result<u64, UploadError> {
    let total = total.saturating_add(more as u64);
    if total > limits.max_request_bytes {
        return Err(UploadError::RequestTooLarge {
            limit: limits.max_request_bytes,
        });
    }
    Ok(total)
}

fn make_temp_dir(parent: Option<&Path>, prefix: &str) -> Result<TempDir, UploadError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    let dir = match parent {
        Some(p) => builder.tempdir_in(p),
        None => builder.tempdir(),
    };
    dir.map_err(|e| UploadError::Storage(e.to_string()))
}

/// The directory holding upload temp folders: `configured`, or the system temp directory.
pub fn temp_parent(configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(std::env::temp_dir, Path::to_path_buf)
}

/// A new server's folder prefix: this process (pid and start time) and a per-process server number.
fn own_prefix() -> String {
    let pid = std::process::id();
    let start = process_start(pid).unwrap_or(0);
    let server = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{TEMP_PREFIX}{pid}.{start}.{server}-")
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat` field 22): with the pid, it names
/// one process even after the pid is reused. `None` when no such process runs (or not on Linux).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')' are plain.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The owner (pid, process start) in an upload temp folder's name, if `name` is one.
fn owner(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (owner, _) = rest.split_once('-')?;
    let mut parts = owner.split('.');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    Some((pid, start))
}

/// Removes the upload temp folders in `parent` whose name satisfies `remove`; returns how many.
fn sweep(parent: &Path, remove: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !remove(name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(error) => tracing::warn!(
                message = "Removing an upload temp folder failed.",
                path = %entry.path().display(),
                %error
            ),
        }
    }
    removed
}

/// At the end of a drain (no request runs any more): removes the temp folders of this server's uploads
/// that a cut request left behind.
pub fn sweep_own(parent: &Path, limits: &UploadLimits) -> usize {
    sweep(parent, |name| name.starts_with(&limits.folder_prefix))
}

/// At startup: removes upload temp folders whose process no longer runs (a crash, a kill): its pid is
/// gone or names a process started at another time (pid 1 in a restarted container). Folders of a running
/// server sharing the directory are kept; on a system without `/proc` nothing is removed.
pub fn sweep_leftovers(parent: &Path) -> usize {
    if process_start(std::process::id()).is_none() {
        return 0;
    }
    sweep(parent, |name| {
        owner(name).is_some_and(|(pid, start)| process_start(pid) != Some(start))
    })
}

/// A file being written: hashes on the async side, writes in batches on the blocking pool.
struct FileSink {
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl FileSink {
    fn create(path: &Path) -> Result<Self, UploadError> {
        let file = std::fs::File::create(path).map_err(|e| UploadError::Storage(e.to_string()))?;
        Ok(FileSink {
            file: Some(file),
            buf: Vec::with_capacity(WRITE_CHUNK),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    async fn push(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= WRITE_CHUNK {
            self.write_out().await?;
        }
        Ok(())
    }

    async fn write_out(&mut self) -> Result<(), UploadError> {
        let Some(mut file) = self.file.take() else {
            return Err(UploadError::Storage("file already closed".to_owned()));
        };
        let mut buf = std::mem::take(&mut self.buf);
        let (file, buf) = web::block(move || {
            file.write_all(&buf)?;
            buf.clear();
            Ok::<_, std::io::Error>((file, buf))
        })
        .await
        .map_err(|e| UploadError::Storage(e.to_string()))?
        .map_err(|e| UploadError::Storage(e.to_string()))?;
        self.file = Some(file);
        self.buf = buf;
        Ok(())
    }

    async fn finish(mut self) -> Result<(u64, [u8; 32]), UploadError> {
        if !self.buf.is_empty() {
            self.write_out().await?;
        }
        Ok((self.size, self.hasher.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(parent: &Path, name: &str) -> PathBuf {
        let p = parent.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(p.join("0000.bin"), b"x").unwrap_or_else(|e| panic!("{e}"));
        p
    }

    #[test]
    fn startup_sweep_removes_folders_of_dead_processes_and_nothing_else() {
        let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let me = std::process::id();
        let my_start = process_start(me).unwrap_or_else(|| panic!("no /proc/self/stat"));
        // 999_999_999 is above Linux's largest pid: no process runs with it.
        let dead = folder(parent.path(), &format!("{TEMP_PREFIX}999999999.5.0-abc"));
        // This pid, but started at another time: an earlier life of the pid (a restarted container).
        let reused = folder(
            parent.path(),
            &format!("{TEMP_PREFIX}{me}.{}.0-def", my_start + 1),
        );
        let live = folder(
            parent.path(),
            &format!("{TEMP_PREFIX}{me}.{my_start}.3-ghi"),
        );
        let spool = folder(parent.path(), "voicegate-spool-999999999");
        let legacy = folder(parent.path(), &format!("{TEMP_PREFIX}Xy12ab"));
        assert_eq!(sweep_leftovers(parent.path()), 2);
        assert!(!dead.exists() && !reused.exists());
        assert!(live.exists(), "a running process's folder is kept");
        assert!(
            spool.exists() && legacy.exists(),
            "other names are never touched"
        );
    }

    #[test]
    fn drain_sweep_removes_only_this_server_folders() {
        let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cfg = ServeConfig::default();
        let (mine, other_server) = (
            UploadLimits::from_config(&cfg),
            UploadLimits::from_config(&cfg),
        );
        let a = make_temp_dir(Some(parent.path()), &mine.folder_prefix)
            .unwrap_or_else(|e| panic!("{e}"))
            .keep();
        let b = make_temp_dir(Some(parent.path()), &other_server.folder_prefix)
            .unwrap_or_else(|e| panic!("{e}"))
            .keep();
        assert_eq!(sweep_own(parent.path(), &mine), 1);
        assert!(!a.exists() && b.exists());
    }

    #[test]
    fn temp_folders_are_named_with_the_owner_process() {
        let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let limits = UploadLimits::from_config(&ServeConfig::default());
        let dir = make_temp_dir(Some(parent.path()), &limits.folder_prefix)
            .unwrap_or_else(|e| panic!("{e}"));
        let name = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned);
        let me = std::process::id();
        assert_eq!(
            name.as_deref().and_then(owner),
            Some((me, process_start(me).unwrap_or(0)))
        );
        assert_eq!(sweep_leftovers(parent.path()), 0, "a live folder is kept");
    }
}
