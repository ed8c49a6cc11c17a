//! Admin-key rotation: the daemon's own OpenAI admin key lives at a Vault path
//! (`openai.admin_key_vault_path`, field `value`) and is rotated on its own schedule:
//! create a new admin key → verify it on a read-only admin call → publish it to Vault
//! (check-and-set) → switch the client → delete the old one.
//!
//! Journaled like target rotations (a CAS-written document at `<state_prefix>/admin-key`,
//! saved after every phase) so a crash anywhere resumes: before the publish the new key's
//! value is lost with the process, so the new key is deleted (it was never published) and
//! the old one stays; after it, Vault serves the new key and the rotation goes on from
//! there. Vault is the truth: the key it serves is never deleted, and a daemon started
//! with the path reads its admin key there.

use crate::openai::{AdminRequest, CallError, OpenAiClient};
use crate::rotation::ports::{AccountRef, BackendError, KeyMeta, SecretStore};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus::{Gauge, IntCounterVec, Opts, Registry};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The Vault field holding the admin key.
pub const FIELD: &str = "value";

/// Where an admin-key rotation stands; each is journaled once reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Journaled before the create: a key of `new_key_name` may exist.
    Started,
    Created,
    Verified,
    /// Vault serves the new key.
    Published,
    /// The client sends the new key.
    Switched,
    /// The old key is deleted.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminStatus {
    Running,
    Completed,
    Failed,
}

impl AdminStatus {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminStatus::Running => "running",
            AdminStatus::Completed => "completed",
            AdminStatus::Failed => "failed",
        }
    }
}

/// The journal of the current (or last) admin-key rotation. Ids and a hash, no value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminKeyJournal {
    pub rotation_id: String,
    pub status: AdminStatus,
    pub phase: Phase,
    pub new_key_name: String,
    pub old_key_id: String,
    /// Vault version of the admin key path when the rotation started.
    pub old_vault_version: u64,
    pub new_key_id: Option<String>,
    pub new_key_sha256: Option<String>,
    pub new_vault_version: Option<u64>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub error: Option<String>,
}

/// An admin key as listed (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AdminKey {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub redacted_value: Option<String>,
    pub created_at: i64,
}

/// A new admin key and its value (which only the create answer carries).
pub struct NewAdminKey {
    pub id: String,
    pub key: Secret,
    pub created_at: DateTime<Utc>,
}

