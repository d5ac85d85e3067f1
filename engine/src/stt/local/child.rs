//! The local engine in a child process, replaced when its memory passes a limit.
//!
//! The pinned engine (`moonshine-cpp` 0.1.4) leaks: every `moonshine_transcribe` call leaves about 14–17 MB
//! per second of audio allocated (glibc counts it in use), and freeing the model does not give it back
//! (docs/stt.md, "The local provider"). Nothing in-process can bound that, so a worker can run its model in
//! a child process instead: the server's own binary started as `voicegate stt-engine --dir <wheel folder>`
//! ([`run_engine_process`]), spoken to over its stdin and stdout. After each chunk the worker reads the
//! child's resident memory (`/proc/<pid>/statm`); past the limit it ends the child and starts a fresh one
//! (about 0.3 s: the model loads), counted in `voicegate_stt_engine_restarts_total{reason="memory"}`. A
//! child that dies (a crash in the engine) fails only the chunk it had, `engine` error, and is started again
//! for the next one (`reason="exited"`); the server never goes down with it.
//!
//! Protocol (little-endian): a request is the sample count (`u32`, at most [`MAX_SAMPLES`]) then the
//! samples (`f32`); the answer is a status byte (0 = text, 1 = error message) then the length (`u32`, at
//! most [`MAX_TEXT`]) then UTF-8 bytes. At start the child answers once without a request: status 0 and
//! no text when its model loaded, status 1 and the reason when it did not. End of input ends the child.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::KIND;
use super::ffi::{EngineFiles, MoonshineLib};
use super::pool::BatchEngine;
use crate::stt::types::SttError;
use crate::telemetry;

/// The largest request: a sync span's chunk is at most 10 s, so 120 s leaves room without letting a
/// corrupt length make the child allocate gigabytes.
pub const MAX_SAMPLES: usize = 16_000 * 120;
/// The longest answer the worker reads.
pub const MAX_TEXT: usize = 1 << 20;

/// Where the child's program is and how much memory it may grow to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildConfig {
    /// The `voicegate` binary (the server passes its own: `std::env::current_exe`).
    pub exe: PathBuf,
    /// Resident memory (KiB) past which the child is replaced after its chunk.
    pub max_rss_kib: u64,
}

#[derive(Debug)]
struct Running {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// A [`BatchEngine`] whose model runs in a child process.
#[derive(Debug)]
pub struct ChildEngine {
    config: ChildConfig,
    dir: PathBuf,
    running: Option<Running>,
}

fn engine_error(what: impl std::fmt::Display) -> SttError {
    SttError::Engine(format!("engine process: {what}"))
}

fn count_restart(reason: &'static str) {
    metrics::counter!(telemetry::STT_ENGINE_RESTARTS_TOTAL, "provider" => KIND.name(), "reason" => reason)
        .increment(1);
}

/// Registers the restart counter's series at zero.
pub fn register_metrics() {
    for reason in ["memory", "exited"] {
        metrics::counter!(telemetry::STT_ENGINE_RESTARTS_TOTAL, "provider" => KIND.name(), "reason" => reason)
            .increment(0);
    }
}

impl ChildEngine {
    /// Starts the child and waits until its model has loaded (or it says why it could not).
    pub fn start(config: ChildConfig, dir: &Path) -> Result<ChildEngine, SttError> {
        let mut engine = ChildEngine {
            config,
            dir: dir.to_path_buf(),
            running: None,
        };
        engine.spawn().map_err(|e| match e {
            SttError::Engine(m) => SttError::LoadFailed(m),
            other => other,
        })?;
        Ok(engine)
    }

    fn spawn(&mut self) -> Result<(), SttError> {
        let mut child = Command::new(&self.config.exe)
            .arg("stt-engine")
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                engine_error(format!("cannot start {}: {e}", self.config.exe.display()))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(engine_error("no pipes to the child"));
        };
        let mut running = Running {
            child,
            stdin: BufWriter::with_capacity(64 * 1024, stdin),
            stdout: BufReader::new(stdout),
        };
        match read_answer(&mut running.stdout) {
            Ok(Ok(_)) => {
                self.running = Some(running);
                Ok(())
            }
            Ok(Err(reason)) => {
                end(running);
                Err(engine_error(format!("the model did not load: {reason}")))
            }
            Err(e) => {
                end(running);
                Err(engine_error(format!("exited while loading: {e}")))
            }
        }
    }

    fn exchange(running: &mut Running, pcm: &[f32]) -> std::io::Result<Result<String, String>> {
        let n = u32::try_from(pcm.len()).map_err(std::io::Error::other)?;
        running.stdin.write_all(&n.to_le_bytes())?;
        for s in pcm {
            running.stdin.write_all(&s.to_le_bytes())?;
        }
        running.stdin.flush()?;
        read_answer(&mut running.stdout)
    }

    /// The child's resident memory in KiB (`None` if it cannot be read).
    fn rss_kib(running: &Running) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", running.child.id())).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(pages * u64::try_from(page).ok()? / 1024)
    }
}

