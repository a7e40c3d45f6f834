//! Fuzz the control-plane messages agents, enrolling clients and the center send.
//! The body, and what it checks, is `octopus_fuzz_bodies::control_decode`; the seed corpus in
//! `fuzz/seeds/control_decode/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::control_decode(data);
});
