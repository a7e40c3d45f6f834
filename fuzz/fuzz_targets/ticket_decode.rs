//! Fuzz `Ticket::decode`: a ticket is pasted by users and may come from anywhere.
//! The body, and what it checks, is `octopus_fuzz_bodies::ticket_decode`; the seed corpus in
//! `fuzz/seeds/ticket_decode/` is replayed through it by `cargo test -p octopus-fuzz-bodies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    octopus_fuzz_bodies::ticket_decode(data);
});
