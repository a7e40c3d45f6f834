//! The node runtime: drives the sans-IO swarm core over quinn and the piece store.
//!
//! Why this shape: exactly one task, the *driver*, owns the [`Swarm`] and the peer
//! table. Connection, stream and upload tasks never touch swarm state; they send
//! [`Ev`]ents to the driver over one channel and the driver answers by draining
//! `poll_transmit`/`poll_event` after every input. So the swarm sees a single ordered
//! stream of inputs, exactly as in the deterministic simulation that tests it.
//!
//! Services follow the `spawn(config) -> Handle` pattern: [`share`] and [`get`] return
//! handles with `local_addr()` and `shutdown()`, built on a `CancellationToken` and a
//! `TaskTracker`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::{Digest, Md5};
use octopus_swarm::{Bitfield, DisconnectReason, Event, PeerId, Swarm, Transmit};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::frame::{
    self, code, Frame, PeerRecord, PieceHeader, MAX_FRAME, MAX_MANIFEST_FRAME, MAX_PEERS_PER_ANSWER,
};
use crate::limit::{LimitSet, Limiter};
use crate::manifest::{BuildOptions, ContentId, Manifest, ManifestError, Md5Sum, PieceInfo};
use crate::net::{self, NetError};
use crate::store::{Destination, PartialStore, SeedStore, StoreError};
use crate::ticket::Ticket;
use crate::tls::{self, Fingerprint, Identity, Trust};

/// Chunk size for uploads and rate-limit charging.
const CHUNK: usize = 64 << 10;
/// Received bytes are gathered into writes of this size (page-aligned, since pieces
/// start at multiples of the piece size): one `pwrite` per packet meant partial-page
/// writes, which the kernel zero-fills first, and contention on the file's lock.
const WRITE_BLOCK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("building the manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not reach the sharer at any ticket address: {0}")]
    Unreachable(String),
    #[error("the sharer refused: {0}")]
    Refused(String),
    #[error("the manifest received does not match the ticket's content id")]
    ManifestMismatch,
    #[error("the node stopped before the transfer completed")]
    Stopped,
}

/// Settings shared by sharing and getting nodes.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    /// Bytes per second; `None` is unlimited.
    pub limit_up: Option<u64>,
    pub limit_down: Option<u64>,
    /// Node-wide limiters, shared by every transfer of this node (a daemon passes the
    /// same ones to each transfer; standalone commands leave them unlimited).
    pub node_up: Limiter,
    pub node_down: Limiter,
    /// The swarm tuning; `None` takes `Config::for_piece_size` of the content.
    pub swarm: Option<octopus_swarm::Config>,
    pub announce_interval: Duration,
    /// Most connections a getter opens to other peers.
    pub max_peers: usize,
    pub identity: Option<Identity>,
    /// Which peers this node admits. A swarm the center runs for its fleet uses
    /// `Trust::Ca` (every peer holds a certificate from the center's CA, and
    /// `identity` is one); standalone `share`/`get` trust the ticket alone.
    pub trust: Trust,
    /// Fault injection for tests of the real binary; never set in production.
    pub fault: Option<Fault>,
    /// Locality tags (`idc=bj1`, `rack=r3`) a getter announces; the tracker hands it
    /// peers sharing the most of them first.
    pub tags: Vec<String>,
    /// Mode and owner a getter applies to what it delivers, on the open files before
    /// they are renamed into place.
    pub finish: crate::store::Finish,
}

/// Deliberate misbehaviour, so tests can run a bad peer as a real process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte in every piece this node uploads.
    CorruptUploads,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "corrupt-uploads" => Ok(Fault::CorruptUploads),
            _ => Err(format!("unknown fault {s:?}")),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: "0.0.0.0:0".parse().expect("valid"),
            limit_up: None,
            limit_down: None,
            node_up: Limiter::unlimited(),
            node_down: Limiter::unlimited(),
            swarm: None,
            announce_interval: Duration::from_secs(2),
            max_peers: 32,
            identity: None,
            trust: Trust::Standalone,
            fault: None,
            tags: Vec::new(),
            finish: Default::default(),
        }
    }
}

/// A snapshot of a transfer's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub total_bytes: u64,
    pub have_bytes: u64,
    /// Piece payload bytes received over the network in this run.
    pub received_bytes: u64,
    /// Piece payload bytes sent to other peers.
    pub sent_bytes: u64,
    pub peers: usize,
    pub complete: bool,
    pub corrupt_pieces: u64,
    pub banned_peers: usize,
    /// Bytes already verified on disk when this run started (resume).
    pub resumed_bytes: u64,
    /// Bytes charged to this transfer's own `limit_up` / `limit_down` limiter (0 when
    /// unlimited): proof that its traffic went through the limit.
    pub limited_up_bytes: u64,
    pub limited_down_bytes: u64,
}

/// What a finished `get` produced.
#[derive(Debug, Clone)]
pub struct GetOutcome {
    pub files: Vec<(PathBuf, Md5Sum)>,
    pub received_bytes: u64,
    /// Bytes charged to the transfer's `limit_down` limiter (see [`Progress`]).
    pub limited_down_bytes: u64,
    pub elapsed: Duration,
}

/// A running node (sharing or getting one content).
#[derive(Debug)]
pub struct NodeHandle {
    local_addr: SocketAddr,
    ticket: Ticket,
    progress: watch::Receiver<Progress>,
    done: Mutex<Option<oneshot::Receiver<Result<GetOutcome, String>>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    endpoint: Endpoint,
    manifest: Arc<Manifest>,
}

