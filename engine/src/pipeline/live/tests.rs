//! The session core on virtual time: no socket, no server, no store. Audio is the first seconds of fixture
//! `d01` (speech 598–2738 ms, 3876–6141 ms, …), decoded to 16 kHz PCM, and digital silence.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::contract::{FrameCounts, InFlight, Lifecycle, SttCommand};
use super::core::SessionCore;
use super::events::LiveEvent;
use super::ops::{OpResult, StoreOp};
use super::{LiveConfig, SessionParams};
use crate::audio::codec::{Codec, Decoder};
use crate::audio::vad::SileroModel;
use crate::fair_use::FairUseStatus;
use crate::fair_use::facade::PerWindow;
use crate::pipeline::stream::SpeechPipeline;
use crate::policy::SpeechMs;
use crate::policy::{CreditLookup, Enforcement, Stage, SttAllowance, SttDenied};

/// Wall clock of the session's start (epoch ms).
const WALL0: u64 = 1_795_737_600_000;
/// 10 ms of PCM16 at 16 kHz.
const FRAME: usize = 320;

/// `d01` decoded to 16-bit little-endian PCM at 16 kHz.
fn speech_pcm() -> Vec<u8> {
    let path = format!("{}/../fixtures/d01.bin", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut decoder = Decoder::new(Codec::opus(16_000).unwrap()).unwrap();
    let mut samples = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        decoder.decode(&rest[4..4 + len], &mut samples).unwrap();
        rest = &rest[4 + len..];
    }
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
        .collect()
}

/// A session core, its virtual time, and everything it put out.
struct Session {
    core: SessionCore,
    now: Instant,
    pcm: Arc<Vec<u8>>,
    /// Bytes of `pcm` fed so far.
    at: usize,
    seq: u32,
    events: Vec<LiveEvent>,
    stt: Vec<SttCommand>,
    /// Answer meter operations at once as accepted (a healthy meter); off, they stay in flight.
    auto_meter: bool,
}

impl Session {
    fn new(conversation_timeout_ms: u64) -> Self {
        let cfg = LiveConfig::default();
        let pipeline =
            SpeechPipeline::for_codec(Codec::Pcm16, &cfg.pipeline, SileroModel::shared().unwrap())
                .unwrap();
        let params = SessionParams {
            uid: Arc::from("u"),
            codec: Codec::Pcm16,
            language: "en".to_owned(),
            conversation_timeout_ms,
        };
        let now = Instant::now();
        Session {
            core: SessionCore::new(params, cfg, pipeline, now, WALL0),
            now,
            pcm: Arc::new(speech_pcm()),
            at: 0,
            seq: 0,
            events: Vec::new(),
            stt: Vec::new(),
            auto_meter: true,
        }
    }

    fn counts(&self) -> FrameCounts {
        FrameCounts {
            received: u64::from(self.seq),
            ..FrameCounts::default()
        }
    }

    /// `ms` of stream time in 50 ms ticks: five 10 ms frames of speech (or of silence), the VAD step,
    /// the tick. Returns the store operations the core asked for on the way (each left in flight).
    fn stream(&mut self, ms: u64, silence: bool) -> Vec<StoreOp> {
        let mut ops = Vec::new();
        for _ in 0..ms / 50 {
            for _ in 0..5 {
                self.seq += 1;
                let frame = if silence {
                    vec![0u8; FRAME]
                } else {
                    let f = self.pcm[self.at..self.at + FRAME].to_vec();
                    self.at += FRAME;
                    f
                };
                self.core.push_frame(self.seq, &frame);
            }
            self.core.run_vad();
            self.now += Duration::from_millis(50);
            self.core.tick(self.now, self.counts());
            if let Some(op) = self.core.next_op(WALL0) {
                if self.auto_meter && matches!(op, StoreOp::Meter { .. }) {
                    self.accept(&op);
                }
                ops.push(op);
            }
            self.collect();
        }
        ops
    }

    fn collect(&mut self) {
        self.events.extend(self.core.take_events());
        self.stt.extend(self.core.take_stt().0);
    }

    fn kinds(&self) -> Vec<&'static str> {
        self.events.iter().map(LiveEvent::kind).collect()
    }

    fn done(&mut self, result: OpResult) {
        self.core.op_done(result);
        self.collect();
    }

    /// Answers a meter operation as the meter accepting it.
    fn accept(&mut self, op: &StoreOp) {
        let StoreOp::Meter {
            total_ms,
            stt_ms,
            evidence,
            ..
        } = op
        else {
            panic!("not a meter op: {op:?}");
        };
        self.done(OpResult::Meter {
            metered_to: Some(*total_ms),
            stt_recorded: *stt_ms,
            evidence_written: evidence.is_some(),
        });
    }

    fn forwarded_ms(&self) -> u64 {
        self.core.stt_forwarded_ms()
    }

    /// Samples of the `Audio` commands so far.
    fn audio_samples(&self) -> u64 {
        self.stt
            .iter()
            .map(|c| match c {
                SttCommand::Audio { start, end } => end - start,
                _ => 0,
            })
            .sum()
    }
}

