//! The HTTP API under `/api/v1` (axum, JSON).
//!
//! Why it is shaped like this:
//!
//! * **Every call needs a token** (`Authorization: Bearer octo_<id>_<secret>`). The
//!   [`Caller`] extractor answers 401 for a missing, malformed, unknown, revoked or
//!   expired token and 403 for an address outside the token's allow-list; each
//!   handler then asks for the scope it needs (403 if the token's is weaker).
//! * **Errors map to status codes in one place**: [`ApiError`]. Its body is
//!   `{"error": "..."}` with a sentence saying what was wrong, malformed JSON included
//!   (400, where axum's default would say 422 for some of it).
//! * **Every mutating call is audited** by the [`audit`] middleware: who (token id),
//!   what (method, path, status), from which address, and when, after the handler ran.
//! * **Following a task is a long poll** (`GET /tasks/{id}/events?after=N&wait=S`):
//!   it returns as soon as there is something new, so output arrives live without a
//!   streaming body, and a client that reconnects resumes from its last `seq`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use octopus_agent::exec::{ExecKind, ExecSpec};
use octopus_agent::proto::{self, TaskBody, MAX_SCRIPT};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth;
use crate::center::{self, Batch, Inner};
use crate::store::{HostState, Scope, TaskRecord, TaskState};

/// An API failure: a status and a message. The one place statuses are chosen.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: m.into(),
        }
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: m.into(),
        }
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: m.into(),
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
        }
    }
    /// A request (or a part of it: a command, a target, an upload) over its cap.
    pub fn too_large(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: m.into(),
        }
    }
    /// The disk is full (or below the reserve kept for the store): nothing was written.
    pub fn insufficient_storage(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            message: m.into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("the JSON body is too large: {}", r.body_text()))
        } else {
            ApiError::bad_request(format!("malformed JSON body: {}", r.body_text()))
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        if e.is_disk_full() {
            ApiError::insufficient_storage(e.to_string())
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<crate::content::UploadError> for ApiError {
    fn from(e: crate::content::UploadError) -> ApiError {
        use crate::content::UploadError;
        match &e {
            UploadError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            _ if e.is_no_space() => ApiError::insufficient_storage(e.to_string()),
            UploadError::Receive(_) => ApiError::bad_request(e.to_string()),
            _ => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type Shared = Arc<Inner>;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub scope: Scope,
    pub addr: SocketAddr,
    /// The token's least-privilege limits (see `limits.rs`).
    pub limits: crate::limits::TokenLimits,
}

impl Caller {
    pub(crate) fn require(&self, needed: Scope) -> Result<(), ApiError> {
        if self.scope.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this call needs the {needed} scope and the token has {}",
                self.scope
            )))
        }
    }
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Caller, ApiError> {
        // Already authenticated by the audit layer: a one-time token is spent once.
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError::internal("no peer address"))?;
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
        let text = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header is not a Bearer token")
            })?;
        let (id, secret) =
            auth::parse_token(text.trim()).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let rec = state
            .store
            .get_token(&id)?
            .ok_or_else(|| ApiError::unauthorized("unknown token"))?;
        // Who you are first (the secret: 401), then what you may do (403). Scope is
        // checked per handler; here only identity, validity and address.
        let now = proto::now_ms();
        auth::check(&rec, &secret, rec.scope, addr.ip(), now).map_err(|e| {
            if e.is_forbidden() {
                ApiError::forbidden(e.to_string())
            } else {
                ApiError::unauthorized(e.to_string())
            }
        })?;
        if rec.scope == Scope::Enroll {
            return Err(ApiError::forbidden(
                "an enroll token can only enroll agents, not call the API",
            ));
        }
        // A one-time token is spent by the first call that passed the checks, in one
        // transaction, so two concurrent calls cannot both use it.
        if rec.one_time {
            state.store.consume_token(&id, now).map_err(|e| match e {
                crate::store::TokenUseError::Store(e) => ApiError::internal(e),
                e => ApiError::unauthorized(e.to_string()),
            })?;
        }
        Ok(Caller {
            token_id: id,
            scope: rec.scope,
            addr,
            limits: rec.limits,
        })
    }
}

