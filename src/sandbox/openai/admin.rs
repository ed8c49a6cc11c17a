//! Admin API handlers: projects, project service accounts, project API keys, admin API
//! keys; the admin-key check in front of them all.

use super::audit::{self, AuditActor};
use super::error::ApiError;
use super::{
    new_id, redact, AccountRec, AdminKeyRec, KeyRec, OpenAiSim, ProjectRec, OWNER_EMAIL, OWNER_ID,
    OWNER_NAME,
};
use crate::secret::Secret;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

type ApiResult = Result<Json<Value>, ApiError>;

/// The bearer key of a request, if any.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The admin key a request was made with (handlers record it as the audit actor).
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub key_id: String,
}

impl Caller {
    pub fn actor(&self) -> AuditActor {
        AuditActor::UserApiKey {
            key_id: self.key_id.clone(),
            user_id: OWNER_ID.to_string(),
            email: OWNER_EMAIL.to_string(),
        }
    }
}

/// Admin routes accept only a live admin key (listed, not deleted, not expired), looked up
/// by its SHA-256 so nothing compares the value itself; anything else is 401 in upstream's
/// shape, showing at most a redacted form of what was sent. A use sets the key's
/// `last_used_at`.
pub(super) async fn require_admin_key(
    State(sim): State<OpenAiSim>,
    mut req: Request,
    next: Next,
) -> Response {
    let verdict = match bearer(req.headers()) {
        None => Err(ApiError::missing_key()),
        Some(key) => {
            let hash = Secret::new(key).sha256_hex();
            let mut st = sim.lock();
            let now = st.now();
            match st.admin_index.get(&hash).copied() {
                Some(i) if st.admin_keys[i].live(now) => {
                    let k = &mut st.admin_keys[i];
                    k.last_used_at = Some(now);
                    Ok(Caller {
                        key_id: k.id.clone(),
                    })
                }
                _ => Err(ApiError::incorrect_key(&redact(key, "****"))),
            }
        }
    };
    match verdict {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Query pairs in order, repeated keys kept (`a=1&a=2`).
pub(super) fn query_pairs(raw: Option<String>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

/// The last value of a query parameter.
pub(super) fn query_value<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An integer query parameter; a non-integer is upstream's 400 `invalid_type`.
pub(super) fn query_int(pairs: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    match query_value(pairs, name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "Invalid type for '{name}': expected an integer, but got a string instead."
            ))
            .param(name)
            .code("invalid_type")
        }),
    }
}

/// `limit` within `min..=max` (upstream's range codes otherwise), or `default`.
pub(super) fn query_limit(
    pairs: &[(String, String)],
    default: i64,
    max: i64,
) -> Result<usize, ApiError> {
    let limit = query_int(pairs, "limit")?.unwrap_or(default);
    if limit < 1 {
        return Err(ApiError::bad_request(format!(
            "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got {limit} instead."
        ))
        .param("limit")
        .code("integer_below_min_value"));
    }
    if limit > max {
        return Err(ApiError::bad_request(format!(
            "Invalid 'limit': integer above maximum value. Expected a value <= {max}, but got {limit} instead."
        ))
        .param("limit")
        .code("integer_above_max_value"));
    }
    Ok(limit as usize)
}

fn query_bool(pairs: &[(String, String)], name: &str) -> Result<Option<bool>, ApiError> {
    match query_value(pairs, name) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request(format!(
            "Invalid type for '{name}': expected a boolean, but got a string instead."
        ))
        .param(name)
        .code("invalid_type")),
    }
}

