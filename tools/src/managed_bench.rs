//! `octo swarm-bench --managed`: the whole product in network namespaces.
//!
//! Host 0 runs the center and is the source: `octo cp` runs there and seeds. Hosts
//! 1..=N each run `octo agent`, enrolled with the center over its shaped link, in a
//! mount namespace of their own with a private tmpfs on the destination directory (so
//! N copies land once per host, as on N servers). Every link is shaped with `tbf` as
//! in the plain bench.
//!
//! What is measured: from the moment the center created the copy task (the source is
//! hashed and seeding) to each host's `ok` event, as `octo cp --json` prints them; the
//! source's upload from its interface counter; then the same copy again, which must
//! move no content bytes (each agent reports what it received).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use octopus_transfer::manifest::hex;
use serde_json::{json, Value};

use crate::ctl::{Client, Conn};
use crate::swarm_bench::{
    ip_of, kill_all, prepare, sharer_tx_bytes, Args, CpuTimes, Line, Proc, Procs,
};

const CENTER_PORT: u16 = 7070;
/// The target for 1 source + 16 agents on 100 Mbit links.
const TARGET_LAST_OVER_IDEAL: f64 = 1.3;
/// Label of the `octo cp` process's lines (hosts are 0..=N).
const CP: u32 = 10_000;

/// One `octo cp` run: when each host finished, and what each received.
struct CopyRun {
    done: BTreeMap<String, f64>,
    failed: Vec<String>,
    received: BTreeMap<String, u64>,
    md5: BTreeMap<String, String>,
    source_tx: u64,
    wall: f64,
}

pub fn bench_managed(args: &Args, octo: &Path, dir: &Path, stop: &AtomicBool) -> Result<bool> {
    let n = args.hosts;
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let (src, want, _topo) = prepare(args, dir, say)?;
    let want = hex(&want);
    let (tx, rx) = mpsc::channel();
    let mut procs = Procs(Vec::new());
    let filter = args.log.as_deref();
    let logs = dir.join("logs");

    // The center, on the source host.
    let center_dir = dir.join("center");
    let center_addr = format!("{}:{CENTER_PORT}", ip_of(0));
    let argv: Vec<String> = [
        octo.display().to_string(),
        "center".into(),
        "--listen".into(),
        center_addr.clone(),
        "--data-dir".into(),
        center_dir.display().to_string(),
        "--heartbeat".into(),
        "1s".into(),
        "--json".into(),
    ]
    .into();
    procs.0.push(Proc::spawn_in(
        0,
        0,
        &argv,
        &logs.join("center.log"),
        filter,
        &tx,
    )?);
    wait_event(&rx, 0, "ready", Duration::from_secs(30), stop)?;
    let admin = fs::read_to_string(center_dir.join("admin.token"))
        .context("reading the admin token")?
        .trim()
        .to_string();
    let conn = Conn {
        center: Some(format!("https://{center_addr}")),
        token: Some(admin.clone()),
        ca: Some(center_dir.join("ca.pem")),
        insecure_http: false,
    };
    let client = Client::new(&conn)?;
    let enroll = client.post(
        "creating an enroll token",
        "/tokens",
        &json!({"scope": "enroll", "ttl_ms": 3_600_000u64}),
    )?["token"]
        .as_str()
        .context("no enroll token")?
        .to_string();

    // The agents, each with its own tmpfs on the destination directory.
    let view = dir.join("view");
    fs::create_dir_all(&view)?;
    let tmpfs = format!("size={}", args.size * 2 + (64 << 20));
    say(format!("starting {n} agents"));
    for i in 1..=n {
        let script = format!(
            "mount -t tmpfs -o {tmpfs} tmpfs '{}' && exec '{}' agent --center {center_addr} --token {enroll} --data-dir '{}' --name h{i} --json",
            view.display(),
            octo.display(),
            dir.join(format!("agent-{i}")).display(),
        );
        let argv: Vec<String> = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ]
        .map(String::from)
        .into();
        procs.0.push(Proc::spawn_in(
            i,
            i,
            &argv,
            &logs.join(format!("h{i}.log")),
            filter,
            &tx,
        )?);
    }
    let t = Instant::now();
    loop {
        let v = client.get("listing agents", "/agents")?;
        let online = v
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["status"] == "online").count());
        if online >= n as usize {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) || stop.load(Ordering::SeqCst) {
            bail!("only {online} of {n} agents came online");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say(format!(
        "{n} agents online after {:.1}s",
        t.elapsed().as_secs_f64()
    ));

    let dest = format!("h*:{}/content.bin", view.display());
    let cpu0 = CpuTimes::now();
    let first = copy(
        octo, &src, &dest, &conn, &logs, filter, &tx, &rx, args, stop, 1,
    )?;
    let cpu1 = CpuTimes::now();
    say(format!(
        "first copy: last host at {:.2}s",
        first.done.values().cloned().fold(0.0, f64::max)
    ));
    let second = copy(
        octo, &src, &dest, &conn, &logs, filter, &tx, &rx, args, stop, 2,
    )?;
    drop(tx);
    kill_all(&mut procs.0);

    let ideal = args.size as f64 / args.rate as f64;
    let last = first.done.values().cloned().fold(0.0, f64::max);
    let all_ok = first.failed.is_empty()
        && first.done.len() == n as usize
        && first.md5.values().all(|m| *m == want);
    let second_moved: u64 = second.received.values().sum();
    let second_ok = second.failed.is_empty() && second.done.len() == n as usize;
    let (u, sy, irq) = cpu0.shares(cpu1);
    let met = all_ok && last / ideal <= TARGET_LAST_OVER_IDEAL && second_moved == 0;
    if args.json {
        println!(
            "{}",
            json!({"event": "managed-bench", "hosts": n, "size": args.size,
                   "rate_bytes_per_s": args.rate, "md5": want, "ideal_s": ideal,
                   "last_s": last, "last_over_ideal": last / ideal,
                   "one_server_s": ideal * n as f64,
                   "source_upload_over_size": first.source_tx as f64 / args.size as f64,
                   "per_host_done_s": first.done, "first_wall_s": first.wall,
                   "second": {"wall_s": second.wall, "received_bytes": second_moved,
                              "source_tx_bytes": second.source_tx, "ok": second_ok},
                   "cpu": {"busy": u + sy + irq, "user": u, "system": sy, "irq": irq},
                   "ok": all_ok, "targets": {"last_over_ideal_max": TARGET_LAST_OVER_IDEAL,
                                            "met": met}})
        );
    } else {
        for (h, d) in &first.done {
            println!(
                "{h:<5} done at {d:6.2}s  md5 {}",
                first.md5.get(h).map_or("-", String::as_str)
            );
        }
        for h in &first.failed {
            println!("{h:<5} FAILED");
        }
        println!(
            "last host: {last:.2}s   ideal (size / rate): {ideal:.2}s   last / ideal: {:.2} (target <= {TARGET_LAST_OVER_IDEAL})   one server alone: {:.1}s",
            last / ideal,
            ideal * n as f64
        );
        println!(
            "source upload: {:.2} x content size   cpu busy {:.0}% (user {:.0}%, system {:.0}%, irq {:.0}%)",
            first.source_tx as f64 / args.size as f64,
            (u + sy + irq) * 100.0,
            u * 100.0,
            sy * 100.0,
            irq * 100.0
        );
        println!(
            "second copy: {:.2}s, {second_moved} content bytes received by the agents, source sent {} bytes on the wire",
            second.wall, second.source_tx
        );
        println!(
            "targets {}   content {}",
            if met { "met" } else { "MISSED" },
            if all_ok && second_ok {
                "verified"
            } else {
                "FAILED"
            }
        );
    }
    Ok(all_ok && second_ok)
}

