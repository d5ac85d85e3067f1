//! Speed and memory of the local speech-to-text engine (Moonshine base-en), measured on the fixtures.
//!
//! ```text
//! cargo build --release -p voicegate-benches --bin stt-local
//! taskset -c 0 target/release/stt-local speed fixtures/d01.wav ...      # x realtime on one core, RSS
//! taskset -c 0 target/release/stt-local talkers 3 fixtures/d01.wav       # 3 paced talkers: latency
//! ```
//!
//! Input: 16 kHz mono 16-bit WAV files, or the fixtures' `.bin` (Opus, 10 ms frames). Speech runs come from
//! the engine's own VAD, padded by the live session's 300 ms pre-roll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use voicegate_engine::audio::codec::Codec;
use voicegate_engine::audio::opus_dec::OpusDecoder;
use voicegate_engine::pipeline::offline::{analyze, bin_format};
use voicegate_engine::pipeline::stream::PipelineConfig;
use voicegate_engine::stt::chunk::{MAX_CHUNK_SAMPLES, batch_chunks, pad_runs};
use voicegate_engine::stt::local::{LocalConfig, LocalProvider};
use voicegate_engine::stt::{
    BatchRequest, Pcm, StreamOptions, SttEvent, SttProvider, results_channel,
};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn decode(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut decoder = OpusDecoder::new(16_000).expect("decoder");
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        if at + 4 + len > bytes.len() {
            break;
        }
        decoder
            .decode(&bytes[at + 4..at + 4 + len], &mut out)
            .expect("packet");
        at += 4 + len;
    }
    out
}

/// Samples and padded VAD runs of one fixture.
fn load(path: &str) -> (Vec<f32>, Vec<(u64, u64)>) {
    let samples = decode(path);
    let bytes = std::fs::read(path).expect("read");
    let format = bin_format(Codec::opus(16_000).expect("codec"), 160);
    let analysis = analyze(path, &bytes[..], &format, &PipelineConfig::default());
    let runs: Vec<(u64, u64)> = analysis
        .raw_spans
        .iter()
        .map(|s| (s.start, s.end))
        .collect();
    let runs = pad_runs(&runs, 4_800, 1_600, samples.len() as u64);
    (samples, runs)
}

fn speed(paths: &[String]) {
    let idle = rss_kib("VmRSS:");
    let config = LocalConfig::default();
    let began = Instant::now();
    let provider = LocalProvider::start(&config).expect("engine installed (scripts/deps.sh)");
    let load_s = began.elapsed().as_secs_f64();
    let loaded = rss_kib("VmRSS:");
    println!(
        "model load {load_s:.2} s; RSS {} MB before, {} MB with one worker",
        idle / 1024,
        loaded / 1024
    );
    let (mut audio_s, mut wall_s, mut chunks) = (0f64, 0f64, 0usize);
    let mut worst_chunk = 0f64;
    for path in paths {
        let (samples, runs) = load(path);
        let samples: Arc<[f32]> = samples.into();
        for (s, e) in batch_chunks(&samples, &runs, MAX_CHUNK_SAMPLES) {
            let request = BatchRequest {
                samples: Arc::from(&samples[s..e]),
                speech: Vec::new(),
                language: "en".into(),
            };
            let t = Instant::now();
            let out = provider
                .transcribe_batch(request)
                .expect("queued")
                .wait()
                .expect("transcribed");
            let took = t.elapsed().as_secs_f64();
            audio_s += out.forwarded_samples as f64 / 16_000.0;
            wall_s += took;
            chunks += 1;
            worst_chunk = worst_chunk.max(took);
        }
    }
    println!(
        "{chunks} chunks, {audio_s:.1} s of speech in {wall_s:.1} s: {:.2}x realtime; slowest chunk {worst_chunk:.2} s; peak RSS {} MB",
        audio_s / wall_s,
        rss_kib("VmHWM:") / 1024
    );
}

/// `k` talkers each replaying the file's speech runs at real time into its own stream; prints how long after
/// each run's end its final result arrived (p50, p95, worst) and what was dropped.
fn talkers(k: usize, path: &str) {
    let config = LocalConfig::default();
    let provider = LocalProvider::start(&config).expect("engine installed (scripts/deps.sh)");
    let (samples, runs) = load(path);
    let samples = Arc::new(samples);
    let began = Instant::now();
    let mut handles = Vec::new();
    for t in 0..k {
        let (sink, mut rx) = results_channel(64);
        let mut stream = provider
            .open_stream(StreamOptions::default(), sink)
            .expect("stream");
        let (samples, runs) = (Arc::clone(&samples), runs.clone());
        // Staggered starts so the talkers do not end their runs in lockstep.
        let offset = Duration::from_millis(t as u64 * 700);
        let receiver = std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            while let Some(event) = rx.blocking_recv() {
                match event {
                    SttEvent::Result(r) => arrivals.push((r.end_ms, Instant::now())),
                    SttEvent::Closed => break,
                    _ => {}
                }
            }
            arrivals
        });
        handles.push(std::thread::spawn(move || {
            let mut ends: Vec<(u64, Instant)> = Vec::new();
            for &(s, e) in &runs {
                let mut at = s;
                while at < e {
                    let next = (at + 320).min(e);
                    let due = began + offset + Duration::from_micros(next * 1_000_000 / 16_000);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let _ = stream.push(at, Pcm::F32(&samples[at as usize..next as usize]));
                    at = next;
                }
                let _ = stream.end_of_run();
                ends.push((e * 1_000 / 16_000, Instant::now()));
            }
            stream.close();
            let arrivals = receiver.join().unwrap_or_default();
            let lags: Vec<f64> = arrivals
                .iter()
                .filter_map(|(end_ms, at)| {
                    ends.iter()
                        .find(|(e, _)| e.abs_diff(*end_ms) <= 1)
                        .map(|(_, ended)| at.duration_since(*ended).as_secs_f64())
                })
                .collect();
            (lags, stream.stats())
        }));
    }
    let mut lags = Vec::new();
    let (mut forwarded, mut dropped) = (0u64, 0u64);
    for h in handles {
        let (l, stats) = h.join().expect("talker");
        lags.extend(l);
        forwarded += stats.forwarded_samples;
        dropped += stats.dropped_samples;
    }
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{k} talkers, {} results: end-of-speech to final result p50 {:.2} s, p95 {:.2} s, worst {:.2} s; {:.1} s sent, {:.1} s dropped; peak RSS {} MB",
        lags.len(),
        pct(0.5),
        pct(0.95),
        lags.last().copied().unwrap_or(f64::NAN),
        forwarded as f64 / 16_000.0,
        dropped as f64 / 16_000.0,
        rss_kib("VmHWM:") / 1024
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("speed") => speed(&args[1..]),
        Some("talkers") => {
            let k = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1);
            talkers(
                k,
                args.get(2)
                    .map(String::as_str)
                    .unwrap_or("fixtures/d01.bin"),
            );
        }
        _ => eprintln!("usage: stt-local speed FILE.bin... | stt-local talkers K FILE.bin"),
    }
}
