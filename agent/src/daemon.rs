//! The agent daemon: enrollment, the session with the center, and running tasks.
//!
//! Why it is shaped like this:
//!
//! * **One identity per node.** The agent's key and its CA-issued certificate live in
//!   its data directory; the same identity serves the control session now and the
//!   transfer engine's connections later.
//! * **At most once, across reconnects and restarts.** Before a task starts, its id is
//!   appended to `started.log` and synced. A task id found there is never run again:
//!   a redelivery gets the stored result (from `results/`) or, if the result was lost
//!   with a crash mid-run, [`Outcome::AlreadyRan`].
//! * **Nothing finished is lost.** A result is written to `results/<id>` before it is
//!   sent, and deleted only when the center acknowledges it; every new session re-sends
//!   what is still there.
//! * **Tasks run in the order they arrive**, one at a time, independently of the
//!   connection: a task keeps running while the center is away.
//! * **Reconnects back off exponentially with full jitter** (0.5 s doubling to 30 s),
//!   so a restarted center is not hit by every agent at the same instant.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use octopus_transfer::tls::{self, Fingerprint, Identity, ServerCheck};
use quinn::{Endpoint, VarInt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::exec::{self, OutStream};
use crate::hostinfo::{self, Sampler};
use crate::proto::{
    self, code, AgentMsg, CenterMsg, EnrollRequest, EnrollResponse, Outcome, TaskBody, ALPN_CTL,
    ALPN_ENROLL, MAX_OUTPUT_CHUNK,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The center's address (its UDP port is the API's TCP port).
    pub center: SocketAddr,
    /// Needed on first start only.
    pub enroll_token: Option<String>,
    pub data_dir: PathBuf,
    pub name: String,
    pub tags: Vec<(String, String)>,
    /// Load testing only (`octo load`): tasks are answered at once with exit code 0
    /// instead of running, and the journal is not synced. The protocol, enrollment,
    /// heartbeats and deduplication are the real ones.
    pub simulate: bool,
    /// Disk quota of the content cache (`data_dir/cache`); 0 disables the cache and
    /// with it the HTTP pool.
    pub cache_quota: u64,
    /// Where the HTTP pool listens (`None`: no pool). Other agents reach it at this
    /// host's address as the center sees it, on the bound port.
    pub pool_listen: Option<SocketAddr>,
    /// This agent's upload and download limits, shared by all its transfers (bytes
    /// per second; `None` is unlimited).
    pub limit_up: Option<u64>,
    pub limit_down: Option<u64>,
}

/// Default cache quota: 10 GiB.
pub const DEFAULT_CACHE_QUOTA: u64 = 10 << 30;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("using the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this agent is not enrolled yet: pass --token with an enroll token (octo token create --scope enroll)")]
    NotEnrolled,
    #[error("malformed enrollment token: {0}")]
    BadToken(String),
    #[error("enrolling with the center: {0}")]
    Enroll(String),
    #[error("setting up TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("binding the QUIC endpoint: {0}")]
    Endpoint(String),
    #[error("opening the content cache: {0}")]
    Cache(String),
    #[error("starting the HTTP pool: {0}")]
    Pool(String),
}

/// Splits `octo_<id>_<secret>.<ca sha256 hex>` into the API token part and the CA
/// fingerprint to pin.
pub fn parse_enroll_token(t: &str) -> Result<(String, Fingerprint), AgentError> {
    let (tok, hex) = t
        .trim()
        .rsplit_once('.')
        .ok_or_else(|| AgentError::BadToken("no CA fingerprint after a '.'".into()))?;
    if hex.len() != 64 {
        return Err(AgentError::BadToken(
            "the CA fingerprint must be 64 hex digits".into(),
        ));
    }
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| AgentError::BadToken("the CA fingerprint is not hex".into()))?;
    }
    Ok((tok.to_string(), Fingerprint(fp)))
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn io<T>(&self, r: std::io::Result<T>) -> Result<T, AgentError> {
        r.map_err(|source| AgentError::DataDir {
            path: self.dir.clone(),
            source,
        })
    }
}

/// Everything in the agent's data directory (key, certificates, journal, results,
/// centers list) is 0600 in a 0700 directory.
const PRIVATE: u32 = 0o600;

