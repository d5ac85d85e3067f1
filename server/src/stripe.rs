//! `POST /v1/stripe/webhook`: signature verification, event parsing, and the [`Payments`] sink that applies them.
//!
//! - [`verify_signature`] is pure: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=…]`, HMAC-SHA256 over
//!   `"{t}.{raw body}"`, constant-time compare, timestamp within the tolerance either way.
//! - [`parse_event`] turns the handled events into a typed [`PaymentEvent`]; anything else is `None`
//!   (answered 200, nothing changes), so Stripe stops retrying events we do not care about.
//! - A bad signature answers 400 and touches nothing; a sink failure answers 500 so Stripe retries.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use voicegate_engine::policy::plan::FREE_PLAN;
use voicegate_engine::telemetry::STRIPE_WEBHOOKS_TOTAL;

use crate::error::ApiError;

/// Why a `Stripe-Signature` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("Stripe-Signature header has no timestamp or no v1 signature")]
    Malformed,
    #[error("Stripe-Signature timestamp is outside the tolerance")]
    OutsideTolerance,
    #[error("Stripe-Signature does not match the payload")]
    Mismatch,
}

impl From<SignatureError> for ApiError {
    /// 400: the Stripe webhook signature did not verify; nothing was changed.
    fn from(e: SignatureError) -> Self {
        ApiError::bad_request(e.code(), e.to_string())
    }
}

impl SignatureError {
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "stripe_signature_missing",
            SignatureError::Malformed => "stripe_signature_malformed",
            SignatureError::OutsideTolerance => "stripe_signature_expired",
            SignatureError::Mismatch => "stripe_signature_mismatch",
        }
    }
}

/// Verifies a Stripe webhook signature header against the raw payload.
///
/// Accepts when any `v1` entry matches (Stripe sends several while a secret is being rolled) and
/// `|now − t| ≤ tolerance_secs`.
pub fn verify_signature(
    header: &str,
    payload: &[u8],
    secret: &[u8],
    now_unix: u64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let mut timestamp: Option<&str> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = Some(t),
            // A v1 entry that is not hex cannot match; skipping it keeps the other entries usable.
            Some(("v1", sig)) => signatures.extend(hex::decode(sig).ok()),
            _ => {}
        }
    }
    let t_str = timestamp.ok_or(SignatureError::Malformed)?;
    let t: u64 = t_str.parse().map_err(|_| SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_unix.abs_diff(t) > tolerance_secs {
        return Err(SignatureError::OutsideTolerance);
    }
    let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    let mut mac = mac;
    mac.update(t_str.as_bytes());
    mac.update(b".");
    mac.update(payload);
    // `verify_slice` compares in constant time; each candidate gets a fresh clone of the keyed state.
    if signatures
        .iter()
        .any(|sig| mac.clone().verify_slice(sig).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Signs a payload the way Stripe does (for tests and local tools): returns the header value.
pub fn sign_payload(payload: &[u8], secret: &[u8], timestamp: u64) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC accepts keys of any length, so this branch is unreachable.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Which handled Stripe event produced a [`PaymentEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentEventKind {
    CheckoutCompleted,
    /// `active` or `trialing`: the subscription's plan.
    SubscriptionActive,
    /// Deleted, or `past_due`, `unpaid`, `canceled`, `incomplete_expired`, `paused`: back to the free plan.
    SubscriptionEnded,
}

/// A handled, verified payment: the user `uid` now has `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent {
    /// Stripe's event id (`evt_…`): apply idempotently, Stripe redelivers.
    pub event_id: String,
    pub kind: PaymentEventKind,
    pub uid: String,
    pub plan: String,
    /// The event's `created` (unix seconds) in ms: plan changes apply in this order (0 when absent).
    pub created_ms: u64,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(default)]
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    created: u64,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: Value,
}

/// Why a verified payload was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Not JSON, or not shaped like a Stripe event.
    Unparsable,
    /// An event type this server does not handle.
    UnhandledType(String),
    /// A subscription event whose status neither grants nor ends the plan (`incomplete`: its first payment
    /// is pending).
    NotActive,
    /// A handled event without `metadata.uid` or `metadata.plan`.
    MissingMetadata,
    /// A `metadata.uid` outside the uid rule of tokens (1–128 of `[A-Za-z0-9_.:@-]`): nothing is written.
    InvalidUid,
}

impl Ignored {
    /// The stable word in the answer's `ignored` field.
    pub fn code(&self) -> &'static str {
        match self {
            Ignored::Unparsable => "unparsable",
            Ignored::UnhandledType(_) => "unhandled_type",
            Ignored::NotActive => "not_active",
            Ignored::MissingMetadata => "missing_metadata",
            Ignored::InvalidUid => "uid_invalid",
        }
    }
}

