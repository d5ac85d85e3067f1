//! Every fair-use setting: [`FairUseArgs`] (flag, environment variable and default of each, a clap `Args`
//! that `voicegate serve` flattens into its configuration) and the [`FairUseConfig`] the policy runs with.
//!
//! The reference's names are kept so its operators can reuse their settings; settings the reference did not
//! have are prefixed `VOICEGATE_`. A value that does not parse, or an impossible combination, is an error at
//! startup that names the variables, never a silent default. An empty value counts as unset.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, Setting, ordered};
use crate::policy::plan::{DEFAULT_PAID_PLANS, DefaultPlan};
use crate::policy::stage::DAY_MS;
use crate::policy::{DEFAULT_CEILING_MS, PlanCaps, PlanTable, SoftCaps, StagePolicy};

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
    /// Failures of the configured classifier on one breach after which the heuristic's verdict is applied
    /// instead (recorded as `classifier_failed` on the verdict).
    pub max_failures: u32,
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
            max_failures: 5,
        }
    }
}

/// All fair-use settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairUseConfig {
    pub enabled: bool,
    pub kill_switch: bool,
    /// The soft caps of the free (and unknown) plan and of the paid plans.
    pub caps: PlanCaps,
    /// The hard ceiling on speech in the rolling 24 h, for every plan (0 = off): past it sync is refused
    /// (`speech_ceiling`) and speech-to-text closes; metering goes on.
    pub ceiling_ms: u64,
    pub stages: StagePolicy,
    pub exempt_uids: BTreeSet<String>,
    pub restrict_daily_stt_ms: u64,
    pub throttle_daily_stt_ms: u64,
    pub plans: PlanTable,
    pub classifier: ClassifierSettings,
    /// A payment (a paid plan stored) also resets the user's fair-use stage (the reference's #6298 fix).
    pub payment_clears_stage: bool,
    /// Audio sent to paid speech-to-text providers per UTC day, all users and nodes together (ms; 0 = off):
    /// reached, paid STT closes for everyone (`spend_ceiling`) until the next UTC day.
    pub stt_spend_ceiling_ms: u64,
}

impl Default for FairUseConfig {
    fn default() -> Self {
        FairUseConfig {
            enabled: true,
            kill_switch: false,
            caps: PlanCaps::default(),
            ceiling_ms: DEFAULT_CEILING_MS,
            stages: StagePolicy::default(),
            exempt_uids: BTreeSet::new(),
            restrict_daily_stt_ms: 1_800_000,
            throttle_daily_stt_ms: 7_200_000,
            plans: PlanTable::default(),
            classifier: ClassifierSettings::default(),
            payment_clears_stage: false,
            stt_spend_ceiling_ms: 0,
        }
    }
}

impl fmt::Display for ClassifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClassifierKind::Heuristic => "heuristic",
            ClassifierKind::OpenAi => "openai",
        })
    }
}

const fn classifier_kind() -> Setting<ClassifierKind> {
    Setting::new(
        |v| match v.to_ascii_lowercase().as_str() {
            "heuristic" => Some(ClassifierKind::Heuristic),
            "openai" => Some(ClassifierKind::OpenAi),
            _ => None,
        },
        "heuristic or openai",
    )
}

const fn default_plan() -> Setting<DefaultPlan> {
    Setting::new(
        |v| match v.to_ascii_lowercase().as_str() {
            "unknown" => Some(DefaultPlan::Unknown),
            "free" | "basic" => Some(DefaultPlan::Free),
            _ => None,
        },
        "unknown or free",
    )
}

const ENV_DAILY: &str = "FAIR_USE_DAILY_SPEECH_MS";
const ENV_3DAY: &str = "FAIR_USE_3DAY_SPEECH_MS";
const ENV_WEEKLY: &str = "FAIR_USE_WEEKLY_SPEECH_MS";
const ENV_PAID_DAILY: &str = "FAIR_USE_DAILY_SPEECH_MS_UNLIMITED";
const ENV_PAID_3DAY: &str = "FAIR_USE_3DAY_SPEECH_MS_UNLIMITED";
const ENV_PAID_WEEKLY: &str = "FAIR_USE_WEEKLY_SPEECH_MS_UNLIMITED";
const ENV_CEILING: &str = "MAX_DAILY_AUDIO_HOURS";
const ENV_RESTRICT_STT: &str = "FAIR_USE_RESTRICT_DAILY_DG_MS";
const ENV_THROTTLE_STT: &str = "VOICEGATE_FAIR_USE_THROTTLE_DAILY_STT_MS";
const ENV_RETRY_BASE: &str = "VOICEGATE_CLASSIFIER_RETRY_BASE_SECONDS";
const ENV_RETRY_MAX: &str = "VOICEGATE_CLASSIFIER_RETRY_MAX_SECONDS";

