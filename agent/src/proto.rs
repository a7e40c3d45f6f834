//! The control protocol between a center and its agents.
//!
//! It runs on the same QUIC mesh as the transfer engine (quinn, rustls on ring, mutual
//! TLS), under its own versioned ALPN names:
//!
//! - [`ALPN_ENROLL`]: the agent dials with a self-signed certificate and checks that
//!   the center's chain ends in the CA its enrollment token names. It sends one
//!   [`EnrollRequest`] and gets one [`EnrollResponse`] on a bidirectional stream.
//! - [`ALPN_CTL`]: the agent dials with its CA-issued certificate. It opens one
//!   bidirectional *session stream*, sends [`AgentMsg::Hello`], and then both sides
//!   exchange messages until either goes away. The host name is the certificate's
//!   common name, never something the agent claims in a message.
//!
//! Messages are a 4-byte big-endian length and a postcard body, as in the transfer
//! engine; the length is checked against [`MAX_MSG`] before anything is allocated,
//! and trailing bytes are an error.
//!
//! Why push over one long-lived stream: the center must reach an agent behind NAT or
//! a firewall that only allows the agent to dial out, and an ordered stream keeps a
//! host's tasks in the order the center queued them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::exec::{ExecResult, ExecSpec, OutStream};
use crate::hostinfo::Resources;

pub const ALPN_CTL: &[u8] = b"octo-ctl/1";
pub const ALPN_ENROLL: &[u8] = b"octo-enroll/1";
/// Cap on one message: a result carries at most 1 MiB of each output stream, a task
/// at most a script of [`MAX_SCRIPT`].
pub const MAX_MSG: usize = 4 << 20;
/// Largest script body a task may carry.
pub const MAX_SCRIPT: usize = 1 << 20;
/// Largest output chunk in one [`AgentMsg::Output`].
pub const MAX_OUTPUT_CHUNK: usize = 64 << 10;

/// QUIC close codes on control connections.
pub mod code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL: u32 = 2;
    pub const UNAUTHORIZED: u32 = 8;
    pub const REPLACED: u32 = 9;
    pub const SHUTDOWN: u32 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The enrollment token's id and secret (`octo_<id>_<secret>`).
    pub token: String,
    /// The host name to enroll as; it becomes the certificate's common name.
    pub name: String,
    /// The raw P-256 public key of the certificate the agent's handshake presented.
    pub public_key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// The agent's certificate, and the CA's to trust from now on.
    Ok {
        cert: Vec<u8>,
        ca: Vec<u8>,
    },
    Refused(String),
    /// The name is enrolled already and no admin approved a re-enrollment
    /// (`octo agents approve NAME`).
    NameTaken(String),
}

/// What a task asks an agent to do. New variants go at the end: stored tasks are
/// postcard, which numbers variants by position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskBody {
    Exec(ExecSpec),
    Fetch(Box<FetchSpec>),
    /// Seed paths of this host over the transfer engine (`octo cp HOST:/path ...`).
    Seed(SeedSpec),
}

/// Share `paths` of this host for `hold_ms`; the result's stdout is the ticket on the
/// first line and the total size on the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedSpec {
    pub paths: Vec<String>,
    pub hold_ms: u64,
    pub limit_up: Option<u64>,
}

/// Fetch content over the transfer engine into `dest` (`octo cp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSpec {
    /// The transfer ticket (content id, the seeder's addresses and fingerprint).
    pub ticket: String,
    /// Absolute destination, with cp's semantics: an existing directory receives the
    /// content under its own name, otherwise a single root is renamed to `dest`.
    pub dest: String,
    /// Create missing parent directories.
    pub mkdir: bool,
    /// Permission bits to set on every fetched file, instead of the source's.
    pub mode: Option<u32>,
    pub limit_down: Option<u64>,
    pub limit_up: Option<u64>,
    /// Keep serving the content to other agents this long after it is verified.
    pub linger_ms: u64,
    /// `USER[:GROUP]` to own every fetched file (names or numeric ids).
    pub owner: Option<String>,
    /// Fetch one file whole over HTTP from the pool instead of the swarm (small or
    /// hot content the center holds).
    pub pool: Option<PoolFile>,
    /// The content is one the center seeds (an `--async` copy): the center fills
    /// `ticket` in with its current seed's ticket each time it delivers the task, so a
    /// restarted center (new port) still hands out a working one.
    pub seed: Option<String>,
    /// Total bytes of the content, for progress before the manifest arrives.
    pub size: u64,
    /// This host's locality tags (`idc=..`, `rack=..`), filled in by the center at
    /// delivery: the tracker hands the agent peers that share them first.
    pub tags: Vec<String>,
    /// `mode` (or the pool file's) may carry setuid, setgid or sticky bits: the
    /// center allows that only for the admin scope. Without it the agent refuses them.
    #[serde(default)]
    pub allow_special_mode: bool,
}

