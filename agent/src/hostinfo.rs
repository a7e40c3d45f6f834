//! Host facts for heartbeats: resource usage, the host name and the addresses the
//! center can reach the agent on.
//!
//! Why this shape:
//! - Everything comes straight from `/proc`, `statvfs` and `getifaddrs`: no crate,
//!   no subprocess, cheap enough to run on every heartbeat.
//! - CPU usage is a *rate*, so it needs two readings of `/proc/stat`. [`Sampler`]
//!   keeps the previous one and reports the usage since the last call, which for a
//!   heartbeat loop is the usage over the heartbeat interval.
//! - A heartbeat must never take the agent down: odd or missing `/proc` content (old
//!   kernels, containers, gVisor) yields zeros, never a panic or an error. The
//!   parsers work on strings so that this is tested directly.
//! - Addresses skip IPv6 link-local ones: an `IpAddr` cannot carry the scope id that
//!   dialling them needs. Loopback is reported only when nothing else exists, so a
//!   single-host test setup still has an address.

use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A resource snapshot. Byte counts are bytes; `cpu_pct` is 0..=100 over all CPUs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Busy share of all CPUs since the previous sample.
    pub cpu_pct: f32,
    pub mem_total: u64,
    /// `MemTotal - MemAvailable`: memory the kernel could not hand out right now.
    pub mem_used: u64,
    /// Size of the filesystem holding the sampled path.
    pub disk_total: u64,
    pub disk_used: u64,
    pub load1: f32,
    pub load5: f32,
    pub load15: f32,
    /// The agent's own resident set size.
    pub rss: u64,
}

/// Aggregate CPU time counters from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuTimes {
    total: u64,
    idle: u64,
}

/// Samples [`Resources`]; see the module docs for why it keeps state.
#[derive(Debug)]
pub struct Sampler {
    prev: CpuTimes,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// Takes the first CPU reading, so the first [`Sampler::sample`] reports the usage
    /// since now.
    pub fn new() -> Sampler {
        Sampler {
            prev: read_cpu_times(),
        }
    }

    /// Reads every resource; disk figures are for the filesystem holding `disk_path`.
    pub fn sample(&mut self, disk_path: &Path) -> Resources {
        let now = read_cpu_times();
        let cpu_pct = cpu_usage(self.prev, now);
        self.prev = now;
        let (mem_total, mem_used) = parse_meminfo(&read_proc("/proc/meminfo"));
        let (disk_total, disk_used) = disk_usage(disk_path);
        let (load1, load5, load15) = parse_loadavg(&read_proc("/proc/loadavg"));
        let rss = parse_status_kb(&read_proc("/proc/self/status"), "VmRSS") * 1024;
        Resources {
            cpu_pct,
            mem_total,
            mem_used,
            disk_total,
            disk_used,
            load1,
            load5,
            load15,
            rss,
        }
    }
}

/// The file's content, or "" if it cannot be read.
fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn read_cpu_times() -> CpuTimes {
    parse_stat(&read_proc("/proc/stat"))
}

/// Parses `cpu  user nice system idle iowait irq softirq steal guest guest_nice`.
/// Guest time is already counted in user time, so only the first eight count.
fn parse_stat(stat: &str) -> CpuTimes {
    let Some(line) = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
    else {
        return CpuTimes::default();
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    CpuTimes {
        total: fields.iter().fold(0u64, |a, &b| a.saturating_add(b)),
        idle: field(3).saturating_add(field(4)),
    }
}

/// Busy percentage between two readings; 0 when no time passed or counters went
/// backwards (a `/proc/stat` that could not be read reads as all zeros).
fn cpu_usage(prev: CpuTimes, now: CpuTimes) -> f32 {
    let total = now.total.saturating_sub(prev.total);
    let idle = now.idle.saturating_sub(prev.idle);
    if total == 0 || now.total < prev.total {
        return 0.0;
    }
    let busy = total.saturating_sub(idle);
    ((busy as f64 / total as f64) * 100.0).clamp(0.0, 100.0) as f32
}

/// A `Key: <n> kB` line of `/proc/meminfo` or `/proc/self/status`, in kB (0 if
/// absent).
fn parse_status_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (k, rest) = line.split_once(':')?;
            (k.trim() == key).then(|| rest.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// `(total, used)` in bytes. Kernels before 3.14 have no `MemAvailable`; there the
/// free, buffer and page-cache memory stands in for it.
fn parse_meminfo(meminfo: &str) -> (u64, u64) {
    let kb = |key| parse_status_kb(meminfo, key);
    let total = kb("MemTotal");
    let available = if meminfo.lines().any(|l| l.starts_with("MemAvailable:")) {
        kb("MemAvailable")
    } else {
        kb("MemFree") + kb("Buffers") + kb("Cached")
    };
    (
        total.saturating_mul(1024),
        total.saturating_sub(available).saturating_mul(1024),
    )
}

fn parse_loadavg(loadavg: &str) -> (f32, f32, f32) {
    let mut it = loadavg.split_whitespace().map(|f| {
        f.parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
    });
    (
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    )
}

/// `(total, used)` bytes of the filesystem holding `path`, as `df` counts them
/// (used = all blocks minus free blocks); zeros if `statvfs` fails.
fn disk_usage(path: &Path) -> (u64, u64) {
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: an all-zero statvfs is a valid value, overwritten by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize as u64;
    let blocks = st.f_blocks as u64;
    let free = st.f_bfree as u64;
    (
        blocks.saturating_mul(frsize),
        blocks.saturating_sub(free).saturating_mul(frsize),
    )
}

/// The kernel's host name (`uname -n`); "localhost" if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its full length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        // POSIX leaves a truncated name possibly unterminated; the last byte stays 0.
        buf[buf.len() - 1] = 0;
        if let Ok(name) = CStr::from_bytes_until_nul(&buf) {
            let name = name.to_string_lossy();
            if !name.is_empty() {
                return name.into_owned();
            }
        }
    }
    "localhost".to_owned()
}

