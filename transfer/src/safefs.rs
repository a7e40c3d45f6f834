//! File-system operations that are safe to run as root in directories other users own.
//!
//! Why this exists: an agent runs as root and writes into directories such as
//! `/home/deploy`, which their owner can change at any moment. A path-based `open`,
//! `chown` or `rename` follows whatever symlink that user planted there, so every
//! write here goes through directory descriptors instead:
//! - directories are opened one component at a time with `O_NOFOLLOW|O_DIRECTORY`,
//!   so no component can be a symlink, and everything below is reached with
//!   `openat`/`mkdirat`/`renameat` relative to such a descriptor;
//! - files are opened with `O_NOFOLLOW` (and `O_EXCL` when created), and their mode
//!   and owner are set with `fchmod`/`fchown` on the open descriptor;
//! - private directories (staging areas, data directories) are checked on their open
//!   descriptor: a directory, owned by the effective user, mode 0700.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

/// Flags for opening a directory without following a symlink.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Sets the process umask (returns the old one).
pub fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(Mode::from_raw_mode(mask)).bits()
}

/// A clear error when `name` under `dir` is a symlink; `e` otherwise.
fn explain(dir: impl AsFd, name: &OsStr, shown: &Path, e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
        if let Ok(st) = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink {
                return io::Error::other(format!(
                    "{} is a symbolic link; refusing to follow it",
                    shown.display()
                ));
            }
        }
    }
    errno(e)
}

/// Opens the directory `name` inside `dir` without following a symlink.
pub fn open_dir_at(dir: impl AsFd, name: &OsStr, shown: &Path) -> io::Result<OwnedFd> {
    let dir = dir.as_fd();
    rfs::openat(dir, name, DIR, Mode::empty()).map_err(|e| explain(dir, name, shown, e))
}

/// Opens the directory at `path`, one component at a time, refusing a symlink at any
/// of them (a relative path starts at the working directory).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let mut fd = if path.is_absolute() {
        rfs::open("/", DIR, Mode::empty()).map_err(errno)?
    } else {
        rfs::open(".", DIR, Mode::empty()).map_err(errno)?
    };
    let mut shown = if path.is_absolute() {
        std::path::PathBuf::from("/")
    } else {
        std::path::PathBuf::new()
    };
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                shown.push("..");
                fd = rfs::openat(&fd, "..", DIR, Mode::empty()).map_err(errno)?;
            }
            Component::Normal(n) => {
                shown.push(n);
                fd = open_dir_at(&fd, n, &shown)?;
            }
        }
    }
    Ok(fd)
}

/// Opens (creating with `mode` where missing) the directories of `rel` below `base`,
/// never following a symlink; returns the deepest one.
pub fn mkdirs_at(base: &OwnedFd, rel: &Path, mode: u32, shown: &Path) -> io::Result<OwnedFd> {
    let mut fd = base.try_clone()?;
    let mut at = shown.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err(io::Error::other(format!(
                "{} is not a plain relative path",
                rel.display()
            )));
        };
        at.push(n);
        let made = match rfs::mkdirat(&fd, n, Mode::from_raw_mode(mode)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(errno(e)),
        };
        fd = open_dir_at(&fd, n, &at)?;
        if made {
            // Exactly `mode`, whatever the umask.
            rfs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(errno)?;
        }
    }
    Ok(fd)
}

/// Opens the existing directories of `rel` below `base` (no creation, no symlinks).
pub fn walk_at(base: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = base.try_clone()?;
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err(io::Error::other("not a plain relative path"));
        };
        fd = open_dir_at(&fd, n, rel)?;
    }
    Ok(fd)
}

/// Why a directory is not private to this process's user, if it is not.
fn not_private(fd: &OwnedFd) -> io::Result<Option<String>> {
    let st = rfs::fstat(fd).map_err(errno)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Directory {
        return Ok(Some("is not a directory".into()));
    }
    if st.st_uid != euid() {
        return Ok(Some(format!(
            "is owned by uid {}, not by uid {}",
            st.st_uid,
            euid()
        )));
    }
    if st.st_mode & 0o7777 != 0o700 {
        return Ok(Some(format!(
            "has mode {:04o}, not 0700",
            st.st_mode & 0o7777
        )));
    }
    Ok(None)
}

