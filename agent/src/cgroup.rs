//! One freezer cgroup per command, so that a timeout or a cancel kills everything the
//! command started, including descendants that left its process group and session
//! (`setsid daemon &`), which `killpg` cannot reach.
//!
//! Why the cgroup v1 freezer: it is what these hosts mount (`/sys/fs/cgroup/freezer`),
//! and freezing first means no process in the group can fork while we read
//! `cgroup.procs` and signal each pid: kill-while-forking races are impossible. The
//! sequence is freeze, SIGKILL every member, thaw (a frozen task dies only once it is
//! thawed).
//!
//! Layout: `<freezer mount><agent's own freezer cgroup>/octo/<agent pid>-<n>`. The
//! child joins its cgroup between `fork` and `exec` (before it switches user), by
//! writing its pid to a `cgroup.procs` descriptor the parent opened, so there is no
//! moment in which the command runs outside it.
//!
//! Where no freezer hierarchy is mounted, or the agent may not create cgroups (not
//! root), [`Cgroup::create`] returns `None` and the command is contained by its
//! process group only, as before.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the freezer hierarchy is mounted.
const FREEZER_MOUNT: &str = "/sys/fs/cgroup/freezer";

/// How long freezing may take before the kill goes ahead anyway.
const FREEZE_WAIT: Duration = Duration::from_secs(1);

/// How long a background thread keeps trying to remove an emptied cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A command's freezer cgroup. Dropping it removes the directory once it is empty.
#[derive(Debug)]
pub(crate) struct Cgroup {
    dir: PathBuf,
    /// The cgroup the agent itself is in: where survivors of a command that exited by
    /// itself are moved, so that they are left as they would be without us.
    parent: PathBuf,
    /// `cgroup.procs`, open for the child to write its pid into.
    procs: Option<OwnedFd>,
}

impl Cgroup {
    /// A fresh cgroup for one command, or `None` where freezer cgroups are not
    /// available to this process.
    pub(crate) fn create() -> Option<Cgroup> {
        Cgroup::create_under(Path::new(FREEZER_MOUNT))
            .map_err(|e| tracing::debug!("no freezer cgroup for the command: {e}"))
            .ok()
    }

    fn create_under(mount: &Path) -> io::Result<Cgroup> {
        let own = own_freezer_path()?;
        let parent = mount.join(own.trim_start_matches('/'));
        let base = parent.join("octo");
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        sweep_stale(&base);
        let dir = base.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .and_then(|f| {
                // A freezer cgroup has a state file; anything else is not one.
                std::fs::metadata(dir.join("freezer.state")).map(|_| f)
            });
        match procs {
            Ok(f) => Ok(Cgroup {
                dir,
                parent,
                procs: Some(f.into()),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// What the child needs to join: the raw descriptor of `cgroup.procs` (valid
    /// until the parent drops this cgroup, and closed on exec).
    pub(crate) fn join_fd(&self) -> Option<libc::c_int> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The parent's copy of the descriptor is no longer needed once the child runs.
    pub(crate) fn child_started(&mut self) {
        self.procs = None;
    }

    /// Pids in the cgroup now.
    pub(crate) fn members(&self) -> Vec<libc::pid_t> {
        read_pids(&self.dir.join("cgroup.procs"))
    }

    /// No live process is left (zombies hold nothing and run no code).
    pub(crate) fn is_empty(&self) -> bool {
        self.members().into_iter().all(is_zombie_or_gone)
    }

    /// Sends `signal` to every member, without freezing (for the polite SIGTERM).
    pub(crate) fn signal_all(&self, signal: libc::c_int) {
        for pid in self.members() {
            kill(pid, signal);
        }
    }

    /// Freezes the cgroup, SIGKILLs every member, and thaws it so they die.
    pub(crate) fn kill_all(&self) {
        let state = self.dir.join("freezer.state");
        let frozen = std::fs::write(&state, "FROZEN").is_ok();
        if frozen {
            let until = Instant::now() + FREEZE_WAIT;
            while Instant::now() < until {
                match std::fs::read_to_string(&state) {
                    Ok(s) if s.trim() == "FROZEN" => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break,
                }
            }
        }
        for pid in self.members() {
            kill(pid, libc::SIGKILL);
        }
        if frozen {
            let _ = std::fs::write(&state, "THAWED");
        }
    }

    /// Moves whatever is still running to the agent's own cgroup: a command that
    /// exited by itself may leave services behind on purpose.
    pub(crate) fn release_survivors(&self) {
        let target = self.parent.join("cgroup.procs");
        for pid in self.members() {
            let _ = std::fs::write(&target, pid.to_string());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.procs = None;
        if std::fs::remove_dir(&self.dir).is_ok() {
            return;
        }
        // Killed members may take a moment to leave; do not hold the caller up.
        let dir = self.dir.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + REMOVE_WAIT;
            while Instant::now() < until {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!(dir = %dir.display(), "a command's cgroup is still in use");
        });
    }
}

/// Runs in the forked child (async-signal-safe, no allocation): writes the child's
/// own pid into the cgroup's `cgroup.procs`.
pub(crate) fn join_in_child(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let mut buf = [0u8; 16];
    let mut n = pid as u32;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &buf[i..];
    // SAFETY: writes from a live stack buffer of the given length.
    let rc = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The agent's own path in the freezer hierarchy, from `/proc/self/cgroup`.
fn own_freezer_path() -> io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls.split(',').any(|c| c == "freezer").then_some(path)
        })
        .next()
        .map(str::to_string)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no freezer hierarchy"))
}

/// Removes the empty cgroups of agents that are gone (killed before their cleanup
/// thread ran). A non-empty one is left alone: `rmdir` refuses it.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((pid, _)) = name.to_str().and_then(|n| n.split_once('-')) else {
            continue;
        };
        let mine = pid == std::process::id().to_string();
        if !mine && pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn read_pids(path: &Path) -> Vec<libc::pid_t> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| *p > 0)
        .collect()
}

fn kill(pid: libc::pid_t, signal: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; ESRCH needs no handling.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn is_zombie_or_gone(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X', 'x'])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lists_parse() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cgroup.procs");
        std::fs::write(&p, "12\n7\n\nx\n0\n").unwrap();
        assert_eq!(read_pids(&p), vec![12, 7]);
        assert!(read_pids(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn no_freezer_mount_means_no_cgroup() {
        let d = tempfile::tempdir().unwrap();
        // A directory that is not a cgroup hierarchy has no freezer.state.
        assert!(Cgroup::create_under(d.path()).is_err());
    }
}
