//! The center's runtime: its CA, the agents' QUIC endpoint, and task dispatch.
//!
//! Why it is shaped like this:
//!
//! * **The store is the truth.** Every state change (a task queued, delivered,
//!   finished, cancelled, expired) is one store transaction before anything is sent
//!   or answered, so a center killed at any instant restarts with every queued entry
//!   still queued. In-memory state is only the live sessions and the recent output
//!   of running tasks.
//! * **At most once per host.** The center may deliver an entry more than once (it
//!   re-sends everything still queued when an agent reconnects); the agent keeps the
//!   ids it has started and never runs one twice. An entry leaves a host's queue only
//!   when its result is stored.
//! * **One session per host.** A new connection for the same host replaces the old
//!   one; the host name comes from the certificate the center's CA issued, never from
//!   what the agent says.
//! * **Services follow `spawn(config) -> Handle`**, with a CancellationToken and a
//!   TaskTracker for shutdown, like the transfer engine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use octopus_agent::proto::{
    self, code, AgentMsg, CenterMsg, EnrollRequest, EnrollResponse, Outcome, TaskBody, ALPN_CTL,
    ALPN_ENROLL,
};
use octopus_transfer::tls::{self, CertAuthority, Identity, Trust};
use quinn::{Connection, Endpoint, VarInt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth;
use crate::store::{
    HostOutcome, HostRecord, HostState, NewTask, RedbStore, Scope, Store, TaskRecord, TaskState,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone)]
pub struct CenterConfig {
    /// TCP for the API and UDP for agents, on the same port.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Disk quota of the center's content cache (uploads for the pool and for
    /// `--async` copies).
    pub content_quota: u64,
    /// `zk://HOST:PORT[,HOST:PORT...]/CHROOT`: register in ZooKeeper, so several
    /// centers serve one fleet. `None`: embedded, one center.
    pub registry: Option<String>,
    /// Serve the API over plain HTTP instead of HTTPS (`--insecure-http`).
    pub insecure_http: bool,
    /// Extra names (DNS or IP) for the API's certificate, beside the listen address,
    /// loopback and the host name.
    pub api_sans: Vec<String>,
    /// Timeouts and the connection cap of the API's HTTP server.
    pub http_limits: octopus_agent::serve::Limits,
    /// Audit entries kept (the oldest beyond are deleted), e.g.
    /// [`crate::caps::DEFAULT_AUDIT_KEEP`].
    pub audit_keep: u64,
    /// Free bytes kept on the data directory's filesystem: below, writes answer 507
    /// (e.g. [`crate::caps::DEFAULT_DISK_RESERVE`]).
    pub disk_reserve: u64,
}

/// Default quota of the center's content cache: 20 GiB.
pub const DEFAULT_CONTENT_QUOTA: u64 = 20 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CenterError {
    #[error("using the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("setting up the CA: {0}")]
    Ca(#[from] tls::TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the QUIC endpoint: {0}")]
    Quic(String),
    #[error("setting up the content store: {0}")]
    Content(String),
    #[error("joining the ZooKeeper registry: {0}")]
    Registry(#[from] crate::zk::ZkError),
}

/// One live event of a task, for `octo exec` / `octo task wait` to follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEvent {
    pub seq: u64,
    pub host: String,
    /// "stdout", "stderr", or "state".
    pub kind: String,
    /// Output bytes (lossy UTF-8), or the new state's name.
    pub data: String,
}

/// Recent events of one task, kept in memory while anyone may follow it.
#[derive(Debug, Default)]
struct EventLog {
    next: u64,
    events: std::collections::VecDeque<TaskEvent>,
    bytes: usize,
    /// When the center saw the task finish (unix ms).
    finished_at: Option<u64>,
}

/// Cap on the output kept in memory per task for followers (the stored result has
/// its own cap per host and stream): past it the oldest events go, and a follower
/// that had not read them is told its view is truncated.
const EVENT_LOG_BYTES: usize = 4 << 20;
/// Cap on the live output of all tasks together: past it the oldest events of the
/// largest logs go first.
const EVENT_TOTAL_BYTES: usize = 64 << 20;
/// How long the events of a finished task stay for followers (who then read the
/// stored results).
const EVENT_KEEP_MS: u64 = 60_000;

/// The event logs of all tasks, with their total size.
#[derive(Debug, Default)]
struct EventLogs {
    logs: HashMap<u64, EventLog>,
    bytes: usize,
}

pub(crate) struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<CenterMsg>,
    kick: Arc<Notify>,
    /// To drop the session at once when the host is removed.
    pub(crate) conn: Connection,
}

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub ca: CertAuthority,
    pub heartbeat: Duration,
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    /// Enrollments refused because the name is taken, for `octo agents approve`.
    pub(crate) enroll_requests: Mutex<BTreeMap<String, crate::hosts::PendingEnroll>>,
    events: Mutex<EventLogs>,
    pub events_changed: Notify,
    next_session: std::sync::atomic::AtomicU64,
    pub quic_addr: SocketAddr,
    /// Latest heartbeat per host: (unix ms, encoded resources). Live data, kept in
    /// memory: writing every heartbeat to disk would cost a fleet one sync per host
    /// every few seconds, and a restarted center gets fresh ones within a heartbeat.
    pub live: Mutex<HashMap<String, (u64, Vec<u8>)>>,
    /// (task, host) the agent acknowledged and is running. Also only in memory: if it
    /// is lost, the entry is still queued in the store, is redelivered, and the
    /// agent's journal keeps it from running twice.
    pub running: Mutex<HashSet<(u64, String)>>,
    /// Results to store, committed in groups by `committer`.
    finish_tx: mpsc::UnboundedSender<Finished>,
    pub metrics: Metrics,
    /// Bodies of running tasks (and their expiry), so pumping a host's queue does not
    /// decode the whole task record (with its list of every host) once per host.
    bodies: Mutex<HashMap<u64, Arc<(TaskBody, u64)>>>,
    pub content: crate::content::Content,
    /// The shared registry (ZooKeeper) when several centers serve the fleet.
    pub registry: Option<crate::zk::Registry>,
    /// Audit entries kept.
    pub audit_keep: u64,
    /// The rate cap on audit entries of unauthenticated calls.
    pub audit_gate: crate::caps::AuditGate,
    /// Free bytes kept on the data directory's filesystem (uploads check it too).
    pub disk_reserve: u64,
    pub data_dir: PathBuf,
    /// This center's id in the registry: its agents' address.
    pub center_id: String,
    /// Hosts with a session at any center, per the registry (kept by a watch), and
    /// the id of that center.
    pub online_anywhere: Mutex<HashMap<String, String>>,
}

