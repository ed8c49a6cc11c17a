//! HTTP: health, readiness, metrics and the trigger API.
//!
//! `POST /v1/targets/{name}/rotations` → 202 with the rotation id and `Location`;
//! `GET /v1/rotations/{id}`; `GET /v1/targets`. Every `/v1` call needs
//! `Authorization: Bearer <token>`; tokens come from a file of `name:token` lines and the
//! name is recorded as the actor. On a follower, `/v1` calls are forwarded to the leader
//! ([`crate::forward`]); a trigger a follower cannot forward gets 503 with the leader's
//! identity.
//!
//! Bad input gets a JSON `{"error": "..."}` with the status that fits (400 bad body, 401
//! token, 404 unknown target or endpoint, 405 method, 413 body over 16 KiB, 415 content
//! type), never a panic and never internal detail (backend addresses, Rust type names): the
//! detail goes to the log. [`json_errors`] is the safety net for what axum itself answers.

use crate::daemon::{Accepted, Daemon, TriggerError};
use crate::rotation::ports::AccountRef;
use crate::rotation::{Journal, StepState};
use crate::rotation::{RotationRequest, Trigger};
use crate::secret::Secret;
use crate::sync::RwLockExt;
use async_trait::async_trait;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Request bodies are tiny; anything bigger is refused before parsing.
const BODY_LIMIT: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read API tokens file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("API tokens file {path}, line {line}: {problem}")]
    Line {
        path: String,
        line: usize,
        problem: &'static str,
    },
    /// One token under two names would make the audited actor a guess.
    #[error("API tokens file {path}, lines {first_line} and {line}: {first_name:?} and {name:?} have the same token; give each name its own")]
    SharedToken {
        path: String,
        first_line: usize,
        first_name: String,
        line: usize,
        name: String,
    },
}

/// Named bearer tokens (`name:token` per line; `#` comments and blank lines ignored).
#[derive(Clone, Default)]
pub struct ApiTokens {
    tokens: Vec<(String, Secret)>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ApiTokens").field("names", &names).finish()
    }
}

impl ApiTokens {
    pub fn parse(text: &str, origin: &str) -> Result<ApiTokens, TokensError> {
        let mut tokens: Vec<(String, Secret)> = Vec::new();
        let mut lines: Vec<usize> = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |problem| TokensError::Line {
                path: origin.to_string(),
                line: i + 1,
                problem,
            };
            let (name, token) = line
                .split_once(':')
                .ok_or_else(|| err("expected name:token"))?;
            let (name, token) = (name.trim(), token.trim());
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            {
                return Err(err("the name must be non-empty letters, digits, - _ . @"));
            }
            if token.len() < 16 {
                return Err(err("the token must be at least 16 characters"));
            }
            if tokens.iter().any(|(n, _)| n == name) {
                return Err(err("duplicate name"));
            }
            if let Some(j) = tokens.iter().position(|(_, t)| t.expose() == token) {
                return Err(TokensError::SharedToken {
                    path: origin.to_string(),
                    first_line: lines[j],
                    first_name: tokens[j].0.clone(),
                    line: i + 1,
                    name: name.to_string(),
                });
            }
            tokens.push((name.to_string(), Secret::new(token)));
            lines.push(i + 1);
        }
        Ok(ApiTokens { tokens })
    }

    pub fn load(path: &std::path::Path) -> Result<ApiTokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ApiTokens::parse(&text, &path.display().to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The name of the token `presented` matches. Compares against every token in constant
    /// time (no early exit), so timing tells nothing about which prefix matched.
    pub fn authenticate(&self, presented: &str) -> Option<String> {
        let mut found = None;
        for (name, token) in &self.tokens {
            let a = token.expose().as_bytes();
            let b = presented.as_bytes();
            // ct_eq on unequal lengths returns false without comparing; equal-length compare
            // is constant time. Token lengths are not secret.
            if bool::from(a.ct_eq(b)) {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// A failed readiness check: `backend` is what `/readyz` answers ("vault: unreachable");
/// `detail` (which may hold addresses) only goes to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    pub backend: &'static str,
    pub detail: String,
}

/// What `/readyz` checks: configuration loaded and the backends reachable.
#[async_trait]
pub trait Readiness: Send + Sync {
    /// `Err` with one entry per failed check.
    async fn check(&self) -> Result<(), Vec<Unready>>;
}

/// Always ready (tests, or a daemon without backends to check).
pub struct AlwaysReady;
#[async_trait]
impl Readiness for AlwaysReady {
    async fn check(&self) -> Result<(), Vec<Unready>> {
        Ok(())
    }
}

/// Renders the metrics exposition.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    pub daemon: Daemon,
    pub tokens: Arc<RwLock<ApiTokens>>,
    pub readiness: Arc<dyn Readiness>,
    pub metrics: MetricsRender,
    /// Sends a follower's `/v1` calls to the leader; `None`: every call is answered here.
    pub forward: Option<Arc<crate::forward::Forwarder>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/targets", get(list_targets))
        .route("/v1/targets/{name}/rotations", post(create_rotation))
        .route("/v1/rotations/{id}", get(get_rotation))
        .route("/v1/inventory", get(get_inventory))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::forward::middleware,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The safety net: an error axum answers by itself (405 with an empty body, a rejected
/// extractor's plain text) becomes a JSON error with the same status, and its text (which
/// may name Rust types) is dropped. `Allow` and `WWW-Authenticate` are kept. `/readyz`
/// answers probes in plain text and is left alone.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let probe = req.uri().path() == "/readyz";
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if probe || is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => format!("the body is larger than {BODY_LIMIT} bytes"),
        s => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut r = error(status, message);
    for h in [header::ALLOW, header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&h) {
            r.headers_mut().insert(h, v.clone());
        }
    }
    r
}

/// A caller's string fit to echo in an error: Debug-quoted (no control characters) and cut
/// to 64 characters.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}

/// The token name, or a 401 response.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, Response> {
    // The scheme is case-insensitive (RFC 9110); a header that is not ASCII matches nothing.
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let name = presented.and_then(|p| state.tokens.read_now().authenticate(p));
    name.ok_or_else(|| {
        tracing::warn!("API call refused: missing or unknown bearer token");
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    })
}

/// `ready`, or which backends are unreachable; what went wrong (addresses, errors) is logged,
/// never answered: `/readyz` is open to anyone who can reach the port.
async fn readyz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(5), state.readiness.check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(problems)) => {
            for p in &problems {
                tracing::warn!(backend = p.backend, detail = %p.detail, "not ready");
            }
            let names: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: unreachable", p.backend))
                .collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", names.join("; ")),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: checks timed out\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        (state.metrics)(),
    )
        .into_response()
}