/// The fair-use settings as an operator writes them (units in the names). The defaults are those of
/// [`FairUseConfig::default`]; [`FairUseArgs::config`] checks them and builds the [`FairUseConfig`].
#[derive(Debug, Clone, PartialEq, clap::Args)]
#[command(next_help_heading = "Fair use")]
pub struct FairUseArgs {
    /// Master enable of fair use (the reference defaulted to false).
    #[arg(long = "fair-use-enabled", env = "FAIR_USE_ENABLED", value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = FairUseConfig::default().enabled, value_parser = config::boolean())]
    pub enabled: bool,
    /// Turns off caps, stages, STT budgets and 429s (never metering, month usage or the credit lock).
    #[arg(long = "fair-use-kill-switch", env = "FAIR_USE_KILL_SWITCH", value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = FairUseConfig::default().kill_switch, value_parser = config::boolean())]
    pub kill_switch: bool,
    /// Soft cap on speech in the rolling 24 h of the free plan and of a user on no known plan, in ms (a
    /// total strictly greater triggers).
    #[arg(long = "fair-use-daily-speech-ms", env = ENV_DAILY,
          default_value_t = PlanCaps::default().free.daily_ms, value_parser = config::count())]
    pub daily_speech_ms: u64,
    /// Soft cap on speech in the rolling 72 h of the free plan, in ms; at least its daily cap.
    #[arg(long = "fair-use-3day-speech-ms", env = ENV_3DAY,
          default_value_t = PlanCaps::default().free.three_day_ms, value_parser = config::count())]
    pub three_day_speech_ms: u64,
    /// Soft cap on speech in the rolling 168 h of the free plan, in ms; at least its 3-day cap.
    #[arg(long = "fair-use-weekly-speech-ms", env = ENV_WEEKLY,
          default_value_t = PlanCaps::default().free.weekly_ms, value_parser = config::count())]
    pub weekly_speech_ms: u64,
    /// Soft cap on speech in the rolling 24 h of the paid plans (unlimited minutes), in ms.
    #[arg(long = "fair-use-paid-daily-speech-ms", env = ENV_PAID_DAILY,
          default_value_t = PlanCaps::default().paid.daily_ms, value_parser = config::count())]
    pub paid_daily_speech_ms: u64,
    /// Soft cap on speech in the rolling 72 h of the paid plans, in ms; at least their daily cap.
    #[arg(long = "fair-use-paid-3day-speech-ms", env = ENV_PAID_3DAY,
          default_value_t = PlanCaps::default().paid.three_day_ms, value_parser = config::count())]
    pub paid_three_day_speech_ms: u64,
    /// Soft cap on speech in the rolling 168 h of the paid plans, in ms; at least their 3-day cap.
    #[arg(long = "fair-use-paid-weekly-speech-ms", env = ENV_PAID_WEEKLY,
          default_value_t = PlanCaps::default().paid.weekly_ms, value_parser = config::count())]
    pub paid_weekly_speech_ms: u64,
    /// Hard ceiling on speech in the rolling 24 h for every plan, in hours (0 = off): past it sync uploads
    /// get 429 `speech_ceiling` and speech-to-text closes; metering goes on. At least the daily caps.
    #[arg(long = "fair-use-ceiling-hours", env = ENV_CEILING,
          default_value_t = FairUseConfig::default().ceiling_ms / 3_600_000, value_parser = config::count())]
    pub ceiling_hours: u64,
    /// The classifier's misuse gate (`score >= threshold`), from 0 to 1.
    #[arg(long = "fair-use-abuse-score-threshold", env = "FAIR_USE_CLASSIFIER_ABUSE_SCORE_THRESHOLD",
          default_value_t = StagePolicy::default().misuse_threshold, value_parser = config::fraction())]
    pub score_threshold: f64,
    /// At most one classification per user per this many seconds.
    #[arg(long = "fair-use-classifier-cooldown-seconds", env = "FAIR_USE_CLASSIFIER_COOLDOWN_SECONDS",
          default_value_t = ClassifierSettings::default().cooldown_ms / 1000, value_parser = config::count())]
    pub cooldown_seconds: u64,
    /// Comma-separated uids fair use never applies to (empty items dropped).
    #[arg(long = "fair-use-exempt-uids", env = "FAIR_USE_EXEMPT_UIDS", value_parser = config::text())]
    pub exempt_uids: Option<String>,
    /// Daily speech-to-text budget in the restrict stage, in ms; 0 disables it. At most the throttle budget.
    #[arg(long = "fair-use-restrict-daily-stt-ms", env = ENV_RESTRICT_STT,
          default_value_t = FairUseConfig::default().restrict_daily_stt_ms, value_parser = config::count())]
    pub restrict_daily_stt_ms: u64,
    /// Daily speech-to-text budget in the throttle stage, in ms; 0 disables it.
    #[arg(long = "fair-use-throttle-daily-stt-ms", env = ENV_THROTTLE_STT,
          default_value_t = FairUseConfig::default().throttle_daily_stt_ms, value_parser = config::count())]
    pub throttle_daily_stt_ms: u64,
    /// Free-plan minutes per calendar month; 0 = unlimited (the reference's default was 0).
    #[arg(long = "free-minutes-per-month", env = "BASIC_TIER_MINUTES_LIMIT_PER_MONTH",
          default_value_t = PlanTable::default().free_minutes_per_month, value_parser = config::count())]
    pub free_minutes_per_month: u64,
    /// What a user with no plan record (never named by a payment, the admin route or an import) is on:
    /// unknown (metered, never locked) or free (locked once the free minutes are used).
    #[arg(long = "default-plan", env = "VOICEGATE_DEFAULT_PLAN",
          default_value_t = PlanTable::default().default_plan, value_parser = default_plan())]
    pub default_plan: DefaultPlan,
    /// Comma-separated plan ids with unlimited minutes.
    #[arg(long = "fair-use-paid-plans", env = "VOICEGATE_FAIR_USE_PAID_PLANS",
          default_value_t = DEFAULT_PAID_PLANS.join(","), value_parser = config::text())]
    pub paid_plans: String,
    /// Days a throttle lasts.
    #[arg(long = "fair-use-throttle-days", env = "VOICEGATE_FAIR_USE_THROTTLE_DAYS",
          default_value_t = StagePolicy::default().throttle_ms / DAY_MS, value_parser = config::count())]
    pub throttle_days: u64,
    /// Days a restriction lasts.
    #[arg(long = "fair-use-restrict-days", env = "VOICEGATE_FAIR_USE_RESTRICT_DAYS",
          default_value_t = StagePolicy::default().restrict_ms / DAY_MS, value_parser = config::count())]
    pub restrict_days: u64,
    /// Days without a violation before a warning decays to none.
    #[arg(long = "fair-use-warning-decay-days", env = "VOICEGATE_FAIR_USE_WARNING_DECAY_DAYS",
          default_value_t = StagePolicy::default().warning_quiet_ms / DAY_MS, value_parser = config::count())]
    pub warning_decay_days: u64,
    /// The misuse classifier: heuristic or openai (docs/fair-use.md).
    #[arg(long = "classifier", env = "VOICEGATE_CLASSIFIER",
          default_value_t = ClassifierKind::default(), value_parser = classifier_kind())]
    pub classifier: ClassifierKind,
    /// OpenAI-compatible base URL of the classifier (the client appends `/chat/completions`).
    #[arg(long = "classifier-base-url", env = "VOICEGATE_CLASSIFIER_BASE_URL",
          default_value_t = ClassifierSettings::default().base_url, value_parser = config::text())]
    pub classifier_base_url: String,
    /// Chat model of the openai classifier.
    #[arg(long = "classifier-model", env = "FAIR_USE_CLASSIFIER_MODEL",
          default_value_t = ClassifierSettings::default().model, value_parser = config::text())]
    pub classifier_model: String,
    /// API key of the openai classifier (never logged).
    #[arg(long = "classifier-api-key", env = "VOICEGATE_CLASSIFIER_API_KEY", hide_env_values = true,
          value_parser = config::text())]
    pub classifier_api_key: Option<String>,
    /// Days of sessions the classifier sees.
    #[arg(long = "classifier-lookback-days", env = "FAIR_USE_CLASSIFIER_LOOKBACK_DAYS",
          default_value_t = ClassifierSettings::default().lookback_days, value_parser = config::positive_count())]
    pub classifier_lookback_days: u64,
    /// Classifications in flight at most.
    #[arg(long = "classifier-concurrency", env = "VOICEGATE_CLASSIFIER_CONCURRENCY",
          default_value_t = ClassifierSettings::default().concurrency as u64, value_parser = config::positive_count())]
    pub classifier_concurrency: u64,
    /// Longest one classification may take, in seconds.
    #[arg(long = "classifier-timeout-seconds", env = "VOICEGATE_CLASSIFIER_TIMEOUT_SECONDS",
          default_value_t = ClassifierSettings::default().timeout_ms / 1000, value_parser = config::positive_count())]
    pub classifier_timeout_seconds: u64,
    /// Shortest retry delay after a failed classification, in seconds (retry n waits a random delay between it and it × 2ⁿ).
    #[arg(long = "classifier-retry-base-seconds", env = ENV_RETRY_BASE,
          default_value_t = ClassifierSettings::default().retry_base_ms / 1000, value_parser = config::positive_count())]
    pub classifier_retry_base_seconds: u64,
    /// Longest retry delay after a failed classification, in seconds; at least the base.
    #[arg(long = "classifier-retry-max-seconds", env = ENV_RETRY_MAX,
          default_value_t = ClassifierSettings::default().retry_max_ms / 1000, value_parser = config::positive_count())]
    pub classifier_retry_max_seconds: u64,
    /// Failures of the classifier on one breach (errors, malformed output, timeouts, panics) after which the
    /// heuristic's verdict is applied instead, recorded as `classifier_failed`.
    #[arg(long = "classifier-max-failures", env = "VOICEGATE_CLASSIFIER_MAX_FAILURES",
          default_value_t = u64::from(ClassifierSettings::default().max_failures), value_parser = config::positive_count())]
    pub classifier_max_failures: u64,
    /// A payment that moves a user to a paid plan also resets their fair-use stage to none (an event
    /// `admin_reset` by `stripe`); off, misuse stages stay (a payment is not a verdict).
    #[arg(long = "fair-use-payment-clears-stage", env = "VOICEGATE_FAIR_USE_PAYMENT_CLEARS_STAGE",
          value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = FairUseConfig::default().payment_clears_stage, value_parser = config::boolean())]
    pub payment_clears_stage: bool,
    /// Seconds of audio sent to paid speech-to-text providers (deepgram, openai) per UTC day, all users and
    /// nodes sharing the store together; reached, paid transcription closes for everyone
    /// (`stt_unavailable{spend_ceiling}`) until the next UTC midnight; metering goes on. 0 = off.
    #[arg(long = "stt-daily-spend-ceiling-seconds", env = "VOICEGATE_STT_DAILY_SPEND_CEILING_SECONDS",
          default_value_t = FairUseConfig::default().stt_spend_ceiling_ms / 1000, value_parser = config::count())]
    pub stt_spend_ceiling_seconds: u64,
}

