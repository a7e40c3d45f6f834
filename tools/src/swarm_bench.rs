//! `octo swarm-bench`: real `octo share`/`octo get` processes in network namespaces.
//!
//! Why it is built this way:
//!
//! * **Real processes, real kernel links.** Every host is its own `octo` process in its
//!   own network namespace, joined to one Linux bridge by a veth pair. What is
//!   measured is the shipped binary over real UDP/QUIC, not an in-process
//!   simulation, so runtime effects (pacing, congestion control, task scheduling,
//!   disk writes) count.
//! * **Shaping with `tbf` on both ends of each veth.** The kernel here has no
//!   `netem`, and `tbf` is what a token-bucket link looks like anyway. The qdisc on
//!   the namespace side shapes the host's upload, the one on the bridge side shapes
//!   its download, so every host has a symmetric link of `--rate` and the bridge
//!   itself is never the bottleneck (like hosts on a switch with fast backplane).
//!   The bucket (`burst`) is `max(rate / 250, 32 KiB)`: at least one kernel tick
//!   (`CONFIG_HZ=250`) of traffic, so the shaper can reach its rate with coarse
//!   timers, yet only 4 ms of line rate, so bursts stay short. The queue is bounded by
//!   `latency 50ms` (tbf turns it into a byte limit of rate × 50 ms + burst), a
//!   moderately deep switch buffer: deep enough for QUIC to fill the link, short
//!   enough that queueing delay does not dominate the request round trips.
//! * **Own clock.** Each getter's completion time is taken when its `done` line is
//!   read, measured from the moment all getters were launched, so the times of all
//!   hosts share one origin; the getters' own `elapsed_ms` is kept beside it.
//! * **Independent verification.** The received files are hashed here, not trusted
//!   from the getters' reports, and the sharer's upload is read from its interface
//!   counter, which counts every byte on the wire (QUIC, UDP, IP and Ethernet
//!   headers, retransmissions), so `sharer upload ÷ size` is slightly pessimistic.
//! * **Blocking code on threads.** The tool's tokio has no `process` feature; the
//!   bench is a handful of child processes, so plain `std::process` with one reader
//!   thread per child is simplest. It runs on a blocking thread; Ctrl-C only raises a
//!   flag so the topology is always torn down. Stale namespaces of a crashed run are
//!   removed at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use octopus_transfer::limit::parse_rate;
use octopus_transfer::manifest::{hex, md5_file};
use serde_json::{json, Value};

pub(crate) const BRIDGE: &str = "octobr0";
const NS_PREFIX: &str = "octo-h";
const PORT: u16 = 7000;
/// The targets for 16 peers on 100 Mbit links.
const TARGET_LAST_OVER_IDEAL: f64 = 1.25;
const TARGET_SHARER_UPLOAD: f64 = 2.5;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of getting hosts (the sharer is one more).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub hosts: u32,
    /// Size of the generated content (e.g. 100MiB).
    #[arg(long, default_value = "100MiB", value_parser = parse_rate_arg)]
    pub size: u64,
    /// Link rate of every host, each direction (e.g. 100Mbit).
    #[arg(long, default_value = "100Mbit", value_parser = parse_rate_arg)]
    pub rate: u64,
    /// The `octo` binary run in the namespaces (default: this one).
    #[arg(long)]
    pub octo: Option<PathBuf>,
    /// Keep the namespaces, bridge and temporary files after the run.
    #[arg(long)]
    pub keep: bool,
    /// Seconds to wait for all getters, from their launch.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// RUST_LOG filter for the child processes (their stderr goes to log files in the
    /// temporary directory, kept when a host fails).
    #[arg(long)]
    pub log: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Managed mode: a center and `--hosts` agents in the namespaces, and `octo cp`
    /// from the source host to all of them (then the same copy again).
    #[arg(long)]
    pub managed: bool,
}

fn parse_rate_arg(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}

