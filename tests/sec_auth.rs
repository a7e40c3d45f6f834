//! Authorization end to end (issue 9): credentials, enrollment, scopes and limits,
//! through the real `octo` binary.

use octopus_tests::{wait_until, Octo, Value};

use crate::bin;
use crate::fleet::{http, http_raw, Fleet, T};

/// The JSON array in a raw HTTP body (the `http` helper reads objects only).
fn json_array(body: &str) -> Vec<Value> {
    let json = body
        .find('[')
        .zip(body.rfind(']'))
        .map(|(a, b)| &body[a..=b])
        .unwrap_or("[]");
    serde_json::from_str::<Value>(json)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Creates a token with these extra `octo token create` arguments; returns (id, text).
fn token(f: &Fleet, args: &[&str]) -> (String, String) {
    let mut all = vec!["token", "create", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = f.octo(&all);
    assert_eq!(code, 0, "creating a token {args:?}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

fn audit(f: &Fleet) -> Vec<Value> {
    let (st, body) = http_raw(
        &f.api,
        "GET",
        "/api/v1/audit?limit=1000",
        Some(&f.admin),
        "",
    );
    assert_eq!(st, 200, "{body}");
    json_array(&body)
}

fn run_as(f: &Fleet, token: &str, args: &[&str]) -> (i32, String, String) {
    crate::fleet::run_octo(&f.api, token, args)
}

/// An enroll token's id with a made-up secret is "who are you" (401), not "you may
/// not" (403): the secret is checked before the scope.
#[test]
fn auth_a_bogus_secret_is_401_even_for_an_enroll_token_id() {
    let f = Fleet::start(0);
    let id = f.enroll.split('_').nth(1).unwrap();
    let bogus = format!("octo_{id}_{}", "a".repeat(32));
    let (st, v) = http(&f.api, "GET", "/api/v1/agents", Some(&bogus), "");
    assert_eq!(st, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("secret"), "{v}");
    // With its real secret, the enroll token is authenticated but not allowed.
    let real = f.enroll.rsplit_once('.').unwrap().0;
    let (st, v) = http(&f.api, "GET", "/api/v1/agents", Some(real), "");
    assert_eq!(st, 403, "{v}");
}

/// `--one-time` holds for every scope: the second call with the token is refused.
#[test]
fn auth_one_time_tokens_work_once_in_every_scope() {
    let f = Fleet::start(0);
    for scope in ["read", "operator", "admin"] {
        let (_, once) = token(&f, &["--scope", scope, "--one-time"]);
        let (st, v) = http(&f.api, "GET", "/api/v1/info", Some(&once), "");
        assert_eq!(st, 200, "{scope}: {v}");
        let (st, v) = http(&f.api, "GET", "/api/v1/info", Some(&once), "");
        assert_eq!(st, 401, "{scope}: a one-time token worked twice: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("already been used"),
            "{v}"
        );
    }
}

/// A misspelt field is an error, not silently dropped (`"usr":"nobody"` used to run
/// the command as root).
#[test]
fn auth_unknown_json_fields_are_refused() {
    let f = Fleet::start(1);
    let task = r#"{"target":"host-1","command":"id -un","usr":"nobody"}"#;
    let (st, v) = http(&f.api, "POST", "/api/v1/tasks", Some(&f.admin), task);
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("usr"), "{v}");
    let tok = r#"{"scope":"read","one_tme":true}"#;
    let (st, v) = http(&f.api, "POST", "/api/v1/tokens", Some(&f.admin), tok);
    assert_eq!(st, 400, "{v}");
    let pool = r#"{"target":"host-1","kind":"fetch","dest":"/tmp/x",
        "pool":{"md5":"00000000000000000000000000000000","size":1,"name":"x","mode":420,"own":1}}"#;
    let (st, v) = http(&f.api, "POST", "/api/v1/tasks", Some(&f.admin), pool);
    assert_eq!(st, 400, "{v}");
    // Nothing was queued.
    let (st, body) = http_raw(&f.api, "GET", "/api/v1/tasks", Some(&f.admin), "");
    assert_eq!(st, 200);
    assert!(json_array(&body).is_empty(), "{body}");
}

/// Content in the center's store needs the operator scope, and every download is
/// audited, signed-URL downloads included.
#[test]
fn auth_content_downloads_need_operator_and_are_audited() {
    let f = Fleet::start(1);
    let secret = "DB_PASSWORD=hunter2\n";
    let (st, v) = http(&f.api, "PUT", "/api/v1/files", Some(&f.admin), secret);
    assert_eq!(st, 201, "{v}");
    let md5 = v["md5"].as_str().unwrap().to_string();
    let path = format!("/api/v1/files/{md5}");

    let (read_id, read) = token(&f, &["--scope", "read"]);
    let (st, body) = http_raw(&f.api, "GET", &path, Some(&read), "");
    assert_eq!(st, 403, "a read token downloaded content: {body}");
    assert!(!body.contains("hunter2"));
    let (op_id, op) = token(&f, &["--scope", "operator"]);
    let (st, body) = http_raw(&f.api, "GET", &path, Some(&op), "");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("hunter2"), "{body}");

    // An agent downloads it with a URL the center signed (a pool copy).
    let src = f.dir.path().join("secret.env");
    std::fs::write(&src, secret).unwrap();
    let dest = f.dir.path().join("out/secret.env");
    let (code, out, err) = f.octo(&[
        "cp",
        "--mkdir",
        "--mode",
        "0600",
        &src.display().to_string(),
        &format!("host-1:{}", dest.display()),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), secret);

    let log = audit(&f);
    let downloads: Vec<&Value> = log.iter().filter(|e| e["path"] == path).collect();
    let has = |token: &str, status: u64, detail: &str| {
        downloads
            .iter()
            .any(|e| e["token"] == token && e["status"] == status && e["detail"] == detail)
    };
    assert!(has(&read_id, 403, ""), "{downloads:?}");
    assert!(has(&op_id, 200, ""), "{downloads:?}");
    assert!(
        downloads
            .iter()
            .any(|e| e["detail"] == "signed URL" && e["status"] == 200 && e["method"] == "GET"),
        "the agent's signed download is not audited: {downloads:?}"
    );
}

/// Modes above 0o777 are refused unless asked for, and then only for an admin;
/// 4294967295 is no mode at all.
#[test]
fn auth_special_mode_bits_need_an_explicit_flag_and_the_admin_scope() {
    let f = Fleet::start(1);
    let (st, v) = http(
        &f.api,
        "PUT",
        "/api/v1/files",
        Some(&f.admin),
        "#!/bin/sh\nid\n",
    );
    assert_eq!(st, 201, "{v}");
    let md5 = v["md5"].as_str().unwrap().to_string();
    let dest = f.dir.path().join("bin");
    let body = |mode: u64, special: bool| {
        serde_json::json!({
            "target": "host-1", "kind": "fetch", "dest": format!("{}/", dest.display()),
            "mkdir": true, "mode": mode, "allow_special_mode": special,
            "pool": {"md5": md5, "size": 12, "name": "tool", "mode": 0o755},
        })
        .to_string()
    };
    let (st, v) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some(&f.admin),
        &body(4294967295, true),
    );
    assert_eq!(st, 400, "{v}");
    let (st, v) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some(&f.admin),
        &body(0o4777, false),
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("allow-special-mode"),
        "{v}"
    );
    let (_, op) = token(&f, &["--scope", "operator"]);
    let (st, v) = http(
        &f.api,
        "POST",
        "/api/v1/tasks",
        Some(&op),
        &body(0o4755, true),
    );
    assert_eq!(st, 403, "an operator made a setuid file: {v}");
    assert!(!dest.join("tool").exists());

    // The CLI says so too, and an admin who asks gets the bits.
    let src = f.dir.path().join("tool");
    std::fs::write(&src, "#!/bin/sh\nid\n").unwrap();
    let to = format!("host-1:{}/", dest.display());
    let (code, _, err) = f.octo(&[
        "cp",
        "--mkdir",
        "--mode",
        "4755",
        &src.display().to_string(),
        &to,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("setuid"), "{err}");
    let (code, out, err) = f.octo(&[
        "cp",
        "--mkdir",
        "--mode",
        "4755",
        "--allow-special-mode",
        &src.display().to_string(),
        &to,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dest.join("tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o4755);
}

/// A seed's ticket is a credential: a read token (or another operator) does not see
/// it in the task's output or its events.
#[test]
fn auth_a_seed_ticket_is_hidden_from_other_tokens() {
    let f = Fleet::start(2);
    let src = f.dir.path().join("src.bin");
    octopus_tests::write_random(&src, 64 << 10, 9);
    let to = format!("host-2:{}/copy/", f.dir.path().display());
    let from = format!("host-1:{}", src.display());
    let (code, out, err) = f.octo(&["cp", "--mkdir", &from, &to]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (_, body) = http_raw(&f.api, "GET", "/api/v1/tasks", Some(&f.admin), "");
    let seed = json_array(&body)
        .into_iter()
        .find(|t| t["summary"].as_str().unwrap_or("").starts_with("seed "))
        .unwrap_or_else(|| panic!("no seed task in {body}"));
    let id = seed["id"].as_u64().unwrap();
    let show = format!("/api/v1/tasks/{id}");
    let events = format!("/api/v1/tasks/{id}/events?after=0&wait=0");
    let (_, admin_view) = http_raw(&f.api, "GET", &show, Some(&f.admin), "");
    assert!(
        admin_view.contains("octo1"),
        "the admin sees the ticket: {admin_view}"
    );
    // With the ticket anyway, a bare `octo get` (no certificate from the center's CA)
    // is refused by the host's seed: the fleet's swarms admit only the fleet.
    let v: Value = serde_json::from_str(&admin_view).unwrap();
    let ticket = v["hosts"][0]["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(ticket.starts_with("octo1"), "{ticket}");
    let stolen = f.dir.path().join("stolen.bin");
    let stolen_s = stolen.display().to_string();
    let mut get = Octo::spawn(
        &bin(),
        "bare-get",
        f.dir.path(),
        &["get", "--json", "--linger", "0s", &ticket, &stolen_s],
        &[],
    );
    let st = get.wait(T);
    assert!(
        !st.success(),
        "a bare get fetched from a managed seed: {:?}",
        get.drain()
    );
    assert!(!stolen.exists());
    let (_, read) = token(&f, &["--scope", "read"]);
    let (_, op) = token(&f, &["--scope", "operator"]);
    for t in [&read, &op] {
        let (st, v) = http_raw(&f.api, "GET", &show, Some(t), "");
        assert_eq!(st, 200);
        assert!(!v.contains("octo1"), "the ticket leaked: {v}");
        let (st, v) = http_raw(&f.api, "GET", &events, Some(t), "");
        assert_eq!(st, 200);
        assert!(!v.contains("octo1"), "the ticket leaked in events: {v}");
        let (code, out, _) = run_as(&f, t, &["task", "show", &id.to_string(), "--json"]);
        assert_eq!(code, 0);
        assert!(!out.contains("octo1"), "{out}");
    }
    // Seeding a host path needs the admin scope (or --limit-kind seed).
    let (code, _, err) = run_as(&f, &op, &["cp", "--mkdir", &from, &to]);
    assert_ne!(code, 0);
    assert!(err.contains("admin"), "{err}");
    let (_, seeder) = token(&f, &["--scope", "operator", "--limit-kind", "seed,cp"]);
    let (code, out, err) = run_as(&f, &seeder, &["cp", "--mkdir", &from, &to]);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// Token limits: target, users and kinds, checked at task creation (403 naming the
/// limit) and shown in `token list`; root needs admin or an explicit allowance.
#[test]
fn auth_token_limits_and_root_need_admin() {
    let f = Fleet::start(2); // host-1 role=db, host-2 role=web
    let (id, web) = token(
        &f,
        &[
            "--scope",
            "operator",
            "--limit-target",
            "role=web",
            "--limit-user",
            "nobody",
            "--limit-kind",
            "exec",
        ],
    );
    let (code, _, err) = run_as(
        &f,
        &web,
        &["exec", "--user", "nobody", "host-1", "--", "true"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("403") && err.contains("--limit-target"),
        "{err}"
    );
    assert!(err.contains("host-1"), "{err}");
    let (code, _, err) = run_as(&f, &web, &["exec", "--user", "nobody", "all", "--", "true"]);
    assert_ne!(code, 0, "all reaches host-1 too");
    assert!(err.contains("--limit-target"), "{err}");
    let (code, out, err) = run_as(
        &f,
        &web,
        &["exec", "--user", "nobody", "role=web", "--", "id -un"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-2: nobody"), "{out}");
    let (code, _, err) = run_as(
        &f,
        &web,
        &["exec", "--user", "daemon", "host-2", "--", "true"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--limit-user"), "{err}");
    let (code, _, err) = run_as(&f, &web, &["exec", "host-2", "--", "true"]);
    assert_ne!(code, 0, "no --user is root");
    assert!(err.contains("--limit-user"), "{err}");
    let src = f.dir.path().join("f.txt");
    std::fs::write(&src, "x").unwrap();
    let to = format!("host-2:{}/lim/", f.dir.path().display());
    let (code, _, err) = run_as(
        &f,
        &web,
        &["cp", "--mkdir", &src.display().to_string(), &to],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--limit-kind"), "{err}");

    let (code, out, _) = f.octo(&["token", "list"]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(
        line.contains("target=role=web user=nobody kind=exec"),
        "{line}"
    );
    let (_, out, _) = f.octo(&["token", "list", "--json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    let t = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    assert_eq!(t["limits"]["target"], "role=web", "{t}");

    // Without limits, an operator is not root on every host...
    let (_, op) = token(&f, &["--scope", "operator"]);
    for args in [
        &["exec", "--user", "root", "host-2", "--", "id -un"][..],
        &["exec", "host-2", "--", "id -un"],
    ] {
        let (code, _, err) = run_as(&f, &op, args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains("admin"), "{err}");
    }
    // ... unless the token says so; an admin is.
    let (_, rooted) = token(&f, &["--scope", "operator", "--limit-user", "root,nobody"]);
    let (code, out, err) = run_as(
        &f,
        &rooted,
        &["exec", "--user", "root", "host-2", "--", "id -un"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-2: root"), "{out}");
    let (code, out, _) = f.octo(&["exec", "host-2", "--", "id -un"]);
    assert_eq!(code, 0);
    assert!(out.contains("host-2: root"), "{out}");
    // Limits are checked when the token is made.
    let (code, _, err) = f.octo(&[
        "token",
        "create",
        "--scope",
        "operator",
        "--limit-kind",
        "rm",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("rm"), "{err}");
}

/// An operator cancels only the tasks its token created; an admin any.
#[test]
fn auth_operators_cancel_only_their_own_tasks() {
    let f = Fleet::start(1);
    let (_, op) = token(&f, &["--scope", "operator", "--limit-user", "nobody"]);
    let task_id = |out: &str| -> String {
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| {
                (v["event"] == "created")
                    .then(|| v["id"].as_u64())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no task id in {out}"))
            .to_string()
    };
    let (code, out, err) = f.octo(&["exec", "--async", "--json", "host-1", "--", "sleep 30"]);
    assert_eq!(code, 0, "{err}");
    let admins = task_id(&out);
    let (code, _, err) = run_as(&f, &op, &["task", "cancel", &admins]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let (code, out, err) = run_as(
        &f,
        &op,
        &[
            "exec", "--async", "--json", "--user", "nobody", "host-1", "--", "sleep 30",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mine = task_id(&out);
    let (code, _, err) = run_as(&f, &op, &["task", "cancel", &mine]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = f.octo(&["task", "cancel", &admins]);
    assert_eq!(code, 0, "{err}");
}

fn sessions_refused(f: &Fleet) -> u64 {
    let (_, body) = http_raw(&f.api, "GET", "/api/v1/metrics", Some(&f.admin), "");
    body.lines()
        .find_map(|l| l.strip_prefix("octo_sessions_refused_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter in {body}"))
}

fn spawn_agent(
    f: &Fleet,
    log: &str,
    name: &str,
    data: &str,
    token_args: &[&str],
    env: &[(&str, &str)],
) -> Octo {
    let data = f.dir.path().join(data).display().to_string();
    let mut args = vec![
        "agent",
        "--center",
        &f.addr,
        "--data-dir",
        &data,
        "--name",
        name,
        "--json",
    ];
    args.extend_from_slice(token_args);
    Octo::spawn(&bin(), log, f.dir.path(), &args, env)
}

/// Enrolling as a name that is taken is refused (exit 3) until an admin approves
/// it; the approved newcomer revokes the old certificate; `agents rm` removes a host
/// and drops its session. The enroll token comes from the environment or a file.
#[test]
fn auth_enrollment_cannot_take_over_a_name() {
    let f = Fleet::start(1);
    // From the environment: refused, with its own exit code.
    let mut thief = spawn_agent(
        &f,
        "thief",
        "host-1",
        "thief-data",
        &[],
        &[("OCTO_ENROLL_TOKEN", &f.enroll)],
    );
    let st = thief.wait(T);
    assert_eq!(st.code(), Some(4), "{}", thief.stderr());
    let said = format!("{:?}", thief.drain());
    assert!(said.contains("already enrolled"), "{said}");
    assert!(wait_until(T, || f.online("host-1")));
    let (code, out, err) = f.octo(&["exec", "host-1", "--", "echo still-mine"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-1: still-mine"), "{out}");
    // It is listed for approval.
    let (code, out, _) = f.octo(&["agents", "approve", "--json"]);
    assert_eq!(code, 0);
    let pending: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pending[0]["name"], "host-1", "{pending}");

    // Approved once: the newcomer (token from a file) takes the name; the old
    // agent's certificate is revoked and its reconnects are refused.
    let (code, _, err) = f.octo(&["agents", "approve", "host-1"]);
    assert_eq!(code, 0, "{err}");
    let before = sessions_refused(&f);
    let token_file = f.dir.path().join("enroll.token");
    std::fs::write(&token_file, format!("{}\n", f.enroll)).unwrap();
    let tf = token_file.display().to_string();
    let mut new = spawn_agent(
        &f,
        "new-host-1",
        "host-1",
        "new-data",
        &["--token-file", &tf],
        &[],
    );
    new.wait_event("ready", T);
    assert!(
        wait_until(T, || sessions_refused(&f) > before),
        "the old certificate was not refused"
    );
    // host-1 is now the newcomer: its certificate is the one on record.
    let sum = std::process::Command::new("sha256sum")
        .arg(f.dir.path().join("new-data/agent.cert"))
        .output()
        .expect("sha256sum (coreutils) is needed");
    let new_fp = String::from_utf8_lossy(&sum.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(wait_until(T, || f.online("host-1")));
    let rec = f
        .agents_json()
        .into_iter()
        .find(|a| a["name"] == "host-1")
        .unwrap();
    assert_eq!(rec["fingerprint"], new_fp.as_str(), "{rec}");
    let (code, _, err) = f.octo(&["exec", "host-1", "--", "true"]);
    assert_eq!(code, 0, "{err}");
    // The approval was spent: a third enrollment is refused again.
    let mut third = spawn_agent(
        &f,
        "third",
        "host-1",
        "third-data",
        &["--token", &f.enroll],
        &[],
    );
    assert_eq!(third.wait(T).code(), Some(4), "{}", third.stderr());

    // Removed: gone from the inventory, session dropped, certificate refused.
    let before = sessions_refused(&f);
    let (code, _, err) = f.octo(&["agents", "rm", "host-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(f.agents_json().iter().all(|a| a["name"] != "host-1"));
    assert!(
        wait_until(T, || sessions_refused(&f) > before),
        "the removed host's certificate was not refused"
    );
    let (code, _, _) = f.octo(&["exec", "host-1", "--", "true"]);
    assert_ne!(code, 0);
    let log = audit(&f);
    assert!(log
        .iter()
        .any(|e| e["method"] == "DELETE" && e["path"] == "/api/v1/agents/host-1"));
    drop(new);
}
