//! Fuzz the decoding of store records read back (redb and ZooKeeper).
//! The body, and what it checks, is `octopus_fuzz_bodies::store_records`; the seed corpus in
//! `fuzz/seeds/store_records/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::store_records(data);
});
