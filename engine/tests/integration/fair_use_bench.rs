//! The abuse benchmark (`docs/fair-use.md` §1.2): simulated user-weeks driven through the real meter, fair-use
//! facade (breach detection), cap supervisor, heuristic classifier, session evidence store and backfill
//! allowance, on virtual time, with synthetic speech (amounts per 5-minute step and per sync file, not audio).
//!
//! Seven archetypes with their parameter ranges from issue 19; every user draws its own from a seeded
//! generator. Seeds: users `0..` of [`TUNE_SEED`] were used to tune the heuristic; the acceptance figures come
//! from [`EVAL_SEED`] (a disjoint range, never used for tuning), which CI also runs (a small version).
//!
//! `cargo test -p voicegate-engine --test integration fair_use_bench:: -- --nocapture` runs 20 users per
//! archetype (140 user-weeks) and prints the table. `VOICEGATE_FAIRUSE_USERS=2500 cargo test -p
//! voicegate-engine --release --test integration fair_use_bench:: -- --nocapture` runs 2,500 per archetype
//! (10,000 legitimate user-weeks, 7,500 abusive). `VOICEGATE_FAIRUSE_SEED=tune` runs the tuning seeds instead.
//! Two tests: the users with no plan record (the free plan's caps, the targets) and the same users on
//! a paid plan (the paid caps; its own targets, below).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use voicegate_engine::fair_use::{
    FairUse, FairUseParts, FollowUp, HeuristicClassifier, StoredSessions,
};
use voicegate_engine::meter::{Meter, MeterConfig, RecordSpeech, SpeechAmount, SpeechSource};
use voicegate_engine::policy::backfill::{self, BackfillConfig, Lane};
use voicegate_engine::policy::{
    EventKind, FairUseConfig, SessionLane, SessionMeasures, SessionSummary, Stage,
};
use voicegate_engine::store::MemoryStore;
use voicegate_engine::store::backfill::{BackfillLedger, Charge, MemoryBackfillLedger};
use voicegate_engine::store::fair_use::{FairUseStore, MemoryCooldownLock, MemoryFairUseStore};
use voicegate_engine::store::plans::{MemoryPlanStore, PlanRecordValue, PlanStore};
use voicegate_engine::time::ManualClock;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;
/// Monday 2026-09-21 00:00 UTC (day 20,717 since the epoch was a Thursday; 20,724 is a Monday).
const T0: u64 = 20_724 * DAY;
const STEP: u64 = 5 * MIN;
const DAYS: u64 = 7;
/// The tuning seeds' base; user `i` of an archetype draws from `base + archetype × 1,000,000 + i`.
const TUNE_SEED: u64 = 0;
/// The evaluation seeds' base (disjoint from every tuning seed). The first evaluation range (`1 << 40`)
/// was looked at once before the last tuning step (the dense-media ramp), so the figures come from this one.
const EVAL_SEED: u64 = 2 << 40;
/// Users simulated at once (one meter, one supervisor, one clock); bounds the memory of large runs.
const BATCH: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Archetype {
    Meetings,
    SalesRep,
    Caregiver,
    Backfill,
    Audiobook,
    Tv,
    Farm,
}

const ARCHETYPES: [Archetype; 7] = [
    Archetype::Meetings,
    Archetype::SalesRep,
    Archetype::Caregiver,
    Archetype::Backfill,
    Archetype::Audiobook,
    Archetype::Tv,
    Archetype::Farm,
];

impl Archetype {
    fn abuser(self) -> bool {
        matches!(self, Archetype::Audiobook | Archetype::Tv | Archetype::Farm)
    }

    fn name(self) -> &'static str {
        match self {
            Archetype::Meetings => "meetings",
            Archetype::SalesRep => "sales rep",
            Archetype::Caregiver => "caregiver",
            Archetype::Backfill => "bulk backfill",
            Archetype::Audiobook => "audiobook replay",
            Archetype::Tv => "TV left on",
            Archetype::Farm => "transcription farm",
        }
    }
}

/// One stretch of audio: a realtime session (metered as it goes) or a sync file (metered at upload).
#[derive(Debug, Clone)]
struct Recording {
    start: u64,
    audio: u64,
    density: f64,
    /// `None`: realtime; `Some(t)`: a sync file uploaded at `t`.
    upload_at: Option<u64>,
    /// Longest speech run, ms (conversation: seconds; media: up to a minute).
    longest: u64,
}

