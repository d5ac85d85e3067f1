#![no_main]
//! The `.bin` container reader on arbitrary bytes: no panic, records within the bound and the file.
use libfuzzer_sys::fuzz_target;
use voicegate_engine::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};

fuzz_target!(|data: &[u8]| {
    let mut r = RecordReader::new(data, MAX_OPUS_RECORD);
    let mut buf = Vec::new();
    let mut end = 0u64;
    while let Ok(Next::Record { offset }) = r.next_record(&mut buf) {
        assert_eq!(offset, end);
        assert!(buf.len() <= MAX_OPUS_RECORD);
        end = offset + 4 + buf.len() as u64;
        assert!(end <= data.len() as u64);
    }
});
