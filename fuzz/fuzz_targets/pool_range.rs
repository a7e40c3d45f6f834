//! Fuzz the agent pool's `Range` header parser (any HTTP client reaches it).
//! The body, and what it checks, is `octopus_fuzz_bodies::pool_range`; the seed corpus in
//! `fuzz/seeds/pool_range/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::pool_range(data);
});
