//! `limit-bench`: proves that the token-bucket limits hold their rate.
//!
//! Why a command and not a criterion bench: the question is not "how fast" but "how
//! close to the asked rate, over a long enough window", which needs seconds per case
//! and a pass/fail verdict (target: within ±5% over 10 s).
//!
//! For each rate (1 MB/s, 10 MB/s, 100 MB/s, 1 GB/s; MB = 10^6 bytes) it runs:
//! - `limiter`: `limit::Limiter` alone, a loop acquiring 64 KiB chunks for the window;
//! - `upload`: a real loopback QUIC transfer (`node::share` + `node::get`) of
//!   rate × window bytes with `limit_up` on the sharer;
//! - `download`: the same with `limit_down` on the getter.
//!
//! Achieved rate = bytes / elapsed, where a transfer's elapsed runs from calling
//! `node::get` until every piece is received and verified (the final whole-file MD5
//! is excluded: it is not rate-limited). Before the transfers it measures the
//! unlimited loopback ceiling; a rate above 90% of it cannot be shown on this
//! machine and is skipped (run with `--no-skip` to try anyway).
//!
//! Usage: `limit-bench [--quick] [--secs N] [--rates 1MB,10MB] [--limiter-only]
//! [--no-skip]`. `--quick` is `--secs 2`. Exits 1 if a measured case misses ±5%.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use octopus_bench::{fetch, share_file, write_test_file};
use octopus_transfer::limit::{parse_rate, Limiter};

const CHUNK: u64 = 64 << 10;
const TOLERANCE_PCT: f64 = 5.0;
const PROBE_SIZE: u64 = 512 << 20;

