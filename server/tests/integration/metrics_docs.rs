//! `docs/metrics.md` carries a table generated from `engine/src/telemetry.rs` (names and their doc comments);
//! this fails when they drift. Regenerate with `UPDATE_DOCS=1 cargo test -p voicegate-server --test integration metrics_docs::`.

const START: &str =
    "<!-- metrics-table:start (generated from engine/src/telemetry.rs; do not edit) -->";
const END: &str = "<!-- metrics-table:end -->";

/// One row per `pub const NAME: &str = "voicegate_…";`, described by the `///` lines above it.
fn table(telemetry: &str) -> String {
    let mut out = String::from("| Metric | Type, labels and meaning |\n|---|---|\n");
    let mut doc: Vec<&str> = Vec::new();
    let mut lines = telemetry.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
        } else if line.starts_with("pub const") {
            // rustfmt puts a long name's value on the next line.
            let value = if line.ends_with('=') {
                lines.next().unwrap_or_default()
            } else {
                line
            };
            if let Some(name) = value.split('"').nth(1) {
                out.push_str(&format!(
                    "| `{name}` | {} |\n",
                    doc.join(" ").replace('|', "\\|")
                ));
            }
            doc.clear();
        } else {
            doc.clear();
        }
    }
    out
}

#[test]
fn metrics_doc_lists_every_metric_of_telemetry_rs() {
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    let telemetry = std::fs::read_to_string(format!("{root}/engine/src/telemetry.rs"))
        .unwrap_or_else(|e| panic!("{e}"));
    let path = format!("{root}/docs/metrics.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (Some(start), Some(end)) = (doc.find(START), doc.find(END)) else {
        panic!("{path} lacks the markers {START} … {END}");
    };
    let expected = format!("\n{}", table(&telemetry));
    if doc[start + START.len()..end] != expected {
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{START}{expected}{}", &doc[..start], &doc[end..]);
            std::fs::write(&path, updated).unwrap_or_else(|e| panic!("{path}: {e}"));
            return;
        }
        panic!(
            "{path} is out of date; run UPDATE_DOCS=1 cargo test -p voicegate-server --test integration metrics_docs::"
        );
    }
}

#[test]
fn no_metric_name_or_label_mentions_a_user() {
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    let telemetry = std::fs::read_to_string(format!("{root}/engine/src/telemetry.rs"))
        .unwrap_or_else(|e| panic!("{e}"));
    for line in telemetry.lines().filter(|l| l.contains("label")) {
        assert!(
            !line.contains("`uid`") && !line.contains("`user"),
            "unbounded label: {line}"
        );
    }
}
