//! Sync spans through Deepgram's pre-recorded API (`POST /v1/listen`, [`protocol::prerecorded_url`]).
//!
//! - One request per span. Only the span's speech runs (with their pre-roll and hangover, as the sync path
//!   padded them) are sent, one after another as one stretch of headerless 16 kHz PCM: the pauses between
//!   them are neither sent nor charged. Each run is recorded in a [`TimeMap`], and the answer's
//!   utterances (`utterances=true`) are read back from the request's clock to the span's.
//! - Bounded: at most `VOICEGATE_DEEPGRAM_BATCH_MAX_IN_FLIGHT` requests open at once, and at most
//!   [`HELD_PER_SLOT`] times that many spans held (waiting or in flight); a span past that is refused
//!   `QueueFull` (counted, `queue_full`), which the sync path leaves `pending`. The 16-bit copy of a span's
//!   audio is made only once its request has a slot.
//! - Failures and retries as every hosted provider's ([`crate::stt::http`]): a 429 or 5xx or a failed
//!   connection is retried (`DeepgramConfig::batch_retries`); 401/403, 402, 400 are not. The span is
//!   charged what was sent once, whatever the retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;

use super::KIND;
use super::clock::TimeMap;
use super::connection::Ctx;
use super::protocol;
use crate::stt::chunk::batch_chunks;
use crate::stt::http::{self, Attempt};
use crate::stt::provider::{BatchOutput, BatchRequest, BatchTicket, batch_ticket, count_forwarded};
use crate::stt::types::{Pcm, ResultKind, SAMPLE_RATE, SttError, SttResult, Word, sample_to_ms};
use crate::telemetry as t;

/// Spans held per request slot (waiting for one, or in flight).
pub const HELD_PER_SLOT: usize = 4;
/// The largest answer read: a 300 s span's utterances with their words are well under 1 MiB.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// The provider's bound on pre-recorded requests.
#[derive(Debug)]
pub(super) struct Slots {
    permits: Semaphore,
    held: AtomicUsize,
    limit: usize,
}

impl Slots {
    pub(super) fn new(max_in_flight: usize) -> Slots {
        let max_in_flight = max_in_flight.max(1);
        Slots {
            permits: Semaphore::new(max_in_flight),
            held: AtomicUsize::new(0),
            limit: max_in_flight * HELD_PER_SLOT,
        }
    }

    fn take(self: &Arc<Slots>) -> Option<Held> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.limit).then_some(held + 1)
            })
            .ok()
            .map(|_| Held(Arc::clone(self)))
    }
}

