//! Offline pipeline: one device file (or WAV) → duration, raw speech runs, metered speech, STT
//! segments and warnings; many files in parallel over the cores.

use std::io::Read;
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use super::stream::{PipelineConfig, SpeechPipeline};
use crate::audio::codec::Codec;
use crate::audio::container::{MAX_OPUS_RECORD, MAX_PCM_RECORD, Next, RecordReader};
use crate::audio::detector::SpeechEvent;
use crate::audio::filename::FileSpec;
use crate::audio::resample::TARGET_RATE;
use crate::audio::segments::merge_for_stt;
use crate::audio::vad::SileroModel;
use crate::audio::wav::read_wav;
use crate::time::{Span, samples_to_ms};

/// How a file's bytes are to be read.
#[derive(Debug, Clone, PartialEq)]
pub enum InputFormat {
    /// A `.bin` device container of `codec` records.
    Bin(FileSpec),
    /// A RIFF/WAVE file.
    Wav,
}

/// Everything the offline pipeline learned about one file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileAnalysis {
    pub file: String,
    pub codec: String,
    pub sample_rate: u32,
    pub duration_ms: u64,
    /// Metered speech: the sum of raw runs.
    pub speech_ms: u64,
    pub raw_segments_ms: Vec<[u64; 2]>,
    pub merged_segments_ms: Vec<[u64; 2]>,
    pub warnings: Vec<String>,
    /// The byte offset where the container was cut (a truncated, oversized or empty record): the records
    /// before it were analysed, nothing after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_at: Option<u64>,
    /// Stable code of the truncation (`empty_record`, `truncated_record`, `record_too_large`,
    /// `truncated_length`), with `truncated_at`.
    #[serde(skip)]
    pub truncation_code: Option<&'static str>,
    pub error: Option<String>,
    /// Stable code of `error`, if any.
    #[serde(skip)]
    pub error_code: Option<&'static str>,
    /// Speech in samples at 16 kHz (exact; `speech_ms` is this rounded once).
    #[serde(skip)]
    pub speech_samples: u64,
    /// Raw runs in samples at 16 kHz, relative to the file's start.
    #[serde(skip)]
    pub raw_spans: Vec<Span>,
    #[serde(skip)]
    pub packets: u64,
    #[serde(skip)]
    pub corrupt_packets: u64,
}

impl FileAnalysis {
    /// A file that could not be analysed, with a stable code and a message.
    pub fn failed(
        file: &str,
        codec: &str,
        rate: u32,
        code: &'static str,
        error: String,
    ) -> FileAnalysis {
        FileAnalysis {
            file: file.to_string(),
            codec: codec.to_string(),
            sample_rate: rate,
            duration_ms: 0,
            speech_ms: 0,
            raw_segments_ms: Vec::new(),
            merged_segments_ms: Vec::new(),
            warnings: Vec::new(),
            truncated_at: None,
            truncation_code: None,
            error: Some(error),
            error_code: Some(code),
            speech_samples: 0,
            raw_spans: Vec::new(),
            packets: 0,
            corrupt_packets: 0,
        }
    }
}

/// Analyse one file from a reader.
pub fn analyze<R: Read>(
    name: &str,
    reader: R,
    format: &InputFormat,
    cfg: &PipelineConfig,
) -> FileAnalysis {
    let model = match SileroModel::shared() {
        Ok(m) => m,
        Err(e) => return FileAnalysis::failed(name, "", 0, "vad_unavailable", e.to_string()),
    };
    match format {
        InputFormat::Bin(spec) => analyze_bin(name, reader, spec, cfg, model),
        InputFormat::Wav => analyze_wav(name, reader, cfg, model),
    }
}

fn analyze_bin<R: Read>(
    name: &str,
    reader: R,
    spec: &FileSpec,
    cfg: &PipelineConfig,
    model: Arc<SileroModel>,
) -> FileAnalysis {
    let codec = spec.codec;
    let fail =
        |code, e: String| FileAnalysis::failed(name, codec.name(), codec.sample_rate(), code, e);
    let mut pipeline = match SpeechPipeline::for_codec(codec, cfg, model) {
        Ok(p) => p,
        Err(e) => return fail(e.code(), e.to_string()),
    };
    let max = if codec.is_opus() {
        MAX_OPUS_RECORD
    } else {
        MAX_PCM_RECORD
    };
    let mut records = RecordReader::new(reader, max);
    let mut warnings = spec.warnings.clone();
    let mut events = Vec::new();
    let mut buf = Vec::with_capacity(512);
    let mut truncation = None;
    loop {
        match records.next_record(&mut buf) {
            Ok(Next::Record { .. }) => {
                if let Err(e) = pipeline.push_payload(&buf, &mut events) {
                    return fail(e.code(), e.to_string());
                }
            }
            Ok(Next::End) => break,
            Ok(Next::Truncated(t)) => {
                warnings.push(format!(
                    "truncated: {t}; the {} records before it were kept",
                    pipeline.packet_counts().0
                ));
                truncation = Some((t.offset(), t.code()));
                break;
            }
            Err(e) => return fail("read_failed", format!("reading the file failed: {e}")),
        }
    }
    let mut analysis = finish(name, codec.name(), pipeline, events, warnings, cfg);
    if let Some((offset, code)) = truncation {
        analysis.truncated_at = Some(offset);
        analysis.truncation_code = Some(code);
    }
    analysis
}

