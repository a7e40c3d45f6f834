//! Task-queue throughput against a real ZooKeeper: one create per task (the naive
//! way) against one multi-op transaction per batch, and consumption in order with an
//! ack per entry against batched acks.
//!
//! ```text
//! cargo run --release -p octopus-center --example zk_queue_bench -- --zk 127.0.0.1:2181
//! cargo run --release -p octopus-center --example zk_queue_bench   # starts its own server
//! ```
//!
//! Options: `--zk HOST:PORT[,HOST:PORT...]` (without it a standalone server from
//! Debian's `zookeeper` package is started on a free loopback port), `--tasks N`
//! (default 5000), `--batch N` (default 500), `--fanout N` (hosts for the fan-out
//! line, default 1000). Everything goes under a fresh chroot `/octopus-bench-<pid>-…`.

use std::time::{Duration, Instant};

use octopus_center::zk::{QueueEntry, SessionOptions, TaskQueue, ZkSession, ZkUrl};

#[path = "../src/zk/testing.rs"]
#[allow(dead_code)]
mod testing;

struct Args {
    zk: Option<String>,
    tasks: u64,
    batch: usize,
    fanout: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        zk: None,
        tasks: 5000,
        batch: 500,
        fanout: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--zk" => args.zk = Some(value()?),
            "--tasks" => args.tasks = value()?.parse().map_err(|e| format!("--tasks: {e}"))?,
            "--batch" => args.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--fanout" => args.fanout = value()?.parse().map_err(|e| format!("--fanout: {e}"))?,
            "-h" | "--help" => return Err(
                "usage: zk_queue_bench [--zk HOST:PORT,...] [--tasks N] [--batch N] [--fanout N]"
                    .into(),
            ),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.batch == 0 || args.tasks == 0 {
        return Err("--tasks and --batch must be positive".into());
    }
    Ok(args)
}

fn rate(n: u64, d: Duration) -> String {
    format!("{:>9.0}/s", n as f64 / d.as_secs_f64())
}

/// Consumes `n` entries in order, checking the order, acking each (`batch == 1`) or
/// in batches.
async fn consume(q: &TaskQueue, host: &str, n: u64, batch: usize) -> Result<Duration, String> {
    let mut c = q.consumer(host).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut pending: Vec<QueueEntry> = Vec::with_capacity(batch);
    let mut last: Option<QueueEntry> = None;
    for _ in 0..n {
        let e = c
            .next_timeout(Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the queue ran dry")?;
        if let Some(prev) = last {
            if e.seq <= prev.seq || e.task <= prev.task {
                return Err(format!("out of order: {prev:?} then {e:?}"));
            }
        }
        last = Some(e);
        if batch == 1 {
            c.ack(&e).await.map_err(|e| e.to_string())?;
        } else {
            pending.push(e);
            if pending.len() == batch {
                c.ack_many(&pending).await.map_err(|e| e.to_string())?;
                pending.clear();
            }
        }
    }
    c.ack_many(&pending).await.map_err(|e| e.to_string())?;
    Ok(start.elapsed())
}

async fn run(args: Args) -> Result<(), String> {
    let _own;
    let servers = match &args.zk {
        Some(s) => s.clone(),
        None => {
            let server = testing::ZkServer::start()?;
            let s = server.connect_string();
            println!("started a standalone ZooKeeper on {s}");
            _own = server;
            s
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let url = ZkUrl::parse(&format!(
        "zk://{servers}/octopus-bench-{}-{nanos}",
        std::process::id()
    ))
    .map_err(|e| e.to_string())?;
    let session = ZkSession::connect(&url, SessionOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let q = TaskQueue::new(session);
    let n = args.tasks;
    println!(
        "queue benchmark: {n} tasks to one agent queue, batches of {}, {url}",
        args.batch
    );

    // Warm up (JIT on the server, connection, queue node).
    for t in 0..200 {
        q.enqueue("warmup", t).await.map_err(|e| e.to_string())?;
    }

    let start = Instant::now();
    for t in 0..n {
        q.enqueue("naive", t).await.map_err(|e| e.to_string())?;
    }
    let naive_enq = start.elapsed();

    let items: Vec<(&str, u64)> = (0..n).map(|t| ("multi", t)).collect();
    let start = Instant::now();
    for chunk in items.chunks(args.batch) {
        q.enqueue_batch(chunk).await.map_err(|e| e.to_string())?;
    }
    let multi_enq = start.elapsed();

    let naive_deq = consume(&q, "naive", n, 1).await?;
    let multi_deq = consume(&q, "multi", n, args.batch).await?;

    let hosts: Vec<(String, u64)> = (0..args.fanout).map(|i| (format!("h{i}"), 1)).collect();
    let start = Instant::now();
    q.enqueue_batch(&hosts).await.map_err(|e| e.to_string())?;
    let fanout = start.elapsed();

    println!("{:<48} {:>10} {:>11}", "", "time", "rate");
    let line = |what: &str, n: u64, d: Duration| {
        println!("{what:<48} {:>8.2} s {}", d.as_secs_f64(), rate(n, d))
    };
    line("enqueue, one create per task", n, naive_enq);
    line(
        &format!("enqueue, multi-op batches of {}", args.batch),
        n,
        multi_enq,
    );
    line("consume in order, one delete per ack", n, naive_deq);
    line(
        &format!("consume in order, acks in batches of {}", args.batch),
        n,
        multi_deq,
    );
    line(
        &format!("fan-out: one task to {} hosts (enqueue_batch)", args.fanout),
        args.fanout as u64,
        fanout,
    );
    println!(
        "multi-op speed-up: enqueue x{:.1}, consume+ack x{:.1}",
        naive_enq.as_secs_f64() / multi_enq.as_secs_f64(),
        naive_deq.as_secs_f64() / multi_deq.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("zk_queue_bench: {e}");
        std::process::exit(1);
    }
}
