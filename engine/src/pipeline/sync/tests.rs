//! The sync use case without a server: real fixtures decoded and VAD-segmented, the real meter, fair-use
//! facade, backfill ledger and conversation store in memory, on a manual clock. The HTTP mapping is tested
//! by the server's `sync_*` integration tests.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::conversation::MemoryConversationStore;
use crate::fair_use::{FairUseParts, NoSessions, classifier_from_config};
use crate::meter::{Meter, MeterConfig};
use crate::pipeline::stream::PipelineConfig;
use crate::policy::{FairUseConfig, SttDenied};
use crate::store::MemoryStore;
use crate::store::backfill::MemoryBackfillLedger;
use crate::store::fair_use::{MemoryCooldownLock, MemoryFairUseStore};
use crate::time::ManualClock;

/// Arrival time (epoch ms): mid-day UTC, so a retry after the next midnight is 12 h away.
const T0: u64 = 1_790_000_000_000 - 1_790_000_000_000 % 86_400_000 + 43_200_000;
const DAY_S: u64 = 86_400;

fn fixture(id: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/../fixtures/{id}.bin",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// A device file name recorded `ago_s` before [`T0`].
fn name(ago_s: u64) -> String {
    format!("audio_omi_opus_16000_1_fs160_{}.bin", T0 / 1000 - ago_s)
}

fn file(name: String, path: PathBuf, sha: &str) -> SyncFile {
    SyncFile {
        name,
        path,
        sha256_hex: sha.to_owned(),
    }
}

struct World {
    services: SyncServices,
    conversations: Arc<MemoryConversationStore>,
    ledger: Arc<MemoryBackfillLedger>,
}

fn world(backfill: BackfillConfig) -> World {
    let clock = ManualClock::new(T0);
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            ..MeterConfig::default()
        },
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    let fair_cfg = FairUseConfig::default();
    let classifier =
        classifier_from_config(&fair_cfg, &crate::outbound::Outbound::new(None).unwrap());
    let fair_use = FairUse::start(
        fair_cfg,
        meter,
        FairUseParts {
            store: Arc::new(MemoryFairUseStore::new()),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier,
            sessions: Arc::new(NoSessions),
            plans: Arc::new(crate::store::plans::MemoryPlanStore::default()),
            notifier: None,
            clock: clock.clone(),
        },
    );
    let conversations = Arc::new(MemoryConversationStore::new(clock.clone()));
    let ledger = Arc::new(MemoryBackfillLedger::default());
    World {
        services: SyncServices {
            fair_use,
            conversations: conversations.clone(),
            backfill,
            backfill_ledger: ledger.clone(),
            clock,
            stt: None,
            stt_preroll_ms: 300,
            stt_wait: std::time::Duration::from_secs(60),
            stt_busy: crate::time::Backoff::new(
                std::time::Duration::from_millis(1),
                std::time::Duration::from_millis(5),
            ),
        },
        conversations,
        ledger,
    }
}

fn request(stt: SttAllowance) -> SyncRequest {
    SyncRequest {
        uid: "u".to_owned(),
        locked: false,
        stt,
        target: None,
        arrival_ms: T0,
    }
}

fn unlimited() -> SttAllowance {
    SttAllowance::Unlimited
}

async fn sync(w: &World, files: &[SyncFile], stt: SttAllowance) -> SyncOutcome {
    let analysed = analyse(files, T0 / 1000, &PipelineConfig::default());
    settle(&w.services, request(stt), analysed).await.unwrap()
}

fn done(outcome: SyncOutcome) -> SyncReport {
    match outcome {
        SyncOutcome::Done(report) => report,
        other => panic!("not done: {other:?}"),
    }
}

async fn conversation_count(w: &World) -> usize {
    w.conversations
        .list("u", 100, 0)
        .await
        .unwrap()
        .conversations
        .len()
}

/// Backfill speech charged to the user today (a zero charge reads the total).
async fn backfill_used_ms(w: &World) -> u64 {
    let day = backfill::utc_day(T0);
    match w.ledger.charge("u", day, 0, u64::MAX).await.unwrap() {
        Charge::Granted { used_ms } | Charge::Exhausted { used_ms } => used_ms,
    }
}

