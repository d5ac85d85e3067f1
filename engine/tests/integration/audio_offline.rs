//! The offline pipeline on the labelled fixtures and on bad input.

use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::offline::{InputFormat, analyze, bin_format, format_for_name};
use voicegate_engine::pipeline::stream::PipelineConfig;

fn fixture(id: &str) -> (Vec<u8>, u64) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    let bytes = std::fs::read(format!("{dir}/{id}.bin")).unwrap();
    let label: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{id}.json")).unwrap())
            .unwrap();
    (bytes, label["total_speech_ms"].as_u64().unwrap())
}

fn opus16() -> InputFormat {
    bin_format(Codec::opus(16_000).unwrap(), 160)
}

#[test]
fn fixtures_meter_within_3_percent_in_total_and_10_percent_each() {
    let cfg = PipelineConfig::default();
    let (mut total, mut label_total) = (0u64, 0u64);
    for i in 1..=12 {
        let id = format!("d{i:02}");
        let (bytes, label) = fixture(&id);
        let a = analyze(&id, &bytes[..], &opus16(), &cfg);
        assert!(a.error.is_none(), "{id}: {:?}", a.error);
        let err = (a.speech_ms as f64 - label as f64) / label as f64;
        assert!(
            err.abs() <= 0.10,
            "{id}: metered {} vs label {label} ({:+.1}%)",
            a.speech_ms,
            err * 100.0
        );
        let raw_sum: u64 = a.raw_segments_ms.iter().map(|s| s[1] - s[0]).sum();
        assert!(
            raw_sum.abs_diff(a.speech_ms) <= a.raw_segments_ms.len() as u64,
            "metered = sum of raw runs"
        );
        total += a.speech_ms;
        label_total += label;
    }
    let err = (total as f64 - label_total as f64) / label_total as f64;
    assert!(
        err.abs() <= 0.03,
        "total {total} vs {label_total} ({:+.2}%)",
        err * 100.0
    );
}

#[test]
fn long_gap_clip_meters_speech_not_the_merged_span() {
    // d02 has a 124 s gap: metered speech must stay near the label, far below its merged spans.
    let (bytes, label) = fixture("d02");
    let a = analyze("d02", &bytes[..], &opus16(), &PipelineConfig::default());
    let merged: u64 = a.merged_segments_ms.iter().map(|s| s[1] - s[0]).sum();
    assert!(a.speech_ms < merged);
    assert!(a.speech_ms.abs_diff(label) * 20 < label);
}

#[test]
fn empty_file_is_an_error_not_a_panic() {
    let a = analyze("empty.bin", &b""[..], &opus16(), &PipelineConfig::default());
    assert_eq!(a.error_code, Some("no_audio"));
    assert_eq!(a.speech_ms, 0);
}

#[test]
fn truncated_last_record_keeps_the_audio_before_it_with_a_warning() {
    let (mut bytes, _) = fixture("d01");
    let full = analyze("d01", &bytes[..], &opus16(), &PipelineConfig::default());
    bytes.extend_from_slice(&200u32.to_le_bytes());
    bytes.extend_from_slice(&[1, 2, 3]);
    let cut = analyze("d01", &bytes[..], &opus16(), &PipelineConfig::default());
    assert!(cut.error.is_none());
    assert_eq!(cut.speech_ms, full.speech_ms);
    assert!(
        cut.warnings.iter().any(|w| w.contains("truncated")),
        "{:?}",
        cut.warnings
    );
}

#[test]
fn length_prefix_over_the_bound_stops_the_file_there() {
    let (bytes, _) = fixture("d01");
    let mut cut = bytes[..4000].to_vec();
    // Find a record boundary near 4000 bytes by walking the records.
    let mut off = 0usize;
    while off + 4 <= cut.len() {
        let n = u32::from_le_bytes(cut[off..off + 4].try_into().unwrap()) as usize;
        if off + 4 + n > cut.len() {
            break;
        }
        off += 4 + n;
    }
    cut.truncate(off);
    cut.extend_from_slice(&(1u32 << 30).to_le_bytes());
    cut.extend_from_slice(&bytes[4000..]);
    let a = analyze("x", &cut[..], &opus16(), &PipelineConfig::default());
    assert!(a.error.is_none());
    assert!(
        a.warnings
            .iter()
            .any(|w| w.contains(&format!("record at byte {off}"))),
        "{:?}",
        a.warnings
    );
}

#[test]
fn random_bytes_as_opus_are_counted_corrupt_not_fatal() {
    let mut seed = 0x9e37_79b9u32;
    let mut bytes = Vec::new();
    for _ in 0..200 {
        let len = 20 + (seed % 60) as usize;
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            bytes.push(seed as u8);
        }
    }
    let a = analyze(
        "noise.bin",
        &bytes[..],
        &opus16(),
        &PipelineConfig::default(),
    );
    assert!(a.corrupt_packets > 0);
    assert!(
        a.warnings.iter().any(|w| w.contains("corrupt")),
        "{:?}",
        a.warnings
    );
}

#[test]
fn unknown_codec_in_the_name_is_a_clear_error() {
    let e = format_for_name("audio_omi_aac_16000_1_fs160_1779990000.bin").unwrap_err();
    assert_eq!(e.code(), "unknown_codec");
    assert!(e.to_string().contains("aac"));
}

#[test]
fn wav_with_a_wrong_header_is_a_per_file_error() {
    let a = analyze(
        "bad.wav",
        &b"RIFF\x10\x00\x00\x00WAVEjunkjunk"[..],
        &InputFormat::Wav,
        &PipelineConfig::default(),
    );
    assert_eq!(a.error_code, Some("invalid_wav"));
}

#[test]
fn pcm16_silence_meters_nothing() {
    let mut bytes = Vec::new();
    for _ in 0..50 {
        bytes.extend_from_slice(&640u32.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 640]);
    }
    let a = analyze(
        "s.bin",
        &bytes[..],
        &bin_format(Codec::Pcm16, 160),
        &PipelineConfig::default(),
    );
    assert!(a.error.is_none());
    assert_eq!(a.duration_ms, 1000);
    assert_eq!(a.speech_ms, 0);
}
