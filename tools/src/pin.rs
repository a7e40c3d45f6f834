//! How the CLI trusts the center's HTTPS API: it pins the center's own CA.
//!
//! Why it is shaped like this:
//!
//! * **The CA comes from the operator, never from the network alone.** In order:
//!   `--ca FILE` / `OCTO_CA` / `ca = FILE` in the config file; else the CA fingerprint
//!   a token carries (`octo_<id>_<secret>.<sha256 hex>`, as `token create` prints and
//!   `admin.token` holds: the handshake's chain must contain a CA with exactly that
//!   fingerprint); else the center's `DATA_DIR/ca.pem` when the CLI runs next to it.
//!   The pinned CA then verifies the certificate and its name as any HTTPS client
//!   would (ureq on rustls).
//! * **A token never crosses plain HTTP to another host**: `http://` is refused
//!   unless the host is loopback or `--insecure-http` is given.
//! * **A center that fails the pin is a distinct failure** ([`PinError`], exit code
//!   [`EXIT_UNVERIFIED`]), naming the pin, so scripts can tell it from an API error.

use std::io::Write;
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use octopus_transfer::tls::{self, Fingerprint};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The exit status of a command whose center failed the CA pin.
pub const EXIT_UNVERIFIED: u8 = 3;

/// The center could not be verified with the pinned CA.
#[derive(Debug)]
pub struct PinError(pub String);

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinError {}

/// What the CA was pinned by, for messages.
#[derive(Debug, Clone)]
pub struct Pinned {
    pub ca_der: Vec<u8>,
    pub by: String,
}

/// Splits a token into the credential and the CA fingerprint it carries, if any.
pub fn split_token(token: &str) -> (String, Option<Fingerprint>) {
    let t = token.trim();
    match t.rsplit_once('.') {
        Some((cred, hex)) => match parse_fp(hex) {
            Some(fp) => (cred.to_string(), Some(fp)),
            None => (t.to_string(), None),
        },
        None => (t.to_string(), None),
    }
}

fn parse_fp(hex: &str) -> Option<Fingerprint> {
    if hex.len() != 64 {
        return None;
    }
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Fingerprint(fp))
}

