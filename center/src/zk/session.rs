//! One ZooKeeper session that outlives expiry.
//!
//! The client library reconnects and re-arms watches by itself while the session is
//! alive. Expiry is terminal for a `Client`, so the supervisor task here opens a new
//! session, recreates the ephemeral nodes registered through [`ZkSession`], and only
//! then bumps the generation counter, so a watcher that re-reads on a generation
//! change finds the ephemerals already back.
//!
//! A node left by one of *our* earlier sessions (its owner may not have expired on
//! the server yet when we come back) is taken over; a node created meanwhile by
//! another session (say the agent moved to another center) is left alone and dropped
//! from our list.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::{ZkError, ZkUrl};

pub(crate) static PERSISTENT: &zk::CreateOptions<'static> =
    &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
pub(crate) static EPHEMERAL: &zk::CreateOptions<'static> =
    &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
pub(crate) static SEQUENTIAL: &zk::CreateOptions<'static> =
    &zk::CreateMode::PersistentSequential.with_acls(zk::Acls::anyone_all());

/// The top-level directories, created at connect.
pub(crate) const DIRS: [&str; 4] = ["/agents", "/centers", "/queues", "/bodies"];

#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Asked of the server, which clamps it to its `[min,max]SessionTimeout`.
    pub session_timeout: Duration,
    /// Pause between attempts to open a new session after expiry.
    pub retry_backoff: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            session_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(500),
        }
    }
}

/// A cloneable handle on the current session; see the module docs.
#[derive(Debug, Clone)]
pub struct ZkSession {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: ZkUrl,
    opts: SessionOptions,
    client: Mutex<zk::Client>,
    generation: watch::Sender<u64>,
    /// Ephemeral path → data, recreated after expiry. Held across the awaits of a
    /// registration so that a recreation never interleaves with one.
    ephemerals: tokio::sync::Mutex<BTreeMap<String, Vec<u8>>>,
    /// Our own earlier session ids: nodes they still own are ours to take over.
    former: Mutex<BTreeSet<i64>>,
    cancel: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Opens a session, creates the chroot and the top-level directories.
async fn open(url: &ZkUrl, opts: &SessionOptions) -> Result<zk::Client, ZkError> {
    let servers = url.connect_string();
    let root = zk::Client::connector()
        .with_session_timeout(opts.session_timeout)
        .connect(&servers)
        .await
        .map_err(|source| ZkError::Connect {
            servers: servers.clone(),
            source,
        })?;
    let client = if url.chroot == "/" {
        root
    } else {
        root.mkdir(&url.chroot, PERSISTENT)
            .await
            .map_err(|source| ZkError::Create {
                path: url.chroot.clone(),
                source,
            })?;
        root.chroot(url.chroot.clone()).map_err(|_| ZkError::Url {
            url: url.to_string(),
            reason: "the client refused the chroot".into(),
        })?
    };
    for dir in DIRS {
        match client.create(dir, &[], PERSISTENT).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(source) => {
                return Err(ZkError::Create {
                    path: dir.to_string(),
                    source,
                })
            }
        }
    }
    info!(session = %client.session_id(), %url, "ZooKeeper session open");
    Ok(client)
}

impl ZkSession {
    pub async fn connect(url: &ZkUrl, opts: SessionOptions) -> Result<Self, ZkError> {
        let client = open(url, &opts).await?;
        let state = client.state_watcher();
        let inner = Arc::new(Inner {
            url: url.clone(),
            opts,
            client: Mutex::new(client),
            generation: watch::Sender::new(0),
            ephemerals: tokio::sync::Mutex::new(BTreeMap::new()),
            former: Mutex::new(BTreeSet::new()),
            cancel: CancellationToken::new(),
        });
        let cancel = inner.cancel.clone();
        tokio::spawn(supervise(Arc::downgrade(&inner), state, cancel));
        Ok(ZkSession { inner })
    }

    /// The current client (chrooted). After expiry it fails until the supervisor has
    /// swapped in the new one; follow [`ZkSession::generation`] to know when.
    pub fn client(&self) -> zk::Client {
        self.inner.client.lock().unwrap().clone()
    }

    pub fn session_id(&self) -> i64 {
        self.client().session_id().0
    }

    pub fn url(&self) -> &ZkUrl {
        &self.inner.url
    }