/// Counters for `/api/v1/metrics` (Prometheus text format).
#[derive(Debug, Default)]
pub struct Metrics {
    pub tasks_created: AtomicU64,
    pub results_stored: AtomicU64,
    pub result_commits: AtomicU64,
    pub enrollments_ok: AtomicU64,
    pub enrollments_refused: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub sessions_refused: AtomicU64,
}

/// A result from an agent, waiting for the group commit.
struct Finished {
    host: String,
    task: u64,
    outcome: HostOutcome,
    reply: mpsc::UnboundedSender<CenterMsg>,
}

/// A running center.
#[derive(Debug)]
pub struct CenterHandle {
    api_addr: SocketAddr,
    quic_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The admin token, only on the start that created it.
    pub new_admin_token: Option<String>,
    pub ca_fingerprint: String,
    /// `https://ADDR` (or `http://ADDR` with `insecure_http`).
    pub api_url: String,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Center").finish_non_exhaustive()
    }
}

impl CenterHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.api_addr
    }
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
    pub fn cancelled(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

const META_CA_CERT: &str = "ca.cert";
const META_CA_KEY: &str = "ca.key";
const META_CA_NAME: &str = "ca.name";
/// QUIC stateless-reset secret: kept so a restarted center resets old connections.
const META_RESET_KEY: &str = "quic.reset";
/// Ed25519 key (PKCS#8) that signs pool URLs.
const META_URL_KEY: &str = "url.key";

fn load_or_create_ca(store: &dyn Store) -> Result<CertAuthority, CenterError> {
    if let (Some(cert), Some(key), Some(name)) = (
        store.get_meta(META_CA_CERT)?,
        store.get_meta(META_CA_KEY)?,
        store.get_meta(META_CA_NAME)?,
    ) {
        let name = String::from_utf8_lossy(&name).into_owned();
        return Ok(CertAuthority::from_der(cert, &key, name)?);
    }
    let ca = CertAuthority::generate()?;
    store.put_meta(META_CA_KEY, &ca.key_pkcs8())?;
    store.put_meta(META_CA_NAME, ca.name().as_bytes())?;
    store.put_meta(META_CA_CERT, &ca.cert)?;
    Ok(ca)
}

/// The hex SHA-256 of the CA certificate: what enrollment tokens carry.
pub fn fingerprint_hex(fp: &tls::Fingerprint) -> String {
    fp.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts a center: opens (or creates) its store and CA, binds the API on TCP and the
/// agents' endpoint on UDP at the same address, and serves until shut down.
pub async fn spawn(cfg: CenterConfig) -> Result<CenterHandle, CenterError> {
    // The data directory holds the CA's key (in center.redb) and the admin token: 0700,
    // not a link, ours; files an older version left wider are tightened.
    octopus_transfer::safefs::ensure_private_dir(&cfg.data_dir)
        .and_then(|_| {
            ["center.redb", "admin.token"].iter().try_for_each(|f| {
                octopus_transfer::safefs::make_private_file(&cfg.data_dir.join(f))
            })
        })
        .map_err(|source| CenterError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
    // With a registry, everything the centers must agree on (tokens, inventory, tasks,
    // queues, results, the CA) lives in ZooKeeper; without, in the embedded redb.
    let (registry, store): (_, Arc<dyn Store>) = match &cfg.registry {
        Some(u) => {
            let url = crate::zk::ZkUrl::parse(u)?;
            let session =
                crate::zk::ZkSession::connect(&url, crate::zk::SessionOptions::default()).await?;
            let u2 = url.clone();
            let store = tokio::task::spawn_blocking(move || {
                crate::zk::ZkStore::open(&u2, crate::zk::ZkStoreOptions::default())
            })
            .await
            .map_err(|e| CenterError::Content(format!("opening the shared store: {e}")))??;
            (Some(crate::zk::Registry::new(session)), Arc::new(store))
        }
        None => {
            let path = cfg.data_dir.join("center.redb");
            let store = RedbStore::open_with_reserve(&path, cfg.disk_reserve)?;
            // redb creates it with the process umask; the CA's key is inside.
            octopus_transfer::safefs::make_private_file(&path).map_err(|source| {
                CenterError::DataDir {
                    path: cfg.data_dir.clone(),
                    source,
                }
            })?;
            (None, Arc::new(store))
        }
    };
    let ca = load_or_create_ca(store.as_ref())?;
    if registry.is_none() {
        // Alone, nobody is connected at start; with peers, they hold their sessions.
        store.mark_all_offline(proto::now_ms())?;
    }

    // First start: an admin token, written 0600 and handed back to print once.
    let mut new_admin_token = None;
    let token_path = cfg.data_dir.join("admin.token");
    if store.list_tokens()?.iter().all(|t| t.scope != Scope::Admin) {
        let (text, rec) = auth::new_token(
            Scope::Admin,
            Vec::new(),
            None,
            false,
            "created at first start".into(),
            proto::now_ms(),
        );
        store.put_token(&rec)?;
        // Like every token `token create` prints, it carries the CA's fingerprint, so
        // the CLI can pin the center's HTTPS certificate from the token alone.
        let text = auth::with_ca_fingerprint(&text, &fingerprint_hex(&ca.fingerprint));
        write_private(&token_path, text.as_bytes()).map_err(|source| CenterError::DataDir {
            path: token_path.clone(),
            source,
        })?;
        new_admin_token = Some(text);
    }

    let identity = ca.issue_identity(tls::CENTER_NAME)?;
    let reset = match store.get_meta(META_RESET_KEY)? {
        Some(k) => k,
        None => {
            let k: [u8; 32] = rand::random();
            store.put_meta(META_RESET_KEY, &k)?;
            k.to_vec()
        }
    };
    // TCP first: with port 0 the kernel picks the port, and UDP takes the same one;
    // if that UDP port is taken (UDP and TCP ephemeral ranges overlap), try another.
    let mut attempt = 0;
    let (tcp, api_addr, endpoint) = loop {
        attempt += 1;
        let bind_err = |source| CenterError::Bind {
            addr: cfg.listen,
            source,
        };
        let tcp = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(bind_err)?;
        let api_addr = tcp.local_addr().map_err(bind_err)?;
        match ctl_endpoint(api_addr, &identity, &reset) {
            Ok(ep) => break (tcp, api_addr, ep),
            Err(_) if cfg.listen.port() == 0 && attempt < 20 => continue,
            Err(e) => return Err(e),
        }
    };
    let quic_addr = endpoint.local_addr().map_err(|source| CenterError::Bind {
        addr: api_addr,
        source,
    })?;
    crate::https::write_ca_pem(&cfg.data_dir, &ca.cert).map_err(|source| CenterError::DataDir {
        path: cfg.data_dir.join("ca.pem"),
        source,
    })?;
    let api_tls = if cfg.insecure_http {
        warn!(api = %api_addr, "the API serves PLAIN HTTP (--insecure-http): tokens cross the network in cleartext");
        None
    } else {
        let names = crate::https::api_names(api_addr, &cfg.api_sans);
        debug!(?names, "API certificate names");
        Some(crate::https::server_config(&ca, &names)?)
    };
    let api_url = format!(
        "{}://{api_addr}",
        if api_tls.is_some() { "https" } else { "http" }
    );

    let url_key = match store.get_meta(META_URL_KEY)? {
        Some(k) => k,
        None => {
            let k = octopus_agent::urlsig::UrlSigner::generate()
                .map_err(|e| CenterError::Content(e.to_string()))?;
            store.put_meta(META_URL_KEY, &k)?;
            k
        }
    };
    let signer = octopus_agent::urlsig::UrlSigner::from_pkcs8(&url_key)
        .map_err(|e| CenterError::Content(e.to_string()))?;
    // The center's seeds join the fleet's swarms with a certificate from its own CA.
    let seed_identity = ca.issue_identity("octo-center")?;
    let content = crate::content::Content::open(
        &cfg.data_dir,
        cfg.content_quota,
        signer,
        seed_identity,
        Trust::Ca(ca.cert.clone()),
    )
    .map_err(CenterError::Content)?;

    let (finish_tx, finish_rx) = mpsc::unbounded_channel();
    // The registry's node name: the agents' address, made a valid name.
    let center_id: String = quic_addr
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Some(r) = &registry {
        r.register_center(
            &center_id,
            &crate::zk::CenterInfo {
                addr: quic_addr.to_string(),
                version: VERSION.to_string(),
            },
        )
        .await?;
    }
    let inner = Arc::new(Inner {
        online_anywhere: Mutex::new(HashMap::new()),
        registry,
        audit_keep: cfg.audit_keep,
        audit_gate: crate::caps::AuditGate::default(),
        disk_reserve: cfg.disk_reserve,
        data_dir: cfg.data_dir.clone(),
        center_id,
        content,
        live: Mutex::new(HashMap::new()),
        running: Mutex::new(HashSet::new()),
        finish_tx,
        metrics: Metrics::default(),
        bodies: Mutex::new(HashMap::new()),
        store,
        ca,
        heartbeat: cfg.heartbeat,
        sessions: Mutex::new(HashMap::new()),
        enroll_requests: Mutex::new(BTreeMap::new()),
        events: Mutex::new(EventLogs::default()),
        events_changed: Notify::new(),
        next_session: std::sync::atomic::AtomicU64::new(1),
        quic_addr,
    });
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ca_fingerprint = fingerprint_hex(&inner.ca.fingerprint);

    tracker.spawn(accept_loop(
        inner.clone(),
        endpoint.clone(),
        cancel.clone(),
        tracker.clone(),
    ));
    tracker.spawn(sweeper(inner.clone(), cancel.clone()));
    if let Some(r) = &inner.registry {
        // Who is online at any center; "offline" only after a grace period, so a
        // session expiry or an agent moving between centers raises no storm.
        let mut presence = r.watch_agents(Duration::from_secs(5));
        let inner = inner.clone();
        let c = cancel.clone();
        tracker.spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = c.cancelled() => return,
                    e = presence.next() => e,
                };
                let mut set = inner.online_anywhere.lock().unwrap();
                match ev {
                    Some(crate::zk::PresenceEvent::Online { host, info }) => {
                        set.insert(host, info.center);
                    }
                    Some(crate::zk::PresenceEvent::Offline { host }) => {
                        set.remove(&host);
                    }
                    None => return,
                }
            }
        });
    }
    {
        // Seeds of `--async` copies still running come back; their tasks wait for
        // them (pump_queue skips a seed task until its seed is up).
        let inner = inner.clone();
        tracker.spawn(async move {
            let st = inner.store.clone();
            inner
                .content
                .restore_seeds(|t| task_open(st.as_ref(), t))
                .await;
            for name in inner.content.seed_names() {
                publish_seed(&inner, &name);
            }
            let hosts: Vec<String> = inner.sessions.lock().unwrap().keys().cloned().collect();
            kick_hosts(&inner, &hosts);
        });
    }
    tracker.spawn(committer(inner.clone(), finish_rx, cancel.clone()));
    let app = crate::api::router(inner.clone());
    let c2 = cancel.clone();
    tracker.spawn(octopus_agent::serve::serve(
        tcp,
        app,
        api_tls,
        cfg.http_limits,
        c2,
    ));
    let c3 = cancel.clone();
    tracker.spawn(async move {
        c3.cancelled().await;
        endpoint.close(VarInt::from_u32(code::SHUTDOWN), b"center shutting down");
    });
    info!(api = %api_addr, quic = %quic_addr, ca = %ca_fingerprint, "center running");
    Ok(CenterHandle {
        api_addr,
        quic_addr,
        cancel,
        tracker,
        new_admin_token,
        ca_fingerprint,
        api_url,
    })
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn ctl_endpoint(addr: SocketAddr, id: &Identity, reset: &[u8]) -> Result<Endpoint, CenterError> {
    // Standalone trust at the TLS layer: enrolling agents present self-signed
    // certificates. Control connections are checked against the CA right after the
    // handshake (see `serve_ctl`), before a single message is read.
    let tls = tls::server_config_alpns(id, &Trust::Standalone, &[ALPN_CTL, ALPN_ENROLL])
        .map_err(CenterError::Ca)?;
    octopus_transfer::net::endpoint_with_reset_key(addr, tls, Some(reset))
        .map_err(|e| CenterError::Quic(e.to_string()))
}