impl Recording {
    fn end(&self) -> u64 {
        self.start + self.audio
    }

    /// Speech in `[from, to)` of its audio (the density spread evenly).
    fn speech_between(&self, from: u64, to: u64) -> u64 {
        let overlap = self.end().min(to).saturating_sub(self.start.max(from));
        share(overlap, self.density)
    }
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn share(ms: u64, density: f64) -> u64 {
    (ms as f64 * density).round() as u64
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn hours(rng: &mut StdRng, lo: f64, hi: f64) -> u64 {
    (rng.random_range(lo..=hi) * HOUR as f64) as u64
}

fn minutes(rng: &mut StdRng, lo: u64, hi: u64) -> u64 {
    rng.random_range(lo..=hi) * MIN
}

/// Sessions filling `total` of audio from `start`: each `len()` long, `gap()` apart.
fn fill(
    start: u64,
    total: u64,
    mut len: impl FnMut() -> (u64, f64),
    mut gap: impl FnMut() -> u64,
    longest: u64,
) -> Vec<Recording> {
    let (mut at, mut left, mut out) = (start, total, Vec::new());
    while left >= 5 * MIN {
        let (d, density) = len();
        let d = d.min(left);
        out.push(Recording {
            start: at,
            audio: d,
            density,
            upload_at: None,
            longest,
        });
        left -= d;
        at += d + gap();
    }
    out
}

/// A user's week of recordings, drawn from `seed`.
#[allow(clippy::too_many_lines)]
fn plan(kind: Archetype, seed: u64) -> Vec<Recording> {
    let mut rng = StdRng::seed_from_u64(seed);
    let r = &mut rng;
    let mut out = Vec::new();
    match kind {
        Archetype::Meetings => {
            let (lo, hi) = (r.random_range(0.3..=0.6_f64), r.random_range(4.0..=6.0_f64));
            for day in 0..5 {
                let start = T0 + day * DAY + hours(r, 8.0, 10.0);
                let total = hours(r, (hi - 0.5).max(4.0), hi);
                let mut rr = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x9E37));
                let mut rg = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x7F4A));
                out.extend(fill(
                    start,
                    total,
                    || {
                        let d = minutes(&mut rr, 30, 90);
                        (d, (lo + rr.random_range(-0.05..=0.05)).clamp(0.3, 0.6))
                    },
                    || minutes(&mut rg, 0, 60),
                    20_000,
                ));
            }
        }
        Archetype::SalesRep => {
            let density = r.random_range(0.5..=0.7_f64);
            for day in 0..5 {
                let mut at = T0 + day * DAY + hours(r, 8.5, 9.5);
                for _ in 0..r.random_range(8..=10) {
                    let audio = minutes(r, 10, 40);
                    out.push(Recording {
                        start: at,
                        audio,
                        density: (density + r.random_range(-0.05..=0.05)).clamp(0.5, 0.7),
                        upload_at: None,
                        longest: 25_000,
                    });
                    at += audio + minutes(r, 0, 45);
                }
            }
        }
        Archetype::Caregiver => {
            let density = r.random_range(0.05..=0.2_f64);
            let per_day = r.random_range(12.0..=16.0_f64);
            for day in 0..DAYS {
                let start = T0 + day * DAY + hours(r, 6.0, 8.0);
                let total = hours(r, (per_day - 1.0).max(12.0), per_day);
                let mut rr = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x51ED));
                let mut rg = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x2C1B));
                out.extend(fill(
                    start,
                    total,
                    || (hours(&mut rr, 1.0, 4.0), density),
                    || minutes(&mut rg, 0, 30),
                    15_000,
                ));
            }
        }
        Archetype::Backfill => {
            // 30 days × 3–6 h of the device's recordings (files of 10–60 min, density 0.1–0.5: a person's
            // days), uploaded by sync in one go on the first or second day, plus 1–2 h a day of realtime use.
            let density = r.random_range(0.1..=0.5_f64);
            let arrival = T0 + r.random_range(0..=1) * DAY + hours(r, 10.0, 14.0);
            let mut upload = arrival;
            for back in 1..=30 {
                let day_start = (arrival / DAY - back) * DAY;
                let mut at = day_start + hours(r, 8.0, 11.0);
                let mut left = hours(r, 3.0, 6.0);
                while left >= 5 * MIN {
                    let audio = minutes(r, 10, 60).min(left);
                    out.push(Recording {
                        start: at,
                        audio,
                        density: (density + r.random_range(-0.05..=0.05)).clamp(0.1, 0.5),
                        upload_at: Some(upload),
                        longest: 15_000,
                    });
                    upload += MIN;
                    left -= audio;
                    at += audio + minutes(r, 0, 20);
                }
            }
            for day in 0..DAYS {
                let start = T0 + day * DAY + hours(r, 9.0, 18.0);
                let total = hours(r, 1.0, 2.0);
                let mut rr = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x3D4F));
                let mut rg = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x6A09));
                out.extend(fill(
                    start,
                    total,
                    || (minutes(&mut rr, 10, 60), rr.random_range(0.2..=0.5)),
                    || minutes(&mut rg, 10, 120),
                    15_000,
                ));
            }
        }
        Archetype::Audiobook => {
            let density = r.random_range(0.8..=0.95_f64);
            let per_day = r.random_range(4.0..=14.0_f64);
            for day in 0..DAYS {
                let total = hours(r, (per_day - 1.0).max(4.0), (per_day + 1.0).min(14.0));
                let start = T0 + day * DAY + hours(r, 0.0, 23.5 - total as f64 / HOUR as f64 * 1.3);
                let mut rr = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x1B87));
                let mut rg = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x4C95));
                out.extend(fill(
                    start,
                    total,
                    || (hours(&mut rr, 1.0, 6.0), density),
                    || minutes(&mut rg, 10, 60),
                    45_000,
                ));
            }
        }
        Archetype::Tv => {
            let density = r.random_range(0.5..=0.8_f64);
            let per_day = r.random_range(20.0..=24.0_f64);
            for day in 0..DAYS {
                let start = T0 + day * DAY + hours(r, 0.0, 24.0 - per_day);
                let total = hours(r, per_day, per_day);
                let mut rr = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x0F6B));
                let mut rg = StdRng::seed_from_u64(seed ^ ((day + 1) * 0x5BE0));
                out.extend(fill(
                    start,
                    total,
                    || (hours(&mut rr, 2.0, 12.0), density),
                    || minutes(&mut rg, 0, 2),
                    40_000,
                ));
            }
        }
        Archetype::Farm => {
            let density = r.random_range(0.7..=0.9_f64);
            let per_day = r.random_range(10.0..=20.0_f64);
            for day in 0..DAYS {
                let mut at = T0 + day * DAY + hours(r, 0.0, 24.0 - per_day);
                let mut left = hours(r, (per_day - 1.0).max(10.0), per_day);
                while left >= 5 * MIN {
                    let audio = minutes(r, 10, 60).min(left);
                    out.push(Recording {
                        start: at,
                        audio,
                        density,
                        upload_at: Some(at + audio + minutes(r, 0, 10)),
                        longest: 40_000,
                    });
                    left -= audio;
                    at += audio + minutes(r, 0, 2);
                }
            }
        }
    }
    out
}

