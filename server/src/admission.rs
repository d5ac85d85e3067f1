//! Admission control of listen sessions by the node's own measurements (`VOICEGATE_ADMISSION_*`,
//! docs/operations.md "Admission control").
//!
//! Past its capacity a node used to admit every session and then serve all of them late (every stream's
//! events a minute behind at 1,200 streams on a node that holds 1,000). Instead, once a second
//! [`LoadGate::run`] measures:
//!
//! - **CPU**: the process's CPU time over the window against the cores it can have. Those are the cores
//!   available to it ([`std::thread::available_parallelism`]: the affinity mask and the cgroup quota), but
//!   no more than what it used plus what the CPUs of its affinity mask left idle (`/proc/stat`): a
//!   neighbour on the same cores (another process, the kernel's network work) takes its share first. CPU per
//!   open session = CPU used / the window's mean open sessions; capacity = `VOICEGATE_ADMISSION_CPU_PERCENT`
//!   of those cores / CPU per session. A session that would pass it is refused. This rule sees the node's
//!   load coming (it predicts). Measured on 2 shared cores, without the idle bound the node took 415
//!   sessions where 300 fit (the harness and the kernel took ~0.5 of a core).
//! - **Tick lag**: the share of the window's session-seconds whose worst pipeline tick ran later than
//!   `VOICEGATE_ADMISSION_LAG_MS` (reported by every session, [`TickLagWindow`]). Above
//!   `VOICEGATE_ADMISSION_LATE_PERCENT` the node refuses every new session until it drops again. This rule
//!   reacts (the lateness has begun), whatever takes the CPU.
//!
//! Both rules wait for `VOICEGATE_ADMISSION_MIN_SESSIONS` sessions (CPU) or session-seconds (tick lag) in the
//! window: below that a node's CPU is mostly fixed work and one slow second a large share. Until the CPU rule
//! knows the capacity, **the ramp** (`VOICEGATE_ADMISSION_RAMP_PER_SEC`, 50) admits at most that many new
//! sessions a second: a restarted node facing a reconnect storm would otherwise take every session in the
//! seconds before it has measured anything, and only the tick-lag rule, after the lateness began, would
//! stop it. The refusal is
//! `503 at_capacity` with `Retry-After` and `retryable: true`, before the handshake, so a load balancer or the
//! app tries another node; sessions already admitted are never closed by it. A request reads two atomics.
//!
//! CPU used by sync jobs on the same node counts as the sessions' cost: the capacity for sessions shrinks
//! while the node also decodes uploads, which is what the latency needs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use voicegate_engine::pipeline::live::load::TickLagWindow;
use voicegate_engine::telemetry as t;

/// How often the measurements are taken and the decision renewed.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Late session-seconds the window must hold before the tick-lag rule refuses, whatever the share: one or
/// two slow seconds of a lightly loaded node (a page fault, a neighbour's burst) are not overload.
pub const MIN_LATE_SESSION_SECONDS: u64 = 3;

/// The checked settings (`crate::config::AdmissionArgs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Share of the available cores sessions may use; `None`: the CPU rule is off.
    pub cpu_target: Option<f64>,
    /// A session-second is late when its worst tick ran more than this after its scheduled instant.
    pub lag_objective: Duration,
    /// Largest share of late session-seconds that still admits; `None`: the tick-lag rule is off.
    pub late_limit: Option<f64>,
    /// Seconds each decision looks back over.
    pub window_secs: u64,
    /// Sessions (CPU) or session-seconds (tick lag) the window must hold before a rule applies.
    pub min_sessions: usize,
    /// New sessions a second while the capacity is unknown; `None`: no limit (or the CPU rule is off).
    pub ramp_per_sec: Option<u32>,
}

/// Why the node's load refuses a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Overload {
    /// Another session would pass the capacity the node measured.
    Cpu { capacity: usize, cpu_percent: u32 },
    /// Too many of the window's session-seconds ran late.
    TickLag {
        late_percent: f64,
        window_secs: u64,
        lag_ms: u64,
    },
    /// The capacity is not measured yet and this second's new sessions reached the ramp.
    Ramp { per_sec: u32 },
}