impl NodeHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Wait for a getter to finish: every file verified and in place.
    pub async fn completed(&self) -> Result<GetOutcome, String> {
        let rx = self.done.lock().unwrap().take();
        match rx {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(NodeError::Stopped.to_string())),
            None => Err("completed() called twice or on a sharing node".into()),
        }
    }

    /// Stop every task and close the endpoint.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// The tracker's answer: a bounded random subset of `candidates`, those sharing the
/// most locality tags with `tags` first (same rack and data center, then same data
/// center, then the rest), random within each level so load spreads.
pub fn pick_peers<R: rand::Rng>(
    tags: &[String],
    candidates: Vec<(PeerRecord, &[String])>,
    max: usize,
    rng: &mut R,
) -> Vec<PeerRecord> {
    let mut scored: Vec<(usize, u64, PeerRecord)> = candidates
        .into_iter()
        .map(|(rec, t)| {
            let shared = t.iter().filter(|x| tags.contains(x)).count();
            (shared, rng.random::<u64>(), rec)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(max).map(|(_, _, r)| r).collect()
}

/// Share `roots`: hash them into a manifest, serve them and act as the tracker.
pub async fn share(
    cfg: NodeConfig,
    roots: Vec<PathBuf>,
    opts: BuildOptions,
) -> Result<NodeHandle, NodeError> {
    let r2 = roots.clone();
    let manifest = tokio::task::spawn_blocking(move || Manifest::build(&r2, &opts))
        .await
        .expect("hashing thread panicked")?;
    let manifest = Arc::new(manifest);
    let store = Store::Seed(SeedStore::new(manifest.clone(), &roots));
    let identity = match cfg.identity.clone() {
        Some(i) => i,
        None => Identity::generate().map_err(NetError::from)?,
    };
    let endpoint = net::endpoint(cfg.listen, &identity, &cfg.trust)?;
    let local = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let ticket = Ticket {
        content: manifest.content_id(),
        addrs: net::advertised_addrs(local),
        fingerprint: identity.fingerprint.0,
    };
    info!(content = %ticket.content, %local, bytes = manifest.total_size(), "sharing");
    let (handle, _) = start(cfg, identity, endpoint, manifest, store, ticket, None, None)?;
    Ok(handle)
}

/// Fetch the content of `ticket` into `dest` (cp semantics), uploading to other peers
/// meanwhile. Resumes from a staging area left by an earlier run.
pub async fn get(cfg: NodeConfig, ticket: Ticket, dest: PathBuf) -> Result<NodeHandle, NodeError> {
    let identity = match cfg.identity.clone() {
        Some(i) => i,
        None => Identity::generate().map_err(NetError::from)?,
    };
    let endpoint = net::endpoint(cfg.listen, &identity, &cfg.trust)?;
    let local = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: cfg.listen,
        source,
    })?;
    // Bootstrap: reach the sharer, pin its fingerprint, fetch and check the manifest.
    let mut last_err = String::from("no address");
    let mut boot = None;
    for addr in &ticket.addrs {
        match bootstrap(&endpoint, &identity, *addr, &ticket).await {
            Ok(b) => {
                boot = Some(b);
                break;
            }
            Err(e @ (NodeError::Refused(_) | NodeError::ManifestMismatch)) => return Err(e),
            Err(e) => {
                debug!(%addr, "bootstrap failed: {e}");
                last_err = format!("{addr}: {e}");
            }
        }
    }
    let Some((conn, send, recv, manifest)) = boot else {
        return Err(NodeError::Unreachable(last_err));
    };
    let manifest = Arc::new(manifest);
    let dest = Destination::resolve(&manifest, &dest)?;
    let m2 = manifest.clone();
    let finish = cfg.finish;
    let store = tokio::task::spawn_blocking(move || PartialStore::open_with(m2, dest, finish))
        .await
        .expect("store thread panicked")?;
    let store = Arc::new(store);
    store.start_whole_file_hasher();
    let resumed = store.verified().iter().filter(|v| **v).count();
    if resumed > 0 {
        info!(
            pieces = resumed,
            "resuming from {}",
            store.staging().display()
        );
    }
    let my_ticket = Ticket {
        content: ticket.content,
        addrs: net::advertised_addrs(local),
        fingerprint: identity.fingerprint.0,
    };
    let first = Ev::Conn {
        conn,
        fp: ticket.fingerprint(),
        dialed: true,
        send,
        recv,
    };
    let (handle, _) = start(
        cfg,
        identity,
        endpoint,
        manifest,
        Store::Partial(store),
        my_ticket,
        Some(ticket.fingerprint()),
        Some(first),
    )?;
    Ok(handle)
}

async fn bootstrap(
    ep: &Endpoint,
    id: &Identity,
    addr: SocketAddr,
    ticket: &Ticket,
) -> Result<(Connection, SendStream, RecvStream, Manifest), NodeError> {
    let conn = net::connect(ep, id, addr, ticket.fingerprint()).await?;
    let (send, mut recv) = hello(&conn, ticket.content, true).await?;
    let f = tokio::time::timeout(
        Duration::from_secs(30),
        net::read_frame(&mut recv, MAX_MANIFEST_FRAME),
    )
    .await
    .map_err(|_| NetError::Timeout("waiting for the manifest"))??;
    let Frame::Manifest(bytes) = f else {
        return Err(NetError::Protocol("expected the manifest".into()).into());
    };
    if ContentId(Md5::digest(&bytes).into()) != ticket.content {
        return Err(NodeError::ManifestMismatch);
    }
    let manifest = Manifest::decode(&bytes)?;
    Ok((conn, send, recv, manifest))
}

