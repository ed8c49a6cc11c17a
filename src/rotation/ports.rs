//! The three small interfaces the rotation engine drives, so its logic is tested in memory
//! and the real clients (OpenAI over reqwest, Vault over vaultrs, Kubernetes over kube) are
//! tested against real servers or spec-checked simulators.

use crate::config::WorkloadRef;
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The external systems, a bounded set (also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    OpenAi,
    Vault,
    Kubernetes,
    /// Notification webhooks (`[[notifications.webhooks]]`).
    Webhook,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::OpenAi => "openai",
            Backend::Vault => "vault",
            Backend::Kubernetes => "kubernetes",
            Backend::Webhook => "webhook",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What any backend call can fail with. Messages carry ids and statuses, never key values.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("{backend}: {what} not found")]
    NotFound { backend: Backend, what: String },
    /// A check-and-set (Vault) or resourceVersion (Kubernetes) conflict: someone else wrote.
    #[error("{backend}: conflicting write to {what}: {message}")]
    Conflict {
        backend: Backend,
        what: String,
        message: String,
    },
    /// Anything else, after the client's own bounded retries.
    #[error("{backend}: {message}")]
    Failed {
        backend: Backend,
        message: String,
        /// Worth retrying later (timeouts, 429, 5xx); false for 4xx and bad input.
        transient: bool,
    },
}

impl BackendError {
    pub fn backend(&self) -> Backend {
        match self {
            BackendError::NotFound { backend, .. }
            | BackendError::Conflict { backend, .. }
            | BackendError::Failed { backend, .. } => *backend,
        }
    }
}

/// A service account and the id of its one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRef {
    /// `svc_acct_...`
    pub id: String,
    /// `key_...`
    pub key_id: String,
}

/// What a mint returns: the only time the key value is seen.
#[derive(Debug, Clone)]
pub struct MintedKey {
    pub account: AccountRef,
    pub name: String,
    pub key: Secret,
    pub created_at: DateTime<Utc>,
}

/// A service account as listed (no key value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Usage of one key, for the usage-verified drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// `last_used_at` of the key, if the API reports it.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Requests counted by the Usage API since the asked-for time.
    pub requests_since: u64,
}

/// The OpenAI Admin API as the engine needs it.
#[async_trait]
pub trait KeyIssuer: Send + Sync {
    /// Create a service account named `name`; returns its key (shown once).
    /// Implementations must not blindly retry a create (a retried create can make a second
    /// account): look it up by name first.
    async fn create_service_account(
        &self,
        project: &str,
        name: &str,
    ) -> Result<MintedKey, BackendError>;
    /// All service accounts of the project.
    async fn list_service_accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError>;
    /// Delete an account (and so its key). An account already gone counts as done.
    async fn delete_service_account(&self, project: &str, id: &str) -> Result<(), BackendError>;
    /// The key answers an authenticated call (`GET /v1/models`).
    async fn check_key(&self, key: &Secret) -> Result<(), BackendError>;
    /// Usage of key `key_id` since `since`.
    async fn key_usage(
        &self,
        project: &str,
        key_id: &str,
        since: DateTime<Utc>,
    ) -> Result<KeyUsage, BackendError>;
    /// [`create_service_account`](Self::create_service_account) whose key stops working
    /// `expires_in` after creation (`expires_in_seconds`); `None` = never. The default
    /// cannot set an expiry and refuses one rather than mint a key without it.
    async fn create_service_account_expiring(
        &self,
        project: &str,
        name: &str,
        expires_in: Option<Duration>,
    ) -> Result<MintedKey, BackendError> {
        match expires_in {
            None => self.create_service_account(project, name).await,
            Some(_) => Err(BackendError::Failed {
                backend: Backend::OpenAi,
                message: format!("project {project}: this issuer cannot set a key expiry"),
                transient: false,
            }),
        }
    }
    /// Every API key of the project (user- and service-account-owned), all pages. The
    /// default says the issuer cannot list them (the inventory shows an error row).
    async fn list_project_keys(&self, project: &str) -> Result<Vec<ProjectKey>, BackendError> {
        Err(BackendError::Failed {
            backend: Backend::OpenAi,
            message: format!("project {project}: this issuer cannot list API keys"),
            transient: false,
        })
    }
}

