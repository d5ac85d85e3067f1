//! The create-or-merge rules, pure: both stores run them over the day buckets they read.

use std::collections::{BTreeMap, BTreeSet};

use crate::time::Span;

use super::{
    Conversation, ConversationError, ConversationPage, MAX_CONVERSATION_MS, MAX_LIST_LIMIT,
    MAX_SPANS_PER_CONVERSATION, MERGE_GAP_MS, Upsert, UpsertOutcome, dedup_key, new_id,
    normalise_spans,
};

pub const DAY_MS: u64 = 86_400_000;

/// The UTC day (since the epoch) of an epoch-ms instant.
pub fn day_of(ms: u64) -> u64 {
    ms / DAY_MS
}

/// The day buckets an upsert must read: each span's days with one day of margin on both sides (a
/// conversation lives in the bucket of the day it was created in, and is at most 4 h long), plus the
/// target's bucket.
pub fn days_to_read(spans: &[Span], target: Option<&str>) -> BTreeSet<u64> {
    let mut days = BTreeSet::new();
    for s in spans {
        let first = day_of(s.start).saturating_sub(1);
        let last = day_of(s.end) + 1;
        days.extend(first..=last);
    }
    if let Some(day) = target.and_then(Conversation::day_of_id) {
        days.insert(day);
    }
    days
}

/// How far `span` is from `c` (0 when they overlap), or `None` when joining would exceed the limits.
fn distance(c: &Conversation, span: &Span) -> Option<u64> {
    // After the conversation, before it, or overlapping (both terms 0).
    let gap = span
        .start
        .saturating_sub(c.finished_at_ms)
        .max(c.started_at_ms.saturating_sub(span.end));
    let start = c.started_at_ms.min(span.start);
    let end = c.finished_at_ms.max(span.end);
    (gap < MERGE_GAP_MS
        && end - start <= MAX_CONVERSATION_MS
        && c.spans.len() < MAX_SPANS_PER_CONVERSATION)
        .then_some(gap)
}

/// Adds `span` to `c` unless it is a duplicate; returns whether `c` changed.
fn add_span(c: &mut Conversation, span: Span, locked: bool, now_ms: u64) -> bool {
    let key = dedup_key(&span);
    let mut changed = false;
    if !c.spans.iter().any(|s| dedup_key(s) == key) {
        let at = c.spans.partition_point(|s| *s < span);
        c.spans.insert(at, span);
        c.started_at_ms = c.started_at_ms.min(span.start);
        c.finished_at_ms = c.finished_at_ms.max(span.end);
        changed = true;
    }
    if locked && !c.is_locked {
        c.is_locked = true;
        changed = true;
    }
    if changed {
        c.updated_at_ms = now_ms;
    }
    changed
}

