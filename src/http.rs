//! HTTP: health, readiness, metrics and the trigger API.
//!
//! `POST /v1/targets/{name}/rotations` → 202 with the rotation id and `Location`;
//! `GET /v1/rotations/{id}`; `GET /v1/targets`. Every `/v1` call needs
//! `Authorization: Bearer <token>`; tokens come from a file of `name:token` lines and the
//! name is recorded as the actor. On a follower, `/v1` calls are forwarded to the leader
//! ([`crate::forward`]); a trigger a follower cannot forward gets 503 with the leader's
//! identity.

use crate::daemon::{Accepted, Daemon, TriggerError};
use crate::rotation::ports::AccountRef;
use crate::rotation::{Journal, StepState};
use crate::rotation::{RotationRequest, Trigger};
use crate::secret::Secret;
use crate::sync::RwLockExt;
use async_trait::async_trait;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
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
        let mut tokens = Vec::new();
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
            tokens.push((name.to_string(), Secret::new(token)));
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

/// What `/readyz` checks: configuration loaded and the backends reachable.
#[async_trait]
pub trait Readiness: Send + Sync {
    /// `Err` with a short reason per failed check.
    async fn check(&self) -> Result<(), Vec<String>>;
}

/// Always ready (tests, or a daemon without backends to check).
pub struct AlwaysReady;
#[async_trait]
impl Readiness for AlwaysReady {
    async fn check(&self) -> Result<(), Vec<String>> {
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
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::forward::middleware,
        ))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The token name, or a 401 response.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let name = presented.and_then(|p| state.tokens.read_now().authenticate(p));
    name.ok_or_else(|| {
        tracing::warn!("API call refused: missing or unknown bearer token");
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(5), state.readiness.check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(problems)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response(),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    emergency: bool,
    #[serde(default)]
    revoke_first: bool,
}

async fn create_rotation(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let actor = match authenticate(&state, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    // An empty body means "defaults"; otherwise it must be a JSON object we understand.
    let parsed: RotationBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotationBody {
            reason: String::new(),
            emergency: false,
            revoke_first: false,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
        }
    };
    if parsed.revoke_first && !parsed.emergency {
        return error(
            StatusCode::BAD_REQUEST,
            "revoke_first deletes the old key before rolling; it requires \"emergency\": true",
        );
    }
    if parsed.reason.len() > 1024 {
        return error(
            StatusCode::BAD_REQUEST,
            "reason is longer than 1024 characters",
        );
    }
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
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
        return r;
    }
    if !crate::rotation::journal::is_rotation_id(&id) {
        return error(StatusCode::NOT_FOUND, format!("no rotation {id:?}"));
    }
    match state.daemon.rotation(&id).await {
        Ok(Some(j)) => Json(RotationView::from(&j)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rotation {id}")),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("reading rotation history: {e}"),
        ),
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
    pub error: Option<String>,
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
            error: j.error.clone(),
        }
    }
}

async fn list_targets(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
        return r;
    }
    Json(json!({ "targets": state.daemon.targets() })).into_response()
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
            readiness: Arc::new(AlwaysReady),
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
}