impl Default for FairUseArgs {
    fn default() -> Self {
        FairUseArgs::from(&FairUseConfig::default())
    }
}

impl From<&FairUseConfig> for FairUseArgs {
    /// The settings that give `c` (sub-second and sub-day parts of its durations dropped).
    fn from(c: &FairUseConfig) -> Self {
        let k = &c.classifier;
        let list = |items: &mut dyn Iterator<Item = &String>| {
            items.map(String::as_str).collect::<Vec<_>>().join(",")
        };
        FairUseArgs {
            enabled: c.enabled,
            kill_switch: c.kill_switch,
            daily_speech_ms: c.caps.free.daily_ms,
            three_day_speech_ms: c.caps.free.three_day_ms,
            weekly_speech_ms: c.caps.free.weekly_ms,
            paid_daily_speech_ms: c.caps.paid.daily_ms,
            paid_three_day_speech_ms: c.caps.paid.three_day_ms,
            paid_weekly_speech_ms: c.caps.paid.weekly_ms,
            ceiling_hours: c.ceiling_ms / 3_600_000,
            score_threshold: c.stages.misuse_threshold,
            cooldown_seconds: k.cooldown_ms / 1000,
            exempt_uids: Some(list(&mut c.exempt_uids.iter())).filter(|s| !s.is_empty()),
            restrict_daily_stt_ms: c.restrict_daily_stt_ms,
            throttle_daily_stt_ms: c.throttle_daily_stt_ms,
            free_minutes_per_month: c.plans.free_minutes_per_month,
            default_plan: c.plans.default_plan,
            paid_plans: list(&mut c.plans.paid_plans.iter()),
            throttle_days: c.stages.throttle_ms / DAY_MS,
            restrict_days: c.stages.restrict_ms / DAY_MS,
            warning_decay_days: c.stages.warning_quiet_ms / DAY_MS,
            classifier: k.kind,
            classifier_base_url: k.base_url.clone(),
            classifier_model: k.model.clone(),
            classifier_api_key: k.api_key.clone(),
            classifier_lookback_days: k.lookback_days,
            classifier_concurrency: k.concurrency as u64,
            classifier_timeout_seconds: k.timeout_ms / 1000,
            classifier_retry_base_seconds: k.retry_base_ms / 1000,
            classifier_retry_max_seconds: k.retry_max_ms / 1000,
            classifier_max_failures: u64::from(k.max_failures),
            payment_clears_stage: c.payment_clears_stage,
            stt_spend_ceiling_seconds: c.stt_spend_ceiling_ms / 1000,
        }
    }
}

