//! End-to-end tests of the API's transport: HTTPS from the center's own CA (curl with
//! `--cacert`), the CLI's CA pinning and its refusal of plain HTTP off loopback, and
//! the HTTP servers' connection limits (idle and slow-header sockets are closed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use octopus_tests::{Octo, Value};

use crate::bin;
use crate::fleet::{self, run_octo, Fleet, T};

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs curl (apt-get install curl): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The center serves HTTPS by default and publishes its CA as `DATA_DIR/ca.pem`;
/// real curl drives the API with `--cacert` (by IP and by `localhost`), and without
/// the CA it refuses the certificate.
#[test]
fn curl_drives_the_https_api_with_the_ca_pem_and_fails_without_it() {
    let f = Fleet::start(1);
    let ca = f.dir.path().join("center-data/ca.pem");
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "ca.pem is private like the whole data directory, and only the certificate"
    );
    assert!(!pem.contains("PRIVATE"), "ca.pem must not hold a key");
    assert!(f.api.starts_with("https://"), "{}", f.api);

    let auth = format!("Authorization: Bearer {}", f.admin);
    let ca_s = ca.display().to_string();
    for base in [f.api.clone(), f.api.replace("127.0.0.1", "localhost")] {
        let url = format!("{base}/api/v1/agents");
        let (code, out, err) = curl(&["-sS", "--fail", "--cacert", &ca_s, "-H", &auth, &url]);
        assert_eq!(code, 0, "curl --cacert {url}: {err}");
        let agents: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(agents[0]["name"], "host-1", "{out}");
    }
    // A write through curl too: a read token, then used.
    let url = format!("{}/api/v1/tokens", f.api);
    let (code, out, err) = curl(&[
        "-sS",
        "--fail",
        "--cacert",
        &ca_s,
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"scope":"read"}"#,
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    let read: Value = serde_json::from_str(&out).unwrap();
    let read = read["token"].as_str().unwrap().to_string();
    let (code, _, err) = curl(&[
        "-sS",
        "--fail",
        "--cacert",
        &ca_s,
        "-H",
        &format!("Authorization: Bearer {read}"),
        &format!("{}/api/v1/info", f.api),
    ]);
    assert_eq!(code, 0, "{err}");

    // Without the CA, curl cannot verify the center (60: peer certificate).
    let (code, out, err) = curl(&["-sS", "-H", &auth, &format!("{}/api/v1/agents", f.api)]);
    assert_eq!(
        code, 60,
        "curl without --cacert must fail verification: {out} {err}"
    );
    // Another center's CA does not verify it either.
    let other = tempfile::tempdir().unwrap();
    let (_c2, _api2, _, _) = fleet::start_center(other.path(), "127.0.0.1:0", "center-2");
    let other_ca = other
        .path()
        .join("center-data/ca.pem")
        .display()
        .to_string();
    let (code, _, err) = curl(&[
        "-sS",
        "--cacert",
        &other_ca,
        "-H",
        &auth,
        &format!("{}/api/v1/agents", f.api),
    ]);
    assert_eq!(code, 60, "a foreign CA must not verify the center: {err}");
    // And the port speaks no plain HTTP: no answer comes back to a cleartext request.
    let (code, out, _) = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &auth,
        &format!("{}/api/v1/agents", f.api.replace("https://", "http://")),
    ]);
    assert!(
        code != 0 && out == "000",
        "plain HTTP got an answer: {code} {out}"
    );
}

