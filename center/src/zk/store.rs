//! [`ZkStore`]: the center's [`Store`] on ZooKeeper, so that several `octo center`
//! processes share one fleet's tokens, inventory, tasks, queues, results and audit
//! log (issue 5).
//!
//! # What is in ZooKeeper, and where
//!
//! Everything the [`Store`] trait holds, under the URL's chroot. Records are postcard
//! in an envelope that adds a random 64-bit nonce per write (see "Connection loss").
//!
//! | path                                   | data                                      |
//! |----------------------------------------|-------------------------------------------|
//! | `/store/meta/<hex key>`                | the raw meta value                        |
//! | `/store/tokens/<hex id>`               | [`TokenRecord`]                           |
//! | `/store/hosts/<host>`                  | [`HostRecord`]                            |
//! | `/store/counters/task`                 | the next task id, decimal                 |
//! | `/store/tasks/<id:020>`                | [`TaskRecord`] (+ "body is external")     |
//! | `/store/state/<id:020>`                | [`TaskState`] and the open-host count     |
//! | `/store/results/<id:020>/<host>`       | [`HostResult`]                            |
//! | `/store/audit/e-<seq:010>`             | [`AuditEntry`], persistent sequential     |
//! | `/queues/<host>/t<task>-<seq:010>`     | empty: the [`super::queue`] layout        |
//! | `/bodies/<task>`, `/bodies/<task>/<n>` | a large task body, [`super::queue`] chunks|
//!
//! Token ids and meta keys are hex-encoded into znode names (any byte string, and
//! hex keeps their byte order); host names must pass the center's host-name rule
//! (letters, digits, `-_.`), which makes them valid znode names as they are. The
//! queues are exactly [`super::queue::TaskQueue`]'s, so its [`super::Consumer`] can
//! follow a host's queue written by this store.
//!
//! # Atomicity
//!
//! Every mutation is an optimistic read-modify-write: read the nodes with their
//! versions, then commit one `multi` whose `setData`s carry the versions read. A
//! concurrent change by another center fails the whole transaction (`BadVersion`,
//! `NoNode`, `NodeExists`) and it is replanned from fresh reads, with a short
//! randomized backoff. So:
//!
//! * `consume_token` spends a one-time token once across all centers: both may read
//!   `uses = 0`, only one `setData` at that version succeeds, the other re-reads
//!   `uses = 1` and is refused.
//! * Task ids come from `/store/counters/task`, whose versioned `setData` is *in the
//!   same multi* that creates the task record, its state node, a result per host and
//!   the queue entries: ids are unique and increasing in commit order across centers,
//!   and a task appears whole or not at all.
//! * `finish`/`expire` store the final result, delete the host's queue entry and
//!   count down the task's open hosts (completing it at zero) in one multi, so an
//!   entry leaves its queue only in the transaction that stores the final result.
//!   `finish_many` (the center's group commit) does this for all the hosts of a task
//!   in a batch at once: one multi per [`MULTI_BUDGET`] that writes their results,
//!   deletes their entries and counts the state node down *once* by their number.
//!   Every report of a task counts down that one node, so closing hosts one multi
//!   each made concurrent reports collide on its version and retry, one quorum
//!   write (and fsync) per host; a batch of a task's reports is now one. A conflict
//!   re-reads only what failed: the state node if the state update failed (it comes
//!   first in the multi, so a stale state fails there), else the remaining hosts.
//! * `cancel_task`, `release`, `ack_delivery`, `mark_running`, `set_online`, ... are
//!   one multi each (see below for tasks too large for one).
//!
//! The task's state and open count live in their own small node, not in the task
//! record, so a host finishing rewrites a few bytes rather than the record with its
//! body and host list.
//!
//! **Large tasks.** ZooKeeper refuses requests over `jute.maxbuffer` (1 MB). When a
//! task's operations are estimated over [`MULTI_BUDGET`], or its body must go to the
//! chunked body nodes, `create_task` is staged: (1) reserve the id (a versioned
//! `setData` of the counter alone), (2) store the body under `/bodies/<id>` if it is
//! over [`INLINE_BODY_MAX`], (3) create the results and queue entries in multis of at
//! most [`MULTI_BUDGET`], (4) create the state node and the task record in a last
//! multi. Readers find a task through its record, which comes last, so they never see
//! a task whose hosts are missing. If the call fails, what was written is removed
//! (best effort). If the center *crashes* between (1) and (4), an id is skipped and
//! its results and queue entries stay behind for a task that does not exist: the
//! center's queue pump skips entries whose task it cannot load, `get_task` and
//! `list_tasks` never show it, and [`ZkStore::remove_incomplete_task`] deletes the
//! leftovers. `cancel_task` on a task too large for one multi is likewise a sequence
//! of multis, each atomic, the task state written by the last.
//!
//! **Connection loss.** A multi whose answer is lost may or may not have committed.
//! After a loss the store `sync`s and re-reads a node the transaction would have
//! written: if it holds exactly the bytes written (the nonce makes them unique to this
//! attempt), the call succeeded; otherwise it is replanned, and the versions make a
//! replay of an applied transaction fail rather than apply twice. One ambiguity is
//! left: if another center changed that node again before the re-read, an applied
//! transaction looks unapplied and is replanned against the new state (a finish then
//! reports `false`, a one-time token `AlreadyUsed`: never a double spend). Appending
//! to the audit log is a plain sequential create and is at least once under
//! connection loss.
//!
//! # Reading many nodes
//!
//! Reads of many nodes (a task's results, the queues of the hosts being closed, a
//! listing's records) go in ZooKeeper multi-reads of `READ_BATCH` (256) nodes: one
//! request and one answer for the server to handle instead of one per node, about
//! ten times faster than pipelining single reads (`results()` of 1,000 hosts: 85 ms
//! to 6 ms in a debug build). `jute.maxbuffer` bounds requests, not answers, so a
//! batch of results with full outputs (up to about 36 MB) is still answered; the
//! tests read 40 results of 128 KiB in one.
//!
//! # Calling async from the synchronous trait
//!
//! [`Store`] is synchronous and is called from tokio tasks of the center's runtime and
//! from plain threads. The store owns a dedicated thread running a current-thread
//! tokio runtime that drives the ZooKeeper client; each trait call spawns its work on
//! that runtime and waits for the answer on a `std::sync::mpsc` channel. The caller's
//! thread only blocks on the channel (like a redb write blocks on the disk), never
//! enters a runtime, so this works from inside any runtime, a current-thread one
//! included, and from a thread holding a std `Mutex` (the store's runtime never takes
//! the caller's locks). Every call is bounded by [`ZkStoreOptions::op_timeout`].
//! Async callers that must not block a worker should use `spawn_blocking`, as for
//! redb.
//!
//! # The one behavioural difference: outputs capped at 64 KiB
//!
//! ZooKeeper keeps every znode in memory on every server and ships every write to
//! every follower; it is for coordination data, not bulk data. A fleet reporting 1 MiB
//! of stdout and stderr per host (what [`crate::store::RedbStore`] keeps) would make a
//! 1000-host task a 2 GB ensemble. So a result's stdout and stderr are each cut to
//! [`OUTPUT_MAX`] (64 KiB) with `stdout_truncated`/`stderr_truncated` set, and its
//! error text to [`ERROR_MAX`]. Everything else matches `RedbStore`, as the shared
//! conformance tests (`store::conformance`) check against both.
//!
//! Limits that `RedbStore` does not have, all refused as [`StoreError::Invalid`]:
//! host names must be valid znode names (the center's rule), token ids and meta keys
//! at most 256 bytes, a host record at most [`HOST_MAX`], a token [`TOKEN_MAX`], a meta
//! value [`META_MAX`], a task body [`super::queue::MAX_BODY_BYTES`], a task record
//! without its body [`TASK_MAX`], and an audit entry's detail is cut to fit
//! [`AUDIT_MAX`]. Every size read back is checked against the same caps before it is
//! decoded.
//!
//! Multi-center caveat: `mark_all_offline` marks *every* host offline, including those
//! connected to other centers; a center joining a running fleet should not call it.
//!
//! Audit entries must never be deleted by hand, only by `prune_audit`: `list_audit`
//! finds the newest ones from the child version of `/store/audit` without listing it,
//! down to the floor retention records in `/store/meta/audit.floor`. Nor may the store be called from a task running on
//! its own runtime (it would wait on itself); nothing does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::queue::{queue_path, QueueEntry, TaskQueue, MAX_BODY_BYTES};
use super::session::{PERSISTENT, SEQUENTIAL};
use super::{check_host, SessionOptions, ZkError, ZkSession, ZkUrl};
use crate::store::{
    AuditEntry, HostOutcome, HostRecord, HostResult, HostState, NewTask, Store, StoreError,
    TaskRecord, TaskState, TokenRecord, TokenUseError,
};

const ROOT: &str = "/store";
const META: &str = "/store/meta";
const TOKENS: &str = "/store/tokens";
const HOSTS: &str = "/store/hosts";
const COUNTERS: &str = "/store/counters";
const TASK_COUNTER: &str = "/store/counters/task";
const TASKS: &str = "/store/tasks";
const STATE: &str = "/store/state";
const RESULTS: &str = "/store/results";
const AUDIT: &str = "/store/audit";
/// Meta key: the lowest audit name that may still exist (raised by retention).
const AUDIT_FLOOR: &str = "audit.floor";
const DIRS: [&str; 9] = [
    ROOT, META, TOKENS, HOSTS, COUNTERS, TASKS, STATE, RESULTS, AUDIT,
];

