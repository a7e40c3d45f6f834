//! Fuzz `Ticket::decode` on arbitrary UTF-8: a ticket is pasted by users and may come
//! from anywhere. A ticket that decodes must round-trip through encode.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_transfer::ticket::Ticket;

fuzz_target!(|s: &str| {
    if let Ok(t) = Ticket::decode(s) {
        let again = t.encode();
        assert_eq!(Ticket::decode(&again).expect("re-encoded ticket decodes"), t);
    }
});
