//! Fuzz `Manifest::decode`, which runs on bytes from the network (checked only against
//! the content id, which an attacker who made the ticket controls). A manifest that
//! decodes must round-trip through encode/decode unchanged, and everything a getter
//! computes from it next (`pieces`, sizes, roots) must not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_transfer::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    let enc = m.encode();
    let back = Manifest::decode(&enc).expect("a decoded manifest re-decodes");
    assert_eq!(back, m);
    assert_eq!(back.encode(), enc);
    let pieces = m.pieces();
    let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
    assert_eq!(total, m.total_size());
    let _ = m.roots();
    let _ = m.max_piece_len();
    let _ = m.content_id();
});