pub async fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("swarm-bench creates network namespaces and must run as root");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let mut task = tokio::task::spawn_blocking(move || bench(args, &stop2));
    tokio::select! {
        r = &mut task => return r.context("the bench thread panicked")?,
        _ = crate::interrupted() => stop.store(true, Ordering::SeqCst),
    }
    // Interrupted: the bench notices the flag, cleans up and returns.
    task.await.context("the bench thread panicked")??;
    bail!("interrupted")
}

// ----- topology ----------------------------------------------------------------------

pub(crate) fn ns(i: u32) -> String {
    format!("{NS_PREFIX}{i}")
}
/// The bridge-side end of host `i`'s veth pair (in the root namespace).
pub(crate) fn veth_br(i: u32) -> String {
    format!("octo-v{i}")
}
/// The host-side end of host `i`'s veth pair (inside its namespace).
fn veth_host(i: u32) -> String {
    format!("octo-p{i}")
}
pub(crate) fn ip_of(i: u32) -> String {
    format!("10.77.0.{}", i + 1)
}

/// Runs a command to completion; an error carries its stderr.
pub(crate) fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every namespace and the bridge this bench may have created, now or in an
/// earlier run that crashed. Deleting a namespace deletes its veth pair.
fn cleanup_topology() {
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let ours = name
                .strip_prefix(NS_PREFIX)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if ours {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        let _ = sh("ip", &["link", "del", BRIDGE]);
    }
}

/// Tears the topology down when dropped, unless `--keep`.
pub(crate) struct Topology {
    keep: bool,
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.keep {
            cleanup_topology();
        }
    }
}

fn tbf(dev: &str, netns: Option<&str>, rate: u64) -> Result<()> {
    let bits = format!("{}bit", rate * 8);
    let burst = (rate / 250).max(32 << 10).to_string();
    let mut args: Vec<&str> = Vec::new();
    if let Some(n) = netns {
        args.extend(["netns", "exec", n, "tc"]);
    }
    args.extend([
        "qdisc", "add", "dev", dev, "root", "tbf", "rate", &bits, "burst", &burst, "latency",
        "50ms",
    ]);
    let prog = if netns.is_some() { "ip" } else { "tc" };
    sh(prog, &args).map(drop)
}

pub(crate) fn build_topology(hosts: u32, rate: u64, keep: bool) -> Result<Topology> {
    cleanup_topology();
    let topo = Topology { keep };
    sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    sh("ip", &["addr", "add", "10.77.0.254/24", "dev", BRIDGE])?;
    sh("ip", &["link", "set", BRIDGE, "up"])?;
    for i in 0..=hosts {
        let (n, vb, vh) = (ns(i), veth_br(i), veth_host(i));
        let addr = format!("{}/24", ip_of(i));
        sh("ip", &["netns", "add", &n])?;
        sh(
            "ip",
            &["netns", "exec", &n, "ip", "link", "set", "lo", "up"],
        )?;
        sh(
            "ip",
            &["link", "add", &vb, "type", "veth", "peer", "name", &vh],
        )?;
        sh("ip", &["link", "set", &vh, "netns", &n])?;
        sh("ip", &["link", "set", &vb, "master", BRIDGE])?;
        sh("ip", &["link", "set", &vb, "up"])?;
        let in_ns = |a: &[&str]| {
            let mut v = vec!["netns", "exec", n.as_str(), "ip"];
            v.extend_from_slice(a);
            sh("ip", &v)
        };
        in_ns(&["addr", "add", &addr, "dev", &vh])?;
        in_ns(&["link", "set", &vh, "up"])?;
        tbf(&vh, Some(&n), rate)?; // the host's upload
        tbf(&vb, None, rate)?; // the host's download
    }
    Ok(topo)
}

