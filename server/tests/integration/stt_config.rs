//! `VOICEGATE_STT` at startup: which provider a server builds, and when it refuses to start.

use crate::common;

use voicegate_engine::stt::ProviderKind;
use voicegate_server::ServeConfig;
use voicegate_server::serve::{ServeError, ServerBuilder};

fn with_stt(stt: Option<&str>, local_dir: Option<&std::path::Path>) -> ServeConfig {
    ServeConfig {
        stt: stt.map(str::to_owned),
        stt_local_dir: local_dir.map(std::path::Path::to_path_buf),
        ..common::config()
    }
}

fn refusal(cfg: ServeConfig) -> String {
    match ServerBuilder::new(cfg) {
        Err(e @ ServeError::Stt(_)) => e.to_string(),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("the server must refuse to start"),
    }
}

#[actix_web::test]
async fn an_unknown_provider_refuses_to_start_naming_the_valid_ones() {
    let message = refusal(with_stt(Some("whisper"), None));
    assert!(
        message.contains("\"whisper\"") && message.contains("local, deepgram, openai, none"),
        "{message}"
    );
}

#[actix_web::test]
async fn explicit_local_without_the_engine_refuses_to_start() {
    let empty = tempfile::tempdir().unwrap();
    let message = refusal(with_stt(Some("local"), Some(empty.path())));
    assert!(message.contains("scripts/deps.sh"), "{message}");
}

#[actix_web::test]
async fn unset_without_the_engine_starts_with_none() {
    let empty = tempfile::tempdir().unwrap();
    let builder =
        ServerBuilder::new(with_stt(None, Some(empty.path()))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(builder.state().stt.kind(), ProviderKind::None);
}

#[actix_web::test]
async fn deepgram_without_a_key_refuses_to_start_naming_the_setting() {
    let mut cfg = with_stt(Some("deepgram"), None);
    cfg.deepgram.api_key = Some("  ".into());
    let message = refusal(cfg);
    assert!(message.contains("DEEPGRAM_API_KEY"), "{message}");
}

#[actix_web::test]
async fn deepgram_with_a_bad_url_or_a_missing_key_file_refuses_to_start() {
    let mut cfg = with_stt(Some("deepgram"), None);
    cfg.deepgram.api_key = Some("k".into());
    cfg.deepgram.url = "api.deepgram.com".into();
    let message = refusal(cfg.clone());
    assert!(message.contains("VOICEGATE_DEEPGRAM_URL"), "{message}");
    cfg.deepgram.url = "wss://api.deepgram.com".into();
    cfg.deepgram.key_file = Some("/nonexistent/dg.key".into());
    let message = refusal(cfg);
    assert!(message.contains("VOICEGATE_DEEPGRAM_KEY_FILE"), "{message}");
}

/// Deepgram unreachable at startup is a degraded start: nothing connects until a session opens.
#[actix_web::test]
async fn deepgram_starts_without_reaching_the_provider() {
    let mut cfg = with_stt(Some("Deepgram"), None);
    cfg.deepgram.api_key = Some("k".into());
    cfg.deepgram.url = "ws://127.0.0.1:9".into();
    let builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(builder.state().stt.kind(), ProviderKind::Deepgram);
}

#[actix_web::test]
async fn openai_without_a_key_refuses_to_start_naming_the_settings() {
    let mut cfg = with_stt(Some("openai"), None);
    cfg.openai.api_key = Some(" ".into());
    let message = refusal(cfg);
    assert!(
        message.contains("OPENAI_API_KEY") && message.contains("VOICEGATE_OPENAI_API_KEY_FILE"),
        "{message}"
    );
}

#[actix_web::test]
async fn openai_with_a_bad_url_or_a_missing_key_file_refuses_to_start() {
    let mut cfg = with_stt(Some("openai"), None);
    cfg.openai.api_key = Some("k".into());
    cfg.openai.base_url = "api.openai.com".into();
    let message = refusal(cfg.clone());
    assert!(message.contains("VOICEGATE_OPENAI_BASE_URL"), "{message}");
    cfg.openai.base_url = "https://api.openai.com".into();
    cfg.openai.key_file = Some("/nonexistent/openai.key".into());
    let message = refusal(cfg);
    assert!(
        message.contains("VOICEGATE_OPENAI_API_KEY_FILE"),
        "{message}"
    );
}

/// A self-hosted server needs no key, and one that is unreachable at startup is a degraded start (logged).
#[actix_web::test]
async fn openai_self_hosted_starts_without_a_key_and_without_reaching_the_server() {
    let mut cfg = with_stt(Some("OpenAI"), None);
    cfg.openai.base_url = "http://127.0.0.1:9".into();
    let builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(builder.state().stt.kind(), ProviderKind::OpenAi);
}

#[actix_web::test]
async fn a_bad_ca_file_refuses_to_start_naming_the_setting() {
    let mut cfg = with_stt(Some("none"), None);
    cfg.tls_ca_file = Some("/nonexistent/ca.pem".into());
    match ServerBuilder::new(cfg) {
        Err(e) => assert!(e.to_string().contains("VOICEGATE_TLS_CA_FILE"), "{e}"),
        Ok(_) => panic!("the server must refuse to start"),
    }
}

#[actix_web::test]
async fn none_starts_without_looking_for_an_engine() {
    let builder = ServerBuilder::new(with_stt(
        Some("NONE"),
        Some(std::path::Path::new("/nonexistent")),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(builder.state().stt.kind(), ProviderKind::None);
}

/// The engine is installed by `scripts/deps.sh` (CI runs it first): unset means local, loaded at startup.
/// On a CPU that cannot run it (no AVX-512) unset means none, and an explicit `local` refuses to start
/// naming what the CPU lacks, instead of the process dying of SIGILL when the model loads.
#[actix_web::test]
async fn unset_with_the_engine_installed_starts_the_local_provider() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        let builder = ServerBuilder::new(with_stt(None, None)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(builder.state().stt.kind(), ProviderKind::None);
        let refused = refusal(with_stt(Some("local"), None));
        assert!(
            refused.contains("VOICEGATE_STT=local") && refused.contains("this CPU lacks avx512f"),
            "{refused}"
        );
        eprintln!("this machine: {why}");
        return;
    }
    let builder = ServerBuilder::new(with_stt(None, None))
        .unwrap_or_else(|e| panic!("{e} (the local engine must be installed: scripts/deps.sh)"));
    assert_eq!(builder.state().stt.kind(), ProviderKind::Local);
}
