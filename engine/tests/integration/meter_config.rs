//! Metering configuration: defaults in one place, overridden by `VOICEGATE_METER_*`.

use std::collections::HashMap;
use std::time::Duration;

use voicegate_engine::meter::MeterConfig;

fn from(
    vars: &[(&str, &str)],
) -> Result<MeterConfig, voicegate_engine::meter::config::ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    MeterConfig::from_lookup(|name| map.get(name).cloned())
}

#[test]
fn defaults_match_the_issue() {
    let c = from(&[]).unwrap();
    assert_eq!(c.flush_interval, Duration::from_secs(1));
    assert_eq!(c.idle_passivation, Duration::from_secs(15 * 60));
    assert_eq!(c.refresh_interval, Duration::from_secs(30));
    assert_eq!(c.retention, Duration::from_secs(8 * 24 * 3600));
    assert!(c.max_pending_per_user > 0 && c.max_pending_total >= c.max_pending_per_user);
}

#[test]
fn environment_variables_override_the_defaults() {
    let c = from(&[
        ("VOICEGATE_METER_FLUSH_INTERVAL_MS", "250"),
        ("VOICEGATE_METER_IDLE_PASSIVATION_S", "60"),
        ("VOICEGATE_METER_REFRESH_INTERVAL_S", "5"),
        ("VOICEGATE_METER_MAX_PENDING_PER_USER", "10"),
        ("VOICEGATE_METER_RETENTION_S", "86400"),
        ("VOICEGATE_METER_SHARDS", "0"),
    ])
    .unwrap();
    assert_eq!(c.flush_interval, Duration::from_millis(250));
    assert_eq!(c.idle_passivation, Duration::from_secs(60));
    assert_eq!(c.refresh_interval, Duration::from_secs(5));
    assert_eq!(c.max_pending_per_user, 10);
    assert_eq!(c.retention, Duration::from_secs(86_400));
    assert_eq!(c.shards, 0);
}

#[test]
fn a_malformed_value_names_the_variable() {
    let err = from(&[("VOICEGATE_METER_FLUSH_INTERVAL_MS", "1s")]).unwrap_err();
    assert_eq!(err.name, "VOICEGATE_METER_FLUSH_INTERVAL_MS");
    assert!(err.to_string().contains("1s"));
}
