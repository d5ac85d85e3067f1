//! `GET /v1/admin/stt/user/{uid}`: the seconds of a user's audio each speech-to-text provider took, per UTC
//! day, for billing reconciliation (a provider's invoice against what its users were charged). The figures
//! are the user's STT charges (`FairUse::record_stt`: the live sessions' and sync spans' audio handed to a
//! provider, pre-roll included), by the provider that took the audio; kept 100 days.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use voicegate_engine::store::fair_use::{STT_LEDGER_RETENTION_DAYS, SttLedgerRow};
use voicegate_engine::time::{MS_PER_DAY, day_string, parse_day};

use crate::admin::Admin;
use crate::engine::Engine;
use crate::error::ApiError;

/// Mounts `/v1/admin/stt/…`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/stt/user/{uid}", web::get().to(user_stt));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    /// First UTC day, `yyyy-mm-dd`; the first of `to`'s month when absent.
    from: Option<String>,
    /// Last UTC day, `yyyy-mm-dd`; today when absent.
    to: Option<String>,
}

fn day_param(name: &str, value: Option<&str>, default: u64) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => parse_day(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_date",
                format!("{name}={v:?} is not a UTC date yyyy-mm-dd (1970 or later)"),
            )
        }),
    }
}

async fn user_stt(
    _: Admin,
    path: web::Path<String>,
    query: web::Query<Range>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let today = engine.clock.now_ms() / MS_PER_DAY;
    let to = day_param("to", query.to.as_deref(), today)?;
    let month_start = parse_day(&format!("{}-01", &day_string(to)[..7])).unwrap_or(to);
    let from = day_param("from", query.from.as_deref(), month_start)?;
    if from > to {
        return Err(ApiError::bad_request(
            "invalid_range",
            format!(
                "from ({}) is after to ({})",
                day_string(from),
                day_string(to)
            ),
        ));
    }
    if to - from >= STT_LEDGER_RETENTION_DAYS {
        return Err(ApiError::bad_request(
            "invalid_range",
            format!(
                "at most {STT_LEDGER_RETENTION_DAYS} days at once (the ledger keeps {STT_LEDGER_RETENTION_DAYS})"
            ),
        ));
    }
    let rows = engine
        .fair_use
        .stt_ledger(&uid, from, to)
        .await
        .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
    Ok(HttpResponse::Ok().json(body(&uid, from, to, &rows)))
}

/// The answer: per day (only days with a charge) and over the range, ms and seconds by provider.
fn body(uid: &str, from: u64, to: u64, rows: &[SttLedgerRow]) -> Value {
    let mut days: BTreeMap<u64, BTreeMap<&str, u64>> = BTreeMap::new();
    let mut total: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        *days
            .entry(r.day)
            .or_default()
            .entry(r.provider.as_str())
            .or_default() += r.ms;
        *total.entry(r.provider.as_str()).or_default() += r.ms;
    }
    let figures = |by: &BTreeMap<&str, u64>| {
        let ms: u64 = by.values().sum();
        #[allow(clippy::cast_precision_loss)] // seconds for people; `ms` is exact
        let seconds: BTreeMap<&str, f64> =
            by.iter().map(|(p, ms)| (*p, *ms as f64 / 1000.0)).collect();
        json!({ "ms": by, "seconds": seconds, "total_ms": ms })
    };
    let days: Vec<Value> = days
        .iter()
        .map(|(day, by)| {
            let mut v = figures(by);
            v["day"] = json!(day_string(*day));
            v
        })
        .collect();
    let mut out = figures(&total);
    out["uid"] = json!(uid);
    out["from"] = json!(day_string(from));
    out["to"] = json!(day_string(to));
    out["days"] = json!(days);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_sums_each_provider_per_day_and_over_the_range() {
        let row = |day, provider: &str, ms| SttLedgerRow {
            day,
            provider: provider.into(),
            ms,
        };
        let v = body(
            "u",
            20_788,
            20_793,
            &[
                row(20_788, "deepgram", 1_500),
                row(20_788, "local", 250),
                row(20_793, "deepgram", 2_000),
            ],
        );
        assert_eq!(v["from"], "2026-12-01");
        assert_eq!(v["to"], "2026-12-06");
        assert_eq!(v["ms"], json!({"deepgram": 3_500, "local": 250}));
        assert_eq!(v["seconds"]["deepgram"], 3.5);
        assert_eq!(v["total_ms"], 3_750);
        assert_eq!(v["days"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["days"][0]["day"], "2026-12-01");
        assert_eq!(v["days"][0]["total_ms"], 1_750);
        assert_eq!(v["days"][1]["ms"], json!({"deepgram": 2_000}));
    }
}
