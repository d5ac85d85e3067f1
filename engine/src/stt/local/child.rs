//! The local engine in a child process, replaced when its memory passes a limit.
//!
//! The pinned engine (`moonshine-cpp` 0.1.4) leaks: every `moonshine_transcribe` call leaves about 14–17 MB
//! per second of audio allocated (glibc counts it in use), and freeing the model does not give it back
//! (docs/stt.md, "The local provider"). Nothing in-process can bound that, so a worker can run its model in
//! a child process instead: the server's own binary started as `voicegate stt-engine --dir <wheel folder>`
//! ([`run_engine_process`]), spoken to over its stdin and stdout, with none of the server's environment.
//! Between jobs (once a job's results are out) the worker reads the child's resident memory
//! (`/proc/<pid>/statm`); past the limit it ends the child and starts a fresh one (about 0.3 s: the model
//! loads), counted in `voicegate_stt_engine_restarts_total{reason="memory"}`. A child found dead before a
//! chunk is replaced and nothing is lost; one that dies during a chunk, or takes no input or gives no
//! answer within [`ANSWER_TIMEOUT`] (hung or stopped: killed), fails that chunk only (`engine` error; `reason="exited"` or
//! `"timeout"`), and the next chunk starts a new one. The server never goes down with it.
//!
//! Protocol (little-endian): a request is the sample count (`u32`, at most [`MAX_SAMPLES`]) then the
//! samples (`f32`); the answer is a status byte (0 = text, 1 = error message) then the length (`u32`, at
//! most [`MAX_TEXT`]) then UTF-8 bytes. At start the child answers once without a request: status 0 and
//! no text when its model loaded, status 1 and the reason when it did not. End of input ends the child.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

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
    /// How long the child may take to load its model or to answer one chunk before it is taken for hung,
    /// killed and replaced ([`ANSWER_TIMEOUT`]).
    pub answer_timeout: Duration,
}

/// A 10 s chunk takes about 4 s on a free core; a worker starved by the pipeline (it runs at niceness 10)
/// can take ten times that. Five minutes is far past any of it: only a hung engine waits that long.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Running {
    child: Child,
    /// Non-blocking: a child that stops reading cannot hold the worker past its deadline
    /// ([`write_until`]).
    stdin: ChildStdin,
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
    for reason in ["memory", "exited", "timeout"] {
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
            // Nothing of the server's environment (provider keys among it) reaches the engine's process.
            .env_clear()
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
        if let Err(e) = set_nonblocking(&stdin) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(engine_error(format!("the child's input: {e}")));
        }
        let mut running = Running {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let ready = wait_readable(&running.stdout, self.config.answer_timeout)
            .and_then(|()| read_answer(&mut running.stdout));
        match ready {
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

    fn exchange(
        running: &mut Running,
        pcm: &[f32],
        timeout: Duration,
    ) -> std::io::Result<Result<String, String>> {
        let deadline = std::time::Instant::now() + timeout;
        let n = u32::try_from(pcm.len()).map_err(std::io::Error::other)?;
        let mut request = Vec::with_capacity(4 + 4 * pcm.len());
        request.extend_from_slice(&n.to_le_bytes());
        for s in pcm {
            request.extend_from_slice(&s.to_le_bytes());
        }
        write_until(&mut running.stdin, &request, deadline)?;
        drop(request);
        wait_readable(
            &running.stdout,
            deadline.saturating_duration_since(std::time::Instant::now()),
        )?;
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

impl ChildEngine {
    /// Ends the running child if it has exited on its own since its last answer (the kernel's OOM killer
    /// picks the largest process: often this one), so that the next chunk goes to a new one instead of
    /// being lost.
    fn reap_if_gone(&mut self) {
        let gone = self
            .running
            .as_mut()
            .is_some_and(|r| !matches!(r.child.try_wait(), Ok(None)));
        if gone && let Some(r) = self.running.take() {
            end(r);
            count_restart("exited");
            tracing::warn!(message = "the local STT engine process had exited; starting a new one");
        }
    }
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
        self.reap_if_gone();
        if self.running.is_none() {
            self.spawn()?;
        }
        let Some(running) = self.running.as_mut() else {
            return Err(engine_error("not running"));
        };
        match ChildEngine::exchange(running, pcm, self.config.answer_timeout) {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(reason)) => Err(SttError::Engine(reason)),
            Err(e) => {
                // The child died, hung or wrote garbage during this chunk: the chunk is lost, the next
                // starts a fresh process.
                if let Some(r) = self.running.take() {
                    end(r);
                }
                count_restart(if e.kind() == std::io::ErrorKind::TimedOut {
                    "timeout"
                } else {
                    "exited"
                });
                tracing::warn!(message = "the local STT engine process failed during a chunk; starting a new one for the next", error = %e);
                Err(engine_error(e))
            }
        }
    }

    fn between_jobs(&mut self) {
        let Some(rss) = self.running.as_ref().and_then(ChildEngine::rss_kib) else {
            return;
        };
        if rss <= self.config.max_rss_kib {
            return;
        }
        if let Some(r) = self.running.take() {
            end(r);
        }
        // Started now rather than at the next chunk, so that chunk does not wait for the load; a failure here
        // is retried then. Counted once the new process is ready (or has failed to start).
        let started = self.spawn();
        count_restart("memory");
        tracing::info!(
            message = "local STT engine process replaced: its memory passed the limit",
            rss_kib = rss,
            limit_kib = self.config.max_rss_kib
        );
        if let Err(e) = started {
            tracing::warn!(message = "could not start a new local STT engine process", error = %e);
        }
    }
}

impl Drop for ChildEngine {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            end(r);
        }
    }
}

