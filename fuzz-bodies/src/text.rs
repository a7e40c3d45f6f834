//! The text parsers fed by API callers, HTTP clients, the command line and agents'
//! enroll tokens.

use std::path::Component;

use octopus_agent::daemon::parse_enroll_token;
use octopus_center::auth::{self, Cidr, TOKEN_PREFIX};
use octopus_center::center::Batch;
use octopus_center::target::Target;

use crate::utf8_prefix;

/// Targets, tokens, CIDRs, the signed-URL check, upload paths (`cp --async`) and
/// ZooKeeper URLs. A parsed target prints to text that parses back to the same
/// target; an accepted upload path stays relative and normal; no signature verifies
/// against a key nobody holds. Accepted: the target parsed.
pub fn target_parse(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let mut accepted = false;
    if let Ok(t) = Target::parse(s) {
        accepted = true;
        let again = Target::parse(&t.to_string()).expect("printed target parses");
        assert_eq!(again.to_string(), t.to_string());
    }
    let _ = auth::parse_token(s);
    let _ = s.parse::<Cidr>();
    // Any md5 / signature text against a fixed public key: an error, never a panic.
    let mut k = s.len().min(32);
    while !s.is_char_boundary(k) {
        k -= 1;
    }
    let (md5, sig) = s.split_at(k);
    let pk = [7u8; 32];
    assert!(octopus_agent::urlsig::verify(&pk, md5, u64::MAX, sig, 0).is_err());
    if let Ok(p) = octopus_center::content::check_rel_path(s) {
        assert!(p.is_relative());
        assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
    }
    let _ = octopus_center::zk::ZkUrl::parse(s);
    accepted
}

/// The agent pool's `Range` header. Input: the file length in decimal on the first
/// line, the header after it. A satisfiable range lies inside the file, start before
/// end; a `bytes=A-B` range starts at A. Accepted: a range came back.
pub fn pool_range(data: &[u8]) -> bool {
    let s = utf8_prefix(data);
    let (len, header) = match s.split_once('\n') {
        Some((l, h)) => match l.parse::<u64>() {
            Ok(len) => (len, h),
            Err(_) => (1000, s),
        },
        None => (1000, s),
    };
    assert_eq!(octopus_agent::pool::parse_range(None, len), Ok(None));
    match octopus_agent::pool::parse_range(Some(header), len) {
        Ok(Some((start, end))) => {
            assert!(
                start <= end,
                "range {start}-{end} of {header:?} is reversed"
            );
            assert!(
                end < len,
                "range {start}-{end} of {header:?} ends past {len}"
            );
            let spec = header.trim().strip_prefix("bytes=").unwrap();
            let (a, _) = spec.split_once('-').unwrap();
            if !a.trim().is_empty() {
                assert_eq!(a.trim().parse::<u64>().ok(), Some(start));
            }
            true
        }
        Ok(None) => panic!("a header {header:?} gave no range and no error"),
        Err(()) => false,
    }
}

/// Task rollout batches (`"batch"` in a task request): a count of at least one or a
/// percentage in 1..=100. Accepted: it parsed.
pub fn batch_parse(data: &[u8]) -> bool {
    match utf8_prefix(data).parse::<Batch>() {
        Ok(Batch::Count(n)) => {
            assert!(n >= 1);
            true
        }
        Ok(Batch::Percent(p)) => {
            assert!((1..=100).contains(&p));
            true
        }
        Ok(Batch::All) => panic!("text never parses to Batch::All"),
        Err(_) => false,
    }
}

/// A fetch's destination, checked by the agent before it writes as root: absolute,
/// no `.` or `..` component, returned unchanged. Accepted: the agent takes it.
pub fn check_dest(data: &[u8]) -> bool {
    let dest = utf8_prefix(data);
    let Ok(p) = octopus_agent::fetch::check_dest(dest) else {
        return false;
    };
    assert_eq!(p.as_os_str(), dest);
    assert!(p.is_absolute());
    assert!(
        !dest.split('/').any(|c| c == "." || c == ".."),
        "{dest:?} was accepted with a `.` or `..`"
    );
    assert!(p
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
    true
}

/// `--limit-up`/`--limit-down` and the agent-wide limits: a rate is at least 1 byte
/// per second and at most 10^13. Accepted: it parsed.
pub fn parse_rate(data: &[u8]) -> bool {
    match octopus_transfer::limit::parse_rate(utf8_prefix(data)) {
        Ok(v) => {
            assert!((1..=10_000_000_000_000).contains(&v), "rate {v}");
            true
        }
        Err(_) => false,
    }
}

/// Enroll tokens: the agent splits `octo_<id>_<secret>.<CA sha256 hex>` (from argv,
/// a file or the environment), and the center parses the token part it is sent.
/// What parses prints back to the same text (hex in either case), so no two texts
/// name one fingerprint or one token. Accepted: the agent took the token.
pub fn enroll_token(data: &[u8]) -> bool {
    let s = utf8_prefix(data);
    center_token(s);
    let Ok((tok, fp)) = parse_enroll_token(s) else {
        return false;
    };
    center_token(&tok);
    let hex: String = fp.0.iter().map(|b| format!("{b:02x}")).collect();
    let printed = format!("{tok}.{hex}");
    assert!(
        printed.eq_ignore_ascii_case(s.trim()),
        "{s:?} parses to {printed:?}"
    );
    true
}

/// The center's token parser: what parses prints back to the same text.
fn center_token(s: &str) {
    if let Ok((id, secret)) = auth::parse_token(s) {
        let printed = format!(
            "{TOKEN_PREFIX}{id}_{}",
            data_encoding::BASE32_NOPAD
                .encode(&secret)
                .to_ascii_lowercase()
        );
        // A `.<CA fingerprint>` suffix is accepted and ignored.
        let cred = s.split_once('.').map_or(s, |(c, _)| c);
        assert_eq!(printed, cred, "a token parses but prints differently");
    }
}
