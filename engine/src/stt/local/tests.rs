//! The local provider's pool and streams over engine doubles (no Moonshine needed): chunking, ordering,
//! exact forwarded samples, bounded queues, priorities. Moonshine itself is tested in
//! `engine/tests/integration/stt_local.rs`.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;
use crate::stt::chunk::MAX_CHUNK_SAMPLES;
use crate::stt::provider::{ResultReceiver, results_channel};
use crate::stt::types::{Pcm, ResultKind, SttEvent};

/// Answers every chunk with its length ("n=8000"), optionally waiting for a gate first.
struct CountingDouble {
    gate: Option<Arc<Mutex<mpsc::Receiver<()>>>>,
    started: Option<mpsc::Sender<usize>>,
    fail_on_len: Option<usize>,
}

impl BatchEngine for CountingDouble {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        if let Some(started) = &self.started {
            let _ = started.send(pcm.len());
        }
        if let Some(gate) = &self.gate {
            let _ = gate.lock().map(|g| g.recv());
        }
        if self.fail_on_len == Some(pcm.len()) {
            return Err(SttError::Engine("double refused".into()));
        }
        Ok(format!("n={}", pcm.len()))
    }
}

fn config(threads: usize, queue: usize) -> LocalConfig {
    LocalConfig {
        dir: PathBuf::from("/nonexistent"),
        threads,
        queue_chunks: queue,
        nice: 10,
        late_after: Duration::from_secs(2),
        child: None,
    }
}

fn plain(threads: usize, queue: usize) -> LocalProvider {
    LocalProvider::start_with(&config(threads, queue), || {
        Ok(Box::new(CountingDouble {
            gate: None,
            started: None,
            fail_on_len: None,
        }))
    })
    .expect("pool starts")
}

fn speech(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32) * 0.07).sin() * 0.3).collect()
}

/// Every event until `Closed` (which must come within 10 s).
fn drain(rx: &mut ResultReceiver) -> Vec<SttEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(SttEvent::Closed) => return out,
            Ok(e) => out.push(e),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no Closed event; got {out:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("channel closed before Closed: {e:?}; got {out:?}"),
        }
    }
}