/// Records every mutating call after it ran, whatever its outcome.
async fn audit(State(inner): State<Shared>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let mutating = method != Method::GET && method != Method::HEAD;
    // Content downloads are audited too, signed URLs included: the content may be a
    // secret.
    let download = path.starts_with("/api/v1/files/");
    let detail = if download && req.uri().query().is_some_and(|q| q.contains("sig=")) {
        "signed URL".to_string()
    } else {
        String::new()
    };
    // Only a token that checks out names the caller: anyone can send any token id. The
    // caller found here is handed on to the handler (see `Caller`'s extractor), so a
    // one-time token is spent once, not twice.
    let (req, token) = if mutating || download {
        let (mut parts, body) = req.into_parts();
        let caller = Caller::from_request_parts(&mut parts, &inner).await;
        let token = caller.as_ref().ok().map(|c| c.token_id.clone());
        if let Ok(c) = caller {
            parts.extensions.insert(c);
        }
        (Request::from_parts(parts, body), token)
    } else {
        (req, None)
    };
    let resp = next.run(req).await;
    if mutating || download {
        let now = proto::now_ms();
        // Whoever presents no valid token to a mutating call is stored one by one only
        // a few times a minute, and counted past that: a flood must not fill the disk.
        if mutating && token.is_none() {
            match inner.audit_gate.admit(now, &addr) {
                crate::caps::Admit::Count => return resp,
                crate::caps::Admit::Store(Some(summary)) => {
                    center::append_gate_summary(&inner, summary)
                }
                crate::caps::Admit::Store(None) => {}
            }
        }
        let entry = crate::store::AuditEntry {
            seq: 0,
            at: now,
            token: token.unwrap_or_else(|| "-".into()),
            addr,
            method: crate::caps::cut(method.as_str(), 16),
            path: crate::caps::cut(&path, crate::caps::AUDIT_PATH_MAX),
            status: resp.status().as_u16(),
            detail,
        };
        if let Err(e) = inner.store.append_audit(entry) {
            tracing::error!("writing the audit log: {e}");
        }
    }
    resp
}

pub(crate) fn router(inner: Shared) -> Router {
    let api = Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/pending", get(crate::hosts::list_pending))
        .route("/certs", post(crate::hosts::issue_seed_cert))
        .route("/agents/{name}/approve", post(crate::hosts::approve))
        .route(
            "/agents/{name}",
            axum::routing::delete(crate::hosts::remove),
        )
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/{id}", get(show_task))
        .route("/tasks/{id}/events", get(task_events))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tokens", post(create_token).get(list_tokens))
        .route("/tokens/{id}/revoke", post(revoke_token))
        .route("/tasks/{id}/progress", get(task_progress))
        .route("/tasks/{id}/seed", post(adopt_copy))
        .route("/files", put(upload_file).get(list_files))
        .route("/files/{md5}", get(get_file))
        .route("/audit", get(list_audit))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such API route") });
    Router::new()
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::not_found("no such route; the API is under /api/v1") })
        .layer(middleware::from_fn_with_state(inner.clone(), audit))
        .with_state(inner)
}

async fn info(caller: Caller, State(inner): State<Shared>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(json!({
        "version": center::VERSION,
        "ca_fingerprint": center::fingerprint_hex(&inner.ca.fingerprint),
        "agents_addr": inner.quic_addr.to_string(),
    })))
}