/// One file the pool serves, by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFile {
    /// Lowercase hex MD5 of the whole file: the content id, checked after download.
    pub md5: String,
    pub size: u64,
    /// The file's name, used when the destination is a directory.
    pub name: String,
    /// Permission bits of the source.
    pub mode: u32,
    /// `exp=..&sig=..`, signed by the center at delivery: the agent asks the center
    /// at `/api/v1/files/{md5}?{query}` and follows its redirect to a pool member.
    pub query: String,
    /// The address of the center that holds the upload (with several centers, maybe
    /// not the one the agent is connected to); an unspecified IP means the IP the
    /// agent reaches its center at.
    pub origin: String,
}

/// How a task ended on a host, as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    /// It ran; see the exit code, signal and timeout flag.
    Ran(ExecResult),
    /// It could not start (unknown user, missing interpreter, bad directory...).
    Error(String),
    /// The agent had already started this task before (a redelivery after a crash
    /// or a lost acknowledgement) and no longer has its result: it is not run twice.
    AlreadyRan,
    /// Cancelled before or while running.
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message of a session.
    Hello {
        version: String,
        /// Addresses of this host, for the inventory.
        addrs: Vec<String>,
        tags: Vec<(String, String)>,
        resources: Resources,
    },
    Heartbeat(Resources),
    /// The task arrived and is accepted (it will run, or has run: see its result).
    Ack {
        task: u64,
    },
    /// Live output.
    Output {
        task: u64,
        stream: OutStream,
        data: Vec<u8>,
    },
    Done {
        task: u64,
        outcome: Outcome,
        started_at: u64,
        finished_at: u64,
    },
    /// Bytes of a fetch in place so far (verified or received), about once a second.
    Progress {
        task: u64,
        bytes: u64,
        total: u64,
    },
    /// What this agent's HTTP pool serves: its TCP port (0: no pool) and every MD5 in
    /// its cache (at most [`MAX_HOLDINGS`]). Replaces the previous report.
    Holdings {
        pool_port: u16,
        md5s: Vec<String>,
    },
}

/// Cap on the MD5s in one [`AgentMsg::Holdings`]: the most recently used are sent.
pub const MAX_HOLDINGS: usize = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CenterMsg {
    /// Answer to `Hello`. `centers` lists the control addresses of every center, for
    /// failover.
    Welcome {
        heartbeat_ms: u64,
        centers: Vec<String>,
        /// The center's Ed25519 public key for signed pool URLs.
        url_key: Vec<u8>,
    },
    /// Run this task. Tasks arrive in the host's queue order.
    Task {
        task: u64,
        body: TaskBody,
        /// Unix ms after which the task must not start.
        expires_at: u64,
    },
    Cancel {
        task: u64,
    },
    /// The result of this task is stored: the agent may forget it.
    DoneAck {
        task: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("message of {len} bytes exceeds the cap of {cap}")]
    TooLarge { len: usize, cap: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("reading from the peer: {0}")]
    Read(String),
    #[error("writing to the peer: {0}")]
    Write(String),
    #[error("the peer closed the stream")]
    Closed,
}

/// Encode one message with its length prefix.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("message serialization cannot fail");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode a body whose length was already checked. Trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtoError> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Decode one message from the front of `buf`: `Ok(None)` if more bytes are needed.
/// A length over `cap` is refused before the body arrives.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    cap: usize,
) -> Result<Option<(T, usize)>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > cap {
        return Err(ProtoError::TooLarge { len, cap });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode_body(&buf[4..4 + len])?, 4 + len)))
}

/// Read one message; `Ok(None)` on a clean end of stream.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, ProtoError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(ProtoError::Read(e.to_string())),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MSG {
        return Err(ProtoError::TooLarge {
            len: n,
            cap: MAX_MSG,
        });
    }
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| ProtoError::Read(e.to_string()))?;
    decode_body(&body).map(Some)
}

pub async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), ProtoError> {
    send.write_all(&encode(msg))
        .await
        .map_err(|e| ProtoError::Write(e.to_string()))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_length_is_refused_before_the_body() {
        let mut buf = (u32::MAX).to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode::<CenterMsg>(&buf, MAX_MSG),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn roundtrip_and_trailing_bytes() {
        let m = CenterMsg::Cancel { task: 7 };
        let enc = encode(&m);
        let (back, used) = decode::<CenterMsg>(&enc, MAX_MSG).unwrap().unwrap();
        assert_eq!(used, enc.len());
        assert!(matches!(back, CenterMsg::Cancel { task: 7 }));
        let mut body = enc[4..].to_vec();
        body.push(0);
        assert!(decode_body::<CenterMsg>(&body).is_err());
        assert!(decode::<CenterMsg>(&enc[..3], MAX_MSG).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0u8..=255 {
            let body: Vec<u8> = (0..64)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i))
                .collect();
            let _ = decode_body::<AgentMsg>(&body);
            let _ = decode_body::<CenterMsg>(&body);
        }
    }
}
