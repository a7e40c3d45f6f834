//! The control-plane commands: `center`, `agent`, and the API clients (`agents`,
//! `exec`, `task`, `token`, `audit`).
//!
//! The clients are plain blocking HTTP (ureq): they make a handful of calls, and a
//! long poll follows a task's output, so they need no async runtime. The center is
//! found through `--center`/`--token`, else `OCTO_CENTER`/`OCTO_TOKEN`, else the
//! config file (`$XDG_CONFIG_HOME/octo/config` or `~/.config/octo/config`, lines of
//! `center = URL` and `token = TOKEN`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Tasks asked for per page by `task list` (the center's most per page).
const TASK_PAGE: usize = 200;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// API address of the center, e.g. https://127.0.0.1:7070 (else OCTO_CENTER, else the config file).
    #[arg(long, global = true)]
    pub center: Option<String>,
    /// API token (else OCTO_TOKEN, else the config file).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// The center's CA certificate to pin (its DATA_DIR/ca.pem; else OCTO_CA, else
    /// `ca = FILE` in the config file, else the fingerprint the token carries).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Allow a plain http:// center that is not on loopback (the token crosses the
    /// network in cleartext).
    #[arg(long, global = true)]
    pub insecure_http: bool,
}

#[derive(Subcommand, Debug)]
pub enum TaskCmd {
    /// The newest tasks.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One task with every host's state and output.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Follow a task until every host is done; exits non-zero if any failed.
    Wait {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task: queued hosts never get it, running ones are killed.
    Cancel {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; prints it once.
    Create {
        /// admin, operator, read or enroll.
        #[arg(long)]
        scope: String,
        /// Only from these addresses (CIDR, repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// Expire after this long (e.g. 1h, 30m).
        #[arg(long, value_parser = crate::parse_duration)]
        ttl: Option<Duration>,
        /// Usable for one call (one enrollment, or one API call).
        #[arg(long)]
        one_time: bool,
        #[arg(long, default_value = "")]
        note: String,
        /// Tasks may only reach hosts this target selects (names, globs, tags).
        #[arg(long)]
        limit_target: Option<String>,
        /// Commands may only run as these Unix users (repeatable or comma list;
        /// `root` here allows root to an operator token).
        #[arg(long, value_delimiter = ',')]
        limit_user: Vec<String>,
        /// Only these task kinds: exec, cp, seed (repeatable or comma list).
        #[arg(long, value_delimiter = ',')]
        limit_kind: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Hosts: all, names, globs (web-*), tag selectors (role=web,idc=bj), comma lists.
    pub target: String,
    /// Run as this Unix user (their uid, gid, groups, HOME, clean environment).
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the command's whole process group after this long (e.g. 30s).
    #[arg(long, value_parser = crate::parse_duration)]
    pub timeout: Option<Duration>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long)]
    pub env: Vec<String>,
    /// Run this script file instead of a command line.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// shell, python or jar.
    #[arg(long = "type", default_value = "shell")]
    pub kind: String,
    /// Roll out in waves of N hosts or N% of them.
    #[arg(long)]
    pub batch: Option<String>,
    /// Stop the rollout once more than this many hosts failed.
    #[arg(long)]
    pub max_failures: Option<u32>,
    /// Offline hosts still get the task if they return within this long.
    #[arg(long, default_value = "1h", value_parser = crate::parse_duration)]
    pub ttl: Duration,
    /// Print the task id and return at once.
    #[arg(long = "async")]
    pub run_async: bool,
    #[arg(long)]
    pub json: bool,
    /// The command (after --); with --type python or jar, the script or jar and its arguments.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// An API client bound to one center and token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: ureq::Agent,
    /// The pinned CA (None for plain HTTP).
    pin: Option<crate::pin::Pinned>,
    /// How long a GET keeps retrying while the center cannot be reached (a restart),
    /// counted from the first failure; zero: no retry.
    retry_for: Duration,
}

fn config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("octo").join("config"))
}

