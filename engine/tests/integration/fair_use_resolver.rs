//! The entitlement resolver, table-driven: every stage × credit state × caps (under / at / over) × kill switch
//! × exempt (× enable flag × mode), plus the reference's lock table (omi §7 A27) and boundaries (A24–A26,
//! A28–A30, C40, C42, D51–D53, F57, F62, G66, G68, G71).

use voicegate_engine::policy::stage::DAY_MS;
use voicegate_engine::policy::{
    Admission, CapKind, CreditLookup, Credits, DefaultPlan, Enforcement, EntitlementInput,
    FairUseConfig, Mode, MonthUsage, PlanTable, RejectReason, RollingTotals, SoftCaps, Stage,
    StageState, SttAllowance, SttDenied, SttUsage, resolve,
};

const NOW: u64 = 1_790_000_000_000;
const UID: &str = "user1";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Credit {
    WithCredits,
    Exhausted,
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caps {
    Under,
    At,
    Over,
}

/// The reference's plan table: no plan record = the free plan (`VOICEGATE_DEFAULT_PLAN=free`).
fn free_default() -> PlanTable {
    PlanTable {
        default_plan: DefaultPlan::Free,
        ..PlanTable::default()
    }
}

fn credit(c: Credit) -> CreditLookup {
    let table = free_default();
    match c {
        Credit::WithCredits => {
            CreditLookup::Resolved(table.credits(None, MonthUsage { month_ms: 60_000 }))
        }
        Credit::Exhausted => CreditLookup::Resolved(table.credits(
            None,
            MonthUsage {
                month_ms: 72_000_000,
            },
        )),
        Credit::Unavailable => CreditLookup::Unavailable,
    }
}

fn totals(c: Caps) -> RollingTotals {
    let caps = SoftCaps::default();
    let (d, t, w) = (caps.daily_ms, caps.three_day_ms, caps.weekly_ms);
    match c {
        Caps::Under => RollingTotals {
            daily_ms: 1_000,
            three_day_ms: 2_000,
            weekly_ms: 3_000,
        },
        Caps::At => RollingTotals {
            daily_ms: d,
            three_day_ms: t,
            weekly_ms: w,
        },
        Caps::Over => RollingTotals {
            daily_ms: d + 1,
            three_day_ms: t + 1,
            weekly_ms: w + 1,
        },
    }
}

/// A state sitting in `stage` with its until-fields in the future (no decay due at NOW).
fn state(stage: Stage) -> StageState {
    let mut s = StageState {
        stage,
        since_ms: Some(NOW - DAY_MS),
        updated_at_ms: NOW - DAY_MS,
        ..Default::default()
    };
    s.last_violation_at_ms = (stage != Stage::None).then_some(NOW - DAY_MS);
    match stage {
        Stage::Throttle => s.throttle_until_ms = Some(NOW + 6 * DAY_MS),
        Stage::Restrict => s.restrict_until_ms = Some(NOW + 120_000),
        _ => {}
    }
    s
}

fn cfg(enabled: bool, kill: bool, exempt: bool) -> FairUseConfig {
    let mut c = FairUseConfig {
        enabled,
        kill_switch: kill,
        ..FairUseConfig::default()
    };
    // The reference's rule: no plan record = the free plan (`VOICEGATE_DEFAULT_PLAN=free`).
    c.plans.default_plan = DefaultPlan::Free;
    if exempt {
        c.exempt_uids.insert(UID.to_owned());
    }
    c
}

#[allow(clippy::too_many_arguments)]
fn run(
    cfg: &FairUseConfig,
    mode: Mode,
    st: &StageState,
    cr: &CreditLookup,
    t: RollingTotals,
    used: u64,
) -> voicegate_engine::policy::Entitlement {
    resolve(
        cfg,
        &EntitlementInput {
            uid: UID,
            mode,
            credits: cr,
            month: MonthUsage::default(),
            stage: st,
            totals: t,
            totals_known: true,
            caps: cfg.caps.free,
            under_caps_at_ms: None,
            under_ceiling_at_ms: None,
            stt_today: SttUsage {
                day: SttUsage::day_of(NOW),
                used_ms: used,
            },
            spend_tripped: false,
            now_ms: NOW,
        },
    )
}

#[test]
fn every_stage_credit_cap_switch_and_exemption_combination_follows_the_rules() {
    let mut rows = 0;
    for stage in Stage::ALL {
        for c in [Credit::WithCredits, Credit::Exhausted, Credit::Unavailable] {
            for caps in [Caps::Under, Caps::At, Caps::Over] {
                for enabled in [true, false] {
                    for kill in [false, true] {
                        for exempt in [false, true] {
                            for mode in [Mode::Sync, Mode::Realtime, Mode::Status] {
                                rows += 1;
                                let config = cfg(enabled, kill, exempt);
                                let cr = credit(c);
                                let st = state(stage);
                                let e = run(&config, mode, &st, &cr, totals(caps), 0);
                                let active = enabled && !kill && !exempt;
                                let ctx = format!(
                                    "{stage:?} {c:?} {caps:?} en={enabled} kill={kill} ex={exempt} {mode:?}"
                                );

                                // The lock is billing: credits resolved and exhausted, nothing else.
                                assert_eq!(e.lock, c == Credit::Exhausted, "lock: {ctx}");
                                // Caps: strictly greater, and only while enforcement is active.
                                assert_eq!(
                                    e.caps_triggered.len(),
                                    if active && caps == Caps::Over { 3 } else { 0 },
                                    "caps: {ctx}"
                                );
                                // 429 only for sync/status, in restrict, over a cap, enforcement active.
                                let reject = active
                                    && stage == Stage::Restrict
                                    && caps == Caps::Over
                                    && mode != Mode::Realtime;
                                match e.admission {
                                    Admission::Reject {
                                        reason,
                                        retry_after_s,
                                    } => {
                                        assert!(reject, "unexpected reject: {ctx}");
                                        assert_eq!(reason, RejectReason::RestrictedOverCap);
                                        assert!(
                                            (1..=120).contains(&retry_after_s),
                                            "retry {retry_after_s}: {ctx}"
                                        );
                                    }
                                    Admission::Admit => assert!(!reject, "expected reject: {ctx}"),
                                }
                                // STT: unknown entitlement fails closed; budgets only in throttle/restrict when active.
                                let expected_budget = match (active, stage) {
                                    (true, Stage::Throttle) => Some(7_200_000),
                                    (true, Stage::Restrict) => Some(1_800_000),
                                    _ => None,
                                };
                                match (c, expected_budget, e.stt) {
                                    (
                                        Credit::Unavailable,
                                        _,
                                        SttAllowance::None {
                                            reason: SttDenied::EntitlementUnknown,
                                            ..
                                        },
                                    ) => {}
                                    (Credit::Unavailable, _, other) => panic!(
                                        "unknown entitlement must fail closed, got {other:?}: {ctx}"
                                    ),
                                    (_, None, SttAllowance::Unlimited) => {}
                                    (
                                        _,
                                        Some(b),
                                        SttAllowance::Remaining {
                                            remaining_ms,
                                            daily_limit_ms,
                                            ..
                                        },
                                    ) => {
                                        assert_eq!((remaining_ms, daily_limit_ms), (b, b), "{ctx}");
                                    }
                                    (_, _, other) => panic!("stt {other:?}: {ctx}"),
                                }
                                assert_eq!(e.enforcement.active(), active, "{ctx}");
                                assert_eq!(
                                    e.stage, stage,
                                    "the stored stage is reported even when not enforced: {ctx}"
                                );
                                assert_eq!(
                                    e.enforced_stage,
                                    if active { stage } else { Stage::None },
                                    "{ctx}"
                                );
                                assert!(e.decay.is_empty(), "{ctx}");
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(rows, 4 * 3 * 3 * 2 * 2 * 2 * 3);
}

#[test]
fn lock_table_of_the_reference_a27() {
    // (credits, fair use enabled, caps triggered) → locked
    let rows = [
        (Credit::WithCredits, true, Caps::Over, false),
        (Credit::Exhausted, true, Caps::Under, true),
        (Credit::Exhausted, true, Caps::Over, true),
        (Credit::WithCredits, false, Caps::Under, false),
        (Credit::WithCredits, true, Caps::Under, false),
        // Ours: the lock is billing, so turning fair use off never unlocks, and a lookup error never locks.
        (Credit::Exhausted, false, Caps::Over, true),
        (Credit::Unavailable, true, Caps::Over, false),
    ];
    for (c, enabled, caps, locked) in rows {
        let e = run(
            &cfg(enabled, false, false),
            Mode::Sync,
            &state(Stage::None),
            &credit(c),
            totals(caps),
            0,
        );
        assert_eq!(e.lock, locked, "{c:?} enabled={enabled} {caps:?}");
    }
}

#[test]
fn exactly_at_the_caps_triggers_nothing_and_one_more_ms_triggers_in_order_a24_a25_a26_d51() {
    let c = cfg(true, false, false);
    let none = state(Stage::None);
    let cr = credit(Credit::WithCredits);
    let caps_of = |t: RollingTotals| -> Vec<CapKind> {
        run(&c, Mode::Sync, &none, &cr, t, 0)
            .caps_triggered
            .iter()
            .map(|t| t.cap)
            .collect()
    };
    let t = |d, th, w| RollingTotals {
        daily_ms: d,
        three_day_ms: th,
        weekly_ms: w,
    };
    assert!(
        caps_of(t(7_200_000, 7_200_000, 7_200_000)).is_empty(),
        "A24"
    );
    assert!(
        !caps_of(t(7_200_001, 7_200_001, 7_200_001)).is_empty(),
        "A25"
    );
    assert!(caps_of(t(0, 0, 0)).is_empty(), "A26");
    assert!(
        caps_of(t(7_200_000, 28_800_000, 36_000_000)).is_empty(),
        "D51 exactly"
    );
    assert_eq!(
        caps_of(t(7_200_001, 28_800_001, 36_000_001)),
        vec![CapKind::Daily, CapKind::ThreeDay, CapKind::Weekly]
    );
    assert_eq!(
        caps_of(t(8_000_000, 10_000_000, 15_000_000)),
        vec![CapKind::Daily],
        "D51 only daily"
    );
    assert!(
        caps_of(t(8_000_000, 8_000_000, 8_000_000)).contains(&CapKind::Daily),
        "A4/C40"
    );
    assert!(caps_of(t(1_000, 2_000, 3_000)).is_empty(), "C40");
}

#[test]
fn restricted_user_exactly_at_the_caps_may_still_sync_d52() {
    let e = run(
        &cfg(true, false, false),
        Mode::Sync,
        &state(Stage::Restrict),
        &credit(Credit::WithCredits),
        totals(Caps::At),
        0,
    );
    assert_eq!(e.admission, Admission::Admit);
}

#[test]
fn hard_restriction_cases_c42_g68() {
    let c = cfg(true, false, false);
    let cr = credit(Credit::WithCredits);
    let mut restrict7d = state(Stage::Restrict);
    restrict7d.restrict_until_ms = Some(NOW + 7 * DAY_MS);
    let over_daily = RollingTotals {
        daily_ms: 8_000_000,
        ..Default::default()
    };
    let rejects = |st: &StageState, t: RollingTotals, c: &FairUseConfig| {
        matches!(
            run(c, Mode::Sync, st, &cr, t, 0).admission,
            Admission::Reject { .. }
        )
    };
    assert!(rejects(&restrict7d, over_daily, &c));
    assert!(!rejects(&restrict7d, totals(Caps::Under), &c));
    assert!(!rejects(&state(Stage::Warning), over_daily, &c));
    assert!(
        !rejects(&restrict7d, over_daily, &cfg(false, false, false)),
        "disabled (A10)"
    );
    assert!(
        !rejects(&restrict7d, over_daily, &cfg(true, true, false)),
        "kill switch (A11)"
    );
    assert!(
        !rejects(&restrict7d, over_daily, &cfg(true, false, true)),
        "exempt (A12)"
    );
    // Expired a day ago: not restricted, and exactly one decay step (to throttle) is reported for the actor to persist.
    let mut expired = state(Stage::Restrict);
    expired.restrict_until_ms = Some(NOW - DAY_MS);
    let e = run(&c, Mode::Sync, &expired, &cr, over_daily, 0);
    assert_eq!(e.admission, Admission::Admit);
    assert_eq!((e.stage, e.decay.len()), (Stage::Throttle, 1));
    assert_eq!(e.state.restrict_until_ms, None);
}

/// Restricted until `restrict_until`, over the daily cap until `under_caps_at`: the sync refusal's
/// Retry-After in seconds.
fn restricted_retry_after(restrict_until: Option<u64>, under_caps_at: Option<u64>) -> u64 {
    let mut st = state(Stage::Restrict);
    st.restrict_until_ms = restrict_until;
    let cr = credit(Credit::WithCredits);
    let e = resolve(
        &cfg(true, false, false),
        &EntitlementInput {
            uid: UID,
            mode: Mode::Sync,
            credits: &cr,
            month: MonthUsage::default(),
            stage: &st,
            totals: totals(Caps::Over),
            totals_known: true,
            caps: SoftCaps::default(),
            under_caps_at_ms: under_caps_at,
            under_ceiling_at_ms: None,
            stt_today: SttUsage::default(),
            spend_tripped: false,
            now_ms: NOW,
        },
    );
    match e.admission {
        Admission::Reject {
            reason: RejectReason::RestrictedOverCap,
            retry_after_s,
        } => retry_after_s,
        other => panic!("restrict over a cap must reject: {other:?}"),
    }
}

#[test]
fn retry_after_is_the_earlier_of_the_restrictions_end_and_the_fall_under_moment() {
    let in_30_days = Some(NOW + 30 * DAY_MS);
    // The totals fall back under the caps in 5 h: that, not the restriction's 30 days, bounds the wait.
    assert_eq!(
        restricted_retry_after(in_30_days, Some(NOW + 5 * 3_600_000)),
        5 * 3_600
    );
    // The restriction ends first (in 2 min) while the totals stay over for 6 days: its end wins.
    assert_eq!(
        restricted_retry_after(Some(NOW + 120_000), Some(NOW + 6 * DAY_MS)),
        120
    );
    // Unknown fall-under moment (the meter did not say): the restriction's end, as before.
    assert_eq!(restricted_retry_after(in_30_days, None), 30 * 86_400);
    // Rounded up to whole seconds, never below 1.
    assert_eq!(restricted_retry_after(in_30_days, Some(NOW + 1_001)), 2);
    assert_eq!(restricted_retry_after(in_30_days, Some(NOW + 1)), 1);
    assert_eq!(restricted_retry_after(None, Some(NOW + 42_000)), 42);
}

#[test]
fn retry_after_counts_down_to_restrict_until_a28_a29_a30() {
    let c = cfg(true, false, false);
    let cr = credit(Credit::WithCredits);
    let mut st = state(Stage::Restrict);
    for (until, max) in [(120_000, 120), (60_000, 60), (90_000, 90), (1, 1)] {
        st.restrict_until_ms = Some(NOW + until);
        let e = run(
            &c,
            Mode::Sync,
            &st,
            &cr,
            RollingTotals {
                daily_ms: 999_999_999,
                ..Default::default()
            },
            0,
        );
        match e.admission {
            Admission::Reject { retry_after_s, .. } => assert!((1..=max).contains(&retry_after_s)),
            Admission::Admit => panic!("restrict +{until} ms over cap must reject"),
        }
    }
    // Throttle, or restrict that expired 1 s ago → no reject, no retry-after.
    let throttle = state(Stage::Throttle);
    assert_eq!(
        run(&c, Mode::Sync, &throttle, &cr, totals(Caps::Over), 0).admission,
        Admission::Admit
    );
    st.restrict_until_ms = Some(NOW - 1_000);
    assert_eq!(
        run(&c, Mode::Sync, &st, &cr, totals(Caps::Over), 0).admission,
        Admission::Admit
    );
}

#[test]
fn realtime_is_never_rejected_even_restricted_and_far_over_every_cap() {
    let e = run(
        &cfg(true, false, false),
        Mode::Realtime,
        &state(Stage::Restrict),
        &credit(Credit::Exhausted),
        totals(Caps::Over),
        0,
    );
    assert_eq!(e.admission, Admission::Admit);
    assert!(e.lock);
}

#[test]
fn status_view_reports_expired_restrict_as_throttle_and_a_live_one_as_restrict_d53() {
    let c = cfg(true, false, false);
    let cr = credit(Credit::WithCredits);
    let mut st = state(Stage::Restrict);
    st.restrict_until_ms = Some(NOW - 1_000);
    let e = run(&c, Mode::Status, &st, &cr, totals(Caps::Under), 0);
    assert_eq!(e.stage, Stage::Throttle);
    assert_eq!(
        e.decay.len(),
        1,
        "one state update for the actor to persist"
    );
    st.restrict_until_ms = Some(NOW + DAY_MS);
    let e = run(&c, Mode::Status, &st, &cr, totals(Caps::Under), 0);
    assert_eq!((e.stage, e.decay.len()), (Stage::Restrict, 0));
}

#[test]
fn stt_budget_boundaries_and_switches_f62() {
    let mut c = cfg(true, false, false);
    let cr = credit(Credit::WithCredits);
    let restrict = state(Stage::Restrict);
    let stt = |c: &FairUseConfig, used| {
        run(c, Mode::Realtime, &restrict, &cr, totals(Caps::Under), used).stt
    };
    assert!(matches!(
        stt(&c, 900_000),
        SttAllowance::Remaining {
            remaining_ms: 900_000,
            ..
        }
    ));
    assert_eq!(
        stt(&c, 1_800_000),
        SttAllowance::None {
            reason: SttDenied::BudgetExhausted,
            daily_limit_ms: Some(1_800_000),
            used_ms: 1_800_000,
            resets_at_ms: Some((NOW / DAY_MS + 1) * DAY_MS),
        },
        "used up: open again at the next UTC midnight"
    );
    assert!(
        matches!(
            stt(&c, 0),
            SttAllowance::Remaining {
                remaining_ms: 1_800_000,
                ..
            }
        ),
        "no usage yet"
    );
    c.restrict_daily_stt_ms = 0;
    assert_eq!(
        stt(&c, 5_000_000),
        SttAllowance::Unlimited,
        "limit 0 disables the budget"
    );
    // The throttle budget likewise (default 2 h; 0 = off).
    let throttle = state(Stage::Throttle);
    let at_throttle = |c: &FairUseConfig| {
        run(
            c,
            Mode::Realtime,
            &throttle,
            &cr,
            totals(Caps::Under),
            9_000_000,
        )
        .stt
    };
    assert!(matches!(
        at_throttle(&c),
        SttAllowance::None {
            reason: SttDenied::BudgetExhausted,
            daily_limit_ms: Some(7_200_000),
            ..
        }
    ));
    c.throttle_daily_stt_ms = 0;
    assert_eq!(
        at_throttle(&c),
        SttAllowance::Unlimited,
        "throttle 0 disables it"
    );
    assert_eq!(
        stt(&cfg(false, false, false), 5_000_000),
        SttAllowance::Unlimited,
        "disabled"
    );
    // Ours: the kill switch and exemption also release STT budgets (the reference kept enforcing them, §8.11).
    assert_eq!(
        stt(&cfg(true, true, false), 5_000_000),
        SttAllowance::Unlimited
    );
    assert_eq!(
        stt(&cfg(true, false, true), 5_000_000),
        SttAllowance::Unlimited
    );
}

#[test]
fn stt_budget_used_on_another_utc_day_counts_as_zero_and_resets_at_midnight() {
    let c = cfg(true, false, false);
    let cr = credit(Credit::WithCredits);
    let st = state(Stage::Throttle);
    let e = resolve(
        &c,
        &EntitlementInput {
            uid: UID,
            mode: Mode::Realtime,
            credits: &cr,
            month: MonthUsage::default(),
            stage: &st,
            totals: RollingTotals::default(),
            totals_known: true,
            caps: c.caps.free,
            under_caps_at_ms: None,
            under_ceiling_at_ms: None,
            stt_today: SttUsage {
                day: SttUsage::day_of(NOW) - 1,
                used_ms: 99_999_999,
            },
            spend_tripped: false,
            now_ms: NOW,
        },
    );
    let midnight = (NOW / DAY_MS + 1) * DAY_MS;
    assert_eq!(
        e.stt,
        SttAllowance::Remaining {
            remaining_ms: 7_200_000,
            daily_limit_ms: 7_200_000,
            used_ms: 0,
            resets_at_ms: midnight
        }
    );
}

#[test]
fn credit_exhaustion_by_plan_f57() {
    let table = free_default();
    let exhausted = |record: Option<&str>, used| {
        table
            .credits(record, MonthUsage { month_ms: used })
            .exhausted()
    };
    assert!(
        !exhausted(Some("unlimited"), u64::MAX),
        "paid plan, even with huge usage"
    );
    assert!(!exhausted(Some("basic"), 1_000), "basic with credits");
    assert!(
        exhausted(Some("basic"), 72_000_000),
        "basic without credits"
    );
    assert!(exhausted(None, 80_000_000), "no plan record and no credits");
    // An exception in the lookup is `Unavailable`: never locks (and STT fails closed).
    assert!(!CreditLookup::Unavailable.exhausted());
    let credits = Credits::of(table.plan(None), 0);
    assert_eq!(credits.remaining_ms(), Some(72_000_000));
}

#[test]
fn exempt_or_kill_switch_over_caps_has_no_triggers_and_no_429_g71() {
    for (kill, exempt, why) in [
        (false, true, Enforcement::Exempt),
        (true, false, Enforcement::KillSwitch),
    ] {
        let e = run(
            &cfg(true, kill, exempt),
            Mode::Sync,
            &state(Stage::Restrict),
            &credit(Credit::WithCredits),
            totals(Caps::Over),
            0,
        );
        assert!(e.caps_triggered.is_empty());
        assert_eq!(e.admission, Admission::Admit);
        assert_eq!(e.enforcement, why);
    }
}

#[test]
fn real_caps_of_the_live_suite_g66() {
    let mut c = cfg(true, false, false);
    c.caps.free = SoftCaps {
        daily_ms: 10_000,
        three_day_ms: 20_000,
        weekly_ms: 30_000,
    };
    let cr = credit(Credit::WithCredits);
    let st = state(Stage::None);
    let caps = |ms| -> Vec<&'static str> {
        run(
            &c,
            Mode::Sync,
            &st,
            &cr,
            RollingTotals {
                daily_ms: ms,
                three_day_ms: ms,
                weekly_ms: ms,
            },
            0,
        )
        .caps_triggered
        .iter()
        .map(|t| t.cap.as_str())
        .collect()
    };
    assert!(caps(9_000).is_empty());
    assert_eq!(caps(11_000), vec!["daily"]);
    assert_eq!(caps(31_000), vec!["daily", "3day", "weekly"]);
    assert!(caps(10_000).is_empty());
}

/// Restricted over a cap and over the hard ceiling at once: (reason, Retry-After s) of the sync refusal.
fn both_refusals(
    restrict_until: u64,
    under_caps_at: u64,
    under_ceiling_at: u64,
) -> (RejectReason, u64) {
    let mut st = state(Stage::Restrict);
    st.restrict_until_ms = Some(restrict_until);
    let cr = credit(Credit::WithCredits);
    let over = 31 * 3_600_000;
    let e = resolve(
        &cfg(true, false, false),
        &EntitlementInput {
            uid: UID,
            mode: Mode::Sync,
            credits: &cr,
            month: MonthUsage::default(),
            stage: &st,
            totals: RollingTotals {
                daily_ms: over,
                three_day_ms: over,
                weekly_ms: over,
            },
            totals_known: true,
            caps: SoftCaps::default(),
            under_caps_at_ms: Some(under_caps_at),
            under_ceiling_at_ms: Some(under_ceiling_at),
            stt_today: SttUsage::default(),
            spend_tripped: false,
            now_ms: NOW,
        },
    );
    assert!(e.over_ceiling);
    match e.admission {
        Admission::Reject {
            reason,
            retry_after_s,
        } => (reason, retry_after_s),
        Admission::Admit => panic!("over a cap while restricted and over the ceiling must reject"),
    }
}

#[test]
fn restricted_and_over_the_ceiling_the_refusal_that_lasts_longer_is_the_answer() {
    let h = 3_600_000;
    // The caps hold the user for 5 days, the ceiling for 20 h: the restriction's refusal.
    assert_eq!(
        both_refusals(NOW + 30 * DAY_MS, NOW + 5 * DAY_MS, NOW + 20 * h),
        (RejectReason::RestrictedOverCap, 5 * 86_400)
    );
    // The restriction ends in 2 h, the ceiling in 20 h: the ceiling's.
    assert_eq!(
        both_refusals(NOW + 2 * h, NOW + 5 * DAY_MS, NOW + 20 * h),
        (RejectReason::SpeechCeiling, 20 * 3_600)
    );
    // A tie: the ceiling (it holds whatever the stage).
    assert_eq!(
        both_refusals(NOW + 30 * DAY_MS, NOW + 20 * h, NOW + 20 * h).0,
        RejectReason::SpeechCeiling
    );
}

#[test]
fn with_unknown_totals_no_cap_and_no_ceiling_applies_and_sync_is_admitted() {
    let mut st = state(Stage::Restrict);
    st.restrict_until_ms = Some(NOW + 30 * DAY_MS);
    let over = 40 * 3_600_000;
    for known in [true, false] {
        let e = resolve(
            &cfg(true, false, false),
            &EntitlementInput {
                uid: UID,
                mode: Mode::Sync,
                credits: &CreditLookup::Unavailable,
                month: MonthUsage::default(),
                stage: &st,
                totals: RollingTotals {
                    daily_ms: over,
                    three_day_ms: over,
                    weekly_ms: over,
                },
                totals_known: known,
                caps: SoftCaps::default(),
                under_caps_at_ms: None,
                under_ceiling_at_ms: None,
                stt_today: SttUsage::default(),
                spend_tripped: false,
                now_ms: NOW,
            },
        );
        assert_eq!(e.over_ceiling, known);
        assert_eq!(e.caps_triggered.is_empty(), !known);
        assert_eq!(e.admission == Admission::Admit, !known, "{:?}", e.admission);
        // Paid STT stays closed either way: the credits are unknown.
        assert!(matches!(
            e.stt,
            SttAllowance::None {
                reason: SttDenied::EntitlementUnknown,
                ..
            }
        ));
    }
}

#[test]
fn the_daily_spend_ceiling_closes_paid_stt_for_everyone_until_midnight_whatever_fair_use_says() {
    let cr = credit(Credit::WithCredits);
    let none = state(Stage::None);
    for c in [
        cfg(true, false, false),
        cfg(false, false, false),
        cfg(true, true, true),
    ] {
        for tripped in [false, true] {
            let e = resolve(
                &c,
                &EntitlementInput {
                    uid: UID,
                    mode: Mode::Realtime,
                    credits: &cr,
                    month: MonthUsage::default(),
                    stage: &none,
                    totals: RollingTotals::default(),
                    totals_known: true,
                    caps: c.caps.free,
                    under_caps_at_ms: None,
                    under_ceiling_at_ms: None,
                    stt_today: SttUsage::default(),
                    spend_tripped: tripped,
                    now_ms: NOW,
                },
            );
            let want = if tripped {
                SttAllowance::None {
                    reason: SttDenied::SpendCeiling,
                    daily_limit_ms: None,
                    used_ms: 0,
                    resets_at_ms: Some((NOW / DAY_MS + 1) * DAY_MS),
                }
            } else {
                SttAllowance::Unlimited
            };
            assert_eq!(e.stt, want, "enabled={} tripped={tripped}", c.enabled);
            assert_eq!(e.admission, Admission::Admit, "audio is always admitted");
        }
    }
    assert_eq!(SttDenied::SpendCeiling.code(), "spend_ceiling");
}
