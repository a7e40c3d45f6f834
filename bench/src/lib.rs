//! Criterion benchmarks live in `benches/`; see bench/README.md for figures.
