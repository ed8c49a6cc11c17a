//! In-memory simulator of the OpenAI Admin API (projects, project service accounts, project
//! API keys, admin API keys, the Usage API for every endpoint that filters by key, audit
//! logs) and a minimal data plane (`/v1/models`, `/v1/chat/completions`), with per-test fault
//! injection.
//!
//! Shapes follow the official OpenAPI description (tests/contract/openai-openapi-subset.json);
//! the contract test drives this simulator through Prism to prove it. Key values are held
//! as [`Secret`], returned once by the create call and never logged or echoed.
//!
//! Layout: `admin` (projects, service accounts, project keys, admin keys), `audit` (audit
//! logs), `data` (data plane), `usage` (the Usage API), `faults` (fault injection), `error`
//! (OpenAI's error shape), this file (state, router, public handle, control API).

mod admin;
mod audit;
mod data;
mod error;
mod faults;
mod usage;

#[cfg(test)]
mod tests;

pub use audit::{AuditActor, AuditEventInfo};
pub use faults::{FailNext, FailNth, FaultScope, Faults, RateLimit};
pub use usage::{UsageEndpoint, HISTORY_SECS};

use crate::sandbox::control::{Blocked, Holds, Phase};
use crate::sandbox::{serve, Server};
use crate::secret::Secret;
use axum::extract::{MatchedPath, RawQuery, Request, State as AxState};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use error::ApiError;
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Errors of the seeding helpers (the HTTP API answers in OpenAI's error shape instead).
#[derive(Debug, thiserror::Error)]
pub enum OpenAiSimError {
    #[error("no such project: {0}")]
    UnknownProject(String),
    #[error("invalid fault settings: {0}")]
    InvalidFaults(String),
    #[error("no such API key: {0}")]
    UnknownKey(String),
    #[error("no such admin API key: {0}")]
    UnknownAdminKey(String),
    #[error("invalid expiry: {0}")]
    InvalidExpiry(String),
    #[error("audit logging is off for this organization")]
    AuditLoggingOff,
    #[error("the simulator does not model audit event type {0:?}")]
    UnknownEventType(String),
}

/// A live (not deleted) service account, as the seeding helpers and tests see it.
/// Carries the key id, never the key value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceAccountInfo {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    /// `None` when created with `create_service_account_only`.
    pub key_id: Option<String>,
    /// When the key stops working (Unix seconds); `None` = never.
    pub key_expires_at: Option<i64>,
}

/// An admin API key as tests see it (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminKeyInfo {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// Not deleted and not expired: the Admin API accepts it.
    pub live: bool,
}

/// Data-plane outcomes so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DataPlaneCounts {
    /// Authenticated with a live key and answered 2xx.
    pub accepted: u64,
    /// Answered 401 (missing, unknown or dead key).
    pub rejected_401: u64,
    /// Answered by an injected fault (429/5xx) before reaching the handler.
    pub faulted: u64,
}

/// The simulator handle: cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct OpenAiSim {
    inner: Arc<Inner>,
}

/// Counts only: the state holds key material.
impl std::fmt::Debug for OpenAiSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("OpenAiSim")
            .field("projects", &st.projects.len())
            .field(
                "service_accounts",
                &st.accounts.iter().filter(|a| !a.deleted).count(),
            )
            .field("faults", &st.faults.faults)
            .finish()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped whenever the faults change, so hung calls re-check them.
    fault_gen: watch::Sender<u64>,
    /// Calls held by `Faults::block`.
    holds: Holds,
}

