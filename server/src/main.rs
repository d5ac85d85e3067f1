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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(cfg) => voicegate_server::serve::main(*cfg),
        Command::Analyze(args) => analyze::run(args),
    }
}
