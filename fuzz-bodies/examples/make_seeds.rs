//! Writes the seeds that are easiest to encode with the real types: valid control
//! messages (`fuzz/seeds/control_decode/`) and store records
//! (`fuzz/seeds/store_records/`, the first byte picking the kind as in
//! `src/records.rs`). Re-run after a format change:
//! `cargo run -p octopus-fuzz-bodies --example make_seeds`. The other seeds come
//! from `fuzz/seeds/make_seeds.py`.

use std::collections::BTreeMap;
use std::path::Path;

use octopus_agent::hostinfo::Resources;
use octopus_agent::proto::{self, AgentMsg, CenterMsg, EnrollRequest};
use octopus_center::store::{
    self as redb, AuditEntry, HostRecord, HostResult, HostState, Scope, TaskRecord, TaskState,
    TokenRecord,
};
use octopus_center::zk::store::{self as zk, StateNode, TaskNode};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn kind(k: u8, mut v: Vec<u8>) -> Vec<u8> {
    v.insert(0, k);
    v
}

fn main() {
    write(
        "control_decode",
        "ok_enroll_request",
        &proto::encode(&EnrollRequest {
            token: "octo_aaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".into(),
            name: "h1".into(),
            public_key: vec![4; 65],
        }),
    );
    write(
        "control_decode",
        "ok_hello",
        &proto::encode(&AgentMsg::Hello {
            version: "0.1.0".into(),
            addrs: vec!["10.0.0.1".into()],
            tags: vec![("role".into(), "web".into())],
            resources: Resources::default(),
        }),
    );
    write(
        "control_decode",
        "ok_ack",
        &proto::encode(&AgentMsg::Ack { task: 7 }),
    );
    write(
        "control_decode",
        "ok_welcome",
        &proto::encode(&CenterMsg::Welcome {
            heartbeat_ms: 5000,
            centers: vec!["127.0.0.1:7400".into()],
            url_key: vec![1; 32],
        }),
    );
    write(
        "control_decode",
        "ok_cancel",
        &proto::encode(&CenterMsg::Cancel { task: 3 }),
    );

    let token = TokenRecord {
        id: "aaaaaaaaaaaaa".into(),
        secret_hash: [9; 32],
        scope: Scope::Operator,
        allow: vec!["10.0.0.0/8".into()],
        created_at: 1_700_000_000_000,
        expires_at: Some(1_800_000_000_000),
        one_time: true,
        uses: 0,
        revoked: false,
        note: "seed".into(),
        limits: Default::default(),
    };
    let host = HostRecord {
        name: "h1".into(),
        fingerprint: "ab".repeat(32),
        addrs: vec!["10.0.0.1".into()],
        tags: BTreeMap::from([("role".to_string(), "web".to_string())]),
        version: "0.1.0".into(),
        enrolled_at: 1,
        last_seen: 2,
        online: true,
        offline_since: None,
        resources: Some(vec![1, 2, 3]),
    };
    let task = TaskRecord {
        id: 42,
        created_at: 1,
        created_by: "aaaaaaaaaaaaa".into(),
        target: "role=web".into(),
        hosts: vec!["h1".into(), "h2".into()],
        body: vec![0, 1, 2],
        summary: "uptime".into(),
        ttl_ms: 3_600_000,
        batch: 1,
        max_failures: Some(0),
        state: TaskState::Running,
    };
    let mut result = HostResult::new(42, "h1".into(), HostState::Queued, 5);
    result.stdout = b"up 3 days\n".to_vec();
    let audit = AuditEntry {
        seq: 1,
        at: 2,
        token: "aaaaaaaaaaaaa".into(),
        addr: "127.0.0.1".into(),
        method: "POST".into(),
        path: "/api/v1/tasks".into(),
        status: 201,
        detail: "task 42".into(),
    };
    let s = "store_records";
    write(
        s,
        "ok_redb_token",
        &kind(0, redb::encode("tokens", &token).unwrap()),
    );
    write(
        s,
        "ok_redb_host",
        &kind(1, redb::encode("hosts", &host).unwrap()),
    );
    write(
        s,
        "ok_redb_task",
        &kind(2, redb::encode("tasks", &task).unwrap()),
    );
    write(
        s,
        "ok_redb_result",
        &kind(3, redb::encode("results", &result).unwrap()),
    );
    write(
        s,
        "ok_redb_audit",
        &kind(4, redb::encode("audit", &audit).unwrap()),
    );
    write(
        s,
        "ok_redb_counter",
        &kind(5, redb::encode("counters", &77u64).unwrap()),
    );
    write(
        s,
        "ok_zk_token",
        &kind(6, zk::encode("tokens", &token).unwrap()),
    );
    write(
        s,
        "ok_zk_host",
        &kind(7, zk::encode("hosts", &host).unwrap()),
    );
    let node = TaskNode {
        record: task,
        external_body: false,
    };
    write(
        s,
        "ok_zk_task",
        &kind(8, zk::encode("tasks", &node).unwrap()),
    );
    let state = StateNode {
        state: TaskState::Done,
        open: 0,
    };
    write(
        s,
        "ok_zk_state",
        &kind(9, zk::encode("state", &state).unwrap()),
    );
    write(
        s,
        "ok_zk_result",
        &kind(10, zk::encode("results", &result).unwrap()),
    );
    write(
        s,
        "ok_zk_audit",
        &kind(11, zk::encode("audit", &audit).unwrap()),
    );
    // A record cut short.
    let mut cut = redb::encode("tokens", &token).unwrap();
    cut.truncate(cut.len() - 3);
    write(s, "bad_redb_token_cut", &kind(0, cut));
}
