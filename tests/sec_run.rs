//! The agent and CLI at runtime (issue 9): bounded command output, whole output lines,
//! no escaped children after a timeout, a center killed during a swarm copy, a bad pool
//! member taken out of rotation, and rate limits that are shown to limit.

use std::collections::BTreeMap;
use std::time::Duration;

use octopus_tests::{wait_until, Value};

use crate::fleet::{summary, Fleet, T};

/// The agent's peak resident memory (VmHWM) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

#[test]
fn a_command_printing_300_mb_is_cut_at_the_cap_and_the_agent_stays_small() {
    let mut f = Fleet::start(1);
    let pid = f.agent("host-1").pid();
    let before = peak_rss_kib(pid);
    let (code, out, err) = f.octo(&[
        "exec",
        "host-1",
        "--",
        "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 300000000",
    ]);
    assert_eq!(code, 0, "{err}");
    let after = peak_rss_kib(pid);
    // The cap is 1 MiB a stream; the old unbounded channel held hundreds of MB.
    assert!(
        after < before + 64 * 1024,
        "the agent's peak RSS went from {before} KiB to {after} KiB"
    );
    assert!(
        err.contains("host-1: output truncated at 1 MiB (stdout)"),
        "the CLI must say the output was cut: {err}"
    );
    let printed = out.lines().filter(|l| l.starts_with("host-1: ")).count();
    assert!(
        (1..=(1 << 20) / 37 + 1).contains(&printed),
        "printed {printed} lines"
    );

    let (code, out, _) = f.octo(&["exec", "--json", "host-1", "--", "yes | head -c 3000000"]);
    assert_eq!(code, 0);
    let s = summary(&out);
    assert_eq!(s["truncated"], serde_json::json!(["host-1"]), "{s}");
    let h = &s["task"]["hosts"][0];
    assert_eq!(h["stdout_truncated"], true, "{h}");
    assert_eq!(h["stderr_truncated"], false, "{h}");
}

/// The shell line that prints `n` lines of about 1 KB to stdout and stderr:
/// `L <pid> <i> <payload(pid, i)>`, all from one awk process.
fn chatty(n: usize) -> String {
    format!(
        "awk -v p=$$ 'BEGIN {{ for (i = 0; i < {n}; i++) {{ u = p \"-\" i \":\"; s = \"\"; \
         while (length(s) < 1000) s = s u; print \"L \" p \" \" i \" \" s; \
         print \"L \" p \" \" i \" \" s > \"/dev/stderr\" }} }}'"
    )
}

/// Checks every line the CLI printed is `host: L pid i payload` with the payload
/// that host's process printed, or is marked as cut; returns the pid per host.
fn check_whole_lines(text: &str, hosts: usize) -> BTreeMap<String, String> {
    let mut pids: BTreeMap<String, String> = BTreeMap::new();
    let mut whole = 0;
    for line in text.lines() {
        let Some((host, rest)) = line.split_once(": ") else {
            continue;
        };
        if !host.starts_with("host-") {
            continue;
        }
        if rest.starts_with("[cut]") || rest.ends_with("[cut]") {
            continue;
        }
        let parts: Vec<&str> = rest.splitn(4, ' ').collect();
        if parts.len() != 4 || parts[0] != "L" {
            // The summary and the truncation notes are the only other lines.
            assert!(
                rest.starts_with("output truncated at"),
                "not a whole line: {line:.200}"
            );
            continue;
        }
        let (pid, i, payload) = (parts[1], parts[2], parts[3]);
        let unit = format!("{pid}-{i}:");
        let mut want = String::new();
        while want.len() < 1000 {
            want.push_str(&unit);
        }
        assert_eq!(payload, want, "a spliced line: {line:.200}");
        let seen = pids
            .entry(host.to_string())
            .or_insert_with(|| pid.to_string());
        assert_eq!(
            seen, pid,
            "{host} printed a line of another host: {line:.200}"
        );
        whole += 1;
    }
    assert!(whole > 100, "only {whole} whole lines");
    let distinct: std::collections::BTreeSet<_> = pids.values().collect();
    assert_eq!(
        distinct.len(),
        pids.len(),
        "two hosts, one process: {pids:?}"
    );
    assert!(pids.len() <= hosts);
    pids
}

