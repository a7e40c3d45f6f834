//! The fetch service: `octo cp` asks an agent to fetch content into a destination path,
//! over the transfer engine (large content, peer to peer) or whole over HTTP from the
//! pool (small or hot files).
//!
//! Why it is shaped like this:
//! - **Swarm for big content**: every agent fetching the same ticket also serves it to
//!   the others while it fetches and for `linger_ms` after; it is verified piece by
//!   piece and by whole-file MD5 before it appears at the destination.
//! - **Pool for small content**: a swarm costs a manifest round trip and a tracker
//!   exchange, more than a 100 KiB file takes to send. The agent asks the center,
//!   which redirects to a pool member that holds the file (or serves it itself), and
//!   the download is checked against the MD5 before it is renamed into place.
//! - **The cache**: every verified file goes into the content cache (quota-bounded),
//!   so this agent serves it to the pool and a later copy of the same content to
//!   another path moves no bytes.
//! - **The destination is checked here, on the host**, where the file system is:
//!   absolute, no `..`, no parent that is a symlink.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use octopus_transfer::limit::{LimitSet, Limiter};
use octopus_transfer::manifest::hex;
use octopus_transfer::node::{self, NodeConfig};
use octopus_transfer::safefs;
use octopus_transfer::store::Finish;
use octopus_transfer::ticket::Ticket;

use crate::cache::ContentCache;
use crate::exec::ExecResult;
use crate::proto::{FetchSpec, PoolFile};

/// What a fetch needs from the agent around it.
#[derive(Debug, Clone)]
pub struct FetchCtx {
    pub cache: Option<Arc<ContentCache>>,
    /// The current center's API address, where pool URLs start.
    pub center: Arc<std::sync::Mutex<SocketAddr>>,
    /// This agent's limits, shared by all its transfers (agent config).
    pub node_up: Limiter,
    pub node_down: Limiter,
    /// Notified when content was added to the cache (the pool's holdings changed).
    pub cached: Arc<tokio::sync::Notify>,
    /// The center's CA (DER), pinned at enrollment: it verifies the center's HTTPS.
    pub ca: Arc<Vec<u8>>,
    /// The agent's CA-issued identity and the CA: the swarms of the fleet admit only
    /// peers with a certificate from the center's CA.
    pub identity: Option<octopus_transfer::tls::Identity>,
    pub trust: octopus_transfer::tls::Trust,
}

/// Called with (bytes in place, total bytes) about once a second.
pub type OnProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Checks `dest` before anything is written: absolute, normal components only, and
/// no existing parent of it is a symlink (which could lead outside where it says).
pub fn check_dest(dest: &str) -> Result<PathBuf, String> {
    let p = Path::new(dest);
    if !p.is_absolute() {
        return Err(format!("destination {dest:?} must be an absolute path"));
    }
    // On the text: `Path::components` silently drops `.` in the middle of a path.
    if dest.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("destination {dest:?} may not contain '.' or '..'"));
    }
    let mut at = PathBuf::from("/");
    let comps: Vec<Component> = p.components().collect();
    for c in comps.iter().skip(1).take(comps.len().saturating_sub(2)) {
        at.push(c);
        if let Ok(m) = std::fs::symlink_metadata(&at) {
            if m.file_type().is_symlink() {
                return Err(format!(
                    "destination {dest:?} goes through the symlink {}",
                    at.display()
                ));
            }
        }
    }
    Ok(p.to_path_buf())
}

/// Refuses modes with bits above 0o777 (setuid, setgid, sticky) unless the center
/// allowed them, and anything above 0o7777: the center checks this too, the agent
/// again in case a center (or a stored task) did not.
pub fn check_modes(spec: &FetchSpec) -> Result<(), String> {
    let modes = spec
        .mode
        .into_iter()
        .chain(spec.pool.as_ref().map(|p| p.mode));
    for m in modes {
        if m > 0o7777 {
            return Err(format!("mode {m:#o} is not a file mode"));
        }
        if m & !0o777 != 0 && !spec.allow_special_mode {
            return Err(format!(
                "mode {m:#o} sets setuid, setgid or sticky bits, which this copy may not"
            ));
        }
    }
    Ok(())
}