fn status(stage: Stage, locked: bool, stt: SttAllowance) -> OpResult {
    let zero = PerWindow {
        daily: 0.0,
        three_day: 0.0,
        weekly: 0.0,
    };
    OpResult::Status {
        first: false,
        status: Box::new(FairUseStatus {
            stage,
            enforced_stage: stage,
            enforcement: Enforcement::Active,
            case_ref: None,
            message: String::new(),
            speech_ms: SpeechMs {
                daily_ms: 0,
                three_day_ms: 0,
                weekly_ms: 0,
                month_ms: 0,
            },
            speech_hours: zero,
            limits_hours: zero,
            ceiling_hours: None,
            over_ceiling: false,
            usage_pct: zero,
            stt,
            credits: CreditLookup::Unavailable,
            locked,
            totals_known: true,
            notice: None,
            thresholds: Vec::new(),
        }),
        announce: Vec::new(),
    }
}

fn first(result: OpResult) -> OpResult {
    match result {
        OpResult::Status {
            status, announce, ..
        } => OpResult::Status {
            first: true,
            status,
            announce,
        },
        other => other,
    }
}

/// A started session whose first status read answered "unlimited".
fn running(conversation_timeout_ms: u64) -> Session {
    let mut s = Session::new(conversation_timeout_ms);
    assert_eq!(s.core.next_op(WALL0), Some(StoreOp::Status { first: true }));
    s.done(first(status(Stage::None, false, SttAllowance::Unlimited)));
    s
}

#[test]
fn a_threshold_to_announce_becomes_one_usage_threshold_event_with_its_figures() {
    let mut s = Session::new(60_000);
    assert_eq!(s.core.next_op(WALL0), Some(StoreOp::Status { first: true }));
    let notice = crate::policy::notice::thresholds_reached(
        &crate::policy::SoftCaps::default(),
        &crate::policy::RollingTotals {
            daily_ms: 6_000_000,
            three_day_ms: 6_000_000,
            weekly_ms: 6_000_000,
        },
    );
    assert_eq!(notice.len(), 1, "daily 80 %: {notice:?}");
    let OpResult::Status { status, .. } =
        first(status(Stage::None, false, SttAllowance::Unlimited))
    else {
        unreachable!()
    };
    s.done(OpResult::Status {
        first: true,
        status,
        announce: notice.clone(),
    });
    let told: Vec<&LiveEvent> = s
        .events
        .iter()
        .filter(|e| matches!(e, LiveEvent::UsageThreshold { .. }))
        .collect();
    assert_eq!(told.len(), 1);
    let json = serde_json::to_value(told[0]).unwrap();
    assert_eq!(json["type"], "usage_threshold");
    assert_eq!(json["cap"], "daily");
    assert_eq!(json["level_pct"], 80);
    assert_eq!(json["speech_ms"], 6_000_000);
    assert_eq!(json["limit_ms"], 7_200_000);
    assert_eq!(json["message"], notice[0].message.as_str());
}

#[test]
fn the_first_status_read_comes_first_and_stt_waits_for_it() {
    let mut s = Session::new(60_000);
    assert_eq!(s.core.lifecycle(), Lifecycle::Starting);
    assert_eq!(s.core.next_op(WALL0), Some(StoreOp::Status { first: true }));
    assert_eq!(s.core.in_flight(), InFlight::Status { first: true });
    // The store is slow: three seconds of speech pass with the first read still in flight.
    let ops = s.stream(3_000, false);
    assert!(ops.is_empty(), "one operation at a time: {ops:?}");
    assert_eq!(s.kinds(), ["speech_started", "speech_ended"]);
    assert_eq!(
        s.forwarded_ms(),
        0,
        "nothing forwarded while the entitlement is unknown"
    );
    s.done(first(status(Stage::None, false, SttAllowance::Unlimited)));
    assert!(
        s.forwarded_ms() > 1_500,
        "the deferred run is forwarded once allowed"
    );
    assert_eq!(
        s.kinds(),
        ["speech_started", "speech_ended"],
        "no usage event for the first read"
    );
}

