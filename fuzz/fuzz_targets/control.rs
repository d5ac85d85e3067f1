#![no_main]
//! The listen socket's text control messages on arbitrary text: no panic; a message is a control only
//! when it is a JSON object whose `type` is exactly that control's name.
use libfuzzer_sys::fuzz_target;
use voicegate_server::listen::read_control;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match read_control(text) {
        Ok(name) => {
            let v: serde_json::Value = serde_json::from_str(text).expect("a control is JSON");
            assert_eq!(v.get("type").and_then(|t| t.as_str()), Some(name));
        }
        Err(reason) => assert!(matches!(reason, "invalid_json" | "unknown_type")),
    }
});