struct State {
    /// Creation order; deleted keys stay as tombstones (paging, audit actors).
    admin_keys: Vec<AdminKeyRec>,
    /// SHA-256 of an admin key value -> index in `admin_keys`.
    admin_index: HashMap<String, usize>,
    /// When the simulated organization (and its owner) came to be.
    org_created_at: i64,
    projects: Vec<ProjectRec>,
    /// Creation order; deleted accounts stay as tombstones so an `after` cursor that names
    /// one still resolves.
    accounts: Vec<AccountRec>,
    /// SHA-256 of a key value -> index in `accounts`.
    key_index: HashMap<String, usize>,
    /// Key id -> index in `accounts` (deleted accounts too: their usage history stays).
    key_by_id: HashMap<String, usize>,
    usage: usage::UsageStore,
    audit: audit::AuditLog,
    /// The organization's key-lifetime policy: the longest `expires_in_seconds` a new
    /// service account may ask for, and then it must ask. `None` = no policy.
    max_key_lifetime: Option<i64>,
    /// Accepted data-plane calls per key id.
    served: HashMap<String, u64>,
    counts: DataPlaneCounts,
    calls: BTreeMap<String, u64>,
    faults: faults::FaultState,
    /// Fixed "now" (Unix seconds) when set; the system clock otherwise.
    clock: Option<i64>,
    /// Project API keys owned by users (made in the dashboard, not through the Admin API):
    /// listed beside the service accounts' keys.
    user_keys: Vec<UserKeyRec>,
}

/// A user-owned project API key (its value is never needed: the simulator only lists it).
pub(super) struct UserKeyRec {
    pub(super) id: String,
    pub(super) project_id: String,
    pub(super) name: String,
    pub(super) created_at: i64,
    pub(super) last_used_at: Option<i64>,
    pub(super) user_id: String,
}

struct ProjectRec {
    id: String,
    name: String,
    created_at: i64,
}

struct AccountRec {
    id: String,
    project_id: String,
    name: String,
    role: &'static str,
    created_at: i64,
    deleted: bool,
    key: Option<KeyRec>,
}

struct KeyRec {
    id: String,
    name: String,
    value: Secret,
    created_at: i64,
    last_used_at: Option<i64>,
    expires_at: Option<i64>,
}

impl KeyRec {
    fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

struct AdminKeyRec {
    id: String,
    name: String,
    value: Secret,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
    deleted: bool,
}

impl AdminKeyRec {
    fn live(&self, now: i64) -> bool {
        !self.deleted && self.expires_at.is_none_or(|e| now < e)
    }

    fn info(&self, now: i64) -> AdminKeyInfo {
        AdminKeyInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            live: self.live(now),
        }
    }
}

/// The organization owner every admin key belongs to (the simulator has one user).
const OWNER_ID: &str = "user-simowner0000000000000";
const OWNER_NAME: &str = "Simulator Owner";
const OWNER_EMAIL: &str = "owner@example.com";

impl State {
    fn now(&self) -> i64 {
        self.clock.unwrap_or_else(system_now)
    }

    fn project(&self, id: &str) -> Option<&ProjectRec> {
        self.projects.iter().find(|p| p.id == id)
    }

    fn live_account(&self, project_id: &str, id: &str) -> Option<&AccountRec> {
        self.accounts
            .iter()
            .find(|a| !a.deleted && a.project_id == project_id && a.id == id)
    }

    /// The account index a data-plane key value belongs to, if the key works now.
    fn live_key(&self, value: &str) -> Option<usize> {
        let now = self.now();
        let &i = self.key_index.get(&Secret::new(value).sha256_hex())?;
        let a = &self.accounts[i];
        (!a.deleted && a.key.as_ref().is_some_and(|k| !k.expired(now))).then_some(i)
    }

    /// Create a service account (and, unless `account_only`, its key, which expires
    /// `expires_in` seconds from now if given). The caller checked the project and input.
    fn add_account(
        &mut self,
        project_id: &str,
        name: &str,
        account_only: bool,
        expires_in: Option<i64>,
    ) -> (usize, Option<Secret>) {
        let now = self.now();
        let (key, value) = if account_only {
            (None, None)
        } else {
            let value = Secret::new(new_key_value());
            let rec = KeyRec {
                id: new_id("key_", 16),
                name: "Secret Key".to_string(),
                value: value.clone(),
                created_at: now,
                last_used_at: None,
                expires_at: expires_in.map(|s| now.saturating_add(s)),
            };
            (Some(rec), Some(value))
        };
        let idx = self.accounts.len();
        if let Some(v) = &value {
            self.key_index.insert(v.sha256_hex(), idx);
        }
        if let Some(k) = &key {
            self.key_by_id.insert(k.id.clone(), idx);
        }
        self.accounts.push(AccountRec {
            id: new_id("svc_acct_", 24),
            project_id: project_id.to_string(),
            name: name.to_string(),
            role: if account_only { "none" } else { "member" },
            created_at: now,
            deleted: false,
            key,
        });
        (idx, value)
    }
}

