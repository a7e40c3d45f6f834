//! The agent's content cache: verified files kept on the host, keyed by their MD5.
//!
//! Why it is shaped like this:
//!
//! - **A hard quota with LRU eviction.** Disks filling up is the most common complaint
//!   against Kraken's agents: a cache that only grows eventually takes the host's disk
//!   with it. So the cache never holds more than `quota` bytes of objects. Making room
//!   evicts the least recently used entries first, and an insert that cannot fit even
//!   after evicting everything evictable fails with [`CacheError::Full`] instead of
//!   overshooting.
//! - **Pins.** An entry that a transfer is serving to peers must not vanish under it, so
//!   pinned entries (counted pins, in memory only) are never evicted.
//! - **Content addressed by MD5.** The key is the whole-file MD5 that the fetch path has
//!   already verified, so copying the same release twice (to another destination, or
//!   again after a rollback) is a cache hit and is not fetched again. The cache hashes
//!   nothing itself; callers pass the MD5. Keys are checked to be exactly 32 lowercase
//!   hex characters everywhere, which also keeps them from naming paths outside the
//!   cache (`../x`).
//! - **Survives restarts.** Objects live at `dir/objects/<md5[0..2]>/<md5>` and the LRU
//!   order in `dir/index.json`, written atomically (temporary file, then rename). The
//!   index is only a hint: on open, files in `objects/` that it does not know are
//!   adopted (last used = their mtime), entries whose file is gone are dropped, and a
//!   missing or corrupt index is rebuilt from the files. Files whose names are not MD5s
//!   are left alone (neither adopted nor deleted).
//! - **Staging on the same file system.** Partial downloads go to
//!   [`ContentCache::staging_dir`], inside the cache directory, so that
//!   [`ContentCache::insert`] is a rename, never a copy. Staged bytes count against the
//!   quota only once inserted; leftovers from a previous run are deleted on open, since
//!   no download survives a restart of its agent.
//!
//! One process owns a cache directory at a time; within it, all methods take `&self`
//! and are thread-safe.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Name of the index file inside the cache directory.
const INDEX: &str = "index.json";
/// Temporary name the index is written under before being renamed over [`INDEX`].
const INDEX_TMP: &str = "index.json.tmp";
const OBJECTS: &str = "objects";
const STAGING: &str = "staging";
const INDEX_VERSION: u32 = 1;
/// LRU touches (from `get`) rewrite the index at most this often; the rest is flushed
/// by the next insert/remove or on drop.
const TOUCH_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Everything that can go wrong, one variant per stage.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("bad cache key {key:?}: want exactly 32 lowercase hex characters")]
    BadKey { key: String },
    #[error("creating cache directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading cache index {path}: {source}")]
    ReadIndex {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scanning cache objects in {path}: {source}")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("clearing cache staging directory {path}: {source}")]
    ClearStaging {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing cache index {path}: {source}")]
    WriteIndex {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inspecting file to insert {path}: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("file to insert {path} is not a regular file")]
    SourceNotFile { path: PathBuf },
    #[error(
        "cache full: {md5} needs {need} bytes, quota {quota}, used {used} of which {pinned} pinned"
    )]
    Full {
        md5: String,
        need: u64,
        quota: u64,
        used: u64,
        pinned: u64,
    },
    #[error("evicting cache object {path}: {source}")]
    Evict {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("moving {from} into the cache at {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cache entry {md5} is pinned by a transfer")]
    Pinned { md5: String },
    #[error("removing cache object {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A quota-bounded, LRU-evicting, MD5-addressed store of verified files.
