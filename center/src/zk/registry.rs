//! Who is online, and where: centers and agents as ephemeral znodes.
//!
//! A center registers itself under `/centers/<id>` and every agent connected to it
//! under `/agents/<host>`, all on its own session: when the center dies, its
//! registrations die with its session, and the agents reconnect to another center,
//! which registers them again (taking the node over if the old session has not
//! expired yet -- see [`ZkSession::put_ephemeral`]).
//!
//! Watching presence ([`Presence`]) uses one-shot child watches on `/agents`. A
//! one-shot watch misses whatever happens between its firing and the next read, so
//! the loop always *re-arms and reads in the same call* (`getChildren` with a watch)
//! and diffs the result against what it reported: however many changes were folded
//! into one firing, the view converges to the last state.
//!
//! An ephemeral that disappears is not reported at once: a center whose session
//! expired recreates its agents' nodes a moment later, and a moving agent is absent
//! between two centers. Reporting those gaps would be a storm of false "offline"
//! events, so a missing host is reported [`PresenceEvent::Offline`] only when it is
//! still missing after the grace period. Every firing re-reads the listed nodes'
//! data (batched multi-reads) and compares each node's creation and modification
//! zxids with what was reported, so a node replaced in one transaction (an agent
//! taken over by another center) is reported again with its new info. A data change
//! alone (the owning center rewriting its own node) fires no child watch and shows
//! at the next firing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};
use zookeeper_client as zk;

use super::{check_host, decode_json, ZkError, ZkSession};

const AGENTS: &str = "/agents";
const CENTERS: &str = "/centers";
/// Cap on a registration's JSON (a few addresses and names; keeps a multi-read of
/// `READ_BATCH` registrations well under ZooKeeper's 1 MB packet limit).
pub const MAX_INFO_BYTES: usize = 1024;
/// Reads per multi-read round trip when fetching many registrations.
const READ_BATCH: usize = 256;

/// An online agent's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The address the agent connected from / serves on.
    pub addr: String,
    /// The agent's version.
    pub version: String,
    /// The id of the center the agent is connected to.
    pub center: String,
}

/// A running center's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CenterInfo {
    /// Where its API and agent endpoint listen.
    pub addr: String,
    pub version: String,
}

#[derive(Debug, Clone)]
pub struct Registry {
    session: ZkSession,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ZkError> {
    let data = serde_json::to_vec(v).map_err(|e| ZkError::Decode {
        path: "(registration)".into(),
        reason: e.to_string(),
    })?;
    if data.len() > MAX_INFO_BYTES {
        return Err(ZkError::Decode {
            path: "(registration)".into(),
            reason: format!("{} bytes, over the {MAX_INFO_BYTES}-byte cap", data.len()),
        });
    }
    Ok(data)
}

impl Registry {
    pub fn new(session: ZkSession) -> Self {
        Registry { session }
    }

    pub fn session(&self) -> &ZkSession {
        &self.session
    }

    /// Registers this center; a leftover node of the same id (a restart before the
    /// old session expired) is replaced.
    pub async fn register_center(&self, id: &str, info: &CenterInfo) -> Result<(), ZkError> {
        check_host(id)?;
        let path = format!("{CENTERS}/{id}");
        self.session
            .put_ephemeral(&path, &encode(info)?, true)
            .await
    }

    pub async fn unregister_center(&self, id: &str) -> Result<bool, ZkError> {
        check_host(id)?;
        self.session
            .remove_ephemeral(&format!("{CENTERS}/{id}"))
            .await
    }

    /// Registers an agent connected to this center, taking the node over from
    /// another center's session if the agent was registered there.
    pub async fn register_agent(&self, host: &str, info: &AgentInfo) -> Result<(), ZkError> {
        check_host(host)?;
        let path = format!("{AGENTS}/{host}");
        self.session
            .put_ephemeral(&path, &encode(info)?, true)
            .await
    }

    /// The agent's session here ended: deletes its node if this session still owns
    /// it. Returns whether it was deleted.
    pub async fn unregister_agent(&self, host: &str) -> Result<bool, ZkError> {
        check_host(host)?;
        self.session
            .remove_ephemeral(&format!("{AGENTS}/{host}"))
            .await
    }

    pub async fn agent(&self, host: &str) -> Result<Option<AgentInfo>, ZkError> {
        check_host(host)?;
        let path = format!("{AGENTS}/{host}");
        match self.session.client().get_data(&path).await {
            Ok((data, _)) => Ok(Some(decode_json(&path, &data, MAX_INFO_BYTES)?)),
            Err(zk::Error::NoNode) => Ok(None),
            Err(source) => Err(ZkError::Read { path, source }),
        }
    }

