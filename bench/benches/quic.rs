//! End-to-end benchmark: one sharer and one getter in this process, over real QUIC
//! on loopback, through the public `node::share`/`node::get` API. It measures what a
//! user sees for `octo get` of a 256 MiB file (handshake, manifest, pieces, final
//! whole-file MD5 and rename), minus the sharer's one-off hashing.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use octopus_bench::{fetch, share_file, write_test_file};

const FILE_SIZE: u64 = 256 << 20;

fn quic(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    write_test_file(&src, FILE_SIZE, 3).unwrap();
    let seed = rt.block_on(share_file(&src, None)).unwrap();

    let mut g = c.benchmark_group("quic_loopback");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(FILE_SIZE));
    g.bench_function("share_get/256MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let out = tempfile::tempdir_in(dir.path()).unwrap();
                let f = rt
                    .block_on(fetch(&seed, out.path(), None, Duration::from_secs(120)))
                    .unwrap();
                total += f.complete;
            }
            total
        })
    });
    g.finish();
    rt.block_on(seed.shutdown());
}

criterion_group!(benches, quic);
criterion_main!(benches);