/// What one user-week came to.
#[derive(Debug, Clone)]
struct Outcome {
    kind: Archetype,
    stage: Stage,
    /// Hours from the first activity to the first event at or above each stage.
    to_warning: Option<f64>,
    to_throttle: Option<f64>,
    to_restrict: Option<f64>,
    calls: usize,
    /// The most classifications in any 12 h.
    calls_per_12h: usize,
    /// Classifications of a user already at restrict.
    calls_at_restrict: usize,
    /// The week's speech (all of it, backfilled days included).
    speech_ms: u64,
}

struct User {
    uid: String,
    kind: Archetype,
    recordings: Vec<Recording>,
    /// Sync files waiting (deferred by the backfill allowance): index → upload time.
    uploads: BTreeMap<usize, u64>,
}

/// Simulates `users` (one batch) on one clock, every user on `plan` (`None`: no plan record, the default
/// `unknown` plan with the free plan's caps); returns their outcomes.
async fn simulate(users: Vec<(Archetype, u64)>, plan_id: Option<&str>) -> Vec<Outcome> {
    let clock = ManualClock::new(T0);
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            ..MeterConfig::default()
        },
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    let store = Arc::new(MemoryFairUseStore::new());
    let plans = Arc::new(MemoryPlanStore::default());
    let cfg = FairUseConfig::default();
    let fu = FairUse::start(
        cfg.clone(),
        meter,
        FairUseParts {
            store: store.clone(),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier: Arc::new(HeuristicClassifier),
            sessions: Arc::new(StoredSessions(store.clone())),
            plans: plans.clone(),
            notifier: None,
            clock: clock.clone(),
        },
    );
    let ledger = Arc::new(MemoryBackfillLedger::default());
    let bf = BackfillConfig::default();
    let mut users: Vec<User> = users
        .into_iter()
        .enumerate()
        .map(|(i, (kind, seed))| {
            let recordings = plan(kind, seed);
            let uploads = recordings
                .iter()
                .enumerate()
                .filter_map(|(j, rec)| rec.upload_at.map(|t| (j, t)))
                .collect();
            User {
                uid: format!("u{i}-{seed}"),
                kind,
                recordings,
                uploads,
            }
        })
        .collect();
    if let Some(id) = plan_id {
        for u in &users {
            let value = PlanRecordValue {
                plan: id.to_owned(),
                updated_at_ms: T0,
                event_id: format!("bench-{}", u.uid),
                source_at_ms: T0,
            };
            plans.set(&u.uid, &value).await.expect("memory store");
        }
    }
    // One more day after the week: the follow-ups of its last day land.
    for step in 1..=(DAYS + 1) * DAY / STEP {
        let now = T0 + step * STEP;
        clock.set(now);
        let (fu, ledger) = (&fu, &ledger);
        join_all(
            users
                .iter_mut()
                .map(|u| step_user(u, now, fu, ledger.as_ref(), bf)),
        )
        .await;
        fu.settled().await;
        let _ = fu.supervisor().send(FollowUp).await;
        fu.settled().await;
    }
    let mut out = Vec::with_capacity(users.len());
    for u in &users {
        let events = store.events(&u.uid, 200).await.expect("memory store");
        // What the server first sees: a realtime session's start or a sync file's upload.
        let first_activity = u
            .recordings
            .iter()
            .map(|r| r.upload_at.unwrap_or(r.start))
            .min()
            .unwrap_or(T0)
            .max(T0);
        let first_at = |stage: Stage| {
            events
                .iter()
                .filter(|e| e.new_stage >= stage)
                .map(|e| e.at_ms)
                .min()
                .map(|at| (at.saturating_sub(first_activity)) as f64 / HOUR as f64)
        };
        let mut calls: Vec<u64> = events
            .iter()
            .filter(|e| e.kind == EventKind::Classification)
            .map(|e| e.at_ms)
            .collect();
        calls.sort_unstable();
        let calls_per_12h = calls
            .iter()
            .map(|&t| {
                calls
                    .iter()
                    .filter(|&&c| c >= t && c < t + 12 * HOUR)
                    .count()
            })
            .max()
            .unwrap_or(0);
        out.push(Outcome {
            kind: u.kind,
            stage: events
                .iter()
                .map(|e| e.new_stage)
                .max()
                .unwrap_or(Stage::None),
            to_warning: first_at(Stage::Warning),
            to_throttle: first_at(Stage::Throttle),
            to_restrict: first_at(Stage::Restrict),
            calls: calls.len(),
            calls_per_12h,
            calls_at_restrict: events
                .iter()
                .filter(|e| {
                    e.kind == EventKind::Classification && e.previous_stage == Stage::Restrict
                })
                .count(),
            speech_ms: u.recordings.iter().map(|r| share(r.audio, r.density)).sum(),
        });
    }
    out
}

