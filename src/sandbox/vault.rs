//! An in-memory simulator of the HashiCorp Vault / OpenBao HTTP API subset the daemon uses:
//! KV v2 at `secret/`, token lookup/renew, `sys/health`.
//!
//! It exists so the demo needs nothing installed. Every response was modelled on what a real
//! OpenBao 2.7.2 dev server answers (status codes, envelopes, field names, error strings,
//! the trailing newline Go's JSON encoder writes), so vaultrs and the daemon cannot tell the
//! difference for these operations; `tests/it/vault_contract.rs` runs one vaultrs suite
//! against both. Not modelled: ACL policies (every known token may do everything), other
//! mounts, response wrapping, namespaces, leases on secrets, metadata check-and-set.
//!
//! Fault hooks on the handle let tests make writes fail ([`VaultSim::fail_nth_write`]),
//! write "between" a client's read and its CAS write ([`VaultSim::put_raw`]) and, as a
//! negative control, turn CAS enforcement off ([`VaultSim::fault_ignore_cas`]).

use crate::sandbox::Server;
use crate::secret::Secret;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use rand::Rng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

/// The KV v2 mount this simulator serves.
const MOUNT: &str = "secret";
/// Vault keeps this many versions when neither the key nor the mount sets `max_versions`.
const DEFAULT_MAX_VERSIONS: u64 = 10;
/// TTL of tokens added with [`VaultSim::add_token`] (seconds).
const TOKEN_TTL: u64 = 3600;
/// Vault's default system max TTL (768h): renewals are capped to it.
const MAX_TTL: u64 = 768 * 3600;
/// The server version `sys/health` reports: the OpenBao release these shapes were taken from.
const VERSION: &str = "2.7.2";

const MSG_CAS_MISMATCH: &str = "check-and-set parameter did not match the current version";
const MSG_CAS_REQUIRED: &str = "check-and-set parameter required for this call";
const MSG_UNSUPPORTED: &str = "1 error occurred:\n\t* unsupported operation\n\n";
const MSG_INVALID_KV_PATH: &str = "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the OpenBao CLI, use 'bao kv get' for this operation.";

/// Handle to one simulated Vault server. Cheap to clone; all clones share the state.
#[derive(Clone)]
pub struct VaultSim {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for VaultSim {
    // The state holds key values and tokens: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultSim { .. }")
    }
}

struct State {
    /// Keyed by the SHA-256 of the token value, so no map key is a raw token.
    tokens: HashMap<String, Token>,
    config: MountConfig,
    entries: BTreeMap<String, Entry>,
    /// Mutating KV requests seen so far (the counter `fail_nth_write` targets).
    writes_seen: u64,
    /// (absolute write number, HTTP status) still to fire.
    faults: Vec<(u64, u16)>,
    ignore_cas: bool,
    cluster_name: String,
    cluster_id: String,
}

struct Token {
    value: Secret,
    accessor: String,
    policies: Vec<String>,
    issued: DateTime<Utc>,
    creation_ttl: u64,
    /// TTL a renewal without `increment` grants (the last increment, as Vault does).
    period: u64,
    /// None: never expires (the root token).
    expires: Option<DateTime<Utc>>,
    renewable: bool,
    orphan: bool,
}

#[derive(Default)]
struct MountConfig {
    cas_required: bool,
    max_versions: u64,
    delete_version_after: u64,
}

/// One KV v2 key: its metadata and every version Vault still keeps.
struct Entry {
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
    current_version: u64,
    oldest_version: u64,
    max_versions: u64,
    cas_required: bool,
    delete_version_after: u64,
    custom_metadata: Option<BTreeMap<String, String>>,
    metadata_version: u64,
    versions: BTreeMap<u64, Version>,
}

struct Version {
    /// None once destroyed.
    data: Option<Map<String, Value>>,
    created: DateTime<Utc>,
    /// A soft delete, or the expiry `delete_version_after` set at write time (may be future).
    deletion: Option<DateTime<Utc>>,
    destroyed: bool,
}

impl Version {
    fn is_deleted(&self, now: DateTime<Utc>) -> bool {
        self.deletion.is_some_and(|d| d <= now)
    }

    fn readable(&self, now: DateTime<Utc>) -> bool {
        !self.destroyed && !self.is_deleted(now) && self.data.is_some()
    }
}

impl Entry {
    fn new(now: DateTime<Utc>) -> Self {
        Entry {
            created: now,
            updated: now,
            current_version: 0,
            oldest_version: 0,
            max_versions: 0,
            cas_required: false,
            delete_version_after: 0,
            custom_metadata: None,
            metadata_version: 0,
            versions: BTreeMap::new(),
        }
    }

    fn custom_metadata_json(&self) -> Value {
        match &self.custom_metadata {
            Some(m) => json!(m),
            None => Value::Null,
        }
    }

    /// The per-version metadata object data reads and writes return.
    fn version_json(&self, number: u64, v: &Version) -> Value {
        json!({
            "created_time": go_time(v.created),
            "custom_metadata": self.custom_metadata_json(),
            "deletion_time": v.deletion.map(go_time).unwrap_or_default(),
            "destroyed": v.destroyed,
            "version": number,
        })
    }

    fn metadata_json(&self) -> Value {
        let versions: Map<String, Value> = self
            .versions
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    json!({
                        "created_time": go_time(v.created),
                        "deletion_time": v.deletion.map(go_time).unwrap_or_default(),
                        "destroyed": v.destroyed,
                    }),
                )
            })
            .collect();
        json!({
            "cas_required": self.cas_required,
            "created_time": go_time(self.created),
            "current_metadata_version": self.metadata_version,
            "current_version": self.current_version,
            "custom_metadata": self.custom_metadata_json(),
            "delete_version_after": go_duration(self.delete_version_after),
            "max_versions": self.max_versions,
            "metadata_cas_required": false,
            "oldest_version": self.oldest_version,
            "updated_time": go_time(self.updated),
            "versions": versions,
        })
    }
}

/// The errors the simulated API answers with, each mapped to Vault's status and body.
/// Messages never contain request values (a key value must not echo back in an error).
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("permission denied")]
    PermissionDenied,
    /// Vault's bare 404: `{"errors":[]}`.
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported operation")]
    Unsupported,
    #[error("no handler for route {0:?}")]
    NoRoute(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("injected fault: HTTP {0}")]
    Injected(u16),
}

