//! Fuzz the target parser, the token parser and the signed-URL check: all take text
//! straight from API or HTTP-pool callers. Any text must parse or give an error; a parsed target must print to text
//! that parses back to the same target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_center::target::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Target::parse(s) {
        let again = Target::parse(&t.to_string()).expect("printed target parses");
        assert_eq!(again.to_string(), t.to_string());
    }
    let _ = octopus_center::auth::parse_token(s);
    let _ = s.parse::<octopus_center::auth::Cidr>();
    // Any md5 / signature text against a fixed public key: an error, never a panic.
    let mut k = s.len().min(32);
    while !s.is_char_boundary(k) {
        k -= 1;
    }
    let (md5, sig) = s.split_at(k);
    let pk = [7u8; 32];
    assert!(octopus_agent::urlsig::verify(&pk, md5, u64::MAX, sig, 0).is_err());
});