/// Estimated bytes of one multi transaction (paths, data and per-op overhead), kept
/// well under ZooKeeper's 1 MB `jute.maxbuffer`.
pub const MULTI_BUDGET: usize = 768 * 1024;
/// A task body up to this size stays in the task record; larger ones go to the
/// chunked body nodes of [`super::queue`].
pub const INLINE_BODY_MAX: usize = 512 * 1024;
/// A task record without its body (mostly the host list).
pub const TASK_MAX: usize = 900 * 1024;
/// Per output stream of a result; see the module docs.
pub const OUTPUT_MAX: usize = 64 * 1024;
/// A result's error text.
pub const ERROR_MAX: usize = 8 * 1024;
pub const HOST_MAX: usize = 64 * 1024;
pub const TOKEN_MAX: usize = 16 * 1024;
pub const META_MAX: usize = 512 * 1024;
pub const AUDIT_MAX: usize = 16 * 1024;
/// Largest token id or meta key, in bytes.
const KEY_MAX: usize = 256;
/// Read caps (the write caps plus room for the envelope and the other fields).
#[doc(hidden)]
pub const RESULT_READ_MAX: usize = 2 * OUTPUT_MAX + ERROR_MAX + 4096;
#[doc(hidden)]
pub const TASK_READ_MAX: usize = 1024 * 1024;
#[doc(hidden)]
pub const STATE_READ_MAX: usize = 64;
const COUNTER_READ_MAX: usize = 32;
/// Per-operation overhead in the size estimate of a multi.
const OP_OVERHEAD: usize = 64;
/// Hosts per multi in `release` and the staged paths.
const HOSTS_PER_MULTI: usize = 500;
/// Tasks read at once by `list_tasks`.
const READ_WINDOW: usize = 64;
/// Reads per multi-read request.
const READ_BATCH: usize = 256;
/// Attempts of a transaction before giving up with [`ZkError::Contention`].
const ATTEMPTS: usize = 64;
/// Retries of a read after a connection loss.
const READ_RETRIES: usize = 50;

/// How to open a [`ZkStore`].
#[derive(Debug, Clone)]
pub struct ZkStoreOptions {
    pub session: SessionOptions,
    /// Bound on every store call (connection losses included); past it the call fails
    /// with [`ZkError::TimedOut`] and its outcome is unknown.
    pub op_timeout: Duration,
    /// Bound on connecting at open.
    pub connect_timeout: Duration,
}

impl Default for ZkStoreOptions {
    fn default() -> Self {
        ZkStoreOptions {
            session: SessionOptions::default(),
            op_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A record as stored: the value and a nonce unique to the write.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    nonce: u64,
    value: T,
}

/// What `/store/tasks/<id>` holds. Public (hidden) for the fuzz target only.
#[doc(hidden)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TaskNode {
    /// With an empty body when `external_body`; its `state` is not used (see
    /// [`StateNode`]).
    pub record: TaskRecord,
    pub external_body: bool,
}

/// What `/store/state/<id>` holds. Public (hidden) for the fuzz target only.
#[doc(hidden)]
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateNode {
    pub state: TaskState,
    pub open: u64,
}

/// How every record is written (public for the fuzz target's seeds).
#[doc(hidden)]
pub fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(&Envelope {
        nonce: rand::random(),
        value,
    })
    .map_err(|source| StoreError::Encode { table, source })
}

/// How every record is read back, under its kind's cap (public for the fuzz target).
#[doc(hidden)]
pub fn decode<T: DeserializeOwned>(
    table: &'static str,
    path: &str,
    data: &[u8],
    max: usize,
) -> Result<T, StoreError> {
    if data.len() > max {
        return Err(ZkError::Decode {
            path: path.to_string(),
            reason: format!("{} bytes, over the {max}-byte cap", data.len()),
        }
        .into());
    }
    postcard::from_bytes::<Envelope<T>>(data)
        .map(|e| e.value)
        .map_err(|source| StoreError::Decode { table, source })
}

fn check_size(what: &str, size: usize, max: usize) -> Result<(), StoreError> {
    if size > max {
        return Err(StoreError::Invalid(
            ZkError::TooLarge {
                what: what.to_string(),
                size,
                max,
            }
            .to_string(),
        ));
    }
    Ok(())
}

fn key_name(kind: &str, key: &str) -> Result<String, StoreError> {
    if key.len() > KEY_MAX {
        return Err(StoreError::Invalid(format!(
            "a {kind} of {} bytes is over the {KEY_MAX}-byte limit",
            key.len()
        )));
    }
    if key.is_empty() {
        return Err(StoreError::Invalid(format!("an empty {kind}")));
    }
    Ok(data_encoding::HEXLOWER.encode(key.as_bytes()))
}

fn meta_path(key: &str) -> Result<String, StoreError> {
    Ok(format!("{META}/{}", key_name("meta key", key)?))
}

fn token_path(id: &str) -> Result<String, StoreError> {
    Ok(format!("{TOKENS}/{}", key_name("token id", id)?))
}

fn host_path(name: &str) -> Result<String, StoreError> {
    check_host(name).map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok(format!("{HOSTS}/{name}"))
}

fn task_path(id: u64) -> String {
    format!("{TASKS}/{id:020}")
}

fn state_path(id: u64) -> String {
    format!("{STATE}/{id:020}")
}

fn results_dir(id: u64) -> String {
    format!("{RESULTS}/{id:020}")
}

fn result_path(id: u64, host: &str) -> String {
    format!("{RESULTS}/{id:020}/{host}")
}

fn entry_prefix(host: &str, task: u64) -> String {
    format!("{}/t{task}-", queue_path(host))
}

fn not_found(what: &'static str, key: String) -> StoreError {
    StoreError::NotFound { what, key }
}

fn result_not_found(task: u64, host: &str) -> StoreError {
    not_found("task result", format!("{task}/{host}"))
}