/// Prometheus text format. Needs a read token, like every call (Prometheus sends one
/// with `authorization: {credentials: ...}` in its scrape config).
async fn metrics(caller: Caller, State(inner): State<Shared>) -> Result<String, ApiError> {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    caller.require(Scope::Read)?;
    let m = &inner.metrics;
    let known = inner.store.list_hosts()?.len();
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    put(
        "octo_agents_online",
        "gauge",
        "Agents with a live session.",
        center::online_count(&inner) as u64,
    );
    put(
        "octo_agents_known",
        "gauge",
        "Enrolled agents.",
        known as u64,
    );
    put(
        "octo_tasks_created_total",
        "counter",
        "Tasks created.",
        m.tasks_created.load(Relaxed),
    );
    put(
        "octo_results_stored_total",
        "counter",
        "Host results stored.",
        m.results_stored.load(Relaxed),
    );
    put(
        "octo_result_commits_total",
        "counter",
        "Group commits of results.",
        m.result_commits.load(Relaxed),
    );
    put(
        "octo_enrollments_total",
        "counter",
        "Enrollments granted.",
        m.enrollments_ok.load(Relaxed),
    );
    put(
        "octo_enrollments_refused_total",
        "counter",
        "Enrollments refused.",
        m.enrollments_refused.load(Relaxed),
    );
    put(
        "octo_sessions_opened_total",
        "counter",
        "Agent sessions opened.",
        m.sessions_opened.load(Relaxed),
    );
    put(
        "octo_sessions_refused_total",
        "counter",
        "Control connections refused.",
        m.sessions_refused.load(Relaxed),
    );
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct TargetQuery {
    target: Option<String>,
}

#[derive(Debug, Serialize)]
struct AgentView {
    name: String,
    status: String,
    online: bool,
    offline_since: Option<u64>,
    last_seen: u64,
    addrs: Vec<String>,
    tags: std::collections::BTreeMap<String, String>,
    version: String,
    fingerprint: String,
    resources: Option<octopus_agent::hostinfo::Resources>,
    /// The center the agent has its session with (its id in the registry: its
    /// agents' address with `_` for `:`).
    center: Option<String>,
}

async fn list_agents(
    caller: Caller,
    State(inner): State<Shared>,
    Query(q): Query<TargetQuery>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    caller.require(Scope::Read)?;
    let hosts = inner.store.list_hosts()?;
    let selected: Option<std::collections::HashSet<String>> = match &q.target {
        Some(t) => {
            check_target(t)?;
            let t = crate::target::Target::parse(t)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let s: std::collections::HashSet<String> = t
                .select(hosts.iter().map(|h| (h.name.as_str(), &h.tags)))
                .into_iter()
                .collect();
            if s.is_empty() {
                return Err(ApiError::not_found(format!(
                    "target {:?} matches no host",
                    crate::caps::cut(
                        q.target.as_deref().unwrap_or_default(),
                        crate::caps::ECHO_MAX
                    )
                )));
            }
            Some(s)
        }
        None => None,
    };
    let out = hosts
        .into_iter()
        .filter(|h| selected.as_ref().is_none_or(|s| s.contains(&h.name)))
        .map(|h| {
            let online = center::is_online(&inner, &h.name);
            let at = center::center_of(&inner, &h.name);
            let live = inner.live.lock().unwrap().get(&h.name).cloned();
            AgentView {
                status: if online {
                    "online".into()
                } else {
                    "offline".into()
                },
                online,
                center: at,
                offline_since: if online { None } else { h.offline_since },
                resources: live
                    .as_ref()
                    .map(|(_, r)| r.as_slice())
                    .or(h.resources.as_deref())
                    .and_then(|r| postcard::from_bytes(r).ok()),
                name: h.name,
                last_seen: live.as_ref().map_or(h.last_seen, |(t, _)| *t),
                addrs: h.addrs,
                tags: h.tags,
                version: h.version,
                fingerprint: h.fingerprint,
            }
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTask {
    target: String,
    /// "shell" (default), "python" or "jar".
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    command: String,
    #[serde(default)]
    args: Vec<String>,
    /// A script body (UTF-8 text), run instead of `command`.
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Vec<(String, String)>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// How long an offline host may still receive it (default 1 hour).
    #[serde(default)]
    ttl_ms: Option<u64>,
    /// "N" or "N%".
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    max_failures: Option<u32>,
    /// For kind "fetch" (`octo cp`): the transfer ticket and where to put the content.
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    dest: Option<String>,
    #[serde(default)]
    mkdir: bool,
    #[serde(default)]
    mode: Option<u32>,
    #[serde(default)]
    limit_down: Option<u64>,
    #[serde(default)]
    limit_up: Option<u64>,
    /// `USER[:GROUP]` to own the copied files.
    #[serde(default)]
    owner: Option<String>,
    /// Total bytes of the content, for progress.
    #[serde(default)]
    size: u64,
    /// A single uploaded file to send through the HTTP pool.
    #[serde(default)]
    pool: Option<PoolFileReq>,
    /// Uploaded files the center seeds over the transfer engine (`cp --async`).
    #[serde(default)]
    upload: Option<Vec<crate::content::UploadedFile>>,
    /// For kind "seed" (`octo cp HOST:/path`): absolute paths on the one target host.
    #[serde(default)]
    paths: Vec<String>,
    /// For kind "seed": how long the host keeps seeding (default: the TTL).
    #[serde(default)]
    hold_ms: Option<u64>,
    /// Allow setuid, setgid and sticky bits in `mode` (admin scope only).
    #[serde(default)]
    allow_special_mode: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFileReq {
    md5: String,
    size: u64,
    name: String,
    #[serde(default = "default_mode")]
    mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

/// A copy's mode: permission bits only (0o777), unless setuid, setgid or sticky bits
/// were asked for explicitly (`--allow-special-mode`), which needs the admin scope.
/// The agent checks again.
fn check_mode(mode: u32, allow_special: bool, caller: &Caller) -> Result<(), ApiError> {
    if mode > 0o7777 {
        return Err(ApiError::bad_request(format!(
            "mode {mode:#o} is not a file mode (at most 0o7777)"
        )));
    }
    if mode & !0o777 != 0 {
        if !allow_special {
            return Err(ApiError::bad_request(format!(
                "mode {mode:#o} sets setuid, setgid or sticky bits: pass --allow-special-mode \
                 (admin scope) if you mean it"
            )));
        }
        if caller.scope != Scope::Admin {
            return Err(ApiError::forbidden(format!(
                "mode {mode:#o} sets setuid, setgid or sticky bits, which needs the admin scope"
            )));
        }
    }
    Ok(())
}

async fn create_task(
    caller: Caller,
    State(inner): State<Shared>,
    body: Result<Json<NewTask>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::Operator)?;
    let Json(t) = body?;
    let kind_name = match t.kind.as_deref() {
        Some("fetch") => "cp",
        Some("seed") => "seed",
        _ => "exec",
    };
    check_target(&t.target)?;
    crate::limits::check_task(
        caller.scope,
        &caller.limits,
        &crate::limits::TaskAsk {
            kind: kind_name,
            target: &t.target,
            user: t.user.as_deref(),
            owner: t.owner.as_deref(),
        },
        inner.store.as_ref(),
    )?;
    let batch = match &t.batch {
        Some(b) => b.parse::<Batch>().map_err(ApiError::bad_request)?,
        None => Batch::All,
    };
    let ttl = Duration::from_millis(t.ttl_ms.unwrap_or(3_600_000));
    if t.kind.as_deref() == Some("fetch") {
        let Some(dest) = t.dest else {
            return Err(ApiError::bad_request("a fetch needs a dest"));
        };
        if !dest.starts_with('/') || dest.split('/').any(|c| c == ".." || c == ".") {
            return Err(ApiError::bad_request(format!(
                "destination {dest:?} must be absolute, without '.' or '..'"
            )));
        }
        let special = t.allow_special_mode;
        if let Some(m) = t.mode {
            check_mode(m, special, &caller)?;
        }
        if let Some(p) = &t.pool {
            check_mode(p.mode, special, &caller)?;
        }
        for f in t.upload.iter().flatten() {
            check_mode(f.mode, special, &caller)?;
        }
        let mut spec = octopus_agent::proto::FetchSpec {
            ticket: String::new(),
            dest: dest.clone(),
            mkdir: t.mkdir,
            mode: t.mode,
            limit_down: t.limit_down,
            limit_up: t.limit_up,
            linger_ms: 30_000,
            owner: t.owner,
            pool: None,
            seed: None,
            size: t.size,
            tags: Vec::new(),
            allow_special_mode: special,
        };
        match (t.ticket, t.pool, t.upload) {
            (Some(ticket), None, None) => spec.ticket = ticket,
            (None, Some(p), None) => {
                if inner.content.cache.get(&p.md5).is_none() {
                    return Err(ApiError::bad_request(format!(
                        "content {} was not uploaded (PUT /api/v1/files first)",
                        p.md5
                    )));
                }
                if p.name.is_empty() || p.name.contains('/') || p.name == ".." || p.name == "." {
                    return Err(ApiError::bad_request(format!("bad file name {:?}", p.name)));
                }
                spec.pool = Some(octopus_agent::proto::PoolFile {
                    md5: p.md5,
                    size: p.size,
                    name: p.name,
                    mode: p.mode,
                    query: String::new(),
                    origin: inner.quic_addr.to_string(),
                });
            }
            (None, None, Some(files)) => {
                spec.seed = Some(center::new_seed(&inner, &files).await?);
            }
            _ => {
                return Err(ApiError::bad_request(
                    "a fetch needs exactly one of ticket, pool and upload",
                ))
            }
        }
        let seed = spec.seed.clone();
        let created = center::create_task(
            &inner,
            &caller.token_id,
            center::TaskRequest {
                target: t.target,
                body: TaskBody::Fetch(Box::new(spec)),
                summary: crate::caps::cut(
                    &format!("cp ({} bytes) -> {dest}", t.size),
                    crate::caps::SUMMARY_MAX,
                ),
                ttl,
                batch,
                max_failures: t.max_failures,
            },
        );
        if let Some(seed) = seed {
            // The seed lives as long as its task; without one, the sweeper drops it.
            if let Ok(rec) = &created {
                inner.content.bind_seed(&seed, rec.id);
            }
        }
        let rec = created?;
        return Ok((
            StatusCode::CREATED,
            Json(json!({ "id": rec.id, "hosts": rec.hosts })),
        ));
    }
    if t.kind.as_deref() == Some("seed") {
        center::validate_host_name(&t.target).map_err(|e| {
            ApiError::bad_request(format!("a seed runs on one host, named exactly: {e}"))
        })?;
        if t.paths.is_empty() {
            return Err(ApiError::bad_request("a seed needs paths"));
        }
        for p in &t.paths {
            if !p.starts_with('/') || p.split('/').any(|c| c == ".." || c == ".") {
                return Err(ApiError::bad_request(format!(
                    "seed path {p:?} must be absolute, without '.' or '..'"
                )));
            }
        }
        let spec = octopus_agent::proto::SeedSpec {
            paths: t.paths.clone(),
            hold_ms: t.hold_ms.unwrap_or(ttl.as_millis() as u64),
            limit_up: t.limit_up,
        };
        let rec = center::create_task(
            &inner,
            &caller.token_id,
            center::TaskRequest {
                target: t.target,
                body: TaskBody::Seed(spec),
                summary: crate::caps::cut(
                    &format!("seed {}", t.paths.join(" ")),
                    crate::caps::SUMMARY_MAX,
                ),
                ttl,
                batch,
                max_failures: t.max_failures,
            },
        )?;
        return Ok((
            StatusCode::CREATED,
            Json(json!({ "id": rec.id, "hosts": rec.hosts })),
        ));
    }
    let kind = match t.kind.as_deref().unwrap_or("shell") {
        "shell" => ExecKind::Shell,
        "python" => ExecKind::Python,
        "jar" => ExecKind::Jar,
        k => {
            return Err(ApiError::bad_request(format!(
                "unknown kind {k:?}: use shell, python, jar, fetch or seed"
            )))
        }
    };
    if t.command.is_empty() && t.script.is_none() {
        return Err(ApiError::bad_request("give a command or a script"));
    }
    if t.script.as_ref().is_some_and(|s| s.len() > MAX_SCRIPT) {
        return Err(ApiError::too_large(format!(
            "a script may hold at most {MAX_SCRIPT} bytes"
        )));
    }
    let command_len = t.command.len() + t.args.iter().map(|a| a.len() + 1).sum::<usize>();
    if command_len > crate::caps::MAX_COMMAND {
        return Err(ApiError::too_large(format!(
            "the command and its arguments hold {command_len} bytes; at most {} are allowed (send a longer program as a script, up to {MAX_SCRIPT} bytes)",
            crate::caps::MAX_COMMAND
        )));
    }
    // The summary is what listings show: a line, not the whole command.
    let summary = match &t.script {
        Some(_) => format!("{} script", t.kind.as_deref().unwrap_or("shell")),
        None => crate::caps::cut(
            &std::iter::once(t.command.clone())
                .chain(t.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" "),
            crate::caps::SUMMARY_MAX,
        ),
    };
    let spec = ExecSpec {
        kind,
        command: t.command,
        args: t.args,
        script: t.script.map(String::into_bytes),
        user: t.user,
        cwd: t.cwd,
        env: t.env,
        timeout_ms: t.timeout_ms,
    };
    let rec = center::create_task(
        &inner,
        &caller.token_id,
        center::TaskRequest {
            target: t.target,
            body: TaskBody::Exec(spec),
            summary,
            ttl,
            batch,
            max_failures: t.max_failures,
        },
    )?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": rec.id, "hosts": rec.hosts })),
    ))
}

#[derive(Debug, Serialize)]
struct HostView {
    host: String,
    state: &'static str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    error: Option<String>,
    queued_at: u64,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    /// Fetches: bytes in place and the content's total, as last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    /// Fetches: bytes that crossed the network, and the MD5 of each file placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    received: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    md5: Vec<String>,
}

/// What a finished fetch's output says: the MD5 per file and the bytes received.
fn fetch_facts(stdout: &[u8]) -> (Vec<String>, Option<u64>) {
    let text = String::from_utf8_lossy(stdout);
    let mut md5s = Vec::new();
    let mut received = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("received ") {
            received = rest.split(' ').next().and_then(|n| n.parse().ok());
        } else if let Some((m, _)) = line.split_once("  ") {
            if m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()) {
                md5s.push(m.to_string());
            }
        }
    }
    (md5s, received)
}

fn task_json(inner: &Inner, rec: TaskRecord, with_output: bool) -> Result<Value, ApiError> {
    let id = rec.id;
    let results = inner.store.results(id)?;
    let running = inner.running.lock().unwrap().clone();
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    // A listing reads no bodies (a page of finished tasks with 1 MiB scripts would read
    // and decode 200 MiB): only running ones, which are cached, say if they are copies.
    let body = if with_output {
        center::task_body(inner, id)
    } else {
        center::cached_task_body(inner, id)
    };
    let fetch_size = match body.as_deref() {
        Some((TaskBody::Fetch(f), _)) => Some(f.size),
        _ => None,
    };
    let is_fetch = fetch_size.is_some();
    let size = fetch_size.unwrap_or(0);
    let hosts: Vec<HostView> = results
        .into_iter()
        .map(|r| {
            let acked = running.contains(&(id, r.host.clone()));
            let state = if acked && !r.state.is_final() {
                "running"
            } else {
                center::state_name(r.state)
            };
            *counts.entry(state).or_default() += 1;
            let prog = is_fetch
                .then(|| inner.content.progress(id, &r.host))
                .flatten();
            let (md5, received) = if is_fetch && r.state == HostState::Ok {
                fetch_facts(&r.stdout)
            } else {
                (Vec::new(), None)
            };
            let total = prog.map(|p| p.1).or(is_fetch.then_some(size));
            let bytes = if is_fetch && r.state == HostState::Ok {
                total
            } else {
                prog.map(|p| p.0).or(is_fetch.then_some(0))
            };
            HostView {
                bytes,
                total,
                received,
                md5,
                host: r.host,
                state,
                exit_code: r.exit_code,
                signal: r.signal,
                stdout: if with_output {
                    String::from_utf8_lossy(&r.stdout).into_owned()
                } else {
                    String::new()
                },
                stderr: if with_output {
                    String::from_utf8_lossy(&r.stderr).into_owned()
                } else {
                    String::new()
                },
                stdout_truncated: r.stdout_truncated,
                stderr_truncated: r.stderr_truncated,
                error: r.error,
                queued_at: r.queued_at,
                started_at: r.started_at,
                finished_at: r.finished_at,
            }
        })
        .collect();
    Ok(json!({
        "id": rec.id,
        "state": match rec.state { TaskState::Running => "running", TaskState::Done => "done", TaskState::Cancelled => "cancelled" },
        "created_at": rec.created_at,
        "created_by": rec.created_by,
        "target": rec.target,
        "summary": rec.summary,
        "ttl_ms": rec.ttl_ms,
        "batch": rec.batch,
        "max_failures": rec.max_failures,
        "counts": counts,
        "hosts": hosts,
    }))
}

/// What a caller that may not see a task's output gets instead.
const HIDDEN: &str = "[output hidden: it holds a credential]";

/// Whether the caller may read a task's output. A seed's output is its ticket, a
/// credential to whatever the host serves: only the admin scope and the token that
/// created the seed see it.
fn may_see_output(caller: &Caller, rec: &TaskRecord) -> bool {
    let seed = matches!(
        postcard::from_bytes::<TaskBody>(&rec.body),
        Ok(TaskBody::Seed(_)) | Err(_)
    );
    !seed || caller.scope == Scope::Admin || caller.token_id == rec.created_by
}

#[derive(Debug, Deserialize)]
struct ShowQuery {
    /// `false`: leave each host's stdout and stderr out (the CLI's summary needs only
    /// states, and a task on many hosts has megabytes of output a host).
    output: Option<bool>,
}

async fn show_task(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<u64>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read)?;
    let rec = inner
        .store
        .get_task(id)?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    let with_output = may_see_output(&caller, &rec) && q.output.unwrap_or(true);
    Ok(Json(task_json(&inner, rec, with_output)?))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    /// Paging: tasks listed after this id (listings are newest first, so older ones).
    after: Option<u64>,
}

