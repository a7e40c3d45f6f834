//! Harness for the end-to-end tests that run the real `octo` binary.
//!
//! Why: the engine is only done when the shipped binary does the job between real
//! processes over real QUIC. Each [`Octo`] is a child process whose stdout JSON lines
//! are collected by a thread; tests wait for events with a deadline, and the process is
//! killed when the handle drops, so a failing test never leaks a sharer. Stderr goes to
//! a log file that is printed if a wait fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// A running `octo` process.
#[derive(Debug)]
pub struct Octo {
    child: Option<Child>,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    log: PathBuf,
    name: String,
}

impl Octo {
    /// Start `bin` with `args`; stderr goes to `<logdir>/<name>.log`.
    pub fn spawn(
        bin: &Path,
        name: &str,
        logdir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Octo {
        let log = logdir.join(format!("{name}.log"));
        let errf = std::fs::File::create(&log).expect("create log");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(errf)
            .stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,quinn=warn,quinn_proto=warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Octo {
            child: Some(child),
            lines: rx,
            seen: Vec::new(),
            log,
            name: name.to_string(),
        }
    }

    /// Wait for a JSON line whose `event` is `event` (or an error event, which panics).
    pub fn wait_event(&mut self, event: &str, timeout: Duration) -> Value {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == event) {
            return v.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == event {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{}: no `{event}` event within {timeout:?}; stdout so far: {:?}\n--- stderr ---\n{}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Every stdout line seen so far plus whatever has arrived.
    pub fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Wait for exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                self.drain();
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: still running after {timeout:?}\n--- stderr ---\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Octo {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Write `size` pseudo-random bytes (xorshift from `seed`) to `path`.
pub fn write_random(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}