/// Cuts `data` to `max` bytes; true if it was longer.
fn cap_bytes(data: &mut Vec<u8>, max: usize) -> bool {
    if data.len() > max {
        data.truncate(max);
        true
    } else {
        false
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn cap_text(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn is_transient(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::SessionExpired
    )
}

fn is_conflict(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::BadVersion | zk::Error::NoNode | zk::Error::NodeExists
    )
}

/// One write of a multi transaction.
#[derive(Debug, Clone)]
enum Op {
    Create {
        path: String,
        data: Vec<u8>,
    },
    /// A persistent sequential create; `path` is the prefix.
    Enqueue {
        path: String,
    },
    Set {
        path: String,
        data: Vec<u8>,
        version: i32,
    },
    Delete {
        path: String,
        version: Option<i32>,
    },
}

impl Op {
    fn size(&self) -> usize {
        OP_OVERHEAD
            + match self {
                Op::Create { path, data } | Op::Set { path, data, .. } => path.len() + data.len(),
                Op::Enqueue { path } | Op::Delete { path, .. } => path.len(),
            }
    }
}

fn ops_size(ops: &[Op]) -> usize {
    ops.iter().map(Op::size).sum()
}

/// One read of a multi-read.
enum Read {
    Data(String),
    Children(String),
}

impl Read {
    fn path(&self) -> &str {
        match self {
            Read::Data(p) | Read::Children(p) => p,
        }
    }
}

/// Its answer; None for a node that does not exist.
enum Answer {
    Data(Option<(Vec<u8>, zk::Stat)>),
    Children(Option<Vec<String>>),
}

/// How a commit ended.
enum Commit {
    Done,
    /// Another writer got there first; nothing was applied. `index` is the first
    /// operation that failed (ZooKeeper stops checking a multi there).
    Conflict {
        source: zk::Error,
        index: usize,
    },
    /// The answer was lost; it may have been applied.
    Lost(zk::Error),
}

/// The outcome of planning a transaction from fresh reads.
enum Plan<T> {
    /// Nothing to write.
    Done(T),
    Commit {
        ops: Vec<Op>,
        value: T,
        /// A node and the exact bytes the transaction writes to it: present after a
        /// lost answer means it was applied.
        proof: Option<Proof>,
    },
}

/// A node and the exact bytes a transaction writes to it.
type Proof = (String, Vec<u8>);

/// The shared state behind a [`ZkStore`], used on its runtime.
struct Core {
    session: ZkSession,
    queue: TaskQueue,
}

impl Core {
    fn client(&self) -> zk::Client {
        self.session.client()
    }

    async fn backoff(attempt: usize) {
        let base = 5u64 << attempt.min(6);
        let jitter = rand::random::<u64>() % (base + 1);
        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
    }

    /// Reads a node with its stat; None if it does not exist.
    async fn read(&self, path: &str) -> Result<Option<(Vec<u8>, zk::Stat)>, ZkError> {
        let mut tries = 0;
        loop {
            match self.client().get_data(path).await {
                Ok(x) => return Ok(Some(x)),
                Err(zk::Error::NoNode) => return Ok(None),
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::Read {
                        path: path.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Reads many nodes with [`Core::multi_read`].
    async fn read_many(
        &self,
        paths: &[String],
    ) -> Result<Vec<Option<(Vec<u8>, zk::Stat)>>, ZkError> {
        let reads: Vec<Read> = paths.iter().cloned().map(Read::Data).collect();
        Ok(self
            .multi_read(&reads)
            .await?
            .into_iter()
            .map(|a| match a {
                Answer::Data(node) => node,
                Answer::Children(_) => unreachable!("multi_read answers each read in kind"),
            })
            .collect())
    }

    /// Reads many nodes' data or children, [`READ_BATCH`] per multi-read request
    /// (one round trip, and one request for the server to queue, instead of one per
    /// node). A missing node answers None; a connection loss retries the batch.
    async fn multi_read(&self, reads: &[Read]) -> Result<Vec<Answer>, ZkError> {
        let mut out = Vec::with_capacity(reads.len());
        for batch in reads.chunks(READ_BATCH) {
            let mut tries = 0;
            let answers = loop {
                let client = self.client();
                let mut reader = client.new_multi_reader();
                for read in batch {
                    let added = match read {
                        Read::Data(path) => reader.add_get_data(path),
                        Read::Children(path) => reader.add_get_children(path),
                    };
                    added.map_err(|source| ZkError::Read {
                        path: read.path().to_string(),
                        source,
                    })?;
                }
                match reader.commit().await {
                    Ok(answers) => break answers,
                    Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                        tries += 1;
                        Self::backoff(tries).await;
                    }
                    Err(source) => {
                        return Err(ZkError::Read {
                            path: batch[0].path().to_string(),
                            source,
                        })
                    }
                }
            };
            if answers.len() != batch.len() {
                return Err(ZkError::Decode {
                    path: batch[0].path().to_string(),
                    reason: format!("{} answers to {} reads", answers.len(), batch.len()),
                });
            }
            for (read, answer) in batch.iter().zip(answers) {
                out.push(match (read, answer) {
                    (Read::Data(_), zk::MultiReadResult::Data { data, stat }) => {
                        Answer::Data(Some((data, stat)))
                    }
                    (
                        Read::Data(_),
                        zk::MultiReadResult::Error {
                            err: zk::Error::NoNode,
                        },
                    ) => Answer::Data(None),
                    (Read::Children(_), zk::MultiReadResult::Children { mut children }) => {
                        children.sort_unstable();
                        Answer::Children(Some(children))
                    }
                    (
                        Read::Children(_),
                        zk::MultiReadResult::Error {
                            err: zk::Error::NoNode,
                        },
                    ) => Answer::Children(None),
                    (read, zk::MultiReadResult::Error { err }) => {
                        return Err(ZkError::Read {
                            path: read.path().to_string(),
                            source: err,
                        })
                    }
                    (read, _) => {
                        return Err(ZkError::Decode {
                            path: read.path().to_string(),
                            reason: "a multi-read answered another kind of read".into(),
                        })
                    }
                });
            }
        }
        Ok(out)
    }

    /// A node's children, sorted; None if it does not exist.
    async fn children(&self, path: &str) -> Result<Option<Vec<String>>, ZkError> {
        let mut tries = 0;
        loop {
            match self.client().list_children(path).await {
                Ok(mut names) => {
                    names.sort_unstable();
                    return Ok(Some(names));
                }
                Err(zk::Error::NoNode) => return Ok(None),
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::List {
                        path: path.to_string(),
                        source,
                    })
                }
            }
        }
    }

    async fn stat(&self, path: &str) -> Result<Option<zk::Stat>, ZkError> {
        let mut tries = 0;
        loop {
            match self.client().check_stat(path).await {
                Ok(s) => return Ok(s),
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::Read {
                        path: path.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Creates a persistent node, fine if it exists.
    async fn ensure(&self, path: &str, data: &[u8]) -> Result<(), ZkError> {
        let mut tries = 0;
        loop {
            match self.client().create(path, data, PERSISTENT).await {
                Ok(_) | Err(zk::Error::NodeExists) => return Ok(()),
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::Create {
                        path: path.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Commits `ops` as one multi.
    async fn commit(&self, what: &'static str, ops: &[Op]) -> Result<Commit, ZkError> {
        if ops.is_empty() {
            return Ok(Commit::Done);
        }
        let client = self.client();
        let mut txn = client.new_multi_writer();
        for op in ops {
            let added = match op {
                Op::Create { path, data } => txn.add_create(path, data, PERSISTENT),
                Op::Enqueue { path } => txn.add_create(path, &[], SEQUENTIAL),
                Op::Set {
                    path,
                    data,
                    version,
                } => txn.add_set_data(path, data, Some(*version)),
                Op::Delete { path, version } => txn.add_delete(path, *version),
            };
            added.map_err(|source| ZkError::Multi {
                what,
                ops: ops.len(),
                source: zk::MultiWriteError::RequestFailed { source },
            })?;
        }
        match txn.commit().await {
            Ok(_) => Ok(Commit::Done),
            Err(zk::MultiWriteError::OperationFailed { source, index }) if is_conflict(&source) => {
                if matches!(source, zk::Error::NoNode) {
                    if let Some(Op::Enqueue { .. }) = ops.get(index) {
                        // A queue node we believed in is gone: recreate them all.
                        self.queue.forget_queues();
                    }
                }
                Ok(Commit::Conflict { source, index })
            }
            Err(zk::MultiWriteError::RequestFailed { source }) if is_transient(&source) => {
                Ok(Commit::Lost(source))
            }
            Err(source) => Err(ZkError::Multi {
                what,
                ops: ops.len(),
                source,
            }),
        }
    }

    /// Whether `path` holds exactly `bytes`, after catching up with the leader.
    async fn applied(&self, path: &str, bytes: &[u8]) -> Result<bool, ZkError> {
        let mut tries = 0;
        loop {
            match self.client().sync(path).await {
                Ok(()) | Err(zk::Error::NoNode) => break,
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::Sync {
                        path: path.to_string(),
                        source,
                    })
                }
            }
        }
        Ok(self.read(path).await?.is_some_and(|(d, _)| d == bytes))
    }

    /// Plans and commits until a plan commits or needs no write; see the module docs.
    async fn transact<'a, T, E>(
        &'a self,
        what: &'static str,
        mut plan: impl FnMut() -> BoxFuture<'a, Result<Plan<T>, E>>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        for attempt in 0..ATTEMPTS {
            let (ops, value, proof) = match plan().await? {
                Plan::Done(v) => return Ok(v),
                Plan::Commit { ops, value, proof } => (ops, value, proof),
            };
            match self.commit(what, &ops).await.map_err(StoreError::from)? {
                Commit::Done => return Ok(value),
                Commit::Conflict { source, .. } => {
                    debug!(what, attempt, "conflict ({source}): replanning")
                }
                Commit::Lost(e) => {
                    warn!(
                        what,
                        attempt, "answer lost ({e}): checking whether it applied"
                    );
                    if let Some((path, bytes)) = &proof {
                        if self.applied(path, bytes).await.map_err(StoreError::from)? {
                            return Ok(value);
                        }
                    }
                }
            }
            Self::backoff(attempt).await;
        }
        Err(StoreError::from(ZkError::Contention {
            what,
            attempts: ATTEMPTS,
        })
        .into())
    }

    /// Commits staged writes once, treating a lost answer or a conflict as success
    /// when the proof is there.
    async fn commit_staged(
        &self,
        what: &'static str,
        ops: &[Op],
        proof: (&str, &[u8]),
    ) -> Result<(), StoreError> {
        for attempt in 0..3 {
            match self.commit(what, ops).await? {
                Commit::Done => return Ok(()),
                Commit::Conflict { source: e, .. } | Commit::Lost(e) => {
                    if self.applied(proof.0, proof.1).await? {
                        return Ok(());
                    }
                    if !matches!(e, zk::Error::NoNode) && !is_transient(&e) {
                        return Err(ZkError::Multi {
                            what,
                            ops: ops.len(),
                            source: zk::MultiWriteError::RequestFailed { source: e },
                        }
                        .into());
                    }
                    // A queue node vanished, or the connection: recreate and retry.
                    let hosts = ops.iter().filter_map(|op| match op {
                        Op::Enqueue { path } => path.split('/').nth(2),
                        _ => None,
                    });
                    self.queue.ensure_queues(&self.client(), hosts).await?;
                    Self::backoff(attempt).await;
                }
            }
        }
        Err(ZkError::Contention { what, attempts: 3 }.into())
    }

    async fn read_counter(&self, path: &str) -> Result<(u64, i32), StoreError> {
        let (data, stat) = self
            .read(path)
            .await?
            .ok_or_else(|| ZkError::Inconsistent {
                path: path.to_string(),
                why: "the store was initialized",
            })?;
        let bad = |reason: String| ZkError::Decode {
            path: path.to_string(),
            reason,
        };
        if data.len() > COUNTER_READ_MAX {
            return Err(bad(format!("{} bytes", data.len())).into());
        }
        let text = std::str::from_utf8(&data).map_err(|e| bad(e.to_string()))?;
        let n = text.parse::<u64>().map_err(|e| bad(e.to_string()))?;
        Ok((n, stat.version))
    }

    async fn read_result(
        &self,
        task: u64,
        host: &str,
    ) -> Result<Option<(HostResult, i32)>, StoreError> {
        if check_host(host).is_err() {
            return Ok(None);
        }
        let path = result_path(task, host);
        match self.read(&path).await? {
            Some((data, stat)) => Ok(Some((
                decode("results", &path, &data, RESULT_READ_MAX)?,
                stat.version,
            ))),
            None => Ok(None),
        }
    }

    async fn read_state(&self, task: u64) -> Result<Option<(StateNode, i32)>, StoreError> {
        let path = state_path(task);
        match self.read(&path).await? {
            Some((data, stat)) => Ok(Some((
                decode("state", &path, &data, STATE_READ_MAX)?,
                stat.version,
            ))),
            None => Ok(None),
        }
    }

    /// The queue entries of `task` in `host`'s queue, as delete operations.
    async fn dequeue_ops(&self, host: &str, task: u64) -> Result<Vec<Op>, StoreError> {
        let names = self.children(&queue_path(host)).await?.unwrap_or_default();
        Ok(dequeue_ops(host, task, &names))
    }

    // --- tokens, hosts, meta ---

    /// Sets or creates a node regardless of its version.
    async fn upsert(&self, what: &'static str, path: &str, data: &[u8]) -> Result<(), StoreError> {
        for attempt in 0..ATTEMPTS {
            let client = self.client();
            match client.set_data(path, data, None).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NoNode) => {}
                Err(e) if is_transient(&e) => {
                    Self::backoff(attempt).await;
                    continue;
                }
                Err(source) => {
                    return Err(ZkError::Create {
                        path: path.to_string(),
                        source,
                    }
                    .into())
                }
            }
            match client.create(path, data, PERSISTENT).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NodeExists) => {}
                Err(e) if is_transient(&e) => Self::backoff(attempt).await,
                Err(source) => {
                    return Err(ZkError::Create {
                        path: path.to_string(),
                        source,
                    }
                    .into())
                }
            }
        }
        Err(ZkError::Contention {
            what,
            attempts: ATTEMPTS,
        }
        .into())
    }

    /// Read-modify-write of one record; `f` returns false to leave it alone. Returns
    /// None if the node does not exist, else what `f` returned.
    async fn update<T: Serialize + DeserializeOwned + Send>(
        &self,
        what: &'static str,
        table: &'static str,
        path: &str,
        max: usize,
        f: impl Fn(&mut T) -> bool + Send + Sync,
    ) -> Result<Option<bool>, StoreError> {
        let f = &f;
        self.transact(what, || {
            Box::pin(async move {
                let Some((data, stat)) = self.read(path).await? else {
                    return Ok(Plan::Done(None));
                };
                let mut value: T = decode(table, path, &data, max)?;
                if !f(&mut value) {
                    return Ok(Plan::Done(Some(false)));
                }
                let data = encode(table, &value)?;
                Ok(Plan::Commit {
                    ops: vec![Op::Set {
                        path: path.to_string(),
                        data: data.clone(),
                        version: stat.version,
                    }],
                    value: Some(true),
                    proof: Some((path.to_string(), data)),
                })
            })
        })
        .await
    }

    async fn list_records<T: DeserializeOwned>(
        &self,
        table: &'static str,
        dir: &str,
        max: usize,
    ) -> Result<Vec<T>, StoreError> {
        let names = self.children(dir).await?.unwrap_or_default();
        let paths: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
        let mut out = Vec::with_capacity(paths.len());
        for (path, node) in paths.iter().zip(self.read_many(&paths).await?) {
            if let Some((data, _)) = node {
                out.push(decode(table, path, &data, max)?);
            }
        }
        Ok(out)
    }

    async fn consume_token(&self, id: &str, now: u64) -> Result<TokenRecord, TokenUseError> {
        let Ok(path) = token_path(id) else {
            return Err(TokenUseError::Unknown(id.to_string()));
        };
        let path = &path;
        self.transact("consume a token", || {
            Box::pin(async move {
                let Some((data, stat)) = self.read(path).await.map_err(StoreError::from)? else {
                    return Err(TokenUseError::Unknown(id.to_string()));
                };
                let mut token: TokenRecord = decode("tokens", path, &data, TOKEN_MAX)?;
                token.spend(now)?;
                let data = encode("tokens", &token)?;
                Ok(Plan::Commit {
                    ops: vec![Op::Set {
                        path: path.clone(),
                        data: data.clone(),
                        version: stat.version,
                    }],
                    value: token,
                    proof: Some((path.clone(), data)),
                })
            })
        })
        .await
    }

    async fn mark_all_offline(&self, now: u64) -> Result<usize, StoreError> {
        let names = self.children(HOSTS).await?.unwrap_or_default();
        let mut changed = 0;
        for name in names {
            let path = format!("{HOSTS}/{name}");
            let went = self
                .update(
                    "mark a host offline",
                    "hosts",
                    &path,
                    HOST_MAX,
                    |h: &mut HostRecord| {
                        if !h.online {
                            return false;
                        }
                        h.online = false;
                        h.offline_since = Some(now);
                        true
                    },
                )
                .await?;
            changed += usize::from(went == Some(true));
        }
        Ok(changed)
    }

    // --- tasks ---

    /// Reads a task whole: record, state and body.
    async fn get_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.read_task(id, true).await
    }

    /// Reads a task's record and state, and its body only `with_body` (else empty).
    async fn read_task(&self, id: u64, with_body: bool) -> Result<Option<TaskRecord>, StoreError> {
        let paths = [task_path(id), state_path(id)];
        let mut nodes = self.read_many(&paths).await?.into_iter();
        let (Some(record), state) = (nodes.next().flatten(), nodes.next().flatten()) else {
            return Ok(None);
        };
        let node: TaskNode = decode("tasks", &paths[0], &record.0, TASK_READ_MAX)?;
        let (state, _) = state.ok_or_else(|| ZkError::Inconsistent {
            path: paths[1].clone(),
            why: "the task record exists",
        })?;
        let state: StateNode = decode("state", &paths[1], &state, STATE_READ_MAX)?;
        let mut record = node.record;
        record.state = state.state;
        if !with_body {
            record.body = Vec::new();
        } else if node.external_body {
            record.body = self
                .queue
                .get_body(id)
                .await?
                .ok_or_else(|| ZkError::Inconsistent {
                    path: format!("/bodies/{id}"),
                    why: "the task record says its body is there",
                })?;
        }
        Ok(Some(record))
    }

    async fn list_tasks(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let (next, _) = self.read_counter(TASK_COUNTER).await?;
        let mut out = Vec::new();
        let mut id = before.map_or(next, |b| b.min(next));
        while id > 1 && out.len() < limit {
            let low = id.saturating_sub(READ_WINDOW as u64).max(1);
            let window: Vec<u64> = (low..id).rev().collect();
            id = low;
            let reads =
                futures_util::future::join_all(window.iter().map(|i| self.read_task(*i, false)));
            for task in reads.await {
                if let Some(t) = task? {
                    out.push(t);
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn results(&self, task: u64) -> Result<Vec<HostResult>, StoreError> {
        let dir = results_dir(task);
        let names: Vec<String> = self
            .children(&dir)
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter(|n| check_host(n).is_ok())
            .collect();
        let paths: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
        let mut out = Vec::with_capacity(paths.len());
        for (path, node) in paths.iter().zip(self.read_many(&paths).await?) {
            if let Some((data, _)) = node {
                out.push(decode("results", path, &data, RESULT_READ_MAX)?);
            }
        }
        Ok(out)
    }

    async fn queue_for(&self, host: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        if check_host(host).is_err() {
            return Ok(Vec::new());
        }
        Ok(self
            .queue
            .entries(host)
            .await?
            .into_iter()
            .map(|e| (e.seq, e.task))
            .collect())
    }

    async fn create_task(&self, task: NewTask, now: u64) -> Result<u64, StoreError> {
        let mut seen = BTreeSet::new();
        for h in &task.hosts {
            if !seen.insert(h.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "host {h} appears twice in the task"
                )));
            }
            check_host(h).map_err(|e| StoreError::Invalid(e.to_string()))?;
        }
        check_size("a task body", task.body.len(), MAX_BODY_BYTES)?;
        let first = match task.batch {
            0 => task.hosts.len(),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let results: Vec<HostResult> = task
            .hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let state = if i < first {
                    HostState::Queued
                } else {
                    HostState::Pending
                };
                HostResult::new(0, host.clone(), state, now)
            })
            .collect();
        let state = StateNode {
            state: if task.hosts.is_empty() {
                TaskState::Done
            } else {
                TaskState::Running
            },
            open: task.hosts.len() as u64,
        };
        let mut record = TaskRecord {
            id: 0,
            created_at: now,
            created_by: task.created_by,
            target: task.target,
            hosts: task.hosts,
            body: Vec::new(),
            summary: task.summary,
            ttl_ms: task.ttl_ms,
            batch: task.batch,
            max_failures: task.max_failures,
            state: state.state,
        };
        let body = task.body;
        let bare = postcard::to_allocvec(&record)
            .map_err(|source| StoreError::Encode {
                table: "tasks",
                source,
            })?
            .len();
        check_size("a task record without its body", bare, TASK_MAX)?;
        let external = bare + body.len() > INLINE_BODY_MAX;
        if !external {
            record.body = body.clone();
        }
        let queued: Vec<&str> = results
            .iter()
            .filter(|r| r.state == HostState::Queued)
            .map(|r| r.host.as_str())
            .collect();
        self.queue
            .ensure_queues(&self.client(), queued.iter().copied())
            .await?;

        // Size with the largest id: the paths only get shorter.
        let (probe, ..) = task_ops(u64::MAX, &record, external, &results, state)?;
        if !external && ops_size(&probe) + 2 * OP_OVERHEAD <= MULTI_BUDGET {
            let (record, results, queued) = (&record, &results, &queued);
            return self
                .transact("create a task", || {
                    Box::pin(async move {
                        // Known queue nodes are skipped; after a NoNode conflict (one
                        // was deleted) none is known and all are recreated.
                        self.queue
                            .ensure_queues(&self.client(), queued.iter().copied())
                            .await?;
                        let (id, version) = self.read_counter(TASK_COUNTER).await?;
                        let (mut ops, proof) = task_ops(id, record, false, results, state)?;
                        ops.insert(
                            0,
                            Op::Set {
                                path: TASK_COUNTER.to_string(),
                                data: (id + 1).to_string().into_bytes(),
                                version,
                            },
                        );
                        Ok(Plan::Commit {
                            ops,
                            value: id,
                            proof: Some(proof),
                        })
                    })
                })
                .await;
        }
        self.create_staged(record, external.then_some(body), results, state)
            .await
    }

    /// `create_task` for a task too large for one multi; see the module docs.
    async fn create_staged(
        &self,
        record: TaskRecord,
        body: Option<Vec<u8>>,
        results: Vec<HostResult>,
        state: StateNode,
    ) -> Result<u64, StoreError> {
        let id = self
            .transact("reserve a task id", || {
                Box::pin(async move {
                    let (id, version) = self.read_counter(TASK_COUNTER).await?;
                    let data = (id + 1).to_string().into_bytes();
                    Ok::<_, StoreError>(Plan::Commit {
                        ops: vec![Op::Set {
                            path: TASK_COUNTER.to_string(),
                            data,
                            version,
                        }],
                        value: id,
                        proof: None,
                    })
                })
            })
            .await?;
        info!(
            task = id,
            hosts = results.len(),
            external_body = body.is_some(),
            "creating a large task in stages"
        );
        let staged = async {
            if let Some(body) = &body {
                self.queue.put_body(id, body).await?;
            }
            self.ensure(&results_dir(id), &[]).await?;
            for chunk in results.chunks(HOSTS_PER_MULTI) {
                let mut ops = Vec::with_capacity(chunk.len() * 2);
                for r in chunk {
                    let mut r = r.clone();
                    r.task = id;
                    ops.push(Op::Create {
                        path: result_path(id, &r.host),
                        data: encode("results", &r)?,
                    });
                    if r.state == HostState::Queued {
                        ops.push(Op::Enqueue {
                            path: entry_prefix(&r.host, id),
                        });
                    }
                }
                let Some(Op::Create { path, data }) = ops.first().cloned() else {
                    continue;
                };
                self.commit_staged("create a task's results", &ops, (&path, &data))
                    .await?;
            }
            let (ops, proof) = final_task_ops(id, &record, body.is_some(), state)?;
            self.commit_staged("create a task record", &ops, (&proof.0, &proof.1))
                .await
        };
        match staged.await {
            Ok(()) => Ok(id),
            Err(e) => {
                warn!(
                    task = id,
                    "creating a large task failed ({e}): removing what was written"
                );
                if let Err(e2) = self.remove_incomplete_task(id).await {
                    warn!(task = id, "removing the incomplete task: {e2}");
                }
                Err(e)
            }
        }
    }

    /// Deletes the results, queue entries and body of a task id that has no record.
    async fn remove_incomplete_task(&self, id: u64) -> Result<bool, StoreError> {
        if self.stat(&task_path(id)).await?.is_some() {
            return Ok(false);
        }
        let dir = results_dir(id);
        let hosts = self.children(&dir).await?.unwrap_or_default();
        for host in &hosts {
            if check_host(host).is_ok() {
                let mut ops = self.dequeue_ops(host, id).await?;
                ops.push(Op::Delete {
                    path: format!("{dir}/{host}"),
                    version: None,
                });
                // NoNode: raced with another cleanup; either way it is gone now.
                self.commit("remove an incomplete task", &ops).await?;
            }
        }
        let _ = self
            .commit(
                "remove an incomplete task",
                &[Op::Delete {
                    path: dir,
                    version: None,
                }],
            )
            .await?;
        self.queue.delete_body(id).await?;
        Ok(true)
    }

    async fn set_task_body(&self, id: u64, body: Vec<u8>) -> Result<(), StoreError> {
        check_size("a task body", body.len(), MAX_BODY_BYTES)?;
        let path = task_path(id);
        let (path, body) = (&path, &body);
        let was_external = self
            .transact("replace a task body", || {
                Box::pin(async move {
                    let Some((data, stat)) = self.read(path).await? else {
                        return Err(not_found("task", id.to_string()));
                    };
                    let mut node: TaskNode = decode("tasks", path, &data, TASK_READ_MAX)?;
                    let was_external = node.external_body;
                    let bare = postcard::to_allocvec(&node.record)
                        .map_err(|source| StoreError::Encode {
                            table: "tasks",
                            source,
                        })?
                        .len()
                        - node.record.body.len();
                    if bare + body.len() > INLINE_BODY_MAX {
                        // Goes external: done below, outside this transaction.
                        return Ok(Plan::Done(None));
                    }
                    node.record.body = body.clone();
                    node.external_body = false;
                    let data = encode("tasks", &node)?;
                    Ok(Plan::Commit {
                        ops: vec![Op::Set {
                            path: path.clone(),
                            data: data.clone(),
                            version: stat.version,
                        }],
                        value: Some(was_external),
                        proof: Some((path.clone(), data)),
                    })
                })
            })
            .await?;
        match was_external {
            Some(true) => {
                self.queue.delete_body(id).await?;
                Ok(())
            }
            Some(false) => Ok(()),
            None => {
                // A large body: replace the body nodes, then point the record at them.
                // Readers of the task in between get an error (documented).
                self.queue.delete_body(id).await?;
                self.queue.put_body(id, body).await?;
                self.update(
                    "replace a task body",
                    "tasks",
                    path,
                    TASK_READ_MAX,
                    |n: &mut TaskNode| {
                        n.record.body.clear();
                        n.external_body = true;
                        true
                    },
                )
                .await?
                .ok_or_else(|| not_found("task", id.to_string()))?;
                Ok(())
            }
        }
    }

    async fn release(
        &self,
        task: u64,
        hosts: &[String],
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        if self.stat(&task_path(task)).await?.is_none() {
            return Err(not_found("task", task.to_string()));
        }
        let mut seen = HashSet::new();
        let hosts: Vec<&str> = hosts
            .iter()
            .map(String::as_str)
            .filter(|h| check_host(h).is_ok() && seen.insert(*h))
            .collect();
        let mut released = Vec::new();
        for chunk in hosts.chunks(HOSTS_PER_MULTI) {
            let got = self
                .transact("release hosts", || {
                    Box::pin(async move {
                        let paths: Vec<String> =
                            chunk.iter().map(|h| result_path(task, h)).collect();
                        let mut ops = Vec::new();
                        let mut value = Vec::new();
                        for ((host, path), node) in
                            chunk.iter().zip(&paths).zip(self.read_many(&paths).await?)
                        {
                            let Some((data, stat)) = node else { continue };
                            let mut r: HostResult =
                                decode("results", path, &data, RESULT_READ_MAX)?;
                            if r.state != HostState::Pending {
                                continue;
                            }
                            r.state = HostState::Queued;
                            r.queued_at = now;
                            ops.push(Op::Set {
                                path: path.clone(),
                                data: encode("results", &r)?,
                                version: stat.version,
                            });
                            ops.push(Op::Enqueue {
                                path: entry_prefix(host, task),
                            });
                            value.push(host.to_string());
                        }
                        if ops.is_empty() {
                            return Ok::<_, StoreError>(Plan::Done(value));
                        }
                        self.queue
                            .ensure_queues(&self.client(), value.iter().map(String::as_str))
                            .await?;
                        let proof = match &ops[0] {
                            Op::Set { path, data, .. } => Some((path.clone(), data.clone())),
                            _ => None,
                        };
                        Ok(Plan::Commit { ops, value, proof })
                    })
                })
                .await?;
            released.extend(got);
        }
        Ok(released)
    }

    /// Reads, in multi-reads, the results of `hosts` of `task` with their versions,
    /// the deletes of their queue entries for the task (None for a missing result),
    /// and the task's state node with its version (None if missing).
    async fn read_closing(
        &self,
        task: u64,
        hosts: &[&str],
    ) -> Result<(Vec<Option<Snapshot>>, Option<(StateNode, i32)>), StoreError> {
        let spath = state_path(task);
        let mut reads: Vec<Read> = hosts
            .iter()
            .flat_map(|h| {
                [
                    Read::Data(result_path(task, h)),
                    Read::Children(queue_path(h)),
                ]
            })
            .collect();
        reads.push(Read::Data(spath.clone()));
        let mut answers = self.multi_read(&reads).await?;
        let Some(Answer::Data(state)) = answers.pop() else {
            unreachable!("multi_read answers each read in kind");
        };
        let snaps = hosts
            .iter()
            .zip(answers.chunks(2))
            .map(|(host, pair)| {
                let [Answer::Data(node), Answer::Children(names)] = pair else {
                    unreachable!("multi_read answers each read in kind");
                };
                let Some((data, stat)) = node else {
                    return Ok(None);
                };
                let path = result_path(task, host);
                Ok(Some(Snapshot {
                    result: decode("results", &path, data, RESULT_READ_MAX)?,
                    version: stat.version,
                    dequeue: dequeue_ops(host, task, names.as_deref().unwrap_or_default()),
                }))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let state = match state {
            Some((data, stat)) => Some((
                decode("state", &spath, &data, STATE_READ_MAX)?,
                stat.version,
            )),
            None => None,
        };
        Ok((snaps, state))
    }

    /// Closes hosts of possibly several tasks (see [`ZkStore::finish_many`]): all
    /// results, task states and queues are read first and a missing one fails the
    /// call before anything is written; then each task's hosts are closed by
    /// [`Core::close_group`], the tasks concurrently. Returns one boolean per item.
    async fn close_many(
        &self,
        what: &'static str,
        items: Vec<(String, u64, Closing)>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut out = vec![false; items.len()];
        // Per task, its items in batch order; a host repeated within a task is closed
        // by its first item, the others find it final (false), as in one transaction.
        let mut groups: BTreeMap<u64, Vec<Closer>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for (idx, (host, task, closing)) in items.into_iter().enumerate() {
            if check_host(&host).is_err() {
                return Err(result_not_found(task, &host));
            }
            if seen.insert((task, host.clone())) {
                groups.entry(task).or_default().push(Closer {
                    idx,
                    host,
                    closing,
                    snap: None,
                });
            }
        }
        let reads = groups.iter().map(|(&task, closers)| async move {
            let hosts: Vec<&str> = closers.iter().map(|c| c.host.as_str()).collect();
            self.read_closing(task, &hosts).await
        });
        let snapshots = futures_util::future::try_join_all(reads).await?;
        let mut plans = Vec::with_capacity(groups.len());
        for ((task, mut closers), (snaps, state)) in groups.into_iter().zip(snapshots) {
            for (c, snap) in closers.iter_mut().zip(snaps) {
                c.snap = Some(snap.ok_or_else(|| result_not_found(task, &c.host))?);
            }
            let state = state.ok_or_else(|| not_found("task", task.to_string()))?;
            // Already final: false, and nothing to write for it.
            closers.retain(|c| c.snap.as_ref().is_some_and(|s| !s.result.state.is_final()));
            plans.push((task, closers, state));
        }
        let closes = plans
            .into_iter()
            .map(|(task, closers, state)| self.close_group(what, task, closers, state));
        for closed in futures_util::future::try_join_all(closes).await? {
            for idx in closed {
                out[idx] = true;
            }
        }
        Ok(out)
    }

    /// Closes `closers` (hosts of `task` read non-final, with their snapshots) in as
    /// few multis as fit [`MULTI_BUDGET`] and [`HOSTS_PER_MULTI`]. Each multi writes
    /// its hosts' results (versioned), deletes their queue entries and counts the
    /// task's state node down by its number of hosts (versioned; `Done` at zero). On a
    /// conflict only what failed is re-read: the state node if it was the state
    /// update, else the remaining hosts. Returns the batch indices of the hosts closed
    /// by this call.
    async fn close_group(
        &self,
        what: &'static str,
        task: u64,
        mut closers: Vec<Closer>,
        (mut state, mut state_version): (StateNode, i32),
    ) -> Result<Vec<usize>, StoreError> {
        let mut closed = Vec::with_capacity(closers.len());
        let mut failures = 0;
        let spath = state_path(task);
        while !closers.is_empty() {
            // The hosts that fit in this multi, with the state update's room kept.
            let mut ops = Vec::new();
            let mut size = OP_OVERHEAD + spath.len() + STATE_READ_MAX;
            let mut proof = None;
            let mut taken = 0;
            for c in &closers {
                let snap = c.snap.as_ref().expect("read before closing");
                let mut r = snap.result.clone();
                c.closing.apply(&mut r);
                let path = result_path(task, &c.host);
                let data = encode("results", &r)?;
                let mut host_ops = vec![Op::Set {
                    path: path.clone(),
                    data: data.clone(),
                    version: snap.version,
                }];
                host_ops.extend(snap.dequeue.iter().cloned());
                let host_size = ops_size(&host_ops);
                if taken > 0 && (taken == HOSTS_PER_MULTI || size + host_size > MULTI_BUDGET) {
                    break;
                }
                // A final result is never rewritten, so it proves the multi applied.
                proof.get_or_insert((path, data));
                ops.extend(host_ops);
                size += host_size;
                taken += 1;
            }
            let mut next = state;
            next.open = next.open.saturating_sub(taken as u64);
            if next.open == 0 && next.state == TaskState::Running {
                next.state = TaskState::Done;
            }
            // The state update goes first, so a stale state fails at index 0.
            ops.insert(
                0,
                Op::Set {
                    path: spath.clone(),
                    data: encode("state", &next)?,
                    version: state_version,
                },
            );
            let applied = match self.commit(what, &ops).await? {
                Commit::Done => true,
                Commit::Conflict { source, index } => {
                    debug!(what, task, index, "conflict ({source}): re-reading");
                    if index == 0 {
                        (state, state_version) = self.reread_state(task).await?;
                    } else {
                        // The state was current; a host changed (or its queue did).
                        (state, state_version) = self.reread(task, &mut closers).await?;
                    }
                    false
                }
                Commit::Lost(e) => {
                    warn!(what, task, "answer lost ({e}): checking whether it applied");
                    let (path, data) = proof.as_ref().expect("at least one host");
                    if self.applied(path, data).await? {
                        true
                    } else {
                        (state, state_version) = self.reread(task, &mut closers).await?;
                        false
                    }
                }
            };
            if applied {
                closed.extend(closers.drain(..taken).map(|c| c.idx));
                state = next;
                // A successful setData adds exactly one to the version.
                state_version = state_version.wrapping_add(1);
                continue;
            }
            failures += 1;
            if failures == ATTEMPTS {
                return Err(ZkError::Contention {
                    what,
                    attempts: ATTEMPTS,
                }
                .into());
            }
            Self::backoff(failures).await;
        }
        Ok(closed)
    }

    async fn reread_state(&self, task: u64) -> Result<(StateNode, i32), StoreError> {
        self.read_state(task)
            .await?
            .ok_or_else(|| not_found("task", task.to_string()))
    }

    /// Re-reads the hosts still to close, dropping those now final (closed
    /// elsewhere), and the task's state.
    async fn reread(
        &self,
        task: u64,
        closers: &mut Vec<Closer>,
    ) -> Result<(StateNode, i32), StoreError> {
        let hosts: Vec<&str> = closers.iter().map(|c| c.host.as_str()).collect();
        let (snaps, state) = self.read_closing(task, &hosts).await?;
        for (c, snap) in closers.iter_mut().zip(snaps) {
            c.snap = Some(snap.ok_or_else(|| result_not_found(task, &c.host))?);
        }
        closers.retain(|c| c.snap.as_ref().is_some_and(|s| !s.result.state.is_final()));
        state.ok_or_else(|| not_found("task", task.to_string()))
    }

    /// A non-final result's state change that does not close it.
    async fn step(
        &self,
        what: &'static str,
        host: &str,
        task: u64,
        f: impl Fn(&mut HostResult) -> bool + Send + Sync,
    ) -> Result<bool, StoreError> {
        if check_host(host).is_err() {
            return Err(result_not_found(task, host));
        }
        let path = result_path(task, host);
        self.update(what, "results", &path, RESULT_READ_MAX, f)
            .await?
            .ok_or_else(|| result_not_found(task, host))
    }

    async fn cancel_task(&self, id: u64, now: u64) -> Result<Vec<String>, StoreError> {
        if self.stat(&task_path(id)).await?.is_none() {
            return Err(not_found("task", id.to_string()));
        }
        let mut delivered = Vec::new();
        for attempt in 0..ATTEMPTS {
            let (mut state, state_version) =
                self.read_state(id)
                    .await?
                    .ok_or_else(|| ZkError::Inconsistent {
                        path: state_path(id),
                        why: "the task record exists",
                    })?;
            let dir = results_dir(id);
            let names = self.children(&dir).await?.unwrap_or_default();
            let paths: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
            // Per host: its writes (result + dequeues), and whether it was delivered.
            let mut open = Vec::new();
            for (path, node) in paths.iter().zip(self.read_many(&paths).await?) {
                let Some((data, stat)) = node else { continue };
                let r: HostResult = decode("results", path, &data, RESULT_READ_MAX)?;
                if !r.state.is_final() {
                    open.push((path, r, stat.version));
                }
            }
            // Their queues, listed in multi-reads rather than one request per host.
            let queues: Vec<Read> = open
                .iter()
                .filter(|(_, r, _)| check_host(&r.host).is_ok())
                .map(|(_, r, _)| Read::Children(queue_path(&r.host)))
                .collect();
            let mut queues = self.multi_read(&queues).await?.into_iter();
            let mut per_host: Vec<(Vec<Op>, Option<String>)> = Vec::new();
            for (path, mut r, version) in open {
                let was_delivered = r.state.is_delivered().then(|| r.host.clone());
                r.state = HostState::Cancelled;
                r.finished_at = Some(now);
                let mut ops = vec![Op::Set {
                    path: path.clone(),
                    data: encode("results", &r)?,
                    version,
                }];
                if check_host(&r.host).is_ok() {
                    if let Some(Answer::Children(names)) = queues.next() {
                        ops.extend(dequeue_ops(&r.host, id, &names.unwrap_or_default()));
                    }
                }
                per_host.push((ops, was_delivered));
            }
            // The last multi also writes the task state; earlier ones are host chunks.
            let mut batches: Vec<(Vec<Op>, Vec<String>)> = vec![(Vec::new(), Vec::new())];
            for (ops, d) in per_host {
                let last = batches.last_mut().expect("never empty");
                if !last.0.is_empty() && ops_size(&last.0) + ops_size(&ops) > MULTI_BUDGET / 2 {
                    batches.push((Vec::new(), Vec::new()));
                }
                let last = batches.last_mut().expect("never empty");
                last.0.extend(ops);
                last.1.extend(d);
            }
            let before = state;
            state.open = 0;
            if state.state == TaskState::Running {
                state.state = TaskState::Cancelled;
            }
            if state != before {
                let last = batches.last_mut().expect("never empty");
                last.0.push(Op::Set {
                    path: state_path(id),
                    data: encode("state", &state)?,
                    version: state_version,
                });
            }
            let mut conflict = false;
            for (ops, d) in batches {
                let proof = match ops.first() {
                    Some(Op::Set { path, data, .. }) => Some((path.clone(), data.clone())),
                    _ => None,
                };
                let ok = match self.commit("cancel a task", &ops).await? {
                    Commit::Done => true,
                    Commit::Conflict { source, .. } => {
                        debug!(task = id, "cancel: conflict ({source}), replanning");
                        false
                    }
                    Commit::Lost(_) => match &proof {
                        Some((p, b)) => self.applied(p, b).await?,
                        None => false,
                    },
                };
                if !ok {
                    conflict = true;
                    break;
                }
                delivered.extend(d);
            }
            if !conflict {
                delivered.sort();
                delivered.dedup();
                return Ok(delivered);
            }
            Self::backoff(attempt).await;
        }
        Err(ZkError::Contention {
            what: "cancel a task",
            attempts: ATTEMPTS,
        }
        .into())
    }

    // --- audit ---

    async fn append_audit(&self, mut entry: AuditEntry) -> Result<u64, StoreError> {
        entry.seq = 0;
        let fixed = postcard::to_allocvec(&AuditEntry {
            detail: String::new(),
            ..entry.clone()
        })
        .map_err(|source| StoreError::Encode {
            table: "audit",
            source,
        })?
        .len();
        cap_text(&mut entry.detail, AUDIT_MAX.saturating_sub(fixed + 64));
        let data = encode("audit", &entry)?;
        check_size("an audit entry", data.len(), AUDIT_MAX)?;
        let prefix = format!("{AUDIT}/e-");
        let mut tries = 0;
        loop {
            match self.client().create(&prefix, &data, SEQUENTIAL).await {
                Ok((_, seq)) => {
                    let seq = u64::try_from(seq.into_i64()).map_err(|_| ZkError::Decode {
                        path: prefix.clone(),
                        reason: "a negative sequence number".into(),
                    })?;
                    return Ok(seq + 1);
                }
                Err(e) if is_transient(&e) && tries < READ_RETRIES => {
                    // At least once: the lost create may have been applied.
                    tries += 1;
                    Self::backoff(tries).await;
                }
                Err(source) => {
                    return Err(ZkError::Create {
                        path: prefix,
                        source,
                    }
                    .into())
                }
            }
        }
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        // A sequential name is the parent's child version at its create, and only
        // creates and retention's deletes change it: the names lie in floor ..
        // cversion, with gaps where retention ran, found without listing.
        let stat = self.audit_stat().await?;
        let count = u64::try_from(stat.cversion).unwrap_or(0);
        let floor = self.audit_floor().await?;
        let mut out = Vec::with_capacity(limit.min(10_000));
        let mut high = count;
        while out.len() < limit && high > floor {
            let low = high.saturating_sub(READ_WINDOW as u64).max(floor);
            let seqs: Vec<u64> = (low..high).rev().collect();
            high = low;
            let paths: Vec<String> = seqs.iter().map(|s| format!("{AUDIT}/e-{s:010}")).collect();
            for ((seq, path), node) in seqs.iter().zip(&paths).zip(self.read_many(&paths).await?) {
                if let Some((data, _)) = node {
                    let mut e: AuditEntry = decode("audit", path, &data, AUDIT_MAX)?;
                    e.seq = seq + 1;
                    out.push(e);
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn audit_stat(&self) -> Result<zk::Stat, StoreError> {
        Ok(self
            .stat(AUDIT)
            .await?
            .ok_or_else(|| ZkError::Inconsistent {
                path: AUDIT.into(),
                why: "the store was initialized",
            })?)
    }

    /// The lowest name retention may have left (0 before it first ran).
    async fn audit_floor(&self) -> Result<u64, StoreError> {
        let path = meta_path(AUDIT_FLOOR)?;
        match self.read(&path).await? {
            Some((d, _)) if d.len() <= COUNTER_READ_MAX => Ok(std::str::from_utf8(&d)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0)),
            _ => Ok(0),
        }
    }

    /// Deletes the oldest entries beyond `keep`, from the floor up, then raises the
    /// floor. Several centers may prune at once: a delete of a gone node is no error.
    async fn prune_audit(&self, keep: u64) -> Result<u64, StoreError> {
        let stat = self.audit_stat().await?;
        let present = u64::try_from(stat.num_children).unwrap_or(0);
        if present <= keep {
            return Ok(0);
        }
        let mut to_delete = present - keep;
        let count = u64::try_from(stat.cversion).unwrap_or(0);
        let mut at = self.audit_floor().await?;
        let mut deleted = 0;
        let client = self.client();
        while to_delete > 0 && at < count {
            let high = (at + READ_WINDOW as u64).min(count);
            let paths: Vec<String> = (at..high).map(|s| format!("{AUDIT}/e-{s:010}")).collect();
            let nodes = self.read_many(&paths).await?;
            let doomed: Vec<(u64, &String)> = (at..high)
                .zip(&paths)
                .zip(nodes)
                .filter(|(_, n)| n.is_some())
                .map(|(p, _)| p)
                .take(usize::try_from(to_delete).unwrap_or(usize::MAX))
                .collect();
            let last = doomed.last().map(|(s, _)| *s);
            let dels = doomed.iter().map(|(_, p)| client.delete(p, None));
            for (r, (_, p)) in futures_util::future::join_all(dels)
                .await
                .into_iter()
                .zip(&doomed)
            {
                match r {
                    Ok(()) => deleted += 1,
                    Err(zk::Error::NoNode) => {}
                    Err(source) => {
                        return Err(ZkError::Delete {
                            path: p.to_string(),
                            source,
                        }
                        .into())
                    }
                }
            }
            to_delete = to_delete.saturating_sub(doomed.len() as u64);
            at = match last {
                Some(s) if to_delete == 0 => s + 1,
                _ => high,
            };
        }
        self.upsert(
            "raise the audit floor",
            &meta_path(AUDIT_FLOOR)?,
            at.to_string().as_bytes(),
        )
        .await?;
        Ok(deleted)
    }
}

/// The deletes of `host`'s queue entries for `task`, from the queue's child names.
fn dequeue_ops(host: &str, task: u64, names: &[String]) -> Vec<Op> {
    let dir = queue_path(host);
    names
        .iter()
        .filter_map(|n| QueueEntry::parse(n))
        .filter(|e| e.task == task)
        .map(|e| Op::Delete {
            path: format!("{dir}/{}", e.node_name()),
            version: None,
        })
        .collect()
}

/// How a host's result is closed: the agent's report, or its time to live ran out.
#[derive(Debug, Clone)]
enum Closing {
    Finish(HostOutcome),
    Expire { now: u64 },
}

impl Closing {
    /// Moves a non-final result to its final state (as `RedbStore` does).
    fn apply(&self, r: &mut HostResult) {
        match self {
            Closing::Finish(o) => r.apply(o.clone()),
            Closing::Expire { now } => {
                r.state = HostState::Expired;
                r.finished_at = Some(*now);
                r.error = Some("the task's time to live ran out before it finished".into());
            }
        }
    }
}

/// A host's result as read, with its version and the deletes of its queue entries.
struct Snapshot {
    result: HostResult,
    version: i32,
    dequeue: Vec<Op>,
}

/// One host of a task to close: its index in the caller's batch, how, and what was
/// last read of it.
struct Closer {
    idx: usize,
    host: String,
    closing: Closing,
    snap: Option<Snapshot>,
}

/// The writes of a task's results and queue entries, then its state and record, and
/// the proof (the record with its bytes).
fn task_ops(
    id: u64,
    record: &TaskRecord,
    external: bool,
    results: &[HostResult],
    state: StateNode,
) -> Result<(Vec<Op>, Proof), StoreError> {
    let mut ops = Vec::with_capacity(results.len() * 2 + 3);
    ops.push(Op::Create {
        path: results_dir(id),
        data: Vec::new(),
    });
    for r in results {
        let mut r = r.clone();
        r.task = id;
        ops.push(Op::Create {
            path: result_path(id, &r.host),
            data: encode("results", &r)?,
        });
        if r.state == HostState::Queued {
            ops.push(Op::Enqueue {
                path: entry_prefix(&r.host, id),
            });
        }
    }
    let (last, proof) = final_task_ops(id, record, external, state)?;
    ops.extend(last);
    Ok((ops, proof))
}

fn final_task_ops(
    id: u64,
    record: &TaskRecord,
    external: bool,
    state: StateNode,
) -> Result<(Vec<Op>, Proof), StoreError> {
    let mut record = record.clone();
    record.id = id;
    let data = encode(
        "tasks",
        &TaskNode {
            record,
            external_body: external,
        },
    )?;
    let path = task_path(id);
    Ok((
        vec![
            Op::Create {
                path: state_path(id),
                data: encode("state", &state)?,
            },
            Op::Create {
                path: path.clone(),
                data: data.clone(),
            },
        ],
        (path, data),
    ))
}

/// The runtime thread: stops (and drops its runtime, on its own thread) when the
/// sender is dropped.
struct RuntimeThread {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The [`Store`] on ZooKeeper; see the module docs. Cheap to share behind an `Arc`.
pub struct ZkStore {
    core: Arc<Core>,
    handle: tokio::runtime::Handle,
    op_timeout: Duration,
    _thread: RuntimeThread,
}

impl std::fmt::Debug for ZkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkStore")
            .field("url", self.core.session.url())
            .finish_non_exhaustive()
    }
}

impl ZkStore {
    /// Connects to `url` (on the store's own runtime thread, started here), and
    /// creates the store's nodes if missing. Blocks until connected or
    /// `opts.connect_timeout`; from async code, call it in `spawn_blocking`.
    pub fn open(url: &ZkUrl, opts: ZkStoreOptions) -> Result<ZkStore, ZkError> {
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("zk-store".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
                debug!("ZooKeeper store runtime stopped");
            })
            .map_err(|e| ZkError::Runtime(e.to_string()))?;
        let handle = handle_rx
            .recv()
            .map_err(|e| ZkError::Runtime(e.to_string()))?
            .map_err(ZkError::Runtime)?;
        let thread = RuntimeThread { _stop: stop_tx };
        let (url2, session_opts) = (url.clone(), opts.session.clone());
        let connect = async move {
            let session = ZkSession::connect(&url2, session_opts).await?;
            let core = Core {
                queue: TaskQueue::new(session.clone()),
                session,
            };
            for dir in DIRS {
                core.ensure(dir, &[]).await?;
            }
            core.ensure(TASK_COUNTER, b"1").await?;
            Ok::<_, ZkError>(core)
        };
        let core = bridge(&handle, opts.connect_timeout, "connecting", connect)?;
        info!(%url, "ZooKeeper store open");
        Ok(ZkStore {
            core: Arc::new(core),
            handle,
            op_timeout: opts.op_timeout,
            _thread: thread,
        })
    }

    /// The session (for the registry and queue consumers to share).
    pub fn session(&self) -> &ZkSession {
        &self.core.session
    }

    /// Deletes what a `create_task` that crashed halfway left behind for task `id`
    /// (results, queue entries, body), if `id` has no task record. Returns whether it
    /// did. Only for ids that are not being created right now.
    pub fn remove_incomplete_task(&self, id: u64) -> Result<bool, StoreError> {
        self.run("removing an incomplete task", move |c| async move {
            c.remove_incomplete_task(id).await
        })
    }

    /// Runs `f` on the store's runtime and waits for it on a std channel; see the
    /// module docs.
    fn run<T, E, F, Fut>(&self, what: &'static str, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(Arc<Core>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let fut = f(self.core.clone());
        let timeout = self.op_timeout;
        let wrapped = async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::from(ZkError::TimedOut {
                    what,
                    after: timeout,
                })
                .into()),
            }
        };
        match bridge_raw(&self.handle, wrapped) {
            Some(r) => r,
            None => Err(StoreError::from(ZkError::Closed).into()),
        }
    }
}

/// Spawns `fut` on `handle` and blocks this thread (not a runtime) until it is done;
/// None if the runtime went away first.
fn bridge_raw<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

fn bridge<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, ZkError>> + Send + 'static,
) -> Result<T, ZkError> {
    let fut = async move {
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(ZkError::TimedOut {
                what,
                after: timeout,
            }))
    };
    bridge_raw(handle, fut).unwrap_or(Err(ZkError::Closed))
}

