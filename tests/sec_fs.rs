//! File-system safety of the agent and the center as root (issue 9, items 1, 2, 7):
//! planted links at every name a copy uses, private caches, content stores and data
//! directories. All through the real `octo` binary, with a real Unix user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use md5::{Digest, Md5};
use octopus_tests::{wait_until, Octo};
use octopus_transfer::manifest::{hex, BuildOptions, Manifest};

use crate::bin;
use crate::fleet::{run_octo, Fleet, T};

/// A real Unix user with a home directory of its own inside `base`; removed on drop.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl User {
    fn create(base: &Path, tag: &str) -> User {
        let name = format!("octo-fs{tag}-{}", std::process::id() % 100_000);
        let home = base.join(format!("home-{name}"));
        let st = Command::new("useradd")
            .args([
                "-M",
                "-d",
                &home.display().to_string(),
                "-s",
                "/bin/sh",
                &name,
            ])
            .status()
            .expect("running useradd (these tests run as root)");
        assert!(st.success(), "useradd {name} (these tests run as root)");
        std::fs::create_dir(&home).unwrap();
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        User {
            name,
            uid,
            gid,
            home,
        }
    }

    /// Plants a symlink as this user would: owned by them, in their directory.
    fn plant_link(&self, target: &Path, at: &Path) {
        std::os::unix::fs::symlink(target, at).unwrap();
        std::os::unix::fs::lchown(at, Some(self.uid), Some(self.gid)).unwrap();
    }

    fn plant_dir(&self, at: &Path) {
        std::fs::create_dir(at).unwrap();
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(at, Some(self.uid), Some(self.gid)).unwrap();
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A root-owned file outside the user's reach that a copy must never touch.
fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim.conf");
    std::fs::write(&v, b"root's own configuration\n").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o644)).unwrap();
    v
}

fn assert_victim_untouched(v: &Path) {
    let m = std::fs::symlink_metadata(v).unwrap();
    assert!(m.is_file());
    let now = std::fs::read(v).unwrap();
    assert!(
        now == b"root's own configuration\n",
        "the victim was overwritten through a planted link ({} bytes now)",
        now.len()
    );
    assert_eq!((m.uid(), m.gid()), (0, 0), "the victim was chowned");
    assert_eq!(m.mode() & 0o7777, 0o644, "the victim was chmodded");
}

/// `octo cp` with the fleet's admin token; returns (exit code, stdout, stderr).
fn cp(f: &Fleet, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["cp"];
    a.extend_from_slice(args);
    run_octo(&f.api, &f.admin, &a)
}

/// The copy either landed as a regular file owned by the user with the source's
/// bytes, or failed with a clear error; the victim is untouched either way.
fn check_outcome(code: i32, out: &str, err: &str, dest: &Path, src: &Path, user: &User, v: &Path) {
    assert_victim_untouched(v);
    if code == 0 {
        let m = std::fs::symlink_metadata(dest).unwrap();
        assert!(m.is_file(), "{} is not a regular file", dest.display());
        assert_eq!(std::fs::read(dest).unwrap(), std::fs::read(src).unwrap());
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid));
        assert_eq!(m.mode() & 0o7777, 0o640);
    } else {
        assert!(
            err.contains("symbolic link") || out.contains("symbolic link"),
            "not a clear error: {out}\n{err}"
        );
    }
}

