//! An in-memory simulator of the HashiCorp Vault / OpenBao HTTP API subset the daemon uses:
//! KV v2 at `secret/`, token lookup/renew/revoke, Kubernetes auth (login through the
//! configured Kubernetes API's TokenReview), `sys/health` and `sys/seal`.
//!
//! It exists so the demo needs nothing installed. Every response was modelled on what a real
//! OpenBao 2.7.2 dev server answers (status codes, envelopes, field names, error strings,
//! the trailing newline Go's JSON encoder writes), so vaultrs and the daemon cannot tell the
//! difference for these operations; `tests/it/vault_contract.rs` runs one vaultrs suite
//! against both and compares raw responses (sealed mode and Kubernetes auth included). Not
//! modelled: ACL policies (every known token may do everything), other mounts and auth
//! methods, response wrapping, namespaces, leases on secrets, metadata check-and-set,
//! unsealing through the API.
//!
//! Faults ([`Faults`], `PUT /_sim/faults`): latency, 5xx for the next N requests or while
//! set, sealed, a concurrent writer before the next CAS writes, holding operations until
//! released; tokens can be revoked mid-run (`/_sim/tokens`). Older hooks on the handle make
//! the Nth write fail ([`VaultSim::fail_nth_write`]), write "between" a client's read and
//! its CAS write ([`VaultSim::put_raw`]) and, as a negative control, turn CAS enforcement
//! off ([`VaultSim::fault_ignore_cas`]).
//!
//! Layout: `kv` (KV v2 data, metadata, CAS, listing), `auth` (tokens and Kubernetes auth),
//! `sys` (health), `faults` (fault injection and operation names), `control` (the `/_sim`
//! API), `error` (Vault's error bodies and replies), `format` (Go-style input decoding and
//! output formats), this file (state, routing, public handle).

mod auth;
mod control;
mod error;
mod faults;
mod format;
mod kv;
mod sys;

#[cfg(test)]
mod tests;

use crate::sandbox::Server;
use crate::secret::Secret;
use auth::{KubernetesAuth, Token};
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::Router;
use chrono::{DateTime, Utc};
pub use control::{TokenFilter, TokenInfo};
use error::{ApiError, ApiResult, Reply};
pub use faults::{FailNext, Faults, Unavailable, OPERATIONS};

use crate::sandbox::control::{Holds, Phase};
use faults::FaultState;
use format::percent_decode;
use http::{HeaderMap, Method, StatusCode, Uri};
use kv::{Entry, MountConfig};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

#[cfg(test)]
use auth::TOKEN_TTL;
#[cfg(test)]
use error::MSG_UNSUPPORTED;
#[cfg(test)]
use format::secs;
#[cfg(test)]
use format::{go_duration, go_time, parse_go_duration};
#[cfg(test)]
use http::HeaderValue;
#[cfg(test)]
use kv::{MSG_CAS_MISMATCH, MSG_CAS_REQUIRED};
#[cfg(test)]
use sys::VERSION;

/// The KV v2 mount this simulator serves.
const MOUNT: &str = "secret";

const MSG_INVALID_KV_PATH: &str = "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the OpenBao CLI, use 'bao kv get' for this operation.";