/// Why an admin-key call or rotation failed. Ids and classes only.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    #[error("OpenAI {op}: {message}")]
    Api {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    #[error("Vault: {0}")]
    Store(#[from] BackendError),
    #[error("admin-key journal at {path}: {message}")]
    Journal { path: String, message: String },
    #[error("{0}")]
    Refused(String),
}

impl AdminKeyError {
    fn api(op: &'static str, e: CallError) -> AdminKeyError {
        AdminKeyError::Api {
            op,
            status: e.status,
            message: e.error.to_string(),
        }
    }
}

/// The Admin API calls an admin-key rotation makes.
#[async_trait]
pub trait AdminKeyApi: Send + Sync {
    async fn list_admin_keys(&self) -> Result<Vec<AdminKey>, AdminKeyError>;
    async fn create_admin_key(
        &self,
        name: &str,
        expires_in_seconds: Option<u64>,
    ) -> Result<NewAdminKey, AdminKeyError>;
    /// 404 counts as done.
    async fn delete_admin_key(&self, id: &str) -> Result<(), AdminKeyError>;
    /// A read-only admin call made with `key`.
    async fn verify_admin_key(&self, key: &Secret) -> Result<(), AdminKeyError>;
    /// Send every later request with `key`.
    fn switch_admin_key(&self, key: Secret) -> Result<(), AdminKeyError>;
}

#[derive(Deserialize)]
struct AdminKeyList {
    data: Vec<AdminKey>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// `AdminApiKey` with its value (create answer only): no Debug.
#[derive(Deserialize)]
struct CreatedAdminKey {
    id: String,
    created_at: i64,
    #[serde(deserialize_with = "secret")]
    value: Secret,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    String::deserialize(d).map(Secret::new)
}

#[derive(Serialize)]
struct CreateBody<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_seconds: Option<u64>,
}

/// Pages of admin keys read at most (100 each).
const MAX_KEY_PAGES: usize = 20;

#[async_trait]
impl AdminKeyApi for OpenAiClient {
    async fn list_admin_keys(&self) -> Result<Vec<AdminKey>, AdminKeyError> {
        const OP: &str = "admin_api_keys.list";
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_KEY_PAGES {
            let mut query = vec![("limit", "100".to_string())];
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page: AdminKeyList = self
                .admin_json(AdminRequest {
                    op: OP,
                    method: Method::GET,
                    segments: &["organization", "admin_api_keys"],
                    query: &query,
                    body: None,
                    key: None,
                    retry: true,
                    gone_ok: false,
                    what: "admin keys",
                })
                .await
                .map_err(|e| AdminKeyError::api(OP, e))?
                .unwrap_or(AdminKeyList {
                    data: vec![],
                    has_more: false,
                    last_id: None,
                });
            let next = page
                .last_id
                .or_else(|| page.data.last().map(|k| k.id.clone()));
            out.extend(page.data);
            if !page.has_more {
                return Ok(out);
            }
            match next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => break,
            }
        }
        Err(AdminKeyError::Api {
            op: OP,
            status: None,
            message: "has_more without a new cursor, or too many pages".into(),
        })
    }

    async fn create_admin_key(
        &self,
        name: &str,
        expires_in_seconds: Option<u64>,
    ) -> Result<NewAdminKey, AdminKeyError> {
        const OP: &str = "admin_api_keys.create";
        let body = serde_json::to_vec(&CreateBody {
            name,
            expires_in_seconds,
        })
        .map_err(|e| AdminKeyError::Refused(format!("cannot encode the request: {e}")))?;
        // One attempt: a retry after an ambiguous answer could make a second key whose
        // value is lost; the caller cleans up by name instead.
        let created: CreatedAdminKey = self
            .admin_json(AdminRequest {
                op: OP,
                method: Method::POST,
                segments: &["organization", "admin_api_keys"],
                query: &[],
                body: Some(body),
                key: None,
                retry: false,
                gone_ok: false,
                what: name,
            })
            .await
            .map_err(|e| AdminKeyError::api(OP, e))?
            .ok_or_else(|| AdminKeyError::Api {
                op: OP,
                status: Some(404),
                message: "not found".into(),
            })?;
        Ok(NewAdminKey {
            id: created.id,
            key: created.value,
            created_at: DateTime::from_timestamp(created.created_at, 0).unwrap_or_else(Utc::now),
        })
    }

    async fn delete_admin_key(&self, id: &str) -> Result<(), AdminKeyError> {
        const OP: &str = "admin_api_keys.delete";
        self.admin_json::<serde_json::Value>(AdminRequest {
            op: OP,
            method: Method::DELETE,
            segments: &["organization", "admin_api_keys", id],
            query: &[],
            body: None,
            key: None,
            retry: true,
            gone_ok: true,
            what: id,
        })
        .await
        .map_err(|e| AdminKeyError::api(OP, e))?;
        Ok(())
    }

    async fn verify_admin_key(&self, key: &Secret) -> Result<(), AdminKeyError> {
        const OP: &str = "admin_api_keys.list";
        self.admin_json::<serde_json::Value>(AdminRequest {
            op: OP,
            method: Method::GET,
            segments: &["organization", "admin_api_keys"],
            query: &[("limit", "1".to_string())],
            body: None,
            key: Some(key),
            retry: true,
            gone_ok: false,
            what: "verify the new admin key",
        })
        .await
        .map_err(|e| AdminKeyError::api(OP, e))?;
        Ok(())
    }

    fn switch_admin_key(&self, key: Secret) -> Result<(), AdminKeyError> {
        self.set_admin_key(key)
            .map_err(|e| AdminKeyError::Refused(e.to_string()))
    }
}

/// Outcomes of admin-key rotations and the admin key's creation time.
#[derive(Clone)]
pub struct AdminKeyMetrics {
    rotations: IntCounterVec,
    created: Gauge,
}

