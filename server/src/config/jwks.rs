//! `VOICEGATE_JWKS` as a URL, and the bounds of its refresh (`server/src/auth/remote.rs` uses them).

use std::time::Duration;

use super::{ConfigError, ServeConfig};

impl ServeConfig {
    /// `VOICEGATE_JWKS` when it is a URL (`None`: unset or a file path). `https://` to any host; `http://`
    /// only to a loopback host (a JWKS served on this machine, e.g. a test double), refused otherwise.
    pub fn jwks_url(&self) -> Result<Option<reqwest::Url>, ConfigError> {
        let Some(source) = self.jwks.as_deref() else {
            return Ok(None);
        };
        let plain = source.starts_with("http://");
        if !plain && !source.starts_with("https://") {
            return Ok(None);
        }
        let url = reqwest::Url::parse(source).map_err(|e| ConfigError::BadJwksUrl {
            url: source.to_owned(),
            reason: e.to_string(),
        })?;
        if plain {
            let host = url.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(ConfigError::JwksPlainHttp(source.to_owned()));
            }
        }
        Ok(Some(url))
    }

    /// The bounds of a fetched JWKS's freshness (`VOICEGATE_JWKS_REFRESH_MIN_SECS` / `_MAX_SECS`).
    pub fn jwks_refresh_bounds(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.jwks_refresh_min_secs),
            Duration::from_secs(self.jwks_refresh_max_secs),
        )
    }

    /// The JWKS URL parses and is allowed; its refresh bounds are in order.
    pub(super) fn check_jwks(&self) -> Result<(), ConfigError> {
        self.jwks_url()?;
        if self.jwks_refresh_min_secs == 0
            || self.jwks_refresh_min_secs > self.jwks_refresh_max_secs
        {
            return Err(ConfigError::BadJwksRefresh {
                min: self.jwks_refresh_min_secs,
                max: self.jwks_refresh_max_secs,
            });
        }
        Ok(())
    }
}