impl Overload {
    /// The metric label and the refusal's `reason` field.
    pub fn reason(&self) -> &'static str {
        match self {
            Overload::Cpu { .. } => "cpu",
            Overload::TickLag { .. } => "tick_lag",
            Overload::Ramp { .. } => "ramp",
        }
    }
}

impl std::fmt::Display for Overload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overload::Cpu {
                capacity,
                cpu_percent,
            } => write!(
                f,
                "this server is at the capacity it measured ({capacity} listen sessions at {cpu_percent} % of its CPU, \
                 VOICEGATE_ADMISSION_CPU_PERCENT); reconnect later or to another instance"
            ),
            Overload::TickLag {
                late_percent,
                window_secs,
                lag_ms,
            } => write!(
                f,
                "this server's sessions are running late ({late_percent:.1} % of the last {window_secs} s's session-seconds \
                 more than {lag_ms} ms late, VOICEGATE_ADMISSION_LATE_PERCENT); reconnect later or to another instance"
            ),
            Overload::Ramp { per_sec } => write!(
                f,
                "this server has not measured its capacity yet and admits at most {per_sec} new listen sessions a second \
                 until it has (VOICEGATE_ADMISSION_RAMP_PER_SEC); reconnect in a few seconds or to another instance"
            ),
        }
    }
}

/// The node's admission decision from its load, renewed every [`SAMPLE_EVERY`] by [`run`](Self::run).
#[derive(Debug)]
pub struct LoadGate {
    cfg: AdmissionConfig,
    cores: f64,
    tick_lag: Arc<TickLagWindow>,
    /// The measured capacity in sessions; `usize::MAX` while unknown or with the CPU rule off.
    capacity: AtomicUsize,
    /// The window's late share, as `f64` bits (for the refusal's message).
    late_ratio: AtomicU64,
    lagging: AtomicBool,
    /// Sessions admitted by the ramp this second (reset by each measurement).
    ramped: AtomicU32,
}

impl LoadGate {
    pub fn new(cfg: AdmissionConfig) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        LoadGate {
            cfg,
            cores: cores as f64,
            tick_lag: Arc::new(TickLagWindow::new(cfg.lag_objective)),
            capacity: AtomicUsize::new(usize::MAX),
            late_ratio: AtomicU64::new(0),
            lagging: AtomicBool::new(false),
            ramped: AtomicU32::new(0),
        }
    }

    /// Where sessions report their tick lag.
    pub fn tick_lag(&self) -> Arc<TickLagWindow> {
        Arc::clone(&self.tick_lag)
    }

    /// Whether one more session may open while `active` are open.
    pub fn check(&self, active: usize) -> Result<(), Overload> {
        if self.lagging.load(Ordering::Acquire) {
            return Err(Overload::TickLag {
                late_percent: f64::from_bits(self.late_ratio.load(Ordering::Acquire)) * 100.0,
                window_secs: self.cfg.window_secs,
                lag_ms: self.cfg.lag_objective.as_millis() as u64,
            });
        }
        let capacity = self.capacity.load(Ordering::Acquire);
        if capacity == usize::MAX
            && let Some(per_sec) = self.cfg.ramp_per_sec
            && self
                .ramped
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < per_sec).then_some(n + 1)
                })
                .is_err()
        {
            return Err(Overload::Ramp { per_sec });
        }
        if active >= capacity {
            return Err(Overload::Cpu {
                capacity,
                cpu_percent: self
                    .cfg
                    .cpu_target
                    .map_or(0, |c| (c * 100.0).round() as u32),
            });
        }
        Ok(())
    }

    /// Measures every [`SAMPLE_EVERY`] until the runtime stops; `active` counts the open sessions.
    pub async fn run(self: Arc<Self>, active: impl Fn() -> usize) {
        let mut cpu = CpuWindow::new(self.cfg.window_secs);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| allowed_cpus(&s));
        loop {
            tick.tick().await;
            let times = mask.as_ref().and_then(|mask| {
                std::fs::read_to_string("/proc/stat")
                    .ok()
                    .and_then(|stat| cpu_times(&stat, mask))
            });
            cpu.push(CpuSample {
                at: Instant::now(),
                cpu: process_cpu_time(),
                times,
                active: active(),
            });
            self.update(&cpu);
        }
    }

    /// Renews the decision from the CPU window and the tick-lag window.
    fn update(&self, cpu: &CpuWindow) {
        let usage = cpu.usage();
        let capacity = match (self.cfg.cpu_target, usage) {
            (Some(target), Some(u)) if u.sessions >= self.cfg.min_sessions as f64 => {
                capacity(target, u.cores_available(self.cores), u)
            }
            _ => None,
        };
        self.capacity
            .store(capacity.unwrap_or(usize::MAX), Ordering::Release);
        // A new second of the ramp (a token may be spent by a session a later check refuses: the ramp
        // errs on the side of admitting fewer).
        self.ramped.store(0, Ordering::Release);
        let lag = self.tick_lag.read(self.cfg.window_secs);
        let ratio = lag.late_ratio();
        let lagging = self.cfg.late_limit.is_some_and(|limit| {
            lag.session_seconds >= self.cfg.min_sessions as u64
                && lag.late >= MIN_LATE_SESSION_SECONDS
                && ratio > limit
        });
        self.late_ratio.store(ratio.to_bits(), Ordering::Release);
        self.lagging.store(lagging, Ordering::Release);
        metrics::gauge!(t::LISTEN_CAPACITY_SESSIONS).set(capacity.map_or(f64::NAN, |c| c as f64));
        if let Some(u) = usage {
            metrics::gauge!(t::NODE_CPU_UTILISATION_RATIO).set(u.cores_used / self.cores);
            metrics::gauge!(t::NODE_CPU_AVAILABLE_CORES).set(u.cores_available(self.cores));
        }
        metrics::gauge!(t::LISTEN_LATE_SESSION_SECONDS_RATIO).set(ratio);
    }
}