async fn accept_loop(
    inner: Arc<Inner>,
    ep: Endpoint,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let inner = inner.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!("handshake failed: {e}");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(ALPN_ENROLL) => serve_enroll(&inner, conn).await,
                Some(ALPN_CTL) => serve_ctl(inner, conn, cancel).await,
                _ => conn.close(VarInt::from_u32(code::PROTOCOL), b"unknown ALPN"),
            }
        });
    }
}

async fn serve_enroll(inner: &Inner, conn: Connection) {
    let remote = conn.remote_address();
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        return;
    };
    let resp = match proto::read_msg::<EnrollRequest>(&mut recv).await {
        Ok(Some(req)) => enroll(inner, &conn, req),
        Ok(None) => return,
        Err(e) => {
            warn!(%remote, "closing enrollment connection: {e}");
            conn.close(VarInt::from_u32(code::PROTOCOL), b"bad enrollment request");
            return;
        }
    };
    if let EnrollResponse::Refused(why) | EnrollResponse::NameTaken(why) = &resp {
        inner
            .metrics
            .enrollments_refused
            .fetch_add(1, Ordering::Relaxed);
        warn!(%remote, "enrollment refused: {why}");
    } else {
        inner.metrics.enrollments_ok.fetch_add(1, Ordering::Relaxed);
    }
    let _ = proto::write_msg(&mut send, &resp).await;
    let _ = send.finish();
    let _ = send.stopped().await;
}

