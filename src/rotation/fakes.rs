//! In-memory implementations of the ports, with fault switches and a shared log of what
//! happened in which order, so unit tests can assert the invariants fast. Built only for
//! tests (`cfg(test)` or the `test-support` feature), never into the shipped binary.
// Test support: a poisoned fake is a failed test, so unwrapping is the right report.
#![allow(clippy::unwrap_used)]

use super::ports::*;
use crate::config::WorkloadRef;
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Ordered record of backend-visible actions, shared by the fakes.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// Index of the first entry starting with `prefix`.
    pub fn position(&self, prefix: &str) -> Option<usize> {
        self.entries().iter().position(|e| e.starts_with(prefix))
    }
}

#[derive(Clone, Debug)]
pub struct FakeAccount {
    pub id: String,
    pub name: String,
    pub project: String,
    pub key_id: String,
    pub key: Secret,
    pub created_at: DateTime<Utc>,
}

#[derive(Default)]
pub struct IssuerState {
    pub accounts: BTreeMap<String, FakeAccount>,
    pub next: u64,
    /// Fail the next N creates without creating anything.
    pub fail_creates: u32,
    /// The next create happens but its answer is lost (error returned).
    pub lose_next_create_response: bool,
    /// Fail the next N deletes.
    pub fail_deletes: u32,
    /// `check_key` fails for every key minted by `create_service_account` (seeded keys,
    /// such as a target's initial one, still answer).
    pub reject_minted_keys: bool,
    /// Ids of the accounts created by `create_service_account` (not seeded).
    pub minted: BTreeSet<String>,
    /// Runs once, right after the next create (e.g. a concurrent Vault writer).
    pub on_create: Option<Box<dyn FnOnce() + Send>>,
    /// Requests per key id with their times (drain tests).
    pub usage: BTreeMap<String, Vec<DateTime<Utc>>>,
    /// Accounts deleted so far (invariant checks look up their keys).
    pub deleted: BTreeMap<String, FakeAccount>,
    /// Time for `created_at` (None: the system clock).
    pub clock: Option<Arc<dyn Clock>>,
}

#[derive(Clone)]
pub struct FakeIssuer {
    pub state: Arc<Mutex<IssuerState>>,
    log: Log,
}

impl FakeIssuer {
    pub fn new(log: Log) -> Self {
        FakeIssuer {
            state: Arc::default(),
            log,
        }
    }

    /// Create an account directly (seeding), returning it.
    pub fn seed(&self, project: &str, name: &str) -> FakeAccount {
        let mut s = self.state.lock().unwrap();
        s.next += 1;
        let n = s.next;
        let a = FakeAccount {
            id: format!("svc_acct_{n}"),
            name: name.into(),
            project: project.into(),
            key_id: format!("key_{n}"),
            key: Secret::new(format!("sk-svcacct-fake-{n}-{}", uuid::Uuid::new_v4())),
            created_at: s.clock.as_ref().map_or_else(Utc::now, |c| c.now()),
        };
        s.accounts.insert(a.id.clone(), a.clone());
        a
    }

    pub fn is_live(&self, key: &Secret) -> bool {
        self.state
            .lock()
            .unwrap()
            .accounts
            .values()
            .any(|a| &a.key == key)
    }

    pub fn account_ids(&self) -> BTreeSet<String> {
        self.state
            .lock()
            .unwrap()
            .accounts
            .keys()
            .cloned()
            .collect()
    }

    /// The key of a deleted account.
    pub fn deleted_key(&self, id: &str) -> Option<Secret> {
        self.state
            .lock()
            .unwrap()
            .deleted
            .get(id)
            .map(|a| a.key.clone())
    }

    pub fn record_use(&self, key_id: &str, at: DateTime<Utc>) {
        self.state
            .lock()
            .unwrap()
            .usage
            .entry(key_id.into())
            .or_default()
            .push(at);
    }
}

fn openai_err(message: &str) -> BackendError {
    BackendError::Failed {
        backend: Backend::OpenAi,
        message: message.into(),
        transient: true,
    }
}

