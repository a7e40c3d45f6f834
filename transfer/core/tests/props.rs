//! Property test: any sequence of inputs, however absurd, leaves a `Swarm` whose
//! invariants hold, and never panics. The inputs deliberately include out-of-range
//! indices, unknown peers, repeated and stale messages.

use std::time::{Duration, Instant};

use octopus_swarm::{Bitfield, Config, PeerMsg, Swarm};
use proptest::prelude::*;

const PIECES: u32 = 12;

#[derive(Debug, Clone)]
enum Op {
    /// A fresh peer connects and (usually) sends its bitfield at once.
    Connect(Option<Vec<bool>>),
    Lost(u64),
    Bitfield(u64, Vec<bool>),
    BadBitfield(u64, u32),
    Have(u64, u32),
    Request(u64, u32),
    Cancel(u64, u32),
    Reject(u64, u32),
    Received(u64, u32, bool),
    Failed(u64, u32),
    UploadFinished(u64, u32),
    Advance(u64),
    DrainUploads,
}

fn op() -> impl Strategy<Value = Op> {
    // Indices into the peers connected so far (or, past their end, unknown ids).
    let peer = 0u64..8;
    let piece = 0u32..PIECES + 2;
    prop_oneof![
        2 => proptest::option::weighted(0.9, proptest::collection::vec(any::<bool>(), PIECES as usize))
            .prop_map(Op::Connect),
        1 => peer.clone().prop_map(Op::Lost),
        1 => (peer.clone(), proptest::collection::vec(any::<bool>(), PIECES as usize))
            .prop_map(|(p, b)| Op::Bitfield(p, b)),
        1 => (peer.clone(), 0u32..PIECES + 3).prop_map(|(p, n)| Op::BadBitfield(p, n)),
        3 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Have(p, i)),
        3 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Request(p, i)),
        1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Cancel(p, i)),
        1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Reject(p, i)),
        3 => (peer.clone(), piece.clone(), prop::bool::weighted(0.85))
            .prop_map(|(p, i, ok)| Op::Received(p, i, ok)),
        1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Failed(p, i)),
        2 => (peer, piece).prop_map(|(p, i)| Op::UploadFinished(p, i)),
        2 => (0u64..3000).prop_map(Op::Advance),
        1 => Just(Op::DrainUploads),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_any_inputs(
        start in proptest::collection::vec(any::<bool>(), PIECES as usize),
        ops in proptest::collection::vec(op(), 1..120),
        seed in any::<u64>(),
    ) {
        let base = Instant::now();
        let mut t = Duration::ZERO;
        let mut have = Bitfield::new(PIECES);
        for (i, _) in start.iter().enumerate().filter(|(_, b)| **b) {
            have.set(i as u32);
        }
        let config = Config {
            max_requests_per_peer: 3,
            max_requests_total: 5,
            upload_slots: 2,
            max_queued_requests_per_peer: 2,
            request_timeout: Duration::from_secs(1),
            endgame_max_duplicates: 2,
            rng_seed: seed,
        };
        let mut s = Swarm::new(config, PIECES, have, base);
        let mut uploads = Vec::new();
        let mut ids: Vec<u64> = Vec::new();
        let (mut completed, mut max_requests) = (0, 0);
        let bitfield = |bits: &[bool]| {
            let mut b = Bitfield::new(PIECES);
            for (i, _) in bits.iter().enumerate().filter(|(_, x)| **x) {
                b.set(i as u32);
            }
            b
        };
        for op in ops {
            let now = base + t;
            // Mostly the most recent peers, sometimes an old (maybe departed) or unknown one.
            let pick = |k: u64| -> u64 {
                let k = k as usize;
                if k < ids.len() { ids[ids.len() - 1 - k] } else { 1000 + k as u64 }
            };
            match op {
                Op::Connect(bits) => {
                    let p = ids.len() as u64 + 1;
                    ids.push(p);
                    s.handle_peer_connected(now, p);
                    if let Some(bits) = bits {
                        s.handle_message(now, p, PeerMsg::Bitfield(bitfield(&bits)));
                    }
                }
                Op::Lost(p) => s.handle_peer_lost(now, pick(p)),
                Op::Bitfield(p, bits) => s.handle_message(now, pick(p), PeerMsg::Bitfield(bitfield(&bits))),
                Op::BadBitfield(p, n) => {
                    s.handle_message(now, pick(p), PeerMsg::Bitfield(Bitfield::full(n)))
                }
                Op::Have(p, i) => s.handle_message(now, pick(p), PeerMsg::Have(i)),
                Op::Request(p, i) => s.handle_message(now, pick(p), PeerMsg::Request(i)),
                Op::Cancel(p, i) => s.handle_message(now, pick(p), PeerMsg::Cancel(i)),
                Op::Reject(p, i) => s.handle_message(now, pick(p), PeerMsg::Reject(i)),
                Op::Received(p, i, ok) => {
                    let p = pick(p);
                    // Mostly answer a real outstanding request, as a peer would.
                    let i = (0..PIECES).map(|k| (i + k) % PIECES).find(|&k| s.is_expected(p, k)).unwrap_or(i);
                    let expected = s.is_expected(p, i);
                    let before = s.stats();
                    s.handle_piece_received(now, p, i, ok);
                    if expected && ok {
                        prop_assert!(s.have().get(i));
                        prop_assert!(!s.is_expected(p, i));
                    }
                    if expected && !ok {
                        prop_assert_eq!(s.stats().corrupt_pieces_received, before.corrupt_pieces_received + 1);
                        prop_assert!(!s.is_expected(p, i), "banned peer still expected");
                    }
                }
                Op::Failed(p, i) => s.handle_piece_failed(now, pick(p), i),
                Op::UploadFinished(p, i) => s.handle_upload_finished(now, pick(p), i),
                Op::Advance(ms) => {
                    t += Duration::from_millis(ms);
                    s.handle_timeout(base + t);
                    if let Some(deadline) = s.poll_timeout() {
                        prop_assert!(deadline > base + t, "an expired request survived handle_timeout");
                    }
                }
                Op::DrainUploads => {
                    for (p, i) in uploads.drain(..) {
                        s.handle_upload_finished(now, p, i);
                    }
                }
            }
            while let Some(tx) = s.poll_transmit() {
                if let octopus_swarm::Transmit::Upload { peer, piece } = tx {
                    prop_assert!(s.have().get(piece), "uploading a piece we lack");
                    uploads.push((peer, piece));
                }
            }
            while s.poll_event().is_some() {}
            if let Err(e) = s.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            let st = s.stats();
            completed = completed.max(st.pieces_have);
            max_requests = max_requests.max(st.requests_in_flight);
        }
        // Coverage canaries, not properties: printed with --nocapture.
        if std::env::var_os("PROPS_VERBOSE").is_some() {
            println!("peers {} have {completed} max_requests {max_requests}", ids.len());
        }
    }
}

