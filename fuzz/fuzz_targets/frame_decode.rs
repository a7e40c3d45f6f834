//! Fuzz the wire decoders a remote peer feeds directly: `frame::decode` under both
//! caps a node uses (control frames and the manifest frame), and the fixed
//! `PieceHeader`. Any input must give a frame, "need more bytes" or an error, never a
//! panic or an allocation beyond what the input holds; a decoded frame must survive
//! re-encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_transfer::frame::{self, PieceHeader, MAX_FRAME, MAX_MANIFEST_FRAME};

fuzz_target!(|data: &[u8]| {
    for cap in [MAX_FRAME, MAX_MANIFEST_FRAME] {
        if let Ok(Some((f, used))) = frame::decode(data, cap) {
            assert!(used <= data.len());
            let again = frame::encode(&f);
            let (back, n) = frame::decode(&again, cap)
                .expect("re-encoded frame decodes")
                .expect("re-encoded frame is complete");
            assert_eq!(back, f);
            assert_eq!(n, again.len());
        }
    }
    if let Ok(h) = PieceHeader::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
});
