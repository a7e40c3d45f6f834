//! Real ZooKeeper servers for tests and the queue benchmark: a standalone server or a
//! three-node ensemble on loopback, from Debian's `zookeeper` package.
//!
//! Each server is a `java` child process (QuorumPeerMain with a generated `zoo.cfg`
//! in a fresh temporary directory), started on free loopback ports, polled with the
//! `srvr` four-letter word until it serves, and killed (and its directory removed)
//! on drop. Nothing is skipped: when Java or the jars are missing, or the server does
//! not come up, the error says why and the test fails.
//!
//! This file is also compiled into `examples/zk_queue_bench.rs` (by `#[path]`), so
//! it uses only std.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where Debian's package puts the server jar (its manifest lists the rest of the
/// class path). `OCTOPUS_ZK_CLASSPATH` overrides it.
const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
/// A logging backend, if present, so the server log in the temp dir says something.
const SLF4J_SIMPLE: &str = "/usr/share/java/slf4j-simple.jar";
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("finding a free loopback port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free loopback port: {e}"))
}

fn temp_dir(tag: &str) -> Result<PathBuf, String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "octopus-zk-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("data"))
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

fn java() -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) if Path::new(&home).join("bin/java").exists() => {
            Path::new(&home).join("bin/java")
        }
        _ => PathBuf::from("java"),
    }
}

fn class_path() -> Result<String, String> {
    if let Ok(cp) = std::env::var("OCTOPUS_ZK_CLASSPATH") {
        return Ok(cp);
    }
    if !Path::new(ZK_JAR).exists() {
        return Err(format!(
            "ZooKeeper is not installed: {ZK_JAR} is missing (apt-get install -y zookeeper)"
        ));
    }
    let mut cp = ZK_JAR.to_string();
    if Path::new(SLF4J_SIMPLE).exists() {
        cp.push(':');
        cp.push_str(SLF4J_SIMPLE);
    }
    Ok(cp)
}

/// Sends a four-letter word and returns the answer.
pub fn four_letter(addr: SocketAddr, word: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(word.as_bytes())?;
    let mut out = String::new();
    s.take(64 * 1024).read_to_string(&mut out)?;
    Ok(out)
}

/// The `Mode:` line of `srvr`: standalone, leader or follower.
pub fn mode(addr: SocketAddr) -> Option<String> {
    let out = four_letter(addr, "srvr").ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix("Mode: "))
        .map(|m| m.trim().to_string())
}

