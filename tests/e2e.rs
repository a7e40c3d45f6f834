//! End-to-end tests: the real `octo` binary, real processes, real QUIC on loopback.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use octopus_tests::{wait_until, write_random, Octo, Value};
use octopus_transfer::frame::{self, code, Frame, ALPN};
use octopus_transfer::manifest::{hex, md5_file, ContentId};
use octopus_transfer::ticket::Ticket;

mod control;
mod fleet;
mod multi;
mod sec_auth;
mod sec_caps;
mod sec_fs;
mod sec_run;
mod sec_tls;

const T: Duration = Duration::from_secs(60);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_octo"))
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn octo(&self, name: &str, args: &[&str]) -> Octo {
        Octo::spawn(&bin(), name, self.dir.path(), args, &[])
    }
    fn octo_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Octo {
        Octo::spawn(&bin(), name, self.dir.path(), args, env)
    }
    /// Start a sharer and return it with its ticket.
    fn share(&self, name: &str, extra: &[&str], paths: &[&Path]) -> (Octo, String) {
        let mut args = vec!["share", "--json", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let ps: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        args.extend(ps.iter().map(|s| s.as_str()));
        let mut o = self.octo(name, &args);
        let ready = o.wait_event("ready", T);
        let t = ready["ticket"].as_str().expect("ticket").to_string();
        (o, t)
    }
    fn get(&self, name: &str, ticket: &str, dest: &Path, extra: &[&str]) -> Octo {
        let d = dest.display().to_string();
        let mut args = vec!["get", "--json", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.push(ticket);
        args.push(&d);
        self.octo(name, &args)
    }
}

fn md5_hex(p: &Path) -> String {
    hex(&md5_file(p).expect("md5"))
}

fn done_md5s(done: &Value) -> Vec<(String, String)> {
    done["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["md5"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn share_and_get_a_tree_with_modes_symlinks_and_both_file_sizes() {
    let e = Env::new();
    let root = e.path("release");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc/empty")).unwrap();
    write_random(&root.join("bin/server"), (5 << 20) + 333, 1); // pieces + whole-file MD5
    write_random(&root.join("etc/app.conf"), 4000, 2); // one piece = whole-file MD5
    fs::write(root.join("etc/zero"), b"").unwrap();
    std::os::unix::fs::symlink("bin/server", root.join("current")).unwrap();
    fs::set_permissions(root.join("bin/server"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("etc/app.conf"), fs::Permissions::from_mode(0o600)).unwrap();
    let (_s, ticket) = e.share("share", &["--piece-size", "256KiB"], &[&root]);

    // cp semantics: DEST is an existing directory, so the tree lands in DEST/release.
    let out = e.path("out");
    fs::create_dir(&out).unwrap();
    let mut g = e.get("get", &ticket, &out, &["--linger", "0"]);
    let done = g.wait_event("done", T);
    assert!(g.wait(T).success());
    let got = out.join("release");
    for f in ["bin/server", "etc/app.conf"] {
        assert_eq!(md5_hex(&got.join(f)), md5_hex(&root.join(f)), "{f}");
    }
    let md5s = done_md5s(&done);
    assert!(md5s.contains(&(
        got.join("bin/server").display().to_string(),
        md5_hex(&root.join("bin/server"))
    )));
    assert_eq!(
        fs::metadata(got.join("bin/server"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        fs::metadata(got.join("etc/app.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::read_link(got.join("current")).unwrap(),
        PathBuf::from("bin/server")
    );
    assert!(got.join("etc/empty").is_dir());
    assert_eq!(fs::metadata(got.join("etc/zero")).unwrap().len(), 0);
    assert_eq!(done["bytes"].as_u64().unwrap(), (5 << 20) + 333 + 4000);
    // No staging area is left behind.
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);

    // cp semantics: DEST does not exist, so the root is renamed to DEST.
    let renamed = e.path("renamed");
    let mut g = e.get("get2", &ticket, &renamed, &["--linger", "0"]);
    g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(
        md5_hex(&renamed.join("bin/server")),
        md5_hex(&root.join("bin/server"))
    );
}

#[test]
fn peers_swarm_and_survive_the_sharer_dying() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 24 << 20, 3);
    let want = md5_hex(&src);
    let (mut s, ticket) = e.share("share", &["--piece-size", "64KiB"], &[&src]);
    // A first getter completes and stays as a peer.
    let mut g1 = e.get("g1", &ticket, &e.path("g1.bin"), &["--linger", "120s"]);
    g1.wait_event("done", T);
    // A slow second getter learns about g1 from the tracker, then the sharer dies.
    let g2_dest = e.path("g2.bin").display().to_string();
    let mut g2 = e.octo_env(
        "g2",
        &[
            "get",
            "--json",
            "--listen",
            "127.0.0.1:0",
            "--linger",
            "0",
            "--limit-down",
            "8MB",
            &ticket,
            &g2_dest,
        ],
        &[("RUST_LOG", "info,octopus_transfer::node=debug")],
    );
    let staging_has_pieces = || {
        fs::read_dir(e.dir.path()).unwrap().flatten().any(|d| {
            let v = d.path().join("verified");
            fs::read(v)
                .map(|b| b.iter().filter(|x| **x == 1).count() > 20)
                .unwrap_or(false)
        })
    };
    assert!(
        wait_until(T, staging_has_pieces),
        "g2 never made progress\n{}",
        g2.stderr()
    );
    // It must have met g1 through the tracker (announces come every 2 s) before the
    // sharer dies: two peers connected, the sharer and g1.
    assert!(
        wait_until(T, || g2.stderr().matches("peer connected").count() >= 2),
        "g2 never met g1\n{}",
        g2.stderr()
    );
    s.kill9();
    let done = g2.wait_event("done", T);
    assert!(g2.wait(T).success());
    assert_eq!(md5_hex(&e.path("g2.bin")), want);
    assert_eq!(done_md5s(&done)[0].1, want);
    g1.signal(libc::SIGTERM);
    assert!(g1.wait(T).success());
}

#[test]
fn a_getter_killed_mid_transfer_does_not_stop_the_others() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 16 << 20, 4);
    let want = md5_hex(&src);
    let (_s, ticket) = e.share(
        "share",
        &["--limit-up", "20MB", "--piece-size", "64KiB"],
        &[&src],
    );
    let mut gs: Vec<Octo> = (0..3)
        .map(|i| {
            e.get(
                &format!("g{i}"),
                &ticket,
                &e.path(&format!("g{i}.bin")),
                &["--linger", "30s"],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    gs[0].kill9();
    for (i, g) in gs.iter_mut().enumerate().skip(1) {
        g.wait_event("done", T);
        assert_eq!(md5_hex(&e.path(&format!("g{i}.bin"))), want);
    }
}

#[test]
fn a_peer_sending_corrupt_pieces_is_banned_and_the_content_still_arrives() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 8 << 20, 5);
    let want = md5_hex(&src);
    let (_s, ticket) = e.share(
        "share",
        &["--piece-size", "64KiB", "--limit-up", "4MB"],
        &[&src],
    );
    // The evil peer gets a good copy (fast, from a second honest sharer of the same
    // content id would need the same manifest; simpler: fetch it first) and then
    // corrupts everything it uploads.
    let mut evil = e.octo_env(
        "evil",
        &[
            "get",
            "--json",
            "--listen",
            "127.0.0.1:0",
            "--linger",
            "120s",
            &ticket,
            &e.path("evil.bin").display().to_string(),
        ],
        &[("OCTO_FAULT", "corrupt-uploads")],
    );
    evil.wait_event("done", T);
    let mut g = e.get("victim", &ticket, &e.path("victim.bin"), &["--linger", "0"]);
    let done = g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(md5_hex(&e.path("victim.bin")), want);
    assert!(done["corrupt_pieces"].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(done["banned_peers"].as_u64().unwrap(), 1, "{done}");
    assert!(g.stderr().contains("banned"), "{}", g.stderr());
}

#[test]
fn a_killed_get_resumes_without_refetching_verified_pieces() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    let size: u64 = 32 << 20;
    write_random(&src, size, 6);
    let (_s, ticket) = e.share("share", &["--piece-size", "256KiB"], &[&src]);
    let dest = e.path("copy.bin");
    let mut g = e.get(
        "first",
        &ticket,
        &dest,
        &["--linger", "0", "--limit-down", "8MB"],
    );
    let verified = |e: &Env| -> usize {
        fs::read_dir(e.dir.path())
            .unwrap()
            .flatten()
            .filter_map(|d| fs::read(d.path().join("verified")).ok())
            .map(|b| b.iter().filter(|x| **x == 1).count())
            .sum()
    };
    assert!(
        wait_until(T, || verified(&e) >= 40),
        "no progress\n{}",
        g.stderr()
    );
    g.kill9();
    let before = verified(&e) as u64 * (256 << 10);
    assert!(before < size);
    let mut g = e.get("second", &ticket, &dest, &["--linger", "0"]);
    let done = g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(md5_hex(&dest), md5_hex(&src));
    let received = done["bytes"].as_u64().unwrap();
    let resumed = done["resumed_bytes"].as_u64().unwrap();
    assert!(
        resumed >= before,
        "resumed {resumed} < verified before kill {before}"
    );
    // Every verified piece was kept: this run fetched only the rest (plus at most a
    // few endgame duplicates).
    assert!(
        received <= size - resumed + 4 * (256 << 10),
        "received {received}, resumed {resumed}"
    );
    assert!(
        received >= size - resumed,
        "received {received}, resumed {resumed}"
    );
}

#[test]
fn a_full_disk_is_a_clear_error_and_keeps_the_partial_state() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 24 << 20, 7);
    let (_s, ticket) = e.share("share", &[], &[&src]);
    let mnt = e.path("small");
    fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "octo-test",
            &mnt.display().to_string(),
        ])
        .status()
        .expect("mount");
    assert!(
        st.success(),
        "these tests run as root and need to mount a small tmpfs"
    );
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let mut g = e.get("get", &ticket, &mnt.join("pkg.bin"), &["--linger", "0"]);
    let err = g.wait_event("error", T);
    assert!(!g.wait(T).success());
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("not enough disk space"), "{msg}");
    // The staging area (manifest and record) is kept for a later resume.
    let staging: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .flatten()
        .map(|d| d.file_name())
        .collect();
    assert_eq!(staging.len(), 1, "{staging:?}");
    assert!(staging[0].to_string_lossy().starts_with(".octo-"));
    assert!(mnt.join(&staging[0]).join("manifest").exists());
    // Nothing half-written at the destination.
    assert!(!mnt.join("pkg.bin").exists());
    // Once there is room, a rerun picks the staging area up and completes.
    let st = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", &mnt.display().to_string()])
        .status()
        .expect("mount");
    assert!(st.success(), "remounting the tmpfs bigger");
    let mut g = e.get("again", &ticket, &mnt.join("pkg.bin"), &["--linger", "0"]);
    g.wait_event("done", T);
    assert!(g.wait(T).success(), "{}", g.stderr());
    assert_eq!(md5_hex(&mnt.join("pkg.bin")), md5_hex(&src));
    assert_eq!(
        fs::read_dir(&mnt).unwrap().count(),
        1,
        "staging left behind"
    );
}

