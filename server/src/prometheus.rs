//! Prometheus exposition: the global recorder, its upkeep, `GET /metrics`, and the request-latency middleware.
//!
//! Metric names come from `voicegate_engine::telemetry`. Histograms get explicit buckets by unit suffix
//! (otherwise the exporter renders summaries, which cannot be aggregated across pods). The latency histogram
//! is labelled by the matched route *pattern* (`/v1/conversations/{id}`), never the raw path, and by status
//! class, so its cardinality is fixed; no metric carries a uid.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use voicegate_engine::telemetry::{HTTP_REQUEST_DURATION_SECONDS, STT_FINAL_LATENCY_SECONDS};

/// How often idle histogram buckets are rotated and the recorder's internal state is tidied.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Buckets for `*_seconds` histograms: 100 µs … 60 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];
/// Buckets for `voicegate_stt_final_latency_seconds` (speech end to final transcript): 0.1 … 30 s, finer
/// where a provider's normal latency lies (0.25–3 s), so p50 and p95 are read within ~25 %.
pub const FINAL_LATENCY_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
];
/// Buckets for `*_ms` histograms.
pub const MILLIS_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0,
    60_000.0,
];
/// Buckets for `*_bytes` histograms: 256 B … 256 MiB.
pub const BYTES_BUCKETS: &[f64] = &[
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process and returns its handle (later calls return the
/// same handle, so tests and the server can both call it).
pub fn install() -> Result<PrometheusHandle, BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)?
        // A full name wins over a suffix (the exporter tries `Full` matchers first).
        .set_buckets_for_metric(
            Matcher::Full(STT_FINAL_LATENCY_SECONDS.to_owned()),
            FINAL_LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_ms".to_owned()), MILLIS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".to_owned()), BYTES_BUCKETS)?
        .install_recorder();
    match handle {
        Ok(h) => Ok(HANDLE.get_or_init(|| h).clone()),
        // Lost a race with another caller of `install`: use the winner's handle.
        Err(e) => HANDLE.get().cloned().ok_or(e),
    }
}

/// Runs the recorder's upkeep forever; spawn it once on the server's runtime.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// `GET /metrics`: the Prometheus text exposition.
pub async fn metrics_route(handle: web::Data<PrometheusHandle>) -> HttpResponse {
    crate::heap::observe();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Only well-known methods become label values; anything else is `other`.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware (`middleware::from_fn(record_latency)`): records every request's latency.
pub async fn record_latency(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let method = method_label(req.method());
    let result = next.call(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    let (route, status) = match &result {
        // The pattern is known only after routing, so it is read from the response's request.
        Ok(res) => (
            res.request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_owned()),
            res.status().as_u16(),
        ),
        Err(e) => (
            "unmatched".to_owned(),
            e.as_response_error().status_code().as_u16(),
        ),
    };
    record_request(route, method, status, elapsed);
    result
}

/// Records one request's latency (the middleware's figure; also the listen websocket's upgrade, answered
/// outside the middleware).
pub fn record_request(route: String, method: &'static str, status: u16, elapsed_s: f64) {
    metrics::histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "route" => route,
        "method" => method,
        "status" => status_class(status),
    )
    .record(elapsed_s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_cover_every_status() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(413), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }

    /// The value of the sample line `series` (name and labels exactly as rendered) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    #[test]
    fn install_twice_returns_one_recorder_whose_scrape_shows_what_was_recorded() {
        let a = install().expect("first install");
        let b = install().expect("second install returns the same recorder");
        metrics::counter!("house_test_requests_total", "route" => "/x").increment(3);
        metrics::histogram!("house_test_latency_seconds").record(0.003);
        metrics::histogram!("house_test_audio_ms").record(7.0);
        for text in [a.render(), b.render()] {
            assert_eq!(
                sample(&text, r#"house_test_requests_total{route="/x"}"#),
                Some(3.0),
                "{text}"
            );
            // `_seconds` histograms use SECONDS_BUCKETS: 3 ms falls in the 5 ms bucket, not the 2.5 ms one.
            assert_eq!(
                sample(&text, r#"house_test_latency_seconds_bucket{le="0.0025"}"#),
                Some(0.0)
            );
            assert_eq!(
                sample(&text, r#"house_test_latency_seconds_bucket{le="0.005"}"#),
                Some(1.0)
            );
            assert_eq!(sample(&text, "house_test_latency_seconds_count"), Some(1.0));
            // `_ms` histograms use MILLIS_BUCKETS (first bound 1, then 5, 10).
            assert_eq!(
                sample(&text, r#"house_test_audio_ms_bucket{le="5"}"#),
                Some(0.0)
            );
            assert_eq!(
                sample(&text, r#"house_test_audio_ms_bucket{le="10"}"#),
                Some(1.0)
            );
        }
    }

    #[test]
    fn buckets_are_strictly_increasing() {
        for buckets in [SECONDS_BUCKETS, MILLIS_BUCKETS, BYTES_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