#[test]
fn speech_is_metered_each_second_and_the_finish_settles_exactly() {
    let mut s = running(60_000);
    let mut metered = 0;
    for _ in 0..7 {
        for op in s.stream(1_000, false) {
            let StoreOp::Meter { delta_ms, .. } = op else {
                panic!("{op:?}");
            };
            metered += delta_ms;
        }
    }
    assert!(
        metered > 3_000,
        "two runs metered as they happened: {metered}"
    );
    assert!(!s.core.begin_finish(), "nothing in flight");
    s.core.end_of_stream();
    while let Some(op) = s.core.next_op(WALL0) {
        assert!(matches!(op, StoreOp::Conversation { .. }), "{op:?}");
        s.done(OpResult::Conversation {
            stored: Ok("c1".to_owned()),
            speech_ms: 0,
            locked: false,
        });
    }
    let op = s
        .core
        .final_meter_op(WALL0)
        .expect("the final record carries the session's evidence");
    let StoreOp::Meter {
        delta_ms,
        evidence: Some(evidence),
        ..
    } = &op
    else {
        panic!("{op:?}");
    };
    metered += delta_ms;
    assert!(!s.core.settled(), "not before the evidence is written");
    s.accept(&op);
    assert!(s.core.settled());
    let report = s.core.finish(s.counts());
    s.collect();
    assert_eq!(report.metered_ms, metered);
    assert!(!evidence.open && evidence.id.starts_with("rt:"));
    assert_eq!(
        (
            evidence.audio_ms,
            evidence.speech_ms,
            evidence.started_at_ms
        ),
        (7_000, metered, WALL0)
    );
    assert!(evidence.speech_runs >= 2 && evidence.longest_speech_ms > 0);
    assert_eq!(
        report.speech_ms, metered,
        "the metered sum is the reported speech, to the ms"
    );
    assert_eq!(report.frames_received, 700);
    assert_eq!(report.audio_ms, 7_000);
    assert_eq!(s.core.lifecycle(), Lifecycle::Finished);
    assert_eq!(s.kinds().last(), Some(&"metadata"));
    assert_eq!(s.stt.last(), Some(&SttCommand::Close));
}

#[test]
fn an_open_sessions_evidence_is_rewritten_every_interval() {
    let mut s = running(600_000);
    let mut evidence = Vec::new();
    for second in 0..61 {
        for op in s.stream(1_000, second >= 25) {
            match op {
                StoreOp::Meter {
                    evidence: Some(e), ..
                } => evidence.push(e),
                StoreOp::Status { first: false } => {
                    s.done(status(Stage::None, false, SttAllowance::Unlimited));
                }
                _ => {}
            }
        }
    }
    assert_eq!(evidence.len(), 1, "once a minute");
    assert!(evidence[0].open);
    assert!(
        (59_000..=61_000).contains(&evidence[0].audio_ms),
        "{:?}",
        evidence[0]
    );
    assert!(evidence[0].speech_ms > 0 && evidence[0].speech_density > 0.0);
}

#[test]
fn silence_closes_the_conversation_through_a_store_write() {
    let mut s = running(1_000);
    s.stream(3_000, false);
    let ops = s.stream(1_500, true);
    let conv = ops
        .iter()
        .find(|op| matches!(op, StoreOp::Conversation { .. }))
        .expect("a second of silence closes the conversation");
    let StoreOp::Conversation { spans, locked, .. } = conv else {
        unreachable!()
    };
    assert_eq!(spans.len(), 1);
    assert!(spans[0].start >= WALL0 + 500 && spans[0].end <= WALL0 + 3_000);
    assert!(!locked);
    assert!(
        !s.kinds().contains(&"conversation_closed"),
        "announced only once written"
    );
    s.done(OpResult::Conversation {
        stored: Ok("c1".to_owned()),
        speech_ms: 2_000,
        locked: false,
    });
    assert_eq!(s.kinds().last(), Some(&"conversation_closed"));
}

