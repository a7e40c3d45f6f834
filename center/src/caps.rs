//! Caps on what the center accepts, stores and echoes, so that hostile or merely huge
//! input costs bounded disk and memory.
//!
//! * **Request text**: a command with its arguments is at most [`MAX_COMMAND`], a
//!   target expression at most [`MAX_TARGET`]; text quoted back in an error is cut to
//!   [`ECHO_MAX`], a task's summary (what listings show) to [`SUMMARY_MAX`].
//! * **Audit**: a path is stored cut to [`AUDIT_PATH_MAX`]; unauthenticated calls are
//!   stored one by one only up to [`UNAUTH_PER_MINUTE`] a minute, the rest are counted
//!   per source and written as one summary entry (see [`AuditGate`]); the log keeps the
//!   newest `--audit-keep` entries.
//! * **Disk**: writes are refused (507) while the data directory's filesystem has less
//!   than `--disk-reserve` free (see `redb_store`), so the store never fills the disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// A command and its arguments, together.
pub const MAX_COMMAND: usize = 64 << 10;
/// A target expression (a comma list of a few thousand host names fits).
pub const MAX_TARGET: usize = 64 << 10;
/// Text quoted back in an error message.
pub const ECHO_MAX: usize = 200;
/// A task's summary line (listings show it; the full command is in the task body).
pub const SUMMARY_MAX: usize = 200;
/// A request path as stored in the audit log.
pub const AUDIT_PATH_MAX: usize = 256;
/// Default number of audit entries kept (`--audit-keep`).
pub const DEFAULT_AUDIT_KEEP: u64 = 100_000;
/// Default free space kept on the data directory's filesystem (`--disk-reserve`).
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;
/// Unauthenticated calls audited one by one per minute; the rest are counted.
pub const UNAUTH_PER_MINUTE: u64 = 60;
/// Sources named in the summary of suppressed unauthenticated calls.
const UNAUTH_SOURCES: usize = 16;

/// `s` cut to at most `max` bytes (on a character boundary), saying how long it was.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether an I/O error means the disk (or the quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
}

/// What to do with one unauthenticated call's audit entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Store it; first store the summary of the calls suppressed before it, if any.
    Store(Option<String>),
    /// Only counted.
    Count,
}

#[derive(Debug, Default)]
struct Window {
    minute: u64,
    stored: u64,
    suppressed: u64,
    /// Suppressed calls per source address (at most [`UNAUTH_SOURCES`] named).
    sources: BTreeMap<String, u64>,
}

/// Rate cap on audit entries of unauthenticated calls: the first
/// [`UNAUTH_PER_MINUTE`] of each minute are stored, the others counted (with the
/// busiest sources) and summed up in one entry when the minute is over. Memory is
/// bounded whatever the flood.
#[derive(Debug, Default)]
pub struct AuditGate {
    w: Mutex<Window>,
}

impl AuditGate {
    pub fn admit(&self, now_ms: u64, addr: &str) -> Admit {
        let minute = now_ms / 60_000;
        let mut w = self.w.lock().unwrap();
        let summary = if w.minute != minute {
            let s = Self::summary(&w);
            *w = Window {
                minute,
                ..Window::default()
            };
            s
        } else {
            None
        };
        if w.stored < UNAUTH_PER_MINUTE {
            w.stored += 1;
            return Admit::Store(summary);
        }
        w.suppressed += 1;
        let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string();
        if let Some(n) = w.sources.get_mut(&ip) {
            *n += 1;
        } else if w.sources.len() < UNAUTH_SOURCES {
            w.sources.insert(ip, 1);
        }
        // A new minute always stores its first call, so no summary is pending here.
        debug_assert!(summary.is_none());
        Admit::Count
    }

    /// The summary of a finished minute, if calls were suppressed (for the sweeper).
    pub fn flush(&self, now_ms: u64) -> Option<String> {
        let mut w = self.w.lock().unwrap();
        if w.minute == now_ms / 60_000 {
            return None;
        }
        let s = Self::summary(&w);
        *w = Window {
            minute: now_ms / 60_000,
            ..Window::default()
        };
        s
    }

    fn summary(w: &Window) -> Option<String> {
        if w.suppressed == 0 {
            return None;
        }
        let by: Vec<String> = w.sources.iter().map(|(a, n)| format!("{a}={n}")).collect();
        Some(format!(
            "{} more unauthenticated calls in minute {} were not audited one by one; by source: {}",
            w.suppressed,
            w.minute,
            by.join(" ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_short_text_and_marks_long_text() {
        assert_eq!(cut("abc", 10), "abc");
        let long = "é".repeat(100);
        let c = cut(&long, 11);
        assert!(c.starts_with(&"é".repeat(5)), "{c}");
        assert!(c.ends_with("(200 bytes)"), "{c}");
    }

    #[test]
    fn the_gate_stores_a_few_a_minute_and_sums_up_the_rest() {
        let g = AuditGate::default();
        let t = 10 * 60_000;
        for _ in 0..UNAUTH_PER_MINUTE {
            assert_eq!(g.admit(t, "10.0.0.1:5"), Admit::Store(None));
        }
        for i in 0..1000 {
            assert_eq!(
                g.admit(t + 1, &format!("10.0.0.{}:5", i % 40)),
                Admit::Count
            );
        }
        assert_eq!(g.flush(t + 2), None, "the minute is not over");
        let s = g.flush(t + 60_000).expect("a summary");
        assert!(s.starts_with("1000 more unauthenticated calls"), "{s}");
        assert_eq!(s.matches('=').count(), UNAUTH_SOURCES, "{s}");
        assert_eq!(g.flush(t + 60_001), None);
        // The next minute starts fresh, and a pending summary rides on the next call.
        for _ in 0..UNAUTH_PER_MINUTE + 3 {
            g.admit(t + 60_002, "x:1");
        }
        match g.admit(t + 120_000, "x:1") {
            Admit::Store(Some(s)) => assert!(s.starts_with("3 more"), "{s}"),
            other => panic!("{other:?}"),
        }
    }
}