#[derive(Debug)]
pub struct ContentCache {
    dir: PathBuf,
    quota: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_used_ms: u64,
    /// Recency order: larger is more recent. Unique; not persisted (the index is
    /// written in this order instead).
    tick: u64,
    pins: u32,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    used: u64,
    next_tick: u64,
    /// Touches not yet written to the index.
    dirty: bool,
    last_write: Option<Instant>,
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    /// Least recently used first.
    entries: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
struct IndexEntry {
    md5: String,
    last_used_ms: u64,
}

/// Exactly 32 lowercase hex characters.
fn valid_key(md5: &str) -> bool {
    md5.len() == 32 && md5.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_key(md5: &str) -> Result<(), CacheError> {
    if valid_key(md5) {
        Ok(())
    } else {
        Err(CacheError::BadKey {
            key: md5.to_string(),
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn object_path(dir: &Path, md5: &str) -> PathBuf {
    dir.join(OBJECTS).join(&md5[..2]).join(md5)
}

/// Removes a file; one that is already gone counts as removed.
fn remove_file_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Inner {
    fn touch(&mut self, md5: &str) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(md5) {
            e.tick = tick;
            e.last_used_ms = now_ms();
            self.next_tick += 1;
            self.dirty = true;
        }
    }

    fn add(&mut self, md5: String, size: u64, last_used_ms: u64) {
        let tick = self.next_tick;
        self.next_tick += 1;
        self.used += size;
        self.entries.insert(
            md5,
            Entry {
                size,
                last_used_ms,
                tick,
                pins: 0,
            },
        );
    }

    fn drop_entry(&mut self, md5: &str) -> Option<Entry> {
        let e = self.entries.remove(md5)?;
        self.used = self.used.saturating_sub(e.size);
        self.dirty = true;
        Some(e)
    }

    fn pinned_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.pins > 0)
            .map(|e| e.size)
            .sum()
    }

    /// Unpinned entries, least recently used first.
    fn eviction_order(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(&String, &Entry)> =
            self.entries.iter().filter(|(_, e)| e.pins == 0).collect();
        v.sort_by_key(|(_, e)| e.tick);
        v.into_iter().map(|(k, e)| (k.clone(), e.size)).collect()
    }
}

impl ContentCache {
    /// Opens (creating) a cache rooted at `dir` with a quota in bytes. Rebuilds its
    /// index from the files present if the index is missing or corrupt, deletes
    /// leftovers in the staging directory, and evicts least recently used entries if
    /// the objects present exceed `quota` (e.g. after the quota was lowered).
    pub fn open(dir: &Path, quota: u64) -> Result<ContentCache, CacheError> {
        let objects = dir.join(OBJECTS);
        let staging = dir.join(STAGING);
        // Private: a copy made with --mode 0600 must not be readable here either.
        for d in [dir, &objects, &staging] {
            octopus_transfer::safefs::ensure_private_dir(d).map_err(|source| {
                CacheError::CreateDir {
                    path: d.to_path_buf(),
                    source,
                }
            })?;
        }
        clear_dir(&staging).map_err(|source| CacheError::ClearStaging {
            path: staging.clone(),
            source,
        })?;

        // What the index remembers: md5 -> (last used, position in LRU order).
        let index_path = dir.join(INDEX);
        let remembered: HashMap<String, (u64, usize)> = match std::fs::read(&index_path) {
            Ok(bytes) => match serde_json::from_slice::<IndexFile>(&bytes) {
                Ok(idx) if idx.version == INDEX_VERSION => idx
                    .entries
                    .into_iter()
                    .enumerate()
                    .filter(|(_, e)| valid_key(&e.md5))
                    .map(|(i, e)| (e.md5, (e.last_used_ms, i)))
                    .collect(),
                Ok(idx) => {
                    tracing::warn!(
                        path = %index_path.display(),
                        version = idx.version,
                        "cache index has an unknown version; rebuilding from objects"
                    );
                    HashMap::new()
                }
                Err(e) => {
                    tracing::warn!(
                        path = %index_path.display(),
                        error = %e,
                        "cache index is corrupt; rebuilding from objects"
                    );
                    HashMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(source) => {
                return Err(CacheError::ReadIndex {
                    path: index_path,
                    source,
                })
            }
        };

        // What is actually there. Sizes always come from the files.
        let found = scan_objects(&objects).map_err(|source| CacheError::Scan {
            path: objects.clone(),
            source,
        })?;
        let n = remembered.len();
        let mut all: Vec<(u64, usize, String, u64)> = found
            .into_iter()
            .enumerate()
            .map(|(i, (md5, size, mtime))| match remembered.get(&md5) {
                Some(&(last_used, pos)) => (last_used, pos, md5, size),
                None => (mtime, n + i, md5, size),
            })
            .collect();
        all.sort();

        let mut inner = Inner::default();
        for (last_used, _, md5, size) in all {
            inner.add(md5, size, last_used);
        }
        let cache = ContentCache {
            dir: dir.to_path_buf(),
            quota,
            inner: Mutex::new(inner),
        };
        {
            let mut inner = cache.lock();
            if inner.used > quota {
                let over = inner.used - quota;
                cache.evict(&mut inner, over)?;
            }
            cache.write_index(&mut inner)?;
        }
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent-enough state
        // (every mutation is a few field updates); carry on rather than panic too.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Path where content `md5` (32 lowercase hex) lives if present; marks it used
    /// (LRU touch). An entry whose file has disappeared from under the cache is
    /// forgotten and `None` returned.
    pub fn get(&self, md5: &str) -> Option<PathBuf> {
        if !valid_key(md5) {
            return None;
        }
        let mut inner = self.lock();
        if !inner.entries.contains_key(md5) {
            return None;
        }
        let path = object_path(&self.dir, md5);
        if !path.is_file() {
            tracing::warn!(md5, path = %path.display(), "cache object vanished; forgetting it");
            inner.drop_entry(md5);
            self.write_index_best_effort(&mut inner);
            return None;
        }
        inner.touch(md5);
        let due = inner
            .last_write
            .is_none_or(|t| t.elapsed() >= TOUCH_WRITE_INTERVAL);
        if due {
            self.write_index_best_effort(&mut inner);
        }
        Some(path)
    }

    /// Reserves room for the file at `src`, evicting least recently used entries that
    /// are not pinned, then moves (renames) that already-verified file into the cache
    /// under `md5` and returns its final path. `src` must be on the same file system as
    /// the cache: put it in [`ContentCache::staging_dir`].
    ///
    /// If even evicting everything evictable would not make room (including a file
    /// bigger than the quota), returns [`CacheError::Full`] without evicting anything
    /// and leaves `src` where it is. If `md5` is already cached, this is a hit: `src`
    /// is deleted (it is the same content), the entry is touched, and its path
    /// returned.
    pub fn insert(&self, md5: &str, src: &Path) -> Result<PathBuf, CacheError> {
        check_key(md5)?;
        let meta = std::fs::metadata(src).map_err(|source| CacheError::Source {
            path: src.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(CacheError::SourceNotFile {
                path: src.to_path_buf(),
            });
        }
        let size = meta.len();
        let dest = object_path(&self.dir, md5);
        // Objects are 0600 whatever mode the copy asked for: the cache is not the
        // destination.
        octopus_transfer::safefs::make_private_file(src).map_err(|source| CacheError::Source {
            path: src.to_path_buf(),
            source,
        })?;
        let mut inner = self.lock();

        if inner.entries.contains_key(md5) && dest.is_file() {
            if let Err(e) = remove_file_if_present(src) {
                tracing::warn!(path = %src.display(), error = %e, "could not delete duplicate of a cached object");
            }
            inner.touch(md5);
            self.write_index_best_effort(&mut inner);
            return Ok(dest);
        }
        // Known but missing on disk: forget it and insert afresh.
        inner.drop_entry(md5);

        // Everything but the pinned bytes can be evicted, so it fits iff it fits next
        // to them; checked before evicting anything.
        let pinned = inner.pinned_bytes();
        if pinned.saturating_add(size) > self.quota {
            return Err(CacheError::Full {
                md5: md5.to_string(),
                need: size,
                quota: self.quota,
                used: inner.used,
                pinned,
            });
        }
        let need = (inner.used + size).saturating_sub(self.quota);
        self.evict(&mut inner, need)?;

        if let Some(parent) = dest.parent() {
            octopus_transfer::safefs::ensure_private_dir(parent).map_err(|source| {
                CacheError::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                }
            })?;
        }
        std::fs::rename(src, &dest).map_err(|source| CacheError::Rename {
            from: src.to_path_buf(),
            to: dest.clone(),
            source,
        })?;
        inner.add(md5.to_string(), size, now_ms());
        inner.dirty = true;
        self.write_index_best_effort(&mut inner);
        Ok(dest)
    }

    /// Evicts unpinned entries, least recently used first, until at least `need` bytes
    /// are freed (or nothing evictable is left).
    fn evict(&self, inner: &mut Inner, need: u64) -> Result<(), CacheError> {
        let mut freed = 0u64;
        for (md5, size) in inner.eviction_order() {
            if freed >= need {
                break;
            }
            let path = object_path(&self.dir, &md5);
            remove_file_if_present(&path).map_err(|source| CacheError::Evict {
                path: path.clone(),
                source,
            })?;
            inner.drop_entry(&md5);
            freed += size;
            tracing::debug!(md5, size, "evicted from cache");
        }
        Ok(())
    }

    /// A directory inside the cache directory for staging partial downloads: on the
    /// same file system, so [`ContentCache::insert`] can rename. Files here do **not**
    /// count against the quota until inserted (callers should check free space for
    /// what they stage); whatever is left here is deleted the next time the cache is
    /// opened.
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join(STAGING)
    }

    /// Pins `md5` so it is never evicted (a transfer is serving it). Pins are counted:
    /// each `pin` needs its own `unpin`. Returns false (and pins nothing) if the entry
    /// is not cached or the key is bad.
    pub fn pin(&self, md5: &str) -> bool {
        if !valid_key(md5) {
            return false;
        }
        let mut inner = self.lock();
        match inner.entries.get_mut(md5) {
            Some(e) => {
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    /// Drops one pin of `md5`; does nothing if it has none.
    pub fn unpin(&self, md5: &str) {
        if !valid_key(md5) {
            return;
        }
        if let Some(e) = self.lock().entries.get_mut(md5) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Deletes `md5` from the cache. Returns whether it was there; refuses
    /// ([`CacheError::Pinned`]) while it is pinned.
    pub fn remove(&self, md5: &str) -> Result<bool, CacheError> {
        check_key(md5)?;
        let mut inner = self.lock();
        match inner.entries.get(md5) {
            None => return Ok(false),
            Some(e) if e.pins > 0 => {
                return Err(CacheError::Pinned {
                    md5: md5.to_string(),
                })
            }
            Some(_) => {}
        }
        let path = object_path(&self.dir, md5);
        remove_file_if_present(&path).map_err(|source| CacheError::Remove {
            path: path.clone(),
            source,
        })?;
        inner.drop_entry(md5);
        self.write_index_best_effort(&mut inner);
        Ok(true)
    }

    /// Bytes of cached objects (staging not included).
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Number of cached objects.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no object is cached.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// Entries, most recently used first: (md5, size, last_used unix ms).
    pub fn entries(&self) -> Vec<(String, u64, u64)> {
        let inner = self.lock();
        let mut v: Vec<(&String, &Entry)> = inner.entries.iter().collect();
        v.sort_by_key(|(_, e)| std::cmp::Reverse(e.tick));
        v.into_iter()
            .map(|(k, e)| (k.clone(), e.size, e.last_used_ms))
            .collect()
    }

    /// Writes the index atomically: a temporary file, synced, renamed over the index.
    fn write_index(&self, inner: &mut Inner) -> Result<(), CacheError> {
        let mut v: Vec<(&String, &Entry)> = inner.entries.iter().collect();
        v.sort_by_key(|(_, e)| e.tick);
        let idx = IndexFile {
            version: INDEX_VERSION,
            entries: v
                .into_iter()
                .map(|(k, e)| IndexEntry {
                    md5: k.clone(),
                    last_used_ms: e.last_used_ms,
                })
                .collect(),
        };
        let path = self.dir.join(INDEX);
        let tmp = self.dir.join(INDEX_TMP);
        let write = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec(&idx).map_err(std::io::Error::other)?;
            let mut f = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tmp)?
            };
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| CacheError::WriteIndex {
            path: path.clone(),
            source,
        })?;
        inner.dirty = false;
        inner.last_write = Some(Instant::now());
        Ok(())
    }

    /// After open, the index is a hint (a stale one is repaired on the next open), so a
    /// failure to write it does not fail the operation that changed it.
    fn write_index_best_effort(&self, inner: &mut Inner) {
        if let Err(e) = self.write_index(inner) {
            tracing::warn!(error = %e, "could not write cache index");
        }
    }
}

impl Drop for ContentCache {
    fn drop(&mut self) {
        let mut inner = std::mem::take(self.inner.get_mut().unwrap_or_else(|e| e.into_inner()));
        if inner.dirty {
            self.write_index_best_effort(&mut inner);
        }
    }
}

/// Deletes everything inside `dir` (not `dir` itself).
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        let path = ent.path();
        if ent.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            remove_file_if_present(&path)?;
        }
    }
    Ok(())
}

/// The objects present: (md5, size, mtime ms) for every regular file at
/// `objects/<md5[0..2]>/<md5>` with a valid name. Anything else is ignored.
fn scan_objects(objects: &Path) -> std::io::Result<Vec<(String, u64, u64)>> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(objects)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        let shard_name = shard.file_name();
        let Some(prefix) = shard_name.to_str() else {
            continue;
        };
        // Caches written before objects were private are tightened as they are found.
        octopus_transfer::safefs::ensure_private_dir(&shard.path())?;
        for ent in std::fs::read_dir(shard.path())? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(md5) = name.to_str() else { continue };
            if !valid_key(md5) || !md5.starts_with(prefix) || prefix.len() != 2 {
                continue;
            }
            // DirEntry::metadata does not follow symlinks: a symlink is not an object.
            let meta = ent.metadata()?;
            if !meta.is_file() {
                continue;
            }
            octopus_transfer::safefs::make_private_file(&ent.path())?;
            found.push((md5.to_string(), meta.len(), mtime_ms(&meta)));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> String {
        format!("{n:032x}")
    }

    /// Stages `len` bytes of `fill` in the cache's staging dir and returns its path.
    fn stage(c: &ContentCache, name: &str, len: usize, fill: u8) -> PathBuf {
        let p = c.staging_dir().join(name);
        std::fs::write(&p, vec![fill; len]).unwrap();
        p
    }

    fn put(c: &ContentCache, n: u32, len: usize) -> PathBuf {
        let src = stage(c, &format!("s{n}"), len, n as u8);
        c.insert(&key(n), &src).unwrap()
    }

    fn order(c: &ContentCache) -> Vec<String> {
        c.entries().into_iter().map(|(k, _, _)| k).collect()
    }

    #[test]
    fn insert_then_get() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 100).unwrap();
        assert!(c.is_empty());
        let src = stage(&c, "a", 10, 7);
        let p = c.insert(&key(1), &src).unwrap();
        assert!(!src.exists(), "insert moves the file");
        assert_eq!(p, d.path().join("objects/00").join(key(1)));
        assert_eq!(c.get(&key(1)).unwrap(), p);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 10]);
        assert_eq!((c.len(), c.used(), c.quota()), (1, 10, 100));
        assert!(c.get(&key(2)).is_none());

        // The same content again is a hit: nothing added, the duplicate is consumed.
        let again = stage(&c, "b", 10, 7);
        assert_eq!(c.insert(&key(1), &again).unwrap(), p);
        assert!(!again.exists());
        assert_eq!((c.len(), c.used()), (1, 10));
    }

    #[test]
    fn lru_eviction_respects_get() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 30).unwrap();
        put(&c, 1, 10);
        put(&c, 2, 10);
        put(&c, 3, 10);
        assert!(c.get(&key(1)).is_some()); // now 2 is the least recently used
        put(&c, 4, 10);
        assert!(c.get(&key(2)).is_none());
        assert!(!object_path(d.path(), &key(2)).exists());
        assert_eq!(order(&c), vec![key(4), key(1), key(3)]);
        assert_eq!(c.used(), 30);

        // A bigger one evicts as many as needed, oldest first: 3 then 1.
        put(&c, 5, 20);
        assert_eq!(order(&c), vec![key(5), key(4)]);
        assert_eq!(c.used(), 30);
    }

    #[test]
    fn pinned_entries_survive_eviction() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 20).unwrap();
        put(&c, 1, 10);
        put(&c, 2, 10);
        assert!(c.pin(&key(1)));
        assert!(c.pin(&key(1))); // counted
        assert!(!c.pin(&key(9)), "cannot pin what is not cached");
        put(&c, 3, 10); // evicts 2, the oldest unpinned
        assert_eq!(order(&c), vec![key(3), key(1)]);

        assert!(c.pin(&key(3)));
        let src = stage(&c, "d", 10, 4);
        match c.insert(&key(4), &src) {
            Err(CacheError::Full {
                need,
                quota,
                used,
                pinned,
                ..
            }) => assert_eq!((need, quota, used, pinned), (10, 20, 20, 20)),
            other => panic!("expected Full, got {other:?}"),
        }
        assert!(src.exists(), "a refused insert leaves the source in place");
        assert_eq!(c.len(), 2);

        c.unpin(&key(1));
        assert!(c.insert(&key(4), &src).is_err(), "still pinned once");
        c.unpin(&key(1));
        c.insert(&key(4), &src).unwrap(); // 1 is evictable now
        assert_eq!(order(&c), vec![key(4), key(3)]);
        c.unpin(&key(9)); // harmless
    }

    #[test]
    fn too_big_fails_and_leaves_src_and_cache_alone() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 10).unwrap();
        put(&c, 1, 5);
        let src = stage(&c, "big", 11, 0);
        let err = c.insert(&key(2), &src).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Full {
                    need: 11,
                    quota: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(src.exists());
        assert_eq!(
            order(&c),
            vec![key(1)],
            "nothing evicted for a hopeless insert"
        );
        assert_eq!(c.used(), 5);
    }

    #[test]
    fn reopen_keeps_entries_and_lru_order() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = ContentCache::open(d.path(), 100).unwrap();
            put(&c, 1, 10);
            put(&c, 2, 20);
            put(&c, 3, 30);
            // Several touches within the same second: the last ones are only flushed
            // on drop.
            assert!(c.get(&key(1)).is_some());
            assert!(c.get(&key(2)).is_some());
        }
        let c = ContentCache::open(d.path(), 100).unwrap();
        assert_eq!(order(&c), vec![key(2), key(1), key(3)]);
        assert_eq!(c.used(), 60);
        // And it keeps evicting in that order.
        drop(c);
        let c = ContentCache::open(d.path(), 60).unwrap();
        put(&c, 4, 30);
        assert_eq!(order(&c), vec![key(4), key(2), key(1)]);
    }

    #[test]
    fn open_adopts_unknown_objects_and_drops_missing_ones() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = ContentCache::open(d.path(), 100).unwrap();
            put(&c, 1, 10);
            put(&c, 2, 10);
        }
        std::fs::remove_file(object_path(d.path(), &key(1))).unwrap();
        let k = "ab".repeat(16);
        std::fs::create_dir_all(d.path().join("objects/ab")).unwrap();
        std::fs::write(object_path(d.path(), &k), b"adopted").unwrap();
        let junk = d.path().join("objects/ab/not-an-md5");
        std::fs::write(&junk, b"junk").unwrap();
        let misplaced = d.path().join("objects/ab").join(key(3));
        std::fs::write(&misplaced, b"wrong shard").unwrap();

        let c = ContentCache::open(d.path(), 100).unwrap();
        let mut keys = order(&c);
        keys.sort();
        assert_eq!(keys, vec![key(2), k.clone()]);
        assert_eq!(c.used(), 10 + 7);
        assert!(
            junk.exists() && misplaced.exists(),
            "foreign files are not deleted"
        );
        assert!(c.get(&k).is_some());
    }

    #[test]
    fn corrupt_index_is_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = ContentCache::open(d.path(), 100).unwrap();
            put(&c, 1, 10);
            put(&c, 2, 20);
            put(&c, 3, 30);
        }
        let index = d.path().join(INDEX);
        for garbage in [
            &b"\x00\xffnot json"[..],
            br#"{"version":1,"entries":[{"md5":"../../etc/passwd","last_used_ms":1}]}"#,
            br#"{"version":99,"entries":[]}"#,
            br#"{"version":1,"entries":"#,
        ] {
            std::fs::write(&index, garbage).unwrap();
            let c = ContentCache::open(d.path(), 100).unwrap();
            assert_eq!(c.len(), 3);
            assert_eq!(c.used(), 60);
            let idx: IndexFile = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
            assert_eq!(idx.entries.len(), 3, "index rewritten");
        }
    }

    #[test]
    fn bad_keys_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 100).unwrap();
        let src = stage(&c, "x", 1, 0);
        let upper = "A".repeat(32);
        let slashy = format!("../{}", "a".repeat(29));
        for bad in [
            "../x",
            upper.as_str(),
            "abc",
            "",
            slashy.as_str(),
            &"a".repeat(33),
        ] {
            assert!(
                matches!(c.insert(bad, &src), Err(CacheError::BadKey { .. })),
                "{bad:?}"
            );
            assert!(c.get(bad).is_none());
            assert!(!c.pin(bad));
            assert!(matches!(c.remove(bad), Err(CacheError::BadKey { .. })));
        }
        assert!(src.exists());
        assert!(c.is_empty());
    }

    #[test]
    fn remove_deletes_and_respects_pins() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 100).unwrap();
        let p1 = put(&c, 1, 10);
        put(&c, 2, 15);
        assert!(c.remove(&key(1)).unwrap());
        assert!(!p1.exists());
        assert_eq!((c.len(), c.used()), (1, 15));
        assert!(!c.remove(&key(1)).unwrap());

        assert!(c.pin(&key(2)));
        assert!(matches!(c.remove(&key(2)), Err(CacheError::Pinned { .. })));
        c.unpin(&key(2));
        assert!(c.remove(&key(2)).unwrap());
        assert!(c.is_empty());
        assert_eq!(c.used(), 0);
        drop(c);
        assert!(ContentCache::open(d.path(), 100).unwrap().is_empty());
    }

    #[test]
    fn vanished_object_is_forgotten_on_get() {
        let d = tempfile::tempdir().unwrap();
        let c = ContentCache::open(d.path(), 100).unwrap();
        let p = put(&c, 1, 10);
        std::fs::remove_file(&p).unwrap();
        assert!(c.get(&key(1)).is_none());
        assert_eq!((c.len(), c.used()), (0, 0));
        // And it can be inserted again.
        put(&c, 1, 10);
        assert!(c.get(&key(1)).is_some());
    }

    #[test]
    fn open_clears_staging_and_enforces_a_lowered_quota() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = ContentCache::open(d.path(), 100).unwrap();
            put(&c, 1, 10);
            put(&c, 2, 10);
            put(&c, 3, 10);
            stage(&c, "partial", 50, 0);
        }
        let c = ContentCache::open(d.path(), 15).unwrap();
        assert_eq!(std::fs::read_dir(c.staging_dir()).unwrap().count(), 0);
        assert_eq!(order(&c), vec![key(3)]);
        assert_eq!(c.used(), 10);
        assert!(!object_path(d.path(), &key(1)).exists());
    }
}
