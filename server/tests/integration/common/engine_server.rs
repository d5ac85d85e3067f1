//! A real `voicegate serve` (in process: actix system of the test) wired to the engine on a real
//! redis-server, with an HTTP client and multipart helpers.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use voicegate_engine::meter::MeterConfig;
use voicegate_engine::policy::FairUseConfig;
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_server::ServeConfig;
use voicegate_server::engine::Engine;
use voicegate_server::serve::{ServerBuilder, mount_engine};

pub const ADMIN_KEY: &str = "test-admin-key";
pub const STRIPE_SECRET: &str = "whsec_test_secret";

pub struct EngineServer {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub redis: RedisServer,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<actix_web::rt::task::JoinHandle<()>>,
}

/// Fair use on with the reference's defaults (caps, stages, and no plan record = the free plan, i.e.
/// `VOICEGATE_DEFAULT_PLAN=free`), everything else default.
pub fn fair_use_on() -> FairUseConfig {
    let mut c = FairUseConfig {
        enabled: true,
        ..FairUseConfig::default()
    };
    c.plans.default_plan = voicegate_engine::policy::DefaultPlan::Free;
    c
}

pub fn base_config(redis_url: String) -> ServeConfig {
    ServeConfig {
        bind: "127.0.0.1:0".into(),
        redis_url: Some(redis_url),
        admin_key: Some(ADMIN_KEY.into()),
        stripe_webhook_secret: Some(STRIPE_SECRET.into()),
        ..ServeConfig::default()
    }
}

impl EngineServer {
    /// Starts redis and the server. Must run inside an actix system (`#[actix_web::test]`).
    pub async fn start(fair: FairUseConfig, tweak: impl FnOnce(&mut ServeConfig)) -> EngineServer {
        Self::start_with(fair, tweak, |_| {}).await
    }