/// Mounts a tmpfs of `size` on `mnt` (these tests run as root); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(mnt: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(mnt).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "octo-test"])
            .arg(mnt)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "these tests run as root and need to mount a small tmpfs"
        );
        Tmpfs(mnt.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_disk_that_fills_up_mid_transfer_does_not_break_the_get() {
    // Space for the whole content is reserved (fallocate) before the first piece is
    // written, so another writer filling the disk mid-transfer cannot fail it.
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 24 << 20, 8);
    let (_s, ticket) = e.share("share", &["--piece-size", "256KiB"], &[&src]);
    let mnt = e.path("disk");
    let _t = Tmpfs::mount(&mnt, "32m");
    let dest = mnt.join("pkg.bin");
    let mut g = e.get(
        "get",
        &ticket,
        &dest,
        &["--linger", "0", "--limit-down", "6MB"],
    );
    let verified = || -> usize {
        fs::read_dir(&mnt)
            .unwrap()
            .flatten()
            .filter_map(|d| fs::read(d.path().join("verified")).ok())
            .map(|b| b.iter().filter(|x| **x == 1).count())
            .sum()
    };
    assert!(
        wait_until(T, || verified() >= 8),
        "no progress\n{}",
        g.stderr()
    );
    fill_up(&mnt.join("filler"));
    assert!(
        verified() < 96,
        "the transfer ended before the disk was full"
    );
    g.wait_event("done", T);
    assert!(g.wait(T).success(), "{}", g.stderr());
    assert_eq!(md5_hex(&dest), md5_hex(&src));
}

