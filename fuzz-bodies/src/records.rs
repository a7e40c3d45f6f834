//! What the center reads back from its own storage, which a crash, a bad disk or
//! another center's bug may have corrupted: redb and ZooKeeper store records, and the
//! ZooKeeper queue's node names and body headers.

use octopus_center::store::{
    self as redb, AuditEntry, HostRecord, HostResult, TaskRecord, TokenRecord,
};
use octopus_center::zk::queue::{BodyHeader, QueueEntry, CHUNK_BYTES, MAX_BODY_BYTES};
use octopus_center::zk::store::{self as zk, StateNode, TaskNode};

/// A record decoded from storage re-encodes to bytes that decode to the same record.
fn redb_kind<T>(table: &'static str, data: &[u8]) -> bool
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(v) = redb::decode::<T>(table, data) else {
        return false;
    };
    let again = redb::encode(table, &v).expect("a decoded record encodes");
    assert_eq!(redb::decode::<T>(table, &again).unwrap(), v);
    true
}

fn zk_kind<T>(table: &'static str, max: usize, data: &[u8]) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Clone,
{
    let v = zk::decode::<T>(table, "/store/x", data, max).ok()?;
    assert!(
        data.len() <= max,
        "{} bytes decoded over the {max}-byte cap",
        data.len()
    );
    let again = zk::encode(table, &v).expect("a decoded record encodes");
    zk::decode::<T>(table, "/store/x", &again, usize::MAX).expect("a re-encoded record decodes");
    Some(v)
}

fn zk_eq<T>(table: &'static str, max: usize, data: &[u8]) -> bool
where
    T: serde::Serialize + serde::de::DeserializeOwned + Clone + PartialEq + std::fmt::Debug,
{
    let Some(v) = zk_kind::<T>(table, max, data) else {
        return false;
    };
    let again = zk::encode(table, &v).unwrap();
    assert_eq!(
        zk::decode::<T>(table, "/store/x", &again, usize::MAX).unwrap(),
        v
    );
    true
}

/// Store records read back. The first byte picks the kind (so the fuzzer explores
/// each), the rest is the stored value: 0-5 the redb tables (`tokens`, `hosts`,
/// `tasks`, `results`, `audit`, the `u64` columns), 6-11 the ZooKeeper store's
/// enveloped records under their read caps (tokens, hosts, task nodes, state nodes,
/// results, audit). Accepted: the value decoded as that kind.
pub fn store_records(data: &[u8]) -> bool {
    let Some((&kind, v)) = data.split_first() else {
        return false;
    };
    match kind % 12 {
        0 => redb_kind::<TokenRecord>("tokens", v),
        1 => redb_kind::<HostRecord>("hosts", v),
        2 => redb_kind::<TaskRecord>("tasks", v),
        3 => redb_kind::<HostResult>("results", v),
        4 => redb_kind::<AuditEntry>("audit", v),
        5 => redb_kind::<u64>("counters", v),
        6 => zk_eq::<TokenRecord>("tokens", zk::TOKEN_MAX, v),
        7 => zk_eq::<HostRecord>("hosts", zk::HOST_MAX, v),
        8 => {
            let Some(node) = zk_kind::<TaskNode>("tasks", zk::TASK_READ_MAX, v) else {
                return false;
            };
            let again = zk::encode("tasks", &node).unwrap();
            let back: TaskNode = zk::decode("tasks", "/store/x", &again, usize::MAX).unwrap();
            assert_eq!(back.record, node.record);
            assert_eq!(back.external_body, node.external_body);
            true
        }
        9 => zk_eq::<StateNode>("state", zk::STATE_READ_MAX, v),
        10 => zk_eq::<HostResult>("results", zk::RESULT_READ_MAX, v),
        _ => zk_eq::<AuditEntry>("audit", zk::AUDIT_MAX, v),
    }
}

/// The ZooKeeper queue: node names under `/queues/<host>` and body headers under
/// `/bodies/<task>`. A parsed name prints to a name that parses to the same entry,
/// with a sequence number a ZooKeeper counter can have; a header that passes its
/// checks claims at most `MAX_BODY_BYTES` in exactly the chunks that size needs.
/// Accepted: either decoded.
pub fn zk_queue(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(name) = std::str::from_utf8(data) {
        if let Some(e) = QueueEntry::parse(name) {
            accepted = true;
            assert!(e.seq <= i32::MAX as u64);
            assert_eq!(QueueEntry::parse(&e.node_name()), Some(e));
        }
    }
    if let Ok(h) = BodyHeader::decode(7, "/bodies/7", data) {
        accepted = true;
        let size = usize::try_from(h.size).unwrap();
        assert!(size <= MAX_BODY_BYTES);
        assert_eq!(h.chunks as usize, size.div_ceil(CHUNK_BYTES).max(1));
    }
    accepted
}
