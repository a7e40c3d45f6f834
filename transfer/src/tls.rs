//! Mutual TLS for every connection, with rustls on the ring provider.
//!
//! Every node has a key pair and a certificate. No connection is ever unauthenticated:
//! both sides present a certificate and prove possession of its key in the handshake
//! (the signature checks below are the real rustls/ring ones). What a certificate is
//! *trusted for* is decided by a [`Trust`] policy:
//!
//! - [`Trust::Standalone`] (today): a node's identity is its certificate fingerprint
//!   (SHA-256 of the DER). The dialer pins the fingerprint it was given by a ticket or
//!   by the tracker; an acceptor takes any client that proves a key, records its
//!   fingerprint, and the swarm can ban it.
//! - [`Trust::Ca`]: the managed fleet. Every node's certificate is issued by the
//!   center's [`CertAuthority`]; both sides check the other's chain against that root
//!   (rustls-webpki, ring). The host name is the certificate's common name. The rest
//!   of the engine still only sees a [`Fingerprint`].
//!
//! Enrollment works like kubeadm's discovery hash: the enrollment token carries the
//! CA certificate's fingerprint, the agent dials with its own self-signed certificate,
//! accepts the center only if the center's chain ends in a CA with that fingerprint,
//! and gets back a certificate for the very key its handshake proved it holds. No
//! separate CSR format is needed: the TLS 1.3 handshake is the proof of possession.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::frame::ALPN;

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::manifest::hex(&self.0[..8]))
    }
}
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the node key: {0}")]
    Keygen(#[from] rcgen::Error),
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the QUIC crypto configuration: {0}")]
    Quic(String),
    #[error("checking a certificate: {0}")]
    BadCert(String),
}

/// A node's key pair and certificate (self-signed, or issued by the center's CA).
#[derive(Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    /// Certificates presented after `cert` (the CA's, for a CA-issued identity).
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate.
    pub fn generate() -> Result<Identity, TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = rcgen::CertificateParams::new(vec!["octopus-node".to_string()])?;
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        Ok(Identity {
            fingerprint: Fingerprint::of(&der),
            cert: der,
            chain: Vec::new(),
            key: Arc::new(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Rebuild an identity from stored DER: the certificate, the chain after it, and
    /// the PKCS#8 key. The key must match the certificate (checked on first use by
    /// rustls; a mismatch fails every handshake, it cannot impersonate).
    pub fn from_der(cert: Vec<u8>, chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Identity {
        let cert = CertificateDer::from(cert);
        Identity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            chain: chain.into_iter().map(CertificateDer::from).collect(),
            key: Arc::new(PrivatePkcs8KeyDer::from(key_pkcs8)),
        }
    }

    /// The PKCS#8 DER of the private key, for storing (mode 0600) by the caller.
    pub fn key_pkcs8(&self) -> &[u8] {
        self.key.secret_pkcs8_der()
    }

    /// The raw public key (uncompressed P-256 point) inside our certificate, which a
    /// CA signs a new certificate for at enrollment.
    pub fn public_key_raw(&self) -> Result<Vec<u8>, TlsError> {
        p256_point_in_cert(&self.cert).ok_or(TlsError::BadCert(
            "no P-256 public key in our certificate".into(),
        ))
    }

    /// The same key with a new certificate (and chain), as returned by enrollment.
    pub fn with_cert(&self, cert: Vec<u8>, chain: Vec<Vec<u8>>) -> Identity {
        let cert = CertificateDer::from(cert);
        Identity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            chain: chain.into_iter().map(CertificateDer::from).collect(),
            key: self.key.clone(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.as_ref().clone_key())
    }

    fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        let mut v = vec![self.cert.clone()];
        v.extend(self.chain.iter().cloned());
        v
    }
}

/// Parses `cert` as exactly one DER X.509 certificate, with a maintained parser
/// (x509-parser): this runs on certificates of peers that have not enrolled yet, so
/// no hand-written DER scanning.
fn parse_cert(cert: &[u8]) -> Option<x509_parser::certificate::X509Certificate<'_>> {
    use x509_parser::prelude::FromDer;
    match x509_parser::certificate::X509Certificate::from_der(cert) {
        Ok(([], c)) => Some(c),
        _ => None,
    }
}

