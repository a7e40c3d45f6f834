//! Fuzz the text parsers of API input: targets, tokens, CIDRs, signed URLs, upload
//! paths, ZooKeeper URLs.
//! The body, and what it checks, is `octopus_fuzz_bodies::target_parse`; the seed corpus in
//! `fuzz/seeds/target_parse/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::target_parse(data);
});
