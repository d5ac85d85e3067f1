//! `voicegate analyze`: the offline pipeline over files given on the command line.
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
    /// Files to analyse (.bin device files or .wav).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Report<'a> {
    files: &'a [FileAnalysis],
    total: Total,
}

#[derive(Serialize)]
struct Total {
    duration_ms: u64,
    speech_ms: u64,
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
    let cfg = PipelineConfig::default();
    let results: Vec<FileAnalysis> = args
        .files
        .par_iter()
        .map(|path| analyze_path(path, forced.as_ref(), &cfg))
        .collect();
    let total = Total {
        duration_ms: results.iter().map(|r| r.duration_ms).sum(),
        speech_ms: results.iter().map(|r| r.speech_ms).sum(),
    };
    if args.json {
        let report = Report {
            files: &results,
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
        print_table(&results, &total);
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

fn failed(name: &str, code: &'static str, error: String) -> FileAnalysis {
    FileAnalysis::failed(name, "", 0, code, error)
}

fn print_table(results: &[FileAnalysis], total: &Total) {
    println!(
        "{:<48} {:>6} {:>6} {:>11} {:>10} {:>6} {:>6}",
        "file", "codec", "rate", "duration_ms", "speech_ms", "raw", "merged"
    );
    for r in results {
        let name = if r.file.len() > 48 {
            &r.file[r.file.len() - 48..]
        } else {
            &r.file
        };
        println!(
            "{:<48} {:>6} {:>6} {:>11} {:>10} {:>6} {:>6}",
            name,
            r.codec,
            r.sample_rate,
            r.duration_ms,
            r.speech_ms,
            r.raw_segments_ms.len(),
            r.merged_segments_ms.len()
        );
        for w in &r.warnings {
            println!("    warning: {w}");
        }
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
    println!(
        "{:<48} {:>6} {:>6} {:>11} {:>10}",
        "total", "", "", total.duration_ms, total.speech_ms
    );
}
