//! Admission control of listen sessions by the node's measured load (`crate::admission`), flattened into
//! [`super::ServeConfig`].

use std::time::Duration;

use clap::Args;

use super::{ConfigError, defaults};
use crate::admission::AdmissionConfig;

#[derive(Args, Debug, Clone, PartialEq)]
pub struct AdmissionArgs {
    /// Share of the CPU available to this process (its cores, or its cgroup quota) that listen sessions may use: the node estimates its capacity from its own CPU per session over the window and refuses sessions past it (503 `at_capacity`, reason `cpu`). 0 turns the rule off.
    #[arg(id = "admission_cpu_percent", long = "admission-cpu-percent", env = "VOICEGATE_ADMISSION_CPU_PERCENT", default_value_t = defaults::ADMISSION_CPU_PERCENT)]
    pub cpu_percent: u32,

    /// A listen session-second is late when its worst pipeline tick ran more than this many ms after its scheduled time (the latency objective admission protects).
    #[arg(id = "admission_lag_ms", long = "admission-lag-ms", env = "VOICEGATE_ADMISSION_LAG_MS", default_value_t = defaults::ADMISSION_LAG_MS)]
    pub lag_ms: u64,

    /// Refuse new listen sessions (503 `at_capacity`, reason `tick_lag`) while more than this percent of the window's session-seconds were late. 0 turns the rule off.
    #[arg(id = "admission_late_percent", long = "admission-late-percent", env = "VOICEGATE_ADMISSION_LATE_PERCENT", default_value_t = defaults::ADMISSION_LATE_PERCENT)]
    pub late_percent: f64,

    /// Seconds of measurements (CPU, tick lag) each admission decision looks back over (1 to 60).
    #[arg(id = "admission_window_secs", long = "admission-window-secs", env = "VOICEGATE_ADMISSION_WINDOW_SECS", default_value_t = defaults::ADMISSION_WINDOW_SECS)]
    pub window_secs: u64,

    /// Both rules apply only once the node measures at least this many open sessions (CPU) or session-seconds in the window (tick lag): below it, only VOICEGATE_WS_MAX_SESSIONS limits.
    #[arg(id = "admission_min_sessions", long = "admission-min-sessions", env = "VOICEGATE_ADMISSION_MIN_SESSIONS", default_value_t = defaults::ADMISSION_MIN_SESSIONS)]
    pub min_sessions: usize,

    /// While the CPU rule has not measured the capacity yet (fewer sessions than VOICEGATE_ADMISSION_MIN_SESSIONS in the window: a fresh or idle node), admit at most this many new listen sessions a second (503 `at_capacity`, reason `ramp`, past it), so a reconnect storm cannot fill the node before it knows its cost. 0 turns the limit off; off with the CPU rule.
    #[arg(id = "admission_ramp_per_sec", long = "admission-ramp-per-sec", env = "VOICEGATE_ADMISSION_RAMP_PER_SEC", default_value_t = defaults::ADMISSION_RAMP_PER_SEC)]
    pub ramp_per_sec: u32,
}

impl AdmissionArgs {
    /// Both rules off: what embedders and tests start with unless they ask (the command line's defaults
    /// are on). A test process's own client work would count as the server's CPU.
    pub fn off() -> Self {
        AdmissionArgs {
            cpu_percent: 0,
            late_percent: 0.0,
            ..Self::on()
        }
    }

    /// The command line's defaults.
    pub fn on() -> Self {
        AdmissionArgs {
            cpu_percent: defaults::ADMISSION_CPU_PERCENT,
            lag_ms: defaults::ADMISSION_LAG_MS,
            late_percent: defaults::ADMISSION_LATE_PERCENT,
            window_secs: defaults::ADMISSION_WINDOW_SECS,
            min_sessions: defaults::ADMISSION_MIN_SESSIONS,
            ramp_per_sec: defaults::ADMISSION_RAMP_PER_SEC,
        }
    }

    /// The settings, checked.
    pub fn config(&self) -> Result<AdmissionConfig, ConfigError> {
        let bad = |name: &'static str, value: String, range: &'static str| {
            ConfigError::BadAdmission { name, value, range }
        };
        if self.cpu_percent > 100 {
            return Err(bad(
                "VOICEGATE_ADMISSION_CPU_PERCENT",
                self.cpu_percent.to_string(),
                "0 (off) to 100",
            ));
        }
        if !(self.late_percent.is_finite() && (0.0..=100.0).contains(&self.late_percent)) {
            return Err(bad(
                "VOICEGATE_ADMISSION_LATE_PERCENT",
                self.late_percent.to_string(),
                "0 (off) to 100",
            ));
        }
        if !(1..=voicegate_engine::pipeline::live::load::MAX_WINDOW_S).contains(&self.window_secs) {
            return Err(bad(
                "VOICEGATE_ADMISSION_WINDOW_SECS",
                self.window_secs.to_string(),
                "1 to 60",
            ));
        }
        Ok(AdmissionConfig {
            cpu_target: (self.cpu_percent > 0).then(|| f64::from(self.cpu_percent) / 100.0),
            lag_objective: Duration::from_millis(self.lag_ms),
            late_limit: (self.late_percent > 0.0).then_some(self.late_percent / 100.0),
            window_secs: self.window_secs,
            min_sessions: self.min_sessions.max(1),
            ramp_per_sec: (self.cpu_percent > 0 && self.ramp_per_sec > 0)
                .then_some(self.ramp_per_sec),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_on_and_off_is_off() {
        let on = AdmissionArgs::on().config().unwrap();
        assert_eq!(on.cpu_target, Some(0.85));
        assert_eq!(on.late_limit, Some(0.02));
        assert_eq!(on.lag_objective, Duration::from_millis(250));
        assert_eq!(on.ramp_per_sec, Some(50));
        let off = AdmissionArgs::off().config().unwrap();
        assert_eq!(
            (off.cpu_target, off.late_limit, off.ramp_per_sec),
            (None, None, None)
        );
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        for (args, name) in [
            (
                AdmissionArgs {
                    cpu_percent: 101,
                    ..AdmissionArgs::on()
                },
                "VOICEGATE_ADMISSION_CPU_PERCENT",
            ),
            (
                AdmissionArgs {
                    late_percent: f64::NAN,
                    ..AdmissionArgs::on()
                },
                "VOICEGATE_ADMISSION_LATE_PERCENT",
            ),
            (
                AdmissionArgs {
                    window_secs: 61,
                    ..AdmissionArgs::on()
                },
                "VOICEGATE_ADMISSION_WINDOW_SECS",
            ),
            (
                AdmissionArgs {
                    window_secs: 0,
                    ..AdmissionArgs::on()
                },
                "VOICEGATE_ADMISSION_WINDOW_SECS",
            ),
        ] {
            let e = args.config().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
