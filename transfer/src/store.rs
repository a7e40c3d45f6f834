//! Piece storage: serving from memory maps, receiving into partial files, resuming,
//! and the atomic rename into place.
//!
//! Why this shape:
//! - Pieces are served from read-only `memmap2` mappings and handed to QUIC as
//!   `Bytes` that borrow the mapping, so a seed copies nothing in user space.
//! - A receiver writes each piece with `pwrite` at its offset in a staging file that
//!   was `fallocate`d up front: a full disk is reported before the transfer starts,
//!   and writes never grow memory, whatever the file size.
//! - The staging area lives beside the destination (same filesystem, so `rename(2)`
//!   is atomic) as `.octo-<key>-<random>.partial/`, holding the manifest, the staging
//!   files and `verified`, one byte per piece. A killed `octo get` finds it again by
//!   the key (content and destination) and fetches only what is not verified.
//! - The destination's directory may belong to someone else (an agent writes as root
//!   into `/home/deploy`): the staging area is created 0700 under a random name and
//!   resumed only if it is a real directory of ours with mode 0700, and every file is
//!   reached through directory descriptors opened `O_NOFOLLOW` ([`crate::safefs`]),
//!   with mode and owner set on the open file before `renameat`. Claimed pieces are re-hashed on resume, so a
//!   crash between a write and its record cannot smuggle in bad bytes.
//! - Nothing is visible at the destination until every file passed its whole-file
//!   MD5; then each file is renamed into place with its mode already applied.
//! - Pieces already at the destination (an earlier copy, an older version) are
//!   verified and copied into the staging area instead of fetched: a repeated copy
//!   moves no bytes over the network, an updated file only its changed pieces.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use md5::{Digest, Md5};
use memmap2::Mmap;