/// Bytes counter of an interface in the root namespace (the bridge-side veths).
pub(crate) fn counter(dev: &str, which: &str) -> u64 {
    fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{which}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The sharer's transmitted bytes, read inside its namespace.
pub(crate) fn sharer_tx_bytes() -> Result<u64> {
    let path = format!("/sys/class/net/{}/statistics/tx_bytes", veth_host(0));
    let out = sh("ip", &["netns", "exec", &ns(0), "cat", &path])?;
    out.trim()
        .parse()
        .with_context(|| format!("reading {path}: {out:?}"))
}

/// Jiffies of all CPUs from /proc/stat: user (with nice), system, interrupts (hard
/// and soft: mostly the veth/bridge/tbf packet path) and the total.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTimes {
    user: u64,
    system: u64,
    irq: u64,
    total: u64,
}

impl CpuTimes {
    pub(crate) fn now() -> CpuTimes {
        let s = fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let f = |i: usize| v.get(i).copied().unwrap_or(0);
        CpuTimes {
            user: f(0) + f(1),
            system: f(2),
            irq: f(5) + f(6),
            total: v.iter().take(8).sum(),
        }
    }

    /// Fractions of the total CPU capacity spent in user, system and interrupt mode
    /// between `self` and `later`.
    pub(crate) fn shares(self, later: CpuTimes) -> (f64, f64, f64) {
        let t = later.total.saturating_sub(self.total).max(1) as f64;
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64 / t;
        (
            d(self.user, later.user),
            d(self.system, later.system),
            d(self.irq, later.irq),
        )
    }
}

/// CPU seconds (user + system) a live process has used so far.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

// ----- processes ---------------------------------------------------------------------

pub(crate) enum Line {
    Out(u32, Instant, String),
    Eof(u32),
}

/// A child `octo` in a namespace. `ip netns exec` execs the command, so the pid is
/// octo's own and signals reach it directly.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    fn spawn(
        host: u32,
        octo: &Path,
        args: &[String],
        log: &Path,
        filter: Option<&str>,
        tx: &mpsc::Sender<Line>,
    ) -> Result<Proc> {
        let mut argv = vec![octo.display().to_string()];
        argv.extend(args.iter().cloned());
        Proc::spawn_in(host, host, &argv, log, filter, tx)
    }

    /// Runs `argv` in host `ns_host`'s namespace; its lines are labelled `host`.
    pub(crate) fn spawn_in(
        host: u32,
        ns_host: u32,
        argv: &[String],
        log: &Path,
        filter: Option<&str>,
        tx: &mpsc::Sender<Line>,
    ) -> Result<Proc> {
        let err = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns(ns_host)])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
        if let Some(f) = filter {
            cmd.env("RUST_LOG", f);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting octo on host {host}"))?;
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(Line::Out(host, Instant::now(), line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Line::Eof(host));
        });
        Ok(Proc { child })
    }
}

/// SIGTERM to all, up to 5 s of grace, then SIGKILL to the rest.
pub(crate) fn kill_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if matches!(p.child.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(p.child.id()) {
                // SAFETY: kill(2) on the pid of a child we have not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in procs.iter_mut() {
        while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(p.child.try_wait(), Ok(None)) {
            let _ = p.child.kill();
        }
        let _ = p.child.wait();
    }
}

/// Kills the children when dropped (on every exit path, errors included).
pub(crate) struct Procs(pub(crate) Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        kill_all(&mut self.0);
    }
}

pub(crate) fn write_random_file(path: &Path, size: u64) -> Result<()> {
    // A seed from the clock: every run shares fresh content.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
    crate::generate_file(path, size, seed).with_context(|| format!("writing {}", path.display()))
}

// ----- the bench ---------------------------------------------------------------------

#[derive(Default)]
struct HostResult {
    done_at: Option<Duration>,
    elapsed_ms: Option<u64>,
    path: Option<PathBuf>,
    md5_ok: Option<bool>,
    error: Option<String>,
    up_bytes: u64,
    down_bytes: u64,
    cpu_s: Option<f64>,
}

