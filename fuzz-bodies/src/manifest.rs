//! `Manifest::decode`, which runs on bytes from the network (checked only against the
//! content id, which an attacker who made the ticket controls).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Component, Path};

use octopus_transfer::manifest::{EntryKind, Manifest};

/// A manifest that decodes must round-trip through encode/decode unchanged, obey
/// ARCHITECTURE's path invariant (checked by [`check_path_safety`], written apart from
/// `Manifest::validate` on purpose), and everything a getter computes from it next
/// (`pieces`, sizes, roots) must not panic. Accepted: the manifest decoded.
pub fn manifest_decode(data: &[u8]) -> bool {
    let Ok(m) = Manifest::decode(data) else {
        return false;
    };
    if let Err(why) = check_path_safety(&m) {
        panic!("a decoded manifest breaks path safety: {why}");
    }
    let enc = m.encode();
    let back = Manifest::decode(&enc).expect("a decoded manifest re-decodes");
    assert_eq!(back, m);
    assert_eq!(back.encode(), enc);
    let pieces = m.pieces();
    let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
    assert_eq!(total, m.total_size());
    let _ = m.roots();
    let _ = m.max_piece_len();
    let _ = m.content_id();
    true
}

/// ARCHITECTURE's invariant "paths are validated twice", restated independently:
/// every path is relative, free of NUL and of `.`/`..`/empty components, and
/// every parent is a directory declared before it (so no path reaches through a
/// symlink or a file); every symlink target is relative, free of NUL, and stays
/// inside its root: resolved as the kernel will resolve it on disk, following the
/// manifest's other links, it never rises above the root's own name.
pub fn check_path_safety(m: &Manifest) -> Result<(), String> {
    let mut dirs: HashSet<&str> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for e in &m.entries {
        let p = e.path.as_str();
        if p.is_empty() || p.contains('\0') || p.starts_with('/') || p.contains('\\') {
            return Err(format!(
                "path {p:?} is empty, absolute or has NUL/backslash"
            ));
        }
        if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(format!("path {p:?} has an empty, `.` or `..` component"));
        }
        let path = Path::new(p);
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("path {p:?} is not a plain relative path"));
        }
        // Joined under any destination, it stays under it.
        if !Path::new("/dest").join(path).starts_with("/dest") {
            return Err(format!("path {p:?} leaves the destination"));
        }
        if !seen.insert(p) {
            return Err(format!("path {p:?} appears twice"));
        }
        if let Some(i) = p.rfind('/') {
            if !dirs.contains(&p[..i]) {
                return Err(format!("the parent of {p:?} is not a declared directory"));
            }
        }
        if e.mode > 0o7777 {
            return Err(format!("mode {:o} of {p:?}", e.mode));
        }
        match &e.kind {
            EntryKind::Dir => {
                dirs.insert(p);
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.starts_with('/') || target.contains('\0') {
                    return Err(format!(
                        "symlink {p:?} -> {target:?} is absolute, empty or has NUL"
                    ));
                }
            }
            EntryKind::File { .. } => {}
        }
    }
    let links: HashMap<&str, &str> = m
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::Symlink { target } => Some((e.path.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    for (path, target) in &links {
        resolve_inside(&links, path, target)?;
    }
    Ok(())
}

/// Resolves the link at `path` the way the kernel will once the tree is on disk,
/// following the manifest's other links (a loop is harmless: ELOOP), and fails if the
/// walk ever climbs above the root (for a link that is itself a root, above the
/// destination).
fn resolve_inside(links: &HashMap<&str, &str>, path: &str, target: &str) -> Result<(), String> {
    let mut at: Vec<&str> = path.split('/').collect();
    at.pop();
    let mut pending: VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        match c {
            "" | "." => {}
            ".." => {
                if at.len() <= 1 {
                    return Err(format!(
                        "symlink {path:?} -> {target:?} resolves outside its root"
                    ));
                }
                at.pop();
            }
            c => {
                at.push(c);
                if let Some(t) = links.get(at.join("/").as_str()) {
                    hops += 1;
                    if hops > 40 {
                        return Ok(());
                    }
                    if t.starts_with('/') {
                        return Err(format!(
                            "symlink {path:?} -> {target:?} reaches an absolute link"
                        ));
                    }
                    at.pop();
                    for part in t.split('/').rev() {
                        pending.push_front(part);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use octopus_transfer::manifest::Entry;

    fn m(entries: &[(&str, EntryKind)]) -> Manifest {
        Manifest {
            version: 1,
            piece_size: 65536,
            small_file_threshold: 65536,
            entries: entries
                .iter()
                .map(|(p, k)| Entry {
                    path: p.to_string(),
                    mode: 0o644,
                    kind: k.clone(),
                })
                .collect(),
        }
    }

    fn file() -> EntryKind {
        EntryKind::File {
            size: 1,
            md5: [0; 16],
            pieces: vec![],
        }
    }

    fn link(t: &str) -> EntryKind {
        EntryKind::Symlink { target: t.into() }
    }

    /// The checker is independent of `Manifest::validate`, so it is shown here to
    /// refuse each kind of unsafe manifest, built without going through decode.
    #[test]
    fn path_safety_refuses_every_unsafe_shape() {
        let ok = m(&[
            ("r", EntryKind::Dir),
            ("r/d", EntryKind::Dir),
            ("r/d/f", file()),
            ("r/d/l", link("../f")),
            ("r/l2", link("d/./f")),
        ]);
        assert_eq!(check_path_safety(&ok), Ok(()));
        let bad: Vec<Manifest> = vec![
            m(&[("../x", file())]),
            m(&[("/etc/passwd", file())]),
            m(&[("a\0b", file())]),
            m(&[("", file())]),
            m(&[("r", EntryKind::Dir), ("r//x", file())]),
            m(&[("r", EntryKind::Dir), ("r/./x", file())]),
            m(&[("r", EntryKind::Dir), ("r/d/x", file())]),
            m(&[("r", EntryKind::Dir), ("r/l", link(".")), ("r/l/x", file())]),
            m(&[("r", EntryKind::Dir), ("r/f", file()), ("r/f", file())]),
            m(&[("r", EntryKind::Dir), ("r/l", link(".."))]),
            m(&[("r", EntryKind::Dir), ("r/l", link("a/../../x"))]),
            m(&[("r", EntryKind::Dir), ("r/l", link("/etc"))]),
            m(&[("r", EntryKind::Dir), ("r/l", link("a\0"))]),
            m(&[("r", EntryKind::Dir), ("r/l", link(""))]),
            m(&[
                ("r", EntryKind::Dir),
                ("r/a", EntryKind::Dir),
                ("r/a/l", link("..")),
                ("r/m", link("a/l/../x")),
            ]),
        ];
        for b in &bad {
            assert!(check_path_safety(b).is_err(), "accepted {:?}", b.entries);
        }
    }
}