/// A cursor page over `all` (creation order). `None` items are tombstones: never listed,
/// but an `after` naming one still resolves, so paging survives concurrent deletes.
fn page(all: Vec<(&str, Option<Value>)>, pairs: &[(String, String)]) -> ApiResult {
    let limit = query_limit(pairs, 20, 100)?;
    let start = match query_value(pairs, "after") {
        None => 0,
        Some(after) => match all.iter().position(|(id, _)| *id == after) {
            Some(i) => i + 1,
            None => {
                return Err(ApiError::bad_request(format!(
                    "Invalid 'after': no object with id '{after}' in this list."
                ))
                .param("after"))
            }
        },
    };
    let mut items: Vec<(&str, Value)> = all
        .into_iter()
        .skip(start)
        .filter_map(|(id, v)| v.map(|v| (id, v)))
        .collect();
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first_id = items.first().map(|(id, _)| id.to_string());
    let last_id = items.last().map(|(id, _)| id.to_string());
    let data: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })))
}

/// Path segments that are not valid UTF-8 after decoding get upstream's 404, not axum's text.
fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|_| ApiError::not_found("Invalid URL: malformed path parameter."))
}

fn project_json(p: &ProjectRec) -> Value {
    json!({
        "id": p.id,
        "object": "organization.project",
        "name": p.name,
        "created_at": p.created_at,
        "archived_at": null,
        "status": "active",
    })
}

fn account_json(a: &AccountRec) -> Value {
    json!({
        "object": "organization.project.service_account",
        "id": a.id,
        "name": a.name,
        "role": a.role,
        "created_at": a.created_at,
    })
}

/// `expires_at` is not in our copy of the description: the SDKs added it (nullable) with
/// service-account key expiry (see the contract test).
fn key_json(a: &AccountRec, k: &KeyRec) -> Value {
    json!({
        "object": "organization.project.api_key",
        "redacted_value": redact(k.value.expose(), "..."),
        "name": k.name,
        "created_at": k.created_at,
        "last_used_at": k.last_used_at,
        "expires_at": k.expires_at,
        "id": k.id,
        "owner_project_access": "active",
        "owner": {
            "type": "service_account",
            "service_account": {
                "id": a.id,
                "name": a.name,
                "created_at": a.created_at,
                "role": a.role,
            },
        },
    })
}

/// A user's key: `owner.type` `user` with `ProjectApiKeyOwnerUser` (the value is not kept,
/// so the redaction is of a placeholder).
fn user_key_json(k: &super::UserKeyRec) -> Value {
    json!({
        "object": "organization.project.api_key",
        "redacted_value": "sk-proj-...user",
        "name": k.name,
        "created_at": k.created_at,
        "last_used_at": k.last_used_at,
        "expires_at": null,
        "id": k.id,
        "owner_project_access": "active",
        "owner": {
            "type": "user",
            "user": {
                "id": k.user_id,
                "email": format!("{}@example.com", k.user_id),
                "name": k.user_id,
                "created_at": k.created_at,
                "role": "member",
            },
        },
    })
}

fn no_project(id: &str) -> ApiError {
    ApiError::not_found(format!("No such project: '{id}'."))
}

fn no_account(id: &str) -> ApiError {
    ApiError::not_found(format!("No such service account: '{id}'."))
}

fn no_key(id: &str) -> ApiError {
    ApiError::not_found(format!("No such API key: '{id}'."))
}

pub(super) async fn list_projects(
    State(sim): State<OpenAiSim>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let pairs = query_pairs(q);
    // No project is ever archived here, so `include_archived` changes nothing; still
    // validated like upstream.
    query_bool(&pairs, "include_archived")?;
    let st = sim.lock();
    let all = st
        .projects
        .iter()
        .map(|p| (p.id.as_str(), Some(project_json(p))))
        .collect();
    page(all, &pairs)
}

pub(super) async fn get_project(
    State(sim): State<OpenAiSim>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let project_id = path(p)?;
    let st = sim.lock();
    let project = st
        .project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    Ok(Json(project_json(project)))
}

pub(super) async fn list_service_accounts(
    State(sim): State<OpenAiSim>,
    p: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let project_id = path(p)?;
    let pairs = query_pairs(q);
    let st = sim.lock();
    st.project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    let all = st
        .accounts
        .iter()
        .filter(|a| a.project_id == project_id)
        .map(|a| (a.id.as_str(), (!a.deleted).then(|| account_json(a))))
        .collect();
    page(all, &pairs)
}

