//! The center's durable state: tokens, hosts, tasks with their per-host results and
//! queues, the audit log, and a few opaque meta blobs (the CA key and certificate).
//!
//! Why a trait: the center is meant to run as one process on one embedded file today,
//! but a replicated backend (ZooKeeper, etcd) can follow without touching the API or
//! agent code. [`Store`] is object safe, so callers hold an `Arc<dyn Store>`.
//!
//! Why redb: it is pure Rust, crash safe (copy-on-write B-trees, a commit is durable
//! when it returns), and has real transactions. Every mutating method here is exactly
//! one write transaction, so a crash never leaves, say, a task without its results or
//! a finished result still sitting in a host's queue. The methods are synchronous and
//! short; async callers may call them directly or through `spawn_blocking`.
//!
//! Layout (values are postcard, and every value column is raw bytes so that a corrupt
//! value surfaces as [`StoreError::Decode`] instead of a panic inside redb's typed
//! decoding):
//!
//! | table      | key              | value                                   |
//! |------------|------------------|-----------------------------------------|
//! | `meta`     | name             | opaque bytes                            |
//! | `counters` | name             | `u64` (next task id, queue seq, audit)  |
//! | `tokens`   | token id         | [`TokenRecord`]                         |
//! | `hosts`    | host name        | [`HostRecord`]                          |
//! | `tasks`    | task id          | [`TaskRecord`]                          |
//! | `open`     | task id          | `u64`: hosts of the task not yet final  |
//! | `results`  | (task id, host)  | [`HostResult`]                          |
//! | `queue`    | (host, seq)      | `u64` task id                           |
//! | `audit`    | seq              | [`AuditEntry`]                          |
//!
//! The queue sequence is global and monotonic, so [`Store::queue_for`] returns a
//! host's entries in the order they were enqueued, across tasks and restarts. A queue
//! entry lives from the moment a host's result becomes `Queued` until it is final
//! (finished, expired or cancelled); `Delivered` and `Running` entries stay queued, so
//! an agent that reconnects is sent them again and deduplicates by task id.
//!
//! The `open` count makes completion O(1): a task becomes [`TaskState::Done`] in the
//! transaction that moves its last host to a final state.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything, including token management.
    Admin,
    /// Run tasks and read state.
    Operator,
    /// Read state only.
    Read,
    /// Enroll a new agent, and nothing else.
    Enroll,
}

impl Scope {
    /// Whether a token with this scope may perform an action that needs `needed`.
    ///
    /// Admin ⊇ Operator ⊇ Read; Enroll stands alone, so an enrollment token leaked from
    /// a provisioning script cannot read or run anything, and an admin token is not
    /// an enrollment token either.
    pub fn allows(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => matches!(needed, Scope::Admin | Scope::Operator | Scope::Read),
            Scope::Operator => matches!(needed, Scope::Operator | Scope::Read),
            Scope::Read => needed == Scope::Read,
            Scope::Enroll => needed == Scope::Enroll,
        }
    }

    /// The lowercase name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Operator => "operator",
            Scope::Read => "read",
            Scope::Enroll => "enroll",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is none of `admin`, `operator`, `read` or `enroll`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (expected admin, operator, read or enroll)")]
pub struct ParseScopeError(pub String);

impl FromStr for Scope {
    type Err = ParseScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Scope::Admin),
            "operator" => Ok(Scope::Operator),
            "read" => Ok(Scope::Read),
            "enroll" => Ok(Scope::Enroll),
            other => Err(ParseScopeError(other.to_string())),
        }
    }
}

/// An API token. Only the SHA-256 of its secret is kept (see `auth.rs`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: [u8; 32],
    pub scope: Scope,
    /// CIDRs as text; empty means any address.
    pub allow: Vec<String>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds; the token is refused from this instant on.
    pub expires_at: Option<u64>,
    pub one_time: bool,
    pub uses: u64,
    pub revoked: bool,
    pub note: String,
    /// Least-privilege limits (target, users, task kinds); empty limits nothing.
    #[serde(default)]
    pub limits: crate::limits::TokenLimits,
}

impl TokenRecord {
    /// The one rule for using a token, shared by every store: refuses a revoked,
    /// expired (`expires_at <= now`) or already used one-time token, else counts the
    /// use. Stores call it inside the transaction that writes the record back.
    pub fn spend(&mut self, now: u64) -> Result<(), TokenUseError> {
        if self.revoked {
            return Err(TokenUseError::Revoked(self.id.clone()));
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(TokenUseError::Expired(self.id.clone()));
        }
        if self.one_time && self.uses > 0 {
            return Err(TokenUseError::AlreadyUsed(self.id.clone()));
        }
        self.uses = self.uses.saturating_add(1);
        Ok(())
    }
}

/// An enrolled agent host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    /// Hex SHA-256 of the agent's certificate.
    pub fingerprint: String,
    pub addrs: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub version: String,
    pub enrolled_at: u64,
    pub last_seen: u64,
    pub online: bool,
    pub offline_since: Option<u64>,
    /// Opaque: the agent crate's resource report, encoded by the caller.
    pub resources: Option<Vec<u8>>,
}

/// The state of a whole task.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Some host is not final yet.
    Running,
    /// Every host is final.
    Done,
    /// Cancelled by an operator; every host is final.
    Cancelled,
}

/// A task: one body sent to a set of hosts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: u64,
    pub created_at: u64,
    /// The id of the token that created it.
    pub created_by: String,
    /// The target expression as typed.
    pub target: String,
    /// The hosts it resolved to, in rollout order.
    pub hosts: Vec<String>,
    /// Opaque task body (postcard), encoded by the caller.
    pub body: Vec<u8>,
    /// Human summary, e.g. the command line.
    pub summary: String,
    pub ttl_ms: u64,
    /// Hosts released per rollout step; 0 = all at once.
    pub batch: u32,
    pub max_failures: Option<u32>,
    pub state: TaskState,
}

/// Everything [`Store::create_task`] needs; the id, creation time and state are the
/// store's to assign.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub created_by: String,
    pub target: String,
    pub hosts: Vec<String>,
    pub body: Vec<u8>,
    pub summary: String,
    pub ttl_ms: u64,
    pub batch: u32,
    pub max_failures: Option<u32>,
}

/// The state of one host within a task.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Not yet released by the batch rollout; not queued.
    Pending,
    /// In the host's queue, not yet delivered.
    Queued,
    /// The agent acknowledged receipt.
    Delivered,
    /// The agent reported that it started.
    Running,
    Ok,
    Failed,
    TimedOut,
    /// The TTL ran out before the host ran it.
    Expired,
    Cancelled,
    /// The agent lost the task (e.g. restarted while running it).
    Lost,
}

impl HostState {
    /// Whether nothing more will happen to this host for this task.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            HostState::Ok
                | HostState::Failed
                | HostState::TimedOut
                | HostState::Expired
                | HostState::Cancelled
                | HostState::Lost
        )
    }

    /// Whether the host has the task in hand (so cancelling must tell its agent).
    pub fn is_delivered(&self) -> bool {
        matches!(self, HostState::Delivered | HostState::Running)
    }
}

/// One host's result for one task.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HostResult {
    pub task: u64,
    pub host: String,
    pub state: HostState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<String>,
    pub queued_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

impl HostResult {
    /// A host's result as a task is created: `Queued` or `Pending`, nothing run yet.
    pub fn new(task: u64, host: String, state: HostState, queued_at: u64) -> HostResult {
        HostResult {
            task,
            host,
            state,
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
            queued_at,
            started_at: None,
            finished_at: None,
        }
    }