#[actix::test]
async fn a_fresh_file_is_metered_once_and_becomes_a_conversation_and_a_reupload_is_a_duplicate() {
    let w = world(BackfillConfig::default());
    let files = [file(name(60), fixture("d01"), "aa")];
    let first = done(sync(&w, &files, unlimited()).await);
    assert!(first.all_ok(), "{first:?}");
    assert_eq!(first.files[0].status, "ok");
    assert!(first.speech_ms > 0, "{first:?}");
    assert_eq!(first.metered_speech_ms, first.speech_ms);
    assert_eq!(first.new_memories.len(), 1, "{first:?}");
    assert_eq!(conversation_count(&w).await, 1);

    // The same content under another name: found again, metered never twice, merged into the same spans.
    let files = [file(name(30), fixture("d01"), "aa")];
    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.files[0].status, "duplicate", "{again:?}");
    assert_eq!(again.speech_ms, first.speech_ms);
    assert_eq!(again.metered_speech_ms, 0);
}

#[actix::test]
async fn a_bad_file_fails_only_itself_and_no_valid_file_says_whose_fault() {
    let w = world(BackfillConfig::default());
    let files = [
        file("notes.txt".into(), fixture("d01"), "bb"),
        file(name(60), fixture("d02"), "cc"),
    ];
    let report = done(sync(&w, &files, unlimited()).await);
    assert!(!report.all_ok());
    assert_eq!(report.files[0].status, "failed");
    assert_eq!(report.files[0].code, Some("invalid_file_format"));
    assert_eq!(report.files[1].status, "ok", "{report:?}");

    // Only the client's faults: final.
    let files = [file("notes.txt".into(), fixture("d01"), "bb")];
    match sync(&w, &files, unlimited()).await {
        SyncOutcome::NoValidFiles {
            report,
            server_side: false,
        } => assert_eq!(report.metered_speech_ms, 0),
        other => panic!("{other:?}"),
    }
    // A saved file that cannot be read is the server's fault: retry.
    let files = [file(name(60), PathBuf::from("/nonexistent/upload"), "dd")];
    match sync(&w, &files, unlimited()).await {
        SyncOutcome::NoValidFiles {
            report,
            server_side: true,
        } => assert_eq!(report.files[0].code, Some("temp_file_unreadable")),
        other => panic!("{other:?}"),
    }
}

