//! Short-lived signed URLs for the agents' HTTP pool (`octo cp` of hot and small
//! files): `/files/{md5}?exp={unix seconds}&sig={signature}`.
//!
//! Why Ed25519 and not an HMAC: every agent must check signatures, and with a shared
//! HMAC key any one compromised agent could mint URLs for every other. The center
//! signs with a private key only it holds; agents verify with its public key, which
//! they receive over their mutually authenticated session. The signature covers the
//! content's MD5 and the expiry, so a URL is good for one content until one instant.

use data_encoding::BASE64URL_NOPAD;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlSigError {
    #[error("generating the signing key failed")]
    Keygen,
    #[error("the signing key is malformed")]
    BadKey,
    #[error("malformed content id {0:?}: expected 32 lowercase hex digits")]
    BadMd5(String),
    #[error("the URL expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("the URL's signature is malformed")]
    Malformed,
    #[error("the URL's signature does not match")]
    BadSignature,
}

fn check_md5(md5: &str) -> Result<(), UrlSigError> {
    if md5.len() == 32
        && md5
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(UrlSigError::BadMd5(md5.chars().take(64).collect()))
    }
}

fn message(md5: &str, exp: u64) -> Vec<u8> {
    format!("octo-pool-v1|{md5}|{exp}").into_bytes()
}

/// The center's side: holds the private key.
pub struct UrlSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner").finish_non_exhaustive()
    }
}

impl UrlSigner {
    /// A new key, as PKCS#8 DER to store (privately) and reload with [`UrlSigner::from_pkcs8`].
    pub fn generate() -> Result<Vec<u8>, UrlSigError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| UrlSigError::Keygen)
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<UrlSigner, UrlSigError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|key| UrlSigner { key })
            .map_err(|_| UrlSigError::BadKey)
    }

    /// The public key agents verify with.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// The query string `exp=...&sig=...` for content `md5`, valid until `exp`.
    pub fn sign(&self, md5: &str, exp: u64) -> Result<String, UrlSigError> {
        check_md5(md5)?;
        let sig = self.key.sign(&message(md5, exp));
        Ok(format!(
            "exp={exp}&sig={}",
            BASE64URL_NOPAD.encode(sig.as_ref())
        ))
    }
}

/// Checks a URL's `exp` and `sig` for content `md5` against the center's public key.
pub fn verify(
    public_key: &[u8],
    md5: &str,
    exp: u64,
    sig: &str,
    now: u64,
) -> Result<(), UrlSigError> {
    check_md5(md5)?;
    if now > exp {
        return Err(UrlSigError::Expired { exp, now });
    }
    if sig.len() > 128 {
        return Err(UrlSigError::Malformed);
    }
    let raw = BASE64URL_NOPAD
        .decode(sig.as_bytes())
        .map_err(|_| UrlSigError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message(md5, exp), &raw)
        .map_err(|_| UrlSigError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    fn parts(q: &str) -> (u64, String) {
        let (e, s) = q.split_once('&').unwrap();
        (
            e.trim_start_matches("exp=").parse().unwrap(),
            s.trim_start_matches("sig=").to_string(),
        )
    }

    #[test]
    fn a_signed_url_verifies_until_it_expires() {
        let s = UrlSigner::from_pkcs8(&UrlSigner::generate().unwrap()).unwrap();
        let (exp, sig) = parts(&s.sign(MD5, 1_000).unwrap());
        assert_eq!(verify(&s.public_key(), MD5, exp, &sig, 999), Ok(()));
        assert_eq!(verify(&s.public_key(), MD5, exp, &sig, 1_000), Ok(()));
        assert_eq!(
            verify(&s.public_key(), MD5, exp, &sig, 1_001),
            Err(UrlSigError::Expired {
                exp: 1_000,
                now: 1_001
            })
        );
    }

    #[test]
    fn tampering_is_refused() {
        let s = UrlSigner::from_pkcs8(&UrlSigner::generate().unwrap()).unwrap();
        let (exp, sig) = parts(&s.sign(MD5, 1_000).unwrap());
        let pk = s.public_key();
        // Another content, a later expiry, another key, a damaged signature.
        let other = "ffffffffffffffffffffffffffffffff";
        assert_eq!(
            verify(&pk, other, exp, &sig, 0),
            Err(UrlSigError::BadSignature)
        );
        assert_eq!(
            verify(&pk, MD5, exp + 1, &sig, 0),
            Err(UrlSigError::BadSignature)
        );
        let s2 = UrlSigner::from_pkcs8(&UrlSigner::generate().unwrap()).unwrap();
        assert_eq!(
            verify(&s2.public_key(), MD5, exp, &sig, 0),
            Err(UrlSigError::BadSignature)
        );
        let mut bad = sig.clone();
        bad.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
        assert_eq!(
            verify(&pk, MD5, exp, &bad, 0),
            Err(UrlSigError::BadSignature)
        );
        assert_eq!(verify(&pk, MD5, exp, "!!", 0), Err(UrlSigError::Malformed));
        assert_eq!(
            verify(&pk, MD5, exp, &"A".repeat(500), 0),
            Err(UrlSigError::Malformed)
        );
        assert!(matches!(
            verify(&pk, "../etc/passwd", exp, &sig, 0),
            Err(UrlSigError::BadMd5(_))
        ));
        assert!(s.sign("ABC", 1).is_err());
    }
}
