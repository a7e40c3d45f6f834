//! Fuzz the certificate parsing that runs on peers that have not enrolled yet. The
//! body, and what it checks, is `octopus_fuzz_bodies::cert_parse`; the seed corpus in
//! `fuzz/seeds/cert_parse/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::cert_parse(data);
});
