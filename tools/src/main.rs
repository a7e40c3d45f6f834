//! `octo`: the one command-line tool of Octopus.
//!
//! Today it shares and fetches content peer to peer (`share`, `get`), runs a local
//! demo, and measures swarms in network namespaces (`swarm-bench`). The center and
//! agent commands arrive with their issues.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use octopus_transfer::limit::parse_rate;
use octopus_transfer::manifest::{hex, BuildOptions};
use octopus_transfer::node::{self, NodeConfig, NodeHandle};
use octopus_transfer::ticket::Ticket;
use serde_json::json;

mod ctl;
mod demo;
mod lines;
mod load;
mod managed_bench;
mod pin;
mod swarm_bench;

const RATE_HELP: &str = "RATE is bytes per second unless its unit ends in `bit`: \
    500KB, 10MB, 1GB are decimal bytes; 512KiB, 10MiB, 1GiB (or K, M, G) are binary bytes; \
    100kbit, 100Mbit, 1Gbit are BITS per second (100Mbit = 12.5 MB/s). A bare number is bytes per second.";

#[derive(Parser, Debug)]
#[command(name = "octo", version, about = "Octopus: move release packages to thousands of servers", after_help = RATE_HELP)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve files or directories and print a ticket; runs until interrupted.
    #[command(after_help = RATE_HELP)]
    Share {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:0")]
        listen: SocketAddr,
        /// Upload limit (see RATE below).
        #[arg(long, value_parser = parse_rate_arg)]
        limit_up: Option<u64>,
        /// Piece size override, a power of two (e.g. 1MiB); default depends on content size.
        #[arg(long, value_parser = parse_rate_arg)]
        piece_size: Option<u64>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Fetch the content of a ticket into DEST (cp semantics), uploading to peers meanwhile.
    #[command(after_help = RATE_HELP)]
    Get {
        #[arg(long, default_value = "0.0.0.0:0")]
        listen: SocketAddr,
        /// Upload limit (see RATE below).
        #[arg(long, value_parser = parse_rate_arg)]
        limit_up: Option<u64>,
        /// Download limit (see RATE below).
        #[arg(long, value_parser = parse_rate_arg)]
        limit_down: Option<u64>,
        /// Keep serving other peers this long after completion (e.g. 10s, 2m, 0).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        linger: Duration,
        #[arg(long)]
        json: bool,
        ticket: String,
        dest: PathBuf,
    },
    /// The main job on embedded defaults: a center and local agents, then `octo cp` of a
    /// generated file to all of them, with progress, and its MD5 checked on every host.
    Demo {
        /// Size of the generated file.
        #[arg(long, default_value = "256MiB", value_parser = parse_rate_arg)]
        size: u64,
        /// How many local agents.
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// Only the transfer engine: share the file and fetch it once over QUIC.
        #[arg(long)]
        engine: bool,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark a swarm in network namespaces with shaped links (needs root).
    SwarmBench(swarm_bench::Args),
    /// Run the management center: HTTP API on TCP and the agents' QUIC on UDP, same port.
    Center {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Where the store, CA and admin token live (default ~/.local/share/octopus/center).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How often agents report.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        heartbeat: Duration,
        /// Disk quota for uploaded content (small and hot files, `cp --async`).
        #[arg(long, default_value = "20GiB", value_parser = parse_rate_arg)]
        content_quota: u64,
        /// Share the fleet with other centers through ZooKeeper:
        /// zk://HOST:PORT[,HOST:PORT...]/CHROOT (default: embedded, one center).
        #[arg(long)]
        registry: Option<String>,
        #[command(flatten)]
        tls: ctl::CenterTls,
        /// Audit entries kept; older ones are deleted.
        #[arg(long, default_value_t = octopus_center::caps::DEFAULT_AUDIT_KEEP)]
        audit_keep: u64,
        /// Free space kept on the data directory's filesystem: below it, writes answer
        /// 507 (reads keep working). 0 turns the check off.
        #[arg(long, default_value = "64MiB", value_parser = parse_size_or_zero)]
        disk_reserve: u64,
        #[arg(long)]
        json: bool,
    },
    /// Run the agent daemon on this host; enrolls on first start.
    Agent(ctl::AgentOpts),
    /// List agents, optionally only those a target selects; approve re-enrollments
    /// and remove hosts.
    #[command(args_conflicts_with_subcommands = true)]
    Agents {
        #[command(flatten)]
        conn: ctl::Conn,
        target: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<ctl::AgentsCmd>,
    },
    /// Run a command on hosts and print their output, like pssh -i.
    Exec {
        #[command(flatten)]
        conn: ctl::Conn,
        #[command(flatten)]
        args: ctl::ExecArgs,
    },
    /// Copy files or directories to hosts, peer to peer: SRC... TARGET:DEST.
    #[command(after_help = RATE_HELP)]
    Cp {
        #[command(flatten)]
        conn: ctl::Conn,
        #[command(flatten)]
        args: ctl::CpArgs,
    },
    /// Inspect, follow or cancel tasks.
    Task {
        #[command(flatten)]
        conn: ctl::Conn,
        #[command(subcommand)]
        cmd: ctl::TaskCmd,
    },
    /// Create, list or revoke API tokens.
    Token {
        #[command(flatten)]
        conn: ctl::Conn,
        #[command(subcommand)]
        cmd: ctl::TokenCmd,
    },
    /// Load tool: many simulated agents in one process over the real protocol.
    Load(load::Args),
    /// Read the audit log of mutating API calls.
    Audit {
        #[command(flatten)]
        conn: ctl::Conn,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

fn parse_rate_arg(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}

/// A size like `64MiB`, or `0` (off).
fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_rate_arg(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info,octopus_transfer=info",
        _ => "debug,quinn=info,quinn_proto=info,rustls=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let json = match &cli.cmd {
        Cmd::Share { json, .. }
        | Cmd::Get { json, .. }
        | Cmd::Demo { json, .. }
        | Cmd::Center { json, .. }
        | Cmd::Audit { json, .. } => *json,
        Cmd::Agents { cmd, json, .. } => match cmd {
            Some(ctl::AgentsCmd::Approve { json, .. } | ctl::AgentsCmd::Rm { json, .. }) => *json,
            None => *json,
        },
        Cmd::SwarmBench(a) => a.json,
        Cmd::Load(a) => a.json,
        Cmd::Agent(a) => a.json,
        Cmd::Exec { args, .. } => args.json,
        Cmd::Cp { args, .. } => args.json,
        Cmd::Task { cmd, .. } => match cmd {
            ctl::TaskCmd::List { json, .. }
            | ctl::TaskCmd::Show { json, .. }
            | ctl::TaskCmd::Wait { json, .. }
            | ctl::TaskCmd::Cancel { json, .. } => *json,
        },
        Cmd::Token { cmd, .. } => match cmd {
            ctl::TokenCmd::Create { json, .. }
            | ctl::TokenCmd::List { json }
            | ctl::TokenCmd::Revoke { json, .. } => *json,
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(json, anyhow::Error::from(e).context("starting the runtime")),
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Share {
                listen,
                limit_up,
                piece_size,
                json,
                paths,
            } => share(listen, limit_up, piece_size, json, paths).await,
            Cmd::Get {
                listen,
                limit_up,
                limit_down,
                linger,
                json,
                ticket,
                dest,
            } => get(listen, limit_up, limit_down, linger, json, ticket, dest).await,
            Cmd::Demo {
                size,
                agents,
                engine: false,
                json,
            } => demo::run(size, agents, json).await,
            Cmd::Demo {
                size,
                engine: true,
                json,
                ..
            } => demo(size, json).await,
            Cmd::SwarmBench(args) => swarm_bench::run(args).await,
            Cmd::Load(args) => load::run(args).await,
            Cmd::Center {
                listen,
                data_dir,
                heartbeat,
                content_quota,
                registry,
                tls,
                audit_keep,
                disk_reserve,
                json,
            } => {
                let limits = ctl::CenterLimits {
                    content_quota,
                    audit_keep,
                    disk_reserve,
                };
                ctl::center(listen, data_dir, heartbeat, limits, registry, tls, json).await
            }
            Cmd::Agent(opts) => ctl::agent(opts).await,
            // The API clients block on HTTP; nothing else runs on this runtime then.
            Cmd::Agents {
                conn,
                cmd: Some(cmd),
                ..
            } => ctl::agents_cmd(&conn, cmd),
            Cmd::Agents {
                conn, target, json, ..
            } => ctl::agents(&conn, target, json),
            Cmd::Exec { conn, args } => return ctl::exec(&conn, args),
            Cmd::Cp { conn, args } => return ctl::cp(conn, args).await,
            Cmd::Task { conn, cmd } => return ctl::task(&conn, cmd),
            Cmd::Token { conn, cmd } => ctl::token(&conn, cmd),
            Cmd::Audit { conn, limit, json } => ctl::audit(&conn, limit, json),
        }
        .map(|()| true)
    });
    match res {
        Ok(true) => ExitCode::SUCCESS,
        // The command printed why (a summary of failed hosts).
        Ok(false) => ExitCode::FAILURE,
        Err(e) => report(json, e),
    }
}

/// Exit code of an agent whose name is enrolled already (and no re-enrollment was
/// approved): a supervisor should not restart it in a loop.
const EXIT_NAME_TAKEN: u8 = 4;

fn report(json: bool, e: anyhow::Error) -> ExitCode {
    if json {
        println!("{}", json!({"event": "error", "message": format!("{e:#}")}));
    } else {
        eprintln!("error: {e:#}");
    }
    // A center that fails the CA pin gets its own status, so scripts can tell it.
    if e.chain().any(|c| c.is::<pin::PinError>()) {
        return ExitCode::from(pin::EXIT_UNVERIFIED);
    }
    let name_taken = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<octopus_agent::daemon::AgentError>(),
            Some(octopus_agent::daemon::AgentError::NameTaken(_))
        )
    });
    if name_taken {
        ExitCode::from(EXIT_NAME_TAKEN)
    } else {
        ExitCode::FAILURE
    }
}

