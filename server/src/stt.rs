//! The node's speech-to-text provider, built once at startup from the configuration (docs/stt.md).
//!
//! The rules (engine `stt::select`): an unknown `VOICEGATE_STT` refuses to start naming the valid values;
//! unset gives `local` when its engine is installed, else `none` with one log line; an explicit `local`
//! without the engine refuses to start; a provider that needs a key refuses to start without it (`openai`
//! needs one for api.openai.com, not for a self-hosted base URL); bad Deepgram or OpenAI-compatible
//! settings (URL, key file, bounds) refuse to start. An unreachable provider never stops the start: the
//! `openai` provider logs it once, and each session is told (`stt_unavailable`) and goes on.
//!
//! `VOICEGATE_STT_FALLBACK` names a second provider, held to the same rules as an explicit
//! `VOICEGATE_STT` (installed, keyed); it must differ from the primary, and needs one (`none` or unset:
//! no fallback).

use std::sync::Arc;
use std::time::Duration;

use voicegate_engine::outbound::Outbound;
use voicegate_engine::stt::deepgram::{DeepgramConfigError, DeepgramProvider};
use voicegate_engine::stt::fallback::FallbackProvider;
use voicegate_engine::stt::local::{LocalConfig, LocalProvider};
use voicegate_engine::stt::none::NoneProvider;
use voicegate_engine::stt::openai::{OpenAiConfigError, OpenAiProvider};
use voicegate_engine::stt::select::{self, Facts, SelectError};
use voicegate_engine::stt::{ProviderKind, SttError, SttProvider};

use crate::config::ServeConfig;

/// Why the provider could not be built: the server refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum SttStartError {
    #[error("refusing to start: {0}")]
    Select(#[from] SelectError),
    #[error("refusing to start: the local speech-to-text engine failed to load: {0}")]
    Local(SttError),
    #[error("refusing to start: {0}")]
    Deepgram(#[from] DeepgramConfigError),
    #[error("refusing to start: the Deepgram provider could not start: {0}")]
    DeepgramStart(SttError),
    #[error("refusing to start: {0}")]
    OpenAi(#[from] OpenAiConfigError),
    #[error("refusing to start: the OpenAI-compatible provider could not start: {0}")]
    OpenAiStart(SttError),
    #[error(
        "refusing to start: VOICEGATE_STT_FALLBACK={value:?} is not a speech-to-text provider: valid values are {}",
        select::valid()
    )]
    FallbackUnknown { value: String },
    #[error(
        "refusing to start: VOICEGATE_STT_FALLBACK={0} is the primary provider too: name another one, or none"
    )]
    FallbackSameAsPrimary(ProviderKind),
    #[error(
        "refusing to start: VOICEGATE_STT_FALLBACK={0} needs a primary provider, but speech-to-text is off (none)"
    )]
    FallbackWithoutPrimary(ProviderKind),
    #[error("refusing to start: the fallback provider (VOICEGATE_STT_FALLBACK): {0}")]
    Fallback(SelectError),
    #[error("refusing to start: the fallback could not start: {0}")]
    FallbackStart(SttError),
}

/// The local engine's settings from the server's.
pub fn local_config(cfg: &ServeConfig) -> LocalConfig {
    let mut local = LocalConfig {
        threads: cfg.stt_local_threads.max(1),
        queue_chunks: cfg.stt_local_queue_chunks.max(1),
        ..LocalConfig::default()
    };
    if let Some(dir) = &cfg.stt_local_dir {
        local.dir = dir.clone();
    }
    if let Some(exe) = cfg
        .stt_local_exe
        .as_ref()
        .filter(|_| cfg.stt_local_max_rss_mb > 0)
    {
        local.child = Some(voicegate_engine::stt::local::child::ChildConfig {
            exe: exe.clone(),
            max_rss_kib: cfg.stt_local_max_rss_mb.saturating_mul(1024),
            answer_timeout: voicegate_engine::stt::local::child::ANSWER_TIMEOUT,
        });
    }
    local
}

