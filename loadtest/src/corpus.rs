//! Fixture audio, packetised once and shared by every stream and uploader.
//!
//! All packets of all clips sit in one ring (`frames`), clip after clip. Stream `i` starts at clip
//! `i % clips` and walks the ring, looping, so its `n`-th frame is a pure function of `(i, n)`: the
//! accounting check replays exactly what a stream sent from its start clip and its frame count alone.
//! A frame is a `Bytes` slice of its clip's buffer, so sending one clones a reference count, no copy.

use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use voicegate_engine::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};

/// Samples per frame the fixtures hold (10 ms at 16 kHz); realtime pacing assumes it.
pub const FRAME_MS: u64 = 10;

#[derive(Debug)]
pub struct Clip {
    /// Index of this clip's first packet in [`Corpus::frames`].
    pub first: usize,
    pub packets: usize,
}

#[derive(Debug)]
pub struct Corpus {
    pub clips: Vec<Clip>,
    pub frames: Vec<Bytes>,
}

impl Corpus {
    /// Loads every `*.bin` in `dir` (sorted by name) as 10 ms Opus packets.
    pub fn load(dir: &Path) -> Result<Corpus, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        paths.sort();
        let mut clips = Vec::new();
        let mut frames = Vec::new();
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let packets = split_packets(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            if packets.is_empty() {
                continue;
            }
            clips.push(Clip {
                first: frames.len(),
                packets: packets.len(),
            });
            frames.extend(packets);
        }
        if frames.is_empty() {
            return Err(format!("no .bin fixtures in {}", dir.display()));
        }
        Ok(Corpus { clips, frames })
    }

    /// Frame `n` of a stream that starts at clip `start` (wrapping over the whole ring).
    pub fn frame(&self, start: usize, n: u64) -> &Bytes {
        let len = self.frames.len();
        let first = self.clips[start % self.clips.len()].first;
        // `len` is non-zero (checked at load), so the index is always in range.
        &self.frames[(first + (n % len as u64) as usize) % len]
    }

    /// A device file (`[u32 LE len][packet]…`) of clip `clip` without its first `skip` packets
    /// (so the same clip can be uploaded as distinct content), and its audio length in ms.
    pub fn device_file(&self, clip: usize, skip: usize) -> (Bytes, u64) {
        let c = &self.clips[clip % self.clips.len()];
        let skip = skip.min(c.packets.saturating_sub(1));
        let packets = &self.frames[c.first + skip..c.first + c.packets];
        let size: usize = packets.iter().map(|p| p.len() + 4).sum();
        let mut out = BytesMut::with_capacity(size);
        for p in packets {
            out.put_u32_le(p.len() as u32);
            out.put_slice(p);
        }
        (out.freeze(), packets.len() as u64 * FRAME_MS)
    }
}

/// The Opus packets of one `.bin` container, as slices of one shared buffer.
fn split_packets(file: &[u8]) -> Result<Vec<Bytes>, String> {
    let mut reader = RecordReader::new(file, MAX_OPUS_RECORD);
    let mut all = BytesMut::with_capacity(file.len());
    let mut ranges = Vec::new();
    let mut buf = Vec::with_capacity(512);
    loop {
        match reader.next_record(&mut buf) {
            Ok(Next::Record { .. }) => {
                let start = all.len();
                all.put_slice(&buf);
                ranges.push(start..all.len());
            }
            Ok(Next::End) | Ok(Next::Truncated(_)) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let all = all.freeze();
    Ok(ranges.into_iter().map(|r| all.slice(r)).collect())
}

/// The fixtures directory: the flag, else `./fixtures`, else the repository's.
pub fn fixtures_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    let local = PathBuf::from("fixtures");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Corpus {
        Corpus::load(&fixtures_dir(None)).unwrap()
    }

    #[test]
    fn frames_wrap_around_the_ring_from_each_start_clip() {
        let c = corpus();
        let total = c.frames.len() as u64;
        assert_eq!(c.frame(1, 0), &c.frames[c.clips[1].first]);
        assert_eq!(c.frame(1, total), c.frame(1, 0));
        let last_start = c.clips.len() - 1;
        let to_end = c.clips[last_start].packets as u64;
        assert_eq!(c.frame(last_start, to_end), &c.frames[0]);
    }

    #[test]
    fn device_file_round_trips_through_the_container_reader() {
        let c = corpus();
        let (file, ms) = c.device_file(0, 3);
        let packets = split_packets(&file).unwrap();
        assert_eq!(packets.len(), c.clips[0].packets - 3);
        assert_eq!(ms, packets.len() as u64 * FRAME_MS);
        assert_eq!(packets[0], c.frames[3]);
    }
}