/// Applies `req` to `buckets` (day → that day's conversations, as read). Returns the outcome and the days
/// whose bucket changed (to be written).
pub fn apply_upsert(
    buckets: &mut BTreeMap<u64, Vec<Conversation>>,
    req: &Upsert,
    now_ms: u64,
) -> Result<(UpsertOutcome, BTreeSet<u64>), ConversationError> {
    let spans = normalise_spans(req.spans.clone())?;
    let mut new = BTreeSet::new();
    let mut updated = BTreeSet::new();
    let mut changed_days = BTreeSet::new();

    if let Some(target) = &req.target {
        // A conversation holds speech of one lock state: a target of the other state is not joined.
        let found = Conversation::day_of_id(target).and_then(|day| {
            buckets
                .get_mut(&day)
                .and_then(|b| {
                    b.iter_mut()
                        .find(|c| &c.id == target && c.is_locked == req.locked)
                })
                .map(|c| (day, c))
        });
        if let Some((day, c)) = found {
            let mut changed = false;
            for span in &spans {
                changed |= add_span(c, *span, req.locked, now_ms);
            }
            if spans.is_empty() && req.locked && !c.is_locked {
                c.is_locked = true;
                c.updated_at_ms = now_ms;
                changed = true;
            }
            updated.insert(c.id.clone());
            if changed {
                changed_days.insert(day);
            }
            return Ok((outcome(new, updated), changed_days));
        }
        // A missing target falls back to the time rules (the reference does the same), and so does one
        // of the other lock state.
    }

    for span in spans {
        let mut best: Option<(u64, u64, usize)> = None; // (distance, day, index)
        for (day, bucket) in buckets.iter() {
            // Locked speech never joins an unlocked conversation (a downgrade never re-locks what was
            // unlocked), nor unlocked speech a locked one: each starts its own.
            for (i, c) in bucket
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_locked == req.locked)
            {
                if let Some(d) = distance(c, &span)
                    && best.is_none_or(|(bd, _, _)| d < bd)
                {
                    best = Some((d, *day, i));
                }
            }
        }
        match best {
            Some((_, day, i)) => {
                let Some(c) = buckets.get_mut(&day).and_then(|b| b.get_mut(i)) else {
                    continue; // unreachable: indices come from the loop above
                };
                if add_span(c, span, req.locked, now_ms) {
                    changed_days.insert(day);
                }
                if !new.contains(&c.id) {
                    updated.insert(c.id.clone());
                }
            }
            None => {
                let day = day_of(span.start);
                let c = Conversation {
                    id: new_id(day),
                    started_at_ms: span.start,
                    finished_at_ms: span.end,
                    spans: vec![span],
                    is_locked: req.locked,
                    source: req.source.clone(),
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                };
                new.insert(c.id.clone());
                buckets.entry(day).or_default().push(c);
                changed_days.insert(day);
            }
        }
    }
    Ok((outcome(new, updated), changed_days))
}

fn outcome(new: BTreeSet<String>, mut updated: BTreeSet<String>) -> UpsertOutcome {
    updated.retain(|id| !new.contains(id));
    UpsertOutcome {
        new: new.into_iter().collect(),
        updated: updated.into_iter().collect(),
    }
}

/// Clears every lock in `bucket`; returns how many were cleared.
pub(super) fn unlock_bucket(bucket: &mut [Conversation], now_ms: u64) -> u64 {
    let mut n = 0;
    for c in bucket.iter_mut().filter(|c| c.is_locked) {
        c.is_locked = false;
        c.updated_at_ms = now_ms;
        n += 1;
    }
    n
}

/// One page of `all` (any order), newest first; `limit` clamped to 1..=[`MAX_LIST_LIMIT`].
pub(super) fn page(mut all: Vec<Conversation>, limit: usize, offset: usize) -> ConversationPage {
    let limit = limit.clamp(1, MAX_LIST_LIMIT);
    sort_newest_first(&mut all);
    let more = all.len() > offset.saturating_add(limit);
    ConversationPage {
        conversations: all.into_iter().skip(offset).take(limit).collect(),
        more,
    }
}

