//! The wire decoders a remote peer feeds directly: frames, tickets and the
//! control-plane messages.

use octopus_agent::proto::{self, AgentMsg, CenterMsg, EnrollRequest, EnrollResponse, MAX_MSG};
use octopus_transfer::frame::{self, PieceHeader, MAX_FRAME, MAX_MANIFEST_FRAME};
use octopus_transfer::ticket::Ticket;

/// `frame::decode` under both caps a node uses (control frames and the manifest
/// frame), and the fixed `PieceHeader`. A decoded frame must survive re-encoding; a
/// piece header round-trips byte for byte. Accepted: a whole frame or a piece header.
pub fn frame_decode(data: &[u8]) -> bool {
    let mut accepted = false;
    for cap in [MAX_FRAME, MAX_MANIFEST_FRAME] {
        if let Ok(Some((f, used))) = frame::decode(data, cap) {
            accepted = true;
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
        accepted = true;
        assert_eq!(&h.encode()[..], data);
    }
    accepted
}

/// `Ticket::decode` on the UTF-8 prefix of the input: a ticket is pasted by users and
/// may come from anywhere. A decoded ticket must round-trip through encode.
pub fn ticket_decode(data: &[u8]) -> bool {
    let s = crate::utf8_prefix(data);
    let Ok(t) = Ticket::decode(s) else {
        return false;
    };
    let again = t.encode();
    assert_eq!(
        Ticket::decode(&again).expect("re-encoded ticket decodes"),
        t
    );
    true
}

/// The control-plane decoders: the center decodes `AgentMsg` and `EnrollRequest`
/// from agents (and from anyone who completes a TLS handshake, for enrollment); an
/// agent decodes `CenterMsg`. A decoded message never claims more bytes than it was
/// given; an enroll request round-trips. Accepted: any message decoded whole.
pub fn control_decode(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(Some((_, used))) = proto::decode::<AgentMsg>(data, MAX_MSG) {
        accepted = true;
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = proto::decode::<CenterMsg>(data, MAX_MSG) {
        accepted = true;
        assert!(used <= data.len());
    }
    if let Ok(Some((r, _))) = proto::decode::<EnrollRequest>(data, MAX_MSG) {
        accepted = true;
        let again = proto::encode(&r);
        let (back, _) = proto::decode::<EnrollRequest>(&again, MAX_MSG)
            .unwrap()
            .unwrap();
        assert_eq!(back, r);
    }
    if let Ok(Some(_)) = proto::decode::<EnrollResponse>(data, MAX_MSG) {
        accepted = true;
    }
    let _ = proto::decode_body::<AgentMsg>(data);
    accepted
}