fn enroll(inner: &Inner, conn: &Connection, req: EnrollRequest) -> EnrollResponse {
    let refuse = |s: String| EnrollResponse::Refused(s);
    if let Err(e) = validate_host_name(&req.name) {
        return refuse(e);
    }
    let Ok((id, secret)) = auth::parse_token(&req.token) else {
        return refuse("malformed enrollment token".into());
    };
    let now = proto::now_ms();
    let rec = match inner.store.get_token(&id) {
        Ok(Some(r)) => r,
        Ok(None) => return refuse("unknown enrollment token".into()),
        Err(e) => return refuse(format!("reading the token: {e}")),
    };
    if let Err(e) = auth::check(
        &rec,
        &secret,
        Scope::Enroll,
        conn.remote_address().ip(),
        now,
    ) {
        return refuse(e.to_string());
    }
    // The handshake proved the agent holds the key in this certificate; issue for it.
    let Some(cert) = tls::peer_cert(conn) else {
        return refuse("no client certificate".into());
    };
    match tls::p256_point_in_cert(&cert) {
        Some(k) if k == req.public_key => {}
        _ => return refuse("the public key is not the one of the handshake".into()),
    }
    // A name already enrolled is not taken over: refused (and listed for
    // `octo agents approve`) unless an admin approved this re-enrollment. Checked
    // before the token is spent, so a refused enrollment leaves a one-time token.
    if let Err(resp) = crate::hosts::admit_name(inner, &req.name, conn.remote_address()) {
        return resp;
    }
    if let Err(e) = inner.store.consume_token(&id, now) {
        return refuse(e.to_string());
    }
    let issued = match inner.ca.issue(&req.name, &req.public_key) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    let fp = tls::Fingerprint::of(&issued);
    let host = match inner.store.get_host(&req.name) {
        Ok(Some(mut h)) => {
            h.fingerprint = fingerprint_hex(&fp);
            h
        }
        _ => HostRecord {
            name: req.name.clone(),
            fingerprint: fingerprint_hex(&fp),
            addrs: Vec::new(),
            tags: BTreeMap::new(),
            version: String::new(),
            enrolled_at: now,
            last_seen: now,
            online: false,
            offline_since: Some(now),
            resources: None,
        },
    };
    if let Err(e) = inner.store.put_host(&host) {
        return refuse(format!("recording the host: {e}"));
    }
    info!(host = %req.name, "enrolled");
    EnrollResponse::Ok {
        cert: issued.to_vec(),
        ca: inner.ca.cert.to_vec(),
    }
}

/// A control session: authenticate by CA chain, then pump the host's queue and
/// handle what the agent reports.
async fn serve_ctl(inner: Arc<Inner>, conn: Connection, cancel: CancellationToken) {
    let remote = conn.remote_address();
    let host = match tls::peer_cert(&conn)
        .ok_or_else(|| "no certificate".to_string())
        .and_then(|c| tls::verify_issued(&c, &inner.ca.cert, true).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(e) => {
            inner
                .metrics
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%remote, "closing control connection: {e}");
            conn.close(
                VarInt::from_u32(code::UNAUTHORIZED),
                b"certificate not issued by this center",
            );
            return;
        }
    };
    // Revocation by re-enrollment: only the newest certificate of a host counts, and
    // never one that was revoked (`octo agents rm`, an approved re-enrollment).
    let fp = tls::peer_fingerprint(&conn).map(|f| fingerprint_hex(&f));
    match inner.store.get_host(&host) {
        Ok(Some(h))
            if Some(&h.fingerprint) == fp.as_ref()
                && !crate::hosts::is_revoked(&inner, &h.fingerprint) => {}
        _ => {
            inner
                .metrics
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%remote, %host, "closing control connection: unknown, superseded or revoked certificate");
            conn.close(
                VarInt::from_u32(code::UNAUTHORIZED),
                b"certificate superseded",
            );
            return;
        }
    }
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        return;
    };
    let hello = match proto::read_msg::<AgentMsg>(&mut recv).await {
        Ok(Some(AgentMsg::Hello {
            version,
            addrs,
            tags,
            resources,
        })) => (version, addrs, tags, resources),
        Ok(_) => {
            conn.close(VarInt::from_u32(code::PROTOCOL), b"expected hello");
            return;
        }
        Err(e) => {
            warn!(%remote, %host, "closing control connection: {e}");
            conn.close(VarInt::from_u32(code::PROTOCOL), b"bad message");
            return;
        }
    };
    let now = proto::now_ms();
    if let Ok(Some(mut h)) = inner.store.get_host(&host) {
        let tags: BTreeMap<String, String> = hello.2.into_iter().collect();
        // Write only what changed: a fleet reconnecting after a center restart
        // should not cost one disk sync per host.
        if h.version != hello.0 || h.addrs != hello.1 || h.tags != tags {
            h.version = hello.0;
            h.addrs = hello.1;
            h.tags = tags;
            h.online = true;
            h.offline_since = None;
            h.last_seen = now;
            if let Err(e) = inner.store.put_host(&h) {
                warn!(%host, "recording the host: {e}");
                return;
            }
        }
        let r = postcard::to_stdvec(&hello.3).unwrap_or_default();
        inner.live.lock().unwrap().insert(host.clone(), (now, r));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<CenterMsg>();
    let kick = Arc::new(Notify::new());
    let sid = inner
        .next_session
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(old) = inner.sessions.lock().unwrap().insert(
        host.clone(),
        Session {
            id: sid,
            tx: tx.clone(),
            kick: kick.clone(),
            conn: conn.clone(),
        },
    ) {
        // The old connection's writer ends when its sender is dropped.
        drop(old);
    }
    inner
        .metrics
        .sessions_opened
        .fetch_add(1, Ordering::Relaxed);
    info!(%host, %remote, "agent online");
    let mut centers = vec![inner.quic_addr.to_string()];
    if let Some(r) = &inner.registry {
        match r.centers().await {
            Ok(all) => {
                let me = inner.quic_addr.to_string();
                centers.extend(all.into_values().map(|c| c.addr).filter(|a| *a != me));
            }
            Err(e) => warn!("listing the centers: {e}"),
        }
        let info = crate::zk::AgentInfo {
            addr: remote.to_string(),
            version: VERSION.to_string(),
            center: inner.center_id.clone(),
        };
        if let Err(e) = r.register_agent(&host, &info).await {
            warn!(%host, "registering the agent: {e}");
        }
    }
    let welcome = CenterMsg::Welcome {
        heartbeat_ms: inner.heartbeat.as_millis() as u64,
        centers,
        url_key: inner.content.signer.public_key(),
    };
    if proto::write_msg(&mut send, &welcome).await.is_err() {
        return;
    }
    // Writer: everything for this agent goes through one ordered stream.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if proto::write_msg(&mut send, &m).await.is_err() {
                break;
            }
        }
    });
    // Pump: sends the queue in order; re-runs on every kick.
    let pump = {
        let inner = inner.clone();
        let host = host.clone();
        let tx = tx.clone();
        let kick = kick.clone();
        tokio::spawn(async move {
            let mut sent: HashSet<u64> = HashSet::new();
            // With peers, a task may be queued by another center, which cannot kick
            // this session: look at the shared queue every second as well.
            // FIXME: a watch on the host's queue instead of polling.
            let poll = if inner.registry.is_some() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3600)
            };
            loop {
                pump_queue(&inner, &host, &tx, &mut sent);
                let _ = tokio::time::timeout(poll, kick.notified()).await;
            }
        })
    };
    let dead_after = inner.heartbeat * 3 + Duration::from_secs(2);
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = tokio::time::timeout(dead_after, proto::read_msg::<AgentMsg>(&mut recv)) => m,
        };
        let msg = match msg {
            Err(_) => {
                warn!(%host, "no heartbeat for {dead_after:?}: dropping the session");
                break;
            }
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => break,
            Ok(Err(_)) if cancel.is_cancelled() => break,
            Ok(Err(e)) => {
                warn!(%host, "closing control connection: {e}");
                conn.close(VarInt::from_u32(code::PROTOCOL), b"bad message");
                break;
            }
        };
        if let Err(e) = handle_agent_msg(&inner, &host, remote.ip(), &tx, msg) {
            warn!(%host, "handling an agent message: {e}");
        }
    }
    pump.abort();
    writer.abort();
    let mine = {
        let mut sessions = inner.sessions.lock().unwrap();
        let mine = sessions.get(&host).is_some_and(|s| s.id == sid);
        if mine {
            sessions.remove(&host);
        }
        mine
    };
    if mine {
        inner.content.drop_member(&host);
        // Offline only if it did not move to another center meanwhile.
        let moved = match &inner.registry {
            Some(r) => {
                let _ = r.unregister_agent(&host).await;
                matches!(r.agent(&host).await, Ok(Some(a)) if a.center != inner.center_id)
            }
            None => false,
        };
        if !moved {
            let _ = inner.store.set_online(&host, false, proto::now_ms());
            info!(%host, "agent offline");
        }
    }
}

