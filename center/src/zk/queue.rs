//! Per-agent ordered task queues as persistent sequential znodes.
//!
//! **Order.** An entry is `/queues/<host>/t<task>-<seq>`, created PERSISTENT_SEQUENTIAL:
//! ZooKeeper appends `<seq>` from the parent's counter inside the transaction that
//! creates it, and transactions have one total order, so entries enqueued by any
//! number of centers at once get distinct, increasing numbers, and every reader sorts
//! them the same way. Sequence numbers are assigned in commit order, so a consumer
//! never sees a smaller number appear after a larger one; it keeps a high-water mark
//! instead of a set of what it handed out.
//!
//! **At least once.** An entry stays until acked ([`TaskQueue::ack`] deletes it). A
//! consumer that dies between delivery and ack leaves it in place and the next
//! consumer of that queue gets it again; agents deduplicate by task id, as they do
//! with the embedded store. Enqueueing is at least once too: a create whose answer is
//! lost (connection loss) may or may not have committed, and a retry may add a
//! second entry for the same task, which the same deduplication absorbs.
//!
//! **Throughput.** Each write is one quorum commit, fsynced: a producer that awaits
//! every create gets a few hundred a second. [`TaskQueue::enqueue_batch`] puts up to
//! [`MAX_OPS_PER_MULTI`] creates in one `multi` transaction, atomic and one commit, so
//! a task for a thousand hosts costs one round trip. The batch limit keeps the
//! request well under ZooKeeper's `jute.maxbuffer` (1 MB).
//!
//! **Bodies.** ZooKeeper refuses any packet over ~1 MB, and big znodes slow every
//! follower's sync, so bodies are not put in entries. A body is stored once per task
//! under `/bodies/<task>`: the node itself holds a small JSON header (size, chunk
//! count, SHA-256) and its children `/bodies/<task>/<n>` hold chunks of at most
//! [`CHUNK_BYTES`], with [`MAX_BODY_BYTES`] in all. Every host's entry names the task,
//! so a body is shared by all its hosts. The header and the first chunk are one
//! transaction; further chunks follow, each one request; the entries are only
//! enqueued after the whole body is written. Reads check the header's bounds before
//! trusting them, every chunk's length, and the digest of the whole.
//!
//! Bodies are deleted by the owner of the task's lifecycle ([`TaskQueue::delete_body`]
//! when the task's last host is final). A producer that died between writing a body
//! and enqueueing leaves an orphan, which [`TaskQueue::sweep_orphan_bodies`] removes
//! once it is older than a given age and no entry names it.
//!
//! **Limits.** A queue is listed whole with one `getChildren`, whose answer should
//! stay within ZooKeeper's usual 1 MB packet limit (`jute.maxbuffer`): keep a host
//! under about 30 000 pending entries (names are up to 32 bytes). The
//! sequence counter is a signed 32-bit number per host queue; names past 2^31 are
//! refused as undecodable (a queue node can be deleted when empty to restart it).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::session::{PERSISTENT, SEQUENTIAL};
use super::{check_host, decode_json, ZkError, ZkSession};

const QUEUES: &str = "/queues";
const BODIES: &str = "/bodies";
/// Largest chunk of a body in one znode.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Largest body.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most operations in one multi transaction.
pub const MAX_OPS_PER_MULTI: usize = 1000;
/// Cap on a body header's JSON.
const MAX_HEADER_BYTES: usize = 1024;
/// How often an idempotent operation is retried after a connection loss.
const RETRIES: usize = 20;

/// One queue entry: its sequence number in the host's queue and the task it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueEntry {
    pub seq: u64,
    pub task: u64,
}

impl QueueEntry {
    /// The znode name: `t<task>-<seq as ten digits>`.
    pub fn node_name(&self) -> String {
        format!("t{}-{:010}", self.task, self.seq)
    }

    /// Parses a znode name; None for anything else (never trusts its length).
    pub fn parse(name: &str) -> Option<QueueEntry> {
        let rest = name.strip_prefix('t')?;
        let (task, seq) = rest.split_once('-')?;
        let digits = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(task, 20) || seq.len() != 10 || !digits(seq, 10) {
            return None;
        }
        let seq: u64 = seq.parse().ok()?;
        if seq > i32::MAX as u64 {
            return None;
        }
        Some(QueueEntry {
            seq,
            task: task.parse().ok()?,
        })
    }
}

