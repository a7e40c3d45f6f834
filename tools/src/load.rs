//! `octo load`: many simulated agents in one process, over the real protocol.
//!
//! Each simulated agent is a real `octopus_agent::daemon` with its own key, its own
//! CA-issued certificate (real enrollment), its own QUIC endpoint and session, real
//! heartbeats and the real task journal; only the execution is simulated (every task
//! succeeds at once, without a process) so that one machine can hold thousands. This
//! measures the center, which is what the fleet-size figures are about.
//!
//! Prints one line (JSON with `--json`) when every agent has started, then runs until
//! interrupted; `octo agents` on the center gives the online count.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use serde_json::json;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The center's address, e.g. 127.0.0.1:7070.
    #[arg(long)]
    center: String,
    /// A reusable enroll token (octo token create --scope enroll).
    #[arg(long)]
    token: String,
    /// How many agents.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Name prefix: agents are PREFIX-0001, PREFIX-0002, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Where their keys and journals live (kept, so a rerun reuses the identities).
    #[arg(long)]
    data_dir: PathBuf,
    /// Agents started at once during ramp-up.
    #[arg(long, default_value_t = 50)]
    parallel: usize,
    #[arg(long)]
    pub json: bool,
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub async fn run(a: Args) -> Result<()> {
    raise_nofile();
    let addr_text = a
        .center
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let center = tokio::net::lookup_host(addr_text)
        .await
        .with_context(|| format!("resolving {addr_text:?}"))?
        .next()
        .context("the center address resolved to nothing")?;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(a.agents);
    let mut i = 0;
    while i < a.agents {
        let mut wave = Vec::new();
        for k in i..(i + a.parallel).min(a.agents) {
            let name = format!("{}-{:05}", a.prefix, k + 1);
            let cfg = octopus_agent::daemon::AgentConfig {
                center,
                enroll_token: Some(a.token.clone()),
                data_dir: a.data_dir.join(&name),
                name,
                tags: vec![
                    ("sim".into(), "1".into()),
                    ("group".into(), format!("g{}", k % 10)),
                ],
                simulate: true,
                cache_quota: 0,
                pool_listen: None,
                limit_up: None,
                limit_down: None,
            };
            wave.push(tokio::spawn(octopus_agent::daemon::spawn(cfg)));
        }
        for w in wave {
            handles.push(
                w.await
                    .context("joining an agent start")?
                    .context("starting a simulated agent")?,
            );
        }
        i += a.parallel;
    }
    let up = started.elapsed();
    if a.json {
        println!(
            "{}",
            json!({"event": "ready", "agents": handles.len(), "startup_ms": up.as_millis() as u64})
        );
    } else {
        eprintln!(
            "{} simulated agents started in {:.1}s",
            handles.len(),
            up.as_secs_f64()
        );
    }
    crate::interrupted().await;
    for h in handles {
        tokio::time::timeout(Duration::from_secs(2), h.shutdown())
            .await
            .ok();
    }
    Ok(())
}