#[test]
fn a_mid_session_restriction_locks_and_closes_the_stt_budget() {
    let mut s = running(60_000);
    let mut status_op = None;
    for op in s.stream(10_500, false) {
        match op {
            StoreOp::Meter { .. } => {}
            StoreOp::Status { first: false } => status_op = Some(op),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        status_op.is_some(),
        "the status is re-read every usage interval"
    );
    let before = s.forwarded_ms();
    s.done(status(
        Stage::Restrict,
        true,
        SttAllowance::None {
            reason: SttDenied::BudgetExhausted,
            daily_limit_ms: Some(1_800_000),
            used_ms: 1_800_000,
            resets_at_ms: Some(WALL0 + 3_600_000),
        },
    ));
    let kinds = s.kinds();
    let tail = &kinds[kinds.len() - 3..];
    assert_eq!(tail, ["usage", "fair_use", "stt_budget_exhausted"]);
    assert!(matches!(
        s.events.iter().rev().nth(1),
        Some(LiveEvent::FairUse {
            stage: Stage::Restrict,
            locked: true,
            ..
        })
    ));
    s.stream(5_000, false);
    assert_eq!(
        s.forwarded_ms(),
        before,
        "speech is still metered, no longer forwarded"
    );
    assert!(
        s.kinds()
            .iter()
            .filter(|k| **k == "stt_budget_exhausted")
            .count()
            == 1,
        "announced once"
    );
}

#[test]
fn a_failing_meter_keeps_the_speech_pending_and_sends_it_again() {
    let mut s = running(60_000);
    s.auto_meter = false;
    let ops = s.stream(3_000, false);
    let meters: Vec<_> = ops
        .iter()
        .filter_map(|op| match op {
            StoreOp::Meter { delta_ms, .. } => Some(*delta_ms),
            _ => None,
        })
        .collect();
    assert_eq!(meters.len(), 1, "one in flight at a time: {ops:?}");
    // The store fails every record.
    s.done(OpResult::Meter {
        metered_to: None,
        stt_recorded: 0,
        evidence_written: false,
    });
    let retry = s
        .stream(1_000, false)
        .into_iter()
        .find_map(|op| match op {
            StoreOp::Meter { delta_ms, .. } => Some(delta_ms),
            _ => None,
        })
        .expect("metered again the next second");
    assert!(
        retry >= meters[0],
        "the failed delta is part of the next one"
    );
}

#[test]
fn stopping_waits_for_a_record_in_flight_and_drops_a_periodic_read() {
    let mut s = running(60_000);
    s.auto_meter = false;
    let op = s
        .stream(1_000, false)
        .pop()
        .expect("a meter op after a second of speech");
    assert!(matches!(op, StoreOp::Meter { .. }));
    assert!(s.core.begin_finish(), "a record in flight must land");

    let mut s = running(60_000);
    let mut status = None;
    for op in s.stream(10_500, false) {
        match op {
            StoreOp::Meter { .. } => {}
            op => status = Some(op),
        }
    }
    assert_eq!(status, Some(StoreOp::Status { first: false }));
    assert!(!s.core.begin_finish(), "a periodic read is abandoned");
    assert_eq!(s.core.in_flight(), InFlight::None);
    assert_eq!(s.core.lifecycle(), Lifecycle::Finishing);
}

#[test]
fn closed_conversations_pile_up_to_a_bound_while_the_store_is_down() {
    let mut s = running(1_000);
    s.auto_meter = false;
    // The first status read is long done; now the store hangs on a meter record.
    let op = s.stream(1_000, false).pop().expect("meter op");
    assert!(matches!(op, StoreOp::Meter { .. }));
    let mut closed = 0;
    while !s.core.backlogged() {
        s.stream(2_000, false);
        s.stream(1_500, true);
        closed += 1;
        assert!(closed < 20, "never backlogged");
    }
    assert_eq!(
        s.core.in_flight(),
        InFlight::Meter,
        "still waiting for the store"
    );
    assert_eq!(
        s.core.next_op(WALL0),
        None,
        "nothing overlaps the record in flight"
    );
    // The record lands; the writes drain in order, oldest first.
    s.accept(&op);
    let mut writes = 0;
    while let Some(StoreOp::Conversation { .. }) = s.core.next_op(WALL0) {
        writes += 1;
        s.done(OpResult::Conversation {
            stored: Ok(format!("c{writes}")),
            speech_ms: 1,
            locked: false,
        });
    }
    assert!(writes > super::MAX_CLOSING);
    assert!(!s.core.backlogged());
}

/// A session with a provider: its first status read answered with `stt`.
fn with_feed(stt: SttAllowance) -> Session {
    let mut s = Session::new(60_000);
    s.core.enable_stt_feed(crate::stt::ProviderKind::Local);
    assert_eq!(s.core.next_op(WALL0), Some(StoreOp::Status { first: true }));
    s.done(first(status(Stage::None, false, stt)));
    s
}

#[test]
fn with_a_provider_a_run_is_forwarded_while_it_runs_with_preroll_and_hangover() {
    let mut s = with_feed(SttAllowance::Unlimited);
    // d01's first run is 598-2738 ms: stream until it started but has not ended.
    s.stream(1_500, false);
    assert_eq!(s.kinds(), ["speech_started"]);
    let first = s.stt.first().copied();
    let Some(SttCommand::Audio { start, .. }) = first else {
        panic!("audio goes while the run runs: {:?}", s.stt);
    };
    let LiveEvent::SpeechStarted { at_ms, .. } = s.events[0] else {
        unreachable!()
    };
    assert_eq!(start, (at_ms * 16).saturating_sub(4_800), "300 ms pre-roll");
    s.stream(1_500, false);
    assert_eq!(s.kinds(), ["speech_started", "speech_ended"]);
    assert_eq!(s.stt.last(), Some(&SttCommand::EndOfRun));
    let LiveEvent::SpeechEnded {
        at_ms: end_ms,
        speech_ms,
        ..
    } = s.events[1]
    else {
        unreachable!()
    };
    let Some(SttCommand::Audio { end, .. }) = s.stt.iter().rev().nth(1).copied() else {
        panic!("{:?}", s.stt);
    };
    assert_eq!(end, end_ms * 16 + 1_472, "the hangover beyond the padding");
    // Contiguous audio, charged by the samples sent: the run, its pre-roll and its hangover.
    assert_eq!(s.audio_samples(), end - start);
    assert_eq!(
        s.forwarded_ms(),
        crate::time::samples_to_ms(end - start, 16_000)
    );
    assert!(s.forwarded_ms() >= speech_ms + 300);
}

#[test]
fn with_a_provider_the_budget_clips_the_samples_sent_to_the_ms() {
    let mut s = with_feed(SttAllowance::Remaining {
        remaining_ms: 1_000,
        daily_limit_ms: 1_800_000,
        used_ms: 1_799_000,
        resets_at_ms: WALL0 + 3_600_000,
    });
    s.stream(7_000, false);
    assert_eq!(s.forwarded_ms(), 1_000, "exactly the remaining budget");
    assert!(s.audio_samples() <= 16_000 + 7);
    assert_eq!(
        s.kinds()
            .iter()
            .filter(|k| **k == "stt_budget_exhausted")
            .count(),
        1
    );
    assert_eq!(s.core.stt_gate_reason(), Some("budget_exhausted"));
}

#[test]
fn over_the_speech_ceiling_nothing_is_forwarded_and_the_reason_is_speech_ceiling_while_metering_goes_on()
 {
    let mut s = with_feed(SttAllowance::None {
        reason: SttDenied::SpeechCeiling,
        daily_limit_ms: None,
        used_ms: 0,
        resets_at_ms: Some(WALL0 + 3_600_000),
    });
    s.stream(7_000, false);
    assert_eq!(s.forwarded_ms(), 0, "STT closed");
    assert_eq!(s.audio_samples(), 0);
    assert_eq!(s.core.stt_gate_reason(), Some("speech_ceiling"));
    assert!(
        s.kinds().contains(&"speech_started"),
        "speech is still detected (and metered): {:?}",
        s.kinds()
    );
}

#[test]
fn with_a_provider_audio_waits_for_the_first_status_read() {
    let mut s = Session::new(60_000);
    s.core.enable_stt_feed(crate::stt::ProviderKind::Local);
    assert_eq!(s.core.next_op(WALL0), Some(StoreOp::Status { first: true }));
    s.stream(2_000, false);
    assert!(s.stt.is_empty(), "nothing goes while the gate is unknown");
    s.done(first(status(Stage::None, false, SttAllowance::Unlimited)));
    let Some(SttCommand::Audio { start, .. }) = s.stt.first().copied() else {
        panic!("{:?}", s.stt);
    };
    assert!(start < 598 * 16, "released from the pre-roll on: {start}");
    assert!(s.audio_samples() > 16_000);
}

#[test]
fn without_a_provider_no_audio_is_kept_or_sent() {
    let mut s = running(60_000);
    s.stream(3_000, false);
    assert!(s.core.take_stt().1.is_none(), "no tap");
    assert!(s.stt.is_empty(), "no commands: {:?}", s.stt);
    assert!(s.forwarded_ms() > 1_500, "the run is charged as it ends");
}

#[test]
fn with_a_provider_a_burst_of_seconds_in_one_tick_loses_no_run_start() {
    let mut s = with_feed(SttAllowance::Unlimited);
    // Seven seconds arrive in one tick (a fast client, a lagging pipeline): more than the tap holds.
    for _ in 0..700 {
        s.seq += 1;
        let frame = s.pcm[s.at..s.at + FRAME].to_vec();
        s.at += FRAME;
        s.core.push_frame(s.seq, &frame);
    }
    s.core.run_vad();
    s.collect();
    let starts: Vec<u64> = s
        .events
        .iter()
        .filter_map(|e| match e {
            LiveEvent::SpeechStarted { at_ms, .. } => Some(*at_ms),
            _ => None,
        })
        .collect();
    assert!(starts.len() >= 2, "{:?}", s.kinds());
    let Some(SttCommand::Audio { start, .. }) = s.stt.first().copied() else {
        panic!("{:?}", s.stt);
    };
    assert_eq!(
        start,
        starts[0] * 16 - 4_800,
        "the first run's pre-roll is whole"
    );
    let ends_of_run = s.stt.iter().filter(|c| **c == SttCommand::EndOfRun).count();
    assert!(ends_of_run >= 1);
}

/// The next operation at wall time `now_ms`, answering meter records and status reads on the way; `None`
/// once only a conversation write or a transcript add could come and none is due.
fn next_write(s: &mut Session, now_ms: u64) -> Option<StoreOp> {
    loop {
        match s.core.next_op(now_ms)? {
            op @ (StoreOp::Conversation { .. } | StoreOp::Transcript { .. }) => return Some(op),
            op @ StoreOp::Meter { .. } => s.accept(&op),
            StoreOp::Status { .. } => s.done(status(Stage::None, false, SttAllowance::Unlimited)),
        }
    }
}

#[test]
fn a_failed_conversation_write_is_kept_and_retried_with_backoff_until_it_lands() {
    let mut s = running(1_000);
    s.stream(3_000, false);
    let op = s
        .stream(1_500, true)
        .into_iter()
        .find(|op| matches!(op, StoreOp::Conversation { .. }))
        .expect("a second of silence closes the conversation");
    let mut t = WALL0;
    for attempt in 1..=6u64 {
        // The store is down.
        s.done(OpResult::Conversation {
            stored: Err("conversation_store_unavailable"),
            speech_ms: 2_000,
            locked: false,
        });
        assert_eq!(s.core.unwritten(), 1, "kept after failure {attempt}");
        assert!(
            !s.core.backlogged(),
            "a failing store never stalls the audio"
        );
        // Not again at once (the backoff's floor is 250 ms) ...
        assert_eq!(next_write(&mut s, t), None, "retry {attempt} waits");
        assert_eq!(next_write(&mut s, t + 249), None, "retry {attempt} waits");
        // ... but at the latest after the cap (10 s), the same conversation again.
        t += 10_001;
        let again = next_write(&mut s, t).unwrap_or_else(|| panic!("retry {attempt} due"));
        assert_eq!(again, op, "the same conversation, retry {attempt}");
        assert!(!s.kinds().contains(&"conversation_closed"));
    }
    s.done(OpResult::Conversation {
        stored: Ok("c1".to_owned()),
        speech_ms: 2_000,
        locked: false,
    });
    assert_eq!(s.kinds().last(), Some(&"conversation_closed"));
    assert_eq!(s.core.unwritten(), 0);
    // A success resets the backoff: the next failure waits from the floor again, not from the cap.
    s.stream(2_000, false);
    let next = s
        .stream(1_500, true)
        .into_iter()
        .find(|op| matches!(op, StoreOp::Conversation { .. }))
        .expect("the next conversation");
    s.done(OpResult::Conversation {
        stored: Err("conversation_store_unavailable"),
        speech_ms: 1_000,
        locked: false,
    });
    assert_eq!(next_write(&mut s, t), None);
    assert_eq!(
        next_write(&mut s, t + 501),
        Some(next),
        "within 2 × the floor"
    );
}

#[test]
fn writes_still_failing_when_the_session_ends_are_counted_not_kept() {
    let mut s = running(1_000);
    s.stream(3_000, false);
    assert!(
        s.stream(1_500, true)
            .iter()
            .any(|op| matches!(op, StoreOp::Conversation { .. }))
    );
    s.done(OpResult::Conversation {
        stored: Err("conversation_store_unavailable"),
        speech_ms: 2_000,
        locked: false,
    });
    assert!(!s.core.begin_finish());
    s.core.end_of_stream();
    // The driver's last attempts: `retry_writes_now` lets the write go at once.
    assert_eq!(next_write(&mut s, WALL0), None);
    s.core.retry_writes_now();
    assert!(matches!(
        next_write(&mut s, WALL0),
        Some(StoreOp::Conversation { .. })
    ));
    s.done(OpResult::Conversation {
        stored: Err("conversation_store_unavailable"),
        speech_ms: 2_000,
        locked: false,
    });
    assert_eq!(s.core.unwritten(), 1);
    let counts = s.counts();
    s.core.finish(counts);
    assert_eq!(s.core.unwritten(), 0, "counted as dropped at the end");
}

/// A meter record answered `Dropped` (pending memory full while the store is down) is not metered: the
/// session keeps the speech and sends it again.
#[actix::test]
async fn a_record_the_meter_drops_is_not_counted_as_metered() {
    use crate::fair_use::{FairUse, FairUseParts, HeuristicClassifier, NoSessions};
    use crate::meter::{Meter, MeterConfig};
    use crate::store::MemoryStore;
    use crate::store::fair_use::{MemoryCooldownLock, MemoryFairUseStore};
    use crate::time::{Clock, ManualClock};

    let clock = ManualClock::new(WALL0);
    let store = Arc::new(MemoryStore::new());
    store.set_unavailable(true);
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            max_pending_total: 2,
            ..MeterConfig::default()
        },
        store.clone(),
        clock.clone(),
    );
    let plans: Arc<dyn crate::store::plans::PlanStore> =
        Arc::new(crate::store::plans::MemoryPlanStore::default());
    let fair_use = FairUse::start(
        Default::default(),
        meter.clone(),
        FairUseParts {
            store: Arc::new(MemoryFairUseStore::new()),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier: Arc::new(HeuristicClassifier),
            sessions: Arc::new(NoSessions),
            plans: plans.clone(),
            notifier: None,
            clock: clock.clone(),
        },
    );
    let services = Arc::new(super::LiveServices {
        fair_use,
        plans,
        conversations: Arc::new(crate::conversation::MemoryConversationStore::new(
            clock.clone(),
        )),
        stt: Arc::new(crate::stt::none::NoneProvider),
        clock: clock.clone(),
        tick_lag: Arc::new(super::load::TickLagWindow::new(Duration::from_millis(250))),
    });
    let record = |uid: &str| {
        super::ops::execute(
            Arc::clone(&services),
            Arc::from(uid),
            StoreOp::Meter {
                delta_ms: 1_000,
                total_ms: 1_000,
                stt_ms: 0,
                stt_by_provider: Vec::new(),
                now_ms: clock.now_ms(),
                evidence: None,
            },
        )
    };
    // The first users' speech fits the pending bound; past it the meter answers `Dropped`.
    let mut dropped = None;
    for i in 0..20 {
        let uid = format!("u{i}");
        match record(&uid).await {
            OpResult::Meter {
                metered_to: Some(1_000),
                ..
            } => {}
            OpResult::Meter {
                metered_to: None, ..
            } => {
                dropped = Some(uid);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let uid = dropped.expect("a record past the pending bound is not metered");
    assert_ne!(uid, "u0", "the first record fits the bound");
    // The core keeps what is not metered and sends it again the next second (see
    // `a_failing_meter_keeps_the_speech_pending_and_sends_it_again`).
}

fn seg(id: &str, start_ms: u64, end_ms: u64) -> crate::conversation::TranscriptSegment {
    crate::conversation::TranscriptSegment::new(id.into(), "some words", 0, start_ms, end_ms)
}

fn added(n: u64) -> OpResult {
    OpResult::Transcript {
        stored: Ok(crate::conversation::SegmentsAdded {
            stored: n,
            refused: 0,
        }),
    }
}

#[test]
fn final_segments_follow_their_conversation_and_late_ones_are_added_by_id() {
    let mut s = running(1_000);
    s.stream(3_000, false);
    // d01's first run is 598-2738 ms: a final segment of it arrives while the conversation is open.
    s.core.transcript_finals(vec![seg("a", 600, 2_700)]);
    assert!(
        s.stream(1_500, true)
            .iter()
            .any(|op| matches!(op, StoreOp::Conversation { .. })),
        "a second of silence closes the conversation"
    );
    s.done(OpResult::Conversation {
        stored: Ok("c1".to_owned()),
        speech_ms: 2_000,
        locked: false,
    });
    let add = next_write(&mut s, WALL0).expect("its segments follow the conversation");
    assert_eq!(
        add,
        StoreOp::Transcript {
            id: "c1".to_owned(),
            segments: vec![seg("a", WALL0 + 600, WALL0 + 2_700)],
        },
        "by id, in absolute time"
    );
    // The store is down: the add is kept and retried after the backoff, never blocking the audio.
    s.done(OpResult::Transcript {
        stored: Err("conversation_store_unavailable"),
    });
    assert_eq!(s.core.unwritten_segments(), 1);
    assert!(!s.core.backlogged());
    assert_eq!(next_write(&mut s, WALL0 + 100), None, "waits for the retry");
    assert_eq!(next_write(&mut s, WALL0 + 20_000), Some(add));
    s.done(added(1));
    assert_eq!(s.core.unwritten_segments(), 0);
    // A segment that arrives after the write (the engine was slow) is added to the same conversation.
    s.core.transcript_finals(vec![seg("b", 2_000, 2_800)]);
    assert_eq!(
        next_write(&mut s, WALL0 + 20_000),
        Some(StoreOp::Transcript {
            id: "c1".to_owned(),
            segments: vec![seg("b", WALL0 + 2_000, WALL0 + 2_800)],
        })
    );
    // Deleted meanwhile: dropped (counted), not retried.
    s.done(OpResult::Transcript {
        stored: Err("conversation_not_found"),
    });
    assert_eq!(s.core.unwritten_segments(), 0);
    assert_eq!(next_write(&mut s, WALL0 + 60_000), None);
}

#[test]
fn a_segment_before_its_run_ends_waits_for_the_conversation_and_the_end_places_the_rest() {
    let mut s = running(1_000);
    s.stream(1_000, false);
    // A provider that finalizes mid-run (Deepgram does): no conversation holds this time yet.
    s.core.transcript_finals(vec![seg("early", 600, 900)]);
    s.stream(2_000, false);
    let op = s
        .stream(1_500, true)
        .into_iter()
        .find(|op| matches!(op, StoreOp::Conversation { .. }));
    assert!(op.is_some());
    s.done(OpResult::Conversation {
        stored: Ok("c1".to_owned()),
        speech_ms: 2_000,
        locked: false,
    });
    assert_eq!(
        next_write(&mut s, WALL0),
        Some(StoreOp::Transcript {
            id: "c1".to_owned(),
            segments: vec![seg("early", WALL0 + 600, WALL0 + 900)],
        })
    );
    s.done(added(1));
    // Far from every conversation: held until the provider's results are all in, then the nearest takes it.
    s.core.transcript_finals(vec![seg("far", 60_000, 61_000)]);
    assert_eq!(next_write(&mut s, WALL0), None);
    assert!(!s.core.begin_finish());
    s.core.end_of_stream();
    s.core.end_of_transcripts();
    assert!(matches!(
        next_write(&mut s, WALL0),
        Some(StoreOp::Transcript { id, .. }) if id == "c1"
    ));
    // Still failing at the very end: counted as dropped by the finish, not kept.
    s.done(OpResult::Transcript {
        stored: Err("conversation_store_unavailable"),
    });
    assert_eq!(s.core.unwritten_segments(), 1);
    let counts = s.counts();
    s.core.finish(counts);
    assert_eq!(s.core.unwritten_segments(), 0);
}

/// What [`stream_refused`] saw.
#[derive(Debug, Default)]
struct Refusals {
    /// Samples the provider took and refused.
    taken: u64,
    refused: u64,
    /// STT ms the meter records carried.
    recorded: u64,
    /// Samples taken when `stt_budget_exhausted` was first taken from the core.
    taken_at_exhausted: Option<u64>,
}

/// Streams 20 s of speech through a session with `budget_ms` of STT budget left, in the driver's order
/// (the commands handed over after each VAD step and tick, what the provider refused given back, then the
/// events taken, then the next store operation), against a provider with no room for the first `refuse`
/// samples handed to it.
fn stream_refused(budget_ms: u64, refuse: u64) -> (Session, Refusals) {
    let allowance = |recorded: u64| SttAllowance::Remaining {
        remaining_ms: budget_ms.saturating_sub(recorded),
        daily_limit_ms: 1_800_000,
        used_ms: 1_800_000 - budget_ms + recorded,
        resets_at_ms: WALL0 + 3_600_000,
    };
    let mut s = with_feed(allowance(0));
    let mut left = refuse;
    let mut r = Refusals::default();
    let step = |s: &mut Session, r: &mut Refusals, left: &mut u64| {
        let mut refused = 0;
        for cmd in s.core.take_stt().0 {
            if let SttCommand::Audio { start, end } = cmd {
                let n = (end - start).min(*left);
                *left -= n;
                refused += n;
                r.taken += end - start - n;
            }
        }
        r.refused += refused;
        s.core.refund_stt(refused);
        let events: Vec<LiveEvent> = s.core.take_events().collect();
        if r.taken_at_exhausted.is_none()
            && events.iter().any(|e| e.kind() == "stt_budget_exhausted")
        {
            r.taken_at_exhausted = Some(r.taken);
        }
        s.events.extend(events);
    };
    for _ in 0..(20_000 / 50) {
        for _ in 0..5 {
            s.seq += 1;
            let frame = s.pcm[s.at..s.at + FRAME].to_vec();
            s.at += FRAME;
            s.core.push_frame(s.seq, &frame);
        }
        s.core.run_vad();
        step(&mut s, &mut r, &mut left);
        s.now += Duration::from_millis(50);
        s.core.tick(s.now, s.counts());
        step(&mut s, &mut r, &mut left);
        match s.core.next_op(WALL0) {
            Some(op @ StoreOp::Meter { .. }) => {
                if let StoreOp::Meter { stt_ms, .. } = &op {
                    r.recorded += stt_ms;
                }
                s.accept(&op);
            }
            Some(StoreOp::Status { .. }) => {
                s.core
                    .op_done(status(Stage::None, false, allowance(r.recorded)));
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
        step(&mut s, &mut r, &mut left);
    }
    (s, r)
}

/// Audio the provider refuses is never recorded as STT, and the budget it held is there again for the
/// audio the provider takes.
#[test]
fn audio_the_provider_refuses_is_given_back_before_it_is_recorded_and_the_budget_regains_it() {
    let (s, r) = stream_refused(2_000, 24_000);
    assert_eq!(r.refused, 24_000, "the provider refused its 1.5 s");
    assert_eq!(s.forwarded_ms(), 2_000, "the whole budget still went");
    assert_eq!(
        crate::time::samples_to_ms(r.taken, 16_000),
        2_000,
        "charged = what the provider took"
    );
    assert_eq!(r.recorded, 2_000, "the refused audio was never recorded");
    assert_eq!(
        s.kinds()
            .iter()
            .filter(|k| **k == "stt_budget_exhausted")
            .count(),
        1
    );
}

/// The release that would use the budget up is refused: its announcement is withdrawn before it goes,
/// and `stt_budget_exhausted` comes once, when the audio the provider took has used the budget up.
#[test]
fn a_refused_release_does_not_announce_the_budget_used_up_early() {
    // 100 ms of budget: the first release (the pre-roll and the run's start) alone would use it up.
    let (s, r) = stream_refused(100, 8_000);
    assert_eq!(r.refused, 8_000);
    assert_eq!(s.forwarded_ms(), 100);
    assert_eq!(r.recorded, 100);
    let at = r.taken_at_exhausted.unwrap_or(0);
    assert_eq!(
        crate::time::samples_to_ms(at, 16_000),
        100,
        "announced when the taken audio used the budget up, not before"
    );
    assert_eq!(
        s.kinds()
            .iter()
            .filter(|k| **k == "stt_budget_exhausted")
            .count(),
        1
    );
}