/// Tasks listed per page by default, and at most.
const TASK_PAGE: usize = 50;
const TASK_PAGE_MAX: usize = 200;

/// `GET /tasks?limit=N&after=ID`: a page of tasks, newest first, without output; the
/// next page is `after=` the last id of this one.
async fn list_tasks(
    caller: Caller,
    State(inner): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    caller.require(Scope::Read)?;
    let limit = q.limit.unwrap_or(TASK_PAGE).min(TASK_PAGE_MAX);
    let tasks = inner.store.list_tasks(q.after, limit)?;
    let mut out = Vec::new();
    for mut t in tasks {
        // A summary: the target as typed may be long.
        t.target = crate::caps::cut(&t.target, crate::caps::SUMMARY_MAX);
        // The records are in hand: only their results are read.
        out.push(task_json(&inner, t, false)?);
    }
    Ok(Json(out))
}

/// A target expression within [`crate::caps::MAX_TARGET`].
fn check_target(t: &str) -> Result<(), ApiError> {
    if t.len() > crate::caps::MAX_TARGET {
        return Err(ApiError::too_large(format!(
            "the target holds {} bytes; at most {} are allowed",
            t.len(),
            crate::caps::MAX_TARGET
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    /// Seconds to wait for something new (at most 30).
    #[serde(default)]
    wait: Option<u64>,
}

/// A copy's progress in one call, for progress bars: hosts done, bytes in place over
/// all hosts, and the slowest host still fetching.
async fn task_progress(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read)?;
    let size = match center::task_body(&inner, id).as_deref() {
        Some((TaskBody::Fetch(f), _)) => f.size,
        Some(_) => 0,
        None => return Err(ApiError::not_found(format!("no task {id}"))),
    };
    let results = inner.store.results(id)?;
    let (mut done, mut failed, mut bytes, mut total) = (0u64, 0u64, 0u64, 0u64);
    let mut slowest: Option<(f64, String, u64, u64)> = None;
    for r in &results {
        let prog = inner.content.progress(id, &r.host);
        let t = prog.map_or(size, |p| p.1);
        total += t;
        if r.state.is_final() {
            done += 1;
            if r.state == HostState::Ok {
                bytes += t;
            } else {
                failed += 1;
            }
            continue;
        }
        let b = prog.map_or(0, |p| p.0);
        bytes += b;
        let frac = if t == 0 { 0.0 } else { b as f64 / t as f64 };
        if slowest.as_ref().is_none_or(|s| frac < s.0) {
            slowest = Some((frac, r.host.clone(), b, t));
        }
    }
    Ok(Json(json!({
        "id": id, "hosts": results.len(), "done": done, "failed": failed,
        "bytes": bytes, "total": total,
        "slowest": slowest.map(|(_, h, b, t)| json!({"host": h, "bytes": b, "total": t})),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdoptReq {
    upload: Vec<crate::content::UploadedFile>,
}

/// `POST /api/v1/tasks/{id}/seed`: the center seeds this copy from now on, from files
/// uploaded to it (the CLI that seeded it is leaving while hosts are still offline).
async fn adopt_copy(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<u64>,
    body: Result<Json<AdoptReq>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Operator)?;
    let Json(req) = body?;
    for f in &req.upload {
        check_mode(f.mode, caller.scope == Scope::Admin, &caller)?;
    }
    let seed = center::adopt_copy(&inner, id, &req.upload).await?;
    Ok(Json(json!({"id": id, "seed": seed})))
}

/// `PUT /api/v1/files`: store the body in the center's content cache (for the pool
/// and for `cp --async`); answers its MD5 and size.
async fn upload_file(
    caller: Caller,
    State(inner): State<Shared>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::Operator)?;
    if inner.disk_reserve > 0 {
        if let Ok(free) = crate::caps::free_bytes(&inner.data_dir) {
            if free < inner.disk_reserve {
                return Err(ApiError::insufficient_storage(format!(
                    "the disk is full: {free} bytes free, below the reserve of {} bytes",
                    inner.disk_reserve
                )));
            }
        }
    }
    let max = inner.content.cache.quota();
    let (md5, size) = inner.content.upload(body.into_data_stream(), max).await?;
    Ok((StatusCode::CREATED, Json(json!({"md5": md5, "size": size}))))
}

/// `GET /api/v1/files`: pool members, their load, and the most requested contents.
async fn list_files(caller: Caller, State(inner): State<Shared>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(inner.content.pool_view()))
}

/// `GET /api/v1/files/{md5}`: a URL the center signed (agents, `curl -L`) or a token
/// with the operator scope; audited either way. Redirects to the least-loaded pool member holding the
/// content, or serves the center's own copy.
/// `failed=ADDR[,ADDR]`: pool members whose copy of this content the caller could
/// not verify (see [`crate::content::Content::distrust`]).
#[derive(Debug, Deserialize)]
struct FailedMembers {
    failed: Option<String>,
}

async fn get_file(
    State(inner): State<Shared>,
    Path(md5): Path<String>,
    Query(q): Query<octopus_agent::pool::Signed>,
    Query(bad): Query<FailedMembers>,
    req: Request,
) -> Response {
    let (mut parts, _) = req.into_parts();
    let authorised = if q.sig.is_some() {
        q.check(&inner.content.signer.public_key(), &md5)
            .map_err(ApiError::forbidden)
    } else {
        match Caller::from_request_parts(&mut parts, &inner).await {
            // Content may be a secret (a 0600 file): operators only.
            Ok(c) => c.require(Scope::Operator),
            Err(e) => Err(e),
        }
    };
    if let Err(e) = authorised {
        return e.into_response();
    }
    // Only a caller entitled to the content may report a bad copy of it.
    for addr in bad.failed.as_deref().unwrap_or("").split(',').take(16) {
        if let Some(host) = inner.content.distrust(&md5, addr.trim()) {
            tracing::warn!(%md5, %host, "a pool member's copy failed verification; it leaves the rotation");
        }
    }
    match inner.content.pick(&md5) {
        crate::content::PoolChoice::Member(host, addr) => {
            let url = format!("http://{addr}/files/{md5}?{}", inner.content.sign(&md5));
            tracing::debug!(%md5, %host, "pool redirect");
            (
                StatusCode::FOUND,
                [(axum::http::header::LOCATION, url)],
                format!("at {host}\n"),
            )
                .into_response()
        }
        crate::content::PoolChoice::Center => match inner.content.cache.get(&md5) {
            Some(path) => octopus_agent::pool::respond_file(&path, &md5, &parts.headers).await,
            None => ApiError::not_found(format!("no pool member holds {md5}")).into_response(),
        },
        crate::content::PoolChoice::Nowhere => {
            ApiError::not_found(format!("no pool member holds {md5}")).into_response()
        }
    }
}

async fn task_events(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<u64>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(10).min(30));
    loop {
        // Register for wake-up before looking, so nothing slips between the two.
        let notified = inner.events_changed.notified();
        let rec = inner
            .store
            .get_task(id)?
            .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
        // The open count, not every result: a follower of a task on thousands of hosts
        // wakes up once per batch of events.
        let pending = inner.store.open_hosts(id)?;
        let finished = rec.state != TaskState::Running || pending == 0;
        let (mut events, next, truncated) = center::events_since(&inner, id, q.after);
        if !may_see_output(&caller, &rec) {
            for e in &mut events {
                if e.kind == "stdout" || e.kind == "stderr" {
                    e.data = HIDDEN.to_string();
                }
            }
        }
        if !events.is_empty() || finished || tokio::time::Instant::now() >= deadline {
            // `truncated`: events this follower had not read were dropped to keep the
            // center's memory bounded; the stored result has the output (up to its cap).
            return Ok(Json(json!({
                "events": events,
                "next": next,
                "finished": finished,
                "pending": pending,
                "truncated": truncated,
            })));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn cancel_task(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Operator)?;
    let Some(rec) = inner.store.get_task(id)? else {
        return Err(ApiError::not_found(format!("no task {id}")));
    };
    if caller.scope != Scope::Admin && rec.created_by != caller.token_id {
        return Err(ApiError::forbidden(format!(
            "task {id} was created by token {}: an operator may cancel only its own tasks \
             (admin any)",
            rec.created_by
        )));
    }
    let told = center::cancel_task(&inner, id)?;
    Ok(Json(json!({ "id": id, "stopping_on": told })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    scope: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    one_time: bool,
    #[serde(default)]
    note: String,
    #[serde(default)]
    limits: crate::limits::TokenLimits,
}

async fn create_token(
    caller: Caller,
    State(inner): State<Shared>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::Admin)?;
    let Json(t) = body?;
    let scope: Scope = t.scope.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "unknown scope {:?}: use admin, operator, read or enroll",
            t.scope
        ))
    })?;
    let mut allow = Vec::new();
    for c in &t.allow {
        allow.push(
            c.parse::<auth::Cidr>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    t.limits.validate().map_err(ApiError::bad_request)?;
    let (text, mut rec) = auth::new_token(
        scope,
        allow,
        t.ttl_ms.map(Duration::from_millis),
        t.one_time,
        t.note,
        proto::now_ms(),
    );
    rec.limits = t.limits;
    inner.store.put_token(&rec)?;
    // Every token carries the CA fingerprint: agents pin it at enrollment, the CLI
    // pins the API's certificate with it.
    let full = auth::with_ca_fingerprint(&text, &center::fingerprint_hex(&inner.ca.fingerprint));
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": rec.id, "token": full, "scope": scope.to_string(), "expires_at": rec.expires_at }),
        ),
    ))
}

async fn list_tokens(caller: Caller, State(inner): State<Shared>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let tokens: Vec<Value> = inner
        .store
        .list_tokens()?
        .into_iter()
        .map(|t| {
            json!({
                "id": t.id, "scope": t.scope.to_string(), "allow": t.allow,
                "created_at": t.created_at, "expires_at": t.expires_at,
                "one_time": t.one_time, "uses": t.uses, "revoked": t.revoked, "note": t.note,
                "limits": t.limits,
            })
        })
        .collect();
    Ok(Json(Value::Array(tokens)))
}

async fn revoke_token(
    caller: Caller,
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !inner.store.revoke_token(&id)? {
        return Err(ApiError::not_found(format!("no token {id}")));
    }
    Ok(Json(json!({ "id": id, "revoked": true })))
}

async fn list_audit(
    caller: Caller,
    State(inner): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let entries = inner.store.list_audit(q.limit.unwrap_or(100).min(10_000))?;
    Ok(Json(
        serde_json::to_value(entries).map_err(ApiError::internal)?,
    ))
}