impl ApiError {
    fn reply(&self) -> Reply {
        let (status, errors): (StatusCode, Vec<String>) = match self {
            ApiError::PermissionDenied => (StatusCode::FORBIDDEN, vec!["permission denied".into()]),
            ApiError::NotFound => (StatusCode::NOT_FOUND, vec![]),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, vec![m.clone()]),
            ApiError::Unsupported => (StatusCode::METHOD_NOT_ALLOWED, vec![MSG_UNSUPPORTED.into()]),
            ApiError::NoRoute(p) => (
                StatusCode::NOT_FOUND,
                vec![format!(
                    "no handler for route \"{p}\". route entry not found."
                )],
            ),
            ApiError::UnsupportedMediaType(m) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, vec![m.clone()])
            }
            ApiError::Injected(code) => {
                let status =
                    StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let msg = match status.as_u16() {
                    503 => "Vault is sealed".to_string(),
                    429 => "rate limit quota exceeded".to_string(),
                    500 => "internal error".to_string(),
                    _ => status
                        .canonical_reason()
                        .unwrap_or("injected fault")
                        .to_lowercase(),
                };
                (status, vec![msg])
            }
        };
        Reply::Json(status, json!({ "errors": errors }))
    }
}

/// A response before it becomes HTTP. No `Debug`: a success body holds key values.
enum Reply {
    Json(StatusCode, Value),
    /// A non-2xx response that still carries the envelope (deleted version, invalid KV
    /// path): Vault writes these without the encoder's trailing newline.
    Enveloped(StatusCode, Value),
    /// 204, as Vault answers writes that return nothing.
    NoContent,
    /// A status with an empty body (Vault's PATCH of a missing key).
    Empty(StatusCode),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            // Go's json.Encoder ends every body with a newline; so do we.
            Reply::Json(s, v) => (s, format!("{v}\n")),
            Reply::Enveloped(s, v) => (s, v.to_string()),
            Reply::NoContent => (StatusCode::NO_CONTENT, String::new()),
            Reply::Empty(s) => (s, String::new()),
        };
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

type ApiResult = Result<Reply, ApiError>;

/// Vault's response envelope around `data` (or `auth`).
fn envelope(data: Value, auth: Value) -> Value {
    json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
    })
}

fn ok(data: Value) -> ApiResult {
    Ok(Reply::Json(StatusCode::OK, envelope(data, Value::Null)))
}

/// What the HTTP layer hands to the (synchronous) request handler.
struct Request<'a> {
    method: &'a Method,
    /// Percent-decoded path after `/v1/`.
    path: String,
    query: Vec<(String, String)>,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

impl Request<'_> {
    fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn is_write(&self) -> bool {
        matches!(
            *self.method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        )
    }

    fn is_list(&self) -> bool {
        self.method.as_str() == "LIST"
            || (*self.method == Method::GET && self.query("list") == Some("true"))
    }
}

impl VaultSim {
    /// A simulator whose only token is `root_token` (policies `root`, never expires).
    pub fn new(root_token: Secret) -> Self {
        let now = Utc::now();
        let mut tokens = HashMap::new();
        tokens.insert(
            root_token.sha256_hex(),
            Token {
                value: root_token,
                accessor: random_alnum(24),
                policies: vec!["root".into()],
                issued: now,
                creation_ttl: 0,
                period: 0,
                expires: None,
                renewable: false,
                orphan: true,
            },
        );
        let cluster = uuid::Uuid::new_v4().to_string();
        VaultSim {
            state: Arc::new(Mutex::new(State {
                tokens,
                config: MountConfig::default(),
                entries: BTreeMap::new(),
                writes_seen: 0,
                faults: Vec::new(),
                ignore_cas: false,
                cluster_name: format!("vault-cluster-{}", &cluster[..8]),
                cluster_id: cluster,
            })),
        }
    }

