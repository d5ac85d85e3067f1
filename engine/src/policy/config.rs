//! Every fair-use setting, its default and its environment variable, in one struct.
//!
//! The reference's names are kept so its operators can reuse their settings; settings the reference did not
//! have are prefixed `VOICEGATE_`. Parsing is pure: the caller passes a lookup (`|k| std::env::var(k).ok()`).
//! A value that does not parse is an error at startup, never a silent default.

use std::collections::BTreeSet;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::stage::DAY_MS;
use crate::policy::{PlanTable, SoftCaps, StagePolicy};

/// Master enable (default **true** here; the reference defaulted to false).
pub const ENV_ENABLED: &str = "FAIR_USE_ENABLED";
/// Turns off caps, stages, STT budgets and 429s (never metering, month usage or the credit lock).
pub const ENV_KILL_SWITCH: &str = "FAIR_USE_KILL_SWITCH";
pub const ENV_DAILY_SPEECH_MS: &str = "FAIR_USE_DAILY_SPEECH_MS";
pub const ENV_3DAY_SPEECH_MS: &str = "FAIR_USE_3DAY_SPEECH_MS";
pub const ENV_WEEKLY_SPEECH_MS: &str = "FAIR_USE_WEEKLY_SPEECH_MS";
pub const ENV_SCORE_THRESHOLD: &str = "FAIR_USE_CLASSIFIER_ABUSE_SCORE_THRESHOLD";
pub const ENV_COOLDOWN_SECONDS: &str = "FAIR_USE_CLASSIFIER_COOLDOWN_SECONDS";
/// Comma-separated uids; empty items dropped.
pub const ENV_EXEMPT_UIDS: &str = "FAIR_USE_EXEMPT_UIDS";
/// Daily STT budget in restrict; 0 disables it.
pub const ENV_RESTRICT_DAILY_STT_MS: &str = "FAIR_USE_RESTRICT_DAILY_DG_MS";
/// Free-plan monthly minutes; 0 = unlimited.
pub const ENV_FREE_MINUTES: &str = "BASIC_TIER_MINUTES_LIMIT_PER_MONTH";
pub const ENV_CLASSIFIER_MODEL: &str = "FAIR_USE_CLASSIFIER_MODEL";
pub const ENV_CLASSIFIER_LOOKBACK_DAYS: &str = "FAIR_USE_CLASSIFIER_LOOKBACK_DAYS";
/// Daily STT budget in throttle; 0 disables it.
pub const ENV_THROTTLE_DAILY_STT_MS: &str = "VOICEGATE_FAIR_USE_THROTTLE_DAILY_STT_MS";
/// Comma-separated plan ids with unlimited minutes.
pub const ENV_PAID_PLANS: &str = "VOICEGATE_FAIR_USE_PAID_PLANS";
pub const ENV_THROTTLE_DAYS: &str = "VOICEGATE_FAIR_USE_THROTTLE_DAYS";
pub const ENV_RESTRICT_DAYS: &str = "VOICEGATE_FAIR_USE_RESTRICT_DAYS";
pub const ENV_WARNING_DECAY_DAYS: &str = "VOICEGATE_FAIR_USE_WARNING_DECAY_DAYS";
/// `heuristic` (default) or `openai`.
pub const ENV_CLASSIFIER: &str = "VOICEGATE_CLASSIFIER";
pub const ENV_CLASSIFIER_BASE_URL: &str = "VOICEGATE_CLASSIFIER_BASE_URL";
pub const ENV_CLASSIFIER_API_KEY: &str = "VOICEGATE_CLASSIFIER_API_KEY";
pub const ENV_CLASSIFIER_CONCURRENCY: &str = "VOICEGATE_CLASSIFIER_CONCURRENCY";
pub const ENV_CLASSIFIER_TIMEOUT_SECONDS: &str = "VOICEGATE_CLASSIFIER_TIMEOUT_SECONDS";
pub const ENV_CLASSIFIER_RETRY_BASE_SECONDS: &str = "VOICEGATE_CLASSIFIER_RETRY_BASE_SECONDS";
pub const ENV_CLASSIFIER_RETRY_MAX_SECONDS: &str = "VOICEGATE_CLASSIFIER_RETRY_MAX_SECONDS";

