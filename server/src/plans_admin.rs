//! Admin plan routes: set one user's plan, read it, and import many (JSON lines) to migrate an existing user
//! base. Every change goes through [`Engine::set_plan`], as a verified payment does: in the order the changes
//! happened, idempotent, a paid plan unlocking the user's conversations.

use actix_web::{HttpResponse, web};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use voicegate_engine::store::plans::PlanSet;

use crate::admin::Admin;
use crate::engine::Engine;
use crate::error::ApiError;

/// The largest import body: 16 MiB, about 250,000 lines.
pub const IMPORT_MAX_BYTES: usize = 16 << 20;
/// Plan changes of one import in flight at once.
const IMPORT_CONCURRENCY: usize = 16;
/// Refused or failed lines listed in the answer (all are counted).
const LISTED_PROBLEMS: usize = 100;

/// Mounts `/v1/admin/plans/…`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/plans/user/{uid}", web::put().to(set_plan))
        .route("/v1/admin/plans/user/{uid}", web::get().to(get_plan))
        .service(
            web::resource("/v1/admin/plans/import")
                .app_data(web::PayloadConfig::new(IMPORT_MAX_BYTES))
                .route(web::post().to(import)),
        );
}

/// `PUT /v1/admin/plans/user/{uid}`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPlan {
    plan: String,
    /// When the change happened (epoch ms); now when absent. An older change than the record's is stale.
    at_ms: Option<u64>,
}

/// One import line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    uid: String,
    plan: String,
    at_ms: Option<u64>,
}

/// A plan id: 1–64 characters of `[A-Za-z0-9_.-]`.
fn plan_is_valid(plan: &str) -> bool {
    (1..=64).contains(&plan.len())
        && plan
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check(uid: &str, plan: &str) -> Result<(), (&'static str, &'static str)> {
    if !crate::auth::uid_is_valid(uid) {
        return Err((
            "uid_invalid",
            "uid must be 1-128 characters of [A-Za-z0-9_.:@-]",
        ));
    }
    if !plan_is_valid(plan) {
        return Err((
            "invalid_plan",
            "plan must be 1-64 characters of [A-Za-z0-9_.-]",
        ));
    }
    Ok(())
}

fn outcome_word(o: PlanSet) -> &'static str {
    match o {
        PlanSet::Stored => "stored",
        PlanSet::Duplicate => "duplicate",
        PlanSet::Stale => "stale",
    }
}

async fn set_plan(
    _: Admin,
    path: web::Path<String>,
    body: web::Json<SetPlan>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let SetPlan { plan, at_ms } = body.into_inner();
    check(&uid, &plan).map_err(|(code, msg)| ApiError::bad_request(code, msg))?;
    let now = engine.clock.now_ms();
    let event_id = format!("admin:{now}:{:016x}", rand::random::<u64>());
    let change = engine
        .set_plan(&uid, &plan, &event_id, at_ms.unwrap_or(now), "admin")
        .await
        .map_err(|e| ApiError::unavailable("plan_store_unavailable", e))?;
    Ok(HttpResponse::Ok().json(json!({
        "uid": uid,
        "plan": plan,
        "outcome": outcome_word(change.outcome),
        "paid": change.paid,
        "unlocked": change.unlocked,
        "stage_cleared": change.stage_cleared,
    })))
}

async fn get_plan(
    _: Admin,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let record = engine
        .plans
        .get(&uid)
        .await
        .map_err(|e| ApiError::unavailable("plan_store_unavailable", e.to_string()))?;
    let plan = engine.fair_use.config().plans.plan(record.as_deref());
    Ok(HttpResponse::Ok().json(json!({
        "uid": uid,
        "record": record,
        "plan": plan.id,
        "paid": plan.paid,
        "monthly_minutes": plan.monthly_minutes,
    })))
}

/// `POST /v1/admin/plans/import`: one JSON object per line, `{"uid": "…", "plan": "…", "at_ms": …}`
/// (`at_ms` optional). Blank lines are skipped; a line that does not parse or breaks the uid or plan rule is
/// refused and listed; the others are applied. A line's change id is its content's hash, so importing the
/// same file again changes nothing (`duplicate`), and a run cut short can simply be repeated.
async fn import(
    _: Admin,
    body: web::Bytes,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::bad_request("invalid_import", "the import must be UTF-8 JSON lines")
    })?;
    let now = engine.clock.now_ms();
    let mut problems = Vec::new();
    let (mut refused, mut lines) = (0usize, 0usize);
    let mut valid = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let parsed = serde_json::from_str::<ImportLine>(line)
            .map_err(|e| ("invalid_line", e.to_string()))
            .and_then(|l| {
                check(&l.uid, &l.plan)
                    .map(|()| l)
                    .map_err(|(c, m)| (c, m.to_owned()))
            });
        match parsed {
            Ok(l) => {
                let id = hex::encode(Sha256::digest(line.as_bytes()));
                valid.push((i + 1, l, format!("import:{}", &id[..32])));
            }
            Err((code, message)) => {
                refused += 1;
                if problems.len() < LISTED_PROBLEMS {
                    problems.push(json!({"line": i + 1, "code": code, "message": message}));
                }
            }
        }
    }
    let engine = engine.into_inner();
    let results: Vec<_> = futures_util::stream::iter(valid)
        .map(|(n, l, id)| {
            let engine = std::sync::Arc::clone(&engine);
            async move {
                let r = engine
                    .set_plan(&l.uid, &l.plan, &id, l.at_ms.unwrap_or(now), "import")
                    .await;
                (n, r)
            }
        })
        .buffer_unordered(IMPORT_CONCURRENCY)
        .collect()
        .await;
    let (mut stored, mut duplicate, mut stale, mut failed, mut unlocked) = (0, 0, 0, 0, 0u64);
    for (n, r) in results {
        match r {
            Ok(c) => {
                unlocked += c.unlocked;
                match c.outcome {
                    PlanSet::Stored => stored += 1,
                    PlanSet::Duplicate => duplicate += 1,
                    PlanSet::Stale => stale += 1,
                }
            }
            Err(e) => {
                failed += 1;
                if problems.len() < LISTED_PROBLEMS {
                    problems
                        .push(json!({"line": n, "code": "plan_store_unavailable", "message": e}));
                }
            }
        }
    }
    tracing::info!(
        message = "Plans imported.",
        lines,
        stored,
        duplicate,
        stale,
        refused,
        failed,
        unlocked
    );
    Ok(HttpResponse::Ok().json(json!({
        "lines": lines,
        "stored": stored,
        "duplicate": duplicate,
        "stale": stale,
        "refused": refused,
        "failed": failed,
        "unlocked": unlocked,
        "problems": problems,
    })))
}
