//! The stage machine: escalation one step per gated classification (omi §7 C41, F61, G67), decay on read,
//! admin set-stage and reset (H75), case refs (H78).

use std::collections::HashSet;

use voicegate_engine::policy::stage::DAY_MS;
use voicegate_engine::policy::{
    BreachContext, CapKind, CaseRef, EventKind, RollingTotals, SoftCaps, Stage, StagePolicy,
    StageState, UsageType, Verdict, admin_reset, admin_set_stage, decay_events, escalate,
};

const NOW: u64 = 1_790_000_000_000;
const HOUR: u64 = 3_600_000;

fn verdict(score: f64) -> Verdict {
    Verdict {
        misuse_score: score,
        usage_type: if score >= 0.7 {
            UsageType::Audiobook
        } else {
            UsageType::None
        },
        confidence: 0.9,
        evidence: Vec::new(),
        reasoning: String::new(),
        model: "test".into(),
        classifier_failed: None,
    }
}

fn breach() -> BreachContext {
    BreachContext {
        trigger: Some(CapKind::Daily),
        totals: RollingTotals {
            daily_ms: 11_000,
            three_day_ms: 11_000,
            weekly_ms: 11_000,
        },
        caps: SoftCaps::default(),
    }
}

/// A state at `stage` with `n` violations in the last 7 days (all within the last few hours).
fn at(stage: Stage, n: u64) -> StageState {
    let violations: Vec<u64> = (0..n).map(|i| NOW - (i + 1) * HOUR).rev().collect();
    let mut s = StageState {
        stage,
        since_ms: Some(NOW - HOUR),
        last_violation_at_ms: violations.last().copied(),
        violations_ms: violations,
        updated_at_ms: NOW - HOUR,
        ..Default::default()
    };
    match stage {
        Stage::Throttle => s.throttle_until_ms = Some(NOW + 6 * DAY_MS),
        Stage::Restrict => s.restrict_until_ms = Some(NOW + 29 * DAY_MS),
        _ => {}
    }
    s
}

fn step(s: &StageState, score: f64) -> (StageState, voicegate_engine::policy::FairUseEvent) {
    escalate(
        s,
        &StagePolicy::default(),
        &verdict(score),
        &breach(),
        NOW,
        CaseRef::from_bits(0xC0FFEE),
    )
}

#[test]
fn escalation_table_of_the_reference_c41_f61_g67() {
    // (stage, earlier 7-day violations, score) → new stage
    let rows = [
        (Stage::None, 0, 0.85, Stage::Warning),
        (Stage::None, 0, 0.3, Stage::None),
        (Stage::Warning, 3, 0.9, Stage::Throttle),
        (Stage::Throttle, 4, 0.95, Stage::Restrict),
        (Stage::Warning, 1, 0.9, Stage::Warning),
        (Stage::None, 3, 0.1, Stage::None),
        (Stage::None, 0, 0.8, Stage::Warning),
        (Stage::Warning, 2, 0.8, Stage::Throttle),
        (Stage::Throttle, 3, 0.8, Stage::Restrict),
        (Stage::Throttle, 2, 0.99, Stage::Throttle),
        (Stage::Restrict, 9, 1.0, Stage::Restrict),
        (Stage::None, 0, 0.7, Stage::Warning),
        (Stage::None, 0, 0.699_999, Stage::None),
    ];
    for (stage, n, score, want) in rows {
        let (next, event) = step(&at(stage, n), score);
        assert_eq!(next.stage, want, "{stage:?} n={n} score={score}");
        assert_eq!((event.previous_stage, event.new_stage), (stage, want));
        assert_eq!(event.violations_7d, u32::try_from(n).unwrap());
        assert_eq!(event.kind, EventKind::Classification);
    }
}

