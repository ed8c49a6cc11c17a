//! The rotation state machine's forward path: mint → publish → sync → roll → verify → drain
//! → retire, journaled before and after every step. Resume and rollback (`recovery.rs`,
//! `rollback.rs`), the sweep, smoke probes and the dry-run plan live beside it.
//!
//! The rule everything here serves: the key Vault serves is always live (I1), and the old
//! account dies only after the new key is verified in every workload (I2). Where the engine
//! cannot tell what happened (a backend unreachable mid-step), it stops and leaves the journal
//! as it is; `resume` sorts it out later rather than guessing.

use super::deletion::{Deletion, Doomed, Why};
use super::journal::{Journal, PendingDeletion, PendingReason, Status, Step, StepState, Stored};
use super::ports::{
    AccountRef, BackendError, Clock, EventType, Fence, KeyIssuer, KeyMeta, NoFence, RolloutState,
    SecretStore, SmokeProber, StoredKey, SystemClock, WorkloadRoller,
};
use super::request::RotationRequest;
use crate::config::{DrainTimeout, Target, WorkloadRef};
use crate::retry::{Retry, RetryPolicy};
use crate::secret::Secret;
use crate::sync::LockExt;
use crate::sync::RwLockExt;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// Live control of a running rotation: an emergency request for a target mid-rotation
/// upgrades it instead of starting another.
#[derive(Debug, Default)]
pub struct RotationControl {
    emergency: AtomicBool,
    revoke_first: AtomicBool,
    stop: AtomicBool,
}

impl RotationControl {
    /// Ask the rotation to stop at the next step boundary (shutdown), leaving its journal
    /// for `resume`.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    pub fn upgrade_to_emergency(&self, revoke_first: bool) {
        self.emergency.store(true, Ordering::SeqCst);
        if revoke_first {
            self.revoke_first.store(true, Ordering::SeqCst);
        }
    }
    pub fn is_emergency(&self) -> bool {
        self.emergency.load(Ordering::SeqCst)
    }
    pub(super) fn revoke_first(&self) -> bool {
        self.revoke_first.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub account_prefix: String,
    pub state_prefix: String,
    /// How often rollouts, synced Secrets and usage are polled.
    pub poll_interval: Duration,
    /// How often the drain asks the Usage API.
    pub drain_poll_interval: Duration,
    /// Retries of an account deletion before it is left pending (and retried later).
    pub delete_retry: RetryPolicy,
    /// Retries of the new key's `GET /v1/models` (a new key can take a moment to work).
    pub key_check_retry: RetryPolicy,
    /// How long a rotation at its roll step waits for others that need the same workloads
    /// (zero: never; each rolls on its own).
    pub coalesce_window: Duration,
    /// Workloads rolling at once across all rotations (None: no bound).
    pub max_concurrent_rollouts: Option<usize>,
    /// Vault KV v2 mount of the targets' paths (what Vault Agent annotations and
    /// VSO/ESO objects name).
    pub kv_mount: String,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            account_prefix: "okr".into(),
            state_prefix: "openai-key-rotator/state".into(),
            poll_interval: Duration::from_secs(1),
            drain_poll_interval: Duration::from_secs(30),
            delete_retry: RetryPolicy {
                max_retries: 4,
                base: Duration::from_secs(2),
                max_backoff: Duration::from_secs(60),
                ..RetryPolicy::default()
            },
            key_check_retry: RetryPolicy {
                max_retries: 2,
                base: Duration::from_secs(1),
                max_backoff: Duration::from_secs(4),
                ..RetryPolicy::default()
            },
            coalesce_window: Duration::ZERO,
            max_concurrent_rollouts: None,
            kv_mount: "secret".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("target {target}: rotation {rotation_id} is already in progress")]
    Busy { target: String, rotation_id: String },
    #[error("target {target}: the journal was changed by someone else (another replica?)")]
    JournalConflict { target: String },
    #[error("target {target}: journal unreadable: {message}")]
    BadJournal { target: String, message: String },
    /// A backend failed where the engine cannot tell the state; the journal is left for
    /// `resume`.
    #[error("rotation {rotation_id} interrupted at {step}: {source}")]
    Interrupted {
        rotation_id: String,
        step: Step,
        source: BackendError,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Stopped at a step boundary on request (shutdown); the journal resumes the rest.
    #[error("rotation {rotation_id} stopped before {step} (shutdown); it resumes on restart")]
    Stopped { rotation_id: String, step: Step },
    /// This replica may no longer write (it lost or released the leader Lease); the new
    /// leader resumes from the journal.
    #[error("rotation {rotation_id} stopped at {step}: {why}")]
    Fenced {
        rotation_id: String,
        step: Step,
        why: String,
    },
    /// A target's workload is paused (a paused Deployment, or an Argo Rollout paused by hand
    /// or by its controller): its rollout would never complete, so the rotation is refused
    /// before anything is minted (it ends `failed` with this as its error).
    #[error("target {target}: workload {workload} is paused (its rollout would never complete); resume it, then rotate again")]
    WorkloadPaused {
        target: String,
        workload: WorkloadRef,
    },
    /// A journal to resume names a target that is neither configured nor recorded in it.
    #[error("rotation {rotation_id} of target {target}: the target is no longer configured and the journal predates target snapshots; left alone")]
    NoTarget { rotation_id: String, target: String },
}

/// What observers (metrics, audit, progress streams, Events) hear.
#[derive(Debug, Clone)]
pub enum RotationEvent {
    Started,
    StepStarted(Step),
    StepFinished {
        step: Step,
        outcome: String,
        duration: Duration,
    },
    /// The rotation reached a terminal status.
    Finished,
    /// An account was deleted (retire, rollback cleanup, pending retry or sweep).
    AccountDeleted {
        account_id: String,
        why: &'static str,
    },
    /// Consumers of the key the target does not list were found before minting; `action`
    /// is the target's policy (`warn`, `refuse`, `include`). Names only, never values.
    UnlistedConsumers {
        found: Vec<String>,
        action: &'static str,
    },
    /// A finished rotation's pending deletions were retried; the journal holds what is
    /// still pending (a restarted daemon learns it here, as no `Finished` follows).
    PendingRetried,
    /// A rollback did not put the old key back because it no longer works; the new key
    /// stays in Vault.
    RollbackRefused {
        reason: String,
    },
}

pub trait Observer: Send + Sync {
    fn on_event(&self, journal: &Journal, event: &RotationEvent);
}

/// Observer that ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {
    fn on_event(&self, _: &Journal, _: &RotationEvent) {}
}

/// A step that did not succeed; the rotation must roll back.
pub(super) struct StepFailure(pub(super) String);

/// What the adoption check found.
enum Adoption {
    /// Not configured.
    NotAsked,
    /// Used (or not awaited): a note for the step's outcome.
    Proven(String),
    /// Asked to stop while waiting.
    Stopped,
    /// Not used within the timeout: roll back.
    Failed(String),
}

/// The journal plus the Vault version it was read/written at (for CAS).
pub(super) struct Record {
    pub(super) journal: Journal,
    pub(super) version: u64,
    pub(super) step_clock: Instant,
}

