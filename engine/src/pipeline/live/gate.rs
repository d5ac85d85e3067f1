//! The STT gate of a live session: what the user's STT allowance lets through, as last resolved.

use crate::policy::{SttAllowance, SttDenied};

/// The daily STT budget as last resolved, and what this session forwarded since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    pub daily_limit_ms: u64,
    pub used_at_check_ms: u64,
    pub remaining_at_check_ms: u64,
    pub resets_at_ms: u64,
    pub forwarded_since_check_ms: u64,
}

impl Budget {
    pub fn remaining(&self) -> u64 {
        self.remaining_at_check_ms
            .saturating_sub(self.forwarded_since_check_ms)
    }
}

/// The STT gate: unlimited, a budget, closed (with the reason told to the client), or not known yet (the session's first status read is in
/// flight: speech that ends meanwhile waits, deferred).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    Pending,
    Unlimited,
    Budget(Budget),
    Closed(SttDenied),
}

impl Gate {
    /// The gate a status read's allowance sets; `pending_ms` is what the session forwarded but has not yet
    /// recorded (not in the store's `used_ms`).
    pub fn resolve(stt: SttAllowance, pending_ms: u64) -> Gate {
        let pending = pending_ms;
        match stt {
            SttAllowance::Unlimited => Gate::Unlimited,
            SttAllowance::Remaining {
                remaining_ms,
                daily_limit_ms,
                used_ms,
                resets_at_ms,
            } => Gate::Budget(Budget {
                daily_limit_ms,
                used_at_check_ms: used_ms,
                remaining_at_check_ms: remaining_ms,
                resets_at_ms,
                forwarded_since_check_ms: pending,
            }),
            SttAllowance::None {
                reason: SttDenied::BudgetExhausted,
                daily_limit_ms,
                used_ms,
                resets_at_ms,
            } => Gate::Budget(Budget {
                daily_limit_ms: daily_limit_ms.unwrap_or(0),
                used_at_check_ms: used_ms,
                remaining_at_check_ms: 0,
                resets_at_ms: resets_at_ms.unwrap_or(0),
                forwarded_since_check_ms: pending,
            }),
            // An unknown entitlement fails closed for paid STT; over the hard ceiling STT closes until the
            // rolling 24 h falls back (metering goes on).
            SttAllowance::None {
                reason:
                    reason @ (SttDenied::EntitlementUnknown
                    | SttDenied::SpeechCeiling
                    | SttDenied::SpendCeiling),
                ..
            } => Gate::Closed(reason),
        }
    }

    /// How much of a run of `speech_ms` may be forwarded now (`None` while the gate is pending).
    pub fn allows(&self, speech_ms: u64) -> Option<u64> {
        match self {
            Gate::Pending => None,
            Gate::Unlimited => Some(speech_ms),
            Gate::Budget(b) => Some(b.remaining().min(speech_ms)),
            Gate::Closed(_) => Some(0),
        }
    }
}
