//! The driver's end of a session's speech-to-text stream: the core's [`SttCommand`]s handed to the
//! provider's [`StreamHandle`] (samples read from the session's tap), the provider's results read back
//! through the bounded channel, turned into transcript messages and availability events for the client.
//!
//! Nothing here blocks the pipeline thread: pushing never waits (a full provider queue refuses the audio,
//! counted by the provider, given back to the session's charge and told to the client as
//! `stt_unavailable{queue_full}`), and results are read with `try_recv` on the session's ticks.
//!
//! The link also times each speech run's end to the first final covering it
//! (`voicegate_stt_final_latency_seconds`, see [`super::latency`]).

use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;

use super::contract::SttCommand;
use super::events::LiveEvent;
use super::latency::FinalLatency;
use super::transcript::{Availability, Change, Transcript};
use crate::pipeline::tap::AudioTap;
use crate::stt::{
    Pcm, ProviderKind, ResultKind, ResultReceiver, StreamHandle, StreamOptions, SttError, SttEvent,
    SttProvider, SttResult, results_channel,
};
use crate::telemetry as t;

/// Results and events one stream may have waiting for its session (a full channel drops, counted).
const RESULTS_CAPACITY: usize = 64;

pub(super) struct SttLink {
    handle: Box<dyn StreamHandle>,
    rx: ResultReceiver,
    transcript: Transcript,
    availability: Availability,
    /// Why the provider is not transcribing now (`provider_error`, `queue_full`), until it works again.
    provider_problem: Option<&'static str>,
    /// The provider sent [`SttEvent::Closed`]: every result is in.
    drained: bool,
    provider: ProviderKind,
    latency: FinalLatency,
    /// Samples handed over, by the provider that took them ([`ProviderKind::index`]): what the session's
    /// STT charge is split by.
    handed: [u64; 4],
}

impl SttLink {
    pub fn open(provider: &dyn SttProvider, language: &str) -> Result<SttLink, SttError> {
        let (sink, rx) = results_channel(RESULTS_CAPACITY);
        let handle = provider.open_stream(
            StreamOptions {
                language: language.to_string(),
                interim_results: true,
            },
            sink,
        )?;
        Ok(SttLink {
            handle,
            rx,
            transcript: Transcript::default(),
            availability: Availability::default(),
            provider_problem: None,
            drained: false,
            provider: provider.kind(),
            latency: FinalLatency::default(),
            handed: [0; 4],
        })
    }

    /// Hands one command to the provider. Never blocks. Returns the samples of an `Audio` command the
    /// provider refused ([`SttError::Refused`]: not taken, so the session gives their charge back).
    pub fn command(&mut self, cmd: SttCommand, tap: Option<&AudioTap>) -> u64 {
        let mut refused = 0;
        let outcome = match cmd {
            SttCommand::Audio { start, end } => {
                let Some(tap) = tap else { return 0 };
                let (a, b) = tap.slices(start, end);
                let first = self.push(start, a, &mut refused);
                let second = if b.is_empty() {
                    Ok(())
                } else {
                    self.push(start + a.len() as u64, b, &mut refused)
                };
                first.and(second)
            }
            SttCommand::EndOfRun => self.handle.end_of_run(),
            SttCommand::Finalize => self.handle.finalize(),
            SttCommand::Close => {
                self.handle.close();
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                if self.provider_problem == Some("queue_full")
                    && matches!(cmd, SttCommand::EndOfRun | SttCommand::Finalize)
                {
                    // A chunk was accepted again.
                    self.provider_problem = None;
                }
            }
            Err(SttError::QueueFull { .. } | SttError::Refused { .. }) => {
                self.provider_problem = Some("queue_full");
            }
            Err(SttError::Closed) => {}
            Err(e) => {
                tracing::debug!(message = "STT stream refused a command", error = %e);
                self.provider_problem = Some("provider_error");
            }
        }
        refused
    }