impl State {
    /// Add an admin key (the caller checked the input); returns its index.
    fn add_admin_key(&mut self, name: &str, value: Secret, expires_in: Option<i64>) -> usize {
        let now = self.now();
        let idx = self.admin_keys.len();
        self.admin_index.insert(value.sha256_hex(), idx);
        self.admin_keys.push(AdminKeyRec {
            id: admin::new_admin_key_id(),
            name: name.to_string(),
            value,
            created_at: now,
            expires_at: expires_in.map(|s| now.saturating_add(s)),
            last_used_at: None,
            deleted: false,
        });
        idx
    }

    /// `(id, name)` of a project, for audit events.
    fn project_ref(&self, id: &str) -> Option<(String, String)> {
        self.project(id).map(|p| (p.id.clone(), p.name.clone()))
    }

    /// `service_account.created` (and `api_key.created` for its key) by `actor`.
    fn audit_account_created(&mut self, idx: usize, actor: AuditActor) {
        self.audit_account(idx, actor, ["service_account.created", "api_key.created"]);
    }

    /// `service_account.deleted` (and `api_key.deleted`: the key died with it).
    fn audit_account_deleted(&mut self, idx: usize, actor: AuditActor) {
        self.audit_account(idx, actor, ["service_account.deleted", "api_key.deleted"]);
    }

    fn audit_account(&mut self, idx: usize, actor: AuditActor, types: [&str; 2]) {
        let now = self.now();
        let a = &self.accounts[idx];
        let (account_id, role) = (a.id.clone(), a.role);
        let key_id = a.key.as_ref().map(|k| k.id.clone());
        let project = self.project_ref(&a.project_id);
        let project = project.as_ref().map(|(i, n)| (i.as_str(), n.as_str()));
        let payload = audit::payload(types[0], &account_id, role);
        self.audit
            .record(now, types[0], &account_id, project, actor.clone(), payload);
        if let Some(key_id) = key_id {
            let payload = audit::payload(types[1], &key_id, role);
            self.audit
                .record(now, types[1], &key_id, project, actor, payload);
        }
    }
}

/// The actor of what the seeding helpers do: the organization owner in the dashboard.
fn owner_session() -> AuditActor {
    AuditActor::Session {
        user_id: OWNER_ID.to_string(),
        email: OWNER_EMAIL.to_string(),
    }
}

impl AccountRec {
    fn info(&self) -> ServiceAccountInfo {
        ServiceAccountInfo {
            id: self.id.clone(),
            project_id: self.project_id.clone(),
            name: self.name.clone(),
            role: self.role.to_string(),
            created_at: self.created_at,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            key_expires_at: self.key.as_ref().and_then(|k| k.expires_at),
        }
    }
}

