//! Fuzz the control-plane decoders a remote side feeds directly: the center decodes
//! `AgentMsg` and `EnrollRequest` from agents (and from anyone who completes a TLS
//! handshake, for enrollment); an agent decodes `CenterMsg`. Any input must decode,
//! ask for more bytes, or fail, without a panic or an allocation the input does not
//! back; a forged length over the cap fails before the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use octopus_agent::proto::{self, AgentMsg, CenterMsg, EnrollRequest, EnrollResponse, MAX_MSG};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = proto::decode::<AgentMsg>(data, MAX_MSG) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = proto::decode::<CenterMsg>(data, MAX_MSG) {
        assert!(used <= data.len());
    }
    if let Ok(Some((r, _))) = proto::decode::<EnrollRequest>(data, MAX_MSG) {
        let again = proto::encode(&r);
        let (back, _) = proto::decode::<EnrollRequest>(&again, MAX_MSG).unwrap().unwrap();
        assert_eq!(back, r);
    }
    let _ = proto::decode::<EnrollResponse>(data, MAX_MSG);
    let _ = proto::decode_body::<AgentMsg>(data);
});