fn pump_queue(
    inner: &Inner,
    host: &str,
    tx: &mpsc::UnboundedSender<CenterMsg>,
    sent: &mut HashSet<u64>,
) {
    let queue = match inner.store.queue_for(host) {
        Ok(q) => q,
        Err(e) => {
            warn!(%host, "reading the queue: {e}");
            return;
        }
    };
    let now = proto::now_ms();
    for (_, task) in queue {
        if sent.contains(&task) {
            continue;
        }
        let Some(cached) = task_body(inner, task) else {
            continue;
        };
        let expires_at = cached.1;
        // The host's state is read only for a task past its TTL (one read fewer per
        // host and delivery, which counts with a shared store).
        let expired = now > expires_at
            && !inner
                .running
                .lock()
                .unwrap()
                .contains(&(task, host.to_string()))
            && inner
                .store
                .result(task, host)
                .ok()
                .flatten()
                .is_some_and(|r| r.state == HostState::Queued);
        if expired {
            // Never delivered and too old: the TTL applies only to what has not
            // reached the agent.
            if inner.store.expire(host, task, now).is_ok() {
                push_event(inner, task, host, "state", "expired");
                after_host_final(inner, task);
            }
            continue;
        }
        let mut body = cached.0.clone();
        // Delivery-time parts of a copy: the seed's current ticket, a fresh URL.
        if let TaskBody::Fetch(spec) = &mut body {
            if let Some(seed) = &spec.seed {
                // Ours, or (with several centers) the one the seeding center published.
                let published = || {
                    inner
                        .store
                        .get_meta(&format!("seed.{seed}"))
                        .ok()
                        .flatten()
                        .and_then(|t| String::from_utf8(t).ok())
                        .filter(|t| !t.is_empty())
                };
                match inner.content.seed_ticket(seed).or_else(published) {
                    Some(t) => spec.ticket = t,
                    // Not up yet (a restarted center restores it): wait for the kick.
                    None => continue,
                }
            }
            if let Some(pf) = &mut spec.pool {
                pf.query = inner.content.sign(&pf.md5);
            }
            spec.tags = locality_tags(inner, host);
        }
        sent.insert(task);
        let _ = tx.send(CenterMsg::Task {
            task,
            body,
            expires_at,
        });
    }
}

/// A running task's body and expiry, if it is cached (no store read).
pub(crate) fn cached_task_body(inner: &Inner, task: u64) -> Option<Arc<(TaskBody, u64)>> {
    inner.bodies.lock().unwrap().get(&task).cloned()
}

/// A task's body and expiry, from the cache or the store.
pub(crate) fn task_body(inner: &Inner, task: u64) -> Option<Arc<(TaskBody, u64)>> {
    if let Some(b) = inner.bodies.lock().unwrap().get(&task) {
        return Some(b.clone());
    }
    let rec = inner.store.get_task(task).ok()??;
    let body = match postcard::from_bytes::<TaskBody>(&rec.body) {
        Ok(b) => b,
        Err(e) => {
            warn!(task, "undecodable task body: {e}");
            return None;
        }
    };
    let entry = Arc::new((body, rec.created_at.saturating_add(rec.ttl_ms)));
    // Only running tasks are pumped; a listing of finished ones must not fill it.
    if rec.state == TaskState::Running {
        let mut cache = inner.bodies.lock().unwrap();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(task, entry.clone());
    }
    Some(entry)
}

/// Tag keys that say where a host is, most specific last; peers sharing more of them
/// are preferred as sources in a copy.
pub const LOCALITY_KEYS: &[&str] = &["region", "idc", "rack"];

/// `key=value` for each of the host's locality tags.
fn locality_tags(inner: &Inner, host: &str) -> Vec<String> {
    match inner.store.get_host(host) {
        Ok(Some(h)) => LOCALITY_KEYS
            .iter()
            .filter_map(|k| h.tags.get(*k).map(|v| format!("{k}={v}")))
            .collect(),
        _ => Vec::new(),
    }
}

