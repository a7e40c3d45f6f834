//! `octo demo`: the main job on embedded defaults, on one machine.
//!
//! It starts a center (in this process, embedded store, port 0), enrolls `n` local
//! agents (child processes running `octo agent`), generates a file, and copies it to
//! every agent with `octo cp` (progress bar on a terminal), then checks each host's
//! MD5 and prints where the content went and how fast.
//!
//! Why each agent gets its own mount namespace: agents on one machine share one file
//! system, and a copy to `all:/srv/demo/release.tar` must land once per host, as it
//! would on real servers. Each agent runs under `unshare -m` (as root) or
//! `unshare -Urm` (as a user, with a user namespace) with a private tmpfs on the
//! demo's destination directory. Where neither works, the demo says so and gives each
//! agent its own destination directory instead, one copy per agent. The product
//! itself never rewrites paths.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::ctl::{self, Client, Conn, CpArgs};

/// Agent processes, killed when the demo ends however it ends.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `unshare` arguments that give a child its own mount namespace here, if any.
fn isolation() -> Option<Vec<&'static str>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let args: Vec<&'static str> = if root {
        vec!["-m", "--propagation", "private"]
    } else {
        vec!["-Urm", "--propagation", "private"]
    };
    let ok = Command::new("unshare")
        .args(&args)
        .args([
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(args)
}

pub async fn run(size: u64, n: usize, json_out: bool) -> Result<()> {
    if n == 0 {
        bail!("the demo needs at least one agent");
    }
    let dir = std::env::temp_dir().join(format!("octo-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let res = run_in(&dir, size, n, json_out).await;
    let _ = std::fs::remove_dir_all(&dir);
    res
}

async fn run_in(dir: &Path, size: u64, n: usize, json_out: bool) -> Result<()> {
    let say = |msg: String| {
        if !json_out {
            eprintln!("{msg}");
        }
    };
    let center = octopus_center::center::spawn(octopus_center::center::CenterConfig {
        listen: "127.0.0.1:0".parse().expect("valid"),
        data_dir: dir.join("center"),
        heartbeat: Duration::from_secs(1),
        content_quota: octopus_center::center::DEFAULT_CONTENT_QUOTA,
        registry: None,
        insecure_http: false,
        api_sans: Vec::new(),
        http_limits: Default::default(),
        audit_keep: octopus_center::caps::DEFAULT_AUDIT_KEEP,
        disk_reserve: octopus_center::caps::DEFAULT_DISK_RESERVE,
    })
    .await
    .context("starting the center")?;
    let addr = center.local_addr();
    let api = center.api_url.clone();
    let conn = Conn {
        center: Some(api.clone()),
        token: center.new_admin_token.clone(),
        ca: Some(dir.join("center").join("ca.pem")),
        insecure_http: false,
    };
    say(format!(
        "center running at {api} (data in {})",
        dir.join("center").display()
    ));

    let c2 = conn.clone();
    let enroll = tokio::task::spawn_blocking(move || -> Result<String> {
        let c = Client::new(&c2)?;
        let v = c.post(
            "creating an enroll token",
            "/tokens",
            &json!({"scope": "enroll", "ttl_ms": 3_600_000u64, "note": "octo demo"}),
        )?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .context("the center gave no token")
    })
    .await
    .context("joining the API client")??;

    let view = dir.join("srv");
    std::fs::create_dir_all(&view).with_context(|| format!("creating {}", view.display()))?;
    let iso = isolation();
    if iso.is_none() {
        say("no mount namespaces here (unshare -m / -Urm failed): each agent gets its own destination directory instead".into());
    }
    let exe = std::env::current_exe().context("finding the octo binary")?;
    let tmpfs = format!("size={}", size + (64 << 20));
    let mut agents = Agents(Vec::new());
    for i in 1..=n {
        let name = format!("demo-{i}");
        let data = dir.join(format!("agent-{i}"));
        let agent = format!(
            "exec '{}' agent --center {addr} --token {enroll} --data-dir '{}' --name {name}",
            exe.display(),
            data.display()
        );
        let mut cmd = match &iso {
            Some(args) => {
                let mut c = Command::new("unshare");
                c.args(args).args([
                    "sh",
                    "-c",
                    &format!(
                        "mount -t tmpfs -o {tmpfs} tmpfs '{}' && {agent}",
                        view.display()
                    ),
                ]);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.args(["-c", &agent]);
                c
            }
        };
        let log = std::fs::File::create(dir.join(format!("agent-{i}.log")))
            .context("creating the agent log")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "warn");
        agents
            .0
            .push(cmd.spawn().context("starting an agent process")?);
    }
    let c3 = conn.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let c = Client::new(&c3)?;
        loop {
            let v = c.get("listing agents", "/agents")?;
            let online = v
                .as_array()
                .map_or(0, |a| a.iter().filter(|a| a["status"] == "online").count());
            if online >= n {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("only {online} of {n} agents came online within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .context("joining the API client")??;
    say(format!(
        "{n} agents enrolled and online in {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    let src = dir.join("release.tar");
    crate::generate_file(&src, size, 0x9e37_79b9_7f4a_7c15 ^ size)?;
    let want = octopus_transfer::manifest::hex(
        &octopus_transfer::manifest::md5_file(&src).context("hashing the demo file")?,
    );
    // One copy to every host, or one per host when they share a file system.
    let copies: Vec<(String, PathBuf)> = match iso {
        Some(_) => vec![("demo-*".into(), view.join("release.tar"))],
        None => (1..=n)
            .map(|i| {
                (
                    format!("demo-{i}"),
                    view.join(format!("demo-{i}")).join("release.tar"),
                )
            })
            .collect(),
    };
    let t = Instant::now();
    for (target, dest) in &copies {
        say(format!(
            "octo cp {} {target}:{}",
            src.display(),
            dest.display()
        ));
        let ok = ctl::cp(
            conn.clone(),
            CpArgs {
                recursive: false,
                mkdir: true,
                mode: None,
                allow_special_mode: false,
                limit_up: None,
                limit_down: None,
                batch: None,
                ttl: Duration::from_secs(600),
                async_: false,
                owner: None,
                hot: false,
                small: 1 << 20,
                json: json_out,
                args: vec![
                    src.display().to_string(),
                    format!("{target}:{}", dest.display()),
                ],
            },
        )
        .await?;
        if !ok {
            bail!("the copy to {target} failed");
        }
    }
    let took = t.elapsed();

    // Each host's agent reports the MD5 of the file it verified and put in place.
    let c4 = conn.clone();
    let per_host: Vec<(String, String)> =
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, String)>> {
            let c = Client::new(&c4)?;
            // Listings carry no per-host results: show each task (a copy's output is its MD5s).
            let v: Value = c.get("listing tasks", "/tasks?limit=100")?;
            let mut out = Vec::new();
            for t in v.as_array().into_iter().flatten() {
                let id = t["id"].as_u64().context("a task without an id")?;
                let t: Value = c.get("showing the copy", &format!("/tasks/{id}"))?;
                for h in t["hosts"].as_array().into_iter().flatten() {
                    let md5 = h["md5"][0].as_str().unwrap_or("").to_string();
                    out.push((h["host"].as_str().unwrap_or("").to_string(), md5));
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .context("joining the API client")??;
    let verified = per_host.len() == n && per_host.iter().all(|(_, m)| *m == want);
    let mbps = (size * n as u64) as f64 / took.as_secs_f64() / 1e6;
    if json_out {
        println!(
            "{}",
            json!({"event": "done", "bytes": size, "agents": n, "elapsed_ms": took.as_millis() as u64,
                   "isolated": iso.is_some(), "md5": want, "verified": verified,
                   "hosts": per_host.iter().map(|(h, m)| json!({"host": h, "md5": m})).collect::<Vec<_>>()})
        );
    } else {
        for (h, m) in &per_host {
            println!(
                "{h}: {m} {}",
                if *m == want { "verified" } else { "MISMATCH" }
            );
        }
        println!(
            "copied {size} bytes to {n} agents in {:.2}s ({mbps:.0} MB/s delivered in all), md5 {want}",
            took.as_secs_f64()
        );
    }
    // The center first, so agents see it leave rather than it logging their loss.
    center.shutdown().await;
    drop(agents);
    if !verified {
        bail!("not every host has the content with its MD5");
    }
    Ok(())
}
