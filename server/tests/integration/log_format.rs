//! `VOICEGATE_LOG_FORMAT`: `json` makes the real `voicegate serve` write one JSON object per log line;
//! an unknown value refuses to start, naming the valid ones.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use crate::listen_support::{Child, free_port};

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", format!("127.0.0.1:{}", free_port()))
        .env("VOICEGATE_STT", "none")
        .env("VOICEGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    let mut child = Child(child);
    let stdout = child.0.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    // The startup lines, up to the one saying it listens (the process is killed on drop).
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_else(|e| panic!("{e}"));
        let listening = line.contains("Listening.");
        lines.push(line);
        if listening {
            break;
        }
    }
    assert!(
        lines.iter().any(|l| l.contains("Listening.")),
        "no `Listening.` line: {lines:?}"
    );
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    let dev = lines
        .iter()
        .find(|l| l.contains("DEV AUTH MODE"))
        .unwrap_or_else(|| panic!("no dev-mode warning: {lines:?}"));
    let dev: serde_json::Value = serde_json::from_str(dev).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dev["level"], "WARN");
    assert_eq!(
        dev["fields"]["bind"]
            .as_str()
            .map(|b| b.starts_with("127.0.0.1:")),
        Some(true)
    );
}

#[test]
fn an_unknown_log_format_refuses_to_start_naming_the_valid_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", "127.0.0.1:0")
        .env("VOICEGATE_STT", "none")
        .env("VOICEGATE_LOG_FORMAT", "xml")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run voicegate: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("xml") && stderr.contains("text") && stderr.contains("json"),
        "{stderr}"
    );
}
