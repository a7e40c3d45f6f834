//! [`ZkStore`] against a real ZooKeeper server: the shared conformance suite (the
//! same cases `RedbStore` passes), then what only a shared store has: several
//! instances ("centers") on one namespace.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use zookeeper_client as zk;

use super::store::{ZkStore, ZkStoreOptions, OUTPUT_MAX};
use super::testing::ZkServer;
use super::ZkUrl;
use crate::store::conformance::{self, host, new_task, ok, token};
use crate::store::{HostState, Store, StoreError, TaskState, TokenUseError};

fn server() -> ZkServer {
    ZkServer::start().unwrap_or_else(|e| panic!("cannot start a ZooKeeper server: {e}"))
}

fn open(zk: &ZkServer, chroot: &str) -> ZkStore {
    let url = ZkUrl::parse(&zk.url(chroot)).unwrap();
    ZkStore::open(&url, ZkStoreOptions::default())
        .unwrap_or_else(|e| panic!("opening the store at {url}: {e}"))
}

fn timed(name: &str, f: impl FnOnce()) {
    let start = Instant::now();
    f();
    eprintln!("{name}: ok in {:?}", start.elapsed());
}

#[test]
fn zk_store_conformance() {
    let zk = server();
    type Case = fn(&dyn Store);
    let cases: [(&str, Case); 8] = [
        (
            "reads_bodies_and_audit",
            conformance::reads_bodies_and_audit,
        ),
        (
            "queue_order_per_host_across_tasks",
            conformance::queue_order_per_host_across_tasks,
        ),
        (
            "finish_dequeues_and_completes",
            conformance::finish_dequeues_and_completes,
        ),
        (
            "batch_rollout_and_release",
            conformance::batch_rollout_and_release,
        ),
        ("cancel_and_expire", conformance::cancel_and_expire),
        ("task_edge_cases", conformance::task_edge_cases),
        ("hosts_online_offline", conformance::hosts_online_offline),
        (
            "tokens_consume_revoke_expire",
            conformance::tokens_consume_revoke_expire,
        ),
    ];
    for (name, case) in cases {
        let s = open(&zk, &format!("/conf/{name}"));
        timed(name, || case(&s));
    }
    timed("everything_survives_reopen", || {
        conformance::everything_survives_reopen(&|| Box::new(open(&zk, "/conf/reopen")))
    });
    timed("one_time_token_race", || {
        conformance::one_time_token_race(Arc::new(open(&zk, "/conf/race")))
    });
}