use crate::manifest::{hex, EntryKind, Manifest, Md5Sum, PieceInfo};
use crate::safefs;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "destination {0} does not exist or is not a directory (several roots need a directory)"
    )]
    NotADirectory(PathBuf),
    #[error("parent directory of {0} does not exist")]
    NoParent(PathBuf),
    #[error("not enough disk space for {path}: need {need} bytes ({source}); partial state kept in {staging}")]
    DiskFull {
        path: PathBuf,
        need: u64,
        staging: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} failed its whole-file MD5: expected {expected}, got {actual}")]
    FileMd5 {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("staging area {0} holds a different content")]
    StagingMismatch(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            StoreError::DiskFull {
                path: path.to_path_buf(),
                need: 0,
                staging: path.parent().unwrap_or(path).to_path_buf(),
                source,
            }
        } else {
            StoreError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// A piece's bytes borrowed from a shared mapping.
struct MapSlice {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

/// Files mapped lazily, once each.
#[derive(Default)]
struct Maps {
    maps: Mutex<HashMap<usize, Arc<Mmap>>>,
}

impl Maps {
    fn get(
        &self,
        entry: usize,
        path: &Path,
        open: impl FnOnce() -> io::Result<File>,
    ) -> Result<Arc<Mmap>, StoreError> {
        let mut maps = self.maps.lock().unwrap();
        if let Some(m) = maps.get(&entry) {
            return Ok(m.clone());
        }
        let f = open().map_err(io_err("opening", path))?;
        // SAFETY: the mapping is read-only. If another process truncates the file while
        // mapped, reads could fault; files being shared are expected to stay put, as
        // with any seeding BitTorrent client.
        let m = Arc::new(unsafe { Mmap::map(&f) }.map_err(io_err("mapping", path))?);
        maps.insert(entry, m.clone());
        Ok(m)
    }

    fn slice(
        &self,
        entry: usize,
        path: &Path,
        p: &PieceInfo,
        open: impl FnOnce() -> io::Result<File>,
    ) -> Result<Bytes, StoreError> {
        let map = self.get(entry, path, open)?;
        let start = p.offset as usize;
        let end = start + p.len as usize;
        if end > map.len() {
            return Err(StoreError::Io {
                op: "reading",
                path: path.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file is shorter than the manifest says",
                ),
            });
        }
        Ok(Bytes::from_owner(MapSlice { map, start, end }))
    }
}

/// Serves a complete content from the files it was built from.
pub struct SeedStore {
    manifest: Arc<Manifest>,
    pieces: Vec<PieceInfo>,
    /// Source path of each entry (files only).
    paths: Vec<Option<PathBuf>>,
    maps: Maps,
}

impl std::fmt::Debug for SeedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedStore")
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl SeedStore {
    /// `roots` are the paths the manifest was built from, in the same order.
    pub fn new(manifest: Arc<Manifest>, roots: &[PathBuf]) -> SeedStore {
        let mut by_root = HashMap::new();
        for r in roots {
            let name = r
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            by_root.insert(name, r.clone());
        }
        let paths = manifest
            .entries
            .iter()
            .map(|e| {
                let (root, rest) = e.path.split_once('/').unwrap_or((&e.path, ""));
                let base = by_root.get(root)?;
                Some(if rest.is_empty() {
                    base.clone()
                } else {
                    base.join(rest)
                })
            })
            .collect();
        SeedStore {
            pieces: manifest.pieces(),
            manifest,
            paths,
            maps: Maps::default(),
        }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn read_piece(&self, piece: u32) -> Result<Bytes, StoreError> {
        let p = self.pieces[piece as usize];
        let path = self.paths[p.entry].as_ref().expect("files have paths");
        self.maps.slice(p.entry, path, &p, || File::open(path))
    }
}

/// Where a content lands: the final path of each entry, resolved with cp semantics.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Final path of every manifest entry.
    pub finals: Vec<PathBuf>,
    /// Directory holding the staging area (same filesystem as the finals).
    pub base: PathBuf,
    /// Every entry's path relative to `base`.
    rel: Vec<PathBuf>,
    /// Staging areas for this content at this destination are named
    /// `<prefix><random>.partial`: found again by the prefix, never guessable whole.
    prefix: String,
}

impl Destination {
    /// cp semantics: one root and `dest` an existing directory → `dest/<root>`; one
    /// root otherwise → `dest` itself (its parent must exist); several roots →
    /// `dest` must be an existing directory. A symlink at `dest` is not followed: a
    /// single file replaces the link itself.
    pub fn resolve(manifest: &Manifest, dest: &Path) -> Result<Destination, StoreError> {
        let roots = manifest.roots();
        let dest_is_dir = fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
        let (base_dir, rename_single): (PathBuf, Option<PathBuf>) =
            if roots.len() == 1 && !dest_is_dir {
                let parent = match dest.parent() {
                    Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
                    Some(p) => p.to_path_buf(),
                    None => return Err(StoreError::NoParent(dest.to_path_buf())),
                };
                if !parent.is_dir() {
                    return Err(StoreError::NoParent(dest.to_path_buf()));
                }
                let name = dest
                    .file_name()
                    .ok_or_else(|| StoreError::NotADirectory(dest.to_path_buf()))?;
                (parent, Some(PathBuf::from(name)))
            } else if dest_is_dir {
                (dest.to_path_buf(), None)
            } else {
                return Err(StoreError::NotADirectory(dest.to_path_buf()));
            };
        let rel: Vec<PathBuf> = manifest
            .entries
            .iter()
            .map(|e| {
                let (root, rest) = e.path.split_once('/').unwrap_or((&e.path, ""));
                let root_path = match &rename_single {
                    Some(p) => p.clone(),
                    None => PathBuf::from(root),
                };
                if rest.is_empty() {
                    root_path
                } else {
                    root_path.join(rest)
                }
            })
            .collect();
        let finals = rel.iter().map(|r| base_dir.join(r)).collect::<Vec<_>>();
        // Named after the content *and* where it lands, so two gets of the same content
        // into one directory under different names never share a staging area.
        let mut key = Md5::new();
        key.update(manifest.content_id().0);
        for f in finals.iter().take(1) {
            key.update(f.as_os_str().as_encoded_bytes());
        }
        let key: Md5Sum = key.finalize().into();
        Ok(Destination {
            finals,
            base: base_dir,
            rel,
            prefix: format!(".octo-{}-", &hex(&key)[..20]),
        })
    }
}

/// What to apply to the delivered files before they are renamed into place: a mode
/// for every file instead of the manifest's, an owner for everything delivered, and
/// whether setuid, setgid and sticky bits from the manifest are dropped (an agent
/// copying for the fleet drops them unless the center allowed them, so no setuid file
/// exists even for an instant).
#[derive(Debug, Clone, Copy, Default)]
pub struct Finish {
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub strip_special: bool,
}

/// Receives a content into a staging area and renames it into place at the end.
pub struct PartialStore {
    manifest: Arc<Manifest>,
    pieces: Vec<PieceInfo>,
    dest: Destination,
    finish: Finish,
    /// The destination's directory and the staging area inside it, opened without
    /// following links; every later file operation is relative to one of them.
    base_fd: OwnedFd,
    st_fd: OwnedFd,
    st_name: OsString,
    staging: PathBuf,
    files: HashMap<usize, File>,
    record: File,
    verified: Mutex<Vec<bool>>,
    maps: Maps,
    /// Woken whenever a piece is verified, for the in-order whole-file hasher.
    verified_cv: Condvar,
    /// Whole-file MD5s computed in order while the download runs, by entry.
    whole: Mutex<HashMap<usize, Md5Sum>>,
    whole_cv: Condvar,
    stop: std::sync::atomic::AtomicBool,
    hasher_started: std::sync::atomic::AtomicBool,
    hasher_done: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PartialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartialStore")
            .field("staging", &self.staging)
            .finish()
    }
}

