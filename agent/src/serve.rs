//! The accept loop of every HTTP server in Octopus (the center's API, the agents'
//! pool): optional TLS, and limits on what a connection may hold.
//!
//! Why it is shaped like this:
//!
//! * **A connection that does nothing is closed.** The TLS handshake and every
//!   request head must arrive within `header_timeout` (hyper's header-read timeout
//!   also covers the wait for the next request on a kept-alive connection), and a
//!   connection on which no byte moves either way for `idle_timeout` is closed, so
//!   slow-header and idle sockets cannot pile up until the process runs out of
//!   descriptors.
//! * **At most `max_connections` at once.** Past the cap the loop stops accepting
//!   (new connections wait in the kernel's backlog) until a connection ends; with the
//!   timeouts above, every slot frees up within a bounded time.
//! * **The peer's address reaches handlers** as axum's `ConnectInfo<SocketAddr>`,
//!   as `into_make_service_with_connect_info` would give it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// What one HTTP server allows a connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For the TLS handshake and for each request's head.
    pub header_timeout: Duration,
    /// No byte in either direction for this long closes the connection. Keep it above
    /// the longest a handler may stay silent (the API's long poll waits up to 30 s).
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// Serves `app` on `tcp` until `cancel`, over TLS when `tls` is given, within `limits`.
/// Returns when the listener is closed and every connection has ended.
pub async fn serve(
    tcp: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let conns = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let _permit = permit;
            let activity = Arc::new(AtomicU64::new(0));
            let io = Watched::new(stream, activity.clone());
            let work = async {
                match acceptor {
                    Some(a) => {
                        match tokio::time::timeout(limits.header_timeout, a.accept(io)).await {
                            Ok(Ok(tls)) => serve_conn(tls, peer, app, limits, &cancel).await,
                            Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                    None => serve_conn(io, peer, app, limits, &cancel).await,
                }
            };
            tokio::select! {
                _ = work => {}
                _ = idle_watch(activity, limits.idle_timeout) => {
                    debug!(%peer, "closing an idle connection");
                }
            }
        });
    }
    drop(tcp);
    conns.close();
    conns.wait().await;
}

async fn serve_conn<S>(
    io: S,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    cancel: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, "connection ended: {e}");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // In-flight requests finish (bounded by the idle watch around us).
            let _ = conn.await;
        }
    }
}

/// Resolves once `activity` (milliseconds since `start`, bumped on every read or
/// write) has not moved for `idle`.
async fn idle_watch(activity: Arc<AtomicU64>, idle: Duration) {
    let start = Instant::now();
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let quiet = start.elapsed().saturating_sub(last);
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// A TCP stream that records when bytes last moved.
struct Watched {
    inner: TcpStream,
    start: Instant,
    activity: Arc<AtomicU64>,
}

impl Watched {
    fn new(inner: TcpStream, activity: Arc<AtomicU64>) -> Watched {
        Watched {
            inner,
            start: Instant::now(),
            activity,
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The loop the pool runs on: idle sockets past the cap are all closed by the
    /// server, and a request behind them is still answered.
    #[tokio::test]
    async fn idle_sockets_past_the_cap_are_closed_and_requests_still_served() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = Router::new().route("/x", get(|| async { "ok" }));
        let limits = Limits {
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
            max_connections: 4,
        };
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(tcp, app, None, limits, cancel.clone()));
        let mut idle = Vec::new();
        for _ in 0..12 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Half a request head, never finished.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();

        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut resp))
            .await
            .expect("the request behind the idle sockets was never answered")
            .unwrap();
        let resp = String::from_utf8_lossy(&resp);
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok"),
            "{resp}"
        );

        idle.push(slow);
        for (i, mut s) in idle.into_iter().enumerate() {
            let mut b = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(60), s.read(&mut b))
                .await
                .unwrap_or_else(|_| panic!("socket {i} was never closed"));
            // EOF, a reset, or hyper's 408 before closing: never left hanging.
            match r {
                Ok(0) | Err(_) => {}
                Ok(_) => {
                    let mut rest = Vec::new();
                    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest))
                        .await
                        .unwrap_or_else(|_| panic!("socket {i} was answered but never closed"))
                        .ok();
                }
            }
        }
        cancel.cancel();
        server.await.unwrap();
    }
}