impl AdminKeyMetrics {
    /// Registered in `registry` (the daemon's), series pre-created.
    pub fn register(registry: &Registry) -> prometheus::Result<AdminKeyMetrics> {
        let rotations = IntCounterVec::new(
            Opts::new(
                "openai_key_rotator_admin_key_rotations_total",
                "Admin-key rotations that ended, by outcome (completed, failed).",
            ),
            &["outcome"],
        )?;
        let created = Gauge::with_opts(Opts::new(
            "openai_key_rotator_admin_key_created_timestamp_seconds",
            "When the admin key Vault serves was created (0: unknown).",
        ))?;
        registry.register(Box::new(rotations.clone()))?;
        registry.register(Box::new(created.clone()))?;
        for o in [AdminStatus::Completed, AdminStatus::Failed] {
            rotations.with_label_values(&[o.as_str()]);
        }
        created.set(0.0);
        Ok(AdminKeyMetrics { rotations, created })
    }

    fn ended(&self, status: AdminStatus) {
        self.rotations.with_label_values(&[status.as_str()]).inc();
    }

    fn key_created(&self, at: Option<DateTime<Utc>>) {
        self.created.set(at.map_or(0.0, |t| t.timestamp() as f64));
    }
}

/// What a pass of [`AdminKeyRotator::run_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The key is younger than the max age (or no max age is set).
    NotDue,
    Completed {
        rotation_id: String,
    },
    Failed {
        rotation_id: String,
        error: String,
    },
}

/// Rotates the admin key kept at a Vault path.
pub struct AdminKeyRotator {
    pub api: Arc<dyn AdminKeyApi>,
    pub store: Arc<dyn SecretStore>,
    pub vault_path: String,
    pub journal_path: String,
    /// Prefix of new keys' names (`<prefix>-admin-<rotation id>`).
    pub name_prefix: String,
    pub max_age: Option<Duration>,
    pub expiry: Option<Duration>,
    pub metrics: Option<AdminKeyMetrics>,
    /// Whether this replica may still write (holds the leader Lease); checked before every
    /// remote write, so a replica that lost it stops and the journal resumes elsewhere.
    pub may_write: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

/// Whether `redacted` (the Admin API's `redacted_value`: the first 8 and last 4 characters
/// of a key) could be `key`'s. The only way to tell which listed admin key a value is when
/// Vault's metadata does not name it.
pub fn fits_redacted(key: &Secret, redacted: Option<&str>) -> bool {
    let v = key.expose();
    let head = v.get(..8).unwrap_or(v);
    let tail = v.get(v.len().saturating_sub(4)..).unwrap_or(v);
    redacted.is_some_and(|r| r.len() >= 12 && r.starts_with(head) && r.ends_with(tail))
}

/// The admin key Vault serves at `path` (field `value`).
pub async fn read_admin_key(store: &dyn SecretStore, path: &str) -> Result<Secret, AdminKeyError> {
    match store.read_key(path, FIELD).await? {
        Some(k) if !k.key.is_empty() => Ok(k.key),
        _ => Err(AdminKeyError::Refused(format!(
            "openai.admin_key_vault_path {path}: no admin key in field {FIELD:?}"
        ))),
    }
}

impl AdminKeyRotator {
    fn fenced(&self) -> Result<(), AdminKeyError> {
        match &self.may_write {
            Some(ok) if !ok() => Err(AdminKeyError::Refused(
                "this replica is not the leader any more: stopping the admin-key rotation (the journal resumes it)".into(),
            )),
            _ => Ok(()),
        }
    }

    async fn load(&self) -> Result<Option<(u64, AdminKeyJournal)>, AdminKeyError> {
        let Some((version, doc)) = self.store.read_doc(&self.journal_path).await? else {
            return Ok(None);
        };
        let j = serde_json::from_value(doc).map_err(|e| AdminKeyError::Journal {
            path: self.journal_path.clone(),
            message: e.to_string(),
        })?;
        Ok(Some((version, j)))
    }

