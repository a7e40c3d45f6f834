//! Replays every seed in `fuzz/seeds/<target>/` through the body its fuzz target
//! runs (see the crate docs). A seed named `ok_*` must be accepted and `bad_*`
//! refused; any other name (crash regressions, `crash_*`) must only not panic. Every
//! `[[bin]]` of `fuzz/Cargo.toml` must have a body here and a seed corpus with at
//! least one accepted and one refused input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use octopus_fuzz_bodies::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
fn fuzz_bins() -> BTreeSet<String> {
    let toml =
        std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("reading fuzz/Cargo.toml");
    let mut out = BTreeSet::new();
    let mut in_bin = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(v) = line.strip_prefix("name") {
                let v = v.trim_start().trim_start_matches('=').trim();
                out.insert(v.trim_matches('"').to_string());
            }
        }
    }
    out
}

#[test]
fn every_fuzz_target_has_a_body_and_seeds() {
    let bins = fuzz_bins();
    let bodies: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert!(bins.len() >= 12, "fuzz/Cargo.toml lists only {bins:?}");
    assert_eq!(
        bins, bodies,
        "fuzz/Cargo.toml targets vs. octopus-fuzz-bodies"
    );
    for name in &bins {
        let src = std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_else(|e| panic!("reading the {name} target: {e}"));
        assert!(
            src.contains(&format!("octopus_fuzz_bodies::{name}(")),
            "fuzz_targets/{name}.rs does not call octopus_fuzz_bodies::{name}"
        );
    }
}

#[test]
fn seed_corpora_replay() {
    let mut replayed = 0;
    let mut wrong = Vec::new();
    for &(name, body) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let (mut ok, mut bad) = (0, 0);
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let seed = f.file_name().unwrap().to_string_lossy().into_owned();
            let accepted = body(&data);
            if seed.starts_with("ok_") {
                if !accepted {
                    wrong.push(format!("{name}/{seed} is refused"));
                }
                ok += 1;
            } else if seed.starts_with("bad_") {
                if accepted {
                    wrong.push(format!("{name}/{seed} is accepted"));
                }
                bad += 1;
            }
            replayed += 1;
        }
        assert!(
            ok >= 1 && bad >= 1,
            "{name}: the corpus needs ok_ and bad_ seeds ({ok} ok, {bad} bad)"
        );
    }
    assert!(wrong.is_empty(), "seeds with the wrong answer: {wrong:#?}");
    assert!(replayed >= 2 * TARGETS.len());
}
