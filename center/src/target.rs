//! Host targeting: which hosts a task goes to.
//!
//! A target is either `all`, or a comma-separated list of terms:
//!
//! - a host name: `web-1`;
//! - a glob over host names, where `*` matches any run of characters (also none) and
//!   `?` exactly one: `web-*`, `db-?`;
//! - a tag test `key=value`.
//!
//! **Consecutive tag tests form one selector and are ANDed; everything else is ORed.**
//! So `role=web,idc=bj` means hosts tagged both role=web and idc=bj (the usual reading
//! of a label selector), `web-1,db-*` is a union, and `web-1,role=db` is web-1 plus
//! every host tagged role=db. A name or glob between tag tests splits them:
//! `role=web,web-1,idc=bj` is (role=web) OR web-1 OR (idc=bj). Two values for one key
//! in the same selector could never match, so they are an error rather than a target
//! that silently selects nothing.
//!
//! Whitespace around terms is ignored. Names, globs, keys and values are limited to
//! ASCII letters, digits, `-`, `_` and `.` (keys may also contain `/`), so a target
//! never needs quoting in a shell and cannot smuggle anything into logs.
//!
//! Globs are matched by hand (iterative with one backtrack point, linear in practice)
//! rather than through a regex engine: the language is two metacharacters.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One term of a target list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// An exact host name.
    Name(String),
    /// A glob with `*` and/or `?`.
    Glob(String),
    /// Tag tests that must all hold (`key=value` ANDed).
    Tags(BTreeMap<String, String>),
}

/// A parsed target expression; see the module docs for the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every host.
    All,
    /// The hosts matching any of the terms.
    Any(Vec<Term>),
}

/// Why a target expression does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the target is empty (use `all` for every host)")]
    Empty,
    #[error("term {position} of the target is empty (two commas in a row, or a comma at an end)")]
    EmptyTerm { position: usize },
    #[error("`all` cannot be combined with other terms")]
    AllCombined,
    #[error(
        "host name or glob {term:?} contains {ch:?} (allowed: letters, digits, '-', '_', '.', '*', '?')"
    )]
    BadNameChar { term: String, ch: char },
    #[error("tag test {term:?} has an empty key")]
    EmptyTagKey { term: String },
    #[error("tag test {term:?} has an empty value")]
    EmptyTagValue { term: String },
    #[error("tag test {term:?} contains {ch:?} (allowed: letters, digits, '-', '_', '.', and '/' in keys)")]
    BadTagChar { term: String, ch: char },
    #[error(
        "tag {key} must equal both {first:?} and {second:?} in one selector, which no host can; separate the two with a host term or run two tasks"
    )]
    ConflictingTag {
        key: String,
        first: String,
        second: String,
    },
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn parse_tag(term: &str) -> Result<(String, String), TargetError> {
    let (key, value) = term.split_once('=').unwrap_or((term, ""));
    if key.is_empty() {
        return Err(TargetError::EmptyTagKey { term: term.into() });
    }
    if value.is_empty() {
        return Err(TargetError::EmptyTagValue { term: term.into() });
    }
    let bad = key
        .chars()
        .find(|&c| !(is_word_char(c) || c == '/'))
        .or_else(|| value.chars().find(|&c| !is_word_char(c)));
    if let Some(ch) = bad {
        return Err(TargetError::BadTagChar {
            term: term.into(),
            ch,
        });
    }
    Ok((key.into(), value.into()))
}

fn parse_name(term: &str) -> Result<Term, TargetError> {
    if let Some(ch) = term
        .chars()
        .find(|&c| !(is_word_char(c) || c == '*' || c == '?'))
    {
        return Err(TargetError::BadNameChar {
            term: term.into(),
            ch,
        });
    }
    if term.contains(['*', '?']) {
        Ok(Term::Glob(term.into()))
    } else {
        Ok(Term::Name(term.into()))
    }
}

