//! The control API under `/_sim` (never part of Vault's own `/v1` paths): fault settings,
//! held calls, and the tokens the simulator knows (accessors only, never values), so a test
//! can revoke a logged-in client's token mid-run.

use super::faults::Faults;
use super::VaultSim;
use crate::sandbox::control::{bad_request, parse, Blocked};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};

/// A token as `GET /_sim/tokens` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub accessor: String,
    /// `root`, `token` (from [`VaultSim::add_token`]) or `kubernetes` (a login).
    pub method: String,
    /// The Kubernetes auth role it logged in with.
    pub role: Option<String>,
    pub policies: Vec<String>,
    /// Seconds left; `None` for a token that never expires.
    pub ttl_seconds: Option<i64>,
    pub renewable: bool,
}

/// Which tokens `POST /_sim/tokens/revoke` revokes: all fields that are set must match. The
/// root token only goes when `method` is `root`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenFilter {
    pub accessor: Option<String>,
    pub method: Option<String>,
    pub role: Option<String>,
}

impl TokenFilter {
    /// Every token issued by a Kubernetes login.
    pub fn kubernetes() -> Self {
        TokenFilter {
            method: Some("kubernetes".into()),
            ..TokenFilter::default()
        }
    }
}

pub(super) fn routes() -> Router<VaultSim> {
    Router::new()
        .route(
            "/_sim/faults",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
        .route("/_sim/release", post(post_release))
        .route("/_sim/blocked", get(get_blocked))
        .route("/_sim/tokens", get(get_tokens))
        .route("/_sim/tokens/revoke", post(post_revoke))
}

async fn get_faults(State(sim): State<VaultSim>) -> Json<Faults> {
    Json(sim.faults())
}

async fn put_faults(State(sim): State<VaultSim>, body: Bytes) -> Response {
    let faults = match parse::<Faults>(&body) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    match sim.try_set_faults(faults) {
        Ok(()) => Json(sim.faults()).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_faults(State(sim): State<VaultSim>) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}

async fn post_release(State(sim): State<VaultSim>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "released": sim.release() }))
}

async fn get_blocked(State(sim): State<VaultSim>) -> Json<Blocked> {
    Json(sim.blocked())
}

async fn get_tokens(State(sim): State<VaultSim>) -> Json<Vec<TokenInfo>> {
    Json(sim.tokens())
}

async fn post_revoke(State(sim): State<VaultSim>, body: Bytes) -> Response {
    match parse::<TokenFilter>(&body) {
        Ok(f) => Json(serde_json::json!({ "revoked": sim.revoke_tokens(&f) })).into_response(),
        Err(e) => bad_request(e),
    }
}

impl VaultSim {
    /// The tokens the simulator accepts (expired ones included until revoked), by accessor.
    pub fn tokens(&self) -> Vec<TokenInfo> {
        let now = Utc::now();
        let st = self.lock();
        let mut out: Vec<TokenInfo> = st
            .tokens
            .values()
            .map(|t| TokenInfo {
                accessor: t.accessor.clone(),
                method: t.method.to_string(),
                role: t.role.clone(),
                policies: t.policies.clone(),
                ttl_seconds: t.expires.map(|e| (e - now).num_seconds()),
                renewable: t.renewable,
            })
            .collect();
        out.sort_by(|a, b| (&a.method, &a.accessor).cmp(&(&b.method, &b.accessor)));
        out
    }

    /// Revoke the matching tokens, as an operator or an expiry would mid-run: further calls
    /// with them get 403 `permission denied`; a Kubernetes login still issues new ones.
    /// Returns how many went.
    pub fn revoke_tokens(&self, filter: &TokenFilter) -> usize {
        let mut st = self.lock();
        let before = st.tokens.len();
        st.tokens.retain(|_, t| {
            let root_ok = t.method != "root" || filter.method.as_deref() == Some("root");
            let hit = root_ok
                && filter.accessor.as_ref().is_none_or(|a| *a == t.accessor)
                && filter.method.as_deref().is_none_or(|m| m == t.method)
                && filter
                    .role
                    .as_ref()
                    .is_none_or(|r| t.role.as_ref() == Some(r));
            !hit
        });
        before - st.tokens.len()
    }

    /// Revoke one token by value; false if it was not known.
    pub fn revoke_token(&self, token: &crate::secret::Secret) -> bool {
        self.lock().tokens.remove(&token.sha256_hex()).is_some()
    }
}
