//! Fuzz the target parser and the token parser: both take text straight from API
//! callers. Any text must parse or give an error; a parsed target must print to text
//! that parses back to the same target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_center::target::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Target::parse(s) {
        let again = Target::parse(&t.to_string()).expect("printed target parses");
        assert_eq!(again.to_string(), t.to_string());
    }
    let _ = octopus_center::auth::parse_token(s);
    let _ = s.parse::<octopus_center::auth::Cidr>();
});