impl Target {
    /// Parses a target expression (see the module docs).
    pub fn parse(text: &str) -> Result<Target, TargetError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TargetError::Empty);
        }
        let raw: Vec<&str> = text.split(',').map(str::trim).collect();
        if let Some(i) = raw.iter().position(|t| t.is_empty()) {
            return Err(TargetError::EmptyTerm { position: i + 1 });
        }
        if raw.contains(&"all") {
            return if raw.len() == 1 {
                Ok(Target::All)
            } else {
                Err(TargetError::AllCombined)
            };
        }
        let mut terms: Vec<Term> = Vec::new();
        for term in raw {
            if term.contains('=') {
                let (key, value) = parse_tag(term)?;
                if let Some(Term::Tags(tags)) = terms.last_mut() {
                    if let Some(first) = tags.get(&key) {
                        if *first != value {
                            return Err(TargetError::ConflictingTag {
                                key,
                                first: first.clone(),
                                second: value,
                            });
                        }
                    }
                    tags.insert(key, value);
                } else {
                    terms.push(Term::Tags(BTreeMap::from([(key, value)])));
                }
            } else {
                terms.push(parse_name(term)?);
            }
        }
        Ok(Target::Any(terms))
    }

    /// Whether the host with this name and these tags is targeted.
    pub fn matches(&self, name: &str, tags: &BTreeMap<String, String>) -> bool {
        match self {
            Target::All => true,
            Target::Any(terms) => terms.iter().any(|term| match term {
                Term::Name(n) => n == name,
                Term::Glob(g) => glob_match(g, name),
                Term::Tags(want) => want.iter().all(|(k, v)| tags.get(k) == Some(v)),
            }),
        }
    }

    /// The names of the targeted hosts, sorted and without duplicates.
    pub fn select<'a>(
        &self,
        hosts: impl Iterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    ) -> Vec<String> {
        let mut out: Vec<String> = hosts
            .filter(|(name, tags)| self.matches(name, tags))
            .map(|(name, _)| name.to_string())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::parse(s)
    }
}