/// A request for a piece we already sent often must not wait forever behind a steady
/// stream of requests for fresher pieces: it is served within a bounded number of
/// uploads (16 x the slots), long before its requester would time it out.
#[test]
fn an_often_sent_piece_is_not_starved_by_fresher_requests() {
    let now = Instant::now();
    let n = 200;
    let config = Config {
        upload_slots: 1,
        ..Config::default()
    };
    let mut s = Swarm::new(config, n, Bitfield::full(n), now);
    for p in 1..=3 {
        s.handle_peer_connected(now, p);
        s.handle_message(now, p, PeerMsg::Bitfield(Bitfield::new(n)));
    }
    while s.poll_transmit().is_some() {}
    // Peer 1 takes piece 0 (the only slot); peer 2 then asks for it too and queues.
    s.handle_message(now, 1, PeerMsg::Request(0));
    s.handle_message(now, 2, PeerMsg::Request(0));
    let mut current = (1u64, 0u32);
    let mut served_after = None;
    for i in 1..100u32 {
        // Peer 3 keeps a fresh, never-sent piece queued at all times.
        s.handle_message(now, 3, PeerMsg::Request(i));
        while s.poll_transmit().is_some() {}
        s.handle_upload_finished(now, current.0, current.1);
        let started: Vec<(u64, u32)> = std::iter::from_fn(|| s.poll_transmit())
            .filter_map(|t| match t {
                octopus_swarm::Transmit::Upload { peer, piece } => Some((peer, piece)),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1, "one slot, one upload at a time");
        current = started[0];
        if current == (2, 0) {
            served_after = Some(i);
            break;
        }
    }
    let after = served_after.expect("peer 2's request was never served");
    assert!(after <= 17, "served only after {after} other uploads");
    s.check_invariants().unwrap();
}