/// Sessions that fit in `target` of `cores` at the measured cost per session; `None` when unmeasurable.
fn capacity(target: f64, cores: f64, usage: CpuUsage) -> Option<usize> {
    let per_session = usage.cores_used / usage.sessions;
    if !(per_session.is_finite() && per_session > 0.0) {
        return None;
    }
    let sessions = (target * cores / per_session).floor();
    Some(if sessions >= usize::MAX as f64 {
        usize::MAX
    } else {
        sessions as usize
    })
}

/// The CPU time of this process so far, every thread included.
fn process_cpu_time() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The CPUs this process may run on, from `/proc/self/status` (`Cpus_allowed_list: 0-3,8`).
fn allowed_cpus(status: &str) -> Option<Vec<usize>> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi): (usize, usize) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
            None => {
                let one = part.parse().ok()?;
                (one, one)
            }
        };
        // A mask of thousands of CPUs is not a machine this reads; refuse rather than allocate.
        if hi < lo || hi - lo > 4_096 {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// `/proc/stat`'s time unit (`USER_HZ`, fixed at 100 in Linux's user-space ABI).
const USER_HZ: u64 = 100;

/// The time so far of the CPUs of a mask, from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    /// Idle and waiting for I/O.
    idle: Duration,
    /// Everything (user, nice, system, idle, iowait, irq, softirq, steal): advances by the wall time per
    /// CPU on a kernel that counts (a sandbox that writes zeros does not).
    total: Duration,
    cpus: usize,
}

/// The times so far of the CPUs in `mask`, from `/proc/stat`; `None` when a CPU of the mask has no line
/// (offline, or the file is not what this expects).
fn cpu_times(stat: &str, mask: &[usize]) -> Option<CpuTimes> {
    let (mut idle, mut total, mut seen) = (0u64, 0u64, 0usize);
    for line in stat.lines() {
        // `cpuN …` lines only, not the aggregate `cpu  …` line.
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let mut fields = rest.split_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else {
            continue;
        };
        if !mask.contains(&cpu) {
            continue;
        }
        let values: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
        let [_, _, _, i, w, ..] = values[..] else {
            return None;
        };
        idle += i + w;
        total += values.iter().sum::<u64>();
        seen += 1;
    }
    let ms = |ticks: u64| Duration::from_millis(ticks.saturating_mul(1_000) / USER_HZ);
    (seen == mask.len() && seen > 0).then(|| CpuTimes {
        idle: ms(idle),
        total: ms(total),
        cpus: seen,
    })
}

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    cpu: Duration,
    /// The times so far of the CPUs this process may run on (`None`: not known here).
    times: Option<CpuTimes>,
    active: usize,
}

