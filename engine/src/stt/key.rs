//! [`KeySource`]: where a remote provider's API key comes from (a setting, or a file read again at every
//! use so a rotated key applies without a restart).

use std::path::{Path, PathBuf};

use super::types::SttError;

/// Where the key comes from. A file is read at every connection or request (a few bytes), so rotating
/// the key takes effect for the next one, without a restart.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    Fixed(String),
    File(PathBuf),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            KeySource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl KeySource {
    /// The key now.
    pub fn current(&self) -> Result<String, SttError> {
        match self {
            KeySource::Fixed(k) if !k.is_empty() => Ok(k.clone()),
            KeySource::Fixed(_) => Err(SttError::Unauthorized(
                "no provider key is configured".into(),
            )),
            KeySource::File(path) => read_key(path),
        }
    }
}

fn read_key(path: &Path) -> Result<String, SttError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SttError::Unauthorized(format!("{}: {e}", path.display())))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(SttError::Unauthorized(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(key.to_string())
}