/// What the CLI printed on stderr besides the command's own lines.
fn notes(err: &str) -> String {
    err.lines()
        .filter(|l| !l.contains(": L ") && !l.contains("[cut]"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn lines_of_many_hosts_stay_whole_live_and_when_followed_late() {
    let hosts = 5;
    let f = Fleet::start(hosts);
    // Live: 5 hosts printing 3 MB a stream at once.
    let (code, out, err) = f.octo(&["exec", "all", "--", &chatty(3000)]);
    assert_eq!(code, 0, "{}", notes(&err));
    check_whole_lines(&out, hosts);
    check_whole_lines(&err, hosts);
    for i in 1..=hosts {
        assert!(
            err.contains(&format!(
                "host-{i}: output truncated at 1 MiB (stdout and stderr)"
            )),
            "{}",
            notes(&err)
        );
    }

    // Late: the task has finished before anyone follows it, so the center's event
    // log has dropped its oldest events and the first ones kept start mid-line.
    let (code, out, err) = f.octo(&["exec", "--async", "--json", "all", "--", &chatty(3000)]);
    assert_eq!(code, 0, "{err}");
    let id = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "created")
        .and_then(|v| v["id"].as_u64())
        .unwrap();
    assert!(wait_until(T, || {
        let (_, out, _) = f.octo(&["task", "show", &id.to_string(), "--json"]);
        serde_json::from_str::<Value>(&out).is_ok_and(|t| {
            t["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().all(|h| h["state"] == "ok"))
        })
    }));
    let (code, out, err) = f.octo(&["task", "wait", &id.to_string()]);
    assert_eq!(code, 0, "{}", notes(&err));
    check_whole_lines(&out, hosts);
    check_whole_lines(&err, hosts);
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

#[test]
fn a_timeout_kills_a_setsid_grandchild() {
    let f = Fleet::start(1);
    let (code, out, err) = f.octo(&[
        "exec",
        "--timeout",
        "2s",
        "host-1",
        "--",
        "sh -c 'setsid sleep 1000 & echo $!; sleep 1000'",
    ]);
    assert_ne!(code, 0, "a timed-out command is not a success");
    assert!(err.contains("timed out"), "{err}");
    let pid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("host-1: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out}"));
    // Killed processes take a moment to be reaped; poll, do not time.
    let gone = wait_until(Duration::from_secs(5), || !alive(pid));
    if !gone {
        // SAFETY: plain kill of the stray process this test made.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(gone, "the setsid grandchild {pid} survived the timeout");

    // A cancel reaches it too.
    let pidfile = f.dir.path().join("grandchild.pid");
    let cmd = format!(
        "sh -c 'setsid sleep 1001 & echo $! > {}; sleep 1000'",
        pidfile.display()
    );
    let (code, out, err) = f.octo(&["exec", "--async", "--json", "host-1", "--", &cmd]);
    assert_eq!(code, 0, "{err}");
    let id = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "created")
        .and_then(|v| v["id"].as_u64())
        .unwrap();
    assert!(wait_until(T, || std::fs::read_to_string(&pidfile)
        .is_ok_and(|s| s.ends_with('\n'))));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    let (code, _, err) = f.octo(&["task", "cancel", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    let gone = wait_until(Duration::from_secs(10), || !alive(pid));
    if !gone {
        // SAFETY: plain kill of the stray process this test made.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(gone, "the setsid grandchild {pid} survived a cancel");
}

#[test]
fn share_and_get_limits_charge_every_byte_they_move() {
    let env = crate::Env::new();
    let src = env.path("payload.bin");
    let size = 3_000_000u64;
    octopus_tests::write_random(&src, size, 9);
    let (mut share, ticket) = env.share("share", &["--limit-up", "20MB"], &[&src]);
    let dest = env.path("got.bin");
    let mut get = env.get("get", &ticket, &dest, &["--limit-down", "20MB"]);
    let done = get.wait_event("done", crate::T);
    assert_eq!(done["bytes"], size, "{done}");
    assert_eq!(
        done["limited_down_bytes"], size,
        "every received byte goes through --limit-down: {done}"
    );
    get.wait(crate::T);
    share.signal(libc::SIGINT);
    let stopped = share.wait_event("stopped", crate::T);
    let sent = stopped["sent_bytes"].as_u64().unwrap();
    assert!(sent >= size, "{stopped}");
    assert_eq!(
        stopped["limited_up_bytes"].as_u64(),
        Some(sent),
        "every sent byte goes through --limit-up: {stopped}"
    );
}

/// `limited C bytes by the copy's download limit and A by the agent's` -> (C, A).
fn limited(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("limited "))?;
    let words: Vec<&str> = line.split(' ').collect();
    Some((words.get(1)?.parse().ok()?, words.get(9)?.parse().ok()?))
}

#[test]
fn cp_and_agent_download_limits_charge_every_byte_received() {
    let mut f = Fleet::start(0);
    let data = f.dir.path().join("agent-limited");
    let data = data.display().to_string();
    let args = [
        "agent",
        "--center",
        &f.addr,
        "--token",
        &f.enroll,
        "--data-dir",
        &data,
        "--name",
        "limited",
        "--limit-down",
        "20MB",
        "--json",
    ];
    let mut a = octopus_tests::Octo::spawn(&crate::bin(), "limited", f.dir.path(), &args, &[]);
    a.wait_event("ready", T);
    f.agents.push(("limited".into(), a));
    f.wait_online(1);

    let src = f.dir.path().join("big.bin");
    let size = 3_000_000u64;
    octopus_tests::write_random(&src, size, 4);
    let dest = format!("limited:{}/copy.bin", f.dir.path().display());
    let (code, out, err) = f.octo(&[
        "cp",
        "--json",
        "--limit-down",
        "20MB",
        &src.display().to_string(),
        &dest,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let h = &summary(&out)["task"]["hosts"][0];
    let stdout = h["stdout"].as_str().unwrap();
    let received = h["received"].as_u64().unwrap();
    assert_eq!(received, size, "{h}");
    assert_eq!(
        limited(stdout),
        Some((received, received)),
        "both limits charge every byte received: {stdout}"
    );
}

#[test]
fn a_swarm_cp_outlives_a_center_killed_and_restarted_mid_copy() {
    let mut f = Fleet::start(1);
    let src = f.dir.path().join("release.bin");
    let size = 8_000_000u64;
    octopus_tests::write_random(&src, size, 21);
    let want = crate::md5_hex(&src);
    let dest = f.dir.path().join("out").join("release.bin");
    let target = format!("host-1:{}", dest.display());
    // The CLI seeds at 1 MB/s, so the copy takes about 8 s: time to restart the center.
    let args = [
        "cp",
        "--json",
        "--mkdir",
        "--limit-up",
        "1MB",
        &src.display().to_string(),
        &target,
    ];
    let mut cli = octopus_tests::Octo::spawn(
        &crate::bin(),
        "cp",
        f.dir.path(),
        &args,
        &[("OCTO_CENTER", &f.api), ("OCTO_TOKEN", &f.admin)],
    );
    let created = cli.wait_event("created", T);
    assert_eq!(created["via"], "swarm", "{created}");
    let id = created["id"].as_u64().unwrap();
    // Wait until bytes are moving, then kill the center hard.
    assert!(wait_until(T, || {
        let (_, v) = crate::fleet::http(
            &f.api,
            "GET",
            &format!("/api/v1/tasks/{id}/progress"),
            Some(&f.admin),
            "",
        );
        v["bytes"].as_u64().is_some_and(|b| b > 0)
    }));
    f.center.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let (c2, api2, _, _) = crate::fleet::start_center(f.dir.path(), &f.addr, "center-2");
    assert_eq!(api2, f.api);
    f.center = c2;

    let summary = cli.wait_event("summary", Duration::from_secs(90));
    let status = cli.wait(T);
    assert!(
        status.success(),
        "the CLI gave up: {summary}\n{}",
        cli.stderr()
    );
    assert_eq!(summary["ok"], 1, "{summary}");
    assert_eq!(crate::md5_hex(&dest), want);
}

#[test]
fn a_pool_member_whose_copy_fails_verification_leaves_the_rotation() {
    let f = Fleet::start(2);
    let small = f.dir.path().join("app.conf");
    octopus_tests::write_random(&small, 200 << 10, 17);
    let want = crate::md5_hex(&small);
    let src = small.display().to_string();
    // host-1 gets it from the center and then holds it in its pool.
    let first = format!("host-1:{}/one/app.conf", f.dir.path().display());
    let (code, out, err) = f.octo(&["cp", "--json", "--mkdir", &src, &first]);
    assert_eq!(code, 0, "{out}\n{err}");
    let holds = |host: &str| {
        let (_, v) = crate::fleet::http(&f.api, "GET", "/api/v1/files", Some(&f.admin), "");
        v["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["host"] == host))
            .and_then(|m| m["holds"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        wait_until(T, || holds("host-1") == 1),
        "host-1 never joined the pool"
    );

    // Its cached object rots on disk (same size, other bytes).
    let obj = f
        .dir
        .path()
        .join("agent-host-1/cache/objects")
        .join(&want[..2])
        .join(&want);
    let mut bytes = std::fs::read(&obj).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = !*b;
    }
    std::fs::write(&obj, &bytes).unwrap();

    // host-2 is sent to host-1 (it has served nothing yet, the center once), finds
    // the copy bad, and gets the center's instead.
    let second = format!("host-2:{}/two/app.conf", f.dir.path().display());
    let (code, out, err) = f.octo(&["cp", "--json", "--mkdir", &src, &second]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary(&out)["ok"], 1);
    assert_eq!(crate::md5_hex(&f.dir.path().join("two/app.conf")), want);
    let (_, v) = crate::fleet::http(&f.api, "GET", "/api/v1/files", Some(&f.admin), "");
    let h1 = v["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["host"] == "host-1"))
        .cloned()
        .unwrap_or_default();
    assert!(
        h1["redirects"].as_u64() >= Some(1),
        "host-1 was never tried: {v}"
    );
    assert_eq!(
        h1["holds"], 0,
        "the bad member is still listed for {want}: {v}"
    );
    // Its next holdings report does not bring it back.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holds("host-1"), 0);
}