#[test]
fn a_swarm_copy_with_owner_never_writes_or_chowns_through_planted_links() {
    let f = Fleet::start(1);
    let user = User::create(f.dir.path(), "s");
    let v = victim(f.dir.path());
    let src = f.dir.path().join("payload.bin");
    octopus_tests::write_random(&src, 3 << 20, 11);
    let dest = user.home.join("app.bin");
    // The staging names a copy ever used or could use, computed as the user can: the
    // content id is public (the source is a release), the destination is known.
    let m = Manifest::build(std::slice::from_ref(&src), &BuildOptions::default()).unwrap();
    let mut key = Md5::new();
    key.update(m.content_id().0);
    key.update(dest.as_os_str().as_encoded_bytes());
    let key = hex(key.finalize().as_slice());
    let old = user.home.join(format!(".octo-{}.partial", &key[..20]));
    user.plant_dir(&old);
    user.plant_link(&v, &old.join("f0"));
    user.plant_link(&v, &old.join("manifest.tmp"));
    user.plant_link(&v, &old.join("verified"));
    for guess in ["0000000000000000", "ffffffffffffffff"] {
        let d = user
            .home
            .join(format!(".octo-{}-{guess}.partial", &key[..20]));
        user.plant_dir(&d);
        user.plant_link(&v, &d.join("f0"));
        user.plant_link(&v, &d.join("verified"));
        user.plant_link(&v, &d.join("manifest"));
    }
    // And the destination itself.
    user.plant_link(&v, &dest);
    let (code, out, err) = cp(
        &f,
        &[
            "--owner",
            &user.name,
            "--mode",
            "0640",
            &src.display().to_string(),
            &format!("host-1:{}", dest.display()),
        ],
    );
    check_outcome(code, &out, &err, &dest, &src, &user, &v);
    assert_eq!(
        code, 0,
        "the copy should land beside the planted links: {out}\n{err}"
    );
    // The planted directories were left alone, and no staging area is left over.
    assert!(std::fs::symlink_metadata(old.join("f0"))
        .unwrap()
        .file_type()
        .is_symlink());
    let left: Vec<_> = std::fs::read_dir(&user.home)
        .unwrap()
        .flatten()
        .filter(|e| {
            let m = e.metadata().unwrap();
            m.uid() == 0 && e.file_name().to_string_lossy().starts_with(".octo-")
        })
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "root-owned leftovers: {left:?}");
}

#[test]
fn a_pool_copy_with_owner_never_writes_or_chowns_through_planted_links() {
    let f = Fleet::start(1);
    let user = User::create(f.dir.path(), "p");
    let v = victim(f.dir.path());
    let src = f.dir.path().join("app.conf");
    octopus_tests::write_random(&src, 100 << 10, 12);
    let dest = user.home.join("app.conf");
    // Temporary names an agent ever used beside a pool download: `.NAME.octo-PID.tmp`.
    let agent_pid = f.agents[0].1.pid();
    user.plant_link(
        &v,
        &user.home.join(format!(".app.conf.octo-{agent_pid}.tmp")),
    );
    // The second round is served from the agent's cache: the same care.
    for round in 0..2 {
        if round > 0 {
            std::fs::remove_file(&dest).unwrap();
        }
        user.plant_link(&v, &dest);
        let (code, out, err) = cp(
            &f,
            &[
                "--owner",
                &user.name,
                "--mode",
                "0640",
                &src.display().to_string(),
                &format!("host-1:{}", dest.display()),
            ],
        );
        check_outcome(code, &out, &err, &dest, &src, &user, &v);
        assert_eq!(code, 0, "round {round}: {out}\n{err}");
    }
}