async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// `OCTO_FAULT` injects deliberate misbehaviour for the end-to-end tests (for example
/// `corrupt-uploads`); it is not a user-facing option.
fn fault_from_env() -> Result<Option<node::Fault>> {
    match std::env::var("OCTO_FAULT") {
        Ok(s) => Ok(Some(
            s.parse()
                .map_err(anyhow::Error::msg)
                .context("reading OCTO_FAULT")?,
        )),
        Err(_) => Ok(None),
    }
}

async fn share(
    listen: SocketAddr,
    limit_up: Option<u64>,
    piece_size: Option<u64>,
    json: bool,
    paths: Vec<PathBuf>,
) -> Result<()> {
    let piece_size = piece_size
        .map(|p| u32::try_from(p).context("checking the piece size"))
        .transpose()?;
    let cfg = NodeConfig {
        listen,
        limit_up,
        fault: fault_from_env()?,
        ..Default::default()
    };
    let opts = BuildOptions {
        piece_size,
        ..Default::default()
    };
    let h = node::share(cfg, paths, opts)
        .await
        .context("starting to share")?;
    let ticket = h.ticket().encode();
    if json {
        println!(
            "{}",
            json!({"event": "ready", "ticket": ticket, "content": h.ticket().content.to_string(),
                   "bytes": h.manifest().total_size(), "addrs": h.ticket().addrs})
        );
    } else {
        eprintln!(
            "sharing {} bytes in {} entries on {}\nfetch with:\n  octo get {ticket} DEST",
            h.manifest().total_size(),
            h.manifest().entries.len(),
            h.local_addr()
        );
        println!("{ticket}");
    }
    std::io::stdout().flush().ok();
    interrupted().await;
    let p = h.progress().borrow().clone();
    h.shutdown().await;
    if json {
        println!(
            "{}",
            json!({"event": "stopped", "sent_bytes": p.sent_bytes, "peers": p.peers,
                   "limited_up_bytes": p.limited_up_bytes})
        );
    } else {
        eprintln!("stopped after uploading {} bytes", p.sent_bytes);
    }
    Ok(())
}