impl Store for ZkStore {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Ok(path) = meta_path(key) else {
            return Ok(None);
        };
        self.run("reading meta", move |c| async move {
            let data = c.read(&path).await?.map(|(d, _)| d);
            if let Some(d) = &data {
                if d.len() > META_MAX {
                    return Err(ZkError::Decode {
                        path,
                        reason: format!("{} bytes, over the {META_MAX}-byte cap", d.len()),
                    }
                    .into());
                }
            }
            Ok(data)
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = meta_path(key)?;
        check_size("a meta value", value.len(), META_MAX)?;
        let value = value.to_vec();
        self.run("writing meta", move |c| async move {
            c.upsert("write meta", &path, &value).await
        })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let path = token_path(&token.id)?;
        let data = encode("tokens", token)?;
        check_size("a token record", data.len(), TOKEN_MAX)?;
        self.run("writing a token", move |c| async move {
            c.upsert("write a token", &path, &data).await
        })
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let Ok(path) = token_path(id) else {
            return Ok(None);
        };
        self.run("reading a token", move |c| async move {
            match c.read(&path).await? {
                Some((data, _)) => Ok(Some(decode("tokens", &path, &data, TOKEN_MAX)?)),
                None => Ok(None),
            }
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.run("listing tokens", |c| async move {
            let mut tokens: Vec<TokenRecord> = c.list_records("tokens", TOKENS, TOKEN_MAX).await?;
            tokens.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(tokens)
        })
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let Ok(path) = token_path(id) else {
            return Ok(false);
        };
        self.run("revoking a token", move |c| async move {
            let done = c
                .update(
                    "revoke a token",
                    "tokens",
                    &path,
                    TOKEN_MAX,
                    |t: &mut TokenRecord| {
                        t.revoked = true;
                        true
                    },
                )
                .await?;
            Ok(done.is_some())
        })
    }

    fn consume_token(&self, id: &str, now: u64) -> Result<TokenRecord, TokenUseError> {
        let id = id.to_string();
        self.run("consuming a token", move |c| async move {
            c.consume_token(&id, now).await
        })
    }

    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let path = host_path(&host.name)?;
        let data = encode("hosts", host)?;
        check_size("a host record", data.len(), HOST_MAX)?;
        self.run("writing a host", move |c| async move {
            c.upsert("write a host", &path, &data).await
        })
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        let Ok(path) = host_path(name) else {
            return Ok(None);
        };
        self.run("reading a host", move |c| async move {
            match c.read(&path).await? {
                Some((data, _)) => Ok(Some(decode("hosts", &path, &data, HOST_MAX)?)),
                None => Ok(None),
            }
        })
    }

    fn remove_host(&self, name: &str) -> Result<bool, StoreError> {
        let Ok(path) = host_path(name) else {
            return Ok(false);
        };
        self.run("removing a host", move |c| async move {
            if c.stat(&path).await?.is_none() {
                return Ok(false);
            }
            let ops = [Op::Delete {
                path: path.clone(),
                version: None,
            }];
            // A conflict (NoNode) means someone else removed it meanwhile.
            c.commit("remove a host", &ops).await?;
            Ok(c.stat(&path).await?.is_none())
        })
    }

    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.run("listing hosts", |c| async move {
            c.list_records("hosts", HOSTS, HOST_MAX).await
        })
    }

    fn set_online(&self, name: &str, online: bool, now: u64) -> Result<bool, StoreError> {
        let Ok(path) = host_path(name) else {
            return Ok(false);
        };
        self.run("setting a host online or offline", move |c| async move {
            let done = c
                .update(
                    "set a host online",
                    "hosts",
                    &path,
                    HOST_MAX,
                    |h: &mut HostRecord| {
                        if online {
                            h.last_seen = now;
                            h.offline_since = None;
                        } else if h.online {
                            h.offline_since = Some(now);
                        }
                        h.online = online;
                        true
                    },
                )
                .await?;
            Ok(done.is_some())
        })
    }

    fn update_heartbeat(
        &self,
        name: &str,
        now: u64,
        resources: Vec<u8>,
        addrs: Vec<String>,
    ) -> Result<bool, StoreError> {
        let Ok(path) = host_path(name) else {
            return Ok(false);
        };
        self.run("recording a heartbeat", move |c| async move {
            let done = c
                .update(
                    "record a heartbeat",
                    "hosts",
                    &path,
                    HOST_MAX,
                    |h: &mut HostRecord| {
                        h.last_seen = now;
                        h.resources = Some(resources.clone());
                        h.addrs = addrs.clone();
                        h.online = true;
                        h.offline_since = None;
                        true
                    },
                )
                .await?;
            Ok(done.is_some())
        })
    }

    fn mark_all_offline(&self, now: u64) -> Result<usize, StoreError> {
        self.run("marking all hosts offline", move |c| async move {
            c.mark_all_offline(now).await
        })
    }

    fn create_task(&self, task: NewTask, now: u64) -> Result<u64, StoreError> {
        self.run("creating a task", move |c| async move {
            c.create_task(task, now).await
        })
    }

    fn get_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.run(
            "reading a task",
            move |c| async move { c.get_task(id).await },
        )
    }

