#![no_main]
//! The bearer-token verifier on arbitrary tokens, and on HS256 tokens signed with the server's secret
//! around arbitrary header and claims bytes (so the claim checks are reached, not only the signature):
//! no panic, and an accepted token always names a uid that passes the uid rule.
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use voicegate_engine::outbound::Outbound;
use voicegate_server::auth::{Authenticator, uid_is_valid};
use voicegate_server::config::ServeConfig;

const SECRET: &str = "fuzz-secret";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = ServeConfig {
            jwt_hs256_secret: Some(SECRET.into()),
            ..ServeConfig::default()
        };
        let outbound = Outbound::new(None).expect("the TLS client builds");
        Authenticator::from_config(&cfg, &outbound).expect("an HS256 verifier")
    })
}

fn signed(header: &[u8], claims: &[u8]) -> String {
    let body = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(body.as_bytes());
    format!("{body}.{}", B64.encode(mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // The first byte after the mode splits the rest into the header and the claims.
        let Some((&cut, rest)) = rest.split_first() else {
            return;
        };
        let cut = usize::from(cut).min(rest.len());
        let (header, claims) = rest.split_at(cut);
        if mode & 2 == 0 {
            signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest)
        } else {
            signed(header, claims)
        }
    };
    if let Ok(user) = authenticator().verify(&token) {
        assert!(uid_is_valid(&user.uid), "accepted uid {:?}", user.uid);
    }
});
