//! The user and admin routes on top of the engine: fair-use status, conversations (with their transcripts),
//! admin fair use and conversation erasure.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use voicegate_engine::conversation::{MAX_LIST_LIMIT, TranscriptStatus};
use voicegate_engine::fair_use::{AdminError, FairUseStatus};
use voicegate_engine::policy::{CaseRef, CreditLookup, Stage, SttAllowance};

use crate::admin::Admin;
use crate::auth::AuthedUser;
use crate::engine::Engine;
use crate::error::ApiError;

/// Mounts the sync, status, conversation and admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/sync-local-files")
            // v1 is deprecated in favour of v2, with the reference's headers (RFC 8594 / 9745).
            .wrap(
                actix_web::middleware::DefaultHeaders::new()
                    .add(("Deprecation", "true"))
                    .add(("Link", "</v2/sync-local-files>; rel=\"successor-version\"")),
            )
            .route(web::post().to(crate::sync::sync_local_files)),
    )
    .route(
        "/v2/sync-local-files",
        web::post().to(crate::sync_v2::create),
    )
    .route(
        "/v2/sync-local-files/{job_id}",
        web::get().to(crate::sync_v2::status),
    )
    .route("/v1/fair-use/status", web::get().to(status))
    .route("/v1/fair-use/violations", web::get().to(violations))
    .route("/v1/conversations", web::get().to(list_conversations))
    .route("/v1/conversations/{id}", web::get().to(get_conversation))
    .route(
        "/v1/conversations/{id}",
        web::delete().to(delete_conversation),
    )
    .route(
        "/v1/admin/conversations/user/{uid}",
        web::delete().to(admin_delete_conversations),
    )
    .route("/v1/admin/fair-use/flagged", web::get().to(admin_flagged))
    .route("/v1/admin/fair-use/user/{uid}", web::get().to(admin_user))
    .route(
        "/v1/admin/fair-use/user/{uid}/set-stage",
        web::post().to(admin_set_stage),
    )
    .route(
        "/v1/admin/fair-use/user/{uid}/reset",
        web::post().to(admin_reset),
    )
    .route(
        "/v1/admin/fair-use/case/{case_ref}",
        web::get().to(admin_case),
    );
}

/// The reference's status fields, plus exact `speech_ms`, credits and the full STT allowance.
pub fn status_body(s: &FairUseStatus) -> Value {
    let dg_budget = match &s.stt {
        SttAllowance::Unlimited => Value::Null,
        SttAllowance::Remaining {
            remaining_ms,
            daily_limit_ms,
            used_ms,
            resets_at_ms,
        } => json!({
            "daily_limit_ms": daily_limit_ms, "used_ms": used_ms, "remaining_ms": remaining_ms,
            "exhausted": false, "resets_at": resets_at_ms,
        }),
        SttAllowance::None {
            daily_limit_ms,
            used_ms,
            resets_at_ms,
            ..
        } => json!({
            "daily_limit_ms": daily_limit_ms, "used_ms": used_ms, "remaining_ms": 0,
            "exhausted": true, "resets_at": resets_at_ms,
        }),
    };
    let (credits_remaining_ms, credits_known) = match &s.credits {
        CreditLookup::Resolved(c) => (json!(c.remaining_ms()), true),
        CreditLookup::Unavailable => (Value::Null, false),
    };
    json!({
        "stage": s.stage,
        "enforced_stage": s.enforced_stage,
        "case_ref": s.case_ref,
        "message": s.message,
        "speech_hours_today": s.speech_hours.daily,
        "speech_hours_3day": s.speech_hours.three_day,
        "speech_hours_weekly": s.speech_hours.weekly,
        "limits": {
            "daily_hours": s.limits_hours.daily,
            "three_day_hours": s.limits_hours.three_day,
            "weekly_hours": s.limits_hours.weekly,
            "ceiling_daily_hours": s.ceiling_hours,
        },
        "over_ceiling": s.over_ceiling,
        "usage_pct": s.usage_pct,
        "dg_budget": dg_budget,
        "stt": s.stt,
        "speech_ms": s.speech_ms,
        "credits": s.credits,
        "credits_remaining_ms": credits_remaining_ms,
        "credits_known": credits_known,
        "locked": s.locked,
        "totals_known": s.totals_known,
        "notice": s.notice,
        "thresholds": s.thresholds,
    })
}