/// What `/bodies/<task>` holds. Public (hidden) for the fuzz target only.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyHeader {
    pub size: u64,
    pub chunks: u32,
    pub sha256: String,
}

impl BodyHeader {
    /// Decodes a body header read from `path` and checks its bounds: at most
    /// [`MAX_BODY_BYTES`], and the chunk count that size needs.
    #[doc(hidden)]
    pub fn decode(task: u64, path: &str, data: &[u8]) -> Result<BodyHeader, ZkError> {
        let header: BodyHeader = decode_json(path, data, MAX_HEADER_BYTES)?;
        let corrupt = |reason: String| ZkError::BodyCorrupt { task, reason };
        let size = usize::try_from(header.size).unwrap_or(usize::MAX);
        if size > MAX_BODY_BYTES {
            return Err(corrupt(format!("header claims {} bytes", header.size)));
        }
        let expect = size.div_ceil(CHUNK_BYTES).max(1);
        if header.chunks as usize != expect {
            return Err(corrupt(format!(
                "header claims {} chunks for {size} bytes",
                header.chunks
            )));
        }
        Ok(header)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub(crate) fn queue_path(host: &str) -> String {
    format!("{QUEUES}/{host}")
}

fn body_path(task: u64) -> String {
    format!("{BODIES}/{task}")
}

fn is_no_node<T>(r: &Result<T, ZkError>) -> bool {
    matches!(
        r,
        Err(ZkError::Multi {
            source: zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            },
            ..
        })
    )
}

fn is_retryable(e: &zk::Error) -> bool {
    matches!(e, zk::Error::ConnectionLoss | zk::Error::Timeout)
}

/// The queues and bodies of one ZooKeeper namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskQueue {
    session: ZkSession,
    /// Hosts whose queue node is known to exist.
    queues: Arc<Mutex<HashSet<String>>>,
}