    /// The HTTP API. One fallback handler, because Vault's `LIST` verb is not a method axum
    /// routes by and KV paths contain slashes.
    pub fn router(&self) -> Router {
        let sim = self.clone();
        Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let sim = sim.clone();
                async move { sim.handle_http(&method, &uri, &headers, &body) }
            },
        )
    }

    /// Serve [`VaultSim::router`] on `bind` (port 0 = random) until `cancel` fires.
    pub async fn serve(
        &self,
        bind: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<Server> {
        crate::sandbox::serve(self.router(), bind, cancel).await
    }

    /// Accept `token` too: a renewable service token (policies `default`, TTL 1h).
    pub fn add_token(&self, token: Secret) {
        let now = Utc::now();
        let mut st = self.lock();
        st.tokens.insert(
            token.sha256_hex(),
            Token {
                value: token,
                accessor: random_alnum(24),
                policies: vec!["default".into()],
                issued: now,
                creation_ttl: TOKEN_TTL,
                period: TOKEN_TTL,
                expires: Some(now + secs(TOKEN_TTL)),
                renewable: true,
                orphan: false,
            },
        );
    }

    /// Write as another client would (new version, no CAS, no fault); returns the version.
    pub fn put_raw(&self, path: &str, data: Map<String, Value>) -> u64 {
        let mut st = self.lock();
        st.write_version(path, data, Utc::now())
    }

    /// Current version's data, None if absent/deleted.
    pub fn read_raw(&self, path: &str) -> Option<(u64, Map<String, Value>)> {
        let st = self.lock();
        let entry = st.entries.get(path)?;
        let v = entry.versions.get(&entry.current_version)?;
        if !v.readable(Utc::now()) {
            return None;
        }
        Some((entry.current_version, v.data.clone()?))
    }

    /// Make the `n`th mutating KV request from now on (1 = the next one) fail with `status`
    /// and Vault's error body for it, without applying it. Mutating: POST/PUT/PATCH/DELETE
    /// under `secret/` (data, metadata, delete, undelete, destroy, config).
    pub fn fail_nth_write(&self, n: u64, status: u16) {
        let mut st = self.lock();
        let at = st.writes_seen + n.max(1);
        st.faults.push((at, status));
    }

    /// Mutating KV requests served so far (failed ones included).
    pub fn write_count(&self) -> u64 {
        self.lock().writes_seen
    }

    /// Fault for negative controls: when on, a stale or `cas=0` check-and-set write succeeds
    /// instead of answering 400, i.e. the simulator becomes wrong on purpose.
    pub fn fault_ignore_cas(&self, on: bool) {
        self.lock().ignore_cas = on;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another handler leaves the maps consistent (no partial updates).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle_http(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Reply {
        self.handle_at(method, uri, headers, body, Utc::now())
    }

    /// The whole API as a function of the request and the clock (tests pass their own time).
    fn handle_at(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Reply {
        let Some(rest) = uri.path().strip_prefix("/v1/") else {
            return ApiError::NoRoute(uri.path().trim_start_matches('/').to_string()).reply();
        };
        let query = uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let req = Request {
            method,
            path: percent_decode(rest),
            query,
            headers,
            body,
        };
        let mut st = self.lock();
        match st.handle(&req, now) {
            Ok(r) => r,
            Err(e) => e.reply(),
        }
    }
}

impl State {
    fn handle(&mut self, req: &Request<'_>, now: DateTime<Utc>) -> ApiResult {
        if req.path == "sys/health" {
            return match *req.method {
                Method::GET | Method::HEAD => Ok(self.health(now)),
                _ => Err(ApiError::Unsupported),
            };
        }
        let token = self.authenticate(req.headers, now)?;
        match req.path.as_str() {
            "auth/token/lookup-self" => {
                return match *req.method {
                    Method::GET | Method::POST | Method::PUT => self.lookup_self(&token, now),
                    _ => Err(ApiError::Unsupported),
                }
            }
            "auth/token/renew-self" => {
                return match *req.method {
                    Method::POST | Method::PUT => self.renew_self(&token, req.body, now),
                    _ => Err(ApiError::Unsupported),
                }
            }
            _ => {}
        }
        let Some(kv) = req.path.strip_prefix(MOUNT).and_then(|r| {
            if r.is_empty() {
                Some("")
            } else {
                r.strip_prefix('/')
            }
        }) else {
            return Err(ApiError::NoRoute(req.path.clone()));
        };
        if req.is_write() {
            self.writes_seen += 1;
            let n = self.writes_seen;
            if let Some(i) = self.faults.iter().position(|(at, _)| *at == n) {
                let (_, status) = self.faults.remove(i);
                return Err(ApiError::Injected(status));
            }
        }
        let (op, path) = kv.split_once('/').unwrap_or((kv, ""));
        match op {
            "config" if path.is_empty() => self.config_op(req),
            "data" => self.data_op(req, path, now),
            "metadata" => self.metadata_op(req, path, now),
            "delete" | "undelete" | "destroy" => self.versions_op(req, op, path, now),
            _ => Ok(Reply::Enveloped(
                StatusCode::NOT_FOUND,
                json!({
                    "request_id": uuid::Uuid::new_v4().to_string(),
                    "lease_id": "",
                    "renewable": false,
                    "lease_duration": 0,
                    "data": null,
                    "wrap_info": null,
                    "warnings": [MSG_INVALID_KV_PATH],
                    "auth": null,
                }),
            )),
        }
    }

    /// The token hash of a valid `X-Vault-Token` (or `Authorization: Bearer`) header.
    fn authenticate(&self, headers: &HeaderMap, now: DateTime<Utc>) -> Result<String, ApiError> {
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

    fn health(&self, now: DateTime<Utc>) -> Reply {
        Reply::Json(
            StatusCode::OK,
            json!({
                "initialized": true,
                "sealed": false,
                "standby": false,
                "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled",
                "server_time_utc": now.timestamp(),
                "version": VERSION,
                "cluster_name": self.cluster_name,
                "cluster_id": self.cluster_id,
            }),
        )
    }

    fn lookup_self(&self, key: &str, now: DateTime<Utc>) -> ApiResult {
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

    fn renew_self(&mut self, key: &str, body: &[u8], now: DateTime<Utc>) -> ApiResult {
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

    fn config_op(&mut self, req: &Request<'_>) -> ApiResult {
        match *req.method {
            Method::GET => ok(json!({
                "cas_required": self.config.cas_required,
                "delete_version_after": go_duration(self.config.delete_version_after),
                "max_versions": self.config.max_versions,
                "metadata_cas_required": false,
            })),
            Method::POST | Method::PUT => {
                let body = parse_body(req.body)?;
                let max_versions = u64_field(&body, "max_versions")?;
                let cas_required = bool_field(&body, "cas_required")?;
                let dva = opt_duration_field(&body, "delete_version_after")?;
                if let Some(v) = max_versions {
                    self.config.max_versions = v;
                }
                if let Some(v) = cas_required {
                    self.config.cas_required = v;
                }
                if let Some(v) = dva {
                    self.config.delete_version_after = v;
                }
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    fn data_op(&mut self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        if req.is_list() {
            return Err(ApiError::Unsupported);
        }
        match *req.method {
            Method::GET => self.read_data(req, path, now),
            Method::POST | Method::PUT => self.write_data(req, path, now),
            Method::PATCH => self.patch_data(req, path, now),
            Method::DELETE => {
                if let Some(e) = self.entries.get_mut(path) {
                    let current = e.current_version;
                    if let Some(v) = e.versions.get_mut(&current) {
                        if !v.destroyed && !v.is_deleted(now) {
                            v.deletion = Some(now);
                        }
                    }
                }
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    fn read_data(&self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        let wanted = match req.query("version") {
            None | Some("") => 0,
            Some(s) => s.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(
                    "Field validation failed: error converting input for field \"version\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                )
            })?,
        };
        let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
        let number = if wanted <= 0 {
            entry.current_version
        } else {
            wanted.unsigned_abs()
        };
        let v = entry.versions.get(&number).ok_or(ApiError::NotFound)?;
        let meta = entry.version_json(number, v);
        match &v.data {
            Some(data) if v.readable(now) => ok(json!({ "data": data, "metadata": meta })),
            // Deleted or destroyed: 404, but Vault still sends the envelope with metadata.
            _ => Ok(Reply::Enveloped(
                StatusCode::NOT_FOUND,
                envelope(json!({ "data": null, "metadata": meta }), Value::Null),
            )),
        }
    }

    /// The `options.cas` of a write body, checked against the key's current version.
    fn check_cas(&self, body: &Map<String, Value>, path: &str) -> Result<(), ApiError> {
        let cas = match body.get("options") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => u64_field(o, "cas")?,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"options\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        let entry = self.entries.get(path);
        let required = self.config.cas_required || entry.is_some_and(|e| e.cas_required);
        match cas {
            None if required => Err(ApiError::BadRequest(MSG_CAS_REQUIRED.into())),
            None => Ok(()),
            Some(c) => {
                let current = entry.map_or(0, |e| e.current_version);
                if c != current && !self.ignore_cas {
                    Err(ApiError::BadRequest(MSG_CAS_MISMATCH.into()))
                } else {
                    Ok(())
                }
            }
        }
    }

    fn write_data(&mut self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        if path.is_empty() {
            return Err(ApiError::NotFound);
        }
        let body = parse_body(req.body)?;
        let data = match body.get("data") {
            None | Some(Value::Null) => {
                return Err(ApiError::BadRequest("no data provided".into()))
            }
            Some(Value::Object(d)) => d.clone(),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        self.check_cas(&body, path)?;
        let number = self.write_version(path, data, now);
        self.version_reply(path, number)
    }

    fn patch_data(&mut self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        let ct = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.trim().is_empty() {
            return Err(ApiError::BadRequest("mime: no media type".into()));
        }
        if ct.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "PATCH requires Content-Type of application/merge-patch+json, provided {ct}"
            )));
        }
        let body = parse_body(req.body)?;
        let patch = match body.get("data") {
            Some(p @ Value::Object(_)) => p.clone(),
            None | Some(Value::Null) => {
                return Err(ApiError::BadRequest("no data provided".into()))
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        let current = self
            .entries
            .get(path)
            .and_then(|e| e.versions.get(&e.current_version))
            .filter(|v| v.readable(now))
            .and_then(|v| v.data.clone());
        // Vault answers a PATCH of a missing or deleted key with a bare 404.
        let Some(current) = current else {
            return Ok(Reply::Empty(StatusCode::NOT_FOUND));
        };
        self.check_cas(&body, path)?;
        let mut doc = Value::Object(current);
        json_patch::merge(&mut doc, &patch);
        let Value::Object(merged) = doc else {
            return Err(ApiError::BadRequest("no data provided".into()));
        };
        let number = self.write_version(path, merged, now);
        self.version_reply(path, number)
    }

    fn version_reply(&self, path: &str, number: u64) -> ApiResult {
        let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
        let v = entry.versions.get(&number).ok_or(ApiError::NotFound)?;
        ok(entry.version_json(number, v))
    }

    /// Append a version (creating the key if needed), then drop what `max_versions` no longer
    /// keeps, exactly as Vault counts: after writing version N with limit M, versions up to
    /// N-M go and `oldest_version` becomes N-M+1 (it stays 0 until the first trim).
    fn write_version(&mut self, path: &str, data: Map<String, Value>, now: DateTime<Utc>) -> u64 {
        let mount_max = self.config.max_versions;
        let mount_dva = self.config.delete_version_after;
        let entry = self
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::new(now));
        let dva = if entry.delete_version_after > 0 {
            entry.delete_version_after
        } else {
            mount_dva
        };
        entry.current_version += 1;
        let number = entry.current_version;
        entry.versions.insert(
            number,
            Version {
                data: Some(data),
                created: now,
                deletion: (dva > 0).then(|| now + secs(dva)),
                destroyed: false,
            },
        );
        entry.updated = now;
        // The key's own limit wins over the mount's, even when larger (as OpenBao does).
        let max = [entry.max_versions, mount_max, DEFAULT_MAX_VERSIONS]
            .into_iter()
            .find(|m| *m > 0)
            .unwrap_or(DEFAULT_MAX_VERSIONS);
        if number >= max && number - max >= entry.oldest_version {
            let last_dropped = number - max;
            entry.versions.retain(|n, _| *n > last_dropped);
            entry.oldest_version = last_dropped + 1;
        }
        number
    }

    fn metadata_op(&mut self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        if req.is_list() {
            return self.list(path);
        }
        match *req.method {
            Method::GET => {
                let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
                ok(entry.metadata_json())
            }
            Method::POST | Method::PUT => self.write_metadata(req, path, now),
            Method::DELETE => {
                self.entries.remove(path);
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    fn write_metadata(&mut self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        if path.is_empty() {
            return Err(ApiError::NotFound);
        }
        let body = parse_body(req.body)?;
        let max_versions = u64_field(&body, "max_versions")?;
        let cas_required = bool_field(&body, "cas_required")?;
        let dva = opt_duration_field(&body, "delete_version_after")?;
        let custom = match body.get("custom_metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                        Value::Null => String::new(),
                        other => {
                            return Err(ApiError::BadRequest(format!(
                                "custom_metadata validation failed: '' expected type 'string', got unconvertible type '{}'",
                                go_type(other)
                            )))
                        }
                    };
                    out.insert(k.clone(), s);
                }
                Some(out)
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                "error converting input for field \"custom_metadata\": '' expected a map, got '{}'",
                go_kind(other)
            )))
            }
        };
        let entry = self
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::new(now));
        if let Some(v) = max_versions {
            entry.max_versions = v;
        }
        if let Some(v) = cas_required {
            entry.cas_required = v;
        }
        if let Some(v) = dva {
            entry.delete_version_after = v;
        }
        if let Some(c) = custom {
            // An empty map clears it; Vault then reports `null`.
            entry.custom_metadata = (!c.is_empty()).then_some(c);
        }
        entry.metadata_version += 1;
        entry.updated = now;
        Ok(Reply::NoContent)
    }

    /// Keys directly under `path`, sub-folders with a trailing `/`; 404 when there are none.
    fn list(&self, path: &str) -> ApiResult {
        let prefix = match path.trim_end_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let keys: BTreeSet<String> = self
            .entries
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .map(|k| {
                let rest = &k[prefix.len()..];
                match rest.find('/') {
                    Some(i) => rest[..=i].to_string(),
                    None => rest.to_string(),
                }
            })
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            return Err(ApiError::NotFound);
        }
        ok(json!({ "keys": keys }))
    }

    fn versions_op(
        &mut self,
        req: &Request<'_>,
        op: &str,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if !matches!(*req.method, Method::POST | Method::PUT) {
            return Err(ApiError::Unsupported);
        }
        let body = parse_body(req.body)?;
        let versions: Vec<u64> = match body.get("versions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_u64(v).ok_or(()))
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    ApiError::BadRequest(
                        "error converting input for field \"versions\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                    )
                })?,
            Some(v) => vec![as_u64(v).ok_or_else(|| {
                ApiError::BadRequest(
                    "error converting input for field \"versions\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                )
            })?],
        };
        if versions.is_empty() {
            let msg = if op == "destroy" {
                "no version number provided"
            } else {
                "No version number provided"
            };
            return Err(ApiError::BadRequest(msg.into()));
        }
        let Some(entry) = self.entries.get_mut(path) else {
            return Ok(Reply::NoContent);
        };
        for n in versions {
            let Some(v) = entry.versions.get_mut(&n) else {
                continue;
            };
            match op {
                "delete" if !v.destroyed && !v.is_deleted(now) => v.deletion = Some(now),
                "undelete" if !v.destroyed => v.deletion = None,
                "destroy" => {
                    v.destroyed = true;
                    v.data = None;
                }
                _ => {}
            }
        }
        Ok(Reply::NoContent)
    }
}

/// A request body as a JSON object (empty body = empty object), as Vault decodes it.
fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => Err(ApiError::BadRequest(format!(
            "failed to decode JSON input: json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
            go_kind(&other)
        ))),
        // serde_json's syntax errors name a position, never the offending text.
        Err(e) => Err(ApiError::BadRequest(format!(
            "failed to decode JSON input: {e}"
        ))),
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn u64_field(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_u64(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "error converting input for field \"{field}\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax"
            ))
        }),
    }
}

