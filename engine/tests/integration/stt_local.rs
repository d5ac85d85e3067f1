//! The local speech-to-text engine (Moonshine base-en, installed by `scripts/deps.sh`) on the labelled
//! fixtures, through the batch API, scored by word error rate on the English utterances.
//!
//! These tests FAIL (they do not skip) when the engine is not installed: CI runs `scripts/deps.sh` first.
//! On a CPU that cannot run the pinned engine (no AVX-512: `ffi::cpu_unsupported`) they return at once,
//! saying so; `scripts/test.sh` prints it at the start of the run.
//! Score the whole fixture set (12 clips, ~2 min of English speech) with:
//!
//! ```text
//! cargo nextest run -p voicegate-engine --test integration stt_local::whole_fixture_set --run-ignored all --no-capture
//! ```

use std::sync::Arc;
use std::time::Instant;

use voicegate_engine::audio::codec::Codec;
use voicegate_engine::audio::opus_dec::OpusDecoder;
use voicegate_engine::pipeline::offline::{analyze, bin_format};
use voicegate_engine::pipeline::stream::PipelineConfig;
use voicegate_engine::stt::chunk::pad_runs;
use voicegate_engine::stt::local::{LocalConfig, LocalProvider};
use voicegate_engine::stt::wer::Score;
use voicegate_engine::stt::{BatchRequest, SttProvider, SttResult};

/// Audio kept before each VAD run (the live session's default pre-roll) and after it.
const PRE_ROLL_SAMPLES: u64 = 4_800;
const HANGOVER_SAMPLES: u64 = 1_600;
/// A result belongs with an utterance when they overlap by more than this.
const MIN_OVERLAP_MS: u64 = 100;

struct Utterance {
    start_ms: u64,
    end_ms: u64,
    english: bool,
    text: String,
}

struct Clip {
    id: String,
    samples: Vec<f32>,
    utterances: Vec<Utterance>,
}

fn load(id: &str) -> Clip {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    let bytes = std::fs::read(format!("{dir}/{id}.bin")).unwrap();
    let label: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{id}.json")).unwrap())
            .unwrap();
    let mut decoder = OpusDecoder::new(16_000).unwrap();
    let mut samples = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        decoder
            .decode(&bytes[at + 4..at + 4 + len], &mut samples)
            .unwrap();
        at += 4 + len;
    }
    let utterances = label["utterances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| Utterance {
            start_ms: u["start_ms"].as_u64().unwrap(),
            end_ms: u["end_ms"].as_u64().unwrap(),
            english: u["lang"] == "en",
            text: u["text"].as_str().unwrap().to_string(),
        })
        .collect();
    Clip {
        id: id.to_string(),
        samples,
        utterances,
    }
}

fn engine(threads: usize) -> LocalProvider {
    let config = LocalConfig {
        threads,
        ..LocalConfig::default()
    };
    LocalProvider::start(&config).unwrap_or_else(|e| {
        panic!(
            "the local STT engine must be installed for this test (it fails rather than skips): {e}; dir {}",
            config.dir.display()
        )
    })
}