    fn set_task_body(&self, id: u64, body: Vec<u8>) -> Result<(), StoreError> {
        self.run("replacing a task body", move |c| async move {
            c.set_task_body(id, body).await
        })
    }

    fn list_tasks(&self, before: Option<u64>, limit: usize) -> Result<Vec<TaskRecord>, StoreError> {
        self.run("listing tasks", move |c| async move {
            c.list_tasks(before, limit).await
        })
    }

    fn results(&self, task: u64) -> Result<Vec<HostResult>, StoreError> {
        self.run(
            "reading results",
            move |c| async move { c.results(task).await },
        )
    }

    fn result(&self, task: u64, host: &str) -> Result<Option<HostResult>, StoreError> {
        let host = host.to_string();
        self.run("reading a result", move |c| async move {
            Ok(c.read_result(task, &host).await?.map(|(r, _)| r))
        })
    }

    fn open_hosts(&self, task: u64) -> Result<u64, StoreError> {
        self.run("reading a task's open hosts", move |c| async move {
            Ok(c.read_state(task).await?.map_or(0, |(s, _)| s.open))
        })
    }

    fn queue_for(&self, host: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let host = host.to_string();
        self.run("reading a queue", move |c| async move {
            c.queue_for(&host).await
        })
    }

    fn queue_all(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.run("reading all queues", |c| async move {
            Ok(c.queue.queue_all().await?)
        })
    }