fn bench(args: Args, stop: &AtomicBool) -> Result<()> {
    let octo = match &args.octo {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this executable")?,
    };
    let n = args.hosts;
    let dir = std::env::temp_dir().join(format!("octo-swarm-{}", std::process::id()));
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let res = if args.managed {
        crate::managed_bench::bench_managed(&args, &octo, &dir, stop)
    } else {
        bench_in(&args, &octo, &dir, stop)
    };
    let failed = !matches!(res, Ok(true));
    if !args.keep {
        // The content copies are large; the logs are kept when something failed.
        let _ = fs::remove_dir_all(dir.join("src"));
        for i in 1..=n {
            let _ = fs::remove_dir_all(dir.join(format!("h{i}")));
        }
        if !failed {
            let _ = fs::remove_dir_all(&dir);
        }
    }
    if failed && !args.json {
        eprintln!("logs kept in {}", logs.display());
    }
    match res {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "some hosts failed or received corrupt content (logs in {})",
            logs.display()
        ),
        Err(e) => Err(e),
    }
}

/// Both benches' start: fresh content in `dir/src/content.bin` (and its MD5), then
/// the namespaces and shaped links, torn down when the returned topology drops.
pub(crate) fn prepare(
    args: &Args,
    dir: &Path,
    say: impl Fn(String),
) -> Result<(PathBuf, octopus_transfer::manifest::Md5Sum, Topology)> {
    let src_dir = dir.join("src");
    fs::create_dir_all(&src_dir)?;
    let src = src_dir.join("content.bin");
    say(format!(
        "generating {} bytes in {}",
        args.size,
        src.display()
    ));
    write_random_file(&src, args.size)?;
    let want = md5_file(&src).context("hashing the source")?;
    say(format!(
        "building 1 + {} namespaces on bridge {BRIDGE}, {} bit/s each way per host",
        args.hosts,
        args.rate * 8
    ));
    let topo = build_topology(args.hosts, args.rate, args.keep)?;
    Ok((src, want, topo))
}