    /// Bumped after every new session, once its ephemerals are recreated.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Waits (up to `timeout`) until the current session is connected; false on
    /// timeout.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let client = self.client();
            let mut states = client.state_watcher();
            if states.state() == zk::SessionState::SyncConnected {
                return true;
            }
            let mut generation = self.generation();
            tokio::select! {
                _ = states.changed() => {}
                _ = generation.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Creates (or updates) the ephemeral node `path` and remembers it, so that it is
    /// recreated after session expiry. A node held by another live session is
    /// replaced when `takeover` (an agent that reconnected here from another center),
    /// else refused with [`ZkError::Create`] / `NodeExists`.
    pub async fn put_ephemeral(
        &self,
        path: &str,
        data: &[u8],
        takeover: bool,
    ) -> Result<(), ZkError> {
        let mut registered = self.inner.ephemerals.lock().await;
        let client = self.client();
        put(&client, path, data, |_| takeover).await?;
        registered.insert(path.to_string(), data.to_vec());
        Ok(())
    }

    /// Forgets `path` and deletes it if this session owns it. Returns whether it was
    /// deleted.
    pub async fn remove_ephemeral(&self, path: &str) -> Result<bool, ZkError> {
        let mut registered = self.inner.ephemerals.lock().await;
        registered.remove(path);
        let client = self.client();
        let stat = match client.check_stat(path).await {
            Ok(Some(stat)) => stat,
            Ok(None) => return Ok(false),
            Err(source) => {
                return Err(ZkError::Read {
                    path: path.to_string(),
                    source,
                })
            }
        };
        if stat.ephemeral_owner != client.session_id().0 {
            debug!(path, owner = stat.ephemeral_owner, "not ours: left alone");
            return Ok(false);
        }
        match client.delete(path, Some(stat.version)).await {
            Ok(()) => Ok(true),
            Err(zk::Error::NoNode | zk::Error::BadVersion) => Ok(false),
            Err(source) => Err(ZkError::Delete {
                path: path.to_string(),
                source,
            }),
        }
    }

    /// The ephemeral paths currently registered through this session.
    pub async fn ephemerals(&self) -> Vec<String> {
        self.inner.ephemerals.lock().await.keys().cloned().collect()
    }
}

/// Create `path`, or when it exists: update it if we own it, replace it (delete with
/// the version read + create, in one transaction) if `may_take(owner)`, else fail.
async fn put(
    client: &zk::Client,
    path: &str,
    data: &[u8],
    may_take: impl Fn(i64) -> bool,
) -> Result<(), ZkError> {
    let create_err = |source| ZkError::Create {
        path: path.to_string(),
        source,
    };
    for _ in 0..5 {
        match client.create(path, data, EPHEMERAL).await {
            Ok(_) => return Ok(()),
            Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(create_err(e)),
        }
        let stat = match client.check_stat(path).await {
            Ok(Some(stat)) => stat,
            Ok(None) => continue,
            Err(source) => {
                return Err(ZkError::Read {
                    path: path.to_string(),
                    source,
                })
            }
        };
        if stat.ephemeral_owner == client.session_id().0 {
            match client.set_data(path, data, Some(stat.version)).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NoNode | zk::Error::BadVersion) => continue,
                Err(e) => return Err(create_err(e)),
            }
        }
        if !may_take(stat.ephemeral_owner) {
            return Err(create_err(zk::Error::NodeExists));
        }
        let mut txn = client.new_multi_writer();
        txn.add_delete(path, Some(stat.version))
            .and_then(|()| txn.add_create(path, data, EPHEMERAL))
            .map_err(create_err)?;
        match txn.commit().await {
            Ok(_) => {
                info!(path, from = stat.ephemeral_owner, "took over");
                return Ok(());
            }
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode | zk::Error::BadVersion | zk::Error::NodeExists,
                ..
            }) => continue,
            Err(source) => {
                return Err(ZkError::Multi {
                    what: "ephemeral takeover",
                    ops: 2,
                    source,
                })
            }
        }
    }
    Err(create_err(zk::Error::BadVersion))
}

async fn supervise(weak: Weak<Inner>, mut state: zk::StateWatcher, cancel: CancellationToken) {
    loop {
        let st = tokio::select! {
            _ = cancel.cancelled() => return,
            s = state.changed() => s,
        };
        match st {
            zk::SessionState::Expired => {}
            zk::SessionState::Closed | zk::SessionState::AuthFailed => {
                debug!(?st, "ZooKeeper session ended: supervisor stops");
                return;
            }
            other => {
                debug!(state = ?other, "ZooKeeper session state");
                continue;
            }
        }
        warn!("ZooKeeper session expired: opening a new one");
        loop {
            let Some(inner) = weak.upgrade() else { return };
            match open(&inner.url, &inner.opts).await {
                Ok(client) => {
                    let old = std::mem::replace(&mut *inner.client.lock().unwrap(), client.clone());
                    inner.former.lock().unwrap().insert(old.session_id().0);
                    state = client.state_watcher();
                    recreate(&inner, &client).await;
                    inner.generation.send_modify(|g| *g += 1);
                    break;
                }
                Err(e) => {
                    warn!("reopening the ZooKeeper session: {e}");
                    let backoff = inner.opts.retry_backoff;
                    drop(inner);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }
}

/// Recreates the registered ephemerals on a fresh session.
async fn recreate(inner: &Inner, client: &zk::Client) {
    let mut registered = inner.ephemerals.lock().await;
    let former = inner.former.lock().unwrap().clone();
    let mut lost = Vec::new();
    for (path, data) in registered.iter() {
        let mut result = Err(ZkError::Closed);
        for _ in 0..5 {
            result = put(client, path, data, |owner| former.contains(&owner)).await;
            match &result {
                Err(ZkError::Create {
                    source: zk::Error::ConnectionLoss,
                    ..
                }) => tokio::time::sleep(inner.opts.retry_backoff).await,
                _ => break,
            }
        }
        match result {
            Ok(()) => debug!(path, "ephemeral recreated"),
            Err(ZkError::Create {
                source: zk::Error::NodeExists,
                ..
            }) => {
                // Another session registered it meanwhile (the agent moved on).
                info!(path, "held by another session now: dropped from ours");
                lost.push(path.clone());
            }
            Err(e) => warn!(path, "not recreated after session expiry: {e}"),
        }
    }
    for path in lost {
        registered.remove(&path);
    }
    info!(
        count = registered.len(),
        "ephemerals recreated on the new session"
    );
}
