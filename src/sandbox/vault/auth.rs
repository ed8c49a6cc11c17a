//! Authentication: tokens (`X-Vault-Token` or `Authorization: Bearer`; `lookup-self`,
//! `renew-self`, `revoke-self`) and Kubernetes auth (`sys/auth/<path>` of type
//! `kubernetes`, its `config` and `role/<name>`, and `login`, which asks the configured
//! Kubernetes API's TokenReview about the JWT exactly as OpenBao does; the Kubernetes
//! simulator serves one).
//!
//! Responses follow OpenBao 2.7.2 (`tests/it/vault_contract.rs` compares them). Not
//! modelled: JWT signature checks (OpenBao leaves them to the TokenReview too), audiences,
//! alias name sources, entity metadata, and re-reviewing the JWT on renewal.

use super::error::{envelope, ok, ApiError, ApiResult, Reply};
use super::format::{duration_field, go_time, parse_body, random_alnum, secs};
use super::{State, VaultSim};
use crate::secret::Secret;
use base64::Engine;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, Method, StatusCode};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// TTL of tokens added with [`super::VaultSim::add_token`] (seconds).
pub(super) const TOKEN_TTL: u64 = 3600;
/// Vault's default system max TTL (768h): the default TTL of logins, and the cap renewals
/// never go past.
pub(super) const MAX_TTL: u64 = 768 * 3600;

/// How long a login waits for the Kubernetes API's TokenReview.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Renewals never extend the token past `issued + max_ttl`.
    pub(super) max_ttl: u64,
    /// What `lookup-self` reports about its origin.
    pub(super) display_name: String,
    pub(super) path: String,
    pub(super) meta: Option<BTreeMap<String, String>>,
    pub(super) entity_id: String,
    pub(super) batch: bool,
    /// How it was issued (`root`, `token`, `kubernetes`) and the login role, for the
    /// control API's token list; never the value.
    pub(super) method: &'static str,
    pub(super) role: Option<String>,
}

impl Token {
    pub(super) fn root(value: Secret, now: DateTime<Utc>) -> Token {
        Token {
            value,
            accessor: random_alnum(24),
            policies: vec!["root".into()],
            issued: now,
            creation_ttl: 0,
            period: 0,
            expires: None,
            renewable: false,
            orphan: true,
            max_ttl: 0,
            display_name: "token".into(),
            path: "auth/token/create".into(),
            meta: None,
            entity_id: String::new(),
            batch: false,
            method: "root",
            role: None,
        }
    }

    /// What [`super::VaultSim::add_token`] adds: renewable, policies `default`, TTL 1h.
    pub(super) fn service(value: Secret, now: DateTime<Utc>) -> Token {
        Token {
            policies: vec!["default".into()],
            creation_ttl: TOKEN_TTL,
            period: TOKEN_TTL,
            expires: Some(now + secs(TOKEN_TTL)),
            renewable: true,
            orphan: false,
            max_ttl: MAX_TTL,
            method: "token",
            ..Token::root(value, now)
        }
    }

    fn token_type(&self) -> &'static str {
        if self.batch {
            "batch"
        } else {
            "service"
        }
    }

    fn meta_json(&self) -> Value {
        self.meta.as_ref().map_or(Value::Null, |m| json!(m))
    }

    /// The `auth` block of a login or renewal.
    fn auth_json(&self, lease_duration: u64) -> Value {
        json!({
            "client_token": self.value.expose(),
            "accessor": self.accessor,
            "policies": self.policies,
            "token_policies": self.policies,
            "metadata": self.meta_json(),
            "lease_duration": lease_duration,
            "renewable": self.renewable,
            "entity_id": self.entity_id,
            "token_type": self.token_type(),
            "orphan": self.orphan,
            "mfa_requirement": null,
            "num_uses": 0,
        })
    }
}

/// One Kubernetes auth mount.
#[derive(Default)]
pub(super) struct KubernetesAuth {
    host: Option<String>,
    /// Sent as the Bearer token of the TokenReview; without one, the login JWT itself is.
    reviewer_jwt: Option<Secret>,
    roles: BTreeMap<String, Role>,
}

#[derive(Clone, Default)]
struct Role {
    names: Vec<String>,
    namespaces: Vec<String>,
    policies: Vec<String>,
    /// Seconds; 0 = the system default (768h).
    ttl: u64,
    max_ttl: u64,
    batch: bool,
}

/// The service account a JWT claims to be (its signature is the TokenReview's business).
struct Claims {
    namespace: String,
    name: String,
    uid: String,
    secret_name: String,
}