    /// [`Self::start`], with `edit` applied to the engine before it is mounted (e.g. a store swapped).
    pub async fn start_with(
        fair: FairUseConfig,
        tweak: impl FnOnce(&mut ServeConfig),
        edit: impl FnOnce(&mut Engine),
    ) -> EngineServer {
        let redis = RedisServer::start().expect("redis-server");
        let mut cfg = base_config(redis.url());
        tweak(&mut cfg);
        let mut builder = ServerBuilder::new(cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
        let mut engine =
            Engine::with_configs(&cfg, MeterConfig::default(), fair, builder.outbound())
                .unwrap_or_else(|e| panic!("{e}"));
        edit(&mut engine);
        mount_engine(&mut builder, &engine);
        let running = builder.start().unwrap_or_else(|e| panic!("{e}"));
        let addr = running.addrs()[0];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = actix_web::rt::spawn(async move {
            let _ = running
                .run_until(async {
                    let _ = rx.await;
                })
                .await;
        });
        EngineServer {
            addr,
            engine,
            redis,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// Delivers `payload` to the Stripe webhook signed with `secret` (now).
    pub async fn webhook(&self, payload: &Value, secret: &str) -> super::refusal::Reply {
        let bytes = payload.to_string().into_bytes();
        let sig = voicegate_server::stripe::sign_payload(&bytes, secret.as_bytes(), super::now());
        let resp = self
            .http
            .post(self.url("/v1/stripe/webhook"))
            .header("Stripe-Signature", sig)
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        super::refusal::Reply::of(resp).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The node's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The sum of the `/metrics` series whose line starts with `prefix` (one test per process under
    /// nextest, so the figures are this test's).
    pub async fn metric_sum(&self, prefix: &str) -> u64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Drains the server (sessions, then the meter flush) and waits for it to stop.
    pub async fn shutdown(mut self) -> RedisServer {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        self.redis
    }

    /// GETs `path`; a refusal is checked for the one refusal shape (`common::refusal`) on the way.
    pub async fn get(&self, path: &str, bearer: &str) -> (u16, Value) {
        let reply = self.get_reply(path, bearer).await;
        if reply.status >= 400 {
            reply.assert_refusal(&format!("GET {path}"));
        }
        reply.pair()
    }

    /// [`Self::get`] with the `Retry-After` header, to check a refusal's shape.
    pub async fn get_reply(&self, path: &str, bearer: &str) -> super::refusal::Reply {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        super::refusal::Reply::of(resp).await
    }

    /// GETs an admin route (`X-Admin-Key`); a refusal is checked for the one refusal shape.
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let reply = super::refusal::Reply::of(resp).await;
        if reply.status >= 400 {
            reply.assert_refusal(&format!("GET {path}"));
        }
        reply.pair()
    }

    pub async fn status_speech_ms(&self, uid: &str) -> Value {
        let (code, body) = self.get("/v1/fair-use/status", uid).await;
        assert_eq!(code, 200, "{body}");
        body["speech_ms"].clone()
    }

    /// The entries of the `vg:events` stream (field → value), read until `done` holds (at most 10 s).
    pub async fn events_until(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg("vg:events")
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            let evs: Vec<Value> = entries
                .into_iter()
                .map(|(_, fields)| {
                    Value::Object(
                        fields
                            .into_iter()
                            .map(|(k, v)| (k, Value::String(v)))
                            .collect(),
                    )
                })
                .collect();
            if done(&evs) {
                return evs;
            }
            assert!(std::time::Instant::now() < deadline, "events: {evs:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Posts `files` as multipart `files` parts to `path` (v1 or v2); a refusal is checked for the one
    /// refusal shape (`common::refusal`) on the way.
    pub async fn post_files(
        &self,
        path: &str,
        bearer: &str,
        files: &[(String, Vec<u8>)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let (ctype, body) = multipart(files);
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(bearer)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let headers = resp.headers().clone();
        let (code, body) = split(resp).await;
        if code >= 400 {
            let retry_after = super::refusal::header_str(&headers);
            super::refusal::assert_refusal(
                &format!("POST {path}"),
                code,
                retry_after.as_deref(),
                &body,
            );
        }
        (code, body, headers)
    }

    /// Polls a sync v2 job as its client would (every 50 ms, at most `limit`) until it is terminal.
    pub async fn wait_job(&self, bearer: &str, job_id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (code, job) = self
                .get(&format!("/v2/sync-local-files/{job_id}"), bearer)
                .await;
            assert_eq!(code, 200, "{job}");
            if ["completed", "partial_failure", "failed"]
                .contains(&job["status"].as_str().unwrap_or(""))
            {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job not finished in {limit:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts `files` (name, bytes) as multipart `files` parts; a refusal is checked for the one refusal
    /// shape (`common::refusal`) on the way.
    pub async fn upload(
        &self,
        bearer: &str,
        query: &str,
        files: &[(String, Vec<u8>)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let (ctype, body) = multipart(files);
        let resp = self
            .http
            .post(self.url(&format!("/v1/sync-local-files{query}")))
            .bearer_auth(bearer)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("upload: {e}"));
        let headers = resp.headers().clone();
        let (code, body) = split(resp).await;
        if code >= 400 {
            let retry_after = super::refusal::header_str(&headers);
            super::refusal::assert_refusal("sync upload", code, retry_after.as_deref(), &body);
        }
        (code, body, headers)
    }
}

pub async fn split(resp: reqwest::Response) -> (u16, Value) {
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, body)
}

pub const BOUNDARY: &str = "voicegate-test-boundary-7f3a";

pub fn multipart(files: &[(String, Vec<u8>)]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The repository's labelled fixtures (`fixtures/dNN.bin`), sorted.
pub fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = format!("{}/../fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read(&p).unwrap_or_else(|e| panic!("{e}")))
        })
        .collect();
    out.sort();
    out
}

/// An Omi device file name for audio that started `ago_s` seconds ago.
pub fn omi_name(ago_s: u64) -> String {
    format!("audio_omi_opus_16000_1_fs160_{}.bin", now_s() - ago_s)
}

/// What the offline pipeline (`voicegate analyze`) finds in `bytes`, in ms of speech.
pub fn offline_speech_ms(name: &str, bytes: &[u8]) -> u64 {
    use voicegate_engine::pipeline::offline::{analyze, format_for_name};
    use voicegate_engine::pipeline::stream::PipelineConfig;
    let format = format_for_name(name).unwrap_or_else(|e| panic!("{e}"));
    let fa = analyze(name, bytes, &format, &PipelineConfig::default());
    assert!(fa.error.is_none(), "{fa:?}");
    fa.speech_ms
}
