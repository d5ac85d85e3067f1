//! The one outbound client: every connection VoiceGate opens to another service (speech-to-text
//! providers; the LLM classifier and JWKS URLs are to move onto it) goes through an [`Outbound`].
//!
//! - **One TLS configuration** (rustls, aws-lc-rs provider, TLS 1.2 and 1.3) with **one CA setting**:
//!   unset, Mozilla's root set compiled in (`webpki-roots`, so a container without a system CA bundle
//!   still verifies); `VOICEGATE_TLS_CA_FILE`, exactly the certificates of that PEM file (a private CA, or
//!   the system bundle `/etc/ssl/certs/ca-certificates.crt`).
//! - **HTTP** through one `reqwest::Client` over that configuration (connection pooling shared by all).
//! - **Websockets** (`ws://`, `wss://`) through tokio-tungstenite over the same configuration, with a
//!   connect timeout; a refused handshake comes back as its HTTP status and body.
//!
//! Cheap to clone (two `Arc`s inside). Built once at startup; a bad CA file refuses to start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// A websocket opened by [`Outbound::websocket`].
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The longest time to open a TCP connection (and, for websockets, to finish the handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared outbound client. See the module docs.
#[derive(Clone)]
pub struct Outbound {
    tls: Arc<rustls::ClientConfig>,
    http: reqwest::Client,
    ca: Option<PathBuf>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("ca", &self.ca).finish()
    }
}

/// Why the outbound client could not be built (the server refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("VOICEGATE_TLS_CA_FILE={}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("the TLS configuration could not be built: {0}")]
    Tls(String),
}

/// Why a websocket did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsConnectError {
    /// The server answered the upgrade with an HTTP status instead of 101.
    #[error("the server refused the websocket with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the websocket could not be opened: {0}")]
    Failed(String),
    #[error("the websocket did not open within {0:?}")]
    Timeout(Duration),
}

impl Outbound {
    /// Builds the client; `ca_file` replaces the compiled-in roots (see the module docs).
    pub fn new(ca_file: Option<&Path>) -> Result<Outbound, OutboundError> {
        let roots = match ca_file {
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            Some(path) => roots_from_file(path)?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OutboundError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| OutboundError::Tls(e.to_string()))?;
        Ok(Outbound {
            tls: Arc::new(tls),
            http,
            ca: ca_file.map(Path::to_path_buf),
        })
    }

    /// The HTTP client (over the shared TLS configuration).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The TLS configuration, for a client that needs it directly.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.tls)
    }

    /// Opens a websocket (`ws://` or `wss://`, headers as given), within `timeout`, with
    /// [`websocket_config`]'s small, bounded buffers.
    pub async fn websocket(
        &self,
        request: tungstenite::handshake::client::Request,
        timeout: Duration,
    ) -> Result<WsStream, WsConnectError> {
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(websocket_config()),
            true,
            Some(Connector::Rustls(Arc::clone(&self.tls))),
        );
        match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(WsConnectError::Timeout(timeout)),
            Ok(Ok((ws, _response))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                    .unwrap_or_default();
                Err(WsConnectError::Refused {
                    status: response.status().as_u16(),
                    body,
                })
            }
            Ok(Err(e)) => Err(WsConnectError::Failed(e.to_string())),
        }
    }
}

/// Largest message or frame an outbound websocket takes from its server: a provider's answer is a few
/// KB of JSON, so 1 MiB is ample, and a server that sends more cannot make a node hold 64 MiB (the
/// library's default) per session.
pub const WS_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Outbound bytes a websocket may hold while its socket does not take them; past it a send fails (the
/// caller's reconnect and counting take over) instead of growing without bound.
pub const WS_MAX_WRITE_BUFFER_BYTES: usize = 4 << 20;

/// One websocket per live session (Deepgram): the library's default buffers (128 KiB to read, 128 KiB to
/// write, for high throughput) would be ~256 KiB per session for a few KB of audio a second each way, so
/// they are 8 KiB, as its documentation advises for many connections; messages and the write buffer are
/// bounded ([`WS_MAX_MESSAGE_BYTES`], [`WS_MAX_WRITE_BUFFER_BYTES`]). Measured in
/// `docs/performance.md`, "Session 25".
pub fn websocket_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER_BYTES)
        .max_message_size(Some(WS_MAX_MESSAGE_BYTES))
        .max_frame_size(Some(WS_MAX_MESSAGE_BYTES))
}

fn roots_from_file(path: &Path) -> Result<rustls::RootCertStore, OutboundError> {
    let bad = |reason: String| OutboundError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not a PEM certificate list: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate is unusable as a root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".to_string()));
    }
    Ok(roots)
}