/// A JSON object body (an empty body is `{}`).
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|_| ApiError::unparsable_json())?
    };
    match body {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::bad_request(
            "Invalid request body: expected a JSON object.",
        )),
    }
}

/// The required, non-empty string `name`.
fn required_name(obj: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("name") {
        None => Err(ApiError::missing_param("name")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(ApiError::bad_request("Invalid 'name': empty string.")
                .param("name")
                .code("empty_string"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ApiError::invalid_type("name", "a string", other)),
    }
}

/// An optional integer `expires_in_seconds` within `1..=max` (null = none).
fn expires_in(obj: &serde_json::Map<String, Value>, max: i64) -> Result<Option<i64>, ApiError> {
    const P: &str = "expires_in_seconds";
    let secs = match obj.get(P) {
        None | Some(Value::Null) => return Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ApiError::invalid_type(P, "an integer", v))?,
        Some(other) => return Err(ApiError::invalid_type(P, "an integer", other)),
    };
    if secs < 1 {
        return Err(ApiError::bad_request(format!(
            "Invalid '{P}': integer below minimum value. Expected a value >= 1, but got {secs} instead."
        ))
        .param(P)
        .code("integer_below_min_value"));
    }
    if secs > max {
        return Err(ApiError::bad_request(format!(
            "Invalid '{P}': integer above maximum value. Expected a value <= {max}, but got {secs} instead."
        ))
        .param(P)
        .code("integer_above_max_value"));
    }
    Ok(Some(secs))
}

/// Without a lifetime policy a key may live this long at most (ten years): a bound that
/// keeps `created_at + expires_in_seconds` far from overflow. Upstream publishes none.
const MAX_SERVICE_ACCOUNT_KEY_LIFETIME: i64 = 10 * 365 * 86_400;

/// `expires_in_seconds` is from the SDKs (September 2026), not our copy of the
/// description: optional, null = no expiry unless the organization's lifetime policy
/// requires one (then it must be given and within the policy's maximum), and not allowed
/// together with `create_service_account_only: true`.
pub(super) async fn create_service_account(
    State(sim): State<OpenAiSim>,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> ApiResult {
    let project_id = path(p)?;
    let obj = json_object(&body)?;
    let name = required_name(&obj)?;
    let account_only = match obj.get("create_service_account_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "create_service_account_only",
                "a boolean",
                other,
            ))
        }
    };
    let mut st = sim.lock();
    let policy = st.max_key_lifetime;
    let expires = expires_in(&obj, policy.unwrap_or(MAX_SERVICE_ACCOUNT_KEY_LIFETIME))?;
    if account_only && expires.is_some() {
        return Err(ApiError::bad_request(
            "Invalid 'expires_in_seconds': cannot be set when 'create_service_account_only' \
             is true (no API key is created).",
        )
        .param("expires_in_seconds"));
    }
    if let (Some(max), None, false) = (policy, expires, account_only) {
        return Err(ApiError::bad_request(format!(
            "Missing required parameter: 'expires_in_seconds'. This organization's key \
             policy requires API keys to expire within {max} seconds."
        ))
        .param("expires_in_seconds")
        .code("missing_required_parameter"));
    }
    st.project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    let (idx, value) = st.add_account(&project_id, &name, account_only, expires);
    st.audit_account_created(idx, caller.actor());
    let account = &st.accounts[idx];
    let mut out = account_json(account);
    // The one place a project key value leaves the simulator.
    out["api_key"] = match (&account.key, value) {
        (Some(k), Some(value)) => json!({
            "object": "organization.project.service_account.api_key",
            "value": value.expose(),
            "name": k.name,
            "created_at": k.created_at,
            "expires_at": k.expires_at,
            "id": k.id,
        }),
        _ => Value::Null,
    };
    Ok(Json(out))
}

