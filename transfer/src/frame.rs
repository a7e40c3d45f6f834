//! The wire format between two nodes.
//!
//! One QUIC connection per pair of nodes, under the ALPN [`ALPN`]. The dialer opens one
//! bidirectional *control stream* per content and sends [`Frame::Hello`] first. Control
//! frames are a 4-byte big-endian length followed by a postcard-encoded [`Frame`]. The
//! length is checked against a hard cap *before* anything is allocated, so a peer
//! cannot make us reserve memory on its word.
//!
//! Piece payloads never go through postcard: each piece travels on its own
//! unidirectional stream as a fixed [`PieceHeader`] followed by the raw bytes, so the
//! receiver can hash and write them straight from QUIC's buffers, and a cancelled piece
//! is just a reset stream.

use std::net::SocketAddr;

use octopus_swarm::PeerMsg;
use serde::{Deserialize, Serialize};

use crate::manifest::ContentId;

/// Versioned ALPN: a node speaking another version fails the TLS handshake cleanly.
pub const ALPN: &[u8] = b"octo-xfer/1";
/// Cap on an ordinary control frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Cap on the frame carrying a manifest (a tree of a million files still fits).
pub const MAX_MANIFEST_FRAME: usize = 64 << 20;
/// Most peers a tracker hands back in one answer.
pub const MAX_PEERS_PER_ANSWER: usize = 50;
/// Most locality tags in one announce, and the longest tag.
pub const MAX_TAGS: usize = 8;
pub const MAX_TAG_LEN: usize = 128;

/// QUIC application error codes used when closing a connection or stream.
pub mod code {
    pub const NORMAL: u32 = 0;
    pub const UNKNOWN_CONTENT: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const BANNED: u32 = 3;
    pub const DUPLICATE: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
    pub const CANCELLED: u32 = 6;
    pub const REFUSED: u32 = 7;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub addr: SocketAddr,
    /// SHA-256 of the peer's certificate: dialing it pins this fingerprint.
    pub fingerprint: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame on a control stream: which content this stream is about, and
    /// whether the dialer still needs its manifest.
    Hello {
        content: ContentId,
        want_manifest: bool,
    },
    /// Answer to `Hello`: the acceptor holds this content (complete or partly). Followed
    /// by [`Frame::Manifest`] if it was asked for, before any swarm message.
    Welcome,
    /// The encoded manifest; the receiver checks its MD5 against the content id.
    Manifest(Vec<u8>),
    /// Tell the tracker we are in the swarm; extra addresses we listen on besides the
    /// one the tracker observes, and our locality tags (`idc=bj1`, `rack=r3`): the
    /// tracker prefers peers that share them.
    Announce {
        addrs: Vec<SocketAddr>,
        tags: Vec<String>,
    },
    /// A bounded random subset of the swarm.
    Peers(Vec<PeerRecord>),
    /// A swarm control message for the sans-IO core.
    Swarm(PeerMsg),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the cap of {cap}")]
    TooLarge { len: usize, cap: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("malformed piece header")]
    BadHeader,
}

/// Encode one frame with its length prefix.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let body = postcard::to_stdvec(frame).expect("frame serialization cannot fail");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the frame and how many bytes it
/// used. Never allocates more than `buf` already holds; a length over `cap` is an error
/// at once, before the body arrives.
pub fn decode(buf: &[u8], cap: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = peek_len(buf, cap)? else {
        return Ok(None);
    };
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let frame = decode_body(&buf[4..4 + len])?;
    Ok(Some((frame, 4 + len)))
}

/// Read and check the length prefix.
pub fn peek_len(buf: &[u8], cap: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    Ok(Some(len))
}

/// Decode a body whose length was already checked. Trailing bytes are an error.
pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    if let Frame::Peers(p) = &frame {
        if p.len() > MAX_PEERS_PER_ANSWER {
            return Err(FrameError::Malformed(format!(
                "{} peers in one answer",
                p.len()
            )));
        }
    }
    if let Frame::Announce { addrs, tags } = &frame {
        if addrs.len() > MAX_PEERS_PER_ANSWER
            || tags.len() > MAX_TAGS
            || tags.iter().any(|t| t.len() > MAX_TAG_LEN)
        {
            return Err(FrameError::Malformed(
                "an announce with too many addresses or tags".into(),
            ));
        }
    }
    Ok(frame)
}

/// The fixed header in front of a piece's raw bytes on a unidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceHeader {
    pub content: ContentId,
    pub piece: u32,
    pub len: u32,
}

impl PieceHeader {
    pub const LEN: usize = 1 + 16 + 4 + 4;
    const TAG: u8 = 0x50;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = Self::TAG;
        b[1..17].copy_from_slice(&self.content.0);
        b[17..21].copy_from_slice(&self.piece.to_be_bytes());
        b[21..25].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<PieceHeader, FrameError> {
        if b.len() != Self::LEN || b[0] != Self::TAG {
            return Err(FrameError::BadHeader);
        }
        let mut content = [0u8; 16];
        content.copy_from_slice(&b[1..17]);
        Ok(PieceHeader {
            content: ContentId(content),
            piece: u32::from_be_bytes(b[17..21].try_into().expect("4 bytes")),
            len: u32::from_be_bytes(b[21..25].try_into().expect("4 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use octopus_swarm::Bitfield;

    #[test]
    fn roundtrip_and_partial_input() {
        let frames = [
            Frame::Hello {
                content: ContentId([7; 16]),
                want_manifest: true,
            },
            Frame::Welcome,
            Frame::Manifest(vec![1, 2, 3]),
            Frame::Announce {
                addrs: vec!["10.0.0.1:4000".parse().unwrap()],
                tags: vec!["idc=bj1".into()],
            },
            Frame::Peers(vec![PeerRecord {
                addr: "[::1]:9".parse().unwrap(),
                fingerprint: [3; 32],
            }]),
            Frame::Swarm(PeerMsg::Bitfield(Bitfield::full(13))),
            Frame::Swarm(PeerMsg::Request(9)),
        ];
        for f in frames {
            let bytes = encode(&f);
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut], MAX_FRAME), Ok(None));
            }
            let (back, used) = decode(&bytes, MAX_FRAME).unwrap().unwrap();
            assert_eq!(back, f);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn forged_length_is_rejected_before_the_body_arrives() {
        let buf = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            decode(&buf, MAX_FRAME),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                cap: MAX_FRAME
            })
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        assert!(matches!(
            decode(&[0, 0, 0, 2, 0xee, 0xee], MAX_FRAME),
            Err(FrameError::Malformed(_))
        ));
        let mut b = encode(&Frame::Welcome);
        b.push(0);
        b[3] += 1;
        assert!(matches!(
            decode(&b, MAX_FRAME),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn piece_header_roundtrip() {
        let h = PieceHeader {
            content: ContentId([1; 16]),
            piece: 77,
            len: 1 << 20,
        };
        assert_eq!(PieceHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 0;
        assert_eq!(PieceHeader::decode(&bad), Err(FrameError::BadHeader));
    }
}
