//! Development tool: dump per-window VAD probabilities and RMS of a `.bin` (Opus 16 kHz) as JSON lines,
//! for tuning the speech detector against labelled fixtures.
use std::io::Write;
use voicegate_engine::audio::codec::{Codec, Decoder};
use voicegate_engine::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};
use voicegate_engine::audio::vad::{SileroModel, VadStream, WINDOW};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = SileroModel::shared()?;
    let mut stdout = std::io::stdout().lock();
    for path in std::env::args().skip(1) {
        let bytes = std::fs::read(&path)?;
        let mut dec = Decoder::new(Codec::opus(16_000).ok_or("rate")?)?;
        let mut rr = RecordReader::new(&bytes[..], MAX_OPUS_RECORD);
        let mut buf = Vec::new();
        let mut pcm = Vec::new();
        while let Next::Record { .. } = rr.next_record(&mut buf)? {
            let _ = dec.decode(&buf, &mut pcm);
        }
        let mut vad = VadStream::new(model.clone(), None);
        let mut probs = Vec::new();
        vad.push(&pcm, &mut probs)?;
        vad.finish(&mut probs)?;
        let p: Vec<String> = probs.iter().map(|w| format!("{:.4}", w.prob)).collect();
        let rms: Vec<String> = pcm
            .chunks(WINDOW)
            .take(probs.len())
            .map(|c| {
                format!(
                    "{:.1}",
                    10.0 * ((c.iter().map(|x| x * x).sum::<f32>() / WINDOW as f32) + 1e-12).log10()
                )
            })
            .collect();
        // Energy of each 8 ms quarter of a window (for edge placement).
        let sub: Vec<String> = pcm
            .chunks(WINDOW / 4)
            .take(probs.len() * 4)
            .map(|c| {
                format!(
                    "{:.1}",
                    10.0 * ((c.iter().map(|x| x * x).sum::<f32>() / (WINDOW / 4) as f32) + 1e-12)
                        .log10()
                )
            })
            .collect();
        writeln!(
            stdout,
            "{{\"file\":\"{path}\",\"probs\":[{}],\"db\":[{}],\"sub_db\":[{}]}}",
            p.join(","),
            rms.join(","),
            sub.join(",")
        )?;
    }
    Ok(())
}
