//! Backdated sync files are bounded by the backfill allowance (DESIGN §3 "Backfill", issue #17 item 3):
//! whatever the file names, one user's speech recorded over 24 h before it arrives is metered at most up to
//! the allowance per UTC day (then 429 `backfill_allowance_exhausted`, `Retry-After` to the next UTC
//! midnight); recordings older than the lookback are refused `recording_too_old`; recent names meet the
//! rolling windows (and so the caps) as before. The allowance is scaled down to the fixtures' speech here;
//! the default is 4 speech-hours.

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, offline_speech_ms, omi_name};
use common::refusal::{assert_refusal, header_str};

const DAY_S: u64 = 86_400;

fn retry_after_to_midnight() -> u64 {
    let now = common::now();
    (now / DAY_S + 1) * DAY_S - now
}

#[actix_web::test]
async fn backdated_speech_is_bounded_by_the_daily_allowance_and_recent_speech_meets_the_windows() {
    // The fixtures by speech, smallest first.
    let mut fx: Vec<(u64, Vec<u8>)> = fixtures()
        .into_iter()
        .map(|(_, bytes)| (offline_speech_ms(&omi_name(60), &bytes), bytes))
        .filter(|(ms, _)| *ms > 0)
        .collect();
    fx.sort_by_key(|(ms, _)| *ms);
    assert!(fx.len() >= 6, "{} fixtures with speech", fx.len());
    let (a, b) = (fx[0].0, fx[1].0);
    let allowance = a + b;
    let server = EngineServer::start(fair_use_on(), |c| c.backfill_allowance_ms = allowance).await;
    let backdater = "backdater";
    let days_ago = |d: u64| omi_name(d * DAY_S);

    // A, 8 days old: charged.
    let (code, body, _) = server
        .upload(backdater, "", &[(days_ago(8), fx[0].1.clone())])
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["metered_speech_ms"], a, "{body}");
    // A again under another old name: a duplicate, its charge refunded.
    let (code, body, _) = server
        .upload(backdater, "", &[(days_ago(9), fx[0].1.clone())])
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["files"][0]["status"], "duplicate", "{body}");
    // B, 20 days old: fits exactly because the duplicate was refunded.
    let (code, body, _) = server
        .upload(backdater, "", &[(days_ago(20), fx[1].1.clone())])
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["metered_speech_ms"], b, "{body}");

    // Everything else, named 8 to 30 days old: refused until the next UTC midnight, nothing metered.
    let mut offered = a + b;
    for (i, (ms, bytes)) in fx.iter().enumerate().skip(2) {
        let name = days_ago(8 + (i as u64 * 3) % 23);
        let (code, body, headers) = server.upload(backdater, "", &[(name, bytes.clone())]).await;
        offered += ms;
        assert_eq!(code, 429, "{body}");
        assert_eq!(body["code"], "backfill_allowance_exhausted", "{body}");
        assert_eq!(
            body["files"][0]["code"], "backfill_allowance_exhausted",
            "{body}"
        );
        let retry = assert_refusal(
            "backfill allowance",
            code,
            header_str(&headers).as_deref(),
            &body,
        )
        .unwrap_or_else(|| panic!("retryable: {body}"));
        assert!(
            retry.abs_diff(retry_after_to_midnight()) <= 2,
            "Retry-After {retry}"
        );
    }
    // Older than the 30-day lookback: refused for good.
    let (code, body, headers) = server
        .upload(backdater, "", &[(days_ago(31), fx[2].1.clone())])
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["files"][0]["code"], "recording_too_old", "{body}");
    let retry = assert_refusal("too old", code, header_str(&headers).as_deref(), &body);
    assert_eq!(retry, None, "final");

    let metered = server.status_speech_ms(backdater).await;
    assert_eq!(metered["month_ms"], allowance, "{metered}");
    eprintln!(
        "backfill: {offered} ms of speech offered under names 8-30 days old, {} ms metered (allowance {allowance} ms)",
        metered["month_ms"]
    );

    // The same audio under recent names: no allowance, every ms in the rolling windows the caps read.
    let recent = "recent";
    let mut total = 0;
    for (i, (ms, bytes)) in fx.iter().enumerate() {
        let (code, body, _) = server
            .upload(
                recent,
                "",
                &[(omi_name(600 + i as u64 * 600), bytes.clone())],
            )
            .await;
        assert_eq!(code, 200, "{body}");
        total += ms;
    }
    assert!(total > allowance);
    let windows = server.status_speech_ms(recent).await;
    assert_eq!(windows["daily_ms"], total, "{windows}");
    assert_eq!(windows["weekly_ms"], total, "{windows}");
    server.shutdown().await;
}