/// Replaces a running copy's source with a center-held seed (the CLI that seeded it is
/// leaving while hosts are still offline), and re-pumps the hosts still queued.
pub(crate) async fn adopt_copy(
    inner: &Inner,
    id: u64,
    files: &[crate::content::UploadedFile],
) -> Result<String, crate::api::ApiError> {
    use crate::api::ApiError;
    let rec = inner
        .store
        .get_task(id)
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    if rec.state != TaskState::Running {
        return Err(ApiError::bad_request(format!("task {id} is finished")));
    }
    let mut body: TaskBody = postcard::from_bytes(&rec.body).map_err(ApiError::internal)?;
    let TaskBody::Fetch(spec) = &mut body else {
        return Err(ApiError::bad_request(format!("task {id} is not a copy")));
    };
    if spec.pool.is_some() || spec.seed.is_some() {
        return Err(ApiError::bad_request(format!(
            "task {id} already takes its content from the center"
        )));
    }
    let seed = new_seed(inner, files).await?;
    spec.seed = Some(seed.clone());
    inner
        .store
        .set_task_body(
            id,
            postcard::to_stdvec(&body).expect("task body serializes"),
        )
        .map_err(ApiError::internal)?;
    inner.content.bind_seed(&seed, id);
    inner.bodies.lock().unwrap().remove(&id);
    let hosts: Vec<String> = inner
        .store
        .results(id)
        .map_err(ApiError::internal)?
        .into_iter()
        .filter(|r| !r.state.is_final())
        .map(|r| r.host)
        .collect();
    kick_hosts(inner, &hosts);
    Ok(seed)
}

/// Starts seeding uploaded files for a copy and publishes the seed (see
/// [`publish_seed`]); returns its name.
pub(crate) async fn new_seed(
    inner: &Inner,
    files: &[crate::content::UploadedFile],
) -> Result<String, crate::api::ApiError> {
    let seed = inner
        .content
        .create_seed(files)
        .await
        .map_err(crate::api::ApiError::bad_request)?;
    publish_seed(inner, &seed);
    Ok(seed)
}

/// With several centers, a center publishes the ticket of each seed it runs in the
/// shared store, so a center whose agent needs it can hand it out.
fn publish_seed(inner: &Inner, name: &str) {
    let (Some(_), Some(ticket)) = (&inner.registry, inner.content.seed_ticket(name)) else {
        return;
    };
    if let Err(e) = inner
        .store
        .put_meta(&format!("seed.{name}"), ticket.as_bytes())
    {
        warn!(seed = name, "publishing the seed's ticket: {e}");
    }
}

/// Whether a task is still running (unknown ones are not).
pub(crate) fn task_open(store: &dyn Store, task: u64) -> bool {
    matches!(store.get_task(task), Ok(Some(t)) if t.state == TaskState::Running)
}

fn handle_agent_msg(
    inner: &Inner,
    host: &str,
    ip: std::net::IpAddr,
    tx: &mpsc::UnboundedSender<CenterMsg>,
    msg: AgentMsg,
) -> Result<(), crate::store::StoreError> {
    let now = proto::now_ms();
    match msg {
        AgentMsg::Hello { .. } => {}
        AgentMsg::Progress { task, bytes, total } => {
            inner.content.set_progress(task, host, bytes, total);
        }
        AgentMsg::Holdings { pool_port, md5s } => {
            inner.content.set_holdings(host, ip, pool_port, md5s);
        }
        AgentMsg::Heartbeat(r) => {
            let r = postcard::to_stdvec(&r).unwrap_or_default();
            inner
                .live
                .lock()
                .unwrap()
                .insert(host.to_string(), (now, r));
        }
        AgentMsg::Ack { task } => {
            if inner
                .running
                .lock()
                .unwrap()
                .insert((task, host.to_string()))
            {
                push_event(inner, task, host, "state", "running");
            }
        }
        AgentMsg::Output { task, stream, data } => {
            let kind = match stream {
                octopus_agent::exec::OutStream::Stdout => "stdout",
                octopus_agent::exec::OutStream::Stderr => "stderr",
            };
            push_event(inner, task, host, kind, &String::from_utf8_lossy(&data));
        }
        AgentMsg::Done {
            task,
            outcome,
            started_at,
            finished_at,
        } => {
            let mut r = HostOutcome::bare(HostState::Ok, Some(started_at), finished_at, None);
            match outcome {
                Outcome::Ran(x) => {
                    r.state = if x.timed_out {
                        HostState::TimedOut
                    } else if x.exit_code == Some(0) {
                        HostState::Ok
                    } else {
                        HostState::Failed
                    };
                    r.exit_code = x.exit_code;
                    r.signal = x.signal;
                    r.stdout = x.stdout;
                    r.stderr = x.stderr;
                    r.stdout_truncated = x.stdout_truncated;
                    r.stderr_truncated = x.stderr_truncated;
                }
                Outcome::Error(e) => {
                    r.state = HostState::Failed;
                    r.error = Some(e);
                }
                Outcome::AlreadyRan => {
                    r.state = HostState::Lost;
                    r.error = Some(
                        "the agent had started this task before and lost its result; not run twice"
                            .into(),
                    );
                }
                Outcome::Cancelled => r.state = HostState::Cancelled,
            }
            let _ = inner.finish_tx.send(Finished {
                host: host.to_string(),
                task,
                outcome: r,
                reply: tx.clone(),
            });
        }
    }
    Ok(())
}

pub fn state_name(s: HostState) -> &'static str {
    match s {
        HostState::Pending => "pending",
        HostState::Queued => "queued",
        HostState::Delivered => "delivered",
        HostState::Running => "running",
        HostState::Ok => "ok",
        HostState::Failed => "failed",
        HostState::TimedOut => "timed-out",
        HostState::Expired => "expired",
        HostState::Cancelled => "cancelled",
        HostState::Lost => "lost",
    }
}

/// After a host of `task` reached a final state: release the next wave of a batched
/// rollout, or stop it when too many hosts failed.
pub(crate) fn after_host_final(inner: &Inner, task: u64) {
    let Ok(Some(rec)) = inner.store.get_task(task) else {
        return;
    };
    if rec.state != TaskState::Running {
        inner.bodies.lock().unwrap().remove(&task);
        if let Some(log) = inner.events.lock().unwrap().logs.get_mut(&task) {
            log.finished_at.get_or_insert(proto::now_ms());
        }
        inner.events_changed.notify_waiters();
        return;
    }
    let Ok(results) = inner.store.results(task) else {
        return;
    };
    let failed = results
        .iter()
        .filter(|r| {
            matches!(
                r.state,
                HostState::Failed | HostState::TimedOut | HostState::Lost
            )
        })
        .count() as u32;
    if let Some(max) = rec.max_failures {
        if failed > max {
            let now = proto::now_ms();
            let pending: Vec<String> = results
                .iter()
                .filter(|r| r.state == HostState::Pending)
                .map(|r| r.host.clone())
                .collect();
            if !pending.is_empty() {
                info!(task, failed, max, "too many failures: stopping the rollout");
                for h in &pending {
                    let why = format!("rollout stopped after {failed} failures");
                    let o = HostOutcome::bare(HostState::Cancelled, None, now, Some(why));
                    if inner.store.finish(h, task, o).unwrap_or(false) {
                        push_event(inner, task, h, "state", "cancelled");
                    }
                }
            }
            inner.events_changed.notify_waiters();
            return;
        }
    }
    if rec.batch > 0 {
        let active = results
            .iter()
            .filter(|r| {
                matches!(
                    r.state,
                    HostState::Queued | HostState::Delivered | HostState::Running
                )
            })
            .count() as u32;
        let free = rec.batch.saturating_sub(active) as usize;
        let next: Vec<String> = results
            .iter()
            .filter(|r| r.state == HostState::Pending)
            .take(free)
            .map(|r| r.host.clone())
            .collect();
        if !next.is_empty() && inner.store.release(task, &next, proto::now_ms()).is_ok() {
            for h in &next {
                push_event(inner, task, h, "state", "queued");
            }
            kick_hosts(inner, &next);
        }
    }
    inner.events_changed.notify_waiters();
}

