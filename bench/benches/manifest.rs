//! Manifest benchmarks: how fast `Manifest::build` hashes (MD5 is serial per stream,
//! so the thread count is the lever), and what encoding/decoding a big manifest
//! costs (a getter decodes and validates one before any piece moves).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use octopus_bench::write_test_file;
use octopus_transfer::manifest::{
    BuildOptions, Entry, EntryKind, Manifest, DEFAULT_SMALL_FILE_THRESHOLD, MANIFEST_VERSION,
};

const FILE_SIZE: u64 = 256 << 20;

fn build(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    write_test_file(&path, FILE_SIZE, 1).unwrap();
    let roots = vec![path];
    let mut g = c.benchmark_group("manifest_build");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(FILE_SIZE));
    for (name, threads) in [("256MiB/threads=1", 1), ("256MiB/threads=default", 0)] {
        let opts = BuildOptions {
            threads,
            ..BuildOptions::default()
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(Manifest::build(&roots, &opts).unwrap()))
        });
    }
    g.finish();
}

/// A tree of 100,000 small files in 100 directories plus one 8 GiB file in 8 MiB
/// pieces: about the size of a large software distribution.
fn large_manifest() -> Manifest {
    let mut entries = vec![Entry {
        path: "data".into(),
        mode: 0o755,
        kind: EntryKind::Dir,
    }];
    let mut seed = 0u8;
    let mut md5 = || {
        seed = seed.wrapping_add(1);
        [seed; 16]
    };
    for d in 0..100 {
        let dir = format!("data/dir{d:03}");
        entries.push(Entry {
            path: dir.clone(),
            mode: 0o755,
            kind: EntryKind::Dir,
        });
        for f in 0..1000 {
            entries.push(Entry {
                path: format!("{dir}/file{f:04}.conf"),
                mode: 0o644,
                kind: EntryKind::File {
                    size: 4096 + f,
                    md5: md5(),
                    pieces: Vec::new(),
                },
            });
        }
    }
    let piece_size: u32 = 8 << 20;
    let size: u64 = 8 << 30;
    entries.push(Entry {
        path: "data/image.iso".into(),
        mode: 0o644,
        kind: EntryKind::File {
            size,
            md5: md5(),
            pieces: (0..size.div_ceil(piece_size as u64))
                .map(|_| md5())
                .collect(),
        },
    });
    let m = Manifest {
        version: MANIFEST_VERSION,
        piece_size,
        small_file_threshold: DEFAULT_SMALL_FILE_THRESHOLD,
        entries,
    };
    m.validate().expect("synthetic manifest is valid");
    m
}

fn codec(c: &mut Criterion) {
    let m = large_manifest();
    let bytes = m.encode();
    let mut g = c.benchmark_group("manifest_codec");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode/100k_files", |b| b.iter(|| black_box(m.encode())));
    g.bench_function("decode+validate/100k_files", |b| {
        b.iter(|| black_box(Manifest::decode(black_box(&bytes)).unwrap()))
    });
    g.bench_function("pieces/100k_files", |b| b.iter(|| black_box(m.pieces())));
    g.finish();
}

criterion_group!(benches, build, codec);
criterion_main!(benches);