/// The addresses of the interfaces that are up, without loopback and IPv6
/// link-local ones; loopback addresses only if there is nothing else. Empty if
/// `getifaddrs` fails.
pub fn addresses() -> Vec<IpAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `ifap` is a valid out-pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose real type
        // is given by its family, checked before each cast.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    // SAFETY: `ifap` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    select_addresses(found)
}

/// The policy half of [`addresses`], separate so it can be tested on any list.
fn select_addresses(all: Vec<IpAddr>) -> Vec<IpAddr> {
    let is_link_local_v6 =
        |ip: &IpAddr| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    let usable: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_link_local_v6(ip))
        .collect();
    if usable.is_empty() {
        all.into_iter().filter(IpAddr::is_loopback).collect()
    } else {
        usable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_plausible() {
        let mut sampler = Sampler::new();
        // Burn some CPU so the interval is not empty.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let dir = tempfile::tempdir().unwrap();
        let r = sampler.sample(dir.path());
        let r2 = sampler.sample(Path::new("/"));
        for r in [&r, &r2] {
            assert!((0.0..=100.0).contains(&r.cpu_pct), "{r:?}");
            assert!(r.mem_total > 0, "{r:?}");
            assert!(r.mem_used > 0 && r.mem_used <= r.mem_total, "{r:?}");
            assert!(r.disk_total > 0 && r.disk_used <= r.disk_total, "{r:?}");
            assert!(r.rss > 1 << 20, "{r:?}");
            assert!(r.load1 >= 0.0 && r.load5 >= 0.0 && r.load15 >= 0.0, "{r:?}");
        }
        assert!(r.rss < r.mem_total);
    }

    #[test]
    fn missing_disk_path_gives_zeros() {
        let mut sampler = Sampler::new();
        let r = sampler.sample(Path::new("/nonexistent-octo-path"));
        assert_eq!((r.disk_total, r.disk_used), (0, 0));
        assert!(r.mem_total > 0);
    }

    #[test]
    fn cpu_usage_from_stat_lines() {
        let a = parse_stat("cpu  100 0 100 700 100 0 0 0 50 0\ncpu0 1 2 3 4\n");
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                idle: 800
            }
        );
        let b = parse_stat("cpu  400 0 100 1300 100 0 0 0 50 0\n");
        // 900 more ticks, 600 of them idle: one third busy.
        assert!((cpu_usage(a, b) - 33.333).abs() < 0.01);
        assert_eq!(cpu_usage(a, a), 0.0);
        assert_eq!(cpu_usage(b, a), 0.0, "counters going backwards");
        assert_eq!(cpu_usage(a, CpuTimes::default()), 0.0);
    }

    #[test]
    fn odd_proc_content_gives_zeros() {
        assert_eq!(parse_stat(""), CpuTimes::default());
        assert_eq!(parse_stat("cpu0 1 2 3\n"), CpuTimes::default());
        assert_eq!(parse_stat("cpu x y"), CpuTimes::default());
        assert_eq!(parse_stat("cpu 5 5"), CpuTimes { total: 10, idle: 0 });
        assert_eq!(parse_meminfo(""), (0, 0));
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), (0, 0));
        assert_eq!(parse_loadavg(""), (0.0, 0.0, 0.0));
        assert_eq!(parse_loadavg("0.5 nan"), (0.5, 0.0, 0.0));
        assert_eq!(parse_status_kb("VmRSS:\n", "VmRSS"), 0);
        assert_eq!(parse_status_kb("Name:\tx\n", "VmRSS"), 0);
    }

    #[test]
    fn meminfo_used_is_total_minus_available() {
        let m = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:   600 kB\n";
        assert_eq!(parse_meminfo(m), (1000 * 1024, 400 * 1024));
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n";
        assert_eq!(parse_meminfo(old), (1000 * 1024, 600 * 1024));
    }

    #[test]
    fn loadavg_and_status_fields() {
        assert_eq!(
            parse_loadavg("1.39 1.32 1.13 3/111 23248\n"),
            (1.39, 1.32, 1.13)
        );
        let status = "Name:\tocto\nVmPeak:\t  9000 kB\nVmRSS:\t    2180 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), 2180);
    }

    #[test]
    fn hostname_matches_the_kernel() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), kernel.trim_end());
    }

    #[test]
    fn addresses_are_real_and_not_loopback_unless_alone() {
        let addrs = addresses();
        assert!(!addrs.is_empty());
        let only_loopback = addrs.iter().all(IpAddr::is_loopback);
        if !only_loopback {
            assert!(addrs.iter().all(|a| !a.is_loopback()), "{addrs:?}");
        }
        // Each one is assigned to this host: binding to it works.
        for addr in addrs {
            std::net::UdpSocket::bind((addr, 0)).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
    }

    #[test]
    fn address_policy() {
        let lo4: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let ll6: IpAddr = "fe80::1".parse().unwrap();
        let pub4: IpAddr = "10.1.2.3".parse().unwrap();
        let pub6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            select_addresses(vec![lo4, pub4, ll6, lo6, pub6]),
            vec![pub4, pub6]
        );
        assert_eq!(select_addresses(vec![lo4, ll6, lo6]), vec![lo4, lo6]);
        assert_eq!(select_addresses(vec![]), Vec::<IpAddr>::new());
    }
}