pub(crate) fn kick_hosts(inner: &Inner, hosts: &[String]) {
    let sessions = inner.sessions.lock().unwrap();
    for h in hosts {
        if let Some(s) = sessions.get(h) {
            s.kick.notify_one();
        }
    }
}

pub(crate) fn send_to(inner: &Inner, host: &str, msg: CenterMsg) -> bool {
    let sessions = inner.sessions.lock().unwrap();
    sessions.get(host).is_some_and(|s| s.tx.send(msg).is_ok())
}

pub(crate) fn online_count(inner: &Inner) -> usize {
    inner.sessions.lock().unwrap().len()
}

pub(crate) fn is_online(inner: &Inner, host: &str) -> bool {
    inner.sessions.lock().unwrap().contains_key(host)
        || inner.online_anywhere.lock().unwrap().contains_key(host)
}

/// The id of the center `host` has its session with, if any.
pub(crate) fn center_of(inner: &Inner, host: &str) -> Option<String> {
    if inner.sessions.lock().unwrap().contains_key(host) {
        return Some(inner.center_id.clone());
    }
    inner.online_anywhere.lock().unwrap().get(host).cloned()
}

fn event_size(e: &TaskEvent) -> usize {
    e.data.len() + e.host.len() + 32
}

pub(crate) fn push_event(inner: &Inner, task: u64, host: &str, kind: &str, data: &str) {
    {
        let mut all = inner.events.lock().unwrap();
        let EventLogs { logs, bytes } = &mut *all;
        let log = logs.entry(task).or_default();
        let ev = TaskEvent {
            seq: log.next,
            host: host.to_string(),
            kind: kind.to_string(),
            data: data.to_string(),
        };
        log.next += 1;
        log.bytes += event_size(&ev);
        *bytes += event_size(&ev);
        log.events.push_back(ev);
        while log.bytes > EVENT_LOG_BYTES {
            match log.events.pop_front() {
                Some(old) => {
                    log.bytes -= event_size(&old);
                    *bytes -= event_size(&old);
                }
                None => break,
            }
        }
        if *bytes > EVENT_TOTAL_BYTES {
            trim_events(&mut all);
        }
    }
    inner.events_changed.notify_waiters();
}

/// Brings all logs together under 7/8 of [`EVENT_TOTAL_BYTES`], taking the oldest
/// events of the largest log first.
fn trim_events(all: &mut EventLogs) {
    let target = EVENT_TOTAL_BYTES / 8 * 7;
    while all.bytes > target {
        let Some(log) = all.logs.values_mut().max_by_key(|l| l.bytes) else {
            return;
        };
        if log.events.is_empty() {
            return;
        }
        let goal = log.bytes / 2;
        while log.bytes > goal && all.bytes > target {
            match log.events.pop_front() {
                Some(old) => {
                    log.bytes -= event_size(&old);
                    all.bytes -= event_size(&old);
                }
                None => break,
            }
        }
    }
}

/// Events of `task` with `seq >= after`, the next seq to ask for, and whether events
/// the caller had not read yet were dropped (the live view is truncated; the stored
/// result has the output up to its own cap).
pub(crate) fn events_since(inner: &Inner, task: u64, after: u64) -> (Vec<TaskEvent>, u64, bool) {
    let all = inner.events.lock().unwrap();
    match all.logs.get(&task) {
        Some(log) => {
            let first = log.events.front().map_or(log.next, |e| e.seq);
            (
                log.events
                    .iter()
                    .filter(|e| e.seq >= after)
                    .cloned()
                    .collect(),
                log.next,
                after < first,
            )
        }
        None => (Vec::new(), after, false),
    }
}

/// Stores results in groups: whatever arrived while the previous commit ran goes into
/// the next one. Only after the commit is the agent told it may forget the result.
async fn committer(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Finished>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let items: Vec<(String, u64, HostOutcome)> = batch
            .iter()
            .map(|f| (f.host.clone(), f.task, f.outcome.clone()))
            .collect();
        let store = inner.store.clone();
        let res = tokio::task::spawn_blocking(move || store.finish_many(items)).await;
        let stored = match res {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                // Not acknowledged: the agents keep the results and resend them.
                warn!("storing {} results: {e}", batch.len());
                continue;
            }
            Err(e) => {
                warn!("storing results: {e}");
                continue;
            }
        };
        inner.metrics.result_commits.fetch_add(1, Ordering::Relaxed);
        let mut tasks = std::collections::BTreeSet::new();
        for (f, stored) in batch.into_iter().zip(stored) {
            // Acknowledge even a duplicate report, so the agent forgets it.
            let _ = f.reply.send(CenterMsg::DoneAck { task: f.task });
            inner
                .running
                .lock()
                .unwrap()
                .remove(&(f.task, f.host.clone()));
            if stored {
                inner.metrics.results_stored.fetch_add(1, Ordering::Relaxed);
                push_event(
                    &inner,
                    f.task,
                    &f.host,
                    "state",
                    state_name(f.outcome.state),
                );
                tasks.insert(f.task);
            }
        }
        for t in tasks {
            after_host_final(&inner, t);
        }
    }
}