/// Files the agent keeps in its data directory, tightened at start if an older
/// version left them wider.
const DATA_FILES: &[&str] = &[
    "agent.key",
    "agent.cert",
    "ca.cert",
    "centers",
    "started.log",
];

fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    // On the descriptor: a leftover temporary file keeps its old mode otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The agent's identity and the CA it trusts, enrolling first if needed.
async fn identity(cfg: &AgentConfig, ep: &Endpoint) -> Result<(Identity, Vec<u8>), AgentError> {
    let f = Files {
        dir: cfg.data_dir.clone(),
    };
    let (cert, key, ca) = (f.p("agent.cert"), f.p("agent.key"), f.p("ca.cert"));
    if cert.exists() && key.exists() && ca.exists() {
        let id = Identity::from_der(
            f.io(std::fs::read(&cert))?,
            Vec::new(),
            f.io(std::fs::read(&key))?,
        );
        return Ok((id, f.io(std::fs::read(&ca))?));
    }
    let token = cfg.enroll_token.as_deref().ok_or(AgentError::NotEnrolled)?;
    let (api_token, ca_fp) = parse_enroll_token(token)?;
    let own = Identity::generate()?;
    let conn = octopus_transfer::net::connect_check(
        ep,
        &own,
        cfg.center,
        ServerCheck::CaFingerprint(ca_fp),
        ALPN_ENROLL,
    )
    .await
    .map_err(|e| AgentError::Enroll(format!("connecting to {}: {e}", cfg.center)))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| AgentError::Enroll(e.to_string()))?;
    let req = EnrollRequest {
        token: api_token,
        name: cfg.name.clone(),
        public_key: own.public_key_raw()?,
    };
    proto::write_msg(&mut send, &req)
        .await
        .map_err(|e| AgentError::Enroll(e.to_string()))?;
    let _ = send.finish();
    let resp: EnrollResponse = proto::read_msg(&mut recv)
        .await
        .map_err(|e| AgentError::Enroll(e.to_string()))?
        .ok_or_else(|| AgentError::Enroll("the center closed the stream".into()))?;
    conn.close(VarInt::from_u32(code::NORMAL), b"enrolled");
    let (cert_der, ca_der) = match resp {
        EnrollResponse::Ok { cert, ca } => (cert, ca),
        EnrollResponse::Refused(why) => return Err(AgentError::Enroll(why)),
    };
    if Fingerprint::of(&ca_der) != ca_fp {
        return Err(AgentError::Enroll(
            "the center sent a CA other than the token's".into(),
        ));
    }
    tls::verify_issued(&cert_der, &ca_der, true)?;
    f.io(octopus_transfer::safefs::ensure_private_dir(&f.dir).map(drop))?;
    f.io(write_file(&key, own.key_pkcs8(), PRIVATE))?;
    f.io(write_file(&ca, &ca_der, PRIVATE))?;
    f.io(write_file(&cert, &cert_der, PRIVATE))?;
    info!(name = %cfg.name, "enrolled with the center");
    Ok((own.with_cert(cert_der, Vec::new()), ca_der))
}

/// Durable bookkeeping for at-most-once execution and result delivery.
struct Journal {
    started: HashSet<u64>,
    log: std::fs::File,
    results_dir: PathBuf,
    /// Sync the start record before running (always, except in simulation).
    durable: bool,
}

