//! The fetch service: `octo cp` asks an agent to fetch content over the transfer
//! engine into a destination path.
//!
//! Why it is shaped like this: the content moves peer to peer (every agent fetching
//! the same ticket also serves it to the others while it fetches and for `linger_ms`
//! after), it is verified piece by piece and by whole-file MD5 before it appears at
//! the destination, and the destination is checked here, on the host, where the file
//! system is: absolute, no `..`, no parent that is a symlink.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use octopus_transfer::manifest::hex;
use octopus_transfer::node::{self, NodeConfig};
use octopus_transfer::ticket::Ticket;

use crate::exec::ExecResult;
use crate::proto::FetchSpec;

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

/// Fetches per `spec`. The result's stdout lists `md5  path` per file, like md5sum.
pub async fn run(spec: &FetchSpec) -> Result<ExecResult, String> {
    let started = std::time::Instant::now();
    let dest = check_dest(&spec.dest)?;
    let ticket = Ticket::decode(&spec.ticket).map_err(|e| format!("reading the ticket: {e}"))?;
    if spec.mkdir {
        let parent = if spec.dest.ends_with('/') {
            dest.clone()
        } else {
            dest.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let cfg = NodeConfig {
        listen: "0.0.0.0:0".parse().expect("valid"),
        limit_up: spec.limit_up,
        limit_down: spec.limit_down,
        ..Default::default()
    };
    let h = node::get(cfg, ticket, dest)
        .await
        .map_err(|e| format!("starting the transfer: {e}"))?;
    let out = match h.completed().await {
        Ok(o) => o,
        Err(e) => {
            h.shutdown().await;
            return Err(format!("fetching the content: {e}"));
        }
    };
    let mut stdout = String::new();
    for (path, md5) in &out.files {
        if let Some(mode) = spec.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| format!("setting the mode of {}: {e}", path.display()))?;
        }
        stdout.push_str(&format!("{}  {}\n", hex(md5), path.display()));
    }
    stdout.push_str(&format!(
        "received {} bytes in {} ms\n",
        out.received_bytes,
        out.elapsed.as_millis()
    ));
    // Keep serving the other agents of this copy for a while, in the background.
    let linger = Duration::from_millis(spec.linger_ms);
    tokio::spawn(async move {
        tokio::time::sleep(linger).await;
        h.shutdown().await;
    });
    Ok(ExecResult {
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        stdout: stdout.into_bytes(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
