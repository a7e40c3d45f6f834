//! [`RedbStore`]: the embedded [`Store`] as the center uses it, one redb file that
//! survives a full disk.
//!
//! Why a wrapper around [`RedbFile`] (which holds the tables and transactions):
//!
//! * **A reserve.** Before every mutation, the free space of the file's filesystem is
//!   checked; below the reserve the write is refused with [`StoreError::DiskFull`]
//!   (507 at the API) and nothing is written, so the store never fills the disk and
//!   reads keep working.
//! * **Reopening after an I/O error.** redb marks a database failed after any I/O
//!   error (a write that hit ENOSPC, say) and answers `PreviousIo` to every later
//!   read and write. Here any such error drops the database and opens the file again
//!   (redb repairs it from its last commit), at once or, if that fails too (the disk
//!   is still full), at the next call. No restart is needed once space is free.
//!
//! Every call holds a read lock on the open database for its duration; a reopen takes
//! the write lock, so no transaction is alive while the file is closed and reopened.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use redb::Database;

use crate::store::{
    AuditEntry, HostOutcome, HostRecord, HostResult, NewTask, RedbFile, Store, StoreError,
    TaskRecord, TokenRecord, TokenUseError,
};

type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// redb's page cache (its default, 1 GiB, made a center with big tasks 1 GiB in RSS).
const CACHE_BYTES: usize = 128 << 20;

/// The [`Store`] on one redb file, with a disk reserve and reopen-after-error.
pub struct RedbStore {
    /// Whose filesystem's free space is checked.
    dir: PathBuf,
    open: Opener,
    reserve: u64,
    db: RwLock<Option<RedbFile>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("dir", &self.dir)
            .field("reserve", &self.reserve)
            .finish_non_exhaustive()
    }
}

/// Whether a failure means the database must be reopened.
trait Failure {
    fn is_io(&self) -> bool;
}

impl Failure for StoreError {
    fn is_io(&self) -> bool {
        StoreError::is_io(self)
    }
}

impl Failure for TokenUseError {
    fn is_io(&self) -> bool {
        matches!(self, TokenUseError::Store(e) if e.is_io())
    }
}

impl RedbStore {
    /// Opens the store at `path` (creating the file, not its directory) with no
    /// reserve.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_reserve(path, 0)
    }

    /// Opens the store at `path`; mutations are refused while the filesystem has
    /// less than `reserve` bytes free.
    pub fn open_with_reserve(path: &Path, reserve: u64) -> Result<RedbStore, StoreError> {
        let p = path.to_path_buf();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        RedbStore::with_opener(
            dir,
            reserve,
            Box::new(move || redb::Builder::new().set_cache_size(CACHE_BYTES).create(&p)),
        )
    }

    fn with_opener(dir: PathBuf, reserve: u64, open: Opener) -> Result<RedbStore, StoreError> {
        let file = RedbFile::new(open()?)?;
        Ok(RedbStore {
            dir,
            open,
            reserve,
            db: RwLock::new(Some(file)),
        })
    }

    /// The open database, reopened first if an earlier error closed it.
    fn current(&self) -> Result<RwLockReadGuard<'_, Option<RedbFile>>, StoreError> {
        {
            let g = self.db.read().unwrap_or_else(|e| e.into_inner());
            if g.is_some() {
                return Ok(g);
            }
        }
        self.reopen()?;
        Ok(self.db.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Closes the database and opens the file again (redb repairs it from its last
    /// commit). On failure the store stays closed and the next call tries again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Drop the failed database first: it holds the file's lock.
        *g = None;
        let file = RedbFile::new((self.open)()?)?;
        *g = Some(file);
        tracing::warn!(dir = %self.dir.display(), "reopened the store after an I/O error");
        Ok(())
    }

    fn check_room(&self) -> Result<(), StoreError> {
        if self.reserve == 0 {
            return Ok(());
        }
        match crate::caps::free_bytes(&self.dir) {
            Ok(free) if free < self.reserve => Err(StoreError::DiskFull {
                free,
                reserve: self.reserve,
            }),
            // Not knowing the free space is no reason to refuse a write.
            _ => Ok(()),
        }
    }

    fn call<T, E: From<StoreError> + Failure>(
        &self,
        write: bool,
        f: impl FnOnce(&RedbFile) -> Result<T, E>,
    ) -> Result<T, E> {
        if write {
            self.check_room()?;
        }
        let out = {
            let g = self.current()?;
            f(g.as_ref().expect("current() returns an open database"))
        };
        if let Err(e) = &out {
            if e.is_io() {
                tracing::warn!("the store failed with an I/O error; reopening it");
                if let Err(e) = self.reopen() {
                    tracing::warn!("reopening the store: {e} (will retry at the next call)");
                }
            }
        }
        out
    }
}