/// One user's step `[now - STEP, now)`: realtime speech metered and the open sessions' evidence rewritten;
/// sync files due uploaded (the backfill lane and allowance decided as the sync path decides them).
async fn step_user(
    u: &mut User,
    now: u64,
    fu: &FairUse,
    ledger: &dyn BackfillLedger,
    bf: BackfillConfig,
) {
    let from = now - STEP;
    for (i, rec) in u.recordings.iter().enumerate() {
        if rec.upload_at.is_some() || rec.end() <= from || rec.start >= now {
            continue;
        }
        let speech = rec.speech_between(from, now);
        if speech > 0 {
            let r = RecordSpeech::new(
                u.uid.as_str(),
                SpeechAmount::Ms(speech),
                now,
                SpeechSource::Realtime,
            );
            fu.record(r).await.expect("meter");
        }
        let upto = rec.end().min(now);
        let summary = SessionSummary::new(
            &format!("rt:{i}"),
            SessionLane::Realtime,
            SessionMeasures {
                started_at_ms: rec.start,
                audio_ms: upto - rec.start,
                speech_ms: rec.speech_between(rec.start, upto),
                longest_speech_ms: rec.longest,
                speech_runs: (upto - rec.start) / 20_000,
            },
            now,
            rec.end() > now,
        );
        fu.record_session(&u.uid, &summary).await;
    }
    let due: Vec<usize> = u
        .uploads
        .iter()
        .filter(|(_, t)| **t <= now)
        .map(|(i, _)| *i)
        .collect();
    for i in due {
        let rec = &u.recordings[i];
        let speech = share(rec.audio, rec.density);
        let lane = match backfill::lane(rec.start, now, &bf) {
            Lane::TooOld => {
                u.uploads.remove(&i);
                continue;
            }
            Lane::Backfill => {
                let day = backfill::utc_day(now);
                match ledger
                    .charge(&u.uid, day, speech, bf.allowance_ms)
                    .await
                    .expect("ledger")
                {
                    Charge::Granted { .. } => SessionLane::SyncBackfill,
                    // The app retries after the Retry-After: the next UTC midnight.
                    Charge::Exhausted { .. } => {
                        u.uploads.insert(i, (day + 1) * DAY + (i as u64 % 60) * MIN);
                        continue;
                    }
                }
            }
            Lane::Fresh => SessionLane::SyncFresh,
        };
        u.uploads.remove(&i);
        let r = RecordSpeech::new(
            u.uid.as_str(),
            SpeechAmount::Ms(speech),
            rec.start,
            SpeechSource::Sync,
        )
        .with_idempotency_key(format!("sync:{i}"));
        fu.record(r).await.expect("meter");
        let summary = SessionSummary::new(
            &format!("sync:{i}"),
            lane,
            SessionMeasures {
                started_at_ms: rec.start,
                audio_ms: rec.audio,
                speech_ms: speech,
                longest_speech_ms: rec.longest,
                speech_runs: rec.audio / 20_000,
            },
            now,
            false,
        );
        fu.record_session(&u.uid, &summary).await;
    }
}

