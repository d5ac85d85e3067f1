#![no_main]
//! The device file-name parser on arbitrary strings: no panic, accepted timestamps in range.
use libfuzzer_sys::fuzz_target;
use voicegate_engine::audio::filename::{parse_spec, parse_sync_name};

fuzz_target!(|data: &[u8]| {
    let name = String::from_utf8_lossy(data);
    let _ = parse_spec(&name);
    if let Ok((_, ms)) = parse_sync_name(&name, 1_800_000_000) {
        assert!(ms / 1000 >= 1_704_067_200 && ms / 1000 <= 1_800_000_600);
    }
});
