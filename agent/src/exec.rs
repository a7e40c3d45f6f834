//! The command-execution service: run a shell line, a Python script or a jar on this
//! host, optionally as another user, stream its output live and return a capped
//! capture with the exit status.
//!
//! Why this shape:
//! - **One process group per command.** The child calls `setsid` before `exec`, so the
//!   command and everything it forks share a process group whose id is the child's
//!   pid. A timeout then kills the *group* (SIGTERM, then SIGKILL after
//!   [`KILL_GRACE`]), not just the shell: `sh -c 'a & b'` must not leave `a` running
//!   on the host. `setsid` also detaches from any controlling terminal, so a command
//!   that opens `/dev/tty` fails instead of stealing the agent's.
//! - **Pipes are not trusted to close.** A background grandchild inherits stdout and
//!   can hold it open long after the command is gone. Once the command has exited (or
//!   its group was killed), reading continues for at most [`DRAIN_GRACE`]; then the
//!   pipes are dropped and `run` returns. Without this, `sh -c 'daemon &'` would hang
//!   the agent's request until the daemon exits. Such a background process is left
//!   alone when the command exited by itself (that is how services get started), but
//!   it loses its stdout.
//! - **Credential switch in the child, lookups in the parent.** `getpwnam_r` and
//!   `getgrouplist` read NSS files and allocate, which is not allowed between `fork`
//!   and `exec` in a multi-threaded process. They run before the spawn; the child
//!   only calls the async-signal-safe `setsid`, `setgroups`, `setgid`, `setuid` and
//!   `chdir`, in that order. `chdir` comes after `setuid`, so a working directory the
//!   user may not enter is refused as it would be for a login.
//! - **A clean environment for another user.** With `user`, the child gets only
//!   `HOME`, `USER`, `LOGNAME`, `SHELL`, a fixed [`USER_PATH`] and the spec's own
//!   variables, like `su -`: the agent's environment (which may hold its own
//!   configuration or secrets) must not leak into another account. Without `user`,
//!   the command simply inherits the agent's environment.
//! - **One cgroup per command, where available.** `setsid` lets a descendant leave
//!   the process group, so `killpg` alone misses `setsid daemon &`. Each command
//!   also runs in its own freezer cgroup ([`crate::cgroup`]); a timeout or a cancel
//!   SIGTERMs every member, then freezes the cgroup, SIGKILLs every member and thaws
//!   it. A command that exited by itself keeps its background processes (they are
//!   moved back to the agent's cgroup).
//! - **Output is capped per stream, live and captured alike.** `on_output` sees the
//!   first [`MAX_CAPTURE`] bytes of each stream as they arrive (the CLI shows them
//!   live), and the returned capture keeps the same bytes. Past the cap the command's
//!   output is still read (so it never blocks on a full pipe) but dropped, and the
//!   result is flagged truncated: 600 MB of output once queued up in the agent's
//!   session channel faster than it could be sent and drove it to 473 MB of RSS.
//! - **Scripts go to a private file.** A script body is written into a fresh `0700`
//!   directory in the temp dir, owned by the target user, and removed when `run`
//!   returns. Passing it on the command line would expose it in `ps` and hit
//!   `ARG_MAX`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// How many bytes of each stream [`ExecResult`] keeps.
pub const MAX_CAPTURE: usize = 1 << 20;

/// `PATH` given to commands run as another user.
pub const USER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Time between SIGTERM and SIGKILL to a timed-out process group.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output is still read after the command exited or its group was killed,
/// before pipes held open by stray descendants are abandoned.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How often a terminating group is checked for having died.
const GROUP_POLL: Duration = Duration::from_millis(50);

const READ_CHUNK: usize = 64 * 1024;

/// Which interpreter runs the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecKind {
    /// `sh -c <command> octo <args...>`, or `sh <script> <args...>`.
    Shell,
    /// `python3 <command> <args...>`, where `command` is a script path, or
    /// `python3 <script> <args...>`.
    Python,
    /// `java -jar <command> <args...>`, where `command` is a jar path, or
    /// `java -jar <script> <args...>`.
    Jar,
}

/// What to run, as whom, where, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub kind: ExecKind,
    /// Shell: the command line for `sh -c` (the args become `$1...`, `$0` is `octo`).
    /// Python and Jar: the path of the script or jar on this host. Ignored when
    /// `script` is set.
    pub command: String,
    pub args: Vec<String>,
    /// The script (or jar) body. It is written to a private temp file (mode 0700,
    /// owned by the target user) and run instead of `command`.
    pub script: Option<Vec<u8>>,
    /// Run as this user, with a clean login-like environment. `None`: run as the
    /// agent, with its environment.
    pub user: Option<String>,
    /// Working directory. Default: the user's home with `user`, else the agent's.
    pub cwd: Option<String>,
    /// Extra environment variables, applied last.
    pub env: Vec<(String, String)>,
    /// Kill the whole process group after this long.
    pub timeout_ms: Option<u64>,
}

