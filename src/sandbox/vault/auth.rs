//! Token authentication (`X-Vault-Token` or `Authorization: Bearer`), `lookup-self` and
//! `renew-self`.

use super::error::{envelope, ok, ApiError, ApiResult, Reply};
use super::format::{duration_field, go_time, parse_body, secs};
use super::State;
use crate::secret::Secret;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, StatusCode};
use serde_json::{json, Value};

/// TTL of tokens added with [`super::VaultSim::add_token`] (seconds).
pub(super) const TOKEN_TTL: u64 = 3600;
/// Vault's default system max TTL (768h): renewals are capped to it.
pub(super) const MAX_TTL: u64 = 768 * 3600;

pub(super) struct Token {
    pub(super) value: Secret,
    pub(super) accessor: String,
    pub(super) policies: Vec<String>,
    pub(super) issued: DateTime<Utc>,
    pub(super) creation_ttl: u64,
    /// TTL a renewal without `increment` grants (the last increment, as Vault does).
    pub(super) period: u64,
    /// None: never expires (the root token).
    pub(super) expires: Option<DateTime<Utc>>,
    pub(super) renewable: bool,
    pub(super) orphan: bool,
}

impl State {
    /// The token hash of a valid `X-Vault-Token` (or `Authorization: Bearer`) header.
    pub(super) fn authenticate(
        &self,
        headers: &HeaderMap,
        now: DateTime<Utc>,
    ) -> Result<String, ApiError> {
        let presented = headers
            .get("x-vault-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::PermissionDenied)?;
        let key = Secret::new(presented).sha256_hex();
        match self.tokens.get(&key) {
            Some(t) if t.expires.is_none_or(|e| e > now) => Ok(key),
            _ => Err(ApiError::PermissionDenied),
        }
    }

    pub(super) fn lookup_self(&self, key: &str, now: DateTime<Utc>) -> ApiResult {
        let t = self.tokens.get(key).ok_or(ApiError::PermissionDenied)?;
        let ttl = t
            .expires
            .map(|e| (e - now).num_seconds().max(0))
            .unwrap_or(0);
        ok(json!({
            "accessor": t.accessor,
            "creation_time": t.issued.timestamp(),
            "creation_ttl": t.creation_ttl,
            "display_name": "token",
            "entity_id": "",
            "expire_time": t.expires.map(go_time),
            "explicit_max_ttl": 0,
            // Vault returns the token to its own holder; this is not an error message or log.
            "id": t.value.expose(),
            "issue_time": go_time(t.issued),
            "meta": null,
            "num_uses": 0,
            "orphan": t.orphan,
            "path": "auth/token/create",
            "policies": t.policies,
            "renewable": t.renewable,
            "ttl": ttl,
            "type": "service",
        }))
    }

    pub(super) fn renew_self(&mut self, key: &str, body: &[u8], now: DateTime<Utc>) -> ApiResult {
        let body = parse_body(body)?;
        let increment = match body.get("increment") {
            None | Some(Value::Null) => None,
            Some(v) => Some(duration_field("increment", v)?),
        };
        let t = self.tokens.get_mut(key).ok_or(ApiError::PermissionDenied)?;
        if !t.renewable {
            return Err(ApiError::BadRequest("lease is not renewable".into()));
        }
        if let Some(inc) = increment.filter(|i| *i > 0) {
            t.period = inc;
        }
        let ttl = t.period.min(MAX_TTL);
        t.expires = Some(now + secs(ttl));
        let auth = json!({
            "client_token": t.value.expose(),
            "accessor": t.accessor,
            "policies": t.policies,
            "token_policies": t.policies,
            "metadata": null,
            "lease_duration": ttl,
            "renewable": true,
            "entity_id": "",
            "token_type": "service",
            "orphan": t.orphan,
            "mfa_requirement": null,
            "num_uses": 0,
        });
        Ok(Reply::Json(StatusCode::OK, envelope(Value::Null, auth)))
    }
}