#[async_trait]
impl KeyIssuer for FakeIssuer {
    async fn create_service_account(
        &self,
        project: &str,
        name: &str,
    ) -> Result<MintedKey, BackendError> {
        {
            let mut s = self.state.lock().unwrap();
            if s.fail_creates > 0 {
                s.fail_creates -= 1;
                return Err(openai_err("create failed (injected)"));
            }
        }
        let a = self.seed(project, name);
        self.state.lock().unwrap().minted.insert(a.id.clone());
        self.log.push(format!("create {} {}", a.id, a.name));
        let hook = self.state.lock().unwrap().on_create.take();
        if let Some(hook) = hook {
            hook();
        }
        let mut s = self.state.lock().unwrap();
        if s.lose_next_create_response {
            s.lose_next_create_response = false;
            return Err(openai_err("create response lost (injected)"));
        }
        Ok(MintedKey {
            account: AccountRef {
                id: a.id,
                key_id: a.key_id,
            },
            name: a.name,
            key: a.key,
            created_at: a.created_at,
        })
    }

    async fn list_service_accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .accounts
            .values()
            .filter(|a| a.project == project)
            .map(|a| AccountInfo {
                id: a.id.clone(),
                name: a.name.clone(),
                created_at: a.created_at,
            })
            .collect())
    }

    async fn delete_service_account(&self, _project: &str, id: &str) -> Result<(), BackendError> {
        let mut s = self.state.lock().unwrap();
        if s.fail_deletes > 0 {
            s.fail_deletes -= 1;
            return Err(openai_err("delete failed (injected)"));
        }
        if let Some(a) = s.accounts.remove(id) {
            self.log.push(format!("delete {id}"));
            s.deleted.insert(a.id.clone(), a);
        }
        Ok(())
    }

    async fn check_key(&self, key: &Secret) -> Result<(), BackendError> {
        let ok = {
            let s = self.state.lock().unwrap();
            let account = s.accounts.values().find(|a| &a.key == key);
            account.is_some_and(|a| !(s.reject_minted_keys && s.minted.contains(&a.id)))
        };
        if ok {
            Ok(())
        } else {
            Err(BackendError::Failed {
                backend: Backend::OpenAi,
                message: "HTTP 401 invalid_api_key".into(),
                transient: false,
            })
        }
    }

    async fn key_usage(
        &self,
        _project: &str,
        key_id: &str,
        since: DateTime<Utc>,
    ) -> Result<KeyUsage, BackendError> {
        let s = self.state.lock().unwrap();
        let uses = s.usage.get(key_id).cloned().unwrap_or_default();
        Ok(KeyUsage {
            last_used_at: uses.iter().max().copied(),
            requests_since: uses.iter().filter(|t| **t >= since).count() as u64,
        })
    }
}

#[derive(Default)]
pub struct StoreState {
    /// path → versions (data maps); version n is index n-1.
    pub versions: BTreeMap<String, Vec<serde_json::Map<String, serde_json::Value>>>,
    pub meta: BTreeMap<String, KeyMeta>,
    /// When each version of each path was written (Vault's `created_time`).
    pub created: BTreeMap<String, Vec<DateTime<Utc>>>,
    /// Time for `created` (None: the system clock).
    pub clock: Option<Arc<dyn Clock>>,
    /// `read_key_meta` calls so far (the scheduler's polling).
    pub meta_reads: u64,
    /// Fail the next N `write_key` calls with a transient error (nothing written).
    pub fail_key_writes: u32,
    /// The next N `write_key` calls write the data but not the metadata (Vault's two
    /// writes, the second one failing), and report a transient error.
    pub fail_meta_writes: u32,
    /// Fail every operation (Vault down).
    pub down: bool,
}

#[derive(Clone)]
pub struct FakeStore {
    pub state: Arc<Mutex<StoreState>>,
    log: Log,
}

fn vault_down() -> BackendError {
    BackendError::Failed {
        backend: Backend::Vault,
        message: "connection refused (injected)".into(),
        transient: true,
    }
}

impl FakeStore {
    pub fn new(log: Log) -> Self {
        FakeStore {
            state: Arc::default(),
            log,
        }
    }

    /// Write as another client would (no CAS), e.g. seeding or a concurrent writer.
    pub fn put(&self, path: &str, field: &str, value: &str, meta: KeyMeta) -> u64 {
        let mut s = self.state.lock().unwrap();
        let mut data = serde_json::Map::new();
        data.insert(field.into(), value.into());
        let v = s.versions.entry(path.into()).or_default();
        v.push(data);
        let n = v.len() as u64;
        s.meta.insert(path.into(), meta);
        let now = s.clock.as_ref().map_or_else(Utc::now, |c| c.now());
        s.created.entry(path.into()).or_default().push(now);
        n
    }