/// Fetches per `spec`. The result's stdout lists `md5  path` per file, like md5sum,
/// then one line `received N bytes in M ms`, and, when a download limit applies, one
/// line `limited C bytes by the copy's download limit and A by the agent's` (the bytes
/// charged to each limiter; C is counted on the swarm path only, A is the agent-wide
/// limiter's count over this run, which includes concurrent copies).
pub async fn run(
    spec: &FetchSpec,
    ctx: &FetchCtx,
    progress: OnProgress,
) -> Result<ExecResult, String> {
    let started = Instant::now();
    check_modes(spec)?;
    let dest = check_dest(&spec.dest)?;
    let owner = match &spec.owner {
        Some(o) => Some(resolve_owner(o)?),
        None => None,
    };
    if spec.mkdir {
        let parent = if spec.dest.ends_with('/') {
            dest.clone()
        } else {
            dest.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        // One component at a time from `/`, never through a link.
        let rel = parent.strip_prefix("/").unwrap_or(&parent);
        safefs::open_dir(Path::new("/"))
            .and_then(|root| safefs::mkdirs_at(&root, rel, 0o755, Path::new("/")))
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    // Mode and owner are applied by the writers on the open files before the rename
    // into place, never afterwards by path (a path can be swapped for a link).
    let agent_charged = ctx.node_down.charged();
    let mut copy_charged = 0;
    let (files, received) = match &spec.pool {
        Some(pf) => {
            let (pf, spec2, ctx2) = (pf.clone(), spec.clone(), ctx.clone());
            tokio::task::spawn_blocking(move || {
                let rt = tokio::runtime::Handle::current();
                pool_fetch(&rt, &pf, &spec2, &dest, owner, &ctx2, &*progress)
            })
            .await
            .map_err(|e| format!("the download thread failed: {e}"))??
        }
        None => {
            let (files, received, charged) = swarm_fetch(spec, ctx, dest, owner, progress).await?;
            copy_charged = charged;
            (files, received)
        }
    };
    let mut stdout = String::new();
    for (path, md5) in &files {
        stdout.push_str(&format!("{md5}  {}\n", path.display()));
    }
    stdout.push_str(&format!(
        "received {received} bytes in {} ms\n",
        started.elapsed().as_millis()
    ));
    if spec.limit_down.is_some() || ctx.node_down.rate().is_some() {
        stdout.push_str(&format!(
            "limited {copy_charged} bytes by the copy's download limit and {} by the agent's\n",
            ctx.node_down.charged() - agent_charged
        ));
    }
    Ok(success(stdout, started))
}

/// Seeds `spec.paths` (absolute, checked like destinations) for `spec.hold_ms` in the
/// background. The result's stdout: the ticket, then the total size.
pub async fn seed(spec: &crate::proto::SeedSpec, ctx: &FetchCtx) -> Result<ExecResult, String> {
    let started = Instant::now();
    if spec.paths.is_empty() {
        return Err("nothing to seed".into());
    }
    let mut roots = Vec::new();
    for p in &spec.paths {
        let path = check_dest(p)?;
        std::fs::symlink_metadata(&path).map_err(|e| format!("reading {p}: {e}"))?;
        roots.push(path);
    }
    let cfg = NodeConfig {
        listen: "0.0.0.0:0".parse().expect("valid"),
        limit_up: spec.limit_up,
        node_up: ctx.node_up.clone(),
        node_down: ctx.node_down.clone(),
        identity: ctx.identity.clone(),
        trust: ctx.trust.clone(),
        ..Default::default()
    };
    let h = node::share(
        cfg,
        roots,
        octopus_transfer::manifest::BuildOptions::default(),
    )
    .await
    .map_err(|e| format!("seeding: {e}"))?;
    let stdout = format!("{}\n{}\n", h.ticket().encode(), h.manifest().total_size());
    let hold = Duration::from_millis(spec.hold_ms);
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        h.shutdown().await;
    });
    Ok(success(stdout, started))
}