/// Open the control stream for `content` and wait for the acceptor's welcome.
async fn hello(
    conn: &Connection,
    content: ContentId,
    want_manifest: bool,
) -> Result<(SendStream, RecvStream), NodeError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::from)?;
    net::write_frame(
        &mut send,
        &Frame::Hello {
            content,
            want_manifest,
        },
    )
    .await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        net::read_frame(&mut recv, MAX_FRAME),
    )
    .await;
    match reply {
        Ok(Ok(Frame::Welcome)) => Ok((send, recv)),
        Ok(Ok(other)) => Err(NetError::Protocol(format!("expected welcome, got {other:?}")).into()),
        Ok(Err(NetError::Read(quinn::ReadExactError::ReadError(
            quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c)),
        )))) => Err(NodeError::Refused(
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(NetError::Timeout("waiting for the welcome").into()),
    }
}

enum Store {
    Seed(SeedStore),
    Partial(Arc<PartialStore>),
}

impl Store {
    fn read_piece(&self, piece: u32) -> Result<Bytes, StoreError> {
        match self {
            Store::Seed(s) => s.read_piece(piece),
            Store::Partial(p) => p.read_piece(piece),
        }
    }
}

/// Inputs to the driver.
enum Ev {
    /// A connection finished its hello exchange.
    Conn {
        conn: Connection,
        fp: Fingerprint,
        dialed: bool,
        send: SendStream,
        recv: RecvStream,
    },
    Frame {
        peer: PeerId,
        frame: Frame,
    },
    Closed {
        peer: PeerId,
        reason: String,
    },
    /// A peer started sending a piece: may it?
    DataOffer {
        peer: PeerId,
        piece: u32,
        reply: oneshot::Sender<bool>,
    },
    DataDone {
        peer: PeerId,
        piece: u32,
        outcome: DataOutcome,
    },
    UploadDone {
        peer: PeerId,
        piece: u32,
    },
    DialDone {
        fp: Fingerprint,
    },
    Finalized(Result<Vec<(PathBuf, Md5Sum)>, StoreError>),
}

enum DataOutcome {
    Verified,
    Corrupt,
    Failed(String),
    Disk(StoreError),
}

struct Peer {
    conn: Connection,
    fp: Fingerprint,
    dialed: bool,
    ctrl: mpsc::UnboundedSender<Frame>,
    cancel: CancellationToken,
}

struct Shared {
    content: ContentId,
    pieces: Vec<PieceInfo>,
    store: Store,
    up: LimitSet,
    down: LimitSet,
    /// This transfer's own limiters (also in `up` / `down`), for their counters.
    own_up: Limiter,
    own_down: Limiter,
    received: AtomicU64,
    sent: AtomicU64,
    banned: Mutex<HashSet<Fingerprint>>,
    encoded_manifest: Arc<Vec<u8>>,
    fault: Option<Fault>,
}

struct Driver {
    sh: Arc<Shared>,
    swarm: Swarm,
    identity: Identity,
    endpoint: Endpoint,
    peers: HashMap<PeerId, Peer>,
    by_fp: HashMap<Fingerprint, PeerId>,
    dialing: HashSet<Fingerprint>,
    next_id: PeerId,
    /// Seed only: the tracker's view of the swarm, with each peer's locality tags.
    tracker: HashMap<Fingerprint, (SocketAddr, Vec<String>)>,
    /// Getter only: the tags it announces.
    tags: Vec<String>,
    /// Getter only: the sharer, which is also the tracker.
    tracker_fp: Option<Fingerprint>,
    writing: HashSet<u32>,
    uploads: HashMap<(PeerId, u32), CancellationToken>,
    tx: mpsc::UnboundedSender<Ev>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    progress: watch::Sender<Progress>,
    done: Option<oneshot::Sender<Result<GetOutcome, String>>>,
    started: Instant,
    have_bytes: u64,
    max_peers: usize,
    finalizing: bool,
    rng: rand::rngs::StdRng,
}