/// The startup check of the openai classifier: an `http(s)://` URL with a host; plain `http` only to a
/// loopback host (a key must not cross a network in the clear); an API key (visible ASCII, sent as a bearer
/// header) required unless the host is loopback (a self-hosted endpoint may need none). The key is never
/// printed.
fn check_endpoint(k: &ClassifierSettings) -> Result<(), ConfigError> {
    const URL: &str = "VOICEGATE_CLASSIFIER_BASE_URL";
    let invalid = |setting: &str, value: &str, expected| ConfigError::Invalid {
        setting: setting.to_owned(),
        value: value.to_owned(),
        expected,
    };
    let url = reqwest::Url::parse(&k.base_url)
        .map_err(|_| invalid(URL, &k.base_url, "an http:// or https:// URL"))?;
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(invalid(
            URL,
            &k.base_url,
            "an http:// or https:// URL with a host",
        ));
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(invalid(
                URL,
                &k.base_url,
                "an https:// URL (plain http:// only to a loopback host)",
            ));
        }
        _ => return Err(invalid(URL, &k.base_url, "an http:// or https:// URL")),
    }
    let key_ok = k
        .api_key
        .as_deref()
        .is_some_and(|key| !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()));
    let key_given = k.api_key.as_deref().is_some_and(|key| !key.is_empty());
    if key_given && !key_ok {
        return Err(invalid(
            "VOICEGATE_CLASSIFIER_API_KEY",
            "<hidden>",
            "an API key of visible ASCII characters",
        ));
    }
    if !key_given && !loopback {
        return Err(invalid(
            "VOICEGATE_CLASSIFIER_API_KEY",
            "<unset>",
            "set for an openai classifier on a non-loopback host",
        ));
    }
    Ok(())
}