impl Record {
    pub(super) fn from_stored(s: Stored) -> Record {
        Record {
            journal: s.journal,
            version: s.version,
            step_clock: Instant::now(),
        }
    }
}

/// The systems the engine drives.
#[derive(Clone)]
pub struct Ports {
    pub issuer: Arc<dyn KeyIssuer>,
    pub store: Arc<dyn SecretStore>,
    pub roller: Arc<dyn WorkloadRoller>,
    pub prober: Arc<dyn SmokeProber>,
    pub clock: Arc<dyn Clock>,
}

impl Ports {
    /// The three backends, a prober and the system clock.
    pub fn new(
        issuer: Arc<dyn KeyIssuer>,
        store: Arc<dyn SecretStore>,
        roller: Arc<dyn WorkloadRoller>,
        prober: Arc<dyn SmokeProber>,
    ) -> Ports {
        Ports {
            issuer,
            store,
            roller,
            prober,
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct Engine {
    pub(super) issuer: Arc<dyn KeyIssuer>,
    pub(super) store: Arc<dyn SecretStore>,
    pub(super) roller: Arc<dyn WorkloadRoller>,
    pub(super) prober: Arc<dyn SmokeProber>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) observer: Arc<dyn Observer>,
    pub(super) opts: EngineOptions,
    /// Names of new accounts start with this; a reload may change it (ownership is proven
    /// by the journals, not by the name).
    account_prefix: std::sync::RwLock<String>,
    fence: std::sync::RwLock<Arc<dyn Fence>>,
    /// Every Vault `(path, field)` known to hold a key of ours: configured targets and the
    /// targets named by journals. The deletion point checks them all (I5).
    pub(super) known_paths: std::sync::Mutex<BTreeSet<(String, String)>>,
    /// Shared workloads are rolled by one rotation (or one coalesced roll) at a time.
    pub(super) workload_locks: Arc<super::locks::WorkloadLocks>,
    /// Rotations that need the same workloads at about the same time share one roll.
    coalescer: Arc<super::coalesce::Coalescer>,
    /// `max_concurrent_rollouts`: a permit per workload from its roll until verified.
    rollouts: Option<Arc<tokio::sync::Semaphore>>,
    /// `account_name_template` and `env` (a reload may change them, like the prefix).
    pub(super) naming: std::sync::RwLock<crate::naming::Naming>,
    /// Emergency forensics, collected when an emergency rotation concludes (None: off).
    forensics: std::sync::RwLock<Option<Arc<crate::forensics::Forensics>>>,
}

impl Engine {
    pub fn new(ports: Ports, opts: EngineOptions) -> Engine {
        Engine {
            issuer: ports.issuer,
            store: ports.store,
            roller: ports.roller,
            prober: ports.prober,
            clock: ports.clock,
            observer: Arc::new(NoObserver),
            account_prefix: std::sync::RwLock::new(opts.account_prefix.clone()),
            fence: std::sync::RwLock::new(Arc::new(NoFence)),
            known_paths: std::sync::Mutex::default(),
            workload_locks: Arc::default(),
            coalescer: Arc::new(super::coalesce::Coalescer::new(opts.coalesce_window)),
            rollouts: opts
                .max_concurrent_rollouts
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
            opts,
            naming: std::sync::RwLock::default(),
            forensics: std::sync::RwLock::new(None),
        }
    }

    /// Check `fence` before every remote write from now on (leader election).
    pub fn set_fence(&self, fence: Arc<dyn Fence>) {
        *self.fence.write_now() = fence;
    }

    fn fence_check(&self) -> Result<(), String> {
        let fence = self.fence.read_now().clone();
        fence.check()
    }

    /// Remember where these targets keep their keys (the deletion point checks every such
    /// path). Paths are only added: a removed target's path still holds a live key.
    pub fn know_targets(&self, targets: &[Target]) {
        let mut known = self.known_paths.locked();
        for t in targets {
            known.insert((t.vault_path.clone(), t.vault_field.clone()));
        }
    }

    fn know_journal(&self, j: &Journal) {
        if let Some(t) = &j.spec {
            self.know_targets(std::slice::from_ref(t));
        }
    }

    /// Err when this replica may no longer write.
    pub(super) fn fenced(&self, j: &Journal) -> Result<(), EngineError> {
        self.fence_check().map_err(|why| EngineError::Fenced {
            rotation_id: j.rotation_id.clone(),
            step: j.step,
            why,
        })
    }

    /// The prefix of new account names.
    pub fn account_prefix(&self) -> String {
        self.account_prefix.read_now().clone()
    }

    /// Name the accounts of rotations started from now on with `prefix`.
    pub fn set_account_prefix(&self, prefix: &str) {
        *self.account_prefix.write_now() = prefix.to_string();
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Engine {
        self.observer = observer;
        self
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub(super) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn journal_path(&self, target: &str) -> String {
        format!(
            "{}/targets/{target}",
            self.opts.state_prefix.trim_matches('/')
        )
    }

    fn history_path(&self, rotation_id: &str) -> String {
        format!(
            "{}/rotations/{rotation_id}",
            self.opts.state_prefix.trim_matches('/')
        )
    }

    /// The target's current or last rotation, with its journal version.
    pub async fn journal(&self, target: &str) -> Result<Option<Stored>, EngineError> {
        let Some((version, doc)) = self.store.read_doc(&self.journal_path(target)).await? else {
            return Ok(None);
        };
        let journal: Journal =
            serde_json::from_value(doc).map_err(|e| EngineError::BadJournal {
                target: target.into(),
                message: e.to_string(),
            })?;
        self.know_journal(&journal);
        Ok(Some(Stored { version, journal }))
    }

    /// Every target's journal under the state prefix, configured or not (a removed
    /// target's unfinished rotation still needs finishing).
    pub async fn journals(&self) -> Result<Vec<Stored>, EngineError> {
        let prefix = format!("{}/targets", self.opts.state_prefix.trim_matches('/'));
        let mut out = Vec::new();
        for name in self.store.list(&prefix).await? {
            if name.ends_with('/') {
                continue;
            }
            if let Some(s) = self.journal(&name).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The rotation histories (finished rotations by id), for the sweep's proof of
    /// ownership.
    pub(super) async fn histories(&self) -> Result<Vec<Journal>, EngineError> {
        let prefix = format!("{}/rotations", self.opts.state_prefix.trim_matches('/'));
        let mut out = Vec::new();
        for id in self.store.list(&prefix).await? {
            if let Some(j) = self.history(&id).await? {
                self.know_journal(&j);
                out.push(j);
            }
        }
        Ok(out)
    }

    /// A finished rotation by id (kept after the target's journal moved on).
    pub async fn history(&self, rotation_id: &str) -> Result<Option<Journal>, EngineError> {
        let Some((_, doc)) = self.store.read_doc(&self.history_path(rotation_id)).await? else {
            return Ok(None);
        };
        serde_json::from_value(doc)
            .map(Some)
            .map_err(|e| EngineError::BadJournal {
                target: rotation_id.into(),
                message: e.to_string(),
            })
    }

    fn to_doc(journal: &Journal) -> Result<serde_json::Value, EngineError> {
        serde_json::to_value(journal).map_err(|e| EngineError::BadJournal {
            target: journal.target.clone(),
            message: format!("cannot encode: {e}"),
        })
    }

    pub(super) async fn save(&self, rec: &mut Record) -> Result<(), EngineError> {
        self.fenced(&rec.journal)?;
        rec.journal.updated_at = self.now();
        let doc = Self::to_doc(&rec.journal)?;
        match self
            .store
            .write_doc(&self.journal_path(&rec.journal.target), &doc, rec.version)
            .await
        {
            Ok(v) => {
                rec.version = v;
                Ok(())
            }
            Err(BackendError::Conflict { .. }) => Err(EngineError::JournalConflict {
                target: rec.journal.target.clone(),
            }),
            Err(e) => Err(EngineError::Interrupted {
                rotation_id: rec.journal.rotation_id.clone(),
                step: rec.journal.step,
                source: e,
            }),
        }
    }

    pub(super) async fn begin(&self, rec: &mut Record, step: Step) -> Result<(), EngineError> {
        rec.journal.begin(step, self.now());
        rec.step_clock = Instant::now();
        self.save(rec).await?;
        self.observer
            .on_event(&rec.journal, &RotationEvent::StepStarted(step));
        Ok(())
    }

    pub(super) async fn finish(&self, rec: &mut Record, outcome: &str) -> Result<(), EngineError> {
        let step = rec.journal.step;
        rec.journal.finish(outcome, self.now());
        self.save(rec).await?;
        self.observer.on_event(
            &rec.journal,
            &RotationEvent::StepFinished {
                step,
                outcome: outcome.to_string(),
                duration: rec.step_clock.elapsed(),
            },
        );
        Ok(())
    }

    pub(super) fn interrupted(rec: &Record, source: BackendError) -> EngineError {
        EngineError::Interrupted {
            rotation_id: rec.journal.rotation_id.clone(),
            step: rec.journal.step,
            source,
        }
    }

    /// Run one rotation of `target` to a terminal status (or an interruption). `prior` is
    /// the target's journal as the caller read it (None: there is none).
    pub async fn rotate(
        &self,
        target: &Target,
        request: RotationRequest,
        prior: Option<Stored>,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let version = match &prior {
            Some(s) if !s.journal.status.is_terminal() => {
                return Err(EngineError::Busy {
                    target: target.name.clone(),
                    rotation_id: s.journal.rotation_id.clone(),
                })
            }
            Some(s) => s.version,
            None => 0,
        };
        if request.emergency {
            control.upgrade_to_emergency(request.revoke_first);
        }
        self.know_targets(std::slice::from_ref(target));
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await?;
        // The target passed in is the one rotated, whatever name the request carries.
        let request = RotationRequest {
            target: target.name.clone(),
            ..request
        };
        let mut journal = Journal::queued(&request, &self.account_prefix());
        journal.new_account_name =
            self.account_name_for(&target.name, &request.rotation_id, request.requested_at);
        journal.emergency = control.is_emergency();
        journal.revoke_first = control.revoke_first();
        journal.started_at = self.now();
        journal.updated_at = journal.started_at;
        journal.spec = Some(target.clone());
        let prior = prior.map(|p| p.journal);
        if let Some(p) = &prior {
            // The target's journal is about to be overwritten: make sure the history keeps
            // the last rotation (its best-effort copy may have been lost), because the
            // sweep's proof of what we minted lives there.
            self.keep_history(p).await?;
            // Deletions the last rotation could not finish are this one's to finish.
            journal.pending_deletions = p.pending_deletions.clone();
            if !request.is_manual() {
                // A person asking resets the back-off; the schedule inherits it.
                journal.consecutive_failures = p.consecutive_failures;
                journal.last_failure_at = p.last_failure_at;
            }
        }
        if let Some(c) = &current {
            journal.old_vault_version = c.version;
            journal.old_key_sha256 = Some(c.key.sha256_hex());
            let owner = Self::owner_of_current(prior.as_ref(), c);
            journal.old_account = owner.account.clone();
            journal.old_rotation_id = owner.rotation_id.clone();
            journal.old_key_created_at = owner.key_created_at;
            if c.meta.account != owner.account && owner.account.is_some() {
                // The metadata half of an earlier publish failed: repair it, so the key's
                // age and owner read right (best effort; the journal is what counts).
                self.repair_meta(target, &owner).await;
            }
        }
        let mut rec = Record {
            journal,
            version,
            step_clock: Instant::now(),
        };
        self.observer
            .on_event(&rec.journal, &RotationEvent::Started);
        let span = tracing::info_span!("rotation", rotation_id = %rec.journal.rotation_id, target = %target.name);
        async {
            // Refuse a paused workload before minting: nothing is created, nothing to undo.
            if let Some(reason) = self.refusal(target).await {
                return self.fail(&mut rec, reason).await;
            }
            let included;
            let target = match self.check_consumers(target, &rec.journal).await {
                Ok(None) => target,
                Ok(Some(t)) => {
                    included = t;
                    rec.journal.spec = Some(included.clone());
                    &included
                }
                Err(reason) => return self.fail(&mut rec, reason).await,
            };
            self.forward(target, &mut rec, Step::Mint, None, &control)
                .await
        }
        .instrument(span)
        .await
    }

    /// What in the cluster reads `target`'s key without being listed: workloads and pods
    /// found by the roller, minus the target's own workloads and its configured synced
    /// Secret; the VSO/ESO objects themselves are only how they read it.
    pub(super) async fn unlisted_consumers(
        &self,
        target: &Target,
    ) -> Result<Vec<super::ports::Consumer>, BackendError> {
        let found = self
            .roller
            .consumers_of(&self.opts.kv_mount, &target.vault_path, &target.vault_field)
            .await?;
        let listed = |c: &super::ports::Consumer| match &c.workload {
            Some(w) => target.workloads.contains(w),
            None => {
                c.kind == "Secret"
                    && target
                        .synced_secret
                        .as_ref()
                        .is_some_and(|s| s.namespace == c.namespace && s.name == c.name)
            }
        };
        let mut out: Vec<_> = found
            .into_iter()
            .filter(|c| !matches!(c.kind.as_str(), "VaultStaticSecret" | "ExternalSecret"))
            .filter(|c| !listed(c))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Apply the target's `unlisted_consumers` policy before minting: `Ok(None)` rotate as
    /// configured, `Ok(Some(t))` rotate `t` (with the found workloads added), `Err` refuse.
    async fn check_consumers(
        &self,
        target: &Target,
        journal: &Journal,
    ) -> Result<Option<Target>, String> {
        use crate::config::UnlistedConsumers as Policy;
        let policy = target.unlisted_consumers;
        let found = match self.unlisted_consumers(target).await {
            Ok(f) => f,
            Err(e) if policy == Policy::Warn => {
                tracing::warn!(target = %target.name, error = %e, "cannot look for unlisted consumers of the key; rotating the listed workloads");
                return Ok(None);
            }
            Err(e) => {
                return Err(format!(
                    "cannot look for unlisted consumers of the key (unlisted_consumers = \"{}\"), so nothing was minted: {e}",
                    policy.as_str()
                ))
            }
        };
        if found.is_empty() {
            return Ok(None);
        }
        let names: Vec<String> = found.iter().map(describe_consumer).collect();
        self.observer.on_event(
            journal,
            &RotationEvent::UnlistedConsumers {
                found: names.clone(),
                action: policy.as_str(),
            },
        );
        match policy {
            Policy::Warn => Ok(None),
            Policy::Refuse => Err(format!(
                "target {}: {} unlisted consumer(s) read the key (unlisted_consumers = \"refuse\"), so nothing was minted: {}",
                target.name,
                found.len(),
                names.join("; ")
            )),
            Policy::Include => {
                let mut t = target.clone();
                for w in found.iter().filter_map(|c| c.workload.clone()) {
                    if !t.workloads.contains(&w) {
                        t.workloads.push(w.clone());
                        if let Some(last) = t.waves.last_mut() {
                            last.push(w);
                        }
                    }
                }
                Ok(Some(t))
            }
        }
    }

    /// Why a fresh rotation of `target` must not start (checked before minting): a paused
    /// workload, or that it cannot be told whether one is.
    pub(super) async fn refusal(&self, target: &Target) -> Option<String> {
        for w in &target.workloads {
            match self.roller.paused(w).await {
                Ok(false) => {}
                Ok(true) => {
                    return Some(
                        EngineError::WorkloadPaused {
                            target: target.name.clone(),
                            workload: w.clone(),
                        }
                        .to_string(),
                    )
                }
                Err(e) => {
                    return Some(format!(
                        "cannot tell whether workload {w} is paused, so nothing was minted: {e}"
                    ))
                }
            }
        }
        None
    }

    /// Write the history copy of a finished rotation unless it exists: a daemon killed
    /// between the concluding journal write and the copy leaves only the target journal.
    pub async fn ensure_history(&self, j: &Journal) -> Result<(), EngineError> {
        if !j.status.is_terminal() {
            return Ok(());
        }
        self.keep_history(j).await
    }

    /// Write `j`'s history copy unless it exists (check-and-set on "absent").
    async fn keep_history(&self, j: &Journal) -> Result<(), EngineError> {
        let doc = Self::to_doc(j)?;
        match self
            .store
            .write_doc(&self.history_path(&j.rotation_id), &doc, 0)
            .await
        {
            Ok(_) | Err(BackendError::Conflict { .. }) => Ok(()),
            Err(e) => Err(EngineError::Backend(e)),
        }
    }

    /// Whose key Vault serves: the last rotation's journal knows by the key's hash (its new
    /// key, or its old key after a rollback); the metadata is the fallback for a key this
    /// daemon did not write (and the metadata write can fail after the data landed).
    fn owner_of_current(prior: Option<&Journal>, current: &StoredKey) -> KeyMeta {
        let sha = current.key.sha256_hex();
        if let Some(p) = prior {
            if p.new_key_sha256.as_deref() == Some(sha.as_str()) && p.new_account.is_some() {
                return KeyMeta {
                    account: p.new_account.clone(),
                    rotation_id: Some(p.rotation_id.clone()),
                    key_created_at: p
                        .steps
                        .iter()
                        .find(|s| s.step == Step::Publish)
                        .and_then(|s| s.finished_at)
                        .or(current.meta.key_created_at),
                };
            }
            if p.old_key_sha256.as_deref() == Some(sha.as_str()) && p.old_account.is_some() {
                return KeyMeta {
                    account: p.old_account.clone(),
                    rotation_id: p.old_rotation_id.clone(),
                    key_created_at: p.old_key_created_at,
                };
            }
        }
        current.meta.clone()
    }

    /// Write `meta` as the target's key metadata; a failure is logged, not fatal.
    pub(super) async fn repair_meta(&self, target: &Target, meta: &KeyMeta) {
        if self.fence_check().is_err() {
            return;
        }
        match self.store.write_key_meta(&target.vault_path, meta).await {
            Ok(()) => tracing::info!(target = %target.name, "repaired the key's Vault metadata"),
            Err(e) => {
                tracing::warn!(target = %target.name, error = %e, "could not repair the key's Vault metadata")
            }
        }
    }

    /// Run the steps from `from` on. `key` is the new key when it is already minted.
    pub(super) async fn forward(
        &self,
        target: &Target,
        rec: &mut Record,
        from: Step,
        mut key: Option<Secret>,
        control: &RotationControl,
    ) -> Result<Journal, EngineError> {
        let mut step = from;
        // Held from roll through verify (and any rollback they lead to).
        let mut workloads_held = None;
        let mut rollout_permits = None;
        // Until this rotation has its rollout id, batches on its workloads wait for it.
        let before_roll = matches!(step, Step::Mint | Step::Publish | Step::Sync | Step::Roll);
        let mut interest = (before_roll && rec.journal.rollout_id.is_none()).then(|| {
            self.coalescer
                .register(&rec.journal.rotation_id, &target.workloads)
        });
        loop {
            // Shutdown: stop between steps, never inside one. Not between mint and publish
            // (the new key exists only in memory there), and a rollback always runs through.
            if control.stop_requested() && !matches!(step, Step::Publish | Step::Rollback) {
                return Err(EngineError::Stopped {
                    rotation_id: rec.journal.rotation_id.clone(),
                    step,
                });
            }
            match step {
                Step::Mint => {
                    self.begin(rec, Step::Mint).await?;
                    match self.mint(target, rec).await {
                        Ok(k) => key = Some(k),
                        Err(EngineError::Backend(e)) => {
                            return self.fail(rec, format!("mint failed: {e}")).await
                        }
                        Err(e) => return Err(e),
                    }
                    self.finish(rec, "ok").await?;
                    step = Step::Publish;
                }
                Step::Publish => {
                    self.begin(rec, Step::Publish).await?;
                    let Some(k) = key.as_ref() else {
                        return self.fail(rec, "publish: no key in hand".into()).await;
                    };
                    if let Err(reason) = self.publish(target, rec, k).await? {
                        return self.abandon_unpublished(target, rec, reason).await;
                    }
                    self.finish(rec, "ok").await?;
                    step = Step::Sync;
                }
                Step::Sync => {
                    self.begin(rec, Step::Sync).await?;
                    let outcome = match &target.synced_secret {
                        None => Ok("skipped (no synced Secret)".to_string()),
                        Some(_) => self.sync(target, rec).await.map(|()| "ok".to_string()),
                    };
                    match outcome {
                        Ok(o) => self.finish(rec, &o).await?,
                        Err(StepFailure(why)) => return self.rollback(target, rec, why).await,
                    }
                    step = Step::Roll;
                }
                Step::Roll => {
                    if rec.journal.rollout_id.is_none() && interest.is_some() {
                        let id = self
                            .coalescer
                            .join(&rec.journal.rotation_id, &target.workloads)
                            .await;
                        // Recorded (by `begin`) before any patch, so a resume rolls with it.
                        rec.journal.rollout_id = (id != rec.journal.rotation_id).then_some(id);
                    }
                    interest = None;
                    workloads_held = Some(self.hold_workloads(target, rec).await);
                    rollout_permits = self.rollout_permits(target).await;
                    self.begin(rec, Step::Roll).await?;
                    if control.revoke_first() && !rec.journal.old_retired {
                        rec.journal.revoke_first = true;
                        self.retire_old(target, rec, Why::RevokeFirst).await?;
                    }
                    if let Err(StepFailure(why)) = self.roll(target, rec).await? {
                        return self.rollback(target, rec, why).await;
                    }
                    self.finish(rec, "ok").await?;
                    step = Step::Verify;
                }
                Step::Verify => {
                    if workloads_held.is_none() {
                        workloads_held = Some(self.hold_workloads(target, rec).await);
                        rollout_permits = self.rollout_permits(target).await;
                    }
                    self.begin(rec, Step::Verify).await?;
                    let Some(k) = key.as_ref() else {
                        return self
                            .rollback(target, rec, "verify: no key in hand".into())
                            .await;
                    };
                    if let Err(StepFailure(why)) = self.verify(target, rec, k).await {
                        return self.rollback(target, rec, why).await;
                    }
                    self.finish(rec, "ok").await?;
                    drop(workloads_held.take());
                    drop(rollout_permits.take());
                    step = Step::Drain;
                }
                Step::Drain => {
                    self.begin(rec, Step::Drain).await?;
                    let adopted = match self.adoption(target, rec, control).await {
                        Adoption::Proven(note) => {
                            self.save(rec).await?;
                            note
                        }
                        Adoption::NotAsked => String::new(),
                        Adoption::Stopped => {
                            return Err(EngineError::Stopped {
                                rotation_id: rec.journal.rotation_id.clone(),
                                step: Step::Drain,
                            })
                        }
                        Adoption::Failed(why) => return self.rollback(target, rec, why).await,
                    };
                    let Some(outcome) = self.drain(target, rec, control).await else {
                        // Shutdown or lost leadership mid-wait: resume serves the rest.
                        return Err(EngineError::Stopped {
                            rotation_id: rec.journal.rotation_id.clone(),
                            step: Step::Drain,
                        });
                    };
                    self.finish(rec, &format!("{adopted}{outcome}")).await?;
                    step = Step::Retire;
                }
                Step::Retire => {
                    self.begin(rec, Step::Retire).await?;
                    let outcome = self.retire(target, rec).await?;
                    self.finish(rec, &outcome).await?;
                    self.announce(
                        target,
                        EventType::Normal,
                        "RotationCompleted",
                        &format!(
                            "rotation {} completed: the new key is verified ({outcome})",
                            rec.journal.rotation_id
                        ),
                    )
                    .await;
                    return self.conclude(rec, Status::Completed).await;
                }
                Step::Rollback => {
                    let why = rec.journal.error.clone().unwrap_or_default();
                    return self.rollback(target, rec, why).await;
                }
            }
        }
    }

    /// Announce that `rotation_id` will roll `target`'s workloads (the daemon calls this
    /// when it accepts a trigger, so a rotation still queued for a slot, or not yet
    /// scheduled, counts): batches forming on them wait for it, within the window.
    pub fn expect_roll(&self, rotation_id: &str, target: &Target) -> super::coalesce::Interest {
        self.coalescer.register(rotation_id, &target.workloads)
    }

    /// `max_concurrent_rollouts`: one permit per workload of the target (at most the bound),
    /// held from its roll until it is verified.
    async fn rollout_permits(&self, target: &Target) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self.rollouts.clone()?;
        let bound = self.opts.max_concurrent_rollouts.unwrap_or(1).max(1);
        let n = u32::try_from(target.workloads.len().clamp(1, bound)).unwrap_or(u32::MAX);
        if sem.available_permits() < n as usize {
            tracing::info!(target = %target.name, "waiting: max_concurrent_rollouts workloads are rolling");
        }
        sem.acquire_many_owned(n).await.ok()
    }

    /// Wait until no other rotation rolls any of the target's workloads, then hold them.
    pub(super) async fn hold_workloads(
        &self,
        target: &Target,
        rec: &Record,
    ) -> super::locks::WorkloadGuard {
        self.workload_locks
            .acquire(&target.workloads, rec.journal.rollout_id())
            .await
    }

    /// A Kubernetes Event on every workload of the target (best effort).
    pub(super) async fn announce(
        &self,
        target: &Target,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        for w in &target.workloads {
            let _ = self.roller.event(w, type_, reason, note).await;
        }
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "mint"))]
    async fn mint(&self, target: &Target, rec: &mut Record) -> Result<Secret, EngineError> {
        let name = rec.journal.new_account_name.clone();
        self.fenced(&rec.journal)?;
        let minted = match self
            .issuer
            .create_service_account_expiring(
                &target.project_id,
                &name,
                target.key_expiry.map(|e| e.get()),
            )
            .await
        {
            Ok(m) => m,
            Err(e) => {
                // The create may have happened with its answer lost: clean up by name. Its
                // key was never seen, so it is nowhere else; what fails here the sweep
                // finds by the journal's name.
                if let Ok(accounts) = self.issuer.list_service_accounts(&target.project_id).await {
                    for a in accounts.into_iter().filter(|a| a.name == name) {
                        let account = AccountRef {
                            id: a.id,
                            key_id: String::new(),
                        };
                        let doomed = Doomed {
                            project: &target.project_id,
                            account: &account,
                            key_sha256: None,
                            why: Why::FailedMint,
                            unless_pods_carry: None,
                        };
                        let _ = self
                            .delete_account(Some(target), &rec.journal, doomed)
                            .await?;
                    }
                }
                return Err(EngineError::Backend(e));
            }
        };
        rec.journal.new_account = Some(minted.account.clone());
        rec.journal.new_key_sha256 = Some(minted.key.sha256_hex());
        Ok(minted.key)
    }

    /// Ok(Ok(())): published. Ok(Err(reason)): provably not published (the caller
    /// abandons). Err: Vault's state is unknown; the journal is left for resume.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "publish"))]
    async fn publish(
        &self,
        target: &Target,
        rec: &mut Record,
        key: &Secret,
    ) -> Result<Result<(), String>, EngineError> {
        let meta = KeyMeta {
            account: rec.journal.new_account.clone(),
            rotation_id: Some(rec.journal.rotation_id.clone()),
            key_created_at: Some(self.now()),
        };
        self.fenced(&rec.journal)?;
        let err = match self
            .store
            .write_key(
                &target.vault_path,
                &target.vault_field,
                key,
                &meta,
                rec.journal.old_vault_version,
            )
            .await
        {
            Ok(v) => {
                rec.journal.new_vault_version = Some(v);
                return Ok(Ok(()));
            }
            Err(e) => e,
        };
        self.settle_publish(target, rec, key, &meta, err).await
    }

    /// After a publish that did not plainly succeed, read what Vault holds before deciding
    /// anything: a timeout is not a failure and a conflict is not proof that nothing landed.
    async fn settle_publish(
        &self,
        target: &Target,
        rec: &mut Record,
        key: &Secret,
        meta: &KeyMeta,
        err: BackendError,
    ) -> Result<Result<(), String>, EngineError> {
        let (path, field) = (&target.vault_path, &target.vault_field);
        let sha = key.sha256_hex();
        // A refusal (4xx, check-and-set) means this write did not happen; a timeout or 5xx
        // may still land later.
        let mut in_flight = matches!(
            err,
            BackendError::Failed {
                transient: true,
                ..
            }
        );
        for _ in 0..3 {
            let current = self
                .store
                .read_key(path, field)
                .await
                .map_err(|e| Self::interrupted(rec, e))?;
            let version = current.as_ref().map_or(0, |c| c.version);
            match current {
                Some(c) if c.key.sha256_hex() == sha => {
                    rec.journal.new_vault_version = Some(c.version);
                    if c.meta.account != meta.account {
                        self.repair_meta(target, meta).await;
                    }
                    return Ok(Ok(()));
                }
                _ if version != rec.journal.old_vault_version => {
                    // Someone else wrote: ours was check-and-set on the old version and can
                    // never land now.
                    return Ok(Err(format!(
                        "publish: Vault {path} changed since the rotation started (check-and-set on version {} failed; it is now version {version}); nothing was published: {err}",
                        rec.journal.old_vault_version
                    )));
                }
                _ if !in_flight => {
                    return Ok(Err(format!("publish failed, nothing written: {err}")));
                }
                Some(c) => {
                    // Our write may still land. Fence it out: write back what Vault serves
                    // (the old key, still live) with check-and-set on the old version. After
                    // that, ours can never land.
                    self.fenced(&rec.journal)?;
                    match self
                        .store
                        .write_key(path, field, &c.key, &c.meta, c.version)
                        .await
                    {
                        Ok(v) => {
                            tracing::warn!(path = %path, version = v, "publish outcome unknown: re-published the current key to fence out the late write");
                            return Ok(Err(format!(
                                "publish timed out; Vault keeps the old key (re-published as version {v} so the late write cannot land): {err}"
                            )));
                        }
                        // Someone (maybe our late write) got in first: look again.
                        Err(BackendError::Conflict { .. }) => in_flight = false,
                        Err(e) => return Err(Self::interrupted(rec, e)),
                    }
                }
                None => {
                    // Nothing to write back to fence a first publish: leave it for resume.
                    return Err(Self::interrupted(rec, err));
                }
            }
        }
        Err(Self::interrupted(rec, err))
    }

    /// Publish did not happen: delete the new account (the deletion point checks Vault does
    /// not serve it) and fail. Vault still serves the old key, which still lives.
    async fn abandon_unpublished(
        &self,
        target: &Target,
        rec: &mut Record,
        reason: String,
    ) -> Result<Journal, EngineError> {
        if let Some(a) = rec.journal.new_account.clone() {
            let sha = rec.journal.new_key_sha256.clone();
            let doomed = Doomed {
                project: &target.project_id,
                account: &a,
                key_sha256: sha.as_deref(),
                why: Why::Unpublished,
                unless_pods_carry: None,
            };
            let outcome = self
                .delete_account(Some(target), &rec.journal, doomed)
                .await?;
            if let Some(problem) = outcome.problem() {
                let mut p = PendingDeletion::new(
                    a,
                    PendingReason::Unpublished,
                    sha,
                    &target.project_id,
                    self.now(),
                );
                p.attempts = 1;
                p.last_error = Some(problem);
                rec.journal.pending_deletions.push(p);
            }
        }
        self.fail(rec, reason).await
    }

    pub(super) async fn fail(
        &self,
        rec: &mut Record,
        reason: String,
    ) -> Result<Journal, EngineError> {
        tracing::error!(rotation_id = %rec.journal.rotation_id, target = %rec.journal.target, error = %reason, "rotation failed");
        if rec.journal.step_state == StepState::Started {
            rec.journal.finish(reason.clone(), self.now());
        }
        rec.journal.error = Some(reason);
        self.conclude(rec, Status::Failed).await
    }

    /// End the rotation with `status`: retry what is pending (the conditions permitting),
    /// count failures in a row, journal it, and keep a history copy.
    pub(super) async fn conclude(
        &self,
        rec: &mut Record,
        status: Status,
    ) -> Result<Journal, EngineError> {
        rec.journal.status = status;
        self.collect_forensics(rec).await;
        if let Some(target) = rec.journal.spec.clone() {
            // What earlier rotations left pending (a leaked key's failed revoke above all)
            // is tried again now; what this one just failed to delete waits for the next
            // pass rather than being hammered at once.
            let started = rec.journal.started_at;
            self.retry_pending(&target, rec, Some(started)).await?;
        }
        match status {
            Status::Completed => {
                rec.journal.consecutive_failures = 0;
                rec.journal.last_failure_at = None;
            }
            Status::RolledBack | Status::Failed => {
                rec.journal.consecutive_failures += 1;
                rec.journal.last_failure_at = Some(self.now());
            }
            Status::Running | Status::RollingBack => {}
        }
        self.save(rec).await?;
        // History copy for `GET /v1/rotations/{id}` and the sweep's proof of ownership once
        // the target moves on; if it fails here, the next rotation writes it first.
        if let Err(e) = self.keep_history(&rec.journal).await {
            tracing::warn!(error = %e, "could not write rotation history");
        }
        self.observer
            .on_event(&rec.journal, &RotationEvent::Finished);
        Ok(rec.journal.clone())
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "sync"))]
    async fn sync(&self, target: &Target, rec: &mut Record) -> Result<(), StepFailure> {
        let Some(s) = target.synced_secret.as_ref() else {
            return Ok(());
        };
        let want = rec.journal.new_key_sha256.clone().unwrap_or_default();
        self.wait_secret(s, &want, "the new key", &rec.journal)
            .await
            .map_err(|why| StepFailure(format!("sync: {why}")))
    }

    /// Nudge the synced Secret's operator (if configured) and wait until the Secret holds
    /// the key with hash `want` (`what` names it in the error).
    pub(super) async fn wait_secret(
        &self,
        s: &crate::config::SyncedSecret,
        want: &str,
        what: &str,
        j: &Journal,
    ) -> Result<(), String> {
        if let Some(annotation) = &s.force_sync_annotation {
            self.fenced(j).map_err(|e| e.to_string())?;
            if let Err(e) = self
                .roller
                .nudge_secret(&s.namespace, &s.name, annotation, &j.rotation_id)
                .await
            {
                tracing::warn!(error = %e, "could not nudge the synced Secret; waiting anyway");
            }
        }
        let deadline = Instant::now() + s.timeout.get();
        loop {
            match self
                .roller
                .secret_sha256(&s.namespace, &s.name, &s.key)
                .await
            {
                Ok(Some(h)) if h == want => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the synced Secret"),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Secret {}/{} did not receive {what} within {:?}",
                    s.namespace, s.name, s.timeout
                ));
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "roll"))]
    async fn roll(
        &self,
        target: &Target,
        rec: &mut Record,
    ) -> Result<Result<(), StepFailure>, EngineError> {
        if target.waves.is_empty() {
            return self.roll_workloads(&target.workloads, rec).await;
        }
        // Staged: each wave but the last is rolled and verified here (rollouts, pods, its
        // probes) before the next moves; the last is verified by the verify step, with all.
        let waves = target.wave_list();
        rec.journal.waves.resize(waves.len(), Default::default());
        for (i, wave) in waves.iter().enumerate() {
            let n = i + 1;
            if rec.journal.waves[i].verified_at.is_some() {
                continue;
            }
            if rec.journal.waves[i].rolled_at.is_none() {
                // Saved before the patches: a crash after one still counts the wave as moved.
                rec.journal.waves[i].rolled_at = Some(self.now());
                self.save(rec).await?;
            }
            if let Err(StepFailure(why)) = self.roll_workloads(wave, rec).await? {
                return Ok(Err(StepFailure(format!("wave {n}: {why}"))));
            }
            if n == waves.len() {
                break;
            }
            let deadline = Instant::now() + target.rollout_timeout.get();
            if let Err(e) = self
                .wait_rollouts_of(wave, rec.journal.rollout_id(), deadline)
                .await
            {
                return Ok(Err(StepFailure(format!("wave {n}: {e}"))));
            }
            for probe in target.smoke_probes.iter().filter(|p| p.wave == Some(n)) {
                if let Err(e) = self.probe(probe, deadline).await {
                    return Ok(Err(StepFailure(format!(
                        "wave {n}: smoke probe {}: {e}",
                        crate::config::redacted_url(&probe.url)
                    ))));
                }
            }
            rec.journal.waves[i].verified_at = Some(self.now());
            self.save(rec).await?;
            tracing::info!(rotation_id = %rec.journal.rotation_id, wave = n, of = waves.len(), "wave verified");
        }
        Ok(Ok(()))
    }

