//! `docs/operations.md` carries the table generated from `ServeConfig`; this fails when they drift.
//! Regenerate with `UPDATE_DOCS=1 cargo test -p voicegate-server --test integration config_docs::`.

const START: &str =
    "<!-- serve-config-table:start (generated from server/src/config.rs; do not edit) -->";
const END: &str = "<!-- serve-config-table:end -->";

#[test]
fn operations_doc_lists_every_serve_flag_with_its_env_and_default() {
    let path = format!("{}/../docs/operations.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (Some(start), Some(end)) = (doc.find(START), doc.find(END)) else {
        panic!("{path} lacks the markers {START} … {END}");
    };
    let current = &doc[start + START.len()..end];
    let expected = format!("\n{}", voicegate_server::config::markdown_table());
    if current != expected {
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{START}{expected}{}", &doc[..start], &doc[end..]);
            std::fs::write(&path, updated).unwrap_or_else(|e| panic!("{path}: {e}"));
            return;
        }
        panic!(
            "{path} is out of date; run UPDATE_DOCS=1 cargo test -p voicegate-server --test integration config_docs::"
        );
    }
}