fn analyze_wav<R: Read>(
    name: &str,
    reader: R,
    cfg: &PipelineConfig,
    model: Arc<SileroModel>,
) -> FileAnalysis {
    let wav = match read_wav(reader) {
        Ok(w) => w,
        Err(e) => return FileAnalysis::failed(name, "wav", 0, "invalid_wav", e.to_string()),
    };
    let mut warnings = Vec::new();
    if wav.channels > 1 {
        warnings.push(format!("{} channels mixed down to mono", wav.channels));
    }
    let mut pipeline = match SpeechPipeline::for_samples(wav.rate, cfg, model) {
        Ok(p) => p,
        Err(e) => return FileAnalysis::failed(name, "wav", wav.rate, e.code(), e.to_string()),
    };
    let mut events = Vec::new();
    for chunk in wav.samples.chunks(16_384) {
        if let Err(e) = pipeline.push_samples(chunk, &mut events) {
            return FileAnalysis::failed(name, "wav", wav.rate, e.code(), e.to_string());
        }
    }
    finish(name, "wav", pipeline, events, warnings, cfg)
}

fn finish(
    name: &str,
    codec: &str,
    mut pipeline: SpeechPipeline,
    mut events: Vec<SpeechEvent>,
    mut warnings: Vec<String>,
    cfg: &PipelineConfig,
) -> FileAnalysis {
    let rate = pipeline.codec_rate();
    if let Err(e) = pipeline.finish(&mut events) {
        return FileAnalysis::failed(name, codec, rate, e.code(), e.to_string());
    }
    let (packets, corrupt) = pipeline.packet_counts();
    if corrupt > 0 {
        warnings.push(format!(
            "{corrupt} of {packets} packets were corrupt and skipped"
        ));
    }
    let raw: Vec<Span> = events
        .iter()
        .filter_map(|e| match e {
            SpeechEvent::Ended(s) => Some(*s),
            SpeechEvent::Started(_) => None,
        })
        .collect();
    let decoded = pipeline.decoded_samples();
    let mut analysis = FileAnalysis::failed(name, codec, rate, "", String::new());
    analysis.error = None;
    analysis.error_code = None;
    if decoded == 0 {
        analysis.error = Some("no audio could be decoded from the file".into());
        analysis.error_code = Some("no_audio");
    }
    let ms = |s: &Span| {
        [
            samples_to_ms(s.start, TARGET_RATE),
            samples_to_ms(s.end, TARGET_RATE),
        ]
    };
    analysis.duration_ms = samples_to_ms(decoded, rate);
    analysis.speech_samples = pipeline.speech_samples();
    analysis.speech_ms = samples_to_ms(analysis.speech_samples, TARGET_RATE);
    analysis.raw_segments_ms = raw.iter().map(ms).collect();
    analysis.merged_segments_ms = merge_for_stt(&raw, cfg.merge).iter().map(ms).collect();
    analysis.raw_spans = raw;
    analysis.warnings = warnings;
    analysis.packets = packets;
    analysis.corrupt_packets = corrupt;
    analysis
}

/// Analyse many in-memory files in parallel over the rayon pool (one file per task).
pub fn analyze_many(
    files: &[(String, Vec<u8>, InputFormat)],
    cfg: &PipelineConfig,
) -> Vec<FileAnalysis> {
    files
        .par_iter()
        .map(|(name, bytes, format)| analyze(name, &bytes[..], format, cfg))
        .collect()
}

/// The input format a file name implies: `.wav` → WAV, anything else → `.bin` with the name's codec.
pub fn format_for_name(name: &str) -> Result<InputFormat, crate::audio::filename::NameError> {
    if name.to_ascii_lowercase().ends_with(".wav") {
        Ok(InputFormat::Wav)
    } else {
        crate::audio::filename::parse_spec(name).map(InputFormat::Bin)
    }
}

/// A `.bin` format with an explicit codec (overrides the name).
pub fn bin_format(codec: Codec, frame_size: u32) -> InputFormat {
    InputFormat::Bin(FileSpec {
        codec,
        frame_size,
        limitless: false,
        warnings: Vec::new(),
    })
}