#[test]
fn a_benign_score_leaves_the_state_untouched_but_still_records_an_event() {
    let s = at(Stage::None, 0);
    let (next, event) = step(&s, 0.3);
    assert_eq!(next, s, "state not updated (C41)");
    assert!(!event.violation && !event.changed());
    assert_eq!(event.classifier.map(|v| v.misuse_score), Some(0.3));
}

#[test]
fn only_gated_classifications_count_as_violations() {
    let mut s = at(Stage::Warning, 1);
    for _ in 0..5 {
        s = step(&s, 0.2).0;
    }
    assert_eq!(
        s.violations_ms.len(),
        1,
        "benign runs never count (the reference counted every event, §8.8)"
    );
    let (s, e) = step(&s, 0.9);
    assert!(e.violation);
    assert_eq!((s.stage, s.violations_ms.len()), (Stage::Warning, 2));
}

#[test]
fn violations_older_than_seven_days_do_not_count_toward_throttle() {
    let mut s = at(Stage::Warning, 0);
    s.violations_ms = vec![NOW - 8 * DAY_MS, NOW - 7 * DAY_MS - 1];
    assert_eq!(step(&s, 0.9).0.stage, Stage::Warning);
    s.violations_ms.push(NOW - 7 * DAY_MS);
    s.violations_ms.push(NOW - DAY_MS);
    assert_eq!(
        step(&s, 0.9).0.stage,
        Stage::Throttle,
        "a violation exactly 7 days old still counts"
    );
}

#[test]
fn entering_throttle_and_restrict_sets_their_untils_and_the_case_ref() {
    let (t, e) = step(&at(Stage::Warning, 2), 0.9);
    assert_eq!(t.throttle_until_ms, Some(NOW + 7 * DAY_MS));
    assert_eq!(t.last_case_ref.as_ref(), Some(&e.case_ref));
    let (r, _) = step(&at(Stage::Throttle, 3), 0.9);
    assert_eq!(r.restrict_until_ms, Some(NOW + 30 * DAY_MS));
    assert_eq!(r.throttle_until_ms, None);
}

#[test]
fn a_user_who_keeps_breaching_climbs_one_step_per_cooldown() {
    let policy = StagePolicy::default();
    let mut s = StageState::default();
    let mut stages = Vec::new();
    for i in 0..5u64 {
        let now = NOW + i * 12 * HOUR;
        let (next, _) = escalate(
            &s.decayed(&policy, now).0,
            &policy,
            &verdict(0.9),
            &breach(),
            now,
            CaseRef::from_bits(i),
        );
        s = next;
        stages.push(s.stage);
    }
    // warning at t0; still warning at +12 h (1 earlier); throttle at +24 h (2); restrict at +36 h (3).
    assert_eq!(
        stages,
        vec![
            Stage::Warning,
            Stage::Warning,
            Stage::Throttle,
            Stage::Restrict,
            Stage::Restrict
        ]
    );
}

#[test]
fn decay_steps_down_the_ladder_at_scheduled_instants_regardless_of_when_read() {
    let policy = StagePolicy::default();
    let (r, _) = step(&at(Stage::Throttle, 3), 0.9);
    let restrict_until = NOW + 30 * DAY_MS;
    let throttle_until = restrict_until + 7 * DAY_MS;
    let none_at = throttle_until + 30 * DAY_MS;
    assert_eq!(
        r.decayed(&policy, restrict_until - 1).0.stage,
        Stage::Restrict
    );
    assert_eq!(r.decayed(&policy, restrict_until).0.stage, Stage::Throttle);
    assert_eq!(
        r.decayed(&policy, throttle_until - 1).0.stage,
        Stage::Throttle
    );
    assert_eq!(r.decayed(&policy, throttle_until).0.stage, Stage::Warning);
    assert_eq!(r.decayed(&policy, none_at - 1).0.stage, Stage::Warning);
    // Read once, very late: all three steps, each at its own instant.
    let (late, steps) = r.decayed(&policy, none_at + 365 * DAY_MS);
    assert_eq!(late.stage, Stage::None);
    let got: Vec<(Stage, Stage, u64)> = steps.iter().map(|s| (s.from, s.to, s.at_ms)).collect();
    assert_eq!(
        got,
        vec![
            (Stage::Restrict, Stage::Throttle, restrict_until),
            (Stage::Throttle, Stage::Warning, throttle_until),
            (Stage::Warning, Stage::None, none_at),
        ]
    );
    // Read step by step: the same end state.
    let mut s = r.clone();
    for t in [restrict_until, throttle_until, none_at] {
        s = s.decayed(&policy, t).0;
    }
    assert_eq!(s.stage, late.stage);
    assert!(
        late.violations_ms.is_empty(),
        "violations older than 30 days are forgotten"
    );
    let events = decay_events(&steps, || CaseRef::from_bits(7));
    assert!(
        events
            .iter()
            .all(|e| e.kind == EventKind::Decay && e.changed())
    );
}