/// Parses a verified webhook payload into the event this server acts on.
pub fn parse_event(payload: &[u8]) -> Result<PaymentEvent, Ignored> {
    let raw: RawEvent = serde_json::from_slice(payload).map_err(|_| Ignored::Unparsable)?;
    let kind = match raw.kind.as_str() {
        "checkout.session.completed" => PaymentEventKind::CheckoutCompleted,
        "customer.subscription.created" | "customer.subscription.updated" => {
            match raw.data.object.get("status").and_then(Value::as_str) {
                Some("active" | "trialing") => PaymentEventKind::SubscriptionActive,
                Some("past_due" | "unpaid" | "canceled" | "incomplete_expired" | "paused") => {
                    PaymentEventKind::SubscriptionEnded
                }
                _ => return Err(Ignored::NotActive),
            }
        }
        "customer.subscription.deleted" => PaymentEventKind::SubscriptionEnded,
        other => return Err(Ignored::UnhandledType(other.to_owned())),
    };
    let meta = |key: &str| {
        raw.data
            .object
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    // An ended subscription moves the user to the free plan whatever its metadata's plan says.
    let plan = match kind {
        PaymentEventKind::SubscriptionEnded => Some(FREE_PLAN),
        _ => meta("plan"),
    };
    match (meta("uid"), plan) {
        (Some(uid), Some(_)) if !crate::auth::uid_is_valid(uid) => Err(Ignored::InvalidUid),
        (Some(uid), Some(plan)) => Ok(PaymentEvent {
            event_id: raw.id,
            kind,
            uid: uid.to_owned(),
            plan: plan.to_owned(),
            created_ms: raw.created.saturating_mul(1000),
        }),
        _ => Err(Ignored::MissingMetadata),
    }
}

/// The effect of a payment failed; Stripe should retry.
#[derive(Debug, thiserror::Error)]
#[error("payment could not be applied: {0}")]
pub struct PaymentsError(pub String);

/// What applying a verified payment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// First delivery of this event: the plan is stored.
    Applied,
    /// The event was applied before (Stripe redelivers): nothing new was stored.
    Duplicate,
    /// A newer plan change is on record (Stripe delivers out of order): nothing was stored.
    Stale,
}

/// Where verified payments go: store the plan, unlock the user's conversations, clear credit-caused
/// enforcement. Implemented by the engine; must be idempotent on `event_id`.
pub trait Payments: Send + Sync + 'static {
    fn apply(&self, event: PaymentEvent) -> BoxFuture<'_, Result<PaymentOutcome, PaymentsError>>;
}

/// A sink that only logs: the default until the engine is wired.
#[derive(Debug, Default)]
pub struct LogOnlyPayments;

impl Payments for LogOnlyPayments {
    fn apply(&self, event: PaymentEvent) -> BoxFuture<'_, Result<PaymentOutcome, PaymentsError>> {
        tracing::warn!(message = "Payment received but no payments sink is wired.", event_id = %event.event_id);
        Box::pin(async { Ok(PaymentOutcome::Applied) })
    }
}