    /// Takes a final outcome, as every store's `finish` does; the start time is kept
    /// when the outcome has none.
    pub fn apply(&mut self, o: HostOutcome) {
        self.state = o.state;
        self.exit_code = o.exit_code;
        self.signal = o.signal;
        self.stdout = o.stdout;
        self.stderr = o.stderr;
        self.stdout_truncated = o.stdout_truncated;
        self.stderr_truncated = o.stderr_truncated;
        self.error = o.error;
        self.started_at = o.started_at.or(self.started_at);
        self.finished_at = Some(o.finished_at);
    }
}

/// What an agent reports when a task ends on its host; see [`Store::finish`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HostOutcome {
    /// Must be final.
    pub state: HostState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<String>,
    /// Kept from the earlier `mark_running` when `None`.
    pub started_at: Option<u64>,
    pub finished_at: u64,
}

impl HostOutcome {
    /// An outcome with no output: a state, when it ended, and why (if not obvious).
    pub fn bare(
        state: HostState,
        started_at: Option<u64>,
        finished_at: u64,
        error: Option<String>,
    ) -> HostOutcome {
        HostOutcome {
            state,
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error,
            started_at,
            finished_at,
        }
    }
}

/// One audited API request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by [`Store::append_audit`]; whatever the caller puts here is ignored.
    pub seq: u64,
    pub at: u64,
    /// Token id, or empty when the request carried none.
    pub token: String,
    pub addr: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub detail: String,
}

/// A failure of the store, by stage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database: {0}")]
    Open(#[source] Box<redb::DatabaseError>),
    #[error("starting a transaction: {0}")]
    Transaction(#[source] Box<redb::TransactionError>),
    #[error("opening a table: {0}")]
    Table(#[source] Box<redb::TableError>),
    #[error("reading or writing the database: {0}")]
    Storage(#[source] Box<redb::StorageError>),
    #[error("committing a transaction: {0}")]
    Commit(#[source] Box<redb::CommitError>),
    #[error("encoding a record for table {table}: {source}")]
    Encode {
        table: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("decoding a record from table {table} (the value is corrupt): {source}")]
    Decode {
        table: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} {key} does not exist")]
    NotFound { what: &'static str, key: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A failure of the ZooKeeper backend ([`crate::zk::ZkStore`]).
    #[error("ZooKeeper: {0}")]
    Zk(#[source] Box<crate::zk::ZkError>),
    /// Refused before writing: the data directory's filesystem is below its reserve.
    #[error("the disk is full: {free} bytes free, below the reserve of {reserve} bytes kept for the store")]
    DiskFull { free: u64, reserve: u64 },
}

impl StoreError {
    /// The storage error inside a redb failure, at whatever stage it surfaced.
    fn storage(&self) -> Option<&redb::StorageError> {
        match self {
            StoreError::Storage(e) => Some(e),
            StoreError::Commit(e) => match &**e {
                redb::CommitError::Storage(s) => Some(s),
                _ => None,
            },
            StoreError::Transaction(e) => match &**e {
                redb::TransactionError::Storage(s) => Some(s),
                _ => None,
            },
            StoreError::Table(e) => match &**e {
                redb::TableError::Storage(s) => Some(s),
                _ => None,
            },
            StoreError::Open(e) => match &**e {
                redb::DatabaseError::Storage(s) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// An I/O failure of the file (or an earlier one redb remembers): the open
    /// database is unusable until it is reopened.
    pub fn is_io(&self) -> bool {
        matches!(
            self.storage(),
            Some(redb::StorageError::Io(_)) | Some(redb::StorageError::PreviousIo)
        )
    }

    /// The disk (or quota) is full, whether the reserve refused the write or the
    /// write itself failed for want of space.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            _ => {
                matches!(self.storage(), Some(redb::StorageError::Io(e)) if crate::caps::is_no_space(e))
            }
        }
    }
}

impl From<crate::zk::ZkError> for StoreError {
    fn from(e: crate::zk::ZkError) -> Self {
        StoreError::Zk(Box::new(e))
    }
}

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        StoreError::Open(Box::new(e))
    }
}
impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        StoreError::Transaction(Box::new(e))
    }
}
impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        StoreError::Table(Box::new(e))
    }
}
impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        StoreError::Storage(Box::new(e))
    }
}
impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        StoreError::Commit(Box::new(e))
    }
}

/// Why [`Store::consume_token`] refused a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenUseError {
    #[error("no token has the id {0}")]
    Unknown(String),
    #[error("token {0} has been revoked")]
    Revoked(String),
    #[error("token {0} has expired")]
    Expired(String),
    #[error("one-time token {0} has already been used")]
    AlreadyUsed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The center's durable state. Every mutating method is atomic and durable when it
/// returns `Ok`.
pub trait Store: Send + Sync + 'static {
    // --- meta ---
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    // --- tokens ---
    /// Inserts or replaces the token with `token.id`.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Ordered by id.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Returns false when no token has that id.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;
    /// In one transaction: refuses a revoked, expired (`expires_at <= now`) or already
    /// used one-time token, else increments `uses` and returns the updated record. Two
    /// concurrent enrollments therefore cannot both spend a one-time token.
    fn consume_token(&self, id: &str, now: u64) -> Result<TokenRecord, TokenUseError>;

    // --- hosts ---
    /// Inserts or replaces the host with `host.name`.
    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError>;
    fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError>;
    /// Removes the host (`octo agents rm`). Returns false when there was none.
    fn remove_host(&self, name: &str) -> Result<bool, StoreError>;
    /// Ordered by name.
    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    /// Going online clears `offline_since` and sets `last_seen`; going offline sets
    /// `offline_since` (if it was online). Returns false for an unknown host.
    fn set_online(&self, name: &str, online: bool, now: u64) -> Result<bool, StoreError>;
    /// Records a heartbeat: `last_seen`, resources, addresses, and online. Returns
    /// false for an unknown host.
    fn update_heartbeat(
        &self,
        name: &str,
        now: u64,
        resources: Vec<u8>,
        addrs: Vec<String>,
    ) -> Result<bool, StoreError>;
    /// Marks every online host offline as of `now` (at center start nobody is
    /// connected). Returns how many changed.
    fn mark_all_offline(&self, now: u64) -> Result<usize, StoreError>;

    // --- tasks and queues ---
    /// Allocates the next task id (monotonic across restarts) and, in the same
    /// transaction, writes a result for every host: `Queued` and enqueued, or
    /// `Pending` for hosts beyond the first `batch` when `batch > 0`. Host names must
    /// be distinct. A task with no hosts is `Done` at once.
    fn create_task(&self, task: NewTask, now: u64) -> Result<u64, StoreError>;
    fn get_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError>;
    /// Replaces a task's body (a copy whose source moves to a center-held seed).
    /// Hosts that already have the old body keep it; later deliveries get the new one.
    fn set_task_body(&self, id: u64, body: Vec<u8>) -> Result<(), StoreError>;
    /// At most `limit` tasks with ids below `before` (all when `None`), newest first,
    /// **without their bodies** (`body` is empty): listings must not read megabytes per
    /// task. [`Store::get_task`] reads a task whole.
    fn list_tasks(&self, before: Option<u64>, limit: usize) -> Result<Vec<TaskRecord>, StoreError>;
    /// Every host's result for the task, ordered by host name.
    fn results(&self, task: u64) -> Result<Vec<HostResult>, StoreError>;
    /// One host's result of one task.
    fn result(&self, task: u64, host: &str) -> Result<Option<HostResult>, StoreError>;
    /// How many hosts of `task` are not final yet (0 for an unknown task).
    fn open_hosts(&self, task: u64) -> Result<u64, StoreError>;
    /// The entries in `host`'s queue as `(seq, task id)`, oldest first.
    fn queue_for(&self, host: &str) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Every queue entry of every host as `(host, seq, task id)`, by host then seq
    /// (for TTL sweeps).
    fn queue_all(&self) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Batch rollout: moves those of `hosts` that are `Pending` in the task to
    /// `Queued` (with `queued_at = now`) and enqueues them. Returns the hosts released.
    fn release(&self, task: u64, hosts: &[String], now: u64) -> Result<Vec<String>, StoreError>;
    /// `Queued` → `Delivered`. Returns whether the state changed.
    fn ack_delivery(&self, host: &str, task: u64) -> Result<bool, StoreError>;
    /// `Queued`/`Delivered` → `Running`, with `started_at = now`. Returns whether the
    /// state changed.
    fn mark_running(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError>;
    /// Stores the final result and removes the queue entry in one transaction; the
    /// task becomes `Done` when this was its last open host. A result that is already
    /// final (cancelled, expired, or a duplicate report) is left alone and `false` is
    /// returned.
    fn finish(&self, host: &str, task: u64, outcome: HostOutcome) -> Result<bool, StoreError>;
    /// Several `finish`es in one durable transaction (group commit: a fleet reporting
    /// at once costs one disk sync, not one per host). Same result per item.
    fn finish_many(&self, items: Vec<(String, u64, HostOutcome)>) -> Result<Vec<bool>, StoreError> {
        items
            .into_iter()
            .map(|(h, t, o)| self.finish(&h, t, o))
            .collect()
    }
    /// The TTL ran out: a non-final host becomes `Expired` and is dequeued. Returns
    /// whether the state changed.
    fn expire(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError>;
    /// Every non-final host becomes `Cancelled` and is dequeued; the task becomes
    /// `Cancelled` (unless it was already `Done`). Returns the hosts that had the task
    /// delivered or running, whose agents the caller must tell.
    fn cancel_task(&self, id: u64, now: u64) -> Result<Vec<String>, StoreError>;

    // --- audit ---
    /// Appends the entry with the next sequence number, which is returned.
    fn append_audit(&self, entry: AuditEntry) -> Result<u64, StoreError>;
    /// At most `limit` entries, newest first.
    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Retention: deletes all but the newest `keep` entries; returns how many went.
    fn prune_audit(&self, keep: u64) -> Result<u64, StoreError>;
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const OPEN: TableDefinition<u64, &[u8]> = TableDefinition::new("open");
const RESULTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("results");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

const NEXT_TASK: &str = "next_task";
const NEXT_QUEUE: &str = "next_queue";
const NEXT_AUDIT: &str = "next_audit";

/// How every record is written (public for the fuzz target's seeds).
#[doc(hidden)]
pub fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|source| StoreError::Encode { table, source })
}