/// Which classifier the supervisor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierKind {
    #[default]
    Heuristic,
    OpenAi,
}

/// Classifier and supervisor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSettings {
    pub kind: ClassifierKind,
    /// OpenAI-compatible base URL (the client appends `/chat/completions`).
    pub base_url: String,
    pub model: String,
    /// Never logged or serialised.
    #[serde(skip)]
    pub api_key: Option<String>,
    pub lookback_days: u64,
    /// Classifications per user at most once per cooldown.
    pub cooldown_ms: u64,
    /// Classifier tasks in flight at most.
    pub concurrency: usize,
    pub timeout_ms: u64,
    /// First retry after a failure; doubles per failure up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for ClassifierSettings {
    fn default() -> Self {
        ClassifierSettings {
            kind: ClassifierKind::Heuristic,
            base_url: "https://api.openai.com/v1".to_owned(),
            model: "gpt-5.1".to_owned(),
            api_key: None,
            lookback_days: 7,
            cooldown_ms: 43_200_000,
            concurrency: 8,
            timeout_ms: 120_000,
            retry_base_ms: 60_000,
            retry_max_ms: 3_600_000,
        }
    }
}

/// All fair-use settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairUseConfig {
    pub enabled: bool,
    pub kill_switch: bool,
    pub caps: SoftCaps,
    pub stages: StagePolicy,
    pub exempt_uids: BTreeSet<String>,
    pub restrict_daily_stt_ms: u64,
    pub throttle_daily_stt_ms: u64,
    pub plans: PlanTable,
    pub classifier: ClassifierSettings,
}

impl Default for FairUseConfig {
    fn default() -> Self {
        FairUseConfig {
            enabled: true,
            kill_switch: false,
            caps: SoftCaps::default(),
            stages: StagePolicy::default(),
            exempt_uids: BTreeSet::new(),
            restrict_daily_stt_ms: 1_800_000,
            throttle_daily_stt_ms: 7_200_000,
            plans: PlanTable::default(),
            classifier: ClassifierSettings::default(),
        }
    }
}

/// A setting that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {var}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl ConfigError {
    pub const CODE: &'static str = "invalid_fair_use_config";
}