/// Longest wait for the store when a status read reloads the user's totals; past it (or when the store
/// fails) the status answers from this node's current view, as before.
pub const STATUS_REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn status(user: AuthedUser, engine: web::Data<Engine>) -> HttpResponse {
    // Speech metered by other nodes reaches this node's view of the user when its meter actor reloads
    // the base from the store (every VOICEGATE_METER_REFRESH_INTERVAL_S while active): reload it now, so a
    // status read is exact on whichever node it lands (no sticky routing). Concurrent reads share a load.
    let _ =
        tokio::time::timeout(STATUS_REFRESH_TIMEOUT, engine.meter.refresh_user(&user.uid)).await;
    let plan = engine.plan(&user.uid).await;
    let s = engine.fair_use.status(&user.uid, plan.as_record()).await;
    HttpResponse::Ok().json(status_body(&s))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

fn conversation_summary(c: &voicegate_engine::conversation::Conversation) -> Value {
    json!({
        "id": c.id, "started_at_ms": c.started_at_ms, "finished_at_ms": c.finished_at_ms,
        "is_locked": c.is_locked, "source": c.source, "segments": c.spans.len(),
        "recorded_ms": c.recorded_ms(), "created_at_ms": c.created_at_ms, "updated_at_ms": c.updated_at_ms,
    })
}

async fn list_conversations(
    user: AuthedUser,
    query: web::Query<ListQuery>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        ));
    }
    let page = engine
        .conversations
        .list(&user.uid, limit, query.offset.unwrap_or(0))
        .await
        .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
    // Locked ones are listed (clients show them paywalled) without their content.
    let items: Vec<Value> = page
        .conversations
        .iter()
        .map(conversation_summary)
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "conversations": items, "more": page.more })))
}

async fn get_conversation(
    user: AuthedUser,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let found = engine
        .conversations
        .get(&user.uid, &id)
        .await
        .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
    match found {
        None => Err(ApiError::not_found(
            "conversation_not_found",
            "no such conversation",
        )),
        Some(c) if c.is_locked => Err(ApiError::payment_required(
            "conversation_locked",
            "A paid plan is required to access this conversation.",
        )),
        Some(c) => {
            // The transcript is the locked content: read only once the lock is known to be open.
            let segments = engine
                .conversations
                .transcript(&user.uid, &id)
                .await
                .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
            let statuses = engine
                .conversations
                .span_statuses(&user.uid, &id)
                .await
                .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
            let mut body = conversation_summary(&c);
            body["spans"] = json!(c.spans);
            // The worst of its sync spans' statuses; null when no sync span of it was ever transcribed.
            body["transcript_status"] = json!(TranscriptStatus::worst(statuses.values().copied()));
            body["transcript_segments"] = segments
                .iter()
                .map(|s| s.app_json(c.started_at_ms))
                .collect::<Vec<Value>>()
                .into();
            Ok(HttpResponse::Ok().json(body))
        }
    }
}

/// Deletes one of the caller's conversations with its transcript (locked ones too: deleting is not
/// reading). Another user's id is indistinguishable from a missing one: 404.
async fn delete_conversation(
    user: AuthedUser,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let deleted = engine
        .conversations
        .delete(&user.uid, &id)
        .await
        .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
    if !deleted {
        return Err(ApiError::not_found(
            "conversation_not_found",
            "no such conversation",
        ));
    }
    Ok(HttpResponse::Ok().json(json!({ "id": id, "deleted": true })))
}

