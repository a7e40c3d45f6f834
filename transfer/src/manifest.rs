//! Manifests: what a content is, and how every byte of it is checked.
//!
//! A manifest lists one file or directory tree (or several, for `octo share a b`): per
//! entry a relative path, a Unix mode, and for files the size, the whole-file MD5 and,
//! for files at or above the small-file threshold, the MD5 of every piece.
//!
//! Why size-based MD5: a small file travels as a single piece whose check *is* its
//! whole-file MD5, so a tree of thousands of config files costs one hash per file and
//! no per-piece table. A large file is checked piece by piece as pieces arrive (a bad
//! piece is caught and re-fetched early, and blamed on the peer that sent it) and by
//! its whole-file MD5 at the end, which users can compare with `md5sum`.
//!
//! The content id is the MD5 of the encoded manifest, so a ticket pins every byte.
//!
//! Paths are untrusted on the receiving side: they are validated when a manifest is
//! built and again, independently, when one is decoded (see [`Manifest::validate`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Manifest format version, bumped on any incompatible change.
pub const MANIFEST_VERSION: u8 = 1;
/// Default size below which a file travels as one piece checked by its whole-file MD5.
pub const DEFAULT_SMALL_FILE_THRESHOLD: u64 = 1 << 20;
/// Smallest and largest automatic piece sizes.
pub const MIN_PIECE_SIZE: u32 = 64 << 10;
pub const MAX_PIECE_SIZE: u32 = 16 << 20;
/// Decoding caps: a manifest claiming more than this is rejected before use.
pub const MAX_ENTRIES: usize = 1 << 20;
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_PIECES: usize = 1 << 24;

pub type Md5Sum = [u8; 16];

/// The content id: MD5 of the encoded manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct ContentId(pub Md5Sum);

impl std::fmt::Display for ContentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}
impl std::fmt::Debug for ContentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentId({self})")
    }
}

/// Lower-case hex, as `md5sum` prints it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        md5: Md5Sum,
        /// Empty for files below the small-file threshold (the file is its own piece).
        pieces: Vec<Md5Sum>,
    },
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, `/`-separated; the first component is the root's name.
    pub path: String,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u8,
    pub piece_size: u32,
    pub small_file_threshold: u64,
    /// Parents come before children; no duplicates.
    pub entries: Vec<Entry>,
}

/// Where one piece lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceInfo {
    /// Index into `Manifest::entries`.
    pub entry: usize,
    pub offset: u64,
    pub len: u32,
    pub md5: Md5Sum,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("symlink {path:?} points outside the shared tree ({target:?})")]
    SymlinkEscape { path: String, target: String },
    #[error("unsupported file type at {0}")]
    Unsupported(PathBuf),
    #[error("decoding manifest: {0}")]
    Decode(#[from] postcard::Error),
    #[error("manifest version {0} is not supported (expected {MANIFEST_VERSION})")]
    Version(u8),
    #[error("manifest is malformed: {0}")]
    Malformed(String),
    #[error("file changed while hashing: {0}")]
    Changed(PathBuf),
}

/// Options for [`Manifest::build`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Override the automatic piece size (must be a power of two in range).
    pub piece_size: Option<u32>,
    pub small_file_threshold: u64,
    /// Hashing threads; 0 means one per core.
    pub threads: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            piece_size: None,
            small_file_threshold: DEFAULT_SMALL_FILE_THRESHOLD,
            threads: 0,
        }
    }
}

/// Piece size from total size: about 1024 pieces, a power of two within
/// [`MIN_PIECE_SIZE`, `MAX_PIECE_SIZE`]. 100 MiB gives 128 KiB, 1 GiB gives 1 MiB,
/// 8 GiB and above give 8-16 MiB.
pub fn choose_piece_size(total: u64) -> u32 {
    let target = (total / 1024).max(1).next_power_of_two();
    target.clamp(MIN_PIECE_SIZE as u64, MAX_PIECE_SIZE as u64) as u32
}

