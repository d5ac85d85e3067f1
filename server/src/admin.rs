//! The `X-Admin-Key` check for `/v1/admin/…` routes.
//!
//! Statuses follow the reference so its tooling keeps working: a missing header answers **422**, a wrong key
//! (or no `ADMIN_KEY` configured at all) answers **403**. The compare is constant-time over SHA-256 digests, so
//! neither the content nor the length of the key leaks through timing. Wrong keys are throttled per client
//! address ([`crate::throttle`]): past `VOICEGATE_AUTH_FAILURES_PER_MINUTE`, 429 `too_many_auth_failures`.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::throttle::AuthThrottle;

/// The header the admin key travels in.
pub const ADMIN_KEY_HEADER: &str = "X-Admin-Key";

/// The configured admin key, kept only as its digest, and the throttle of wrong keys per client address.
pub struct AdminKey {
    digest: Option<[u8; 32]>,
    throttle: AuthThrottle,
}

impl AdminKey {
    /// `None` (or an empty key) disables the admin routes: every call answers 403.
    pub fn new(key: Option<&str>) -> Self {
        AdminKey {
            digest: key
                .filter(|k| !k.is_empty())
                .map(|k| Sha256::digest(k.as_bytes()).into()),
            throttle: AuthThrottle::new(Default::default(), "admin_key"),
        }
    }

    /// Throttles wrong keys with `throttle` (`VOICEGATE_AUTH_FAILURES_PER_MINUTE` per client address).
    #[must_use]
    pub fn with_throttle(mut self, throttle: AuthThrottle) -> Self {
        self.throttle = throttle;
        self
    }

    /// Checks the request's header; an address with too many wrong keys gets 429
    /// `too_many_auth_failures` before its key is looked at.
    pub fn check_request(&self, head: &actix_http::RequestHead) -> Result<(), ApiError> {
        let client = self.throttle.client(head);
        self.throttle.admit(client)?;
        let result = self.check(head.headers.get(ADMIN_KEY_HEADER).map(|v| v.as_bytes()));
        if result
            .as_ref()
            .is_err_and(|e| e.code() == "admin_key_invalid")
        {
            self.throttle.failed(client);
        }
        result
    }

    /// Checks a presented header value.
    pub fn check(&self, presented: Option<&[u8]>) -> Result<(), ApiError> {
        let presented = presented.ok_or_else(ApiError::admin_key_missing)?;
        let Some(expected) = &self.digest else {
            return Err(ApiError::admin_key_invalid());
        };
        let got: [u8; 32] = Sha256::digest(presented).into();
        if bool::from(got.ct_eq(expected)) {
            Ok(())
        } else {
            Err(ApiError::admin_key_invalid())
        }
    }
}

/// Extractor: put `_admin: Admin` in a handler's arguments to require the admin key.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = match req.app_data::<web::Data<AdminKey>>() {
            Some(key) => key.check_request(req.head()).map(|()| Admin),
            None => Err(ApiError::internal(
                "admin_not_configured",
                "no AdminKey in app data",
            )),
        };
        ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_key_passes() {
        assert!(AdminKey::new(Some("k3y")).check(Some(b"k3y")).is_ok());
    }

    #[test]
    fn a_missing_header_is_422_and_a_wrong_key_is_403() {
        let key = AdminKey::new(Some("k3y"));
        assert_eq!(
            key.check(None).err().map(|e| e.code()),
            Some("admin_key_missing")
        );
        assert_eq!(
            key.check(Some(b"k3")).err().map(|e| e.code()),
            Some("admin_key_invalid")
        );
        assert_eq!(
            key.check(Some(b"")).err().map(|e| e.code()),
            Some("admin_key_invalid")
        );
    }

    #[test]
    fn no_configured_key_refuses_everyone() {
        for key in [AdminKey::new(None), AdminKey::new(Some(""))] {
            assert_eq!(
                key.check(Some(b"")).err().map(|e| e.code()),
                Some("admin_key_invalid")
            );
            assert_eq!(
                key.check(Some(b"anything")).err().map(|e| e.code()),
                Some("admin_key_invalid")
            );
        }
    }
}
