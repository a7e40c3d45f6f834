//! Piece-store benchmarks: the receiver's `pwrite` path into a preallocated staging
//! file, and the seed's mmap serving path. Both should run far above network speed;
//! if they do not, the disk side (not QUIC) is the bottleneck of a transfer.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use octopus_bench::write_test_file;
use octopus_transfer::manifest::{BuildOptions, Manifest};
use octopus_transfer::store::{Destination, PartialStore, SeedStore};

const FILE_SIZE: u64 = 256 << 20;
const PIECE: u32 = 1 << 20;
/// The node writes what each QUIC read returns, at most 64 KiB at a time.
const CHUNK: usize = 64 << 10;

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    write_test_file(&src, FILE_SIZE, 7).unwrap();
    let roots = vec![src.clone()];
    let opts = BuildOptions {
        piece_size: Some(PIECE),
        ..BuildOptions::default()
    };
    let manifest = Arc::new(Manifest::build(&roots, &opts).unwrap());
    let n = manifest.pieces().len() as u32;
    let seed = SeedStore::new(manifest.clone(), &roots);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = Destination::resolve(&manifest, &out).unwrap();
    let partial = PartialStore::open(manifest.clone(), dest).unwrap();
    let data = seed.read_piece(0).unwrap().to_vec();

    let mut g = c.benchmark_group("store");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(PIECE as u64));
    let mut i = 0u32;
    g.bench_function("partial_write/1MiB_piece", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            partial.write(i, 0, black_box(&data)).unwrap();
        })
    });
    g.bench_function("partial_write/1MiB_piece_in_64KiB_chunks", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            for (k, chunk) in data.chunks(CHUNK).enumerate() {
                partial
                    .write(i, (k * CHUNK) as u32, black_box(chunk))
                    .unwrap();
            }
        })
    });
    g.bench_function("seed_read_piece/1MiB_handle", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(seed.read_piece(i).unwrap())
        })
    });
    g.bench_function("seed_read_piece/1MiB_touch_all", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            let p = seed.read_piece(i).unwrap();
            black_box(p.iter().fold(0u8, |a, b| a ^ b))
        })
    });
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