/// Runs `octo cp --json` on the source host and collects its events.
#[allow(clippy::too_many_arguments)]
fn copy(
    octo: &Path,
    src: &Path,
    dest: &str,
    conn: &Conn,
    logs: &Path,
    filter: Option<&str>,
    tx: &mpsc::Sender<Line>,
    rx: &mpsc::Receiver<Line>,
    args: &Args,
    stop: &AtomicBool,
    round: u32,
) -> Result<CopyRun> {
    let api = conn.center.clone().unwrap_or_default();
    let token = conn.token.clone().unwrap_or_default();
    let argv: Vec<String> = [
        "env".to_string(),
        format!("OCTO_CENTER={api}"),
        format!("OCTO_TOKEN={token}"),
        octo.display().to_string(),
        "cp".into(),
        "--json".into(),
        src.display().to_string(),
        dest.to_string(),
    ]
    .into();
    let label = CP + round;
    let tx0 = sharer_tx_bytes()?;
    let mut p = Procs(vec![Proc::spawn_in(
        label,
        0,
        &argv,
        &logs.join(format!("cp-{round}.log")),
        filter,
        tx,
    )?]);
    let mut t0 = None;
    let mut run = CopyRun {
        done: BTreeMap::new(),
        failed: Vec::new(),
        received: BTreeMap::new(),
        md5: BTreeMap::new(),
        source_tx: 0,
        wall: 0.0,
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("the copy did not finish within {}s", args.timeout);
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Line::Out(l, at, line)) if l == label => {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match v["event"].as_str() {
                    Some("created") => t0 = Some(at),
                    Some("state") => {
                        let host = v["host"].as_str().unwrap_or("").to_string();
                        let since = t0.map_or(0.0, |t| (at - t).as_secs_f64());
                        match v["data"].as_str() {
                            Some("ok") => {
                                run.done.insert(host, since);
                            }
                            Some("failed" | "lost" | "expired" | "timed-out") => {
                                run.failed.push(host)
                            }
                            _ => {}
                        }
                    }
                    Some("summary") => {
                        run.wall = t0.map_or(0.0, |t| (at - t).as_secs_f64());
                        for h in v["task"]["hosts"].as_array().into_iter().flatten() {
                            let host = h["host"].as_str().unwrap_or("").to_string();
                            if let Some(r) = h["received"].as_u64() {
                                run.received.insert(host.clone(), r);
                            }
                            if let Some(m) = h["md5"][0].as_str() {
                                run.md5.insert(host, m.to_string());
                            }
                        }
                        break;
                    }
                    _ => {}
                }
            }
            Ok(Line::Eof(l)) if l == label => bail!("octo cp exited without a summary"),
            Ok(Line::Eof(0)) => bail!("the center exited during the copy"),
            _ => {}
        }
    }
    run.source_tx = sharer_tx_bytes()?.saturating_sub(tx0);
    let _ = p.0[0].child.wait();
    p.0.clear();
    Ok(run)
}

/// Waits for a `{"event": EVENT}` line from the process labelled `label`.
fn wait_event(
    rx: &mpsc::Receiver<Line>,
    label: u32,
    event: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Line::Out(l, _, line)) if l == label => {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["event"] == event {
                        return Ok(v);
                    }
                }
            }
            Ok(Line::Eof(l)) if l == label => bail!("process {label} exited before {event}"),
            _ => {}
        }
    }
    bail!("no {event} event from process {label}")
}
