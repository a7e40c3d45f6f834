//! The fleet fixture shared by the end-to-end tests of the control plane: a real
//! `octo center` with real `octo agent` processes, the CLI run against it, and raw HTTP
//! helpers for requests the CLI would never send.
//!
//! Why a module of its own: every e2e test file (control, multi, security, ...) drives the
//! same fleet, so how the center is reached (address, scheme, CA pinning) lives in one place.
//!
//! The center serves HTTPS with a certificate from its own CA. [`start_center`] records
//! each center's `DATA_DIR/ca.pem` under its API URL, and the raw helpers ([`http_raw`],
//! [`http_get`], ...) speak TLS with exactly that CA as the root (rustls, the name
//! checked) to `https://` URLs, and plain HTTP to `http://` ones (the agents' pools).
//! The CLI pins the CA from the token's fingerprint; [`run_octo`] adds `OCTO_CA` only
//! for a token that carries none.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use octopus_tests::{wait_until, Octo, Value};

use crate::bin;

pub(crate) const T: Duration = Duration::from_secs(20);

pub(crate) struct Fleet {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) center: Octo,
    pub(crate) api: String,
    pub(crate) addr: String,
    pub(crate) admin: String,
    pub(crate) agents: Vec<(String, Octo)>,
    pub(crate) enroll: String,
}

/// The CA file of every center started here, by API URL.
static CAS: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// The `ca.pem` of the center serving `api` (started by [`start_center`]).
pub(crate) fn ca_of(api: &str) -> Option<PathBuf> {
    CAS.lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(api.trim_end_matches('/')).cloned())
}

/// Records the CA file of a center started without [`start_center`].
pub(crate) fn record_ca(api: &str, ca: &Path) {
    CAS.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(api.trim_end_matches('/').to_string(), ca.to_path_buf());
}