/// A successful run that printed `stdout`.
fn success(stdout: String, started: Instant) -> ExecResult {
    ExecResult {
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        stdout: stdout.into_bytes(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// How long a swarm fetch may make no progress before it fails as stalled. The
/// engine keeps asking its tracker for peers meanwhile, so a seeder that comes back
/// (a CLI that outlived a center restart) is found again within it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The swarm path: the transfer engine writes into `dest`, then every file is copied
/// into the cache.
async fn swarm_fetch(
    spec: &FetchSpec,
    ctx: &FetchCtx,
    dest: PathBuf,
    owner: Option<(u32, u32)>,
    progress: OnProgress,
) -> Result<(Vec<(PathBuf, String)>, u64, u64), String> {
    let ticket = Ticket::decode(&spec.ticket).map_err(|e| format!("reading the ticket: {e}"))?;
    let cfg = NodeConfig {
        listen: "0.0.0.0:0".parse().expect("valid"),
        limit_up: spec.limit_up,
        limit_down: spec.limit_down,
        node_up: ctx.node_up.clone(),
        node_down: ctx.node_down.clone(),
        tags: spec.tags.clone(),
        finish: Finish {
            mode: spec.mode.map(|m| m & 0o7777),
            owner,
            strip_special: !spec.allow_special_mode,
        },
        identity: ctx.identity.clone(),
        trust: ctx.trust.clone(),
        ..Default::default()
    };
    let h = node::get(cfg, ticket, dest)
        .await
        .map_err(|e| format!("starting the transfer: {e}"))?;
    let mut watch = h.progress();
    let mut stall_watch = h.progress();
    let reporter = tokio::spawn(async move {
        loop {
            let p = watch.borrow_and_update().clone();
            progress(p.have_bytes, p.total_bytes);
            if p.complete {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if watch.has_changed().is_err() {
                return;
            }
        }
    });
    // A swarm whose peers all went away (the CLI seeding it died with its center)
    // would otherwise sit at "running" until cancelled.
    let stalled = async move {
        let mut last = stall_watch.borrow_and_update().have_bytes;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = stall_watch.borrow_and_update().have_bytes;
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= STALL_TIMEOUT {
                return last;
            }
        }
    };
    let out = tokio::select! {
        o = h.completed() => o,
        have = stalled => Err(format!(
            "stalled: no progress for {} s at {have} of {} bytes (no peer sends what is missing)",
            STALL_TIMEOUT.as_secs(),
            h.manifest().total_size()
        )),
    };
    reporter.abort();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            h.shutdown().await;
            return Err(format!("fetching the content: {e}"));
        }
    };
    let files: Vec<(PathBuf, String)> =
        out.files.iter().map(|(p, m)| (p.clone(), hex(m))).collect();
    if let Some(cache) = &ctx.cache {
        // In the background: the copy is done and reported now; caching a big file
        // costs a copy and a hash pass that the user should not wait for.
        let (cache, f2, cached) = (cache.clone(), files.clone(), ctx.cached.clone());
        tokio::task::spawn_blocking(move || {
            for (path, md5) in f2 {
                keep_in_cache(&cache, &path, &md5);
            }
            cached.notify_one();
        });
    }
    // Keep serving the other agents of this copy for a while, in the background.
    let linger = Duration::from_millis(spec.linger_ms);
    tokio::spawn(async move {
        tokio::time::sleep(linger).await;
        h.shutdown().await;
    });
    Ok((files, out.received_bytes, out.limited_down_bytes))
}

/// Copies a verified file into the cache (a copy, not a link: the destination is the
/// user's to change, the cache's copy must keep matching its MD5). A full cache is not
/// an error for the copy that was asked for.
fn keep_in_cache(cache: &ContentCache, path: &Path, md5: &str) {
    if cache.get(md5).is_some() {
        return;
    }
    // The destination is the user's: opened without following a link it may have
    // become, and checked again after the copy, since it may have changed.
    let Ok(mut from) = safefs::open_read_nofollow(path) else {
        return;
    };
    let size = from.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    if size > cache.quota() {
        return;
    }
    let staged = cache
        .staging_dir()
        .join(format!("{md5}.{:016x}", rand::random::<u64>()));
    let res = create_private(&staged)
        .and_then(|mut to| std::io::copy(&mut from, &mut to))
        .map_err(|e| e.to_string())
        .and_then(|_| match file_md5(&staged) {
            Ok(m) if m == md5 => Ok(()),
            Ok(_) => Err("the destination changed before it was cached".into()),
            Err(e) => Err(e.to_string()),
        })
        .and_then(|_| cache.insert(md5, &staged).map_err(|e| e.to_string()));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&staged);
        tracing::info!(md5, "not cached: {e}");
    }
}

/// Where a single file named `name` lands for `dest` (cp semantics).
fn single_target(dest: &Path, dest_text: &str, name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(format!("bad file name {name:?}"));
    }
    let is_dir = std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
    if dest_text.ends_with('/') || is_dir {
        Ok(dest.join(name))
    } else {
        Ok(dest.to_path_buf())
    }
}