/// The P-256 public key of a certificate (the subject's key info: id-ecPublicKey on
/// prime256v1) as the 65-byte uncompressed point; `None` for any other key or a
/// certificate that does not parse.
pub fn p256_point_in_cert(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    let c = parse_cert(cert)?;
    let spki = c.public_key();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    if curve != OID_EC_P256 || spki.subject_public_key.unused_bits != 0 {
        return None;
    }
    let point = &spki.subject_public_key.data;
    (point.len() == 65 && point[0] == 0x04).then(|| point.to_vec())
}

/// The raw key as rcgen needs it to sign a certificate for someone else's key.
struct RawP256<'a>(&'a [u8]);

impl rcgen::PublicKeyData for RawP256<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The name a center's certificate carries; agents check it is CA-issued, and the
/// name is what rustls needs to ask for.
pub const CENTER_NAME: &str = "octopus-center";

/// The center's certificate authority: an ECDSA P-256 root that issues every node's
/// certificate in a managed fleet.
pub struct CertAuthority {
    pub cert: CertificateDer<'static>,
    key: rcgen::KeyPair,
    /// The CA's subject common name, from which the issuer is rebuilt for signing.
    name: String,
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

fn ca_params(name: &str) -> Result<rcgen::CertificateParams, TlsError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

impl CertAuthority {
    /// A new root, named `Octopus CA <random>` so two centers' CAs never share a name.
    pub fn generate() -> Result<CertAuthority, TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let name = format!("Octopus CA {:016x}", rand::random::<u64>());
        let cert = ca_params(&name)?.self_signed(&key)?;
        let der = cert.der().clone();
        Ok(CertAuthority {
            fingerprint: Fingerprint::of(&der),
            cert: der,
            key,
            name,
        })
    }