/// What the window measured: cores busy on average, cores left idle (when known), and the mean open
/// sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuUsage {
    cores_used: f64,
    cores_idle: Option<f64>,
    sessions: f64,
}

impl CpuUsage {
    /// The cores this process can have: `cores`, but no more than it used plus what was left idle.
    fn cores_available(&self, cores: f64) -> f64 {
        match self.cores_idle {
            Some(idle) => cores.min(self.cores_used + idle),
            None => cores,
        }
    }
}

/// The last `window_secs` seconds of samples (one a second, bounded).
struct CpuWindow {
    samples: VecDeque<CpuSample>,
    len: usize,
}

impl CpuWindow {
    fn new(window_secs: u64) -> Self {
        let len = usize::try_from(window_secs).unwrap_or(1).max(1) + 1;
        CpuWindow {
            samples: VecDeque::with_capacity(len),
            len,
        }
    }

    fn push(&mut self, s: CpuSample) {
        if self.samples.len() == self.len {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// `None` until two samples at least half a second apart.
    fn usage(&self) -> Option<CpuUsage> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let wall = last.at.checked_duration_since(first.at)?.as_secs_f64();
        if wall < 0.5 {
            return None;
        }
        let cpu = last.cpu.saturating_sub(first.cpu).as_secs_f64();
        // The idle bound only when the CPUs' clocks advanced as wall clocks do (±25 %): a sandbox that
        // writes zeros would otherwise read as no idle at all, and the capacity as the sessions open now.
        let idle = match (first.times, last.times) {
            (Some(a), Some(b)) if a.cpus == b.cpus => {
                let counted =
                    b.total.saturating_sub(a.total).as_secs_f64() / (wall * b.cpus as f64);
                (0.75..=1.25)
                    .contains(&counted)
                    .then(|| b.idle.saturating_sub(a.idle).as_secs_f64() / wall)
            }
            _ => None,
        };
        // Each interval's sessions: the mean of its two ends.
        let pairs = self.samples.iter().zip(self.samples.iter().skip(1));
        let sessions = pairs
            .map(|(a, b)| (a.active + b.active) as f64 / 2.0)
            .sum::<f64>()
            / (self.samples.len() - 1) as f64;
        Some(CpuUsage {
            cores_used: cpu / wall,
            cores_idle: idle,
            sessions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            cpu_target: Some(0.85),
            lag_objective: Duration::from_millis(250),
            late_limit: Some(0.02),
            window_secs: 10,
            min_sessions: 20,
            ramp_per_sec: None,
        }
    }

    /// Samples one second apart: `active` sessions costing `per_session` cores each.
    fn window(seconds: usize, active: usize, per_session: f64) -> CpuWindow {
        let mut w = CpuWindow::new(10);
        let t0 = Instant::now();
        for i in 0..=seconds {
            w.push(CpuSample {
                at: t0 + Duration::from_secs(i as u64),
                cpu: Duration::from_secs_f64(i as f64 * active as f64 * per_session),
                times: None,
                active,
            });
        }
        w
    }

    #[test]
    fn capacity_is_the_target_share_of_the_cores_over_the_measured_cost_per_session() {
        // 600 sessions at 1 ms of CPU per second each = 0.6 cores; 0.85 × 2 cores / 0.001 = 1,700.
        let u = window(10, 600, 0.001).usage().unwrap();
        assert!((u.cores_used - 0.6).abs() < 1e-9, "{u:?}");
        assert_eq!(u.sessions, 600.0);
        assert_eq!(capacity(0.85, 2.0, u), Some(1_700));
        // Nothing measured yet, or no CPU at all: unknown.
        assert_eq!(CpuWindow::new(10).usage(), None);
        assert_eq!(
            window(10, 600, 0.0).usage().map(|u| capacity(0.85, 2.0, u)),
            Some(None)
        );
    }

    #[test]
    fn the_window_keeps_its_last_seconds_and_averages_sessions_per_interval() {
        let mut w = CpuWindow::new(2);
        let t0 = Instant::now();
        for (i, active) in [100usize, 0, 10, 20].into_iter().enumerate() {
            w.push(CpuSample {
                at: t0 + Duration::from_secs(i as u64),
                cpu: Duration::from_millis(500 * i as u64),
                // Two CPUs whose clocks advance 2 s a second, 0.25 s of it idle.
                times: Some(CpuTimes {
                    idle: Duration::from_millis(250 * i as u64),
                    total: Duration::from_secs(2 * i as u64),
                    cpus: 2,
                }),
                active,
            });
        }
        // Kept: seconds 1..=3 (0, 10, 20 sessions): intervals average 5 and 15.
        let u = w.usage().unwrap();
        assert_eq!(u.sessions, 10.0);
        assert!((u.cores_used - 0.5).abs() < 1e-9);
        assert_eq!(u.cores_idle, Some(0.25));
        // Clocks that do not advance (a sandbox writing zeros): no idle bound rather than a wrong one.
        let mut frozen = CpuWindow::new(2);
        for i in 0..3u64 {
            frozen.push(CpuSample {
                at: t0 + Duration::from_secs(i),
                cpu: Duration::from_millis(500 * i),
                times: Some(CpuTimes {
                    idle: Duration::ZERO,
                    total: Duration::ZERO,
                    cpus: 2,
                }),
                active: 30,
            });
        }
        assert_eq!(frozen.usage().map(|u| u.cores_idle), Some(None));
    }

    #[test]
    fn while_the_capacity_is_unknown_the_ramp_admits_its_sessions_a_second() {
        let gate = LoadGate {
            cores: 2.0,
            ..LoadGate::new(AdmissionConfig {
                ramp_per_sec: Some(3),
                ..cfg()
            })
        };
        // Nothing measured: three a second, then refused until the next measurement.
        for _ in 0..3 {
            assert_eq!(gate.check(0), Ok(()));
        }
        assert_eq!(gate.check(3), Err(Overload::Ramp { per_sec: 3 }));
        assert_eq!(gate.check(3).map_err(|o| o.reason()), Err("ramp"));
        gate.update(&window(10, 3, 0.002));
        assert_eq!(
            gate.check(3),
            Ok(()),
            "a new second, still unknown (3 < 20)"
        );
        // Measured (30 sessions at 2 ms each: capacity 850): the ramp no longer applies.
        gate.update(&window(10, 30, 0.002));
        for _ in 0..10 {
            assert_eq!(gate.check(30), Ok(()));
        }
        assert!(
            Overload::Ramp { per_sec: 3 }
                .to_string()
                .contains("VOICEGATE_ADMISSION_RAMP_PER_SEC")
        );
    }

    #[test]
    fn the_gate_refuses_past_the_measured_capacity_and_only_with_enough_sessions() {
        let gate = LoadGate {
            cores: 2.0,
            ..LoadGate::new(cfg())
        };
        // 1,000 sessions at 2 ms per second each: 2 cores busy, capacity 850.
        gate.update(&window(10, 1_000, 0.002));
        assert_eq!(gate.check(849), Ok(()));
        assert_eq!(
            gate.check(850),
            Err(Overload::Cpu {
                capacity: 850,
                cpu_percent: 85
            })
        );
        let message = gate.check(900).unwrap_err().to_string();
        assert!(message.contains("850 listen sessions"), "{message}");
        // 10 sessions (under the minimum of 20), however costly: no CPU rule.
        gate.update(&window(10, 10, 0.5));
        assert_eq!(gate.check(10_000), Ok(()));
        // The rule off: never.
        let off = LoadGate {
            cores: 2.0,
            ..LoadGate::new(AdmissionConfig {
                cpu_target: None,
                ..cfg()
            })
        };
        off.update(&window(10, 1_000, 0.002));
        assert_eq!(off.check(100_000), Ok(()));
    }

    #[test]
    fn late_session_seconds_past_the_limit_refuse_everyone_until_they_drop() {
        let gate = LoadGate::new(cfg());
        // 97 on time and 3 late: 3 % > 2 %, and the 3 late ones the rule needs.
        for lag_ms in std::iter::repeat_n(10, 97).chain([300, 400, 2_000]) {
            gate.tick_lag.record(Duration::from_millis(lag_ms));
        }
        gate.update(&CpuWindow::new(10));
        match gate.check(0) {
            Err(Overload::TickLag {
                late_percent,
                window_secs: 10,
                lag_ms: 250,
            }) => assert!((late_percent - 3.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        // 100 more on time: 3 of 200 = 1.5 %, admitted again.
        for _ in 0..100 {
            gate.tick_lag.record(Duration::from_millis(10));
        }
        gate.update(&CpuWindow::new(10));
        assert_eq!(gate.check(0), Ok(()));
    }

    #[test]
    fn too_few_session_seconds_or_too_few_late_ones_never_refuse_for_lag() {
        let gate = LoadGate::new(cfg());
        for _ in 0..19 {
            gate.tick_lag.record(Duration::from_secs(3));
        }
        gate.update(&CpuWindow::new(10));
        assert_eq!(gate.check(0), Ok(()));
        // 2 late of 40 (5 %): one hiccup on a quiet node.
        let gate = LoadGate::new(cfg());
        for lag_ms in std::iter::repeat_n(10, 38).chain([900, 900]) {
            gate.tick_lag.record(Duration::from_millis(lag_ms));
        }
        gate.update(&CpuWindow::new(10));
        assert_eq!(gate.check(0), Ok(()));
    }

    #[test]
    fn a_neighbour_on_the_same_cores_lowers_the_capacity() {
        // 300 sessions at 4 ms per second each use 1.2 of 2 cores; the CPUs were idle 0.3 of a core (a
        // neighbour took 0.5): 1.5 cores available, 0.85 × 1.5 / 0.004 = 318 sessions, not 425.
        let u = CpuUsage {
            cores_used: 1.2,
            cores_idle: Some(0.3),
            sessions: 300.0,
        };
        assert!((u.cores_available(2.0) - 1.5).abs() < 1e-9);
        assert_eq!(capacity(0.85, u.cores_available(2.0), u), Some(318));
        // Idle beyond the cores (a quota smaller than the machine): the quota bounds it.
        let quota = CpuUsage {
            cores_idle: Some(30.0),
            ..u
        };
        assert_eq!(quota.cores_available(2.0), 2.0);
        assert_eq!(
            CpuUsage {
                cores_idle: None,
                ..u
            }
            .cores_available(2.0),
            2.0
        );
    }

    #[test]
    fn the_cpu_mask_and_the_idle_time_of_its_cpus_are_read_from_proc() {
        let status = "Name:\tvoicegate\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1,4\n";
        assert_eq!(allowed_cpus(status), Some(vec![0, 1, 4]));
        assert_eq!(allowed_cpus("Cpus_allowed_list:\t3\n"), Some(vec![3]));
        assert_eq!(allowed_cpus("Cpus_allowed_list:\t5-2\n"), None);
        assert_eq!(allowed_cpus("Name:\tx\n"), None);
        // The aggregate line's first number (1) must not be read as CPU 1.
        let stat = "cpu  1 0 10 900 100 0 0 0 0 0\n\
                    cpu0 1 0 1 100 10 0 0 0 0 0\n\
                    cpu1 2 0 2 200 20 1 1 1 0 0\n\
                    cpu4 3 0 3 300 30 0 0 0 0 0\n\
                    intr 1 2 3\n";
        // cpu1 and cpu4: idle (200 + 20) + (300 + 30) ticks of 10 ms; total 227 + 336.
        assert_eq!(
            cpu_times(stat, &[1, 4]),
            Some(CpuTimes {
                idle: Duration::from_millis(5_500),
                total: Duration::from_millis(5_630),
                cpus: 2
            })
        );
        // A CPU of the mask without a line: unknown.
        assert_eq!(cpu_times(stat, &[1, 7]), None);
        // This machine's own files parse.
        let mask = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap();
        assert!(cpu_times(&std::fs::read_to_string("/proc/stat").unwrap(), &mask).is_some());
    }

    #[test]
    fn the_process_cpu_clock_advances_with_work() {
        let before = process_cpu_time();
        let mut x = 0u64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(process_cpu_time() >= before + Duration::from_millis(20));
    }
}