/// Deletes every conversation of `uid` with their transcripts (a user's erasure request).
async fn admin_delete_conversations(
    _: Admin,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let deleted = engine
        .conversations
        .delete_all(&uid)
        .await
        .map_err(|e| ApiError::unavailable(e.code(), e.to_string()))?;
    tracing::info!(message = "Admin deleted a user's conversations.", uid = %uid, deleted);
    Ok(HttpResponse::Ok().json(json!({ "uid": uid, "deleted_conversations": deleted })))
}

fn admin_error(e: AdminError) -> ApiError {
    match e {
        AdminError::InvalidStage(e) => {
            ApiError::bad_request(voicegate_engine::policy::InvalidStage::CODE, e.to_string())
        }
        other => ApiError::unavailable(other.code(), other.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct FlaggedQuery {
    stage: Option<String>,
    limit: Option<usize>,
}

async fn admin_flagged(
    _: Admin,
    query: web::Query<FlaggedQuery>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let stage = match query.stage.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<Stage>().map_err(|e| admin_error(e.into()))?),
    };
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > 200 {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 200",
        ));
    }
    let users = engine
        .fair_use
        .flagged(stage, limit)
        .await
        .map_err(admin_error)?;
    let users: Vec<Value> = users
        .into_iter()
        .map(|(uid, stage)| json!({ "uid": uid, "stage": stage }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "users": users, "count": users.len() })))
}

/// `GET /v1/fair-use/violations`: the user's own stage, when it ends, and the violations behind it.
async fn violations(user: AuthedUser, engine: web::Data<Engine>) -> Result<HttpResponse, ApiError> {
    let v = engine
        .fair_use
        .violations(&user.uid)
        .await
        .map_err(admin_error)?;
    Ok(HttpResponse::Ok().json(v))
}

async fn admin_user(
    _: Admin,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let d = engine
        .fair_use
        .user_detail(&uid)
        .await
        .map_err(admin_error)?;
    let current = d.totals.map(|t| {
        json!({
            "daily_ms": t.rolling.daily_ms, "three_day_ms": t.rolling.three_day_ms,
            "weekly_ms": t.rolling.weekly_ms,
        })
    });
    Ok(HttpResponse::Ok().json(json!({
        "uid": uid,
        "state": d.state,
        "events": d.events,
        "sessions": d.sessions,
        "current_speech_ms": current,
        "totals_known": d.totals.is_some_and(|t| t.known),
    })))
}

#[derive(Debug, Deserialize)]
struct SetStageQuery {
    stage: Option<String>,
}

async fn admin_set_stage(
    _: Admin,
    path: web::Path<String>,
    query: web::Query<SetStageQuery>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let Some(stage) = query.stage.as_deref() else {
        return Err(ApiError::bad_request(
            "invalid_stage",
            "the stage query parameter is required (none, warning, throttle, restrict)",
        ));
    };
    let applied = engine
        .fair_use
        .set_stage(&uid, stage, "admin")
        .await
        .map_err(admin_error)?;
    Ok(HttpResponse::Ok()
        .json(json!({ "uid": uid, "state": applied.state, "events": applied.events })))
}

async fn admin_reset(
    _: Admin,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let uid = path.into_inner();
    let applied = engine
        .fair_use
        .reset(&uid, "admin")
        .await
        .map_err(admin_error)?;
    Ok(HttpResponse::Ok()
        .json(json!({ "uid": uid, "state": applied.state, "events": applied.events })))
}

async fn admin_case(
    _: Admin,
    path: web::Path<String>,
    engine: web::Data<Engine>,
) -> Result<HttpResponse, ApiError> {
    let raw = path.into_inner();
    let case_ref =
        CaseRef::parse(&raw).map_err(|_| ApiError::not_found("case_not_found", "no such case"))?;
    match engine.fair_use.case(&case_ref).await.map_err(admin_error)? {
        None => Err(ApiError::not_found("case_not_found", "no such case")),
        Some((uid, event)) => Ok(HttpResponse::Ok().json(json!({ "uid": uid, "event": event }))),
    }
}
