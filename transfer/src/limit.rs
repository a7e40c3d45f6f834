//! Token-bucket rate limits on upload and download, per node and per transfer.
//!
//! Built on governor, minding its pitfalls (see the design card): one cell is 1 KiB
//! (with 1 cell = 1 byte, rates above 1e9/s are silently capped and rounding inflates
//! rates); the quota is a period in nanoseconds computed from the byte rate, which for
//! 1 KiB cells is exact for decimal rates such as 1 MB/s; the burst is set explicitly
//! (50 ms of traffic, at least 64 KiB) and a caller never asks for more cells than the
//! burst in one call: [`Limiter::acquire`] splits large requests. Sub-cell remainders
//! are carried over, so many small chunks are charged exactly.
//!
//! Every limiter counts the bytes it was asked to charge ([`Limiter::charged`]), so a
//! test or a report can show that a transfer's bytes really went through it; the
//! timing (that charging them takes the time the rate says) is measured by the
//! `limit-bench` command in `bench/`, not asserted by tests.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

const CELL: u64 = 1024;

type Bucket = RateLimiter<NotKeyed, InMemoryState, MonotonicClock>;

/// One token bucket, cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Limiter {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    bucket: Bucket,
    clock: MonotonicClock,
    burst_cells: u32,
    /// Bytes charged but not yet rounded up to a whole cell.
    carry: AtomicU64,
    /// Every byte [`Limiter::acquire`] was given, in total.
    charged: AtomicU64,
    rate: u64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => write!(f, "Limiter({} B/s)", i.rate),
            None => f.write_str("Limiter(unlimited)"),
        }
    }
}

impl Limiter {
    pub fn unlimited() -> Limiter {
        Limiter { inner: None }
    }

    /// A limit of `rate` bytes per second; `None` or 0 means unlimited.
    pub fn new(rate: Option<u64>) -> Limiter {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            return Limiter::unlimited();
        };
        let period_ns = ((CELL as u128 * 1_000_000_000) / rate as u128).max(1) as u64;
        let burst_bytes = (rate / 20).max(64 * CELL);
        let burst_cells = (burst_bytes / CELL).min(u32::MAX as u64) as u32;
        let quota = Quota::with_period(Duration::from_nanos(period_ns))
            .expect("period is non-zero")
            .allow_burst(NonZeroU32::new(burst_cells).expect("burst is at least 64"));
        let clock = MonotonicClock;
        Limiter {
            inner: Some(Arc::new(Inner {
                bucket: RateLimiter::direct_with_clock(quota, clock.clone()),
                clock,
                burst_cells,
                carry: AtomicU64::new(0),
                charged: AtomicU64::new(0),
                rate,
            })),
        }
    }

    pub fn rate(&self) -> Option<u64> {
        self.inner.as_ref().map(|i| i.rate)
    }

    /// The bytes charged to this limiter so far (0 for an unlimited one, which charges
    /// nothing).
    pub fn charged(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.charged.load(Ordering::Relaxed))
    }

    /// Wait until `bytes` may pass.
    pub async fn acquire(&self, bytes: u64) {
        let Some(inner) = &self.inner else { return };
        inner.charged.fetch_add(bytes, Ordering::Relaxed);
        // Add the bytes and take the whole cells in one atomic step: a separate add
        // and subtract let two concurrent callers both take the same cells, which
        // drove the carry below zero (it wrapped, and the next caller waited forever).
        let mut cells = 0;
        let _ = inner
            .carry
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                let total = c.saturating_add(bytes);
                cells = total / CELL;
                Some(total % CELL)
            });
        if cells == 0 {
            return;
        }
        while cells > 0 {
            let n = cells.min(inner.burst_cells as u64) as u32;
            let n = NonZeroU32::new(n).expect("n > 0");
            // Waiting is done with tokio's timer rather than governor's
            // `until_n_ready`, whose futures-timer thread stalled piece streams here.
            loop {
                match inner.bucket.check_n(n) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        tokio::time::sleep(not_until.wait_time_from(inner.clock.now())).await;
                    }
                    // Cannot happen: n never exceeds the burst.
                    Err(_) => break,
                }
            }
            cells -= n.get() as u64;
        }
    }
}

/// Several limiters that all apply (for example, the node's and the transfer's).
#[derive(Clone, Debug, Default)]
pub struct LimitSet {
    limiters: Vec<Limiter>,
}