/// One server process and its directory.
#[derive(Debug)]
struct Node {
    dir: PathBuf,
    cfg: PathBuf,
    client: SocketAddr,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| format!("creating the server log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cloning the log handle: {e}"))?;
        let child = Command::new(java())
            .arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg("-Dzookeeper.jmx.log4j.disable=true")
            .arg("-cp")
            .arg(class_path()?)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&self.cfg)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting {} (is Java installed?): {e}", java().display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `srvr` reports one of `modes`; fails if the process exits.
    fn wait_mode(&mut self, modes: &[&str], timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "ZooKeeper on {} exited ({status}) before serving; log:\n{}",
                        self.client,
                        self.log_tail()
                    ));
                }
            }
            if let Some(m) = mode(self.client) {
                if modes.contains(&m.as_str()) {
                    return Ok(m);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ZooKeeper on {} did not serve within {timeout:?}; log:\n{}",
                    self.client,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn common_cfg(data: &Path) -> String {
    // Short ticks so tests can use short sessions; the admin HTTP server would take
    // port 8080, so it is off.
    format!(
        "tickTime=500\n\
         initLimit=20\n\
         syncLimit=10\n\
         dataDir={}\n\
         minSessionTimeout=1000\n\
         maxSessionTimeout=60000\n\
         4lw.commands.whitelist=*\n\
         admin.enableServer=false\n\
         maxClientCnxns=0\n",
        data.display()
    )
}

/// A standalone server on a free loopback port.
#[derive(Debug)]
pub struct ZkServer {
    node: Node,
    root: PathBuf,
}

impl ZkServer {
    pub fn start() -> Result<Self, String> {
        let root = temp_dir("standalone")?;
        let port = free_port()?;
        let cfg = root.join("zoo.cfg");
        let text = format!(
            "{}clientPort={port}\nclientPortAddress=127.0.0.1\n",
            common_cfg(&root.join("data"))
        );
        std::fs::write(&cfg, text).map_err(|e| format!("writing {}: {e}", cfg.display()))?;
        let node = Node {
            dir: root.clone(),
            cfg,
            client: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            child: None,
        };
        // Built first, so a failed start still kills and cleans up on drop.
        let mut server = ZkServer { node, root };
        server.node.spawn()?;
        server.node.wait_mode(&["standalone"], START_TIMEOUT)?;
        Ok(server)
    }

    /// `127.0.0.1:PORT`.
    pub fn connect_string(&self) -> String {
        self.node.client.to_string()
    }

    pub fn url(&self, chroot: &str) -> String {
        format!("zk://{}{chroot}", self.connect_string())
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        self.node.kill();
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.node.kill();
        self.node.spawn()?;
        self.node.wait_mode(&["standalone"], START_TIMEOUT)?;
        Ok(())
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.node.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A three-node ensemble on loopback (distinct client, peer and election ports).
#[derive(Debug)]
pub struct ZkEnsemble {
    nodes: Vec<Node>,
    root: PathBuf,
}

impl ZkEnsemble {
    pub fn start() -> Result<Self, String> {
        const N: usize = 3;
        let root = temp_dir("ensemble")?;
        let mut ports = Vec::new();
        for _ in 0..N * 3 {
            ports.push(free_port()?);
        }
        let servers: String = (0..N)
            .map(|i| {
                format!(
                    "server.{}=127.0.0.1:{}:{}\n",
                    i + 1,
                    ports[N + i],
                    ports[2 * N + i]
                )
            })
            .collect();
        // Built first, so a failed start still kills and cleans up on drop.
        let mut ensemble = ZkEnsemble {
            nodes: Vec::new(),
            root: root.clone(),
        };
        for (i, &client_port) in ports.iter().enumerate().take(N) {
            let dir = root.join(format!("node{}", i + 1));
            let data = dir.join("data");
            std::fs::create_dir_all(&data)
                .map_err(|e| format!("creating {}: {e}", data.display()))?;
            std::fs::write(data.join("myid"), format!("{}\n", i + 1))
                .map_err(|e| format!("writing myid: {e}"))?;
            let cfg = dir.join("zoo.cfg");
            let text = format!(
                "{}clientPort={client_port}\nclientPortAddress=127.0.0.1\n{servers}",
                common_cfg(&data)
            );
            std::fs::write(&cfg, text).map_err(|e| format!("writing {}: {e}", cfg.display()))?;
            ensemble.nodes.push(Node {
                dir,
                cfg,
                client: SocketAddr::from((Ipv4Addr::LOCALHOST, client_port)),
                child: None,
            });
        }
        for node in &mut ensemble.nodes {
            node.spawn()?;
        }
        for node in &mut ensemble.nodes {
            node.wait_mode(&["leader", "follower"], START_TIMEOUT)?;
        }
        Ok(ensemble)
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn connect_string(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.client.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, chroot: &str) -> String {
        format!("zk://{}{chroot}", self.connect_string())
    }

    /// The index of the node that says it leads, if any.
    pub fn leader(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.child.is_some() && mode(n.client).as_deref() == Some("leader"))
    }

    /// Kills node `i`.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Waits until the running nodes have a leader again.
    pub fn wait_quorum(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter_mut().filter(|n| n.child.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            node.wait_mode(&["leader", "follower"], left)?;
        }
        Ok(())
    }
}

impl Drop for ZkEnsemble {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
