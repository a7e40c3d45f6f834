//! Fuzz the wire decoders a remote peer feeds directly: frames under both caps and the
//! piece header.
//! The body, and what it checks, is `octopus_fuzz_bodies::frame_decode`; the seed corpus in
//! `fuzz/seeds/frame_decode/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::frame_decode(data);
});