#[allow(clippy::too_many_arguments)]
fn start(
    cfg: NodeConfig,
    identity: Identity,
    endpoint: Endpoint,
    manifest: Arc<Manifest>,
    store: Store,
    ticket: Ticket,
    tracker_fp: Option<Fingerprint>,
    first: Option<Ev>,
) -> Result<(NodeHandle, ()), NodeError> {
    let pieces = manifest.pieces();
    let n = pieces.len() as u32;
    let have = match &store {
        Store::Seed(_) => Bitfield::full(n),
        Store::Partial(p) => {
            let mut b = Bitfield::new(n);
            for (i, v) in p.verified().iter().enumerate() {
                if *v {
                    b.set(i as u32);
                }
            }
            b
        }
    };
    let have_bytes: u64 = pieces
        .iter()
        .enumerate()
        .filter(|(i, _)| have.get(*i as u32))
        .map(|(_, p)| p.len as u64)
        .sum();
    let mut scfg = cfg.swarm.clone().unwrap_or_else(|| {
        // The configuration the simulation validated for this piece size.
        octopus_swarm::Config::for_piece_size(manifest.piece_size)
    });
    scfg.rng_seed = rand::random();
    let now = Instant::now();
    let swarm = Swarm::new(scfg, n, have, now);
    let complete_at_start = swarm.is_complete();
    let (own_up, own_down) = (Limiter::new(cfg.limit_up), Limiter::new(cfg.limit_down));
    let sh = Arc::new(Shared {
        content: ticket.content,
        pieces,
        store,
        up: LimitSet::new([cfg.node_up.clone(), own_up.clone()]),
        down: LimitSet::new([cfg.node_down.clone(), own_down.clone()]),
        own_up,
        own_down,
        received: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        banned: Mutex::new(HashSet::new()),
        encoded_manifest: Arc::new(manifest.encode()),
        fault: cfg.fault,
    });
    let local_addr = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let total = manifest.total_size();
    let (ptx, prx) = watch::channel(Progress {
        total_bytes: total,
        have_bytes,
        resumed_bytes: have_bytes,
        complete: complete_at_start,
        ..Default::default()
    });
    let (done_tx, done_rx) = oneshot::channel();
    let is_getter = tracker_fp.is_some();
    let mut driver = Driver {
        sh,
        swarm,
        identity,
        endpoint: endpoint.clone(),
        peers: HashMap::new(),
        by_fp: HashMap::new(),
        dialing: HashSet::new(),
        next_id: 1,
        tracker: HashMap::new(),
        tags: cfg.tags.clone(),
        tracker_fp,
        writing: HashSet::new(),
        uploads: HashMap::new(),
        tx: tx.clone(),
        cancel: cancel.clone(),
        tasks: tasks.clone(),
        progress: ptx,
        done: if is_getter { Some(done_tx) } else { None },
        started: now,
        have_bytes,
        max_peers: cfg.max_peers,
        finalizing: false,
        rng: rand::SeedableRng::from_os_rng(),
    };
    // Accept loop.
    {
        let ep = endpoint.clone();
        let tx = tx.clone();
        let cancel = cancel.clone();
        let tasks2 = tasks.clone();
        let sh = driver.sh.clone();
        tasks.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    _ = cancel.cancelled() => break,
                    i = ep.accept() => match i { Some(i) => i, None => break },
                };
                let tx = tx.clone();
                let sh = sh.clone();
                tasks2.spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = accept_one(incoming, &sh, tx).await {
                        warn!(%remote, "refused connection: {e}");
                    }
                });
            }
        });
    }
    if let Some(ev) = first {
        let _ = tx.send(ev);
    }
    let announce = cfg.announce_interval;
    tasks.spawn(async move { driver.run(rx, announce, complete_at_start).await });
    Ok((
        NodeHandle {
            local_addr,
            ticket,
            progress: prx,
            done: Mutex::new(Some(done_rx)),
            cancel,
            tasks,
            endpoint,
            manifest,
        },
        (),
    ))
}

/// Handshake an incoming connection: TLS (mutual), then the hello for our content.
async fn accept_one(
    incoming: quinn::Incoming,
    sh: &Shared,
    tx: mpsc::UnboundedSender<Ev>,
) -> Result<(), NodeError> {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(source)) => {
            return Err(NetError::Handshake {
                addr: remote,
                source,
            }
            .into())
        }
        Err(_) => return Err(NetError::Timeout("waiting for the TLS handshake").into()),
    };
    let Some(fp) = tls::peer_fingerprint(&conn) else {
        conn.close(VarInt::from_u32(code::PROTOCOL), b"no client certificate");
        return Err(NetError::Protocol("no client certificate".into()).into());
    };
    if sh.banned.lock().unwrap().contains(&fp) {
        conn.close(VarInt::from_u32(code::BANNED), b"banned");
        return Err(NetError::Protocol(format!("peer {fp} is banned")).into());
    }
    let (mut send, mut recv) =
        match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(NetError::from(e).into()),
            Err(_) => {
                conn.close(VarInt::from_u32(code::PROTOCOL), b"no hello");
                return Err(NetError::Timeout("waiting for the hello").into());
            }
        };
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        net::read_frame(&mut recv, MAX_FRAME),
    )
    .await;
    let want_manifest = match first {
        Ok(Ok(Frame::Hello {
            content,
            want_manifest,
        })) if content == sh.content => want_manifest,
        Ok(Ok(Frame::Hello { content, .. })) => {
            conn.close(VarInt::from_u32(code::UNKNOWN_CONTENT), b"unknown content");
            return Err(NetError::Protocol(format!("unknown content {content}")).into());
        }
        Ok(Ok(other)) => {
            conn.close(VarInt::from_u32(code::PROTOCOL), b"expected hello");
            return Err(NetError::Protocol(format!("expected hello, got {other:?}")).into());
        }
        Ok(Err(e)) => {
            conn.close(VarInt::from_u32(code::PROTOCOL), b"bad hello");
            return Err(e.into());
        }
        Err(_) => {
            conn.close(VarInt::from_u32(code::PROTOCOL), b"no hello");
            return Err(NetError::Timeout("waiting for the hello").into());
        }
    };
    net::write_frame(&mut send, &Frame::Welcome).await?;
    if want_manifest {
        net::write_frame(
            &mut send,
            &Frame::Manifest(sh.encoded_manifest.as_ref().clone()),
        )
        .await?;
    }
    let _ = tx.send(Ev::Conn {
        conn,
        fp,
        dialed: false,
        send,
        recv,
    });
    Ok(())
}

