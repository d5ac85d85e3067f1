//! Property tests: the container reader and the file-name parser never panic on arbitrary input, never
//! allocate past the record bound, and report offsets within the file.

use proptest::prelude::*;
use voicegate_engine::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};
use voicegate_engine::audio::filename::{parse_spec, parse_sync_name, parse_timestamp_ms};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn container_reader_never_panics_and_stays_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..4096), max in 1usize..8192) {
        let mut r = RecordReader::new(&bytes[..], max);
        let mut buf = Vec::new();
        let mut covered = 0u64;
        loop {
            match r.next_record(&mut buf).unwrap() {
                Next::Record { offset } => {
                    prop_assert_eq!(offset, covered);
                    prop_assert!(!buf.is_empty() && buf.len() <= max);
                    prop_assert!(buf.capacity() <= max.max(8) * 2);
                    covered = offset + 4 + buf.len() as u64;
                    prop_assert!(covered <= bytes.len() as u64);
                }
                Next::End => { prop_assert_eq!(covered, bytes.len() as u64); break; }
                Next::Truncated(t) => { prop_assert_eq!(t.offset(), covered); prop_assert!(t.offset() < bytes.len() as u64); break; }
            }
        }
    }

    #[test]
    fn well_formed_records_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..40)) {
        let mut bytes = Vec::new();
        for p in &payloads {
            bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
            bytes.extend_from_slice(p);
        }
        let mut r = RecordReader::new(&bytes[..], MAX_OPUS_RECORD);
        let mut buf = Vec::new();
        for p in &payloads {
            let is_record = matches!(r.next_record(&mut buf).unwrap(), Next::Record { .. });
            prop_assert!(is_record);
            prop_assert_eq!(&buf, p);
        }
        prop_assert_eq!(r.next_record(&mut buf).unwrap(), Next::End);
    }

    #[test]
    fn file_name_parser_never_panics(name in ".{0,200}", now in 0u64..4_000_000_000) {
        let _ = parse_spec(&name);
        let _ = parse_timestamp_ms(&name, now);
        if let Ok((_, ts)) = parse_sync_name(&name, now) {
            prop_assert!(ts / 1000 >= 1_704_067_200 && ts / 1000 <= now + 600);
        }
    }

    #[test]
    fn device_like_names_parse_their_timestamp(dev in "[a-z]{1,8}", ts in 1_704_067_200u64..1_900_000_000) {
        let name = format!("audio_{dev}_opus_16000_1_fs160_{ts}.bin");
        let (spec, ms) = parse_sync_name(&name, 2_000_000_000).unwrap();
        prop_assert_eq!(ms, ts * 1000);
        prop_assert_eq!(spec.frame_size, 160);
    }
}
