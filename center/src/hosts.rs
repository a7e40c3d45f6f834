//! Who may hold a host's name: no enrollment takes over a name already enrolled,
//! unless an admin approves it; an admin can remove a host, which revokes its
//! certificate and drops its session at once.
//!
//! * An enrollment as an enrolled name is refused with
//!   [`EnrollResponse::NameTaken`] and listed as pending (in memory:
//!   `GET /agents/pending`).
//! * `POST /agents/{name}/approve` (admin) allows the next enrollment of that name,
//!   once (a meta key, so it survives a restart and is shared by several centers).
//!   That enrollment revokes the old certificate.
//! * `DELETE /agents/{name}` (admin) removes the host from the inventory, revokes its
//!   certificate and closes its session.
//!
//! A revoked certificate is kept as a meta key `revoked.<fingerprint>`; a control
//! session presenting it is refused, on top of the rule that only the host's newest
//! certificate counts.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use octopus_agent::proto::{self, EnrollResponse};
use quinn::VarInt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use tracing::{info, warn};

use crate::api::{ApiError, Caller};
use crate::center::Inner;
use crate::store::Scope;

/// Pending requests kept at most (the oldest are dropped): they come from holders of
/// an enroll token, but still need a bound.
const MAX_PENDING: usize = 1000;

/// An enrollment refused because its name was taken.
#[derive(Debug, Clone, Serialize)]
pub struct PendingEnroll {
    pub name: String,
    /// Unix ms of the latest attempt.
    pub at: u64,
    /// Where it came from.
    pub addr: String,
}

fn approved_key(name: &str) -> String {
    format!("reenroll.{name}")
}

fn revoked_key(fingerprint: &str) -> String {
    format!("revoked.{fingerprint}")
}

/// Whether the certificate with this fingerprint (hex) was revoked.
pub(crate) fn is_revoked(inner: &Inner, fingerprint: &str) -> bool {
    // A store that cannot answer fails closed.
    !matches!(inner.store.get_meta(&revoked_key(fingerprint)), Ok(None))
}

fn revoke(inner: &Inner, fingerprint: &str) -> Result<(), crate::store::StoreError> {
    inner.store.put_meta(&revoked_key(fingerprint), b"1")
}

/// Closes the host's session at this center, if it has one.
fn drop_session(inner: &Inner, name: &str, why: &'static [u8]) {
    let session = inner.sessions.lock().unwrap().remove(name);
    if let Some(s) = session {
        s.conn.close(
            VarInt::from_u32(octopus_agent::proto::code::UNAUTHORIZED),
            why,
        );
    }
    inner.live.lock().unwrap().remove(name);
    inner.content.drop_member(name);
}

/// Whether an enrollment as `name` may go on. A new name may; an enrolled one only
/// with an admin's approval, which this spends (and the old certificate is revoked).
/// Otherwise the request is recorded as pending and refused.
pub(crate) fn admit_name(
    inner: &Inner,
    name: &str,
    from: SocketAddr,
) -> Result<(), EnrollResponse> {
    let refuse = |s: String| EnrollResponse::Refused(s);
    let host = match inner.store.get_host(name) {
        Ok(None) => return Ok(()),
        Ok(Some(h)) => h,
        Err(e) => return Err(refuse(format!("reading the host: {e}"))),
    };
    let key = approved_key(name);
    match inner.store.get_meta(&key) {
        Ok(Some(v)) if v == b"1" => {
            inner
                .store
                .put_meta(&key, b"")
                .map_err(|e| refuse(format!("spending the approval: {e}")))?;
            revoke(inner, &host.fingerprint)
                .map_err(|e| refuse(format!("revoking the old certificate: {e}")))?;
            drop_session(inner, name, b"certificate revoked: the host re-enrolled");
            inner.enroll_requests.lock().unwrap().remove(name);
            info!(host = %name, "approved re-enrollment");
            Ok(())
        }
        Ok(_) => {
            let mut pending = inner.enroll_requests.lock().unwrap();
            if pending.len() >= MAX_PENDING && !pending.contains_key(name) {
                if let Some(oldest) = pending
                    .values()
                    .min_by_key(|p| p.at)
                    .map(|p| p.name.clone())
                {
                    pending.remove(&oldest);
                }
            }
            pending.insert(
                name.to_string(),
                PendingEnroll {
                    name: name.to_string(),
                    at: proto::now_ms(),
                    addr: from.to_string(),
                },
            );
            warn!(host = %name, %from, "refused an enrollment as an enrolled name");
            Err(EnrollResponse::NameTaken(format!(
                "host {name} is already enrolled; an admin must approve its re-enrollment \
                 (octo agents approve {name}) or remove it (octo agents rm {name})"
            )))
        }
        Err(e) => Err(refuse(format!("reading the approvals: {e}"))),
    }
}