/// Test helpers for TLS (the `test-util` feature): a private CA with a `localhost` certificate, and the
/// server end that presents it. Used by this module's tests and by the HTTPS doubles of other tests.
#[cfg(feature = "test-util")]
pub mod test_tls {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A test CA and a `localhost` server certificate it signed, made with the openssl command line
    /// (`scripts/deps.sh` installs it): (CA PEM, server certificate PEM, server key PEM).
    pub fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let run = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("openssl (scripts/deps.sh installs it): {e}"));
            assert!(status.success(), "openssl {args:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = [
            "-days",
            "1",
            "-subj",
            "/CN=VoiceGate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ];
        run(&[&["req", "-x509"][..], &ec, &ca].concat());
        let leaf = [
            "-subj",
            "/CN=localhost",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
        ];
        run(&[&["req"][..], &ec, &leaf].concat());
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ]);
        (
            dir.join("ca.pem"),
            dir.join("leaf.pem"),
            dir.join("leaf.key"),
        )
    }

    /// The TLS server end presenting `cert` (PEM) with `key` (PEM).
    pub fn acceptor(cert: &Path, key: &Path) -> tokio_rustls::TlsAcceptor {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|c| c.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{e}"));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| panic!("{e}"));
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// The request bodies an HTTPS double read, in order.
    pub type Bodies = Arc<std::sync::Mutex<Vec<String>>>;

    /// An HTTPS server double on 127.0.0.1 presenting `cert` (for `localhost`): reads each request (its
    /// headers and its `Content-Length` body), records the body, and answers `200` with the JSON `reply`
    /// makes of it, one request per connection. A client that refuses the certificate fails the handshake
    /// and nothing is recorded. Returns the port and the bodies. Must run inside a tokio runtime.
    pub async fn serve_json(
        cert: &Path,
        key: &Path,
        reply: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> (u16, Bodies) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let acceptor = acceptor(cert, key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let bodies = Bodies::default();
        let seen = Arc::clone(&bodies);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let body_at = loop {
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break Some(end + 4);
                        }
                    }
                };
                let Some(at) = body_at else { continue };
                let body = String::from_utf8_lossy(&req[at..]).into_owned();
                let answer = reply(&body);
                seen.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(body);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (port, bodies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_trusts_the_compiled_in_roots() {
        let out = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.ca.is_none());
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 100);
    }

    #[test]
    fn a_ca_file_that_is_missing_empty_or_not_pem_refuses_with_its_path() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("missing.pem");
        let err = Outbound::new(Some(&missing)).unwrap_err().to_string();
        assert!(
            err.contains("VOICEGATE_TLS_CA_FILE") && err.contains("missing.pem"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{e}"));
        let err = Outbound::new(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(Outbound::new(Some(&junk)).is_err());
    }

    /// A TLS server for `localhost` answering one websocket (echo) and then one HTTP request (`200 ok`).
    async fn tls_server(cert: &Path, key: &Path) -> std::net::SocketAddr {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let acceptor = test_tls::acceptor(cert, key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let mut served_ws = false;
            while let Ok((tcp, _)) = listener.accept().await {
                // Handshakes that fail (the client refusing the certificate) are not counted.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                if !served_ws {
                    served_ws = true;
                    if let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await
                        && let Some(Ok(msg)) = ws.next().await
                    {
                        let _ = ws.send(msg).await;
                        let _ = ws.close(None).await;
                    }
                } else {
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_ca_setting_is_the_trust_of_websockets_and_http_alike() {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tungstenite::client::IntoClientRequest as _;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (ca, cert, key) = test_tls::pki(dir.path());
        let addr = tls_server(&cert, &key).await;
        let url = format!("wss://localhost:{}/v1/listen", addr.port());
        // The built-in roots do not trust the test CA: the handshake fails, naming the certificate.
        let public = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
        let req = url
            .as_str()
            .into_client_request()
            .unwrap_or_else(|e| panic!("{e}"));
        match public.websocket(req, Duration::from_secs(5)).await {
            Err(WsConnectError::Failed(m)) => {
                assert!(m.to_lowercase().contains("certificate"), "{m}")
            }
            other => panic!("an unknown CA must be refused: {:?}", other.map(|_| ())),
        }
        // With VOICEGATE_TLS_CA_FILE = the test CA, the same server is trusted, for websockets and HTTP.
        let private = Outbound::new(Some(&ca)).unwrap_or_else(|e| panic!("{e}"));
        let req = url
            .as_str()
            .into_client_request()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ws = private
            .websocket(req, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ws.send(tungstenite::Message::text("over tls"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match ws.next().await {
            Some(Ok(tungstenite::Message::Text(t))) => assert_eq!(t.as_str(), "over tls"),
            other => panic!("{other:?}"),
        }
        let body = private
            .http()
            .get(format!("https://localhost:{}/", addr.port()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body, "ok");
    }

    #[tokio::test]
    async fn a_refused_upgrade_reports_its_status_and_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let body = "{\"err_code\":\"ASR_PAYMENT_REQUIRED\"}";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 402 Payment Required\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let out = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
        use tungstenite::client::IntoClientRequest as _;
        let req = format!("ws://{addr}/v1/listen")
            .into_client_request()
            .unwrap_or_else(|e| panic!("{e}"));
        match out.websocket(req, Duration::from_secs(5)).await {
            Err(WsConnectError::Refused { status, body }) => {
                assert_eq!(status, 402);
                assert!(body.contains("ASR_PAYMENT_REQUIRED"), "{body}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_websocket_message_past_the_bound_is_an_error_not_an_allocation() {
        use futures_util::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            use futures_util::SinkExt as _;
            if let Ok((s, _)) = listener.accept().await
                && let Ok(mut ws) = tokio_tungstenite::accept_async(s).await
            {
                let _ = ws.send(tungstenite::Message::text("small")).await;
                let big = "x".repeat(WS_MAX_MESSAGE_BYTES + 1);
                let _ = ws.send(tungstenite::Message::text(big)).await;
            }
        });
        let out = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
        use tungstenite::client::IntoClientRequest as _;
        let req = format!("ws://{addr}/")
            .into_client_request()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ws = out
            .websocket(req, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match ws.next().await {
            Some(Ok(tungstenite::Message::Text(t))) => assert_eq!(t.as_str(), "small"),
            other => panic!("{other:?}"),
        }
        match ws.next().await {
            Some(Err(tungstenite::Error::Capacity(_))) => {}
            other => panic!("expected a capacity error, got {other:?}"),
        }
    }
}