impl TaskQueue {
    pub fn new(session: ZkSession) -> Self {
        TaskQueue {
            session,
            queues: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    pub fn session(&self) -> &ZkSession {
        &self.session
    }

    /// Forgets which queue nodes exist (one was found deleted).
    pub(crate) fn forget_queues(&self) {
        self.queues.lock().unwrap().clear();
    }

    /// Creates the queue nodes of `hosts` not known to exist (pipelined).
    pub(crate) async fn ensure_queues<'a>(
        &self,
        client: &zk::Client,
        hosts: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ZkError> {
        let missing: Vec<String> = {
            let known = self.queues.lock().unwrap();
            let mut seen = HashSet::new();
            hosts
                .into_iter()
                .filter(|h| !known.contains(*h) && seen.insert(*h))
                .map(str::to_string)
                .collect()
        };
        let paths: Vec<String> = missing.iter().map(|h| queue_path(h)).collect();
        // Requests go out when the futures are made; awaiting in turn pipelines them.
        let pending: Vec<_> = paths
            .iter()
            .map(|p| client.create(p, &[], PERSISTENT))
            .collect();
        for (path, fut) in paths.iter().zip(pending) {
            match fut.await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(source) => {
                    return Err(ZkError::Create {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        self.queues.lock().unwrap().extend(missing);
        Ok(())
    }

    /// Appends one entry (one synchronous create: the naive way, see
    /// [`TaskQueue::enqueue_batch`]).
    pub async fn enqueue(&self, host: &str, task: u64) -> Result<QueueEntry, ZkError> {
        check_host(host)?;
        let client = self.session.client();
        self.ensure_queues(&client, [host]).await?;
        let prefix = format!("{}/t{task}-", queue_path(host));
        let (_, seq) = client
            .create(&prefix, &[], SEQUENTIAL)
            .await
            .map_err(|source| ZkError::Create {
                path: prefix.clone(),
                source,
            })?;
        let seq = u64::try_from(seq.into_i64()).map_err(|_| ZkError::Decode {
            path: prefix,
            reason: "negative sequence number".into(),
        })?;
        Ok(QueueEntry { seq, task })
    }

    /// Appends `(host, task)` entries, [`MAX_OPS_PER_MULTI`] per multi transaction.
    /// Each transaction is atomic; on an error, [`ZkError::Enqueue`] tells how many
    /// were committed by the earlier ones. Returns each item's entry, in input order.
    pub async fn enqueue_batch<H: AsRef<str>>(
        &self,
        items: &[(H, u64)],
    ) -> Result<Vec<QueueEntry>, ZkError> {
        for (host, _) in items {
            check_host(host.as_ref())?;
        }
        let client = self.session.client();
        let mut out = Vec::with_capacity(items.len());
        for batch in items.chunks(MAX_OPS_PER_MULTI) {
            let mut result = self.commit_batch(&client, batch).await;
            if is_no_node(&result) {
                // A queue node believed to exist was deleted: recreate and retry once
                // (the failed transaction committed nothing).
                result = self.commit_batch(&client, batch).await;
            }
            match result {
                Ok(entries) => out.extend(entries),
                Err(e) => {
                    return Err(ZkError::Enqueue {
                        committed: out.len(),
                        total: items.len(),
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(out)
    }

    async fn commit_batch<H: AsRef<str>>(
        &self,
        client: &zk::Client,
        batch: &[(H, u64)],
    ) -> Result<Vec<QueueEntry>, ZkError> {
        self.ensure_queues(client, batch.iter().map(|(h, _)| h.as_ref()))
            .await?;
        let mut txn = client.new_multi_writer();
        for (host, task) in batch {
            let prefix = format!("{}/t{task}-", queue_path(host.as_ref()));
            txn.add_create(&prefix, &[], SEQUENTIAL)
                .map_err(|source| ZkError::Create {
                    path: prefix,
                    source,
                })?;
        }
        let results = txn.commit().await.map_err(|source| {
            if matches!(
                source,
                zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NoNode,
                    ..
                }
            ) {
                // A queue node we believed in is gone: forget them all.
                self.queues.lock().unwrap().clear();
            }
            ZkError::Multi {
                what: "enqueue",
                ops: batch.len(),
                source,
            }
        })?;
        let mut entries = Vec::with_capacity(batch.len());
        for result in results {
            let zk::MultiWriteResult::Create { path, .. } = result else {
                return Err(ZkError::Decode {
                    path: QUEUES.into(),
                    reason: "a multi create answered something else".into(),
                });
            };
            let name = path.rsplit('/').next().unwrap_or_default();
            let entry = QueueEntry::parse(name).ok_or_else(|| ZkError::Decode {
                path: path.clone(),
                reason: "not a queue entry name".into(),
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// `host`'s entries, oldest first (empty for a host that never had one).
    pub async fn entries(&self, host: &str) -> Result<Vec<QueueEntry>, ZkError> {
        check_host(host)?;
        let path = queue_path(host);
        let client = self.session.client();
        let mut tries = 0;
        loop {
            match client.list_children(&path).await {
                Ok(names) => return Ok(sorted_entries(&path, &names)),
                Err(zk::Error::NoNode) => return Ok(Vec::new()),
                Err(e) if is_retryable(&e) && tries < RETRIES => tries += 1,
                Err(source) => return Err(ZkError::List { path, source }),
            }
        }
    }

    /// Hosts that have a queue node (possibly empty).
    pub async fn hosts(&self) -> Result<Vec<String>, ZkError> {
        let mut hosts = self
            .session
            .client()
            .list_children(QUEUES)
            .await
            .map_err(|source| ZkError::List {
                path: QUEUES.into(),
                source,
            })?;
        hosts.sort();
        Ok(hosts)
    }

    /// Every entry of every host as `(host, seq, task id)`, by host then seq (the
    /// shape of [`crate::store::Store::queue_all`]).
    pub async fn queue_all(&self) -> Result<Vec<(String, u64, u64)>, ZkError> {
        let mut out = Vec::new();
        for host in self.hosts().await? {
            if check_host(&host).is_err() {
                warn!(host, "skipping a queue with an invalid host name");
                continue;
            }
            for e in self.entries(&host).await? {
                out.push((host.clone(), e.seq, e.task));
            }
        }
        Ok(out)
    }

    /// Deletes an entry. Returns false if it was already gone.
    pub async fn ack(&self, host: &str, entry: &QueueEntry) -> Result<bool, ZkError> {
        check_host(host)?;
        let path = format!("{}/{}", queue_path(host), entry.node_name());
        let client = self.session.client();
        let mut tries = 0;
        loop {
            match client.delete(&path, None).await {
                Ok(()) => return Ok(true),
                Err(zk::Error::NoNode) => return Ok(false),
                Err(e) if is_retryable(&e) && tries < RETRIES => tries += 1,
                Err(source) => return Err(ZkError::Delete { path, source }),
            }
        }
    }

    /// Deletes entries in multi transactions. An entry already gone fails its whole
    /// transaction, which is then redone one delete at a time. Returns how many were
    /// deleted here.
    pub async fn ack_many(&self, host: &str, entries: &[QueueEntry]) -> Result<usize, ZkError> {
        check_host(host)?;
        let client = self.session.client();
        let mut deleted = 0;
        for batch in entries.chunks(MAX_OPS_PER_MULTI) {
            let mut txn = client.new_multi_writer();
            for e in batch {
                let path = format!("{}/{}", queue_path(host), e.node_name());
                txn.add_delete(&path, None)
                    .map_err(|source| ZkError::Delete { path, source })?;
            }
            match txn.commit().await {
                Ok(_) => deleted += batch.len(),
                Err(zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NoNode,
                    ..
                }) => {
                    for e in batch {
                        deleted += usize::from(self.ack(host, e).await?);
                    }
                }
                Err(source) => {
                    return Err(ZkError::Multi {
                        what: "ack",
                        ops: batch.len(),
                        source,
                    })
                }
            }
        }
        Ok(deleted)
    }

    /// Deletes every entry of `task` in `host`'s queue (a result became final).
    /// Returns how many.
    pub async fn ack_task(&self, host: &str, task: u64) -> Result<usize, ZkError> {
        let mine: Vec<QueueEntry> = self
            .entries(host)
            .await?
            .into_iter()
            .filter(|e| e.task == task)
            .collect();
        let mut n = 0;
        for e in &mine {
            n += usize::from(self.ack(host, e).await?);
        }
        Ok(n)
    }

    /// A consumer of `host`'s queue, handing out entries in order.
    pub fn consumer(&self, host: &str) -> Result<Consumer, ZkError> {
        check_host(host)?;
        Ok(Consumer {
            queue: self.clone(),
            host: host.to_string(),
            after: None,
            buffer: VecDeque::new(),
        })
    }

    /// Stores a task's body once (idempotent: storing the same body again is a
    /// no-op, a different one is [`ZkError::BodyConflict`]).
    pub async fn put_body(&self, task: u64, body: &[u8]) -> Result<(), ZkError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ZkError::BodyTooLarge {
                size: body.len(),
                max: MAX_BODY_BYTES,
            });
        }
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&[]]
        } else {
            body.chunks(CHUNK_BYTES).collect()
        };
        let header = BodyHeader {
            size: body.len() as u64,
            chunks: chunks.len() as u32,
            sha256: sha256_hex(body),
        };
        let header_json = serde_json::to_vec(&header).map_err(|e| ZkError::Decode {
            path: body_path(task),
            reason: e.to_string(),
        })?;
        let root = body_path(task);
        let client = self.session.client();
        let mut txn = client.new_multi_writer();
        let first = format!("{root}/0");
        txn.add_create(&root, &header_json, PERSISTENT)
            .and_then(|()| txn.add_create(&first, chunks[0], PERSISTENT))
            .map_err(|source| ZkError::Create {
                path: root.clone(),
                source,
            })?;
        match txn.commit().await {
            Ok(_) => {}
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NodeExists,
                ..
            }) => {
                // Stored before (or a retry of a half-done put): same content only.
                let existing = self.read_header(&client, task).await?;
                if existing != header {
                    return Err(ZkError::BodyConflict { task });
                }
                debug!(task, "body already stored");
            }
            Err(source) => {
                return Err(ZkError::Multi {
                    what: "body header and first chunk",
                    ops: 2,
                    source,
                })
            }
        }
        let rest: Vec<(String, &[u8])> = chunks
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, c)| (format!("{root}/{i}"), *c))
            .collect();
        let pending: Vec<_> = rest
            .iter()
            .map(|(p, c)| client.create(p, c, PERSISTENT))
            .collect();
        for ((path, _), fut) in rest.iter().zip(pending) {
            match fut.await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(source) => {
                    return Err(ZkError::Create {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    async fn read_header(&self, client: &zk::Client, task: u64) -> Result<BodyHeader, ZkError> {
        let path = body_path(task);
        let (data, _) = client
            .get_data(&path)
            .await
            .map_err(|source| ZkError::Read {
                path: path.clone(),
                source,
            })?;
        BodyHeader::decode(task, &path, &data)
    }

    /// Reads a task's body, checking every chunk and the digest. None if it has no
    /// body.
    pub async fn get_body(&self, task: u64) -> Result<Option<Vec<u8>>, ZkError> {
        let client = self.session.client();
        let header = match self.read_header(&client, task).await {
            Ok(h) => h,
            Err(ZkError::Read {
                source: zk::Error::NoNode,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = header.size as usize; // bounded by read_header
        let paths: Vec<String> = (0..header.chunks)
            .map(|i| format!("{}/{i}", body_path(task)))
            .collect();
        let pending: Vec<_> = paths.iter().map(|p| client.get_data(p)).collect();
        let mut body = Vec::with_capacity(size);
        for (i, (path, fut)) in paths.iter().zip(pending).enumerate() {
            let (chunk, _) = fut.await.map_err(|source| ZkError::Read {
                path: path.clone(),
                source,
            })?;
            let want = (size - i * CHUNK_BYTES).min(CHUNK_BYTES);
            if chunk.len() != want {
                return Err(ZkError::BodyCorrupt {
                    task,
                    reason: format!("chunk {i} has {} bytes, not {want}", chunk.len()),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if sha256_hex(&body) != header.sha256 {
            return Err(ZkError::BodyCorrupt {
                task,
                reason: "digest mismatch".into(),
            });
        }
        Ok(Some(body))
    }

    /// Deletes a task's body (its chunks and header in one transaction). Returns
    /// false if there was none.
    pub async fn delete_body(&self, task: u64) -> Result<bool, ZkError> {
        let root = body_path(task);
        let client = self.session.client();
        let children = match client.list_children(&root).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => return Ok(false),
            Err(source) => return Err(ZkError::List { path: root, source }),
        };
        if children.len() > MAX_BODY_BYTES / CHUNK_BYTES + 1 {
            return Err(ZkError::BodyCorrupt {
                task,
                reason: format!("{} chunk nodes", children.len()),
            });
        }
        let mut txn = client.new_multi_writer();
        for c in &children {
            let path = format!("{root}/{c}");
            txn.add_delete(&path, None)
                .map_err(|source| ZkError::Delete { path, source })?;
        }
        txn.add_delete(&root, None)
            .map_err(|source| ZkError::Delete {
                path: root.clone(),
                source,
            })?;
        match txn.commit().await {
            Ok(_) => Ok(true),
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            }) => Ok(false),
            Err(source) => Err(ZkError::Multi {
                what: "delete body",
                ops: children.len() + 1,
                source,
            }),
        }
    }

    /// Deletes bodies that no queue entry names and that are older than `min_age`
    /// (so a producer between `put_body` and `enqueue_batch` is left alone). Only for
    /// deployments where the body's lifetime is its entries' (see the module docs).
    /// Returns the tasks whose bodies were deleted.
    pub async fn sweep_orphan_bodies(&self, min_age: Duration) -> Result<Vec<u64>, ZkError> {
        let client = self.session.client();
        let referenced: HashSet<u64> = self
            .queue_all()
            .await?
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        let names = client
            .list_children(BODIES)
            .await
            .map_err(|source| ZkError::List {
                path: BODIES.into(),
                source,
            })?;
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(i64::MAX);
        let min_age_ms = i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
        let mut deleted = Vec::new();
        let mut by_task = BTreeMap::new();
        for name in names {
            match name.parse::<u64>() {
                Ok(task) if name.len() <= 20 => {
                    by_task.insert(task, name);
                }
                _ => warn!(name, "skipping a foreign node under {BODIES}"),
            }
        }
        for task in by_task.keys() {
            if referenced.contains(task) {
                continue;
            }
            let stat = match client.check_stat(&body_path(*task)).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(source) => {
                    return Err(ZkError::Read {
                        path: body_path(*task),
                        source,
                    })
                }
            };
            if now_ms.saturating_sub(stat.ctime) < min_age_ms {
                continue;
            }
            if self.delete_body(*task).await? {
                deleted.push(*task);
            }
        }
        if !deleted.is_empty() {
            info!(count = deleted.len(), "orphan task bodies deleted");
        }
        Ok(deleted)
    }
}

/// Parses and sorts a queue listing; foreign names are logged and skipped.
fn sorted_entries(path: &str, names: &[String]) -> Vec<QueueEntry> {
    let mut entries: Vec<QueueEntry> = names
        .iter()
        .filter_map(|n| {
            let e = QueueEntry::parse(n);
            if e.is_none() {
                warn!(path, name = %n, "skipping a node that is not a queue entry");
            }
            e
        })
        .collect();
    entries.sort_unstable();
    entries
}

/// Hands out one host's entries in order, waiting (with a re-armed child watch) when
/// there is none. Entries it handed out are not handed out again by it (unless
/// [`Consumer::rewind`]); a new consumer starts from the oldest entry still queued,
/// which is how unacked entries are redelivered.
#[derive(Debug)]
pub struct Consumer {
    queue: TaskQueue,
    host: String,
    /// The highest seq handed out.
    after: Option<u64>,
    buffer: VecDeque<QueueEntry>,
}

impl Consumer {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The next entry, waiting for one if the queue has nothing new. Retries through
    /// connection losses and session expiry; other errors are returned.
    pub async fn next(&mut self) -> Result<QueueEntry, ZkError> {
        let path = queue_path(&self.host);
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.after = Some(e.seq);
                return Ok(e);
            }
            let mut generation = self.queue.session.generation();
            generation.borrow_and_update();
            let client = self.queue.session.client();
            // Arm the watch and read in one call: an entry created after this read
            // fires the watch, one created before is in the listing.
            let (names, watcher) = match client.list_and_watch_children(&path).await {
                Ok(x) => x,
                Err(zk::Error::NoNode) => {
                    self.queue
                        .ensure_queues(&client, [self.host.as_str()])
                        .await?;
                    continue;
                }
                Err(e)
                    if is_retryable(&e)
                        || matches!(e, zk::Error::SessionExpired | zk::Error::ClientClosed) =>
                {
                    debug!(host = %self.host, "consumer: {e}; retrying");
                    let _ = tokio::time::timeout(Duration::from_millis(250), generation.changed())
                        .await;
                    continue;
                }
                Err(source) => return Err(ZkError::List { path, source }),
            };
            let after = self.after;
            self.buffer = sorted_entries(&path, &names)
                .into_iter()
                .filter(|e| after.is_none_or(|a| e.seq > a))
                .collect();
            if self.buffer.is_empty() {
                tokio::select! {
                    _ = watcher.changed() => {}
                    _ = generation.changed() => {}
                }
            }
        }
    }

    /// Like [`Consumer::next`] but gives up after `timeout` (None).
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<QueueEntry>, ZkError> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Acks (deletes) an entry handed out.
    pub async fn ack(&self, entry: &QueueEntry) -> Result<bool, ZkError> {
        self.queue.ack(&self.host, entry).await
    }

    /// Acks several entries in multi transactions.
    pub async fn ack_many(&self, entries: &[QueueEntry]) -> Result<usize, ZkError> {
        self.queue.ack_many(&self.host, entries).await
    }

    /// Hands out every still-queued entry again (an agent reconnected).
    pub fn rewind(&mut self) {
        self.after = None;
        self.buffer.clear();
    }
}