    async fn save(&self, version: &mut u64, j: &mut AdminKeyJournal) -> Result<(), AdminKeyError> {
        self.fenced()?;
        j.updated_at = Utc::now();
        let doc = serde_json::to_value(&*j).map_err(|e| AdminKeyError::Journal {
            path: self.journal_path.clone(),
            message: e.to_string(),
        })?;
        *version = self
            .store
            .write_doc(&self.journal_path, &doc, *version)
            .await?;
        Ok(())
    }

    /// Resume an unfinished rotation, else rotate when the key is older than the max age.
    pub async fn run_once(&self) -> Result<Pass, AdminKeyError> {
        if let Some((version, j)) = self.load().await? {
            if j.status == AdminStatus::Running {
                return self.drive(version, j).await;
            }
        }
        let Some(max_age) = self.max_age else {
            return Ok(Pass::NotDue);
        };
        let Some(current) = self.store.read_key(&self.vault_path, FIELD).await? else {
            return Err(AdminKeyError::Refused(format!(
                "openai.admin_key_vault_path {}: no admin key there",
                self.vault_path
            )));
        };
        let created = current.meta.key_created_at;
        if let Some(m) = &self.metrics {
            m.key_created(created);
        }
        let age = created.map(|c| (Utc::now() - c).to_std().unwrap_or_default());
        // An admin key of unknown age (seeded by hand, no metadata) is rotated now.
        if age.is_some_and(|a| a < max_age) {
            return Ok(Pass::NotDue);
        }
        self.rotate_now().await
    }

    /// Start a rotation now (resuming an unfinished one instead).
    pub async fn rotate_now(&self) -> Result<Pass, AdminKeyError> {
        let mut version = 0;
        if let Some((v, j)) = self.load().await? {
            if j.status == AdminStatus::Running {
                return self.drive(v, j).await;
            }
            version = v;
        }
        let current = self
            .store
            .read_key(&self.vault_path, FIELD)
            .await?
            .ok_or_else(|| {
                AdminKeyError::Refused(format!(
                    "openai.admin_key_vault_path {}: no admin key there",
                    self.vault_path
                ))
            })?;
        let old_key_id = self.identify(&current.key, &current.meta).await?;
        let now = Utc::now();
        let rotation_id = crate::rotation::journal::new_rotation_id(now);
        let mut j = AdminKeyJournal {
            new_key_name: format!("{}-admin-{rotation_id}", self.name_prefix),
            rotation_id,
            status: AdminStatus::Running,
            phase: Phase::Started,
            old_key_id,
            old_vault_version: current.version,
            new_key_id: None,
            new_key_sha256: None,
            new_vault_version: None,
            started_at: now,
            updated_at: now,
            error: None,
        };
        self.save(&mut version, &mut j).await?;
        tracing::info!(rotation_id = %j.rotation_id, old_key_id = %j.old_key_id, "admin-key rotation started");
        self.drive(version, j).await
    }

    /// Which admin key `key` is: the id Vault's metadata names, else the one listed key
    /// whose redacted value fits it.
    async fn identify(&self, key: &Secret, meta: &KeyMeta) -> Result<String, AdminKeyError> {
        if let Some(a) = &meta.account {
            return Ok(a.key_id.clone());
        }
        let fits: Vec<AdminKey> = self
            .api
            .list_admin_keys()
            .await?
            .into_iter()
            .filter(|k| fits_redacted(key, k.redacted_value.as_deref()))
            .collect();
        match fits.as_slice() {
            [one] => Ok(one.id.clone()),
            _ => Err(AdminKeyError::Refused(format!(
                "cannot tell which admin key Vault serves at {} ({} listed keys fit its redacted value); set custom metadata key_id and service_account_id to its id",
                self.vault_path,
                fits.len()
            ))),
        }
    }