fn pct(mut xs: Vec<f64>, p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    Some(xs[i])
}

#[allow(clippy::cast_precision_loss)] // ms counts are far below 2^53
fn hours_of(ms: u64) -> f64 {
    ms as f64 / HOUR as f64
}

fn fmt_h(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |h| format!("{h:.1}"))
}

/// Runs `per_kind` users of every archetype from `base` and prints the table; returns the outcomes.
async fn run(per_kind: usize, base: u64, plan_id: Option<&str>) -> Vec<Outcome> {
    let all: Vec<(Archetype, u64)> = ARCHETYPES
        .iter()
        .enumerate()
        .flat_map(|(k, &kind)| {
            (0..per_kind as u64).map(move |i| (kind, base + k as u64 * 1_000_000 + i))
        })
        .collect();
    let mut out = Vec::new();
    for batch in all.chunks(BATCH) {
        out.extend(simulate(batch.to_vec(), plan_id).await);
    }
    println!(
        "\nfair-use benchmark: {per_kind} users per archetype, seeds from {base}, {} user-weeks, plan {}",
        out.len(),
        plan_id.unwrap_or("none on record (unknown: the free plan's caps)")
    );
    println!(
        "{:<20} {:>6} {:>9} {:>6} {:>8} {:>9} {:>9} | {:>17} {:>17} {:>17} | {:>9} {:>9} {:>6}",
        "archetype",
        "users",
        "speech/d",
        "none",
        "warning",
        "throttle",
        "restrict",
        "h→warn p50/max",
        "h→throttle p50/max",
        "h→restrict p50/max",
        "calls/day",
        "max/12h",
        "@restr"
    );
    for kind in ARCHETYPES {
        let of: Vec<&Outcome> = out.iter().filter(|o| o.kind == kind).collect();
        let at = |s: Stage| of.iter().filter(|o| o.stage == s).count();
        let times = |f: fn(&Outcome) -> Option<f64>| {
            let xs: Vec<f64> = of.iter().filter_map(|o| f(o)).collect();
            format!("{}/{}", fmt_h(pct(xs.clone(), 0.5)), fmt_h(pct(xs, 1.0)))
        };
        #[allow(clippy::cast_precision_loss)]
        let calls_per_day = of.iter().map(|o| o.calls).sum::<usize>() as f64
            / (of.len().max(1) as f64 * (DAYS + 1) as f64);
        println!(
            "{:<20} {:>6} {:>9} {:>6} {:>8} {:>9} {:>9} | {:>17} {:>17} {:>17} | {:>9.2} {:>9} {:>6}",
            kind.name(),
            of.len(),
            fmt_h(pct(
                of.iter()
                    .map(|o| hours_of(o.speech_ms) / DAYS as f64)
                    .collect(),
                0.5
            )),
            at(Stage::None),
            at(Stage::Warning),
            at(Stage::Throttle),
            at(Stage::Restrict),
            times(|o| o.to_warning),
            times(|o| o.to_throttle),
            times(|o| o.to_restrict),
            calls_per_day,
            of.iter().map(|o| o.calls_per_12h).max().unwrap_or(0),
            of.iter().map(|o| o.calls_at_restrict).sum::<usize>(),
        );
    }
    out
}

