//! API tokens: minting, parsing, verifying, and the scope and address checks.
//!
//! A token reads `octo_<id>_<secret>`: the id is 8 random bytes and the secret 20,
//! both lowercase unpadded base32 (so the text survives shells, URLs and HTTP headers
//! without quoting, and `octo_` makes a leaked token easy to grep for). The id is
//! public: it names the token in lists and the audit log. Only the SHA-256 of the
//! secret is stored. A plain hash suffices, unlike for passwords: the secret is 160
//! random bits, so there is nothing to brute-force, and verification stays cheap on
//! every request. The comparison is constant-time anyway, so response timing does not
//! leak how much of a guessed hash matched.
//!
//! [`check`] separates the two HTTP outcomes: who you are (401: malformed, unknown,
//! bad secret, revoked, expired, used up) and what you may do (403: scope too weak, or
//! calling from an address outside the token's allow-list). Revoked and expired are
//! only reported after the secret matched, so they reveal nothing to a guesser.
//!
//! Allow-lists are CIDRs ([`Cidr`]); an empty list allows any address. IPv4-mapped
//! IPv6 addresses (`::ffff:10.1.2.3`, which a dual-stack listener reports) are matched
//! as the IPv4 address they carry, so `10.0.0.0/8` keeps working behind such sockets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use data_encoding::BASE32_NOPAD;

use crate::store::{Scope, TokenRecord};

/// The prefix of every token's text.
pub const TOKEN_PREFIX: &str = "octo_";
const ID_BYTES: usize = 8;
/// Bytes of secret in a token.
pub const SECRET_BYTES: usize = 20;
const ID_CHARS: usize = 13; // ceil(8 * 8 / 5)
const SECRET_CHARS: usize = 32; // 20 * 8 / 5

/// Why a request's token was refused. [`AuthError::is_forbidden`] tells 403 from 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("no token has the id {0}")]
    UnknownToken(String),
    #[error("the secret of token {0} is wrong")]
    BadSecret(String),
    #[error("token {0} has been revoked")]
    Revoked(String),
    #[error("token {id} expired at {at} (unix ms)")]
    Expired { id: String, at: u64 },
    #[error("one-time token {0} has already been used")]
    AlreadyUsed(String),
    #[error("this request needs the {needed} scope, but token {id} has the {has} scope")]
    ScopeTooWeak {
        id: String,
        needed: Scope,
        has: Scope,
    },
    #[error("token {id} may not be used from {addr}")]
    AddressNotAllowed { id: String, addr: IpAddr },
}

impl AuthError {
    /// True when the caller is authenticated but not allowed (HTTP 403); false when it
    /// is not authenticated at all (HTTP 401).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            AuthError::ScopeTooWeak { .. } | AuthError::AddressNotAllowed { .. }
        )
    }
}