    fn release(&self, task: u64, hosts: &[String], now: u64) -> Result<Vec<String>, StoreError> {
        let hosts = hosts.to_vec();
        self.run("releasing hosts", move |c| async move {
            c.release(task, &hosts, now).await
        })
    }

    fn ack_delivery(&self, host: &str, task: u64) -> Result<bool, StoreError> {
        let host = host.to_string();
        self.run("acknowledging a delivery", move |c| async move {
            c.step("acknowledge a delivery", &host, task, |r| {
                if r.state != HostState::Queued {
                    return false;
                }
                r.state = HostState::Delivered;
                true
            })
            .await
        })
    }

    fn mark_running(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError> {
        let host = host.to_string();
        self.run("marking a task running", move |c| async move {
            c.step("mark a task running", &host, task, |r| {
                if !matches!(r.state, HostState::Queued | HostState::Delivered) {
                    return false;
                }
                r.state = HostState::Running;
                r.started_at = Some(now);
                true
            })
            .await
        })
    }

    fn finish(&self, host: &str, task: u64, outcome: HostOutcome) -> Result<bool, StoreError> {
        let done = self.finish_many(vec![(host.to_string(), task, outcome)])?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// Like `RedbStore`: checked whole first (a non-final item fails the call with
    /// [`StoreError::Invalid`], an unknown task or result with
    /// [`StoreError::NotFound`], before anything is written), and per item `false`
    /// for a result already final (including a host repeated in the batch). The items
    /// are grouped by task, and each task's hosts are closed together: one multi per
    /// [`MULTI_BUDGET`] that writes the results, deletes the queue entries and counts
    /// the task's state node down once by the number of hosts it closes (see
    /// `Core::close_group`). A batch of 1,000 reports is then one quorum write,
    /// not 1,000 that all collide on one state node. Unlike `RedbStore`, a batch
    /// spanning several multis (several tasks, or results too large for one) is not
    /// one transaction: if a later multi fails, the earlier ones stay committed (an
    /// agent's resent report then finds its result final, `false`).
    fn finish_many(&self, items: Vec<(String, u64, HostOutcome)>) -> Result<Vec<bool>, StoreError> {
        if let Some((h, t, o)) = items.iter().find(|(_, _, o)| !o.state.is_final()) {
            return Err(StoreError::Invalid(format!(
                "finishing {t}/{h} with the non-final state {:?}",
                o.state
            )));
        }
        let items: Vec<(String, u64, Closing)> = items
            .into_iter()
            .map(|(h, t, mut o)| {
                o.stdout_truncated |= cap_bytes(&mut o.stdout, OUTPUT_MAX);
                o.stderr_truncated |= cap_bytes(&mut o.stderr, OUTPUT_MAX);
                if let Some(e) = &mut o.error {
                    cap_text(e, ERROR_MAX);
                }
                (h, t, Closing::Finish(o))
            })
            .collect();
        self.run("finishing tasks on hosts", move |c| async move {
            c.close_many("finish", items).await
        })
    }

    fn expire(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError> {
        let items = vec![(host.to_string(), task, Closing::Expire { now })];
        self.run("expiring a task on a host", move |c| async move {
            let done = c.close_many("expire", items).await?;
            Ok(done.first().copied().unwrap_or(false))
        })
    }

    fn cancel_task(&self, id: u64, now: u64) -> Result<Vec<String>, StoreError> {
        self.run("cancelling a task", move |c| async move {
            c.cancel_task(id, now).await
        })
    }

    fn append_audit(&self, entry: AuditEntry) -> Result<u64, StoreError> {
        self.run("appending to the audit log", move |c| async move {
            c.append_audit(entry).await
        })
    }

    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.run("reading the audit log", move |c| async move {
            c.list_audit(limit).await
        })
    }

    fn prune_audit(&self, keep: u64) -> Result<u64, StoreError> {
        self.run("pruning the audit log", move |c| async move {
            c.prune_audit(keep).await
        })
    }
}