impl ExecSpec {
    /// A shell command line with no options set.
    pub fn shell(command: impl Into<String>) -> ExecSpec {
        ExecSpec {
            kind: ExecKind::Shell,
            command: command.into(),
            args: Vec::new(),
            script: None,
            user: None,
            cwd: None,
            env: Vec::new(),
            timeout_ms: None,
        }
    }
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// How the command ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit code, if the command exited normally.
    pub exit_code: Option<i32>,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    /// The timeout expired and the process group was killed.
    pub timed_out: bool,
    /// The first [`MAX_CAPTURE`] bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first [`MAX_CAPTURE`] bytes of stderr.
    pub stderr: Vec<u8>,
    /// More than [`MAX_CAPTURE`] bytes arrived on stdout.
    pub stdout_truncated: bool,
    /// More than [`MAX_CAPTURE`] bytes arrived on stderr.
    pub stderr_truncated: bool,
    /// From spawn to the end of output.
    pub duration_ms: u64,
}

/// Why a command could not be run (a command that ran and failed is an
/// [`ExecResult`] with a non-zero exit, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("looking up user {user:?}: {source}")]
    UserLookup {
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("working directory {path:?}: {source}")]
    Cwd {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the script to {path}: {source}")]
    Script {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for {program}: {source}")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// Runs `spec`, calling `on_output` with every chunk of output as it arrives, and
/// returns when the command has exited and its output is drained (or abandoned; see
/// the module docs). stdin is `/dev/null`.
///
/// If the returned future is dropped early, the command's process group is killed.
pub async fn run<F>(spec: &ExecSpec, mut on_output: F) -> Result<ExecResult, ExecError>
where
    F: FnMut(OutStream, &[u8]) + Send,
{
    let account = match &spec.user {
        None => None,
        Some(name) => Some(
            lookup_user(name)
                .map_err(|source| ExecError::UserLookup {
                    user: name.clone(),
                    source,
                })?
                .ok_or_else(|| ExecError::UnknownUser(name.clone()))?,
        ),
    };
    let cwd = resolve_cwd(spec, account.as_ref())?;
    let script = match &spec.script {
        None => None,
        Some(body) => Some(ScriptFile::write(
            body,
            account.as_ref().map(|a| (a.uid, a.gid)),
        )?),
    };
    let (program, argv) = command_line(spec, script.as_ref().map(|s| s.path.as_path()));

    let mut cmd = Command::new(program);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(acct) = &account {
        cmd.env_clear()
            .env("HOME", &acct.home)
            .env("USER", &acct.name)
            .env("LOGNAME", &acct.name)
            .env("SHELL", &acct.shell)
            .env("PATH", USER_PATH);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    let mut cgroup = crate::cgroup::Cgroup::create();
    let setup = ChildSetup {
        cgroup_fd: cgroup.as_ref().and_then(crate::cgroup::Cgroup::join_fd),
        creds: account.as_ref().and_then(Account::creds_to_switch),
        cwd,
    };
    // SAFETY: `ChildSetup::apply` only makes async-signal-safe calls (setsid, write,
    // setgroups, setgid, setuid, chdir) on data prepared before the fork, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }

    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // `id()` is `Some` until the child has been waited for, which has not happened.
    let pgid = child.id().map_or(0, |id| id as libc::pid_t);
    if let Some(cg) = cgroup.as_mut() {
        cg.child_started();
    }
    let mut group = GroupGuard {
        pgid,
        cgroup,
        armed: true,
    };

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = Capture::default();
    let mut err = Capture::default();
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];

    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    // Pending timers: the timeout, the SIGKILL after a SIGTERM (while set, the group
    // is terminating), and the moment to stop reading.
    let mut deadline = spec.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut kill_at: Option<Instant> = None;
    let mut abandon_at: Option<Instant> = None;

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() && kill_at.is_none() {
            break;
        }
        let now = Instant::now();
        let wake = [
            deadline,
            kill_at.map(|k| k.min(now + GROUP_POLL)),
            abandon_at,
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            r = read_some(stdout.as_mut(), &mut out_buf) => match r {
                Ok(n) if n > 0 => {
                    let kept = out.push(&out_buf[..n]);
                    if !kept.is_empty() {
                        on_output(OutStream::Stdout, kept);
                    }
                }
                r => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "reading the command's stdout");
                    }
                    stdout = None;
                }
            },
            r = read_some(stderr.as_mut(), &mut err_buf) => match r {
                Ok(n) if n > 0 => {
                    let kept = err.push(&err_buf[..n]);
                    if !kept.is_empty() {
                        on_output(OutStream::Stderr, kept);
                    }
                }
                r => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "reading the command's stderr");
                    }
                    stderr = None;
                }
            },
            r = child.wait(), if status.is_none() => {
                status = Some(r.map_err(|source| ExecError::Wait {
                    program: program.to_owned(),
                    source,
                })?);
                if !timed_out {
                    // Finished in time: the timeout no longer applies, and whatever
                    // still holds the pipes gets DRAIN_GRACE to finish writing.
                    deadline = None;
                    abandon_at = Some(Instant::now() + DRAIN_GRACE);
                }
            }
            () = sleep_until_opt(wake) => {}
        }

        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            deadline = None;
            timed_out = true;
            group.signal(libc::SIGTERM);
            kill_at = Some(now + KILL_GRACE);
        }
        if let Some(k) = kill_at {
            // The main child must have been reaped before its group can be empty.
            let gone = status.is_some() && group.is_gone();
            if gone || k <= now {
                if !gone {
                    group.signal(libc::SIGKILL);
                    // As a session leader the child cannot leave its group, but a
                    // direct kill costs nothing should that ever change.
                    if status.is_none() {
                        let _ = child.start_kill();
                    }
                }
                kill_at = None;
                abandon_at = Some(now + DRAIN_GRACE);
            }
        }
        if abandon_at.is_some_and(|a| a <= now) {
            stdout = None;
            stderr = None;
        }
    }
    // A command that exited by itself may leave background processes running on
    // purpose; only a timeout or a dropped (cancelled) `run` kills the group.
    group.armed = false;
    if let Some(cg) = &group.cgroup {
        if timed_out {
            // Whatever slipped through (a member that forked while being signalled).
            cg.kill_all();
        } else {
            cg.release_survivors();
        }
    }
    drop(script);

    let status = status.expect("the loop ends only after the child was reaped");
    Ok(ExecResult {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: out.buf,
        stderr: err.buf,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// The program and its arguments for `spec`, with `script` (if any) replacing the
/// command.
fn command_line(spec: &ExecSpec, script: Option<&Path>) -> (&'static str, Vec<OsString>) {
    let target = || match script {
        Some(path) => path.as_os_str().to_owned(),
        None => OsString::from(&spec.command),
    };
    let mut argv: Vec<OsString> = match (spec.kind, script) {
        (ExecKind::Shell, None) => vec!["-c".into(), (&spec.command).into(), "octo".into()],
        (ExecKind::Shell, Some(path)) => vec![path.into()],
        (ExecKind::Python, _) => vec![target()],
        (ExecKind::Jar, _) => vec!["-jar".into(), target()],
    };
    argv.extend(spec.args.iter().map(OsString::from));
    let program = match spec.kind {
        ExecKind::Shell => "sh",
        ExecKind::Python => "python3",
        ExecKind::Jar => "java",
    };
    (program, argv)
}

/// The directory the child changes into, checked to exist so that a typo is an
/// [`ExecError::Cwd`] rather than an anonymous spawn failure. A user without a home
/// directory starts in `/`, as `su -` does.
fn resolve_cwd(spec: &ExecSpec, account: Option<&Account>) -> Result<Option<CString>, ExecError> {
    let cwd_error = |path: &[u8], source| ExecError::Cwd {
        path: String::from_utf8_lossy(path).into_owned(),
        source,
    };
    let dir: Vec<u8> = match (&spec.cwd, account) {
        (Some(dir), _) => {
            let meta = std::fs::metadata(dir).map_err(|e| cwd_error(dir.as_bytes(), e))?;
            if !meta.is_dir() {
                return Err(cwd_error(
                    dir.as_bytes(),
                    io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                ));
            }
            dir.as_bytes().to_vec()
        }
        (None, Some(acct)) => {
            let home = Path::new(&acct.home);
            if home.is_dir() {
                acct.home.as_bytes().to_vec()
            } else {
                b"/".to_vec()
            }
        }
        (None, None) => return Ok(None),
    };
    CString::new(dir.clone()).map(Some).map_err(|_| {
        cwd_error(
            &dir,
            io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
        )
    })
}

/// A passwd entry plus the supplementary groups `initgroups` would set.
#[derive(Debug)]
pub(crate) struct Account {
    name: OsString,
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    home: OsString,
    shell: OsString,
    groups: Vec<libc::gid_t>,
}

impl Account {
    /// The credentials the child must switch to, or `None` when an unprivileged agent
    /// runs a command as itself (the switch would fail with EPERM and change nothing).
    fn creds_to_switch(&self) -> Option<Creds> {
        // SAFETY: geteuid cannot fail and has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && euid == self.uid {
            return None;
        }
        Some(Creds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        })
    }
}

