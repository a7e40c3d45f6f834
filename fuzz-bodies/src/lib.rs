//! The bodies of the fuzz targets in `fuzz/`, one plain function per target.
//!
//! Why a crate of its own: `fuzz/` is outside the workspace (libfuzzer needs its own
//! build flags), but its targets must also run in the ordinary tests. Each target in
//! `fuzz/fuzz_targets/` is one line calling the function of the same name here, and
//! `tests/replay.rs` feeds every file of `fuzz/seeds/<target>/` to the same function,
//! so a seed corpus (and every crash found so far) is replayed by `cargo test`.
//!
//! Each function panics when an input breaks a property (that is what the fuzzer
//! detects) and otherwise returns whether the decoder under test accepted the input.
//! The replay test uses that answer to check that seeds named `ok_*` are accepted and
//! seeds named `bad_*` are refused, so a seed corpus cannot silently rot.

mod cert;
mod decoders;
mod manifest;
mod records;
mod text;

pub use cert::cert_parse;
pub use decoders::{control_decode, frame_decode, ticket_decode};
pub use manifest::{check_path_safety, manifest_decode};
pub use records::{store_records, zk_queue};
pub use text::{batch_parse, check_dest, enroll_token, parse_rate, pool_range, target_parse};

/// A fuzz target's body: panics on a broken property, else says whether the input
/// was accepted.
pub type Body = fn(&[u8]) -> bool;

/// Every target, by its `[[bin]]` name in `fuzz/Cargo.toml`.
pub const TARGETS: &[(&str, Body)] = &[
    ("frame_decode", frame_decode),
    ("manifest_decode", manifest_decode),
    ("ticket_decode", ticket_decode),
    ("control_decode", control_decode),
    ("target_parse", target_parse),
    ("pool_range", pool_range),
    ("batch_parse", batch_parse),
    ("check_dest", check_dest),
    ("parse_rate", parse_rate),
    ("enroll_token", enroll_token),
    ("zk_queue", zk_queue),
    ("store_records", store_records),
    ("cert_parse", cert_parse),
];

/// The longest UTF-8 prefix of `data`, as libfuzzer's `&str` input takes it.
pub fn utf8_prefix(data: &[u8]) -> &str {
    match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&data[..e.valid_up_to()]).unwrap_or_default(),
    }
}