/// Validate one relative path: non-empty `/`-separated components, none of them
/// empty, `.` or `..`, no NUL, not absolute, bounded length.
pub fn validate_rel_path(path: &str) -> Result<(), ManifestError> {
    let bad = |reason| {
        Err(ManifestError::BadPath {
            path: path.chars().take(200).collect(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("too long");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    if path.contains('\\') {
        return bad("contains a backslash");
    }
    for comp in path.split('/') {
        match comp {
            "" => return bad("empty component"),
            "." => return bad("`.` component"),
            ".." => return bad("`..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// A symlink at `path` pointing at `target` must stay inside its root, lexically.
fn validate_symlink(path: &str, target: &str) -> Result<(), ManifestError> {
    let escape = || ManifestError::SymlinkEscape {
        path: path.to_string(),
        target: target.chars().take(200).collect(),
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(escape());
    }
    if target.len() > MAX_PATH_LEN {
        return Err(escape());
    }
    // Depth of the symlink's directory below the root component.
    let mut stack: Vec<&str> = path.split('/').collect();
    stack.pop(); // the link itself
    let root_depth = 1; // the root name itself must remain
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if stack.len() <= root_depth {
                    return Err(escape());
                }
                stack.pop();
            }
            c => stack.push(c),
        }
    }
    Ok(())
}

/// The manifest's declared directories as a tree of ids (0 is the destination), so a
/// symlink target is walked in time linear in its length, never re-hashing the path
/// so far at each `..` (a manifest may hold a million long targets).
struct DirTree<'a> {
    children: HashMap<(usize, &'a str), usize>,
}

impl<'a> DirTree<'a> {
    /// From entries whose parents were already checked to be declared before them.
    fn new(entries: &'a [Entry]) -> DirTree<'a> {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut children = HashMap::new();
        for e in entries {
            if let EntryKind::Dir = e.kind {
                let (parent, name) = match e.path.rsplit_once('/') {
                    Some((p, n)) => (ids.get(p).copied().unwrap_or(usize::MAX), n),
                    None => (0, e.path.as_str()),
                };
                let id = ids.len() + 1;
                ids.insert(&e.path, id);
                children.insert((parent, name), id);
            }
        }
        DirTree { children }
    }

    fn child(&self, parent: Option<usize>, name: &str) -> Option<usize> {
        self.children.get(&(parent?, name)).copied()
    }
}

/// A `..` in a symlink target may only cancel a component the manifest declares as a
/// directory. Cancelling a symlink would climb from wherever that symlink points, so
/// links that each stay inside the root lexically could still chain outside it
/// (`r/a/b/l -> ../..`, then `r/m -> a/b/l/../../../etc`). Cancelling an undeclared
/// name is refused too: it could be created as such a link later.
fn validate_symlink_hops(path: &str, target: &str, tree: &DirTree) -> Result<(), ManifestError> {
    // Ids of the components walked so far; None for anything but a declared directory.
    let mut stack: Vec<Option<usize>> = Vec::new();
    let mut at = Some(0);
    let (dir, _) = path.rsplit_once('/').unwrap_or(("", path));
    for c in dir.split('/').filter(|c| !c.is_empty()) {
        at = tree.child(at, c);
        stack.push(at);
    }
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if stack.pop().flatten().is_none() {
                    return Err(ManifestError::SymlinkEscape {
                        path: path.to_string(),
                        target: target.chars().take(200).collect(),
                    });
                }
            }
            c => {
                let parent = stack.last().copied().unwrap_or(Some(0));
                stack.push(tree.child(parent, c));
            }
        }
    }
    Ok(())
}

impl Manifest {
    /// Build a manifest for the given roots, hashing on several threads.
    pub fn build(roots: &[PathBuf], opts: &BuildOptions) -> Result<Manifest, ManifestError> {
        let mut entries = Vec::new();
        let mut sources: Vec<Option<PathBuf>> = Vec::new();
        let mut names = HashSet::new();
        for root in roots {
            let meta = fs::symlink_metadata(root).map_err(|e| io_err(root, e))?;
            let name = root
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_owned()))
                .or_else(|| root.file_name().map(|n| n.to_owned()))
                .ok_or_else(|| ManifestError::BadPath {
                    path: root.display().to_string(),
                    reason: "has no file name",
                })?;
            let name = name.to_str().ok_or_else(|| ManifestError::BadPath {
                path: root.display().to_string(),
                reason: "not UTF-8",
            })?;
            if !names.insert(name.to_string()) {
                return Err(ManifestError::BadPath {
                    path: name.to_string(),
                    reason: "two roots share this name",
                });
            }
            walk(root, name, &meta, &mut entries, &mut sources)?;
        }
        let total: u64 = entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .sum();
        let piece_size = match opts.piece_size {
            Some(p) => {
                if !p.is_power_of_two() || !(4096..=MAX_PIECE_SIZE).contains(&p) {
                    return Err(ManifestError::Malformed(format!(
                        "piece size {p} must be a power of two between 4 KiB and 16 MiB"
                    )));
                }
                p
            }
            None => choose_piece_size(total),
        };
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            piece_size,
            small_file_threshold: opts.small_file_threshold,
            entries,
        };
        hash_all(&mut m, &sources, opts.threads)?;
        m.validate()?;
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("manifest serialization cannot fail")
    }

    /// Decode and validate untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        // Peek at the version before decoding the rest, so a future format gets a clear error.
        if let Some(&v) = bytes.first() {
            if v != MANIFEST_VERSION {
                return Err(ManifestError::Version(v));
            }
        }
        let (m, rest): (Manifest, _) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err(ManifestError::Malformed("trailing bytes".into()));
        }
        m.validate()?;
        Ok(m)
    }

    pub fn content_id(&self) -> ContentId {
        ContentId(Md5::digest(self.encode()).into())
    }

    /// Check every structural rule a receiver relies on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mal = |s: String| Err(ManifestError::Malformed(s));
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        if !self.piece_size.is_power_of_two() || !(4096..=MAX_PIECE_SIZE).contains(&self.piece_size)
        {
            return mal(format!("piece size {}", self.piece_size));
        }
        if self.small_file_threshold > (MAX_PIECE_SIZE as u64) * 4 {
            return mal(format!(
                "small-file threshold {}",
                self.small_file_threshold
            ));
        }
        if self.entries.is_empty() {
            return mal("no entries".into());
        }
        if self.entries.len() > MAX_ENTRIES {
            return mal(format!("{} entries", self.entries.len()));
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut pieces = 0usize;
        let mut total: u64 = 0;
        for e in &self.entries {
            validate_rel_path(&e.path)?;
            if e.mode & !0o7777 != 0 {
                return mal(format!("mode {:o} of {}", e.mode, e.path));
            }
            if !seen.insert(&e.path) {
                return mal(format!("duplicate path {}", e.path));
            }
            // The parent must be a directory declared earlier: this also rules out
            // any path reaching through a symlink or a file.
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                if !dirs.contains(parent) {
                    return mal(format!("{} has no directory parent", e.path));
                }
            }
            match &e.kind {
                EntryKind::Dir => {
                    dirs.insert(&e.path);
                }
                EntryKind::Symlink { target } => validate_symlink(&e.path, target)?,
                EntryKind::File {
                    size, pieces: p, ..
                } => {
                    total = total
                        .checked_add(*size)
                        .ok_or_else(|| ManifestError::Malformed("total size overflows".into()))?;
                    let expect =
                        expected_piece_count(*size, self.piece_size, self.small_file_threshold);
                    let listed = if *size < self.small_file_threshold {
                        0
                    } else {
                        expect
                    };
                    if p.len() as u64 != listed {
                        return mal(format!(
                            "{} lists {} piece hashes, expected {listed}",
                            e.path,
                            p.len()
                        ));
                    }
                    pieces = pieces.saturating_add(expect as usize);
                    if pieces > MAX_PIECES {
                        return mal("too many pieces".into());
                    }
                }
            }
        }
        if self
            .entries
            .iter()
            .any(|e| matches!(e.kind, EntryKind::Symlink { .. }))
        {
            let tree = DirTree::new(&self.entries);
            for e in &self.entries {
                if let EntryKind::Symlink { target } = &e.kind {
                    validate_symlink_hops(&e.path, target, &tree)?;
                }
            }
        }
        Ok(())
    }

    /// The global piece table, in entry order.
    pub fn pieces(&self) -> Vec<PieceInfo> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if let EntryKind::File { size, md5, pieces } = &e.kind {
                if *size == 0 {
                    continue;
                }
                if *size < self.small_file_threshold {
                    out.push(PieceInfo {
                        entry: i,
                        offset: 0,
                        len: *size as u32,
                        md5: *md5,
                    });
                } else {
                    let ps = self.piece_size as u64;
                    for (k, h) in pieces.iter().enumerate() {
                        let off = k as u64 * ps;
                        out.push(PieceInfo {
                            entry: i,
                            offset: off,
                            len: (size - off).min(ps) as u32,
                            md5: *h,
                        });
                    }
                }
            }
        }
        out
    }

    pub fn total_size(&self) -> u64 {
        self.files().map(|(_, size, _)| size).sum()
    }

    /// (entry index, size, md5) of every regular file.
    pub fn files(&self) -> impl Iterator<Item = (usize, u64, Md5Sum)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.kind {
                EntryKind::File { size, md5, .. } => Some((i, *size, *md5)),
                _ => None,
            })
    }

    /// Distinct top-level names, in order.
    pub fn roots(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for e in &self.entries {
            let r = e.path.split('/').next().unwrap_or("");
            if out.last() != Some(&r) && !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    /// Largest piece, which bounds per-piece buffers.
    pub fn max_piece_len(&self) -> u32 {
        self.pieces().iter().map(|p| p.len).max().unwrap_or(0)
    }
}

/// Pieces a file of `size` occupies.
pub fn expected_piece_count(size: u64, piece_size: u32, threshold: u64) -> u64 {
    if size == 0 {
        0
    } else if size < threshold {
        1
    } else {
        size.div_ceil(piece_size as u64)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ManifestError {
    ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn walk(
    path: &Path,
    rel: &str,
    meta: &fs::Metadata,
    entries: &mut Vec<Entry>,
    sources: &mut Vec<Option<PathBuf>>,
) -> Result<(), ManifestError> {
    validate_rel_path(rel)?;
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| io_err(path, e))?;
        let target = target.to_str().ok_or_else(|| ManifestError::BadPath {
            path: rel.to_string(),
            reason: "symlink target is not UTF-8",
        })?;
        validate_symlink(rel, target)?;
        entries.push(Entry {
            path: rel.to_string(),
            mode: 0o777,
            kind: EntryKind::Symlink {
                target: target.to_string(),
            },
        });
        sources.push(None);
    } else if ft.is_dir() {
        entries.push(Entry {
            path: rel.to_string(),
            mode,
            kind: EntryKind::Dir,
        });
        sources.push(None);
        let mut children: Vec<_> = fs::read_dir(path)
            .map_err(|e| io_err(path, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(path, e))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let name = child.file_name();
            let name = name.to_str().ok_or_else(|| ManifestError::BadPath {
                path: child.path().display().to_string(),
                reason: "not UTF-8",
            })?;
            let cpath = child.path();
            let cmeta = fs::symlink_metadata(&cpath).map_err(|e| io_err(&cpath, e))?;
            walk(&cpath, &format!("{rel}/{name}"), &cmeta, entries, sources)?;
        }
    } else if ft.is_file() {
        entries.push(Entry {
            path: rel.to_string(),
            mode,
            kind: EntryKind::File {
                size: meta.size(),
                md5: [0; 16],
                pieces: Vec::new(),
            },
        });
        sources.push(Some(path.to_path_buf()));
    } else {
        return Err(ManifestError::Unsupported(path.to_path_buf()));
    }
    Ok(())
}

enum Job {
    Whole { entry: usize },
    Piece { entry: usize, index: usize },
}

/// Hash every file: whole-file MD5s and piece MD5s are independent jobs spread over
/// threads, biggest first. MD5 is serial per stream, so this is the only way past
/// one core's ~600 MiB/s.
fn hash_all(
    m: &mut Manifest,
    sources: &[Option<PathBuf>],
    threads: usize,
) -> Result<(), ManifestError> {
    let ps = m.piece_size as u64;
    let mut jobs = Vec::new();
    for (i, e) in m.entries.iter_mut().enumerate() {
        if let EntryKind::File { size, pieces, .. } = &mut e.kind {
            if *size == 0 {
                *pieces = Vec::new();
                continue;
            }
            jobs.push((*size, Job::Whole { entry: i }));
            if *size >= m.small_file_threshold {
                let n = size.div_ceil(ps) as usize;
                *pieces = vec![[0; 16]; n];
                for k in 0..n {
                    jobs.push((
                        (*size - k as u64 * ps).min(ps),
                        Job::Piece { entry: i, index: k },
                    ));
                }
            }
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.0));
    let threads = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    }
    .min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Option<usize>, Md5Sum)>> = Mutex::new(Vec::new());
    let first_err: Mutex<Option<ManifestError>> = Mutex::new(None);
    let sizes: Vec<u64> = m
        .entries
        .iter()
        .map(|e| match e.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        })
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, job)) = jobs.get(j) else { break };
                    let (entry, index) = match job {
                        Job::Whole { entry } => (*entry, None),
                        Job::Piece { entry, index } => (*entry, Some(*index)),
                    };
                    let path = sources[entry].as_ref().expect("files have sources");
                    let size = sizes[entry];
                    let (off, len) = match index {
                        None => (0, size),
                        Some(k) => {
                            let off = k as u64 * ps;
                            (off, (size - off).min(ps))
                        }
                    };
                    match hash_range(path, off, len, size, &mut buf) {
                        Ok(h) => results.lock().unwrap().push((entry, index, h)),
                        Err(e) => {
                            first_err.lock().unwrap().get_or_insert(e);
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    for (entry, index, h) in results.into_inner().unwrap() {
        if let EntryKind::File { md5, pieces, .. } = &mut m.entries[entry].kind {
            match index {
                None => *md5 = h,
                Some(k) => pieces[k] = h,
            }
        }
    }
    Ok(())
}

fn hash_range(
    path: &Path,
    off: u64,
    len: u64,
    size: u64,
    buf: &mut [u8],
) -> Result<Md5Sum, ManifestError> {
    let f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    if meta.len() != size {
        return Err(ManifestError::Changed(path.to_path_buf()));
    }
    let mut h = Md5::new();
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = f
            .read_at(&mut buf[..want], pos)
            .map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Err(ManifestError::Changed(path.to_path_buf()));
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize().into())
}

