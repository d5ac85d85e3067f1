//! `voicegate analyze`: the offline pipeline over files given on the command line.
//!
//! When a label file (`NAME.json`, the fixtures' format) sits beside `NAME.bin`/`NAME.wav`, each file's
//! report carries its `label` score: metered minus labelled speech, in ms and percent, and the speech metered
//! inside labelled non-speech events ([`voicegate_engine::pipeline::labels`]).
//!
//! Exit status: 0 when at least one file was analysed, 1 when none could be, 2 for usage errors.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde::Serialize;
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::labels::{Label, LabelScore};
use voicegate_engine::pipeline::offline::{
    FileAnalysis, InputFormat, analyze, bin_format, format_for_name,
};
use voicegate_engine::pipeline::stream::PipelineConfig;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CodecArg {
    Opus,
    Pcm8,
    Pcm16,
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Print exactly one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Codec of every .bin file, overriding what the names say.
    #[arg(long, value_enum)]
    codec: Option<CodecArg>,
    /// Opus sample rate with `--codec opus` (8000, 12000, 16000, 24000, 48000).
    #[arg(long, default_value_t = 16_000)]
    sample_rate: u32,
    /// Opus frame size in samples (informational; packets carry their own).
    #[arg(long, default_value_t = 160)]
    frame_size: u32,
    /// Detector tuning (for measuring a corpus; `serve` uses the defaults): start threshold.
    #[arg(long)]
    threshold: Option<f32>,
    /// Release threshold: a run continues while windows stay at or above it.
    #[arg(long)]
    neg_threshold: Option<f32>,
    /// Runs shorter than this are dropped (ms).
    #[arg(long)]
    min_speech_ms: Option<u64>,
    /// A run ends after this much low probability; shorter dips are bridged (ms).
    #[arg(long)]
    min_silence_ms: Option<u64>,
    /// Padding added at each edge of a run (ms, at most the minimum silence).
    #[arg(long)]
    pad_ms: Option<u64>,
    /// Pre-gate level in dBFS (windows below it skip the model); `--no-gate` runs every window.
    #[arg(long, conflicts_with = "no_gate")]
    gate_dbfs: Option<f32>,
    #[arg(long)]
    no_gate: bool,
    /// Files to analyse (.bin device files or .wav).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Report<'a> {
    files: Vec<FileReport<'a>>,
    total: Total,
}

/// One file's analysis and, when a label sits beside it, its score.
#[derive(Serialize)]
struct FileReport<'a> {
    #[serde(flatten)]
    analysis: &'a FileAnalysis,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<LabelScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label_error: Option<String>,
}

#[derive(Serialize)]
struct Total {
    duration_ms: u64,
    speech_ms: u64,
    /// Labelled speech of the files that have a label, and what was metered in those files.
    #[serde(skip_serializing_if = "Option::is_none")]
    labelled: Option<LabelledTotal>,
}

#[derive(Serialize)]
struct LabelledTotal {
    files: u64,
    label_speech_ms: u64,
    speech_ms: u64,
    error_pct: Option<f64>,
}