    /// Pushes one slice; counts what the provider took by the provider serving this push (with a
    /// fallback, the push may switch) and adds what it refused to `refused`. Audio a provider took and
    /// dropped later (a failing connection, `QueueFull`) stays charged and counted as dropped.
    fn push(&mut self, start: u64, pcm: &[i16], refused: &mut u64) -> Result<(), SttError> {
        let outcome = self.handle.push(start, Pcm::I16(pcm));
        let not_taken = match &outcome {
            Err(SttError::Refused { samples }) => *samples,
            _ => 0,
        };
        *refused += not_taken;
        let taker = self.handle.serving().unwrap_or(self.provider);
        self.handed[taker.index()] += (pcm.len() as u64).saturating_sub(not_taken);
        outcome
    }

    /// Reads the results that arrived (never waits) into the transcript.
    pub fn poll(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(SttEvent::Result(r)) => {
                    // The provider works again (a reconnect succeeded, a key was rotated, a balance paid).
                    if self
                        .provider_problem
                        .is_some_and(|p| p.starts_with("provider_"))
                    {
                        self.provider_problem = None;
                    }
                    self.result(&r);
                }
                Ok(SttEvent::Error { reason, message }) => {
                    tracing::debug!(message = "STT provider error", reason, detail = %message);
                    self.provider_problem = Some(provider_reason(reason));
                }
                // Counted by the provider (`voicegate_stt_late_chunks_total`); the results still come.
                Ok(SttEvent::Behind { .. }) => {}
                Ok(SttEvent::Closed) | Err(TryRecvError::Disconnected) => {
                    self.drained = true;
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Waits for the next result (the session's end: its last transcripts).
    pub async fn recv_one(&mut self) {
        match self.rx.recv().await {
            Some(SttEvent::Closed) | None => self.drained = true,
            Some(SttEvent::Result(r)) => self.result(&r),
            Some(SttEvent::Error { reason, .. }) => {
                self.provider_problem = Some(provider_reason(reason));
            }
            Some(SttEvent::Behind { .. }) => {}
        }
    }

    /// The detector ended a speech run at stream time `end_ms` (the session learnt it now): timed until
    /// the first final result covering it arrives.
    pub fn speech_ended(&mut self, end_ms: u64) {
        self.latency.speech_ended(end_ms, Instant::now());
    }

    /// One result in: into the transcript; a final also resolves the speech ends it covers.
    fn result(&mut self, r: &SttResult) {
        if r.kind == ResultKind::Final {
            let now = Instant::now();
            for waited in self.latency.final_result(r.start_ms, r.end_ms, now) {
                metrics::histogram!(t::STT_FINAL_LATENCY_SECONDS, "provider" => self.provider.name())
                    .record(waited.as_secs_f64());
            }
        }
        self.transcript.apply(r);
    }

    /// The segments that became final since the last call (stream-time ms), for the conversation.
    pub fn take_finals(&mut self) -> Vec<crate::conversation::TranscriptSegment> {
        self.transcript.take_finals()
    }

    /// Samples handed over so far, by provider ([`ProviderKind::index`]).
    pub fn handed(&self) -> [u64; 4] {
        self.handed
    }

    /// Every result of the closed stream is in.
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// What to send the client now: an availability change (given the session gate's own reason), then
    /// the transcript segments that changed, when due.
    pub fn outgoing(
        &mut self,
        gate_reason: Option<&'static str>,
        frames_received: u64,
        now: Instant,
        force: bool,
    ) -> (Option<LiveEvent>, Option<String>) {
        let change = self
            .availability
            .update(gate_reason.or(self.provider_problem))
            .map(|c| match c {
                Change::Unavailable(reason) => LiveEvent::SttUnavailable {
                    frames_received,
                    reason,
                },
                Change::Available => LiveEvent::SttAvailable { frames_received },
            });
        (change, self.transcript.due(now, force))
    }
}

/// The client-facing reason of a provider's error code: `provider_payment` when the provider's account
/// cannot pay (a fallback or an operator can act on it), else `provider_error` (the detailed code is in
/// the logs and `voicegate_stt_errors_total{reason}`; the app can do nothing about a key or a rate limit).
fn provider_reason(code: &str) -> &'static str {
    match code {
        "payment" => "provider_payment",
        _ => "provider_error",
    }
}
