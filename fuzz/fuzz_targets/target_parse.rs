//! Fuzz the text parsers fed straight by API and HTTP-pool callers: targets, tokens,
//! CIDRs, the signed-URL check, upload paths (`cp --async`) and ZooKeeper URLs. Any
//! text must parse or give an error; a parsed target must print to text that parses
//! back to the same target; an accepted upload path stays relative and normal.

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
    if let Ok(p) = octopus_center::content::check_rel_path(s) {
        assert!(p.is_relative());
        assert!(p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_))));
    }
    let _ = octopus_center::zk::ZkUrl::parse(s);
});