async fn get(
    listen: SocketAddr,
    limit_up: Option<u64>,
    limit_down: Option<u64>,
    linger: Duration,
    json: bool,
    ticket: String,
    dest: PathBuf,
) -> Result<()> {
    let ticket = Ticket::decode(&ticket).context("reading the ticket")?;
    let cfg = NodeConfig {
        listen,
        limit_up,
        limit_down,
        fault: fault_from_env()?,
        ..Default::default()
    };
    let started = Instant::now();
    let h = tokio::select! {
        h = node::get(cfg, ticket, dest) => h.context("starting the transfer")?,
        _ = interrupted() => bail!("interrupted"),
    };
    let bar = (!json && std::io::stderr().is_terminal()).then(|| progress_bar(&h));
    let res = tokio::select! {
        r = h.completed() => r,
        _ = interrupted() => Err("interrupted; verified pieces are kept and a rerun resumes".to_string()),
    };
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
    }
    let out = match res {
        Ok(o) => o,
        Err(e) => {
            h.shutdown().await;
            bail!("fetching the content: {e}");
        }
    };
    let elapsed = started.elapsed();
    if json {
        let files: Vec<_> = out
            .files
            .iter()
            .map(|(p, m)| json!({"path": p.display().to_string(), "md5": hex(m)}))
            .collect();
        let p = h.progress().borrow().clone();
        println!(
            "{}",
            json!({"event": "done", "bytes": out.received_bytes, "total_bytes": h.manifest().total_size(),
                   "limited_down_bytes": out.limited_down_bytes,
                   "resumed_bytes": p.resumed_bytes, "corrupt_pieces": p.corrupt_pieces,
                   "banned_peers": p.banned_peers, "elapsed_ms": elapsed.as_millis() as u64, "files": files})
        );
    } else {
        for (p, m) in &out.files {
            println!("{}  {}", hex(m), p.display());
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        eprintln!(
            "verified {} files, {} bytes total, {} received in {:.2}s ({:.1} MB/s)",
            out.files.len(),
            h.manifest().total_size(),
            out.received_bytes,
            secs,
            out.received_bytes as f64 / secs / 1e6
        );
    }
    std::io::stdout().flush().ok();
    if !linger.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(linger) => {}
            _ = interrupted() => {}
        }
    }
    h.shutdown().await;
    Ok(())
}