/// The canonical text, which parses back to the same target.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms = match self {
            Target::All => return f.write_str("all"),
            Target::Any(terms) => terms,
        };
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let r = if first { Ok(()) } else { f.write_str(",") };
            first = false;
            r
        };
        for term in terms {
            match term {
                Term::Name(s) | Term::Glob(s) => {
                    sep(f)?;
                    f.write_str(s)?;
                }
                Term::Tags(tags) => {
                    for (k, v) in tags {
                        sep(f)?;
                        write!(f, "{k}={v}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Matches `text` against a glob where `*` is any run of characters and `?` is one
/// character. Everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen, and the text position it is currently taken to end at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry after it.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    pi = sp + 1;
                    ti = st + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fleet() -> Vec<(String, BTreeMap<String, String>)> {
        vec![
            ("web-1".into(), tags(&[("role", "web"), ("idc", "bj")])),
            ("web-2".into(), tags(&[("role", "web"), ("idc", "sh")])),
            ("db-1".into(), tags(&[("role", "db"), ("idc", "bj")])),
            ("db-10".into(), tags(&[("role", "db"), ("idc", "sh")])),
            ("cache".into(), tags(&[])),
        ]
    }

    fn select(expr: &str) -> Vec<String> {
        let fleet = fleet();
        Target::parse(expr)
            .unwrap()
            .select(fleet.iter().map(|(n, t)| (n.as_str(), t)))
    }

    #[test]
    fn all() {
        assert_eq!(Target::parse(" all ").unwrap(), Target::All);
        assert_eq!(
            select("all"),
            vec!["cache", "db-1", "db-10", "web-1", "web-2"]
        );
    }

    #[test]
    fn names_and_union() {
        assert_eq!(select("web-1"), vec!["web-1"]);
        assert_eq!(select("web-2, cache ,web-2"), vec!["cache", "web-2"]);
        assert_eq!(select("nosuch"), Vec::<String>::new());
        assert_eq!(
            Target::parse("web-1").unwrap(),
            Target::Any(vec![Term::Name("web-1".into())])
        );
    }

    #[test]
    fn globs() {
        assert_eq!(select("web-*"), vec!["web-1", "web-2"]);
        assert_eq!(select("db-?"), vec!["db-1"]);
        assert_eq!(select("db-?,web-*"), vec!["db-1", "web-1", "web-2"]);
        assert_eq!(select("*-1*"), vec!["db-1", "db-10", "web-1"]);
        assert_eq!(select("*"), select("all"));
        assert!(matches!(
            Target::parse("web-*").unwrap(),
            Target::Any(t) if t == vec![Term::Glob("web-*".into())]
        ));
    }

    #[test]
    fn glob_matcher() {
        let yes = [
            ("", ""),
            ("*", ""),
            ("*", "abc"),
            ("a*", "a"),
            ("a*c", "abbbc"),
            ("a*b*c", "aXbYbZc"),
            ("?", "x"),
            ("??", "xy"),
            ("*a", "aaa"),
            ("a**b", "ab"),
            ("*x*y*", "__x__y__"),
        ];
        let no = [
            ("", "a"),
            ("a", ""),
            ("?", ""),
            ("?", "xy"),
            ("a*c", "abcd"),
            ("a*b*c", "aXbYbZ"),
            ("web-*", "db-1"),
            ("abc", "abd"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p:?} should match {t:?}");
        }
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p:?} should not match {t:?}");
        }
    }

    #[test]
    fn tag_selectors_and_or() {
        assert_eq!(select("role=web"), vec!["web-1", "web-2"]);
        assert_eq!(select("role=web,idc=bj"), vec!["web-1"]);
        assert_eq!(select("idc=bj , role=db"), vec!["db-1"]);
        assert_eq!(select("web-2,role=db"), vec!["db-1", "db-10", "web-2"]);
        // A name term splits the tag tests into two selectors.
        assert_eq!(
            select("role=web,cache,idc=sh"),
            vec!["cache", "db-10", "web-1", "web-2"]
        );
        assert_eq!(select("role=nope"), Vec::<String>::new());
        assert_eq!(
            Target::parse("role=web,idc=bj,role=web").unwrap(),
            Target::Any(vec![Term::Tags(tags(&[("role", "web"), ("idc", "bj")]))])
        );
        assert!(Target::parse("k8s.io/zone=a-1").is_ok());
    }

    #[test]
    fn display_roundtrips() {
        for text in ["all", "web-1", "db-*,role=web,idc=bj,cache", "a,b=c"] {
            let t = Target::parse(text).unwrap();
            assert_eq!(Target::parse(&t.to_string()).unwrap(), t, "{text}");
        }
        assert_eq!(
            Target::parse(" role=web , idc=bj ").unwrap().to_string(),
            "idc=bj,role=web"
        );
    }

    #[test]
    fn errors() {
        let err = |s: &str| Target::parse(s).unwrap_err();
        assert_eq!(err(""), TargetError::Empty);
        assert_eq!(err("  "), TargetError::Empty);
        assert_eq!(err("a,,b"), TargetError::EmptyTerm { position: 2 });
        assert_eq!(err("a,"), TargetError::EmptyTerm { position: 2 });
        assert_eq!(err(",a"), TargetError::EmptyTerm { position: 1 });
        assert_eq!(err("all,web-1"), TargetError::AllCombined);
        assert_eq!(
            err("web 1"),
            TargetError::BadNameChar {
                term: "web 1".into(),
                ch: ' '
            }
        );
        assert!(matches!(
            err("web;rm"),
            TargetError::BadNameChar { ch: ';', .. }
        ));
        assert!(matches!(err("=web"), TargetError::EmptyTagKey { .. }));
        assert!(matches!(err("role="), TargetError::EmptyTagValue { .. }));
        assert!(matches!(
            err("role=a=b"),
            TargetError::BadTagChar { ch: '=', .. }
        ));
        assert!(matches!(
            err("ro le=web"),
            TargetError::BadTagChar { ch: ' ', .. }
        ));
        assert!(matches!(
            err("role=w/b"),
            TargetError::BadTagChar { ch: '/', .. }
        ));
        assert!(matches!(
            err("role=web*"),
            TargetError::BadTagChar { ch: '*', .. }
        ));
        let conflict = err("role=web,role=db");
        assert!(matches!(conflict, TargetError::ConflictingTag { .. }));
        assert!(
            conflict
                .to_string()
                .contains("tag role must equal both \"web\" and \"db\""),
            "{conflict}"
        );
        // Split by a name, the same key twice is fine.
        assert!(Target::parse("role=web,cache,role=db").is_ok());
        assert!(err("a,,b").to_string().contains("term 2"));
    }
}