pub fn run(args: AnalyzeArgs) -> ExitCode {
    let forced = match args.codec {
        None => None,
        Some(CodecArg::Pcm8) => Some(bin_format(Codec::Pcm8, args.frame_size)),
        Some(CodecArg::Pcm16) => Some(bin_format(Codec::Pcm16, args.frame_size)),
        Some(CodecArg::Opus) => match Codec::opus(args.sample_rate) {
            Some(c) => Some(bin_format(c, args.frame_size)),
            None => {
                eprintln!(
                    "error: --sample-rate {} is not an Opus rate (8000, 12000, 16000, 24000, 48000)",
                    args.sample_rate
                );
                return ExitCode::from(2);
            }
        },
    };
    let mut cfg = PipelineConfig::default();
    let ms = |v: u64| v * 16;
    let d = &mut cfg.detector;
    d.threshold = args.threshold.unwrap_or(d.threshold);
    d.neg_threshold = args.neg_threshold.unwrap_or(d.neg_threshold);
    d.min_speech = args.min_speech_ms.map_or(d.min_speech, ms);
    d.hangover = args.min_silence_ms.map_or(d.hangover, ms);
    d.pad = args.pad_ms.map_or(d.pad, ms);
    if args.no_gate {
        cfg.gate_dbfs = None;
    } else if let Some(g) = args.gate_dbfs {
        cfg.gate_dbfs = Some(g);
    }
    let results: Vec<FileAnalysis> = args
        .files
        .par_iter()
        .map(|path| analyze_path(path, forced.as_ref(), &cfg))
        .collect();
    let scores: Vec<(Option<LabelScore>, Option<String>)> = args
        .files
        .iter()
        .zip(&results)
        .map(|(path, r)| score_beside(path, r))
        .collect();
    let total = Total {
        duration_ms: results.iter().map(|r| r.duration_ms).sum(),
        speech_ms: results.iter().map(|r| r.speech_ms).sum(),
        labelled: labelled_total(&results, &scores),
    };
    if args.json {
        let report = Report {
            files: results
                .iter()
                .zip(scores)
                .map(|(analysis, (label, label_error))| FileReport {
                    analysis,
                    label,
                    label_error,
                })
                .collect(),
            total,
        };
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: could not encode the report: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print_table(&results, &scores, &total);
    }
    if results.iter().any(|r| r.error.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn analyze_path(
    path: &PathBuf,
    forced: Option<&InputFormat>,
    cfg: &PipelineConfig,
) -> FileAnalysis {
    let name = path.display().to_string();
    let is_wav = name.to_ascii_lowercase().ends_with(".wav");
    let format = match (forced, is_wav) {
        (Some(f), false) => f.clone(),
        _ => match format_for_name(&name) {
            Ok(f) => f,
            Err(e) => return failed(&name, e.code(), e.to_string()),
        },
    };
    match File::open(path) {
        Ok(f) => analyze(&name, BufReader::with_capacity(64 * 1024, f), &format, cfg),
        Err(e) => failed(&name, "unreadable", format!("cannot open the file: {e}")),
    }
}

/// The score against `NAME.json` beside the file, if there is one (an unreadable label is reported, never
/// fatal: the analysis stands on its own).
fn score_beside(path: &std::path::Path, r: &FileAnalysis) -> (Option<LabelScore>, Option<String>) {
    let label_path = path.with_extension("json");
    if r.error.is_some() || label_path == path || !label_path.is_file() {
        return (None, None);
    }
    let parsed = std::fs::read_to_string(&label_path)
        .map_err(|e| e.to_string())
        .and_then(|t| Label::from_json(&t).map_err(|e| e.to_string()));
    match parsed {
        Ok(label) => (Some(label.score(r.speech_ms, &r.raw_segments_ms)), None),
        Err(e) => (
            None,
            Some(format!("label {} unreadable: {e}", label_path.display())),
        ),
    }
}

fn labelled_total(
    results: &[FileAnalysis],
    scores: &[(Option<LabelScore>, Option<String>)],
) -> Option<LabelledTotal> {
    let mut t = LabelledTotal {
        files: 0,
        label_speech_ms: 0,
        speech_ms: 0,
        error_pct: None,
    };
    for (r, (s, _)) in results.iter().zip(scores) {
        if let Some(s) = s {
            t.files += 1;
            t.label_speech_ms += s.label_speech_ms;
            t.speech_ms += r.speech_ms;
        }
    }
    if t.files == 0 {
        return None;
    }
    t.error_pct = (t.label_speech_ms > 0).then(|| {
        (t.speech_ms as f64 - t.label_speech_ms as f64) * 100.0 / t.label_speech_ms as f64
    });
    Some(t)
}

fn failed(name: &str, code: &'static str, error: String) -> FileAnalysis {
    FileAnalysis::failed(name, "", 0, code, error)
}

fn print_table(
    results: &[FileAnalysis],
    scores: &[(Option<LabelScore>, Option<String>)],
    total: &Total,
) {
    println!(
        "{:<48} {:>6} {:>6} {:>11} {:>10} {:>6} {:>6} {:>8} {:>8}",
        "file", "codec", "rate", "duration_ms", "speech_ms", "raw", "merged", "label_ms", "error"
    );
    for (r, (score, label_error)) in results.iter().zip(scores) {
        let name = if r.file.len() > 48 {
            &r.file[r.file.len() - 48..]
        } else {
            &r.file
        };
        let (label_ms, error) = match score {
            Some(s) => (
                s.label_speech_ms.to_string(),
                s.error_pct
                    .map_or_else(|| format!("{:+}ms", s.error_ms), |p| format!("{p:+.1}%")),
            ),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<48} {:>6} {:>6} {:>11} {:>10} {:>6} {:>6} {:>8} {:>8}",
            name,
            r.codec,
            r.sample_rate,
            r.duration_ms,
            r.speech_ms,
            r.raw_segments_ms.len(),
            r.merged_segments_ms.len(),
            label_ms,
            error
        );
        if let Some(e) = label_error {
            println!("    warning: {e}");
        }
        for w in &r.warnings {
            println!("    warning: {w}");
        }
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
    let (label_ms, error) = match &total.labelled {
        Some(t) => (
            t.label_speech_ms.to_string(),
            t.error_pct
                .map_or_else(String::new, |p| format!("{p:+.1}%")),
        ),
        None => (String::new(), String::new()),
    };
    println!(
        "{:<48} {:>6} {:>6} {:>11} {:>10} {:>6} {:>6} {:>8} {:>8}",
        "total", "", "", total.duration_ms, total.speech_ms, "", "", label_ms, error
    );
}