/// The body of `POST /v1/targets/{name}/rotations`.
#[derive(Debug, Default, PartialEq, Eq)]
struct RotationBody {
    reason: String,
    emergency: bool,
    revoke_first: bool,
}

/// Longest `reason`, in characters (it goes into the audit trail and the journal).
const REASON_MAX: usize = 1024;

impl RotationBody {
    /// An empty body means "defaults"; otherwise a JSON object of the three known fields,
    /// each of its type (`null` = absent). Read by hand, not by serde, so errors name the
    /// field in the caller's terms (serde would say "struct RotationBody").
    #[allow(clippy::result_large_err)] // the error is the response itself, built once
    fn parse(
        headers: &HeaderMap,
        body: Result<axum::body::Bytes, BytesRejection>,
    ) -> Result<RotationBody, Response> {
        let bad = |m: String| error(StatusCode::BAD_REQUEST, format!("invalid body: {m}"));
        let body = body.map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {BODY_LIMIT} bytes"),
            ),
            _ => bad("it could not be read".into()),
        })?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(RotationBody::default());
        }
        if !json_content_type(headers) {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let text = std::str::from_utf8(&body).map_err(|_| bad("not UTF-8".into()))?;
        // serde_json's syntax errors give a position, never the input.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(bad(
                "expected a JSON object such as {\"reason\": \"...\", \"emergency\": false}".into(),
            ));
        };
        let mut b = RotationBody::default();
        for (key, v) in fields {
            use serde_json::Value as V;
            match (key.as_str(), v) {
                (_, V::Null) if ["reason", "emergency", "revoke_first"].contains(&key.as_str()) => {
                }
                ("reason", V::String(r)) => b.reason = r,
                ("reason", _) => return Err(bad("reason must be a string".into())),
                ("emergency", V::Bool(e)) => b.emergency = e,
                ("revoke_first", V::Bool(r)) => b.revoke_first = r,
                ("emergency" | "revoke_first", _) => {
                    return Err(bad(format!("{key} must be true or false")))
                }
                _ => {
                    return Err(bad(format!(
                        "unknown field {}; the fields are reason, emergency and revoke_first",
                        shown(&key)
                    )))
                }
            }
        }
        if b.reason.chars().count() > REASON_MAX {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("reason is longer than {REASON_MAX} characters"),
            ));
        }
        if b.reason.chars().any(char::is_control) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "reason must be one line of text (no control characters)",
            ));
        }
        if b.revoke_first && !b.emergency {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "revoke_first deletes the old key before rolling; it requires \"emergency\": true",
            ));
        }
        Ok(b)
    }
}

/// No `Content-Type`, JSON, or the form type `curl -d` sends by default (the README's and the
/// chart's examples use it): anything else declares a body that is not JSON.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(v) = v.to_str() else {
        return false;
    };
    let mime = v
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json"
        || mime.ends_with("+json")
        || mime == "application/x-www-form-urlencoded"
}

/// The `{name}` of a trigger: a name a target could have, or a 404 (so `..%2F..`, encoded
/// slashes and 10 KB names never reach the daemon). Not UTF-8 once decoded: 400.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
fn target_name(path: Result<Path<String>, PathRejection>) -> Result<String, Response> {
    let Ok(Path(name)) = path else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the path is not valid UTF-8 once percent-decoded",
        ));
    };
    if !crate::config::is_target_name(&name) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown target {}", shown(&name)),
        ));
    }
    Ok(name)
}