#[test]
fn a_violation_while_at_warning_restarts_its_thirty_quiet_days() {
    let policy = StagePolicy::default();
    let (w, _) = step(&at(Stage::None, 0), 0.9);
    let (w2, _) = escalate(
        &w,
        &policy,
        &verdict(0.9),
        &breach(),
        NOW + 20 * DAY_MS,
        CaseRef::from_bits(2),
    );
    assert_eq!(
        w2.decayed(&policy, NOW + 30 * DAY_MS).0.stage,
        Stage::Warning
    );
    assert_eq!(w2.decayed(&policy, NOW + 50 * DAY_MS).0.stage, Stage::None);
}

#[test]
fn admin_set_stage_and_reset_h75() {
    let policy = StagePolicy::default();
    let s = at(Stage::Throttle, 2);
    let (w, e) = admin_set_stage(
        &s,
        &policy,
        Stage::Warning,
        "ops@x",
        NOW,
        CaseRef::from_bits(1),
    );
    assert_eq!(
        (w.stage, w.throttle_until_ms, w.restrict_until_ms),
        (Stage::Warning, None, None)
    );
    assert_eq!(
        (e.kind, e.actor.as_deref()),
        (EventKind::AdminSetStage, Some("ops@x"))
    );
    let (r, _) = admin_set_stage(
        &w,
        &policy,
        Stage::Restrict,
        "ops@x",
        NOW,
        CaseRef::from_bits(2),
    );
    assert_eq!(r.restrict_until_ms, Some(NOW + 30 * DAY_MS));
    let (n, _) = admin_set_stage(
        &r,
        &policy,
        Stage::None,
        "ops@x",
        NOW,
        CaseRef::from_bits(3),
    );
    assert_eq!(
        (
            n.stage,
            n.throttle_until_ms,
            n.restrict_until_ms,
            n.last_case_ref
        ),
        (Stage::None, None, None, None)
    );
    assert_eq!(
        n.violations_ms.len(),
        2,
        "set-stage keeps the violation history"
    );
    let (z, e) = admin_reset(&r, "ops@x", NOW, CaseRef::from_bits(4));
    assert_eq!((z.stage, z.violations_ms.len()), (Stage::None, 0));
    assert_eq!(
        (e.kind, e.previous_stage),
        (EventKind::AdminReset, Stage::Restrict)
    );
    assert!("ban".parse::<Stage>().is_err());
    assert_eq!("throttle".parse::<Stage>(), Ok(Stage::Throttle));
}

#[test]
fn case_refs_are_fu_and_twelve_upper_hex_and_a_hundred_random_ones_are_unique_h78() {
    use rand::RngExt as _;
    let mut rng = rand::rng();
    let refs: HashSet<String> = (0..100)
        .map(|_| CaseRef::from_bits(rng.random()).to_string())
        .collect();
    assert_eq!(refs.len(), 100);
    assert!(refs.iter().all(|r| CaseRef::parse(r).is_ok()));
}