/// Whole-file MD5 of a file on disk (streaming, one thread).
pub fn md5_file(path: &Path) -> std::io::Result<Md5Sum> {
    let mut f = fs::File::open(path)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, len: usize, seed: u8) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        fs::write(p, data).unwrap();
    }

    #[test]
    fn piece_size_grows_with_content() {
        assert_eq!(choose_piece_size(0), MIN_PIECE_SIZE);
        assert_eq!(choose_piece_size(100 << 20), 128 << 10);
        assert_eq!(choose_piece_size(1 << 30), 1 << 20);
        assert_eq!(choose_piece_size(4 << 30), 4 << 20);
        assert_eq!(choose_piece_size(1 << 40), MAX_PIECE_SIZE);
    }

    #[test]
    fn builds_tree_with_size_based_pieces_and_md5sum_compatible_hashes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rel");
        fs::create_dir_all(root.join("sub")).unwrap();
        write(&root.join("small"), 1000, 1);
        write(&root.join("sub/big"), (3 << 20) + 17, 2);
        fs::write(root.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("sub/big", root.join("link")).unwrap();
        fs::set_permissions(root.join("small"), fs::Permissions::from_mode(0o750)).unwrap();
        let m = Manifest::build(
            std::slice::from_ref(&root),
            &BuildOptions {
                piece_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "rel",
                "rel/empty",
                "rel/link",
                "rel/small",
                "rel/sub",
                "rel/sub/big"
            ]
        );
        let pieces = m.pieces();
        // small: one piece; big: 4 pieces; empty: none.
        assert_eq!(pieces.len(), 5);
        assert_eq!(pieces[0].md5, md5_file(&root.join("small")).unwrap());
        assert_eq!(pieces[4].len, 17);
        let EntryKind::File { md5, .. } = &m.entries[5].kind else {
            panic!()
        };
        assert_eq!(*md5, md5_file(&root.join("sub/big")).unwrap());
        assert_eq!(m.entries[3].mode, 0o750);
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.content_id(), m.content_id());
    }

    #[test]
    fn rejects_traversal_absolute_nul_and_escaping_symlinks() {
        let base = Manifest {
            version: MANIFEST_VERSION,
            piece_size: 1 << 16,
            small_file_threshold: 1 << 20,
            entries: vec![Entry {
                path: "r".into(),
                mode: 0o755,
                kind: EntryKind::Dir,
            }],
        };
        for bad in ["r/../x", "/etc/passwd", "r/a\0b", "r//x", "r/./x", ".."] {
            let mut m = base.clone();
            m.entries.push(Entry {
                path: bad.into(),
                mode: 0o644,
                kind: EntryKind::Dir,
            });
            let err = Manifest::decode(&m.encode()).unwrap_err();
            assert!(matches!(err, ManifestError::BadPath { .. }), "{bad}: {err}");
        }
        for target in ["../../etc", "/etc/passwd", "a/../../.."] {
            let mut m = base.clone();
            m.entries.push(Entry {
                path: "r/l".into(),
                mode: 0o777,
                kind: EntryKind::Symlink {
                    target: target.into(),
                },
            });
            let err = Manifest::decode(&m.encode()).unwrap_err();
            assert!(
                matches!(err, ManifestError::SymlinkEscape { .. }),
                "{target}: {err}"
            );
        }
        // A path reaching through a symlink is rejected: its parent is not a directory.
        let mut m = base.clone();
        m.entries.push(Entry {
            path: "r/l".into(),
            mode: 0o777,
            kind: EntryKind::Symlink { target: "x".into() },
        });
        m.entries.push(Entry {
            path: "r/l/f".into(),
            mode: 0o644,
            kind: EntryKind::Dir,
        });
        assert!(matches!(
            Manifest::decode(&m.encode()).unwrap_err(),
            ManifestError::Malformed(_)
        ));
        // Inside-the-tree symlinks are fine, `..` included when it cancels a declared
        // directory.
        let mut ok = base.clone();
        ok.entries.push(Entry {
            path: "r/x".into(),
            mode: 0o755,
            kind: EntryKind::Dir,
        });
        ok.entries.push(Entry {
            path: "r/l".into(),
            mode: 0o777,
            kind: EntryKind::Symlink {
                target: "x/../y".into(),
            },
        });
        Manifest::decode(&ok.encode()).unwrap();
        // A `..` that cancels a symlink climbs from where that link points: each link
        // below is inside the root lexically, yet `r/m` resolves to `r/..`, outside.
        // Cancelling a component the manifest does not declare is refused too (it
        // could be created as such a link later).
        let link = |path: &str, target: &str| Entry {
            path: path.into(),
            mode: 0o777,
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        };
        let dir = |path: &str| Entry {
            path: path.into(),
            mode: 0o755,
            kind: EntryKind::Dir,
        };
        let chain = vec![dir("r/a"), link("r/a/l", ".."), link("r/m", "a/l/../x")];
        let undeclared = vec![link("r/m", "nothere/../x")];
        for extra in [chain, undeclared] {
            let mut m = base.clone();
            m.entries.extend(extra);
            let err = Manifest::decode(&m.encode()).unwrap_err();
            assert!(
                matches!(err, ManifestError::SymlinkEscape { .. }),
                "{:?}: {err}",
                m.entries
            );
        }
    }

    #[test]
    fn building_refuses_escaping_symlink() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", root.join("evil")).unwrap();
        assert!(matches!(
            Manifest::build(&[root], &BuildOptions::default()),
            Err(ManifestError::SymlinkEscape { .. })
        ));
    }

    #[test]
    fn forged_piece_counts_are_rejected() {
        let m = Manifest {
            version: MANIFEST_VERSION,
            piece_size: 1 << 16,
            small_file_threshold: 1 << 20,
            entries: vec![Entry {
                path: "f".into(),
                mode: 0o644,
                kind: EntryKind::File {
                    size: u64::MAX,
                    md5: [0; 16],
                    pieces: vec![],
                },
            }],
        };
        assert!(Manifest::decode(&m.encode()).is_err());
        assert!(Manifest::decode(&[MANIFEST_VERSION, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(matches!(
            Manifest::decode(&[9]),
            Err(ManifestError::Version(9))
        ));
    }
}