/// One span's place among the held ones, given back when dropped.
struct Held(Arc<Slots>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Submits one span: refused at once when the provider holds too many, else answered through the ticket.
pub(super) fn submit(
    ctx: &Arc<Ctx>,
    slots: &Arc<Slots>,
    runtime: &tokio::runtime::Runtime,
    request: BatchRequest,
) -> Result<BatchTicket, SttError> {
    let pieces = batch_chunks(&request.samples, &request.speech, request.samples.len());
    let Some(held) = slots.take() else {
        // Not counted as dropped here: the sync path offers the span again (transcribe.rs) and counts it
        // once if it gives up.
        let dropped: u64 = pieces.iter().map(|(s, e)| (e - s) as u64).sum();
        return Err(SttError::QueueFull {
            dropped_samples: dropped,
        });
    };
    let (reply, ticket) = batch_ticket();
    let (ctx, slots) = (Arc::clone(ctx), Arc::clone(slots));
    runtime.spawn(async move {
        let outcome = span(&ctx, &slots, &request, &pieces).await;
        drop(held);
        reply.send(outcome);
    });
    Ok(ticket)
}

/// One span's request (retried as [`http::with_retries`] says), its answer in the span's time.
async fn span(
    ctx: &Ctx,
    slots: &Slots,
    request: &BatchRequest,
    pieces: &[(usize, usize)],
) -> Result<BatchOutput, SttError> {
    let samples: usize = pieces.iter().map(|(s, e)| e - s).sum();
    if samples == 0 {
        return Ok(BatchOutput::default());
    }
    let mut map = TimeMap::default();
    for &(s, e) in pieces {
        map.wrote(s as u64, (e - s) as u64);
    }
    let url = &protocol::prerecorded_url(&ctx.cfg.url, &ctx.cfg.model, &request.language);
    let outcome = http::with_retries(KIND, ctx.cfg.batch_retries, samples, || {
        http::in_slot(KIND, &slots.permits, send(ctx, url, request, pieces))
    })
    .await;
    if outcome.forwarded {
        count_forwarded(KIND, samples as u64);
    } else {
        metrics::counter!(t::STT_DROPPED_SAMPLES_TOTAL, "provider" => KIND.name(), "reason" => "provider_down")
            .increment(samples as u64);
    }
    let answer = outcome.results?;
    let duration = samples as f64 / f64::from(SAMPLE_RATE);
    Ok(BatchOutput {
        results: answer
            .utterances(duration)
            .iter()
            .filter_map(|u| result(&map, u))
            .collect(),
        forwarded_samples: if outcome.forwarded { samples as u64 } else { 0 },
        provider: Some(KIND),
    })
}

/// One utterance as a final result, its times read back through the span's pieces (ms from the span's
/// first sample).
fn result(map: &TimeMap, u: &protocol::Utterance) -> Option<SttResult> {
    let text = u.text.transcript.trim();
    if text.is_empty() {
        return None;
    }
    let at = |secs: f64, end: bool| map.to_stream(protocol::secs_to_samples(secs), end);
    let start = at(u.start, false);
    let end = at(u.end, true).max(start);
    let words = u
        .text
        .words
        .iter()
        .map(|w| {
            let ws = at(w.start, false);
            Word {
                text: w.punctuated_word.clone().unwrap_or_else(|| w.word.clone()),
                start_ms: sample_to_ms(ws),
                end_ms: sample_to_ms(at(w.end, true).max(ws)),
                confidence: w.confidence,
                speaker: w.speaker,
            }
        })
        .collect();
    Some(SttResult {
        kind: ResultKind::Final,
        text: text.to_string(),
        start_ms: sample_to_ms(start),
        end_ms: sample_to_ms(end),
        confidence: u.text.confidence,
        words,
        speaker: u
            .speaker
            .or_else(|| u.text.words.first().and_then(|w| w.speaker)),
    })
}

/// One attempt: the key read now, the pieces as one body, the answer read back (bounded) and parsed.
async fn send(
    ctx: &Ctx,
    url: &str,
    request: &BatchRequest,
    pieces: &[(usize, usize)],
) -> Attempt<protocol::Prerecorded> {
    let key = match ctx.cfg.key.current() {
        Ok(key) => key,
        Err(e) => return Attempt::not_sent(e, None),
    };
    let mut pcm = Vec::with_capacity(pieces.iter().map(|(s, e)| e - s).sum());
    for &(s, e) in pieces {
        Pcm::F32(&request.samples[s..e]).extend_i16(&mut pcm);
    }
    let body: Vec<u8> = pcm.iter().flat_map(|v| v.to_le_bytes()).collect();
    drop(pcm);
    let timeout = ctx.cfg.batch_timeout;
    let sent = ctx
        .outbound
        .http()
        .post(url)
        .timeout(timeout)
        .header(AUTHORIZATION, format!("Token {key}"))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return Attempt::failed(&e, url, timeout),
    };
    let status = response.status();
    let retry_after = http::retry_after(&response);
    let read = http::read_body(&mut response, MAX_ANSWER_BYTES).await;
    let (results, retry) = if status.is_success() {
        (read.and_then(|b| protocol::parse_prerecorded(&b)), None)
    } else {
        let body = read.unwrap_or_default();
        let e = protocol::refused(status.as_u16(), &String::from_utf8_lossy(&body));
        let retry = http::retry_for(status.as_u16(), &e, retry_after);
        (Err(e), retry)
    };
    Attempt {
        outcome: http::Outcome {
            results,
            forwarded: true,
        },
        retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_utterance_is_read_back_from_the_requests_clock_to_the_spans() {
        // Two runs of 1 s at 2 s and 10 s of the span, sent back to back (request time 0..1 s and 1..2 s).
        let mut map = TimeMap::default();
        map.wrote(32_000, 16_000);
        map.wrote(160_000, 16_000);
        let u = |start: f64, end: f64| protocol::Utterance {
            start,
            end,
            text: protocol::Alternative {
                transcript: " Hello. ".into(),
                confidence: Some(0.9),
                words: vec![protocol::DgWord {
                    word: "hello".into(),
                    punctuated_word: Some("Hello.".into()),
                    start,
                    end,
                    confidence: None,
                    speaker: Some(2),
                }],
            },
            speaker: None,
        };
        let first = result(&map, &u(0.25, 0.75)).unwrap_or_else(|| panic!("a result"));
        assert_eq!((first.start_ms, first.end_ms), (2_250, 2_750));
        assert_eq!(first.text, "Hello.");
        assert_eq!(first.speaker, Some(2));
        assert_eq!(first.words[0].text, "Hello.");
        let second = result(&map, &u(1.5, 2.0)).unwrap_or_else(|| panic!("a result"));
        assert_eq!((second.start_ms, second.end_ms), (10_500, 11_000));
        // An utterance across the boundary spans both runs; its end at the boundary is the first's end.
        let across = result(&map, &u(0.5, 1.0)).unwrap_or_else(|| panic!("a result"));
        assert_eq!((across.start_ms, across.end_ms), (2_500, 3_000));
        assert!(
            result(
                &map,
                &protocol::Utterance {
                    text: protocol::Alternative {
                        transcript: "  ".into(),
                        confidence: None,
                        words: Vec::new(),
                    },
                    ..u(0.0, 1.0)
                }
            )
            .is_none()
        );
    }

    #[test]
    fn held_spans_are_bounded_and_given_back() {
        let slots = Arc::new(Slots::new(1));
        let held: Vec<Held> = (0..HELD_PER_SLOT).filter_map(|_| slots.take()).collect();
        assert_eq!(held.len(), HELD_PER_SLOT);
        assert!(slots.take().is_none());
        drop(held);
        assert!(slots.take().is_some());
    }
}