impl Driver {
    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Ev>,
        announce: Duration,
        complete_at_start: bool,
    ) {
        let mut tick = tokio::time::interval(announce);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if complete_at_start && self.done.is_some() {
            self.start_finalize();
        }
        loop {
            let deadline = self.swarm.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = sleep => {
                    let before = self.swarm.stats().requests_timed_out;
                    self.swarm.handle_timeout(Instant::now());
                    let n = self.swarm.stats().requests_timed_out - before;
                    if n > 0 {
                        info!(requests = n, "requests timed out; asking elsewhere");
                    }
                }
                _ = tick.tick() => self.announce(),
            }
            self.drain();
        }
        for p in self.peers.values() {
            p.cancel.cancel();
            p.conn
                .close(VarInt::from_u32(code::SHUTDOWN), b"shutting down");
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(NodeError::Stopped.to_string()));
        }
        if let Store::Partial(p) = &self.sh.store {
            p.stop_hasher();
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = Instant::now();
        match ev {
            Ev::Conn {
                conn,
                fp,
                dialed,
                send,
                recv,
            } => self.on_conn(conn, fp, dialed, send, recv),
            Ev::Frame { peer, frame } => self.on_frame(peer, frame),
            Ev::Closed { peer, reason } => {
                if let Some(p) = self.peers.remove(&peer) {
                    debug!(peer = %p.fp, "connection closed: {reason}");
                    p.cancel.cancel();
                    if self.by_fp.get(&p.fp) == Some(&peer) {
                        self.by_fp.remove(&p.fp);
                    }
                    self.tracker.remove(&p.fp);
                    self.swarm.handle_peer_lost(now, peer);
                }
            }
            Ev::DataOffer { peer, piece, reply } => {
                let ok = self.peers.contains_key(&peer)
                    && self.swarm.is_expected(peer, piece)
                    && !self.swarm.have().get(piece)
                    && !self.writing.contains(&piece);
                if ok {
                    self.writing.insert(piece);
                }
                let _ = reply.send(ok);
            }
            Ev::DataDone {
                peer,
                piece,
                outcome,
            } => {
                self.writing.remove(&piece);
                match outcome {
                    DataOutcome::Verified => {
                        self.swarm.handle_piece_received(now, peer, piece, true)
                    }
                    DataOutcome::Corrupt => {
                        warn!(piece, "piece failed its MD5; banning the peer that sent it");
                        self.swarm.handle_piece_received(now, peer, piece, false)
                    }
                    DataOutcome::Failed(e) => {
                        debug!(piece, "piece transfer failed: {e}");
                        self.swarm.handle_piece_failed(now, peer, piece)
                    }
                    DataOutcome::Disk(e) => self.fail(e.to_string()),
                }
            }
            Ev::UploadDone { peer, piece } => {
                self.uploads.remove(&(peer, piece));
                self.swarm.handle_upload_finished(now, peer, piece);
            }
            Ev::DialDone { fp } => {
                self.dialing.remove(&fp);
            }
            Ev::Finalized(res) => {
                let out = match res {
                    Ok(files) => {
                        let elapsed = self.started.elapsed();
                        info!(
                            files = files.len(),
                            ?elapsed,
                            "content verified and in place"
                        );
                        self.progress.send_modify(|p| p.complete = true);
                        Ok(GetOutcome {
                            files,
                            received_bytes: self.sh.received.load(Ordering::Relaxed),
                            limited_down_bytes: self.sh.own_down.charged(),
                            elapsed,
                        })
                    }
                    Err(e) => Err(e.to_string()),
                };
                if let Some(done) = self.done.take() {
                    let _ = done.send(out);
                }
            }
        }
    }

    fn fail(&mut self, msg: String) {
        warn!("transfer failed: {msg}");
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(msg));
        }
        self.cancel.cancel();
    }

    fn on_conn(
        &mut self,
        conn: Connection,
        fp: Fingerprint,
        dialed: bool,
        send: SendStream,
        recv: RecvStream,
    ) {
        if fp == self.identity.fingerprint || self.sh.banned.lock().unwrap().contains(&fp) {
            conn.close(VarInt::from_u32(code::REFUSED), b"refused");
            return;
        }
        // One connection per pair: on a race, keep the one dialed by the smaller
        // fingerprint. Both ends apply the same rule, so they agree. A peer that
        // dials again on its own side lost its old connection (it restarted: agents
        // keep their CA-issued identity across runs), so the new one replaces it.
        if let Some(&old) = self.by_fp.get(&fp) {
            let old_dialed = self.peers[&old].dialed;
            let dialer = |d: bool| if d { self.identity.fingerprint } else { fp };
            if old_dialed != dialed && dialer(old_dialed) <= dialer(dialed) {
                conn.close(VarInt::from_u32(code::DUPLICATE), b"duplicate connection");
                return;
            }
            let p = self.peers.remove(&old).expect("indexed peer exists");
            p.cancel.cancel();
            p.conn
                .close(VarInt::from_u32(code::DUPLICATE), b"duplicate connection");
            self.swarm.handle_peer_lost(Instant::now(), old);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (ctx, crx) = mpsc::unbounded_channel();
        let pcancel = self.cancel.child_token();
        self.spawn_peer_tasks(id, conn.clone(), send, recv, crx, pcancel.clone());
        if !dialed {
            self.tracker.insert(fp, (conn.remote_address(), Vec::new()));
        }
        self.peers.insert(
            id,
            Peer {
                conn,
                fp,
                dialed,
                ctrl: ctx,
                cancel: pcancel,
            },
        );
        self.by_fp.insert(fp, id);
        debug!(peer = %fp, id, dialed, "peer connected");
        self.swarm.handle_peer_connected(Instant::now(), id);
        if Some(fp) == self.tracker_fp {
            self.send(id, self.announce_frame());
        }
    }

    fn spawn_peer_tasks(
        &self,
        id: PeerId,
        conn: Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        mut crx: mpsc::UnboundedReceiver<Frame>,
        cancel: CancellationToken,
    ) {
        // Control writer.
        let c2 = cancel.clone();
        self.tasks.spawn(async move {
            loop {
                let f = tokio::select! {
                    _ = c2.cancelled() => break,
                    f = crx.recv() => match f { Some(f) => f, None => break },
                };
                if net::write_frame(&mut send, &f).await.is_err() {
                    break;
                }
            }
        });
        // Control reader.
        let tx = self.tx.clone();
        let c2 = cancel.clone();
        let conn2 = conn.clone();
        self.tasks.spawn(async move {
            let reason = loop {
                let r = tokio::select! {
                    _ = c2.cancelled() => break "cancelled".to_string(),
                    r = net::read_frame(&mut recv, MAX_FRAME) => r,
                };
                match r {
                    Ok(frame) => {
                        if tx.send(Ev::Frame { peer: id, frame }).is_err() {
                            break "driver gone".into();
                        }
                    }
                    Err(e @ NetError::Frame(_)) => {
                        warn!(remote = %conn2.remote_address(), "closing connection: {e}");
                        conn2.close(VarInt::from_u32(code::PROTOCOL), b"malformed frame");
                        break e.to_string();
                    }
                    Err(e) => break e.to_string(),
                }
            };
            let _ = tx.send(Ev::Closed { peer: id, reason });
        });
        // Piece streams from this peer.
        let tx = self.tx.clone();
        let sh = self.sh.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            loop {
                let s = tokio::select! {
                    _ = cancel.cancelled() => break,
                    s = conn.accept_uni() => s,
                };
                let Ok(stream) = s else { break };
                let tx = tx.clone();
                let sh = sh.clone();
                let conn = conn.clone();
                tasks.spawn(async move { receive_piece(id, stream, &sh, tx, conn).await });
            }
        });
    }

    fn on_frame(&mut self, peer: PeerId, frame: Frame) {
        let now = Instant::now();
        if !self.peers.contains_key(&peer) {
            return;
        }
        match frame {
            Frame::Swarm(msg) => self.swarm.handle_message(now, peer, msg),
            Frame::Announce { addrs: _, tags } => {
                if self.tracker_fp.is_some() {
                    return; // only the sharer tracks in standalone mode
                }
                let fp = self.peers[&peer].fp;
                if let Some(entry) = self.tracker.get_mut(&fp) {
                    entry.1 = tags.clone();
                }
                let others: Vec<(PeerRecord, &[String])> = self
                    .tracker
                    .iter()
                    .filter(|(f, _)| **f != fp)
                    .map(|(f, (a, t))| {
                        (
                            PeerRecord {
                                addr: *a,
                                fingerprint: f.0,
                            },
                            t.as_slice(),
                        )
                    })
                    .collect();
                let pick = pick_peers(&tags, others, MAX_PEERS_PER_ANSWER, &mut self.rng);
                self.send(peer, Frame::Peers(pick));
            }
            Frame::Peers(list) => {
                if Some(self.peers[&peer].fp) != self.tracker_fp {
                    return;
                }
                for rec in list {
                    self.maybe_dial(rec);
                }
            }
            Frame::Hello { .. } | Frame::Welcome | Frame::Manifest(_) => {
                self.protocol_close(peer, "unexpected handshake frame");
            }
        }
    }

    fn protocol_close(&mut self, peer: PeerId, why: &str) {
        if let Some(p) = self.peers.get(&peer) {
            warn!(peer = %p.fp, "closing connection: {why}");
            p.conn
                .close(VarInt::from_u32(code::PROTOCOL), why.as_bytes());
        }
    }

    fn maybe_dial(&mut self, rec: PeerRecord) {
        let fp = Fingerprint(rec.fingerprint);
        if fp == self.identity.fingerprint
            || self.by_fp.contains_key(&fp)
            || self.dialing.contains(&fp)
            || self.sh.banned.lock().unwrap().contains(&fp)
            || self.peers.len() + self.dialing.len() >= self.max_peers
        {
            return;
        }
        self.dialing.insert(fp);
        let ep = self.endpoint.clone();
        let id = self.identity.clone();
        let tx = self.tx.clone();
        let content = self.sh.content;
        self.tasks.spawn(async move {
            let res = async {
                let conn = net::connect(&ep, &id, rec.addr, fp).await?;
                let (send, recv) = hello(&conn, content, false).await?;
                Ok::<_, NodeError>((conn, send, recv))
            }
            .await;
            match res {
                Ok((conn, send, recv)) => {
                    let _ = tx.send(Ev::Conn {
                        conn,
                        fp,
                        dialed: true,
                        send,
                        recv,
                    });
                }
                Err(e) => debug!(addr = %rec.addr, "dial failed: {e}"),
            }
            let _ = tx.send(Ev::DialDone { fp });
        });
    }

    fn announce(&mut self) {
        if self.swarm.is_complete() {
            return;
        }
        if let Some(fp) = self.tracker_fp {
            if let Some(&id) = self.by_fp.get(&fp) {
                self.send(id, self.announce_frame());
            }
        }
    }

    fn announce_frame(&self) -> Frame {
        Frame::Announce {
            addrs: vec![],
            tags: self.tags.clone(),
        }
    }

    fn send(&self, peer: PeerId, f: Frame) {
        if let Some(p) = self.peers.get(&peer) {
            let _ = p.ctrl.send(f);
        }
    }

    fn drain(&mut self) {
        while let Some(t) = self.swarm.poll_transmit() {
            tracing::trace!(?t, "transmit");
            match t {
                Transmit::Control { peer, msg } => self.send(peer, Frame::Swarm(msg)),
                Transmit::Upload { peer, piece } => self.start_upload(peer, piece),
                Transmit::AbortUpload { peer, piece } => {
                    if let Some(c) = self.uploads.get(&(peer, piece)) {
                        c.cancel();
                    }
                }
                Transmit::Disconnect { peer, reason } => {
                    if let Some(p) = self.peers.remove(&peer) {
                        let (code, why): (u32, &[u8]) = match reason {
                            DisconnectReason::Banned => {
                                self.sh.banned.lock().unwrap().insert(p.fp);
                                self.progress.send_modify(|pr| pr.banned_peers += 1);
                                warn!(peer = %p.fp, "banned for sending a corrupt piece");
                                (code::BANNED, b"banned: corrupt piece")
                            }
                            DisconnectReason::ProtocolViolation => {
                                warn!(peer = %p.fp, "closing connection: swarm protocol violation");
                                (code::PROTOCOL, b"protocol violation")
                            }
                        };
                        p.cancel.cancel();
                        p.conn.close(VarInt::from_u32(code), why);
                        if self.by_fp.get(&p.fp) == Some(&peer) {
                            self.by_fp.remove(&p.fp);
                        }
                        self.tracker.remove(&p.fp);
                        self.swarm.handle_peer_lost(Instant::now(), peer);
                    }
                }
            }
        }
        while let Some(e) = self.swarm.poll_event() {
            match e {
                Event::PieceCompleted(i) => {
                    self.have_bytes += self.sh.pieces[i as usize].len as u64;
                    if let Store::Partial(p) = &self.sh.store {
                        if let Err(e) = p.mark_verified(i) {
                            self.fail(e.to_string());
                        }
                    }
                }
                Event::PeerBanned(_) => {}
                Event::Complete => self.start_finalize(),
            }
        }
        let st = self.swarm.stats();
        let (have, recv, sent, peers) = (
            self.have_bytes,
            self.sh.received.load(Ordering::Relaxed),
            self.sh.sent.load(Ordering::Relaxed),
            self.peers.len(),
        );
        self.progress.send_if_modified(|p| {
            let new = Progress {
                have_bytes: have,
                received_bytes: recv,
                sent_bytes: sent,
                peers,
                corrupt_pieces: st.corrupt_pieces_received,
                limited_up_bytes: self.sh.own_up.charged(),
                limited_down_bytes: self.sh.own_down.charged(),
                ..p.clone()
            };
            if *p != new {
                *p = new;
                true
            } else {
                false
            }
        });
    }

    fn start_finalize(&mut self) {
        if self.finalizing {
            return;
        }
        let Store::Partial(store) = &self.sh.store else {
            return;
        };
        self.finalizing = true;
        let store = store.clone();
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            let res = tokio::task::spawn_blocking(move || store.finalize())
                .await
                .expect("finalize thread panicked");
            let _ = tx.send(Ev::Finalized(res));
        });
    }

    fn start_upload(&mut self, peer: PeerId, piece: u32) {
        let tx = self.tx.clone();
        let Some(p) = self.peers.get(&peer) else {
            let _ = tx.send(Ev::UploadDone { peer, piece });
            return;
        };
        let data = match self.sh.store.read_piece(piece) {
            Ok(d) => d,
            Err(e) => {
                warn!(piece, "cannot read piece to upload: {e}");
                let _ = tx.send(Ev::UploadDone { peer, piece });
                return;
            }
        };
        let cancel = p.cancel.child_token();
        self.uploads.insert((peer, piece), cancel.clone());
        let conn = p.conn.clone();
        let sh = self.sh.clone();
        self.tasks.spawn(async move {
            let res = send_piece(&conn, &sh, piece, data, &cancel).await;
            if let Err(e) = res {
                debug!(piece, "upload stopped: {e}");
            }
            let _ = tx.send(Ev::UploadDone { peer, piece });
        });
    }
}