    /// Delete every key named `name` but `keep`: creates whose answer (and value) was lost.
    async fn delete_named(&self, name: &str, keep: Option<&str>) -> Result<usize, AdminKeyError> {
        let mut n = 0;
        self.fenced()?;
        for k in self.api.list_admin_keys().await? {
            if k.name.as_deref() == Some(name) && Some(k.id.as_str()) != keep {
                self.api.delete_admin_key(&k.id).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// End `j` as failed: the new key (never published) is deleted, the old one kept.
    async fn fail(
        &self,
        version: &mut u64,
        mut j: AdminKeyJournal,
        why: String,
    ) -> Result<Pass, AdminKeyError> {
        tracing::error!(rotation_id = %j.rotation_id, error = %why, "admin-key rotation failed; the old admin key stays");
        self.delete_named(&j.new_key_name, None).await?;
        if let Some(id) = &j.new_key_id {
            self.api.delete_admin_key(id).await?;
        }
        j.status = AdminStatus::Failed;
        j.error = Some(why.clone());
        self.save(version, &mut j).await?;
        if let Some(m) = &self.metrics {
            m.ended(AdminStatus::Failed);
        }
        Ok(Pass::Failed {
            rotation_id: j.rotation_id,
            error: why,
        })
    }

    /// Whether Vault serves the key of hash `sha` now (and its version).
    async fn vault_serves(&self, sha: &str) -> Result<Option<StoredAdmin>, AdminKeyError> {
        Ok(self
            .store
            .read_key(&self.vault_path, FIELD)
            .await?
            .filter(|k| k.key.sha256_hex() == sha)
            .map(|k| StoredAdmin {
                version: k.version,
                key: k.key,
            }))
    }

    /// Carry `j` from its phase to the end.
    async fn drive(&self, mut version: u64, mut j: AdminKeyJournal) -> Result<Pass, AdminKeyError> {
        // The new key's value: only this process's create answer or Vault has it.
        let mut new_key: Option<Secret> = None;
        if matches!(j.phase, Phase::Started) {
            // A create may have happened before a crash: its value is lost, remove it.
            let stale = self.delete_named(&j.new_key_name, None).await?;
            if stale > 0 {
                tracing::warn!(rotation_id = %j.rotation_id, stale, "deleted admin keys of an interrupted create");
            }
            let expiry = self.expiry.map(|e| e.as_secs().max(1));
            self.fenced()?;
            let created = match self.api.create_admin_key(&j.new_key_name, expiry).await {
                Ok(c) => c,
                Err(e) => return self.fail(&mut version, j, format!("create: {e}")).await,
            };
            // Any straggler of the same name (a duplicate create) goes too.
            self.delete_named(&j.new_key_name, Some(&created.id))
                .await?;
            j.new_key_id = Some(created.id.clone());
            j.new_key_sha256 = Some(created.key.sha256_hex());
            j.phase = Phase::Created;
            new_key = Some(created.key);
            self.save(&mut version, &mut j).await?;
        }
        let sha = j.new_key_sha256.clone().unwrap_or_default();
        if matches!(j.phase, Phase::Created | Phase::Verified) && new_key.is_none() {
            // Resumed before the publish was journaled: Vault has the key, or nobody does.
            match self.vault_serves(&sha).await? {
                Some(s) => {
                    new_key = Some(s.key);
                    j.new_vault_version = Some(s.version);
                    j.phase = Phase::Published;
                    self.save(&mut version, &mut j).await?;
                }
                None => {
                    return self
                        .fail(
                            &mut version,
                            j,
                            "interrupted before the new admin key was published; it was deleted"
                                .into(),
                        )
                        .await
                }
            }
        }
        if j.phase == Phase::Created {
            let key = new_key.clone().expect("held since the create");
            if let Err(e) = self.api.verify_admin_key(&key).await {
                return self.fail(&mut version, j, format!("verify: {e}")).await;
            }
            j.phase = Phase::Verified;
            self.save(&mut version, &mut j).await?;
        }
        if j.phase == Phase::Verified {
            let key = new_key.clone().expect("held since the create");
            let meta = KeyMeta {
                account: j.new_key_id.clone().map(|id| AccountRef {
                    id: id.clone(),
                    key_id: id,
                }),
                rotation_id: Some(j.rotation_id.clone()),
                key_created_at: Some(Utc::now()),
            };
            self.fenced()?;
            match self
                .store
                .write_key(&self.vault_path, FIELD, &key, &meta, j.old_vault_version)
                .await
            {
                Ok(v) => j.new_vault_version = Some(v),
                // Ambiguous or someone else's write: read Vault before deciding.
                Err(e) => match self.vault_serves(&sha).await {
                    Ok(Some(s)) => j.new_vault_version = Some(s.version),
                    Ok(None) => return self.fail(&mut version, j, format!("publish: {e}")).await,
                    Err(read) => return Err(read),
                },
            }
            j.phase = Phase::Published;
            self.save(&mut version, &mut j).await?;
        }
        if matches!(j.phase, Phase::Published | Phase::Switched) {
            let stored = self.vault_serves(&sha).await?.ok_or_else(|| {
                AdminKeyError::Refused(format!(
                    "rotation {}: Vault no longer serves the published admin key at {}; stopping (the old key is kept)",
                    j.rotation_id, self.vault_path
                ))
            })?;
            self.api.switch_admin_key(stored.key)?;
            if j.phase == Phase::Published {
                j.phase = Phase::Switched;
                self.save(&mut version, &mut j).await?;
            }
            // Never the key Vault serves: the new one, just checked.
            self.fenced()?;
            if Some(&j.old_key_id) != j.new_key_id.as_ref() {
                self.api.delete_admin_key(&j.old_key_id).await?;
            }
            j.phase = Phase::Done;
            j.status = AdminStatus::Completed;
            self.save(&mut version, &mut j).await?;
            tracing::info!(rotation_id = %j.rotation_id, new_key_id = ?j.new_key_id, old_key_id = %j.old_key_id, "admin-key rotation completed");
            if let Some(m) = &self.metrics {
                m.ended(AdminStatus::Completed);
                m.key_created(Some(Utc::now()));
            }
        }
        Ok(Pass::Completed {
            rotation_id: j.rotation_id,
        })
    }

    /// Every `interval` until `shutdown` (the leader only: `is_leader`), run a pass; a
    /// failed pass is logged and tried again at the next tick.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        is_leader: impl Fn() -> bool + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        loop {
            if is_leader() {
                match self.run_once().await {
                    Ok(Pass::NotDue) => {}
                    Ok(p) => tracing::info!(pass = ?p, "admin-key rotation pass"),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin-key rotation pass failed; retrying at the next check")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

struct StoredAdmin {
    version: u64,
    key: Secret,
}

/// The rotator `openai.admin_key_vault_path` and `admin_key_max_age` ask for (None when
/// the admin key is not kept in Vault or never ages out).
pub fn from_config(
    c: &crate::config::Config,
    services: &crate::app::Services,
) -> anyhow::Result<Option<Arc<AdminKeyRotator>>> {
    // Registered either way: the alert rules name these series.
    let metrics = AdminKeyMetrics::register(services.metrics.registry())
        .map_err(|e| anyhow::anyhow!("registering the admin-key metrics: {e}"))?;
    let o = &c.openai;
    let (Some(path), Some(max_age)) = (o.admin_key_vault_path.as_deref(), o.admin_key_max_age)
    else {
        return Ok(None);
    };
    Ok(Some(Arc::new(AdminKeyRotator {
        api: services.issuer.clone(),
        store: services.store.clone(),
        vault_path: path.trim_matches('/').to_string(),
        journal_path: format!("{}/admin-key", c.daemon.state_prefix.trim_matches('/')),
        name_prefix: c.daemon.account_prefix.clone(),
        max_age: Some(max_age.get()),
        expiry: o.admin_key_expiry.map(|e| e.get()),
        metrics: Some(metrics),
        may_write: None,
    })))
}

#[cfg(test)]
mod fits_tests {
    use super::*;

    #[test]
    fn a_redacted_value_fits_only_its_own_key() {
        let key = Secret::new("sk-admin-abcdefghijklmnop-WXYZ".to_string());
        assert!(fits_redacted(&key, Some("sk-admin****WXYZ")));
        // Negative controls: another tail, another head, too short, none.
        assert!(!fits_redacted(&key, Some("sk-admin****WXYQ")));
        assert!(!fits_redacted(&key, Some("sk-adm1n****WXYZ")));
        assert!(!fits_redacted(&key, Some("sk-adminXYZ")));
        assert!(!fits_redacted(&key, None));
    }
}
