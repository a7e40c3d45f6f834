//! ZooKeeper as the registration center and the per-agent ordered task queue, so that
//! several `octo center` processes can serve one fleet (issue 5).
//!
//! This module holds the building blocks and [`ZkStore`], the center's whole
//! [`crate::store::Store`] on ZooKeeper (see [`store`] for its layout and atomicity);
//! nothing in the center uses them yet.
//! They are selected by `--registry zk://HOST:PORT[,HOST:PORT...]/CHROOT`, parsed by
//! [`ZkUrl`].
//!
//! # Why ZooKeeper, and what goes where
//!
//! The embedded [`crate::store::RedbStore`] is one file on one machine: one center.
//! With several centers the two things every center must agree on are *who is online
//! where* and *what each agent must run next, in which order*. ZooKeeper gives both
//! with its two primitives, and nothing more is asked of it:
//!
//! * **Ephemeral znodes** vanish when the session that made them ends, so a crashed
//!   center's registrations (its own and those of the agents connected to it) go away
//!   by themselves after the session timeout. See [`registry`].
//! * **Sequential znodes** get a number from a counter of their parent, assigned in
//!   the one total order of ZooKeeper's transactions, so producers on any number of
//!   centers append to an agent's queue and every reader sees the same order. See
//!   [`queue`].
//!
//! Layout under the chroot:
//!
//! | path                          | kind                  | data                       |
//! |-------------------------------|-----------------------|----------------------------|
//! | `/centers/<center-id>`        | ephemeral             | JSON [`CenterInfo`]        |
//! | `/agents/<host>`              | ephemeral             | JSON [`AgentInfo`]         |
//! | `/queues/<host>/t<task>-<seq>`| persistent sequential | empty (the name says all)  |
//! | `/bodies/<task>`              | persistent            | JSON body header           |
//! | `/bodies/<task>/<n>`          | persistent            | chunk `n` of the body      |
//! | `/store/...`                  | persistent            | [`ZkStore`]'s records      |
//!
//! A queue entry's name carries both the task id and the sequence number, so a
//! consumer learns its whole queue as `(seq, task id)` pairs -- the shape of
//! [`crate::store::Store::queue_for`] -- from one `getChildren`, without reading any
//! entry. The task body is stored once per task in chunks of at most
//! [`queue::CHUNK_BYTES`] (ZooKeeper refuses packets over ~1 MB) and shared by every
//! host's entry; see [`queue`] for why and for how bodies are cleaned up.
//!
//! # Sessions
//!
//! [`ZkSession`] owns the connection. The client library reconnects by itself within
//! a session (to another server of the ensemble if need be) and re-registers watches;
//! what it cannot do is survive the session's *expiry*, after which every call fails.
//! The session's supervisor then opens a new session, recreates every ephemeral node
//! registered through it, and only then bumps a generation counter that watchers
//! follow to re-arm and re-read. Ephemerals are missing for that gap, which is why
//! presence watchers report "offline" only after a grace period ([`registry`]).
//!
//! # How it is meant to plug into the center (not done here)
//!
//! * `octo center --registry zk://...` connects one [`ZkSession`] at start, registers
//!   the center with [`Registry::register_center`] and keeps one [`Presence`] watcher.
//! * When an agent's control connection is accepted (`center.rs`, where it calls
//!   `store.set_online(host, true)`), the center calls [`Registry::register_agent`];
//!   when the session ends, [`Registry::unregister_agent`] (which only deletes the node
//!   if this center still owns it, so a late cleanup never removes the registration
//!   of a center the agent has since moved to).
//! * `create_task`/`release` enqueue with [`TaskQueue::put_body`] then
//!   [`TaskQueue::enqueue_batch`] (one multi transaction per batch of hosts); the
//!   per-host pump (`pump_queue`) becomes a [`Consumer`] per connected agent,
//!   delivering [`QueueEntry`]s in order; `finish`/`expire`/`cancel` call
//!   [`TaskQueue::ack_task`], and the task's last final result calls
//!   [`TaskQueue::delete_body`]. [`ZkStore`] does the enqueueing, dequeueing and
//!   body storage inside its `Store` methods (results, task records and queue
//!   entries in the same transactions; a [`Consumer`] can still watch its queues), so
//!   the simplest wiring is `Arc::new(ZkStore::open(..)?)` in place of the
//!   `RedbStore`. It keeps task bodies as long as their tasks: do not run
//!   [`TaskQueue::sweep_orphan_bodies`] on a namespace a `ZkStore` uses.
//! * With the queue used on its own (not under a `ZkStore`), a periodic sweep calls
//!   [`TaskQueue::sweep_orphan_bodies`] for bodies whose producer died before
//!   enqueueing.

pub mod queue;
pub mod registry;
mod session;
pub mod store;

#[cfg(test)]
mod store_tests;
/// Test support: runs Debian's real ZooKeeper (standalone or a 3-node ensemble) on
/// loopback. Public so the end-to-end tests of the `octo` binary can use it too.
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;

