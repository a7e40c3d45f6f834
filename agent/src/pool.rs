//! The HTTP pool: every agent serves its content cache over plain HTTP, for hot and
//! small files that are cheaper to fetch whole from a nearby agent than to swarm.
//!
//! Why it is shaped like this:
//!
//! * **Access by short-lived signed URL only**: `GET /files/{md5}?exp=..&sig=..`, signed
//!   by the center (see [`crate::urlsig`]). A plain `curl -L` works; nobody without a
//!   URL from the center can read the cache, and a URL names one content until one
//!   instant. Bad or expired signatures get 403 with the reason.
//! * **Range requests** (one range, as curl and download managers send) get 206 with
//!   `Content-Range`, so interrupted downloads resume and clients can fetch in parallel.
//! * **Streaming from the file**, never buffering it whole. An entry evicted from the
//!   cache while it is being served stays readable through the open descriptor.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use crate::cache::ContentCache;

/// The center's URL-signing public key, as the agent last heard it (empty before the
/// first session: then every request gets 503).
pub type CenterKey = Arc<std::sync::RwLock<Vec<u8>>>;

#[derive(Clone)]
struct Pool {
    cache: Arc<ContentCache>,
    center_key: CenterKey,
}

/// A running pool server.
#[derive(Debug)]
pub struct PoolHandle {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PoolHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Where the pool listens unless told: the address this host uses to reach the
/// center (port chosen by the kernel). Other agents reach the pool at the address the
/// center sees the agent's session come from, which is this one, so binding every
/// interface would only expose the cache on networks that never need it. Found with
/// an unbound UDP `connect`, which sends nothing.
pub fn default_listen(center: SocketAddr) -> std::io::Result<SocketAddr> {
    let any: SocketAddr = if center.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(center)?;
    Ok(SocketAddr::new(s.local_addr()?.ip(), 0))
}

/// Serves `cache` on `listen`, accepting URLs signed by the key whose public half is
/// in `center_key`.
pub async fn spawn(
    listen: SocketAddr,
    cache: Arc<ContentCache>,
    center_key: CenterKey,
) -> std::io::Result<PoolHandle> {
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    let local_addr = tcp.local_addr()?;
    let app = Router::new()
        .route("/files/{md5}", get(serve))
        .with_state(Pool { cache, center_key });
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(crate::serve::serve(
        tcp,
        app,
        None,
        crate::serve::Limits::default(),
        c,
    ));
    Ok(PoolHandle {
        local_addr,
        cancel,
        task,
    })
}

/// The `exp` and `sig` query parameters of a signed URL.
#[derive(Debug, Deserialize)]
pub struct Signed {
    pub exp: Option<u64>,
    pub sig: Option<String>,
}

impl Signed {
    /// Checks the signature for `md5` against `key`: the reason on failure.
    pub fn check(&self, key: &[u8], md5: &str) -> Result<(), String> {
        let (Some(exp), Some(sig)) = (self.exp, self.sig.as_deref()) else {
            return Err("a signed URL from the center is needed (exp and sig)".into());
        };
        if key.is_empty() {
            return Err("no signing key from the center yet".into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        crate::urlsig::verify(key, md5, exp, sig, now).map_err(|e| e.to_string())
    }
}

fn plain(status: StatusCode, msg: String) -> Response {
    (status, format!("{msg}\n")).into_response()
}

/// Parses a single `bytes=` range against `len`: `Ok(None)` for no header, `Err(())`
/// for a range that cannot be satisfied or parsed. Public for the fuzz target.
#[doc(hidden)]
#[allow(clippy::result_unit_err)] // every Err is the same 416 answer
pub fn parse_range(h: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(h) = h else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(()); // one range only
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len.checked_sub(1).ok_or(())?)
        }
        (s, "") => (s.parse().map_err(|_| ())?, len.checked_sub(1).ok_or(())?),
        (s, e) => {
            let s: u64 = s.parse().map_err(|_| ())?;
            let e: u64 = e.parse().map_err(|_| ())?;
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if start > end || start >= len {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn serve(
    State(p): State<Pool>,
    Path(md5): Path<String>,
    Query(q): Query<Signed>,
    headers: HeaderMap,
) -> Response {
    let key = p.center_key.read().unwrap().clone();
    if let Err(e) = q.check(&key, &md5) {
        return plain(StatusCode::FORBIDDEN, e);
    }
    let Some(path) = p.cache.get(&md5) else {
        return plain(
            StatusCode::NOT_FOUND,
            format!("content {md5} is not in this agent's cache"),
        );
    };
    respond_file(&path, &md5, &headers).await
}

/// Streams the file at `path` (content `md5`), honouring one `Range`: 200, 206 or
/// 416. Shared by the agents' pool and the center's own copy of uploaded content.
pub async fn respond_file(path: &std::path::Path, md5: &str, headers: &HeaderMap) -> Response {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return plain(StatusCode::NOT_FOUND, format!("opening {md5}: {e}")),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {md5}: {e}"),
            )
        }
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, len) {
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                "range not satisfiable\n",
            )
                .into_response()
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "seeking".into());
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(count)));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, count.into());
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = format!("bytes {start}-{end}/{len}").parse() {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::urlsig::UrlSigner;
    use tokio::io::AsyncWriteExt;

    async fn fetch(addr: SocketAddr, path: &str, range: Option<&str>) -> (u16, String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{r}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let status = head[9..12].parse().unwrap();
        (status, head, buf[split + 4..].to_vec())
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=4-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Err(()));
        assert_eq!(parse_range(Some("items=0-1"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(()));
    }

    #[tokio::test]
    async fn serves_signed_urls_with_ranges_and_refuses_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let cache = Arc::new(ContentCache::open(d.path(), 1 << 20).unwrap());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let src = cache.staging_dir().join("x");
        std::fs::create_dir_all(cache.staging_dir()).unwrap();
        std::fs::write(&src, &data).unwrap();
        let md5 = "00112233445566778899aabbccddeeff";
        cache.insert(md5, &src).unwrap();
        let signer = UrlSigner::from_pkcs8(&UrlSigner::generate().unwrap()).unwrap();
        let key = Arc::new(std::sync::RwLock::new(signer.public_key()));
        let pool = spawn("127.0.0.1:0".parse().unwrap(), cache, key)
            .await
            .unwrap();
        let addr = pool.local_addr();
        let far = 4_000_000_000;
        let url = format!("/files/{md5}?{}", signer.sign(md5, far).unwrap());

        let (st, head, body) = fetch(addr, &url, None).await;
        assert_eq!(st, 200, "{head}");
        assert_eq!(body, data);
        let (st, head, body) = fetch(addr, &url, Some("bytes=10-19")).await;
        assert_eq!(st, 206, "{head}");
        assert!(
            head.to_lowercase()
                .contains("content-range: bytes 10-19/100000"),
            "{head}"
        );
        assert_eq!(body, &data[10..20]);
        let (st, _, body) = fetch(addr, &url, Some("bytes=-5")).await;
        assert_eq!(st, 206);
        assert_eq!(body, &data[data.len() - 5..]);
        let (st, _, _) = fetch(addr, &url, Some("bytes=200000-")).await;
        assert_eq!(st, 416);

        // No signature, a bad one, an expired one, another content's: 403 with a reason.
        let (st, _, body) = fetch(addr, &format!("/files/{md5}"), None).await;
        assert_eq!(st, 403);
        assert!(String::from_utf8_lossy(&body).contains("signed URL"));
        let (st, _, _) = fetch(addr, &format!("/files/{md5}?exp={far}&sig=AAAA"), None).await;
        assert_eq!(st, 403);
        let old = format!("/files/{md5}?{}", signer.sign(md5, 1).unwrap());
        let (st, _, body) = fetch(addr, &old, None).await;
        assert_eq!(st, 403);
        assert!(String::from_utf8_lossy(&body).contains("expired"));
        let other = "ffeeddccbbaa99887766554433221100";
        let (st, _, _) = fetch(
            addr,
            &format!("/files/{other}?{}", signer.sign(md5, far).unwrap()),
            None,
        )
        .await;
        assert_eq!(st, 403);
        // Signed, but not cached here: 404.
        let (st, _, _) = fetch(
            addr,
            &format!("/files/{other}?{}", signer.sign(other, far).unwrap()),
            None,
        )
        .await;
        assert_eq!(st, 404);
        pool.shutdown().await;
    }
}