/// Send one piece on its own stream. The upload slot is held until the peer has
/// acknowledged every byte (not merely until quinn buffered it), so slots reflect what
/// the link really carries and a cancel can still reset the stream.
async fn send_piece(
    conn: &Connection,
    sh: &Shared,
    piece: u32,
    mut data: Bytes,
    cancel: &CancellationToken,
) -> Result<(), String> {
    if sh.fault == Some(Fault::CorruptUploads) && !data.is_empty() {
        let mut v = data.to_vec();
        v[0] ^= 0xff;
        data = Bytes::from(v);
    }
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    let h = PieceHeader {
        content: sh.content,
        piece,
        len: data.len() as u32,
    };
    let work = async {
        s.write_all(&h.encode()).await.map_err(|e| e.to_string())?;
        let mut off = 0;
        while off < data.len() {
            let end = (off + CHUNK).min(data.len());
            sh.up.acquire((end - off) as u64).await;
            s.write_chunk(data.slice(off..end))
                .await
                .map_err(|e| e.to_string())?;
            sh.sent.fetch_add((end - off) as u64, Ordering::Relaxed);
            off = end;
        }
        s.finish().map_err(|e| e.to_string())?;
        // Resolves once the peer acknowledged everything, or stopped the stream.
        match s.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(format!("peer stopped the stream ({code})")),
            Err(e) => Err(e.to_string()),
        }
    };
    let res = tokio::select! {
        r = work => r,
        _ = cancel.cancelled() => Err("cancelled".to_string()),
    };
    if res.is_err() {
        // Dropping a send stream would finish it; reset it so the peer stops waiting.
        let _ = s.reset(VarInt::from_u32(code::CANCELLED));
    }
    res
}