/// Webhook settings shared by workers.
pub struct StripeWebhook {
    /// `None`: the webhook is not configured and answers 503.
    pub secret: Option<Vec<u8>>,
    pub tolerance_secs: u64,
    pub payments: Arc<dyn Payments>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The route handler. Not authenticated by bearer token: the signature is the authentication.
pub async fn webhook(
    req: HttpRequest,
    body: web::Bytes,
    hook: web::Data<StripeWebhook>,
) -> Result<HttpResponse, ApiError> {
    let count = |outcome: &'static str| {
        metrics::counter!(STRIPE_WEBHOOKS_TOTAL, "outcome" => outcome).increment(1)
    };
    let Some(secret) = hook.secret.as_deref() else {
        // A retry cannot help until an operator configures the secret.
        return Err(ApiError::unavailable(
            "stripe_not_configured",
            "STRIPE_WEBHOOK_SECRET is not configured",
        )
        .not_retryable());
    };
    let header = req
        .headers()
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok());
    let verified = header
        .ok_or(SignatureError::Missing)
        .and_then(|h| verify_signature(h, &body, secret, unix_now(), hook.tolerance_secs));
    if let Err(e) = verified {
        count("bad_signature");
        tracing::warn!(message = "Stripe webhook refused.", reason = e.code());
        return Err(ApiError::from(e));
    }
    match parse_event(&body) {
        Ok(event) => {
            let event_id = event.event_id.clone();
            let outcome = hook.payments.apply(event).await.map_err(|e| {
                count("failed");
                // Stripe retries on its own schedule; other callers may retry after a minute.
                ApiError::internal("payment_apply_failed", e).retry_after(60)
            })?;
            if outcome == PaymentOutcome::Duplicate {
                count("duplicate");
                tracing::info!(message = "Payment already applied (redelivery).", %event_id);
                return Ok(HttpResponse::Ok().json(
                    serde_json::json!({"received": true, "applied": false, "duplicate": true}),
                ));
            }
            if outcome == PaymentOutcome::Stale {
                count("stale");
                tracing::info!(message = "Plan change older than the record; not applied.", %event_id);
                return Ok(HttpResponse::Ok()
                    .json(serde_json::json!({"received": true, "applied": false, "stale": true})));
            }
            count("applied");
            tracing::info!(message = "Payment applied.", %event_id);
            Ok(HttpResponse::Ok().json(serde_json::json!({"received": true, "applied": true})))
        }
        // A verified event that changes nothing answers 200 (Stripe would redeliver anything else for days),
        // saying why.
        Err(reason) => {
            count("ignored");
            tracing::info!(message = "Stripe event ignored.", ?reason);
            Ok(HttpResponse::Ok().json(
                serde_json::json!({"received": true, "applied": false, "ignored": reason.code()}),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_signature_made_with_the_secret_verifies() {
        let header = sign_payload(b"{}", SECRET, NOW);
        assert_eq!(verify_signature(&header, b"{}", SECRET, NOW, 300), Ok(()));
    }

    #[test]
    fn a_tampered_payload_is_a_mismatch() {
        let header = sign_payload(b"{\"a\":1}", SECRET, NOW);
        assert_eq!(
            verify_signature(&header, b"{\"a\":2}", SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn another_secret_is_a_mismatch() {
        let header = sign_payload(b"{}", b"whsec_other", NOW);
        assert_eq!(
            verify_signature(&header, b"{}", SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused_both_ways() {
        let old = sign_payload(b"{}", SECRET, NOW - 301);
        let future = sign_payload(b"{}", SECRET, NOW + 301);
        let edge = sign_payload(b"{}", SECRET, NOW - 300);
        assert_eq!(
            verify_signature(&old, b"{}", SECRET, NOW, 300),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            verify_signature(&future, b"{}", SECRET, NOW, 300),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(verify_signature(&edge, b"{}", SECRET, NOW, 300), Ok(()));
    }

    #[test]
    fn any_matching_v1_entry_is_enough_during_secret_rotation() {
        let good = sign_payload(b"{}", SECRET, NOW);
        let sig = good.split(",v1=").nth(1).unwrap_or_default();
        let header = format!(
            "t={NOW},v1={},v1=zz-not-hex,v0=abc,v1={sig}",
            "00".repeat(32)
        );
        assert_eq!(verify_signature(&header, b"{}", SECRET, NOW, 300), Ok(()));
    }

    #[test]
    fn headers_without_timestamp_or_v1_are_malformed() {
        for header in ["", "v1=00", "t=123", "t=abc,v1=00", "t=123,v0=00"] {
            assert_eq!(
                verify_signature(header, b"{}", SECRET, NOW, u64::MAX),
                Err(SignatureError::Malformed),
                "{header}"
            );
        }
    }

    fn event(kind: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(
            &serde_json::json!({"id": "evt_1", "type": kind, "data": {"object": object}}),
        )
        .unwrap_or_default()
    }

    #[test]
    fn checkout_completed_yields_uid_and_plan() {
        let payload = event(
            "checkout.session.completed",
            serde_json::json!({"metadata": {"uid": "u1", "plan": "unlimited"}}),
        );
        assert_eq!(
            parse_event(&payload),
            Ok(PaymentEvent {
                event_id: "evt_1".into(),
                kind: PaymentEventKind::CheckoutCompleted,
                uid: "u1".into(),
                plan: "unlimited".into(),
                created_ms: 0,
            })
        );
    }

    #[test]
    fn subscription_events_apply_only_when_active() {
        for kind in [
            "customer.subscription.created",
            "customer.subscription.updated",
        ] {
            let active = event(
                kind,
                serde_json::json!({"status": "active", "metadata": {"uid": "u1", "plan": "pro"}}),
            );
            assert_eq!(
                parse_event(&active).map(|e| e.kind),
                Ok(PaymentEventKind::SubscriptionActive)
            );
            let trialing = event(
                kind,
                serde_json::json!({"status": "trialing", "metadata": {"uid": "u1", "plan": "pro"}}),
            );
            assert_eq!(
                parse_event(&trialing).map(|e| e.kind),
                Ok(PaymentEventKind::SubscriptionActive)
            );
            for status in [
                "past_due",
                "unpaid",
                "canceled",
                "incomplete_expired",
                "paused",
            ] {
                let ended = event(
                    kind,
                    serde_json::json!({"status": status, "metadata": {"uid": "u1", "plan": "pro"}}),
                );
                let e = parse_event(&ended).unwrap_or_else(|e| panic!("{status}: {e:?}"));
                assert_eq!(
                    (e.kind, e.plan.as_str()),
                    (PaymentEventKind::SubscriptionEnded, FREE_PLAN)
                );
            }
            let incomplete = event(
                kind,
                serde_json::json!({"status": "incomplete", "metadata": {"uid": "u1", "plan": "pro"}}),
            );
            assert_eq!(parse_event(&incomplete), Err(Ignored::NotActive));
        }
    }

    #[test]
    fn a_deleted_subscription_moves_the_user_to_the_free_plan_in_the_events_order() {
        let deleted = serde_json::to_vec(&serde_json::json!({"id": "evt_9", "type": "customer.subscription.deleted",
            "created": 1_800_000_000u64, "data": {"object": {"status": "canceled", "metadata": {"uid": "u1"}}}}))
        .unwrap_or_default();
        let e = parse_event(&deleted).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(e.plan, FREE_PLAN);
        assert_eq!(e.kind, PaymentEventKind::SubscriptionEnded);
        assert_eq!(e.created_ms, 1_800_000_000_000);
    }

    #[test]
    fn other_events_and_missing_metadata_are_ignored() {
        let refund = event("charge.refunded", serde_json::json!({"status": "active"}));
        assert_eq!(
            parse_event(&refund),
            Err(Ignored::UnhandledType("charge.refunded".into()))
        );
        let deleted = event(
            "customer.subscription.deleted",
            serde_json::json!({"status": "canceled"}),
        );
        assert_eq!(parse_event(&deleted), Err(Ignored::MissingMetadata));
        let no_uid = event(
            "checkout.session.completed",
            serde_json::json!({"metadata": {"plan": "pro"}}),
        );
        assert_eq!(parse_event(&no_uid), Err(Ignored::MissingMetadata));
        assert_eq!(parse_event(b"not json"), Err(Ignored::Unparsable));
    }
}