pub(super) async fn get_service_account(
    State(sim): State<OpenAiSim>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (project_id, account_id) = path(p)?;
    let st = sim.lock();
    st.project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    let account = st
        .live_account(&project_id, &account_id)
        .ok_or_else(|| no_account(&account_id))?;
    Ok(Json(account_json(account)))
}

/// Deleting the account kills its key at once (the data plane answers 401 from now on).
pub(super) async fn delete_service_account(
    State(sim): State<OpenAiSim>,
    Extension(caller): Extension<Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (project_id, account_id) = path(p)?;
    let mut st = sim.lock();
    st.project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    let idx = st
        .accounts
        .iter()
        .position(|a| !a.deleted && a.project_id == project_id && a.id == account_id)
        .ok_or_else(|| no_account(&account_id))?;
    st.accounts[idx].deleted = true;
    st.key_index.retain(|_, i| *i != idx);
    st.audit_account_deleted(idx, caller.actor());
    Ok(Json(json!({
        "object": "organization.project.service_account.deleted",
        "id": account_id,
        "deleted": true,
    })))
}

pub(super) async fn list_api_keys(
    State(sim): State<OpenAiSim>,
    p: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let project_id = path(p)?;
    let pairs = query_pairs(q);
    // Every key here belongs to a service account with access to the project.
    let show = match query_value(&pairs, "owner_project_access") {
        None | Some("active") | Some("any") => true,
        Some("inactive") => false,
        Some(_) => {
            return Err(ApiError::bad_request(
                "Invalid 'owner_project_access': expected one of 'active', 'inactive', 'any'.",
            )
            .param("owner_project_access")
            .code("invalid_value"))
        }
    };
    let st = sim.lock();
    st.project(&project_id)
        .ok_or_else(|| no_project(&project_id))?;
    let all = st
        .accounts
        .iter()
        .filter(|a| a.project_id == project_id)
        .filter_map(|a| a.key.as_ref().map(|k| (a, k)))
        .map(|(a, k)| (k.id.as_str(), (show && !a.deleted).then(|| key_json(a, k))))
        .chain(
            st.user_keys
                .iter()
                .filter(|k| k.project_id == project_id)
                .map(|k| (k.id.as_str(), show.then(|| user_key_json(k)))),
        )
        .collect();
    page(all, &pairs)
}

fn find_key<'a>(
    st: &'a super::State,
    project_id: &str,
    key_id: &str,
) -> Result<(&'a AccountRec, &'a KeyRec), ApiError> {
    st.project(project_id)
        .ok_or_else(|| no_project(project_id))?;
    st.accounts
        .iter()
        .filter(|a| !a.deleted && a.project_id == project_id)
        .find_map(|a| a.key.as_ref().filter(|k| k.id == key_id).map(|k| (a, k)))
        .ok_or_else(|| no_key(key_id))
}

pub(super) async fn get_api_key(
    State(sim): State<OpenAiSim>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (project_id, key_id) = path(p)?;
    let st = sim.lock();
    let (a, k) = find_key(&st, &project_id, &key_id)?;
    Ok(Json(key_json(a, k)))
}

/// Every key here is a service account's, and upstream refuses to delete those one by one
/// ("an error if the key belonged to a service account", says the description, which
/// declares 400 with `ErrorResponse` for this operation): 400 `invalid_request_error`
/// pointing at the service-account delete. The exact upstream wording is not published.
pub(super) async fn delete_api_key(
    State(sim): State<OpenAiSim>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (project_id, key_id) = path(p)?;
    let st = sim.lock();
    let (a, _) = find_key(&st, &project_id, &key_id)?;
    Err(ApiError::bad_request(format!(
        "API key '{key_id}' belongs to service account '{}' and cannot be deleted on its own; \
         delete the service account instead.",
        a.id
    ))
    .param("api_key_id"))
}

// ---------------------------------------------------------------------------------------
// Admin API keys.

/// The longest `expires_in_seconds` the description allows for an admin key (a year).
const MAX_ADMIN_KEY_LIFETIME: i64 = 31_536_000;

