//! The center under hostile or huge input (issue 9): unauthenticated floods, a full
//! disk, big tasks, status codes, echoed targets, metrics, and live output memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use octopus_tests::{wait_until, Value};

use crate::fleet::{http, http_get, start_center_with, Fleet, T};

/// A tmpfs of `size` on `dir` (tests run as root), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "octo-caps"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "these tests run as root and need to mount a small tmpfs on {}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(ENOSPC), "filling: {e}");
            break;
        }
    }
    // Whatever is left below a page.
    let _ = f.write_all(&[0x5a; 4096]);
    let _ = f.sync_all();
}

const ENOSPC: i32 = 28;

/// A request whose body may be huge, sent by real curl over the center's HTTPS (curl
/// stops sending when the server answers before reading it all). Returns the status
/// and body.
fn send_big(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let tmp = tempfile::tempdir().unwrap();
    let (req, resp) = (tmp.path().join("req"), tmp.path().join("resp"));
    std::fs::write(&req, body).unwrap();
    let ca = crate::fleet::ca_of(api).expect("a center started through the fleet fixture");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["-X", method, "-H", "Content-Type: application/json"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()))
        .arg("-o")
        .arg(&resp)
        .args(["-w", "%{http_code}"])
        .arg(format!("{api}{path}"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .output()
        .expect("running curl (Debian's curl package, which .ci/run installs)");
    let code = String::from_utf8_lossy(&out.stdout);
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "no response to {method} {path}: {code:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (status, std::fs::read_to_string(&resp).unwrap_or_default())
}

/// A GET answered with JSON (arrays included, which `fleet::http` does not parse).
fn get_json(api: &str, path: &str, token: &str) -> (u16, Value) {
    let (status, _, body) = http_get(api, path, Some(token), None);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn new_token(api: &str, admin: &str, note: &str) -> u16 {
    let body = serde_json::json!({"scope": "read", "note": note}).to_string();
    http(api, "POST", "/api/v1/tokens", Some(admin), &body).0
}

#[test]
fn an_unauthenticated_flood_does_not_grow_the_store_and_the_audit_log_keeps_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, api, _addr, admin) = start_center_with(
        dir.path(),
        "127.0.0.1:0",
        "center",
        &["--audit-keep", "300"],
    );
    let db = dir.path().join("center-data/center.redb");
    let before = file_size(&db);
    let long = format!("/api/v1/tasks/{}/cancel", "x".repeat(60_000));
    let nowhere = format!("/api/v1/{}", "y".repeat(60_000));
    for i in 0..1200 {
        // A real route (401) and no route at all (404), without a valid token.
        let (path, token, want) = match i % 3 {
            0 => (&long, None, 401),
            1 => (&nowhere, None, 404),
            _ => (&nowhere, Some("octo_0123456789abcdef_bogus"), 404),
        };
        let (status, _) = http_raw_quiet(&api, "POST", path, token, "{}");
        assert_eq!(status, want);
    }
    let after = file_size(&db);
    // Stored whole, 2,000 such calls made it 250 MB; a few cut entries are kilobytes.
    assert!(
        after < before + (8 << 20),
        "center.redb grew from {before} to {after} bytes"
    );
    let (status, audit) = get_json(&api, "/api/v1/audit?limit=10000", &admin);
    assert_eq!(status, 200);
    let entries = audit.as_array().unwrap();
    let unauth: Vec<&Value> = entries.iter().filter(|e| e["token"] == "-").collect();
    assert!(
        !unauth.is_empty(),
        "unauthenticated calls are still audited"
    );
    assert!(
        unauth.len() <= 200,
        "{} unauthenticated calls stored one by one",
        unauth.len()
    );
    for e in &unauth {
        let p = e["path"].as_str().unwrap();
        assert!(p.len() < 400, "a stored path of {} bytes", p.len());
        assert!(p.starts_with("/api/v1/"), "{p}");
    }
    // Retention: past --audit-keep, the oldest entries go (the sweeper prunes).
    for i in 0..400 {
        let (s, _) = http(
            &api,
            "POST",
            &format!("/api/v1/tasks/{}/cancel", 1_000_000 + i),
            Some(&admin),
            "",
        );
        assert_eq!(s, 404);
    }
    assert!(
        wait_until(T, || {
            let (_, a) = get_json(&api, "/api/v1/audit?limit=10000", &admin);
            a.as_array().is_some_and(|a| a.len() <= 300)
        }),
        "the audit log was never pruned to 300 entries"
    );
    let (_, a) = get_json(&api, "/api/v1/audit?limit=1", &admin);
    assert_eq!(
        a[0]["path"], "/api/v1/tasks/1000399/cancel",
        "the newest entries stay"
    );
}

/// [`crate::fleet::http_raw`] for a request the server may answer before reading it.
fn http_raw_quiet(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    if body.len() < 64 << 10 {
        crate::fleet::http_raw(api, method, path, token, body)
    } else {
        send_big(api, method, path, token, body.as_bytes())
    }
}