struct Args {
    secs: f64,
    rates: Vec<u64>,
    limiter_only: bool,
    no_skip: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        secs: 10.0,
        rates: vec![1_000_000, 10_000_000, 100_000_000, 1_000_000_000],
        limiter_only: false,
        no_skip: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.secs = 2.0,
            "--secs" => {
                let v = it.next().ok_or("--secs needs a value")?;
                a.secs = v.parse().map_err(|_| format!("bad --secs {v}"))?;
                if !a.secs.is_finite() || a.secs <= 0.0 {
                    return Err("--secs must be positive".into());
                }
            }
            "--rates" => {
                let v = it.next().ok_or("--rates needs a value")?;
                a.rates = v
                    .split(',')
                    .map(|r| parse_rate(r).map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?;
            }
            "--limiter-only" => a.limiter_only = true,
            "--no-skip" => a.no_skip = true,
            "-h" | "--help" => {
                println!(
                    "usage: limit-bench [--quick] [--secs N] [--rates 1MB,10MB,...] \
                     [--limiter-only] [--no-skip]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// One line of the result table.
struct Row {
    mode: &'static str,
    target: u64,
    outcome: Outcome,
}

enum Outcome {
    Measured { bytes: u64, elapsed: Duration },
    Skipped(String),
    Failed(String),
}

impl Row {
    fn error_pct(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Measured { bytes, elapsed } => {
                let achieved = bytes as f64 / elapsed.as_secs_f64();
                Some((achieved / self.target as f64 - 1.0) * 100.0)
            }
            _ => None,
        }
    }

    fn ok(&self) -> bool {
        match &self.outcome {
            Outcome::Measured { .. } => self.error_pct().is_some_and(|e| e.abs() <= TOLERANCE_PCT),
            Outcome::Skipped(_) => true,
            Outcome::Failed(_) => false,
        }
    }

    fn print(&self) {
        let target = fmt_rate(self.target as f64);
        match &self.outcome {
            Outcome::Measured { bytes, elapsed } => {
                let achieved = *bytes as f64 / elapsed.as_secs_f64();
                let err = self.error_pct().unwrap_or(f64::NAN);
                println!(
                    "| {:<8} | {:>11} | {:>11} | {:>+7.2}% | {:>12} | {:>7.2} | {:<4} |",
                    self.mode,
                    target,
                    fmt_rate(achieved),
                    err,
                    bytes,
                    elapsed.as_secs_f64(),
                    if self.ok() { "PASS" } else { "FAIL" }
                );
            }
            Outcome::Skipped(why) => {
                println!("| {:<8} | {:>11} | skipped: {why}", self.mode, target)
            }
            Outcome::Failed(why) => {
                println!("| {:<8} | {:>11} | FAILED: {why}", self.mode, target)
            }
        }
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e9 {
        format!("{:.3} GB/s", r / 1e9)
    } else if r >= 1e6 {
        format!("{:.3} MB/s", r / 1e6)
    } else {
        format!("{:.1} kB/s", r / 1e3)
    }
}

fn header() {
    println!("| mode     |      target |    achieved |    error |        bytes | seconds | ok   |");
    println!("|----------|-------------|-------------|----------|--------------|---------|------|");
}

/// (a) The limiter alone: acquire 64 KiB chunks for `secs` and count what passed.
async fn limiter_case(rate: u64, secs: f64) -> Row {
    let l = Limiter::new(Some(rate));
    let window = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < window {
        l.acquire(CHUNK).await;
        bytes += CHUNK;
    }
    Row {
        mode: "limiter",
        target: rate,
        outcome: Outcome::Measured {
            bytes,
            elapsed: t0.elapsed(),
        },
    }
}

/// (b) A real transfer of `size` bytes with the limit on the sharer's upload
/// (`upload`) or the getter's download (`download`).
async fn transfer_case(dir: &Path, mode: &'static str, rate: u64, size: u64) -> Row {
    let src = dir.join(format!("src-{rate}.bin"));
    let res = async {
        write_test_file(&src, size, rate).map_err(|e| format!("writing source: {e}"))?;
        let (up, down) = if mode == "upload" {
            (Some(rate), None)
        } else {
            (None, Some(rate))
        };
        let seed = share_file(&src, up).await?;
        let out = tempfile::tempdir_in(dir).map_err(|e| e.to_string())?;
        // Twice the expected time plus room for finalizing at disk speed: a limiter
        // that is far too slow is reported with its partial rate instead of
        // stalling the run.
        let timeout = Duration::from_secs_f64(size as f64 / rate as f64 * 2.0 + 30.0);
        let r = fetch(&seed, out.path(), down, timeout).await;
        seed.shutdown().await;
        r
    }
    .await;
    let _ = std::fs::remove_file(&src);
    Row {
        mode,
        target: rate,
        outcome: match res {
            Ok(f) => Outcome::Measured {
                bytes: f.bytes,
                elapsed: f.transfer,
            },
            Err(e) => Outcome::Failed(e),
        },
    }
}

/// The unlimited loopback ceiling (bytes per second) for the transfer cases.
async fn probe(dir: &Path) -> Result<f64, String> {
    let src = dir.join("probe.bin");
    write_test_file(&src, PROBE_SIZE, 99).map_err(|e| e.to_string())?;
    let seed = share_file(&src, None).await?;
    let out = tempfile::tempdir_in(dir).map_err(|e| e.to_string())?;
    let r = fetch(&seed, out.path(), None, Duration::from_secs(300)).await;
    seed.shutdown().await;
    let _ = std::fs::remove_file(&src);
    r.map(|f| f.rate())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("limit-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "limit-bench: {} s per case, tolerance ±{TOLERANCE_PCT}%, {} cores",
        args.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    header();
    for &rate in &args.rates {
        let row = rt.block_on(limiter_case(rate, args.secs));
        row.print();
        rows.push(row);
    }
    if !args.limiter_only {
        let ceiling = rt.block_on(probe(dir.path()));
        match &ceiling {
            Ok(c) => println!(
                "\nunlimited loopback QUIC ceiling ({} MiB): {}\n",
                PROBE_SIZE >> 20,
                fmt_rate(*c)
            ),
            Err(e) => println!("\nceiling probe failed: {e}\n"),
        }
        header();
        for &rate in &args.rates {
            let size = (rate as f64 * args.secs) as u64;
            for mode in ["upload", "download"] {
                let reachable = ceiling.as_ref().map_or(true, |c| rate as f64 <= 0.9 * c);
                let row = if reachable || args.no_skip {
                    rt.block_on(transfer_case(dir.path(), mode, rate, size))
                } else {
                    Row {
                        mode,
                        target: rate,
                        outcome: Outcome::Skipped(format!(
                            "above 90% of the loopback ceiling {}",
                            fmt_rate(*ceiling.as_ref().unwrap_or(&0.0))
                        )),
                    }
                };
                row.print();
                rows.push(row);
            }
        }
    }
    if rows.iter().all(Row::ok) {
        println!("\nall measured cases within ±{TOLERANCE_PCT}%");
        ExitCode::SUCCESS
    } else {
        println!("\nsome cases missed ±{TOLERANCE_PCT}%");
        ExitCode::FAILURE
    }
}