fn admin_key_json(k: &AdminKeyRec, owner_created_at: i64) -> Value {
    json!({
        "object": "organization.admin_api_key",
        "id": k.id,
        "name": k.name,
        "redacted_value": redact(k.value.expose(), "..."),
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "last_used_at": k.last_used_at,
        "owner": {
            "type": "user",
            "object": "organization.user",
            "id": OWNER_ID,
            "name": OWNER_NAME,
            "created_at": owner_created_at,
            "role": "owner",
        },
    })
}

fn no_admin_key(id: &str) -> ApiError {
    ApiError::not_found(format!("No such admin API key: '{id}'."))
}

/// An admin key value shaped like upstream's: `sk-admin-` + 64 random alphanumerics.
pub(super) fn new_admin_key_value() -> String {
    format!(
        "sk-admin-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 64)
    )
}

/// Listed in creation order (`order=desc` reverses it); deleted keys are never listed,
/// expired ones are until deleted.
pub(super) async fn list_admin_keys(
    State(sim): State<OpenAiSim>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let pairs = query_pairs(q);
    let desc = match query_value(&pairs, "order") {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid 'order': '{other}'. Supported values are: 'asc' and 'desc'."
            ))
            .param("order")
            .code("invalid_value"))
        }
    };
    let st = sim.lock();
    let mut all: Vec<(&str, Option<Value>)> = st
        .admin_keys
        .iter()
        .map(|k| {
            (
                k.id.as_str(),
                (!k.deleted).then(|| admin_key_json(k, st.org_created_at)),
            )
        })
        .collect();
    if desc {
        all.reverse();
    }
    page(all, &pairs)
}

/// The value is in this answer only; the new key works at once.
pub(super) async fn create_admin_key(
    State(sim): State<OpenAiSim>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    let obj = json_object(&body)?;
    let name = required_name(&obj)?;
    let expires = expires_in(&obj, MAX_ADMIN_KEY_LIFETIME)?;
    let mut st = sim.lock();
    let value = Secret::new(new_admin_key_value());
    let idx = st.add_admin_key(&name, value.clone(), expires);
    let key_id = st.admin_keys[idx].id.clone();
    let now = st.now();
    st.audit.record(
        now,
        "api_key.created",
        &key_id,
        None,
        caller.actor(),
        audit::payload("api_key.created", &key_id, ""),
    );
    let mut out = admin_key_json(&st.admin_keys[idx], st.org_created_at);
    // The one place an admin key value leaves the simulator.
    out["value"] = json!(value.expose());
    Ok(Json(out))
}

pub(super) async fn get_admin_key(
    State(sim): State<OpenAiSim>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let key_id = path(p)?;
    let st = sim.lock();
    let k = st
        .admin_keys
        .iter()
        .find(|k| !k.deleted && k.id == key_id)
        .ok_or_else(|| no_admin_key(&key_id))?;
    Ok(Json(admin_key_json(k, st.org_created_at)))
}

/// The deleted key is refused (401) from the next call on, also when it deleted itself.
pub(super) async fn delete_admin_key(
    State(sim): State<OpenAiSim>,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let key_id = path(p)?;
    let mut st = sim.lock();
    let idx = st
        .admin_keys
        .iter()
        .position(|k| !k.deleted && k.id == key_id)
        .ok_or_else(|| no_admin_key(&key_id))?;
    st.admin_keys[idx].deleted = true;
    st.admin_index.retain(|_, i| *i != idx);
    let now = st.now();
    st.audit.record(
        now,
        "api_key.deleted",
        &key_id,
        None,
        caller.actor(),
        audit::payload("api_key.deleted", &key_id, ""),
    );
    Ok(Json(json!({
        "id": key_id,
        "object": "organization.admin_api_key.deleted",
        "deleted": true,
    })))
}

/// A new admin key id (`key_` + 16, like project keys upstream).
pub(super) fn new_admin_key_id() -> String {
    new_id("key_", 16)
}