    /// Pretend the current version of `path` was written at `at`.
    pub fn set_created(&self, path: &str, at: DateTime<Utc>) {
        let mut s = self.state.lock().unwrap();
        if let Some(last) = s.created.get_mut(path).and_then(|v| v.last_mut()) {
            *last = at;
        }
    }

    pub fn current(&self, path: &str, field: &str) -> Option<(u64, Secret)> {
        let s = self.state.lock().unwrap();
        let v = s.versions.get(path)?;
        let data = v.last()?;
        Some((
            v.len() as u64,
            Secret::new(data.get(field)?.as_str()?.to_string()),
        ))
    }

    /// Paths whose current data holds `key` in some field.
    pub fn paths_serving(&self, key: &Secret) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.versions
            .iter()
            .filter(|(_, v)| {
                v.last()
                    .is_some_and(|d| d.values().any(|x| x.as_str() == Some(key.expose())))
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every document and key data as text (for leak scans).
    pub fn dump(&self) -> String {
        let s = self.state.lock().unwrap();
        format!("{:?}", s.versions)
    }
}

#[async_trait]
impl SecretStore for FakeStore {
    async fn read_key(&self, path: &str, field: &str) -> Result<Option<StoredKey>, BackendError> {
        let s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        let Some(v) = s.versions.get(path) else {
            return Ok(None);
        };
        let Some(key) = v.last().and_then(|d| d.get(field)).and_then(|x| x.as_str()) else {
            return Ok(None);
        };
        Ok(Some(StoredKey {
            version: v.len() as u64,
            key: Secret::new(key),
            meta: s.meta.get(path).cloned().unwrap_or_default(),
        }))
    }

    async fn read_key_meta(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<KeyInfo>, BackendError> {
        self.state.lock().unwrap().meta_reads += 1;
        let Some(k) = self.read_key(path, field).await? else {
            return Ok(None);
        };
        let s = self.state.lock().unwrap();
        Ok(Some(KeyInfo {
            meta: k.meta,
            version: k.version,
            version_created_at: s.created.get(path).and_then(|v| v.last().copied()),
        }))
    }

    async fn read_key_version(
        &self,
        path: &str,
        field: &str,
        version: u64,
    ) -> Result<Secret, BackendError> {
        let s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        s.versions
            .get(path)
            .and_then(|v| v.get((version as usize).wrapping_sub(1)))
            .and_then(|d| d.get(field))
            .and_then(|x| x.as_str())
            .map(Secret::new)
            .ok_or(BackendError::NotFound {
                backend: Backend::Vault,
                what: format!("{path} version {version}"),
            })
    }

    async fn write_key(
        &self,
        path: &str,
        field: &str,
        key: &Secret,
        meta: &KeyMeta,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let mut s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        if s.fail_key_writes > 0 {
            s.fail_key_writes -= 1;
            return Err(vault_down());
        }
        let current = s.versions.get(path).map_or(0, |v| v.len() as u64);
        if current != expected_version {
            return Err(BackendError::Conflict {
                backend: Backend::Vault,
                what: path.into(),
                message: "check-and-set parameter did not match the current version".into(),
            });
        }
        let versions = s.versions.entry(path.into()).or_default();
        let mut data = versions.last().cloned().unwrap_or_default();
        data.insert(field.into(), key.expose().into());
        versions.push(data);
        let n = versions.len() as u64;
        let now = s.clock.as_ref().map_or_else(Utc::now, |c| c.now());
        s.created.entry(path.into()).or_default().push(now);
        if s.fail_meta_writes > 0 {
            s.fail_meta_writes -= 1;
            self.log
                .push(format!("publish {path} v{n} (metadata write failed)"));
            return Err(BackendError::Failed {
                backend: Backend::Vault,
                message: "metadata write failed (injected)".into(),
                transient: true,
            });
        }
        s.meta.insert(path.into(), meta.clone());
        self.log.push(format!(
            "publish {path} v{n} {}",
            meta.account.as_ref().map_or("-", |a| a.id.as_str())
        ));
        Ok(n)
    }

    async fn write_key_meta(&self, path: &str, meta: &KeyMeta) -> Result<(), BackendError> {
        let mut s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        s.meta.insert(path.into(), meta.clone());
        self.log.push(format!(
            "metadata {path} {}",
            meta.account.as_ref().map_or("-", |a| a.id.as_str())
        ));
        Ok(())
    }

    async fn read_doc(&self, path: &str) -> Result<Option<(u64, serde_json::Value)>, BackendError> {
        let s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        Ok(s.versions.get(path).and_then(|v| {
            v.last().map(|d| {
                (
                    v.len() as u64,
                    d.get("doc").cloned().unwrap_or(serde_json::Value::Null),
                )
            })
        }))
    }

    async fn write_doc(
        &self,
        path: &str,
        doc: &serde_json::Value,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let mut s = self.state.lock().unwrap();
        if s.down {
            return Err(vault_down());
        }
        let current = s.versions.get(path).map_or(0, |v| v.len() as u64);
        if current != expected_version {
            return Err(BackendError::Conflict {
                backend: Backend::Vault,
                what: path.into(),
                message: "check-and-set parameter did not match the current version".into(),
            });
        }
        let mut data = serde_json::Map::new();
        data.insert("doc".into(), doc.clone());
        let v = s.versions.entry(path.into()).or_default();
        v.push(data);
        Ok(v.len() as u64)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let s = self.state.lock().unwrap();
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        let mut out = BTreeSet::new();
        for p in s.versions.keys() {
            if let Some(rest) = p.strip_prefix(&prefix) {
                match rest.split_once('/') {
                    Some((dir, _)) => out.insert(format!("{dir}/")),
                    None => out.insert(rest.to_string()),
                };
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// How a fake workload reacts to a roll.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Completes after `polls_to_complete` state queries.
    #[default]
    Healthy,
    /// Never completes (pods never ready); reports Progressing forever.
    NeverReady,
    /// Reports ProgressDeadlineExceeded.
    DeadlineExceeded,
    /// The patch itself is refused.
    RejectPatch,
}

#[derive(Default, Clone, Debug)]
pub struct FakeWorkload {
    pub annotation: Option<String>,
    pub behaviour: Behaviour,
    /// State queries left before the current rollout completes.
    pub polls_left: u32,
    pub rolls: u32,
    /// The current rollout was seen complete.
    pub complete: bool,
}

#[derive(Default)]
pub struct RollerState {
    pub workloads: BTreeMap<String, FakeWorkload>,
    pub polls_to_complete: u32,
    /// Secrets: "ns/name/key" → sha256 hex.
    pub secrets: BTreeMap<String, String>,
    pub nudges: Vec<String>,
    pub events: Vec<(String, String)>,
    /// Each roll that changed a template: workload, rollout id, and the Secrets' hashes at
    /// that moment (what restarting pods would mount).
    pub rolls: Vec<(String, String, BTreeMap<String, String>)>,
    /// Rolls that replaced a rollout still in progress (two rotations on one workload).
    pub overlaps: Vec<String>,
    /// Workloads (`ns/Kind/name`) that report themselves paused.
    pub paused: BTreeSet<String>,
    /// What `consumers_of` reports (for every path: tests set what the cluster would show).
    pub consumers: Vec<Consumer>,
}

#[derive(Clone)]
pub struct FakeRoller {
    pub state: Arc<Mutex<RollerState>>,
    log: Log,
}

impl FakeRoller {
    pub fn new(log: Log) -> Self {
        FakeRoller {
            state: Arc::new(Mutex::new(RollerState {
                polls_to_complete: 2,
                ..Default::default()
            })),
            log,
        }
    }

    pub fn set_behaviour(&self, w: &WorkloadRef, b: Behaviour) {
        self.state
            .lock()
            .unwrap()
            .workloads
            .entry(w.to_string())
            .or_default()
            .behaviour = b;
    }

    /// Make the workload report itself paused (`spec.paused` / Argo pause conditions).
    pub fn set_paused(&self, w: &WorkloadRef, paused: bool) {
        let mut s = self.state.lock().unwrap();
        if paused {
            s.paused.insert(w.to_string());
        } else {
            s.paused.remove(&w.to_string());
        }
    }

    pub fn workload(&self, w: &WorkloadRef) -> FakeWorkload {
        self.state
            .lock()
            .unwrap()
            .workloads
            .get(&w.to_string())
            .cloned()
            .unwrap_or_default()
    }

    /// Whether any Secret holds the key with this hash.
    pub fn secret_holds(&self, sha: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .secrets
            .values()
            .any(|h| h == sha)
    }

    pub fn set_secret_hash(&self, ns: &str, name: &str, key: &str, sha: &str) {
        self.state
            .lock()
            .unwrap()
            .secrets
            .insert(format!("{ns}/{name}/{key}"), sha.into());
    }
}

#[async_trait]
impl WorkloadRoller for FakeRoller {
    async fn roll(&self, workload: &WorkloadRef, rollout_id: &str) -> Result<(), BackendError> {
        let mut s = self.state.lock().unwrap();
        let polls = s.polls_to_complete;
        let w = s.workloads.entry(workload.to_string()).or_default();
        if w.behaviour == Behaviour::RejectPatch {
            return Err(BackendError::Failed {
                backend: Backend::Kubernetes,
                message: "patch refused (injected)".into(),
                transient: false,
            });
        }
        if w.annotation.as_deref() != Some(rollout_id) {
            let overlap = w
                .annotation
                .as_ref()
                .filter(|prev| !w.complete && !rollout_id.starts_with(prev.as_str()))
                .map(|prev| {
                    format!("{workload}: {rollout_id} rolled while {prev} was in progress")
                });
            w.annotation = Some(rollout_id.into());
            w.polls_left = polls;
            w.rolls += 1;
            w.complete = false;
            if let Some(o) = overlap {
                s.overlaps.push(o);
            }
            self.log.push(format!("roll {workload} {rollout_id}"));
            let secrets = s.secrets.clone();
            s.rolls
                .push((workload.to_string(), rollout_id.to_string(), secrets));
        }
        Ok(())
    }

    async fn rollout_state(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<RolloutState, BackendError> {
        let mut s = self.state.lock().unwrap();
        let w = s.workloads.entry(workload.to_string()).or_default();
        if w.annotation.as_deref() != Some(rollout_id) {
            return Ok(RolloutState::Progressing(
                "pod template does not carry the rotation id".into(),
            ));
        }
        match w.behaviour {
            Behaviour::NeverReady => Ok(RolloutState::Progressing(
                "0 of 2 updated replicas are available".into(),
            )),
            Behaviour::DeadlineExceeded => Ok(RolloutState::Failed(
                "deployment exceeded its progress deadline".into(),
            )),
            _ if w.polls_left > 0 => {
                w.polls_left -= 1;
                Ok(RolloutState::Progressing(
                    "1 old replicas are pending termination".into(),
                ))
            }
            _ => {
                w.complete = true;
                self.log.push(format!("complete {workload} {rollout_id}"));
                Ok(RolloutState::Complete)
            }
        }
    }

    async fn consumers_of(
        &self,
        _mount: &str,
        _path: &str,
        _field: &str,
    ) -> Result<Vec<Consumer>, BackendError> {
        Ok(self.state.lock().unwrap().consumers.clone())
    }

    async fn paused(&self, workload: &WorkloadRef) -> Result<bool, BackendError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .paused
            .contains(&workload.to_string()))
    }

    async fn ready_pods_with(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<u32, BackendError> {
        let s = self.state.lock().unwrap();
        let Some(w) = s.workloads.get(&workload.to_string()) else {
            return Ok(0);
        };
        // A never-ready rollout has no ready pods on the new template; a healthy one has
        // them once its rollout completed.
        let on_it = w.annotation.as_deref() == Some(rollout_id);
        let ready = on_it && w.behaviour == Behaviour::Healthy && w.polls_left == 0;
        Ok(if ready { 2 } else { 0 })
    }

    async fn secret_sha256(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .secrets
            .get(&format!("{namespace}/{name}/{key}"))
            .cloned())
    }

    async fn nudge_secret(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: &str,
    ) -> Result<(), BackendError> {
        self.state
            .lock()
            .unwrap()
            .nudges
            .push(format!("{namespace}/{name} {annotation}={value}"));
        Ok(())
    }

    async fn event(
        &self,
        workload: &WorkloadRef,
        _type: EventType,
        reason: &str,
        _note: &str,
    ) -> Result<(), BackendError> {
        self.state
            .lock()
            .unwrap()
            .events
            .push((workload.to_string(), reason.into()));
        Ok(())
    }
}

/// The three fakes sharing one log, with seeded targets: a fixture for engine, daemon and
/// API tests.
#[derive(Clone)]
pub struct FakeWorld {
    pub log: Log,
    pub issuer: FakeIssuer,
    pub store: FakeStore,
    pub roller: FakeRoller,
    pub prober: FakeProber,
}

impl Default for FakeWorld {
    fn default() -> Self {
        let log = Log::default();
        FakeWorld {
            issuer: FakeIssuer::new(log.clone()),
            store: FakeStore::new(log.clone()),
            roller: FakeRoller::new(log.clone()),
            prober: FakeProber::default(),
            log,
        }
    }
}

impl FakeWorld {
    /// A target `name` in project `proj_test` with a live seeded key at `apps/<name>/openai`
    /// created at `key_created_at`, two workloads, and short timings.
    pub fn seed_target(
        &self,
        name: &str,
        key_created_at: DateTime<Utc>,
    ) -> (crate::config::Target, FakeAccount) {
        use crate::config::DurationStr;
        use std::time::Duration;
        let old = self.issuer.seed("proj_test", &format!("{name}-initial"));
        let path = format!("apps/{name}/openai");
        self.store.put(
            &path,
            "api_key",
            old.key.expose(),
            KeyMeta {
                account: Some(AccountRef {
                    id: old.id.clone(),
                    key_id: old.key_id.clone(),
                }),
                rotation_id: Some("seed".into()),
                key_created_at: Some(key_created_at),
            },
        );
        let target = crate::config::Target {
            name: name.into(),
            project_id: "proj_test".into(),
            vault_path: path,
            vault_field: "api_key".into(),
            workloads: vec![
                format!("demo/Deployment/{name}-api").parse().unwrap(),
                format!("demo/Deployment/{name}-worker").parse().unwrap(),
            ],
            waves: vec![],
            synced_secret: None,
            schedule: None,
            max_key_age: None,
            jitter: DurationStr::default(),
            grace_period: DurationStr(Duration::from_millis(5)),
            drain: None,
            adoption: None,
            unlisted_consumers: Default::default(),
            smoke_probes: vec![],
            rollout_timeout: DurationStr(Duration::from_secs(2)),
            key_expiry: None,
            anomaly: None,
        };
        (target, old)
    }

    /// Stamp new accounts and Vault versions with `clock`'s time.
    pub fn set_clock(&self, clock: Arc<dyn Clock>) {
        self.issuer.state.lock().unwrap().clock = Some(clock.clone());
        self.store.state.lock().unwrap().clock = Some(clock);
    }

    /// The fakes as the engine's ports (system clock).
    pub fn ports(&self) -> super::Ports {
        super::Ports::new(
            Arc::new(self.issuer.clone()),
            Arc::new(self.store.clone()),
            Arc::new(self.roller.clone()),
            Arc::new(self.prober.clone()),
        )
    }

    /// The fakes behind the fault-injecting wrapper: one simulated process.
    pub fn faulty_ports(
        &self,
        plan: Arc<dyn super::faults::FaultPlan>,
        crash: super::faults::Crash,
    ) -> super::Ports {
        use super::faults::Faulty;
        super::Ports {
            issuer: Arc::new(Faulty::new(
                Arc::new(self.issuer.clone()),
                plan.clone(),
                crash.clone(),
            )),
            store: Arc::new(Faulty::new(
                Arc::new(self.store.clone()),
                plan.clone(),
                crash.clone(),
            )),
            roller: Arc::new(Faulty::new(Arc::new(self.roller.clone()), plan, crash)),
            prober: Arc::new(self.prober.clone()),
            clock: Arc::new(SystemClock),
        }
    }

    pub fn engine(&self, opts: super::EngineOptions) -> super::Engine {
        super::Engine::new(self.ports(), opts)
    }
}

/// Smoke probes answered from a table: url → the statuses to answer in turn (the last one
/// repeats); unknown URLs fail to connect.
#[derive(Clone, Default)]
pub struct FakeProber {
    pub answers: Arc<Mutex<BTreeMap<String, Vec<u16>>>>,
}

impl FakeProber {
    pub fn answer(&self, url: &str, statuses: &[u16]) {
        self.answers
            .lock()
            .unwrap()
            .insert(url.to_string(), statuses.to_vec());
    }
}

#[async_trait]
impl SmokeProber for FakeProber {
    async fn get_status(
        &self,
        url: &str,
        _timeout: std::time::Duration,
    ) -> Result<u16, ProbeError> {
        let mut answers = self.answers.lock().unwrap();
        let Some(list) = answers.get_mut(url) else {
            return Err(ProbeError::Connect);
        };
        match list.len() {
            0 => Err(ProbeError::Connect),
            1 => Ok(list[0]),
            _ => Ok(list.remove(0)),
        }
    }
}

/// Wall time that moves with tokio's clock (paused in simulations): deterministic.
pub struct TokioClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(base: DateTime<Utc>) -> TokioClock {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        self.base
            + chrono::Duration::from_std(self.start.elapsed()).unwrap_or(chrono::Duration::zero())
    }
}
