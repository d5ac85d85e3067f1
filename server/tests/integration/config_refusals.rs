//! Metering and fair-use settings reach `voicegate serve` through its own flags and environment, and an
//! impossible one stops it at startup (exit code 2) with a message naming the settings.

use std::process::{Command, Stdio};

use voicegate_engine::config::ConfigError as EngineConfigError;
use voicegate_server::ServeConfig;
use voicegate_server::config::ConfigError;
use voicegate_server::serve::{ServeError, ServerBuilder};

use crate::common;

/// Runs `voicegate serve` with `env` on a loopback port and returns (exit code, stderr). Every case here
/// is refused before the server binds, so the process ends on its own.
fn serve_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voicegate"));
    cmd.arg("serve")
        .env("VOICEGATE_BIND", "127.0.0.1:0")
        .env("VOICEGATE_STT", "none")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run voicegate: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_malformed_meter_variable_stops_serve_naming_it() {
    let (code, stderr) = serve_with(&[("VOICEGATE_METER_FLUSH_INTERVAL_MS", "1s")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("VOICEGATE_METER_FLUSH_INTERVAL_MS") && stderr.contains("1s"),
        "{stderr}"
    );
}

#[test]
fn fair_use_caps_below_each_other_stop_serve_naming_both() {
    let (code, stderr) = serve_with(&[("FAIR_USE_DAILY_SPEECH_MS", "90000000")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("FAIR_USE_DAILY_SPEECH_MS") && stderr.contains("FAIR_USE_3DAY_SPEECH_MS"),
        "{stderr}"
    );
}

#[test]
fn a_zero_meter_interval_stops_serve_naming_it() {
    let (code, stderr) = serve_with(&[("VOICEGATE_METER_REFRESH_INTERVAL_S", "0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("VOICEGATE_METER_REFRESH_INTERVAL_S"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn the_builder_refuses_impossible_engine_settings_before_binding() {
    let mut cfg = common::config();
    cfg.meter.flush_interval_ms = 10_000;
    cfg.meter.flush_max_backoff_ms = 5_000;
    match ServerBuilder::new(cfg) {
        Err(ServeError::Config(ConfigError::Engine(EngineConfigError::OutOfOrder {
            lower,
            upper,
            ..
        }))) => {
            assert_eq!(lower, "VOICEGATE_METER_FLUSH_INTERVAL_MS");
            assert_eq!(upper, "VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a backoff below the flush interval must not start"),
    }
}

#[test]
fn the_default_serve_configuration_is_valid() {
    ServeConfig::default()
        .validate()
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn setting_both_a_redis_url_and_cluster_nodes_stops_serve_naming_both() {
    let (code, stderr) = serve_with(&[
        ("VOICEGATE_REDIS_URL", "redis://127.0.0.1:1/"),
        (
            "VOICEGATE_REDIS_CLUSTER_NODES",
            "redis://127.0.0.1:2/,redis://127.0.0.1:3/",
        ),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("VOICEGATE_REDIS_URL") && stderr.contains("VOICEGATE_REDIS_CLUSTER_NODES"),
        "{stderr}"
    );
}

#[test]
fn replica_acknowledgement_against_a_lone_redis_stops_serve_naming_the_setting() {
    let redis = voicegate_engine::store::test_redis::RedisServer::start()
        .unwrap_or_else(|e| panic!("redis-server: {e}"));
    let url = redis.url();
    let (code, stderr) = serve_with(&[
        ("VOICEGATE_REDIS_URL", url.as_str()),
        ("VOICEGATE_REDIS_WAIT_REPLICAS", "1"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("VOICEGATE_REDIS_WAIT_REPLICAS=1 but the store has 0 connected replicas"),
        "{stderr}"
    );
}