/// Runs one bench; Ok(false) when a host failed or a copy mismatched.
fn bench_in(args: &Args, octo: &Path, dir: &Path, stop: &AtomicBool) -> Result<bool> {
    let n = args.hosts;
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let (src, want, _topo) = prepare(args, dir, say)?;

    let (tx, rx) = mpsc::channel();
    let mut procs = Procs(Vec::new());
    let filter = args.log.as_deref();
    let share_args: Vec<String> = vec![
        "share".into(),
        "--json".into(),
        "--listen".into(),
        format!("{}:{PORT}", ip_of(0)),
        src.display().to_string(),
    ];
    procs.0.push(Proc::spawn(
        0,
        octo,
        &share_args,
        &dir.join("logs/h0.log"),
        filter,
        &tx,
    )?);
    let ticket = wait_ready(&rx, stop)?;
    let sharer_tx0 = sharer_tx_bytes()?;
    let counters0: Vec<(u64, u64)> = (0..=n)
        .map(|i| {
            (
                counter(&veth_br(i), "rx_bytes"),
                counter(&veth_br(i), "tx_bytes"),
            )
        })
        .collect();
    let cpu0 = CpuTimes::now();

    say(format!("launching {n} getters"));
    let t0 = Instant::now();
    for i in 1..=n {
        let dest = dir.join(format!("h{i}"));
        fs::create_dir_all(&dest)?;
        let a: Vec<String> = vec![
            "get".into(),
            "--json".into(),
            "--linger".into(),
            "120s".into(),
            "--listen".into(),
            format!("{}:{PORT}", ip_of(i)),
            ticket.clone(),
            dest.display().to_string(),
        ];
        let log = dir.join(format!("logs/h{i}.log"));
        procs.0.push(Proc::spawn(i, octo, &a, &log, filter, &tx)?);
    }
    drop(tx);

    let mut results: BTreeMap<u32, HostResult> =
        (1..=n).map(|i| (i, HostResult::default())).collect();
    let deadline = t0 + Duration::from_secs(args.timeout);
    let mut pending = n;
    let mut interrupted = false;
    let mut sharer_exit = None;
    while pending > 0 {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok(Line::Out(0, _, _)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Line::Out(h, at, line)) => {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let r = results.get_mut(&h).expect("known host");
                if r.done_at.is_some() || r.error.is_some() {
                    continue;
                }
                match v["event"].as_str() {
                    Some("done") => {
                        r.done_at = Some(at - t0);
                        r.elapsed_ms = v["elapsed_ms"].as_u64();
                        r.path = v["files"][0]["path"].as_str().map(PathBuf::from);
                        pending -= 1;
                        say(format!("  h{h} done at {:.2}s", (at - t0).as_secs_f64()));
                    }
                    Some("error") => {
                        r.error = Some(v["message"].as_str().unwrap_or("error").to_string());
                        pending -= 1;
                    }
                    _ => {}
                }
            }
            Ok(Line::Eof(0)) => {
                // The sharer must outlive the run: without it the result means nothing.
                let status = procs.0[0].child.wait().map(|s| s.to_string());
                let status = status.unwrap_or_else(|e| e.to_string());
                sharer_exit = Some(format!(
                    "{status}, {:.1}s after launch",
                    t0.elapsed().as_secs_f64()
                ));
                break;
            }
            Ok(Line::Eof(h)) => {
                let r = results.get_mut(&h).expect("known host");
                if r.done_at.is_none() && r.error.is_none() {
                    r.error = Some("exited before completing".into());
                    pending -= 1;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let wall = t0.elapsed();
    let cpu1 = CpuTimes::now();
    let cpu_secs: Vec<Option<f64>> = procs
        .0
        .iter()
        .map(|p| proc_cpu_secs(p.child.id()))
        .collect();
    let sharer_tx = sharer_tx_bytes()?.saturating_sub(sharer_tx0);
    for (i, r) in &mut results {
        let (rx0, tx0) = counters0[*i as usize];
        // The bridge side receives what the host uploads and sends what it downloads.
        r.up_bytes = counter(&veth_br(*i), "rx_bytes").saturating_sub(rx0);
        r.down_bytes = counter(&veth_br(*i), "tx_bytes").saturating_sub(tx0);
        r.cpu_s = cpu_secs.get(*i as usize).copied().flatten();
        if r.done_at.is_none() && r.error.is_none() {
            r.error = Some(if interrupted {
                "interrupted".into()
            } else {
                format!("not done after {}s", args.timeout)
            });
        }
    }
    kill_all(&mut procs.0);
    if interrupted {
        bail!("interrupted");
    }
    if let Some(status) = sharer_exit {
        // Exit status 0 means it got SIGINT or SIGTERM from someone else.
        bail!(
            "the sharer exited during the run ({status}); logs in {}",
            dir.join("logs").display()
        );
    }

    // Verify the copies, two at a time (hashing is CPU-bound).
    let todo: Vec<(u32, PathBuf)> = results
        .iter()
        .filter_map(|(&i, r)| r.path.clone().map(|p| (i, p)))
        .collect();
    let checked: Vec<(u32, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .chunks(todo.len().div_ceil(2).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(i, p)| (*i, md5_file(p).is_ok_and(|m| m == want)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (i, ok) in checked {
        results.get_mut(&i).expect("known host").md5_ok = Some(ok);
    }

    let ideal = args.size as f64 / args.rate as f64;
    let last = results
        .values()
        .filter_map(|r| r.done_at)
        .max()
        .map(|d| d.as_secs_f64());
    let all_ok = results
        .values()
        .all(|r| r.error.is_none() && r.md5_ok == Some(true));
    let last_over_ideal = last.map(|l| l / ideal);
    let upload_ratio = sharer_tx as f64 / args.size as f64;
    let (cpu_user, cpu_sys, cpu_irq) = cpu0.shares(cpu1);
    let cpu_busy = cpu_user + cpu_sys + cpu_irq;
    let sharer_cpu = cpu_secs.first().copied().flatten();
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
    let met = all_ok
        && last_over_ideal.is_some_and(|r| r <= TARGET_LAST_OVER_IDEAL)
        && upload_ratio <= TARGET_SHARER_UPLOAD;

    if args.json {
        let per_host: Vec<Value> = results
            .iter()
            .map(|(i, r)| {
                json!({"host": i, "done_s": r.done_at.map(|d| d.as_secs_f64()),
                       "elapsed_ms": r.elapsed_ms, "md5_ok": r.md5_ok, "error": r.error,
                       "up_bytes": r.up_bytes, "down_bytes": r.down_bytes, "cpu_s": r.cpu_s})
            })
            .collect();
        println!(
            "{}",
            json!({"event": "swarm-bench", "hosts": n, "size": args.size,
                   "rate_bytes_per_s": args.rate, "md5": hex(&want),
                   "ideal_s": ideal, "last_s": last, "last_over_ideal": last_over_ideal,
                   "sharer_tx_bytes": sharer_tx, "sharer_upload_over_size": upload_ratio,
                   "wall_s": wall.as_secs_f64(), "ok": all_ok,
                   "cpu": {"busy": cpu_busy, "user": cpu_user, "system": cpu_sys,
                           "irq": cpu_irq, "sharer_s": sharer_cpu, "cores": cores},
                   "targets": {"last_over_ideal_max": TARGET_LAST_OVER_IDEAL,
                               "sharer_upload_over_size_max": TARGET_SHARER_UPLOAD,
                               "met": met},
                   "per_host": per_host})
        );
    } else {
        println!("host  done_s  elapsed_ms  down_MB   up_MB  cpu_s  md5");
        for (i, r) in &results {
            let done = r
                .done_at
                .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()));
            let el = r.elapsed_ms.map_or("-".into(), |e| e.to_string());
            let md5 = match (r.md5_ok, &r.error) {
                (_, Some(e)) => format!("FAILED: {e}"),
                (Some(true), None) => "ok".into(),
                (Some(false), None) => "MISMATCH".into(),
                (None, None) => "-".into(),
            };
            let cpu = r.cpu_s.map_or("-".into(), |c| format!("{c:.1}"));
            println!(
                "h{i:<4}{done:>7}  {el:>10}  {:>7.1} {:>7.1}  {cpu:>5}  {md5}",
                r.down_bytes as f64 / 1e6,
                r.up_bytes as f64 / 1e6
            );
        }
        let last_s = last.map_or("-".into(), |l| format!("{l:.2}s"));
        let ratio = last_over_ideal.map_or("-".into(), |r| format!("{r:.2}"));
        println!(
            "last host: {last_s}   ideal (size / rate): {ideal:.2}s   last / ideal: {ratio} (target <= {TARGET_LAST_OVER_IDEAL})"
        );
        println!(
            "sharer upload: {:.1} MB = {upload_ratio:.2} x content size (target <= {TARGET_SHARER_UPLOAD}; wire bytes incl. headers)",
            sharer_tx as f64 / 1e6
        );
        println!(
            "cpu busy: {:.0}% of {cores} cores (user {:.0}%, system {:.0}%, irq {:.0}%), sharer {} cpu-s",
            cpu_busy * 100.0,
            cpu_user * 100.0,
            cpu_sys * 100.0,
            cpu_irq * 100.0,
            sharer_cpu.map_or("-".into(), |c| format!("{c:.1}")),
        );
        println!(
            "targets {}   content {}",
            if met { "met" } else { "MISSED" },
            if all_ok { "verified" } else { "FAILED" }
        );
    }
    Ok(all_ok)
}

/// Waits for the sharer's `ready` line and returns its ticket.
fn wait_ready(rx: &mpsc::Receiver<Line>, stop: &AtomicBool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Line::Out(_, _, line)) => {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match (v["event"].as_str(), v["ticket"].as_str()) {
                    (Some("ready"), Some(t)) => return Ok(t.to_string()),
                    (Some("error"), _) => bail!("the sharer failed: {}", v["message"]),
                    _ => {}
                }
            }
            Ok(Line::Eof(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the sharer exited before printing its ticket")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    bail!("the sharer printed no ticket")
}