pub use queue::{Consumer, QueueEntry, TaskQueue};
pub use registry::{AgentInfo, CenterInfo, Presence, PresenceEvent, Registry};
pub use session::{SessionOptions, ZkSession};
pub use store::{ZkStore, ZkStoreOptions};

/// The client library, re-exported so callers (and the benchmark) need not depend on it.
pub use zookeeper_client as client;

/// Everything that can go wrong here, one variant per stage.
#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    #[error("invalid registry URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to ZooKeeper at {servers}: {source}")]
    Connect {
        servers: String,
        source: zookeeper_client::Error,
    },
    #[error("creating {path}: {source}")]
    Create {
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("listing the children of {path}: {source}")]
    List {
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("deleting {path}: {source}")]
    Delete {
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("a multi-op transaction of {ops} operations ({what}): {source}")]
    Multi {
        what: &'static str,
        ops: usize,
        source: zookeeper_client::MultiWriteError,
    },
    #[error("enqueueing: {committed} of {total} entries were committed before: {source}")]
    Enqueue {
        committed: usize,
        total: usize,
        source: Box<ZkError>,
    },
    #[error("decoding {path}: {reason}")]
    Decode { path: String, reason: String },
    #[error("{0}")]
    HostName(String),
    #[error("a task body of {size} bytes is over the {max}-byte limit")]
    BodyTooLarge { size: usize, max: usize },
    #[error("task {task}'s body is already stored with different content")]
    BodyConflict { task: u64 },
    #[error("task {task}'s body is corrupt: {reason}")]
    BodyCorrupt { task: u64, reason: String },
    #[error("the ZooKeeper session is closed")]
    Closed,
    #[error("starting the store's ZooKeeper runtime thread: {0}")]
    Runtime(String),
    #[error("{what} did not complete within {after:?} (its outcome is unknown)")]
    TimedOut {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error(
        "{what} gave up after {attempts} attempts lost to concurrent updates or connection losses"
    )]
    Contention { what: &'static str, attempts: usize },
    #[error("syncing {path} with the leader: {source}")]
    Sync {
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("{what} of {size} bytes is over the {max}-byte limit")]
    TooLarge {
        what: String,
        size: usize,
        max: usize,
    },
    #[error("{path} is missing although {why}")]
    Inconsistent { path: String, why: &'static str },
}

/// A parsed `zk://HOST:PORT[,HOST:PORT...]/CHROOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkUrl {
    /// `host:port`, at least one.
    pub servers: Vec<String>,
    /// Absolute, without a trailing slash; `/` for none.
    pub chroot: String,
}

impl ZkUrl {
    pub fn parse(url: &str) -> Result<Self, ZkError> {
        let bad = |reason: &str| ZkError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("zk://")
            .ok_or_else(|| bad("must start with zk://"))?;
        let (hosts, chroot) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut servers = Vec::new();
        for server in hosts.split(',') {
            let (host, port) = server
                .rsplit_once(':')
                .ok_or_else(|| bad("every server needs HOST:PORT"))?;
            if host.is_empty() || host.contains(['/', '@', ' ']) {
                return Err(bad("empty or malformed host"));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad("port must be 1 to 65535")),
            }
            servers.push(server.to_string());
        }
        let chroot = chroot.trim_end_matches('/');
        let chroot = if chroot.is_empty() { "/" } else { chroot };
        if chroot != "/" {
            for seg in chroot[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." || seg.contains(char::is_control) {
                    return Err(bad(
                        "chroot has an empty, '.', '..' or control-character segment",
                    ));
                }
            }
        }
        if chroot.len() > 256 {
            return Err(bad("chroot over 256 bytes"));
        }
        Ok(ZkUrl {
            servers,
            chroot: chroot.to_string(),
        })
    }

    /// The client library's connect string (servers only; the chroot is applied after
    /// it has been created).
    pub fn connect_string(&self) -> String {
        self.servers.join(",")
    }
}

impl std::fmt::Display for ZkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "zk://{}{}", self.servers.join(","), self.chroot)
    }
}

/// Host names become znode names: reuse the center's rule (letters, digits, `-_.`,
/// not starting with `.`), which also rules out `/`, `.` and `..`.
pub(crate) fn check_host(host: &str) -> Result<(), ZkError> {
    crate::center::validate_host_name(host).map_err(ZkError::HostName)
}

/// Reads JSON of at most `max` bytes; never trusts a size it did not check.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(
    path: &str,
    data: &[u8],
    max: usize,
) -> Result<T, ZkError> {
    if data.len() > max {
        return Err(ZkError::Decode {
            path: path.to_string(),
            reason: format!("{} bytes, over the {max}-byte cap", data.len()),
        });
    }
    serde_json::from_slice(data).map_err(|e| ZkError::Decode {
        path: path.to_string(),
        reason: e.to_string(),
    })
}
