//! What the engine's settings share: the one [`ConfigError`] and the clap value parser every setting uses.
//!
//! The settings themselves are clap `Args` next to the code they configure ([`crate::meter::MeterArgs`],
//! [`crate::policy::FairUseArgs`]); `voicegate serve` flattens them into its own configuration, so
//! `--help` and the generated table in `docs/operations.md` list every setting. Each `Args` struct turns into
//! the runtime configuration through a `config()` method that refuses impossible combinations.

use std::ffi::OsStr;

use clap::builder::TypedValueParser;

/// A setting the engine cannot start with. The messages name the environment variables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse, or lies outside the setting's range.
    #[error("{setting} must be {expected}, got {value:?}")]
    Invalid {
        setting: String,
        value: String,
        expected: &'static str,
    },
    /// A zero where the engine needs a positive value (an interval, a timeout, a bound).
    #[error("{setting} must be greater than 0")]
    Zero { setting: &'static str },
    /// Two settings whose order is fixed, the wrong way round (caps below each other, windows out of order).
    #[error("{lower} ({lower_value}) must not be greater than {upper} ({upper_value})")]
    OutOfOrder {
        lower: &'static str,
        lower_value: u64,
        upper: &'static str,
        upper_value: u64,
    },
}

impl ConfigError {
    /// The machine-readable code of every configuration error.
    pub const CODE: &'static str = "invalid_config";
}

/// `Err(Zero)` when `value` is 0.
pub(crate) fn positive(setting: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Zero { setting });
    }
    Ok(())
}

/// `Err(OutOfOrder)` when `lower_value > upper_value`.
pub(crate) fn ordered(
    (lower, lower_value): (&'static str, u64),
    (upper, upper_value): (&'static str, u64),
) -> Result<(), ConfigError> {
    if lower_value > upper_value {
        return Err(ConfigError::OutOfOrder {
            lower,
            lower_value,
            upper,
            upper_value,
        });
    }
    Ok(())
}

/// The clap value parser of every engine setting: trims the value, treats an empty value as unset (the
/// default applies), and on a bad value names the environment variable, the value and what was expected
/// ([`ConfigError::Invalid`] as the error's source).
#[derive(Clone, Copy)]
pub struct Setting<T> {
    parse: fn(&str) -> Option<T>,
    expected: &'static str,
}

impl<T> Setting<T> {
    pub const fn new(parse: fn(&str) -> Option<T>, expected: &'static str) -> Self {
        Setting { parse, expected }
    }
}

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Setting<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let given = value.to_string_lossy();
        let mut text = given.trim().to_owned();
        if text.is_empty()
            && let Some(default) = arg.and_then(|a| a.get_default_values().first())
        {
            text = default.to_string_lossy().into_owned();
        }
        let setting = arg
            .map(|a| match (a.get_env(), a.get_long()) {
                (Some(env), Some(long)) => format!("{} (--{long})", env.to_string_lossy()),
                (Some(env), None) => env.to_string_lossy().into_owned(),
                _ => a.to_string(),
            })
            .unwrap_or_default();
        let (parse, expected) = (self.parse, self.expected);
        let check = move |v: &str| {
            parse(v).ok_or_else(|| ConfigError::Invalid {
                setting: setting.clone(),
                value: v.to_owned(),
                expected,
            })
        };
        check.parse_ref(cmd, arg, OsStr::new(&text))
    }
}

/// A non-negative integer (`u64`).
pub const fn count() -> Setting<u64> {
    Setting::new(|v| v.parse().ok(), "a non-negative integer")
}

/// A non-negative integer (`usize`).
pub const fn count_usize() -> Setting<usize> {
    Setting::new(|v| v.parse().ok(), "a non-negative integer")
}

/// A positive integer.
pub const fn positive_count() -> Setting<u64> {
    Setting::new(
        |v| v.parse().ok().filter(|&n: &u64| n > 0),
        "a positive integer",
    )
}

/// `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, any case.
pub const fn boolean() -> Setting<bool> {
    Setting::new(
        |v| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        },
        "true or false",
    )
}

/// A number from 0 to 1.
pub const fn fraction() -> Setting<f64> {
    Setting::new(
        |v| v.parse().ok().filter(|x: &f64| (0.0..=1.0).contains(x)),
        "a number from 0 to 1",
    )
}

/// Any text (trimmed; empty means the default).
pub const fn text() -> Setting<String> {
    Setting::new(|v| Some(v.to_owned()), "text")
}

/// Parses `A` from the variables `lookup` knows, as if they were the environment (tests and embedders that
/// must not touch the process environment). Variables set in the process environment still apply to the
/// settings `lookup` does not know.
pub fn args_from_lookup<A: clap::Args + clap::FromArgMatches>(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<A, clap::Error> {
    let cmd = A::augment_args(clap::Command::new("settings").no_binary_name(true));
    let mut argv = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        if let Some(value) = lookup(&env.to_string_lossy()) {
            argv.push(format!("--{long}={value}"));
        }
    }
    let matches = cmd.try_get_matches_from(argv)?;
    A::from_arg_matches(&matches)
}

/// The [`ConfigError`] behind a clap error from a [`Setting`], when there is one.
pub fn invalid_setting(error: &clap::Error) -> Option<&ConfigError> {
    std::error::Error::source(error).and_then(|e| e.downcast_ref::<ConfigError>())
}
