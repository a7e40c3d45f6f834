//! Tickets: one copy-pasteable string that is all a peer needs to fetch a content.
//!
//! A ticket holds the content id (MD5 of the manifest, so it pins every byte), the
//! sharer's addresses and the sharer's certificate fingerprint (so the first
//! connection is authenticated before any byte is trusted). Encoding: the prefix
//! `octo1` then lower-case unpadded base32 of the postcard encoding.

use std::net::SocketAddr;

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::manifest::ContentId;
use crate::tls::Fingerprint;

pub const PREFIX: &str = "octo1";
const MAX_TICKET_LEN: usize = 4096;
const MAX_ADDRS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub content: ContentId,
    pub addrs: Vec<SocketAddr>,
    pub fingerprint: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("a ticket starts with `{PREFIX}`")]
    Prefix,
    #[error("ticket is too long")]
    TooLong,
    #[error("ticket is not valid base32")]
    Base32,
    #[error("ticket is corrupt: {0}")]
    Decode(String),
    #[error("ticket lists no address, or more than {MAX_ADDRS}")]
    Addrs,
}

impl Ticket {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(self.fingerprint)
    }

    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("ticket serialization cannot fail");
        format!(
            "{PREFIX}{}",
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        )
    }

    pub fn decode(s: &str) -> Result<Ticket, TicketError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let bytes = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketError::Base32)?;
        let (t, rest): (Ticket, _) =
            postcard::take_from_bytes(&bytes).map_err(|e| TicketError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TicketError::Decode("trailing bytes".into()));
        }
        if t.addrs.is_empty() || t.addrs.len() > MAX_ADDRS {
            return Err(TicketError::Addrs);
        }
        Ok(t)
    }
}

impl std::str::FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ticket::decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let t = Ticket {
            content: ContentId([9; 16]),
            addrs: vec![
                "127.0.0.1:7000".parse().unwrap(),
                "[::1]:7000".parse().unwrap(),
            ],
            fingerprint: [4; 32],
        };
        let s = t.encode();
        assert!(s.starts_with("octo1"));
        assert_eq!(Ticket::decode(&s).unwrap(), t);
        assert_eq!(Ticket::decode(&format!(" {s}\n")).unwrap(), t);
        assert_eq!(Ticket::decode("xyz"), Err(TicketError::Prefix));
        assert_eq!(Ticket::decode("octo1!!"), Err(TicketError::Base32));
        assert!(matches!(
            Ticket::decode(&s[..s.len() - 8]),
            Err(TicketError::Decode(_))
        ));
    }
}
