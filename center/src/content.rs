//! Content the center holds and tracks for `octo cp`: uploads, seeds for `--async`
//! copies, the HTTP pool's membership and redirects, and each host's fetch progress.
//!
//! Why it is shaped like this:
//!
//! - **Uploads go into the same MD5-addressed cache the agents use** (quota, LRU,
//!   survives restarts). A small or hot file is then served whole over HTTP; a bigger
//!   `--async` copy is seeded by the center over the transfer engine, so the command
//!   that started it may exit and offline hosts still get the content when they come
//!   back, within the task's TTL.
//! - **Seeds are directories of hard links** to cache objects under `seeds/<name>/`,
//!   with the owning task's id in `seeds/<name>.task`. A restarted center shares them
//!   again; a seed whose task is finished (or that never got a task) is deleted. The
//!   stored task names the seed, not a ticket: the ticket (address, port, certificate
//!   fingerprint) is filled in at each delivery, so it is never stale.
//! - **Redirects pick the least-loaded holder.** Agents report what their pool serves
//!   ([`AgentMsg::Holdings`](octopus_agent::proto::AgentMsg)); the center counts the
//!   redirects it hands to each member and sends the next asker to the holder with the
//!   fewest, itself included when it has the content. Members are only hosts with a
//!   live session, so a dead agent gets no traffic.
//! - **Progress lives in memory.** Agents report bytes in place about once a second; a
//!   restarted center learns them again within a second. Final results (MD5s, bytes
//!   received) are in the stored result.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use md5::{Digest, Md5};
use octopus_agent::cache::ContentCache;
use octopus_agent::urlsig::UrlSigner;
use octopus_transfer::manifest::{hex, BuildOptions};
use octopus_transfer::node::{self, NodeConfig, NodeHandle};
use tracing::{info, warn};

/// How long a URL the center signs stays good.
pub const URL_TTL_SECS: u64 = 2 * 3600;

/// One file of an upload-based copy: where it goes under the copy's root, its
/// content and its mode.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadedFile {
    pub path: String,
    pub md5: String,
    pub mode: u32,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Host -> its pool's address (its session's IP, the port it reported).
    members: HashMap<String, SocketAddr>,
    /// MD5 -> hosts whose pool serves it.
    holders: HashMap<String, HashSet<String>>,
    /// Redirects handed to each member ("" is the center itself).
    served: HashMap<String, u64>,
    /// Requests per content, for the hot list.
    asks: HashMap<String, u64>,
    /// (host, md5) pairs whose copy an agent found not to verify: never redirected to
    /// again, whatever the host's holdings say (until the center restarts).
    distrusted: HashSet<(String, String)>,
}

pub(crate) struct Content {
    pub cache: Arc<ContentCache>,
    pub signer: UrlSigner,
    /// The center's own CA-issued identity and the CA: its seeds admit only peers of
    /// the fleet.
    swarm_identity: octopus_transfer::tls::Identity,
    swarm_trust: octopus_transfer::tls::Trust,
    seeds_dir: PathBuf,
    seeds: Mutex<HashMap<String, Arc<NodeHandle>>>,
    pool: Mutex<PoolState>,
    /// (task, host) -> (bytes in place, total).
    progress: Mutex<HashMap<(u64, String), (u64, u64)>>,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content").finish_non_exhaustive()
    }
}

/// Where a pool request should go.
#[derive(Debug, PartialEq, Eq)]
pub enum PoolChoice {
    Member(String, SocketAddr),
    Center,
    Nowhere,
}

fn now_secs() -> u64 {
    octopus_agent::proto::now_ms() / 1000
}

/// `path` is relative, with normal components only.
pub fn check_rel_path(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "upload path {path:?} must be relative, without '.', '..' or empty parts"
        ));
    }
    Ok(p.to_path_buf())
}

impl Content {
    pub fn open(
        data_dir: &Path,
        quota: u64,
        signer: UrlSigner,
        swarm_identity: octopus_transfer::tls::Identity,
        swarm_trust: octopus_transfer::tls::Trust,
    ) -> Result<Content, String> {
        let cache = ContentCache::open(&data_dir.join("content"), quota)
            .map_err(|e| format!("opening the content cache: {e}"))?;
        let seeds_dir = data_dir.join("seeds");
        octopus_transfer::safefs::ensure_private_dir(&seeds_dir)
            .map_err(|e| format!("creating {}: {e}", seeds_dir.display()))?;
        Ok(Content {
            cache: Arc::new(cache),
            signer,
            swarm_identity,
            swarm_trust,
            seeds_dir,
            seeds: Mutex::new(HashMap::new()),
            pool: Mutex::new(PoolState::default()),
            progress: Mutex::new(HashMap::new()),
        })
    }