#[derive(Debug)]
struct Creds {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// Looks `name` up in the passwd database. `Ok(None)`: no such user.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<Account>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid value; it is
        // only read after getpwnam_r filled it in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and `buf.len()` is the size of
        // the buffer the strings are stored in.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if result.is_null() {
            // Some NSS modules report "not found" as an error code (getpwnam_r(3)).
            return match rc {
                0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
                rc => Err(io::Error::from_raw_os_error(rc)),
            };
        }
        // SAFETY: on success the string fields point into `buf` (or are null for
        // some NSS modules), NUL-terminated.
        let field = |p: *const libc::c_char| -> OsString {
            if p.is_null() {
                OsString::new()
            } else {
                OsStr::from_bytes(unsafe { CStr::from_ptr(p) }.to_bytes()).to_owned()
            }
        };
        let groups = group_list(&cname, pwd.pw_gid)?;
        return Ok(Some(Account {
            name: field(pwd.pw_name),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: field(pwd.pw_dir),
            shell: field(pwd.pw_shell),
            groups,
        }));
    }
}

/// Looks a group name up in the group database. `Ok(None)`: no such group.
pub(crate) fn lookup_group(name: &str) -> io::Result<Option<libc::gid_t>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: an all-zero group (null pointers) is a valid value; it is only read
        // after getgrnam_r filled it in.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and `buf.len()` is the size of
        // the buffer the strings are stored in.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if result.is_null() {
            return match rc {
                0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
                rc => Err(io::Error::from_raw_os_error(rc)),
            };
        }
        return Ok(Some(grp.gr_gid));
    }
}

