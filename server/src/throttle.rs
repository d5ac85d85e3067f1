//! The throttle of failed authentication per client address (bearer tokens; admin keys apart).
//!
//! Each address has a bucket of `VOICEGATE_AUTH_FAILURES_PER_MINUTE` failures, refilled at that many a
//! minute. A failure takes one; while an address has none left, its requests are answered 429
//! `too_many_auth_failures` with `Retry-After` (the time until one failure is allowed again) **before**
//! the credential is checked, so guessing stops (a right key is refused too until then). Successes take
//! nothing.
//!
//! - The client address is the peer's, or, when the peer is one of `VOICEGATE_TRUSTED_PROXIES`, the
//!   rightmost `X-Forwarded-For` entry that is not a trusted proxy (entries further left are the client's
//!   own claims). IPv6 addresses are counted by their /64 (one host's usual allocation).
//! - Memory is bounded: at most `VOICEGATE_AUTH_THROTTLE_MAX_ADDRESSES` addresses are tracked (sharded,
//!   a lock per shard, taken once per authentication). A full shard first forgets addresses whose bucket
//!   refilled; an address that still finds no room is not tracked (counted in
//!   `voicegate_auth_throttle_untracked_total`): under a flood of more addresses than that, the throttle
//!   fails open rather than refusing everyone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

pub use crate::client_addr::TrustedProxies;
use crate::client_addr::canonical;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_http::RequestHead;
use voicegate_engine::telemetry as t;

use crate::config::ServeConfig;
use crate::error::ApiError;

const SHARDS: usize = 16;
/// A full shard looks for refilled buckets to forget at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// What the throttle counts an address as: IPv4 whole, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        v4 => v4,
    }
}

/// The throttle's settings.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    pub failures_per_minute: u32,
    pub max_addresses: usize,
    pub trusted: TrustedProxies,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            failures_per_minute: crate::config::defaults::AUTH_FAILURES_PER_MINUTE,
            max_addresses: crate::config::defaults::AUTH_THROTTLE_MAX_ADDRESSES,
            trusted: TrustedProxies::default(),
        }
    }
}