fn parse_jwt(jwt: &str) -> Option<Claims> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let c: Value = serde_json::from_slice(&bytes).ok()?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    // Legacy Secret-based tokens carry flat claims; projected tokens a `kubernetes.io` object.
    let legacy = |k: &str| s(c.get(format!("kubernetes.io/serviceaccount/{k}").as_str()));
    let projected = c.get("kubernetes.io");
    Some(Claims {
        namespace: legacy("namespace").or_else(|| s(projected?.get("namespace")))?,
        name: legacy("service-account.name")
            .or_else(|| s(projected?.pointer("/serviceaccount/name")))?,
        uid: legacy("service-account.uid")
            .or_else(|| s(projected?.pointer("/serviceaccount/uid")))
            .unwrap_or_default(),
        secret_name: legacy("secret.name").unwrap_or_default(),
    })
}

/// A string-list field as Vault accepts it: a JSON array or a comma-separated string.
fn list_field(body: &Map<String, Value>, names: &[&str]) -> Vec<String> {
    let v = names.iter().find_map(|n| body.get(*n));
    let items: Vec<String> = match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => s.split(',').map(str::to_string).collect(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn ttl_field(body: &Map<String, Value>, names: &[&str]) -> Result<u64, ApiError> {
    match names.iter().find_map(|n| body.get(*n).map(|v| (*n, v))) {
        None | Some((_, Value::Null)) => Ok(0),
        Some((n, v)) => duration_field(n, v),
    }
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
            "display_name": t.display_name,
            "entity_id": t.entity_id,
            "expire_time": t.expires.map(go_time),
            "explicit_max_ttl": 0,
            // Vault returns the token to its own holder; this is not an error message or log.
            "id": t.value.expose(),
            "issue_time": go_time(t.issued),
            "meta": t.meta_json(),
            "num_uses": 0,
            "orphan": t.orphan,
            "path": t.path,
            "policies": t.policies,
            "renewable": t.renewable,
            "ttl": ttl,
            "type": t.token_type(),
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
        // Never past the token's max TTL from its issue time.
        let cap = t.issued + secs(t.max_ttl.min(MAX_TTL));
        let expires = (now + secs(t.period.min(MAX_TTL))).min(cap);
        t.expires = Some(expires);
        let ttl = (expires - now).num_seconds().max(0).unsigned_abs();
        Ok(Reply::Json(
            StatusCode::OK,
            envelope(Value::Null, t.auth_json(ttl)),
        ))
    }

    pub(super) fn revoke_self(&mut self, key: &str) -> ApiResult {
        self.tokens.remove(key);
        Ok(Reply::NoContent)
    }

    /// `sys/auth/<path>`: enable an auth method (Kubernetes only).
    pub(super) fn enable_auth(&mut self, method: &Method, path: &str, body: &[u8]) -> ApiResult {
        if !matches!(*method, Method::POST | Method::PUT) {
            return Err(ApiError::Unsupported);
        }
        let body = parse_body(body)?;
        let mount = path.trim_matches('/');
        match body.get("type").and_then(Value::as_str) {
            Some("kubernetes") => {}
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported auth method type {:?}: the simulator serves kubernetes only",
                    other.unwrap_or("")
                )))
            }
        }
        if self.kube_auth.contains_key(mount) {
            return Err(ApiError::BadRequest(format!(
                "path is already in use at {mount}/"
            )));
        }
        self.kube_auth
            .insert(mount.to_string(), KubernetesAuth::default());
        Ok(Reply::NoContent)
    }

    /// `auth/<mount>/config` and `auth/<mount>/role/<name>` of a Kubernetes auth mount;
    /// `None` when `path` is neither.
    pub(super) fn kubernetes_admin(
        &mut self,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Option<ApiResult> {
        let rest = path.strip_prefix("auth/")?;
        let (mount, tail) = rest.split_once('/')?;
        let auth = self.kube_auth.get_mut(mount)?;
        if tail != "config" && !tail.starts_with("role/") {
            return None;
        }
        if !matches!(*method, Method::POST | Method::PUT) {
            return Some(Err(ApiError::Unsupported));
        }
        let body = match parse_body(body) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        if tail == "config" {
            let Some(host) = body.get("kubernetes_host").and_then(Value::as_str) else {
                return Some(Err(ApiError::BadRequest("no host provided".into())));
            };
            auth.host = Some(host.trim_end_matches('/').to_string());
            auth.reviewer_jwt = body
                .get("token_reviewer_jwt")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(Secret::new);
            return Some(Ok(Reply::NoContent));
        }
        let name = tail.trim_start_matches("role/").trim_matches('/');
        let role = (|| {
            let names = list_field(&body, &["bound_service_account_names"]);
            let namespaces = list_field(&body, &["bound_service_account_namespaces"]);
            if names.is_empty() || namespaces.is_empty() {
                return Err(ApiError::BadRequest(
                    "\"bound_service_account_names\" and \"bound_service_account_namespaces\" must both be set".into(),
                ));
            }
            let batch = match body.get("token_type").and_then(Value::as_str) {
                None | Some("default" | "service" | "default-service") => false,
                Some("batch" | "default-batch") => true,
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "invalid 'token_type' value {other:?}"
                    )))
                }
            };
            Ok(Role {
                names,
                namespaces,
                policies: list_field(&body, &["token_policies", "policies"]),
                ttl: ttl_field(&body, &["token_ttl", "ttl"])?,
                max_ttl: ttl_field(&body, &["token_max_ttl", "max_ttl"])?,
                batch,
            })
        })();
        Some(role.map(|r| {
            auth.roles.insert(name.to_string(), r);
            Reply::NoContent
        }))
    }
}