fn env_u64(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The targets of issue 19 on the evaluation seeds.
#[actix::test]
async fn every_abuser_is_throttled_within_2_days_and_restricted_within_4_and_no_legitimate_user_is_throttled()
 {
    let per_kind: usize = env_u64("VOICEGATE_FAIRUSE_USERS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base = match env_u64("VOICEGATE_FAIRUSE_SEED").as_deref() {
        Some("tune") => TUNE_SEED,
        Some(v) => v
            .parse()
            .expect("VOICEGATE_FAIRUSE_SEED: a number or `tune`"),
        None => EVAL_SEED,
    };
    let out = run(per_kind, base, None).await;
    for o in &out {
        assert!(
            o.calls_per_12h <= 1,
            "more than one classification in 12 h: {o:?}"
        );
        assert_eq!(o.calls_at_restrict, 0, "classified at restrict: {o:?}");
        if o.kind.abuser() {
            assert!(
                o.to_throttle.is_some_and(|h| h <= 48.0)
                    && o.to_restrict.is_some_and(|h| h <= 96.0),
                "an abuser too slow up the ladder: {o:?}"
            );
        } else {
            // The target is "never throttled"; none is even warned on the evaluation seeds (the doc says so).
            assert_eq!(o.stage, Stage::None, "a legitimate user warned: {o:?}");
        }
    }
}

/// The same users on a paid plan (caps 4/16/20 h, `docs/fair-use.md` §2.1): no legitimate user is warned,
/// and every abuser is restricted within the week. The 2-day throttle target is the free plan's:
/// a payer's caps are twice as high, so an audiobook replayed 4–4.5 h a day crosses the paid daily cap only
/// on some days and climbs later (the figures are in §1.2).
#[actix::test]
async fn on_a_paid_plan_no_legitimate_user_is_throttled_and_every_abuser_is_restricted_within_7_days()
 {
    let per_kind: usize = env_u64("VOICEGATE_FAIRUSE_USERS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let out = run(per_kind, EVAL_SEED, Some("unlimited")).await;
    let mut late = BTreeMap::new();
    for o in &out {
        assert!(
            o.calls_per_12h <= 1,
            "more than one classification in 12 h: {o:?}"
        );
        assert_eq!(o.calls_at_restrict, 0, "classified at restrict: {o:?}");
        if o.kind.abuser() {
            assert!(
                o.to_restrict.is_some_and(|h| h <= 168.0),
                "an abuser too slow up the ladder: {o:?}"
            );
            if !o.to_throttle.is_some_and(|h| h <= 48.0) {
                *late.entry(o.kind.name()).or_insert(0) += 1;
            }
        } else {
            // The target is "never throttled"; none is even warned on the evaluation seeds (the doc says so).
            assert_eq!(o.stage, Stage::None, "a legitimate user warned: {o:?}");
        }
    }
    println!("abusers throttled after 48 h on the paid plan: {late:?}");
}