/// How every record is read back (public for the fuzz target).
#[doc(hidden)]
pub fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { table, source })
}

pub use crate::redb_store::RedbStore;

/// The [`Store`] on one open redb database; [`RedbStore`] wraps it to reopen it after
/// an I/O error and to keep the disk reserve.
pub(crate) struct RedbFile {
    db: Database,
}

impl fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbFile").finish_non_exhaustive()
    }
}

/// A task record up to its body, which is borrowed (not copied) and skipped.
#[derive(Deserialize)]
struct TaskHead<'a> {
    id: u64,
    created_at: u64,
    created_by: String,
    target: String,
    hosts: Vec<String>,
    #[serde(borrow)]
    _body: &'a [u8],
    summary: String,
    ttl_ms: u64,
    batch: u32,
    max_failures: Option<u32>,
    state: TaskState,
}

impl From<TaskHead<'_>> for TaskRecord {
    fn from(h: TaskHead<'_>) -> TaskRecord {
        TaskRecord {
            id: h.id,
            created_at: h.created_at,
            created_by: h.created_by,
            target: h.target,
            hosts: h.hosts,
            body: Vec::new(),
            summary: h.summary,
            ttl_ms: h.ttl_ms,
            batch: h.batch,
            max_failures: h.max_failures,
            state: h.state,
        }
    }
}

impl RedbFile {
    /// Opens the store in `db`, creating the tables if missing.
    pub(crate) fn new(db: Database) -> Result<RedbFile, StoreError> {
        let tx = db.begin_write()?;
        {
            tx.open_table(META)?;
            tx.open_table(COUNTERS)?;
            tx.open_table(TOKENS)?;
            tx.open_table(HOSTS)?;
            tx.open_table(TASKS)?;
            tx.open_table(OPEN)?;
            tx.open_table(RESULTS)?;
            tx.open_table(QUEUE)?;
            tx.open_table(AUDIT)?;
        }
        tx.commit()?;
        Ok(RedbFile { db })
    }

    /// Runs `f` in one write transaction and commits if it succeeds (dropping an
    /// uncommitted redb transaction aborts it).
    fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let out = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }
}

/// `finish` inside a write transaction.
fn finish_in(
    tx: &WriteTransaction,
    host: &str,
    task: u64,
    outcome: HostOutcome,
) -> Result<bool, StoreError> {
    let mut r = get_result(tx, task, host)?;
    if r.state.is_final() {
        return Ok(false);
    }
    r.apply(outcome);
    put_result(tx, &r)?;
    dequeue(tx, host, task)?;
    close_one(tx, task)?;
    Ok(true)
}

/// Returns the counter's current value and stores it plus one.
fn next_counter(tx: &WriteTransaction, name: &'static str) -> Result<u64, StoreError> {
    let mut t = tx.open_table(COUNTERS)?;
    let current = match t.get(name)? {
        Some(v) => decode::<u64>("counters", v.value())?,
        None => 1,
    };
    let next = current
        .checked_add(1)
        .ok_or_else(|| StoreError::Invalid(format!("counter {name} overflowed")))?;
    t.insert(name, encode("counters", &next)?.as_slice())?;
    Ok(current)
}

fn get_result(tx: &WriteTransaction, task: u64, host: &str) -> Result<HostResult, StoreError> {
    let t = tx.open_table(RESULTS)?;
    let v = t.get((task, host))?.ok_or_else(|| StoreError::NotFound {
        what: "task result",
        key: format!("{task}/{host}"),
    })?;
    decode("results", v.value())
}

fn put_result(tx: &WriteTransaction, r: &HostResult) -> Result<(), StoreError> {
    let mut t = tx.open_table(RESULTS)?;
    t.insert((r.task, r.host.as_str()), encode("results", r)?.as_slice())?;
    Ok(())
}

fn enqueue(tx: &WriteTransaction, host: &str, task: u64) -> Result<(), StoreError> {
    let seq = next_counter(tx, NEXT_QUEUE)?;
    let mut t = tx.open_table(QUEUE)?;
    t.insert((host, seq), encode("queue", &task)?.as_slice())?;
    Ok(())
}

/// Removes `host`'s queue entries for `task` (there is at most one).
fn dequeue(tx: &WriteTransaction, host: &str, task: u64) -> Result<(), StoreError> {
    let mut t = tx.open_table(QUEUE)?;
    let mut seqs = Vec::new();
    for item in t.range((host, 0u64)..=(host, u64::MAX))? {
        let (k, v) = item?;
        if decode::<u64>("queue", v.value())? == task {
            seqs.push(k.value().1);
        }
    }
    for seq in seqs {
        t.remove((host, seq))?;
    }
    Ok(())
}