impl LimitSet {
    pub fn new(limiters: impl IntoIterator<Item = Limiter>) -> LimitSet {
        LimitSet {
            limiters: limiters.into_iter().filter(|l| l.inner.is_some()).collect(),
        }
    }
    pub async fn acquire(&self, bytes: u64) {
        for l in &self.limiters {
            l.acquire(bytes).await;
        }
    }
    pub fn is_unlimited(&self) -> bool {
        self.limiters.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid rate {0:?}: use a number with an optional unit, e.g. 500KB, 10MB, 100Mbit, 1GiB (bytes per second unless the unit ends in `bit`)")]
pub struct RateError(pub String);

/// Parse a rate. Units ending in `bit` (`kbit`, `Mbit`, `Gbit`) are **bits** per
/// second; every other unit is **bytes** per second: `KB`/`MB`/`GB` are decimal
/// (1000), `KiB`/`MiB`/`GiB` binary (1024), `K`/`M`/`G` are taken as binary bytes.
/// A bare number is bytes per second. An optional `/s` or `ps` suffix is ignored.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let err = || RateError(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "K" | "k" | "KiB" | "kiB" => 1024.0,
        "M" | "m" | "MiB" => 1024.0 * 1024.0,
        "G" | "g" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "bit" => 1.0 / 8.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" | "mbit" => 1e6 / 8.0,
        "Gbit" | "gbit" => 1e9 / 8.0,
        _ => return Err(err()),
    };
    let v = num * mult;
    if !v.is_finite() || !(1.0..=1e13).contains(&v) {
        return Err(err());
    }
    Ok(v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole cells taken from the bucket so far plus the carry: what was really charged.
    fn cells_and_carry(l: &Limiter) -> (u64, u64) {
        let inner = l.inner.as_ref().unwrap();
        let carry = inner.carry.load(Ordering::Relaxed);
        // The bucket holds `burst` cells when full; each charged cell empties one.
        let mut free = 0u64;
        while matches!(
            inner.bucket.check_n(NonZeroU32::new(1).unwrap()),
            Ok(Ok(()))
        ) {
            free += 1;
        }
        (inner.burst_cells as u64 - free, carry)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_acquires_charge_every_byte_once() {
        // 8 tasks charging odd sizes at once must neither lose nor double-count:
        // 8 x 1000 x 1500 B = 12 MB at 1 GB/s, never stuck.
        let l = Limiter::new(Some(1_000_000_000));
        let mut hs = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            hs.push(tokio::spawn(async move {
                for _ in 0..1000 {
                    l.acquire(1500).await;
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let inner = l.inner.as_ref().unwrap();
        assert!(inner.carry.load(Ordering::Relaxed) < CELL, "carry wrapped");
        assert_eq!(l.charged(), 8 * 1000 * 1500);
        assert_eq!(
            inner.carry.load(Ordering::Relaxed),
            (8 * 1000 * 1500) % CELL,
            "every byte reached the bucket as whole cells plus the carry"
        );
    }

    #[test]
    fn rates_parse_bits_and_bytes() {
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert_eq!(parse_rate("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_rate("100Mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_rate("512K").unwrap(), 512 * 1024);
        assert_eq!(parse_rate("1.5MB/s").unwrap(), 1_500_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn limiter_charges_small_chunks_exactly() {
        // 1 B/s: the bucket (64 cells) refills one cell in 1024 s, so what it lacks
        // after the test is exactly what was charged.
        let l = Limiter::new(Some(1));
        for _ in 0..300 {
            l.acquire(100).await;
        }
        assert_eq!(l.charged(), 30_000);
        let (cells, carry) = cells_and_carry(&l);
        assert_eq!(cells * CELL + carry, 30_000, "{cells} cells + {carry}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unlimited_charges_nothing_and_a_set_charges_each_member() {
        let u = Limiter::unlimited();
        u.acquire(5000).await;
        assert_eq!(u.charged(), 0);
        let (a, b) = (Limiter::new(Some(1 << 30)), Limiter::new(Some(1 << 30)));
        let set = LimitSet::new([a.clone(), u, b.clone()]);
        set.acquire(7000).await;
        set.acquire(1).await;
        assert_eq!((a.charged(), b.charged()), (7001, 7001));
    }
}