/// The user's groups as `initgroups` would compute them (including `gid`).
fn group_list(name: &CStr, gid: libc::gid_t) -> io::Result<Vec<libc::gid_t>> {
    let mut size: libc::c_int = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; size as usize];
        let mut count = size;
        // SAFETY: `groups` has room for `count` entries.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return Ok(groups);
        }
        // glibc stores the needed size in `count`; others may not.
        size = if count > size { count } else { size * 2 };
        if size > 1 << 16 {
            return Err(io::Error::other("the user is in too many groups"));
        }
    }
}

/// What the child does between `fork` and `exec`.
struct ChildSetup {
    /// `cgroup.procs` of the command's cgroup, to join first.
    cgroup_fd: Option<libc::c_int>,
    creds: Option<Creds>,
    cwd: Option<CString>,
}

impl ChildSetup {
    /// Runs in the forked child: async-signal-safe calls only, no allocation.
    fn apply(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        // SAFETY: plain system calls on data owned by `self`; the group list pointer
        // and length describe a live Vec and the cwd is NUL-terminated.
        unsafe {
            // The agent itself runs with umask 077; commands get the usual one.
            libc::umask(0o022);
            check(libc::setsid())?;
            if let Some(fd) = self.cgroup_fd {
                crate::cgroup::join_in_child(fd)?;
            }
            if let Some(c) = &self.creds {
                check(libc::setgroups(c.groups.len() as _, c.groups.as_ptr()))?;
                check(libc::setgid(c.gid))?;
                check(libc::setuid(c.uid))?;
            }
            if let Some(dir) = &self.cwd {
                check(libc::chdir(dir.as_ptr()))?;
            }
        }
        Ok(())
    }
}

/// The command's process group and, where available, its cgroup. Kills both on drop
/// while armed: a cancelled `run` leaves nothing behind.
#[derive(Debug)]
struct GroupGuard {
    pgid: libc::pid_t,
    cgroup: Option<crate::cgroup::Cgroup>,
    armed: bool,
}

impl GroupGuard {
    /// Signals the process group and every member of the cgroup. SIGKILL goes to the
    /// cgroup frozen, so nothing in it can fork away meanwhile.
    fn signal(&self, signal: libc::c_int) {
        signal_group(self.pgid, signal);
        if let Some(cg) = &self.cgroup {
            if signal == libc::SIGKILL {
                cg.kill_all();
            } else {
                cg.signal_all(signal);
            }
        }
    }

