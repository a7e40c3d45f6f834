//! Fuzz the ZooKeeper queue's node-name parser and body-header decoder.
//! The body, and what it checks, is `octopus_fuzz_bodies::zk_queue`; the seed corpus in
//! `fuzz/seeds/zk_queue/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::zk_queue(data);
});
