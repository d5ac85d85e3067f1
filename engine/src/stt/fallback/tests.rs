//! The fallback against two scripted providers: which one gets each run's audio, what the session hears
//! (results of both, the primary's error, one `Closed`), and where sync spans go.

use std::sync::Mutex;

use super::*;
use crate::stt::provider::{BatchOutput, results_channel};
use crate::stt::types::{ResultKind, SttResult};

/// A provider that answers every pushed run with one final result naming itself, and fails on demand.
struct Scripted {
    kind: ProviderKind,
    /// The next push reports this error (`SttEvent::Error`) and forwards nothing.
    fail_next: Mutex<Option<&'static str>>,
    /// Streams opened; (stream number, first sample, samples) of every push received.
    opened: AtomicUsize,
    pushes: Arc<Mutex<Vec<(usize, u64, usize)>>>,
    /// The batch answer: `None` = transcribe (one result naming the provider).
    batch_error: Mutex<Option<SttError>>,
    batches: AtomicUsize,
}

impl Scripted {
    fn new(kind: ProviderKind) -> Arc<Scripted> {
        Arc::new(Scripted {
            kind,
            fail_next: Mutex::new(None),
            opened: AtomicUsize::new(0),
            pushes: Arc::new(Mutex::new(Vec::new())),
            batch_error: Mutex::new(None),
            batches: AtomicUsize::new(0),
        })
    }

    fn fail_next(&self, reason: &'static str) {
        *self.fail_next.lock().unwrap() = Some(reason);
    }

    fn samples(&self) -> usize {
        self.pushes.lock().unwrap().iter().map(|p| p.2).sum()
    }
}

struct ScriptedStream {
    provider: Arc<Scripted>,
    number: usize,
    sink: ResultSink,
}

impl StreamHandle for ScriptedStream {
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError> {
        if let Some(reason) = self.provider.fail_next.lock().unwrap().take() {
            self.sink
                .counters()
                .dropped(self.provider.kind, "provider_down", pcm.len() as u64);
            self.sink.send(SttEvent::Error {
                reason,
                message: "scripted".into(),
            });
            return Ok(());
        }
        self.sink
            .counters()
            .forwarded(self.provider.kind, pcm.len() as u64);
        self.provider
            .pushes
            .lock()
            .unwrap()
            .push((self.number, start, pcm.len()));
        self.sink.result(SttResult {
            kind: ResultKind::Final,
            text: self.provider.kind.name().to_string(),
            start_ms: start / 16,
            end_ms: (start + pcm.len() as u64) / 16,
            confidence: None,
            words: Vec::new(),
            speaker: None,
        });
        Ok(())
    }

    fn end_of_run(&mut self) -> Result<(), SttError> {
        Ok(())
    }

    fn finalize(&mut self) -> Result<(), SttError> {
        Ok(())
    }

    fn close(&mut self) {
        self.sink.send(SttEvent::Closed);
    }

    fn stats(&self) -> StreamStats {
        self.sink.counters().stats()
    }
}

impl SttProvider for Arc<Scripted> {
    fn kind(&self) -> ProviderKind {
        self.as_ref().kind
    }

    fn open_stream(
        &self,
        _options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError> {
        let number = self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(ScriptedStream {
            provider: Arc::clone(self),
            number,
            sink: results.for_provider(self.as_ref().kind),
        }))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = self.batch_error.lock().unwrap().clone() {
            return Err(e);
        }
        let (reply, ticket) = batch_ticket();
        reply.send(Ok(BatchOutput {
            results: vec![SttResult {
                kind: ResultKind::Final,
                text: self.as_ref().kind.name().to_string(),
                start_ms: 0,
                end_ms: request.samples.len() as u64 / 16,
                confidence: None,
                words: Vec::new(),
                speaker: None,
            }],
            forwarded_samples: request.samples.len() as u64,
            provider: Some(self.as_ref().kind),
        }));
        Ok(ticket)
    }
}

fn pair(cooldown: Duration) -> (Arc<Scripted>, Arc<Scripted>, FallbackProvider) {
    let primary = Scripted::new(ProviderKind::Deepgram);
    let fallback = Scripted::new(ProviderKind::Local);
    let provider = FallbackProvider::start(
        Arc::new(Arc::clone(&primary)),
        Arc::new(Arc::clone(&fallback)),
        cooldown,
    )
    .unwrap();
    (primary, fallback, provider)
}

/// Every event up to and including the first error.
fn until_error(rx: &mut crate::stt::ResultReceiver) -> Vec<SttEvent> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        let error = matches!(e, SttEvent::Error { .. });
        out.push(e);
        if error {
            return out;
        }
    }
    panic!("the stream closed before an error: {out:?}");
}

/// Every event until `Closed`.
fn drain(rx: &mut crate::stt::ResultReceiver) -> Vec<SttEvent> {
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(SttEvent::Closed) | None => return out,
            Some(e) => out.push(e),
        }
    }
}

fn texts(events: &[SttEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            SttEvent::Result(r) => r.text.clone(),
            SttEvent::Error { reason, .. } => format!("error:{reason}"),
            SttEvent::Behind { .. } => "behind".into(),
            SttEvent::Closed => "closed".into(),
        })
        .collect()
}

const RUN: [i16; 1_600] = [0; 1_600];