/// `octo agents --json` against a center, as a list.
pub(crate) fn agents_json(api: &str, token: &str) -> Vec<Value> {
    let (code, out, err) = run_octo(api, token, &["agents", "--json"]);
    assert_eq!(code, 0, "octo agents: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub(crate) fn run_octo(api: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("OCTO_CENTER", api)
        .env("OCTO_TOKEN", token)
        .env("RUST_LOG", "warn")
        .env_remove("OCTO_CA");
    // A token without the CA fingerprint (hand-made, or the old form) needs the CA.
    let carries_fp = token
        .rsplit_once('.')
        .is_some_and(|(_, h)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !carries_fp {
        if let Some(ca) = ca_of(api) {
            cmd.env("OCTO_CA", ca);
        }
    }
    let out = cmd.output().expect("run octo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Fleet {
    pub(crate) fn start(n: usize) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let (center, api, addr, admin) = start_center(dir.path(), "127.0.0.1:0", "center");
        let (code, out, err) = run_octo(
            &api,
            &admin,
            &["token", "create", "--scope", "enroll", "--ttl", "1h"],
        );
        assert_eq!(code, 0, "creating an enroll token: {err}");
        let mut f = Fleet {
            dir,
            center,
            api,
            addr,
            admin,
            agents: Vec::new(),
            enroll: out.trim().to_string(),
        };
        for i in 1..=n {
            let tags: &[&str] = if i == 1 { &["role=db"] } else { &["role=web"] };
            f.add_agent(&format!("host-{i}"), tags);
        }
        f.wait_online(n);
        f
    }

    pub(crate) fn add_agent(&mut self, name: &str, tags: &[&str]) {
        let a = self.spawn_agent(name, tags);
        self.agents.push((name.to_string(), a));
    }

    pub(crate) fn spawn_agent(&self, name: &str, tags: &[&str]) -> Octo {
        let data = self.dir.path().join(format!("agent-{name}"));
        let mut args = vec![
            "agent".to_string(),
            "--center".into(),
            self.addr.clone(),
            "--token".into(),
            self.enroll.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--name".into(),
            name.into(),
            "--json".into(),
        ];
        for t in tags {
            args.push("--tag".into());
            args.push(t.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut a = Octo::spawn(&bin(), name, self.dir.path(), &args, &[]);
        a.wait_event("ready", T);
        a
    }

    pub(crate) fn octo(&self, args: &[&str]) -> (i32, String, String) {
        run_octo(&self.api, &self.admin, args)
    }

    pub(crate) fn agents_json(&self) -> Vec<Value> {
        agents_json(&self.api, &self.admin)
    }

    pub(crate) fn online(&self, name: &str) -> bool {
        self.agents_json()
            .iter()
            .any(|a| a["name"] == name && a["status"] == "online")
    }

    pub(crate) fn wait_online(&self, n: usize) {
        assert!(
            wait_until(T, || self
                .agents_json()
                .iter()
                .filter(|a| a["status"] == "online")
                .count()
                >= n),
            "{n} agents never came online: {:?}\n--- center ---\n{}",
            self.agents_json(),
            self.center.stderr()
        );
    }

    pub(crate) fn agent(&mut self, name: &str) -> &mut Octo {
        &mut self.agents.iter_mut().find(|(n, _)| n == name).unwrap().1
    }
}

pub(crate) fn start_center(dir: &Path, listen: &str, name: &str) -> (Octo, String, String, String) {
    start_center_with(dir, listen, name, &[])
}

/// [`start_center`] with more `octo center` flags (`extra`).
pub(crate) fn start_center_with(
    dir: &Path,
    listen: &str,
    name: &str,
    extra: &[&str],
) -> (Octo, String, String, String) {
    let data = dir.join("center-data");
    let data_arg = data.display().to_string();
    let mut args = vec![
        "center",
        "--listen",
        listen,
        "--data-dir",
        &data_arg,
        "--heartbeat",
        "500ms",
        "--json",
    ];
    args.extend_from_slice(extra);
    let mut c = Octo::spawn(&bin(), name, dir, &args, &[]);
    let ready = c.wait_event("ready", T);
    let api = ready["api"].as_str().unwrap().to_string();
    assert!(
        api.starts_with("https://"),
        "the center serves HTTPS by default: {api}"
    );
    let addr = api.trim_start_matches("https://").to_string();
    record_ca(&api, &data.join("ca.pem"));
    let token_file = std::fs::read_to_string(data.join("admin.token")).unwrap();
    if let Some(t) = ready["admin_token"].as_str() {
        assert_eq!(
            t,
            token_file.trim(),
            "the printed admin token is the stored one"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token must be private");
    (c, api, addr, token_file.trim().to_string())
}

/// The task summary line printed last by `exec --json` / `task wait --json`.
pub(crate) fn summary(out: &str) -> Value {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in {out}"))
}

pub(crate) fn host_state(task: &Value, host: &str) -> String {
    task["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .map(|h| h["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A minimal HTTP/1.1 request, to send exactly the bytes a test needs; returns the
/// status and the raw body.
pub(crate) fn http_raw(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (mut s, addr) = connect(api);
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.flush().unwrap();
    let resp = String::from_utf8_lossy(&read_all(&mut s)).into_owned();
    let status: u16 = resp[9..12].parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// [`http_raw`] with the body read as JSON.
pub(crate) fn http(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let (status, body) = http_raw(api, method, path, token, body);
    // Chunked or not, the JSON object is the part between the outer braces.
    let json = body
        .find('{')
        .zip(body.rfind('}'))
        .map(|(a, b)| &body[a..=b])
        .unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

pub(crate) fn walkdir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walkdir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// A GET answered with only its status line and headers (`range` optional).
pub(crate) fn http_head(
    base: &str,
    path: &str,
    token: Option<&str>,
    range: Option<&str>,
) -> (u16, String) {
    let (status, head, _) = http_get(base, path, token, range);
    (status, head)
}

pub(crate) fn http_body(base: &str, path: &str, range: Option<&str>) -> Vec<u8> {
    http_get(base, path, None, range).2
}

pub(crate) fn http_get(
    base: &str,
    path: &str,
    token: Option<&str>,
    range: Option<&str>,
) -> (u16, String, Vec<u8>) {
    let (mut s, addr) = connect(base);
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{range}Connection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    let buf = read_all(&mut s);
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    (
        head[9..12].parse().unwrap(),
        head,
        buf[split + 4..].to_vec(),
    )
}

/// A byte stream to a server: TLS or plain TCP.
pub(crate) trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Connects to `base` (`https://HOST:PORT`, verified with the center's CA as the only
/// root, or `http://HOST:PORT`); returns the stream and `HOST:PORT`.
pub(crate) fn connect(base: &str) -> (Box<dyn Stream>, String) {
    if let Some(addr) = base.strip_prefix("https://") {
        let addr = addr.trim_end_matches('/').to_string();
        let ca = ca_of(base)
            .unwrap_or_else(|| panic!("no CA recorded for {base}: start it with start_center"));
        (
            Box::new(tls_connect(&addr, &std::fs::read(&ca).unwrap())),
            addr,
        )
    } else {
        let addr = base.trim_start_matches("http://").trim_end_matches('/');
        (
            Box::new(TcpStream::connect(addr).unwrap()),
            addr.to_string(),
        )
    }
}

/// A TLS client stream to `addr` that trusts only the CA in `ca_pem` and checks the
/// server's name (the IP of `addr`) as any HTTPS client does.
pub(crate) fn tls_connect(
    addr: &str,
    ca_pem: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_cert(ca_pem).into()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = addr.rsplit_once(':').unwrap().0;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// The DER of the first certificate in a PEM file.
pub(crate) fn pem_cert(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let b64: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    data_encoding::BASE64.decode(b64.as_bytes()).unwrap()
}

/// Reads until the server closes; a TLS peer that closes without close_notify after
/// the response still counts as the end.
fn read_all(s: &mut dyn Stream) -> Vec<u8> {
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => panic!("reading the response: {e} (got {} bytes)", buf.len()),
    }
    buf
}