    /// Nothing the command started is alive any more.
    fn is_gone(&self) -> bool {
        group_is_gone(self.pgid) && self.cgroup.as_ref().is_none_or(|c| c.is_empty())
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // `killpg(0, ..)` would signal the agent's own group.
    if pgid > 0 {
        // SAFETY: killpg has no memory-safety preconditions. ESRCH (already gone) is
        // the expected failure and needs no handling.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// Every process of the group has died. Zombies count as dead: they hold no pipes
/// and run no code, and on hosts whose init reaps orphans lazily (or never, as in
/// some containers) waiting for them to vanish would always cost the full grace.
fn group_is_gone(pgid: libc::pid_t) -> bool {
    if pgid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::killpg(pgid, 0) };
    if rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    // Members remain; if `/proc` cannot tell whether they are zombies, assume not.
    group_has_live_member(Path::new("/proc"), pgid) == Some(false)
}

/// Scans `proc` for a process in group `pgid` that is not a zombie. A zombie thread
/// group leader whose other threads still run counts as live. `None`: `proc`
/// cannot be listed.
fn group_has_live_member(proc: &Path, pgid: libc::pid_t) -> Option<bool> {
    for entry in std::fs::read_dir(proc).ok()?.flatten() {
        if !entry.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        // The process may exit while we look; then it is not a live member.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let pgrp = fields.nth(1).and_then(|f| f.parse::<libc::pid_t>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let zombie = matches!(state, "Z" | "X" | "x");
        let threads = std::fs::read_dir(entry.path().join("task")).map_or(0, Iterator::count);
        if !zombie || threads > 1 {
            return Some(true);
        }
    }
    Some(false)
}

async fn read_some<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The first [`MAX_CAPTURE`] bytes of a stream.
#[derive(Debug, Default)]
struct Capture {
    buf: Vec<u8>,
    truncated: bool,
}

impl Capture {
    /// Keeps what fits under the cap and returns it (the part to stream).
    fn push<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let room = MAX_CAPTURE - self.buf.len();
        if data.len() > room {
            self.truncated = true;
        }
        let kept = &data[..data.len().min(room)];
        self.buf.extend_from_slice(kept);
        kept
    }
}

/// A script body in its own `0700` directory, removed on drop.
#[derive(Debug)]
struct ScriptFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ScriptFile {
    fn write(
        body: &[u8],
        owner: Option<(libc::uid_t, libc::gid_t)>,
    ) -> Result<ScriptFile, ExecError> {
        let dir = std::env::temp_dir().join(format!(
            ".octo-exec-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let fail = |path: &Path| {
            let path = path.to_owned();
            move |source| ExecError::Script { path, source }
        };
        // `create`, not `create_all`: an existing path (say, a planted symlink) fails.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(fail(&dir))?;
        // From here on the directory is removed on every path.
        let script = ScriptFile {
            path: dir.join("script"),
            dir,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&script.path)
            .map_err(fail(&script.path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(fail(&script.path))?;
        file.write_all(body).map_err(fail(&script.path))?;
        drop(file);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&script.path, Some(uid), Some(gid))
                .map_err(fail(&script.path))?;
            std::os::unix::fs::chown(&script.dir, Some(uid), Some(gid))
                .map_err(fail(&script.dir))?;
        }
        Ok(script)
    }
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::{BTreeSet, HashMap};
    use std::os::unix::process::CommandExt;
    use std::process::Command as StdCommand;
    use std::time::Instant as StdInstant;

    /// Runs `spec` and returns the result with everything `on_output` saw.
    async fn run_collect(spec: &ExecSpec) -> (ExecResult, Vec<u8>, Vec<u8>) {
        let mut seen_out = Vec::new();
        let mut seen_err = Vec::new();
        let result = run(spec, |stream, data| match stream {
            OutStream::Stdout => seen_out.extend_from_slice(data),
            OutStream::Stderr => seen_err.extend_from_slice(data),
        })
        .await
        .unwrap();
        (result, seen_out, seen_err)
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[tokio::test]
    async fn stdout_and_stderr_are_captured_and_streamed() {
        let (r, seen_out, seen_err) = run_collect(&ExecSpec::shell("echo out; echo err >&2")).await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.signal, None);
        assert!(!r.timed_out);
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(seen_out, b"out\n");
        assert_eq!(seen_err, b"err\n");
        assert!(!r.stdout_truncated && !r.stderr_truncated);
    }

    #[tokio::test]
    async fn shell_args_are_positional_parameters() {
        let mut spec = ExecSpec::shell(r#"printf '%s|' "$0" "$@""#);
        spec.args = vec!["a b".into(), "c".into()];
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(text(&r.stdout), "octo|a b|c|");
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let (r, _, _) = run_collect(&ExecSpec::shell("exit 3")).await;
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.signal, None);
    }

    #[tokio::test]
    async fn killing_signal_is_reported() {
        let (r, _, _) = run_collect(&ExecSpec::shell("kill -9 $$")).await;
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(!r.timed_out);
    }

    #[tokio::test]
    async fn capture_and_streaming_are_capped_alike() {
        let spec = ExecSpec::shell("head -c 3145728 /dev/zero; head -c 10 /dev/zero >&2");
        let (r, seen_out, seen_err) = run_collect(&spec).await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout.len(), MAX_CAPTURE);
        assert!(r.stdout_truncated);
        assert_eq!(
            seen_out.len(),
            MAX_CAPTURE,
            "nothing past the cap is streamed"
        );
        assert_eq!(r.stderr.len(), 10);
        assert_eq!(seen_err.len(), 10);
        assert!(!r.stderr_truncated);
    }

    #[test]
    fn capture_exactly_at_the_cap_is_not_truncated() {
        let mut c = Capture::default();
        c.push(&vec![1; MAX_CAPTURE - 1]);
        c.push(&[2]);
        assert!(!c.truncated);
        assert_eq!(c.buf.len(), MAX_CAPTURE);
        c.push(&[3]);
        assert!(c.truncated);
        assert_eq!(c.buf.len(), MAX_CAPTURE);
        assert_eq!(c.buf.last(), Some(&2));
    }

