//! Wire-format benchmarks: the control frames a node sends most (requests, the
//! bitfield sent on connect, tracker answers) and the fixed piece header in front of
//! every piece stream. These sit on the per-piece path, so they must stay far below
//! the cost of moving the piece itself.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use octopus_transfer::frame::{self, Frame, PeerRecord, PieceHeader, MAX_FRAME};
use octopus_transfer::manifest::ContentId;
use octopus_transfer::swarm::{Bitfield, PeerMsg};

fn frames() -> Vec<(&'static str, Frame)> {
    let mut bits = Bitfield::new(4096);
    for i in (0..4096).filter(|i| i % 3 != 0) {
        bits.set(i);
    }
    let peers = (0..50u8)
        .map(|i| PeerRecord {
            addr: format!("10.0.{i}.7:4000").parse().unwrap(),
            fingerprint: [i; 32],
        })
        .collect();
    vec![
        ("swarm_request", Frame::Swarm(PeerMsg::Request(123_456))),
        ("swarm_bitfield_4096", Frame::Swarm(PeerMsg::Bitfield(bits))),
        ("peers_50", Frame::Peers(peers)),
    ]
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, f) in frames() {
        let bytes = frame::encode(&f);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(frame::encode(black_box(&f))))
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| black_box(frame::decode(black_box(&bytes), MAX_FRAME).unwrap()))
        });
    }
    let h = PieceHeader {
        content: ContentId([0xab; 16]),
        piece: 77,
        len: 1 << 20,
    };
    let hb = h.encode();
    g.throughput(Throughput::Bytes(PieceHeader::LEN as u64));
    g.bench_function("encode/piece_header", |b| {
        b.iter(|| black_box(black_box(&h).encode()))
    });
    g.bench_function("decode/piece_header", |b| {
        b.iter(|| black_box(PieceHeader::decode(black_box(&hb)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