/// Newest first.
pub(super) fn sort_newest_first(bucket: &mut [Conversation]) {
    bucket.sort_by(|a, b| {
        b.started_at_ms
            .cmp(&a.started_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_790_000_000_000;

    fn req(spans: &[(u64, u64)], locked: bool) -> Upsert {
        Upsert {
            uid: "u".into(),
            spans: spans
                .iter()
                .map(|&(s, e)| Span {
                    start: T0 + s,
                    end: T0 + e,
                })
                .collect(),
            locked,
            source: "omi".into(),
            target: None,
        }
    }

    fn run(buckets: &mut BTreeMap<u64, Vec<Conversation>>, r: &Upsert) -> UpsertOutcome {
        apply_upsert(buckets, r, T0).map(|(o, _)| o).unwrap()
    }

    #[test]
    fn close_spans_share_a_conversation_far_ones_do_not() {
        let mut b = BTreeMap::new();
        let o = run(
            &mut b,
            &req(
                &[(0, 30_000), (100_000, 130_000), (400_000, 410_000)],
                false,
            ),
        );
        assert_eq!(o.new.len(), 2, "{o:?}");
        assert!(o.updated.is_empty());
        let all: Vec<_> = b.values().flatten().collect();
        assert_eq!(all.iter().map(|c| c.spans.len()).sum::<usize>(), 3);
    }

    #[test]
    fn a_gap_of_exactly_the_merge_distance_does_not_merge() {
        let mut b = BTreeMap::new();
        let o = run(
            &mut b,
            &req(&[(0, 1_000), (1_000 + MERGE_GAP_MS, 200_000)], false),
        );
        assert_eq!(o.new.len(), 2);
    }

    #[test]
    fn the_same_spans_again_answer_the_same_ids_and_change_nothing() {
        let mut b = BTreeMap::new();
        let r = req(&[(0, 30_000), (500_000, 510_000)], false);
        let first = run(&mut b, &r);
        let before = b.clone();
        let (again, changed) = apply_upsert(&mut b, &r, T0 + 5).unwrap();
        assert!(again.new.is_empty());
        assert_eq!(again.updated, first.new);
        assert!(changed.is_empty());
        assert_eq!(b, before);
    }

    #[test]
    fn speech_of_another_lock_state_starts_its_own_conversation_and_unlocking_merges_nothing() {
        let mut b = BTreeMap::new();
        let a = run(&mut b, &req(&[(0, 30_000)], false));
        let locked = run(&mut b, &req(&[(40_000, 50_000)], true));
        assert_eq!(locked.new.len(), 1, "not merged into the unlocked one");
        let later = run(&mut b, &req(&[(55_000, 60_000)], true));
        assert_eq!(
            later.updated, locked.new,
            "locked speech joins the locked one"
        );
        let free = run(&mut b, &req(&[(62_000, 70_000)], false));
        assert_eq!(
            free.updated, a.new,
            "unlocked speech joins the unlocked one"
        );
        // A target of the other state is not joined either.
        let mut targeted = req(&[(72_000, 75_000)], true);
        targeted.target = a.new.first().cloned();
        assert_eq!(run(&mut b, &targeted).updated, locked.new);
        let all: Vec<_> = b.values().flatten().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all.iter().filter(|c| c.is_locked).count(), 1);
        let n: u64 = b.values_mut().map(|v| unlock_bucket(v, T0)).sum();
        assert_eq!(n, 1);
        assert!(!b.values().flatten().any(|c| c.is_locked));
    }

    #[test]
    fn a_target_takes_every_span_and_a_missing_target_falls_back() {
        let mut b = BTreeMap::new();
        let first = run(&mut b, &req(&[(0, 30_000)], false));
        let mut r = req(&[(2 * 3_600_000, 2 * 3_600_000 + 5_000)], false);
        r.target = Some(first.new[0].clone());
        let o = run(&mut b, &r);
        assert_eq!(o.updated, first.new);
        r.target = Some("1-deadbeef".into());
        r.spans[0].start += 1;
        let o = run(&mut b, &r);
        assert_eq!(
            o.updated, first.new,
            "joins the conversation that now spans it"
        );
    }

    #[test]
    fn conversations_stop_growing_at_the_length_limit() {
        let mut b = BTreeMap::new();
        let step = 60_000;
        let spans: Vec<(u64, u64)> = (0..300).map(|i| (i * step, i * step + 30_000)).collect();
        run(&mut b, &req(&spans, false));
        for c in b.values().flatten() {
            assert!(c.finished_at_ms - c.started_at_ms <= MAX_CONVERSATION_MS);
        }
        assert!(b.values().flatten().count() >= 2);
    }

    #[test]
    fn ids_carry_their_day() {
        let id = new_id(20_123);
        assert_eq!(Conversation::day_of_id(&id), Some(20_123));
        assert_eq!(Conversation::day_of_id("nodash"), None);
        assert_eq!(Conversation::day_of_id("12-"), None);
        assert_eq!(Conversation::day_of_id("12-a/b"), None);
        assert_eq!(Conversation::day_of_id("x-abc"), None);
    }
}