#[test]
fn a_failing_primary_hands_the_stream_to_the_fallback_and_the_session_hears_one_stream() {
    let (primary, fallback, provider) = pair(Duration::from_secs(60));
    let (sink, mut rx) = results_channel(64);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .unwrap();
    stream.push(0, Pcm::I16(&RUN)).unwrap();
    stream.end_of_run().unwrap();
    primary.fail_next("payment");
    stream.push(16_000, Pcm::I16(&RUN)).unwrap();
    // The session hears the primary's error once the relay has marked it failing (the relay marks, then
    // forwards): the next command switches.
    let mut events = until_error(&mut rx);
    // The rest of the run, and the next run: the fallback's.
    stream.push(17_600, Pcm::I16(&RUN)).unwrap();
    stream.end_of_run().unwrap();
    stream.push(32_000, Pcm::I16(&RUN)).unwrap();
    stream.close();
    events.extend(drain(&mut rx));
    let seen = texts(&events);
    assert_eq!(
        seen,
        ["deepgram", "error:payment", "local", "local"],
        "{events:?}"
    );
    assert_eq!(primary.samples(), 1_600);
    assert_eq!(fallback.samples(), 3_200);
    // One stream's figures: what either provider received, and what the failing one dropped.
    let stats = stream.stats();
    assert_eq!(stats.forwarded_samples, 4_800);
    assert_eq!(stats.dropped_samples, 1_600);
    // New streams open on the fallback while the primary is failing.
    let (sink, mut rx) = results_channel(64);
    let mut second = provider
        .open_stream(StreamOptions::default(), sink)
        .unwrap();
    second.push(0, Pcm::I16(&RUN)).unwrap();
    second.close();
    assert_eq!(texts(&drain(&mut rx)), ["local"]);
    assert_eq!(primary.opened.load(Ordering::SeqCst), 1);
}

#[test]
fn after_the_cool_down_a_stream_goes_back_to_the_primary_at_a_run_start_only() {
    let (primary, fallback, provider) = pair(Duration::from_secs(1));
    let (sink, mut rx) = results_channel(64);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .unwrap();
    primary.fail_next("unauthorized");
    stream.push(0, Pcm::I16(&RUN)).unwrap();
    let mut events = until_error(&mut rx);
    // Mid-run: moves to the fallback.
    stream.push(1_600, Pcm::I16(&RUN)).unwrap();
    // The cool-down runs out; the run goes on: it stays (only a run's start goes back).
    std::thread::sleep(Duration::from_millis(1_100));
    stream.push(3_200, Pcm::I16(&RUN)).unwrap();
    stream.end_of_run().unwrap();
    // A new run: back to the primary.
    stream.push(16_000, Pcm::I16(&RUN)).unwrap();
    stream.close();
    events.extend(drain(&mut rx));
    let seen = texts(&events);
    assert_eq!(
        seen,
        ["error:unauthorized", "local", "local", "deepgram"],
        "{seen:?}"
    );
    assert_eq!(fallback.samples(), 3_200);
    assert_eq!(primary.opened.load(Ordering::SeqCst), 2);
}

#[test]
fn one_dropped_connection_is_not_an_outage_three_within_the_cool_down_are() {
    let (primary, fallback, provider) = pair(Duration::from_secs(60));
    let (sink, mut rx) = results_channel(64);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .unwrap();
    let mut events = Vec::new();
    for (n, start) in [0u64, 16_000].into_iter().enumerate() {
        primary.fail_next("network");
        stream.push(start, Pcm::I16(&RUN)).unwrap();
        events.extend(until_error(&mut rx));
        // The run goes on with the primary: a provider retries a lost connection itself.
        stream.push(start + 1_600, Pcm::I16(&RUN)).unwrap();
        assert!(provider.health.primary_ok(), "after {} failures", n + 1);
    }
    primary.fail_next("network");
    stream.push(32_000, Pcm::I16(&RUN)).unwrap();
    events.extend(until_error(&mut rx));
    assert!(!provider.health.primary_ok(), "three within the cool-down");
    stream.push(33_600, Pcm::I16(&RUN)).unwrap();
    stream.close();
    events.extend(drain(&mut rx));
    assert_eq!(
        texts(&events),
        [
            "error:network",
            "deepgram",
            "error:network",
            "deepgram",
            "error:network",
            "local"
        ]
    );
    assert_eq!(fallback.samples(), 1_600);
}

#[test]
fn spans_go_to_the_fallback_when_the_primary_fails_or_does_not_serve_them() {
    let (primary, fallback, provider) = pair(Duration::from_secs(60));
    let request = || BatchRequest {
        samples: Arc::from(vec![0.0f32; 3_200]),
        speech: Vec::new(),
        language: "en".into(),
    };
    // The primary answers.
    let out = provider
        .transcribe_batch(request())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(out.results[0].text, "deepgram");
    // A span it refuses as malformed goes to the fallback; the primary is not failing for it.
    *primary.batch_error.lock().unwrap() = Some(SttError::BadRequest("no batch".into()));
    let out = provider
        .transcribe_batch(request())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        (out.results[0].text.as_str(), out.forwarded_samples),
        ("local", 3_200)
    );
    assert_eq!(out.provider, Some(ProviderKind::Local), "who took it");
    assert!(provider.health.primary_ok());
    // Its own backpressure stays with it: the span waits.
    *primary.batch_error.lock().unwrap() = Some(SttError::QueueFull { dropped_samples: 0 });
    assert!(matches!(
        provider.transcribe_batch(request()),
        Err(SttError::QueueFull { .. })
    ));
    assert_eq!(fallback.batches.load(Ordering::SeqCst), 1);
    // A failure: the fallback answers, and takes the next spans without asking the primary.
    *primary.batch_error.lock().unwrap() = Some(SttError::Payment("402".into()));
    let out = provider
        .transcribe_batch(request())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(out.results[0].text, "local");
    assert!(!provider.health.primary_ok());
    let asked = primary.batches.load(Ordering::SeqCst);
    provider
        .transcribe_batch(request())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(primary.batches.load(Ordering::SeqCst), asked);
    assert_eq!(fallback.batches.load(Ordering::SeqCst), 3);
}
