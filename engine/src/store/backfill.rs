//! The backfill allowance ledger: backfill speech charged per user per UTC day (the policy is
//! [`crate::policy::backfill`]), shared by every node and by sync v1 and v2.
//!
//! Redis key: `vg:{uid}:backfill:<utc day>` STRING, ms charged that day; kept 2 days. A charge is atomic:
//! it is made only when it fits the allowance, so concurrent uploads on several nodes never overshoot.
//! A charge whose speech turned out not to be metered (a duplicate, a metering failure) is refunded.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::store::connection::RedisConnection;
use futures_util::future::BoxFuture;

/// How long a day's counter is kept (the day itself and one more, for clock skew between nodes).
const DAY_TTL_MS: u64 = 2 * 86_400_000;

#[derive(Debug, thiserror::Error)]
#[error("backfill ledger unavailable: {0}")]
pub struct BackfillLedgerError(pub String);

/// What a charge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Charged; `used_ms` is the day's total now.
    Granted { used_ms: u64 },
    /// Not charged: it does not fit; `used_ms` is the day's total.
    Exhausted { used_ms: u64 },
}

/// Backfill speech charged per user and UTC day.
pub trait BackfillLedger: Send + Sync + 'static {
    /// Charges `ms` to `uid`'s `day` if the day's total stays within `allowance_ms`.
    fn charge<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
        allowance_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, BackfillLedgerError>>;
    /// Gives back `ms` charged to `uid`'s `day` (never below 0).
    fn refund<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
    ) -> BoxFuture<'a, Result<(), BackfillLedgerError>>;
}

pub fn backfill_key(uid: &str, day: u64) -> String {
    format!("vg:{{{uid}}}:backfill:{day}")
}

/// The ledger in process memory (single node; days are never pruned: a test and dev double).
#[derive(Default)]
pub struct MemoryBackfillLedger {
    used: Mutex<HashMap<(String, u64), u64>>,
}

impl BackfillLedger for MemoryBackfillLedger {
    fn charge<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
        allowance_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, BackfillLedgerError>> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = used.entry((uid.to_owned(), day)).or_insert(0);
        let charge = if entry.saturating_add(ms) <= allowance_ms {
            *entry += ms;
            Charge::Granted { used_ms: *entry }
        } else {
            Charge::Exhausted { used_ms: *entry }
        };
        Box::pin(async move { Ok(charge) })
    }

    fn refund<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
    ) -> BoxFuture<'a, Result<(), BackfillLedgerError>> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = used.get_mut(&(uid.to_owned(), day)) {
            *v = v.saturating_sub(ms);
        }
        Box::pin(async { Ok(()) })
    }
}

/// KEYS: the day's counter. ARGV: ms, allowance, ttl ms. Returns {granted 0/1, used}.
const CHARGE_LUA: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local ms = tonumber(ARGV[1])
if used + ms > tonumber(ARGV[2]) then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], ms)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}
";

/// KEYS: the day's counter. ARGV: ms. Never below 0.
const REFUND_LUA: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local left = used - tonumber(ARGV[1])
if left < 0 then left = 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], left, 'KEEPTTL')
end
return left
";

/// The ledger in Redis.
#[derive(Clone)]
pub struct RedisBackfillLedger {
    conn: RedisConnection,
    charge: redis::Script,
    refund: redis::Script,
}

impl RedisBackfillLedger {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisBackfillLedger {
            conn: conn.into(),
            charge: redis::Script::new(CHARGE_LUA),
            refund: redis::Script::new(REFUND_LUA),
        }
    }
}

fn err(e: impl std::fmt::Display) -> BackfillLedgerError {
    BackfillLedgerError(e.to_string())
}

impl BackfillLedger for RedisBackfillLedger {
    fn charge<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
        allowance_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, BackfillLedgerError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let (granted, used): (i64, i64) = self
                .charge
                .key(backfill_key(uid, day))
                .arg(ms)
                .arg(allowance_ms)
                .arg(DAY_TTL_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            let used_ms = u64::try_from(used).unwrap_or(0);
            Ok(if granted == 1 {
                Charge::Granted { used_ms }
            } else {
                Charge::Exhausted { used_ms }
            })
        })
    }

    fn refund<'a>(
        &'a self,
        uid: &'a str,
        day: u64,
        ms: u64,
    ) -> BoxFuture<'a, Result<(), BackfillLedgerError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let _: i64 = self
                .refund
                .key(backfill_key(uid, day))
                .arg(ms)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn the_memory_ledger_charges_within_the_allowance_and_refunds() {
        let l = MemoryBackfillLedger::default();
        assert_eq!(
            l.charge("u", 1, 60, 100).await.ok(),
            Some(Charge::Granted { used_ms: 60 })
        );
        assert_eq!(
            l.charge("u", 1, 50, 100).await.ok(),
            Some(Charge::Exhausted { used_ms: 60 })
        );
        assert_eq!(
            l.charge("u", 2, 50, 100).await.ok(),
            Some(Charge::Granted { used_ms: 50 }),
            "another day"
        );
        assert!(l.refund("u", 1, 60).await.is_ok());
        assert_eq!(
            l.charge("u", 1, 100, 100).await.ok(),
            Some(Charge::Granted { used_ms: 100 })
        );
    }
}
