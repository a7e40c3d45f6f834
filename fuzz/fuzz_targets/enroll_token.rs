//! Fuzz the enroll-token parsers: the agent's split of token and CA fingerprint, and
//! the center's token parser.
//! The body, and what it checks, is `octopus_fuzz_bodies::enroll_token`; the seed corpus in
//! `fuzz/seeds/enroll_token/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::enroll_token(data);
});
