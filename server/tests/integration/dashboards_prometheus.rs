//! The Grafana dashboards and alert rules in `dashboards/` against a real Prometheus scraping a real
//! `voicegate serve`: every panel query and every alert expression must parse, every panel query must
//! return data after a little traffic, every metric they name must be in `docs/metrics.md`, and
//! `promtool check rules` / `promtool test rules` must pass.
//!
//! Needs the Debian package `prometheus` (`scripts/deps.sh` installs it). Bounded: the server and
//! Prometheus are killed when the test ends, whatever happens; the whole test takes about 15 s.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const OVERALL: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kills the child when dropped, so a failing assertion never leaves a server or Prometheus behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn which(bin: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{bin}` not found: install the Debian package `prometheus` (scripts/deps.sh does)"
            )
        })
}

/// One HTTP/1.0 exchange (no chunked bodies to decode); returns (status, body).
fn http(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw[(split + 4).min(raw.len())..].to_vec())
}

fn wait_until(what: &str, deadline: Instant, mut ok: impl FnMut() -> bool) {
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus instant query: Ok(result array) or Err(error message).
fn prom_query(port: u16, expr: &str) -> Result<Vec<Value>, String> {
    let (status, body) = http(
        port,
        "GET",
        &format!("/api/v1/query?query={}", url_encode(expr)),
        &[],
        b"",
    );
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Grafana's interval variables, as Grafana would expand them for a 1 s scrape interval.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
}

/// Every (dashboard, panel title, expr) of the dashboards, rows' nested panels included.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = repo().join("dashboards/grafana");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let name = d["title"].as_str().unwrap_or("?").to_owned();
        let mut panels: Vec<Value> = d["panels"].as_array().cloned().unwrap_or_default();
        while let Some(p) = panels.pop() {
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner.iter().cloned());
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        name.clone(),
                        p["title"].as_str().unwrap_or("?").to_owned(),
                        e.to_owned(),
                    ));
                }
            }
        }
    }
    assert!(
        out.len() >= 40,
        "expected the four dashboards' queries, found {}",
        out.len()
    );
    out
}

/// `voicegate_…` names in an expression, histogram series suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("voicegate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

fn documented_metrics() -> String {
    std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap()
}