/// Puts the child's input in non-blocking mode (our end of the pipe only).
fn set_nonblocking(stdin: &ChildStdin) -> std::io::Result<()> {
    let fd = stdin.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns (the pipe's write end), for its flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes all of `bytes` to the child's (non-blocking) input by `deadline`. The pipe holds 64 KiB, a
/// tenth of a 10 s chunk: a child that stopped reading (hung before it read, or stopped by a signal) would
/// otherwise block the worker for good. Past the deadline: `TimedOut`, and the caller kills the child.
fn write_until(
    stdin: &mut ChildStdin,
    mut bytes: &[u8],
    deadline: std::time::Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stdin.write(bytes) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the engine's input is closed",
                ));
            }
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                poll_until(stdin.as_raw_fd(), libc::POLLOUT, deadline, "took no input")?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until the child's answer starts (`TimedOut` past `timeout`). The answer's first byte is what
/// matters: the child writes a whole answer at once, so the rest follows without waiting on the engine.
fn wait_readable(stdout: &BufReader<ChildStdout>, timeout: Duration) -> std::io::Result<()> {
    if !stdout.buffer().is_empty() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + timeout;
    poll_until(
        stdout.get_ref().as_raw_fd(),
        libc::POLLIN,
        deadline,
        &format!("gave no answer within {} s", timeout.as_secs()),
    )
}