impl VaultSim {
    /// `auth/<mount>/login` of a Kubernetes auth mount (unauthenticated): check the role and
    /// the JWT's claims, ask the TokenReview, and issue a token.
    pub(super) async fn kubernetes_login(
        &self,
        mount: &str,
        method: &Method,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        let (host, reviewer, role, role_name, jwt) = {
            let st = self.lock();
            // An unknown mount is an unknown path, which an anonymous caller may not see.
            let auth = st.kube_auth.get(mount).ok_or(ApiError::PermissionDenied)?;
            if !matches!(*method, Method::POST | Method::PUT) {
                return Err(ApiError::UnsupportedPlain);
            }
            let body = parse_body(body)?;
            let field = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            };
            let role_name = field("role").ok_or(ApiError::BadRequest("missing role".into()))?;
            let jwt = field("jwt")
                .map(Secret::new)
                .ok_or(ApiError::BadRequest("missing jwt".into()))?;
            let role =
                auth.roles.get(&role_name).cloned().ok_or_else(|| {
                    ApiError::BadRequest(format!("invalid role name {role_name:?}"))
                })?;
            let host = auth.host.clone().ok_or(ApiError::PermissionDenied)?;
            (host, auth.reviewer_jwt.clone(), role, role_name, jwt)
        };
        let claims = parse_jwt(jwt.expose()).ok_or(ApiError::PermissionDenied)?;
        // The role's bindings are checked against the claims first, then the TokenReview
        // decides whether the claims are true.
        let bound = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        if !bound(&role.names, &claims.name) {
            return Err(ApiError::Forbidden("service account name not authorized"));
        }
        if !bound(&role.namespaces, &claims.namespace) {
            return Err(ApiError::Forbidden("namespace not authorized"));
        }
        let bearer = reviewer.unwrap_or_else(|| jwt.clone());
        let review = self
            .http
            .post(format!("{host}/apis/authentication.k8s.io/v1/tokenreviews"))
            .bearer_auth(bearer.expose())
            .json(&json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": jwt.expose()},
            }))
            .timeout(REVIEW_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                ApiError::Internal(format!(
                    "lookup failed: the Kubernetes API did not answer the TokenReview: {}",
                    e.without_url()
                ))
            })?;
        let review: Value = review.json().await.unwrap_or(Value::Null);
        let user = &review["status"]["user"];
        let want = format!("system:serviceaccount:{}:{}", claims.namespace, claims.name);
        let uid_ok = user["uid"]
            .as_str()
            .is_none_or(|u| claims.uid.is_empty() || u == claims.uid);
        if review["status"]["authenticated"] != json!(true)
            || user["username"].as_str() != Some(want.as_str())
            || !uid_ok
        {
            return Err(ApiError::PermissionDenied);
        }

        let now = Utc::now();
        let ttl = if role.ttl > 0 { role.ttl } else { MAX_TTL };
        let mut policies = role.policies.clone();
        policies.push("default".into());
        policies.sort();
        policies.dedup();
        let entity = Sha256::digest(format!("entity/{mount}/{}", claims.uid).as_bytes());
        let token = Token {
            value: Secret::new(format!(
                "{}.{}",
                if role.batch { "b" } else { "s" },
                random_alnum(24)
            )),
            accessor: random_alnum(24),
            policies,
            issued: now,
            creation_ttl: ttl,
            period: ttl,
            expires: Some(now + secs(ttl)),
            renewable: !role.batch,
            orphan: true,
            max_ttl: if role.max_ttl > 0 {
                role.max_ttl
            } else {
                MAX_TTL
            },
            display_name: format!("{mount}-{}-{}", claims.namespace, claims.name),
            path: format!("auth/{mount}/login"),
            meta: Some(BTreeMap::from([
                ("role".to_string(), role_name.clone()),
                ("service_account_name".to_string(), claims.name.clone()),
                (
                    "service_account_namespace".to_string(),
                    claims.namespace.clone(),
                ),
                (
                    "service_account_secret_name".to_string(),
                    claims.secret_name.clone(),
                ),
                ("service_account_uid".to_string(), claims.uid.clone()),
            ])),
            entity_id: uuid::Builder::from_random_bytes(entity[..16].try_into().unwrap_or([0; 16]))
                .into_uuid()
                .to_string(),
            batch: role.batch,
            method: "kubernetes",
            role: Some(role_name),
        };
        let auth = token.auth_json(ttl);
        self.lock().tokens.insert(token.value.sha256_hex(), token);
        Ok(Reply::Json(StatusCode::OK, envelope(Value::Null, auth)))
    }
}