impl OpenAiSim {
    /// A simulator with no projects whose Admin API accepts `admin_key`: the first entry of
    /// the admin key list (named "Admin Key", never expiring).
    pub fn new(admin_key: Secret) -> Self {
        let (fault_gen, _) = watch::channel(0);
        let mut state = State {
            admin_keys: Vec::new(),
            admin_index: HashMap::new(),
            org_created_at: system_now(),
            projects: Vec::new(),
            accounts: Vec::new(),
            key_index: HashMap::new(),
            key_by_id: HashMap::new(),
            usage: usage::UsageStore::default(),
            audit: audit::AuditLog::default(),
            max_key_lifetime: None,
            served: HashMap::new(),
            counts: DataPlaneCounts::default(),
            calls: BTreeMap::new(),
            faults: faults::FaultState::default(),
            clock: None,
            user_keys: Vec::new(),
        };
        state.add_admin_key("Admin Key", admin_key, None);
        OpenAiSim {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                fault_gen,
                holds: Holds::default(),
            }),
        }
    }

    /// The API under `/v1`, the control API under `/_sim`.
    pub fn router(&self) -> Router {
        let admin = Router::new()
            .route("/v1/organization/projects", get(admin::list_projects))
            .route(
                "/v1/organization/projects/{project_id}",
                get(admin::get_project),
            )
            .route(
                "/v1/organization/projects/{project_id}/service_accounts",
                get(admin::list_service_accounts).post(admin::create_service_account),
            )
            .route(
                "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}",
                get(admin::get_service_account).delete(admin::delete_service_account),
            )
            .route(
                "/v1/organization/projects/{project_id}/api_keys",
                get(admin::list_api_keys),
            )
            .route(
                "/v1/organization/projects/{project_id}/api_keys/{api_key_id}",
                get(admin::get_api_key).delete(admin::delete_api_key),
            )
            .route(
                "/v1/organization/admin_api_keys",
                get(admin::list_admin_keys).post(admin::create_admin_key),
            )
            .route(
                "/v1/organization/admin_api_keys/{key_id}",
                get(admin::get_admin_key).delete(admin::delete_admin_key),
            )
            .route("/v1/organization/audit_logs", get(audit::list));
        let admin = UsageEndpoint::ALL
            .into_iter()
            .fold(admin, |r, ep| {
                r.route(
                    &format!("/v1/organization/usage/{}", ep.path()),
                    get(move |s: AxState<OpenAiSim>, q: RawQuery| usage::usage(ep, s, q)),
                )
            })
            .route_layer(middleware::from_fn_with_state(
                self.clone(),
                admin::require_admin_key,
            ));
        let data = Router::new()
            .route("/v1/models", get(data::list_models))
            .route(
                "/v1/chat/completions",
                axum::routing::post(data::chat_completion),
            );
        Router::new()
            .merge(admin)
            .merge(data)
            // Outermost on the API routes: faults hit before authentication, like an
            // overloaded edge in front of the real API.
            .route_layer(middleware::from_fn_with_state(self.clone(), fault_layer))
            .route(
                "/_sim/faults",
                put(put_faults).delete(delete_faults).get(get_faults),
            )
            .route("/_sim/stats", get(get_stats))
            .route("/_sim/release", axum::routing::post(post_release))
            .route("/_sim/blocked", get(get_blocked))
            .fallback(invalid_url)
            .method_not_allowed_fallback(invalid_url)
            .with_state(self.clone())
    }

    /// Serve on `bind` (loopback(0) for tests) until `cancel` fires or the server drops.
    pub async fn serve(
        &self,
        bind: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<Server> {
        serve(self.router(), bind, cancel).await
    }

    /// Seeding helper: a new active project; returns its id (`proj_...`).
    pub fn create_project(&self, name: &str) -> String {
        let mut st = self.lock();
        let id = new_id("proj_", 24);
        let created_at = st.now();
        st.projects.push(ProjectRec {
            id: id.clone(),
            name: name.to_string(),
            created_at,
        });
        id
    }

    /// Seeding helper: create a service account and its key directly (as if via the API).
    pub fn create_service_account(
        &self,
        project_id: &str,
        name: &str,
    ) -> Result<(ServiceAccountInfo, Secret), OpenAiSimError> {
        let mut st = self.lock();
        if st.project(project_id).is_none() {
            return Err(OpenAiSimError::UnknownProject(project_id.to_string()));
        }
        let (idx, value) = st.add_account(project_id, name, false, None);
        st.audit_account_created(idx, owner_session());
        match value {
            Some(value) => Ok((st.accounts[idx].info(), value)),
            None => Err(OpenAiSimError::UnknownKey(name.to_string())),
        }
    }

    /// Seeding helper: [`create_service_account`](Self::create_service_account) whose key
    /// stops working `expires_in_seconds` from now (by the simulator's clock).
    pub fn create_service_account_expiring(
        &self,
        project_id: &str,
        name: &str,
        expires_in_seconds: i64,
    ) -> Result<(ServiceAccountInfo, Secret), OpenAiSimError> {
        if expires_in_seconds < 1 {
            return Err(OpenAiSimError::InvalidExpiry(format!(
                "{expires_in_seconds} s is not a positive lifetime"
            )));
        }
        let mut st = self.lock();
        if st.project(project_id).is_none() {
            return Err(OpenAiSimError::UnknownProject(project_id.to_string()));
        }
        let (idx, value) = st.add_account(project_id, name, false, Some(expires_in_seconds));
        st.audit_account_created(idx, owner_session());
        match value {
            Some(value) => Ok((st.accounts[idx].info(), value)),
            None => Err(OpenAiSimError::UnknownKey(name.to_string())),
        }
    }

    /// The organization's key-lifetime policy for new service accounts: with `Some(max)`,
    /// a create must give `expires_in_seconds` of at most `max` (400 otherwise).
    pub fn set_key_lifetime_policy(&self, max_seconds: Option<i64>) {
        self.lock().max_key_lifetime = max_seconds;
    }

    /// Seeding helper: plant `n` requests of `key_id` on `endpoint` at second `at`, as if
    /// served then (the key's `last_used_at` moves up to `at` if later and `n > 0`; `n = 0`
    /// makes a zero-request result, as upstream may report). Each request
    /// counts as [`UsageEndpoint`]'s fixed amounts: 10 input and 10 output tokens
    /// (completions), 10 input tokens (embeddings, moderations), one 1024x1024 generated
    /// image, 100 characters, 5 seconds, one file search (vector store `vs_sim`), one web
    /// search (`medium`). History older than [`HISTORY_SECS`] behind the key's newest use
    /// on that endpoint is dropped. Works for keys of deleted accounts too.
    pub fn record_usage(
        &self,
        key_id: &str,
        endpoint: UsageEndpoint,
        at: i64,
        n: u64,
    ) -> Result<(), OpenAiSimError> {
        let mut st = self.lock();
        let idx = *st
            .key_by_id
            .get(key_id)
            .ok_or_else(|| OpenAiSimError::UnknownKey(key_id.to_string()))?;
        let project_id = st.accounts[idx].project_id.clone();
        if let Some(k) = st.accounts[idx].key.as_mut().filter(|_| n > 0) {
            k.last_used_at = Some(k.last_used_at.map_or(at, |t| t.max(at)));
        }
        let (dims, counters) = endpoint.planted(n);
        st.usage
            .record(endpoint, key_id, &project_id, dims, at, counters);
        Ok(())
    }

    /// Minutes of usage history held for `key_id` on `endpoint` (the bound's witness).
    pub fn usage_minutes_kept(&self, key_id: &str, endpoint: UsageEndpoint) -> usize {
        self.lock().usage.minutes_kept(endpoint, key_id)
    }

    /// Seeding helper: a new admin key (as if made in the dashboard, audited as the owner's
    /// session); `expires_in_seconds` as on `POST /v1/organization/admin_api_keys`.
    pub fn create_admin_key(
        &self,
        name: &str,
        expires_in_seconds: Option<i64>,
    ) -> Result<(AdminKeyInfo, Secret), OpenAiSimError> {
        if let Some(s) = expires_in_seconds.filter(|s| !(1..=31_536_000).contains(s)) {
            return Err(OpenAiSimError::InvalidExpiry(format!(
                "{s} s is outside 1..=31536000"
            )));
        }
        let value = Secret::new(admin::new_admin_key_value());
        let mut st = self.lock();
        let idx = st.add_admin_key(name, value.clone(), expires_in_seconds);
        let now = st.now();
        let id = st.admin_keys[idx].id.clone();
        st.audit.record(
            now,
            "api_key.created",
            &id,
            None,
            owner_session(),
            audit::payload("api_key.created", &id, ""),
        );
        Ok((st.admin_keys[idx].info(now), value))
    }

    /// Every admin key ever made, deleted ones included (`live: false`), in creation order.
    pub fn admin_keys(&self) -> Vec<AdminKeyInfo> {
        let st = self.lock();
        let now = st.now();
        st.admin_keys.iter().map(|k| k.info(now)).collect()
    }

    /// Seeding helper: delete an admin key (as in the dashboard); it is refused from now on.
    pub fn delete_admin_key(&self, key_id: &str) -> Result<(), OpenAiSimError> {
        let mut st = self.lock();
        let idx = st
            .admin_keys
            .iter()
            .position(|k| !k.deleted && k.id == key_id)
            .ok_or_else(|| OpenAiSimError::UnknownAdminKey(key_id.to_string()))?;
        st.admin_keys[idx].deleted = true;
        st.admin_index.retain(|_, i| *i != idx);
        let now = st.now();
        st.audit.record(
            now,
            "api_key.deleted",
            key_id,
            None,
            owner_session(),
            audit::payload("api_key.deleted", key_id, ""),
        );
        Ok(())
    }

    /// Switch the organization's audit logging. While off nothing is recorded and
    /// `GET /v1/organization/audit_logs` answers 403 (see the `audit` module).
    pub fn set_audit_logging(&self, enabled: bool) {
        self.lock().audit.enabled = enabled;
    }

    /// Every audit event recorded so far, oldest first.
    pub fn audit_events(&self) -> Vec<AuditEventInfo> {
        self.lock().audit.infos()
    }

    /// Seeding helper: an audit event made by someone else (`actor`), now, for
    /// reconciliation tests; nothing else changes. `event_type` is one of
    /// `service_account.{created,updated,deleted}`, `api_key.{created,updated,deleted}`;
    /// `resource_id` is the account or key acted on. Returns the event id.
    pub fn inject_audit_event(
        &self,
        event_type: &str,
        resource_id: &str,
        project_id: Option<&str>,
        actor: AuditActor,
    ) -> Result<String, OpenAiSimError> {
        if !audit::MODELLED_TYPES.contains(&event_type) {
            return Err(OpenAiSimError::UnknownEventType(event_type.to_string()));
        }
        let mut st = self.lock();
        let project = match project_id {
            None => None,
            Some(p) => Some(
                st.project_ref(p)
                    .ok_or_else(|| OpenAiSimError::UnknownProject(p.to_string()))?,
            ),
        };
        let now = st.now();
        let project = project.as_ref().map(|(i, n)| (i.as_str(), n.as_str()));
        let payload = audit::payload(event_type, resource_id, "member");
        st.audit
            .record(now, event_type, resource_id, project, actor, payload)
            .ok_or(OpenAiSimError::AuditLoggingOff)
    }

    /// Live service accounts of a project, in creation order (empty for an unknown project).
    pub fn service_accounts(&self, project_id: &str) -> Vec<ServiceAccountInfo> {
        self.lock()
            .accounts
            .iter()
            .filter(|a| !a.deleted && a.project_id == project_id)
            .map(AccountRec::info)
            .collect()
    }

    /// Whether the data plane would accept this key value now (not deleted, not expired).
    pub fn key_is_live(&self, key_value: &str) -> bool {
        self.lock().live_key(key_value).is_some()
    }

    /// Data-plane calls accepted with this key id.
    pub fn requests_served(&self, key_id: &str) -> u64 {
        self.lock().served.get(key_id).copied().unwrap_or(0)
    }

    pub fn data_plane_counts(&self) -> DataPlaneCounts {
        self.lock().counts
    }

    /// Replace the fault settings; counting (Nth call, rate window) restarts now.
    /// Panics on invalid settings (a test bug); the HTTP control API answers 400 instead.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(e) = self.try_set_faults(faults) {
            panic!("{e}");
        }
    }

    /// [`set_faults`](Self::set_faults) that reports invalid settings instead of panicking.
    pub fn try_set_faults(&self, faults: Faults) -> Result<(), OpenAiSimError> {
        faults.validate().map_err(OpenAiSimError::InvalidFaults)?;
        self.inner.holds.set(faults.block.clone());
        self.lock().faults = faults::FaultState::new(faults);
        self.inner.fault_gen.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Remove all faults; hung and held calls resume and get answered.
    pub fn clear_faults(&self) {
        self.lock().faults = faults::FaultState::default();
        self.inner.holds.set(None);
        self.inner.fault_gen.send_modify(|g| *g += 1);
    }

    /// Let every call held by `Faults::block` now go on (`POST /_sim/release`); returns
    /// how many. Later calls are held again while the block is set.
    pub fn release(&self) -> u64 {
        self.inner.holds.release()
    }

    /// Calls held right now and so far (`GET /_sim/blocked`).
    pub fn blocked(&self) -> Blocked {
        self.inner.holds.status()
    }

    /// Wait until at least `n` calls are held (the client is inside the call); false after
    /// `timeout`.
    pub async fn wait_blocked(&self, n: u64, timeout: std::time::Duration) -> bool {
        self.inner.holds.wait_blocked(n, timeout).await
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.faults.clone()
    }

    /// Calls that reached `operation` (e.g. `"service_accounts.create"`), faulted ones
    /// included: what a retrying client actually sent. See [`OPERATIONS`].
    pub fn calls(&self, operation: &str) -> u64 {
        self.lock().calls.get(operation).copied().unwrap_or(0)
    }

    /// Fix "now" (Unix seconds) for timestamps and usage buckets; `None` = system clock.
    pub fn set_clock(&self, now: Option<i64>) {
        self.lock().clock = now;
    }

    /// Move a fixed clock forward (starting from the system time if none was set).
    pub fn advance_clock(&self, secs: i64) {
        let mut st = self.lock();
        let now = st.now();
        st.clock = Some(now + secs);
    }

    pub fn now(&self) -> i64 {
        self.lock().now()
    }

    /// Seeding helper: a project API key owned by user `user_id` (as made in the
    /// dashboard), last used at `last_used_at` (Unix seconds); returns its id.
    pub fn create_user_key(
        &self,
        project_id: &str,
        user_id: &str,
        name: &str,
        last_used_at: Option<i64>,
    ) -> Result<String, OpenAiSimError> {
        let mut st = self.lock();
        if st.project(project_id).is_none() {
            return Err(OpenAiSimError::UnknownProject(project_id.to_string()));
        }
        let id = new_id("key_", 16);
        let created_at = st.now();
        st.user_keys.push(UserKeyRec {
            id: id.clone(),
            project_id: project_id.to_string(),
            name: name.to_string(),
            created_at,
            last_used_at,
            user_id: user_id.to_string(),
        });
        Ok(id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // single push/assign), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every operation name [`OpenAiSim::calls`] and `Faults::operations` understand.
pub const OPERATIONS: &[&str] = &[
    "projects.list",
    "projects.retrieve",
    "service_accounts.list",
    "service_accounts.create",
    "service_accounts.retrieve",
    "service_accounts.delete",
    "api_keys.list",
    "api_keys.retrieve",
    "api_keys.delete",
    "usage.completions",
    "usage.embeddings",
    "usage.moderations",
    "usage.images",
    "usage.audio_speeches",
    "usage.audio_transcriptions",
    "usage.file_search_calls",
    "usage.web_search_calls",
    "audit_logs.list",
    "admin_api_keys.list",
    "admin_api_keys.create",
    "admin_api_keys.retrieve",
    "admin_api_keys.delete",
    "models.list",
    "chat.completions.create",
];

/// The operation a routed request is, from its method and route template.
fn operation(method: &Method, route: &str) -> Option<&'static str> {
    const P: &str = "/v1/organization/projects";
    let op = match (method.as_str(), route.strip_prefix(P)) {
        ("GET", Some("")) => "projects.list",
        ("GET", Some("/{project_id}")) => "projects.retrieve",
        ("GET", Some("/{project_id}/service_accounts")) => "service_accounts.list",
        ("POST", Some("/{project_id}/service_accounts")) => "service_accounts.create",
        ("GET", Some("/{project_id}/service_accounts/{service_account_id}")) => {
            "service_accounts.retrieve"
        }
        ("DELETE", Some("/{project_id}/service_accounts/{service_account_id}")) => {
            "service_accounts.delete"
        }
        ("GET", Some("/{project_id}/api_keys")) => "api_keys.list",
        ("GET", Some("/{project_id}/api_keys/{api_key_id}")) => "api_keys.retrieve",
        ("DELETE", Some("/{project_id}/api_keys/{api_key_id}")) => "api_keys.delete",
        ("GET", None) => match route {
            "/v1/organization/audit_logs" => "audit_logs.list",
            "/v1/organization/admin_api_keys" => "admin_api_keys.list",
            "/v1/organization/admin_api_keys/{key_id}" => "admin_api_keys.retrieve",
            "/v1/models" => "models.list",
            _ => route
                .strip_prefix("/v1/organization/usage/")
                .and_then(UsageEndpoint::from_path)?
                .operation(),
        },
        ("POST", None) if route == "/v1/organization/admin_api_keys" => "admin_api_keys.create",
        ("DELETE", None) if route == "/v1/organization/admin_api_keys/{key_id}" => {
            "admin_api_keys.delete"
        }
        ("POST", None) if route == "/v1/chat/completions" => "chat.completions.create",
        _ => return None,
    };
    Some(op)
}

fn is_data_plane(op: &str) -> bool {
    matches!(op, "models.list" | "chat.completions.create")
}

/// Counts the call, then applies the current faults (latency, hang, rate limit, 5xx).
async fn fault_layer(AxState(sim): AxState<OpenAiSim>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let Some(op) = operation(req.method(), &route) else {
        return next.run(req).await;
    };
    let data_plane = is_data_plane(op);
    let latency = {
        let mut st = sim.lock();
        *st.calls.entry(op.to_string()).or_default() += 1;
        st.faults.latency(op, data_plane)
    };
    if let Some(d) = latency {
        tokio::time::sleep(d).await;
    }
    // Hang: wait until the faults change and re-check; never answer while it applies.
    loop {
        let mut changed = sim.inner.fault_gen.subscribe();
        if !sim.lock().faults.hangs(op, data_plane) {
            break;
        }
        if changed.changed().await.is_err() {
            break;
        }
    }
    sim.inner.holds.hold(op, Phase::BeforeEffect).await;
    let (verdict, headers) = {
        let mut st = sim.lock();
        let (v, h) = st.faults.decide(op, data_plane);
        if data_plane && matches!(v, faults::Verdict::Fail(_) | faults::Verdict::FailAfter(_)) {
            st.counts.faulted += 1;
        }
        (v, h)
    };
    let mut resp = match verdict {
        // Refused before it took effect: nothing to hold back.
        faults::Verdict::Fail(err) => err.into_response(),
        faults::Verdict::FailAfter(err) => {
            let _effect = next.run(req).await;
            sim.inner.holds.hold(op, Phase::AfterEffect).await;
            err.into_response()
        }
        faults::Verdict::Proceed => {
            let resp = next.run(req).await;
            sim.inner.holds.hold(op, Phase::AfterEffect).await;
            resp
        }
    };
    resp.headers_mut().extend(headers);
    resp
}

/// Unknown path or method: OpenAI answers 404 `Invalid URL (METHOD /path)`.
async fn invalid_url(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Invalid URL ({method} {})", uri.path()),
    )
}

async fn put_faults(AxState(sim): AxState<OpenAiSim>, body: axum::body::Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, format!("invalid faults: {e}"))
                .into_response()
        }
    };
    match sim.try_set_faults(faults) {
        Ok(()) => Json(sim.faults()).into_response(),
        Err(e) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn delete_faults(AxState(sim): AxState<OpenAiSim>) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}