/// Which account a stored key belongs to (Vault custom metadata; ids and times only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    pub account: Option<AccountRef>,
    pub rotation_id: Option<String>,
    pub key_created_at: Option<DateTime<Utc>>,
}

/// What describes the current key at a path, without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub meta: KeyMeta,
    pub version: u64,
    /// When Vault wrote that version (`created_time`): the key's age when the metadata
    /// does not say.
    pub version_created_at: Option<DateTime<Utc>>,
}

/// The current key at a path.
#[derive(Debug, Clone)]
pub struct StoredKey {
    /// KV v2 version of the data.
    pub version: u64,
    pub key: Secret,
    /// Metadata of the path, describing its current version.
    pub meta: KeyMeta,
}

/// Vault KV v2 as the engine needs it: keys (one field of a secret's data) and the journal.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The current version of `path` and its `field`; `None` when the path does not exist.
    async fn read_key(&self, path: &str, field: &str) -> Result<Option<StoredKey>, BackendError>;
    /// Only what describes the current key (no key value is fetched); the scheduler polls
    /// this. The default reads the key and drops it.
    async fn read_key_meta(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<KeyInfo>, BackendError> {
        Ok(self.read_key(path, field).await?.map(|k| KeyInfo {
            meta: k.meta,
            version: k.version,
            version_created_at: None,
        }))
    }
    /// `field` of an earlier version (for rollback).
    async fn read_key_version(
        &self,
        path: &str,
        field: &str,
        version: u64,
    ) -> Result<Secret, BackendError>;
    /// Write `key` into `field` (other fields of the data kept) as a new version, only if the
    /// current version is `expected_version` (0 = the path must not exist); then set the
    /// path's metadata to `meta`. Returns the new version. Someone else's write in between
    /// → `BackendError::Conflict`.
    async fn write_key(
        &self,
        path: &str,
        field: &str,
        key: &Secret,
        meta: &KeyMeta,
        expected_version: u64,
    ) -> Result<u64, BackendError>;
    /// Set the path's key metadata to `meta` without writing data: repairs metadata whose
    /// write failed after the data landed (data and metadata are two Vault writes).
    async fn write_key_meta(&self, path: &str, meta: &KeyMeta) -> Result<(), BackendError>;
    /// A JSON document (the journal) and its version.
    async fn read_doc(&self, path: &str) -> Result<Option<(u64, serde_json::Value)>, BackendError>;
    /// CAS-write a JSON document (`expected_version` 0 = must not exist); returns the new version.
    async fn write_doc(
        &self,
        path: &str,
        doc: &serde_json::Value,
        expected_version: u64,
    ) -> Result<u64, BackendError>;
    /// Names directly under `prefix` (folders end in `/`); empty when none.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;
}