    /// `exp=..&sig=..` for `md5`, good for [`URL_TTL_SECS`].
    pub fn sign(&self, md5: &str) -> String {
        self.signer
            .sign(md5, now_secs() + URL_TTL_SECS)
            .unwrap_or_default()
    }

    // --- uploads ---

    /// Streams an upload into the cache, hashing it; refuses more than `max` bytes.
    pub async fn upload(
        &self,
        mut body: axum::body::BodyDataStream,
        max: u64,
    ) -> Result<(String, u64), UploadError> {
        use futures_util::StreamExt;
        let staging = self.cache.staging_dir();
        std::fs::create_dir_all(&staging).map_err(UploadError::Staging)?;
        let tmp = staging.join(format!("upload-{:016x}", rand::random::<u64>()));
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(UploadError::Staging)?
        };
        let mut h = Md5::new();
        let mut n = 0u64;
        let res: Result<(), UploadError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| UploadError::Receive(e.to_string()))?;
                n += chunk.len() as u64;
                if n > max {
                    return Err(UploadError::TooLarge { max });
                }
                h.update(&chunk);
                f.write_all(&chunk).map_err(UploadError::Write)?;
            }
            f.sync_all().map_err(UploadError::Write)
        }
        .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let md5 = hex(h.finalize().as_slice());
        if let Err(e) = self.cache.insert(&md5, &tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(UploadError::Store(e.to_string()));
        }
        Ok((md5, n))
    }

    // --- seeds ---

    /// Builds a seed from uploaded files (hard links to the cache objects) and starts
    /// sharing it. Returns the seed's name.
    pub async fn create_seed(&self, files: &[UploadedFile]) -> Result<String, String> {
        if files.is_empty() {
            return Err("an upload copy needs at least one file".into());
        }
        let name = format!("{:016x}", rand::random::<u64>());
        let dir = self.seeds_dir.join(&name);
        let res = self.link_seed(&dir, files);
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        if let Err(e) = self.start_seed(&name).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(name)
    }

    fn link_seed(&self, dir: &Path, files: &[UploadedFile]) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for f in files {
            let rel = check_rel_path(&f.path)?;
            let obj = self
                .cache
                .get(&f.md5)
                .ok_or_else(|| format!("content {} of {} was not uploaded", f.md5, f.path))?;
            let to = dir.join(&rel);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
                // The seed's directories become the copy's: 0755, not the umask's 0700.
                for a in p.ancestors().take_while(|a| *a != dir) {
                    std::fs::set_permissions(a, std::fs::Permissions::from_mode(0o755))
                        .map_err(|e| format!("creating {}: {e}", a.display()))?;
                }
            }
            if to.exists() {
                return Err(format!("{} is listed twice", f.path));
            }
            // A link shares the object's mode, so a file needing another mode is copied.
            let same_mode = std::fs::metadata(&obj)
                .map(|m| m.permissions().mode() & 0o7777 == f.mode & 0o7777)
                .unwrap_or(false);
            if !(same_mode && std::fs::hard_link(&obj, &to).is_ok()) {
                std::fs::copy(&obj, &to).map_err(|e| format!("copying {}: {e}", f.path))?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(f.mode & 0o7777))
                    .map_err(|e| format!("setting the mode of {}: {e}", f.path))?;
            }
        }
        Ok(())
    }

    async fn start_seed(&self, name: &str) -> Result<(), String> {
        let dir = self.seeds_dir.join(name);
        let mut roots: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        roots.sort();
        let cfg = NodeConfig {
            identity: Some(self.swarm_identity.clone()),
            trust: self.swarm_trust.clone(),
            ..Default::default()
        };
        let h = node::share(cfg, roots, BuildOptions::default())
            .await
            .map_err(|e| format!("seeding: {e}"))?;
        info!(seed = name, content = %h.ticket().content, "center seeding");
        self.seeds
            .lock()
            .unwrap()
            .insert(name.to_string(), Arc::new(h));
        Ok(())
    }

    /// Records which task owns the seed, so the seed lives as long as the task.
    pub fn bind_seed(&self, name: &str, task: u64) {
        let p = self.seeds_dir.join(format!("{name}.task"));
        if let Err(e) = std::fs::write(&p, task.to_string()) {
            warn!(seed = name, "recording the seed's task: {e}");
        }
    }

    /// The current ticket of a running seed of this center.
    pub fn seed_ticket(&self, name: &str) -> Option<String> {
        self.seeds
            .lock()
            .unwrap()
            .get(name)
            .map(|h| h.ticket().encode())
    }

    /// The seeds running here.
    pub fn seed_names(&self) -> Vec<String> {
        self.seeds.lock().unwrap().keys().cloned().collect()
    }

    /// Seeds on disk and their task ids (`None`: no task was recorded).
    fn seeds_on_disk(&self) -> Vec<(String, Option<u64>)> {
        let Ok(rd) = std::fs::read_dir(&self.seeds_dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let task = std::fs::read_to_string(self.seeds_dir.join(format!("{name}.task")))
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                (name, task)
            })
            .collect()
    }

    /// Drops the seed: stops sharing and deletes its directory.
    async fn drop_seed(&self, name: &str) {
        let h = self.seeds.lock().unwrap().remove(name);
        if let Some(h) = h {
            h.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(self.seeds_dir.join(name));
        let _ = std::fs::remove_file(self.seeds_dir.join(format!("{name}.task")));
        info!(seed = name, "seed dropped");
    }

    /// At start: share again every seed whose task still runs; delete the rest.
    /// `is_open(task)` tells whether a task still runs.
    pub async fn restore_seeds(&self, is_open: impl Fn(u64) -> bool) {
        for (name, task) in self.seeds_on_disk() {
            match task {
                Some(t) if is_open(t) => {
                    if let Err(e) = self.start_seed(&name).await {
                        warn!(seed = name, "restoring the seed: {e}");
                    }
                }
                _ => self.drop_seed(&name).await,
            }
        }
    }

    /// Drops seeds whose task is finished (after the agents' linger, since they are
    /// only dropped once the whole task is final).
    pub async fn sweep_seeds(&self, is_open: impl Fn(u64) -> bool) {
        let running: HashSet<String> = self.seeds.lock().unwrap().keys().cloned().collect();
        for (name, task) in self.seeds_on_disk() {
            match task {
                Some(t) if !is_open(t) => self.drop_seed(&name).await,
                // Being created right now (no task yet) if it runs; else a leftover.
                None if !running.contains(&name) => self.drop_seed(&name).await,
                _ => {}
            }
        }
    }

    // --- the pool ---

    /// Replaces what `host`'s pool serves.
    pub fn set_holdings(&self, host: &str, ip: std::net::IpAddr, port: u16, md5s: Vec<String>) {
        let mut p = self.pool.lock().unwrap();
        for hs in p.holders.values_mut() {
            hs.remove(host);
        }
        p.holders.retain(|_, hs| !hs.is_empty());
        if port == 0 {
            p.members.remove(host);
            return;
        }
        p.members
            .insert(host.to_string(), SocketAddr::new(ip, port));
        for m in md5s {
            if p.distrusted.contains(&(host.to_string(), m.clone())) {
                continue;
            }
            p.holders.entry(m).or_default().insert(host.to_string());
        }
    }

    /// An agent downloaded `md5` from the member at `addr` and the bytes did not
    /// verify: that member leaves the rotation for `md5`. Returns its name, if `addr`
    /// is a member.
    pub fn distrust(&self, md5: &str, addr: &str) -> Option<String> {
        let mut p = self.pool.lock().unwrap();
        let host = p
            .members
            .iter()
            .find(|(_, a)| a.to_string() == addr)
            .map(|(h, _)| h.clone())?;
        p.distrusted.insert((host.clone(), md5.to_string()));
        if let Some(hs) = p.holders.get_mut(md5) {
            hs.remove(&host);
            if hs.is_empty() {
                p.holders.remove(md5);
            }
        }
        Some(host)
    }

    /// `host` went offline: no more redirects to it.
    pub fn drop_member(&self, host: &str) {
        self.pool.lock().unwrap().members.remove(host);
    }

    /// Picks where a request for `md5` goes: the holder with the fewest redirects so
    /// far (the center counts as one when it has the content).
    pub fn pick(&self, md5: &str) -> PoolChoice {
        let center_has = self.cache.get(md5).is_some();
        let mut p = self.pool.lock().unwrap();
        *p.asks.entry(md5.to_string()).or_default() += 1;
        let mut best: Option<(u64, String, SocketAddr)> = None;
        if let Some(hs) = p.holders.get(md5) {
            for h in hs {
                let Some(addr) = p.members.get(h) else {
                    continue;
                };
                let load = p.served.get(h).copied().unwrap_or(0);
                if best.as_ref().is_none_or(|b| (load, h) < (b.0, &b.1)) {
                    best = Some((load, h.clone(), *addr));
                }
            }
        }
        let center_load = p.served.get("").copied().unwrap_or(0);
        match best {
            Some((load, h, addr)) if !center_has || load < center_load => {
                *p.served.entry(h.clone()).or_default() += 1;
                PoolChoice::Member(h, addr)
            }
            _ if center_has => {
                *p.served.entry(String::new()).or_default() += 1;
                PoolChoice::Center
            }
            _ => PoolChoice::Nowhere,
        }
    }

    /// Pool members, what they hold and how many redirects each got; the most asked
    /// for contents. For `GET /api/v1/files`.
    pub fn pool_view(&self) -> serde_json::Value {
        let p = self.pool.lock().unwrap();
        let mut members: Vec<serde_json::Value> = p
            .members
            .iter()
            .map(|(h, a)| {
                serde_json::json!({
                    "host": h, "addr": a.to_string(),
                    "holds": p.holders.values().filter(|hs| hs.contains(h)).count(),
                    "redirects": p.served.get(h).copied().unwrap_or(0),
                })
            })
            .collect();
        members.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
        let mut hot: Vec<(&String, &u64)> = p.asks.iter().collect();
        hot.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        serde_json::json!({
            "members": members,
            "center_served": p.served.get("").copied().unwrap_or(0),
            "hot": hot.into_iter().take(20).map(|(m, n)| serde_json::json!({"md5": m, "asks": n,
                "holders": p.holders.get(m).map_or(0, HashSet::len)})).collect::<Vec<_>>(),
        })
    }

    // --- progress ---

    pub fn set_progress(&self, task: u64, host: &str, bytes: u64, total: u64) {
        let mut p = self.progress.lock().unwrap();
        if p.len() > 1_000_000 {
            p.clear();
        }
        p.insert((task, host.to_string()), (bytes, total));
    }

    pub fn progress(&self, task: u64, host: &str) -> Option<(u64, u64)> {
        self.progress
            .lock()
            .unwrap()
            .get(&(task, host.to_string()))
            .copied()
    }

    /// Forgets the progress of finished tasks.
    pub fn forget_progress(&self, done: &HashSet<u64>) {
        self.progress
            .lock()
            .unwrap()
            .retain(|(t, _), _| !done.contains(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(dir: &Path) -> Content {
        let key = UrlSigner::generate().unwrap();
        let ca = octopus_transfer::tls::CertAuthority::generate().unwrap();
        Content::open(
            dir,
            1 << 20,
            UrlSigner::from_pkcs8(&key).unwrap(),
            ca.issue_identity("octo-center").unwrap(),
            octopus_transfer::tls::Trust::Ca(ca.cert.clone()),
        )
        .unwrap()
    }

    #[test]
    fn upload_paths_are_checked() {
        assert!(check_rel_path("a/b.txt").is_ok());
        for bad in ["", "/etc/passwd", "a/../b", "./a", "a//b", ".."] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_go_to_the_least_loaded_live_holder() {
        let d = tempfile::tempdir().unwrap();
        let c = content(d.path());
        let md5 = "00112233445566778899aabbccddeeff";
        assert_eq!(c.pick(md5), PoolChoice::Nowhere);
        let ip = "10.0.0.1".parse().unwrap();
        c.set_holdings("a", ip, 9001, vec![md5.into()]);
        c.set_holdings("b", "10.0.0.2".parse().unwrap(), 9002, vec![md5.into()]);
        let mut got = HashMap::new();
        for _ in 0..10 {
            match c.pick(md5) {
                PoolChoice::Member(h, _) => *got.entry(h).or_insert(0) += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got["a"], 5);
        assert_eq!(got["b"], 5);
        // An offline member gets nothing; a report without the content removes it.
        c.drop_member("a");
        for _ in 0..3 {
            assert!(matches!(c.pick(md5), PoolChoice::Member(h, _) if h == "b"));
        }
        c.set_holdings("b", ip, 9002, vec![]);
        assert_eq!(c.pick(md5), PoolChoice::Nowhere);
        let v = c.pool_view();
        assert_eq!(v["hot"][0]["md5"], md5);
        assert_eq!(v["hot"][0]["asks"], 15);
    }
}

/// Why an upload into the center's content cache failed, by stage.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("creating the staging file of the upload: {0}")]
    Staging(#[source] std::io::Error),
    #[error("receiving the upload: {0}")]
    Receive(String),
    #[error("the upload is larger than the {max} bytes allowed")]
    TooLarge { max: u64 },
    #[error("writing the upload: {0}")]
    Write(#[source] std::io::Error),
    #[error("storing the upload in the cache: {0}")]
    Store(String),
}

impl UploadError {
    /// The disk (or quota) was full.
    pub fn is_no_space(&self) -> bool {
        match self {
            UploadError::Staging(e) | UploadError::Write(e) => crate::caps::is_no_space(e),
            _ => false,
        }
    }
}