fn bool_field(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if matches!(s.as_str(), "true" | "1" | "t" | "T" | "TRUE" | "True") => {
            Ok(Some(true))
        }
        Some(Value::String(s))
            if matches!(s.as_str(), "false" | "0" | "f" | "F" | "FALSE" | "False") =>
        {
            Ok(Some(false))
        }
        Some(Value::Number(n)) => Ok(Some(n.as_f64().is_some_and(|f| f != 0.0))),
        Some(_) => Err(ApiError::BadRequest(format!(
            "error converting input for field \"{field}\": '' cannot parse value as 'bool': strconv.ParseBool: invalid syntax"
        ))),
    }
}

fn opt_duration_field(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => duration_field(field, v).map(Some),
    }
}

/// Vault's duration inputs: integer seconds (number or string) or Go syntax (`1h30m`, `90s`).
fn duration_field(field: &str, v: &Value) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "error converting input for field \"{field}\": invalid duration"
        ))
    };
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => parse_go_duration(s).ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn parse_go_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                // Milliseconds: round down to whole seconds, as Vault's TTLs are in seconds.
                total = total.checked_add(n / 1000)?;
                continue;
            }
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    num.is_empty().then_some(total)
}

/// Go's `time.Duration.String()` for whole seconds: `0s`, `45s`, `2m5s`, `1h0m0s`.
fn go_duration(total: u64) -> String {
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Go's `time.RFC3339Nano`: nanoseconds with trailing zeros trimmed, `Z` suffix.
fn go_time(t: DateTime<Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{nanos:09}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// The Go type name Vault's mapstructure errors print for a JSON value.
fn go_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(_) => "json.Number",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

/// The JSON kind Go's decoder names in "cannot unmarshal X" errors.
fn go_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn secs(n: u64) -> Duration {
    Duration::seconds(i64::try_from(n).unwrap_or(i64::MAX / 1000))
}

fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Decode `%XX` escapes in a URL path (Vault sees decoded paths); invalid escapes stay as-is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Both digits are < 16, so this fits a byte.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "root-token-for-tests";

    fn sim() -> VaultSim {
        VaultSim::new(Secret::new(ROOT))
    }

    /// One request straight into the handler at time `now`: (status, JSON body or Null).
    fn call_at(
        sim: &VaultSim,
        now: DateTime<Utc>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let uri: Uri = format!("/v1/{path}").parse().expect("uri");
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        match sim.handle_at(&method, &uri, &h, body.as_bytes(), now) {
            Reply::Json(s, v) | Reply::Enveloped(s, v) => (s.as_u16(), v),
            Reply::NoContent => (204, Value::Null),
            Reply::Empty(s) => (s.as_u16(), Value::Null),
        }
    }

    fn call(sim: &VaultSim, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call_at(
            sim,
            Utc::now(),
            method,
            path,
            &[("X-Vault-Token", ROOT)],
            body,
        )
    }

    fn write(sim: &VaultSim, path: &str, data: Value) -> (u16, Value) {
        call(
            sim,
            "POST",
            &format!("secret/data/{path}"),
            Some(json!({ "data": data })),
        )
    }

    fn meta(sim: &VaultSim, path: &str) -> Value {
        let (status, body) = call(sim, "GET", &format!("secret/metadata/{path}"), None);
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    fn version_keys(meta: &Value) -> Vec<u64> {
        let mut v: Vec<u64> = meta["versions"]
            .as_object()
            .expect("versions map")
            .keys()
            .map(|k| k.parse().expect("numeric version key"))
            .collect();
        v.sort_unstable();
        v
    }

    fn errors(body: &Value) -> Vec<String> {
        serde_json::from_value(body["errors"].clone()).expect("errors array")
    }

    #[test]
    fn max_versions_drops_the_oldest_like_vault() {
        let sim = sim();
        let (s, _) = call(
            &sim,
            "POST",
            "secret/metadata/k",
            Some(json!({"max_versions": 3})),
        );
        assert_eq!(s, 204);
        // (current, oldest, kept) after each write, as OpenBao 2.7.2 reports them.
        let expected = [
            (1, 0, vec![1]),
            (2, 0, vec![1, 2]),
            (3, 1, vec![1, 2, 3]),
            (4, 2, vec![2, 3, 4]),
            (5, 3, vec![3, 4, 5]),
        ];
        for (i, (current, oldest, kept)) in expected.into_iter().enumerate() {
            let (s, _) = write(&sim, "k", json!({ "i": i }));
            assert_eq!(s, 200);
            let m = meta(&sim, "k");
            assert_eq!(m["current_version"], json!(current));
            assert_eq!(m["oldest_version"], json!(oldest));
            assert_eq!(version_keys(&m), kept);
        }
        let (s, body) = call(&sim, "GET", "secret/data/k?version=1", None);
        assert_eq!((s, errors(&body)), (404, vec![]));
    }

    #[test]
    fn default_keeps_ten_versions_and_key_limit_beats_mount_limit() {
        let sim = sim();
        for i in 0..12 {
            write(&sim, "ten", json!({ "i": i }));
        }
        let m = meta(&sim, "ten");
        assert_eq!(m["oldest_version"], json!(3));
        assert_eq!(version_keys(&m), (3..=12).collect::<Vec<_>>());

        call(
            &sim,
            "POST",
            "secret/config",
            Some(json!({"max_versions": 2})),
        );
        for i in 0..3 {
            write(&sim, "mnt", json!({ "i": i }));
        }
        assert_eq!(version_keys(&meta(&sim, "mnt")), vec![2, 3]);
        // A larger per-key limit overrides the mount's (OpenBao: no trim at version 4).
        call(
            &sim,
            "POST",
            "secret/metadata/mnt",
            Some(json!({"max_versions": 5})),
        );
        write(&sim, "mnt", json!({"i": 3}));
        let m = meta(&sim, "mnt");
        assert_eq!(version_keys(&m), vec![2, 3, 4]);
        assert_eq!(m["max_versions"], json!(5));
    }

    #[test]
    fn cas_required_on_the_key_and_on_the_mount() {
        let sim = sim();
        write(&sim, "k", json!({"v": 1}));
        call(
            &sim,
            "POST",
            "secret/metadata/k",
            Some(json!({"cas_required": true})),
        );
        let (s, body) = write(&sim, "k", json!({"v": 2}));
        assert_eq!(
            (s, errors(&body)),
            (400, vec![MSG_CAS_REQUIRED.to_string()])
        );
        let (s, _) = call(
            &sim,
            "POST",
            "secret/data/k",
            Some(json!({"data": {"v": 2}, "options": {"cas": 1}})),
        );
        assert_eq!(s, 200);
        assert_eq!(meta(&sim, "k")["cas_required"], json!(true));

        call(
            &sim,
            "POST",
            "secret/config",
            Some(json!({"cas_required": true})),
        );
        let (_, cfg) = call(&sim, "GET", "secret/config", None);
        assert_eq!(cfg["data"]["cas_required"], json!(true));
        let (s, body) = write(&sim, "new", json!({"v": 1}));
        assert_eq!(
            (s, errors(&body)),
            (400, vec![MSG_CAS_REQUIRED.to_string()])
        );
        let (s, _) = call(
            &sim,
            "POST",
            "secret/data/new",
            Some(json!({"data": {"v": 1}, "options": {"cas": 0}})),
        );
        assert_eq!(s, 200);
        // The key's own flag stays false: the requirement came from the mount.
        assert_eq!(meta(&sim, "new")["cas_required"], json!(false));
    }

    #[test]
    fn deleted_and_destroyed_versions_read_as_404_with_metadata() {
        let sim = sim();
        write(&sim, "k", json!({"v": 1}));
        write(&sim, "k", json!({"v": 2}));
        let (s, _) = call(&sim, "DELETE", "secret/data/k", None);
        assert_eq!(s, 204);
        let (s, body) = call(&sim, "GET", "secret/data/k", None);
        assert_eq!(s, 404);
        assert_eq!(body["data"]["data"], Value::Null);
        assert_eq!(body["data"]["metadata"]["version"], json!(2));
        assert_ne!(body["data"]["metadata"]["deletion_time"], json!(""));
        assert!(body.get("errors").is_none());
        assert_eq!(sim.read_raw("k"), None);
        let (s, body) = call(&sim, "GET", "secret/data/k?version=1", None);
        assert_eq!((s, &body["data"]["data"]), (200, &json!({"v": 1})));

        let (s, _) = call(
            &sim,
            "POST",
            "secret/undelete/k",
            Some(json!({"versions": [2]})),
        );
        assert_eq!(s, 204);
        assert_eq!(sim.read_raw("k").map(|(v, _)| v), Some(2));

        let (s, _) = call(
            &sim,
            "POST",
            "secret/destroy/k",
            Some(json!({"versions": [2]})),
        );
        assert_eq!(s, 204);
        let (s, body) = call(&sim, "GET", "secret/data/k", None);
        assert_eq!(s, 404);
        assert_eq!(body["data"]["metadata"]["destroyed"], json!(true));
        // Undelete cannot bring back destroyed data.
        call(
            &sim,
            "POST",
            "secret/undelete/k",
            Some(json!({"versions": [2]})),
        );
        assert_eq!(call(&sim, "GET", "secret/data/k", None).0, 404);

        let (s, body) = call(&sim, "POST", "secret/delete/k", Some(json!({})));
        assert_eq!(
            (s, errors(&body)),
            (400, vec!["No version number provided".to_string()])
        );
        let (s, body) = call(
            &sim,
            "POST",
            "secret/destroy/k",
            Some(json!({"versions": []})),
        );
        assert_eq!(
            (s, errors(&body)),
            (400, vec!["no version number provided".to_string()])
        );
        // Deleting versions of a key that never existed is a no-op, as in Vault.
        assert_eq!(
            call(
                &sim,
                "POST",
                "secret/delete/none",
                Some(json!({"versions": [1]}))
            )
            .0,
            204
        );
        assert_eq!(call(&sim, "DELETE", "secret/data/none", None).0, 204);
    }

    #[test]
    fn delete_version_after_expires_versions() {
        let sim = sim();
        let t0 = Utc::now();
        let root = [("X-Vault-Token", ROOT)];
        let (s, _) = call_at(
            &sim,
            t0,
            "POST",
            "secret/metadata/k",
            &root,
            Some(json!({"delete_version_after": "2s"})),
        );
        assert_eq!(s, 204);
        let (s, body) = call_at(
            &sim,
            t0,
            "POST",
            "secret/data/k",
            &root,
            Some(json!({"data": {"a": 1}})),
        );
        assert_eq!(s, 200);
        assert_eq!(body["data"]["deletion_time"], json!(go_time(t0 + secs(2))));
        assert_eq!(
            call_at(&sim, t0 + secs(1), "GET", "secret/data/k", &root, None).0,
            200
        );
        assert_eq!(
            call_at(&sim, t0 + secs(3), "GET", "secret/data/k", &root, None).0,
            404
        );
        call_at(
            &sim,
            t0,
            "POST",
            "secret/metadata/k",
            &root,
            Some(json!({"delete_version_after": "1h"})),
        );
        assert_eq!(meta(&sim, "k")["delete_version_after"], json!("1h0m0s"));
    }

    #[test]
    fn list_shows_keys_and_folders_and_404s_when_empty() {
        let sim = sim();
        for p in ["a", "a/b", "a/c/d", "b/x"] {
            write(&sim, p, json!({"v": 1}));
        }
        // A key whose versions are all deleted is still listed (its metadata exists).
        call(&sim, "DELETE", "secret/data/b/x", None);
        let keys = |path: &str, method: &str| {
            let (s, body) = call(&sim, method, path, None);
            (s, body["data"]["keys"].clone())
        };
        assert_eq!(
            keys("secret/metadata", "LIST"),
            (200, json!(["a", "a/", "b/"]))
        );
        assert_eq!(
            keys("secret/metadata/", "LIST"),
            (200, json!(["a", "a/", "b/"]))
        );
        assert_eq!(keys("secret/metadata/a", "LIST"), (200, json!(["b", "c/"])));
        assert_eq!(
            keys("secret/metadata/a/?list=true", "GET"),
            (200, json!(["b", "c/"]))
        );
        assert_eq!(keys("secret/metadata/b", "LIST"), (200, json!(["x"])));
        let (s, body) = call(&sim, "LIST", "secret/metadata/a/b", None);
        assert_eq!((s, errors(&body)), (404, vec![]));
        let (s, body) = call(&sim, "LIST", "secret/data/a", None);
        assert_eq!((s, errors(&body)), (405, vec![MSG_UNSUPPORTED.to_string()]));
    }

    #[test]
    fn health_needs_no_token_and_reports_an_active_unsealed_server() {
        let sim = sim();
        let (s, body) = call_at(&sim, Utc::now(), "GET", "sys/health", &[], None);
        assert_eq!(s, 200);
        assert_eq!(body["initialized"], json!(true));
        assert_eq!(body["sealed"], json!(false));
        assert_eq!(body["standby"], json!(false));
        assert_eq!(body["version"], json!(VERSION));
        assert!(body["server_time_utc"].as_i64().is_some_and(|t| t > 0));
        assert!(body.get("data").is_none(), "health is not enveloped");
        assert_eq!(
            call_at(&sim, Utc::now(), "POST", "sys/health", &[], None).0,
            405
        );
    }

    #[test]
    fn tokens_missing_bad_bearer_added_expired_renewed() {
        let sim = sim();
        let now = Utc::now();
        let denied = (403, json!({"errors": ["permission denied"]}));
        let get =
            |h: &[(&str, &str)], at| call_at(&sim, at, "GET", "auth/token/lookup-self", h, None);
        assert_eq!(get(&[], now), denied);
        assert_eq!(get(&[("X-Vault-Token", "nope")], now), denied);
        // Unauthenticated requests are denied before routing, as in Vault.
        assert_eq!(call_at(&sim, now, "GET", "nomount/x", &[], None), denied);
        let bearer = format!("Bearer {ROOT}");
        assert_eq!(get(&[("Authorization", &bearer)], now).0, 200);

        sim.add_token(Secret::new("svc-token"));
        let svc = [("X-Vault-Token", "svc-token")];
        let (s, me) = get(&svc, Utc::now());
        assert_eq!(s, 200);
        assert_eq!(me["data"]["renewable"], json!(true));
        assert_eq!(me["data"]["policies"], json!(["default"]));
        // Expired after its TTL...
        assert_eq!(get(&svc, Utc::now() + secs(TOKEN_TTL + 1)), denied);
        // ...unless renewed.
        let (s, r) = call_at(
            &sim,
            Utc::now(),
            "POST",
            "auth/token/renew-self",
            &svc,
            Some(json!({"increment": "2h"})),
        );
        assert_eq!(s, 200);
        assert_eq!(r["auth"]["lease_duration"], json!(7200));
        assert_eq!(r["data"], Value::Null);
        assert_eq!(get(&svc, Utc::now() + secs(TOKEN_TTL + 1)).0, 200);
        assert_eq!(get(&svc, Utc::now() + secs(7201)), denied);

        let (s, body) = call(&sim, "POST", "auth/token/renew-self", None);
        assert_eq!(
            (s, errors(&body)),
            (400, vec!["lease is not renewable".to_string()])
        );
        let (s, body) = call(&sim, "GET", "nomount/x", None);
        assert_eq!(s, 404);
        assert_eq!(
            errors(&body),
            vec!["no handler for route \"nomount/x\". route entry not found.".to_string()]
        );
    }

    #[test]
    fn fail_nth_write_fails_that_write_only_and_does_not_apply_it() {
        let sim = sim();
        sim.fail_nth_write(2, 503);
        assert_eq!(write(&sim, "k", json!({"v": 1})).0, 200);
        // Reads are not writes.
        assert_eq!(call(&sim, "GET", "secret/data/k", None).0, 200);
        let (s, body) = write(&sim, "k", json!({"v": 2}));
        assert_eq!(
            (s, errors(&body)),
            (503, vec!["Vault is sealed".to_string()])
        );
        assert_eq!(
            sim.read_raw("k").map(|(v, _)| v),
            Some(1),
            "failed write applied"
        );
        let (s, body) = write(&sim, "k", json!({"v": 3}));
        assert_eq!((s, body["data"]["version"].clone()), (200, json!(2)));
        assert_eq!(sim.write_count(), 3);

        sim.fail_nth_write(1, 500);
        let (s, body) = call(
            &sim,
            "POST",
            "secret/metadata/k",
            Some(json!({"max_versions": 1})),
        );
        assert_eq!(
            (s, errors(&body)),
            (500, vec!["internal error".to_string()])
        );
        assert_eq!(meta(&sim, "k")["max_versions"], json!(0));
    }

    #[test]
    fn put_raw_between_read_and_cas_write_makes_the_cas_write_fail() {
        let sim = sim();
        write(&sim, "k", json!({"key": "old"}));
        let (_, read) = call(&sim, "GET", "secret/data/k", None);
        let seen = read["data"]["metadata"]["version"]
            .as_u64()
            .expect("version");
        let mut other = Map::new();
        other.insert("key".into(), json!("theirs"));
        assert_eq!(sim.put_raw("k", other.clone()), 2);
        let (s, body) = call(
            &sim,
            "POST",
            "secret/data/k",
            Some(json!({"data": {"key": "mine"}, "options": {"cas": seen}})),
        );
        assert_eq!(
            (s, errors(&body)),
            (400, vec![MSG_CAS_MISMATCH.to_string()])
        );
        assert_eq!(sim.read_raw("k"), Some((2, other)));
        assert_eq!(sim.read_raw("absent"), None);
    }

    #[test]
    fn fault_ignore_cas_really_breaks_cas() {
        let sim = sim();
        write(&sim, "k", json!({"v": 1}));
        write(&sim, "k", json!({"v": 2}));
        let stale = Some(json!({"data": {"v": 3}, "options": {"cas": 1}}));
        assert_eq!(call(&sim, "POST", "secret/data/k", stale.clone()).0, 400);
        sim.fault_ignore_cas(true);
        assert_eq!(call(&sim, "POST", "secret/data/k", stale).0, 200);
    }

    #[test]
    fn patch_merges_and_needs_merge_patch_content_type() {
        let sim = sim();
        write(&sim, "k", json!({"a": "1", "b": "2"}));
        let root = ("X-Vault-Token", ROOT);
        let patch = Some(json!({"data": {"b": null, "c": "3"}}));
        let now = Utc::now();
        let (s, body) = call_at(&sim, now, "PATCH", "secret/data/k", &[root], patch.clone());
        assert_eq!(
            (s, errors(&body)),
            (400, vec!["mime: no media type".to_string()])
        );
        let json_ct = [root, ("Content-Type", "application/json")];
        assert_eq!(
            call_at(&sim, now, "PATCH", "secret/data/k", &json_ct, patch.clone()).0,
            415
        );
        let merge = [root, ("Content-Type", "application/merge-patch+json")];
        let (s, body) = call_at(&sim, now, "PATCH", "secret/data/k", &merge, patch.clone());
        assert_eq!((s, body["data"]["version"].clone()), (200, json!(2)));
        let (_, read) = call(&sim, "GET", "secret/data/k", None);
        assert_eq!(read["data"]["data"], json!({"a": "1", "c": "3"}));
        assert_eq!(
            call_at(&sim, now, "PATCH", "secret/data/missing", &merge, patch),
            (404, Value::Null)
        );
    }

    #[test]
    fn metadata_writes_replace_custom_metadata_and_coerce_values() {
        let sim = sim();
        let post = |body: Value| call(&sim, "POST", "secret/metadata/k", Some(body));
        assert_eq!(
            post(json!({"custom_metadata": {"a": "x", "b": "y"}})).0,
            204
        );
        assert_eq!(post(json!({"custom_metadata": {"n": 5}})).0, 204);
        let m = meta(&sim, "k");
        assert_eq!(m["custom_metadata"], json!({"n": "5"}));
        assert_eq!(m["current_metadata_version"], json!(2));
        assert_eq!(m["current_version"], json!(0));
        // Fields left out keep their values.
        post(json!({"cas_required": true}));
        assert_eq!(meta(&sim, "k")["custom_metadata"], json!({"n": "5"}));
        post(json!({"custom_metadata": {}}));
        assert_eq!(meta(&sim, "k")["custom_metadata"], Value::Null);
        let (s, body) = post(json!({"custom_metadata": {"a": ["x"]}}));
        assert_eq!(s, 400);
        assert!(errors(&body)[0].starts_with("custom_metadata validation failed"));
        let (s, _) = post(json!({"max_versions": "abc"}));
        assert_eq!(s, 400);
        // A metadata-only key has no data (plain 404) but is listed.
        let (s, body) = call(&sim, "GET", "secret/data/k", None);
        assert_eq!((s, errors(&body)), (404, vec![]));
        assert_eq!(
            call(&sim, "LIST", "secret/metadata", None).1["data"]["keys"],
            json!(["k"])
        );
        assert_eq!(call(&sim, "DELETE", "secret/metadata/k", None).0, 204);
        assert_eq!(call(&sim, "GET", "secret/metadata/k", None).0, 404);
    }

    #[test]
    fn key_values_and_tokens_never_echo_in_errors_or_debug() {
        let sim = sim();
        write(&sim, "k", json!({"api_key": "sk-svcacct-SECRET-VALUE"}));
        let (s, body) = call(
            &sim,
            "POST",
            "secret/data/k",
            Some(json!({"data": "sk-svcacct-SECRET-VALUE"})),
        );
        assert_eq!(s, 400);
        assert!(!body.to_string().contains("SECRET-VALUE"), "{body}");
        let uri: Uri = "/v1/secret/data/k".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert("x-vault-token", HeaderValue::from_static(ROOT));
        let reply = sim.handle_at(
            &Method::POST,
            &uri,
            &h,
            b"{\"data\": {\"k\": \"sk-SECRET-VALUE\"",
            Utc::now(),
        );
        let Reply::Json(status, body) = reply else {
            panic!("expected a JSON error reply");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(!body.to_string().contains("SECRET-VALUE"), "{body}");
        let dbg = format!("{sim:?}");
        assert!(
            !dbg.contains("SECRET-VALUE") && !dbg.contains(ROOT),
            "{dbg}"
        );
    }

    #[test]
    fn go_formats() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(45), "45s");
        assert_eq!(go_duration(125), "2m5s");
        assert_eq!(go_duration(3600), "1h0m0s");
        assert_eq!(parse_go_duration("1h30m"), Some(5400));
        assert_eq!(parse_go_duration("90"), Some(90));
        assert_eq!(parse_go_duration("1500ms"), Some(1));
        assert_eq!(parse_go_duration("2x"), None);
        assert_eq!(parse_go_duration("5"), Some(5));
        assert_eq!(parse_go_duration("5m3"), None);
        let t = DateTime::parse_from_rfc3339("2026-11-23T21:56:57.432612910Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(go_time(t), "2026-11-23T21:56:57.43261291Z");
        let whole = DateTime::parse_from_rfc3339("2026-11-23T21:56:57Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(go_time(whole), "2026-11-23T21:56:57Z");
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    /// Through real HTTP: the `LIST` verb and percent-encoded paths reach the handler.
    #[tokio::test]
    async fn serves_list_verb_and_encoded_paths_over_http() {
        let sim = sim();
        sim.put_raw("team a/openai", Map::new());
        let server = sim
            .serve(crate::sandbox::loopback(0), CancellationToken::new())
            .await
            .expect("serve");
        let http = reqwest::Client::new();
        let list = reqwest::Method::from_bytes(b"LIST").expect("LIST");
        let resp = http
            .request(
                list,
                format!("{}/v1/secret/metadata/team%20a", server.url()),
            )
            .header("X-Vault-Token", ROOT)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let body = resp.text().await.expect("body");
        assert!(body.ends_with('\n'));
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["data"]["keys"], json!(["openai"]));
        server.shutdown().await;
    }
}