impl FairUseConfig {
    /// Defaults overridden by every variable `lookup` knows. Empty values count as unset.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<FairUseConfig, ConfigError> {
        let get = |var: &'static str| {
            lookup(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut c = FairUseConfig::default();
        let d = &mut c;
        set(&mut d.enabled, ENV_ENABLED, get(ENV_ENABLED), parse_bool)?;
        set(
            &mut d.kill_switch,
            ENV_KILL_SWITCH,
            get(ENV_KILL_SWITCH),
            parse_bool,
        )?;
        set(
            &mut d.caps.daily_ms,
            ENV_DAILY_SPEECH_MS,
            get(ENV_DAILY_SPEECH_MS),
            parse_u64,
        )?;
        set(
            &mut d.caps.three_day_ms,
            ENV_3DAY_SPEECH_MS,
            get(ENV_3DAY_SPEECH_MS),
            parse_u64,
        )?;
        set(
            &mut d.caps.weekly_ms,
            ENV_WEEKLY_SPEECH_MS,
            get(ENV_WEEKLY_SPEECH_MS),
            parse_u64,
        )?;
        set(
            &mut d.stages.misuse_threshold,
            ENV_SCORE_THRESHOLD,
            get(ENV_SCORE_THRESHOLD),
            parse_unit,
        )?;
        set(
            &mut d.classifier.cooldown_ms,
            ENV_COOLDOWN_SECONDS,
            get(ENV_COOLDOWN_SECONDS),
            parse_secs,
        )?;
        if let Some(v) = get(ENV_EXEMPT_UIDS) {
            d.exempt_uids = split_list(&v).collect();
        }
        set(
            &mut d.restrict_daily_stt_ms,
            ENV_RESTRICT_DAILY_STT_MS,
            get(ENV_RESTRICT_DAILY_STT_MS),
            parse_u64,
        )?;
        set(
            &mut d.throttle_daily_stt_ms,
            ENV_THROTTLE_DAILY_STT_MS,
            get(ENV_THROTTLE_DAILY_STT_MS),
            parse_u64,
        )?;
        set(
            &mut d.plans.free_minutes_per_month,
            ENV_FREE_MINUTES,
            get(ENV_FREE_MINUTES),
            parse_u64,
        )?;
        if let Some(v) = get(ENV_PAID_PLANS) {
            d.plans.paid_plans = split_list(&v).collect();
        }
        set(
            &mut d.stages.throttle_ms,
            ENV_THROTTLE_DAYS,
            get(ENV_THROTTLE_DAYS),
            parse_days,
        )?;
        set(
            &mut d.stages.restrict_ms,
            ENV_RESTRICT_DAYS,
            get(ENV_RESTRICT_DAYS),
            parse_days,
        )?;
        set(
            &mut d.stages.warning_quiet_ms,
            ENV_WARNING_DECAY_DAYS,
            get(ENV_WARNING_DECAY_DAYS),
            parse_days,
        )?;
        let k = &mut d.classifier;
        set(&mut k.kind, ENV_CLASSIFIER, get(ENV_CLASSIFIER), parse_kind)?;
        set(
            &mut k.base_url,
            ENV_CLASSIFIER_BASE_URL,
            get(ENV_CLASSIFIER_BASE_URL),
            |v| Some(v.to_owned()),
        )?;
        set(
            &mut k.model,
            ENV_CLASSIFIER_MODEL,
            get(ENV_CLASSIFIER_MODEL),
            |v| Some(v.to_owned()),
        )?;
        k.api_key = get(ENV_CLASSIFIER_API_KEY);
        set(
            &mut k.lookback_days,
            ENV_CLASSIFIER_LOOKBACK_DAYS,
            get(ENV_CLASSIFIER_LOOKBACK_DAYS),
            parse_positive,
        )?;
        set(
            &mut k.concurrency,
            ENV_CLASSIFIER_CONCURRENCY,
            get(ENV_CLASSIFIER_CONCURRENCY),
            |v| parse_positive(v).and_then(|n| usize::try_from(n).ok()),
        )?;
        set(
            &mut k.timeout_ms,
            ENV_CLASSIFIER_TIMEOUT_SECONDS,
            get(ENV_CLASSIFIER_TIMEOUT_SECONDS),
            parse_secs_pos,
        )?;
        let base = get(ENV_CLASSIFIER_RETRY_BASE_SECONDS);
        set(
            &mut k.retry_base_ms,
            ENV_CLASSIFIER_RETRY_BASE_SECONDS,
            base,
            parse_secs_pos,
        )?;
        let max = get(ENV_CLASSIFIER_RETRY_MAX_SECONDS);
        set(
            &mut k.retry_max_ms,
            ENV_CLASSIFIER_RETRY_MAX_SECONDS,
            max,
            parse_secs_pos,
        )?;
        Ok(c)
    }

    /// Every variable this struct reads, for docs and `--help`.
    pub const ENV_VARS: &'static [&'static str] = &[
        ENV_ENABLED,
        ENV_KILL_SWITCH,
        ENV_DAILY_SPEECH_MS,
        ENV_3DAY_SPEECH_MS,
        ENV_WEEKLY_SPEECH_MS,
        ENV_SCORE_THRESHOLD,
        ENV_COOLDOWN_SECONDS,
        ENV_EXEMPT_UIDS,
        ENV_RESTRICT_DAILY_STT_MS,
        ENV_FREE_MINUTES,
        ENV_CLASSIFIER_MODEL,
        ENV_CLASSIFIER_LOOKBACK_DAYS,
        ENV_THROTTLE_DAILY_STT_MS,
        ENV_PAID_PLANS,
        ENV_THROTTLE_DAYS,
        ENV_RESTRICT_DAYS,
        ENV_WARNING_DECAY_DAYS,
        ENV_CLASSIFIER,
        ENV_CLASSIFIER_BASE_URL,
        ENV_CLASSIFIER_API_KEY,
        ENV_CLASSIFIER_CONCURRENCY,
        ENV_CLASSIFIER_TIMEOUT_SECONDS,
        ENV_CLASSIFIER_RETRY_BASE_SECONDS,
        ENV_CLASSIFIER_RETRY_MAX_SECONDS,
    ];
}

