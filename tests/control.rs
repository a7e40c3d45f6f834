//! End-to-end tests of the control plane: a real `octo center`, real `octo agent`
//! processes enrolled over QUIC with mutual TLS, and the real CLI against the API.
//!
//! Several agents run on this one machine with separate data directories and host
//! names; they share the file system, which these tests do not depend on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use octopus_tests::{wait_until, Octo, Value};

use crate::bin;

use crate::fleet::*;

#[test]
fn a_center_with_three_agents_runs_commands_everywhere_and_by_target() {
    let f = Fleet::start(3);
    let agents = f.agents_json();
    assert_eq!(agents.len(), 3);
    let db = agents.iter().find(|a| a["name"] == "host-1").unwrap();
    assert_eq!(db["tags"]["role"], "db");
    assert!(
        db["resources"]["mem_total"].as_u64().unwrap() > 0,
        "heartbeats carry resources"
    );

    // pssh -i style: every line prefixed by its host, a summary, exit 0.
    let (code, out, err) = f.octo(&[
        "exec",
        "all",
        "--",
        "echo",
        "hi from $OCTO_X; echo second >&2",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    for h in ["host-1", "host-2", "host-3"] {
        assert!(out.contains(&format!("{h}: hi from")), "{out}");
        assert!(err.contains(&format!("{h}: second")), "{err}");
    }
    assert!(err.contains("3 ok, 0 failed"), "{err}");

    // Targets: a glob, a tag selector, a comma list; a miss is an error that says so.
    let (_, out, _) = f.octo(&["exec", "--json", "role=web", "--", "true"]);
    assert_eq!(summary(&out)["ok"], 2);
    let (_, out, _) = f.octo(&["exec", "--json", "host-1,host-3", "--", "true"]);
    assert_eq!(summary(&out)["ok"], 2);
    let (_, out, _) = f.octo(&["exec", "--json", "host-*", "--", "true"]);
    assert_eq!(summary(&out)["ok"], 3);
    let (code, _, err) = f.octo(&["exec", "nothing-*", "--", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("matches no host"), "{err}");

    // A failing host makes the exit code non-zero and is named with its reason.
    let (code, _, err) = f.octo(&["exec", "all", "--", "test $(hostname) = never || exit 3"]);
    assert_ne!(code, 0);
    assert!(err.contains("exit code 3"), "{err}");

    // --cwd and --env reach the command through the API and the agent.
    let (code, out, err) = f.octo(&[
        "exec",
        "host-3",
        "--cwd",
        "/usr",
        "--env",
        "OCTO_E2E=on",
        "--",
        "echo $(pwd) $OCTO_E2E",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-3: /usr on"), "{out}");

    // Scripts and python.
    let script = f.dir.path().join("s.py");
    std::fs::write(
        &script,
        "import sys\nprint('py', sum(int(a) for a in sys.argv[1:]))\n",
    )
    .unwrap();
    let (code, out, err) = f.octo(&[
        "exec",
        "host-2",
        "--type",
        "python",
        "--script",
        &script.display().to_string(),
        "--",
        "2",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-2: py 5"), "{out}");

    // The result is stored: task show --json has the output and exit code.
    let (_, out, _) = f.octo(&["task", "list", "--json"]);
    let newest = serde_json::from_str::<Value>(&out).unwrap()[0]["id"]
        .as_u64()
        .unwrap();
    let (_, out, _) = f.octo(&["task", "show", &newest.to_string(), "--json"]);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["hosts"][0]["stdout"], "py 5\n");
    assert_eq!(t["hosts"][0]["exit_code"], 0);

    // Every mutating call is in the audit log, with who and from where.
    let (_, out, _) = f.octo(&["audit", "--json"]);
    let audit: Value = serde_json::from_str(&out).unwrap();
    let posts: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"] == "/api/v1/tasks")
        .collect();
    assert!(posts.len() >= 6, "{audit}");
    assert!(posts[0]["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(!posts[0]["token"].as_str().unwrap().is_empty());

    // Prometheus metrics agree with what happened.
    let (status, text) = http_raw(&f.api, "GET", "/api/v1/metrics", Some(&f.admin), "");
    assert_eq!(status, 200);
    assert!(text.contains("octo_agents_online 3"), "{text}");
    assert!(text.contains("octo_enrollments_total 3"), "{text}");
}

struct TestUser(String);

impl TestUser {
    fn create() -> TestUser {
        let name = format!("octo-e2e-{}", std::process::id());
        let st = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", &name])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
        TestUser(name)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.0]).status();
    }
}

#[test]
fn exec_as_another_user_and_a_timeout_kills_grandchildren() {
    let f = Fleet::start(1);
    let user = TestUser::create();
    let (code, out, err) = f.octo(&[
        "exec",
        "host-1",
        "--user",
        &user.0,
        "--",
        "id -un; echo home=$HOME; echo path=$PATH; env | grep -c RUST_LOG || true",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("host-1: {}", user.0)), "{out}");
    assert!(
        out.contains(&format!("host-1: home=/home/{}", user.0)),
        "{out}"
    );
    // A clean environment: nothing of the agent's (nor of the CLI's) leaks in.
    assert!(out.contains("host-1: 0"), "{out}\n{err}");

    let pidfile = f.dir.path().join("grandchild.pid");
    let cmd = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
    let started = std::time::Instant::now();
    let (code, _, err) = f.octo(&["exec", "host-1", "--timeout", "1s", "--", &cmd]);
    assert_ne!(code, 0);
    assert!(err.contains("1 timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "the grandchild {pid} survived the timeout"
    );
}

#[test]
fn an_offline_agent_gets_its_task_when_it_returns_and_a_center_restart_loses_nothing() {
    let mut f = Fleet::start(2);
    let marker = f.dir.path().join("ran-on-host-2");
    f.agent("host-2").signal(libc::SIGTERM);
    f.agent("host-2").wait(T);
    assert!(wait_until(T, || !f.online("host-2")));

    // Queued while host-2 is offline; exec returns with host-2 reported offline.
    let cmd = format!("echo x >> {}", marker.display());
    let (code, out, _) = f.octo(&["exec", "--json", "host-2", "--", &cmd]);
    assert_ne!(code, 0, "an offline host is not a success");
    let s = summary(&out);
    assert_eq!(s["ok"], 0);
    assert_eq!(s["offline"], 1);
    let id = s["id"].as_u64().unwrap();

    // Kill the center hard, restart it on the same port: the queue survived.
    f.center.kill9();
    let (c2, api2, _, admin2) = start_center(f.dir.path(), &f.addr, "center-2");
    assert_eq!(api2, f.api);
    assert_eq!(admin2, f.admin, "the admin token survives a restart");
    f.center = c2;
    // host-1 reconnects by itself with backoff.
    assert!(
        wait_until(Duration::from_secs(30), || f.online("host-1")),
        "host-1 did not reconnect"
    );

    // host-2 comes back (already enrolled: no token needed) and runs the task once.
    let mut a2 = f.restart_agent("host-2", "host-2b");
    let (code, out, err) = f.octo(&["task", "wait", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary(&out)["ok"], 1);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\n");

    // An agent restart does not run it again.
    a2.kill9();
    let _a3 = f.restart_agent("host-2", "host-2c");
    assert!(wait_until(T, || f.online("host-2")));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "x\n",
        "ran twice"
    );
}

#[test]
fn an_agent_killed_mid_task_never_runs_it_twice() {
    let mut f = Fleet::start(1);
    let count = f.dir.path().join("count");
    let cmd = format!("echo run >> {}; sleep 2", count.display());
    let (code, out, _) = f.octo(&["exec", "--async", "--json", "host-1", "--", &cmd]);
    assert_eq!(code, 0);
    let id = out
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    assert!(wait_until(T, || count.exists()));
    // SIGKILL: the agent has no chance to report; the center redelivers on reconnect.
    f.agent("host-1").kill9();
    let _again = f.restart_agent("host-1", "host-1b");
    let (code, out, _) = f.octo(&["task", "wait", &id.to_string(), "--json"]);
    assert_ne!(code, 0, "a lost result is not a success");
    let t = &summary(&out)["task"];
    assert_eq!(host_state(t, "host-1"), "lost", "{t}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "run\n",
        "ran twice"
    );
}

#[test]
fn api_errors_say_what_was_wrong_and_garbage_does_not_disturb_agents() {
    let f = Fleet::start(2);
    let task = r#"{"target":"all","command":"true"}"#;
    let (st, v) = http(&f.api, "POST", "/api/v1/tasks", None, task);
    assert_eq!(st, 401);
    assert!(v["error"].as_str().unwrap().contains("missing"), "{v}");
    let (st, v) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some("octo_aaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
        task,
    );
    assert_eq!(st, 401, "{v}");
    let (st, v) = http(&f.api, "POST", "/api/v1/tasks", Some("nonsense"), task);
    assert_eq!(st, 401, "{v}");

    let (_, read, _) = f.octo(&["token", "create", "--scope", "read"]);
    let (st, v) = http(&f.api, "POST", "/api/v1/tasks", Some(read.trim()), task);
    assert_eq!(st, 403);
    assert!(v["error"].as_str().unwrap().contains("operator"), "{v}");
    let (st, _) = http(&f.api, "GET", "/api/v1/agents", Some(read.trim()), "");
    assert_eq!(st, 200, "read scope may list agents");

    let (_, far, _) = f.octo(&[
        "token",
        "create",
        "--scope",
        "admin",
        "--allow",
        "10.0.0.0/8",
    ]);
    let (st, v) = http(&f.api, "GET", "/api/v1/agents", Some(far.trim()), "");
    assert_eq!(st, 403);
    assert!(v["error"].as_str().unwrap().contains("127.0.0.1"), "{v}");

    let (st, v) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some(&f.admin),
        "{\"target\": ",
    );
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
    let (st, _) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some(&f.admin),
        r#"{"target": 5}"#,
    );
    assert_eq!(st, 400);

    // A revoked token stops working.
    let (_, op, _) = f.octo(&["token", "create", "--scope", "operator", "--json"]);
    let op: Value = serde_json::from_str(&op).unwrap();
    let (code, _, _) = f.octo(&["token", "revoke", op["id"].as_str().unwrap()]);
    assert_eq!(code, 0);
    let (st, v) = http(&f.api, "GET", "/api/v1/tasks", op["token"].as_str(), "");
    assert_eq!(st, 401);
    assert!(v["error"].as_str().unwrap().contains("revoked"), "{v}");

    // Garbage at the agents' UDP port, and a TLS client with an unknown certificate,
    // do not disturb the enrolled agents.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|k| (k as u32 * 7 + i) as u8).collect();
        sock.send_to(&junk, &f.addr).unwrap();
    }
    // A client that passes TLS (it pins the right CA) but holds no CA-issued
    // certificate is closed before a message is read, even if it sends garbage.
    let (_, fp_hex) = f.enroll.rsplit_once('.').unwrap();
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = u8::from_str_radix(&fp_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let addr: std::net::SocketAddr = f.addr.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async move {
        use octopus_transfer::tls::{Fingerprint, Identity, ServerCheck, Trust};
        let id = Identity::generate().unwrap();
        let ep = octopus_transfer::net::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &id,
            &Trust::Standalone,
        )
        .unwrap();
        let conn = octopus_transfer::net::connect_check(
            &ep,
            &id,
            addr,
            ServerCheck::CaFingerprint(Fingerprint(fp)),
            octopus_agent::proto::ALPN_CTL,
        )
        .await
        .expect("the TLS handshake itself succeeds");
        if let Ok((mut send, _)) = conn.open_bi().await {
            let _ = send.write_all(&[0xff; 64]).await;
        }
        tokio::time::timeout(Duration::from_secs(10), conn.closed()).await
    });
    let reason = closed.expect("the center closes an unauthenticated control connection");
    assert!(
        reason.to_string().contains("not issued by this center"),
        "{reason}"
    );

    let (code, out, err) = f.octo(&["exec", "--json", "all", "--", "true"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary(&out)["ok"], 2);
}

#[test]
fn a_used_one_time_enroll_token_and_a_foreign_ca_are_refused() {
    let f = Fleet::start(0);
    let (_, once, _) = f.octo(&["token", "create", "--scope", "enroll", "--one-time"]);
    let once = once.trim();
    let dir = f.dir.path();
    let spawn = |name: &str, token: &str| {
        Command::new(bin())
            .args([
                "agent",
                "--center",
                &f.addr,
                "--token",
                token,
                "--name",
                name,
                "--json",
                "--data-dir",
            ])
            .arg(dir.join(name))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = spawn("one", once);
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"ready\""), "{line}");
    let second = spawn("two", once).wait_with_output().unwrap();
    assert!(!second.status.success());
    // With --json the error is a JSON line on stdout.
    let err = String::from_utf8_lossy(&second.stdout);
    assert!(err.contains("used"), "{err}");

    // A token whose CA fingerprint is not this center's: the agent refuses the center.
    let (tok, _) = once.rsplit_once('.').unwrap();
    let forged = format!("{tok}.{}", "0".repeat(64));
    let third = spawn("three", &forged).wait_with_output().unwrap();
    assert!(!third.status.success());
    let _ = first.kill();
    let _ = first.wait();
    let _: PathBuf = dir.to_path_buf();
}

#[test]
fn batches_stop_at_max_failures_and_cancel_kills_running_commands() {
    let f = Fleet::start(3);
    // One host at a time; after the first failure nobody else gets it.
    let (code, out, _) = f.octo(&[
        "exec",
        "--json",
        "all",
        "--batch",
        "1",
        "--max-failures",
        "0",
        "--",
        "exit 4",
    ]);
    assert_ne!(code, 0);
    let t = &summary(&out)["task"];
    let states: Vec<String> = ["host-1", "host-2", "host-3"]
        .iter()
        .map(|h| host_state(t, h))
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "failed").count(),
        1,
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| *s == "cancelled").count(),
        2,
        "{states:?}"
    );

    // Waves of 2 (67% of 3 rounds up to 2): all succeed.
    let (code, out, err) = f.octo(&["exec", "--json", "all", "--batch", "67%", "--", "true"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(summary(&out)["ok"], 3);

    // Cancel a running task: its processes die, the hosts end cancelled.
    let pidfile = f.dir.path().join("long.pid");
    let cmd = format!("echo $$ > {}; sleep 300", pidfile.display());
    let (code, out, _) = f.octo(&["exec", "--async", "--json", "host-2", "--", &cmd]);
    assert_eq!(code, 0);
    let id = serde_json::from_str::<Value>(out.lines().next().unwrap()).unwrap()["id"]
        .as_u64()
        .unwrap();
    assert!(wait_until(T, || pidfile.exists()
        && !std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .is_empty()));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (code, _, err) = f.octo(&["task", "cancel", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "the cancelled command {pid} still runs"
    );
    let (_, out, _) = f.octo(&["task", "show", &id.to_string(), "--json"]);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["state"], "cancelled");
    assert_eq!(host_state(&t, "host-2"), "cancelled");
}

#[test]
fn a_result_made_while_the_center_was_down_is_recorded_and_a_stale_task_expires() {
    let mut f = Fleet::start(2);
    // host-1 runs something slow; the center dies meanwhile and comes back after.
    let (code, out, _) = f.octo(&[
        "exec",
        "--async",
        "--json",
        "host-1",
        "--",
        "sleep 2; echo finished",
    ]);
    assert_eq!(code, 0);
    let id = serde_json::from_str::<Value>(out.lines().next().unwrap()).unwrap()["id"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    f.center.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let (c2, _, _, _) = start_center(f.dir.path(), &f.addr, "center-2");
    f.center = c2;
    let (code, out, err) = f.octo(&["task", "wait", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let t = &summary(&out)["task"];
    assert_eq!(host_state(t, "host-1"), "ok");
    assert_eq!(t["hosts"][0]["stdout"], "finished\n");

    // A task for an offline host whose TTL passes is marked expired, not run later.
    f.agent("host-2").kill9();
    assert!(wait_until(T, || !f.online("host-2")));
    let marker = f.dir.path().join("late");
    let cmd = format!("touch {}", marker.display());
    let (_, out, _) = f.octo(&["exec", "--json", "--ttl", "1s", "host-2", "--", &cmd]);
    let id = summary(&out)["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _back = f.restart_agent("host-2", "host-2b");
    assert!(wait_until(T, || f.online("host-2")));
    let (_, out, _) = f.octo(&["task", "show", &id.to_string(), "--json"]);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(host_state(&t, "host-2"), "expired", "{t}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "an expired task ran");
}

impl Fleet {
    /// Starts an already enrolled agent again (no token) from its data directory, as
    /// process `label`, and waits until it runs.
    fn restart_agent(&self, name: &str, label: &str) -> Octo {
        let data = self.dir.path().join(format!("agent-{name}"));
        let data = data.display().to_string();
        let args = [
            "agent",
            "--center",
            &self.addr,
            "--data-dir",
            &data,
            "--name",
            name,
            "--json",
        ];
        let mut a = Octo::spawn(&bin(), label, self.dir.path(), &args, &[]);
        a.wait_event("ready", T);
        a
    }

    /// A center and `n` agents `node-1`... each with its own file system at the
    /// returned path.
    fn isolated(n: usize) -> (Fleet, PathBuf) {
        let mut f = Fleet::start(0);
        let view = f.dir.path().join("view");
        std::fs::create_dir_all(&view).unwrap();
        for i in 1..=n {
            f.add_isolated_agent(&format!("node-{i}"), &view);
        }
        f.wait_online(n);
        (f, view)
    }

    /// An agent in its own mount namespace with a private tmpfs on `view`: several
    /// agents on one machine, each with its own file system there.
    fn add_isolated_agent(&mut self, name: &str, view: &Path) {
        self.add_isolated_agent_with(name, view, "");
    }

    /// [`Fleet::add_isolated_agent`] with more `octo agent` arguments. Without the
    /// enroll token when the agent is already enrolled (a restart).
    fn add_isolated_agent_with(&mut self, name: &str, view: &Path, extra: &str) {
        let data = self.dir.path().join(format!("agent-{name}"));
        let token = if data.join("agent.cert").exists() {
            String::new()
        } else {
            format!("--token {}", self.enroll)
        };
        let script = format!(
            "mount -t tmpfs -o size=64m tmpfs {} && exec {} agent --center {} {token} --data-dir {} --name {} --json {extra}",
            view.display(),
            bin().display(),
            self.addr,
            data.display(),
            name
        );
        let mut a = Octo::spawn(
            Path::new("unshare"),
            name,
            self.dir.path(),
            &["-m", "--propagation", "private", "sh", "-c", &script],
            &[],
        );
        a.wait_event("ready", T);
        self.agents.push((name.to_string(), a));
    }
}

#[test]
fn cp_copies_a_file_and_a_tree_to_every_agent_peer_to_peer() {
    let (f, view) = Fleet::isolated(3);
    let src = f.dir.path().join("release.tar");
    octopus_tests::write_random(&src, 6 << 20, 11);
    let want = crate::md5_hex(&src);

    let dest = format!("all:{}/app/release.tar", view.display());
    let (code, out, err) = f.octo(&[
        "cp",
        "--mkdir",
        "--mode",
        "0640",
        "--json",
        &src.display().to_string(),
        &dest,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let t = &summary(&out)["task"];
    assert_eq!(summary(&out)["ok"], 3, "{t}");
    for h in t["hosts"].as_array().unwrap() {
        assert!(h["stdout"].as_str().unwrap().contains(&want), "{h}");
    }
    // Each host has it in its own file system, with the asked mode; the test process
    // (outside those namespaces) sees none of it.
    assert!(!view.join("app").exists());
    let check = format!(
        "md5sum {0}/app/release.tar; stat -c %a {0}/app/release.tar",
        view.display()
    );
    let (code, out, err) = f.octo(&["exec", "all", "--", &check]);
    assert_eq!(code, 0, "{err}");
    for i in 1..=3 {
        assert!(out.contains(&format!("node-{i}: {want}")), "{out}");
        assert!(out.contains(&format!("node-{i}: 640")), "{out}");
    }

    // The same copy again moves no content bytes: every host takes it from its disk.
    let (code, out, err) = f.octo(&["cp", "--json", &src.display().to_string(), &dest]);
    assert_eq!(code, 0, "{out}\n{err}");
    for h in summary(&out)["task"]["hosts"].as_array().unwrap() {
        assert!(
            h["stdout"].as_str().unwrap().contains("received 0 bytes"),
            "{h}"
        );
    }

    // A tree with -r; without -r it is refused.
    let tree = f.dir.path().join("site");
    std::fs::create_dir_all(tree.join("static")).unwrap();
    std::fs::write(tree.join("index.html"), "hello").unwrap();
    std::fs::write(tree.join("static/app.js"), "js").unwrap();
    let dest = format!("node-*:{}/", view.display());
    let (code, _, err) = f.octo(&["cp", &tree.display().to_string(), &dest]);
    assert_ne!(code, 0);
    assert!(err.contains("-r"), "{err}");
    let (code, out, err) = f.octo(&["cp", "-r", &tree.display().to_string(), &dest]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (_, out, _) = f.octo(&[
        "exec",
        "all",
        "--",
        &format!("cat {}/site/static/app.js", view.display()),
    ]);
    assert_eq!(out.matches(": js").count(), 3, "{out}");

    // Escapes are refused before anything moves.
    let (code, _, err) = f.octo(&["cp", &src.display().to_string(), "all:/tmp/../etc/x"]);
    assert_ne!(code, 0);
    assert!(err.contains(".."), "{err}");
    let (code, _, err) = f.octo(&["cp", &src.display().to_string(), "all:relative/x"]);
    assert_ne!(code, 0);
    assert!(err.contains("absolute"), "{err}");
}

/// The `octo cp` pieces beyond the swarm: small files through the HTTP pool (with the
/// center's redirect, Range and signature checks seen from outside), `--async` with
/// `octo task wait`, per-host progress in `task show --json`, `--owner`, and an
/// offline host that gets an async copy after a center restart.
#[test]
fn cp_small_files_go_through_the_pool_and_async_copies_outlive_the_cli_and_the_center() {
    let (mut f, view) = Fleet::isolated(3);

    // A small file goes through the pool, owned as asked.
    let small = f.dir.path().join("app.conf");
    octopus_tests::write_random(&small, 200 << 10, 3);
    let want = crate::md5_hex(&small);
    let dest = format!("all:{}/etc/app.conf", view.display());
    let (code, out, err) = f.octo(&[
        "cp",
        "--json",
        "--mkdir",
        "--owner",
        "nobody",
        &small.display().to_string(),
        &dest,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let created = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "created")
        .unwrap();
    assert_eq!(created["via"], "pool", "{created}");
    let t = &summary(&out)["task"];
    assert_eq!(summary(&out)["ok"], 3, "{t}");
    for h in t["hosts"].as_array().unwrap() {
        assert_eq!(h["md5"][0], want.as_str(), "{h}");
        assert_eq!(h["bytes"], 200 << 10, "{h}");
        assert_eq!(h["total"], 200 << 10, "{h}");
        assert!(h["started_at"].as_u64().unwrap() <= h["finished_at"].as_u64().unwrap());
    }
    let check = format!(
        "md5sum {0}/etc/app.conf; stat -c %U {0}/etc/app.conf",
        view.display()
    );
    let (code, out, err) = f.octo(&["exec", "all", "--", &check]);
    assert_eq!(code, 0, "{err}");
    for i in 1..=3 {
        assert!(out.contains(&format!("node-{i}: {want}")), "{out}");
        assert!(out.contains(&format!("node-{i}: nobody")), "{out}");
    }

    // Every agent now holds it in its pool; the center redirects to one of them (the
    // center served the first wave, so it is the most loaded member).
    assert!(wait_until(T, || {
        let (_, v) = http(&f.api, "GET", "/api/v1/files", Some(&f.admin), "");
        v["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["holds"] == 1))
    }));
    let path = format!("/api/v1/files/{want}");
    let (status, head) = http_head(&f.api, &path, Some(&f.admin), None);
    assert_eq!(status, 302, "{head}");
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or_else(|| panic!("no Location in {head}"))
        .trim()
        .to_string();
    let (pool, pool_path) = location
        .trim_start_matches("http://")
        .split_once('/')
        .unwrap();
    let pool_path = format!("/{pool_path}");
    // A plain client follows it, with a Range.
    let (status, head) = http_head(
        &format!("http://{pool}"),
        &pool_path,
        None,
        Some("bytes=100-109"),
    );
    assert_eq!(status, 206, "{head}");
    assert!(
        head.to_lowercase()
            .contains(&format!("content-range: bytes 100-109/{}", 200 << 10)),
        "{head}"
    );
    let body = http_body(&format!("http://{pool}"), &pool_path, Some("bytes=100-109"));
    assert_eq!(body, std::fs::read(&small).unwrap()[100..110]);
    // A forged or expired signature gets 403, at the pool and at the center; no
    // signature and no token gets 401 at the center.
    let forged = pool_path.replace("sig=", "sig=AAAA");
    let (status, _) = http_head(&format!("http://{pool}"), &forged, None, None);
    assert_eq!(status, 403);
    let (status, body) = http_raw(&f.api, "GET", &format!("{path}?exp=1&sig=AAAA"), None, "");
    assert_eq!(status, 403);
    assert!(body.contains("expired"), "{body}");
    let (status, _) = http_raw(&f.api, "GET", &path, None, "");
    assert_eq!(status, 401);

    // Copying it again elsewhere moves no bytes: the agents take it from their cache.
    let dest2 = format!("all:{}/etc/app.conf.bak", view.display());
    let (code, out, err) = f.octo(&["cp", "--json", &small.display().to_string(), &dest2]);
    assert_eq!(code, 0, "{out}\n{err}");
    for h in summary(&out)["task"]["hosts"].as_array().unwrap() {
        assert_eq!(h["received"], 0, "{h}");
    }

    // --async: node-3 is offline; the command returns at once with the task id.
    f.agent("node-3").signal(libc::SIGTERM);
    f.agent("node-3").wait(T);
    f.agents.retain(|(n, _)| n != "node-3");
    assert!(wait_until(T, || !f.online("node-3")));
    let big = f.dir.path().join("release.bin");
    octopus_tests::write_random(&big, 6 << 20, 8);
    let big_md5 = crate::md5_hex(&big);
    let dest = format!("all:{}/rel/", view.display());
    let (code, out, err) = f.octo(&[
        "cp",
        "--async",
        "--mkdir",
        &big.display().to_string(),
        &dest,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let id: u64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no task id in {out:?}"));
    let (code, out, err) = f.octo(&["task", "wait", &id.to_string(), "--json"]);
    assert_ne!(code, 0, "an offline host is not done: {out}\n{err}");
    let s = summary(&out);
    assert_eq!(s["ok"], 2, "{s}");
    assert_eq!(s["offline"], 1, "{s}");

    // A plain (synchronous) copy with node-3 offline: the CLI hands its source to the
    // center before it exits, so node-3 can still get it later.
    let pkg = f.dir.path().join("pkg.bin");
    octopus_tests::write_random(&pkg, 3 << 20, 9);
    let pkg_md5 = crate::md5_hex(&pkg);
    let (code, out, err) = f.octo(&[
        "cp",
        "--json",
        "--mkdir",
        &pkg.display().to_string(),
        &format!("all:{}/pkg/", view.display()),
    ]);
    assert_ne!(code, 0, "an offline host is not done: {out}\n{err}");
    let sync_id = summary(&out)["id"].as_u64().unwrap();
    assert!(out.contains("\"handed-over\""), "{out}");

    // The center is killed and restarted; node-3 returns and still gets both copies
    // from the center's restored seeds.
    f.center.kill9();
    let (c2, _, _, _) = start_center(f.dir.path(), &f.addr, "center-2");
    f.center = c2;
    f.add_isolated_agent_with("node-3", &view, "");
    let (code, out, err) = f.octo(&["task", "wait", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary(&out)["ok"], 3);
    let (code, out, err) = f.octo(&["task", "wait", &sync_id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = summary(&out);
    assert_eq!(s["ok"], 3, "{s}");
    for h in s["task"]["hosts"].as_array().unwrap() {
        assert_eq!(h["md5"][0], pkg_md5.as_str(), "{h}");
    }
    let (code, out, _) = f.octo(&["task", "show", &id.to_string(), "--json"]);
    assert_eq!(code, 0);
    let t: Value = serde_json::from_str(&out).unwrap();
    for h in t["hosts"].as_array().unwrap() {
        assert_eq!(h["md5"][0], big_md5.as_str(), "{h}");
        assert_eq!(h["bytes"], 6 << 20, "{h}");
    }
    f.wait_online(3);
    let (_, out, _) = f.octo(&[
        "exec",
        "all",
        "--",
        &format!("md5sum {}/rel/release.bin", view.display()),
    ]);
    assert_eq!(out.matches(&big_md5).count(), 3, "{out}");

    // A source on a host (HOST:/path): node-1 seeds from its own file system.
    let from = format!("node-1:{}/rel/release.bin", view.display());
    let to = format!("node-2,node-3:{}/from-node-1/", view.display());
    let (code, out, err) = f.octo(&["cp", "--json", "--mkdir", &from, &to]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = summary(&out);
    assert_eq!(s["ok"], 2, "{s}");
    for h in s["task"]["hosts"].as_array().unwrap() {
        assert_eq!(h["md5"][0], big_md5.as_str(), "{h}");
    }
    let (code, _, err) = f.octo(&["cp", "node-1:/tmp/../etc/passwd", &to]);
    assert_ne!(code, 0);
    assert!(err.contains(".."), "{err}");
}

/// An agent's cache stays within its quota, least recently used content going first.
#[test]
fn the_agent_cache_respects_its_quota() {
    let mut f = Fleet::start(0);
    let view = f.dir.path().join("view");
    std::fs::create_dir_all(&view).unwrap();
    f.add_isolated_agent_with("node-1", &view, "--cache-quota 3MiB");
    f.wait_online(1);
    let objects = f.dir.path().join("agent-node-1/cache/objects");
    let cached = || -> u64 { walkdir_size(&objects) };
    for i in 0..4u64 {
        let src = f.dir.path().join(format!("pkg-{i}.bin"));
        octopus_tests::write_random(&src, 1200 << 10, 20 + i);
        let (code, out, err) = f.octo(&[
            "cp",
            "--mkdir",
            &src.display().to_string(),
            &format!("node-1:{}/pkgs/", view.display()),
        ]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(
            cached() <= 3 << 20,
            "cache holds {} bytes over its 3 MiB quota",
            cached()
        );
    }
    // Two of the four fit (files are cached in the background after each copy).
    assert!(
        wait_until(T, || cached() == 2 * (1200 << 10)),
        "cache holds {} bytes",
        cached()
    );
    let (_, out, _) = f.octo(&["exec", "all", "--", &format!("ls {}/pkgs", view.display())]);
    for i in 0..4 {
        assert!(out.contains(&format!("pkg-{i}.bin")), "{out}");
    }
}

#[test]
fn cp_to_an_agent_killed_mid_transfer_completes_and_resumes() {
    let mut f = Fleet::start(1);
    let src = f.dir.path().join("big.bin");
    octopus_tests::write_random(&src, 40 << 20, 5);
    let want = crate::md5_hex(&src);
    let dest = f.dir.path().join("out").join("big.bin");
    let mut cp = Octo::spawn(
        &bin(),
        "cp",
        f.dir.path(),
        &[
            "cp",
            "--json",
            "--mkdir",
            "--limit-down",
            "8MB",
            &src.display().to_string(),
            &format!("host-1:{}", dest.display()),
        ],
        &[
            ("OCTO_CENTER", f.api.as_str()),
            ("OCTO_TOKEN", f.admin.as_str()),
        ],
    );
    cp.wait_event("created", T);
    // Let it get part of the way (40 MiB at 8 MB/s is 5 s), then kill the agent hard.
    // (verified pieces, pieces) of the staging area's resume record.
    let out_dir = f.dir.path().join("out");
    let record = || -> (usize, usize) {
        std::fs::read_dir(&out_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| std::fs::read(d.path().join("verified")).ok())
            .map(|b| (b.iter().filter(|x| **x == 1).count(), b.len()))
            .max()
            .unwrap_or((0, 0))
    };
    assert!(
        wait_until(T, || record().0 > 20),
        "no progress before the kill"
    );
    f.agent("host-1").kill9();
    // Read after the kill: every piece counted here is on disk and recorded.
    let (kept, pieces) = record();
    let total: u64 = 40 << 20;
    let piece = total.div_ceil(pieces as u64);
    let verified_before = kept as u64 * piece;
    assert!(verified_before < total, "the copy finished before the kill");
    let _again = f.restart_agent("host-1", "host-1b");
    let s = cp.wait_event("summary", Duration::from_secs(60));
    assert_eq!(s["ok"], 1, "{s}");
    assert!(cp.wait(T).success());
    assert_eq!(crate::md5_hex(&dest), want);
    // The rerun resumed: it received less than the whole file.
    let stdout = s["task"]["hosts"][0]["stdout"]
        .as_str()
        .unwrap()
        .to_string();
    let received: u64 = stdout
        .split("received ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {stdout:?}"));
    // Every verified piece was reused: the rerun fetched only the rest, plus at most
    // a few endgame duplicates (not merely "less than everything").
    assert!(
        received <= total - verified_before + 4 * piece,
        "refetched verified pieces: received {received} of {total}, {verified_before} were verified before the kill"
    );
}

#[test]
fn the_cli_finds_the_center_through_its_config_file_and_flags_override_it() {
    let f = Fleet::start(1);
    let cfg = f.dir.path().join("xdg");
    std::fs::create_dir_all(cfg.join("octo")).unwrap();
    std::fs::write(
        cfg.join("octo/config"),
        format!(
            "# written by the test\ncenter = {}\ntoken = {}\n",
            f.api, f.admin
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env_remove("OCTO_CENTER")
            .env_remove("OCTO_TOKEN")
            .env("XDG_CONFIG_HOME", &cfg)
            .output()
            .unwrap()
    };
    let out = run(&["agents", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("host-1"));
    // A flag wins over the file: a bad token given on the command line is refused.
    let out = run(&[
        "agents",
        "--json",
        "--token",
        "octo_aaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("401"), "{text}");
}

/// The README's main job: `octo demo` starts its own center and agents, copies a file
/// to all of them, and every host reports the source's MD5.
#[test]
fn the_readme_demo_copies_to_every_local_agent() {
    let out = Command::new(bin())
        .args(["demo", "--size", "8MiB", "--agents", "3", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run octo demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| panic!("no done event in {stdout}"));
    assert_eq!(done["verified"], true, "{done}");
    assert_eq!(
        done["isolated"], true,
        "as root the demo isolates its agents"
    );
    let hosts = done["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{done}");
    assert!(hosts.iter().all(|h| h["md5"] == done["md5"]), "{done}");
}