/// MD5 of a file as lowercase hex.
fn file_md5(path: &Path) -> std::io::Result<String> {
    octopus_transfer::manifest::md5_file(path).map(|m| hex(&m))
}

/// MD5 of an open file as lowercase hex.
fn reader_md5(mut f: &std::fs::File) -> std::io::Result<String> {
    let mut h = Md5::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(h.finalize().as_slice()));
        }
        h.update(&buf[..n]);
    }
}

/// A new file only this process can read (0600), never through a link, in a private
/// directory (the cache's staging area, made again if it went missing).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        safefs::ensure_private_dir(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The directory `target` lands in, opened one component at a time without following
/// a link, and the name it gets there.
fn open_parent(target: &Path) -> Result<(OwnedFd, OsString), String> {
    let parent = target
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", target.display()))?;
    let name = target
        .file_name()
        .ok_or_else(|| format!("{} names no file", target.display()))?;
    let dir = safefs::open_dir(parent).map_err(|e| format!("opening {}: {e}", parent.display()))?;
    Ok((dir, name.to_os_string()))
}

/// Writes `name` in `dir` atomically: `fill` writes a fresh temporary file (random
/// name, `O_EXCL|O_NOFOLLOW`, 0600), mode and owner go on its descriptor, then it is
/// renamed over `name` (a link there is replaced, never followed).
fn place_with(
    dir: &OwnedFd,
    name: &OsStr,
    target: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    fill: impl FnOnce(&mut std::fs::File) -> Result<(), String>,
) -> Result<(), String> {
    let tmp = format!(".octo-{:016x}.tmp", rand::random::<u64>());
    let res = safefs::open_file_at(dir, &tmp, true, 0o600)
        .map_err(|e| format!("writing {}: {e}", target.display()))
        .and_then(|mut f| {
            fill(&mut f)?;
            f.sync_all()
                .and_then(|_| safefs::apply_mode_owner(&f, mode, owner))
                .and_then(|_| safefs::rename_at(dir, &tmp, dir, name))
                .map_err(|e| format!("writing {}: {e}", target.display()))
        });
    if res.is_err() {
        let _ = safefs::unlink_at(dir, OsStr::new(&tmp));
    }
    res
}

/// Copies the private file `from` (in the cache) to `name` in `dir`.
fn place(
    from: &Path,
    dir: &OwnedFd,
    name: &OsStr,
    target: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    place_with(dir, name, target, mode, owner, |to| {
        let mut src = safefs::open_read_nofollow(from)
            .map_err(|e| format!("reading {}: {e}", from.display()))?;
        std::io::copy(&mut src, to)
            .map(|_| ())
            .map_err(|e| format!("writing {}: {e}", target.display()))
    })
}

/// The pool path (blocking): an identical destination moves nothing, a cached copy
/// moves nothing over the network, else the file is downloaded through the center's
/// redirect, checked against size and MD5, cached, and renamed into place.
fn pool_fetch(
    rt: &tokio::runtime::Handle,
    pf: &PoolFile,
    spec: &FetchSpec,
    dest: &Path,
    owner: Option<(u32, u32)>,
    ctx: &FetchCtx,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<(Vec<(PathBuf, String)>, u64), String> {
    let target = single_target(dest, &spec.dest, &pf.name)?;
    let (dir, name) = open_parent(&target)?;
    let mode = spec.mode.unwrap_or(pf.mode) & 0o7777;
    let done = |received| Ok((vec![(target.clone(), pf.md5.clone())], received));
    if let Ok(Some(f)) = safefs::open_read_at(&dir, &name) {
        // A file with other hard links is replaced, never chowned in place: a link to
        // a file elsewhere could have been planted.
        let same = f.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.len() == pf.size && m.nlink() == 1
        }) && reader_md5(&f).is_ok_and(|m| m == pf.md5);
        if same {
            safefs::apply_mode_owner(&f, mode, owner)
                .map_err(|e| format!("setting mode and owner of {}: {e}", target.display()))?;
            progress(pf.size, pf.size);
            return done(0);
        }
    }
    if let Some(cached) = ctx.cache.as_ref().and_then(|c| c.get(&pf.md5)) {
        place(&cached, &dir, &name, &target, mode, owner)?;
        progress(pf.size, pf.size);
        return done(0);
    }
    // Download into the cache's staging area when the file may be cached, else
    // straight into a temporary file beside the target.
    let Some(c) = ctx.cache.as_ref().filter(|c| pf.size <= c.quota()) else {
        place_with(&dir, &name, &target, mode, owner, |f| {
            download(rt, pf, spec, ctx, f, &target, progress)
        })?;
        return done(pf.size);
    };
    let staged = c
        .staging_dir()
        .join(format!("{}.{:016x}", pf.md5, rand::random::<u64>()));
    let res = create_private(&staged)
        .map_err(|e| format!("creating {}: {e}", staged.display()))
        .and_then(|mut f| download(rt, pf, spec, ctx, &mut f, &staged, progress));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    match c
        .insert(&pf.md5, &staged)
        .map_err(|e| format!("caching the download: {e}"))
    {
        Ok(obj) => {
            ctx.cached.notify_one();
            place(&obj, &dir, &name, &target, mode, owner)?
        }
        Err(e) => {
            tracing::info!("{e}; writing the download straight to its destination");
            let r = place(&staged, &dir, &name, &target, mode, owner);
            let _ = std::fs::remove_file(&staged);
            r?
        }
    }
    done(pf.size)
}