/// Once a second: expire queued entries of offline hosts whose TTL passed, and drop
/// event logs of tasks finished a while ago.
async fn sweeper(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seed_tick = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = proto::now_ms();
        if seed_tick.is_multiple_of(10) {
            prune_audit(&inner).await;
        }
        if let Some(s) = inner.audit_gate.flush(now) {
            append_gate_summary(&inner, s);
        }
        let Ok(tasks) = inner.store.list_tasks(None, 1000) else {
            continue;
        };
        for t in tasks.iter().filter(|t| t.state == TaskState::Running) {
            if now <= t.created_at.saturating_add(t.ttl_ms) {
                continue;
            }
            let Ok(results) = inner.store.results(t.id) else {
                continue;
            };
            let running = inner.running.lock().unwrap().clone();
            for r in results.iter().filter(|r| {
                matches!(r.state, HostState::Queued | HostState::Pending)
                    && !running.contains(&(t.id, r.host.clone()))
            }) {
                if inner.store.expire(&r.host, t.id, now).is_ok() {
                    push_event(&inner, t.id, &r.host, "state", "expired");
                }
            }
            after_host_final(&inner, t.id);
        }
        let done: HashSet<u64> = tasks
            .iter()
            .filter(|t| t.state != TaskState::Running && now > t.created_at + 3_600_000)
            .map(|t| t.id)
            .collect();
        {
            // Followers of a finished task have a minute to catch up, then read the
            // stored results.
            let mut all = inner.events.lock().unwrap();
            let EventLogs { logs, bytes } = &mut *all;
            logs.retain(|id, log| {
                let keep = !done.contains(id)
                    && log
                        .finished_at
                        .is_none_or(|f| now < f.saturating_add(EVENT_KEEP_MS));
                if !keep {
                    *bytes -= log.bytes;
                }
                keep
            });
        }
        inner.content.forget_progress(&done);
        seed_tick += 1;
        if seed_tick.is_multiple_of(10) {
            let st = inner.store.clone();
            inner
                .content
                .sweep_seeds(|t| task_open(st.as_ref(), t))
                .await;
        }
    }
}

/// Audit retention: the newest `audit_keep` entries stay.
async fn prune_audit(inner: &Arc<Inner>) {
    let (store, keep) = (inner.store.clone(), inner.audit_keep);
    match tokio::task::spawn_blocking(move || store.prune_audit(keep)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => debug!(n, keep, "pruned the audit log"),
        Ok(Err(e)) => warn!("pruning the audit log: {e}"),
        Err(e) => warn!("pruning the audit log: {e}"),
    }
}

/// One audit entry standing for the unauthenticated calls of a minute that were only
/// counted (see [`crate::caps::AuditGate`]).
pub(crate) fn append_gate_summary(inner: &Inner, detail: String) {
    let entry = crate::store::AuditEntry {
        seq: 0,
        at: proto::now_ms(),
        token: "-".into(),
        addr: String::new(),
        method: "-".into(),
        path: "(unauthenticated calls, counted)".into(),
        status: 401,
        detail,
    };
    if let Err(e) = inner.store.append_audit(entry) {
        warn!("writing the audit log: {e}");
    }
}

/// Creates a task for the hosts `target` selects, queues it durably, and pushes it to
/// the online hosts. Returns the task record.
/// What a caller asks for when creating a task.
#[derive(Debug)]
pub(crate) struct TaskRequest {
    pub target: String,
    pub body: TaskBody,
    pub summary: String,
    pub ttl: Duration,
    pub batch: Batch,
    pub max_failures: Option<u32>,
}

pub(crate) fn create_task(
    inner: &Inner,
    created_by: &str,
    req: TaskRequest,
) -> Result<TaskRecord, crate::api::ApiError> {
    use crate::api::ApiError;
    let TaskRequest {
        target,
        body,
        summary,
        ttl,
        batch,
        max_failures,
    } = req;
    let target = target.as_str();
    let body = &body;
    let t =
        crate::target::Target::parse(target).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hosts = inner.store.list_hosts()?;
    let selected = t.select(hosts.iter().map(|h| (h.name.as_str(), &h.tags)));
    if selected.is_empty() {
        return Err(ApiError::not_found(format!(
            "target {:?} matches no host",
            crate::caps::cut(target, crate::caps::ECHO_MAX)
        )));
    }
    let batch_n = match batch {
        Batch::All => 0,
        Batch::Count(n) => n.max(1),
        Batch::Percent(p) => ((selected.len() as u64 * u64::from(p)).div_ceil(100)).max(1) as u32,
    };
    let now = proto::now_ms();
    let rec = NewTask {
        created_by: created_by.to_string(),
        target: target.to_string(),
        hosts: selected.clone(),
        body: postcard::to_stdvec(body).expect("task body serializes"),
        summary,
        ttl_ms: ttl.as_millis() as u64,
        batch: batch_n,
        max_failures,
    };
    let id = inner.store.create_task(rec, now)?;
    inner.metrics.tasks_created.fetch_add(1, Ordering::Relaxed);
    let rec = inner
        .store
        .get_task(id)
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("the task vanished after creation"))?;
    for h in &selected {
        push_event(
            inner,
            id,
            h,
            "state",
            if is_online(inner, h) {
                "queued"
            } else {
                "queued-offline"
            },
        );
    }
    kick_hosts(inner, &selected);
    Ok(rec)
}

/// How a task rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Batch {
    All,
    Count(u32),
    Percent(u32),
}

impl std::str::FromStr for Batch {
    type Err = String;
    fn from_str(s: &str) -> Result<Batch, String> {
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p
                .parse()
                .map_err(|_| format!("bad batch percentage {s:?}"))?;
            if p == 0 || p > 100 {
                return Err(format!("batch percentage {p} is not in 1..=100"));
            }
            Ok(Batch::Percent(p))
        } else {
            let n: u32 = s.parse().map_err(|_| format!("bad batch size {s:?}"))?;
            if n == 0 {
                return Err("batch size must be at least 1".into());
            }
            Ok(Batch::Count(n))
        }
    }
}

/// Cancels a task: hosts not yet final are marked cancelled, and agents running it
/// are told to stop.
pub(crate) fn cancel_task(inner: &Inner, id: u64) -> Result<Vec<String>, crate::store::StoreError> {
    let open: Vec<String> = inner
        .store
        .results(id)?
        .into_iter()
        .filter(|r| !r.state.is_final())
        .map(|r| r.host)
        .collect();
    let mut delivered = inner.store.cancel_task(id, proto::now_ms())?;
    // Acknowledgements live in memory, so the store may not know who runs it: tell
    // every host that had it open (an agent ignores a cancel for a task it never got).
    for h in &open {
        if send_to(inner, h, CenterMsg::Cancel { task: id }) && !delivered.contains(h) {
            delivered.push(h.clone());
        }
    }
    if let Ok(rs) = inner.store.results(id) {
        for r in rs.iter().filter(|r| r.state == HostState::Cancelled) {
            push_event(inner, id, &r.host, "state", "cancelled");
        }
    }
    if let Some(log) = inner.events.lock().unwrap().logs.get_mut(&id) {
        log.finished_at.get_or_insert(proto::now_ms());
    }
    inner.events_changed.notify_waiters();
    Ok(delivered)
}

/// Host names become certificate names and targets: letters, digits, `-`, `_`, `.`,
/// 1 to 253 bytes, not starting with `-` or `.`.
pub fn validate_host_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 253 {
        return Err(format!("host name {name:?} must be 1 to 253 bytes"));
    }
    if name.starts_with(['-', '.']) || !name.chars().all(ok_char) {
        return Err(format!(
            "host name {name:?} may hold only letters, digits, '-', '_' and '.', and not start with '-' or '.'"
        ));
    }
    Ok(())
}
