//! Fuzz the certificate parsing that runs on peers that have not enrolled yet: the
//! center reads the P-256 key and the common name of an enrolling client's
//! certificate, and every `Trust::Ca` check reads the common name. Any input must
//! give a key, a name or nothing, never a panic; a key found is a 65-byte
//! uncompressed point, and `verify_issued` against a fresh CA refuses the input
//! (it was not issued by that CA) without panicking.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use octopus_transfer::tls::{self, CertAuthority};

fn ca() -> &'static CertAuthority {
    static CA: OnceLock<CertAuthority> = OnceLock::new();
    CA.get_or_init(|| CertAuthority::generate().expect("a CA"))
}

fuzz_target!(|data: &[u8]| {
    if let Some(point) = tls::p256_point_in_cert(data) {
        assert_eq!(point.len(), 65);
        assert_eq!(point[0], 0x04);
    }
    let _ = tls::common_name(data);
    assert!(tls::verify_issued(data, &ca().cert, true).is_err());
});