fn run_promtool(args: &[&str]) {
    let out = Command::new(which("promtool"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A sync upload of one fixture as a device names it (any answer will do: the metrics are the point).
fn sync_upload(port: u16, uid: &str) -> u16 {
    let file = std::fs::read(repo().join("fixtures/d01.bin")).unwrap();
    let boundary = "voicegate-dashboards-test";
    let name = format!("audio_omi_opus_16000_1_fs160_{}.bin", now_s() - 120);
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let auth = format!("Bearer {uid}");
    let ctype = format!("multipart/form-data; boundary={boundary}");
    http(
        port,
        "POST",
        "/v1/sync-local-files",
        &[("Authorization", &auth), ("Content-Type", &ctype)],
        &body,
    )
    .0
}

/// A client websocket frame (masked with a zero key, which leaves the payload as is).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A short listen stream: 2 s of fixture audio at 10x, `CloseStream`, read to the server's close.
/// Returns false when the route does not upgrade.
fn listen_stream(port: u16, uid: &str) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "GET /v4/listen?codec=opus&sample_rate=16000&language=en HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {uid}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            return false;
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return false;
    }
    let file = std::fs::read(repo().join("fixtures/d01.bin")).unwrap();
    let mut at = 0;
    for _ in 0..200 {
        let len = u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        s.write_all(&ws_frame(0x2, &file[at + 4..at + 4 + len]))
            .unwrap();
        at += 4 + len;
        std::thread::sleep(Duration::from_millis(1));
    }
    s.write_all(&ws_frame(0x1, br#"{"type":"CloseStream"}"#))
        .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    true
}

#[test]
fn every_panel_query_and_alert_expression_runs_against_a_real_prometheus() {
    let deadline = Instant::now() + OVERALL;
    let rules = repo().join("dashboards/prometheus/alerts.yml");
    run_promtool(&["check", "rules", rules.to_str().unwrap()]);
    run_promtool(&["test", "rules", "dashboards/prometheus/alerts_test.yml"]);

    // Every metric a panel or rule names is documented.
    let docs = documented_metrics();
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let queries = panel_queries();
    for name in queries
        .iter()
        .flat_map(|(_, _, e)| metric_names(e))
        .chain(metric_names(&rules_text))
    {
        assert!(
            docs.contains(&format!("`{name}`")),
            "{name} is used by a dashboard or rule but not in docs/metrics.md"
        );
    }

    // The server: dev mode on a loopback port, in-memory store.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let server = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env_remove("VOICEGATE_REDIS_URL")
        .env_remove("VOICEGATE_JWKS")
        .env_remove("VOICEGATE_JWT_HS256_SECRET")
        .env("RUST_LOG", "warn")
        // Not about transcription: no model loads (the default is local when installed).
        .env("VOICEGATE_STT", "none")
        // The stream runs at 10x, over the default intake limit of 4x.
        .env("VOICEGATE_LISTEN_MAX_PACE", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Proc(server);
    wait_until("voicegate /readyz", deadline, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http(port, "GET", "/readyz", &[], b"").0 == 200
    });

    // Prometheus scraping it every second, with the alert rules loaded.
    let prom_port = free_port();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: voicegate\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let prom = Command::new(which("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _prom = Proc(prom);
    wait_until("prometheus /-/ready", deadline, || {
        TcpStream::connect(("127.0.0.1", prom_port)).is_ok()
            && http(prom_port, "GET", "/-/ready", &[], b"").0 == 200
    });
    // A first scrape before the traffic, so counters born during it show a rate.
    wait_until("a first scrape", deadline, || {
        prom_query(prom_port, "up{job=\"voicegate\"} == 1").is_ok_and(|r| !r.is_empty())
    });

    // A little traffic: a request without a token (auth rejection), a sync upload, a listen stream.
    assert_eq!(http(port, "GET", "/v1/fair-use/status", &[], b"").0, 401);
    let sync = sync_upload(port, "dashboards-user");
    assert!(matches!(sync, 200 | 207), "sync upload answered {sync}");
    assert!(
        listen_stream(port, "dashboards-user"),
        "/v4/listen did not upgrade"
    );

    // Every panel query parses and, once a few scrapes have seen the traffic, returns data.
    let mut pending: Vec<_> = queries.iter().collect();
    let mut last_errors = Vec::new();
    while !pending.is_empty() {
        last_errors.clear();
        pending.retain(
            |(dash, title, expr)| match prom_query(prom_port, &expand(expr)) {
                Ok(result) if !result.is_empty() => false,
                Ok(_) => {
                    last_errors.push(format!("{dash} / {title}: no data for `{expr}`"));
                    true
                }
                Err(e) => panic!("{dash} / {title}: `{expr}` does not parse: {e}"),
            },
        );
        if pending.is_empty() || Instant::now() + Duration::from_secs(2) > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        last_errors.is_empty(),
        "panel queries without data:\n{}",
        last_errors.join("\n")
    );

    // Every alert rule was loaded, evaluates without error, and its expression parses on its own.
    let (_, body) = http(prom_port, "GET", "/api/v1/rules", &[], b"");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let rules: Vec<Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let in_file = rules_text.matches("- alert:").count();
    assert_eq!(
        rules.len(),
        in_file,
        "Prometheus loaded {} of {in_file} rules",
        rules.len()
    );
    wait_until("every rule evaluated", deadline, || {
        let (_, body) = http(prom_port, "GET", "/api/v1/rules", &[], b"");
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        v["data"]["groups"].as_array().is_some_and(|gs| {
            gs.iter().all(|g| {
                g["rules"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().all(|r| r["health"] == "ok"))
            })
        })
    });
    for r in &rules {
        let expr = r["query"].as_str().unwrap();
        if let Err(e) = prom_query(prom_port, expr) {
            panic!("alert {}: `{expr}` does not evaluate: {e}", r["name"]);
        }
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(voicegate_a_seconds_bucket[1m]))) / voicegate_b_total",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["voicegate_a_seconds", "voicegate_b_total"]
    );
}