/// Receive one piece stream: header, permission from the driver, then the raw bytes,
/// hashed and written at their offset as they arrive.
async fn receive_piece(
    peer: PeerId,
    mut s: RecvStream,
    sh: &Shared,
    tx: mpsc::UnboundedSender<Ev>,
    conn: Connection,
) {
    let mut hb = [0u8; PieceHeader::LEN];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut hb)).await {
        Ok(Ok(())) => {}
        _ => {
            let _ = s.stop(VarInt::from_u32(code::PROTOCOL));
            return;
        }
    }
    let h = match PieceHeader::decode(&hb) {
        Ok(h) => h,
        Err(e) => {
            warn!(remote = %conn.remote_address(), "closing connection: {e}");
            conn.close(VarInt::from_u32(code::PROTOCOL), b"bad piece header");
            return;
        }
    };
    let Some(info) = sh.pieces.get(h.piece as usize).copied() else {
        warn!(remote = %conn.remote_address(), piece = h.piece, "closing connection: piece index out of range");
        conn.close(
            VarInt::from_u32(code::PROTOCOL),
            b"piece index out of range",
        );
        return;
    };
    if h.content != sh.content || h.len != info.len {
        warn!(remote = %conn.remote_address(), "closing connection: piece header does not match the manifest");
        conn.close(VarInt::from_u32(code::PROTOCOL), b"piece header mismatch");
        return;
    }
    let (rtx, rrx) = oneshot::channel();
    if tx
        .send(Ev::DataOffer {
            peer,
            piece: h.piece,
            reply: rtx,
        })
        .is_err()
    {
        return;
    }
    if !rrx.await.unwrap_or(false) {
        let _ = s.stop(VarInt::from_u32(code::REFUSED));
        return;
    }
    let outcome = async {
        let store = match &sh.store {
            Store::Partial(p) => p,
            Store::Seed(_) => return DataOutcome::Failed("a seed does not download".into()),
        };
        let mut hasher = Md5::new();
        let mut got: u32 = 0;
        let mut buf = Vec::with_capacity(WRITE_BLOCK.min(info.len as usize));
        let mut buf_at: u32 = 0;
        while got < info.len {
            let want = ((info.len - got) as usize).min(CHUNK);
            let chunk = match s.read_chunk(want, true).await {
                Ok(Some(c)) => c.bytes,
                Ok(None) => return DataOutcome::Failed("stream ended early".into()),
                Err(e) => return DataOutcome::Failed(e.to_string()),
            };
            // Charge what actually arrived (a chunk is often a single packet); QUIC flow
            // control turns the wait into backpressure on the sender.
            sh.down.acquire(chunk.len() as u64).await;
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
            got += chunk.len() as u32;
            sh.received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if buf.len() >= WRITE_BLOCK || got == info.len {
                if let Err(e) = store.write(h.piece, buf_at, &buf) {
                    return DataOutcome::Disk(e);
                }
                buf_at = got;
                buf.clear();
            }
        }
        let digest: Md5Sum = hasher.finalize().into();
        if digest == info.md5 {
            DataOutcome::Verified
        } else {
            DataOutcome::Corrupt
        }
    }
    .await;
    let _ = tx.send(Ev::DataDone {
        peer,
        piece: h.piece,
        outcome,
    });
}