#[test]
fn below_the_disk_reserve_writes_get_507_reads_work_and_freeing_space_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("center-data");
    let _fs = Tmpfs::mount(&data, "64m");
    let (mut c, api, _addr, admin) = start_center_with(
        dir.path(),
        "127.0.0.1:0",
        "center",
        &["--disk-reserve", "16MiB"],
    );
    assert_eq!(new_token(&api, &admin, "before"), 201);
    let filler = data.join("filler");
    fill(&filler);
    // Writes are refused with 507, uploads too; reads still answer.
    assert_eq!(new_token(&api, &admin, "while full"), 507);
    let (status, body) = send_big(&api, "PUT", "/api/v1/files", Some(&admin), b"some bytes");
    assert_eq!(status, 507, "{body}");
    let (status, tokens) = get_json(&api, "/api/v1/tokens", &admin);
    assert_eq!(status, 200, "{tokens}");
    let (status, _, _) = http_get(&api, "/api/v1/agents", Some(&admin), None);
    assert_eq!(status, 200);
    // Space comes back: writes work again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(new_token(&api, &admin, "after"), 201);
    let (status, _) = send_big(&api, "PUT", "/api/v1/files", Some(&admin), b"some bytes");
    assert_eq!(status, 201);
    // And a restart works.
    c.kill9();
    let (_c2, api2, _, admin2) = start_center_with(
        dir.path(),
        "127.0.0.1:0",
        "center2",
        &["--disk-reserve", "16MiB"],
    );
    let (status, tokens) = get_json(&api2, "/api/v1/tokens", &admin2);
    assert_eq!(status, 200);
    let notes: Vec<&str> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["note"].as_str())
        .collect();
    assert!(
        notes.contains(&"before") && notes.contains(&"after"),
        "{notes:?}"
    );
    assert!(!notes.contains(&"while full"), "{notes:?}");
}

#[test]
fn a_disk_filled_to_the_last_byte_answers_507_and_the_center_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("center-data");
    let _fs = Tmpfs::mount(&data, "48m");
    // No reserve: the store's own writes hit ENOSPC.
    let (mut c, api, _addr, admin) = start_center_with(
        dir.path(),
        "127.0.0.1:0",
        "center",
        &["--disk-reserve", "0"],
    );
    assert_eq!(new_token(&api, &admin, "before"), 201);
    let filler = data.join("filler");
    fill(&filler);
    let (status, body) = send_big(
        &api,
        "PUT",
        "/api/v1/files",
        Some(&admin),
        &vec![1u8; 1 << 20],
    );
    assert_eq!(status, 507, "a disk-full upload: {body}");
    // Tokens with big notes until the store must grow and cannot.
    let note = "n".repeat(60_000);
    let mut statuses = Vec::new();
    for _ in 0..200 {
        let s = new_token(&api, &admin, &note);
        statuses.push(s);
        if s != 201 {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&507),
        "a write on a full disk: {statuses:?}\n{}",
        c.stderr()
    );
    std::fs::remove_file(&filler).unwrap();
    // No "Previous I/O error" for ever after: the store is reopened.
    assert_eq!(new_token(&api, &admin, "after"), 201, "{}", c.stderr());
    let (status, _) = get_json(&api, "/api/v1/tokens", &admin);
    assert_eq!(status, 200);
    c.kill9();
    let (_c2, api2, _, admin2) = start_center_with(
        dir.path(),
        "127.0.0.1:0",
        "center2",
        &["--disk-reserve", "0"],
    );
    let (status, tokens) = get_json(&api2, "/api/v1/tokens", &admin2);
    assert_eq!(status, 200);
    assert!(tokens
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["note"] == "after"));
}

#[test]
fn oversized_bodies_commands_and_targets_get_413_and_errors_do_not_echo_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, api, _addr, admin) = start_center_with(dir.path(), "127.0.0.1:0", "center", &[]);
    // A JSON body over the limit: 413, not 400.
    let mut big = br#"{"target":"all","command":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 20 << 20));
    big.extend(br#""}"#);
    let (status, body) = send_big(&api, "POST", "/api/v1/tasks", Some(&admin), &big);
    assert_eq!(status, 413, "{body}");
    drop(big);
    // A command over its cap, a target over its cap.
    let cmd = serde_json::json!({"target": "all", "command": "a".repeat(100_000)}).to_string();
    let (status, body) = http(&api, "POST", "/api/v1/tasks", Some(&admin), &cmd);
    assert_eq!(status, 413, "{body}");
    let t = serde_json::json!({"target": "h".repeat(70_000), "command": "true"}).to_string();
    let (status, body) = http(&api, "POST", "/api/v1/tasks", Some(&admin), &t);
    assert_eq!(status, 413, "{body}");
    // A target that matches nothing is quoted back cut.
    let glob = format!("nothing-{}*", "g".repeat(50_000));
    let t = serde_json::json!({"target": glob, "command": "true"}).to_string();
    let (status, body) = http(&api, "POST", "/api/v1/tasks", Some(&admin), &t);
    assert_eq!(status, 404, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.len() < 1000, "an error of {} bytes", msg.len());
    assert!(msg.contains("matches no host"), "{msg}");
    let (status, _, raw) = http_get(
        &api,
        &format!("/api/v1/agents?target={glob}"),
        Some(&admin),
        None,
    );
    assert_eq!(status, 404);
    assert!(raw.len() < 1000, "an error of {} bytes", raw.len());
}

