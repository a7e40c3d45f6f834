//! Fuzz the task rollout batch parser (`"batch"` of a task request).
//! The body, and what it checks, is `octopus_fuzz_bodies::batch_parse`; the seed corpus in
//! `fuzz/seeds/batch_parse/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::batch_parse(data);
});