impl Journal {
    fn open(dir: &Path) -> std::io::Result<Journal> {
        let path = dir.join("started.log");
        let bytes = std::fs::read(&path).unwrap_or_default();
        // A torn last record (crash mid-append) is ignored: its task never started.
        let started = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(PRIVATE)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?
        };
        // Drop a torn tail so later records stay aligned.
        log.set_len((bytes.len() / 8 * 8) as u64)?;
        let results_dir = dir.join("results");
        octopus_transfer::safefs::ensure_private_dir(&results_dir)?;
        Ok(Journal {
            started,
            log,
            results_dir,
            durable: true,
        })
    }

    /// Records that `task` starts now. Synced before the task runs.
    fn start(&mut self, task: u64) -> std::io::Result<()> {
        self.log.write_all(&task.to_le_bytes())?;
        if self.durable {
            self.log.sync_data()?;
        }
        self.started.insert(task);
        Ok(())
    }

    fn save_result(&self, task: u64, msg: &AgentMsg) -> std::io::Result<()> {
        let body = postcard::to_stdvec(msg).expect("serializes");
        write_file(&self.results_dir.join(task.to_string()), &body, PRIVATE)
    }

    fn result(&self, task: u64) -> Option<AgentMsg> {
        let b = std::fs::read(self.results_dir.join(task.to_string())).ok()?;
        postcard::from_bytes(&b).ok()
    }

    fn forget_result(&self, task: u64) {
        let _ = std::fs::remove_file(self.results_dir.join(task.to_string()));
    }

    fn pending_results(&self) -> Vec<AgentMsg> {
        let mut ids: Vec<u64> = std::fs::read_dir(&self.results_dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids.into_iter().filter_map(|i| self.result(i)).collect()
    }
}

struct State {
    journal: Mutex<Journal>,
    /// The current session's outgoing queue, if connected.
    session: Mutex<Option<mpsc::UnboundedSender<AgentMsg>>>,
    queue: Mutex<VecDeque<(u64, TaskBody)>>,
    queued: Notify,
    /// Cancellation of the running task, by id.
    running: Mutex<BTreeMap<u64, CancellationToken>>,
    cancelled: Mutex<HashSet<u64>>,
    fetch: crate::fetch::FetchCtx,
    /// Every center this agent knows (the configured one first, then what the centers
    /// announce), and which one it tries next. Persisted in `data_dir/centers`.
    centers: Mutex<(Vec<SocketAddr>, usize)>,
    /// The center's URL-signing key, from its welcome; the pool checks URLs with it.
    url_key: crate::pool::CenterKey,
    pool_port: u16,
}

impl State {
    /// What the pool serves, for the center's redirects.
    fn holdings(&self) -> AgentMsg {
        let md5s = match &self.fetch.cache {
            Some(c) if self.pool_port != 0 => c
                .entries()
                .into_iter()
                .take(proto::MAX_HOLDINGS)
                .map(|(m, _, _)| m)
                .collect(),
            _ => Vec::new(),
        };
        AgentMsg::Holdings {
            pool_port: self.pool_port,
            md5s,
        }
    }
}