#[test]
fn bad_tickets_and_paths_give_clear_errors() {
    let e = Env::new();
    let mut g = e.get("badticket", "octo1notaticket", &e.path("x"), &[]);
    let err = g.wait_event("error", T);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("reading the ticket"),
        "{err}"
    );
    assert!(!g.wait(T).success());

    let mut s = e.octo("badpath", &["share", "--json", "/no/such/path"]);
    let err = s.wait_event("error", T);
    assert!(
        err["message"].as_str().unwrap().contains("/no/such/path"),
        "{err}"
    );
    assert!(!s.wait(T).success());
}

/// Malformed input from a raw QUIC client: each bad connection is closed with a
/// reason, and the sharer keeps serving an honest getter afterwards.
#[test]
fn bad_connections_are_closed_and_the_node_keeps_serving() {
    let e = Env::new();
    let src = e.path("pkg.bin");
    write_random(&src, 3 << 20, 8);
    let (s, ticket) = e.share("share", &[], &[&src]);
    let t = Ticket::decode(&ticket).unwrap();
    let addr = *t.addrs.iter().find(|a| a.ip().is_loopback()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use octopus_transfer::node::raw_connect;
        // Wrong ALPN: the TLS handshake itself fails.
        assert!(raw_connect(addr, t.fingerprint(), b"http/1.1")
            .await
            .is_err());
        // Wrong fingerprint pinned: we refuse the server.
        let mut bad_fp = t.fingerprint();
        bad_fp.0[0] ^= 1;
        assert!(raw_connect(addr, bad_fp, ALPN).await.is_err());

        let closed_with = |conn: quinn::Connection| async move {
            match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
                Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                    (c.error_code.into_inner() as u32, c.reason.to_vec())
                }
                other => panic!("connection not closed by the application: {other:?}"),
            }
        };
        // Unknown content id.
        let conn = raw_connect(addr, t.fingerprint(), ALPN).await.unwrap();
        let (mut tx, _rx) = conn.open_bi().await.unwrap();
        tx.write_all(&frame::encode(&Frame::Hello {
            content: ContentId([0xab; 16]),
            want_manifest: true,
        }))
        .await
        .unwrap();
        assert_eq!(closed_with(conn).await.0, code::UNKNOWN_CONTENT);
        // A forged length prefix.
        let conn = raw_connect(addr, t.fingerprint(), ALPN).await.unwrap();
        let (mut tx, _rx) = conn.open_bi().await.unwrap();
        tx.write_all(&[0xff, 0xff, 0xff, 0xf0]).await.unwrap();
        assert_eq!(closed_with(conn).await.0, code::PROTOCOL);
        // Garbage after a valid hello.
        let conn = raw_connect(addr, t.fingerprint(), ALPN).await.unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        tx.write_all(&frame::encode(&Frame::Hello {
            content: t.content,
            want_manifest: false,
        }))
        .await
        .unwrap();
        let mut welcome = [0u8; 5];
        rx.read_exact(&mut welcome).await.unwrap();
        tx.write_all(&[0, 0, 0, 3, 0xee, 0xee, 0xee]).await.unwrap();
        assert_eq!(closed_with(conn).await.0, code::PROTOCOL);
        // A bogus piece stream.
        let conn = raw_connect(addr, t.fingerprint(), ALPN).await.unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        tx.write_all(&frame::encode(&Frame::Hello {
            content: t.content,
            want_manifest: false,
        }))
        .await
        .unwrap();
        rx.read_exact(&mut welcome).await.unwrap();
        let mut u = conn.open_uni().await.unwrap();
        u.write_all(&[9u8; 25]).await.unwrap();
        u.finish().unwrap();
        assert_eq!(closed_with(conn).await.0, code::PROTOCOL);
    });
    assert!(s.stderr().contains("unknown content"), "{}", s.stderr());
    assert!(
        s.stderr().contains("malformed frame") || s.stderr().contains("exceeds the cap"),
        "{}",
        s.stderr()
    );
    // The node still serves an honest getter.
    let mut g = e.get("honest", &ticket, &e.path("copy.bin"), &["--linger", "0"]);
    g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(md5_hex(&e.path("copy.bin")), md5_hex(&src));
}