/// Where one workload's rollout stands, judged by kubectl's rule plus "every ready pod
/// carries the rotation id".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutState {
    Complete,
    /// Still going; the message says what is awaited (as kubectl prints it).
    Progressing(String),
    /// Will not complete by itself (e.g. `ProgressDeadlineExceeded`).
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Kubernetes as the engine needs it.
#[async_trait]
pub trait WorkloadRoller: Send + Sync {
    /// Set the pod-template annotation `openai-key-rotator/rotation-id: <rollout_id>`
    /// (a no-op when it already holds that value, so repeating is safe).
    async fn roll(&self, workload: &WorkloadRef, rollout_id: &str) -> Result<(), BackendError>;
    /// Where the rollout to `rollout_id` stands.
    async fn rollout_state(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<RolloutState, BackendError>;
    /// Ready pods of the workload whose template carries `rollout_id` (so still use the
    /// key that rollout put in place).
    async fn ready_pods_with(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<u32, BackendError>;
    /// Hex SHA-256 of `key` in Secret `namespace/name`; `None` if the Secret or key is absent.
    async fn secret_sha256(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError>;
    /// Set `annotation` on the Secret to a new value, nudging its syncing operator.
    async fn nudge_secret(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: &str,
    ) -> Result<(), BackendError>;
    /// Whether the workload is paused (`spec.paused` of a Deployment or an Argo Rollout):
    /// a paused rollout never completes, so a rotation refuses it before minting.
    async fn paused(&self, _workload: &WorkloadRef) -> Result<bool, BackendError> {
        Ok(false)
    }
    /// What in the cluster reads the key at Vault `mount`/`path` (field `field`): pods whose
    /// Vault Agent injector annotations name the path, VaultStaticSecret and ExternalSecret
    /// objects that read it, the Secrets they write, and the pods and workloads that mount
    /// or `envFrom` those Secrets. The caller drops what its target lists.
    async fn consumers_of(
        &self,
        _mount: &str,
        _path: &str,
        _field: &str,
    ) -> Result<Vec<Consumer>, BackendError> {
        Ok(Vec::new())
    }
    /// Record a Kubernetes Event on the workload (best effort; callers ignore errors).
    async fn event(
        &self,
        workload: &WorkloadRef,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), BackendError>;
}

/// Something that reads a target's key, found by [`WorkloadRoller::consumers_of`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Consumer {
    /// What it is: `Pod`, `Deployment`, `StatefulSet`, `DaemonSet`, `Rollout`,
    /// `VaultStaticSecret`, `ExternalSecret`, `Secret`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// How it reads the key, e.g. "vault.hashicorp.com/agent-inject-secret-openai" or
    /// "envFrom Secret chat-openai (written by ExternalSecret chat)".
    pub via: String,
    /// The workload to roll for it, when it is (or belongs to) one.
    pub workload: Option<WorkloadRef>,
}

/// Outcome class of one backend call (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    /// 2xx (and 404 where it means "already gone").
    Success,
    /// 429.
    RateLimited,
    /// Other 4xx.
    ClientError,
    /// 5xx.
    ServerError,
    /// No HTTP answer: connect error or timeout.
    Transport,
}

impl StatusClass {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Success => "2xx",
            StatusClass::RateLimited => "429",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Transport => "transport",
        }
    }

    pub fn from_status(status: u16) -> StatusClass {
        match status {
            429 => StatusClass::RateLimited,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::Success,
        }
    }
}

/// Hears every backend call the real clients make (metrics implement it). `operation` is
/// one of a fixed set of names per client, e.g. "service_accounts.create".
pub trait CallObserver: Send + Sync {
    fn call(
        &self,
        backend: Backend,
        operation: &'static str,
        status: StatusClass,
        elapsed: std::time::Duration,
    );
    fn retry(&self, backend: Backend, operation: &'static str);
    /// A call waited for the rate-limit pacer before it went (no 429 needed to slow it).
    fn paced(&self, _backend: Backend, _operation: &'static str, _waited: std::time::Duration) {}
}

/// A [`CallObserver`] that ignores everything.
pub struct NoCalls;

impl CallObserver for NoCalls {
    fn call(&self, _: Backend, _: &'static str, _: StatusClass, _: std::time::Duration) {}
    fn retry(&self, _: Backend, _: &'static str) {}
}

/// Why one smoke-probe attempt got no HTTP status. Deliberately without the URL or the
/// underlying error text: a probe URL may carry credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed")]
    Connect,
}

/// HTTP smoke probes of the workloads, run after their rollout (a port, so the engine owns
/// no HTTP client and its tests need no server).
#[async_trait]
pub trait SmokeProber: Send + Sync {
    /// One `GET url` within `timeout`: the answer's status code.
    async fn get_status(&self, url: &str, timeout: Duration) -> Result<u16, ProbeError>;
}

/// Wall-clock time for journals, drains and schedules; a port so a simulation can run on
/// tokio's paused clock and be deterministic.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's UTC clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Whether this replica may still change anything: a leader that lost or released its
/// Lease makes no further remote write. Checked before every write the engine makes.
pub trait Fence: Send + Sync {
    /// `Err(why)` when writes are no longer allowed.
    fn check(&self) -> Result<(), String>;
}

/// A single replica: always allowed.
pub struct NoFence;

impl Fence for NoFence {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Who owns a project API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KeyOwner {
    User { id: String },
    ServiceAccount { id: String, name: String },
}

/// A project API key as listed (`ProjectApiKey`; never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectKey {
    pub id: String,
    pub name: String,
    pub owner: KeyOwner,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// When the key stops working (the SDKs' `expires_at`); `None` = never or not said.
    pub expires_at: Option<DateTime<Utc>>,
}