fn finals(events: &[SttEvent]) -> Vec<(String, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Result(r) => {
                assert_eq!(r.kind, ResultKind::Final);
                Some((r.text.clone(), r.start_ms, r.end_ms))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn runs_come_back_as_final_results_in_stream_time_with_exact_forwarded_samples() {
    let provider = plain(1, 8);
    let (sink, mut rx) = results_channel(16);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    let run = speech(8_000);
    // Run 1: 0.0-0.5 s, pushed in two pieces; run 2: 2.0-3.0 s, started without an explicit end of run.
    stream.push(0, Pcm::F32(&run[..3_000])).expect("pushed");
    stream.push(3_000, Pcm::F32(&run[3_000..])).expect("pushed");
    let ints: Vec<i16> = speech(16_000)
        .iter()
        .map(|&v| crate::stt::types::f32_to_i16(v))
        .collect();
    stream.push(32_000, Pcm::I16(&ints)).expect("pushed");
    stream.close();
    let events = drain(&mut rx);
    assert_eq!(
        finals(&events),
        vec![("n=8000".into(), 0, 500), ("n=16000".into(), 2_000, 3_000)]
    );
    let stats = stream.stats();
    assert_eq!(stats.forwarded_samples, 24_000);
    assert_eq!(stats.dropped_samples, 0);
    assert_eq!(stream.push(48_000, Pcm::F32(&run)), Err(SttError::Closed));
}

#[test]
fn a_long_run_is_cut_into_chunks_of_at_most_ten_seconds_covering_it_exactly() {
    let provider = plain(1, 8);
    let (sink, mut rx) = results_channel(16);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    let audio = speech(16_000 * 25);
    for (i, piece) in audio.chunks(320).enumerate() {
        stream
            .push(16_000 + (i * 320) as u64, Pcm::F32(piece))
            .expect("pushed");
    }
    stream.end_of_run().expect("ended");
    stream.close();
    let results = finals(&drain(&mut rx));
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(results[0].1, 1_000);
    assert_eq!(results[2].2, 26_000);
    for w in results.windows(2) {
        assert_eq!(w[0].2, w[1].1, "chunks are contiguous");
    }
    for (_, s, e) in &results {
        assert!(e - s <= 10_000, "{s}..{e}");
    }
    assert_eq!(stream.stats().forwarded_samples, 400_000);
}

/// A pool of `threads` workers, each held at a gate until the test lets a chunk through; `started` says
/// the length of each chunk a worker began.
fn gated(threads: usize, queue: usize) -> (LocalProvider, mpsc::Sender<()>, mpsc::Receiver<usize>) {
    let (gate_tx, gate_rx) = mpsc::channel();
    let gate = Arc::new(Mutex::new(gate_rx));
    let (started_tx, started_rx) = mpsc::channel();
    let provider = LocalProvider::start_with(&config(threads, queue), move || {
        Ok(Box::new(CountingDouble {
            gate: Some(Arc::clone(&gate)),
            started: Some(started_tx.clone()),
            fail_on_len: None,
        }))
    })
    .expect("pool starts");
    (provider, gate_tx, started_rx)
}

#[test]
fn a_chunk_with_no_place_in_the_queue_is_refused_as_it_is_pushed_and_counted_without_blocking() {
    let (provider, gate_tx, started_rx) = gated(1, 1);
    let (sink, mut rx) = results_channel(16);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    let run = speech(4_000);
    // Run 1 occupies the only worker (held at the gate), run 2 the only place, run 3 finds none.
    stream.push(0, Pcm::F32(&run)).expect("pushed");
    stream.end_of_run().expect("queued");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok(4_000));
    stream
        .push(10_000, Pcm::F32(&run[..1_000]))
        .expect("pushed");
    stream
        .push(11_000, Pcm::F32(&run[1_000..]))
        .expect("pushed");
    stream.end_of_run().expect("queued");
    assert_eq!(provider.queued(), 1);
    // Refused at once, as pushed: the session gives back the charge of exactly these samples.
    assert_eq!(
        stream.push(20_000, Pcm::F32(&run[..1_500])),
        Err(SttError::Refused { samples: 1_500 })
    );
    assert_eq!(
        stream.push(21_500, Pcm::F32(&run[1_500..])),
        Err(SttError::Refused { samples: 2_500 })
    );
    // The refused run's end says so again (nothing more to give back).
    assert_eq!(stream.end_of_run(), Err(SttError::Refused { samples: 0 }));
    gate_tx.send(()).expect("release run 1");
    gate_tx.send(()).expect("release run 2");
    // Run 2 reached the engine: the worker took it from the queue and its place is free again.
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok(4_000));
    stream.push(40_000, Pcm::F32(&run)).expect("a place again");
    stream.end_of_run().expect("queued");
    gate_tx.send(()).expect("release run 4");
    stream.close();
    let results = finals(&drain(&mut rx));
    assert_eq!(results.len(), 3, "{results:?}");
    let stats = stream.stats();
    assert_eq!(
        stats.forwarded_samples, 12_000,
        "only what reached the engine"
    );
    assert_eq!(stats.dropped_samples, 4_000);
}

#[test]
fn a_chunk_that_found_a_place_is_never_refused_at_its_end_however_long_the_queue_stays_full() {
    let (provider, gate_tx, started_rx) = gated(1, 2);
    let (sink, mut rx) = results_channel(16);
    let mut a = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    let (sink_b, mut rx_b) = results_channel(16);
    let mut b = provider
        .open_stream(StreamOptions::default(), sink_b)
        .expect("opens");
    let run = speech(8_000);
    // A's first chunk occupies the worker; A's second run takes a place with its first sample and B's
    // run the last one, while A's run is still being filled.
    a.push(0, Pcm::F32(&run)).expect("pushed");
    a.end_of_run().expect("queued");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok(8_000));
    a.push(16_000, Pcm::F32(&run[..100])).expect("a place");
    b.push(0, Pcm::F32(&run)).expect("the last place");
    b.end_of_run().expect("queued");
    // A's run goes on filling its chunk with no free place anywhere, and is queued at its end.
    a.push(16_100, Pcm::F32(&run[100..]))
        .expect("its own place");
    a.end_of_run().expect("queued in its place");
    assert_eq!(provider.queued(), 2);
    for _ in 0..3 {
        gate_tx.send(()).expect("release");
    }
    a.close();
    b.close();
    assert_eq!(finals(&drain(&mut rx)).len(), 2);
    assert_eq!(finals(&drain(&mut rx_b)).len(), 1);
    assert_eq!(a.stats().forwarded_samples, 16_000);
    assert_eq!(a.stats().dropped_samples, 0);
}