#[test]
fn a_repeated_get_moves_no_bytes_and_an_update_only_its_changed_pieces() {
    let e = Env::new();
    let src = e.path("app.bin");
    write_random(&src, 8 << 20, 21);
    let dest = e.path("copy.bin");
    let (mut s, ticket) = e.share("share", &["--piece-size", "256KiB"], &[&src]);
    let mut g = e.get("g1", &ticket, &dest, &["--linger", "0"]);
    let d1 = g.wait_event("done", T);
    assert_eq!(d1["bytes"], 8 << 20);
    assert!(g.wait(T).success());
    // The same content again: everything is taken from the destination.
    let mut g = e.get("g2", &ticket, &dest, &["--linger", "0"]);
    let d2 = g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(d2["bytes"], 0, "{d2}");
    assert_eq!(d2["resumed_bytes"], 8 << 20, "{d2}");
    s.kill9();
    // A new version with one changed piece: only that piece travels.
    let mut data = fs::read(&src).unwrap();
    data[3 << 20] ^= 0xff;
    fs::write(&src, &data).unwrap();
    let want = md5_hex(&src);
    let (mut s, ticket) = e.share("share2", &["--piece-size", "256KiB"], &[&src]);
    let mut g = e.get("g3", &ticket, &dest, &["--linger", "0"]);
    let d3 = g.wait_event("done", T);
    assert!(g.wait(T).success());
    assert_eq!(d3["bytes"], 256 << 10, "{d3}");
    assert_eq!(md5_hex(&dest), want);
    s.kill9();
}
