//! Metering configuration: `MeterArgs` (defaults in one place, overridden by `VOICEGATE_METER_*`), checked
//! into the `MeterConfig` the meter runs with.

use std::collections::HashMap;
use std::time::Duration;

use voicegate_engine::config::{ConfigError, args_from_lookup, invalid_setting};
use voicegate_engine::meter::{MeterArgs, MeterConfig};

fn args(vars: &[(&str, &str)]) -> Result<MeterArgs, clap::Error> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    args_from_lookup(|name| map.get(name).cloned())
}

fn from(vars: &[(&str, &str)]) -> Result<MeterConfig, ConfigError> {
    args(vars).unwrap_or_else(|e| panic!("{e}")).config()
}

#[test]
fn defaults_match_the_issue() {
    let c = from(&[]).unwrap();
    assert_eq!(c.flush_interval, Duration::from_secs(1));
    assert_eq!(c.flush_max_backoff, Duration::from_secs(5));
    assert_eq!(c.idle_passivation, Duration::from_secs(15 * 60));
    assert_eq!(c.refresh_interval, Duration::from_secs(30));
    assert_eq!(c.hydrate_timeout, Duration::from_millis(500));
    assert_eq!(c.store_timeout, Duration::from_secs(2));
    assert_eq!(c.retention, Duration::from_secs(8 * 24 * 3600));
    assert_eq!(
        (c.max_pending_per_user, c.max_pending_total),
        (20_000, 5_000_000)
    );
    assert_eq!(c.max_pipeline, 1000);
    assert_eq!(
        c.shards,
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );
    let d = MeterConfig::default();
    assert_eq!(
        (d.flush_interval, d.retention, d.max_pending_total, d.shards),
        (c.flush_interval, c.retention, c.max_pending_total, c.shards)
    );
}

#[test]
fn environment_variables_override_the_defaults() {
    let c = from(&[
        ("VOICEGATE_METER_FLUSH_INTERVAL_MS", "250"),
        ("VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS", "9000"),
        ("VOICEGATE_METER_IDLE_PASSIVATION_S", "60"),
        ("VOICEGATE_METER_REFRESH_INTERVAL_S", "5"),
        ("VOICEGATE_METER_HYDRATE_TIMEOUT_MS", "0"),
        ("VOICEGATE_METER_STORE_TIMEOUT_MS", " 700 "),
        ("VOICEGATE_METER_MAX_PENDING_PER_USER", "10"),
        ("VOICEGATE_METER_MAX_PENDING_TOTAL", "10"),
        ("VOICEGATE_METER_MAX_PIPELINE", "3"),
        ("VOICEGATE_METER_RETENTION_S", "864000"),
        ("VOICEGATE_METER_SHARDS", "0"),
    ])
    .unwrap();
    assert_eq!(c.flush_interval, Duration::from_millis(250));
    assert_eq!(c.flush_max_backoff, Duration::from_millis(9000));
    assert_eq!(c.idle_passivation, Duration::from_secs(60));
    assert_eq!(c.refresh_interval, Duration::from_secs(5));
    assert_eq!(c.hydrate_timeout, Duration::ZERO);
    assert_eq!(c.store_timeout, Duration::from_millis(700));
    assert_eq!((c.max_pending_per_user, c.max_pending_total), (10, 10));
    assert_eq!(c.max_pipeline, 3);
    assert_eq!(c.retention, Duration::from_secs(864_000));
    assert_eq!(c.shards, 0);
}

#[test]
fn a_malformed_value_names_the_variable() {
    let err = args(&[("VOICEGATE_METER_FLUSH_INTERVAL_MS", "1s")]).unwrap_err();
    match invalid_setting(&err) {
        Some(ConfigError::Invalid { setting, value, .. }) => {
            assert!(
                setting.contains("VOICEGATE_METER_FLUSH_INTERVAL_MS"),
                "{setting}"
            );
            assert_eq!(value, "1s");
        }
        other => panic!("expected an invalid setting, got {other:?} from {err}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("VOICEGATE_METER_FLUSH_INTERVAL_MS") && text.contains("1s"),
        "{text}"
    );
    assert!(args(&[("VOICEGATE_METER_SHARDS", "-1")]).is_err());
}

#[test]
fn zero_intervals_and_bounds_are_refused_naming_the_variable() {
    for var in [
        "VOICEGATE_METER_FLUSH_INTERVAL_MS",
        "VOICEGATE_METER_IDLE_PASSIVATION_S",
        "VOICEGATE_METER_REFRESH_INTERVAL_S",
        "VOICEGATE_METER_STORE_TIMEOUT_MS",
        "VOICEGATE_METER_MAX_PENDING_PER_USER",
        "VOICEGATE_METER_MAX_PIPELINE",
    ] {
        match from(&[(var, "0")]) {
            Err(ConfigError::Zero { setting }) => assert_eq!(setting, var),
            other => panic!("{var}=0: {other:?}"),
        }
    }
}

#[test]
fn settings_out_of_order_are_refused_naming_both() {
    let cases = [
        (
            ("VOICEGATE_METER_FLUSH_INTERVAL_MS", "6000"),
            "VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS",
        ),
        (
            ("VOICEGATE_METER_MAX_PENDING_PER_USER", "6000000"),
            "VOICEGATE_METER_MAX_PENDING_TOTAL",
        ),
    ];
    for ((lower, value), upper) in cases {
        let err = from(&[(lower, value)]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::OutOfOrder { lower: l, upper: u, .. } if *l == lower && *u == upper),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(lower) && text.contains(upper), "{text}");
    }
}

#[test]
fn a_retention_shorter_than_the_weekly_window_is_refused() {
    let err = from(&[("VOICEGATE_METER_RETENTION_S", "86400")]).unwrap_err();
    assert!(
        err.to_string().contains("VOICEGATE_METER_RETENTION_S"),
        "{err}"
    );
    assert!(from(&[("VOICEGATE_METER_RETENTION_S", "604800")]).is_ok());
}
