//! Against real ZooKeeper servers (see [`super::testing`]): a server that cannot
//! start fails the test with the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use zookeeper_client as zk;

use super::testing::{ZkEnsemble, ZkServer};
use super::*;

fn server() -> ZkServer {
    ZkServer::start().unwrap_or_else(|e| panic!("cannot start a ZooKeeper server: {e}"))
}

fn opts(timeout_ms: u64) -> SessionOptions {
    SessionOptions {
        session_timeout: Duration::from_millis(timeout_ms),
        retry_backoff: Duration::from_millis(200),
    }
}

async fn session(url: &str, timeout_ms: u64) -> ZkSession {
    let url = ZkUrl::parse(url).unwrap();
    ZkSession::connect(&url, opts(timeout_ms))
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

fn agent(center: &str, i: usize) -> AgentInfo {
    AgentInfo {
        addr: format!("10.0.0.{i}:7000"),
        version: "0.1.0".into(),
        center: center.into(),
    }
}

/// Ends `s`'s session on the server the classic way: a second client attaches to
/// the same session id and password, then closes it. The first client finds its
/// session expired on its next contact.
async fn kill_session(s: &ZkSession) {
    let client = s.client();
    let info = client.session().clone();
    let servers = s.url().connect_string();
    // The owner reconnects as soon as the server moves its connection to the thief,
    // which can win the session back before the thief's handshake is done: try again.
    let mut last = None;
    for _ in 0..10 {
        match zk::Client::connector()
            .with_session(info.clone())
            .with_session_timeout(client.session_timeout())
            .connect(&servers)
            .await
        {
            Ok(thief) => {
                drop(thief); // not detached: closes the session
                return;
            }
            Err(zk::Error::SessionExpired) => return,
            Err(e) => last = Some(e),
        }
    }
    panic!("could not attach to the session to close it: {last:?}");
}

async fn wait_generation(s: &ZkSession, from: u64, timeout: Duration) {
    let mut g = s.generation();
    let ok = tokio::time::timeout(timeout, g.wait_for(|v| *v > from)).await;
    assert!(
        ok.is_ok(),
        "no new session within {timeout:?} after the expiry"
    );
}

#[test]
fn zk_url_parsing() {
    let u = ZkUrl::parse("zk://127.0.0.1:2181,zk2:2182/octopus/prod").unwrap();
    assert_eq!(u.servers, ["127.0.0.1:2181", "zk2:2182"]);
    assert_eq!(u.chroot, "/octopus/prod");
    assert_eq!(u.connect_string(), "127.0.0.1:2181,zk2:2182");
    assert_eq!(u.to_string(), "zk://127.0.0.1:2181,zk2:2182/octopus/prod");
    assert_eq!(ZkUrl::parse("zk://h:1").unwrap().chroot, "/");
    assert_eq!(ZkUrl::parse("zk://h:1/a/").unwrap().chroot, "/a");
    for bad in [
        "http://h:1/a",
        "zk://h/a",
        "zk://h:0/a",
        "zk://h:99999/a",
        "zk://:1/a",
        "zk://h:1/a//b",
        "zk://h:1/a/../b",
        "zk://h:1,/a",
    ] {
        assert!(ZkUrl::parse(bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn zk_queue_entry_names() {
    let e = QueueEntry { seq: 17, task: 42 };
    assert_eq!(e.node_name(), "t42-0000000017");
    assert_eq!(QueueEntry::parse("t42-0000000017"), Some(e));
    for bad in [
        "",
        "t",
        "t-0000000001",
        "42-0000000001",
        "t42-1",
        "t42-00000000001",
        "t42--2147483648",
        "tx-0000000001",
        "t42-000000000a",
        "t123456789012345678901-0000000001",
        "t42-2147483648",
    ] {
        assert_eq!(QueueEntry::parse(bad), None, "{bad:?}");
    }
}

/// Several producers on separate sessions (as on separate centers) enqueue to one
/// agent at once, some one create at a time, some in multi batches: every reader
/// sees one order, and the consumer gets every entry exactly once, in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_order_under_concurrent_producers() {
    let zks = server();
    let url = zks.url("/order");
    const PRODUCERS: u64 = 4;
    const PER: u64 = 150;
    let mut handles = Vec::new();
    for p in 0..PRODUCERS {
        let q = TaskQueue::new(session(&url, 10_000).await);
        handles.push(tokio::spawn(async move {
            let tasks: Vec<u64> = (0..PER).map(|i| p * 1_000_000 + i).collect();
            if p % 2 == 0 {
                for &t in &tasks {
                    q.enqueue("web-1", t).await.unwrap();
                }
            } else {
                for chunk in tasks.chunks(25) {
                    let items: Vec<(&str, u64)> = chunk.iter().map(|&t| ("web-1", t)).collect();
                    let entries = q.enqueue_batch(&items).await.unwrap();
                    // One transaction: consecutive numbers, in input order.
                    for w in entries.windows(2) {
                        assert_eq!(w[1].seq, w[0].seq + 1);
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // Two readers on two other sessions see the same order.
    let reader_a = TaskQueue::new(session(&url, 10_000).await);
    let reader_b = TaskQueue::new(session(&url, 10_000).await);
    let seen_a = reader_a.entries("web-1").await.unwrap();
    let seen_b = reader_b.entries("web-1").await.unwrap();
    assert_eq!(seen_a, seen_b);
    assert_eq!(seen_a.len() as u64, PRODUCERS * PER);

    let mut consumer = reader_a.consumer("web-1").unwrap();
    let mut got = Vec::new();
    while let Some(e) = consumer
        .next_timeout(Duration::from_millis(500))
        .await
        .unwrap()
    {
        got.push(e);
        if got.len() % 100 == 0 {
            consumer.ack_many(&got[got.len() - 100..]).await.unwrap();
        }
    }
    assert_eq!(got, seen_a, "the consumer follows the one order");
    for w in got.windows(2) {
        assert!(w[0].seq < w[1].seq);
    }
    let distinct: HashSet<u64> = got.iter().map(|e| e.task).collect();
    assert_eq!(distinct.len() as u64, PRODUCERS * PER, "each exactly once");
    // Each producer's own entries keep its order (ZooKeeper's FIFO client order).
    let mut last: HashMap<u64, u64> = HashMap::new();
    for e in &got {
        let p = e.task / 1_000_000;
        if let Some(prev) = last.insert(p, e.task) {
            assert!(prev < e.task, "producer {p}: {prev} then {}", e.task);
        }
    }
    // Entries by several producers are interleaved, not one block after another.
    let switches = got
        .windows(2)
        .filter(|w| w[0].task / 1_000_000 != w[1].task / 1_000_000)
        .count();
    assert!(
        switches > 3,
        "producers were not concurrent ({switches} switches)"
    );
}

/// A consumer that takes an entry and dies before acking leaves it queued: the next
/// consumer gets it again, first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_redelivery_after_crash() {
    let zks = server();
    let url = zks.url("/redeliver");
    let producer = TaskQueue::new(session(&url, 10_000).await);
    for t in [10, 11, 12] {
        producer.enqueue("db-1", t).await.unwrap();
    }
    {
        let crashing = TaskQueue::new(session(&url, 10_000).await);
        let mut c = crashing.consumer("db-1").unwrap();
        assert_eq!(c.next().await.unwrap().task, 10);
        assert_eq!(c.next().await.unwrap().task, 11);
        // No ack: the session is dropped with the consumer (a crash).
    }
    let q2 = TaskQueue::new(session(&url, 10_000).await);
    let mut c2 = q2.consumer("db-1").unwrap();
    let first = c2.next().await.unwrap();
    assert_eq!(first.task, 10, "the unacked entry is delivered again");
    assert!(c2.ack(&first).await.unwrap());
    assert!(!c2.ack(&first).await.unwrap(), "a second ack finds nothing");
    let q3 = TaskQueue::new(session(&url, 10_000).await);
    let mut c3 = q3.consumer("db-1").unwrap();
    assert_eq!(c3.next().await.unwrap().task, 11);
    assert_eq!(c3.next().await.unwrap().task, 12);
    // Nothing more, until a producer adds one: the consumer's watch wakes it.
    assert_eq!(
        c3.next_timeout(Duration::from_millis(300)).await.unwrap(),
        None
    );
    let waiter = tokio::spawn(async move { c3.next().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer.enqueue("db-1", 13).await.unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the watch woke the consumer")
        .unwrap();
    assert_eq!(woke.task, 13);
    // ack_task removes by task id, as `Store::finish` does.
    assert_eq!(producer.ack_task("db-1", 11).await.unwrap(), 1);
    let left: Vec<u64> = producer
        .entries("db-1")
        .await
        .unwrap()
        .iter()
        .map(|e| e.task)
        .collect();
    assert_eq!(left, [12, 13]);
    assert_eq!(
        producer.queue_all().await.unwrap().len(),
        2,
        "queue_all lists every host's entries"
    );
    // An emptied queue node deleted behind the producer's back is recreated.
    let left = producer.entries("db-1").await.unwrap();
    assert_eq!(producer.ack_many("db-1", &left).await.unwrap(), 2);
    producer
        .session()
        .client()
        .delete("/queues/db-1", None)
        .await
        .unwrap();
    let e = producer.enqueue_batch(&[("db-1", 14)]).await.unwrap();
    assert_eq!(e[0].task, 14);
    assert_eq!(producer.entries("db-1").await.unwrap(), e);
}

/// Bodies are chunked under /bodies/<task>, shared by all hosts' entries, checked
/// on read, and bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_task_bodies() {
    let zks = server();
    let s = session(&zks.url("/bodies"), 10_000).await;
    let q = TaskQueue::new(s.clone());
    let body: Vec<u8> = (0..3 * 1024 * 1024 + 5)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    q.put_body(7, &body).await.unwrap();
    q.put_body(7, &body).await.unwrap(); // idempotent
    assert!(matches!(
        q.put_body(7, b"other").await,
        Err(ZkError::BodyConflict { task: 7 })
    ));
    let chunks = s.client().list_children("/bodies/7").await.unwrap();
    assert_eq!(chunks.len(), 7, "3 MiB + 5 bytes in 512 KiB chunks");
    let hosts: Vec<(String, u64)> = (0..50).map(|i| (format!("h{i}"), 7)).collect();
    q.enqueue_batch(&hosts).await.unwrap();
    assert_eq!(q.get_body(7).await.unwrap().as_deref(), Some(&body[..]));
    q.put_body(8, b"").await.unwrap();
    assert_eq!(q.get_body(8).await.unwrap(), Some(Vec::new()));
    assert_eq!(q.get_body(9).await.unwrap(), None);
    let big = vec![0u8; MAX_BODY + 1];
    assert!(matches!(
        q.put_body(9, &big).await,
        Err(ZkError::BodyTooLarge { .. })
    ));
    q.put_body(10, &vec![1u8; queue::MAX_BODY_BYTES])
        .await
        .unwrap();
    // A damaged chunk is caught by its length, a same-length one by the digest.
    s.client()
        .set_data("/bodies/7/1", b"short", None)
        .await
        .unwrap();
    assert!(matches!(
        q.get_body(7).await,
        Err(ZkError::BodyCorrupt { task: 7, .. })
    ));
    s.client()
        .set_data("/bodies/7/1", &vec![0u8; queue::CHUNK_BYTES], None)
        .await
        .unwrap();
    assert!(matches!(
        q.get_body(7).await,
        Err(ZkError::BodyCorrupt { task: 7, .. })
    ));
    // A lying header is refused before any chunk is read.
    s.client()
        .set_data(
            "/bodies/8",
            br#"{"size":99999999999,"chunks":1,"sha256":""}"#,
            None,
        )
        .await
        .unwrap();
    assert!(matches!(
        q.get_body(8).await,
        Err(ZkError::BodyCorrupt { task: 8, .. })
    ));
    // Orphans: 8 and 10 have no entries; 7 has 50. Too young first, then swept.
    assert!(q
        .sweep_orphan_bodies(Duration::from_secs(3600))
        .await
        .unwrap()
        .is_empty());
    let mut swept = q.sweep_orphan_bodies(Duration::ZERO).await.unwrap();
    swept.sort();
    assert_eq!(swept, [8, 10]);
    assert!(q.delete_body(7).await.unwrap());
    assert!(!q.delete_body(7).await.unwrap());
}

const MAX_BODY: usize = queue::MAX_BODY_BYTES;

/// Forced expiry (a second client closes the session): a new session is opened,
/// the center's and its agents' ephemerals are back, owned by it, and a presence
/// watcher on another center reports no offline event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_session_expiry_recreates_ephemerals_without_offline_storm() {
    let zks = server();
    let url = zks.url("/expiry");
    let a = session(&url, 2_000).await;
    let reg_a = Registry::new(a.clone());
    reg_a
        .register_center(
            "center-a",
            &CenterInfo {
                addr: "127.0.0.1:7100".into(),
                version: "0.1.0".into(),
            },
        )
        .await
        .unwrap();
    const N: usize = 20;
    for i in 0..N {
        reg_a
            .register_agent(&format!("node-{i}"), &agent("center-a", i))
            .await
            .unwrap();
    }
    let reg_b = Registry::new(session(&url, 10_000).await);
    let mut presence = reg_b.watch_agents(Duration::from_secs(5));
    assert!(
        presence
            .wait_until(Duration::from_secs(10), |v| v.len() == N)
            .await
    );
    // The expiring center watches too: its own view must not flap either.
    let mut own = reg_a.watch_agents(Duration::from_secs(5));
    assert!(
        own.wait_until(Duration::from_secs(10), |v| v.len() == N)
            .await
    );
    while own.try_next().is_some() {}
    let mut online = 0;
    while let Some(ev) = presence.try_next() {
        assert!(matches!(ev, PresenceEvent::Online { .. }));
        online += 1;
    }
    assert_eq!(online, N);

    let old_id = a.session_id();
    let gen = *a.generation().borrow();
    let started = Instant::now();
    kill_session(&a).await;
    wait_generation(&a, gen, Duration::from_secs(20)).await;
    let gap = started.elapsed();
    let new_id = a.session_id();
    assert_ne!(old_id, new_id, "a new session");

    let client = reg_b.session().client();
    let agents = reg_b.agents().await.unwrap();
    assert_eq!(agents.len(), N, "every agent is registered again");
    for i in 0..N {
        let stat = client
            .check_stat(&format!("/agents/node-{i}"))
            .await
            .unwrap()
            .expect("recreated");
        assert_eq!(stat.ephemeral_owner, new_id);
    }
    let centers = reg_b.centers().await.unwrap();
    assert_eq!(centers.keys().collect::<Vec<_>>(), ["center-a"]);
    // Past the grace period: no offline event for the gap.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut events = Vec::new();
    while let Some(ev) = presence.try_next() {
        events.push(ev);
    }
    assert!(
        events.is_empty(),
        "no presence events for a {gap:?} re-registration gap: {events:?}"
    );
    assert_eq!(presence.snapshot().len(), N);
    let own_events: Vec<_> = std::iter::from_fn(|| own.try_next()).collect();
    assert!(own_events.is_empty(), "own watcher: {own_events:?}");
    assert!(
        own.rearms() > 1,
        "the own watcher re-armed on the new session"
    );
    assert_eq!(own.snapshot().len(), N);
    // And an agent really leaving is reported, once, after the grace.
    assert!(reg_a.unregister_agent("node-3").await.unwrap());
    let ev = tokio::time::timeout(Duration::from_secs(10), presence.next())
        .await
        .expect("offline after the grace");
    assert_eq!(
        ev,
        Some(PresenceEvent::Offline {
            host: "node-3".into()
        })
    );
}

/// The server is down longer than the session timeout: the client gives the
/// session up, opens a new one when the server is back, and takes its old
/// ephemerals over from the old session (which the restarted server still holds
/// until it expires there too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_session_expiry_after_server_outage() {
    let mut zks = server();
    let url = zks.url("/outage");
    let a = session(&url, 2_000).await;
    let reg = Registry::new(a.clone());
    for i in 0..5 {
        reg.register_agent(&format!("edge-{i}"), &agent("center-a", i))
            .await
            .unwrap();
    }
    let old_id = a.session_id();
    let gen = *a.generation().borrow();
    zks.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    zks.restart().unwrap();
    wait_generation(&a, gen, Duration::from_secs(30)).await;
    assert_ne!(a.session_id(), old_id);
    // Past the old session's expiry on the restarted server: ours stay.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let client = a.client();
    for i in 0..5 {
        let stat = client
            .check_stat(&format!("/agents/edge-{i}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("edge-{i} is registered again"));
        assert_eq!(stat.ephemeral_owner, a.session_id());
    }
}

/// Many rapid registrations, takeovers and removals: a one-shot watch fires once
/// for many of them, and the watcher re-arms and re-reads, so its final view is the
/// true state, and replaying its events gives the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_watch_rearm_converges() {
    let zks = server();
    let url = zks.url("/rearm");
    let reg_w = Registry::new(session(&url, 10_000).await);
    let mut presence = reg_w.watch_agents(Duration::from_millis(300));
    let reg_1 = Registry::new(session(&url, 10_000).await);
    let reg_2 = Registry::new(session(&url, 10_000).await);
    for i in 0..100 {
        reg_1
            .register_agent(&format!("a{i}"), &agent("c1", i))
            .await
            .unwrap();
    }
    for i in 0..50 {
        reg_1.unregister_agent(&format!("a{i}")).await.unwrap();
    }
    // Ten removed ones come back on c2; ten live ones move to c2 (takeover: delete
    // and create in one transaction, so the name never disappears).
    for i in (0..10).chain(60..70) {
        reg_2
            .register_agent(&format!("a{i}"), &agent("c2", i))
            .await
            .unwrap();
    }
    let truth = reg_w.agents().await.unwrap();
    assert_eq!(truth.len(), 60);
    assert!(
        presence
            .wait_until(Duration::from_secs(10), |v| *v == truth)
            .await,
        "the view converges to the true state"
    );
    // Replay the events (after the grace, so the 40 removals are in).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut replay: BTreeMap<String, AgentInfo> = BTreeMap::new();
    while let Some(ev) = presence.try_next() {
        match ev {
            PresenceEvent::Online { host, info } => {
                replay.insert(host, info);
            }
            PresenceEvent::Offline { host } => {
                replay.remove(&host);
            }
        }
    }
    assert_eq!(replay, truth);
    assert_eq!(presence.snapshot(), truth);
    let rearms = presence.rearms();
    assert!(rearms > 1, "the watch was re-armed ({rearms})");
}

/// A three-node ensemble loses its leader: the session moves to a surviving server,
/// registrations survive, and the registry and queue keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_ensemble_survives_losing_a_node() {
    let mut ens =
        ZkEnsemble::start().unwrap_or_else(|e| panic!("cannot start a ZooKeeper ensemble: {e}"));
    let url = ens.url("/ensemble");
    let a = session(&url, 10_000).await;
    let reg = Registry::new(a.clone());
    let q = TaskQueue::new(a.clone());
    for i in 0..5 {
        reg.register_agent(&format!("n{i}"), &agent("c", i))
            .await
            .unwrap();
    }
    let watcher = Registry::new(session(&url, 10_000).await);
    let mut presence = watcher.watch_agents(Duration::from_secs(3));
    assert!(
        presence
            .wait_until(Duration::from_secs(10), |v| v.len() == 5)
            .await
    );
    let items: Vec<(&str, u64)> = (0..10).map(|t| ("n0", t)).collect();
    q.enqueue_batch(&items).await.unwrap();

    let leader = ens.leader().expect("the ensemble has a leader");
    let old_id = a.session_id();
    ens.stop(leader);
    ens.wait_quorum(Duration::from_secs(60)).unwrap();
    assert!(a.wait_connected(Duration::from_secs(30)).await);

    // Writes may meet a connection loss while the client moves: retry those.
    async fn retry<T, F: std::future::Future<Output = Result<T, ZkError>>>(
        mut op: impl FnMut() -> F,
    ) -> T {
        for _ in 0..100 {
            match op().await {
                Ok(v) => return v,
                Err(e) => {
                    eprintln!("retrying after: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        panic!("no success after 100 tries");
    }
    for i in 5..10 {
        let host = format!("n{i}");
        let info = agent("c", i);
        retry(|| reg.register_agent(&host, &info)).await;
    }
    for t in 10..20u64 {
        retry(|| q.enqueue("n0", t)).await;
    }
    assert_eq!(a.session_id(), old_id, "the session survived the node loss");
    assert!(
        presence
            .wait_until(Duration::from_secs(15), |v| v.len() == 10)
            .await,
        "presence keeps working"
    );
    let mut c = q.consumer("n0").unwrap();
    let mut firsts = Vec::new();
    while firsts.len() < 20 {
        let e = c
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("all entries are delivered");
        if !firsts.contains(&e.task) {
            firsts.push(e.task);
        }
        c.ack(&e).await.unwrap();
    }
    assert_eq!(firsts, (0..20).collect::<Vec<u64>>(), "in order");
    while let Some(ev) = presence.try_next() {
        assert!(
            matches!(ev, PresenceEvent::Online { .. }),
            "no offline event: {ev:?}"
        );
    }
}