#[actix::test]
async fn backdated_speech_over_the_allowance_waits_for_midnight_and_what_fitted_is_kept() {
    // An allowance of 1 ms: any backdated speech is over it.
    let w = world(BackfillConfig {
        allowance_ms: 1,
        ..BackfillConfig::default()
    });
    let files = [
        file(name(60), fixture("d01"), "ee"),
        file(name(8 * DAY_S), fixture("d02"), "ff"),
    ];
    match sync(&w, &files, unlimited()).await {
        SyncOutcome::BackfillAllowanceExhausted {
            report,
            retry_after_s,
        } => {
            assert_eq!(retry_after_s, 12 * 3_600);
            assert_eq!(report.files[0].status, "ok");
            assert_eq!(report.files[1].code, Some("backfill_allowance_exhausted"));
            // The fresh file was metered and joined a conversation; the backdated one was not metered.
            assert_eq!(report.metered_speech_ms, report.files[0].speech_ms);
            assert_eq!(report.new_memories.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // Only backdated files, none fitting: nothing is written.
    let files = [file(name(9 * DAY_S), fixture("d03"), "gg")];
    match sync(&w, &files, unlimited()).await {
        SyncOutcome::BackfillAllowanceExhausted { report, .. } => {
            assert!(report.new_memories.is_empty() && report.metered_speech_ms == 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(conversation_count(&w).await, 1);
}

#[actix::test]
async fn backdated_speech_is_charged_once_and_a_duplicate_gives_its_charge_back() {
    let w = world(BackfillConfig::default());
    let files = [file(name(8 * DAY_S), fixture("d01"), "jj")];
    let first = done(sync(&w, &files, unlimited()).await);
    assert_eq!(first.files[0].status, "ok", "{first:?}");
    assert!(first.metered_speech_ms > 0);
    assert_eq!(backfill_used_ms(&w).await, first.metered_speech_ms);
    // The same content under another backdated name: not metered, so not charged either.
    let files = [file(name(9 * DAY_S), fixture("d01"), "jj")];
    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.files[0].status, "duplicate", "{again:?}");
    assert_eq!(backfill_used_ms(&w).await, first.metered_speech_ms);
    // Fresh speech is never charged.
    let files = [file(name(60), fixture("d02"), "kk")];
    done(sync(&w, &files, unlimited()).await);
    assert_eq!(backfill_used_ms(&w).await, first.metered_speech_ms);
}

#[actix::test]
async fn a_recording_older_than_the_lookback_is_refused_for_good() {
    let w = world(BackfillConfig::default());
    let files = [file(name(40 * DAY_S), fixture("d01"), "hh")];
    match sync(&w, &files, unlimited()).await {
        SyncOutcome::NoValidFiles {
            report,
            server_side: false,
        } => {
            assert_eq!(report.files[0].code, Some("recording_too_old"));
            assert!(report.files[0].duration_ms > 0);
        }
        other => panic!("{other:?}"),
    }
}

/// A batch provider double: answers every request at once with one result per chunk the local engine would
/// send (cut at the speech runs), and records what it received.
#[derive(Default)]
struct BatchDouble {
    /// Per request: (samples in the request, samples forwarded).
    received: std::sync::Mutex<Vec<(usize, u64)>>,
    /// Requests still to refuse `queue_full` (as a full engine queue does), counted down.
    busy: std::sync::atomic::AtomicUsize,
    /// Requests refused `queue_full`.
    refused: std::sync::atomic::AtomicUsize,
}

impl BatchDouble {
    fn forwarded_samples(&self) -> u64 {
        self.received.lock().unwrap().iter().map(|r| r.1).sum()
    }
    fn requests(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl crate::stt::SttProvider for BatchDouble {
    fn kind(&self) -> crate::stt::ProviderKind {
        crate::stt::ProviderKind::Local
    }
    fn open_stream(
        &self,
        _: crate::stt::StreamOptions,
        _: crate::stt::ResultSink,
    ) -> Result<Box<dyn crate::stt::StreamHandle>, crate::stt::SttError> {
        Err(crate::stt::SttError::Closed)
    }
    fn transcribe_batch(
        &self,
        request: crate::stt::BatchRequest,
    ) -> Result<crate::stt::BatchTicket, crate::stt::SttError> {
        use crate::stt::chunk::{MAX_CHUNK_SAMPLES, batch_chunks};
        use std::sync::atomic::Ordering::Relaxed;
        if self
            .busy
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            self.refused.fetch_add(1, Relaxed);
            return Err(crate::stt::SttError::QueueFull { dropped_samples: 0 });
        }
        let mut out = crate::stt::BatchOutput::default();
        for (n, (s, e)) in batch_chunks(&request.samples, &request.speech, MAX_CHUNK_SAMPLES)
            .into_iter()
            .enumerate()
        {
            out.forwarded_samples += (e - s) as u64;
            out.results.push(crate::stt::SttResult {
                kind: crate::stt::ResultKind::Final,
                text: format!("chunk {n}"),
                start_ms: s as u64 / 16,
                end_ms: e as u64 / 16,
                confidence: None,
                words: Vec::new(),
                speaker: None,
            });
        }
        self.received
            .lock()
            .unwrap()
            .push((request.samples.len(), out.forwarded_samples));
        let (reply, ticket) = crate::stt::provider::batch_ticket();
        reply.send(Ok(out));
        Ok(ticket)
    }
}

fn transcribing(w: &mut World) -> Arc<BatchDouble> {
    let double = Arc::new(BatchDouble::default());
    w.services.stt = Some(double.clone());
    double
}

async fn statuses(w: &World, id: &str) -> Vec<TranscriptStatus> {
    let all = w.conversations.span_statuses("u", id).await.unwrap();
    all.values().copied().collect()
}

async fn assert_all_spans_done(w: &World, id: &str) {
    let all = statuses(w, id).await;
    assert!(all.iter().all(|s| *s == TranscriptStatus::Done), "{all:?}");
}

#[actix::test]
async fn spans_are_transcribed_once_and_a_reupload_charges_nothing_again() {
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    let files = [file(name(60), fixture("d01"), "aa")];
    let first = done(sync(&w, &files, unlimited()).await);
    assert_eq!(
        first.transcript_status,
        Some(TranscriptStatus::Done),
        "{first:?}"
    );
    let forwarded = double.forwarded_samples();
    assert!(forwarded > 0);
    assert_eq!(first.stt_ms, crate::time::samples_to_ms(forwarded, 16_000));
    // Only the speech runs were sent, with their pre-roll and hangover: more than the metered speech, far
    // less than the file.
    assert!(first.stt_ms >= first.speech_ms, "{first:?}");
    assert!(first.stt_ms < first.files[0].duration_ms, "{first:?}");
    let id = &first.new_memories[0];
    let segments = w.conversations.transcript("u", id).await.unwrap();
    assert!(!segments.is_empty());
    assert!(
        segments.iter().all(|s| s.id.starts_with("aa:")),
        "{segments:?}"
    );
    let conv = w.conversations.get("u", id).await.unwrap().unwrap();
    // Within the conversation, give or take the first run's pre-roll and the last one's hangover.
    assert!(
        segments
            .iter()
            .all(|s| s.start_ms + 300 >= conv.started_at_ms
                && s.end_ms <= conv.finished_at_ms + transcribe::HANGOVER_MS),
        "{segments:?} {conv:?}"
    );
    assert_all_spans_done(&w, id).await;
    let requests = double.requests();

    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.files[0].status, "duplicate");
    assert_eq!(again.transcript_status, Some(TranscriptStatus::Done));
    assert_eq!(again.stt_ms, 0, "nothing charged twice");
    assert_eq!(double.requests(), requests, "nothing sent twice");
    assert_eq!(w.conversations.transcript("u", id).await.unwrap(), segments);
}

#[actix::test]
async fn an_exhausted_stt_budget_still_writes_the_conversation_and_defers_its_transcript() {
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    let files = [file(name(60), fixture("d01"), "ii")];
    let stt = SttAllowance::None {
        reason: SttDenied::BudgetExhausted,
        daily_limit_ms: Some(60_000),
        used_ms: 60_000,
        resets_at_ms: Some(T0 + 4_500),
    };
    let report = done(sync(&w, &files, stt).await);
    assert_eq!(report.metered_speech_ms, report.speech_ms);
    assert!(report.speech_ms > 0);
    assert_eq!(
        report.transcript_status,
        Some(TranscriptStatus::BudgetExhausted)
    );
    assert_eq!((report.stt_ms, double.requests()), (0, 0), "nothing sent");
    assert_eq!(conversation_count(&w).await, 1);
    // The budget is back (a new day): the re-upload transcribes what was deferred, and meters nothing.
    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.metered_speech_ms, 0);
    assert_eq!(again.transcript_status, Some(TranscriptStatus::Done));
    assert!(again.stt_ms > 0 && double.requests() > 0);
}

#[actix::test]
async fn over_the_speech_ceiling_the_speech_is_metered_and_its_spans_wait_pending() {
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    let files = [file(name(60), fixture("d01"), "ce")];
    let stt = SttAllowance::None {
        reason: SttDenied::SpeechCeiling,
        daily_limit_ms: None,
        used_ms: 0,
        resets_at_ms: Some(T0 + 3_600_000),
    };
    let report = done(sync(&w, &files, stt).await);
    assert!(report.speech_ms > 0);
    assert_eq!(
        report.metered_speech_ms, report.speech_ms,
        "metering goes on"
    );
    assert_eq!(report.transcript_status, Some(TranscriptStatus::Pending));
    assert_eq!((report.stt_ms, double.requests()), (0, 0), "nothing sent");
    assert_eq!(conversation_count(&w).await, 1);
    // Back under it: the re-upload transcribes the waiting spans and meters nothing again.
    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.metered_speech_ms, 0);
    assert_eq!(again.transcript_status, Some(TranscriptStatus::Done));
    assert!(again.stt_ms > 0 && double.requests() > 0);
}

#[actix::test]
async fn a_partial_budget_transcribes_the_spans_it_covers_and_a_reupload_only_the_rest() {
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    // Two files an hour apart: two conversations, one span each at least.
    let files = [
        file(name(7_200), fixture("d01"), "p1"),
        file(name(3_600), fixture("d09"), "p2"),
    ];
    let first_alone = analyse(&files[..1], T0 / 1000, &PipelineConfig::default());
    // What d01 costs with its pre-roll and hangover: transcribed alone, unlimited.
    let first_speech = match &first_alone[0].analysis {
        Ok(fa) => fa.speech_ms,
        Err(e) => panic!("{e:?}"),
    };
    let first_speech = first_speech + first_speech / 2;
    let stt = SttAllowance::Remaining {
        remaining_ms: first_speech + 10,
        daily_limit_ms: 1_800_000,
        used_ms: 0,
        resets_at_ms: T0 + 4_500,
    };
    let report = done(sync(&w, &files, stt).await);
    assert_eq!(report.new_memories.len(), 2, "{report:?}");
    assert_eq!(
        report.transcript_status,
        Some(TranscriptStatus::BudgetExhausted)
    );
    assert!(report.stt_ms <= first_speech + 10, "{report:?}");
    let sent = double.requests();
    let mut all = Vec::new();
    for id in &report.new_memories {
        all.extend(statuses(&w, id).await);
    }
    assert!(all.contains(&TranscriptStatus::Done), "{all:?}");
    assert!(all.contains(&TranscriptStatus::BudgetExhausted), "{all:?}");
    let deferred = all.iter().filter(|s| **s != TranscriptStatus::Done).count();

    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.transcript_status, Some(TranscriptStatus::Done));
    assert_eq!(
        double.requests(),
        sent + deferred,
        "only the deferred spans are sent"
    );
}

#[actix::test]
async fn every_sync_file_leaves_its_evidence_in_audio_time_and_a_reupload_rewrites_it() {
    let w = world(BackfillConfig::default());
    // A fresh file (2 h old) and a backfilled one (3 days old).
    let fresh = file(name(7_200), fixture("d01"), &"a".repeat(64));
    let old = file(name(3 * 86_400), fixture("d02"), &"b".repeat(64));
    let report = done(sync(&w, &[fresh.clone(), old.clone()], unlimited()).await);
    assert!(report.speech_ms > 0);
    let store = w.services.fair_use.ledger().store();
    let sessions = store.sessions("u", 0, 10).await.unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let by_id = |id: &str| {
        sessions
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("{id} in {sessions:?}"))
            .clone()
    };
    let a = by_id(&format!("sync:{}", "a".repeat(24)));
    let b = by_id(&format!("sync:{}", "b".repeat(24)));
    assert_eq!(a.lane, crate::policy::SessionLane::SyncFresh);
    assert_eq!(b.lane, crate::policy::SessionLane::SyncBackfill);
    // In audio time: where the speech happened, as the meter places it.
    assert_eq!(a.started_at_ms, T0 / 1000 * 1000 - 7_200_000);
    assert_eq!(b.started_at_ms, T0 / 1000 * 1000 - 3 * 86_400_000);
    assert_eq!(a.speech_ms + b.speech_ms, report.speech_ms);
    assert!(!a.open && a.audio_ms >= a.speech_ms && a.speech_ms > 0);
    // A re-upload meters nothing and rewrites its own entries: still two.
    let again = done(sync(&w, &[fresh, old], unlimited()).await);
    assert_eq!(again.metered_speech_ms, 0);
    assert_eq!(store.sessions("u", 0, 10).await.unwrap().len(), 2);
}

#[actix::test]
async fn a_span_refused_queue_full_is_offered_again_within_the_run_and_charged_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    double.busy.store(3, Relaxed);
    let files = [file(name(60), fixture("d01"), "qf")];
    let report = done(sync(&w, &files, unlimited()).await);
    assert_eq!(double.refused.load(Relaxed), 3, "three refusals waited out");
    assert_eq!(
        report.transcript_status,
        Some(TranscriptStatus::Done),
        "{report:?}"
    );
    // Charged what the provider took, once: the refused offers sent and charged nothing.
    let forwarded = double.forwarded_samples();
    assert!(forwarded > 0);
    assert_eq!(report.stt_ms, crate::time::samples_to_ms(forwarded, 16_000));
    let id = &report.new_memories[0];
    assert_all_spans_done(&w, id).await;
    assert!(
        !w.conversations
            .transcript("u", id)
            .await
            .unwrap()
            .is_empty()
    );
}

