//! The generated configuration table of `docs/operations.md` (checked by `config_docs::`).

use clap::{CommandFactory, Parser};

use super::ServeConfig;

/// A stand-alone parser over [`ServeConfig`], used to introspect the flags for the docs table.
#[derive(Debug, Parser)]
#[command(name = "serve")]
pub(super) struct ServeOnly {
    #[command(flatten)]
    pub(super) config: ServeConfig,
}

/// The Markdown table of every flag (the server's, then the meter's and fair use's), its environment
/// variable, default and meaning.
pub fn markdown_table() -> String {
    let cmd = ServeOnly::command();
    let mut out = String::from("| Flag | Environment | Default | Meaning |\n|---|---|---|---|\n");
    let mut heading = None;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" {
            continue;
        }
        // The engine's settings come in groups (`--help` prints them under the same headings).
        if arg.get_help_heading() != heading {
            heading = arg.get_help_heading();
            if let Some(h) = heading {
                out.push_str(&format!("| **{h}** | | | |\n"));
            }
        }
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if default.is_empty() {
            "unset".to_owned()
        } else {
            format!("`{}`", default.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('|', "\\|");
        out.push_str(&format!("| `--{long}` | {env} | {default} | {help} |\n"));
    }
    out
}