/// Reads `name` in `dir` if it is exactly `want` (reads at most one byte more).
fn holds(dir: &OwnedFd, name: &str, want: &[u8]) -> bool {
    use std::io::Read;
    let Ok(Some(f)) = safefs::open_read_at(dir, OsStr::new(name)) else {
        return false;
    };
    let mut got = Vec::new();
    f.take(want.len() as u64 + 1)
        .read_to_end(&mut got)
        .is_ok_and(|_| got == want)
}

impl PartialStore {
    /// Open (or resume) the staging area for `manifest` at `dest`.
    pub fn open(manifest: Arc<Manifest>, dest: Destination) -> Result<PartialStore, StoreError> {
        PartialStore::open_with(manifest, dest, Finish::default())
    }

    /// Open (or resume) the staging area, applying `finish` to what it delivers.
    ///
    /// The staging area is a directory beside the destination with a random name,
    /// created 0700. An earlier run's area is resumed only if it is a real directory
    /// (not a link), owned by this process's user, mode 0700, holding this manifest:
    /// nobody else can have put anything in it. Anything else with a matching name is
    /// left alone and a fresh area is made.
    pub fn open_with(
        manifest: Arc<Manifest>,
        dest: Destination,
        finish: Finish,
    ) -> Result<PartialStore, StoreError> {
        let base = dest.base.clone();
        let base_fd = safefs::open_dir(&base).map_err(io_err("opening", &base))?;
        let encoded = manifest.encode();
        let mut resumed = None;
        // A few candidates at most: the directory may be a user's, full of decoys.
        for name in safefs::names_matching(&base_fd, &dest.prefix, ".partial", 16)
            .map_err(io_err("listing", &base))?
        {
            match safefs::open_private_dir_at(&base_fd, &name) {
                Ok(Some(fd)) if holds(&fd, "manifest", &encoded) => {
                    resumed = Some((name, fd));
                    break;
                }
                _ => tracing::warn!(
                    staging = %base.join(&name).display(),
                    "not resuming from a staging area that is not a private directory of ours holding this content"
                ),
            }
        }
        let fresh = resumed.is_none();
        let (st_name, st_fd) = match resumed {
            Some(r) => r,
            None => {
                let name = OsString::from(format!(
                    "{}{:016x}.partial",
                    dest.prefix,
                    rand::random::<u64>()
                ));
                let shown = base.join(&name);
                let fd = safefs::create_private_dir_at(&base_fd, &name, &shown)
                    .map_err(io_err("creating", &shown))?;
                write_atomic_at(&fd, &shown, "manifest", &encoded)?;
                (name, fd)
            }
        };
        let st = base.join(&st_name);
        let pieces = manifest.pieces();
        let mut files = HashMap::new();
        for (i, size, _) in manifest.files() {
            let name = format!("f{i}");
            let p = st.join(&name);
            let f = safefs::open_file_at(&st_fd, &name, fresh, 0o600)
                .map_err(io_err("creating", &p))?;
            if size > 0 {
                let cur = f.metadata().map_err(io_err("reading", &p))?.len();
                if cur < size {
                    // SAFETY: plain syscall on an owned, open descriptor.
                    let rc = unsafe {
                        libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, size as i64)
                    };
                    if rc == libc::ENOSPC || rc == libc::EDQUOT {
                        return Err(StoreError::DiskFull {
                            path: p,
                            need: size,
                            staging: st,
                            source: io::Error::from_raw_os_error(rc),
                        });
                    } else if rc != 0 {
                        // Filesystems without fallocate: fall back to a sparse file.
                        f.set_len(size).map_err(io_err("sizing", &p))?;
                    }
                }
            }
            files.insert(i, f);
        }
        let rpath = st.join("verified");
        let record = safefs::open_file_at(&st_fd, "verified", fresh, 0o600)
            .map_err(io_err("opening", &rpath))?;
        let mut bytes = vec![0u8; pieces.len()];
        let n = record.read_at(&mut bytes, 0).unwrap_or(0);
        bytes.truncate(n);
        bytes.resize(pieces.len(), 0);
        let store = PartialStore {
            verified: Mutex::new(vec![false; pieces.len()]),
            manifest,
            pieces,
            dest,
            finish,
            base_fd,
            st_fd,
            st_name,
            staging: st,
            files,
            record,
            maps: Maps::default(),
            verified_cv: Condvar::new(),
            whole: Mutex::new(HashMap::new()),
            whole_cv: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
            hasher_started: std::sync::atomic::AtomicBool::new(false),
            hasher_done: std::sync::atomic::AtomicBool::new(false),
        };
        // Re-hash every piece the record claims; only those that still match count.
        let claimed: Vec<u32> = (0..bytes.len() as u32)
            .filter(|&i| bytes[i as usize] == 1)
            .collect();
        let good = store.verify_pieces(&claimed);
        for (i, ok) in claimed.iter().zip(good) {
            if ok {
                store.verified.lock().unwrap()[*i as usize] = true;
            } else {
                let _ = store.record.write_at(&[0], *i as u64);
            }
        }
        store.adopt_from_destination()?;
        Ok(store)
    }

    /// The existing regular file at entry `e`'s final path, opened without following
    /// a link anywhere below the destination's directory.
    fn open_final(&self, e: usize) -> Option<File> {
        let rel = &self.dest.rel[e];
        let parent = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => safefs::walk_at(&self.base_fd, p).ok()?,
            _ => self.base_fd.try_clone().ok()?,
        };
        safefs::open_read_at(&parent, rel.file_name()?).ok()?
    }

    /// The directory that entry `e` lands in, created (0700 until finalize sets the
    /// manifest's modes) where missing, never through a link.
    fn final_parent(&self, e: usize) -> Result<OwnedFd, StoreError> {
        let rel = &self.dest.rel[e];
        match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => {
                safefs::mkdirs_at(&self.base_fd, p, 0o700, &self.dest.base)
                    .map_err(io_err("creating", &self.dest.base.join(p)))
            }
            _ => self
                .base_fd
                .try_clone()
                .map_err(io_err("opening", &self.dest.base)),
        }
    }

    /// Pieces already at the destination (an earlier copy of the same content, or an
    /// older version of the file) are copied into the staging area instead of fetched,
    /// if their MD5 matches: a repeated copy moves no bytes over the network, and an
    /// updated file only its changed pieces, like rsync's basis file. Verified like any
    /// other piece, so a stale or foreign destination file can only be ignored.
    fn adopt_from_destination(&self) -> Result<(), StoreError> {
        let unverified: Vec<u32> = {
            let v = self.verified.lock().unwrap();
            (0..self.pieces.len() as u32)
                .filter(|&i| !v[i as usize])
                .collect()
        };
        let mut finals: HashMap<usize, File> = HashMap::new();
        for &i in &unverified {
            let e = self.pieces[i as usize].entry;
            if let std::collections::hash_map::Entry::Vacant(v) = finals.entry(e) {
                if let Some(f) = self.open_final(e) {
                    v.insert(f);
                }
            }
        }
        let missing: Vec<u32> = unverified
            .into_iter()
            .filter(|&i| finals.contains_key(&self.pieces[i as usize].entry))
            .collect();
        let finals = &finals;
        if missing.is_empty() {
            return Ok(());
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = missing.len().div_ceil(threads).max(1);
        let results: Vec<Result<Vec<u32>, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = missing
                .chunks(chunk)
                .map(|ids| {
                    s.spawn(move || {
                        let mut adopted = Vec::new();
                        let mut buf = Vec::new();
                        for &id in ids {
                            let p = self.pieces[id as usize];
                            let f = &finals[&p.entry];
                            buf.resize(p.len as usize, 0);
                            if f.read_exact_at(&mut buf, p.offset).is_err() {
                                continue;
                            }
                            let h: Md5Sum = Md5::digest(&buf).into();
                            if h != p.md5 {
                                continue;
                            }
                            self.write(id, 0, &buf)?;
                            adopted.push(id);
                        }
                        Ok(adopted)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("adopting thread panicked"))
                .collect()
        });
        for r in results {
            for id in r? {
                self.mark_verified(id)?;
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn staging(&self) -> &Path {
        &self.staging
    }

    pub fn piece(&self, piece: u32) -> PieceInfo {
        self.pieces[piece as usize]
    }

    pub fn piece_count(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// Which pieces are verified on disk.
    pub fn verified(&self) -> Vec<bool> {
        self.verified.lock().unwrap().clone()
    }

    /// Write received bytes of `piece` at `offset` within the piece.
    pub fn write(&self, piece: u32, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        let p = self.pieces[piece as usize];
        let f = &self.files[&p.entry];
        f.write_all_at(data, p.offset + offset as u64).map_err(|e| {
            let path = self.staging.join(format!("f{}", p.entry));
            let mut err = io_err("writing", &path)(e);
            if let StoreError::DiskFull { staging, need, .. } = &mut err {
                *staging = self.staging.clone();
                *need = data.len() as u64;
            }
            err
        })
    }

    /// Record a verified piece for resume.
    pub fn mark_verified(&self, piece: u32) -> Result<(), StoreError> {
        self.verified.lock().unwrap()[piece as usize] = true;
        self.verified_cv.notify_all();
        self.record
            .write_all_at(&[1], piece as u64)
            .map_err(io_err("recording", &self.staging))
    }

    /// Bytes of a verified piece, for uploading to other peers.
    pub fn read_piece(&self, piece: u32) -> Result<Bytes, StoreError> {
        // Mapped from the open staging file: the mapping follows the inode, so it keeps
        // serving after the rename into place, and no path is ever opened again.
        let p = self.pieces[piece as usize];
        let path = &self.dest.finals[p.entry];
        self.maps
            .slice(p.entry, path, &p, || self.files[&p.entry].try_clone())
    }

    /// Start the in-order whole-file hasher: a thread that follows the verified pieces
    /// of each large file from its start and feeds them to one MD5, so the whole-file
    /// check costs nothing at the end on a multi-core machine (MD5 is serial per
    /// stream; this overlaps it with the download instead of adding it afterwards).
    pub fn start_whole_file_hasher(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::Release;
        let me = self.clone();
        self.hasher_started.store(true, Release);
        std::thread::Builder::new()
            .name("octo-md5".into())
            .spawn(move || {
                me.hash_in_order();
                me.hasher_done.store(true, Release);
                me.whole_cv.notify_all();
            })
            .expect("spawning the hasher thread");
    }

    /// Stop the hasher thread (on shutdown); `finalize` then hashes what is missing.
    pub fn stop_hasher(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.verified_cv.notify_all();
    }

    fn hash_in_order(&self) {
        let threshold = self.manifest.small_file_threshold;
        let mut buf = Vec::new();
        let mut k = 0usize;
        for (entry, size, _) in self.manifest.files() {
            if size == 0 {
                continue;
            }
            // Pieces of this entry are contiguous in the piece table.
            while k < self.pieces.len() && self.pieces[k].entry != entry {
                k += 1;
            }
            if size < threshold {
                k += 1;
                continue;
            }
            let mut h = Md5::new();
            while k < self.pieces.len() && self.pieces[k].entry == entry {
                {
                    let mut v = self.verified.lock().unwrap();
                    while !v[k] {
                        if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                            return;
                        }
                        v = self.verified_cv.wait(v).unwrap();
                    }
                }
                let p = self.pieces[k];
                buf.resize(p.len as usize, 0);
                if self.files[&entry]
                    .read_exact_at(&mut buf, p.offset)
                    .is_err()
                {
                    return; // finalize will hash this file itself and report the error
                }
                h.update(&buf);
                k += 1;
            }
            self.whole
                .lock()
                .unwrap()
                .insert(entry, h.finalize().into());
            self.whole_cv.notify_all();
        }
    }

    /// The in-order hasher's result for `entry`, waiting for it if the hasher runs.
    fn whole_md5(&self, entry: usize) -> Option<Md5Sum> {
        use std::sync::atomic::Ordering::Acquire;
        if !self.hasher_started.load(Acquire) {
            return None;
        }
        let mut w = self.whole.lock().unwrap();
        loop {
            if let Some(h) = w.get(&entry) {
                return Some(*h);
            }
            if self.hasher_done.load(Acquire) || self.stop.load(Acquire) {
                return None;
            }
            w = self
                .whole_cv
                .wait_timeout(w, std::time::Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// Hash pieces on disk on several threads; true where the MD5 matches.
    fn verify_pieces(&self, pieces: &[u32]) -> Vec<bool> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = pieces.len().div_ceil(threads).max(1);
        let mut out = vec![false; pieces.len()];
        std::thread::scope(|s| {
            for (ids, res) in pieces.chunks(chunk).zip(out.chunks_mut(chunk)) {
                s.spawn(move || {
                    let mut buf = Vec::new();
                    for (id, r) in ids.iter().zip(res.iter_mut()) {
                        let p = self.pieces[*id as usize];
                        buf.resize(p.len as usize, 0);
                        if self.files[&p.entry]
                            .read_exact_at(&mut buf, p.offset)
                            .is_ok()
                        {
                            let h: Md5Sum = Md5::digest(&buf).into();
                            *r = h == p.md5;
                        }
                    }
                });
            }
        });
        out
    }

    /// Check whole-file MD5s, then rename every entry into place. Call once every
    /// piece is verified. On a failed check the file's pieces are un-recorded.
    pub fn finalize(&self) -> Result<Vec<(PathBuf, Md5Sum)>, StoreError> {
        let st = &self.staging;
        // Whole-file MD5 of files that were checked piece by piece (small files are
        // their own single piece, already checked by their whole-file MD5).
        let big: Vec<(usize, u64, Md5Sum)> = self
            .manifest
            .files()
            .filter(|(_, size, _)| *size >= self.manifest.small_file_threshold)
            .collect();
        let results: Vec<Result<(), StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = big
                .iter()
                .map(|(i, _, want)| {
                    let path = st.join(format!("f{i}"));
                    let entry_path = self.manifest.entries[*i].path.clone();
                    s.spawn(move || {
                        let got = match self.whole_md5(*i) {
                            Some(h) => h,
                            None => crate::manifest::md5_file(&path)
                                .map_err(io_err("hashing", &path))?,
                        };
                        if &got != want {
                            return Err(StoreError::FileMd5 {
                                path: entry_path,
                                expected: hex(want),
                                actual: hex(&got),
                            });
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("hash thread"))
                .collect()
        });
        for ((i, _, _), r) in big.iter().zip(results) {
            if let Err(e) = r {
                for (k, p) in self.pieces.iter().enumerate() {
                    if p.entry == *i {
                        self.verified.lock().unwrap()[k] = false;
                        let _ = self.record.write_at(&[0], k as u64);
                    }
                }
                return Err(e);
            }
        }
        let mut out = Vec::new();
        let mut dirs = Vec::new();
        // Map every file before renaming: a mapping follows the inode, so uploads to
        // other peers keep working after the rename.
        for (i, size, _) in self.manifest.files() {
            if size > 0 {
                let path = st.join(format!("f{i}"));
                self.maps.get(i, &path, || self.files[&i].try_clone())?;
            }
        }
        let owner = self.finish.owner;
        for (i, e) in self.manifest.entries.iter().enumerate() {
            let fin = &self.dest.finals[i];
            let name = self.dest.rel[i]
                .file_name()
                .ok_or_else(|| StoreError::NotADirectory(fin.clone()))?;
            match &e.kind {
                EntryKind::Dir => {
                    let fd =
                        safefs::mkdirs_at(&self.base_fd, &self.dest.rel[i], 0o700, &self.dest.base)
                            .map_err(io_err("creating", fin))?;
                    dirs.push((fd, fin.clone(), e.mode));
                }
                EntryKind::File { md5, .. } => {
                    let staged = format!("f{i}");
                    let mut mode = self.finish.mode.unwrap_or(e.mode) & 0o7777;
                    if self.finish.strip_special {
                        mode &= 0o777;
                    }
                    // On the open file, before it is visible: nothing can be swapped in
                    // between setting the owner and the mode and the rename.
                    safefs::apply_mode_owner(&self.files[&i], mode, owner)
                        .map_err(io_err("setting mode and owner of", &st.join(&staged)))?;
                    let parent = self.final_parent(i)?;
                    safefs::rename_at(&self.st_fd, &staged, &parent, name)
                        .map_err(io_err("renaming into", fin))?;
                    out.push((fin.clone(), *md5));
                }
                EntryKind::Symlink { target } => {
                    let staged = format!("l{i}");
                    let _ = safefs::unlink_at(&self.st_fd, OsStr::new(&staged));
                    safefs::symlink_at(OsStr::new(target), &self.st_fd, &staged)
                        .map_err(io_err("creating", &st.join(&staged)))?;
                    if let Some((uid, gid)) = owner {
                        safefs::chown_link_at(&self.st_fd, &staged, uid, gid)
                            .map_err(io_err("setting the owner of", &st.join(&staged)))?;
                    }
                    let parent = self.final_parent(i)?;
                    safefs::rename_at(&self.st_fd, &staged, &parent, name)
                        .map_err(io_err("renaming into", fin))?;
                }
            }
        }
        // Directory modes last, deepest first, so a read-only directory does not block
        // its own children; set on the open directories.
        let dir_mask = if self.finish.strip_special {
            0o777
        } else {
            0o7777
        };
        for (fd, d, mode) in dirs.iter().rev() {
            safefs::apply_mode_owner(fd, *mode & dir_mask, owner)
                .map_err(io_err("setting mode of", d))?;
        }
        safefs::remove_flat_dir_at(&self.base_fd, &self.st_name, &self.st_fd)
            .map_err(io_err("removing", st))?;
        Ok(out)
    }
}

/// Writes `name` in the private directory `dir` atomically (temporary, then rename).
fn write_atomic_at(dir: &OwnedFd, shown: &Path, name: &str, data: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = format!("{name}.tmp");
    let path = shown.join(&tmp);
    let mut f = safefs::open_file_at(dir, &tmp, false, 0o600).map_err(io_err("writing", &path))?;
    f.set_len(0).map_err(io_err("writing", &path))?;
    f.write_all(data).map_err(io_err("writing", &path))?;
    safefs::rename_at(dir, &tmp, dir, OsStr::new(name)).map_err(io_err("renaming", &path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BuildOptions;
    use std::os::unix::fs::PermissionsExt;

    fn stagings(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|d| d.path())
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect()
    }

    fn setup(len: usize) -> (tempfile::TempDir, PathBuf, Arc<Manifest>) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.bin");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&src, data).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
        let m = Manifest::build(
            std::slice::from_ref(&src),
            &BuildOptions {
                piece_size: Some(1 << 16),
                small_file_threshold: 1 << 17,
                threads: 2,
            },
        )
        .unwrap();
        (d, src, Arc::new(m))
    }

    #[test]
    fn copy_resume_and_finalize() {
        let (d, src, m) = setup(300_000);
        let seed = SeedStore::new(m.clone(), std::slice::from_ref(&src));
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let dest = Destination::resolve(&m, &out).unwrap();
        assert_eq!(dest.finals[0], out.join("src.bin"));
        let n = m.pieces().len() as u32;
        {
            let st = PartialStore::open(m.clone(), dest.clone()).unwrap();
            for i in 0..2 {
                st.write(i, 0, &seed.read_piece(i).unwrap()).unwrap();
                st.mark_verified(i).unwrap();
            }
            // A recorded piece whose bytes are wrong must not survive a resume.
            st.write(2, 0, &vec![0u8; st.piece(2).len as usize])
                .unwrap();
            st.mark_verified(2).unwrap();
        }
        let st = PartialStore::open(m.clone(), dest.clone()).unwrap();
        let v = st.verified();
        assert_eq!(&v[..3], &[true, true, false]);
        for i in 2..n {
            st.write(i, 0, &seed.read_piece(i).unwrap()).unwrap();
            st.mark_verified(i).unwrap();
        }
        assert_eq!(st.read_piece(1).unwrap(), seed.read_piece(1).unwrap());
        let files = st.finalize().unwrap();
        assert_eq!(fs::read(&files[0].0).unwrap(), fs::read(&src).unwrap());
        assert_eq!(
            fs::metadata(&files[0].0).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(stagings(&out).is_empty());
    }

    #[test]
    fn planted_staging_areas_and_links_are_never_followed() {
        let (d, src, m) = setup(300_000);
        let seed = SeedStore::new(m.clone(), std::slice::from_ref(&src));
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let dest = Destination::resolve(&m, &out.join("app.bin")).unwrap();
        // Whatever name a user could guess, as a link to the victim and as a directory
        // with a link inside.
        let guess = out.join(format!("{}0000000000000000.partial", dest.prefix));
        std::os::unix::fs::symlink(&victim, &guess).unwrap();
        let planted = out.join(format!("{}1111111111111111.partial", dest.prefix));
        fs::create_dir(&planted).unwrap();
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, planted.join("f0")).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("app.bin")).unwrap();
        let st = PartialStore::open_with(
            m.clone(),
            dest,
            Finish {
                mode: Some(0o600),
                owner: None,
                strip_special: false,
            },
        )
        .unwrap();
        assert_eq!(
            fs::metadata(st.staging()).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_ne!(st.staging(), guess);
        assert_ne!(st.staging(), planted);
        for i in 0..st.piece_count() {
            st.write(i, 0, &seed.read_piece(i).unwrap()).unwrap();
            st.mark_verified(i).unwrap();
        }
        st.finalize().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        let landed = out.join("app.bin");
        assert!(fs::symlink_metadata(&landed).unwrap().is_file());
        assert_eq!(fs::read(&landed).unwrap(), fs::read(&src).unwrap());
        assert_eq!(
            fs::metadata(&landed).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }

    #[test]
    fn a_symlinked_destination_parent_is_refused() {
        let (d, _src, m) = setup(1000);
        fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        let dest = Destination::resolve(&m, &d.path().join("link/x")).unwrap();
        let e = PartialStore::open(m.clone(), dest).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(fs::read_dir(d.path().join("real"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn whole_file_md5_mismatch_is_caught() {
        let (d, _src, m) = setup(200_000);
        let dest = Destination::resolve(&m, &d.path().join("copy")).unwrap();
        assert_eq!(dest.finals[0], d.path().join("copy"));
        let st = PartialStore::open(m.clone(), dest).unwrap();
        for i in 0..st.piece_count() {
            st.mark_verified(i).unwrap();
        }
        assert!(matches!(st.finalize(), Err(StoreError::FileMd5 { .. })));
        assert!(st.verified().iter().all(|v| !v));
    }

    #[test]
    fn in_order_hasher_gives_the_same_verdicts() {
        let (d, src, m) = setup(300_000);
        let seed = SeedStore::new(m.clone(), std::slice::from_ref(&src));
        let dest = Destination::resolve(&m, &d.path().join("good")).unwrap();
        let st = Arc::new(PartialStore::open(m.clone(), dest).unwrap());
        st.start_whole_file_hasher();
        // Out of order on purpose: the hasher must wait for piece 0.
        for i in (0..st.piece_count()).rev() {
            st.write(i, 0, &seed.read_piece(i).unwrap()).unwrap();
            st.mark_verified(i).unwrap();
        }
        st.finalize().unwrap();
        assert_eq!(
            fs::read(d.path().join("good")).unwrap(),
            fs::read(&src).unwrap()
        );

        let dest = Destination::resolve(&m, &d.path().join("bad")).unwrap();
        let st = Arc::new(PartialStore::open(m.clone(), dest).unwrap());
        st.start_whole_file_hasher();
        for i in 0..st.piece_count() {
            st.mark_verified(i).unwrap(); // bytes never written: zeros
        }
        assert!(matches!(st.finalize(), Err(StoreError::FileMd5 { .. })));
    }

    #[test]
    fn cp_semantics_errors() {
        let (d, _src, m) = setup(10);
        assert!(matches!(
            Destination::resolve(&m, &d.path().join("no/such/dir/x")),
            Err(StoreError::NoParent(_))
        ));
    }
}
