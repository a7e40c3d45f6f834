//! Fuzz the agent's check of a fetch destination, before it writes as root.
//! The body, and what it checks, is `octopus_fuzz_bodies::check_dest`; the seed corpus in
//! `fuzz/seeds/check_dest/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::check_dest(data);
});