/// Each [`Store`] method, passed to the open [`RedbFile`]: `w` marks mutations (which
/// the reserve guards), `r` reads.
macro_rules! delegate {
    ($($rw:ident fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Store for RedbStore {
            $(fn $name(&self $(, $arg: $ty)*) -> $ret {
                self.call(delegate!(@w $rw), move |db| db.$name($($arg),*))
            })*
        }
    };
    (@w w) => { true };
    (@w r) => { false };
}

delegate! {
    r fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    w fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    w fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    r fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    r fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    w fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;
    w fn consume_token(&self, id: &str, now: u64) -> Result<TokenRecord, TokenUseError>;
    w fn put_host(&self, host: &HostRecord) -> Result<(), StoreError>;
    r fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError>;
    r fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    w fn remove_host(&self, name: &str) -> Result<bool, StoreError>;
    w fn set_online(&self, name: &str, online: bool, now: u64) -> Result<bool, StoreError>;
    w fn update_heartbeat(&self, name: &str, now: u64, resources: Vec<u8>, addrs: Vec<String>) -> Result<bool, StoreError>;
    w fn mark_all_offline(&self, now: u64) -> Result<usize, StoreError>;
    w fn create_task(&self, task: NewTask, now: u64) -> Result<u64, StoreError>;
    r fn get_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError>;
    w fn set_task_body(&self, id: u64, body: Vec<u8>) -> Result<(), StoreError>;
    r fn list_tasks(&self, before: Option<u64>, limit: usize) -> Result<Vec<TaskRecord>, StoreError>;
    r fn results(&self, task: u64) -> Result<Vec<HostResult>, StoreError>;
    r fn result(&self, task: u64, host: &str) -> Result<Option<HostResult>, StoreError>;
    r fn open_hosts(&self, task: u64) -> Result<u64, StoreError>;
    r fn queue_for(&self, host: &str) -> Result<Vec<(u64, u64)>, StoreError>;
    r fn queue_all(&self) -> Result<Vec<(String, u64, u64)>, StoreError>;
    w fn release(&self, task: u64, hosts: &[String], now: u64) -> Result<Vec<String>, StoreError>;
    w fn ack_delivery(&self, host: &str, task: u64) -> Result<bool, StoreError>;
    w fn mark_running(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError>;
    w fn finish(&self, host: &str, task: u64, outcome: HostOutcome) -> Result<bool, StoreError>;
    w fn finish_many(&self, items: Vec<(String, u64, HostOutcome)>) -> Result<Vec<bool>, StoreError>;
    w fn expire(&self, host: &str, task: u64, now: u64) -> Result<bool, StoreError>;
    w fn cancel_task(&self, id: u64, now: u64) -> Result<Vec<String>, StoreError>;
    w fn append_audit(&self, entry: AuditEntry) -> Result<u64, StoreError>;
    r fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    // Retention frees space: it runs even below the reserve.
    r fn prune_audit(&self, keep: u64) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A file backend whose writes fail with ENOSPC while `full` is set.
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        full: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    fn flaky_store(dir: &Path, full: Arc<AtomicBool>) -> RedbStore {
        let path = dir.join("center.redb");
        let open: Opener = Box::new(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            let file = redb::backends::FileBackend::new(f)?;
            redb::Builder::new().create_with_backend(Flaky {
                file,
                full: full.clone(),
            })
        });
        RedbStore::with_opener(dir.to_path_buf(), 0, open).unwrap()
    }

    #[test]
    fn a_full_disk_is_survived_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let s = flaky_store(dir.path(), full.clone());
        s.put_meta("a", b"1").unwrap();
        full.store(true, Ordering::SeqCst);
        let e = s.put_meta("b", &[7; 100_000]).unwrap_err();
        assert!(e.is_disk_full(), "{e}");
        // Space comes back: reads and writes work again, on the same store.
        full.store(false, Ordering::SeqCst);
        assert_eq!(s.get_meta("a").unwrap().as_deref(), Some(&b"1"[..]));
        s.put_meta("b", b"2").unwrap();
        assert_eq!(s.get_meta("b").unwrap().as_deref(), Some(&b"2"[..]));
        drop(s);
        let s = RedbStore::open(&dir.path().join("center.redb")).unwrap();
        assert_eq!(s.get_meta("b").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn the_reserve_refuses_writes_and_keeps_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("center.redb");
        RedbStore::open(&path).unwrap().put_meta("a", b"1").unwrap();
        let s = RedbStore::open_with_reserve(&path, u64::MAX).unwrap();
        let e = s.put_meta("b", b"2").unwrap_err();
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
        assert!(e.is_disk_full());
        assert_eq!(s.get_meta("a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(s.get_meta("b").unwrap(), None);
    }
}