/// The manifest a peer would receive for these roots (for `octo` helpers and tests).
pub fn build_manifest(roots: &[PathBuf], opts: &BuildOptions) -> Result<Manifest, ManifestError> {
    Manifest::build(roots, opts)
}

/// Dial a raw connection to a node with a pinned fingerprint (tests and tooling).
pub async fn raw_connect(
    addr: SocketAddr,
    expected: Fingerprint,
    alpn: &[u8],
) -> Result<Connection, NodeError> {
    let id = Identity::generate().map_err(NetError::from)?;
    let ep = net::endpoint("0.0.0.0:0".parse().expect("valid"), &id, &Trust::Standalone)?;
    Ok(net::connect_alpn(&ep, &id, addr, expected, alpn).await?)
}

pub use frame::encode as encode_frame;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rec(i: u8) -> PeerRecord {
        PeerRecord {
            addr: SocketAddr::from(([10, 0, 0, i], 7000)),
            fingerprint: [i; 32],
        }
    }

    #[test]
    fn the_tracker_prefers_peers_sharing_more_tags_and_stays_bounded() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let same_rack = t(&["idc=bj1", "rack=r3"]);
        let same_idc = t(&["idc=bj1", "rack=r9"]);
        let other = t(&["idc=sh2", "rack=r3x"]);
        let none: Vec<String> = Vec::new();
        let mut cands = Vec::new();
        for i in 0..20u8 {
            let tags = match i % 4 {
                0 => &same_rack,
                1 => &same_idc,
                2 => &other,
                _ => &none,
            };
            cands.push((rec(i), tags.as_slice()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let me = t(&["idc=bj1", "rack=r3"]);
        let got = pick_peers(&me, cands.clone(), 8, &mut rng);
        assert_eq!(got.len(), 8);
        // The 5 same-rack peers come first, then same-idc ones.
        let first5: HashSet<u8> = got[..5].iter().map(|r| r.fingerprint[0]).collect();
        assert_eq!(first5, (0..20).filter(|i| i % 4 == 0).collect());
        assert!(got[5..].iter().all(|r| r.fingerprint[0] % 4 == 1));
        // Within a level the choice varies, so load spreads.
        let mut seen = HashSet::new();
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let g = pick_peers(&me, cands.clone(), 6, &mut rng);
            seen.insert(g[5].fingerprint[0]);
        }
        assert!(seen.len() > 1, "always the same same-idc peer: {seen:?}");
        // No tags: a bounded random subset.
        let g = pick_peers(&[], cands, MAX_PEERS_PER_ANSWER, &mut rng);
        assert_eq!(g.len(), 20);
    }
}