fn progress_bar(h: &NodeHandle) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let mut rx = h.progress();
    let total = rx.borrow().total_bytes;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ETA {eta}",
        )
        .expect("valid template"),
    );
    let b2 = bar.clone();
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let p = rx.borrow().clone();
            b2.set_position(p.have_bytes);
            b2.set_message(format!("{} peers", p.peers));
        }
    });
    (bar, task)
}

/// Writes `size` pseudo-random bytes (xorshift from `seed`) to `file`.
fn generate_file(file: &std::path::Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(file).context("creating the file")?);
    let mut x: u64 = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).context("writing the file")?;
        left -= n as u64;
    }
    f.flush().context("writing the file")
}

/// `octo demo --engine`: the transfer engine alone, one share and one get.
async fn demo(size: u64, json: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("octo-demo-{}", std::process::id()));
    let src = dir.join("src");
    let dst = dir.join("dst");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
    let file = src.join("release.tar");
    generate_file(&file, size, 0x9e37_79b9_7f4a_7c15)?;
    let t = Instant::now();
    let sharer = node::share(
        NodeConfig::default(),
        vec![file.clone()],
        BuildOptions::default(),
    )
    .await
    .context("starting to share")?;
    let hashed = t.elapsed();
    let ticket = sharer.ticket().clone();
    let t = Instant::now();
    let getter = node::get(NodeConfig::default(), ticket.clone(), dst.clone())
        .await
        .context("starting the transfer")?;
    let out = getter
        .completed()
        .await
        .map_err(anyhow::Error::msg)
        .context("fetching the content")?;
    let took = t.elapsed();
    let want = octopus_transfer::manifest::md5_file(&file).context("hashing the source")?;
    let ok = out.files.len() == 1 && out.files[0].1 == want;
    getter.shutdown().await;
    sharer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let mbps = size as f64 / took.as_secs_f64() / 1e6;
    if json {
        println!(
            "{}",
            json!({"event": "done", "bytes": size, "hash_ms": hashed.as_millis() as u64,
                   "elapsed_ms": took.as_millis() as u64, "md5": hex(&want), "verified": ok})
        );
    } else {
        println!("ticket: {}", ticket.encode());
        println!(
            "shared {size} bytes (hashed in {:.2}s), fetched over QUIC in {:.2}s = {mbps:.0} MB/s, md5 {} {}",
            hashed.as_secs_f64(),
            took.as_secs_f64(),
            hex(&want),
            if ok { "verified" } else { "MISMATCH" }
        );
    }
    if !ok {
        bail!("demo copy does not match its source");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
    }
}
