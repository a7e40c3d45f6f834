//! QUIC plumbing: endpoints, transport tuning, frame I/O on streams, local addresses.
//!
//! One UDP socket per node serves both directions: the node dials and accepts on the
//! same endpoint, so the address a tracker observes is the address peers can dial.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt};

use crate::frame::{self, Frame, FrameError};
use crate::tls::{self, Fingerprint, Identity, TlsError, Trust};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading a frame: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing a frame: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer closed the stream")]
    Eof,
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
}

/// Transport settings. Windows bound the memory a connection can make us buffer:
/// at most `RECEIVE_WINDOW` of unread data per connection whatever the file size.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const RECEIVE_WINDOW: u32 = 8 << 20;
pub const SEND_WINDOW: u64 = 8 << 20;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Largest UDP payload path MTU discovery may try.
pub const MTU_UPPER_BOUND: u16 = 65_000;

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // Let path MTU discovery go past Ethernet sizes: on loopback (and jumbo-frame
    // LANs) per-packet cost, not bandwidth, is the limit, and quinn stops at 1452 by
    // default. Over a 1500-byte path, discovery simply settles lower.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(256))
        .max_concurrent_bidi_streams(VarInt::from_u32(16))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("small duration")));
    Arc::new(t)
}

/// A bound endpoint that accepts mutually-authenticated connections.
pub fn endpoint(listen: SocketAddr, id: &Identity, trust: &Trust) -> Result<Endpoint, NetError> {
    endpoint_with_tls(listen, tls::server_config(id, trust)?)
}

/// As [`endpoint`], with a prepared TLS configuration (other ALPNs, another trust).
pub fn endpoint_with_tls(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
) -> Result<Endpoint, NetError> {
    endpoint_with_reset_key(listen, tls, None)
}

/// As [`endpoint_with_tls`], with a stateless-reset secret that outlives the process.
///
/// Why: after a restart, packets of the old connections arrive at a new endpoint.
/// With the same secret it answers them with a valid stateless reset, so the peers
/// notice at once and reconnect, instead of waiting out the idle timeout.
pub fn endpoint_with_reset_key(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    reset_secret: Option<&[u8]>,
) -> Result<Endpoint, NetError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport());
    let bind_err = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let Some(secret) = reset_secret else {
        return Endpoint::server(server, listen).map_err(bind_err);
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(key.clone()));
    // Connection ids are checked against a keyed hash; the key must survive too, or
    // the new endpoint drops old connections' packets as invalid instead of resetting.
    let tag = ring::hmac::sign(&key, b"octopus connection id key");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime")))?;
    Endpoint::new(config, Some(server), socket, runtime).map_err(bind_err)
}

/// Dial `addr`, pinning the server's certificate fingerprint.
pub async fn connect(
    ep: &Endpoint,
    id: &Identity,
    addr: SocketAddr,
    expected: Fingerprint,
) -> Result<Connection, NetError> {
    connect_alpn(ep, id, addr, expected, frame::ALPN).await
}

pub async fn connect_alpn(
    ep: &Endpoint,
    id: &Identity,
    addr: SocketAddr,
    expected: Fingerprint,
    alpn: &[u8],
) -> Result<Connection, NetError> {
    connect_check(ep, id, addr, tls::ServerCheck::Pinned(expected), alpn).await
}

/// Dial `addr` accepting the server per `check`, under `alpn`.
pub async fn connect_check(
    ep: &Endpoint,
    id: &Identity,
    addr: SocketAddr,
    check: tls::ServerCheck,
    alpn: &[u8],
) -> Result<Connection, NetError> {
    let server_name = match check {
        tls::ServerCheck::Pinned(_) => "octopus-node",
        _ => tls::CENTER_NAME,
    };
    let tls = tls::client_config_check(id, check, alpn)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    let connecting = ep
        .connect_with(cfg, addr, server_name)
        .map_err(|source| NetError::Connect { addr, source })?;
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(NetError::Handshake { addr, source }),
        Err(_) => Err(NetError::Timeout("waiting for the QUIC handshake")),
    }
}

pub async fn write_frame(send: &mut SendStream, f: &Frame) -> Result<(), NetError> {
    send.write_all(&frame::encode(f)).await?;
    Ok(())
}

/// Read one frame; the length is checked against `cap` before the body is read.
pub async fn read_frame(recv: &mut RecvStream, cap: usize) -> Result<Frame, NetError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(NetError::Eof),
        Err(e) => return Err(e.into()),
    }
    let n = frame::peek_len(&len, cap)?.expect("4 bytes present");
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body).await?;
    Ok(frame::decode_body(&body)?)
}

/// Addresses to put in a ticket for an endpoint bound to `bound`: the address itself,
/// or, for an unspecified address, every up interface's address (non-loopback first).
pub fn advertised_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let v4 = bound.is_ipv4();
    let mut ips = interface_ips();
    ips.retain(|ip| ip.is_ipv4() == v4);
    ips.sort_by_key(|ip| ip.is_loopback());
    ips.dedup();
    if ips.is_empty() {
        ips.push(if v4 {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        });
    }
    ips.into_iter()
        .take(8)
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect()
}

fn interface_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs/freeifaddrs as documented; we only read the list in between.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
            if up && !ifa.ifa_addr.is_null() {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
                        // Link-local addresses need a scope id; skip them.
                        if ip.segments()[0] & 0xffc0 != 0xfe80 {
                            out.push(IpAddr::V6(ip));
                        }
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}