impl ThrottleConfig {
    /// From the serve settings (validated: a bad `VOICEGATE_TRUSTED_PROXIES` never gets here).
    pub fn from_config(cfg: &ServeConfig) -> Self {
        ThrottleConfig {
            failures_per_minute: cfg.auth_failures_per_minute.max(1),
            max_addresses: cfg.auth_throttle_max_addresses.max(1),
            trusted: TrustedProxies::parse(&cfg.trusted_proxies).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    pruned_at: Option<Instant>,
}

/// One throttle (the bearer-token check has one, the admin key another). `kind` labels its metrics.
pub struct AuthThrottle {
    cfg: ThrottleConfig,
    kind: &'static str,
    shards: Vec<Mutex<Shard>>,
}

impl std::fmt::Debug for AuthThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthThrottle")
            .field("kind", &self.kind)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl AuthThrottle {
    pub fn new(cfg: ThrottleConfig, kind: &'static str) -> Self {
        AuthThrottle {
            cfg,
            kind,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// The client address of a request (see [`TrustedProxies::client`]).
    pub fn client(&self, head: &RequestHead) -> Option<IpAddr> {
        let forwarded: Vec<&str> = if self.cfg.trusted.is_empty() {
            Vec::new()
        } else {
            head.headers
                .get_all("x-forwarded-for")
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        self.cfg
            .trusted
            .client(head.peer_addr.map(|a| a.ip()), &forwarded)
    }

    /// Refuses a client out of failures (429 with the wait), before its credential is checked.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<(), ApiError> {
        self.admit_at(client, Instant::now())
    }

    /// Counts one failed authentication of `client`.
    pub fn failed(&self, client: Option<IpAddr>) {
        self.failed_at(client, Instant::now());
    }

    fn capacity(&self) -> f64 {
        f64::from(self.cfg.failures_per_minute)
    }

    fn per_sec(&self) -> f64 {
        self.capacity() / 60.0
    }

    fn shard(&self, key: IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let n = match key {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6) >> 64,
        };
        // Fibonacci hashing of the address's bits spreads neighbours over the shards.
        let h = ((n as u64) ^ ((n >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let i = (h >> 60) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let secs = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + secs * self.per_sec()).min(self.capacity());
        b.at = now;
    }

    fn admit_at(&self, client: Option<IpAddr>, now: Instant) -> Result<(), ApiError> {
        let Some(key) = client.map(key) else {
            return Ok(());
        };
        let mut shard = self.shard(key);
        let Some(bucket) = shard.buckets.get_mut(&key) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        let wait_s = ((1.0 - bucket.tokens) / self.per_sec()).ceil().max(1.0) as u64;
        drop(shard);
        metrics::counter!(t::AUTH_THROTTLED_TOTAL, "kind" => self.kind).increment(1);
        Err(ApiError::too_many_requests(
            "too_many_auth_failures",
            format!(
                "too many failed authentications from this address (VOICEGATE_AUTH_FAILURES_PER_MINUTE: {} a minute); retry after {wait_s} s",
                self.cfg.failures_per_minute
            ),
            wait_s,
        ))
    }

    fn failed_at(&self, client: Option<IpAddr>, now: Instant) {
        let Some(key) = client.map(key) else {
            return;
        };
        let room = self.cfg.max_addresses.div_ceil(SHARDS);
        let full = self.capacity();
        let mut shard = self.shard(key);
        if let Some(bucket) = shard.buckets.get_mut(&key) {
            self.refill(bucket, now);
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
            return;
        }
        if shard.buckets.len() >= room {
            let due = shard
                .pruned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY);
            if due {
                shard.pruned_at = Some(now);
                let per_sec = self.per_sec();
                shard.buckets.retain(|_, b| {
                    b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < full
                });
            }
            if shard.buckets.len() >= room {
                drop(shard);
                metrics::counter!(t::AUTH_THROTTLE_UNTRACKED_TOTAL, "kind" => self.kind)
                    .increment(1);
                return;
            }
        }
        shard.buckets.insert(
            key,
            Bucket {
                tokens: full - 1.0,
                at: now,
            },
        );
    }
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle::new(ThrottleConfig::default(), "token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    fn throttle(per_minute: u32, max_addresses: usize) -> AuthThrottle {
        AuthThrottle::new(
            ThrottleConfig {
                failures_per_minute: per_minute,
                max_addresses,
                trusted: TrustedProxies::default(),
            },
            "token",
        )
    }

    #[test]
    fn a_burst_of_failures_then_429_until_one_refills() {
        let th = throttle(6, 100);
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        for _ in 0..6 {
            assert!(th.admit_at(a, t0).is_ok());
            th.failed_at(a, t0);
        }
        let err = th
            .admit_at(a, t0)
            .err()
            .unwrap_or_else(|| panic!("admitted"));
        assert_eq!(err.code(), "too_many_auth_failures");
        assert_eq!(err.retry_after_s(), Some(10), "6 a minute: one every 10 s");
        assert!(th.admit_at(ip("198.51.100.8"), t0).is_ok(), "others pass");
        assert!(th.admit_at(a, t0 + Duration::from_secs(9)).is_err());
        assert!(th.admit_at(a, t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn ipv6_counts_by_its_slash_64_and_mapped_ipv4_as_ipv4() {
        let th = throttle(1, 100);
        let t0 = Instant::now();
        th.failed_at(ip("2001:db8:1:2::1"), t0);
        assert!(th.admit_at(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        assert!(th.admit_at(ip("2001:db8:1:3::1"), t0).is_ok());
        th.failed_at(ip("::ffff:192.0.2.1"), t0);
        assert!(th.admit_at(ip("192.0.2.1"), t0).is_err());
    }

    #[test]
    fn memory_is_bounded_and_refilled_addresses_are_forgotten() {
        let th = throttle(1, SHARDS);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            th.failed_at(Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        let tracked = |th: &AuthThrottle| -> usize {
            th.shards
                .iter()
                .map(|s| s.lock().map(|s| s.buckets.len()).unwrap_or(0))
                .sum()
        };
        assert!(tracked(&th) <= SHARDS, "{} tracked", tracked(&th));
        // A minute later every bucket refilled: the full shards make room for new addresses.
        let later = t0 + Duration::from_secs(61);
        for i in 1000..2000u32 {
            th.failed_at(Some(IpAddr::from(i.to_be_bytes())), later);
        }
        assert!(tracked(&th) <= SHARDS);
        let fresh = (1000..2000u32)
            .filter(|i| {
                th.admit_at(Some(IpAddr::from(i.to_be_bytes())), later)
                    .is_ok()
            })
            .count();
        assert!(fresh < 1000, "new addresses were tracked");
    }
}