#[actix::test]
async fn a_queue_still_full_at_the_runs_wait_leaves_the_span_pending_for_a_reupload() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut w = world(BackfillConfig::default());
    let double = transcribing(&mut w);
    double.busy.store(usize::MAX, Relaxed);
    w.services.stt_wait = std::time::Duration::from_millis(100);
    w.services.stt_busy = crate::time::Backoff::new(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(20),
    );
    let files = [file(name(60), fixture("d01"), "qp")];
    let report = done(sync(&w, &files, unlimited()).await);
    assert_eq!(report.transcript_status, Some(TranscriptStatus::Pending));
    assert_eq!((report.stt_ms, double.requests()), (0, 0), "nothing sent");
    // Offered again while the next attempt could start within the wait, then left: a bounded run.
    let refused = double.refused.load(Relaxed);
    assert!((2..=11).contains(&refused), "{refused} offers");
    // The queue has room again: the re-upload transcribes the waiting span and meters nothing again.
    double.busy.store(0, Relaxed);
    w.services.stt_wait = std::time::Duration::from_secs(60);
    let again = done(sync(&w, &files, unlimited()).await);
    assert_eq!(again.metered_speech_ms, 0);
    assert_eq!(again.transcript_status, Some(TranscriptStatus::Done));
    assert!(again.stt_ms > 0 && double.requests() > 0);
}