    async fn roll_workloads(
        &self,
        workloads: &[WorkloadRef],
        rec: &mut Record,
    ) -> Result<Result<(), StepFailure>, EngineError> {
        for w in workloads {
            self.fenced(&rec.journal)?;
            let id = rec.journal.rollout_id().to_string();
            if let Err(e) = self.roller.roll(w, &id).await {
                return Ok(Err(StepFailure(format!("roll {w}: {e}"))));
            }
            let _ = self
                .roller
                .event(
                    w,
                    EventType::Normal,
                    "RotationStarted",
                    &format!(
                        "openai-key-rotator rotation {} rolled this workload onto a new key",
                        rec.journal.rotation_id
                    ),
                )
                .await;
        }
        Ok(Ok(()))
    }

    /// Every workload completes its rollout (kubectl's rule, pods carrying the id) by
    /// `deadline`.
    pub(super) async fn wait_rollouts(
        &self,
        target: &Target,
        rollout_id: &str,
        deadline: Instant,
    ) -> Result<(), String> {
        self.wait_rollouts_of(&target.workloads, rollout_id, deadline)
            .await
    }

    /// [`Self::wait_rollouts`] for some of the workloads (a wave).
    pub(super) async fn wait_rollouts_of(
        &self,
        workloads: &[WorkloadRef],
        rollout_id: &str,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut pending: BTreeMap<_, String> = workloads
            .iter()
            .map(|w| (w.clone(), "not checked yet".to_string()))
            .collect();
        loop {
            let mut done = Vec::new();
            for (w, status) in pending.iter_mut() {
                match self.roller.rollout_state(w, rollout_id).await {
                    Ok(RolloutState::Complete) => done.push(w.clone()),
                    Ok(RolloutState::Progressing(m)) => *status = m,
                    Ok(RolloutState::Failed(m)) => return Err(format!("{w}: {m}")),
                    Err(e) => *status = e.to_string(),
                }
            }
            for w in done {
                pending.remove(&w);
            }
            let Some((w, why)) = pending.iter().next() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(format!("{w}: not rolled out in time ({why})"));
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }

    /// Rollouts complete, the new key answers, the smoke probes pass.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "verify"))]
    async fn verify(
        &self,
        target: &Target,
        rec: &mut Record,
        key: &Secret,
    ) -> Result<(), StepFailure> {
        let deadline = Instant::now() + target.rollout_timeout.get();
        self.wait_rollouts(target, rec.journal.rollout_id(), deadline)
            .await
            .map_err(|e| StepFailure(format!("verify: {e}")))?;
        // The new key answers; a few tries, as a new key can take a moment to propagate.
        let check = &self.opts.key_check_retry;
        check
            .run(
                |_: &BackendError| Retry::Yes,
                |_| self.issuer.check_key(key),
            )
            .await
            .map_err(|g| {
                StepFailure(format!(
                    "verify: the new key does not answer GET /v1/models: {}{}",
                    g.error,
                    g.suffix(check)
                ))
            })?;
        for probe in &target.smoke_probes {
            self.probe(probe, deadline).await.map_err(|e| {
                StepFailure(format!(
                    "verify: smoke probe {}: {e}",
                    crate::config::redacted_url(&probe.url)
                ))
            })?;
        }
        if let Some(last) = rec.journal.waves.last_mut() {
            last.verified_at = Some(self.now());
        }
        Ok(())
    }

    /// New-key adoption (`[targets.adoption]`): wait until the Usage API counts at least
    /// `min_requests` for the new key. Verification proved pods carry the rollout; this
    /// proves they use the key (a consumer that reads it from elsewhere, or caches the old
    /// one, would otherwise die at retire). Skipped in an emergency: the old key is the
    /// danger then.
    async fn adoption(
        &self,
        target: &Target,
        rec: &mut Record,
        control: &RotationControl,
    ) -> Adoption {
        let Some(a) = &target.adoption else {
            return Adoption::NotAsked;
        };
        if let Some(n) = rec.journal.new_key_adopted {
            return Adoption::Proven(format!("new key adopted ({n} requests); "));
        }
        if control.is_emergency() {
            return Adoption::Proven("adoption not awaited (emergency); ".into());
        }
        let Some(new) = rec.journal.new_account.clone() else {
            return Adoption::Failed("adoption: the journal names no new account".into());
        };
        let since = rec.journal.started_at;
        let started = rec
            .journal
            .step_first_started_at(Step::Drain)
            .unwrap_or_else(|| self.now());
        let waited = (self.now() - started).to_std().unwrap_or_default();
        let bound = Instant::now() + a.timeout.get().saturating_sub(waited);
        let mut seen = 0;
        loop {
            if control.stop_requested() {
                return Adoption::Stopped;
            }
            if control.is_emergency() {
                return Adoption::Proven("adoption cut short (emergency); ".into());
            }
            match self
                .issuer
                .key_usage(&target.project_id, &new.key_id, since)
                .await
            {
                Ok(u) => {
                    // `last_used_at` is current where usage buckets lag: it counts as one.
                    let used_now = u.last_used_at.is_some_and(|t| t >= since);
                    seen = u.requests_since.max(u64::from(used_now));
                    if seen >= a.min_requests {
                        rec.journal.new_key_adopted = Some(seen);
                        return Adoption::Proven(format!("new key adopted ({seen} requests); "));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "usage query failed; waiting for adoption"),
            }
            if Instant::now() >= bound {
                return Adoption::Failed(format!(
                    "adoption: the new key had {seen} of {} requests after {:?}: the workloads do not use it",
                    a.min_requests, a.timeout
                ));
            }
            let left = bound.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(self.opts.drain_poll_interval)).await;
        }
    }

    /// Grace period, then the optional usage-verified drain. Returns the step outcome, or
    /// None when asked to stop while waiting.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "drain"))]
    async fn drain(
        &self,
        target: &Target,
        rec: &mut Record,
        control: &RotationControl,
    ) -> Option<String> {
        Some(self.drain_inner(target, rec, control).await).filter(|_| !control.stop_requested())
    }

    async fn drain_inner(
        &self,
        target: &Target,
        rec: &mut Record,
        control: &RotationControl,
    ) -> String {
        if control.is_emergency() {
            rec.journal.emergency = true;
            return "skipped (emergency)".into();
        }
        // On resume, count the grace already served since the drain first started.
        let started = rec
            .journal
            .step_first_started_at(Step::Drain)
            .unwrap_or_else(|| self.now());
        let served = (self.now() - started).to_std().unwrap_or_default();
        let grace_end = Instant::now() + target.grace_period.get().saturating_sub(served);
        while Instant::now() < grace_end {
            if control.stop_requested() {
                return "stopped".into();
            }
            if control.is_emergency() {
                rec.journal.emergency = true;
                return "cut short (emergency)".into();
            }
            let left = grace_end.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(self.opts.poll_interval)).await;
        }
        let (Some(d), Some(old)) = (&target.drain, rec.journal.old_account.clone()) else {
            return "ok (grace period)".into();
        };
        let bound = Instant::now() + d.max_wait.get();
        loop {
            if control.stop_requested() {
                return "stopped".into();
            }
            if control.is_emergency() {
                rec.journal.emergency = true;
                return "cut short (emergency)".into();
            }
            let now = self.now();
            let since = now - chrono::Duration::from_std(d.quiet_for.get()).unwrap_or_default();
            match self
                .issuer
                .key_usage(&target.project_id, &old.key_id, since)
                .await
            {
                Ok(u) if u.requests_since == 0 && u.last_used_at.is_none_or(|t| t <= since) => {
                    return format!("ok (old key quiet for {:?})", d.quiet_for);
                }
                Ok(u) => tracing::info!(
                    rotation_id = %rec.journal.rotation_id,
                    requests = u.requests_since,
                    "old key still in use; draining"
                ),
                Err(e) => tracing::warn!(error = %e, "usage query failed; draining"),
            }
            if Instant::now() >= bound {
                return match d.on_timeout {
                    DrainTimeout::Retire => {
                        format!("timed out after {:?}; retiring anyway", d.max_wait)
                    }
                    DrainTimeout::Keep => {
                        let mut p = PendingDeletion::new(
                            old,
                            PendingReason::DrainKeep,
                            rec.journal.old_key_sha256.clone(),
                            &target.project_id,
                            self.now(),
                        );
                        p.once_quiet_for_ms = Some(d.quiet_for.get().as_millis().max(1) as u64);
                        p.last_error = Some("old key still in use after drain.max_wait".into());
                        rec.journal.pending_deletions.push(p);
                        format!(
                            "timed out after {:?}; old account kept until quiet for {:?}",
                            d.max_wait, d.quiet_for
                        )
                    }
                };
            }
            let left = bound.saturating_duration_since(Instant::now());
            tokio::time::sleep(
                self.opts
                    .drain_poll_interval
                    .min(left.max(Duration::from_millis(1))),
            )
            .await;
        }
    }