    /// Every registered agent, by name.
    pub async fn agents(&self) -> Result<BTreeMap<String, AgentInfo>, ZkError> {
        let client = self.session.client();
        let names = list(&client, AGENTS).await?;
        read_all(&client, AGENTS, &names).await
    }

    /// Every registered center, by id.
    pub async fn centers(&self) -> Result<BTreeMap<String, CenterInfo>, ZkError> {
        let client = self.session.client();
        let names = list(&client, CENTERS).await?;
        read_all(&client, CENTERS, &names).await
    }

    /// Starts watching agents' presence. The first events report every agent online
    /// at the start; a host is reported offline only after `grace` without its node.
    pub fn watch_agents(&self, grace: Duration) -> Presence {
        let (tx, events) = mpsc::unbounded_channel();
        let (view_tx, view) = watch::channel(BTreeMap::new());
        let (rearm_tx, rearms) = watch::channel(0);
        let task = tokio::spawn(presence_loop(
            self.session.clone(),
            grace,
            tx,
            view_tx,
            rearm_tx,
        ));
        Presence {
            events,
            view,
            rearms,
            task,
        }
    }
}

async fn list(client: &zk::Client, path: &str) -> Result<Vec<String>, ZkError> {
    client
        .list_children(path)
        .await
        .map_err(|source| ZkError::List {
            path: path.to_string(),
            source,
        })
}

/// Reads `dir/name` for every name, `READ_BATCH` per round trip. Nodes gone
/// meanwhile are left out.
async fn read_raw(
    client: &zk::Client,
    dir: &str,
    names: &[String],
) -> Result<BTreeMap<String, (Vec<u8>, zk::Stat)>, ZkError> {
    let mut out = BTreeMap::new();
    for batch in names.chunks(READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for name in batch {
            let path = format!("{dir}/{name}");
            reader
                .add_get_data(&path)
                .map_err(|source| ZkError::Read { path, source })?;
        }
        let results = reader.commit().await.map_err(|source| ZkError::Read {
            path: dir.to_string(),
            source,
        })?;
        for (name, result) in batch.iter().zip(results) {
            match result {
                zk::MultiReadResult::Data { data, stat } => {
                    out.insert(name.clone(), (data, stat));
                }
                zk::MultiReadResult::Error {
                    err: zk::Error::NoNode,
                } => {}
                zk::MultiReadResult::Error { err } => {
                    return Err(ZkError::Read {
                        path: format!("{dir}/{name}"),
                        source: err,
                    })
                }
                _ => {
                    return Err(ZkError::Decode {
                        path: format!("{dir}/{name}"),
                        reason: "a multi-read answered children for a data read".into(),
                    })
                }
            }
        }
    }
    Ok(out)
}

/// [`read_raw`] and decode; undecodable registrations are logged and left out.
async fn read_all<T: serde::de::DeserializeOwned>(
    client: &zk::Client,
    dir: &str,
    names: &[String],
) -> Result<BTreeMap<String, T>, ZkError> {
    let mut out = BTreeMap::new();
    for (name, (data, _)) in read_raw(client, dir, names).await? {
        match decode_json(&format!("{dir}/{name}"), &data, MAX_INFO_BYTES) {
            Ok(v) => {
                out.insert(name, v);
            }
            Err(e) => warn!("skipping a registration: {e}"),
        }
    }
    Ok(out)
}

/// A change of an agent's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// New, back after the grace period, or back with different info.
    Online { host: String, info: AgentInfo },
    /// Gone for longer than the grace period.
    Offline { host: String },
}

/// A running presence watch; stops when dropped.
#[derive(Debug)]
pub struct Presence {
    events: mpsc::UnboundedReceiver<PresenceEvent>,
    view: watch::Receiver<BTreeMap<String, AgentInfo>>,
    rearms: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Presence {
    /// The next event (None only if the watch task died).
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        self.events.recv().await
    }

    /// An event already queued, without waiting.
    pub fn try_next(&mut self) -> Option<PresenceEvent> {
        self.events.try_recv().ok()
    }

    /// The hosts believed online (including those missing for less than the grace).
    pub fn snapshot(&self) -> BTreeMap<String, AgentInfo> {
        self.view.borrow().clone()
    }