    /// The process is gone, or a zombie waiting for init to reap it.
    fn is_dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut spec = ExecSpec::shell(format!(
            "sleep 300 & echo $! > '{}'; echo started; sleep 300",
            pidfile.display()
        ));
        spec.timeout_ms = Some(500);
        let began = StdInstant::now();
        let (r, seen_out, _) = run_collect(&spec).await;
        let took = began.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(took >= Duration::from_millis(500), "took {took:?}");
        // Everything died on SIGTERM, so no waiting for the SIGKILL.
        assert!(
            took < Duration::from_millis(500) + KILL_GRACE,
            "took {took:?}"
        );
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGTERM));
        assert_eq!(seen_out, b"started\n");

        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let until = StdInstant::now() + Duration::from_secs(2);
        while !is_dead(pid) && StdInstant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_dead(pid), "grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn timeout_kills_a_descendant_that_left_the_session() {
        // `setsid` puts the loop in a session (and process group) of its own, out of
        // reach of killpg; it also ignores SIGTERM, so only the cgroup's SIGKILL ends it.
        let mut spec = ExecSpec::shell(
            "setsid sh -c 'trap \"\" TERM; while :; do sleep 1; done' & echo $!; sleep 300",
        );
        spec.timeout_ms = Some(300);
        let (r, seen_out, _) = run_collect(&spec).await;
        assert!(r.timed_out);
        let pid: i32 = text(&seen_out).trim().parse().unwrap();
        let until = StdInstant::now() + Duration::from_secs(3);
        while !is_dead(pid) && StdInstant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let survived = !is_dead(pid);
        if survived {
            // SAFETY: plain kill of the test's own stray process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        assert!(
            !survived,
            "the setsid descendant {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn term_ignoring_group_is_killed() {
        let mut spec = ExecSpec::shell("trap '' TERM; sleep 300 & wait; sleep 300");
        spec.timeout_ms = Some(200);
        let began = StdInstant::now();
        let (r, _, _) = run_collect(&spec).await;
        let took = began.elapsed();
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(
            took >= Duration::from_millis(200) + KILL_GRACE,
            "took {took:?}"
        );
        assert!(took < Duration::from_secs(8), "took {took:?}");
    }

    #[tokio::test]
    async fn background_process_holding_stdout_does_not_hang_run() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = ExecSpec::shell(format!(
            "sleep 300 & echo $! > '{}'; echo done",
            pidfile.display()
        ));
        let began = StdInstant::now();
        let (r, _, _) = run_collect(&spec).await;
        let took = began.elapsed();
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let alive = !is_dead(pid);
        // SAFETY: plain kill of the test's own background process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r.exit_code, Some(0));
        assert!(!r.timed_out);
        assert_eq!(r.stdout, b"done\n");
        assert!(took < DRAIN_GRACE + Duration::from_secs(3), "took {took:?}");
        assert!(alive, "a command's background process is left running");
    }

    #[tokio::test]
    async fn dropping_run_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = ExecSpec::shell(format!("echo $$ > '{}'; sleep 300", pidfile.display()));
        let cancelled =
            tokio::time::timeout(Duration::from_millis(500), run(&spec, |_, _| {})).await;
        assert!(cancelled.is_err(), "a 300 s sleep finished early");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let until = StdInstant::now() + Duration::from_secs(2);
        while !is_dead(pid) && StdInstant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_dead(pid), "{pid} survived a dropped run");
    }

    #[test]
    fn zombie_members_count_as_gone() {
        let mut child = StdCommand::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as libc::pid_t;
        assert!(!group_is_gone(pgid));
        assert_eq!(group_has_live_member(Path::new("/proc"), pgid), Some(true));
        // SAFETY: plain kill of the test's own child.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        // Not reaped yet: the group's only member is a zombie.
        let until = StdInstant::now() + Duration::from_secs(2);
        while !group_is_gone(pgid) && StdInstant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(group_is_gone(pgid));
        assert!(!is_dead_by_kill(pgid), "the zombie is still there");
        child.wait().unwrap();
        assert!(is_dead_by_kill(pgid));
        assert_eq!(
            group_has_live_member(Path::new("/nonexistent-octo-proc"), pgid),
            None
        );
    }

    /// `kill(pid, 0)` fails with ESRCH: not even a zombie is left.
    fn is_dead_by_kill(pid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks for existence.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    #[tokio::test]
    async fn command_runs_in_its_own_session() {
        let (r, _, _) = run_collect(&ExecSpec::shell("ps -o sid= -o pgid= -p $$")).await;
        let fields: Vec<&str> = text(&r.stdout).split_whitespace().collect();
        assert_eq!(fields.len(), 2, "{:?}", text(&r.stdout));
        assert_eq!(fields[0], fields[1]);
        // SAFETY: getsid(0) queries the calling process.
        let own_sid = unsafe { libc::getsid(0) };
        assert_ne!(fields[0], own_sid.to_string());
    }

    #[tokio::test]
    async fn python_runs_a_script_body() {
        let spec = ExecSpec {
            kind: ExecKind::Python,
            script: Some(b"import sys\nprint(1+1)\nprint(sys.argv[1:])\n".to_vec()),
            args: vec!["x".into()],
            ..ExecSpec::shell("")
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(text(&r.stdout), "2\n['x']\n", "stderr: {}", text(&r.stderr));
        assert_eq!(r.exit_code, Some(0));
    }

    #[tokio::test]
    async fn python_runs_a_script_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.py");
        std::fs::write(&path, "print(6*7)\n").unwrap();
        let spec = ExecSpec {
            kind: ExecKind::Python,
            ..ExecSpec::shell(path.to_str().unwrap())
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(text(&r.stdout), "42\n");
    }

    #[tokio::test]
    async fn missing_interpreter_is_a_spawn_error() {
        let spec = ExecSpec {
            kind: ExecKind::Python,
            env: vec![("PATH".into(), "/nonexistent-octo".into())],
            ..ExecSpec::shell("x.py")
        };
        match run(&spec, |_, _| {}).await {
            Err(ExecError::Spawn { program, source }) => {
                assert_eq!(program, "python3");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_cwd_is_a_cwd_error() {
        let mut spec = ExecSpec::shell("true");
        spec.cwd = Some("/nonexistent-octo-dir".into());
        assert!(matches!(
            run(&spec, |_, _| {}).await,
            Err(ExecError::Cwd { .. })
        ));
        let file = tempfile::NamedTempFile::new().unwrap();
        spec.cwd = Some(file.path().to_str().unwrap().into());
        assert!(matches!(
            run(&spec, |_, _| {}).await,
            Err(ExecError::Cwd { .. })
        ));
    }

    #[tokio::test]
    async fn cwd_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ExecSpec::shell("pwd -P");
        spec.cwd = Some(dir.path().to_str().unwrap().into());
        let (r, _, _) = run_collect(&spec).await;
        let expected = dir.path().canonicalize().unwrap();
        assert_eq!(text(&r.stdout).trim_end(), expected.to_str().unwrap());
    }

    #[tokio::test]
    async fn env_is_added_to_the_agents_environment() {
        let mut spec = ExecSpec::shell(r#"echo "$OCTO_EXEC_T1"; echo "$PATH""#);
        spec.env = vec![("OCTO_EXEC_T1".into(), "v1".into())];
        let (r, _, _) = run_collect(&spec).await;
        let parent_path = std::env::var("PATH").unwrap();
        assert_eq!(text(&r.stdout), format!("v1\n{parent_path}\n"));
    }

    #[tokio::test]
    async fn shell_script_body_with_args() {
        let spec = ExecSpec {
            script: Some(b"#!/bin/sh\necho \"$# $1 $2\"\nstat -c %a \"$0\"\n".to_vec()),
            args: vec!["one".into(), "two".into()],
            ..ExecSpec::shell("ignored")
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(
            text(&r.stdout),
            "2 one two\n700\n",
            "stderr: {}",
            text(&r.stderr)
        );
    }

    #[tokio::test]
    async fn script_file_is_removed_afterwards() {
        let spec = ExecSpec {
            script: Some(b"dirname \"$0\"".to_vec()),
            ..ExecSpec::shell("")
        };
        let (r, _, _) = run_collect(&spec).await;
        let dir = text(&r.stdout).trim_end().to_owned();
        assert!(dir.contains(".octo-exec-"), "{dir}");
        assert!(!Path::new(&dir).exists(), "{dir} was left behind");
    }

    #[tokio::test]
    async fn unknown_user_is_reported() {
        let mut spec = ExecSpec::shell("true");
        spec.user = Some("octo-no-such-user-xyz".into());
        match run(&spec, |_, _| {}).await {
            Err(ExecError::UnknownUser(name)) => assert_eq!(name, "octo-no-such-user-xyz"),
            other => panic!("expected UnknownUser, got {other:?}"),
        }
    }

    /// A real account, removed with its home directory on drop.
    struct TestUser {
        name: String,
    }

    impl TestUser {
        fn create() -> TestUser {
            let name = format!("octo-exec-test-{:08x}", rand::random::<u32>());
            let status = StdCommand::new("useradd")
                .args(["-m", "-s", "/bin/sh", &name])
                .status()
                .expect("running useradd (the tests run as root)");
            assert!(status.success(), "useradd {name} failed");
            TestUser { name }
        }
    }

    impl Drop for TestUser {
        fn drop(&mut self) {
            let _ = StdCommand::new("userdel")
                .args(["-r", &self.name])
                .stderr(Stdio::null())
                .status();
        }
    }

    fn command_output(program: &str, args: &[&str]) -> String {
        let out = StdCommand::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[tokio::test]
    async fn runs_as_another_user_with_a_clean_environment() {
        let user = TestUser::create();
        let passwd = command_output("getent", &["passwd", &user.name]);
        let fields: Vec<&str> = passwd.trim_end().split(':').collect();
        let (uid, gid, home) = (fields[2], fields[3], fields[5]);

        let spec = ExecSpec {
            user: Some(user.name.clone()),
            env: vec![("OCTO_EXEC_EXTRA".into(), "yes".into())],
            ..ExecSpec::shell("id -u; id -g; id -G; pwd; echo ---; env")
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(r.exit_code, Some(0), "stderr: {}", text(&r.stderr));
        let out = text(&r.stdout);
        let (ids, env) = out.split_once("---\n").unwrap();
        let ids: Vec<&str> = ids.lines().collect();
        assert_eq!(ids[0], uid);
        assert_eq!(ids[1], gid);
        let groups: BTreeSet<&str> = ids[2].split_whitespace().collect();
        let expected_groups = command_output("id", &["-G", &user.name]);
        let expected_groups: BTreeSet<&str> = expected_groups.split_whitespace().collect();
        assert_eq!(groups, expected_groups);
        assert_eq!(ids[3], home, "default cwd is the home directory");

        let env: HashMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(env.get("HOME"), Some(&home));
        assert_eq!(env.get("USER"), Some(&user.name.as_str()));
        assert_eq!(env.get("LOGNAME"), Some(&user.name.as_str()));
        assert_eq!(env.get("SHELL"), Some(&"/bin/sh"));
        assert_eq!(env.get("PATH"), Some(&USER_PATH));
        assert_eq!(env.get("OCTO_EXEC_EXTRA"), Some(&"yes"));
        // Whatever the shell itself adds, nothing comes from the agent.
        let allowed = [
            "HOME",
            "USER",
            "LOGNAME",
            "SHELL",
            "PATH",
            "OCTO_EXEC_EXTRA",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "_",
        ];
        for key in env.keys() {
            assert!(
                allowed.contains(key),
                "unexpected variable {key} in {env:?}"
            );
        }
        assert!(
            std::env::vars().any(|(k, _)| !allowed.contains(&k.as_str())),
            "the test process has no variable that could leak"
        );

        // A script is owned by the user, private, and runs as them.
        let spec = ExecSpec {
            user: Some(user.name.clone()),
            script: Some(
                b"id -un; stat -c '%U %a' \"$0\"; stat -c '%U %a' \"$(dirname \"$0\")\"".to_vec(),
            ),
            ..ExecSpec::shell("")
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_eq!(
            text(&r.stdout),
            format!("{0}\n{0} 700\n{0} 700\n", user.name),
            "stderr: {}",
            text(&r.stderr)
        );

        // chdir happens after the switch: root's private directory is refused.
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let spec = ExecSpec {
            user: Some(user.name.clone()),
            cwd: Some(private.path().to_str().unwrap().into()),
            ..ExecSpec::shell("true")
        };
        match run(&spec, |_, _| {}).await {
            Err(ExecError::Spawn { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::PermissionDenied)
            }
            other => panic!("expected a permission error, got {other:?}"),
        }
    }

    /// Compiles a jar whose main class prints its arguments.
    fn build_jar(dir: &Path) -> PathBuf {
        std::fs::write(
            dir.join("Hello.java"),
            "public class Hello { public static void main(String[] a) { \
             System.out.println(\"jar:\" + String.join(\",\", a)); } }",
        )
        .unwrap();
        let classes = dir.join("classes");
        let status = StdCommand::new("javac")
            .arg("-d")
            .arg(&classes)
            .arg(dir.join("Hello.java"))
            .status()
            .unwrap();
        assert!(status.success(), "javac failed");
        let jar = dir.join("hello.jar");
        let status = StdCommand::new("jar")
            .arg("--create")
            .arg("--file")
            .arg(&jar)
            .args(["--main-class", "Hello", "-C"])
            .arg(&classes)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "jar failed");
        jar
    }

    #[tokio::test]
    async fn jar_runs_by_path_and_as_script_body() {
        let dir = tempfile::tempdir().unwrap();
        let jar = build_jar(dir.path());
        let by_path = ExecSpec {
            kind: ExecKind::Jar,
            args: vec!["a".into(), "b".into()],
            ..ExecSpec::shell(jar.to_str().unwrap())
        };
        let (r, _, _) = run_collect(&by_path).await;
        assert_eq!(text(&r.stdout), "jar:a,b\n", "stderr: {}", text(&r.stderr));
        assert_eq!(r.exit_code, Some(0));

        let as_body = ExecSpec {
            kind: ExecKind::Jar,
            script: Some(std::fs::read(&jar).unwrap()),
            args: vec!["c".into()],
            ..ExecSpec::shell("")
        };
        let (r, _, _) = run_collect(&as_body).await;
        assert_eq!(text(&r.stdout), "jar:c\n", "stderr: {}", text(&r.stderr));
    }

    #[tokio::test]
    async fn missing_jar_fails_with_a_message() {
        let spec = ExecSpec {
            kind: ExecKind::Jar,
            ..ExecSpec::shell("/nonexistent-octo/app.jar")
        };
        let (r, _, _) = run_collect(&spec).await;
        assert_ne!(r.exit_code, Some(0));
        assert!(
            text(&r.stderr).contains("/nonexistent-octo/app.jar"),
            "stderr: {}",
            text(&r.stderr)
        );
    }

    #[test]
    fn spec_and_result_survive_postcard_and_json() {
        let spec = ExecSpec {
            kind: ExecKind::Jar,
            command: "c".into(),
            args: vec!["a".into()],
            script: Some(vec![0, 1, 2]),
            user: Some("u".into()),
            cwd: Some("/".into()),
            env: vec![("K".into(), "V".into())],
            timeout_ms: Some(5),
        };
        let bytes = postcard::to_stdvec(&spec).unwrap();
        assert_eq!(postcard::from_bytes::<ExecSpec>(&bytes).unwrap(), spec);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ExecSpec>(&json).unwrap(), spec);

        let result = ExecResult {
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            stdout: b"x".to_vec(),
            stderr: Vec::new(),
            stdout_truncated: true,
            stderr_truncated: false,
            duration_ms: 7,
        };
        let bytes = postcard::to_stdvec(&result).unwrap();
        assert_eq!(postcard::from_bytes::<ExecResult>(&bytes).unwrap(), result);
        let bytes = postcard::to_stdvec(&OutStream::Stderr).unwrap();
        assert_eq!(
            postcard::from_bytes::<OutStream>(&bytes).unwrap(),
            OutStream::Stderr
        );
    }
}