fn get_task_tx(tx: &WriteTransaction, id: u64) -> Result<TaskRecord, StoreError> {
    let t = tx.open_table(TASKS)?;
    let v = t.get(id)?.ok_or_else(|| StoreError::NotFound {
        what: "task",
        key: id.to_string(),
    })?;
    decode("tasks", v.value())
}

fn put_task(tx: &WriteTransaction, task: &TaskRecord) -> Result<(), StoreError> {
    let mut t = tx.open_table(TASKS)?;
    t.insert(task.id, encode("tasks", task)?.as_slice())?;
    Ok(())
}

/// One more host of `task` became final: counts it down, and completes the task when
/// none is left.
fn close_one(tx: &WriteTransaction, task: u64) -> Result<(), StoreError> {
    let left = {
        let mut t = tx.open_table(OPEN)?;
        let open = match t.get(task)? {
            Some(v) => decode::<u64>("open", v.value())?,
            None => 0,
        };
        let left = open.saturating_sub(1);
        t.insert(task, encode("open", &left)?.as_slice())?;
        left
    };
    if left == 0 {
        let mut record = get_task_tx(tx, task)?;
        if record.state == TaskState::Running {
            record.state = TaskState::Done;
            put_task(tx, &record)?;
        }
    }
    Ok(())
}

fn update_host(
    tx: &WriteTransaction,
    name: &str,
    f: impl FnOnce(&mut HostRecord),
) -> Result<bool, StoreError> {
    let mut t = tx.open_table(HOSTS)?;
    let mut host: HostRecord = match t.get(name)? {
        Some(v) => decode("hosts", v.value())?,
        None => return Ok(false),
    };
    f(&mut host);
    t.insert(name, encode("hosts", &host)?.as_slice())?;
    Ok(true)
}

impl Store for RedbFile {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let bytes = encode("tokens", token)?;
        self.write(|tx| {
            tx.open_table(TOKENS)?
                .insert(token.id.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TOKENS)?;
        t.get(id)?.map(|v| decode("tokens", v.value())).transpose()
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TOKENS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(decode("tokens", v.value())?);
        }
        Ok(out)
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(TOKENS)?;
            let mut token: TokenRecord = match t.get(id)? {
                Some(v) => decode("tokens", v.value())?,
                None => return Ok(false),
            };
            token.revoked = true;
            t.insert(id, encode("tokens", &token)?.as_slice())?;
            Ok(true)
        })
    }

    fn consume_token(&self, id: &str, now: u64) -> Result<TokenRecord, TokenUseError> {
        self.write(|tx| {
            let mut t = tx.open_table(TOKENS).map_err(StoreError::from)?;
            let mut token: TokenRecord = match t.get(id).map_err(StoreError::from)? {
                Some(v) => decode("tokens", v.value())?,
                None => return Err(TokenUseError::Unknown(id.to_string())),
            };
            token.spend(now)?;
            t.insert(id, encode("tokens", &token)?.as_slice())
                .map_err(StoreError::from)?;
            Ok(token)
        })
    }

    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let bytes = encode("hosts", host)?;
        self.write(|tx| {
            tx.open_table(HOSTS)?
                .insert(host.name.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    fn remove_host(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.open_table(HOSTS)?.remove(name)?.is_some()))
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        t.get(name)?.map(|v| decode("hosts", v.value())).transpose()
    }

    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        let mut out = Vec::with_capacity(usize::try_from(t.len()?).unwrap_or(0));
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(decode("hosts", v.value())?);
        }
        Ok(out)
    }

    fn set_online(&self, name: &str, online: bool, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            update_host(tx, name, |h| {
                if online {
                    h.last_seen = now;
                    h.offline_since = None;
                } else if h.online {
                    h.offline_since = Some(now);
                }
                h.online = online;
            })
        })
    }

    fn update_heartbeat(
        &self,
        name: &str,
        now: u64,
        resources: Vec<u8>,
        addrs: Vec<String>,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            update_host(tx, name, |h| {
                h.last_seen = now;
                h.resources = Some(resources);
                h.addrs = addrs;
                h.online = true;
                h.offline_since = None;
            })
        })
    }

    fn mark_all_offline(&self, now: u64) -> Result<usize, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(HOSTS)?;
            let mut changed = Vec::new();
            for item in t.iter()? {
                let (_, v) = item?;
                let mut host: HostRecord = decode("hosts", v.value())?;
                if host.online {
                    host.online = false;
                    host.offline_since = Some(now);
                    changed.push(host);
                }
            }
            for host in &changed {
                t.insert(host.name.as_str(), encode("hosts", host)?.as_slice())?;
            }
            Ok(changed.len())
        })
    }

    fn create_task(&self, task: NewTask, now: u64) -> Result<u64, StoreError> {
        let mut seen = std::collections::BTreeSet::new();
        for h in &task.hosts {
            if !seen.insert(h.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "host {h} appears twice in the task"
                )));
            }
        }
        let no_hosts = task.hosts.is_empty();
        self.write(|tx| {
            let id = next_counter(tx, NEXT_TASK)?;
            let record = TaskRecord {
                id,
                created_at: now,
                created_by: task.created_by,
                target: task.target,
                hosts: task.hosts,
                body: task.body,
                summary: task.summary,
                ttl_ms: task.ttl_ms,
                batch: task.batch,
                max_failures: task.max_failures,
                state: if no_hosts {
                    TaskState::Done
                } else {
                    TaskState::Running
                },
            };
            let first = match record.batch {
                0 => record.hosts.len(),
                n => usize::try_from(n).unwrap_or(usize::MAX),
            };
            for (i, host) in record.hosts.iter().enumerate() {
                let state = if i < first {
                    enqueue(tx, host, id)?;
                    HostState::Queued
                } else {
                    HostState::Pending
                };
                put_result(tx, &HostResult::new(id, host.clone(), state, now))?;
            }
            tx.open_table(OPEN)?
                .insert(id, encode("open", &(record.hosts.len() as u64))?.as_slice())?;
            put_task(tx, &record)?;
            Ok(id)
        })
    }

    fn set_task_body(&self, id: u64, body: Vec<u8>) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        let mut task = get_task_tx(&tx, id)?;
        task.body = body;
        put_task(&tx, &task)?;
        tx.commit()?;
        Ok(())
    }

    fn get_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TASKS)?;
        t.get(id)?.map(|v| decode("tasks", v.value())).transpose()
    }

    fn list_tasks(&self, before: Option<u64>, limit: usize) -> Result<Vec<TaskRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TASKS)?;
        let mut out = Vec::new();
        for item in t.range(..before.unwrap_or(u64::MAX))?.rev().take(limit) {
            let (_, v) = item?;
            let head: TaskHead<'_> =
                postcard::from_bytes(v.value()).map_err(|source| StoreError::Decode {
                    table: "tasks",
                    source,
                })?;
            out.push(head.into());
        }
        Ok(out)
    }

    fn results(&self, task: u64) -> Result<Vec<HostResult>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESULTS)?;
        let mut out = Vec::new();
        for item in t.range((task, "")..)? {
            let (k, v) = item?;
            if k.value().0 != task {
                break;
            }
            out.push(decode("results", v.value())?);
        }
        Ok(out)
    }

    fn open_hosts(&self, task: u64) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OPEN)?;
        match t.get(task)? {
            Some(v) => decode::<u64>("open", v.value()),
            None => Ok(0),
        }
    }

    fn result(&self, task: u64, host: &str) -> Result<Option<HostResult>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESULTS)?;
        match t.get((task, host))? {
            Some(v) => Ok(Some(decode("results", v.value())?)),
            None => Ok(None),
        }
    }

    fn queue_for(&self, host: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(QUEUE)?;
        let mut out = Vec::new();
        for item in t.range((host, 0u64)..=(host, u64::MAX))? {
            let (k, v) = item?;
            out.push((k.value().1, decode("queue", v.value())?));
        }
        Ok(out)
    }

    fn queue_all(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(QUEUE)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (host, seq) = k.value();
            out.push((host.to_string(), seq, decode("queue", v.value())?));
        }
        Ok(out)
    }

    fn release(&self, task: u64, hosts: &[String], now: u64) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            get_task_tx(tx, task)?;
            let mut released = Vec::new();
            for host in hosts {
                let mut r = match get_result(tx, task, host) {
                    Ok(r) => r,
                    Err(StoreError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                if r.state != HostState::Pending {
                    continue;
                }
                r.state = HostState::Queued;
                r.queued_at = now;
                put_result(tx, &r)?;
                enqueue(tx, host, task)?;
                released.push(host.clone());
            }
            Ok(released)
        })
    }

    fn ack_delivery(&self, host: &str, task: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut r = get_result(tx, task, host)?;
            if r.state != HostState::Queued {
                return Ok(false);
            }
            r.state = HostState::Delivered;
            put_result(tx, &r)?;
            Ok(true)
        })
    }

    fn mark_running(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut r = get_result(tx, task, host)?;
            if !matches!(r.state, HostState::Queued | HostState::Delivered) {
                return Ok(false);
            }
            r.state = HostState::Running;
            r.started_at = Some(now);
            put_result(tx, &r)?;
            Ok(true)
        })
    }

    fn finish(&self, host: &str, task: u64, outcome: HostOutcome) -> Result<bool, StoreError> {
        if !outcome.state.is_final() {
            return Err(StoreError::Invalid(format!(
                "finishing {task}/{host} with the non-final state {:?}",
                outcome.state
            )));
        }
        self.write(|tx| finish_in(tx, host, task, outcome))
    }

    fn finish_many(&self, items: Vec<(String, u64, HostOutcome)>) -> Result<Vec<bool>, StoreError> {
        if let Some((h, t, o)) = items.iter().find(|(_, _, o)| !o.state.is_final()) {
            return Err(StoreError::Invalid(format!(
                "finishing {t}/{h} with the non-final state {:?}",
                o.state
            )));
        }
        self.write(|tx| {
            items
                .into_iter()
                .map(|(h, t, o)| finish_in(tx, &h, t, o))
                .collect()
        })
    }

    fn expire(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut r = get_result(tx, task, host)?;
            if r.state.is_final() {
                return Ok(false);
            }
            r.state = HostState::Expired;
            r.finished_at = Some(now);
            r.error = Some("the task's time to live ran out before it finished".into());
            put_result(tx, &r)?;
            dequeue(tx, host, task)?;
            close_one(tx, task)?;
            Ok(true)
        })
    }

    fn cancel_task(&self, id: u64, now: u64) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            let mut task = get_task_tx(tx, id)?;
            let mut open = Vec::new();
            {
                let t = tx.open_table(RESULTS)?;
                for item in t.range((id, "")..)? {
                    let (k, v) = item?;
                    if k.value().0 != id {
                        break;
                    }
                    let r: HostResult = decode("results", v.value())?;
                    if !r.state.is_final() {
                        open.push(r);
                    }
                }
            }
            let mut delivered = Vec::new();
            for mut r in open {
                if r.state.is_delivered() {
                    delivered.push(r.host.clone());
                }
                r.state = HostState::Cancelled;
                r.finished_at = Some(now);
                put_result(tx, &r)?;
                dequeue(tx, &r.host, id)?;
            }
            tx.open_table(OPEN)?
                .insert(id, encode("open", &0u64)?.as_slice())?;
            if task.state == TaskState::Running {
                task.state = TaskState::Cancelled;
                put_task(tx, &task)?;
            }
            Ok(delivered)
        })
    }

    fn append_audit(&self, mut entry: AuditEntry) -> Result<u64, StoreError> {
        self.write(|tx| {
            let seq = next_counter(tx, NEXT_AUDIT)?;
            entry.seq = seq;
            tx.open_table(AUDIT)?
                .insert(seq, encode("audit", &entry)?.as_slice())?;
            Ok(seq)
        })
    }

    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for item in t.iter()?.rev().take(limit) {
            let (_, v) = item?;
            out.push(decode("audit", v.value())?);
        }
        Ok(out)
    }

    fn prune_audit(&self, keep: u64) -> Result<u64, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(AUDIT)?;
            let len = t.len()?;
            if len <= keep {
                return Ok(0);
            }
            let drop = len - keep;
            // Sequence numbers only grow, so the oldest are the first keys.
            let cut = match t.iter()?.nth(usize::try_from(drop).unwrap_or(usize::MAX)) {
                Some(item) => item?.0.value(),
                None => u64::MAX,
            };
            t.retain_in(..cut, |_, _| false)?;
            Ok(drop)
        })
    }
}