fn from_config(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(config_file()?).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// Cap on one reply of the center read into memory. A task shown with its output
/// holds up to 1 MiB per host and stream; beyond that, ask without it.
const MAX_REPLY: u64 = 256 << 20;

impl Client {
    pub fn new(c: &Conn) -> Result<Client> {
        let base = c
            .center
            .clone()
            .or_else(|| std::env::var("OCTO_CENTER").ok())
            .or_else(|| from_config("center"))
            .context("finding the center: pass --center, set OCTO_CENTER or write center = URL in the config file")?;
        let token = c
            .token
            .clone()
            .or_else(|| std::env::var("OCTO_TOKEN").ok())
            .or_else(|| from_config("token"))
            .context("finding a token: pass --token, set OCTO_TOKEN or write token = TOKEN in the config file")?;
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base
        } else {
            format!("https://{base}")
        };
        let base = base.trim_end_matches('/').to_string();
        let (token, token_fp) = crate::pin::split_token(&token);
        let pin = if base.starts_with("https://") {
            let ca_file =
                c.ca.clone()
                    .or_else(|| std::env::var_os("OCTO_CA").map(PathBuf::from))
                    .or_else(|| from_config("ca").map(PathBuf::from));
            Some(crate::pin::resolve(
                &base,
                ca_file,
                token_fp,
                default_dir("center").join("ca.pem"),
            )?)
        } else {
            let (host, _) = crate::pin::authority(&base);
            if !crate::pin::is_loopback(&host) && !c.insecure_http {
                bail!(
                    "refusing to send the token over plain HTTP to {host}: use https:// \
                     (the center serves HTTPS by default) or pass --insecure-http"
                );
            }
            None
        };
        let c = Client {
            base,
            token,
            http: ureq::Agent::new_with_defaults(),
            pin,
            retry_for: Duration::ZERO,
        };
        let http = c
            .agent_config()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client { http, ..c })
    }

    /// ureq settings for this center: status codes as answers, the pinned CA.
    fn agent_config(&self) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
        let b = ureq::Agent::config_builder().http_status_as_error(false);
        match &self.pin {
            Some(p) => b.tls_config(crate::pin::tls_config(&p.ca_der)),
            None => b,
        }
    }

    /// GETs retry for up to `d` while the center is unreachable: a command following
    /// a task (and seeding it) must outlive a center restart, within the task's TTL.
    pub fn retrying(mut self, d: Duration) -> Client {
        self.retry_for = d;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn finish(
        &self,
        what: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut resp = match res {
            Ok(r) => r,
            Err(e) if crate::pin::is_cert_failure(&e) => {
                let by = self.pin.as_ref().map_or("", |p| p.by.as_str());
                return Err(anyhow::Error::new(crate::pin::PinError(format!(
                    "the center at {} is not verified by {by}: {e}",
                    self.base
                ))));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("calling the center at {}", self.base))
            }
        };
        let status = resp.status();
        let body: Value = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_json()
            .with_context(|| format!("reading the center's answer to {what}"))?;
        if !status.is_success() {
            let msg = body["error"].as_str().unwrap_or("no message").to_string();
            bail!("{what}: the center answered {}: {msg}", status.as_u16());
        }
        Ok(body)
    }

    pub fn get(&self, what: &str, path: &str) -> Result<Value> {
        let mut deadline = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let r = self
                .http
                .get(self.url(path))
                .header("Authorization", format!("Bearer {}", self.token))
                .call();
            // Only a center that could not be reached is retried; an answer is final.
            let unreachable = matches!(
                &r,
                Err(ureq::Error::Io(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
                    | ureq::Error::Timeout(_))
            );
            if !unreachable || self.retry_for.is_zero() {
                return self.finish(what, r);
            }
            let until = *deadline.get_or_insert_with(|| Instant::now() + self.retry_for);
            if Instant::now() >= until {
                return self.finish(what, r);
            }
            if backoff == Duration::from_millis(200) {
                eprintln!("octo: the center at {} is unreachable; retrying", self.base);
            }
            // Jittered exponential backoff, capped at 5 s.
            let jitter = Duration::from_millis(rand::random::<u64>() % 200);
            std::thread::sleep((backoff + jitter).min(until - Instant::now()));
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Streams `reader` as the body of a PUT (no overall timeout: uploads are big).
    pub fn put_stream(&self, what: &str, path: &str, reader: impl Read + 'static) -> Result<Value> {
        let http: ureq::Agent = self
            .agent_config()
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        let r = http
            .put(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .send(ureq::SendBody::from_owned_reader(reader));
        self.finish(what, r)
    }

    pub fn post(&self, what: &str, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .http
            .post(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(what, r)
    }

    pub fn delete(&self, what: &str, path: &str) -> Result<Value> {
        let r = self
            .http
            .delete(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(what, r)
    }
}

#[derive(Subcommand, Debug)]
pub enum AgentsCmd {
    /// Allow the next enrollment of NAME, which is enrolled already, once (its old
    /// certificate is revoked then). Without NAME, list the refused enrollments.
    Approve {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: revoke its certificate and drop its session.
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn agents_cmd(conn: &Conn, cmd: AgentsCmd) -> Result<()> {
    let c = Client::new(conn)?;
    match cmd {
        AgentsCmd::Approve { name: None, json } => {
            let v = c.get("listing refused enrollments", "/agents/pending")?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
                return Ok(());
            }
            let list = v.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no refused enrollments");
            }
            for p in &list {
                println!(
                    "{:<20} from {:<22} {} ago",
                    p["name"].as_str().unwrap_or(""),
                    p["addr"].as_str().unwrap_or(""),
                    ago(unix_ms().saturating_sub(p["at"].as_u64().unwrap_or(0)))
                );
            }
            if !list.is_empty() {
                println!("approve one with: octo agents approve NAME");
            }
        }
        AgentsCmd::Approve {
            name: Some(name),
            json,
        } => {
            let v = c.post(
                &format!("approving the re-enrollment of {name}"),
                &format!("/agents/{}/approve", urlencode(&name)),
                &json!({}),
            )?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{name} may enroll again, once");
            }
        }
        AgentsCmd::Rm { name, json } => {
            let v = c.delete(
                &format!("removing host {name}"),
                &format!("/agents/{}", urlencode(&name)),
            )?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{name} removed; its certificate is revoked");
            }
        }
    }
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn agents(conn: &Conn, target: Option<String>, json_out: bool) -> Result<()> {
    let c = Client::new(conn)?;
    let path = match &target {
        Some(t) => format!("/agents?target={}", urlencode(t)),
        None => "/agents".to_string(),
    };
    let v = c.get("listing agents", &path)?;
    if json_out {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<18} {:<24} {:>6} {:>11} {:>6}",
        "NAME", "STATUS", "ADDRESS", "TAGS", "CPU%", "MEM", "LOAD1"
    );
    for a in v.as_array().into_iter().flatten() {
        let tags: Vec<String> = a["tags"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        let r = &a["resources"];
        let mem = match (r["mem_used"].as_u64(), r["mem_total"].as_u64()) {
            (Some(u), Some(t)) if t > 0 => format!("{}/{}M", u >> 20, t >> 20),
            _ => "-".into(),
        };
        let status = match (a["status"].as_str(), a["offline_since"].as_u64()) {
            (Some("offline"), Some(since)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                format!("off {}", ago(now.saturating_sub(since)))
            }
            (s, _) => s.unwrap_or("").to_string(),
        };
        println!(
            "{:<20} {:<8} {:<18} {:<24} {:>6} {:>11} {:>6}",
            a["name"].as_str().unwrap_or(""),
            status,
            a["addrs"][0].as_str().unwrap_or("-"),
            tags.join(","),
            r["cpu_pct"]
                .as_f64()
                .map_or("-".into(), |c| format!("{c:.1}")),
            mem,
            r["load1"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.2}")),
        );
    }
    Ok(())
}

/// A short age: 42s, 5m, 3h, 2d.
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Returns the process exit status: 0 iff every host succeeded.
pub fn exec(conn: &Conn, a: ExecArgs) -> Result<bool> {
    let c = Client::new(conn)?;
    let mut env = Vec::new();
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("reading --env {e:?}: expected KEY=VALUE"))?;
        env.push(json!([k, v]));
    }
    let (command, args, script) = match &a.script {
        Some(p) => {
            let body = std::fs::read_to_string(p)
                .with_context(|| format!("reading the script {}", p.display()))?;
            (String::new(), a.cmd.clone(), Some(body))
        }
        None => {
            let Some((first, rest)) = a.cmd.split_first() else {
                bail!("give a command after -- or a --script");
            };
            if a.kind == "shell" {
                // Like ssh and pssh: the words form one shell command line.
                (a.cmd.join(" "), Vec::new(), None)
            } else {
                (first.clone(), rest.to_vec(), None)
            }
        }
    };
    let body = json!({
        "target": a.target, "kind": a.kind, "command": command, "args": args,
        "script": script, "user": a.user, "cwd": a.cwd, "env": env,
        "timeout_ms": a.timeout.map(|t| t.as_millis() as u64),
        "ttl_ms": a.ttl.as_millis() as u64, "batch": a.batch, "max_failures": a.max_failures,
    });
    let created = c.post("creating the task", "/tasks", &body)?;
    let id = created["id"]
        .as_u64()
        .context("the center gave no task id")?;
    if a.run_async {
        if a.json {
            println!(
                "{}",
                json!({"event": "created", "id": id, "hosts": created["hosts"]})
            );
        } else {
            println!(
                "task {id} queued for {} host(s)",
                created["hosts"].as_array().map_or(0, Vec::len)
            );
        }
        return Ok(true);
    }
    follow(&c.retrying(a.ttl), id, a.json)
}

/// Prints a task's events until it is finished (or only offline hosts remain), then
/// a summary. Returns true iff no host failed.
pub fn follow(c: &Client, id: u64, json_out: bool) -> Result<bool> {
    follow_with(c, id, json_out, None)
}

/// [`follow`], with a bar of hosts done out of `bar_hosts` (for `octo cp` on a
/// terminal; command output would fight with it).
pub fn follow_with(c: &Client, id: u64, json_out: bool, bar_hosts: Option<u64>) -> Result<bool> {
    let bar = bar_hosts.map(|n| {
        let b = indicatif::ProgressBar::new(n);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40.cyan/blue} {pos}/{len} hosts done  {elapsed} elapsed  ETA {eta}  {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    let res = follow_inner(c, id, json_out, bar.as_ref());
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    res
}

fn follow_inner(
    c: &Client,
    id: u64,
    json_out: bool,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<bool> {
    let mut after = 0u64;
    let mut lines = crate::lines::Splicer::default();
    let mut print = |stream: crate::lines::Stream, line: String| match stream {
        crate::lines::Stream::Stdout => println!("{line}"),
        crate::lines::Stream::Stderr => eprintln!("{line}"),
    };
    let mut offline: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        let v = c.get(
            "following the task",
            &format!("/tasks/{id}/events?after={after}&wait=10"),
        )?;
        let next = v["next"].as_u64().unwrap_or(after);
        if next < after {
            // The center restarted and its event log with it: start over, and say
            // that what happened meanwhile is lost.
            after = 0;
            if json_out {
                println!("{}", json!({"event": "gap", "dropped": null}));
            } else {
                eprintln!("octo: the center restarted; output it received before is lost");
                lines.gap(&mut print);
            }
            continue;
        }
        let mut expected = after;
        for e in v["events"].as_array().into_iter().flatten() {
            // The center keeps only a task's most recent events: a jump in the
            // sequence means output was dropped before we read it.
            let seq = e["seq"].as_u64().unwrap_or(expected);
            if seq > expected {
                let dropped = seq - expected;
                if json_out {
                    println!("{}", json!({"event": "gap", "dropped": dropped}));
                } else {
                    eprintln!(
                        "octo: the center dropped {dropped} events of this task's output (it keeps only the most recent); text next to the gap is marked {}",
                        crate::lines::CUT
                    );
                    lines.gap(&mut print);
                }
            }
            expected = expected.max(seq + 1);
            let host = e["host"].as_str().unwrap_or("").to_string();
            let kind = e["kind"].as_str().unwrap_or("").to_string();
            let data = e["data"].as_str().unwrap_or("");
            if json_out {
                println!("{}", json!({"event": kind, "host": host, "data": data}));
                if kind == "state" {
                    offline.insert(host.clone(), data == "queued-offline");
                }
                continue;
            }
            if kind == "state" {
                offline.insert(host.clone(), data == "queued-offline");
                if let Some(b) = bar {
                    if matches!(
                        data,
                        "ok" | "failed" | "timed-out" | "expired" | "cancelled" | "lost"
                    ) {
                        b.inc(1);
                        if data != "ok" {
                            b.set_message(format!("{host} {data}"));
                        }
                    }
                }
                continue;
            }
            // Print whole lines prefixed by the host, like `pssh -i`.
            let stream = if kind == "stderr" {
                crate::lines::Stream::Stderr
            } else {
                crate::lines::Stream::Stdout
            };
            lines.push(&host, stream, data, &mut print);
        }
        after = v["next"].as_u64().unwrap_or(after);
        let pending = v["pending"].as_u64().unwrap_or(0) as usize;
        let offline_pending = offline.values().filter(|o| **o).count();
        // Done when every host is final, or only hosts that were offline remain (they
        // get the task when they return; `octo task wait` follows them).
        if v["finished"].as_bool() == Some(true) || (pending > 0 && pending <= offline_pending) {
            break;
        }
    }
    // The human summary needs no output (it was printed live), and with it a task on
    // a few hosts already outgrows the reply cap; `--json` keeps it for scripts.
    let t = if json_out {
        c.get("reading the task", &format!("/tasks/{id}"))?
    } else {
        c.get("reading the task", &format!("/tasks/{id}?output=false"))?
    };
    // A stream cut at the cap ends in the middle of a line: say so on that line.
    let cut = |host: &str, stream: crate::lines::Stream| {
        let flag = match stream {
            crate::lines::Stream::Stdout => "stdout_truncated",
            crate::lines::Stream::Stderr => "stderr_truncated",
        };
        t["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["host"] == host && h[flag].as_bool() == Some(true))
    };
    lines.finish(&mut print, cut);
    summary(&t, id, json_out)
}

fn summary(t: &Value, id: u64, json_out: bool) -> Result<bool> {
    let mut ok = 0;
    let mut failed = Vec::new();
    let mut timed_out = Vec::new();
    let mut offline = Vec::new();
    let mut other = Vec::new();
    let mut truncated = Vec::new();
    for h in t["hosts"].as_array().into_iter().flatten() {
        let name = h["host"].as_str().unwrap_or("").to_string();
        let cut: Vec<&str> = [
            ("stdout", "stdout_truncated"),
            ("stderr", "stderr_truncated"),
        ]
        .into_iter()
        .filter(|(_, flag)| h[*flag].as_bool() == Some(true))
        .map(|(stream, _)| stream)
        .collect();
        if !cut.is_empty() {
            truncated.push((name.clone(), cut.join(" and ")));
        }
        match h["state"].as_str().unwrap_or("") {
            "ok" => ok += 1,
            "failed" | "lost" => {
                let why = h["error"].as_str().map(str::to_string).unwrap_or_else(|| {
                    match (h["exit_code"].as_i64(), h["signal"].as_i64()) {
                        (Some(c), _) => format!("exit code {c}"),
                        (_, Some(s)) => format!("killed by signal {s}"),
                        _ => "failed".into(),
                    }
                });
                failed.push((name, why));
            }
            "timed-out" => timed_out.push(name),
            "queued" | "pending" | "expired" => offline.push(name),
            s => other.push((name, s.to_string())),
        }
    }
    let all_ok = failed.is_empty()
        && timed_out.is_empty()
        && offline.is_empty()
        && other.iter().all(|(_, s)| s == "cancelled");
    if json_out {
        println!(
            "{}",
            json!({"event": "summary", "id": id, "ok": ok, "failed": failed.len(),
                   "timed_out": timed_out.len(), "offline": offline.len(),
                   "truncated": truncated.iter().map(|(h, _)| h).collect::<Vec<_>>(), "task": t})
        );
    } else {
        // Before the counts, so "3 ok" never reads as "all the output is here".
        for (h, streams) in &truncated {
            eprintln!(
                "{h}: output truncated at {} MiB ({streams}); the rest was not kept",
                octopus_agent::exec::MAX_CAPTURE >> 20
            );
        }
        eprintln!(
            "task {id}: {ok} ok, {} failed, {} timed out, {} offline",
            failed.len(),
            timed_out.len(),
            offline.len()
        );
        for (h, why) in &failed {
            eprintln!("  failed     {h}: {why}");
        }
        for h in &timed_out {
            eprintln!("  timed out  {h}");
        }
        for h in &offline {
            eprintln!("  offline    {h} (gets the task if it returns within the TTL)");
        }
        for (h, s) in &other {
            eprintln!("  {s:<10} {h}");
        }
    }
    Ok(all_ok && !other.iter().any(|(_, s)| s != "cancelled"))
}

pub fn task(conn: &Conn, cmd: TaskCmd) -> Result<bool> {
    let c = Client::new(conn)?;
    match cmd {
        TaskCmd::List { limit, json } => {
            // Pages of at most TASK_PAGE tasks, each after the last id of the one before.
            let mut tasks: Vec<Value> = Vec::new();
            while tasks.len() < limit {
                let n = (limit - tasks.len()).min(TASK_PAGE);
                let after = tasks
                    .last()
                    .and_then(|t| t["id"].as_u64())
                    .map(|id| format!("&after={id}"))
                    .unwrap_or_default();
                let page = c.get("listing tasks", &format!("/tasks?limit={n}{after}"))?;
                let page = page.as_array().cloned().unwrap_or_default();
                let short = page.len() < n;
                tasks.extend(page);
                if short {
                    break;
                }
            }
            let v = Value::Array(tasks);
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{:>6} {:<10} {:<16} {:<30} COUNTS",
                    "ID", "STATE", "TARGET", "SUMMARY"
                );
                for t in v.as_array().into_iter().flatten() {
                    let counts: Vec<String> = t["counts"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect();
                    println!(
                        "{:>6} {:<10} {:<16} {:<30} {}",
                        t["id"],
                        t["state"].as_str().unwrap_or(""),
                        t["target"].as_str().unwrap_or(""),
                        t["summary"].as_str().unwrap_or(""),
                        counts.join(" ")
                    );
                }
            }
            Ok(true)
        }
        TaskCmd::Show { id, json } => {
            let v = c.get("reading the task", &format!("/tasks/{id}"))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "task {id}: {} on {} ({})",
                    v["summary"].as_str().unwrap_or(""),
                    v["target"].as_str().unwrap_or(""),
                    v["state"].as_str().unwrap_or("")
                );
                for h in v["hosts"].as_array().into_iter().flatten() {
                    println!(
                        "--- {} [{}] exit={} signal={}",
                        h["host"].as_str().unwrap_or(""),
                        h["state"].as_str().unwrap_or(""),
                        h["exit_code"],
                        h["signal"]
                    );
                    print!("{}", h["stdout"].as_str().unwrap_or(""));
                    eprint!("{}", h["stderr"].as_str().unwrap_or(""));
                    if let Some(e) = h["error"].as_str() {
                        println!("error: {e}");
                    }
                }
            }
            Ok(true)
        }
        TaskCmd::Wait { id, json } => {
            let t = c.get("reading the task", &format!("/tasks/{id}"))?;
            let hosts = t["hosts"].as_array().map_or(0, Vec::len) as u64;
            // The byte-level bar is for copies; commands print their output instead.
            let is_copy = t["hosts"][0].get("total").is_some();
            let bar = (is_copy && !json && std::io::stderr().is_terminal()).then_some(hosts);
            follow_copy(&c, id, json, bar)
        }
        TaskCmd::Cancel { id, json } => {
            let v = c.post(
                "cancelling the task",
                &format!("/tasks/{id}/cancel"),
                &json!({}),
            )?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("task {id} cancelled");
            }
            Ok(true)
        }
    }
}