#[test]
fn big_tasks_list_in_pages_with_short_summaries() {
    let f = Fleet::start(1);
    // Commands near the cap: listings show a summary line, not the command.
    let pad = "x".repeat(60_000);
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = serde_json::json!({"target": "host-1", "command": format!("echo {i} {pad}")})
            .to_string();
        let (status, v) = http(&f.api, "POST", "/api/v1/tasks", Some(&f.admin), &t);
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_u64().unwrap());
    }
    let (status, _, raw) = http_get(&f.api, "/api/v1/tasks?limit=5", Some(&f.admin), None);
    assert_eq!(status, 200);
    assert!(
        raw.len() < 20_000,
        "a list of 5 tasks is {} bytes: the commands came with it",
        raw.len()
    );
    let (code, out, err) = f.octo(&["task", "list", "--limit", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    let got: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4], ids[3]]);
    for t in page.as_array().unwrap() {
        assert!(
            t["summary"].as_str().unwrap().len() < 300,
            "{}",
            t["summary"]
        );
    }
    // The next page starts after the last id seen.
    let (_, _, raw) = http_get(
        &f.api,
        &format!("/api/v1/tasks?limit=2&after={}", ids[3]),
        Some(&f.admin),
        None,
    );
    let next: Value = serde_json::from_slice(&raw).unwrap();
    let got: Vec<u64> = next
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2], ids[1]]);
    // The whole command is still in the task body: the host ran it.
    assert!(wait_until(T, || {
        let (_, t) = http(
            &f.api,
            "GET",
            &format!("/api/v1/tasks/{}", ids[4]),
            Some(&f.admin),
            "",
        );
        t["hosts"][0]["stdout"] == format!("4 {pad}\n")
    }));
    // More tasks than one page of the center: the CLI pages through them.
    for _ in 0..200 {
        let t = serde_json::json!({"target": "host-1", "command": "true"}).to_string();
        let (status, _) = http(&f.api, "POST", "/api/v1/tasks", Some(&f.admin), &t);
        assert_eq!(status, 201);
    }
    let (code, out, err) = f.octo(&["task", "list", "--limit", "205", "--json"]);
    assert_eq!(code, 0, "{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    let mut seen: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(seen.len(), 205);
    seen.dedup();
    assert_eq!(seen.len(), 205, "no task twice");
}

/// promtool (Debian package `prometheus`) validates the exposition.
fn promtool_check(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is needed to check the metrics exposition (apt-get install prometheus): {e}"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_count_tasks_and_results_and_pass_promtool() {
    let f = Fleet::start(2);
    let (code, _, err) = f.octo(&["exec", "all", "--", "true"]);
    assert_eq!(code, 0, "{err}");
    let (status, _, body) = http_get(&f.api, "/api/v1/metrics", Some(&f.admin), None);
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert_eq!(metric(&text, "octo_tasks_created_total"), 1, "{text}");
    assert_eq!(metric(&text, "octo_results_stored_total"), 2, "{text}");
    promtool_check(&text);
}

#[test]
fn live_output_past_the_per_task_cap_is_cut_and_flagged() {
    // The agent streams at most 1 MiB per stream (its own cap), so three hosts each
    // printing 1 MiB to stdout and to stderr send the center 6 MiB for one task: more
    // than it keeps per task for followers.
    let f = Fleet::start(3);
    let t = serde_json::json!({"target": "all",
        "command": "head -c 1048576 /dev/zero | tr '\\0' a; head -c 1048576 /dev/zero | tr '\\0' b >&2"})
    .to_string();
    let (status, v) = http(&f.api, "POST", "/api/v1/tasks", Some(&f.admin), &t);
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    assert!(wait_until(Duration::from_secs(60), || {
        let (_, t) = http(
            &f.api,
            "GET",
            &format!("/api/v1/tasks/{id}"),
            Some(&f.admin),
            "",
        );
        t["state"] == "done"
    }));
    let (status, _, raw) = http_get(
        &f.api,
        &format!("/api/v1/tasks/{id}/events?after=0&wait=0"),
        Some(&f.admin),
        None,
    );
    assert_eq!(status, 200);
    let ev: Value = serde_json::from_slice(&raw).unwrap();
    let kept: usize = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap_or("").len())
        .sum();
    assert!(
        kept <= 4 << 20,
        "{kept} bytes of live output kept for one task"
    );
    assert_eq!(
        ev["truncated"], true,
        "a follower from the start missed output"
    );
    // A follower that is up to date is not told anything was lost.
    let next = ev["next"].as_u64().unwrap();
    let (_, _, raw) = http_get(
        &f.api,
        &format!("/api/v1/tasks/{id}/events?after={next}&wait=0"),
        Some(&f.admin),
        None,
    );
    let ev: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(ev["truncated"], false);
}