/// The CLI pins the CA: with `--ca`/`OCTO_CA` of another center, or a token carrying
/// another CA's fingerprint, it refuses the center with a message naming the pin and
/// exit status 3; with the right CA file an old-form token (no fingerprint) works.
#[test]
fn the_cli_refuses_a_center_its_pinned_ca_did_not_issue() {
    let f = Fleet::start(0);
    let other = tempfile::tempdir().unwrap();
    let (_c2, api2, _, admin2) = fleet::start_center(other.path(), "127.0.0.1:0", "center-2");
    let own_ca = f.dir.path().join("center-data/ca.pem");
    let other_ca = other.path().join("center-data/ca.pem");
    let bare = f.admin.rsplit_once('.').unwrap().0.to_string();
    let cli = |token: &str, extra: &[&str], env: &[(&str, &Path)]| {
        let mut c = Command::new(bin());
        c.arg("agents")
            .args(extra)
            .env("OCTO_CENTER", &f.api)
            .env("OCTO_TOKEN", token)
            .env("HOME", f.dir.path())
            .env_remove("OCTO_CA")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The admin token carries this center's CA fingerprint: nothing else is needed.
    let (code, err) = cli(&f.admin, &[], &[]);
    assert_eq!(code, 0, "{err}");
    // The old form (no fingerprint) with the CA file, by flag and by environment.
    let own = own_ca.display().to_string();
    let (code, err) = cli(&bare, &["--ca", &own], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = cli(&bare, &[], &[("OCTO_CA", &own_ca)]);
    assert_eq!(code, 0, "{err}");
    // ... and `ca = FILE` in the config file.
    let cfg = f.dir.path().join(".config/octo");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config"), format!("ca = {own}\n")).unwrap();
    let (code, err) = cli(&bare, &[], &[]);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(cfg.join("config")).unwrap();
    // No CA at all: a clear error saying how to give one.
    let (code, err) = cli(&bare, &[], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--ca FILE"), "{err}");

    // Another center's CA file: refused, naming the file, exit 3.
    let other_s = other_ca.display().to_string();
    let (code, err) = cli(&f.admin, &["--ca", &other_s], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("is not verified by the CA in") && err.contains(&other_s),
        "{err}"
    );
    // A token carrying another CA's fingerprint: refused, naming the fingerprint.
    let (code, err) = cli(&admin2, &[], &[]);
    assert_eq!(code, 3, "{err}");
    let fp2 = admin2.rsplit_once('.').unwrap().1;
    assert!(
        err.contains(fp2) && err.contains("carried by the token"),
        "{err}"
    );
    // That token is fine at its own center.
    let (code, _, err) = run_octo(&api2, &admin2, &["agents"]);
    assert_eq!(code, 0, "{err}");
}

/// A token never crosses plain HTTP to another host: the CLI refuses an `http://`
/// center that is not loopback before connecting, unless `--insecure-http`. Run in a
/// network namespace of its own, where 192.0.2.10 is a local, non-loopback address
/// with a listener that records whatever reaches it.
#[test]
fn the_cli_never_sends_a_token_over_plain_http_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("got");
    let ready = dir.path().join("ready");
    let token = "octo_aaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let listener = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('192.0.2.10', 18080)); s.listen(8); s.settimeout(30)\n\
         open('{ready}', 'w').close()\n\
         out = open('{got}', 'ab')\n\
         while True:\n\
         \x20   try:\n\
         \x20       c, _ = s.accept()\n\
         \x20   except Exception:\n\
         \x20       break\n\
         \x20   c.settimeout(5)\n\
         \x20   try:\n\
         \x20       out.write(c.recv(65536)); out.flush()\n\
         \x20   except Exception:\n\
         \x20       pass\n\
         \x20   c.close()\n",
        ready = ready.display(),
        got = got.display()
    );
    std::fs::write(dir.path().join("listen.py"), listener).unwrap();
    let octo = bin().display().to_string();
    let script = format!(
        "set -e\n\
         ip link set lo up\n\
         ip addr add 192.0.2.10/32 dev lo\n\
         python3 {d}/listen.py & L=$!\n\
         for i in $(seq 200); do [ -e {ready} ] && break; sleep 0.05; done\n\
         set +e\n\
         OCTO_TOKEN={token} {octo} agents --center http://192.0.2.10:18080 2>{d}/refused.err; echo $? >{d}/refused.code\n\
         OCTO_TOKEN={token} {octo} agents --center http://192.0.2.10:18080 --insecure-http 2>{d}/insecure.err; echo $? >{d}/insecure.code\n\
         kill $L; wait $L 2>/dev/null; true\n",
        d = dir.path().display(),
        ready = ready.display(),
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .expect("this test needs unshare (util-linux) and root");
    assert!(
        out.status.success(),
        "the namespace script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
    assert!(
        ready.exists(),
        "the listener never started: {}",
        read("refused.err")
    );
    let refused = read("refused.err");
    assert_ne!(read("refused.code").trim(), "0", "{refused}");
    assert!(
        refused.contains("refusing to send the token over plain HTTP")
            && refused.contains("--insecure-http"),
        "{refused}"
    );
    // With --insecure-http it does go out (so the listener would have seen a leak):
    // exactly one request reached it, from the second run.
    let seen = std::fs::read(&got).unwrap_or_default();
    let seen = String::from_utf8_lossy(&seen);
    assert_eq!(
        seen.matches(token).count(),
        1,
        "only the --insecure-http run may send the token: {seen:?}\n{}",
        read("insecure.err")
    );
}

/// Idle and slow-header connections are closed, and more of them than the cap (and
/// than the center's descriptor limit) do not stop the API: the center runs with 64
/// descriptors and a cap of 16 connections while 80 idle sockets and 6 slow-header
/// TLS connections hang on it.
#[test]
fn idle_and_slow_header_connections_are_closed_and_the_api_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("center-data");
    let data_s = data.display().to_string();
    let octo = bin().display().to_string();
    let mut c = Octo::spawn(
        Path::new("prlimit"),
        "center",
        dir.path(),
        &[
            "--nofile=64:64",
            &octo,
            "center",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_s,
            "--max-connections",
            "16",
            "--header-timeout",
            "2s",
            "--json",
        ],
        &[],
    );
    let ready = c.wait_event("ready", T);
    let api = ready["api"].as_str().unwrap().to_string();
    fleet::record_ca(&api, &data.join("ca.pem"));
    let addr = api.trim_start_matches("https://").to_string();
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ca_pem = std::fs::read(data.join("ca.pem")).unwrap();

    // Slow headers: a TLS connection that sends half a request head, then one byte a
    // second. Each thread reports whether the server closed it.
    let mut slow = Vec::new();
    for _ in 0..6 {
        let mut s = fleet::tls_connect(&addr, &ca_pem);
        write!(s, "GET /api/v1/info HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").unwrap();
        s.flush().unwrap();
        slow.push(std::thread::spawn(move || {
            let start = Instant::now();
            s.sock
                .set_read_timeout(Some(Duration::from_millis(1000)))
                .unwrap();
            let mut b = [0u8; 256];
            while start.elapsed() < Duration::from_secs(90) {
                if s.write_all(b"a").and_then(|_| s.flush()).is_err() {
                    return true;
                }
                match s.read(&mut b) {
                    Ok(0) => return true,
                    Ok(_) => return true, // an error answer (408) then close counts too
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return true,
                }
            }
            false
        }));
    }
    // Idle sockets: connected, never a byte. More than the cap and the fd limit.
    let idle: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();

    // The API still answers (the CLI waits its turn behind the idle sockets).
    let (code, out, err) = run_octo(&api, &admin, &["agents", "--json"]);
    assert_eq!(
        code,
        0,
        "the API stopped answering: {out}\n{err}\n{}",
        c.stderr()
    );

    // Every idle socket is closed by the server: a read returns EOF (or a reset).
    for (i, mut s) in idle.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("idle socket {i} got {n} bytes instead of a close"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("idle socket {i} was never closed by the center: {e}"),
        }
    }
    for (i, t) in slow.into_iter().enumerate() {
        assert!(
            t.join().unwrap(),
            "slow-header connection {i} was never closed"
        );
    }
    // And afterwards the API answers as usual.
    let (code, _, err) = run_octo(&api, &admin, &["agents"]);
    assert_eq!(code, 0, "{err}");
}

/// Plain HTTP only when asked: `octo center --insecure-http` serves `http://`, says so
/// loudly, and the CLI reaches it on loopback.
#[test]
fn insecure_http_is_explicit_and_loud() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("center-data");
    let data_s = data.display().to_string();
    let mut c = Octo::spawn(
        &bin(),
        "center",
        dir.path(),
        &[
            "center",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_s,
            "--insecure-http",
            "--json",
        ],
        &[],
    );
    let ready = c.wait_event("ready", T);
    let api = ready["api"].as_str().unwrap().to_string();
    assert!(api.starts_with("http://"), "{api}");
    assert!(
        octopus_tests::wait_until(T, || c.stderr().contains("PLAIN HTTP")),
        "no warning: {}",
        c.stderr()
    );
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let (code, _, err) = run_octo(&api, admin.trim(), &["agents"]);
    assert_eq!(code, 0, "{err}");
}