/// The clip's speech as the engine's VAD finds it, padded like a live session's runs; with
/// `STT_SPANS=labels`, the labelled utterance spans instead (the engine alone, without VAD misses).
fn speech_runs(clip: &Clip) -> Vec<(u64, u64)> {
    if std::env::var("STT_SPANS").as_deref() == Ok("labels") {
        let spans: Vec<(u64, u64)> = clip
            .utterances
            .iter()
            .map(|u| (u.start_ms * 16, u.end_ms * 16))
            .collect();
        return pad_runs(
            &spans,
            PRE_ROLL_SAMPLES,
            HANGOVER_SAMPLES,
            clip.samples.len() as u64,
        );
    }
    let bytes = std::fs::read(format!(
        "{}/../fixtures/{}.bin",
        env!("CARGO_MANIFEST_DIR"),
        clip.id
    ))
    .unwrap();
    let format = bin_format(Codec::opus(16_000).unwrap(), 160);
    let analysis = analyze(&clip.id, &bytes[..], &format, &PipelineConfig::default());
    assert!(analysis.error.is_none(), "{:?}", analysis.error);
    let runs: Vec<(u64, u64)> = analysis
        .raw_spans
        .iter()
        .map(|s| (s.start, s.end))
        .collect();
    pad_runs(
        &runs,
        PRE_ROLL_SAMPLES,
        HANGOVER_SAMPLES,
        clip.samples.len() as u64,
    )
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> u64 {
    a.1.min(b.1).saturating_sub(a.0.max(b.0))
}

/// What one clip scored.
#[derive(Default)]
struct ClipScore {
    english: Score,
    /// Reference words left out: utterances not in English, or sharing results with one.
    excluded_words: usize,
    speech_ms: u64,
    forwarded_samples: u64,
    seconds: f64,
}

/// Groups utterances and results that overlap in time (connected components) and scores each group whose
/// utterances are all English; a result overlapping no utterance counts as inserted words.
fn score(clip: &Clip, results: &[SttResult]) -> ClipScore {
    let n = clip.utterances.len();
    // Union-find over utterances (0..n) and results (n..).
    let mut parent: Vec<usize> = (0..n + results.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for (r, res) in results.iter().enumerate() {
        for (u, utt) in clip.utterances.iter().enumerate() {
            if overlap((res.start_ms, res.end_ms), (utt.start_ms, utt.end_ms)) > MIN_OVERLAP_MS {
                let (a, b) = (root(&mut parent, u), root(&mut parent, n + r));
                parent[a] = b;
            }
        }
    }
    let mut out = ClipScore::default();
    let mut groups: std::collections::BTreeMap<usize, (Vec<usize>, Vec<usize>)> =
        Default::default();
    for i in 0..n + results.len() {
        let g = groups.entry(root(&mut parent, i)).or_default();
        if i < n { g.0.push(i) } else { g.1.push(i - n) }
    }
    for (utts, res) in groups.values() {
        let reference: Vec<&str> = utts
            .iter()
            .map(|&u| clip.utterances[u].text.as_str())
            .collect();
        let hypothesis: Vec<&str> = res.iter().map(|&r| results[r].text.as_str()).collect();
        if utts.iter().all(|&u| clip.utterances[u].english) {
            out.english
                .add(Score::of(&reference.join(" "), &hypothesis.join(" ")));
        } else {
            out.excluded_words += Score::of(&reference.join(" "), "").reference_words;
        }
    }
    out.speech_ms = clip.utterances.iter().map(|u| u.end_ms - u.start_ms).sum();
    out
}

fn transcribe(provider: &LocalProvider, clip: &Clip) -> ClipScore {
    let request = BatchRequest {
        samples: Arc::from(clip.samples.as_slice()),
        speech: speech_runs(clip),
        language: "en".into(),
    };
    let began = Instant::now();
    let output = provider.transcribe_batch(request).unwrap().wait().unwrap();
    let seconds = began.elapsed().as_secs_f64();
    for r in &output.results {
        eprintln!(
            "  {} {:>6}-{:>6} ms  {}",
            clip.id, r.start_ms, r.end_ms, r.text
        );
    }
    let mut s = score(clip, &output.results);
    s.forwarded_samples = output.forwarded_samples;
    s.seconds = seconds;
    s
}

fn run(ids: &[&str], threads: usize) -> Score {
    let provider = engine(threads);
    let mut total = Score::default();
    let (mut forwarded, mut seconds, mut excluded) = (0u64, 0f64, 0usize);
    for id in ids {
        let clip = load(id);
        let s = transcribe(&provider, &clip);
        eprintln!(
            "{id}: WER {:.1}% ({} errors / {} English words; {} words excluded), {:.1} s of audio sent in {:.1} s",
            s.english.wer() * 100.0,
            s.english.errors,
            s.english.reference_words,
            s.excluded_words,
            s.forwarded_samples as f64 / 16_000.0,
            s.seconds
        );
        assert!(
            s.forwarded_samples as f64 / 16.0 >= s.speech_ms as f64 * 0.9,
            "{id}: the speech was sent"
        );
        total.add(s.english);
        forwarded += s.forwarded_samples;
        seconds += s.seconds;
        excluded += s.excluded_words;
    }
    eprintln!(
        "total: WER {:.2}% ({} / {} English words, {excluded} excluded); {:.1} s sent, transcribed at {:.2}x realtime",
        total.wer() * 100.0,
        total.errors,
        total.reference_words,
        forwarded as f64 / 16_000.0,
        forwarded as f64 / 16_000.0 / seconds
    );
    total
}

#[test]
fn local_engine_transcribes_english_fixture_utterances_within_15_percent_wer() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    // d01 and d09: speech over silence; d09's French and Spanish utterances are left out of the score.
    let total = run(&["d01", "d09"], 1);
    assert!(
        total.reference_words >= 100,
        "scored {} words",
        total.reference_words
    );
    assert!(total.wer() <= 0.15, "WER {:.1}%", total.wer() * 100.0);
}

/// The whole set, clean and noisy clips apart. Measured (docs/stt.md): clean 11.5%, overall 23.6%: noise
/// at 5-10 dB SNR and music defeat Moonshine base on this synthetic speech, so only the clean clips are
/// held to 15%, and the overall figure to the measured level as a regression guard.
#[test]
#[ignore = "about 90 s of engine time: run it by name (module docs)"]
fn whole_fixture_set() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let clean = run(&["d01", "d02", "d09"], 1);
    let noisy = run(
        &[
            "d03", "d04", "d05", "d06", "d07", "d08", "d10", "d11", "d12",
        ],
        1,
    );
    let mut all = clean;
    all.add(noisy);
    eprintln!(
        "clean (silence background): WER {:.2}%; noisy (white, pink, music; 5-30 dB SNR): {:.2}%; all: {:.2}% ({} / {} words)",
        clean.wer() * 100.0,
        noisy.wer() * 100.0,
        all.wer() * 100.0,
        all.errors,
        all.reference_words
    );
    assert!(clean.wer() <= 0.15, "clean WER {:.1}%", clean.wer() * 100.0);
    assert!(all.wer() <= 0.25, "overall WER {:.1}%", all.wer() * 100.0);
}