/// Handle to one simulated Vault server. Cheap to clone; all clones share the state.
#[derive(Clone)]
pub struct VaultSim {
    state: Arc<Mutex<State>>,
    /// Calls held by `Faults::block` (outside the state lock: they wait).
    holds: Arc<Holds>,
    /// For the TokenReviews of Kubernetes logins.
    http: reqwest::Client,
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
    faults: FaultState,
    /// Kubernetes auth mounts by path.
    kube_auth: BTreeMap<String, KubernetesAuth>,
    cluster_name: String,
    cluster_id: String,
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
        tokens.insert(root_token.sha256_hex(), Token::root(root_token, now));
        let cluster = uuid::Uuid::new_v4().to_string();
        VaultSim {
            state: Arc::new(Mutex::new(State {
                tokens,
                config: MountConfig::default(),
                entries: BTreeMap::new(),
                faults: FaultState::default(),
                kube_auth: BTreeMap::new(),
                cluster_name: format!("vault-cluster-{}", &cluster[..8]),
                cluster_id: cluster,
            })),
            holds: Arc::new(Holds::default()),
            http: reqwest::Client::new(),
        }
    }

    /// The HTTP API, plus the control API under `/_sim`. One fallback handler for the API,
    /// because Vault's `LIST` verb is not a method axum routes by and KV paths contain
    /// slashes.
    pub fn router(&self) -> Router {
        control::routes()
            .fallback(
                |AxState(sim): AxState<VaultSim>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    sim.handle_http(&method, &uri, &headers, &body).await
                },
            )
            .with_state(self.clone())
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
        st.tokens
            .insert(token.sha256_hex(), Token::service(token, now));
    }

    /// Write as another client would (new version, no CAS, no fault); returns the version.
    pub fn put_raw(&self, path: &str, data: Map<String, Value>) -> u64 {
        let mut st = self.lock();
        st.write_version(path, data, Utc::now())
    }

    /// Replace the key's custom metadata as a metadata write from another client would
    /// (creating the key's metadata if needed; an empty map clears it). For seeding many
    /// keys without a request each.
    pub fn put_custom_metadata_raw(&self, path: &str, custom: BTreeMap<String, String>) {
        let now = Utc::now();
        let mut st = self.lock();
        let entry = st
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::new(now));
        entry.custom_metadata = (!custom.is_empty()).then_some(custom);
        entry.metadata_version += 1;
        entry.updated = now;
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another handler leaves the maps consistent (no partial updates).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One API request through the faults: latency, a block before the effect, a refusal
    /// (sealed, unavailable, fail-next), the handler, a block after the effect.
    async fn handle_http(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Reply {
        let path = uri.path().strip_prefix("/v1/").map(percent_decode);
        let list = method.as_str() == "LIST"
            || (*method == Method::GET
                && uri
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "list=true")));
        let op = path
            .as_deref()
            .and_then(|p| faults::operation(method, p, list));
        let latency = self.lock().faults.latency();
        if let Some(d) = latency {
            tokio::time::sleep(d).await;
        }
        let held_op = op.unwrap_or("other");
        self.holds.hold(held_op, Phase::BeforeEffect).await;
        let refused = path
            .is_some()
            .then(|| self.lock().faults.refuse(op))
            .flatten();
        let reply = match refused {
            Some(ApiError::Sealed) if op == Some("sys.health") => {
                self.lock().sealed_health(Utc::now())
            }
            Some(e) => e.reply(),
            None => match (op, path.as_deref()) {
                (Some("auth.login"), Some(p)) => {
                    let mount = p
                        .strip_prefix("auth/")
                        .and_then(|r| r.strip_suffix("/login"))
                        .unwrap_or("");
                    match self.kubernetes_login(mount, method, body).await {
                        Ok(r) => r,
                        Err(e) => e.reply(),
                    }
                }
                _ => self.handle_at(method, uri, headers, body, Utc::now()),
            },
        };
        self.holds.hold(held_op, Phase::AfterEffect).await;
        reply
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

/// `GET sys/internal/ui/mounts/<path>`: what the `vault`/`bao kv` CLI asks first to learn
/// the mount's KV version (answered as OpenBao does for a KV v2 mount).
fn mount_preflight(method: &Method, path: &str) -> ApiResult {
    if *method != Method::GET {
        return Err(ApiError::Unsupported);
    }
    if path != MOUNT && !path.starts_with(&format!("{MOUNT}/")) {
        return Err(ApiError::NoRoute(format!("sys/internal/ui/mounts/{path}")));
    }
    Ok(Reply::Enveloped(
        StatusCode::OK,
        json!({
            "request_id": uuid::Uuid::new_v4().to_string(),
            "lease_id": "",
            "renewable": false,
            "lease_duration": 0,
            "data": {
                "path": format!("{MOUNT}/"),
                "type": "kv",
                "description": "key/value secret storage",
                "options": {"version": "2"},
                "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": false},
                "local": false,
                "seal_wrap": false,
                "external_entropy_access": false,
            },
            "wrap_info": null,
            "warnings": null,
            "auth": null,
        }),
    ))
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
        if let Some(r) = self.kubernetes_admin(req.method, &req.path, req.body) {
            return r;
        }
        if let Some(p) = req.path.strip_prefix("sys/auth/") {
            return self.enable_auth(req.method, p, req.body);
        }
        if let Some(p) = req.path.strip_prefix("sys/internal/ui/mounts/") {
            return mount_preflight(req.method, p);
        }
        match req.path.as_str() {
            "sys/seal" => {
                return match *req.method {
                    Method::POST | Method::PUT => {
                        self.faults.settings.sealed = true;
                        Ok(Reply::NoContent)
                    }
                    _ => Err(ApiError::Unsupported),
                }
            }
            "auth/token/revoke-self" => {
                return match *req.method {
                    Method::POST | Method::PUT => self.revoke_self(&token),
                    _ => Err(ApiError::Unsupported),
                }
            }
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
            self.faults.on_write()?;
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
}