fn set<T>(
    slot: &mut T,
    var: &'static str,
    raw: Option<String>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<(), ConfigError> {
    let Some(raw) = raw else { return Ok(()) };
    match parse(&raw) {
        Some(v) => {
            *slot = v;
            Ok(())
        }
        None => Err(ConfigError {
            var,
            value: raw,
            expected: expected_for(var),
        }),
    }
}

fn expected_for(var: &str) -> &'static str {
    match var {
        ENV_ENABLED | ENV_KILL_SWITCH => "true or false",
        ENV_SCORE_THRESHOLD => "a number from 0 to 1",
        ENV_CLASSIFIER => "heuristic or openai",
        ENV_CLASSIFIER_CONCURRENCY
        | ENV_CLASSIFIER_LOOKBACK_DAYS
        | ENV_CLASSIFIER_TIMEOUT_SECONDS => "a positive integer",
        _ => "a non-negative integer",
    }
}

fn split_list(v: &str) -> impl Iterator<Item = String> + '_ {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    u64::from_str(v).ok()
}

fn parse_positive(v: &str) -> Option<u64> {
    parse_u64(v).filter(|&n| n > 0)
}

fn parse_secs(v: &str) -> Option<u64> {
    parse_u64(v).and_then(|s| s.checked_mul(1_000))
}

fn parse_secs_pos(v: &str) -> Option<u64> {
    parse_positive(v).and_then(|s| s.checked_mul(1_000))
}

fn parse_days(v: &str) -> Option<u64> {
    parse_u64(v).and_then(|d| d.checked_mul(DAY_MS))
}

fn parse_unit(v: &str) -> Option<f64> {
    f64::from_str(v).ok().filter(|x| (0.0..=1.0).contains(x))
}

fn parse_kind(v: &str) -> Option<ClassifierKind> {
    match v.to_ascii_lowercase().as_str() {
        "heuristic" => Some(ClassifierKind::Heuristic),
        "openai" => Some(ClassifierKind::OpenAi),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<FairUseConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        FairUseConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_reference_defaults_with_fair_use_on_and_1200_free_minutes() {
        let c = from(&[]).unwrap();
        assert!(c.enabled && !c.kill_switch);
        assert_eq!(
            c.caps,
            SoftCaps {
                daily_ms: 7_200_000,
                three_day_ms: 28_800_000,
                weekly_ms: 36_000_000
            }
        );
        assert_eq!(c.stages.misuse_threshold, 0.7);
        assert_eq!(c.classifier.cooldown_ms, 43_200_000);
        assert_eq!(c.restrict_daily_stt_ms, 1_800_000);
        assert_eq!(c.throttle_daily_stt_ms, 7_200_000);
        assert_eq!(c.plans.free_minutes_per_month, 1_200);
        assert_eq!(
            (c.classifier.concurrency, c.classifier.timeout_ms),
            (8, 120_000)
        );
    }

    #[test]
    fn reference_env_names_override_and_exempt_list_drops_empty_items() {
        let c = from(&[
            ("FAIR_USE_ENABLED", "FALSE"),
            ("FAIR_USE_KILL_SWITCH", "true"),
            ("FAIR_USE_DAILY_SPEECH_MS", "10000"),
            ("FAIR_USE_EXEMPT_UIDS", " a, ,b,"),
            ("FAIR_USE_CLASSIFIER_COOLDOWN_SECONDS", "60"),
            ("BASIC_TIER_MINUTES_LIMIT_PER_MONTH", "0"),
        ])
        .unwrap();
        assert!(!c.enabled && c.kill_switch);
        assert_eq!(c.caps.daily_ms, 10_000);
        assert_eq!(
            c.exempt_uids.iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(c.classifier.cooldown_ms, 60_000);
        assert_eq!(c.plans.free_minutes_per_month, 0);
    }

    #[test]
    fn unparsable_values_are_errors_naming_the_variable() {
        let e = from(&[("FAIR_USE_CLASSIFIER_ABUSE_SCORE_THRESHOLD", "1.5")]).unwrap_err();
        assert_eq!(e.var, ENV_SCORE_THRESHOLD);
        assert!(from(&[("FAIR_USE_ENABLED", "maybe")]).is_err());
        assert!(from(&[("VOICEGATE_CLASSIFIER_CONCURRENCY", "0")]).is_err());
        assert!(from(&[("FAIR_USE_DAILY_SPEECH_MS", "-1")]).is_err());
    }
}