async fn create_rotation(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let actor = match authenticate(&state, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let name = match target_name(name) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let parsed = match RotationBody::parse(&headers, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let reason = if parsed.reason.is_empty() {
        "api"
    } else {
        parsed.reason.as_str()
    };
    let mut req = RotationRequest::new(&name, Trigger::Api, &actor, reason, chrono::Utc::now());
    if parsed.emergency {
        req = req.emergency(parsed.revoke_first);
    }
    match state.daemon.trigger(&req).await {
        Ok(accepted) => {
            let id = accepted.rotation_id().to_string();
            let location = format!("/v1/rotations/{id}");
            let status = match accepted {
                Accepted::Started(_) => "accepted",
                Accepted::Upgraded(_) => "upgraded",
                Accepted::Resumed(_) => "resumed",
            };
            let mut r = (
                StatusCode::ACCEPTED,
                Json(json!({
                    "rotation_id": id,
                    "target": name,
                    "status": status,
                    "location": location,
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e @ TriggerError::UnknownTarget(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(TriggerError::AlreadyRunning {
            target,
            rotation_id,
        }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("target {target} is already rotating; send \"emergency\": true to upgrade that rotation"),
                "rotation_id": rotation_id,
                "location": format!("/v1/rotations/{rotation_id}"),
            })),
        )
            .into_response(),
        Err(TriggerError::NotLeader { leader }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "this replica is not the leader; send the request to the leader",
                "leader": leader,
            })),
        )
            .into_response(),
        Err(e @ (TriggerError::ShuttingDown | TriggerError::Unavailable { .. })) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

async fn get_rotation(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
        return r;
    }
    let id = match id {
        Ok(Path(id)) if crate::rotation::journal::is_rotation_id(&id) => id,
        Ok(Path(id)) => return error(StatusCode::NOT_FOUND, format!("no rotation {}", shown(&id))),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the path is not valid UTF-8 once percent-decoded",
            )
        }
    };
    match state.daemon.rotation(&id).await {
        Ok(Some(j)) => Json(RotationView::from(&j)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rotation {id}")),
        Err(e) => {
            // The error may name the Vault address: the log gets it, the caller does not.
            tracing::warn!(rotation_id = %id, error = %e, "reading rotation history failed");
            error(
                StatusCode::BAD_GATEWAY,
                "cannot read the rotation history from the state store; see the daemon's log",
            )
        }
    }
}

/// `GET /v1/rotations/{id}`: the API's own view of a rotation, so the journal's storage
/// schema can change without breaking clients. Ids, versions and times; no hashes.
#[derive(Debug, Serialize)]
pub struct RotationView {
    pub rotation_id: String,
    pub target: String,
    pub trigger: &'static str,
    pub actor: String,
    pub reason: String,
    pub emergency: bool,
    pub revoke_first: bool,
    pub status: &'static str,
    pub step: &'static str,
    pub step_state: StepState,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub new_account_name: String,
    pub old_account: Option<AccountRef>,
    pub new_account: Option<AccountRef>,
    pub old_vault_version: u64,
    pub new_vault_version: Option<u64>,
    pub rollback_vault_version: Option<u64>,
    pub old_retired: bool,
    pub pending_deletions: Vec<PendingView>,
    pub steps: Vec<StepView>,
    /// A staged target's waves in order (empty without waves).
    pub waves: Vec<WaveView>,
    /// Requests the Usage API counted for the new key when adoption was proven.
    pub new_key_adopted: Option<u64>,
    pub error: Option<String>,
    /// An emergency rotation's report on the old key: usage buckets and audit-log events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forensics: Option<crate::forensics::ForensicsReport>,
}

#[derive(Debug, Serialize)]
pub struct WaveView {
    /// From 1.
    pub wave: usize,
    pub workloads: Vec<String>,
    pub rolled_at: Option<DateTime<Utc>>,
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct PendingView {
    pub service_account_id: String,
    pub key_id: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub step: &'static str,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
}

impl From<&Journal> for RotationView {
    fn from(j: &Journal) -> Self {
        RotationView {
            rotation_id: j.rotation_id.clone(),
            target: j.target.clone(),
            trigger: j.trigger.as_str(),
            actor: j.actor.clone(),
            reason: j.reason.clone(),
            emergency: j.emergency,
            revoke_first: j.revoke_first,
            status: j.status.as_str(),
            step: j.step.as_str(),
            step_state: j.step_state,
            started_at: j.started_at,
            updated_at: j.updated_at,
            new_account_name: j.new_account_name.clone(),
            old_account: j.old_account.clone(),
            new_account: j.new_account.clone(),
            old_vault_version: j.old_vault_version,
            new_vault_version: j.new_vault_version,
            rollback_vault_version: j.rollback_vault_version,
            old_retired: j.old_retired,
            pending_deletions: j
                .pending_deletions
                .iter()
                .map(|p| PendingView {
                    service_account_id: p.account.id.clone(),
                    key_id: p.account.key_id.clone(),
                    attempts: p.attempts,
                    last_error: p.last_error.clone(),
                })
                .collect(),
            steps: j
                .steps
                .iter()
                .map(|s| StepView {
                    step: s.step.as_str(),
                    started_at: s.started_at,
                    finished_at: s.finished_at,
                    outcome: s.outcome.clone(),
                })
                .collect(),
            waves: j
                .waves
                .iter()
                .enumerate()
                .map(|(i, p)| WaveView {
                    wave: i + 1,
                    workloads: j
                        .spec
                        .as_ref()
                        .and_then(|t| t.waves.get(i))
                        .map(|w| w.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    rolled_at: p.rolled_at,
                    verified_at: p.verified_at,
                })
                .collect(),
            new_key_adopted: j.new_key_adopted,
            error: j.error.clone(),
            forensics: j.forensics.clone(),
        }
    }
}

async fn list_targets(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
        return r;
    }
    Json(json!({ "targets": state.daemon.targets() })).into_response()
}

/// `GET /v1/inventory?project=P&unused_days=N`: the key inventory as one JSON array (a
/// project that cannot be listed is an error row); the configured windows by default.
async fn get_inventory(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
        return r;
    }
    let config = state.daemon.config();
    let mut opts = crate::inventory::Options::from_config(&config.daemon);
    let raw = query.unwrap_or_default();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "project" if !v.is_empty() && v.len() <= 128 => opts.project = Some(v.into_owned()),
            "project" => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "project: must be a project id of 1-128 characters",
                )
            }
            "unused_days" => match crate::inventory::unused_days("unused_days", &v) {
                Ok(d) => opts.unused_after = d,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown query parameter {}: expected project or unused_days",
                        shown(other)
                    ),
                )
            }
        }
    }
    match state.daemon.inventory(&opts).await {
        Ok(inv) => Json(inv.rows).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "inventory failed");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DurationStr, VaultConfig};
    use crate::daemon::{DaemonOptions, Leadership, LiveRotations, NoSchedule};
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::EngineOptions;
    use axum::body::Body;
    use axum::http::Request;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    const TOKEN: &str = "oncall-token-0123456789";

    fn app(grace: Duration) -> (Router, FakeWorld) {
        app_with(grace, Arc::new(AlwaysReady))
    }

    fn app_with(grace: Duration, readiness: Arc<dyn Readiness>) -> (Router, FakeWorld) {
        let world = FakeWorld::default();
        let (mut t, _) = world.seed_target("chat", chrono::Utc::now());
        t.grace_period = DurationStr(grace);
        let config = Arc::new(Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                kv_mount: "secret".into(),
                ca_cert: None,
                request_timeout: DurationStr::from_secs(1),
                auth: Default::default(),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            notifications: Default::default(),
            targets: vec![t],
        });
        let live = Arc::new(LiveRotations::default());
        let engine = Arc::new(
            world
                .engine(EngineOptions {
                    poll_interval: Duration::from_millis(2),
                    ..Default::default()
                })
                .with_observer(live.clone()),
        );
        let daemon = Daemon::new(
            config,
            engine,
            Arc::new(world.store.clone()),
            live,
            Arc::new(NoSchedule),
            Leadership::sole(),
            DaemonOptions::default(),
            CancellationToken::new(),
        );
        let tokens = ApiTokens::parse(
            &format!("# on-call\noncall:{TOKEN}\n\nci:ci-token-abcdefghijklmnop\n"),
            "t",
        )
        .unwrap();
        let state = AppState {
            daemon,
            tokens: Arc::new(RwLock::new(tokens)),
            readiness,
            metrics: Arc::new(|| "openai_key_rotator_up 1\n".to_string()),
            forward: None,
        };
        (router(state), world)
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .clone()
            .oneshot(
                req.header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into(),
        ));
        (status, headers, v)
    }

    #[tokio::test]
    async fn trigger_then_follow_the_rotation() {
        let (app, _world) = app(Duration::from_millis(5));
        let (s, h, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            Some(TOKEN),
            r#"{"reason":"leaked in a log"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id = v["rotation_id"].as_str().unwrap().to_string();
        assert_eq!(h["location"], format!("/v1/rotations/{id}").as_str());
        assert_eq!(v["status"], "accepted");
        let mut last = serde_json::Value::Null;
        for _ in 0..1000 {
            let (s, _, v) =
                call(&app, "GET", &format!("/v1/rotations/{id}"), Some(TOKEN), "").await;
            if s == StatusCode::OK && v["status"] == "completed" {
                last = v;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(last["status"], "completed", "{last}");
        assert_eq!(last["actor"], "oncall", "the token's name is the actor");
        assert_eq!(last["reason"], "leaked in a log");
        assert!(last.get("new_key_sha256").is_none());
        assert_eq!(last["steps"].as_array().unwrap().len(), 7);
        let (s, _, v) = call(&app, "GET", "/v1/targets", Some(TOKEN), "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["targets"][0]["name"], "chat");
        assert_eq!(v["targets"][0]["last_outcome"], "completed");
    }

    #[tokio::test]
    async fn conflicts_upgrades_and_bad_requests() {
        let (app, _world) = app(Duration::from_secs(3600));
        let (s, _, v) = call(&app, "POST", "/v1/targets/chat/rotations", Some(TOKEN), "").await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id = v["rotation_id"].as_str().unwrap().to_string();
        // A second, non-emergency request: 409 with the running id.
        let (s, _, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            Some(TOKEN),
            "{}",
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(v["rotation_id"], id.as_str());
        // An emergency request upgrades it.
        let (s, _, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            Some(TOKEN),
            r#"{"emergency":true,"reason":"leak"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(v["status"], "upgraded");
        assert_eq!(v["rotation_id"], id.as_str());

        for (body, want) in [
            ("{not json", "invalid body"),
            (r#"{"emergency":"yes"}"#, "invalid body"),
            (r#"{"urgent":true}"#, "unknown field"),
            (r#"{"revoke_first":true}"#, "requires"),
        ] {
            let (s, _, v) = call(
                &app,
                "POST",
                "/v1/targets/chat/rotations",
                Some(TOKEN),
                body,
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
            assert!(v["error"].as_str().unwrap().contains(want), "{body}: {v}");
        }
        let (s, _, _) = call(
            &app,
            "POST",
            "/v1/targets/nope/rotations",
            Some(TOKEN),
            "{}",
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = call(
            &app,
            "GET",
            "/v1/rotations/20990101000000-abcdef",
            Some(TOKEN),
            "",
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let big = format!(r#"{{"reason":"{}"}}"#, "x".repeat(BODY_LIMIT + 10));
        let (s, _, _) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            Some(TOKEN),
            &big,
        )
        .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn every_api_call_needs_a_valid_token() {
        let (app, world) = app(Duration::from_millis(5));
        for token in [
            None,
            Some("wrong-token-0123456789"),
            Some(&TOKEN[..TOKEN.len() - 1]),
        ] {
            for (m, uri) in [
                ("POST", "/v1/targets/chat/rotations"),
                ("GET", "/v1/targets"),
                ("GET", "/v1/rotations/20990101000000-abcdef"),
            ] {
                let (s, h, v) = call(&app, m, uri, token, "{}").await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {uri} {token:?}");
                assert_eq!(h["www-authenticate"], "Bearer");
                assert!(v["error"].is_string());
            }
        }
        assert!(world.log.entries().is_empty(), "nothing was rotated");
        // Health, readiness and metrics are open (probes and Prometheus).
        assert_eq!(
            call(&app, "GET", "/healthz", None, "").await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, "GET", "/readyz", None, "").await.0,
            StatusCode::OK
        );
        let (s, h, _) = call(&app, "GET", "/metrics", None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
    }

    /// Send `req`; the status, headers and raw body.
    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, bytes.to_vec())
    }

    /// The answer is `{"error": "<message>"}` as JSON; the message.
    fn json_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> String {
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{status}: {headers:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(body)
            )
        });
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}: no error string in {v}"))
            .to_string()
    }

    fn post(uri: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
        let mut r = Request::builder()
            .method("POST")
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"));
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        r.body(body.into()).unwrap()
    }

    #[tokio::test]
    async fn bad_bodies_get_json_errors_that_name_the_problem_not_our_types() {
        let (app, world) = app(Duration::from_secs(3600));
        let uri = "/v1/targets/chat/rotations";
        let json = Some("application/json");
        let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let long_reason = format!(r#"{{"reason":"{}"}}"#, "é".repeat(REASON_MAX + 1));
        let cases: Vec<(Option<&str>, Vec<u8>, StatusCode, &str)> = vec![
            (
                json,
                b"{not json".to_vec(),
                StatusCode::BAD_REQUEST,
                "invalid body: not JSON",
            ),
            (
                json,
                b"[]".to_vec(),
                StatusCode::BAD_REQUEST,
                "expected a JSON object",
            ),
            (
                json,
                b"\"rotate\"".to_vec(),
                StatusCode::BAD_REQUEST,
                "expected a JSON object",
            ),
            (
                json,
                b"42".to_vec(),
                StatusCode::BAD_REQUEST,
                "expected a JSON object",
            ),
            (
                json,
                b"null".to_vec(),
                StatusCode::BAD_REQUEST,
                "expected a JSON object",
            ),
            (
                json,
                nested.into_bytes(),
                StatusCode::BAD_REQUEST,
                "not JSON",
            ),
            (
                json,
                br#"{"emergency":"yes"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "emergency must be true or false",
            ),
            (
                json,
                br#"{"revoke_first":1}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "revoke_first must be true or false",
            ),
            (
                json,
                br#"{"reason":["a"]}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "reason must be a string",
            ),
            (
                json,
                br#"{"urgent":true}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "unknown field \"urgent\"",
            ),
            (
                json,
                br#"{"revoke_first":true}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "requires",
            ),
            (
                json,
                long_reason.into_bytes(),
                StatusCode::BAD_REQUEST,
                "reason is longer than 1024 characters",
            ),
            (
                json,
                br#"{"reason":"line\nbreak"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "no control characters",
            ),
            (
                json,
                b"{\"reason\":\"\xff\xfe\"}".to_vec(),
                StatusCode::BAD_REQUEST,
                "not UTF-8",
            ),
            (
                Some("text/plain"),
                b"{}".to_vec(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "must be JSON",
            ),
            (
                Some("multipart/form-data; boundary=x"),
                b"{}".to_vec(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "must be JSON",
            ),
            (
                json,
                vec![b' '; BODY_LIMIT + 1],
                StatusCode::PAYLOAD_TOO_LARGE,
                "larger than 16384 bytes",
            ),
        ];
        for (ct, body, want_status, want) in cases {
            let shown_body = String::from_utf8_lossy(&body[..body.len().min(40)]).to_string();
            let (s, h, b) = send(&app, post(uri, ct, body)).await;
            assert_eq!(s, want_status, "{ct:?} {shown_body}");
            let e = json_error(s, &h, &b);
            assert!(e.contains(want), "{shown_body}: {e}");
            assert!(!e.contains("RotationBody") && !e.contains("struct"), "{e}");
        }
        assert!(
            world.log.entries().is_empty(),
            "no bad request started a rotation"
        );
        // What `curl -d` sends (form type) and a JSON body without a type are read as JSON.
        for ct in [Some("application/x-www-form-urlencoded"), None] {
            let (s, _, b) = send(&app, post(uri, ct, r#"{"reason":"r"}"#)).await;
            assert!(
                s == StatusCode::ACCEPTED || s == StatusCode::CONFLICT,
                "{ct:?}: {s} {}",
                String::from_utf8_lossy(&b)
            );
        }
    }

    #[tokio::test]
    async fn path_tricks_unknown_targets_and_methods_get_json_errors() {
        let (app, world) = app(Duration::from_secs(3600));
        let long = "a".repeat(10_000);
        let long_uri = format!("/v1/targets/{long}/rotations");
        let long_id = format!("/v1/rotations/{long}");
        for (uri, want_status, want) in [
            (
                "/v1/targets/..%2f../rotations",
                StatusCode::NOT_FOUND,
                "unknown target \"../..\"",
            ),
            (
                "/v1/targets/..%2F..%2Fsecret/rotations",
                StatusCode::NOT_FOUND,
                "unknown target",
            ),
            (
                "/v1/targets/%2e%2e/rotations",
                StatusCode::NOT_FOUND,
                "unknown target \"..\"",
            ),
            (
                "/v1/targets/chat%2Frotations/rotations",
                StatusCode::NOT_FOUND,
                "unknown target",
            ),
            (
                "/v1/targets/Chat/rotations",
                StatusCode::NOT_FOUND,
                "unknown target \"Chat\"",
            ),
            (
                "/v1/targets/chat%00/rotations",
                StatusCode::NOT_FOUND,
                "unknown target \"chat\\0\"",
            ),
            (
                "/v1/targets/nope/rotations",
                StatusCode::NOT_FOUND,
                "unknown target \"nope\"",
            ),
            (
                "/v1/targets/%FF%FE/rotations",
                StatusCode::BAD_REQUEST,
                "not valid UTF-8",
            ),
            (
                "/v1/targets/../targets/chat/rotations",
                StatusCode::NOT_FOUND,
                "",
            ),
            (
                "/v1/targets/chat/rotations/extra",
                StatusCode::NOT_FOUND,
                "no such endpoint",
            ),
            ("/v1/targets//rotations", StatusCode::NOT_FOUND, ""),
            (
                long_uri.as_str(),
                StatusCode::NOT_FOUND,
                "unknown target \"aaaa",
            ),
        ] {
            let (s, h, b) = send(&app, post(uri, Some("application/json"), "{}")).await;
            assert_eq!(s, want_status, "{}", &uri[..uri.len().min(80)]);
            let e = json_error(s, &h, &b);
            assert!(e.contains(want), "{uri}: {e}");
            assert!(e.len() < 200, "a long name is cut: {} bytes", e.len());
        }
        let get = |uri: &str| {
            Request::builder()
                .uri(uri)
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap()
        };
        for uri in [
            long_id.as_str(),
            "/v1/rotations/..%2f..",
            "/v1/rotations/%FF",
        ] {
            let (s, h, b) = send(&app, get(uri)).await;
            assert!(
                s == StatusCode::NOT_FOUND || s == StatusCode::BAD_REQUEST,
                "{s}"
            );
            let e = json_error(s, &h, &b);
            assert!(e.len() < 200, "{} bytes", e.len());
        }
        // Unknown methods, and known ones on the wrong route: 405 as JSON, with Allow.
        for (method, uri) in [
            ("GET", "/v1/targets/chat/rotations"),
            ("DELETE", "/v1/targets"),
            ("PUT", "/v1/rotations/20990101000000-abcdef"),
            ("FROB", "/v1/targets"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap();
            let (s, h, b) = send(&app, req).await;
            assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
            assert_eq!(json_error(s, &h, &b), "method not allowed");
            assert!(h.contains_key("allow"), "{method} {uri}: {h:?}");
        }
        let (s, h, b) = send(&app, get("/nope")).await;
        assert_eq!(
            (s, json_error(s, &h, &b).as_str()),
            (StatusCode::NOT_FOUND, "no such endpoint")
        );
        assert!(world.log.entries().is_empty(), "nothing was rotated");
    }

    #[tokio::test]
    async fn bad_and_missing_tokens_get_401_json_and_the_scheme_is_case_insensitive() {
        let (app, _world) = app(Duration::from_secs(3600));
        let uri = "/v1/targets";
        for auth in [
            None,
            Some(b"Bearer".to_vec()),
            Some(b"Bearer ".to_vec()),
            Some(format!("Basic {TOKEN}").into_bytes()),
            Some(format!("Bearer{TOKEN}").into_bytes()),
            Some(format!("Bearer {TOKEN}x").into_bytes()),
            Some(b"Bearer \xff\xfe-oncall-token".to_vec()),
            Some(vec![b'x'; 8000]),
        ] {
            let mut req = Request::builder().uri(uri);
            if let Some(a) = &auth {
                req = req.header("authorization", HeaderValue::from_bytes(a).unwrap());
            }
            let (s, h, b) = send(&app, req.body(Body::empty()).unwrap()).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{:?}",
                auth.as_ref()
                    .map(|a| String::from_utf8_lossy(&a[..a.len().min(30)]).to_string())
            );
            assert_eq!(h["www-authenticate"], "Bearer");
            let e = json_error(s, &h, &b);
            assert!(!e.contains(TOKEN), "{e}");
        }
        for scheme in ["bearer", "BEARER"] {
            let req = Request::builder()
                .uri(uri)
                .header("authorization", format!("{scheme} {TOKEN}"))
                .body(Body::empty())
                .unwrap();
            assert_eq!(send(&app, req).await.0, StatusCode::OK, "{scheme}");
        }
        // An unauthenticated caller learns nothing about targets or bodies: 401 first.
        let req = Request::builder()
            .method("POST")
            .uri("/v1/targets/..%2f../rotations")
            .body(Body::from(vec![b'x'; BODY_LIMIT + 1]))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::UNAUTHORIZED);
    }

    struct VaultDown;
    #[async_trait]
    impl Readiness for VaultDown {
        async fn check(&self) -> Result<(), Vec<Unready>> {
            Err(vec![
                Unready {
                    backend: "vault",
                    detail:
                        "error sending request for url (https://vault.internal:8200/v1/sys/health)"
                            .into(),
                },
                Unready {
                    backend: "kubernetes",
                    detail: "https://10.96.0.1:443/version: connection refused".into(),
                },
            ])
        }
    }

    #[tokio::test]
    async fn readyz_names_the_backend_not_its_address() {
        let (app, _world) = app_with(Duration::from_secs(1), Arc::new(VaultDown));
        let req = Request::builder()
            .uri("/readyz")
            .body(Body::empty())
            .unwrap();
        let (s, _, b) = send(&app, req).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            String::from_utf8_lossy(&b),
            "not ready: vault: unreachable; kubernetes: unreachable\n"
        );
    }

    #[test]
    fn two_names_with_one_token_are_an_error_naming_both_lines_not_the_token() {
        let e = ApiTokens::parse(
            "# ops\noncall:0123456789abcdef-shared\nci:ci-token-abcdefghijklmnop\n\nbot: 0123456789abcdef-shared \n",
            "tokens",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lines 2 and 5"), "{e}");
        assert!(e.contains("\"oncall\" and \"bot\""), "{e}");
        assert!(!e.contains("0123456789abcdef"), "{e}");
        // A byte-order mark (Windows editors) is not part of the first name.
        let t = ApiTokens::parse("\u{feff}a:0123456789abcdef0\n", "t").unwrap();
        assert_eq!(t.authenticate("0123456789abcdef0").as_deref(), Some("a"));
    }

    #[test]
    fn tokens_file_errors_name_the_line_not_the_token() {
        let e = ApiTokens::parse(
            "ok:0123456789abcdef0123\nbroken-line-secret-value\n",
            "tokens",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("secret-value"), "{e}");
        let e = ApiTokens::parse("a:short\n", "tokens")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = ApiTokens::parse("a:0123456789abcdef0\na:0123456789abcdef1\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
        let t = ApiTokens::parse("a:0123456789abcdef0\nb:0123456789abcdef1\n", "t").unwrap();
        assert_eq!(t.authenticate("0123456789abcdef1").as_deref(), Some("b"));
        assert_eq!(t.authenticate("0123456789abcdef"), None);
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }

    /// Property tests of request handling: whatever the method, path, headers and body,
    /// the router answers (no panic), and every error is a JSON `{"error"}` without
    /// internal detail. CI: proptest's default 256 cases; longer runs: `PROPTEST_CASES`.
    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        /// One runtime and one app for all cases (rotations started by lucky cases just run).
        fn shared() -> &'static (tokio::runtime::Runtime, Router) {
            static SHARED: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
            SHARED.get_or_init(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                let (app, _world) = rt.block_on(async { app(Duration::from_secs(3600)) });
                (rt, app)
            })
        }

        fn path() -> impl Strategy<Value = String> {
            let segment = prop_oneof![
                prop::sample::select(vec![
                    "v1",
                    "targets",
                    "rotations",
                    "chat",
                    "..",
                    ".",
                    "%2f",
                    "%2F",
                    "%2e%2e",
                    "..%2f..",
                    "%FF",
                    "%00",
                    "%",
                    "20990101000000-abcdef",
                    "healthz",
                    "readyz",
                    "metrics",
                    "",
                    "Chat",
                    "nope",
                ])
                .prop_map(str::to_string),
                "[a-zA-Z0-9._~%-]{0,24}",
                (1usize..3000).prop_map(|n| "a".repeat(n)),
            ];
            let query = prop::option::of("[a-z=&%0-9]{0,12}");
            (prop::collection::vec(segment, 0..6), query).prop_map(|(segs, q)| {
                let mut p = format!("/{}", segs.join("/"));
                if let Some(q) = q {
                    p = format!("{p}?{q}");
                }
                p
            })
        }

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::Value as V;
            let leaf = prop_oneof![
                Just(V::Null),
                any::<bool>().prop_map(V::Bool),
                any::<i64>().prop_map(V::from),
                "\\PC{0,20}".prop_map(V::String),
                (1000usize..1100).prop_map(|n| V::String("r".repeat(n))),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(V::Array),
                    prop::collection::btree_map(
                        prop_oneof![
                            prop::sample::select(vec!["reason", "emergency", "revoke_first"])
                                .prop_map(str::to_string),
                            "[a-z]{1,8}",
                        ],
                        inner,
                        0..4,
                    )
                    .prop_map(|m| V::Object(m.into_iter().collect())),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                json_value().prop_map(|v| v.to_string().into_bytes()),
                (BODY_LIMIT - 8..BODY_LIMIT + 8).prop_map(|n| vec![b'{'; n]),
                Just(Vec::new()),
            ]
        }

        fn header_value() -> impl Strategy<Value = Option<Vec<u8>>> {
            prop::option::of(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                Just(format!("Bearer {TOKEN}").into_bytes()),
                Just(b"application/json".to_vec()),
                Just(b"text/plain".to_vec()),
                "[ -~]{0,40}".prop_map(String::into_bytes),
            ])
        }

        proptest! {
            #[test]
            fn prop_tokens_parse_never_panics_on_any_text(text in "\\PC{0,300}") {
                let _ = ApiTokens::parse(&text, "tokens");
            }

            /// Lines of names and tokens, some broken, some sharing a token: an error
            /// never shows a token (tokens are `Tk` + 14 or more letters, found nowhere else).
            #[test]
            fn prop_tokens_errors_never_show_a_token(
                lines in prop::collection::vec(
                    (
                        prop_oneof!["[a-z]{1,6}", "[a-z ]{0,3}", Just("a".to_string())],
                        prop_oneof![3 => "Tk[A-Za-z]{14,20}", 1 => "Tk[a-z]{0,10}", 1 => Just("TkSharedSharedShared".to_string())],
                        prop::sample::select(vec![":", "", " : ", "::"]),
                    ),
                    0..8,
                )
            ) {
                let text: String = lines
                    .iter()
                    .map(|(n, t, sep)| format!("{n}{sep}{t}\n"))
                    .collect();
                if let Err(e) = ApiTokens::parse(&text, "tokens") {
                    let e = e.to_string();
                    for (_, t, _) in &lines {
                        prop_assert!(t.len() < 3 || !e.contains(t.as_str()), "{} in {}", t, e);
                    }
                    prop_assert!(!e.contains("Tk"), "{}", e);
                }
            }

            #[test]
            fn prop_router_answers_every_request_with_json_errors(
                method in prop_oneof![
                    prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]).prop_map(str::to_string),
                    "[A-Z]{1,10}",
                ],
                path in path(),
                auth in header_value(),
                content_type in header_value(),
                body in body(),
            ) {
                let mut req = Request::builder().method(method.as_str()).uri(path.as_str());
                for (name, value) in [("authorization", &auth), ("content-type", &content_type)] {
                    if let Some(v) = value.as_ref().and_then(|v| HeaderValue::from_bytes(v).ok()) {
                        req = req.header(name, v);
                    }
                }
                // Not every generated path or method is one HTTP can carry: skip those.
                let Ok(req) = req.body(Body::from(body)) else {
                    return Ok(());
                };
                let (rt, app) = shared();
                let (status, headers, bytes) = rt.block_on(send(app, req));
                prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{}", status);
                let text = String::from_utf8_lossy(&bytes);
                prop_assert!(!text.contains("127.0.0.1:1"), "internal address in {}", text);
                prop_assert!(!text.contains("RotationBody") && !text.contains("axum"), "{}", text);
                let probe = path.split('?').next() == Some("/readyz");
                if (status.is_client_error() || status.is_server_error()) && !probe && method != "HEAD" {
                    let is_json = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/json"));
                    prop_assert!(is_json, "{} {}: {} {:?}", method, path, status, text);
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    prop_assert!(v["error"].is_string(), "{}", v);
                }
            }
        }
    }
}
