//! Least privilege for API tokens: optional limits on what a token may ask hosts to
//! do, checked when a task is created.
//!
//! * `target`: the task's hosts must all be among the hosts this target selects (a
//!   name, glob, tag selector or comma list, as for tasks).
//! * `users`: the Unix users a command may run as, and the owners a copy may give
//!   its files.
//! * `kinds`: `exec` (shell, python, jar), `cp` (fetch) and `seed`.
//!
//! Independently of limits, some requests need more than the operator scope:
//!
//! * running a command as root (`--user root`, or no user: the agent runs as root)
//!   needs the admin scope, or a token whose `users` limit names `root` explicitly;
//! * seeding a host path (`octo cp HOST:/path`: the host serves any file it can read,
//!   as root) needs the admin scope, or a token whose `kinds` limit names `seed`.

use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::store::{Scope, Store};
use crate::target::Target;

/// The task kinds a token may be limited to.
pub const KINDS: [&str; 3] = ["exec", "cp", "seed"];

/// Limits on one token. Empty fields limit nothing.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenLimits {
    /// A target expression; the token's tasks may only reach hosts it selects.
    pub target: Option<String>,
    /// Unix users commands may run as (and copies may be owned by).
    pub users: Vec<String>,
    /// Task kinds: `exec`, `cp`, `seed`.
    pub kinds: Vec<String>,
}

impl TokenLimits {
    /// Whether nothing is limited.
    pub fn is_empty(&self) -> bool {
        self.target.is_none() && self.users.is_empty() && self.kinds.is_empty()
    }

    /// Checks the limits themselves when a token is created: the target parses, the
    /// kinds are known, the users are plausible names.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.target {
            Target::parse(t).map_err(|e| format!("--limit-target: {e}"))?;
        }
        for k in &self.kinds {
            if !KINDS.contains(&k.as_str()) {
                return Err(format!(
                    "--limit-kind: unknown kind {k:?}: use {}",
                    KINDS.join(", ")
                ));
            }
        }
        for u in &self.users {
            if u.is_empty()
                || u.len() > 64
                || !u
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return Err(format!("--limit-user: {u:?} is not a user name"));
            }
        }
        Ok(())
    }
}

/// What a new task asks for, as the limits see it.
#[derive(Debug)]
pub struct TaskAsk<'a> {
    /// `exec`, `cp` or `seed`.
    pub kind: &'static str,
    pub target: &'a str,
    /// The user a command runs as (`None`: the agent's own, root).
    pub user: Option<&'a str>,
    /// The `USER[:GROUP]` a copy's files get.
    pub owner: Option<&'a str>,
}

/// Checks a new task against the caller's scope and its token's limits. A refusal
/// is 403 and names the limit.
pub fn check_task(
    scope: Scope,
    limits: &TokenLimits,
    ask: &TaskAsk<'_>,
    store: &dyn Store,
) -> Result<(), ApiError> {
    let admin = scope == Scope::Admin;
    if !limits.kinds.is_empty() && !limits.kinds.iter().any(|k| k == ask.kind) {
        return Err(ApiError::forbidden(format!(
            "the token is limited to the task kinds {} (--limit-kind), not {}",
            limits.kinds.join(","),
            ask.kind
        )));
    }
    if ask.kind == "seed" && !admin && !limits.kinds.iter().any(|k| k == "seed") {
        return Err(ApiError::forbidden(
            "seeding a host path serves any file that host can read: it needs the admin \
             scope or a token with --limit-kind seed",
        ));
    }
    if ask.kind == "exec" {
        let user = ask.user.unwrap_or("root");
        let root = user == "root" || user == "0";
        if !limits.users.is_empty() && !limits.users.iter().any(|u| u == user) {
            return Err(ApiError::forbidden(format!(
                "the token is limited to the users {} (--limit-user), not {user}",
                limits.users.join(",")
            )));
        }
        if root && !admin && !limits.users.iter().any(|u| u == "root") {
            return Err(ApiError::forbidden(
                "running a command as root (--user root, or no --user) needs the admin scope \
                 or a token with --limit-user root",
            ));
        }
    }
    if let (Some(owner), false) = (ask.owner, limits.users.is_empty()) {
        let user = owner.split(':').next().unwrap_or_default();
        if !limits.users.iter().any(|u| u == user) {
            return Err(ApiError::forbidden(format!(
                "the token is limited to the users {} (--limit-user), not the owner {user}",
                limits.users.join(",")
            )));
        }
    }
    if let Some(limit) = &limits.target {
        let allowed = Target::parse(limit).map_err(|e| {
            ApiError::forbidden(format!("the token's --limit-target does not parse: {e}"))
        })?;
        let wanted = Target::parse(ask.target).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let hosts = store.list_hosts()?;
        let tagged = || hosts.iter().map(|h| (h.name.as_str(), &h.tags));
        let inside: std::collections::HashSet<String> =
            allowed.select(tagged()).into_iter().collect();
        let outside: Vec<String> = wanted
            .select(tagged())
            .into_iter()
            .filter(|h| !inside.contains(h))
            .collect();
        if !outside.is_empty() {
            let mut shown = outside
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if outside.len() > 5 {
                shown.push_str(&format!(" and {} more", outside.len() - 5));
            }
            return Err(ApiError::forbidden(format!(
                "the token is limited to the target {limit:?} (--limit-target); {shown} \
                 is outside it"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_unknown_kinds_and_bad_targets() {
        let mut l = TokenLimits {
            kinds: vec!["exec".into(), "rm".into()],
            ..Default::default()
        };
        assert!(l.validate().unwrap_err().contains("rm"));
        l.kinds = vec!["exec".into()];
        l.validate().unwrap();
        l.target = Some(String::new());
        assert!(l.validate().is_err());
        l.target = None;
        l.users = vec!["de ploy".into()];
        assert!(l.validate().is_err());
    }
}