/// Decides and builds the provider (with its fallback, when one is set), logging which one runs. Remote
/// providers connect through `outbound`.
pub fn build(
    cfg: &ServeConfig,
    outbound: &Outbound,
) -> Result<Arc<dyn SttProvider>, SttStartError> {
    let requested = cfg.stt.as_deref().map(select::parse).transpose()?;
    let local = local_config(cfg);
    let facts = Facts {
        local_missing: voicegate_engine::stt::local::ffi::EngineFiles::new(&local.dir)
            .missing()
            .map(|p| format!("{} is missing", p.display()))
            .or_else(voicegate_engine::stt::local::ffi::cpu_unsupported),
        deepgram_key: cfg.deepgram.has_key(),
        openai_key_or_self_hosted: cfg.openai.has_key_or_self_hosted(),
    };
    let selection = select::select(requested, &facts)?;
    if let Some(note) = &selection.note {
        tracing::warn!(message = %note, provider = "none");
    }
    let fallback = fallback_kind(cfg, selection.kind)?;
    if let Some(kind) = fallback {
        select::select(Some(kind), &facts).map_err(SttStartError::Fallback)?;
    }
    let quiet = selection.note.is_some();
    let primary = start(selection.kind, cfg, &local, outbound, "primary", quiet)?;
    let Some(kind) = fallback else {
        return Ok(primary);
    };
    let fallback = start(kind, cfg, &local, outbound, "fallback", false)?;
    tracing::info!(
        message = "Speech-to-text fallback: serves while the primary is failing.",
        provider = selection.kind.name(),
        fallback = kind.name(),
        cooldown_secs = cfg.stt_fallback_secs
    );
    let provider = FallbackProvider::start(
        primary,
        fallback,
        Duration::from_secs(cfg.stt_fallback_secs),
    )
    .map_err(SttStartError::FallbackStart)?;
    Ok(Arc::new(provider))
}

/// `VOICEGATE_STT_FALLBACK`, checked against the primary: `None` when unset or `none`.
fn fallback_kind(
    cfg: &ServeConfig,
    primary: ProviderKind,
) -> Result<Option<ProviderKind>, SttStartError> {
    let Some(value) = cfg.stt_fallback.as_deref().filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let kind = ProviderKind::parse(value).ok_or_else(|| SttStartError::FallbackUnknown {
        value: value.to_string(),
    })?;
    match kind {
        ProviderKind::None => Ok(None),
        _ if primary == ProviderKind::None => Err(SttStartError::FallbackWithoutPrimary(kind)),
        _ if kind == primary => Err(SttStartError::FallbackSameAsPrimary(kind)),
        _ => Ok(Some(kind)),
    }
}

/// Starts one provider (`role`: primary or fallback, for the log line; `quiet`: `none` was already said).
fn start(
    kind: ProviderKind,
    cfg: &ServeConfig,
    local: &LocalConfig,
    outbound: &Outbound,
    role: &'static str,
    quiet: bool,
) -> Result<Arc<dyn SttProvider>, SttStartError> {
    match kind {
        ProviderKind::None => {
            if !quiet {
                tracing::info!(
                    message = "Speech-to-text provider: none (metering only).",
                    provider = "none"
                );
            }
            Ok(Arc::new(NoneProvider))
        }
        ProviderKind::Local => {
            let started = std::time::Instant::now();
            let provider = LocalProvider::start(local).map_err(SttStartError::Local)?;
            tracing::info!(
                message = "Speech-to-text provider: local (Moonshine base-en).",
                provider = "local",
                role,
                threads = local.threads,
                dir = %local.dir.display(),
                load_ms = started.elapsed().as_millis() as u64
            );
            Ok(Arc::new(provider))
        }
        ProviderKind::Deepgram => {
            let dg = cfg.deepgram.config()?;
            tracing::info!(
                message = "Speech-to-text provider: deepgram (live websocket API).",
                provider = "deepgram",
                role,
                url = %dg.url,
                model = %dg.model,
                key = if cfg.deepgram.key_file.is_some() { "file" } else { "env" }
            );
            let provider = DeepgramProvider::start(dg, outbound.clone())
                .map_err(SttStartError::DeepgramStart)?;
            Ok(Arc::new(provider))
        }
        ProviderKind::OpenAi => {
            let oa = cfg.openai.config()?;
            tracing::info!(
                message = "Speech-to-text provider: openai (OpenAI-compatible transcriptions, one request per chunk).",
                provider = "openai",
                role,
                url = %oa.url,
                model = %oa.model,
                key = match (&cfg.openai.key_file, &oa.key) {
                    (Some(_), _) => "file",
                    (None, Some(_)) => "env",
                    (None, None) => "none",
                }
            );
            let provider =
                OpenAiProvider::start(oa, outbound.clone()).map_err(SttStartError::OpenAiStart)?;
            Ok(Arc::new(provider))
        }
    }
}