fn fp_hex(fp: &Fingerprint) -> String {
    fp.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a certificate file: PEM (the first certificate) or DER.
pub fn read_cert(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the CA file {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let Some(start) = text.find("-----BEGIN CERTIFICATE-----") else {
        return Ok(bytes);
    };
    let body = &text[start + "-----BEGIN CERTIFICATE-----".len()..];
    let end = body.find("-----END CERTIFICATE-----").with_context(|| {
        format!(
            "reading the CA file {}: no END CERTIFICATE line",
            path.display()
        )
    })?;
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    data_encoding::BASE64
        .decode(b64.as_bytes())
        .with_context(|| format!("reading the CA file {}: bad base64", path.display()))
}

/// True for `localhost` and loopback addresses, the only hosts plain HTTP may reach.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host` and `host:port` of an `http(s)://host:port[/...]` URL.
pub fn authority(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let auth = rest.split('/').next().unwrap_or("").to_string();
    let host = if let Some(v6) = auth.strip_prefix('[') {
        v6.split(']').next().unwrap_or("").to_string()
    } else {
        auth.rsplit_once(':')
            .map_or(auth.as_str(), |(h, _)| h)
            .to_string()
    };
    (host, auth)
}

/// Finds the CA to pin for `base` (an https URL), in the order of the module docs.
pub fn resolve(
    base: &str,
    ca_file: Option<PathBuf>,
    token_fp: Option<Fingerprint>,
    next_to_center: PathBuf,
) -> Result<Pinned> {
    if let Some(path) = ca_file {
        let ca_der = read_cert(&path)?;
        return Ok(Pinned {
            ca_der,
            by: format!("the CA in {}", path.display()),
        });
    }
    if let Some(fp) = token_fp {
        let by = format!("the CA fingerprint {} carried by the token", fp_hex(&fp));
        let ca_der = fetch_ca(base, &fp).map_err(|e| match e {
            Fetch::Mismatch(e) => anyhow::Error::new(PinError(format!(
                "the center at {base} does not match {by}: {e}"
            ))),
            Fetch::Net(e) => anyhow::anyhow!("reaching the center at {base} to check {by}: {e}"),
        })?;
        return Ok(Pinned { ca_der, by });
    }
    if next_to_center.exists() {
        let ca_der = read_cert(&next_to_center)?;
        return Ok(Pinned {
            ca_der,
            by: format!("the CA in {}", next_to_center.display()),
        });
    }
    bail!(
        "finding the center's CA to verify {base}: pass --ca FILE (the center's DATA_DIR/ca.pem), \
         set OCTO_CA or write ca = FILE in the config file, or use a token that carries the CA \
         fingerprint (as `octo token create` prints)"
    )
}

/// Why [`fetch_ca`] failed: the network, or the center's chain.
enum Fetch {
    Net(String),
    Mismatch(String),
}

/// Dials `base` and returns the CA certificate in the server's chain whose fingerprint
/// is `fp`, after checking it issued the server's certificate. Nothing but a TLS
/// handshake is sent; the real calls then verify against this CA as usual.
fn fetch_ca(base: &str, fp: &Fingerprint) -> Result<Vec<u8>, Fetch> {
    let chain = server_chain(base).map_err(Fetch::Net)?;
    let Some((leaf, rest)) = chain.split_first() else {
        return Err(Fetch::Mismatch(
            "the server presented no certificate".into(),
        ));
    };
    let ca = rest
        .iter()
        .find(|c| Fingerprint::of(c) == *fp)
        .ok_or_else(|| {
            Fetch::Mismatch("no certificate in the server's chain has that fingerprint".into())
        })?;
    tls::verify_issued(leaf, ca, false).map_err(|e| Fetch::Mismatch(e.to_string()))?;
    Ok(ca.clone())
}

/// The certificate chain `base` presents in a TLS handshake (leaf first).
fn server_chain(base: &str) -> Result<Vec<Vec<u8>>, String> {
    let (host, auth) = authority(base);
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let provider = tls::provider();
    let verifier = Arc::new(Capture {
        seen: seen.clone(),
        provider: provider.clone(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("the host {host:?}: {e}"))?;
    let addr = auth
        .to_socket_addrs()
        .map_err(|e| format!("resolving {auth}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolving {auth}: no address"))?;
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connecting to {auth}: {e}"))?;
    // As patient as the API calls: a busy center accepts late, not never.
    let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(60)));
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake with {auth}: {e}"))?;
    }
    // Say goodbye without waiting for the server's answer.
    conn.send_close_notify();
    while conn.wants_write() {
        if conn.write_tls(&mut sock).is_err() {
            break;
        }
    }
    let _ = sock.flush();
    let chain = seen.lock().unwrap().clone();
    Ok(chain)
}

/// Records the server's chain; the chain is checked after the handshake, and the
/// handshake's signature is checked here as usual.
#[derive(Debug)]
struct Capture {
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut v = vec![end_entity.to_vec()];
        v.extend(intermediates.iter().map(|c| c.to_vec()));
        *self.seen.lock().unwrap() = v;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// ureq's TLS settings that trust exactly `ca_der`.
pub fn tls_config(ca_der: &[u8]) -> ureq::tls::TlsConfig {
    let cert = ureq::tls::Certificate::from_der(ca_der).to_owned();
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
        .unversioned_rustls_crypto_provider(tls::provider())
        .build()
}

/// True when a ureq failure is the server's certificate failing verification.
pub fn is_cert_failure(e: &ureq::Error) -> bool {
    let invalid = |r: &rustls::Error| matches!(r, rustls::Error::InvalidCertificate(_));
    match e {
        ureq::Error::Rustls(r) => invalid(r),
        // rustls' errors during the handshake reach ureq as I/O errors.
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some_and(invalid),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_credential_and_fingerprint() {
        let hex = "ab".repeat(32);
        let (cred, fp) = split_token(&format!("octo_abc_def.{hex}"));
        assert_eq!(cred, "octo_abc_def");
        assert_eq!(fp.unwrap().0, [0xab; 32]);
        let (cred, fp) = split_token("octo_abc_def");
        assert_eq!(cred, "octo_abc_def");
        assert!(fp.is_none());
    }

    #[test]
    fn loopback_and_authorities() {
        assert!(is_loopback("127.0.0.1") && is_loopback("[::1]") && is_loopback("localhost"));
        assert!(!is_loopback("10.0.0.1") && !is_loopback("example.com"));
        assert_eq!(
            authority("https://[::1]:7070/api"),
            ("::1".into(), "[::1]:7070".into())
        );
        assert_eq!(
            authority("http://10.0.0.1:7070"),
            ("10.0.0.1".into(), "10.0.0.1:7070".into())
        );
    }
}
