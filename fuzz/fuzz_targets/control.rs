#![no_main]
//! The listen socket's text control messages on arbitrary text: no panic; a message is a control only
//! when it is a JSON object whose `type` is exactly that control's name.
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use voicegate_server::listen::read_control;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match read_control(text) {
        Ok(name) => {
            // An object (its values skipped, as the session skips them: any JSON number is valid JSON,
            // even one past f64's range) whose `type` is the name.
            let fields: BTreeMap<String, IgnoredAny> =
                serde_json::from_str(text).expect("a control is a JSON object");
            assert!(fields.contains_key("type"));
            #[derive(serde::Deserialize)]
            struct Type {
                #[serde(rename = "type")]
                kind: String,
            }
            let t: Type = serde_json::from_str(text).expect("its type is a string");
            assert_eq!(t.kind, name);
        }
        Err(reason) => assert!(matches!(reason, "invalid_json" | "unknown_type")),
    }
});