/// A token's limits in one column: `target=role=web user=deploy kind=exec,cp`.
fn limits_text(l: &Value) -> String {
    let list = |k: &str| {
        l[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if let Some(t) = l["target"].as_str() {
        parts.push(format!("target={t}"));
    }
    for (k, name) in [("users", "user"), ("kinds", "kind")] {
        let v = list(k);
        if !v.is_empty() {
            parts.push(format!("{name}={v}"));
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

pub fn token(conn: &Conn, cmd: TokenCmd) -> Result<()> {
    let c = Client::new(conn)?;
    match cmd {
        TokenCmd::Create {
            scope,
            allow,
            ttl,
            one_time,
            note,
            limit_target,
            limit_user,
            limit_kind,
            json,
        } => {
            let v = c.post(
                "creating the token",
                "/tokens",
                &json!({"scope": scope, "allow": allow, "ttl_ms": ttl.map(|t| t.as_millis() as u64),
                        "one_time": one_time, "note": note,
                        "limits": {"target": limit_target, "users": limit_user, "kinds": limit_kind}}),
            )?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", v["token"].as_str().unwrap_or(""));
            }
        }
        TokenCmd::List { json } => {
            let v = c.get("listing tokens", "/tokens")?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{:<18} {:<9} {:<8} {:>5} {:<20} {:<30} NOTE",
                    "ID", "SCOPE", "STATE", "USES", "ALLOW", "LIMITS"
                );
                for t in v.as_array().into_iter().flatten() {
                    let state = if t["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else {
                        "active"
                    };
                    let allow: Vec<&str> = t["allow"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    println!(
                        "{:<18} {:<9} {:<8} {:>5} {:<20} {:<30} {}",
                        t["id"].as_str().unwrap_or(""),
                        t["scope"].as_str().unwrap_or(""),
                        state,
                        t["uses"],
                        if allow.is_empty() {
                            "any".to_string()
                        } else {
                            allow.join(",")
                        },
                        limits_text(&t["limits"]),
                        t["note"].as_str().unwrap_or("")
                    );
                }
            }
        }
        TokenCmd::Revoke { id, json } => {
            let v = c.post(
                "revoking the token",
                &format!("/tokens/{id}/revoke"),
                &json!({}),
            )?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("token {id} revoked");
            }
        }
    }
    Ok(())
}

pub fn audit(conn: &Conn, limit: usize, json_out: bool) -> Result<()> {
    let c = Client::new(conn)?;
    let v = c.get("reading the audit log", &format!("/audit?limit={limit}"))?;
    if json_out {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    for e in v.as_array().into_iter().flatten() {
        println!(
            "{} {:<18} {:<22} {:<6} {:<32} {}",
            e["at"],
            e["token"].as_str().unwrap_or(""),
            e["addr"].as_str().unwrap_or(""),
            e["method"].as_str().unwrap_or(""),
            e["path"].as_str().unwrap_or(""),
            e["status"]
        );
    }
    Ok(())
}

fn default_dir(which: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("octopus").join(which)
}

/// What the center may keep: content, audit entries, and the disk it leaves free.
#[derive(Debug, Clone, Copy)]
pub struct CenterLimits {
    pub content_quota: u64,
    pub audit_keep: u64,
    pub disk_reserve: u64,
}

pub async fn center(
    listen: SocketAddr,
    data_dir: Option<PathBuf>,
    heartbeat: Duration,
    limits: CenterLimits,
    registry: Option<String>,
    tls: CenterTls,
    json_out: bool,
) -> Result<()> {
    // Defence in depth: whatever the center writes is private unless it says otherwise.
    octopus_transfer::safefs::set_umask(0o077);
    let data_dir = data_dir.unwrap_or_else(|| default_dir("center"));
    let registry = registry.or_else(|| from_config("registry"));
    let h = octopus_center::center::spawn(octopus_center::center::CenterConfig {
        listen,
        data_dir: data_dir.clone(),
        heartbeat,
        content_quota: limits.content_quota,
        registry,
        insecure_http: tls.insecure_http,
        api_sans: tls.api_san,
        http_limits: octopus_agent::serve::Limits {
            max_connections: tls.max_connections,
            header_timeout: tls.header_timeout,
            ..Default::default()
        },
        audit_keep: limits.audit_keep,
        disk_reserve: limits.disk_reserve,
    })
    .await
    .context("starting the center")?;
    let api = h.api_url.clone();
    if tls.insecure_http {
        eprintln!(
            "WARNING: the API at {api} is PLAIN HTTP (--insecure-http): tokens cross the network in cleartext"
        );
    }
    if json_out {
        println!(
            "{}",
            json!({"event": "ready", "api": api, "agents": h.quic_addr().to_string(),
                   "ca_fingerprint": h.ca_fingerprint, "admin_token": h.new_admin_token,
                   "ca": data_dir.join("ca.pem"),
                   "data_dir": data_dir})
        );
    } else {
        eprintln!(
            "center listening: API {api} (TCP), agents {} (UDP)",
            h.quic_addr()
        );
        eprintln!(
            "data in {}; CA fingerprint {}",
            data_dir.display(),
            h.ca_fingerprint
        );
        if let Some(t) = &h.new_admin_token {
            eprintln!(
                "admin token (shown once, also in {}):",
                data_dir.join("admin.token").display()
            );
            println!("{t}");
        }
        eprintln!("to enroll an agent:");
        eprintln!(
            "  export OCTO_CENTER={api} OCTO_CA={} OCTO_TOKEN=$(cat {})",
            data_dir.join("ca.pem").display(),
            data_dir.join("admin.token").display()
        );
        eprintln!(
            "  octo agent --center {} --token $(octo token create --scope enroll --ttl 1h)",
            h.local_addr()
        );
    }
    let stop = h.cancelled();
    tokio::select! {
        _ = crate::interrupted() => {}
        _ = stop.cancelled() => {}
    }
    h.shutdown().await;
    if json_out {
        println!("{}", json!({"event": "stopped"}));
    }
    Ok(())
}

/// How the center serves its API.
#[derive(Args, Debug, Clone)]
pub struct CenterTls {
    /// Serve the API over plain HTTP instead of HTTPS (tokens in cleartext).
    #[arg(long)]
    pub insecure_http: bool,
    /// An extra name (DNS or IP) for the API's certificate; repeatable.
    #[arg(long)]
    pub api_san: Vec<String>,
    /// Connections the API serves at once (more wait to be accepted).
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Time a connection has for its TLS handshake and each request's headers.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub header_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct AgentOpts {
    /// The center's address, e.g. 127.0.0.1:7070.
    #[arg(long)]
    pub center: String,
    /// Enrollment token (first start only), from `octo token create --scope enroll`.
    /// Any local user can read a process's arguments: prefer --token-file or
    /// OCTO_ENROLL_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// Read the enrollment token from this file.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Where the key, certificate and task journal live (default ~/.local/share/octopus/agent).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Host name to enroll as (default: this host's name).
    #[arg(long)]
    pub name: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Disk quota of the content cache, e.g. 10GiB; 0 disables the cache and the pool.
    #[arg(long, default_value = "10GiB", value_parser = crate::parse_rate_arg)]
    pub cache_quota: u64,
    /// Address of this agent's HTTP pool (it serves the cache to signed URLs);
    /// default: the address this host reaches the center from, any port.
    #[arg(long)]
    pub pool_listen: Option<std::net::SocketAddr>,
    /// Upload limit of this agent, all transfers together (see RATE in `octo --help`).
    #[arg(long, value_parser = crate::parse_rate_arg)]
    pub limit_up: Option<u64>,
    /// Download limit of this agent, all transfers together.
    #[arg(long, value_parser = crate::parse_rate_arg)]
    pub limit_down: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

pub async fn agent(o: AgentOpts) -> Result<()> {
    let addr_text = o
        .center
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let center = tokio::net::lookup_host(addr_text)
        .await
        .with_context(|| format!("resolving the center address {addr_text:?}"))?
        .next()
        .with_context(|| format!("resolving the center address {addr_text:?}: no address"))?;
    let mut tags = Vec::new();
    for t in &o.tags {
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("reading --tag {t:?}: expected KEY=VALUE"))?;
        tags.push((k.to_string(), v.to_string()));
    }
    let name = o.name.unwrap_or_else(octopus_agent::hostinfo::hostname);
    // Defence in depth: whatever the agent writes is private unless it says otherwise
    // (deliveries get their modes explicitly; commands get umask 022 back).
    octopus_transfer::safefs::set_umask(0o077);
    let data_dir = o.data_dir.unwrap_or_else(|| default_dir("agent"));
    let enroll_token = match (o.token, &o.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the enroll token from {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => std::env::var("OCTO_ENROLL_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    let started = Instant::now();
    let h = octopus_agent::daemon::spawn(octopus_agent::daemon::AgentConfig {
        center,
        enroll_token,
        data_dir: data_dir.clone(),
        name: name.clone(),
        tags,
        simulate: false,
        cache_quota: o.cache_quota,
        pool_listen: Some(match o.pool_listen {
            Some(a) => a,
            None => octopus_agent::pool::default_listen(center)
                .with_context(|| format!("finding the local address towards {center}"))?,
        }),
        limit_up: o.limit_up,
        limit_down: o.limit_down,
    })
    .await
    .context("starting the agent")?;
    if o.json {
        println!(
            "{}",
            json!({"event": "ready", "name": name, "center": center.to_string(), "data_dir": data_dir,
                   "startup_ms": started.elapsed().as_millis() as u64})
        );
    } else {
        eprintln!(
            "agent {name} running; center {center}; data in {}",
            data_dir.display()
        );
    }
    crate::interrupted().await;
    h.shutdown().await;
    Ok(())
}

#[derive(Args, Debug)]
pub struct CpArgs {
    /// Copy directories (and everything under them).
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Create missing parent directories of DEST.
    #[arg(long)]
    pub mkdir: bool,
    /// Octal mode for every copied file (e.g. 0644) instead of the source's.
    #[arg(long)]
    pub mode: Option<String>,
    /// Let --mode (or the sources' modes) carry setuid, setgid or sticky bits; needs
    /// an admin token. Without it those bits are refused in --mode and dropped from
    /// the sources' modes.
    #[arg(long)]
    pub allow_special_mode: bool,
    /// Upload limit of this seeder (see RATE in `octo --help`).
    #[arg(long, value_parser = crate::parse_rate_arg)]
    pub limit_up: Option<u64>,
    /// Download limit of every agent for this copy.
    #[arg(long, value_parser = crate::parse_rate_arg)]
    pub limit_down: Option<u64>,
    /// Roll out in waves of N hosts or N% of them.
    #[arg(long)]
    pub batch: Option<String>,
    /// Offline hosts still get the copy if they return within this long.
    #[arg(long, default_value = "1h", value_parser = crate::parse_duration)]
    pub ttl: Duration,
    /// Upload the sources to the center, which seeds them; print the task id and
    /// return (follow with `octo task wait ID`).
    #[arg(long = "async")]
    pub async_: bool,
    /// USER[:GROUP] to own the copied files on the hosts.
    #[arg(long)]
    pub owner: Option<String>,
    /// Send a single file through the HTTP pool whatever its size (hot content).
    #[arg(long)]
    pub hot: bool,
    /// Single files up to this size go through the HTTP pool instead of the swarm.
    #[arg(long, default_value = "1MiB", value_parser = crate::parse_rate_arg)]
    pub small: u64,
    #[arg(long)]
    pub json: bool,
    /// SRC... TARGET:DEST (DEST absolute on the hosts; a directory receives the sources
    /// under their names).
    #[arg(required = true, num_args = 2..)]
    pub args: Vec<String>,
}

/// `octo cp`. Three ways to move the content, all verified by MD5 on the hosts:
/// - a single small (or `--hot`) file is uploaded to the center and fetched whole over
///   HTTP from the pool (the center, then the agents that already hold it);
/// - with `--async`, the sources are uploaded and the center seeds them peer to peer,
///   so this command can return at once;
/// - otherwise this process seeds the sources over the transfer engine while the
///   agents fetch peer to peer (from it and from each other).
///
/// Returns true iff every host got the content (or, with `--async`, the task exists).
pub async fn cp(conn: Conn, a: CpArgs) -> Result<bool> {
    let (srcs, to) = a.args.split_at(a.args.len() - 1);
    let (target, dest) = to[0]
        .split_once(':')
        .with_context(|| format!("reading {:?}: the last argument must be TARGET:DEST", to[0]))?;
    let remote = remote_sources(srcs)?;
    let mut roots = Vec::new();
    for s in srcs.iter().filter(|_| remote.is_none()) {
        let p = PathBuf::from(s);
        let m = std::fs::metadata(&p).with_context(|| format!("reading the source {s}"))?;
        if m.is_dir() && !a.recursive {
            bail!("{s} is a directory: pass -r to copy directories");
        }
        roots.push(p);
    }
    let dest = dest.to_string();
    let mode = match &a.mode {
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .with_context(|| format!("reading --mode {m:?}: expected octal like 0644"))?,
        ),
        None => None,
    };
    let roots_len = roots.len() + remote.as_ref().map_or(0, |r| r.1.len());
    let dest = if roots_len > 1 && !dest.ends_with('/') {
        format!("{dest}/")
    } else {
        dest
    };
    let single = match roots.as_slice() {
        [one] => std::fs::metadata(one).ok().filter(|m| m.is_file()),
        _ => None,
    };
    let pool_mode = single.as_ref().is_some_and(|m| a.hot || m.len() <= a.small);
    let mut body = json!({
        "target": target, "kind": "fetch", "dest": dest, "mkdir": a.mkdir,
        "mode": mode, "limit_down": a.limit_down, "limit_up": a.limit_up,
        "ttl_ms": a.ttl.as_millis() as u64, "batch": a.batch, "owner": a.owner,
        "allow_special_mode": a.allow_special_mode,
    });
    let keep = if a.allow_special_mode { 0o7777 } else { 0o777 };
    let json_out = a.json;
    let mut seed = None;
    let local_roots = roots.clone();
    let total;
    if let Some((host, paths)) = remote {
        // The source host seeds (for the TTL, so an --async copy outlives us).
        let c = Client::new(&conn)?;
        let (ticket, size) = tokio::task::spawn_blocking(move || {
            seed_on_host(&c, &host, &paths, a.ttl, a.limit_up, json_out)
        })
        .await
        .context("joining the API client")??;
        body["ticket"] = json!(ticket);
        total = size;
    } else if pool_mode || a.async_ {
        let conn2 = conn.clone();
        let (files, t) =
            tokio::task::spawn_blocking(move || upload_sources(&conn2, &roots, json_out))
                .await
                .context("joining the uploader")??;
        total = t;
        if pool_mode {
            let (path, md5, mode) = &files[0];
            body["pool"] = json!({"md5": md5, "size": total, "name": path, "mode": mode & keep});
        } else {
            body["upload"] = json!(files
                .iter()
                .map(|(p, m, mode)| json!({"path": p, "md5": m, "mode": mode & keep}))
                .collect::<Vec<_>>());
        }
    } else {
        // The agents' swarm admits only certificates from the center's CA: this seed
        // gets a short-lived one for its own key (agents still pin it by the ticket).
        let (c, ttl) = (Client::new(&conn)?, a.ttl);
        let (identity, ca) = tokio::task::spawn_blocking(move || seed_identity(&c, ttl))
            .await
            .context("joining the API client")??;
        let cfg = octopus_transfer::node::NodeConfig {
            listen: "0.0.0.0:0".parse().expect("valid"),
            limit_up: a.limit_up,
            identity: Some(identity),
            trust: octopus_transfer::tls::Trust::Ca(ca.into()),
            ..Default::default()
        };
        let s = octopus_transfer::node::share(
            cfg,
            roots,
            octopus_transfer::manifest::BuildOptions::default(),
        )
        .await
        .context("hashing and serving the sources")?;
        body["ticket"] = json!(s.ticket().encode());
        total = s.manifest().total_size();
        seed = Some(s);
    }
    body["size"] = json!(total);
    let async_ = a.async_;
    let cli_seeds = seed.is_some();
    let ttl = a.ttl;
    let res = tokio::task::spawn_blocking(move || -> Result<bool> {
        let c = Client::new(&conn)?;
        let created = c.post("creating the copy task", "/tasks", &body)?;
        // From here on a center restart is waited out (we keep seeding meanwhile).
        let c = c.retrying(ttl);
        let id = created["id"]
            .as_u64()
            .context("the center gave no task id")?;
        let hosts = created["hosts"].as_array().map_or(0, Vec::len);
        let how = if pool_mode { "pool" } else { "swarm" };
        if json_out {
            println!(
                "{}",
                json!({"event": "created", "id": id, "hosts": created["hosts"], "bytes": total, "via": how})
            );
        } else if async_ {
            println!("{id}");
            eprintln!("task {id}: copying {total} bytes to {hosts} host(s) via the {how}; follow with `octo task wait {id}`");
        } else {
            eprintln!("task {id}: copying {total} bytes to {hosts} host(s) via the {how}");
        }
        if async_ {
            return Ok(true);
        }
        let bar = (!json_out && std::io::stderr().is_terminal()).then_some(hosts as u64);
        let ok = follow_copy(&c, id, json_out, bar)?;
        // Hosts still offline: this process stops seeding, so the center takes over.
        let p = c.get("reading the copy's progress", &format!("/tasks/{id}/progress"))?;
        let pending = p["hosts"].as_u64().unwrap_or(0) - p["done"].as_u64().unwrap_or(0);
        if pending > 0 && cli_seeds {
            let (files, _) = upload_sources(&conn, &local_roots, json_out)?;
            let upload: Vec<Value> = files
                .iter()
                .map(|(p, m, mode)| json!({"path": p, "md5": m, "mode": mode & keep}))
                .collect();
            c.post(
                "handing the copy to the center",
                &format!("/tasks/{id}/seed"),
                &json!({ "upload": upload }),
            )?;
            if json_out {
                println!("{}", json!({"event": "handed-over", "id": id, "pending": pending}));
            } else {
                eprintln!(
                    "task {id}: {pending} host(s) still offline get the copy from the center when they return (within the TTL); follow with `octo task wait {id}`"
                );
            }
        }
        Ok(ok)
    })
    .await
    .context("joining the API client")?;
    if let Some(s) = seed {
        s.shutdown().await;
    }
    res
}

/// `HOST:/path` sources (all on one host), or `None` when the sources are local. A
/// source is remote when it has a `:` and no local file has that name.
fn remote_sources(srcs: &[String]) -> Result<Option<(String, Vec<String>)>> {
    let mut host: Option<String> = None;
    let mut paths = Vec::new();
    for s in srcs {
        let remote = match s.split_once(':') {
            Some((h, p)) if !Path::new(s).exists() && !h.is_empty() && p.starts_with('/') => {
                Some((h, p))
            }
            _ => None,
        };
        match (remote, &host) {
            (Some((h, p)), None) if paths.is_empty() => {
                host = Some(h.to_string());
                paths.push(p.to_string());
            }
            (Some((h, p)), Some(prev)) if h == prev => paths.push(p.to_string()),
            (None, None) => {}
            _ => bail!("the sources must all be local, or all on one host (HOST:/path)"),
        }
    }
    Ok(host.map(|h| (h, paths)))
}

/// A fresh key with a certificate from the center's CA (valid for `ttl`, at most a
/// day), and the CA's certificate.
fn seed_identity(c: &Client, ttl: Duration) -> Result<(octopus_transfer::tls::Identity, Vec<u8>)> {
    let own = octopus_transfer::tls::Identity::generate().context("generating a key")?;
    let key = own.public_key_raw().context("reading our public key")?;
    let v = c.post(
        "getting a seed certificate",
        "/certs",
        &json!({"public_key": data_encoding::HEXLOWER.encode(&key),
                "valid_ms": ttl.as_millis() as u64}),
    )?;
    let hex = |k: &str| -> Result<Vec<u8>> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(v[k].as_str().unwrap_or("").as_bytes())
            .with_context(|| format!("reading the center's {k}"))
    };
    let (cert, ca) = (hex("cert")?, hex("ca")?);
    Ok((own.with_cert(cert, vec![ca.clone()]), ca))
}

/// Asks `host` to seed `paths` and waits for its ticket and the content's size.
fn seed_on_host(
    c: &Client,
    host: &str,
    paths: &[String],
    ttl: Duration,
    limit_up: Option<u64>,
    json_out: bool,
) -> Result<(String, u64)> {
    let created = c.post(
        &format!("asking {host} to seed"),
        "/tasks",
        &json!({"target": host, "kind": "seed", "paths": paths, "ttl_ms": ttl.as_millis() as u64,
                "limit_up": limit_up}),
    )?;
    let id = created["id"]
        .as_u64()
        .context("the center gave no task id")?;
    if !json_out {
        eprintln!("task {id}: {host} hashes and seeds {}", paths.join(" "));
    }
    let deadline = Instant::now() + ttl;
    loop {
        let t = c.get("reading the seed task", &format!("/tasks/{id}"))?;
        let h = &t["hosts"][0];
        match h["state"].as_str().unwrap_or("") {
            "ok" => {
                let out = h["stdout"].as_str().unwrap_or("");
                let mut lines = out.lines();
                let ticket = lines.next().context("the seed gave no ticket")?.to_string();
                let size = lines
                    .next()
                    .and_then(|l| l.trim().parse().ok())
                    .context("the seed gave no size")?;
                return Ok((ticket, size));
            }
            "failed" | "lost" | "expired" | "cancelled" | "timed-out" => {
                let why = h["error"].as_str().unwrap_or("no reason given");
                bail!("{host} could not seed {}: {why}", paths.join(" "));
            }
            _ if Instant::now() > deadline => bail!("{host} did not seed within {ttl:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One uploaded file: (path under the copy's root, MD5, mode).
type Uploaded = (String, String, u32);

/// Uploads every file under `roots` to the center; returns each file and the total
/// bytes.
fn upload_sources(conn: &Conn, roots: &[PathBuf], json_out: bool) -> Result<(Vec<Uploaded>, u64)> {
    let c = Client::new(conn)?;
    let mut files = Vec::new();
    for root in roots {
        let base = root
            .file_name()
            .with_context(|| format!("reading the source {}: it has no name", root.display()))?
            .to_string_lossy()
            .into_owned();
        walk(root, &base, &mut files)?;
    }
    let total: u64 = files.iter().map(|(_, _, len, _)| *len).sum();
    let bar = (!json_out && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:40.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut out = Vec::new();
    for (rel, path, _, mode) in files {
        let f =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let reader: Box<dyn Read> = match &bar {
            Some(b) => Box::new(b.wrap_read(f)),
            None => Box::new(f),
        };
        let v = c.put_stream(&format!("uploading {}", path.display()), "/files", reader)?;
        let md5 = v["md5"]
            .as_str()
            .context("the center gave no MD5 for the upload")?
            .to_string();
        out.push((rel, md5, mode & 0o7777));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((out, total))
}

/// Regular files under `p` as (path under the copy's root, path here, size, mode).
fn walk(p: &Path, rel: &str, out: &mut Vec<(String, PathBuf, u64, u32)>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if m.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .with_context(|| format!("reading {}", p.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            walk(&e.path(), &format!("{rel}/{name}"), out)?;
        }
    } else if m.is_file() {
        out.push((
            rel.to_string(),
            p.to_path_buf(),
            m.len(),
            m.permissions().mode(),
        ));
    } else {
        bail!("{} is neither a file nor a directory", p.display());
    }
    Ok(())
}

/// Follows a copy: a bar of hosts done with the aggregate rate, the slowest host and
/// an ETA (on a terminal), then the summary table.
pub fn follow_copy(c: &Client, id: u64, json_out: bool, bar_hosts: Option<u64>) -> Result<bool> {
    let Some(n) = bar_hosts else {
        return follow(c, id, json_out);
    };
    let bar = indicatif::ProgressBar::new(n);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} hosts  {msg}  {elapsed}",
        )
        .expect("valid template"),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (c, bar, stop) = (c.clone(), bar.clone(), stop.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(p) = c.get(
                    "reading the copy's progress",
                    &format!("/tasks/{id}/progress"),
                ) {
                    bar.set_position(p["done"].as_u64().unwrap_or(0));
                    bar.set_message(progress_line(&p, started.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let res = follow_inner(c, id, json_out, None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    bar.finish_and_clear();
    res
}

/// "12.3 MB/s  slowest web-3 40%  ETA 8s" from a `/tasks/{id}/progress` answer.
fn progress_line(p: &Value, elapsed: Duration) -> String {
    let bytes = p["bytes"].as_u64().unwrap_or(0);
    let total = p["total"].as_u64().unwrap_or(0);
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = bytes as f64 / secs;
    let mut s = format!("{}/s", indicatif::HumanBytes(rate as u64));
    if let Some(sl) = p["slowest"].as_object() {
        let (b, t) = (
            sl["bytes"].as_u64().unwrap_or(0),
            sl["total"].as_u64().unwrap_or(0).max(1),
        );
        s.push_str(&format!(
            "  slowest {} {}%",
            sl["host"].as_str().unwrap_or("?"),
            b * 100 / t
        ));
    }
    if rate > 0.0 && total > bytes {
        s.push_str(&format!(
            "  ETA {}",
            indicatif::HumanDuration(Duration::from_secs_f64((total - bytes) as f64 / rate))
        ));
    }
    s
}