impl State {
    fn send(&self, m: AgentMsg) {
        if let Some(tx) = self.session.lock().unwrap().as_ref() {
            let _ = tx.send(m);
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
    /// Waits until the agent stops by itself (it only does on shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Enrolls if needed, then serves until shut down. Errors before the first session
/// (not enrolled, enrollment refused) are returned; later ones are retried.
pub async fn spawn(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    // 0700, not a link, ours; what an older version left wider is tightened.
    octopus_transfer::safefs::ensure_private_dir(&cfg.data_dir)
        .and_then(|_| {
            DATA_FILES.iter().try_for_each(|f| {
                octopus_transfer::safefs::make_private_file(&cfg.data_dir.join(f))
            })
        })
        .map_err(|source| AgentError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
    // The enrollment endpoint has a throwaway self-signed identity; the session's is
    // rebuilt with the issued certificate below.
    let boot = Identity::generate()?;
    let ep = octopus_transfer::net::endpoint(
        "0.0.0.0:0".parse().expect("valid"),
        &boot,
        &tls::Trust::Standalone,
    )
    .map_err(|e| AgentError::Endpoint(e.to_string()))?;
    let (id, ca) = identity(&cfg, &ep).await?;
    let mut journal = Journal::open(&cfg.data_dir).map_err(|source| AgentError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    journal.durable = !cfg.simulate;
    let simulate = cfg.simulate;
    let cache = if cfg.cache_quota > 0 && !simulate {
        let dir = cfg.data_dir.join("cache");
        Some(Arc::new(
            crate::cache::ContentCache::open(&dir, cfg.cache_quota)
                .map_err(|e| AgentError::Cache(e.to_string()))?,
        ))
    } else {
        None
    };
    let url_key: crate::pool::CenterKey = Arc::default();
    let mut centers = vec![cfg.center];
    for c in load_centers(&cfg.data_dir) {
        if !centers.contains(&c) {
            centers.push(c);
        }
    }
    let pool = match (&cache, cfg.pool_listen) {
        (Some(c), Some(listen)) => Some(
            crate::pool::spawn(listen, c.clone(), url_key.clone())
                .await
                .map_err(|e| AgentError::Pool(format!("binding {listen}: {e}")))?,
        ),
        _ => None,
    };
    let state = Arc::new(State {
        centers: Mutex::new((centers, 0)),
        fetch: crate::fetch::FetchCtx {
            cache,
            center: Arc::new(Mutex::new(cfg.center)),
            node_up: octopus_transfer::limit::Limiter::new(cfg.limit_up),
            node_down: octopus_transfer::limit::Limiter::new(cfg.limit_down),
            cached: Arc::default(),
        },
        url_key,
        pool_port: pool.as_ref().map_or(0, |p| p.local_addr().port()),
        journal: Mutex::new(journal),
        session: Mutex::new(None),
        queue: Mutex::new(VecDeque::new()),
        queued: Notify::new(),
        running: Mutex::new(BTreeMap::new()),
        cancelled: Mutex::new(HashSet::new()),
    });
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(runner(state.clone(), cancel.clone(), simulate));
    let announcer = {
        // Tell the center what the pool serves whenever the cache gains content.
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                st.fetch.cached.notified().await;
                st.send(st.holdings());
            }
        })
    };
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        let mut sampler = Sampler::new();
        loop {
            let started = std::time::Instant::now();
            let center = {
                let g = state.centers.lock().unwrap();
                g.0[g.1 % g.0.len()]
            };
            let res = session(&cfg, center, &ep, &id, &ca, &state, &mut sampler, &c).await;
            *state.session.lock().unwrap() = None;
            if c.is_cancelled() {
                break;
            }
            // Next time, the next center: one that died is not retried first.
            {
                let mut g = state.centers.lock().unwrap();
                g.1 = (g.1 + 1) % g.0.len();
            }
            match res {
                Ok(()) => info!("session with the center ended"),
                Err(e) => warn!("session with the center: {e}"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            // Full jitter: anywhere in [0, backoff], so a fleet spreads out.
            let wait = backoff.mul_f64(rand::random::<f64>());
            debug!(?wait, "reconnecting");
            tokio::select! {
                _ = c.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        runner.abort();
        announcer.abort();
        if let Some(p) = pool {
            p.shutdown().await;
        }
        ep.close(VarInt::from_u32(code::SHUTDOWN), b"agent shutting down");
    });
    Ok(AgentHandle { cancel, task })
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &AgentConfig,
    center: SocketAddr,
    ep: &Endpoint,
    id: &Identity,
    ca: &[u8],
    state: &Arc<State>,
    sampler: &mut Sampler,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let conn = octopus_transfer::net::connect_check(
        ep,
        id,
        center,
        ServerCheck::IssuedBy(ca.to_vec().into()),
        ALPN_CTL,
    )
    .await
    .map_err(|e| format!("connecting to {center}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = AgentMsg::Hello {
        version: VERSION.to_string(),
        addrs: hostinfo::addresses()
            .into_iter()
            .map(|a| a.to_string())
            .collect(),
        tags: cfg.tags.clone(),
        resources: sampler.sample(&cfg.data_dir),
    };
    proto::write_msg(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let heartbeat = match proto::read_msg::<CenterMsg>(&mut recv).await {
        Ok(Some(CenterMsg::Welcome {
            heartbeat_ms,
            url_key,
            centers,
        })) => {
            *state.url_key.write().unwrap() = url_key;
            *state.fetch.center.lock().unwrap() = center;
            learn_centers(state, &cfg.data_dir, center, &centers);
            Duration::from_millis(heartbeat_ms.clamp(100, 600_000))
        }
        Ok(_) => return Err("the center did not welcome us".into()),
        Err(e) => return Err(e.to_string()),
    };
    info!(%center, "connected to the center");
    let (tx, mut rx) = mpsc::unbounded_channel::<AgentMsg>();
    let _ = tx.send(state.holdings());
    // Results the center has not acknowledged yet go first.
    let pending = state.journal.lock().unwrap().pending_results();
    for m in pending {
        let _ = tx.send(m);
    }
    *state.session.lock().unwrap() = Some(tx.clone());
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if proto::write_msg(&mut send, &m).await.is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    let res = loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                conn.close(VarInt::from_u32(code::SHUTDOWN), b"agent shutting down");
                break Ok(());
            }
            _ = tick.tick() => {
                let _ = tx.send(AgentMsg::Heartbeat(sampler.sample(&cfg.data_dir)));
            }
            m = proto::read_msg::<CenterMsg>(&mut recv) => match m {
                Ok(Some(m)) => on_center_msg(state, &tx, m),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            },
        }
    };
    writer.abort();
    res
}

fn on_center_msg(state: &Arc<State>, tx: &mpsc::UnboundedSender<AgentMsg>, m: CenterMsg) {
    match m {
        CenterMsg::Welcome { .. } => {}
        CenterMsg::Task { task, body, .. } => {
            let mut j = state.journal.lock().unwrap();
            let busy = state.running.lock().unwrap().contains_key(&task)
                || state.queue.lock().unwrap().iter().any(|(t, _)| *t == task);
            if j.started.contains(&task)
                && j.result(task).is_none()
                && !busy
                && matches!(body, TaskBody::Fetch(_) | TaskBody::Seed(_))
            {
                // A fetch cut short by a crash is safe to run again, and resumes from
                // its verified pieces; a seed is idempotent. Only commands are held to
                // at most once.
                drop(j);
                let _ = tx.send(AgentMsg::Ack { task });
                state.queue.lock().unwrap().push_back((task, body));
                state.queued.notify_one();
                return;
            }
            if j.started.contains(&task) {
                // A redelivery: never run twice.
                let _ = tx.send(AgentMsg::Ack { task });
                let done = j.result(task).unwrap_or(AgentMsg::Done {
                    task,
                    outcome: Outcome::AlreadyRan,
                    started_at: proto::now_ms(),
                    finished_at: proto::now_ms(),
                });
                // If it is still running, its result will come when it ends.
                if !state.running.lock().unwrap().contains_key(&task)
                    && !state.queue.lock().unwrap().iter().any(|(t, _)| *t == task)
                {
                    let _ = tx.send(done);
                }
                return;
            }
            if let Err(e) = j.start(task) {
                // Not recorded means not run: the center will redeliver.
                warn!(task, "recording the task start: {e}");
                return;
            }
            drop(j);
            let _ = tx.send(AgentMsg::Ack { task });
            state.queue.lock().unwrap().push_back((task, body));
            state.queued.notify_one();
        }
        CenterMsg::Cancel { task } => {
            state.cancelled.lock().unwrap().insert(task);
            if let Some(c) = state.running.lock().unwrap().get(&task) {
                c.cancel();
            }
            state.queued.notify_one();
        }
        CenterMsg::DoneAck { task } => {
            state.journal.lock().unwrap().forget_result(task);
        }
    }
}

/// Centers remembered from earlier sessions.
fn load_centers(dir: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(dir.join("centers"))
        .unwrap_or_default()
        .lines()
        .take(64)
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Takes the centers a welcome lists (for failover): the one we are connected to
/// stays where it is, new ones are appended, and the list is saved.
fn learn_centers(state: &State, dir: &Path, current: SocketAddr, announced: &[String]) {
    let mut g = state.centers.lock().unwrap();
    let mut changed = false;
    for a in announced.iter().take(64) {
        let Ok(addr) = a.parse::<SocketAddr>() else {
            continue;
        };
        // A center listening on 0.0.0.0 announces that; reach it where we reached it.
        let addr = if addr.ip().is_unspecified() {
            SocketAddr::new(current.ip(), addr.port())
        } else {
            addr
        };
        if !g.0.contains(&addr) {
            g.0.push(addr);
            changed = true;
        }
    }
    if let Some(i) = g.0.iter().position(|c| *c == current) {
        g.1 = i;
    }
    if changed {
        let text: String = g.0.iter().map(|c| format!("{c}\n")).collect();
        if let Err(e) = write_file(&dir.join("centers"), text.as_bytes(), PRIVATE) {
            warn!("saving the list of centers: {e}");
        }
    }
}

/// Runs queued tasks one at a time, in arrival order.
async fn runner(state: Arc<State>, cancel: CancellationToken, simulate: bool) {
    loop {
        let next = state.queue.lock().unwrap().pop_front();
        let Some((task, body)) = next else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = state.queued.notified() => continue,
            }
        };
        let started_at = proto::now_ms();
        let outcome = if state.cancelled.lock().unwrap().remove(&task) {
            Outcome::Cancelled
        } else if simulate {
            Outcome::Ran(exec::ExecResult {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                stdout: Vec::new(),
                stderr: Vec::new(),
                stdout_truncated: false,
                stderr_truncated: false,
                duration_ms: 0,
            })
        } else {
            let stop = CancellationToken::new();
            state.running.lock().unwrap().insert(task, stop.clone());
            let st = state.clone();
            let on_output = move |s: OutStream, data: &[u8]| {
                for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
                    st.send(AgentMsg::Output {
                        task,
                        stream: s,
                        data: chunk.to_vec(),
                    });
                }
            };
            let work = async {
                match &body {
                    TaskBody::Exec(spec) => match exec::run(spec, on_output).await {
                        Ok(x) => Outcome::Ran(x),
                        Err(e) => Outcome::Error(e.to_string()),
                    },
                    TaskBody::Seed(spec) => match crate::fetch::seed(spec, &state.fetch).await {
                        Ok(x) => Outcome::Ran(x),
                        Err(e) => Outcome::Error(e),
                    },
                    TaskBody::Fetch(spec) => {
                        let st = state.clone();
                        let progress: crate::fetch::OnProgress = Arc::new(move |bytes, total| {
                            st.send(AgentMsg::Progress { task, bytes, total })
                        });
                        match crate::fetch::run(spec, &state.fetch, progress).await {
                            Ok(x) => Outcome::Ran(x),
                            Err(e) => Outcome::Error(e),
                        }
                    }
                }
            };
            let out = tokio::select! {
                o = work => o,
                // Dropping the run kills its whole process group.
                _ = stop.cancelled() => Outcome::Cancelled,
                _ = cancel.cancelled() => return,
            };
            state.running.lock().unwrap().remove(&task);
            state.cancelled.lock().unwrap().remove(&task);
            out
        };
        let done = AgentMsg::Done {
            task,
            outcome,
            started_at,
            finished_at: proto::now_ms(),
        };
        if let Err(e) = state.journal.lock().unwrap().save_result(task, &done) {
            warn!(task, "saving the result: {e}");
        }
        state.send(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_token_parsing() {
        let hex = "ab".repeat(32);
        let (t, fp) = parse_enroll_token(&format!("octo_abc_def.{hex}")).unwrap();
        assert_eq!(t, "octo_abc_def");
        assert_eq!(fp.0, [0xab; 32]);
        assert!(parse_enroll_token("octo_abc_def").is_err());
        assert!(parse_enroll_token("octo_abc_def.zz").is_err());
        assert!(parse_enroll_token(&format!("x.{}", "g".repeat(64))).is_err());
    }

    #[test]
    fn journal_survives_reopen_and_ignores_a_torn_record() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(d.path()).unwrap();
            j.start(7).unwrap();
            j.start(9).unwrap();
            let done = AgentMsg::Done {
                task: 9,
                outcome: Outcome::Cancelled,
                started_at: 1,
                finished_at: 2,
            };
            j.save_result(9, &done).unwrap();
        }
        // A crash in the middle of appending task 11.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join("started.log"))
            .unwrap();
        f.write_all(&[11, 0, 0]).unwrap();
        drop(f);
        let mut j = Journal::open(d.path()).unwrap();
        assert!(j.started.contains(&7) && j.started.contains(&9));
        assert!(!j.started.contains(&11));
        assert_eq!(j.pending_results().len(), 1);
        j.forget_result(9);
        assert!(j.pending_results().is_empty());
        j.start(12).unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert!(
            j.started.contains(&12),
            "records stay aligned after a torn tail"
        );
    }
}