impl FairUseArgs {
    /// The fair-use configuration, or the first impossible setting: caps below each other (daily ≤ 3-day ≤
    /// weekly), a restrict STT budget above the throttle one (when both are on), a retry base above its
    /// maximum, or a duration too large to count in ms.
    pub fn config(&self) -> Result<FairUseConfig, ConfigError> {
        ordered(
            (ENV_DAILY, self.daily_speech_ms),
            (ENV_3DAY, self.three_day_speech_ms),
        )?;
        ordered(
            (ENV_3DAY, self.three_day_speech_ms),
            (ENV_WEEKLY, self.weekly_speech_ms),
        )?;
        ordered(
            (ENV_PAID_DAILY, self.paid_daily_speech_ms),
            (ENV_PAID_3DAY, self.paid_three_day_speech_ms),
        )?;
        ordered(
            (ENV_PAID_3DAY, self.paid_three_day_speech_ms),
            (ENV_PAID_WEEKLY, self.paid_weekly_speech_ms),
        )?;
        if self.restrict_daily_stt_ms > 0 && self.throttle_daily_stt_ms > 0 {
            ordered(
                (ENV_RESTRICT_STT, self.restrict_daily_stt_ms),
                (ENV_THROTTLE_STT, self.throttle_daily_stt_ms),
            )?;
        }
        ordered(
            (ENV_RETRY_BASE, self.classifier_retry_base_seconds),
            (ENV_RETRY_MAX, self.classifier_retry_max_seconds),
        )?;
        let ms = |setting: &str, value: u64, unit: u64| {
            value.checked_mul(unit).ok_or_else(|| ConfigError::Invalid {
                setting: setting.to_owned(),
                value: value.to_string(),
                expected: "a duration that fits in u64 milliseconds",
            })
        };
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let caps = PlanCaps {
            free: SoftCaps {
                daily_ms: self.daily_speech_ms,
                three_day_ms: self.three_day_speech_ms,
                weekly_ms: self.weekly_speech_ms,
            },
            paid: SoftCaps {
                daily_ms: self.paid_daily_speech_ms,
                three_day_ms: self.paid_three_day_speech_ms,
                weekly_ms: self.paid_weekly_speech_ms,
            },
        };
        let ceiling_ms = ms(ENV_CEILING, self.ceiling_hours, 3_600_000)?;
        // A ceiling under a daily cap would refuse before the cap could ever trigger.
        if ceiling_ms > 0 && ceiling_ms < caps.free.daily_ms.max(caps.paid.daily_ms) {
            return Err(ConfigError::Invalid {
                setting: ENV_CEILING.to_owned(),
                value: self.ceiling_hours.to_string(),
                expected: "0 (off) or hours at least the daily caps (FAIR_USE_DAILY_SPEECH_MS, FAIR_USE_DAILY_SPEECH_MS_UNLIMITED)",
            });
        }
        let stages = StagePolicy {
            misuse_threshold: self.score_threshold,
            throttle_ms: ms(
                "VOICEGATE_FAIR_USE_THROTTLE_DAYS",
                self.throttle_days,
                DAY_MS,
            )?,
            restrict_ms: ms(
                "VOICEGATE_FAIR_USE_RESTRICT_DAYS",
                self.restrict_days,
                DAY_MS,
            )?,
            warning_quiet_ms: ms(
                "VOICEGATE_FAIR_USE_WARNING_DECAY_DAYS",
                self.warning_decay_days,
                DAY_MS,
            )?,
            ..StagePolicy::default()
        };
        let classifier = ClassifierSettings {
            kind: self.classifier,
            base_url: self.classifier_base_url.clone(),
            model: self.classifier_model.clone(),
            api_key: self.classifier_api_key.clone().filter(|k| !k.is_empty()),
            lookback_days: self.classifier_lookback_days,
            cooldown_ms: ms(
                "FAIR_USE_CLASSIFIER_COOLDOWN_SECONDS",
                self.cooldown_seconds,
                1000,
            )?,
            concurrency: usize::try_from(self.classifier_concurrency).map_err(|_| {
                ConfigError::Invalid {
                    setting: "VOICEGATE_CLASSIFIER_CONCURRENCY".to_owned(),
                    value: self.classifier_concurrency.to_string(),
                    expected: "a smaller positive integer",
                }
            })?,
            timeout_ms: ms(
                "VOICEGATE_CLASSIFIER_TIMEOUT_SECONDS",
                self.classifier_timeout_seconds,
                1000,
            )?,
            retry_base_ms: ms(ENV_RETRY_BASE, self.classifier_retry_base_seconds, 1000)?,
            retry_max_ms: ms(ENV_RETRY_MAX, self.classifier_retry_max_seconds, 1000)?,
            max_failures: u32::try_from(self.classifier_max_failures).map_err(|_| {
                ConfigError::Invalid {
                    setting: "VOICEGATE_CLASSIFIER_MAX_FAILURES".to_owned(),
                    value: self.classifier_max_failures.to_string(),
                    expected: "a smaller positive integer",
                }
            })?,
        };
        if classifier.kind == ClassifierKind::OpenAi {
            check_endpoint(&classifier)?;
        }
        Ok(FairUseConfig {
            enabled: self.enabled,
            kill_switch: self.kill_switch,
            caps,
            ceiling_ms,
            stages,
            exempt_uids: self
                .exempt_uids
                .as_deref()
                .map(list)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            restrict_daily_stt_ms: self.restrict_daily_stt_ms,
            throttle_daily_stt_ms: self.throttle_daily_stt_ms,
            plans: PlanTable {
                free_minutes_per_month: self.free_minutes_per_month,
                paid_plans: list(&self.paid_plans),
                default_plan: self.default_plan,
            },
            classifier,
            payment_clears_stage: self.payment_clears_stage,
            stt_spend_ceiling_ms: ms(
                "VOICEGATE_STT_DAILY_SPEND_CEILING_SECONDS",
                self.stt_spend_ceiling_seconds,
                1000,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Parses the way `voicegate serve` does, with `pairs` as the environment.
    fn from(pairs: &[(&str, &str)]) -> Result<FairUseConfig, String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let args: FairUseArgs =
            config::args_from_lookup(|k| map.get(k).cloned()).map_err(|e| e.to_string())?;
        args.config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_reference_defaults_with_fair_use_on_and_1200_free_minutes() {
        let c = from(&[]).unwrap();
        assert_eq!(c, FairUseConfig::default());
        assert!(c.enabled && !c.kill_switch);
        assert_eq!(
            c.caps.free,
            SoftCaps {
                daily_ms: 7_200_000,
                three_day_ms: 28_800_000,
                weekly_ms: 36_000_000
            }
        );
        assert_eq!(
            c.caps.paid,
            SoftCaps {
                daily_ms: 14_400_000,
                three_day_ms: 57_600_000,
                weekly_ms: 72_000_000
            }
        );
        assert_eq!(c.ceiling_ms, 108_000_000);
        assert_eq!(c.stages.misuse_threshold, 0.7);
        assert_eq!(c.classifier.cooldown_ms, 43_200_000);
        // docs/fair-use.md §1.1 and §3: a 7-day lookback; retries from 60 s, capped at 1 h; the heuristic
        // after 5 failures; follow-ups looked for every minute.
        assert_eq!(c.classifier.lookback_days, 7);
        assert_eq!(
            (c.classifier.retry_base_ms, c.classifier.retry_max_ms),
            (60_000, 3_600_000)
        );
        assert_eq!(c.classifier.max_failures, 5);
        assert_eq!(
            crate::fair_use::cap_supervisor::FOLLOW_UP_EVERY,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(c.restrict_daily_stt_ms, 1_800_000);
        assert_eq!(c.throttle_daily_stt_ms, 7_200_000);
        assert_eq!(c.plans.free_minutes_per_month, 1_200);
        assert_eq!(
            (c.classifier.concurrency, c.classifier.timeout_ms),
            (8, 120_000)
        );
        assert_eq!(
            FairUseArgs::default().config(),
            Ok(FairUseConfig::default())
        );
    }

    #[test]
    fn booleans_take_every_documented_spelling() {
        for (v, on) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("ON", true),
            ("false", false),
            ("0", false),
            ("no", false),
            ("off", false),
        ] {
            assert_eq!(
                from(&[("FAIR_USE_KILL_SWITCH", v)]).unwrap().kill_switch,
                on,
                "{v}"
            );
        }
        assert!(from(&[("FAIR_USE_KILL_SWITCH", "maybe")]).is_err());
        // Empty counts as unset: the default.
        assert!(from(&[("FAIR_USE_ENABLED", " ")]).unwrap().enabled);
    }

    #[test]
    fn paid_caps_and_the_ceiling_are_read_from_the_references_names_and_checked() {
        let c = from(&[
            ("FAIR_USE_DAILY_SPEECH_MS_UNLIMITED", "18000000"),
            ("FAIR_USE_3DAY_SPEECH_MS_UNLIMITED", "60000000"),
            ("FAIR_USE_WEEKLY_SPEECH_MS_UNLIMITED", "80000000"),
            ("MAX_DAILY_AUDIO_HOURS", "20"),
        ])
        .unwrap();
        assert_eq!(
            c.caps.paid,
            SoftCaps {
                daily_ms: 18_000_000,
                three_day_ms: 60_000_000,
                weekly_ms: 80_000_000
            }
        );
        assert_eq!(
            c.caps.free,
            SoftCaps::default(),
            "the free plan's untouched"
        );
        assert_eq!(c.ceiling_ms, 20 * 3_600_000);
        assert_eq!(
            from(&[("MAX_DAILY_AUDIO_HOURS", "0")]).unwrap().ceiling_ms,
            0
        );
        // Out of order within the paid plan, and a ceiling under a daily cap, stop the server.
        let e = from(&[("FAIR_USE_DAILY_SPEECH_MS_UNLIMITED", "60000000")]).unwrap_err();
        assert!(
            e.contains("FAIR_USE_DAILY_SPEECH_MS_UNLIMITED")
                && e.contains("FAIR_USE_3DAY_SPEECH_MS_UNLIMITED"),
            "{e}"
        );
        let e = from(&[("MAX_DAILY_AUDIO_HOURS", "3")]).unwrap_err();
        assert!(
            e.contains("MAX_DAILY_AUDIO_HOURS"),
            "under the paid daily 4 h: {e}"
        );
        assert!(from(&[("MAX_DAILY_AUDIO_HOURS", "4")]).is_ok());
        assert_eq!(
            FairUseConfig::default().stt_spend_ceiling_ms,
            0,
            "off by default"
        );
        let c = from(&[("VOICEGATE_STT_DAILY_SPEND_CEILING_SECONDS", "36000")]).unwrap();
        assert_eq!(c.stt_spend_ceiling_ms, 36_000_000);
    }

    #[test]
    fn an_openai_classifier_needs_a_usable_url_and_key_at_startup() {
        let openai = |url: &str, key: Option<&str>| {
            let mut env = vec![
                ("VOICEGATE_CLASSIFIER", "openai"),
                ("VOICEGATE_CLASSIFIER_BASE_URL", url),
            ];
            env.extend(key.map(|k| ("VOICEGATE_CLASSIFIER_API_KEY", k)));
            from(&env)
        };
        assert!(openai("https://api.openai.com/v1", Some("sk-abc")).is_ok());
        assert!(
            openai("http://127.0.0.1:8080/v1", None).is_ok(),
            "loopback: no key needed"
        );
        assert!(openai("http://[::1]:8080/v1", None).is_ok());
        assert!(openai("http://localhost/v1", None).is_ok());
        let err = openai("http://llm.internal/v1", Some("sk-abc")).unwrap_err();
        assert!(
            err.contains("VOICEGATE_CLASSIFIER_BASE_URL") && err.contains("https://"),
            "{err}"
        );
        let err = openai("ftp://llm.internal/v1", Some("sk-abc")).unwrap_err();
        assert!(err.contains("VOICEGATE_CLASSIFIER_BASE_URL"), "{err}");
        assert!(openai("not a url", Some("sk-abc")).is_err());
        let err = openai("https://api.openai.com/v1", None).unwrap_err();
        assert!(err.contains("VOICEGATE_CLASSIFIER_API_KEY"), "{err}");
        let err = openai("https://api.openai.com/v1", Some("sk secret")).unwrap_err();
        assert!(
            err.contains("VOICEGATE_CLASSIFIER_API_KEY") && !err.contains("secret"),
            "never printed: {err}"
        );
        // The heuristic does not look at them.
        assert!(from(&[("VOICEGATE_CLASSIFIER_BASE_URL", "ftp://x")]).is_ok());
        let c = from(&[("VOICEGATE_CLASSIFIER_MAX_FAILURES", "3")]).unwrap();
        assert_eq!(c.classifier.max_failures, 3);
        assert!(from(&[("VOICEGATE_CLASSIFIER_MAX_FAILURES", "0")]).is_err());
    }

    #[test]
    fn reference_env_names_override_and_exempt_list_drops_empty_items() {
        let c = from(&[
            ("FAIR_USE_ENABLED", "FALSE"),
            ("FAIR_USE_KILL_SWITCH", "true"),
            ("FAIR_USE_DAILY_SPEECH_MS", " 10000 "),
            ("FAIR_USE_EXEMPT_UIDS", " a, ,b,"),
            ("FAIR_USE_CLASSIFIER_COOLDOWN_SECONDS", "60"),
            ("BASIC_TIER_MINUTES_LIMIT_PER_MONTH", "0"),
            ("VOICEGATE_FAIR_USE_PAID_PLANS", "gold, platinum"),
            ("VOICEGATE_FAIR_USE_RESTRICT_DAYS", "2"),
            ("VOICEGATE_CLASSIFIER", "OpenAI"),
            ("VOICEGATE_CLASSIFIER_API_KEY", "k"),
            ("VOICEGATE_CLASSIFIER_RETRY_BASE_SECONDS", "5"),
        ])
        .unwrap();
        assert!(!c.enabled && c.kill_switch);
        assert_eq!(c.caps.free.daily_ms, 10_000);
        assert_eq!(
            c.exempt_uids.iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(c.classifier.cooldown_ms, 60_000);
        assert_eq!(c.plans.free_minutes_per_month, 0);
        assert_eq!(c.plans.paid_plans, vec!["gold", "platinum"]);
        assert_eq!(c.stages.restrict_ms, 2 * DAY_MS);
        assert_eq!(c.classifier.kind, ClassifierKind::OpenAi);
        assert_eq!(c.classifier.api_key.as_deref(), Some("k"));
        assert_eq!(c.classifier.retry_base_ms, 5_000);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = from(&[
            ("FAIR_USE_ENABLED", ""),
            ("FAIR_USE_DAILY_SPEECH_MS", "  "),
            ("VOICEGATE_FAIR_USE_PAID_PLANS", ""),
            ("VOICEGATE_CLASSIFIER_API_KEY", ""),
        ])
        .unwrap();
        assert_eq!(c, FairUseConfig::default());
    }

    #[test]
    fn unparsable_values_are_errors_naming_the_variable() {
        for (var, value) in [
            ("FAIR_USE_CLASSIFIER_ABUSE_SCORE_THRESHOLD", "1.5"),
            ("FAIR_USE_ENABLED", "maybe"),
            ("VOICEGATE_CLASSIFIER_CONCURRENCY", "0"),
            ("FAIR_USE_DAILY_SPEECH_MS", "-1"),
            ("VOICEGATE_CLASSIFIER", "gpt"),
            ("VOICEGATE_CLASSIFIER_TIMEOUT_SECONDS", "0"),
        ] {
            let e = from(&[(var, value)]).unwrap_err();
            assert!(e.contains(var) && e.contains(value), "{var}={value}: {e}");
        }
    }

    #[test]
    fn caps_below_each_other_are_refused_naming_both() {
        let e = from(&[("FAIR_USE_DAILY_SPEECH_MS", "30000000")]).unwrap_err();
        assert!(e.contains(ENV_DAILY) && e.contains(ENV_3DAY), "{e}");
        let e = from(&[("FAIR_USE_WEEKLY_SPEECH_MS", "1000")]).unwrap_err();
        assert!(e.contains(ENV_3DAY) && e.contains(ENV_WEEKLY), "{e}");
        // Equal caps are allowed.
        assert!(from(&[("FAIR_USE_3DAY_SPEECH_MS", "36000000")]).is_ok());
    }

    #[test]
    fn restrict_budget_above_throttle_budget_is_refused_unless_one_is_off() {
        let e = from(&[(ENV_RESTRICT_STT, "9000000")]).unwrap_err();
        assert!(
            e.contains(ENV_RESTRICT_STT) && e.contains(ENV_THROTTLE_STT),
            "{e}"
        );
        assert!(from(&[(ENV_RESTRICT_STT, "9000000"), (ENV_THROTTLE_STT, "0")]).is_ok());
        assert!(from(&[(ENV_RESTRICT_STT, "0")]).is_ok());
    }

    #[test]
    fn retry_base_above_retry_max_is_refused() {
        let e = from(&[(ENV_RETRY_BASE, "7200")]).unwrap_err();
        assert!(
            e.contains(ENV_RETRY_BASE) && e.contains(ENV_RETRY_MAX),
            "{e}"
        );
    }

    #[test]
    fn days_too_large_for_milliseconds_are_refused() {
        let e = from(&[("VOICEGATE_FAIR_USE_THROTTLE_DAYS", &u64::MAX.to_string())]).unwrap_err();
        assert!(e.contains("VOICEGATE_FAIR_USE_THROTTLE_DAYS"), "{e}");
    }

    #[test]
    fn args_from_a_config_give_that_config_back() {
        let mut c = FairUseConfig {
            exempt_uids: ["u1".to_owned(), "u2".to_owned()].into(),
            ..FairUseConfig::default()
        };
        c.classifier.kind = ClassifierKind::OpenAi;
        c.classifier.api_key = Some("sk-test".to_owned());
        c.classifier.max_failures = 9;
        c.caps.free.daily_ms = 1;
        c.caps.paid.weekly_ms = 99_000_000;
        c.ceiling_ms = 0;
        assert_eq!(FairUseArgs::from(&c).config(), Ok(c));
    }
}
