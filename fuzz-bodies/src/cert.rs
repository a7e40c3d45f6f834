//! The certificate parsing that runs on peers that have not enrolled yet: the center
//! reads the P-256 key and the common name of an enrolling client's certificate, and
//! every `Trust::Ca` check reads the common name.

use std::sync::OnceLock;

use octopus_transfer::tls::{self, CertAuthority};

fn ca() -> &'static CertAuthority {
    static CA: OnceLock<CertAuthority> = OnceLock::new();
    CA.get_or_init(|| CertAuthority::generate().expect("a CA"))
}

/// Any input gives a key, a name or nothing, never a panic; a key found is a 65-byte
/// uncompressed point; `verify_issued` against a fresh CA refuses the input (that CA
/// issued nothing). Accepted: a P-256 key was found.
pub fn cert_parse(data: &[u8]) -> bool {
    let point = tls::p256_point_in_cert(data);
    if let Some(p) = &point {
        assert_eq!(p.len(), 65, "a P-256 point is 65 bytes uncompressed");
        assert_eq!(p[0], 0x04, "an uncompressed point starts with 4");
    }
    let _ = tls::common_name(data);
    assert!(
        tls::verify_issued(data, &ca().cert, true).is_err(),
        "a fresh CA verified a certificate it never issued"
    );
    point.is_some()
}
