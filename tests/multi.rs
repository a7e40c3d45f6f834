//! End-to-end tests of several centers sharing one fleet through a real ZooKeeper
//! ensemble (Debian's `zookeeper` package, three nodes on loopback, started and
//! stopped by the test). If ZooKeeper cannot start, the test fails and says why.

use std::path::Path;
use std::time::{Duration, Instant};

use octopus_center::zk::testing::ZkEnsemble;
use octopus_tests::{wait_until, Octo, Value};

use crate::bin;
use crate::fleet::{run_octo, summary};

const T: Duration = Duration::from_secs(30);

/// Starts `octo center --registry URL`; returns it and its API URL.
fn center(dir: &Path, name: &str, registry: &str) -> (Octo, String) {
    let data = dir.join(name);
    let mut c = Octo::spawn(
        &bin(),
        name,
        dir,
        &[
            "center",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--heartbeat",
            "500ms",
            "--registry",
            registry,
            "--json",
        ],
        &[],
    );
    let ready = c.wait_event("ready", T);
    let api = ready["api"].as_str().unwrap().to_string();
    crate::fleet::record_ca(&api, &data.join("ca.pem"));
    (c, api)
}

use crate::fleet::agents_json as agents;

/// Two centers on one ZooKeeper ensemble: tokens and the inventory agree, an agent
/// connected to center A runs a task created through center B, and when A is killed
/// its agents reconnect to B (which they learned of from the registry) and nothing is
/// lost or run twice. Then a ZooKeeper node dies and the fleet goes on.
#[test]
fn two_centers_share_one_fleet_and_agents_fail_over() {
    let mut zk = ZkEnsemble::start()
        .unwrap_or_else(|e| panic!("this test needs a real ZooKeeper ensemble: {e}"));
    let registry = zk.url("/octo-e2e");
    let dir = tempfile::tempdir().unwrap();
    let (mut a, api_a) = center(dir.path(), "center-a", &registry);
    let admin = std::fs::read_to_string(dir.path().join("center-a/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let (_b, api_b) = center(dir.path(), "center-b", &registry);
    assert!(
        !dir.path().join("center-b/admin.token").exists(),
        "the second center must find the fleet's admin token, not mint another"
    );

    // A token minted through A works at B.
    let (code, enroll, err) = run_octo(
        &api_a,
        &admin,
        &["token", "create", "--scope", "enroll", "--ttl", "1h"],
    );
    assert_eq!(code, 0, "{err}");
    let enroll = enroll.trim().to_string();
    let (code, _, err) = run_octo(&api_b, &admin, &["token", "list"]);
    assert_eq!(code, 0, "B refuses A's admin token: {err}");

    // Two agents enroll and connect at A only.
    let addr_a = api_a.trim_start_matches("https://").to_string();
    let mut fleet = Vec::new();
    for i in 1..=2 {
        let name = format!("host-{i}");
        let data = dir.path().join(format!("agent-{name}"));
        let args = [
            "agent",
            "--center",
            &addr_a,
            "--token",
            &enroll,
            "--data-dir",
            &data.display().to_string(),
            "--name",
            &name,
            "--json",
        ];
        let mut ag = Octo::spawn(&bin(), &name, dir.path(), &args, &[]);
        ag.wait_event("ready", T);
        fleet.push(ag);
    }
    // B sees them online (inventory in ZooKeeper, presence from the registry).
    assert!(
        wait_until(T, || agents(&api_b, &admin)
            .iter()
            .filter(|a| a["status"] == "online")
            .count()
            == 2),
        "B does not see A's agents: {:?}",
        agents(&api_b, &admin)
    );

    // A task created through B runs on agents connected to A.
    let marker = |h: &str| dir.path().join(format!("ran-{h}"));
    let cmd = |h: &str, tag: &str| format!("echo {tag} >> {}", marker(h).display());
    for h in ["host-1", "host-2"] {
        let (code, out, err) = run_octo(
            &api_b,
            &admin,
            &["exec", "--json", h, "--", &cmd(h, "first")],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(summary(&out)["ok"], 1, "{out}");
    }

    // Copies through B reach agents connected to A: a small file through the pool
    // (uploaded to B, fetched from B's URL), and an --async copy seeded by B (whose
    // ticket A hands out from the shared store).
    let small = dir.path().join("app.conf");
    octopus_tests::write_random(&small, 100 << 10, 4);
    let (code, out, err) = run_octo(
        &api_b,
        &admin,
        &[
            "cp",
            "--json",
            "--mkdir",
            &small.display().to_string(),
            &format!("host-1:{}/out-1/", dir.path().display()),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        crate::md5_hex(&dir.path().join("out-1/app.conf")),
        crate::md5_hex(&small)
    );
    let big = dir.path().join("pkg.bin");
    octopus_tests::write_random(&big, 3 << 20, 5);
    let (code, out, err) = run_octo(
        &api_b,
        &admin,
        &[
            "cp",
            "--async",
            "--mkdir",
            &big.display().to_string(),
            &format!("host-2:{}/out-2/", dir.path().display()),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let cp_id = out.trim().to_string();
    let (code, out, err) = run_octo(&api_b, &admin, &["task", "wait", &cp_id, "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        crate::md5_hex(&dir.path().join("out-2/pkg.bin")),
        crate::md5_hex(&big)
    );

    // Kill A. Its agents learned of B in their welcome and reconnect there.
    a.kill9();
    let killed = Instant::now();
    // A task created through B meanwhile is queued and runs once they are back.
    let (code, out, err) = run_octo(
        &api_b,
        &admin,
        &[
            "exec",
            "--json",
            "--async",
            "host-1",
            "--",
            &cmd("host-1", "second"),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let id = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["id"].as_u64())
        .unwrap_or_else(|| panic!("no task id in {out}"));
    let (code, out, err) = run_octo(&api_b, &admin, &["task", "wait", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary(&out)["ok"], 1, "{out}");
    let back = killed.elapsed();
    eprintln!("host-1 ran a task through B {back:?} after A was killed");
    // The requirement: a killed center's agents are back at another within 10 s
    // (the QUIC idle timeout, 8 s, plus the reconnect backoff).
    assert!(
        back < Duration::from_secs(10),
        "host-1 took {back:?} to run a task through B after A died (the requirement is 10 s)"
    );
    assert!(
        wait_until(T, || agents(&api_b, &admin).iter().all(|a| a["status"]
            == "online"
            && a["center"] == addr_a_to_b(&api_b))),
        "the agents did not all move to B: {:?}",
        agents(&api_b, &admin)
    );

    // A ZooKeeper node dies (the leader); the fleet goes on.
    let leader = zk.leader().expect("the ensemble has a leader");
    zk.stop(leader);
    let (code, out, err) = run_octo(
        &api_b,
        &admin,
        &["exec", "--json", "host-2", "--", &cmd("host-2", "third")],
    );
    assert_eq!(
        code, 0,
        "after losing ZooKeeper node {leader}: {out}\n{err}"
    );

    // Nothing ran twice, nothing was lost.
    assert_eq!(
        std::fs::read_to_string(marker("host-1")).unwrap(),
        "first\nsecond\n"
    );
    assert_eq!(
        std::fs::read_to_string(marker("host-2")).unwrap(),
        "first\nthird\n"
    );
}

/// The registry id of the center whose API is `api` (its agents' address, `_` for `:`).
fn addr_a_to_b(api: &str) -> String {
    api.trim_start_matches("https://").replace(':', "_")
}
