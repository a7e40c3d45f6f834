//! Shared helpers for the Octopus benchmarks (criterion benches in `benches/` and the
//! `limit-bench` command).
//!
//! Why a library: the criterion `quic` bench and `limit-bench` both need the same
//! "share a file, get it over loopback QUIC, time it" loop, and both need large test
//! files written quickly. Keeping that here means the two measure exactly the same
//! thing, through the public `node::share`/`node::get` API only. See bench/README.md
//! for the figures.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use octopus_transfer::manifest::BuildOptions;
use octopus_transfer::node::{self, NodeConfig, NodeHandle};

/// Write `size` bytes of cheap pseudo-random data (xorshift64) to `path`.
///
/// Random rather than zeros so nothing along the way (page cache, a future
/// compressing transport) can cheat; xorshift rather than a CSPRNG so writing a
/// 10 GB file is bounded by the disk, not the generator.
pub fn write_test_file(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut state = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

/// A node configuration bound to an ephemeral loopback port.
pub fn loopback_config(limit_up: Option<u64>, limit_down: Option<u64>) -> NodeConfig {
    NodeConfig {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        limit_up,
        limit_down,
        ..NodeConfig::default()
    }
}

/// Start sharing `path` from a loopback node (hashes it first, so this takes a while
/// for large files; callers time only what follows).
pub async fn share_file(path: &Path, limit_up: Option<u64>) -> Result<NodeHandle, String> {
    node::share(
        loopback_config(limit_up, None),
        vec![path.to_path_buf()],
        BuildOptions::default(),
    )
    .await
    .map_err(|e| format!("share: {e}"))
}

/// What one loopback `get` measured.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Content size in bytes.
    pub bytes: u64,
    /// From calling `node::get` until every piece was received and verified
    /// (handshake and manifest fetch included, final whole-file MD5 excluded).
    pub transfer: Duration,
    /// From calling `node::get` until the files were verified and in place.
    pub complete: Duration,
}

impl Fetched {
    /// Bytes per second over the transfer phase.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.transfer.as_secs_f64()
    }
}

/// Fetch the content shared by `seed` into `dest` (a directory) over loopback QUIC,
/// with an optional download limit on the getter. Gives up after `timeout`.
pub async fn fetch(
    seed: &NodeHandle,
    dest: &Path,
    limit_down: Option<u64>,
    timeout: Duration,
) -> Result<Fetched, String> {
    let total = seed.manifest().total_size();
    let t0 = Instant::now();
    let getter = node::get(
        loopback_config(None, limit_down),
        seed.ticket().clone(),
        dest.to_path_buf(),
    )
    .await
    .map_err(|e| format!("get: {e}"))?;
    let mut progress = getter.progress();
    let run = async {
        loop {
            let p = progress.borrow_and_update().clone();
            if p.have_bytes >= total {
                break;
            }
            if progress.changed().await.is_err() {
                return Err("getter stopped before receiving everything".to_string());
            }
        }
        let transfer = t0.elapsed();
        getter.completed().await?;
        Ok(Fetched {
            bytes: total,
            transfer,
            complete: t0.elapsed(),
        })
    };
    let res = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| {
            let got = progress.borrow().have_bytes;
            let secs = t0.elapsed().as_secs_f64();
            Err(format!(
                "timed out after {secs:.1} s with {got} of {total} bytes verified ({:.3} MB/s)",
                got as f64 / secs / 1e6
            ))
        });
    getter.shutdown().await;
    res
}

/// The path `fetch` lands a shared single file at, to delete it between runs.
pub fn landed_path(dest: &Path, source: &Path) -> PathBuf {
    dest.join(source.file_name().expect("source has a file name"))
}