fn encode_lower(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Mints a token. Returns its full text, to show the user exactly once, and the record
/// to store, which holds only the secret's hash. `allow` empty means any address.
pub fn new_token(
    scope: Scope,
    allow: Vec<Cidr>,
    ttl: Option<Duration>,
    one_time: bool,
    note: String,
    now: u64,
) -> (String, TokenRecord) {
    let id_bytes: [u8; ID_BYTES] = rand::random();
    let secret: [u8; SECRET_BYTES] = rand::random();
    let id = encode_lower(&id_bytes);
    let text = format!("{TOKEN_PREFIX}{id}_{}", encode_lower(&secret));
    let expires_at =
        ttl.map(|ttl| now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
    let record = TokenRecord {
        id,
        secret_hash: sha256(&secret),
        scope,
        allow: allow.iter().map(Cidr::to_string).collect(),
        created_at: now,
        expires_at,
        one_time,
        uses: 0,
        revoked: false,
        note,
        limits: Default::default(),
    };
    (text, record)
}

fn check_chars(part: &str, len: usize, what: &'static str) -> Result<(), AuthError> {
    if part.len() != len {
        return Err(AuthError::Malformed(what));
    }
    if !part
        .bytes()
        .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    {
        return Err(AuthError::Malformed(what));
    }
    Ok(())
}

/// A token's text as handed to people: `octo_<id>_<secret>.<CA fingerprint hex>`.
/// The fingerprint lets the CLI pin the center's HTTPS certificate (and an agent its
/// CA at enrollment) from the token alone; it is public, and only the part before the
/// `.` is the credential.
pub fn with_ca_fingerprint(text: &str, fp_hex: &str) -> String {
    format!("{text}.{fp_hex}")
}

/// Splits a token's text into its id and its secret bytes. A `.<CA fingerprint>`
/// suffix (64 hex digits, as `token create` prints and `admin.token` holds) is
/// ignored, and the old form without it is accepted.
pub fn parse_token(text: &str) -> Result<(String, [u8; SECRET_BYTES]), AuthError> {
    let text = match text.split_once('.') {
        Some((t, fp)) if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) => t,
        Some(_) => {
            return Err(AuthError::Malformed(
                "what follows the '.' is not a CA fingerprint (64 hex digits)",
            ))
        }
        None => text,
    };
    let rest = text
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(AuthError::Malformed("it does not start with octo_"))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or(AuthError::Malformed("it has no _ between id and secret"))?;
    check_chars(id, ID_CHARS, "the id is not 13 lowercase base32 characters")?;
    check_chars(
        secret,
        SECRET_CHARS,
        "the secret is not 32 lowercase base32 characters",
    )?;
    // Decoding also rejects non-canonical trailing bits in the id.
    BASE32_NOPAD
        .decode(id.to_ascii_uppercase().as_bytes())
        .map_err(|_| AuthError::Malformed("the id is not valid base32"))?;
    let bytes = BASE32_NOPAD
        .decode(secret.to_ascii_uppercase().as_bytes())
        .map_err(|_| AuthError::Malformed("the secret is not valid base32"))?;
    let secret: [u8; SECRET_BYTES] = bytes
        .try_into()
        .map_err(|_| AuthError::Malformed("the secret has the wrong length"))?;
    Ok((id.to_string(), secret))
}

/// Whether `secret` hashes to the record's hash, compared in constant time.
pub fn verify(record: &TokenRecord, secret: &[u8]) -> bool {
    let hash = sha256(secret);
    let diff = hash
        .iter()
        .zip(record.secret_hash.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Checks a request: the secret, then revocation, expiry and one-time use (401), then
/// the scope and the caller's address (403). `now` is unix milliseconds; a token is
/// expired from `expires_at` on. Allow-list entries that do not parse match nothing,
/// so a damaged record fails closed.
pub fn check(
    record: &TokenRecord,
    secret: &[u8],
    needed: Scope,
    from: IpAddr,
    now: u64,
) -> Result<(), AuthError> {
    let id = || record.id.clone();
    if !verify(record, secret) {
        return Err(AuthError::BadSecret(id()));
    }
    if record.revoked {
        return Err(AuthError::Revoked(id()));
    }
    if let Some(at) = record.expires_at.filter(|&at| at <= now) {
        return Err(AuthError::Expired { id: id(), at });
    }
    if record.one_time && record.uses > 0 {
        return Err(AuthError::AlreadyUsed(id()));
    }
    if !record.scope.allows(needed) {
        return Err(AuthError::ScopeTooWeak {
            id: id(),
            needed,
            has: record.scope,
        });
    }
    if !record.allow.is_empty()
        && !record
            .allow
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .any(|c| c.contains(from))
    {
        return Err(AuthError::AddressNotAllowed {
            id: id(),
            addr: from.to_canonical(),
        });
    }
    Ok(())
}

/// An IPv4 or IPv6 network: an address and a prefix length. Host bits are cleared, so
/// `10.1.2.3/8` is `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?} is not an IP address")]
    BadAddress { text: String },
    #[error("{text:?} does not end in a prefix length: expected /0 to /32 for IPv4 or /0 to /128 for IPv6")]
    BadPrefix { text: String },
    #[error("{text:?} has the prefix length /{prefix}, but an {family} prefix is at most /{max}")]
    PrefixTooLong {
        text: String,
        prefix: u32,
        family: &'static str,
        max: u8,
    },
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// The network `addr/prefix`. An IPv4-mapped IPv6 network with a prefix of at
    /// least 96 becomes the IPv4 network it denotes.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let too_long = |family, max| CidrError::PrefixTooLong {
            text: format!("{addr}/{prefix}"),
            prefix: u32::from(prefix),
            family,
            max,
        };
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if (96..=128).contains(&prefix) => (IpAddr::V4(v4), prefix - 96),
                _ => (IpAddr::V6(v6), prefix),
            },
            v4 => (v4, prefix),
        };
        match addr {
            IpAddr::V4(a) => {
                if prefix > 32 {
                    return Err(too_long("IPv4", 32));
                }
                let net = Ipv4Addr::from(u32::from(a) & v4_mask(prefix));
                Ok(Cidr {
                    addr: IpAddr::V4(net),
                    prefix,
                })
            }
            IpAddr::V6(a) => {
                if prefix > 128 {
                    return Err(too_long("IPv6", 128));
                }
                let net = Ipv6Addr::from(u128::from(a) & v6_mask(prefix));
                Ok(Cidr {
                    addr: IpAddr::V6(net),
                    prefix,
                })
            }
        }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = v4_mask(self.prefix);
                u32::from(a) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = v6_mask(self.prefix);
                u128::from(a) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a single host: /32 or /128).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| CidrError::BadAddress {
            text: text.to_string(),
        })?;
        let prefix = match prefix_text {
            None => match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
            Some(p) => {
                let bad = || CidrError::BadPrefix {
                    text: text.to_string(),
                };
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let n: u32 = p.parse().map_err(|_| bad())?;
                let (family, max) = match addr {
                    IpAddr::V4(_) => ("IPv4", 32),
                    IpAddr::V6(_) => ("IPv6", 128),
                };
                if n > u32::from(max) {
                    return Err(CidrError::PrefixTooLong {
                        text: text.to_string(),
                        prefix: n,
                        family,
                        max,
                    });
                }
                n as u8
            }
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn mint(scope: Scope, allow: &[&str]) -> (String, TokenRecord) {
        new_token(
            scope,
            allow.iter().map(|c| cidr(c)).collect(),
            Some(Duration::from_secs(60)),
            false,
            "test".into(),
            1_000,
        )
    }

    #[test]
    fn token_text_shape_and_roundtrip() {
        let (text, record) = mint(Scope::Operator, &[]);
        assert!(text.starts_with("octo_"), "{text}");
        assert_eq!(text.len(), 5 + 13 + 1 + 32);
        assert!(text[5..]
            .bytes()
            .all(|b| b == b'_' || b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
        let (id, secret) = parse_token(&text).unwrap();
        assert_eq!(id, record.id);
        assert!(verify(&record, &secret));
        assert_eq!(record.expires_at, Some(61_000));
        assert_eq!(record.created_at, 1_000);
        assert_eq!(record.uses, 0);
        assert!(!record.revoked);
        // The secret itself is not in the record.
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains(&text[19..]), "{json}");
        // Two mints differ.
        let (text2, record2) = mint(Scope::Operator, &[]);
        assert_ne!(text, text2);
        assert_ne!(record.id, record2.id);
        assert_ne!(record.secret_hash, record2.secret_hash);
    }

    #[test]
    fn verify_rejects_other_secrets() {
        let (text, record) = mint(Scope::Read, &[]);
        let (_, mut secret) = parse_token(&text).unwrap();
        secret[19] ^= 1;
        assert!(!verify(&record, &secret));
        assert!(!verify(&record, b""));
        let (other, _) = mint(Scope::Read, &[]);
        let (_, other_secret) = parse_token(&other).unwrap();
        assert!(!verify(&record, &other_secret));
    }

    #[test]
    fn a_token_with_the_ca_fingerprint_parses_as_the_bare_one() {
        let (text, _) = new_token(Scope::Read, Vec::new(), None, false, String::new(), 0);
        let full = with_ca_fingerprint(&text, &"ab".repeat(32));
        assert_eq!(parse_token(&full).unwrap(), parse_token(&text).unwrap());
    }

    #[test]
    fn parse_token_rejects_malformed() {
        let (text, _) = mint(Scope::Read, &[]);
        let bad = [
            String::new(),
            "octo_".into(),
            text.replacen("octo_", "octa_", 1),
            text.replacen('_', "-", 2),
            text.to_uppercase(),
            format!("{text}a"),
            text[..text.len() - 1].to_string(),
            text.replacen("octo_", "octo_a", 1),
            format!("{}1", &text[..text.len() - 1]), // '1' is not base32
            format!("{text}_x"),
        ];
        for b in bad {
            let err = parse_token(&b).unwrap_err();
            assert!(matches!(err, AuthError::Malformed(_)), "{b}: {err}");
            assert!(!err.is_forbidden());
        }
        assert_eq!(
            parse_token("Bearer x").unwrap_err().to_string(),
            "the token is malformed: it does not start with octo_"
        );
        // Non-canonical trailing bits in the 13-character id (8 bytes use 64 of 65
        // bits) are refused.
        let (id, _) = text[5..].split_once('_').unwrap();
        let mut noncanon = id.to_string();
        let last = noncanon.pop().unwrap();
        let alphabet = "abcdefghijklmnopqrstuvwxyz234567";
        let idx = alphabet.find(last).unwrap();
        noncanon.push(alphabet.as_bytes()[idx ^ 1] as char);
        let tampered = text.replacen(id, &noncanon, 1);
        assert!(matches!(
            parse_token(&tampered),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn check_passes_and_scopes() {
        let (text, record) = mint(Scope::Operator, &["10.0.0.0/8", "::1"]);
        let (_, secret) = parse_token(&text).unwrap();
        check(&record, &secret, Scope::Operator, ip("10.2.3.4"), 2_000).unwrap();
        check(&record, &secret, Scope::Read, ip("::1"), 2_000).unwrap();
        let err = check(&record, &secret, Scope::Admin, ip("10.2.3.4"), 2_000).unwrap_err();
        assert!(err.is_forbidden());
        assert_eq!(
            err.to_string(),
            format!(
                "this request needs the admin scope, but token {} has the operator scope",
                record.id
            )
        );
        let err = check(&record, &secret, Scope::Enroll, ip("10.2.3.4"), 2_000).unwrap_err();
        assert!(matches!(
            err,
            AuthError::ScopeTooWeak {
                needed: Scope::Enroll,
                has: Scope::Operator,
                ..
            }
        ));
    }

    #[test]
    fn check_unauthorized_reasons() {
        let (text, mut record) = mint(Scope::Admin, &[]);
        let (_, secret) = parse_token(&text).unwrap();
        let from = ip("192.0.2.1");
        let err = check(&record, &[0; 20], Scope::Read, from, 2_000).unwrap_err();
        assert!(matches!(err, AuthError::BadSecret(_)) && !err.is_forbidden());

        let err = check(&record, &secret, Scope::Read, from, 61_000).unwrap_err();
        assert_eq!(
            err,
            AuthError::Expired {
                id: record.id.clone(),
                at: 61_000
            }
        );
        assert!(!err.is_forbidden());
        check(&record, &secret, Scope::Read, from, 60_999).unwrap();

        record.revoked = true;
        let err = check(&record, &secret, Scope::Read, from, 2_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("token {} has been revoked", record.id)
        );
        assert!(!err.is_forbidden());
        // A wrong secret is reported as such even for a revoked token.
        assert!(matches!(
            check(&record, &[1; 20], Scope::Read, from, 2_000),
            Err(AuthError::BadSecret(_))
        ));

        let (text, mut once) = new_token(Scope::Enroll, vec![], None, true, String::new(), 0);
        let (_, secret) = parse_token(&text).unwrap();
        assert_eq!(once.expires_at, None);
        check(&once, &secret, Scope::Enroll, from, u64::MAX).unwrap();
        once.uses = 1;
        let err = check(&once, &secret, Scope::Enroll, from, 5).unwrap_err();
        assert!(matches!(err, AuthError::AlreadyUsed(_)) && !err.is_forbidden());

        assert!(!AuthError::UnknownToken("x".into()).is_forbidden());
        assert_eq!(
            AuthError::UnknownToken("abc".into()).to_string(),
            "no token has the id abc"
        );
    }

    #[test]
    fn check_address_allow_list() {
        let (text, record) = mint(Scope::Read, &["10.0.0.0/8", "2001:db8::/32"]);
        let (_, secret) = parse_token(&text).unwrap();
        let ok = |a: &str| check(&record, &secret, Scope::Read, ip(a), 2_000);
        ok("10.255.0.1").unwrap();
        ok("::ffff:10.1.2.3").unwrap();
        ok("2001:db8:1::5").unwrap();
        let err = ok("11.0.0.1").unwrap_err();
        assert!(err.is_forbidden());
        assert_eq!(
            err.to_string(),
            format!("token {} may not be used from 11.0.0.1", record.id)
        );
        let err = ok("::ffff:11.0.0.1").unwrap_err();
        assert!(err.to_string().ends_with("from 11.0.0.1"), "{err}");
        assert!(ok("2001:db9::1").unwrap_err().is_forbidden());

        // A damaged allow-list entry matches nothing (fails closed).
        let mut damaged = record.clone();
        damaged.allow = vec!["garbage".into()];
        assert!(check(&damaged, &secret, Scope::Read, ip("10.0.0.1"), 2_000)
            .unwrap_err()
            .is_forbidden());
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.0.0.0")));
        assert!(c.contains(ip("10.255.255.255")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("::1")));

        let host = cidr("127.0.0.1");
        assert_eq!(host.prefix(), 32);
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        assert!(host.contains(ip("::ffff:127.0.0.1")));

        let v6 = cidr("::1/128");
        assert!(v6.contains(ip("::1")));
        assert!(!v6.contains(ip("::2")));
        assert!(!v6.contains(ip("127.0.0.1")));
        assert_eq!(cidr("::1").prefix(), 128);

        let net6 = cidr("fd00:1234::/32");
        assert!(net6.contains(ip("fd00:1234:ffff::1")));
        assert!(!net6.contains(ip("fd00:1235::1")));

        let any4 = cidr("0.0.0.0/0");
        assert!(any4.contains(ip("8.8.8.8")));
        assert!(any4.contains(ip("::ffff:8.8.8.8")));
        assert!(!any4.contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));

        // Host bits are cleared; mapped IPv6 networks become IPv4.
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("192.168.1.0/24").to_string(), "192.168.1.0/24");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
        for s in ["10.0.0.0/8", "::1/128", "fd00::/8", "1.2.3.4/32"] {
            assert_eq!(cidr(&cidr(s).to_string()), cidr(s));
        }
    }

    #[test]
    fn cidr_errors() {
        let err = |s: &str| s.parse::<Cidr>().unwrap_err();
        assert!(matches!(err("10.0.0/8"), CidrError::BadAddress { .. }));
        assert!(matches!(err("host"), CidrError::BadAddress { .. }));
        assert!(matches!(err(""), CidrError::BadAddress { .. }));
        assert!(matches!(err("10.0.0.0/"), CidrError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.0/+8"), CidrError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.0/x"), CidrError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.0/8/8"), CidrError::BadPrefix { .. }));
        assert!(matches!(err("::1/1280"), CidrError::BadPrefix { .. }));
        assert_eq!(
            err("10.0.0.0/33").to_string(),
            "\"10.0.0.0/33\" has the prefix length /33, but an IPv4 prefix is at most /32"
        );
        assert!(matches!(
            err("::/129"),
            CidrError::PrefixTooLong {
                prefix: 129,
                max: 128,
                ..
            }
        ));
        assert!(err("10.0.0.0/x").to_string().contains("/0 to /32"));
    }
}