/// Waits until `fd` is ready for `events` (or hung up / in error: the read or write that follows says
/// which); `TimedOut` ("the engine <what>") past `deadline`.
fn poll_until(
    fd: std::os::fd::RawFd,
    events: libc::c_short,
    deadline: std::time::Instant,
    what: &str,
) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the engine {what}"),
            ));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
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
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects. The server's thread
    // that started this process is its worker, which ends this process itself before it ends; the signal
    // covers the server being killed (`kill -9`) while the engine is busy or hung.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
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
            Err(SttError::Engine(m)) => write_answer(&mut out, 1, &m),
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

    /// A program that says it is ready, then runs `then` (a shell command).
    fn fake_engine(dir: &Path, name: &str, then: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let exe = dir.join(name);
        let script = format!("#!/bin/sh\nprintf '\\000\\000\\000\\000\\000'\n{then}\n");
        std::fs::write(&exe, script).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    /// A program that says it is ready, then never answers (a hung engine).
    fn hanging_engine(dir: &Path) -> PathBuf {
        fake_engine(dir, "hung-engine", "exec sleep 1000")
    }

    #[test]
    fn an_engine_that_dies_during_a_chunk_fails_that_chunk_and_the_next_gets_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let config = ChildConfig {
            // Reads the request's length, then dies (a crash inside the engine).
            exe: fake_engine(tmp.path(), "dying-engine", "head -c 4 >/dev/null; exit 1"),
            max_rss_kib: 1 << 20,
            answer_timeout: Duration::from_secs(30),
        };
        let mut engine = ChildEngine::start(config, tmp.path()).unwrap();
        let first = engine.running.as_ref().unwrap().child.id();
        let err = engine.transcribe(&[0.1; 16_000]).unwrap_err();
        assert!(
            matches!(&err, SttError::Engine(m) if m.starts_with("engine process")),
            "{err}"
        );
        assert!(engine.running.is_none(), "the dead process was reaped");
        assert!(!Path::new(&format!("/proc/{first}")).exists());
        assert!(
            engine.transcribe(&[0.1; 16_000]).is_err(),
            "a new process took it"
        );
    }

    #[test]
    fn a_hung_engine_is_killed_after_the_timeout_and_the_chunk_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let config = ChildConfig {
            exe: hanging_engine(tmp.path()),
            max_rss_kib: 1 << 20,
            answer_timeout: Duration::from_millis(300),
        };
        let mut engine = ChildEngine::start(config, tmp.path()).unwrap();
        let pid = engine.running.as_ref().unwrap().child.id();
        let began = std::time::Instant::now();
        let err = engine.transcribe(&[0.1; 1600]).unwrap_err();
        assert!(
            matches!(&err, SttError::Engine(m) if m.contains("no answer within")),
            "{err}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert!(engine.running.is_none(), "the hung process is gone");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "killed and reaped, not a zombie"
        );
        // The next chunk starts a new process (which hangs too here).
        assert!(engine.transcribe(&[0.1; 1600]).is_err());
    }

    /// A 10 s chunk is ten times what the pipe holds: a child that stops reading (here: stopped by a
    /// signal) must not hold the worker in its write past the deadline.
    #[test]
    fn a_child_that_stops_reading_cannot_block_the_write_of_a_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let config = ChildConfig {
            exe: fake_engine(tmp.path(), "reading-engine", "exec cat >/dev/null"),
            max_rss_kib: 1 << 20,
            answer_timeout: Duration::from_millis(500),
        };
        let mut engine = ChildEngine::start(config, tmp.path()).unwrap();
        let pid = engine.running.as_ref().unwrap().child.id();
        let stopped = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(stopped.success());
        let began = std::time::Instant::now();
        let err = engine.transcribe(&[0.1; 160_000]).unwrap_err();
        assert!(
            matches!(&err, SttError::Engine(m) if m.contains("took no input")),
            "{err}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert!(engine.running.is_none(), "the stopped process is gone");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "killed and reaped, not a zombie"
        );
    }

    #[test]
    fn a_program_that_is_not_an_engine_fails_to_start_with_a_clear_error() {
        let config = ChildConfig {
            exe: PathBuf::from("/bin/true"),
            max_rss_kib: 1 << 20,
            answer_timeout: ANSWER_TIMEOUT,
        };
        let err = ChildEngine::start(config, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, SttError::LoadFailed(m) if m.contains("exited while loading")),
            "{err}"
        );
        let config = ChildConfig {
            exe: PathBuf::from("/nonexistent/voicegate"),
            max_rss_kib: 1 << 20,
            answer_timeout: ANSWER_TIMEOUT,
        };
        let err = ChildEngine::start(config, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, SttError::LoadFailed(m) if m.contains("cannot start")),
            "{err}"
        );
    }
}
