//! Which provider a node runs, decided once at startup from `VOICEGATE_STT` and what is installed.
//!
//! | `VOICEGATE_STT` | local engine installed | outcome |
//! |---|---|---|
//! | unset | yes | `local` |
//! | unset | no | `none`, with one log line saying why and how to install it |
//! | `local` | no | refuses to start |
//!
//! "Installed" means usable: the files are there and this CPU can run them (`ffi::cpu_unsupported`); the
//! reason given says which it is.
//! | `deepgram` | — | that provider; refuses to start without its key |
//! | `openai` | — | that provider; refuses to start without its key unless the base URL is self-hosted |
//! | `none` | — | `none` |
//! | anything else | — | refuses to start, naming the valid values |

use super::provider::ProviderKind;

/// A startup decision: the provider, and why it was chosen when nobody asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: ProviderKind,
    /// Set when `VOICEGATE_STT` was unset and the default could not be used: the one log line to print.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error(
        "VOICEGATE_STT={value:?} is not a speech-to-text provider: valid values are {}",
        valid()
    )]
    Unknown { value: String },
    #[error(
        "VOICEGATE_STT=local but the local engine cannot be used ({detail}): run scripts/deps.sh, set VOICEGATE_STT_LOCAL_DIR, or choose another provider"
    )]
    LocalNotInstalled { detail: String },
    #[error("VOICEGATE_STT={provider} needs a key: set {setting}")]
    MissingKey {
        provider: ProviderKind,
        setting: &'static str,
    },
}

/// The valid values of `VOICEGATE_STT`, comma-separated.
pub fn valid() -> String {
    ProviderKind::ALL
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `VOICEGATE_STT` (case-insensitive, trimmed).
pub fn parse(value: &str) -> Result<ProviderKind, SelectError> {
    ProviderKind::parse(value).ok_or_else(|| SelectError::Unknown {
        value: value.to_string(),
    })
}

/// What startup knows when it decides.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `None` when the local engine is installed and this CPU can run it, else what is missing or why not.
    pub local_missing: Option<String>,
    pub deepgram_key: bool,
    /// Whether the OpenAI-compatible provider has a key, or does not need one (a self-hosted base URL:
    /// whisper.cpp's server, faster-whisper-server and vLLM run without keys by default).
    pub openai_key_or_self_hosted: bool,
}

pub fn select(requested: Option<ProviderKind>, facts: &Facts) -> Result<Selection, SelectError> {
    let chosen = |kind| Ok(Selection { kind, note: None });
    match requested {
        None => match &facts.local_missing {
            None => chosen(ProviderKind::Local),
            Some(detail) => Ok(Selection {
                kind: ProviderKind::None,
                note: Some(format!(
                    "speech-to-text is off (provider none: metering only): VOICEGATE_STT is unset and the local engine cannot be used ({detail}); run scripts/deps.sh or set VOICEGATE_STT"
                )),
            }),
        },
        Some(ProviderKind::Local) => match &facts.local_missing {
            None => chosen(ProviderKind::Local),
            Some(detail) => Err(SelectError::LocalNotInstalled {
                detail: detail.clone(),
            }),
        },
        Some(ProviderKind::Deepgram) if !facts.deepgram_key => Err(SelectError::MissingKey {
            provider: ProviderKind::Deepgram,
            setting: "DEEPGRAM_API_KEY or VOICEGATE_DEEPGRAM_KEY_FILE",
        }),
        Some(ProviderKind::OpenAi) if !facts.openai_key_or_self_hosted => {
            Err(SelectError::MissingKey {
                provider: ProviderKind::OpenAi,
                setting: "OPENAI_API_KEY or VOICEGATE_OPENAI_API_KEY_FILE (a self-hosted VOICEGATE_OPENAI_BASE_URL may need none)",
            })
        }
        Some(kind) => chosen(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(installed: bool) -> Facts {
        Facts {
            local_missing: (!installed).then(|| "/x/libmoonshine.so is missing".to_string()),
            ..Facts::default()
        }
    }

    #[test]
    fn unset_gives_local_when_installed_and_none_with_one_note_when_not() {
        assert_eq!(
            select(None, &facts(true)),
            Ok(Selection {
                kind: ProviderKind::Local,
                note: None
            })
        );
        let fallback = select(None, &facts(false)).expect("starts");
        assert_eq!(fallback.kind, ProviderKind::None);
        let note = fallback.note.expect("says why");
        assert!(
            note.contains("scripts/deps.sh") && note.contains("libmoonshine.so"),
            "{note}"
        );
    }

    #[test]
    fn explicit_local_without_the_engine_refuses_to_start() {
        let err = select(Some(ProviderKind::Local), &facts(false)).unwrap_err();
        assert!(matches!(err, SelectError::LocalNotInstalled { .. }));
        assert!(err.to_string().contains("scripts/deps.sh"));
    }

    #[test]
    fn an_unknown_value_names_every_valid_one() {
        let err = parse("whisper").unwrap_err();
        assert_eq!(
            err.to_string(),
            "VOICEGATE_STT=\"whisper\" is not a speech-to-text provider: valid values are local, deepgram, openai, none"
        );
        assert_eq!(parse(" Local "), Ok(ProviderKind::Local));
        assert_eq!(parse("none"), Ok(ProviderKind::None));
        assert!(parse("").is_err());
    }

    #[test]
    fn providers_that_need_a_key_refuse_to_start_without_one() {
        let err = select(Some(ProviderKind::Deepgram), &facts(true)).unwrap_err();
        assert!(err.to_string().contains("DEEPGRAM_API_KEY"), "{err}");
        assert!(matches!(
            select(Some(ProviderKind::OpenAi), &facts(true)),
            Err(SelectError::MissingKey { .. })
        ));
        let keyed = Facts {
            deepgram_key: true,
            openai_key_or_self_hosted: true,
            ..facts(false)
        };
        assert_eq!(
            select(Some(ProviderKind::Deepgram), &keyed).map(|s| s.kind),
            Ok(ProviderKind::Deepgram)
        );
        assert_eq!(
            select(Some(ProviderKind::OpenAi), &keyed).map(|s| s.kind),
            Ok(ProviderKind::OpenAi)
        );
        assert_eq!(
            select(Some(ProviderKind::None), &keyed).map(|s| s.kind),
            Ok(ProviderKind::None)
        );
    }
}
