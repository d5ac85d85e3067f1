//! Audio benches. Throughput is in milliseconds of audio per second, so criterion's `Kelem/s` reads
//! directly as "x realtime" (1 Kelem/s = 1,000 ms of audio per second = 1x).
//! Run on one core: `cargo bench -p voicegate-benches --bench audio --no-run`, then from `benches/`
//! `taskset -c 0 <the printed binary> --bench` (running it directly keeps cargo off the measured core).
//! `vad_*` use the backend `SileroModel::shared()` picks (the native network with AVX-512 or AVX2 and FMA);
//! `vad_ungated_tract` is the tract reference for comparison.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use voicegate_engine::audio::codec::{Codec, Decoder};
use voicegate_engine::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};
use voicegate_engine::audio::resample::Resampler;
use voicegate_engine::audio::vad::{SileroModel, VadStream};
use voicegate_engine::pipeline::offline::{analyze, bin_format};
use voicegate_engine::pipeline::stream::{PipelineConfig, SpeechPipeline};

fn fixtures() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    (1..=12)
        .map(|i| std::fs::read(format!("{dir}/d{i:02}.bin")).expect("fixture"))
        .collect()
}

fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut r = RecordReader::new(bytes, MAX_OPUS_RECORD);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while let Ok(Next::Record { .. }) = r.next_record(&mut buf) {
        out.push(buf.clone());
    }
    out
}

fn decode_all(files: &[Vec<u8>]) -> Vec<Vec<f32>> {
    files
        .iter()
        .map(|f| {
            let mut d = Decoder::new(Codec::opus(16_000).expect("rate")).expect("decoder");
            let mut pcm = Vec::new();
            for p in records(f) {
                let _ = d.decode(&p, &mut pcm);
            }
            pcm
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let files = fixtures();
    let pcm = decode_all(&files);
    let audio_ms: u64 = pcm.iter().map(|p| p.len() as u64 / 16).sum();
    let model = SileroModel::shared().expect("model");
    let mut g = c.benchmark_group("audio");
    g.sample_size(10);
    g.throughput(Throughput::Elements(audio_ms));
    g.bench_function("container_parse", |b| {
        b.iter(|| {
            files
                .iter()
                .map(|f| records(black_box(f)).len())
                .sum::<usize>()
        })
    });
    g.bench_function("opus_decode", |b| b.iter(|| decode_all(black_box(&files))));
    g.bench_function("vad_ungated", |b| {
        b.iter(|| {
            for p in &pcm {
                let mut v = VadStream::new(model.clone(), None);
                let mut out = Vec::new();
                v.push(p, &mut out).expect("vad");
                v.finish(&mut out).expect("vad");
                black_box(out.len());
            }
        })
    });
    let tract = std::sync::Arc::new(SileroModel::load_tract().expect("tract model"));
    g.bench_function("vad_ungated_tract", |b| {
        b.iter(|| {
            for p in &pcm {
                let mut v = VadStream::new(tract.clone(), None);
                let mut out = Vec::new();
                v.push(p, &mut out).expect("vad");
                v.finish(&mut out).expect("vad");
                black_box(out.len());
            }
        })
    });
    g.bench_function("vad_gated", |b| {
        b.iter(|| {
            for p in &pcm {
                let mut v = VadStream::new(model.clone(), Some(-50.0));
                let mut out = Vec::new();
                v.push(p, &mut out).expect("vad");
                v.finish(&mut out).expect("vad");
                black_box(out.len());
            }
        })
    });
    g.bench_function("pipeline_offline", |b| {
        let cfg = PipelineConfig::default();
        let fmt = bin_format(Codec::opus(16_000).expect("rate"), 160);
        b.iter(|| {
            files
                .iter()
                .map(|f| analyze("f", &f[..], &fmt, &cfg).speech_ms)
                .sum::<u64>()
        })
    });
    // The live path: one SpeechPipeline per stream, 10 ms packets pushed one by one, flushed every
    // 100 ms as a websocket session would to keep latency low.
    let packets: Vec<Vec<Vec<u8>>> = files.iter().map(|f| records(f)).collect();
    g.bench_function("pipeline_stream_10ms_flush_100ms", |b| {
        let cfg = PipelineConfig::default();
        let codec = Codec::opus(16_000).expect("rate");
        b.iter(|| {
            let mut speech = 0;
            for file in &packets {
                let mut p =
                    SpeechPipeline::for_codec(codec, &cfg, model.clone()).expect("pipeline");
                let mut events = Vec::new();
                for (i, pkt) in file.iter().enumerate() {
                    p.push_payload(pkt, &mut events).expect("push");
                    if i % 10 == 9 {
                        p.flush(&mut events).expect("flush");
                    }
                }
                p.finish(&mut events).expect("finish");
                speech += p.speech_samples();
            }
            speech
        })
    });
    g.finish();
    // Resampling 48 kHz → 16 kHz: throughput in ms of input audio.
    let tone: Vec<f32> = (0..48_000 * 10)
        .map(|i| (i as f32 * 0.05).sin() * 0.3)
        .collect();
    let mut g = c.benchmark_group("resample");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("48k_to_16k", |b| {
        b.iter(|| {
            let mut r = Resampler::new(48_000).expect("resampler");
            let mut out = Vec::new();
            for chunk in tone.chunks(480) {
                r.push(chunk, &mut out).expect("resample");
            }
            r.finish(&mut out).expect("resample");
            out.len()
        })
    });
    g.finish();
}

criterion_group!(audio, benches);
criterion_main!(audio);