#[test]
fn a_long_run_whose_next_chunk_finds_no_place_keeps_what_was_taken_and_refuses_only_new_audio() {
    let (provider, gate_tx, started_rx) = gated(1, 2);
    let open = || {
        let (sink, rx) = results_channel(16);
        let stream = provider
            .open_stream(StreamOptions::default(), sink)
            .expect("opens");
        (stream, rx)
    };
    let (mut busy, mut busy_rx) = open();
    let (mut other, mut other_rx) = open();
    let (mut long, mut long_rx) = open();
    // The worker is held on another stream's chunk; a third stream holds one place while it speaks.
    busy.push(0, Pcm::F32(&speech(800))).expect("pushed");
    busy.end_of_run().expect("queued");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok(800));
    other.push(0, Pcm::F32(&speech(800))).expect("a place");
    // 25 s in pushes of 100 ms: the first chunk takes the last place; when it is full there is none for
    // the rest of the run, which is refused as it comes (tried again after each chunk's length).
    let audio = speech(16_000 * 25);
    let (mut taken, mut refused) = (0u64, 0u64);
    for (i, piece) in audio.chunks(1_600).enumerate() {
        match long.push((i * 1_600) as u64, Pcm::F32(piece)) {
            Ok(()) => taken += piece.len() as u64,
            Err(SttError::Refused { samples }) => {
                taken += piece.len() as u64 - samples;
                refused += samples;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(long.end_of_run(), Err(SttError::Refused { samples: 0 }));
    // The chunk went with everything taken before the push that filled it (what the session charged),
    // the cut at its quietest point or at that push's start, whichever is later.
    assert!(
        (158_400..=160_000).contains(&taken),
        "taken {taken}, refused {refused}"
    );
    assert_eq!(taken + refused, 400_000);
    other.end_of_run().expect("queued in its place");
    for _ in 0..3 {
        gate_tx.send(()).expect("release");
    }
    assert_eq!(
        started_rx.recv_timeout(Duration::from_secs(5)),
        Ok(taken as usize)
    );
    for s in [&mut busy, &mut other, &mut long] {
        s.close();
    }
    assert_eq!(finals(&drain(&mut long_rx)).len(), 1);
    drain(&mut busy_rx);
    drain(&mut other_rx);
    let stats = long.stats();
    assert_eq!(
        stats.forwarded_samples, taken,
        "the engine got what was taken"
    );
    assert_eq!(stats.dropped_samples, refused);
}

#[test]
fn a_silent_stream_holds_no_chunk_buffer_and_a_queued_chunk_takes_its_buffer_along() {
    let provider = plain(1, 8);
    let (sink, mut rx) = results_channel(16);
    let mut stream = LocalStream {
        pool: Arc::clone(&provider.pool),
        shared: Arc::new(StreamShared {
            counters: Arc::clone(sink.counters()),
            sink,
            progress: Mutex::new((0, false)),
        }),
        held: Vec::new(),
        held_start: 0,
        chunk: Chunk::Idle,
        closed: false,
    };
    assert_eq!(stream.held.capacity(), 0);
    let run = speech(16_000 * 12);
    for (i, piece) in run.chunks(1_600).enumerate() {
        stream
            .push((i * 1_600) as u64, Pcm::F32(piece))
            .expect("pushed");
        assert!(
            stream.held.capacity() <= MAX_CHUNK_SAMPLES + 1_600,
            "{}",
            stream.held.capacity()
        );
    }
    stream.end_of_run().expect("queued");
    assert_eq!(stream.held.capacity(), 0, "the buffer went with the chunk");
    stream.close();
    assert_eq!(finals(&drain(&mut rx)).len(), 2);
    assert_eq!(stream.stats().forwarded_samples, 16_000 * 12);
}

#[test]
fn a_full_results_channel_drops_results_counted_and_never_stalls_the_worker() {
    let provider = plain(1, 8);
    let (sink, mut rx) = results_channel(1);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    let run = speech(1_600);
    for start in [0u64, 16_000, 32_000] {
        stream.push(start, Pcm::F32(&run)).expect("pushed");
        stream.end_of_run().expect("queued");
    }
    stream.close();
    // 3 results + Closed into a channel of 1, never read meanwhile: 3 events are dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.stats().dropped_results < 3 {
        assert!(Instant::now() < deadline, "{:?}", stream.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(stream.stats().forwarded_samples, 4_800);
    match rx.try_recv() {
        Ok(SttEvent::Result(r)) => assert_eq!(r.start_ms, 0),
        other => panic!("expected the first result, got {other:?}"),
    }
}

#[test]
fn an_engine_error_is_an_event_and_the_stream_goes_on() {
    let provider = LocalProvider::start_with(&config(1, 8), || {
        Ok(Box::new(CountingDouble {
            gate: None,
            started: None,
            fail_on_len: Some(2_000),
        }))
    })
    .expect("pool starts");
    let (sink, mut rx) = results_channel(16);
    let mut stream = provider
        .open_stream(StreamOptions::default(), sink)
        .expect("opens");
    stream.push(0, Pcm::F32(&speech(2_000))).expect("pushed");
    stream.end_of_run().expect("queued");
    stream
        .push(16_000, Pcm::F32(&speech(3_000)))
        .expect("pushed");
    stream.finalize().expect("queued");
    stream.close();
    let events = drain(&mut rx);
    assert!(
        matches!(
            &events[0],
            SttEvent::Error {
                reason: "engine",
                ..
            }
        ),
        "{events:?}"
    );
    assert_eq!(finals(&events), vec![("n=3000".into(), 1_000, 1_188)]);
    // The failed chunk reached the engine: it is charged as sent.
    assert_eq!(stream.stats().forwarded_samples, 5_000);
}

#[test]
fn a_batch_is_cut_at_pauses_and_reports_what_it_forwarded() {
    let provider = plain(2, 8);
    let audio: Arc<[f32]> = speech(16_000 * 30).into();
    let ticket = provider
        .transcribe_batch(BatchRequest {
            samples: Arc::clone(&audio),
            // One chunk per run (every pause cuts); the silence between runs is not sent.
            speech: vec![(16_000, 48_000), (56_000, 80_000), (160_000, 200_000)],
            language: "en".into(),
        })
        .expect("queued");
    let out = ticket.wait().expect("transcribed");
    let got: Vec<_> = out
        .results
        .iter()
        .map(|r| (r.text.as_str(), r.start_ms, r.end_ms))
        .collect();
    assert_eq!(
        got,
        vec![
            ("n=32000", 1_000, 3_000),
            ("n=24000", 3_500, 5_000),
            ("n=40000", 10_000, 12_500)
        ]
    );
    assert_eq!(out.forwarded_samples, 96_000);
}

#[cfg(target_os = "linux")]
#[test]
fn workers_and_the_threads_they_start_run_below_the_callers_priority() {
    let (tx, rx) = mpsc::channel();
    let _provider = LocalProvider::start_with(&config(1, 1), move || {
        let worker = current_niceness();
        let (inner_tx, inner_rx) = mpsc::channel();
        std::thread::spawn(move || inner_tx.send(current_niceness()));
        let engine_thread = inner_rx.recv().unwrap_or(-100);
        let _ = tx.send((worker, engine_thread));
        Ok(Box::new(CountingDouble {
            gate: None,
            started: None,
            fail_on_len: None,
        }))
    })
    .expect("pool starts");
    let ours = current_niceness();
    let expected = (ours + 10).min(19);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok((expected, expected))
    );
    assert_eq!(
        current_niceness(),
        ours,
        "the caller's own priority is untouched"
    );
}

#[test]
fn a_missing_engine_is_reported_as_not_installed() {
    match LocalProvider::start(&config(1, 1)) {
        Err(SttError::NotInstalled(detail)) => {
            assert!(detail.contains("scripts/deps.sh"), "{detail}")
        }
        other => panic!("expected NotInstalled, got {other:?}"),
    }
}

/// An engine whose model takes a while to free (as ONNX Runtime's does), and says when it has.
struct SlowToFree(Arc<std::sync::atomic::AtomicUsize>);

impl BatchEngine for SlowToFree {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        Ok(format!("n={}", pcm.len()))
    }
}

impl Drop for SlowToFree {
    fn drop(&mut self) {
        // The time a real model's free takes: the provider's drop must not return before it is over.
        std::thread::sleep(Duration::from_millis(50));
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn dropping_the_provider_waits_for_its_workers_to_free_their_models() {
    let freed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let made = Arc::clone(&freed);
    let provider = LocalProvider::start_with(&config(2, 4), move || {
        Ok(Box::new(SlowToFree(Arc::clone(&made))) as Box<dyn BatchEngine>)
    })
    .expect("pool starts");
    drop(provider);
    // No engine thread is left running ONNX Runtime code once the provider is gone (a process exiting then
    // would run the runtime's static destructors under it).
    assert_eq!(freed.load(Ordering::SeqCst), 2);
}