/// Opens `name` in `dir` if it is a private directory: a real directory (not a
/// symlink), owned by the effective user, mode 0700. `Ok(None)` for anything else.
pub fn open_private_dir_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<OwnedFd>> {
    let fd = match rfs::openat(dir, name, DIR, Mode::empty()) {
        Ok(fd) => fd,
        Err(_) => return Ok(None),
    };
    Ok(match not_private(&fd)? {
        None => Some(fd),
        Some(_) => None,
    })
}

/// Creates `name` in `dir` as a fresh private directory (mode 0700, owned by the
/// effective user) and opens it; fails if the name exists.
pub fn create_private_dir_at(dir: &OwnedFd, name: &OsStr, shown: &Path) -> io::Result<OwnedFd> {
    rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(errno)?;
    let fd = open_dir_at(dir, name, shown)?;
    rfs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(errno)?;
    if let Some(why) = not_private(&fd)? {
        return Err(io::Error::other(format!("{} {why}", shown.display())));
    }
    Ok(fd)
}

/// A data directory: created 0700 if missing (with its parents), refused if it is a
/// symlink or owned by another user, and tightened to 0700 if its mode is wider.
/// Returns its open descriptor.
pub fn ensure_private_dir(path: &Path) -> io::Result<OwnedFd> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let parent_fd = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => rfs::open(p, DIR.difference(OFlags::NOFOLLOW), Mode::empty()).map_err(errno)?,
        None => rfs::open(".", DIR, Mode::empty()).map_err(errno)?,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no directory", path.display())))?;
    match rfs::mkdirat(&parent_fd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(errno(e)),
    }
    let fd = open_dir_at(&parent_fd, name, path)?;
    let st = rfs::fstat(&fd).map_err(errno)?;
    if st.st_uid != euid() {
        return Err(io::Error::other(format!(
            "{} is owned by uid {}, not by this process's uid {}; refusing to use it",
            path.display(),
            st.st_uid,
            euid()
        )));
    }
    if st.st_mode & 0o7777 != 0o700 {
        rfs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(errno)?;
    }
    Ok(fd)
}

/// Tightens an existing file to 0600 (via an `O_NOFOLLOW` descriptor), if present.
pub fn make_private_file(path: &Path) -> io::Result<()> {
    match rfs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => rfs::fchmod(&fd, Mode::from_raw_mode(0o600)).map_err(errno),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// Opens `name` in `dir` for reading and writing, never following a symlink. With
/// `excl` it must not exist yet; otherwise an existing one must be a regular file.
pub fn open_file_at(dir: &OwnedFd, name: &str, excl: bool, mode: u32) -> io::Result<File> {
    let mut flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if excl {
        flags |= OFlags::EXCL;
    }
    let fd = rfs::openat(dir, name, flags, Mode::from_raw_mode(mode)).map_err(errno)?;
    let st = rfs::fstat(&fd).map_err(errno)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Err(io::Error::other(format!("{name} is not a regular file")));
    }
    Ok(File::from(fd))
}

/// Opens an existing regular file `name` in `dir` read-only, never following a symlink
/// (`Ok(None)` if there is none).
pub fn open_read_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<File>> {
    match rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let st = rfs::fstat(&fd).map_err(errno)?;
            if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
                return Ok(None);
            }
            Ok(Some(File::from(fd)))
        }
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::LOOP) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// Opens a regular file by path for reading without following a symlink at its last
/// component (the caller vouches for the directories above it).
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    let fd = rfs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            io::Error::other(format!(
                "{} is a symbolic link; refusing to follow it",
                path.display()
            ))
        } else {
            errno(e)
        }
    })?;
    let st = rfs::fstat(&fd).map_err(errno)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(File::from(fd))
}

