//! Fuzz `Manifest::decode` on network bytes: round-trip, path safety, getters.
//! The body, and what it checks, is `octopus_fuzz_bodies::manifest_decode`; the seed corpus in
//! `fuzz/seeds/manifest_decode/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::manifest_decode(data);
});