    /// The last step: delete the old account, unless it is gone, kept by the drain policy,
    /// or unknown. Returns the step's outcome.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "retire"))]
    async fn retire(&self, target: &Target, rec: &mut Record) -> Result<String, EngineError> {
        let kept = rec.journal.pending_deletions.iter().any(|p| {
            p.reason == PendingReason::DrainKeep
                && Some(&p.account) == rec.journal.old_account.as_ref()
        });
        Ok(if rec.journal.old_retired {
            "skipped (already deleted)".to_string()
        } else if kept {
            "kept (drain policy); pending deletion".to_string()
        } else if rec.journal.old_account.is_none() {
            "skipped (old account unknown)".to_string()
        } else {
            self.retire_old(target, rec, Why::Retire).await?
        })
    }

    /// Delete the old account through the deletion point; when it is refused or fails,
    /// leave it pending (the rotation still completes: the new key is verified and current).
    pub(super) async fn retire_old(
        &self,
        target: &Target,
        rec: &mut Record,
        why: Why,
    ) -> Result<String, EngineError> {
        let Some(old) = rec.journal.old_account.clone() else {
            return Ok("skipped (old account unknown)".into());
        };
        let sha = rec.journal.old_key_sha256.clone();
        let doomed = Doomed {
            project: &target.project_id,
            account: &old,
            key_sha256: sha.as_deref(),
            why,
            unless_pods_carry: None,
        };
        let (problem, attempts) = match self
            .delete_account(Some(target), &rec.journal, doomed)
            .await?
        {
            Deletion::Deleted => {
                rec.journal.old_retired = true;
                // Deleted before: a pending entry for it (carried from a failed try) is done.
                rec.journal.pending_deletions.retain(|p| p.account != old);
                self.save(rec).await?;
                return Ok(format!("ok (deleted {})", old.id));
            }
            Deletion::Refused(r) => (format!("not deleted: {r}"), 0),
            Deletion::Failed { error, attempts } => (error, attempts),
        };
        if !rec
            .journal
            .pending_deletions
            .iter()
            .any(|p| p.account == old)
        {
            let reason = if rec.journal.emergency || why == Why::RevokeFirst {
                PendingReason::Leaked
            } else {
                PendingReason::Retire
            };
            let mut p =
                PendingDeletion::new(old.clone(), reason, sha, &target.project_id, self.now());
            p.attempts = attempts;
            p.last_error = Some(problem.clone());
            rec.journal.pending_deletions.push(p);
        }
        Ok(format!("{} pending deletion: {problem}", old.id))
    }