/// Two centers on one namespace see each other's writes at once.
#[test]
fn zk_store_two_centers_share_state() {
    let zk = server();
    let a = open(&zk, "/fleet");
    let b = open(&zk, "/fleet");
    a.put_token(&token("tok1", false, None)).unwrap();
    a.put_host(&host("web-1")).unwrap();
    a.put_host(&host("web-2")).unwrap();
    a.put_meta("ca.key", b"k").unwrap();
    assert_eq!(b.get_token("tok1").unwrap().unwrap().id, "tok1");
    assert_eq!(b.list_hosts().unwrap().len(), 2);
    assert_eq!(b.get_meta("ca.key").unwrap().unwrap(), b"k");
    assert!(b.set_online("web-1", false, 9).unwrap());
    assert!(!a.get_host("web-1").unwrap().unwrap().online);

    let t = b.create_task(new_task(&["web-1", "web-2"], 0), 10).unwrap();
    let rec = a.get_task(t).unwrap().unwrap();
    assert_eq!(rec.hosts, vec!["web-1", "web-2"]);
    assert_eq!(a.queue_for("web-1").unwrap().len(), 1);
    assert!(a.ack_delivery("web-1", t).unwrap());
    assert!(!b.ack_delivery("web-1", t).unwrap(), "already delivered");
    assert!(b.mark_running("web-1", t, 11).unwrap());

    // A finish from one center is final for the other.
    assert!(a.finish("web-1", t, ok(12)).unwrap());
    assert!(!b.finish("web-1", t, ok(13)).unwrap());
    let r = b.result(t, "web-1").unwrap().unwrap();
    assert_eq!((r.state, r.finished_at), (HostState::Ok, Some(12)));
    assert!(b.queue_for("web-1").unwrap().is_empty());
    assert!(b.finish("web-2", t, ok(14)).unwrap());
    assert_eq!(a.get_task(t).unwrap().unwrap().state, TaskState::Done);
    assert_eq!(a.open_hosts(t).unwrap(), 0);

    // One audit log, one sequence.
    let mut seqs = BTreeSet::new();
    for i in 0..4 {
        let s: &dyn Store = if i % 2 == 0 { &a } else { &b };
        seqs.insert(s.append_audit(conformance::audit("/x")).unwrap());
    }
    assert_eq!(seqs, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(a.list_audit(10).unwrap().len(), 4);
}

/// Threads on two centers race for one-time tokens: exactly one wins each.
#[test]
fn zk_store_one_time_token_across_centers() {
    let zk = server();
    let stores: Vec<Arc<ZkStore>> = (0..2).map(|_| Arc::new(open(&zk, "/fleet"))).collect();
    for round in 0..5 {
        let id = format!("enroll{round}");
        stores[0].put_token(&token(&id, true, None)).unwrap();
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = stores[i % 2].clone();
                let (id, barrier) = (id.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match s.consume_token(&id, 1) {
                        Ok(_) => true,
                        Err(TokenUseError::AlreadyUsed(_)) => false,
                        Err(e) => panic!("unexpected: {e}"),
                    }
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(stores[1].get_token(&id).unwrap().unwrap().uses, 1);
    }
}

/// Two centers creating tasks at once: distinct ids, and every host's queue holds the
/// tasks in one order (id order, since the id is taken in the creating transaction).
#[test]
fn zk_store_concurrent_create_task() {
    let zk = server();
    let stores: Vec<Arc<ZkStore>> = (0..2).map(|_| Arc::new(open(&zk, "/fleet"))).collect();
    let hosts = ["h1", "h2", "h3"];
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let s = stores[i % 2].clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| s.create_task(new_task(&hosts, 0), 1).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut ids: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "unique and dense");
    let order = |s: &ZkStore, h: &str| {
        let q = s.queue_for(h).unwrap();
        assert!(q.windows(2).all(|w| w[0].0 < w[1].0), "sorted by seq");
        q.into_iter().map(|e| e.1).collect::<Vec<_>>()
    };
    for h in hosts {
        assert_eq!(order(&stores[0], h), ids, "{h}");
        assert_eq!(order(&stores[1], h), ids, "{h}");
    }
}

/// Hosts of the same tasks reporting at once through two centers: every report
/// counts down its task exactly once (the state node is compare-and-set).
#[test]
fn zk_store_concurrent_finish() {
    let zk = server();
    let stores: Vec<Arc<ZkStore>> = (0..2).map(|_| Arc::new(open(&zk, "/fleet"))).collect();
    let hosts: Vec<String> = (0..6).map(|i| format!("h{i}")).collect();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let tasks: Vec<u64> = (0..5)
        .map(|_| stores[0].create_task(new_task(&refs, 0), 1).unwrap())
        .collect();
    let barrier = Arc::new(Barrier::new(hosts.len()));
    let handles: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (s, h, tasks, barrier) = (
                stores[i % 2].clone(),
                h.clone(),
                tasks.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                barrier.wait();
                for t in tasks {
                    assert!(s.finish(&h, t, ok(2)).unwrap());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for t in tasks {
        assert_eq!(stores[1].open_hosts(t).unwrap(), 0);
        assert_eq!(
            stores[1].get_task(t).unwrap().unwrap().state,
            TaskState::Done
        );
    }
    assert!(stores[0].queue_all().unwrap().is_empty());
}

/// The committer's group commit on one task of 1,000 hosts: one center closes 500
/// hosts in one `finish_many` while another closes 499 others in batches of 50. Every
/// host is closed once, the task stays `Running` with one host open, and becomes
/// `Done` with the last report. Prints the time of the fan-out's store calls.
#[test]
fn zk_store_finish_many_one_task_two_centers() {
    let zk = server();
    let a = Arc::new(open(&zk, "/fleet"));
    let b = Arc::new(open(&zk, "/fleet"));
    let hosts: Vec<String> = (0..1000).map(|i| format!("h{i:04}")).collect();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let clock = Instant::now();
    let t = a.create_task(new_task(&refs, 0), 1).unwrap();
    eprintln!("create_task, 1000 hosts: {:?}", clock.elapsed());

    let clock = Instant::now();
    assert_eq!(b.results(t).unwrap().len(), 1000);
    eprintln!("results, 1000 hosts: {:?}", clock.elapsed());
    let clock = Instant::now();
    for h in &refs[..100] {
        assert_eq!(b.queue_for(h).unwrap().len(), 1);
    }
    eprintln!("queue_for, 100 hosts one by one: {:?}", clock.elapsed());
    let clock = Instant::now();
    assert_eq!(b.get_task(t).unwrap().unwrap().hosts.len(), 1000);
    assert_eq!(b.open_hosts(t).unwrap(), 1000);
    eprintln!("get_task + open_hosts: {:?}", clock.elapsed());

    let barrier = Arc::new(Barrier::new(2));
    let batch = |range: std::ops::Range<usize>, at: u64| -> Vec<(String, u64, _)> {
        hosts[range]
            .iter()
            .map(|h| (h.clone(), t, ok(at)))
            .collect()
    };
    let (one, many) = (batch(0..500, 2), batch(500..999, 3));
    let (sa, ba) = (a.clone(), barrier.clone());
    let first = std::thread::spawn(move || {
        ba.wait();
        let clock = Instant::now();
        let done = sa.finish_many(one).unwrap();
        eprintln!("finish_many of 500 (racing): {:?}", clock.elapsed());
        done
    });
    let (sb, bb) = (b.clone(), barrier);
    let second = std::thread::spawn(move || {
        bb.wait();
        let clock = Instant::now();
        let mut done = Vec::new();
        for chunk in many.chunks(50) {
            done.extend(sb.finish_many(chunk.to_vec()).unwrap());
        }
        eprintln!("finish_many of 499 in 10 (racing): {:?}", clock.elapsed());
        done
    });
    let (d1, d2) = (first.join().unwrap(), second.join().unwrap());
    assert!(d1.len() == 500 && d1.iter().all(|d| *d));
    assert!(d2.len() == 499 && d2.iter().all(|d| *d));

    assert_eq!(a.open_hosts(t).unwrap(), 1);
    assert_eq!(b.get_task(t).unwrap().unwrap().state, TaskState::Running);
    let results = a.results(t).unwrap();
    let open: Vec<&str> = results
        .iter()
        .filter(|r| !r.state.is_final())
        .map(|r| r.host.as_str())
        .collect();
    assert_eq!(open, ["h0999"]);
    let at = |r: &crate::store::HostResult| r.finished_at;
    assert!(results[..500].iter().all(|r| at(r) == Some(2)));
    assert!(results[500..999].iter().all(|r| at(r) == Some(3)));
    let queued = b.queue_all().unwrap();
    assert_eq!(
        queued
            .iter()
            .map(|(h, _, q)| (h.as_str(), *q))
            .collect::<Vec<_>>(),
        [("h0999", t)]
    );

    // The last host, with a duplicate of an earlier one and of itself in the batch.
    let done = b
        .finish_many(vec![
            ("h0000".into(), t, ok(4)),
            ("h0999".into(), t, ok(5)),
            ("h0999".into(), t, ok(6)),
        ])
        .unwrap();
    assert_eq!(done, [false, true, false]);
    assert_eq!(a.result(t, "h0999").unwrap().unwrap().finished_at, Some(5));
    assert_eq!(a.result(t, "h0000").unwrap().unwrap().finished_at, Some(2));
    assert_eq!(a.open_hosts(t).unwrap(), 0);
    assert_eq!(a.get_task(t).unwrap().unwrap().state, TaskState::Done);
    assert!(a.queue_all().unwrap().is_empty());
}

/// A batch over several tasks and results too large for one multi: split by the
/// budget, every state counted down by exactly its hosts; and an unknown result in a
/// batch fails it before anything is written.
#[test]
fn zk_store_finish_many_split_and_checked_first() {
    let zk = server();
    let s = open(&zk, "/split");
    let hosts: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let big = s.create_task(new_task(&refs, 0), 1).unwrap();
    let small = s.create_task(new_task(&refs[..3], 0), 1).unwrap();
    assert!(matches!(
        s.finish_many(vec![
            ("h1".into(), small, ok(2)),
            ("nobody".into(), small, ok(2)),
        ]),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.finish_many(vec![("h1".into(), small, ok(2)), ("h1".into(), 999, ok(2))]),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.open_hosts(small).unwrap(), 3, "nothing written");
    assert_eq!(s.queue_for("h1").unwrap().len(), 2);

    // 40 results of 2 x 64 KiB: several multis for one task.
    let mut items = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let mut o = ok(10 + i as u64);
        o.stdout = vec![b'o'; OUTPUT_MAX];
        o.stderr = vec![b'e'; OUTPUT_MAX];
        items.push((h.clone(), big, o));
        if i < 2 {
            items.push((h.clone(), small, ok(3)));
        }
    }
    let done = s.finish_many(items).unwrap();
    assert_eq!(done.len(), 42);
    assert!(done.iter().all(|d| *d));
    assert_eq!(s.open_hosts(big).unwrap(), 0);
    assert_eq!(s.get_task(big).unwrap().unwrap().state, TaskState::Done);
    assert_eq!(s.open_hosts(small).unwrap(), 1);
    assert_eq!(
        s.get_task(small).unwrap().unwrap().state,
        TaskState::Running
    );
    let results = s.results(big).unwrap();
    assert!(results
        .iter()
        .all(|r| r.stdout.len() == OUTPUT_MAX && r.state.is_final()));
    assert_eq!(
        s.queue_all()
            .unwrap()
            .into_iter()
            .map(|(h, _, t)| (h, t))
            .collect::<Vec<_>>(),
        [("h2".to_string(), small)]
    );
    assert!(s.expire("h2", small, 20).unwrap());
    assert!(!s.expire("h2", small, 21).unwrap());
    assert_eq!(
        s.result(small, "h2").unwrap().unwrap().state,
        HostState::Expired
    );
    assert_eq!(s.get_task(small).unwrap().unwrap().state, TaskState::Done);
    assert!(s.queue_all().unwrap().is_empty());
}

/// The store rides out a server restart (same session: the client reconnects and
/// the store retries reads and replans writes).
#[test]
fn zk_store_survives_server_restart() {
    let mut zk = server();
    let s = open(&zk, "/restart");
    s.put_host(&host("a")).unwrap();
    let t = s.create_task(new_task(&["a", "b"], 0), 1).unwrap();
    zk.restart()
        .unwrap_or_else(|e| panic!("restarting ZooKeeper: {e}"));
    assert!(s.get_host("a").unwrap().is_some());
    assert!(s.finish("a", t, ok(2)).unwrap());
    let t2 = s.create_task(new_task(&["a"], 0), 3).unwrap();
    assert!(t2 > t);
    assert_eq!(s.queue_for("a").unwrap(), vec![(1, t2)]);
}

/// A task too large for one multi is created in stages and cancelled in several
/// multis; a body over the inline limit goes to the chunked body nodes.
#[test]
fn zk_store_large_task_and_body() {
    let zk = server();
    let s = open(&zk, "/big");
    let names: Vec<String> = (0..4000).map(|i| format!("host-{i:05}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let start = Instant::now();
    let t = s.create_task(new_task(&refs, 3000), 5).unwrap();
    eprintln!("4000-host task created in {:?}", start.elapsed());
    let rec = s.get_task(t).unwrap().unwrap();
    assert_eq!(rec.hosts.len(), 4000);
    let results = s.results(t).unwrap();
    assert_eq!(results.len(), 4000);
    assert_eq!(
        results
            .iter()
            .filter(|r| r.state == HostState::Queued)
            .count(),
        3000
    );
    assert_eq!(
        s.queue_for("host-02999").unwrap(),
        s.queue_for("host-00000").unwrap()
    );
    assert!(s.queue_for("host-03000").unwrap().is_empty());
    assert_eq!(s.queue_all().unwrap().len(), 3000);
    assert!(s.finish("host-00001", t, ok(6)).unwrap());
    assert!(s.ack_delivery("host-00002", t).unwrap());
    let released = s.release(t, &names[3000..3500], 7).unwrap();
    assert_eq!(released.len(), 500);
    let start = Instant::now();
    let delivered = s.cancel_task(t, 8).unwrap();
    eprintln!("4000-host task cancelled in {:?}", start.elapsed());
    assert_eq!(delivered, vec!["host-00002"]);
    assert_eq!(s.get_task(t).unwrap().unwrap().state, TaskState::Cancelled);
    assert_eq!(s.open_hosts(t).unwrap(), 0);
    assert!(s.queue_all().unwrap().is_empty());
    assert_eq!(
        s.result(t, "host-00001").unwrap().unwrap().state,
        HostState::Ok
    );
    assert_eq!(
        s.result(t, "host-03999").unwrap().unwrap().state,
        HostState::Cancelled
    );

    // Just under the budget: one multi of ~650 KB.
    let near: Vec<&str> = refs[..2800].to_vec();
    let t3 = s.create_task(new_task(&near, 0), 9).unwrap();
    assert_eq!(s.results(t3).unwrap().len(), 2800);
    assert_eq!(s.queue_all().unwrap().len(), 2800);

    // A 1.5 MiB body: chunked under /bodies, read back whole.
    let body: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let mut nt = new_task(&["a", "b"], 0);
    nt.body = body.clone();
    let t2 = s.create_task(nt, 9).unwrap();
    assert_eq!(s.get_task(t2).unwrap().unwrap().body, body);
    assert!(
        s.list_tasks(None, 1).unwrap()[0].body.is_empty(),
        "listings carry no body"
    );
    let client = s.session().client();
    let bodies = || {
        let c = client.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // The session's client lives on the store's runtime; ask it from a fresh one.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = tx.send(rt.block_on(c.check_stat(&format!("/bodies/{t2}"))));
        });
        rx.recv().unwrap().unwrap().is_some()
    };
    assert!(bodies(), "the body is external");
    // Small again: back inline, the chunks removed; then large again.
    s.set_task_body(t2, vec![7; 100]).unwrap();
    assert_eq!(s.get_task(t2).unwrap().unwrap().body, vec![7; 100]);
    assert!(!bodies(), "the chunks are gone");
    s.set_task_body(t2, body[..700_000].to_vec()).unwrap();
    assert_eq!(s.get_task(t2).unwrap().unwrap().body, body[..700_000]);
    assert!(bodies());
    let mut too_big = new_task(&["a"], 0);
    too_big.body = vec![0; super::queue::MAX_BODY_BYTES + 1];
    assert!(matches!(
        s.create_task(too_big, 1),
        Err(StoreError::Invalid(_))
    ));
}

/// The one behavioural difference: outputs are capped at 64 KiB per stream.
#[test]
fn zk_store_output_capped() {
    let zk = server();
    let s = open(&zk, "/cap");
    let t = s.create_task(new_task(&["h"], 0), 1).unwrap();
    let mut o = ok(2);
    o.stdout = vec![b'x'; 100 * 1024];
    o.stderr = b"small".to_vec();
    o.error = Some("é".repeat(10_000));
    assert!(s.finish("h", t, o).unwrap());
    let r = s.result(t, "h").unwrap().unwrap();
    assert_eq!(r.stdout.len(), OUTPUT_MAX);
    assert!(r.stdout_truncated);
    assert_eq!(
        (r.stderr.as_slice(), r.stderr_truncated),
        (&b"small"[..], false)
    );
    assert!(r.error.unwrap().len() <= super::store::ERROR_MAX);
}

/// Host names must be znode names; other lookups simply find nothing.
#[test]
fn zk_store_invalid_names() {
    let zk = server();
    let s = open(&zk, "/names");
    let mut h = host("ok-host");
    h.name = "bad/name".into();
    assert!(matches!(s.put_host(&h), Err(StoreError::Invalid(_))));
    assert_eq!(s.get_host("bad/name").unwrap(), None);
    assert!(!s.set_online("..", true, 1).unwrap());
    assert!(matches!(
        s.create_task(new_task(&["a", "b c"], 0), 1),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.queue_for("x/y").unwrap(), Vec::new());
    // Any token id or meta key works (hex-encoded), up to 256 bytes.
    let weird = "tok/with ünïcode";
    s.put_token(&token(weird, false, None)).unwrap();
    assert_eq!(s.get_token(weird).unwrap().unwrap().id, weird);
    s.put_meta("a/b", b"v").unwrap();
    assert_eq!(s.get_meta("a/b").unwrap().unwrap(), b"v");
    assert!(matches!(
        s.put_meta(&"k".repeat(300), b"v"),
        Err(StoreError::Invalid(_))
    ));
}

/// A queue node deleted behind the store's back (an empty queue may be deleted to
/// restart its counter) is recreated: the failed transaction is replanned.
#[test]
fn zk_store_recreates_a_deleted_queue_node() {
    let zk = server();
    let s = open(&zk, "/requeue");
    let t = s.create_task(new_task(&["q"], 0), 1).unwrap();
    assert!(s.finish("q", t, ok(2)).unwrap());
    let servers = zk.connect_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = zk::Client::connect(&servers)
            .await
            .unwrap()
            .chroot("/requeue")
            .unwrap();
        c.delete("/queues/q", None).await.unwrap();
    });
    let t2 = s.create_task(new_task(&["q"], 0), 3).unwrap();
    assert_eq!(s.queue_for("q").unwrap(), vec![(0, t2)]);
}

/// Corrupt or oversized values written behind the store's back are errors, never
/// panics or huge allocations.
#[test]
fn zk_store_corrupt_values_are_errors() {
    let zk = server();
    let s = open(&zk, "/corrupt");
    s.put_host(&host("good")).unwrap();
    let t = s.create_task(new_task(&["h"], 0), 1).unwrap();
    let servers = zk.connect_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = zk::Client::connect(&servers)
            .await
            .unwrap()
            .chroot("/corrupt")
            .unwrap();
        let p = super::session::PERSISTENT;
        c.create("/store/hosts/bad", &[0xff; 3], p).await.unwrap();
        c.create("/store/hosts/huge", &vec![0; 100 * 1024], p)
            .await
            .unwrap();
        c.set_data(&format!("/store/tasks/{t:020}"), &[0x80], None)
            .await
            .unwrap();
        c.set_data(&format!("/store/results/{t:020}/h"), &[1, 2], None)
            .await
            .unwrap();
        c.set_data(&format!("/store/state/{t:020}"), &[7; 200], None)
            .await
            .unwrap();
        c.set_data("/store/counters/task", b"x", None)
            .await
            .unwrap();
    });
    let is_decode = |e: &StoreError| matches!(e, StoreError::Decode { .. });
    let is_zk_decode = |e: &StoreError| matches!(e, StoreError::Zk(z) if matches!(**z, super::ZkError::Decode { .. }));
    assert!(is_decode(&s.get_host("bad").unwrap_err()));
    assert!(is_zk_decode(&s.get_host("huge").unwrap_err()));
    assert!(s.get_host("good").unwrap().is_some());
    assert!(s.list_hosts().is_err());
    assert!(is_decode(&s.set_online("bad", true, 1).unwrap_err()));
    assert!(is_decode(&s.get_task(t).unwrap_err()));
    assert!(is_decode(&s.results(t).unwrap_err()));
    assert!(is_decode(&s.finish("h", t, ok(1)).unwrap_err()));
    assert!(is_zk_decode(&s.open_hosts(t).unwrap_err()));
    assert!(is_zk_decode(&s.list_tasks(None, 5).unwrap_err()));
    assert!(is_zk_decode(
        &s.create_task(new_task(&["h2"], 0), 2).unwrap_err()
    ));
}

/// The synchronous methods work from inside a current-thread runtime, while holding a
/// std mutex, and the store can be dropped there.
#[tokio::test(flavor = "current_thread")]
async fn zk_store_from_current_thread_runtime() {
    let zk = server();
    let s = open(&zk, "/rt");
    let lock = Mutex::new(0);
    let guard = lock.lock().unwrap();
    s.put_host(&host("a")).unwrap();
    let t = s.create_task(new_task(&["a"], 0), 1).unwrap();
    assert!(s.finish("a", t, ok(2)).unwrap());
    drop(guard);
    // And from a spawned task on this runtime, concurrently with a timer.
    let s = Arc::new(s);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.get_task(t).unwrap().unwrap().state });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(h.await.unwrap(), TaskState::Done);
    drop(s);
}