/// Every directory under `root` is 0700 and every file 0600 (links are reported).
fn assert_private_tree(root: &Path) -> usize {
    let mut files = 0;
    let m = std::fs::symlink_metadata(root).unwrap();
    assert_eq!(
        m.mode() & 0o7777,
        0o700,
        "{} has mode {:o}",
        root.display(),
        m.mode() & 0o7777
    );
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            files += assert_private_tree(&p);
        } else {
            assert!(m.is_file(), "{} is not a plain file", p.display());
            assert_eq!(
                m.mode() & 0o7777,
                0o600,
                "{} has mode {:o}",
                p.display(),
                m.mode() & 0o7777
            );
            files += 1;
        }
    }
    files
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_secret_copied_with_mode_0600_is_private_in_the_cache_and_the_content_store() {
    let f = Fleet::start(1);
    // Only the data directories' own modes may protect them: open the way there.
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = f.dir.path().join("secret.env");
    std::fs::write(&secret, b"DB_PASSWORD=hunter2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out_dir = f.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let big = f.dir.path().join("big.bin");
    octopus_tests::write_random(&big, 3 << 20, 13);
    for (src, extra) in [(&secret, "0600"), (&big, "0644")] {
        let (code, out, err) = cp(
            &f,
            &[
                "--mode",
                extra,
                &src.display().to_string(),
                &format!("host-1:{}/", out_dir.display()),
            ],
        );
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let cache = f.dir.path().join("agent-host-1").join("cache");
    let content = f.dir.path().join("center-data").join("content");
    // The big file went by swarm and is cached in the background.
    assert!(
        wait_until(T, || files_under(&cache.join("objects")).len() >= 2),
        "the agent never cached both copies: {:?}",
        files_under(&cache)
    );
    assert!(assert_private_tree(&cache) >= 2);
    assert!(assert_private_tree(&content) >= 1);
    // And `nobody` cannot read any of it.
    for p in files_under(&cache)
        .iter()
        .chain(files_under(&content).iter())
    {
        let st = Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(p)
            .output()
            .expect("runuser");
        assert!(
            !st.status.success(),
            "nobody read {}: {}",
            p.display(),
            String::from_utf8_lossy(&st.stdout)
        );
    }
    // The destination has the mode the copy asked for.
    let m = std::fs::metadata(out_dir.join("secret.env")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
}

#[test]
fn data_directories_are_private_tightened_at_start_and_never_links() {
    let mut f = Fleet::start(1);
    // Something in the journal and results, and something in the cache.
    let (code, _, err) = f.octo(&["exec", "host-1", "--", "echo hi"]);
    assert_eq!(code, 0, "{err}");
    let src = f.dir.path().join("small.bin");
    octopus_tests::write_random(&src, 10 << 10, 14);
    let dest = f.dir.path().join("small.copy");
    let (code, _, err) = cp(
        &f,
        &[
            &src.display().to_string(),
            &format!("host-1:{}", dest.display()),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let center_data = f.dir.path().join("center-data");
    let agent_data = f.dir.path().join("agent-host-1");
    assert!(
        assert_private_tree(&center_data) >= 2,
        "center.redb and admin.token"
    );
    assert!(agent_data.join("agent.key").exists());
    assert!(assert_private_tree(&agent_data) >= 4);

    // A data directory left wide by an older version is tightened at start.
    f.agent("host-1").kill9();
    std::fs::set_permissions(&agent_data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["agent.cert", "ca.cert", "started.log"] {
        std::fs::set_permissions(
            agent_data.join(file),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let agent_args = |data: &Path, name: &str| -> Vec<String> {
        vec![
            "agent".into(),
            "--center".into(),
            f.addr.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--name".into(),
            name.into(),
            "--json".into(),
        ]
    };
    let args = agent_args(&agent_data, "host-1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut again = Octo::spawn(&bin(), "host-1b", f.dir.path(), &args, &[]);
    again.wait_event("ready", T);
    assert_private_tree(&agent_data);
    drop(again);

    // A data directory that is a link, or another user's, is refused with a reason.
    let link = f.dir.path().join("agent-link");
    std::os::unix::fs::symlink(&agent_data, &link).unwrap();
    let args = agent_args(&link, "host-1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut o = Octo::spawn(&bin(), "agent-link", f.dir.path(), &args, &[]);
    assert!(!o.wait(T).success());
    let said = format!("{:?}{}", o.drain().to_vec(), o.stderr());
    assert!(said.contains("symbolic link"), "{said}");

    let foreign = f.dir.path().join("foreign-center");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let mut o = Octo::spawn(
        &bin(),
        "center-foreign",
        f.dir.path(),
        &[
            "center",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &foreign.display().to_string(),
        ],
        &[],
    );
    assert!(!o.wait(T).success());
    let said = format!("{:?}{}", o.drain().to_vec(), o.stderr());
    assert!(said.contains("owned by uid 65534"), "{said}");
    assert!(std::fs::read_dir(&foreign).unwrap().next().is_none());
}

#[test]
fn a_pool_copy_onto_a_disk_that_fills_mid_write_fails_cleanly_and_the_rerun_completes() {
    // The pool path writes the destination as a stream: on a disk smaller than the file
    // the first bytes land and a later write fails.
    let f = Fleet::start(1);
    let src = f.dir.path().join("pkg.bin");
    octopus_tests::write_random(&src, 24 << 20, 15);
    let mnt = f.dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "octo-test"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(
        st.success(),
        "these tests run as root and need to mount a tmpfs"
    );
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let dest = mnt.join("pkg.bin");
    let args = [
        "--json",
        "--hot",
        &src.display().to_string(),
        &format!("host-1:{}", dest.display()),
    ];
    let (code, out, err) = cp(&f, &args);
    assert_ne!(code, 0, "{out}\n{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("No space left on device"), "{said}");
    // Nothing half-written: no destination and no temporary file.
    let left: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let st = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(st.success());
    let (code, out, err) = cp(&f, &args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(crate::md5_hex(&dest), crate::md5_hex(&src));
    // The verified download was kept (in the agent's cache): nothing moved again.
    let s = crate::fleet::summary(&out);
    let stdout = s["task"]["hosts"][0]["stdout"].as_str().unwrap_or_default();
    assert!(stdout.contains("received 0 bytes"), "{s}");
}