async fn get_faults(AxState(sim): AxState<OpenAiSim>) -> Json<Faults> {
    Json(sim.faults())
}

async fn get_stats(AxState(sim): AxState<OpenAiSim>) -> Json<serde_json::Value> {
    let blocked = sim.blocked();
    let st = sim.lock();
    Json(serde_json::json!({
        "calls": st.calls,
        "data_plane": st.counts,
        "faults": st.faults.faults,
        "blocked": blocked,
    }))
}

async fn post_release(AxState(sim): AxState<OpenAiSim>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "released": sim.release() }))
}

async fn get_blocked(AxState(sim): AxState<OpenAiSim>) -> Json<Blocked> {
    Json(sim.blocked())
}

fn system_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `prefix` + `len` random alphanumerics, e.g. `svc_acct_Xy3...`.
fn new_id(prefix: &str, len: usize) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), len)
    )
}

/// A key value shaped like upstream's: `sk-svcacct-` + 64 random + `T3BlbkFJ` + 64 random
/// (about 760 bits of randomness).
fn new_key_value() -> String {
    let mut rng = rand::rng();
    format!(
        "sk-svcacct-{}T3BlbkFJ{}",
        Alphanumeric.sample_string(&mut rng, 64),
        Alphanumeric.sample_string(&mut rng, 64)
    )
}

/// The form a key may be shown in (401 messages, `redacted_value`): the first 8 and last
/// 4 characters of a long key, nothing of a short one.
fn redact(value: &str, sep: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 24 {
        return sep.to_string();
    }
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{sep}{tail}")
}