/// Streams the pool URL into `to`, hashing as it goes; never accepts more than the
/// announced size, and fails unless size and MD5 match.
fn download(
    rt: &tokio::runtime::Handle,
    pf: &PoolFile,
    spec: &FetchSpec,
    ctx: &FetchCtx,
    out: &mut std::fs::File,
    to: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<(), String> {
    let current = *ctx.center.lock().unwrap();
    let center = match pf.origin.parse::<SocketAddr>() {
        Ok(o) if o.ip().is_unspecified() => SocketAddr::new(current.ip(), o.port()),
        Ok(o) => o,
        Err(_) => current,
    };
    // The center's API is HTTPS with a certificate from the CA this agent pinned at
    // enrollment; the redirect to another agent's pool is plain HTTP to a signed URL
    // (see ARCHITECTURE.md), and what arrives is checked against size and MD5.
    let url = format!("https://{center}/api/v1/files/{}?{}", pf.md5, pf.query);
    let ca = ureq::tls::Certificate::from_der(&ctx.ca).to_owned();
    // Redirects are followed by hand, to know which pool member a download came from.
    let http: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::Rustls)
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
                .unversioned_rustls_crypto_provider(octopus_transfer::tls::provider())
                .build(),
        )
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .max_redirects(0)
        .build()
        .into();
    // A member whose copy does not verify (or that cannot be reached) is reported to
    // the center, which takes it out of the rotation for this MD5 and sends us
    // elsewhere: to another member or to its own copy.
    let mut failed: Vec<String> = Vec::new();
    loop {
        let ask = if failed.is_empty() {
            url.clone()
        } else {
            format!("{url}&failed={}", failed.join(","))
        };
        let resp = http
            .get(&ask)
            .call()
            .map_err(|e| format!("downloading {}: {e}", pf.md5))?;
        if !resp.status().is_redirection() {
            return receive(rt, resp, pf, spec, ctx, out, to, progress);
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| format!("the center's redirect for {} has no location", pf.md5))?
            .to_string();
        let member = location
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let res = http
            .get(&location)
            .call()
            .map_err(|e| format!("downloading {} from {member}: {e}", pf.md5))
            .and_then(|r| receive(rt, r, pf, spec, ctx, out, to, progress));
        match res {
            Ok(()) => return Ok(()),
            Err(e) if failed.len() < 4 && !failed.contains(&member) => {
                tracing::warn!(%member, "{e}; asking the center for another copy");
                failed.push(member);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads one answer's body into `out` (the private staging file `to`, emptied first, so
/// a retry from another member starts clean), charged to the limits and checked
/// against the size and MD5.
#[allow(clippy::too_many_arguments)]
fn receive(
    rt: &tokio::runtime::Handle,
    mut resp: ureq::http::Response<ureq::Body>,
    pf: &PoolFile,
    spec: &FetchSpec,
    ctx: &FetchCtx,
    out: &mut std::fs::File,
    to: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<(), String> {
    if !resp.status().is_success() {
        let why = resp.body_mut().read_to_string().unwrap_or_default();
        return Err(format!(
            "the pool answered {} for {}: {}",
            resp.status(),
            pf.md5,
            why.trim()
        ));
    }
    let limits = LimitSet::new([Limiter::new(spec.limit_down), ctx.node_down.clone()]);
    let mut reader = resp.into_body().into_reader();
    {
        use std::io::Seek;
        out.set_len(0)
            .and_then(|_| out.rewind())
            .map_err(|e| format!("emptying {}: {e}", to.display()))?;
    }
    let mut h = Md5::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut last = Instant::now();
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("downloading {}: {e}", pf.md5))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > pf.size {
            return Err(format!(
                "the pool sent more than the {} bytes of {}",
                pf.size, pf.md5
            ));
        }
        if !limits.is_unlimited() {
            rt.block_on(limits.acquire(n as u64));
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing {}: {e}", to.display()))?;
        if last.elapsed() >= Duration::from_secs(1) {
            progress(got, pf.size);
            last = Instant::now();
        }
    }
    out.sync_all()
        .map_err(|e| format!("writing {}: {e}", to.display()))?;
    let md5 = hex(h.finalize().as_slice());
    if got != pf.size || md5 != pf.md5 {
        return Err(format!(
            "the download of {} does not verify: {got} bytes with MD5 {md5}, expected {} bytes",
            pf.md5, pf.size
        ));
    }
    progress(got, pf.size);
    Ok(())
}

/// Resolves `USER[:GROUP]` (names or numeric ids) to ids; the group defaults to the
/// user's primary group.
pub fn resolve_owner(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => match crate::exec::lookup_user(user) {
            Ok(Some(a)) => (a.uid, Some(a.gid)),
            Ok(None) => return Err(format!("unknown user {user:?}")),
            Err(e) => return Err(format!("looking up user {user:?}: {e}")),
        },
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => crate::exec::lookup_group(g)
                .map_err(|e| format!("looking up group {g:?}: {e}"))?
                .ok_or_else(|| format!("unknown group {g:?}"))?,
        },
        None => match primary {
            Some(g) => g,
            None => {
                return Err(format!(
                    "give a group with the numeric user {user} (UID:GID)"
                ))
            }
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_modes_need_the_centers_allowance() {
        let mut spec = FetchSpec {
            ticket: String::new(),
            dest: "/tmp/x".into(),
            mkdir: false,
            mode: Some(0o755),
            limit_down: None,
            limit_up: None,
            linger_ms: 0,
            owner: None,
            pool: None,
            seed: None,
            size: 0,
            tags: Vec::new(),
            allow_special_mode: false,
        };
        check_modes(&spec).unwrap();
        spec.mode = Some(0o4755);
        assert!(check_modes(&spec).unwrap_err().contains("setuid"));
        spec.mode = Some(u32::MAX);
        assert!(check_modes(&spec).is_err());
        spec.allow_special_mode = true;
        assert!(check_modes(&spec).is_err(), "not a mode at all");
        spec.mode = Some(0o4755);
        check_modes(&spec).unwrap();
        spec.allow_special_mode = false;
        spec.mode = None;
        spec.pool = Some(crate::proto::PoolFile {
            md5: String::new(),
            size: 0,
            name: "f".into(),
            mode: 0o2775,
            query: String::new(),
            origin: String::new(),
        });
        assert!(
            check_modes(&spec).is_err(),
            "the pool file's mode is checked too"
        );
    }

    #[test]
    fn destinations_are_checked() {
        assert!(check_dest("relative/x").is_err());
        assert!(check_dest("/srv/../etc/passwd").is_err());
        assert!(check_dest("/srv/./x").is_err());
        assert!(check_dest("/srv/app/pkg.tar").is_ok());
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        let through = format!("{}/link/passwd", d.path().display());
        assert!(check_dest(&through).unwrap_err().contains("symlink"));
    }

    #[test]
    fn owners_resolve() {
        assert_eq!(resolve_owner("root").unwrap(), (0, 0));
        assert_eq!(resolve_owner("0:0").unwrap(), (0, 0));
        assert_eq!(resolve_owner("root:root").unwrap(), (0, 0));
        assert!(resolve_owner("no-such-user-octo")
            .unwrap_err()
            .contains("unknown user"));
        assert!(resolve_owner("root:no-such-group-octo")
            .unwrap_err()
            .contains("unknown group"));
        assert!(resolve_owner("12345").is_err());
    }

    #[test]
    fn single_files_land_like_cp() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display().to_string();
        assert_eq!(
            single_target(d.path(), &dir, "a").unwrap(),
            d.path().join("a")
        );
        let f = d.path().join("new");
        assert_eq!(single_target(&f, &f.display().to_string(), "a").unwrap(), f);
        assert!(single_target(d.path(), &dir, "../x").is_err());
        assert!(single_target(d.path(), &dir, "..").is_err());
    }
}