    /// Load a stored root: its certificate DER, key PKCS#8 DER and name.
    pub fn from_der(
        cert: Vec<u8>,
        key_pkcs8: &[u8],
        name: String,
    ) -> Result<CertAuthority, TlsError> {
        let key = rcgen::KeyPair::try_from(key_pkcs8)?;
        let cert = CertificateDer::from(cert);
        Ok(CertAuthority {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_pkcs8(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// A certificate for `public_key` (a raw P-256 point) named `cn`, valid for a year,
    /// usable as TLS client and server (mesh nodes are both).
    pub fn issue(&self, cn: &str, public_key: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
        self.issue_for(cn, public_key, std::time::Duration::from_secs(365 * 86400))
    }

    /// As [`CertAuthority::issue`], valid for `valid` from now (short-lived
    /// certificates for the CLI's seeds).
    pub fn issue_for(
        &self,
        cn: &str,
        public_key: &[u8],
        valid: std::time::Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        if public_key.len() != 65 || public_key[0] != 0x04 {
            return Err(TlsError::BadCert("not an uncompressed P-256 point".into()));
        }
        // rcgen signs with an issuer *Certificate*; rebuilding it from the same
        // deterministic parameters and key gives the same subject and key identifier,
        // so what it signs chains to the stored root.
        let issuer = ca_params(&self.name)?.self_signed(&self.key)?;
        let mut p = rcgen::CertificateParams::new(vec![cn.to_string()])?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = std::time::SystemTime::now();
        p.not_before = (now - std::time::Duration::from_secs(3600)).into();
        p.not_after = (now + valid).into();
        let cert = p.signed_by(&RawP256(public_key), &issuer, &self.key)?;
        Ok(cert.der().clone())
    }

    /// A fresh key with a TLS server certificate from this CA for these names (DNS
    /// names, or IP addresses written as text), valid for a year, presenting the chain
    /// [leaf, CA]: what the center's HTTPS API serves, so that curl and any client that
    /// trusts the CA check the name as usual.
    pub fn issue_server_identity(&self, names: &[String]) -> Result<Identity, TlsError> {
        let own = Identity::generate()?;
        let issuer = ca_params(&self.name)?.self_signed(&self.key)?;
        // rcgen turns each name that parses as an IP address into an IP SAN.
        let mut p = rcgen::CertificateParams::new(names.to_vec())?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, CENTER_NAME.to_string());
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let now = std::time::SystemTime::now();
        p.not_before = (now - std::time::Duration::from_secs(3600)).into();
        p.not_after = (now + std::time::Duration::from_secs(365 * 86400)).into();
        let leaf = p.signed_by(&RawP256(&own.public_key_raw()?), &issuer, &self.key)?;
        Ok(own.with_cert(leaf.der().to_vec(), vec![self.cert.to_vec()]))
    }

    /// A fresh key with a certificate from this CA, presenting the chain [leaf, CA].
    pub fn issue_identity(&self, cn: &str) -> Result<Identity, TlsError> {
        let own = Identity::generate()?;
        let leaf = self.issue(cn, &own.public_key_raw()?)?;
        Ok(own.with_cert(leaf.to_vec(), vec![self.cert.to_vec()]))
    }
}

/// Checks that `cert` was issued by the CA `root` and is valid now, for TLS client
/// (`client = true`) or server use. Returns the certificate's common name, which is
/// the host name in a managed fleet.
pub fn verify_issued(cert: &[u8], root: &[u8], client: bool) -> Result<String, TlsError> {
    let root = CertificateDer::from(root);
    let anchor = webpki::anchor_from_trusted_cert(&root)
        .map_err(|e| TlsError::BadCert(format!("the CA certificate: {e}")))?;
    let leaf = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| TlsError::BadCert(format!("the certificate: {e}")))?;
    let usage = if client {
        webpki::KeyUsage::client_auth()
    } else {
        webpki::KeyUsage::server_auth()
    };
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map_err(|e| TlsError::BadCert(format!("not issued by the center's CA: {e}")))?;
    common_name(cert).ok_or_else(|| TlsError::BadCert("no common name".into()))
}

/// The subject's common name (OID 2.5.4.3), which is the host name in a managed
/// fleet; `None` if the certificate does not parse or has none that is a string.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let c = parse_cert(cert)?;
    let cn = c.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// How certificates are trusted. See the module docs.
#[derive(Debug, Clone)]
pub enum Trust {
    Standalone,
    /// Managed fleet: peers must present a chain to this root (the CA's DER).
    Ca(CertificateDer<'static>),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: require a client certificate, check its handshake signature, accept
/// the key (standalone trust). The fingerprint is read off the connection afterwards.
#[derive(Debug)]
struct ClientVerifier {
    provider: Arc<CryptoProvider>,
    trust: Trust,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.trust {
            Trust::Standalone => Ok(ClientCertVerified::assertion()),
            Trust::Ca(root) => match verify_issued(end_entity, root, true) {
                Ok(_) => Ok(ClientCertVerified::assertion()),
                Err(_) => Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
            },
        }
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// What a dialer accepts from the server.
#[derive(Debug, Clone)]
pub enum ServerCheck {
    /// Exactly this certificate (standalone: from a ticket or the tracker).
    Pinned(Fingerprint),
    /// Any certificate issued by this CA (managed fleet).
    IssuedBy(CertificateDer<'static>),
    /// A certificate issued by the CA presented right after it in the chain, whose
    /// fingerprint is this (enrollment: the token carries the CA's fingerprint).
    CaFingerprint(Fingerprint),
}

/// Client side: the server's certificate must pass the [`ServerCheck`].
#[derive(Debug)]
struct PinnedServerVerifier {
    provider: Arc<CryptoProvider>,
    check: ServerCheck,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = match &self.check {
            ServerCheck::Pinned(fp) => Fingerprint::of(end_entity) == *fp,
            ServerCheck::IssuedBy(root) => verify_issued(end_entity, root, false).is_ok(),
            ServerCheck::CaFingerprint(fp) => intermediates.first().is_some_and(|ca| {
                Fingerprint::of(ca) == *fp && verify_issued(end_entity, ca, false).is_ok()
            }),
        };
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// TLS server configuration for the QUIC endpoint (the transfer ALPN).
pub fn server_config(id: &Identity, trust: &Trust) -> Result<rustls::ServerConfig, TlsError> {
    server_config_alpns(id, trust, &[ALPN])
}

/// As [`server_config`], offering these ALPN names.
pub fn server_config_alpns(
    id: &Identity,
    trust: &Trust,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ClientVerifier {
        provider: provider.clone(),
        trust: trust.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain(), id.key())?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// TLS server configuration for an HTTPS server (the center's API): no client
/// certificate (callers authenticate with tokens), TLS 1.2 or 1.3, ALPN `http/1.1`.
pub fn https_server_config(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(id.cert_chain(), id.key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// TLS client configuration that pins the server's fingerprint.
pub fn client_config(
    id: &Identity,
    expected: Fingerprint,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_check(id, ServerCheck::Pinned(expected), ALPN)
}

/// As [`client_config`], with another ALPN (tests use this to check refusal).
pub fn client_config_alpn(
    id: &Identity,
    expected: Fingerprint,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_check(id, ServerCheck::Pinned(expected), alpn)
}

/// A client configuration with any [`ServerCheck`] and ALPN.
pub fn client_config_check(
    id: &Identity,
    check: ServerCheck,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        provider: provider.clone(),
        check,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.cert_chain(), id.key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The fingerprint of the certificate the other side of `conn` presented.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    peer_cert(conn).map(|c| Fingerprint::of(&c))
}

/// The certificate the other side of `conn` presented.
pub fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_certificates_that_verify_and_name_the_host() {
        let ca = CertAuthority::generate().unwrap();
        let node = Identity::generate().unwrap();
        let leaf = ca.issue("web-1", &node.public_key_raw().unwrap()).unwrap();
        assert_eq!(verify_issued(&leaf, &ca.cert, true).unwrap(), "web-1");
        assert_eq!(verify_issued(&leaf, &ca.cert, false).unwrap(), "web-1");
        // The issued certificate is for the node's own key.
        assert_eq!(
            p256_point_in_cert(&leaf).unwrap(),
            node.public_key_raw().unwrap()
        );
        assert_eq!(common_name(&leaf).as_deref(), Some("web-1"));
        // Truncated, padded or garbage input parses as nothing, without panicking.
        assert!(p256_point_in_cert(&leaf[..leaf.len() - 1]).is_none());
        let mut padded = leaf.to_vec();
        padded.push(0);
        assert!(p256_point_in_cert(&padded).is_none());
        assert!(common_name(&[0x30, 0x82, 0xff, 0xff]).is_none());
        // Another CA's certificate, and a self-signed one, do not verify.
        let other = CertAuthority::generate().unwrap();
        let foreign = other
            .issue("web-1", &node.public_key_raw().unwrap())
            .unwrap();
        assert!(verify_issued(&foreign, &ca.cert, true).is_err());
        assert!(verify_issued(&node.cert, &ca.cert, true).is_err());
    }

    #[test]
    fn a_reloaded_ca_still_issues_into_the_same_chain() {
        let ca = CertAuthority::generate().unwrap();
        let again =
            CertAuthority::from_der(ca.cert.to_vec(), &ca.key_pkcs8(), ca.name().into()).unwrap();
        assert_eq!(again.fingerprint, ca.fingerprint);
        let id = again.issue_identity("db-2").unwrap();
        assert_eq!(verify_issued(&id.cert, &ca.cert, true).unwrap(), "db-2");
        assert_eq!(id.chain, vec![ca.cert.clone()]);
    }

    #[test]
    fn issue_refuses_a_malformed_key() {
        let ca = CertAuthority::generate().unwrap();
        assert!(ca.issue("x", &[4u8; 10]).is_err());
    }
}