#[cfg(test)]
/// The behaviour every [`Store`] must have, as functions over `&dyn Store`, run
/// against [`RedbStore`] here and against `zk::ZkStore` in `zk/store_tests.rs`.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub(crate) fn token(id: &str, one_time: bool, expires_at: Option<u64>) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_hash: [7; 32],
            scope: if one_time {
                Scope::Enroll
            } else {
                Scope::Operator
            },
            allow: vec!["10.0.0.0/8".into()],
            created_at: 1,
            expires_at,
            one_time,
            uses: 0,
            revoked: false,
            note: format!("note for {id}"),
            limits: Default::default(),
        }
    }

    pub(crate) fn host(name: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            fingerprint: "ab".repeat(32),
            addrs: vec!["10.0.0.1:7000".into()],
            tags: BTreeMap::from([("role".to_string(), "web".to_string())]),
            version: "0.1.0".into(),
            enrolled_at: 5,
            last_seen: 5,
            online: true,
            offline_since: None,
            resources: None,
        }
    }

    pub(crate) fn new_task(hosts: &[&str], batch: u32) -> NewTask {
        NewTask {
            created_by: "tok1".into(),
            target: hosts.join(","),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            body: vec![1, 2, 3],
            summary: "uptime".into(),
            ttl_ms: 60_000,
            batch,
            max_failures: None,
        }
    }

    pub(crate) fn ok(finished_at: u64) -> HostOutcome {
        HostOutcome {
            state: HostState::Ok,
            exit_code: Some(0),
            signal: None,
            stdout: b"up 3 days\n".to_vec(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
            started_at: None,
            finished_at,
        }
    }

    pub(crate) fn audit(path: &str) -> AuditEntry {
        AuditEntry {
            seq: 999,
            at: 10,
            token: "tok1".into(),
            addr: "127.0.0.1".into(),
            method: "GET".into(),
            path: path.into(),
            status: 200,
            detail: String::new(),
        }
    }

    pub(crate) fn state_of(store: &dyn Store, task: u64, host: &str) -> HostState {
        store
            .results(task)
            .unwrap()
            .into_iter()
            .find(|r| r.host == host)
            .unwrap()
            .state
    }

    /// `open` opens the same store again each time it is called.
    pub(crate) fn everything_survives_reopen(open: &dyn Fn() -> Box<dyn Store>) {
        let (t1, t2);
        {
            let s = open();
            s.put_meta("ca.key", b"secret key").unwrap();
            s.put_token(&token("tok1", false, None)).unwrap();
            s.put_token(&token("enr1", true, None)).unwrap();
            s.put_host(&host("web-1")).unwrap();
            s.put_host(&host("web-2")).unwrap();
            t1 = s
                .create_task(new_task(&["web-1", "web-2"], 0), 100)
                .unwrap();
            t2 = s.create_task(new_task(&["web-1"], 0), 101).unwrap();
            assert!(t2 > t1);
            assert_eq!(s.append_audit(audit("/a")).unwrap(), 1);
            assert_eq!(s.append_audit(audit("/b")).unwrap(), 2);
        }
        let s = open();
        assert_eq!(s.get_meta("ca.key").unwrap().unwrap(), b"secret key");
        assert_eq!(s.get_meta("missing").unwrap(), None);
        assert_eq!(
            s.get_token("tok1").unwrap().unwrap(),
            token("tok1", false, None)
        );
        let ids: Vec<_> = s.list_tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, vec!["enr1", "tok1"]);
        assert_eq!(s.get_host("web-2").unwrap().unwrap(), host("web-2"));
        assert_eq!(s.list_hosts().unwrap().len(), 2);
        let task = s.get_task(t1).unwrap().unwrap();
        assert_eq!(task.hosts, vec!["web-1", "web-2"]);
        assert_eq!(task.created_at, 100);
        assert_eq!(task.state, TaskState::Running);
        assert_eq!(s.results(t1).unwrap().len(), 2);
        let q: Vec<_> = s
            .queue_for("web-1")
            .unwrap()
            .into_iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(q, vec![t1, t2]);
        let audit_paths: Vec<_> = s
            .list_audit(10)
            .unwrap()
            .into_iter()
            .map(|a| a.path)
            .collect();
        assert_eq!(audit_paths, vec!["/b", "/a"]);
        // Counters continue after the restart.
        let t3 = s.create_task(new_task(&["web-2"], 0), 102).unwrap();
        assert!(t3 > t2);
        assert_eq!(s.append_audit(audit("/c")).unwrap(), 3);
        let q2 = s.queue_for("web-2").unwrap();
        assert!(
            q2[0].0 < q2[1].0,
            "queue seqs increase across restarts: {q2:?}"
        );
        assert_eq!(
            s.list_tasks(None, 2)
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            vec![t3, t2]
        );
    }

    /// The methods the other cases touch little: meta, replacing records, single
    /// results, open counts, bodies, finish_many, listing limits and the audit log.
    pub(crate) fn reads_bodies_and_audit(s: &dyn Store) {
        assert_eq!(s.get_meta("ca.cert").unwrap(), None);
        s.put_meta("ca.cert", b"v1").unwrap();
        s.put_meta("ca.cert", b"v2").unwrap();
        assert_eq!(s.get_meta("ca.cert").unwrap().unwrap(), b"v2");

        s.put_token(&token("b", false, None)).unwrap();
        s.put_token(&token("a", false, None)).unwrap();
        let mut a = token("a", false, None);
        a.note = "replaced".into();
        s.put_token(&a).unwrap();
        assert_eq!(s.get_token("a").unwrap().unwrap().note, "replaced");
        assert_eq!(s.get_token("zz").unwrap(), None);
        let ids: Vec<_> = s.list_tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, vec!["a", "b"]);

        let mut h = host("x");
        s.put_host(&h).unwrap();
        h.version = "0.2.0".into();
        s.put_host(&h).unwrap();
        assert_eq!(s.get_host("x").unwrap().unwrap().version, "0.2.0");
        assert_eq!(s.list_hosts().unwrap().len(), 1);

        assert!(s.list_tasks(None, 10).unwrap().is_empty());
        let t = s.create_task(new_task(&["x", "y", "z"], 2), 10).unwrap();
        assert_eq!(s.open_hosts(t).unwrap(), 3);
        assert_eq!(s.open_hosts(t + 100).unwrap(), 0);
        assert_eq!(s.result(t, "y").unwrap().unwrap().state, HostState::Queued);
        assert_eq!(s.result(t, "z").unwrap().unwrap().state, HostState::Pending);
        assert_eq!(s.result(t, "w").unwrap(), None);
        assert_eq!(s.result(t + 100, "x").unwrap(), None);
        let results = s.results(t).unwrap();
        assert_eq!(
            results.iter().map(|r| r.host.as_str()).collect::<Vec<_>>(),
            vec!["x", "y", "z"]
        );
        assert!(results.iter().all(|r| r.task == t && r.queued_at == 10));
        assert!(s.results(t + 100).unwrap().is_empty());
        assert_eq!(s.get_task(t).unwrap().unwrap().body, vec![1, 2, 3]);
        s.set_task_body(t, vec![9; 10]).unwrap();
        let rec = s.get_task(t).unwrap().unwrap();
        assert_eq!((rec.body, rec.summary.as_str()), (vec![9; 10], "uptime"));
        assert!(matches!(
            s.set_task_body(t + 100, vec![]),
            Err(StoreError::NotFound { .. })
        ));

        let done = s
            .finish_many(vec![
                ("x".into(), t, ok(11)),
                ("y".into(), t, ok(12)),
                ("x".into(), t, ok(13)),
            ])
            .unwrap();
        assert_eq!(done, vec![true, true, false]);
        assert_eq!(s.open_hosts(t).unwrap(), 1);
        assert_eq!(s.result(t, "x").unwrap().unwrap().finished_at, Some(11));
        let mut running = ok(14);
        running.state = HostState::Running;
        assert!(matches!(
            s.finish_many(vec![("z".into(), t, running)]),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(s.queue_all().unwrap(), Vec::new(), "z is still pending");

        let t2 = s.create_task(new_task(&["x"], 0), 20).unwrap();
        let t3 = s.create_task(new_task(&["y"], 0), 21).unwrap();
        assert!(t < t2 && t2 < t3);
        assert!(s.list_tasks(None, 0).unwrap().is_empty());
        let ids: Vec<_> = s
            .list_tasks(None, 2)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![t3, t2]);
        // Pages: ids below the last one seen, newest first; listings carry no body.
        let ids: Vec<_> = s
            .list_tasks(Some(t3), 5)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![t2, t]);
        assert!(s.list_tasks(Some(t), 5).unwrap().is_empty());
        let mut big = new_task(&["x"], 0);
        big.body = vec![9; 100_000];
        big.summary = "big".into();
        let t4 = s.create_task(big, 22).unwrap();
        let head = &s.list_tasks(None, 1).unwrap()[0];
        assert_eq!(
            (head.id, head.body.len(), head.summary.as_str()),
            (t4, 0, "big")
        );
        assert_eq!(head.hosts, vec!["x".to_string()]);
        assert_eq!(s.get_task(t4).unwrap().unwrap().body.len(), 100_000);
        assert_eq!(s.list_tasks(None, 100).unwrap().len(), 4);
        let all = s.queue_all().unwrap();
        assert_eq!(
            all.iter()
                .map(|(h, _, t)| (h.as_str(), *t))
                .collect::<Vec<_>>(),
            vec![("x", t2), ("x", t4), ("y", t3)]
        );

        for i in 1..=5u64 {
            let mut e = audit(&format!("/p{i}"));
            e.status = 200 + i as u16;
            assert_eq!(s.append_audit(e).unwrap(), i);
        }
        assert!(s.list_audit(0).unwrap().is_empty());
        let last = s.list_audit(3).unwrap();
        assert_eq!(
            last.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
        let mut want = audit("/p5");
        want.seq = 5;
        want.status = 205;
        assert_eq!(last[0], want);
        assert_eq!(s.list_audit(100).unwrap().len(), 5);

        // Retention keeps the newest; new entries continue the sequence.
        assert_eq!(s.prune_audit(10).unwrap(), 0);
        assert_eq!(s.prune_audit(2).unwrap(), 3);
        let seqs = |n| {
            s.list_audit(n)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(100), vec![5, 4]);
        assert!(s.append_audit(audit("/p6")).unwrap() > 5);
        assert!(s.append_audit(audit("/p7")).unwrap() > 6);
        assert_eq!(seqs(3).len(), 3, "the newest three, across the pruned gap");
        assert_eq!(s.prune_audit(1).unwrap(), 3);
        let left = s.list_audit(100).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].path, "/p7");
    }

    pub(crate) fn queue_order_per_host_across_tasks(s: &dyn Store) {
        let a = s.create_task(new_task(&["h1", "h2"], 0), 1).unwrap();
        let b = s.create_task(new_task(&["h2"], 0), 2).unwrap();
        let c = s.create_task(new_task(&["h1", "h2", "h3"], 0), 3).unwrap();
        let tasks = |h: &str| {
            s.queue_for(h)
                .unwrap()
                .into_iter()
                .map(|e| e.1)
                .collect::<Vec<_>>()
        };
        assert_eq!(tasks("h1"), vec![a, c]);
        assert_eq!(tasks("h2"), vec![a, b, c]);
        assert_eq!(tasks("h3"), vec![c]);
        assert_eq!(tasks("h4"), Vec::<u64>::new());
        // A prefix of another host's name does not leak into the range.
        s.create_task(new_task(&["h1x"], 0), 4).unwrap();
        assert_eq!(tasks("h1"), vec![a, c]);
        assert_eq!(s.queue_all().unwrap().len(), 7);
    }

    pub(crate) fn finish_dequeues_and_completes(s: &dyn Store) {
        let t = s.create_task(new_task(&["h1", "h2"], 0), 1).unwrap();
        assert!(s.ack_delivery("h1", t).unwrap());
        assert!(!s.ack_delivery("h1", t).unwrap(), "already delivered");
        assert_eq!(state_of(s, t, "h1"), HostState::Delivered);
        assert!(s.mark_running("h1", t, 5).unwrap());
        assert_eq!(state_of(s, t, "h1"), HostState::Running);
        assert_eq!(
            s.queue_for("h1").unwrap().len(),
            1,
            "running entries stay queued"
        );

        assert!(s.finish("h1", t, ok(9)).unwrap());
        assert!(s.queue_for("h1").unwrap().is_empty());
        let r = s
            .results(t)
            .unwrap()
            .into_iter()
            .find(|r| r.host == "h1")
            .unwrap();
        assert_eq!(
            (r.state, r.exit_code, r.started_at, r.finished_at),
            (HostState::Ok, Some(0), Some(5), Some(9))
        );
        assert_eq!(r.stdout, b"up 3 days\n");
        assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Running);
        // A duplicate report is ignored.
        assert!(!s.finish("h1", t, ok(10)).unwrap());

        let mut failed = ok(11);
        failed.state = HostState::Failed;
        failed.exit_code = Some(2);
        assert!(s.finish("h2", t, failed).unwrap());
        assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Done);
        assert_eq!(state_of(s, t, "h2"), HostState::Failed);

        let mut bad = ok(12);
        bad.state = HostState::Running;
        assert!(matches!(
            s.finish("h2", t, bad),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.finish("nope", t, ok(1)),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.ack_delivery("h1", 999),
            Err(StoreError::NotFound { .. })
        ));
    }

    pub(crate) fn batch_rollout_and_release(s: &dyn Store) {
        let t = s.create_task(new_task(&["a", "b", "c"], 1), 1).unwrap();
        assert_eq!(state_of(s, t, "a"), HostState::Queued);
        assert_eq!(state_of(s, t, "b"), HostState::Pending);
        assert!(s.queue_for("b").unwrap().is_empty());
        let released = s
            .release(t, &["b".into(), "a".into(), "zz".into()], 7)
            .unwrap();
        assert_eq!(released, vec!["b"]);
        assert_eq!(s.queue_for("b").unwrap().len(), 1);
        assert_eq!(s.results(t).unwrap()[1].queued_at, 7);
        for h in ["a", "b"] {
            s.finish(h, t, ok(8)).unwrap();
        }
        assert_eq!(
            s.get_task(t).unwrap().unwrap().state,
            TaskState::Running,
            "c is still pending"
        );
        s.release(t, &["c".into()], 9).unwrap();
        s.finish("c", t, ok(10)).unwrap();
        assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Done);
    }

    pub(crate) fn cancel_and_expire(s: &dyn Store) {
        let t = s
            .create_task(new_task(&["a", "b", "c", "d", "e"], 4), 1)
            .unwrap();
        let other = s.create_task(new_task(&["b"], 0), 1).unwrap();
        s.ack_delivery("b", t).unwrap();
        s.mark_running("c", t, 2).unwrap();
        s.finish("d", t, ok(3)).unwrap();
        assert!(s.expire("a", t, 4).unwrap());
        assert!(!s.expire("a", t, 5).unwrap());
        assert_eq!(state_of(s, t, "a"), HostState::Expired);
        assert!(s.queue_for("a").unwrap().is_empty());

        let delivered = s.cancel_task(t, 6).unwrap();
        assert_eq!(delivered, vec!["b", "c"]);
        let states: Vec<_> = s.results(t).unwrap().into_iter().map(|r| r.state).collect();
        use HostState::*;
        assert_eq!(states, vec![Expired, Cancelled, Cancelled, Ok, Cancelled]);
        assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Cancelled);
        assert!(s.queue_for("c").unwrap().is_empty());
        assert_eq!(
            s.queue_for("b")
                .unwrap()
                .iter()
                .map(|e| e.1)
                .collect::<Vec<_>>(),
            vec![other]
        );
        // A late report after cancel is ignored; cancelling twice is harmless.
        assert!(!s.finish("c", t, ok(7)).unwrap());
        assert!(s.cancel_task(t, 8).unwrap().is_empty());
        assert!(matches!(
            s.cancel_task(12345, 8),
            Err(StoreError::NotFound { .. })
        ));
        // Cancelling a finished task keeps it Done.
        s.finish("b", other, ok(9)).unwrap();
        s.cancel_task(other, 10).unwrap();
        assert_eq!(s.get_task(other).unwrap().unwrap().state, TaskState::Done);
    }

    pub(crate) fn task_edge_cases(s: &dyn Store) {
        let err = s.create_task(new_task(&["a", "a"], 0), 1).unwrap_err();
        assert!(err.to_string().contains("host a appears twice"), "{err}");
        let t = s.create_task(new_task(&[], 0), 1).unwrap();
        assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Done);
        assert_eq!(s.get_task(t + 1).unwrap(), None);
    }

    pub(crate) fn hosts_online_offline(s: &dyn Store) {
        s.put_host(&host("a")).unwrap();
        s.put_host(&host("b")).unwrap();
        assert_eq!(s.mark_all_offline(50).unwrap(), 2);
        assert_eq!(s.mark_all_offline(51).unwrap(), 0);
        let a = s.get_host("a").unwrap().unwrap();
        assert!(!a.online);
        assert_eq!(a.offline_since, Some(50));
        assert!(s.set_online("a", true, 60).unwrap());
        let a = s.get_host("a").unwrap().unwrap();
        assert!(a.online && a.offline_since.is_none() && a.last_seen == 60);
        assert!(s.set_online("a", false, 70).unwrap());
        assert!(s.set_online("a", false, 80).unwrap());
        assert_eq!(
            s.get_host("a").unwrap().unwrap().offline_since,
            Some(70),
            "first offline time kept"
        );
        assert!(s
            .update_heartbeat("b", 90, vec![9, 9], vec!["1.2.3.4:5".into()])
            .unwrap());
        let b = s.get_host("b").unwrap().unwrap();
        assert_eq!(
            (b.last_seen, b.online, b.resources, b.addrs),
            (90, true, Some(vec![9, 9]), vec!["1.2.3.4:5".to_string()])
        );
        assert!(!s.set_online("zz", true, 1).unwrap());
        assert!(!s.update_heartbeat("zz", 1, vec![], vec![]).unwrap());
        // Removing a host (`octo agents rm`) is real, and says whether it was there.
        assert!(s.remove_host("a").unwrap());
        assert!(!s.remove_host("a").unwrap());
        assert!(s.get_host("a").unwrap().is_none());
        assert_eq!(s.list_hosts().unwrap().len(), 1);
    }

    pub(crate) fn tokens_consume_revoke_expire(s: &dyn Store) {
        s.put_token(&token("once", true, None)).unwrap();
        s.put_token(&token("many", false, Some(100))).unwrap();
        assert_eq!(s.consume_token("once", 1).unwrap().uses, 1);
        assert!(matches!(
            s.consume_token("once", 2),
            Err(TokenUseError::AlreadyUsed(_))
        ));
        assert_eq!(
            s.get_token("once").unwrap().unwrap().uses,
            1,
            "refusal does not count"
        );
        assert_eq!(s.consume_token("many", 99).unwrap().uses, 1);
        assert_eq!(s.consume_token("many", 99).unwrap().uses, 2);
        let err = s.consume_token("many", 100).unwrap_err();
        assert!(matches!(err, TokenUseError::Expired(_)));
        assert_eq!(err.to_string(), "token many has expired");
        assert!(matches!(
            s.consume_token("ghost", 1),
            Err(TokenUseError::Unknown(_))
        ));
        assert!(s.revoke_token("many").unwrap());
        assert!(!s.revoke_token("ghost").unwrap());
        assert!(s.get_token("many").unwrap().unwrap().revoked);
        assert!(matches!(
            s.consume_token("many", 1),
            Err(TokenUseError::Revoked(_))
        ));
    }

    pub(crate) fn one_time_token_race(s: std::sync::Arc<dyn Store>) {
        s.put_token(&token("once", true, None)).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.consume_token("once", 1).is_ok())
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::conformance::{self, audit, host, new_task, ok, token};
    use super::*;

    fn redb() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("db")).unwrap();
        (dir, s)
    }

    macro_rules! conformance_on_redb {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    let (_dir, s) = redb();
                    conformance::$name(&s);
                }
            )*
        };
    }

    conformance_on_redb!(
        reads_bodies_and_audit,
        queue_order_per_host_across_tasks,
        finish_dequeues_and_completes,
        batch_rollout_and_release,
        cancel_and_expire,
        task_edge_cases,
        hosts_online_offline,
        tokens_consume_revoke_expire,
    );

    #[test]
    fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("center.redb");
        conformance::everything_survives_reopen(&|| Box::new(RedbStore::open(&path).unwrap()));
    }

    #[test]
    fn one_time_token_race() {
        let (_dir, s) = redb();
        conformance::one_time_token_race(std::sync::Arc::new(s));
    }

    #[test]
    fn scope_allows_and_parses() {
        use Scope::*;
        let all = [Admin, Operator, Read, Enroll];
        let allowed = |s: Scope| {
            all.iter()
                .copied()
                .filter(|n| s.allows(*n))
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(Admin), vec![Admin, Operator, Read]);
        assert_eq!(allowed(Operator), vec![Operator, Read]);
        assert_eq!(allowed(Read), vec![Read]);
        assert_eq!(allowed(Enroll), vec![Enroll]);
        for s in all {
            assert_eq!(s.to_string().parse::<Scope>().unwrap(), s);
        }
        let err = "root".parse::<Scope>().unwrap_err();
        assert!(err.to_string().contains("\"root\""), "{err}");
        assert_eq!(serde_json::to_string(&Operator).unwrap(), "\"operator\"");
        assert_eq!(
            serde_json::to_string(&HostState::TimedOut).unwrap(),
            "\"timed_out\""
        );
    }

    #[test]
    fn host_state_finality() {
        use HostState::*;
        for s in [Pending, Queued, Delivered, Running] {
            assert!(!s.is_final(), "{s:?}");
        }
        for s in [Ok, Failed, TimedOut, Expired, Cancelled, Lost] {
            assert!(s.is_final(), "{s:?}");
        }
    }

    #[test]
    fn records_roundtrip_postcard_and_json() {
        let t = token("a", true, Some(3));
        let h = host("web-1");
        let a = audit("/x");
        assert_eq!(
            postcard::from_bytes::<TokenRecord>(&postcard::to_allocvec(&t).unwrap()).unwrap(),
            t
        );
        assert_eq!(
            postcard::from_bytes::<HostRecord>(&postcard::to_allocvec(&h).unwrap()).unwrap(),
            h
        );
        assert_eq!(
            serde_json::from_str::<TokenRecord>(&serde_json::to_string(&t).unwrap()).unwrap(),
            t
        );
        assert_eq!(
            serde_json::from_str::<HostRecord>(&serde_json::to_string(&h).unwrap()).unwrap(),
            h
        );
        assert_eq!(
            serde_json::from_str::<AuditEntry>(&serde_json::to_string(&a).unwrap()).unwrap(),
            a
        );
    }

    #[test]
    fn corrupt_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // The file itself, to write raw values under the store.
        let s = RedbFile::new(Database::create(&path).unwrap()).unwrap();
        s.put_host(&host("good")).unwrap();
        let t = s.create_task(new_task(&["h"], 0), 1).unwrap();
        {
            let tx = s.db.begin_write().unwrap();
            tx.open_table(HOSTS)
                .unwrap()
                .insert("bad", &[0xff_u8; 3][..])
                .unwrap();
            tx.open_table(TOKENS)
                .unwrap()
                .insert("bad", &[][..])
                .unwrap();
            tx.open_table(TASKS)
                .unwrap()
                .insert(t, &[0x80_u8][..])
                .unwrap();
            tx.open_table(QUEUE)
                .unwrap()
                .insert(("h", 0), &[0xff_u8; 11][..])
                .unwrap();
            tx.open_table(COUNTERS)
                .unwrap()
                .insert(NEXT_AUDIT, &[0xff_u8][..])
                .unwrap();
            tx.open_table(RESULTS)
                .unwrap()
                .insert((t, "h"), &[1_u8, 2][..])
                .unwrap();
            tx.commit().unwrap();
        }
        let is_decode = |e: &StoreError| matches!(e, StoreError::Decode { .. });
        assert!(is_decode(&s.list_hosts().unwrap_err()));
        assert!(
            s.get_host("good").unwrap().is_some(),
            "other rows are still readable"
        );
        assert!(is_decode(&s.get_host("bad").unwrap_err()));
        assert!(is_decode(&s.set_online("bad", true, 1).unwrap_err()));
        assert!(is_decode(&s.get_token("bad").unwrap_err()));
        assert!(matches!(
            s.consume_token("bad", 1),
            Err(TokenUseError::Store(StoreError::Decode { .. }))
        ));
        assert!(is_decode(&s.get_task(t).unwrap_err()));
        assert!(is_decode(&s.list_tasks(None, 5).unwrap_err()));
        assert!(is_decode(&s.queue_for("h").unwrap_err()));
        assert!(is_decode(&s.append_audit(audit("/x")).unwrap_err()));
        assert!(is_decode(&s.results(t).unwrap_err()));
        assert!(is_decode(&s.finish("h", t, ok(1)).unwrap_err()));
        let err = s.cancel_task(t, 1).unwrap_err();
        assert!(err.to_string().contains("table tasks"), "{err}");
    }
}
