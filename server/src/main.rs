//! `voicegate`: the VoiceGate server (`serve`) and the offline analyser (`analyze`).

mod analyze;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "voicegate",
    version,
    about = "VoiceGate: speech metering and fair use between devices and STT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (realtime listen websocket, sync uploads, fair use, metrics).
    Serve(Box<voicegate_server::ServeConfig>),
    /// Decode, VAD-segment and meter audio files (.bin or .wav) offline.
    Analyze(analyze::AnalyzeArgs),
    /// The local speech-to-text engine's child process (started by `serve`; speaks a binary protocol on
    /// stdin/stdout, docs/stt.md).
    #[command(hide = true)]
    SttEngine {
        /// The engine's folder, as scripts/deps.sh unpacks it.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(mut cfg) => {
            // The local engine's workers run it in child processes of this very binary (it leaks).
            // `/proc/self/exe` names the running binary even after a deploy replaced or removed its file.
            let own = std::path::PathBuf::from("/proc/self/exe");
            cfg.stt_local_exe = if own.exists() {
                Some(own)
            } else {
                std::env::current_exe().ok()
            };
            voicegate_server::serve::main(*cfg)
        }
        Command::SttEngine { dir } => {
            let code = voicegate_engine::stt::local::child::run_engine_process(&dir);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Analyze(args) => analyze::run(args),
    }
}