/// Sets mode and (optionally) owner on an open file or directory.
pub fn apply_mode_owner(fd: impl AsFd, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let fd = fd.as_fd();
    // Owner first: chown clears setuid/setgid bits, so the mode goes on after it.
    if let Some((uid, gid)) = owner {
        let (u, g) = (rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid));
        rfs::fchown(fd, Some(u), Some(g)).map_err(errno)?;
    }
    rfs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(errno)
}

/// Sets the owner of a symlink `name` in `dir` (the link itself, never its target).
pub fn chown_link_at(dir: &OwnedFd, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    let (u, g) = (rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid));
    rfs::chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
}

/// `renameat`: moves `from` in `from_dir` over `to` in `to_dir` (a symlink at `to` is
/// replaced, never followed).
pub fn rename_at(from_dir: &OwnedFd, from: &str, to_dir: &OwnedFd, to: &OsStr) -> io::Result<()> {
    rfs::renameat(from_dir, from, to_dir, to).map_err(errno)
}

/// `symlinkat`.
pub fn symlink_at(target: &OsStr, dir: &OwnedFd, name: &str) -> io::Result<()> {
    rfs::symlinkat(target, dir, name).map_err(errno)
}

/// Removes the file `name` in `dir`; one that is gone counts as removed.
pub fn unlink_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// Removes the directory `name` in `dir` after removing the plain files in it (a
/// staging area holds nothing else); the files are removed through the directory's
/// own descriptor, so nothing outside can be reached.
pub fn remove_flat_dir_at(dir: &OwnedFd, name: &OsStr, inner: &OwnedFd) -> io::Result<()> {
    for n in list_dir(inner)? {
        unlink_at(inner, &n)?;
    }
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// Up to `max` names in `dir` that start with `prefix` and end with `suffix`: the
/// directory may be someone else's, so nothing else is kept.
pub fn names_matching(
    dir: &OwnedFd,
    prefix: &str,
    suffix: &str,
    max: usize,
) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for e in rfs::Dir::read_from(dir).map_err(errno)? {
        let e = e.map_err(errno)?;
        let n = e.file_name().to_bytes();
        if n.starts_with(prefix.as_bytes()) && n.ends_with(suffix.as_bytes()) {
            out.push(OsStr::from_bytes(n).to_os_string());
            if out.len() >= max {
                break;
            }
        }
    }
    Ok(out)
}

/// Names in a directory (without `.` and `..`).
pub fn list_dir(dir: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let d = rfs::Dir::read_from(dir).map_err(errno)?;
    for e in d {
        let e = e.map_err(errno)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinked_components_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        assert!(open_dir(&d.path().join("real")).is_ok());
        let e = open_dir(&d.path().join("link")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::create_dir(d.path().join("real/sub")).unwrap();
        assert!(open_dir(&d.path().join("link/sub")).is_err());
        let base = open_dir(d.path()).unwrap();
        assert!(mkdirs_at(&base, Path::new("link/x"), 0o755, d.path()).is_err());
        assert!(!d.path().join("real/x").exists());
        assert!(open_file_at(&base, "link", false, 0o600).is_err());
    }

    #[test]
    fn private_dirs_are_checked_and_tightened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        std::os::unix::fs::symlink(&p, d.path().join("alias")).unwrap();
        let e = ensure_private_dir(&d.path().join("alias")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let base = open_dir(d.path()).unwrap();
        assert!(open_private_dir_at(&base, OsStr::new("data"))
            .unwrap()
            .is_some());
        assert!(open_private_dir_at(&base, OsStr::new("alias"))
            .unwrap()
            .is_none());
        std::fs::create_dir(d.path().join("wide")).unwrap();
        std::fs::set_permissions(
            d.path().join("wide"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert!(open_private_dir_at(&base, OsStr::new("wide"))
            .unwrap()
            .is_none());
    }
}