    /// Collect emergency forensics from `forensics` when emergency rotations conclude.
    pub fn set_forensics(&self, forensics: Option<Arc<crate::forensics::Forensics>>) {
        *self.forensics.write_now() = forensics;
    }

    /// An emergency rotation's report on its old key, once (a resumed conclusion keeps the
    /// first). Bounded by the collector's timeout; it cannot fail the rotation.
    async fn collect_forensics(&self, rec: &mut Record) {
        if !rec.journal.emergency || rec.journal.forensics.is_some() {
            return;
        }
        let Some(f) = self.forensics.read_now().clone() else {
            return;
        };
        let report = f.collect(&rec.journal, self.now()).await;
        rec.journal.forensics = Some(report);
    }

    /// Every journal under the state prefix, current and history: the proof of what is
    /// ours (reconciliation reads it as the sweep does).
    pub async fn all_journals(&self) -> Result<Vec<Journal>, EngineError> {
        let mut out: Vec<Journal> = self
            .journals()
            .await?
            .into_iter()
            .map(|s| s.journal)
            .collect();
        out.extend(self.histories().await?);
        Ok(out)
    }
}

/// `Kind ns/name (via ...)`, for logs, audit and plans.
pub(super) fn describe_consumer(c: &super::ports::Consumer) -> String {
    format!("{} {}/{} ({})", c.kind, c.namespace, c.name, c.via)
}