/// Closes the child's input (it exits on end of input) and reaps it; kills it if it does not go.
fn end(running: Running) {
    let Running {
        mut child, stdin, ..
    } = running;
    drop(stdin);
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl BatchEngine for ChildEngine {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        if pcm.is_empty() {
            return Ok(String::new());
        }
        if pcm.len() > MAX_SAMPLES {
            return Err(engine_error(format!(
                "{} samples is more than one request may carry",
                pcm.len()
            )));
        }
        if self.running.is_none() {
            self.spawn()?;
        }
        let Some(running) = self.running.as_mut() else {
            return Err(engine_error("not running"));
        };
        let outcome = ChildEngine::exchange(running, pcm);
        let text = match outcome {
            Ok(Ok(text)) => text,
            Ok(Err(reason)) => return Err(SttError::Engine(reason)),
            Err(e) => {
                // The child died (or wrote garbage): this chunk is lost, the next starts a fresh one.
                if let Some(r) = self.running.take() {
                    end(r);
                }
                count_restart("exited");
                tracing::warn!(message = "the local STT engine process failed; starting a new one for the next chunk", error = %e);
                return Err(engine_error(e));
            }
        };
        if let Some(rss) = ChildEngine::rss_kib(running)
            && rss > self.config.max_rss_kib
        {
            if let Some(r) = self.running.take() {
                end(r);
            }
            count_restart("memory");
            tracing::info!(
                message = "local STT engine process replaced: its memory passed the limit",
                rss_kib = rss,
                limit_kib = self.config.max_rss_kib
            );
            // Started now rather than at the next chunk, so that chunk does not wait for the load; a failure
            // here is retried then.
            if let Err(e) = self.spawn() {
                tracing::warn!(message = "could not start a new local STT engine process", error = %e);
            }
        }
        Ok(text)
    }
}

impl Drop for ChildEngine {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            end(r);
        }
    }
}

/// Reads one answer: `Ok(Ok(text))`, `Ok(Err(reason))` from the child, `Err` when the pipe broke or the
/// answer is malformed.
fn read_answer(r: &mut impl Read) -> std::io::Result<Result<String, String>> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_TEXT {
        return Err(std::io::Error::other(format!("answer of {len} bytes")));
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)?;
    let text = String::from_utf8_lossy(&text).into_owned();
    match head[0] {
        0 => Ok(Ok(text)),
        1 => Ok(Err(text)),
        other => Err(std::io::Error::other(format!("answer status {other}"))),
    }
}

fn write_answer(w: &mut impl Write, status: u8, text: &str) -> std::io::Result<()> {
    let bytes = &text.as_bytes()[..text.len().min(MAX_TEXT)];
    w.write_all(&[status])?;
    w.write_all(&u32::try_from(bytes.len()).unwrap_or(0).to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// The child's side (`voicegate stt-engine --dir <folder>`): loads the model, answers requests from stdin
/// on stdout until end of input. Returns the process exit code.
///
/// The protocol keeps the process's original stdout to itself: fd 1 is pointed at stderr before the
/// library loads, so anything the engine prints goes to the log, not into an answer.
pub fn run_engine_process(dir: &Path) -> i32 {
    // SAFETY: dup on the process's own stdout, before any other thread exists here.
    let proto = unsafe { libc::dup(1) };
    if proto < 0 {
        return 70;
    }
    // SAFETY: dup2 of the process's own stderr onto its stdout (the protocol keeps its copy in `proto`).
    if unsafe { libc::dup2(2, 1) } < 0 {
        return 70;
    }
    // SAFETY: `proto` is a descriptor this process just created and owns from here on.
    let out = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(proto) };
    let mut out = BufWriter::new(out);
    let model = MoonshineLib::load(&EngineFiles::new(dir))
        .map(std::sync::Arc::new)
        .and_then(|lib| lib.load_model());
    let mut model = match model {
        Ok(m) => m,
        Err(e) => {
            let _ = write_answer(&mut out, 1, &e.to_string());
            return 3;
        }
    };
    if write_answer(&mut out, 0, "").is_err() {
        return 0;
    }
    let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let mut pcm: Vec<f32> = Vec::new();
    let mut raw: Vec<u8> = Vec::new();
    loop {
        let mut n = [0u8; 4];
        if input.read_exact(&mut n).is_err() {
            return 0;
        }
        let n = u32::from_le_bytes(n) as usize;
        if n > MAX_SAMPLES {
            let _ = write_answer(&mut out, 1, &format!("request of {n} samples"));
            return 2;
        }
        raw.resize(n * 4, 0);
        if input.read_exact(&mut raw).is_err() {
            return 0;
        }
        pcm.clear();
        pcm.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        let answer = match model.transcribe(&pcm) {
            Ok(text) => write_answer(&mut out, 0, &text),
            Err(e) => write_answer(&mut out, 1, &e.to_string()),
        };
        if answer.is_err() {
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_answer(&mut buf, 0, "hello there").unwrap();
        write_answer(&mut buf, 1, "engine failed").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_answer(&mut r).unwrap(), Ok("hello there".to_string()));
        assert_eq!(
            read_answer(&mut r).unwrap(),
            Err("engine failed".to_string())
        );
        assert!(read_answer(&mut r).is_err(), "end of input is an error");
        let mut bad = vec![7u8];
        bad.extend_from_slice(&0u32.to_le_bytes());
        assert!(read_answer(&mut &bad[..]).is_err(), "unknown status");
        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::try_from(MAX_TEXT + 1).unwrap().to_le_bytes());
        assert!(read_answer(&mut &huge[..]).is_err(), "over-long answer");
    }

    #[test]
    fn a_program_that_is_not_an_engine_fails_to_start_with_a_clear_error() {
        let config = ChildConfig {
            exe: PathBuf::from("/bin/true"),
            max_rss_kib: 1 << 20,
        };
        let err = ChildEngine::start(config, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, SttError::LoadFailed(m) if m.contains("exited while loading")),
            "{err}"
        );
        let config = ChildConfig {
            exe: PathBuf::from("/nonexistent/voicegate"),
            max_rss_kib: 1 << 20,
        };
        let err = ChildEngine::start(config, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, SttError::LoadFailed(m) if m.contains("cannot start")),
            "{err}"
        );
    }
}
