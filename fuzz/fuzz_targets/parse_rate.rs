//! Fuzz the rate parser of `--limit-up`/`--limit-down` and the agent-wide limits.
//! The body, and what it checks, is `octopus_fuzz_bodies::parse_rate`; the seed corpus in
//! `fuzz/seeds/parse_rate/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::parse_rate(data);
});