/// `GET /api/v1/agents/pending` (admin): enrollments refused because the name is
/// taken, newest first.
pub(crate) async fn list_pending(
    caller: Caller,
    State(inner): State<Arc<Inner>>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let mut v: Vec<PendingEnroll> = inner
        .enroll_requests
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.at));
    Ok(Json(json!(v)))
}

/// `POST /api/v1/agents/{name}/approve` (admin): the next enrollment of `name` may
/// replace the enrolled host (once).
pub(crate) async fn approve(
    caller: Caller,
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if inner.store.get_host(&name)?.is_none() {
        return Err(ApiError::not_found(format!(
            "host {name:?} is not enrolled: it may enroll without approval"
        )));
    }
    inner.store.put_meta(&approved_key(&name), b"1")?;
    let was_pending = inner.enroll_requests.lock().unwrap().contains_key(&name);
    info!(host = %name, by = %caller.token_id, "re-enrollment approved");
    Ok(Json(
        json!({"name": name, "approved": true, "was_pending": was_pending}),
    ))
}

/// `DELETE /api/v1/agents/{name}` (admin): removes the host, revokes its
/// certificate, and drops its session.
pub(crate) async fn remove(
    caller: Caller,
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let Some(host) = inner.store.get_host(&name)? else {
        return Err(ApiError::not_found(format!("no host {name:?}")));
    };
    revoke(&inner, &host.fingerprint)?;
    inner.store.remove_host(&name)?;
    inner.store.put_meta(&approved_key(&name), b"")?;
    drop_session(&inner, &name, b"certificate revoked: the host was removed");
    inner.enroll_requests.lock().unwrap().remove(&name);
    info!(host = %name, by = %caller.token_id, "host removed, certificate revoked");
    Ok(Json(
        json!({"name": name, "removed": true, "revoked": host.fingerprint}),
    ))
}

/// Longest a seed certificate for the CLI lives.
const SEED_CERT_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SeedCertReq {
    /// The CLI's P-256 public key, the uncompressed point in hex.
    public_key: String,
    /// How long the certificate should last (capped at 24 hours; default 1 hour).
    #[serde(default)]
    valid_ms: Option<u64>,
}

/// `POST /api/v1/certs` (operator): a short-lived certificate from the center's CA
/// for the CLI's own key, so the seed of an `octo cp` joins the fleet's swarm, which
/// admits only peers with such certificates. Its common name `octo-cli-<token id>`
/// is no enrolled host, so it opens no control session.
pub(crate) async fn issue_seed_cert(
    caller: Caller,
    State(inner): State<Arc<Inner>>,
    body: Result<Json<SeedCertReq>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Operator)?;
    let Json(req) = body?;
    let key = data_encoding::HEXLOWER_PERMISSIVE
        .decode(req.public_key.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("public_key is not hex: {e}")))?;
    let valid = req
        .valid_ms
        .map_or(
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_millis,
        )
        .min(SEED_CERT_MAX);
    let cn = format!("octo-cli-{}", caller.token_id);
    let cert = inner
        .ca
        .issue_for(&cn, &key, valid)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hex = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
    Ok(Json(json!({
        "cert": hex(&cert),
        "ca": hex(&inner.ca.cert),
        "expires_at": proto::now_ms().saturating_add(valid.as_millis() as u64),
    })))
}