    /// Waits until the view satisfies `pred`, up to `timeout`; false on timeout.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&BTreeMap<String, AgentInfo>) -> bool,
    ) -> bool {
        tokio::time::timeout(timeout, self.view.wait_for(|v| pred(v)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many times the child watch was (re-)armed: each time is one read.
    pub fn rearms(&self) -> u64 {
        *self.rearms.borrow()
    }
}

struct PresenceState {
    grace: Duration,
    /// Reported online, with the info reported.
    known: BTreeMap<String, AgentInfo>,
    /// (czxid, mzxid) of the node each known host's info was read from: a node
    /// recreated (takeover) or rewritten since is decoded again.
    stamps: HashMap<String, (i64, i64)>,
    /// Known hosts whose node is missing, since when.
    missing: HashMap<String, Instant>,
    tx: mpsc::UnboundedSender<PresenceEvent>,
    view: watch::Sender<BTreeMap<String, AgentInfo>>,
}

impl PresenceState {
    /// Folds a fresh listing in: every listed node is read (one multi-read per
    /// `READ_BATCH`), new or changed ones are reported, vanished ones start their
    /// grace period, and hosts that came back within it are not reported at all.
    async fn reconcile(&mut self, client: &zk::Client, names: Vec<String>) -> Result<(), ZkError> {
        let now = Instant::now();
        let nodes = read_raw(client, AGENTS, &names).await?;
        for host in self.known.keys() {
            if !nodes.contains_key(host) {
                self.missing.entry(host.clone()).or_insert(now);
            }
        }
        for (host, (data, stat)) in nodes {
            self.missing.remove(&host);
            let stamp = (stat.czxid, stat.mzxid);
            if self.stamps.get(&host) == Some(&stamp) {
                continue;
            }
            let path = format!("{AGENTS}/{host}");
            let info: AgentInfo = match decode_json(&path, &data, MAX_INFO_BYTES) {
                Ok(info) => info,
                Err(e) => {
                    warn!("presence: skipping a registration: {e}");
                    continue;
                }
            };
            self.stamps.insert(host.clone(), stamp);
            if self.known.get(&host) != Some(&info) {
                self.known.insert(host.clone(), info.clone());
                let _ = self.tx.send(PresenceEvent::Online { host, info });
            }
        }
        self.publish();
        Ok(())
    }

    /// The earliest deadline of a missing host, if any.
    fn next_deadline(&self) -> Option<Instant> {
        self.missing.values().min().map(|t| *t + self.grace)
    }

    fn expire_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .missing
            .iter()
            .filter(|(_, since)| **since + self.grace <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for host in due {
            self.missing.remove(&host);
            self.known.remove(&host);
            self.stamps.remove(&host);
            let _ = self.tx.send(PresenceEvent::Offline { host });
        }
        self.publish();
    }

    fn publish(&self) {
        self.view.send_if_modified(|v| {
            if *v != self.known {
                *v = self.known.clone();
                true
            } else {
                false
            }
        });
    }
}

async fn presence_loop(
    session: ZkSession,
    grace: Duration,
    tx: mpsc::UnboundedSender<PresenceEvent>,
    view: watch::Sender<BTreeMap<String, AgentInfo>>,
    rearms: watch::Sender<u64>,
) {
    let mut state = PresenceState {
        grace,
        known: BTreeMap::new(),
        stamps: HashMap::new(),
        missing: HashMap::new(),
        tx,
        view,
    };
    let mut generation = session.generation();
    loop {
        generation.borrow_and_update();
        let client = session.client();
        // Re-arm and read in one call, so nothing between the last firing and now
        // is missed.
        let listed = client.list_and_watch_children(AGENTS).await;
        rearms.send_modify(|n| *n += 1);
        let watcher = match listed {
            Ok((names, watcher)) => {
                if let Err(e) = state.reconcile(&client, names).await {
                    debug!("presence: reading registrations: {e}");
                    pause(&mut generation).await;
                    continue;
                }
                state.expire_due();
                watcher
            }
            Err(e) => {
                // Our own session is down: no information, so no judgement either.
                debug!("presence: listing {AGENTS}: {e}");
                pause(&mut generation).await;
                continue;
            }
        };
        let fired = watcher.changed();
        tokio::pin!(fired);
        loop {
            let deadline = state.next_deadline();
            tokio::select! {
                event = &mut fired => {
                    debug!(?event.event_type, state = ?event.session_state, "presence watch fired");
                    break;
                }
                _ = generation.changed() => break,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    state.expire_due();
                }
            }
        }
    }
}

/// After a failed read: wait for a new session or a short while.
async fn pause(generation: &mut watch::Receiver<u64>) {
    let _ = tokio::time::timeout(Duration::from_millis(250), generation.changed()).await;
}
