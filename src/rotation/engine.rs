//! The rotation state machine: mint → publish → sync → roll → verify → drain → retire, with
//! rollback, journaled before and after every step, resumable after a crash.
//!
//! The rule everything here serves: the key Vault serves is always live (I1), and the old
//! account dies only after the new key is verified in every workload (I2). Where the engine
//! cannot tell what happened (a backend unreachable mid-step), it stops and leaves the journal
//! as it is; `resume` sorts it out later rather than guessing.

use super::journal::{
    account_name, new_rotation_id, parse_account_name, Journal, Origin, PendingDeletion, Status,
    Step, StepState, Trigger,
};
use super::ports::{
    BackendError, EventType, KeyIssuer, KeyMeta, RolloutState, SecretStore, WorkloadRoller,
};
use crate::config::{DrainTimeout, SmokeProbe, Target};
use crate::secret::Secret;
use chrono::Utc;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// Why a rotation was asked for.
#[derive(Debug, Clone)]
pub struct RotationRequest {
    pub trigger: Trigger,
    /// Token name, "schedule", "signal" or "cli".
    pub actor: String,
    pub reason: String,
    /// Skip the grace period and the drain.
    pub emergency: bool,
    /// Delete the old account before rolling (a short outage over a leaked key).
    pub revoke_first: bool,
    /// Use this id (made by [`new_rotation_id`]) instead of a fresh one, so a caller can
    /// answer with the id before the rotation starts.
    pub rotation_id: Option<String>,
}

impl RotationRequest {
    pub fn new(trigger: Trigger, actor: &str, reason: &str) -> Self {
        RotationRequest {
            trigger,
            actor: actor.into(),
            reason: reason.into(),
            emergency: false,
            revoke_first: false,
            rotation_id: None,
        }
    }
}

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
    fn revoke_first(&self) -> bool {
        self.revoke_first.load(Ordering::SeqCst)
    }
}

/// Test-only crash injection: the engine returns [`EngineError::Crashed`] at this point, as
/// if the process died there, leaving backends and journal as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the create call returned, before the journal recorded the new ids.
    AfterMintCall,
    /// Right after the journal recorded `step` in `state`.
    Journaled(Step, StepState),
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub account_prefix: String,
    pub state_prefix: String,
    /// How often rollouts, synced Secrets and usage are polled.
    pub poll_interval: Duration,
    /// How often the drain asks the Usage API.
    pub drain_poll_interval: Duration,
    /// Attempts to delete the old account before leaving it pending.
    pub retire_attempts: u32,
    pub retire_backoff: Duration,
    pub crash_at: Option<CrashPoint>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            account_prefix: "okr".into(),
            state_prefix: "openai-key-rotator/state".into(),
            poll_interval: Duration::from_secs(1),
            drain_poll_interval: Duration::from_secs(30),
            retire_attempts: 5,
            retire_backoff: Duration::from_secs(2),
            crash_at: None,
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
    #[error("simulated crash at {0:?}")]
    Crashed(CrashPoint),
    /// Stopped at a step boundary on request (shutdown); the journal resumes the rest.
    #[error("rotation {rotation_id} stopped before {step} (shutdown); it resumes on restart")]
    Stopped { rotation_id: String, step: Step },
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
}

pub trait Observer: Send + Sync {
    fn on_event(&self, journal: &Journal, event: &RotationEvent);
}

/// Observer that ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {
    fn on_event(&self, _: &Journal, _: &RotationEvent) {}
}

/// A step that did not succeed, and whether the rotation must roll back.
struct StepFailure(String);

/// Result of a sweep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub deleted: Vec<String>,
    pub kept_referenced: usize,
    pub kept_young: usize,
}

/// The journal plus the Vault version it was read/written at (for CAS).
struct Record {
    journal: Journal,
    version: u64,
    step_clock: Instant,
}

pub struct Engine {
    issuer: Arc<dyn KeyIssuer>,
    store: Arc<dyn SecretStore>,
    roller: Arc<dyn WorkloadRoller>,
    observer: Arc<dyn Observer>,
    http: reqwest::Client,
    opts: EngineOptions,
}

impl Engine {
    pub fn new(
        issuer: Arc<dyn KeyIssuer>,
        store: Arc<dyn SecretStore>,
        roller: Arc<dyn WorkloadRoller>,
        opts: EngineOptions,
    ) -> Engine {
        Engine {
            issuer,
            store,
            roller,
            observer: Arc::new(NoObserver),
            http: reqwest::Client::new(),
            opts,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Engine {
        self.observer = observer;
        self
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
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
    pub async fn journal(&self, target: &str) -> Result<Option<(u64, Journal)>, EngineError> {
        let Some((version, doc)) = self.store.read_doc(&self.journal_path(target)).await? else {
            return Ok(None);
        };
        let journal = serde_json::from_value(doc).map_err(|e| EngineError::BadJournal {
            target: target.into(),
            message: e.to_string(),
        })?;
        Ok(Some((version, journal)))
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

    async fn save(&self, rec: &mut Record) -> Result<(), EngineError> {
        rec.journal.updated_at = Utc::now();
        let doc = serde_json::to_value(&rec.journal).expect("journal serializes");
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

    fn crash_check(&self, point: CrashPoint) -> Result<(), EngineError> {
        if self.opts.crash_at == Some(point) {
            return Err(EngineError::Crashed(point));
        }
        Ok(())
    }

    async fn begin(&self, rec: &mut Record, step: Step) -> Result<(), EngineError> {
        rec.journal.begin(step, Utc::now());
        rec.step_clock = Instant::now();
        self.save(rec).await?;
        self.observer
            .on_event(&rec.journal, &RotationEvent::StepStarted(step));
        self.crash_check(CrashPoint::Journaled(step, StepState::Started))
    }

    async fn finish(&self, rec: &mut Record, outcome: &str) -> Result<(), EngineError> {
        let step = rec.journal.step;
        rec.journal.finish(outcome, Utc::now());
        self.save(rec).await?;
        self.observer.on_event(
            &rec.journal,
            &RotationEvent::StepFinished {
                step,
                outcome: outcome.to_string(),
                duration: rec.step_clock.elapsed(),
            },
        );
        self.crash_check(CrashPoint::Journaled(step, StepState::Done))
    }

    fn interrupted(rec: &Record, source: BackendError) -> EngineError {
        EngineError::Interrupted {
            rotation_id: rec.journal.rotation_id.clone(),
            step: rec.journal.step,
            source,
        }
    }

    /// What a rotation of `target` would do, touching nothing.
    pub async fn plan(&self, target: &Target) -> Result<Vec<String>, EngineError> {
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await?;
        let mut plan = Vec::new();
        let name = account_name(&self.opts.account_prefix, &target.name, "<rotation-id>");
        plan.push(format!(
            "mint: create service account {name} in project {}",
            target.project_id
        ));
        plan.push(match &current {
            Some(c) => format!(
                "publish: write the new key to {}#{} (check-and-set on version {})",
                target.vault_path, target.vault_field, c.version
            ),
            None => format!(
                "publish: create {}#{} (it does not exist yet)",
                target.vault_path, target.vault_field
            ),
        });
        if let Some(s) = &target.synced_secret {
            plan.push(format!(
                "sync: wait up to {:?} until Secret {}/{} key {} holds the new key",
                s.timeout, s.namespace, s.name, s.key
            ));
        }
        for w in &target.workloads {
            plan.push(format!(
                "roll: annotate {w} with openai-key-rotator/rotation-id"
            ));
        }
        plan.push(format!(
            "verify: rollouts complete within {:?}, the new key answers GET /v1/models, {} smoke probe(s)",
            target.rollout_timeout,
            target.smoke_probes.len()
        ));
        plan.push(match &target.drain {
            Some(d) => format!(
                "drain: grace {:?}, then wait until the old key is quiet for {:?} (at most {:?}, then {:?})",
                target.grace_period, d.quiet_for, d.max_wait, d.on_timeout
            ),
            None => format!("drain: grace {:?}", target.grace_period),
        });
        plan.push(
            match current.as_ref().and_then(|c| c.meta.account.as_ref()) {
                Some(a) => format!("retire: delete service account {} (key {})", a.id, a.key_id),
                None => "retire: nothing (the current key's service account is unknown)".into(),
            },
        );
        Ok(plan)
    }

    /// Run one rotation of `target` to a terminal status (or an interruption).
    pub async fn rotate(
        &self,
        target: &Target,
        request: RotationRequest,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let existing = self.journal(&target.name).await?;
        let version = match &existing {
            Some((_, j)) if !j.status.is_terminal() => {
                return Err(EngineError::Busy {
                    target: target.name.clone(),
                    rotation_id: j.rotation_id.clone(),
                })
            }
            Some((v, _)) => *v,
            None => 0,
        };
        if request.emergency {
            control.upgrade_to_emergency(request.revoke_first);
        }
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await?;
        let now = Utc::now();
        let rotation_id = request
            .rotation_id
            .clone()
            .unwrap_or_else(|| new_rotation_id(now));
        let mut journal = Journal::new(
            &rotation_id,
            &target.name,
            &self.opts.account_prefix,
            Origin {
                trigger: request.trigger,
                actor: request.actor,
                reason: request.reason,
                emergency: control.is_emergency(),
                revoke_first: control.revoke_first(),
            },
            now,
        );
        if let Some(c) = &current {
            journal.old_account = c.meta.account.clone();
            journal.old_vault_version = c.version;
            journal.old_rotation_id = c.meta.rotation_id.clone();
            journal.old_key_created_at = c.meta.key_created_at;
        }
        let mut rec = Record {
            journal,
            version,
            step_clock: Instant::now(),
        };
        self.observer
            .on_event(&rec.journal, &RotationEvent::Started);
        let span = tracing::info_span!("rotation", rotation_id = %rec.journal.rotation_id, target = %target.name);
        self.forward(target, &mut rec, Step::Mint, None, &control)
            .instrument(span)
            .await
    }

    /// Pick up the target's unfinished rotation, if any; retry pending deletions of a
    /// finished one. Returns the journal as it ends.
    pub async fn resume(
        &self,
        target: &Target,
        control: Arc<RotationControl>,
    ) -> Result<Option<Journal>, EngineError> {
        let span = tracing::info_span!("resume", target = %target.name);
        self.resume_inner(target, control).instrument(span).await
    }

    async fn resume_inner(
        &self,
        target: &Target,
        control: Arc<RotationControl>,
    ) -> Result<Option<Journal>, EngineError> {
        let Some((version, journal)) = self.journal(&target.name).await? else {
            return Ok(None);
        };
        let mut rec = Record {
            journal,
            version,
            step_clock: Instant::now(),
        };
        if rec.journal.status.is_terminal() {
            if !rec.journal.pending_deletions.is_empty() {
                self.retry_pending(target, &mut rec).await?;
            }
            return Ok(Some(rec.journal));
        }
        if rec.journal.emergency {
            control.upgrade_to_emergency(rec.journal.revoke_first);
        }
        tracing::info!(
            rotation_id = %rec.journal.rotation_id,
            target = %target.name,
            step = %rec.journal.step,
            "resuming rotation"
        );
        if rec.journal.status == Status::RollingBack {
            let why = rec.journal.error.clone().unwrap_or_default();
            return self.rollback(target, &mut rec, why).await.map(Some);
        }
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await
            .map_err(|e| Self::interrupted(&rec, e))?;
        let published = matches!(
            (&current, &rec.journal.new_key_sha256),
            (Some(c), Some(h)) if &c.key.sha256_hex() == h
        );
        match rec.journal.step {
            Step::Mint | Step::Publish if !published => {
                // The new key's value was never journaled: if it is not in Vault it is lost.
                // Delete its account (found by its deterministic name if the crash came
                // before the journal recorded it) and mint again.
                let orphan = match rec.journal.new_account.clone() {
                    Some(a) => Some(a.id),
                    None => self
                        .issuer
                        .list_service_accounts(&target.project_id)
                        .await
                        .map_err(|e| Self::interrupted(&rec, e))?
                        .into_iter()
                        .find(|a| a.name == rec.journal.new_account_name)
                        .map(|a| a.id),
                };
                if let Some(id) = orphan {
                    self.issuer
                        .delete_service_account(&target.project_id, &id)
                        .await
                        .map_err(|e| Self::interrupted(&rec, e))?;
                    self.observer.on_event(
                        &rec.journal,
                        &RotationEvent::AccountDeleted {
                            account_id: id,
                            why: "unpublished mint after a crash",
                        },
                    );
                }
                if current.as_ref().map_or(0, |c| c.version) != rec.journal.old_vault_version {
                    return self
                        .fail(
                            &mut rec,
                            "Vault changed under the rotation before publish; not retrying".into(),
                        )
                        .await
                        .map(Some);
                }
                rec.journal.new_account = None;
                rec.journal.new_key_sha256 = None;
                self.forward(target, &mut rec, Step::Mint, None, &control)
                    .await
                    .map(Some)
            }
            Step::Mint | Step::Publish => {
                let current = current.expect("published implies present");
                if rec.journal.new_vault_version.is_none() {
                    rec.journal.new_vault_version = Some(current.version);
                }
                self.forward(target, &mut rec, Step::Sync, Some(current.key), &control)
                    .await
                    .map(Some)
            }
            step => {
                let Some(current) = current.filter(|_| published) else {
                    // Someone replaced the key; retiring now could kill what Vault serves.
                    return self
                        .fail(
                            &mut rec,
                            "Vault no longer holds this rotation's key; stopping without retiring"
                                .into(),
                        )
                        .await
                        .map(Some);
                };
                self.forward(target, &mut rec, step, Some(current.key), &control)
                    .await
                    .map(Some)
            }
        }
    }

    /// Run the steps from `from` on. `key` is the new key when it is already minted.
    async fn forward(
        &self,
        target: &Target,
        rec: &mut Record,
        from: Step,
        mut key: Option<Secret>,
        control: &RotationControl,
    ) -> Result<Journal, EngineError> {
        let mut step = from;
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
                    let k = key.as_ref().expect("minted before publish");
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
                    self.begin(rec, Step::Roll).await?;
                    if control.revoke_first() && !rec.journal.old_retired {
                        rec.journal.revoke_first = true;
                        self.retire_old(target, rec, "revoke_first").await?;
                    }
                    if let Err(StepFailure(why)) = self.roll(target, rec).await {
                        return self.rollback(target, rec, why).await;
                    }
                    self.finish(rec, "ok").await?;
                    step = Step::Verify;
                }
                Step::Verify => {
                    self.begin(rec, Step::Verify).await?;
                    let k = key.as_ref().expect("key known before verify");
                    if let Err(StepFailure(why)) = self.verify(target, rec, k).await {
                        return self.rollback(target, rec, why).await;
                    }
                    self.finish(rec, "ok").await?;
                    step = Step::Drain;
                }
                Step::Drain => {
                    self.begin(rec, Step::Drain).await?;
                    let Some(outcome) = self.drain(target, rec, control).await else {
                        // Shutdown or lost leadership mid-wait: resume serves the rest.
                        return Err(EngineError::Stopped {
                            rotation_id: rec.journal.rotation_id.clone(),
                            step: Step::Drain,
                        });
                    };
                    self.finish(rec, &outcome).await?;
                    step = Step::Retire;
                }
                Step::Retire => {
                    self.begin(rec, Step::Retire).await?;
                    let outcome = if rec.journal.old_retired {
                        "skipped (already deleted)".to_string()
                    } else if rec
                        .journal
                        .pending_deletions
                        .iter()
                        .any(|p| Some(&p.account) == rec.journal.old_account.as_ref())
                    {
                        "kept (drain policy); pending deletion".to_string()
                    } else if rec.journal.old_account.is_none() {
                        "skipped (old account unknown)".to_string()
                    } else {
                        self.retire_old(target, rec, "retire").await?
                    };
                    self.finish(rec, &outcome).await?;
                    for w in &target.workloads {
                        let _ = self
                            .roller
                            .event(
                                w,
                                EventType::Normal,
                                "RotationCompleted",
                                &format!(
                                    "rotation {} completed: the new key is verified ({outcome})",
                                    rec.journal.rotation_id
                                ),
                            )
                            .await;
                    }
                    return self.conclude(rec, Status::Completed).await;
                }
                Step::Rollback => {
                    let why = rec.journal.error.clone().unwrap_or_default();
                    return self.rollback(target, rec, why).await;
                }
            }
        }
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "mint"))]
    async fn mint(&self, target: &Target, rec: &mut Record) -> Result<Secret, EngineError> {
        let name = rec.journal.new_account_name.clone();
        let minted = match self
            .issuer
            .create_service_account(&target.project_id, &name)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                // The create may have happened with its answer lost: clean up by name.
                if let Ok(accounts) = self.issuer.list_service_accounts(&target.project_id).await {
                    for a in accounts.into_iter().filter(|a| a.name == name) {
                        if self
                            .issuer
                            .delete_service_account(&target.project_id, &a.id)
                            .await
                            .is_ok()
                        {
                            self.observer.on_event(
                                &rec.journal,
                                &RotationEvent::AccountDeleted {
                                    account_id: a.id,
                                    why: "failed mint",
                                },
                            );
                        }
                    }
                }
                return Err(EngineError::Backend(e));
            }
        };
        self.crash_check(CrashPoint::AfterMintCall)?;
        rec.journal.new_account = Some(minted.account.clone());
        rec.journal.new_key_sha256 = Some(minted.key.sha256_hex());
        Ok(minted.key)
    }

    /// Ok(Err(reason)) = nothing was published (CAS conflict): abandon cleanly.
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
            key_created_at: Some(Utc::now()),
        };
        match self
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
                Ok(Ok(()))
            }
            Err(BackendError::Conflict { message, .. }) => Ok(Err(format!(
                "publish: Vault {} changed since the rotation started (check-and-set on version {} failed: {message}); nothing was published",
                target.vault_path, rec.journal.old_vault_version
            ))),
            Err(e) => {
                // The write may or may not have landed: find out before deciding anything.
                match self
                    .store
                    .read_key(&target.vault_path, &target.vault_field)
                    .await
                {
                    Ok(Some(c)) if c.key.sha256_hex() == key.sha256_hex() => {
                        rec.journal.new_vault_version = Some(c.version);
                        Ok(Ok(()))
                    }
                    Ok(c) if c.as_ref().map_or(0, |c| c.version) == rec.journal.old_vault_version => {
                        Ok(Err(format!("publish failed, nothing written: {e}")))
                    }
                    _ => Err(Self::interrupted(rec, e)),
                }
            }
        }
    }

    /// Publish did not happen: delete the new account and fail. Vault still serves the old
    /// key, which still lives.
    async fn abandon_unpublished(
        &self,
        target: &Target,
        rec: &mut Record,
        reason: String,
    ) -> Result<Journal, EngineError> {
        if let Some(a) = rec.journal.new_account.clone() {
            match self
                .issuer
                .delete_service_account(&target.project_id, &a.id)
                .await
            {
                Ok(()) => self.observer.on_event(
                    &rec.journal,
                    &RotationEvent::AccountDeleted {
                        account_id: a.id,
                        why: "unpublished",
                    },
                ),
                Err(e) => rec.journal.pending_deletions.push(PendingDeletion {
                    account: a,
                    unless_pods_carry: None,
                    once_quiet_for_ms: None,
                    attempts: 1,
                    last_error: Some(e.to_string()),
                }),
            }
        }
        self.fail(rec, reason).await
    }

    async fn fail(&self, rec: &mut Record, reason: String) -> Result<Journal, EngineError> {
        tracing::error!(rotation_id = %rec.journal.rotation_id, target = %rec.journal.target, error = %reason, "rotation failed");
        if rec.journal.step_state == StepState::Started {
            rec.journal.finish(reason.clone(), Utc::now());
        }
        rec.journal.error = Some(reason);
        self.conclude(rec, Status::Failed).await
    }

    async fn conclude(&self, rec: &mut Record, status: Status) -> Result<Journal, EngineError> {
        rec.journal.status = status;
        self.save(rec).await?;
        // History copy for `GET /v1/rotations/{id}` once the target moves on; best effort.
        let doc = serde_json::to_value(&rec.journal).expect("journal serializes");
        if let Err(e) = self
            .store
            .write_doc(&self.history_path(&rec.journal.rotation_id), &doc, 0)
            .await
        {
            tracing::warn!(error = %e, "could not write rotation history");
        }
        self.observer
            .on_event(&rec.journal, &RotationEvent::Finished);
        Ok(rec.journal.clone())
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "sync"))]
    async fn sync(&self, target: &Target, rec: &mut Record) -> Result<(), StepFailure> {
        let s = target.synced_secret.as_ref().expect("checked by caller");
        let want = rec.journal.new_key_sha256.clone().unwrap_or_default();
        if let Some(annotation) = &s.force_sync_annotation {
            if let Err(e) = self
                .roller
                .nudge_secret(&s.namespace, &s.name, annotation, &rec.journal.rotation_id)
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
                return Err(StepFailure(format!(
                    "sync: Secret {}/{} did not receive the new key within {:?}",
                    s.namespace, s.name, s.timeout
                )));
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "roll"))]
    async fn roll(&self, target: &Target, rec: &mut Record) -> Result<(), StepFailure> {
        for w in &target.workloads {
            self.roller
                .roll(w, &rec.journal.rotation_id)
                .await
                .map_err(|e| StepFailure(format!("roll {w}: {e}")))?;
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
        Ok(())
    }

    /// Every workload completes its rollout (kubectl's rule, pods carrying the id) within
    /// the timeout; then the smoke tests.
    async fn wait_rollouts(
        &self,
        target: &Target,
        rollout_id: &str,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut pending: BTreeMap<_, String> = target
            .workloads
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
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (w, why) = pending.iter().next().expect("non-empty");
                return Err(format!("{w}: not rolled out in time ({why})"));
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }

    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "verify"))]
    async fn verify(
        &self,
        target: &Target,
        rec: &mut Record,
        key: &Secret,
    ) -> Result<(), StepFailure> {
        let deadline = Instant::now() + target.rollout_timeout.get();
        self.wait_rollouts(target, &rec.journal.rotation_id, deadline)
            .await
            .map_err(|e| StepFailure(format!("verify: {e}")))?;
        // The new key answers; a few tries, as a new key can take a moment to propagate.
        let mut last = None;
        for attempt in 0..3 {
            match self.issuer.check_key(key).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            if attempt < 2 {
                tokio::time::sleep(self.opts.poll_interval).await;
            }
        }
        if let Some(e) = last {
            return Err(StepFailure(format!(
                "verify: the new key does not answer GET /v1/models: {e}"
            )));
        }
        for probe in &target.smoke_probes {
            self.probe(probe, deadline)
                .await
                .map_err(|e| StepFailure(format!("verify: smoke probe {}: {e}", probe.url)))?;
        }
        Ok(())
    }

    async fn probe(&self, probe: &SmokeProbe, deadline: Instant) -> Result<(), String> {
        let mut streak = 0;
        let mut last = String::from("no attempt");
        // At least enough time for the required streak, even near the rollout deadline.
        let min_window = probe.interval.get() * (probe.consecutive_successes + 2);
        let deadline = deadline.max(Instant::now() + min_window);
        loop {
            match self
                .http
                .get(&probe.url)
                .timeout(probe.timeout.get())
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == probe.expect_status => {
                    streak += 1;
                    if streak >= probe.consecutive_successes {
                        return Ok(());
                    }
                }
                Ok(r) => {
                    streak = 0;
                    last = format!(
                        "HTTP {} (want {})",
                        r.status().as_u16(),
                        probe.expect_status
                    );
                }
                Err(e) => {
                    streak = 0;
                    last = if e.is_timeout() {
                        "timed out".into()
                    } else {
                        "connection failed".into()
                    };
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{streak}/{} consecutive successes; last: {last}",
                    probe.consecutive_successes
                ));
            }
            tokio::time::sleep(probe.interval.get()).await;
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
        // On resume, count the grace already served.
        let started = rec
            .journal
            .step_started_at(Step::Drain)
            .unwrap_or_else(Utc::now);
        let served = (Utc::now() - started).to_std().unwrap_or_default();
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
            let now = Utc::now();
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
                        rec.journal.pending_deletions.push(PendingDeletion {
                            account: old,
                            unless_pods_carry: None,
                            once_quiet_for_ms: Some(d.quiet_for.get().as_millis().max(1) as u64),
                            attempts: 0,
                            last_error: Some("old key still in use after drain.max_wait".into()),
                        });
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

    /// Delete the old account with bounded retries; on failure leave it pending (the
    /// rotation still completes: the new key is verified and current).
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "retire"))]
    async fn retire_old(
        &self,
        target: &Target,
        rec: &mut Record,
        why: &'static str,
    ) -> Result<String, EngineError> {
        let Some(old) = rec.journal.old_account.clone() else {
            return Ok("skipped (old account unknown)".into());
        };
        let mut last = None;
        for attempt in 0..self.opts.retire_attempts.max(1) {
            match self
                .issuer
                .delete_service_account(&target.project_id, &old.id)
                .await
            {
                Ok(()) => {
                    rec.journal.old_retired = true;
                    self.save(rec).await?;
                    self.observer.on_event(
                        &rec.journal,
                        &RotationEvent::AccountDeleted {
                            account_id: old.id.clone(),
                            why,
                        },
                    );
                    return Ok(format!("ok (deleted {})", old.id));
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(self.opts.retire_backoff * 2u32.saturating_pow(attempt)).await;
        }
        let e = last.expect("at least one attempt");
        rec.journal.pending_deletions.push(PendingDeletion {
            account: old.clone(),
            unless_pods_carry: None,
            once_quiet_for_ms: None,
            attempts: self.opts.retire_attempts,
            last_error: Some(e.to_string()),
        });
        Ok(format!("{} pending deletion: {e}", old.id))
    }

    /// Put the old key back (as a new Vault version), roll again, delete the new account.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "rollback"))]
    async fn rollback(
        &self,
        target: &Target,
        rec: &mut Record,
        why: String,
    ) -> Result<Journal, EngineError> {
        tracing::warn!(rotation_id = %rec.journal.rotation_id, target = %target.name, reason = %why, "rolling back");
        if rec.journal.step_state == StepState::Started && rec.journal.step != Step::Rollback {
            rec.journal.finish(why.clone(), Utc::now());
        }
        rec.journal.status = Status::RollingBack;
        rec.journal.error = Some(why.clone());
        if rec.journal.step != Step::Rollback {
            self.begin(rec, Step::Rollback).await?;
        }
        if rec.journal.old_retired {
            // revoke_first: the old key is dead; the new one stays, whatever its state.
            let reason =
                format!("{why}; no rollback: the old account was already revoked (revoke_first)");
            rec.journal
                .finish("impossible (old account revoked)", Utc::now());
            for w in &target.workloads {
                let _ = self
                    .roller
                    .event(
                        w,
                        EventType::Warning,
                        "RotationFailed",
                        &format!("rotation {} failed: {reason}", rec.journal.rotation_id),
                    )
                    .await;
            }
            rec.journal.error = Some(reason);
            return self.conclude(rec, Status::Failed).await;
        }
        if rec.journal.old_vault_version == 0 {
            let reason = format!("{why}; no rollback: there was no previous key");
            rec.journal
                .finish("impossible (no previous key)", Utc::now());
            rec.journal.error = Some(reason);
            return self.conclude(rec, Status::Failed).await;
        }
        // 1. Vault serves the old key again (only if it still serves ours).
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await
            .map_err(|e| Self::interrupted(rec, e))?;
        match current {
            Some(c) if Some(c.key.sha256_hex()) == rec.journal.new_key_sha256 => {
                let old_key = self
                    .store
                    .read_key_version(
                        &target.vault_path,
                        &target.vault_field,
                        rec.journal.old_vault_version,
                    )
                    .await
                    .map_err(|e| Self::interrupted(rec, e))?;
                let meta = KeyMeta {
                    account: rec.journal.old_account.clone(),
                    rotation_id: rec.journal.old_rotation_id.clone(),
                    key_created_at: rec.journal.old_key_created_at,
                };
                let v = self
                    .store
                    .write_key(
                        &target.vault_path,
                        &target.vault_field,
                        &old_key,
                        &meta,
                        c.version,
                    )
                    .await
                    .map_err(|e| Self::interrupted(rec, e))?;
                rec.journal.rollback_vault_version = Some(v);
                self.save(rec).await?;
            }
            _ => {} // already restored (resumed rollback) or replaced by someone else
        }
        // 2. Roll again so pods that took the new key go back to the old one.
        let rolled = rec.journal.steps.iter().any(|s| s.step == Step::Roll);
        let rb_id = format!("{}-rollback", rec.journal.rotation_id);
        let mut rolled_back_cleanly = true;
        if rolled {
            for w in &target.workloads {
                if let Err(e) = self.roller.roll(w, &rb_id).await {
                    tracing::error!(workload = %w, error = %e, "rollback roll failed");
                    rolled_back_cleanly = false;
                }
                let _ = self
                    .roller
                    .event(
                        w,
                        EventType::Warning,
                        "RotationRolledBack",
                        &format!("rotation {} rolled back: {why}", rec.journal.rotation_id),
                    )
                    .await;
            }
            if rolled_back_cleanly {
                let deadline = Instant::now() + target.rollout_timeout.get();
                if let Err(e) = self.wait_rollouts(target, &rb_id, deadline).await {
                    tracing::error!(error = %e, "rollback rollout incomplete");
                    rolled_back_cleanly = false;
                }
            }
        }
        // 3. Delete the new account, but never under a ready pod that still uses it.
        let mut outcome = "ok".to_string();
        if let Some(new) = rec.journal.new_account.clone() {
            let safe = rolled_back_cleanly
                || !rolled
                || self
                    .pods_carrying(target, &rec.journal.rotation_id)
                    .await
                    .is_ok_and(|n| n == 0);
            let deleted = safe
                && self
                    .issuer
                    .delete_service_account(&target.project_id, &new.id)
                    .await
                    .is_ok();
            if deleted {
                self.observer.on_event(
                    &rec.journal,
                    &RotationEvent::AccountDeleted {
                        account_id: new.id,
                        why: "rollback",
                    },
                );
            } else if !rec
                .journal
                .pending_deletions
                .iter()
                .any(|p| p.account == new)
            {
                outcome = format!("new account {} pending deletion", new.id);
                rec.journal.pending_deletions.push(PendingDeletion {
                    account: new,
                    unless_pods_carry: rolled.then(|| rec.journal.rotation_id.clone()),
                    once_quiet_for_ms: None,
                    attempts: 1,
                    last_error: Some("rollback rollout incomplete or delete failed".into()),
                });
            }
        }
        rec.journal.finish(outcome, Utc::now());
        self.conclude(rec, Status::RolledBack).await
    }

    /// Ready pods, over all the target's workloads, that carry `rollout_id`.
    async fn pods_carrying(&self, target: &Target, rollout_id: &str) -> Result<u32, BackendError> {
        let mut n = 0;
        for w in &target.workloads {
            n += self.roller.ready_pods_with(w, rollout_id).await?;
        }
        Ok(n)
    }

    /// Retry deletions left pending by an earlier rotation of this target.
    async fn retry_pending(&self, target: &Target, rec: &mut Record) -> Result<(), EngineError> {
        let mut remaining = Vec::new();
        for mut p in std::mem::take(&mut rec.journal.pending_deletions) {
            if let Some(id) = &p.unless_pods_carry {
                if !self.pods_carrying(target, id).await.is_ok_and(|n| n == 0) {
                    remaining.push(p);
                    continue;
                }
            }
            if let Some(ms) = p.once_quiet_for_ms {
                let since = Utc::now() - chrono::Duration::milliseconds(ms as i64);
                let quiet = self
                    .issuer
                    .key_usage(&target.project_id, &p.account.key_id, since)
                    .await
                    .is_ok_and(|u| {
                        u.requests_since == 0 && u.last_used_at.is_none_or(|t| t <= since)
                    });
                if !quiet {
                    p.last_error = Some("old key still in use".into());
                    remaining.push(p);
                    continue;
                }
            }
            match self
                .issuer
                .delete_service_account(&target.project_id, &p.account.id)
                .await
            {
                Ok(()) => {
                    if Some(&p.account) == rec.journal.old_account.as_ref() {
                        rec.journal.old_retired = true;
                    }
                    self.observer.on_event(
                        &rec.journal,
                        &RotationEvent::AccountDeleted {
                            account_id: p.account.id.clone(),
                            why: "pending deletion",
                        },
                    );
                }
                Err(e) => {
                    p.attempts += 1;
                    p.last_error = Some(e.to_string());
                    remaining.push(p);
                }
            }
        }
        rec.journal.pending_deletions = remaining;
        self.save(rec).await
    }

    /// Delete managed accounts (our name prefix) that no journal and no Vault version
    /// references, older than `min_age`.
    pub async fn sweep(
        &self,
        targets: &[Target],
        min_age: Duration,
    ) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        let projects: BTreeSet<&str> = targets.iter().map(|t| t.project_id.as_str()).collect();
        for project in projects {
            let mut referenced = BTreeSet::new();
            let mut running = BTreeSet::new();
            for t in targets.iter().filter(|t| t.project_id == project) {
                if let Some((_, j)) = self.journal(&t.name).await? {
                    referenced.extend(j.referenced_accounts().map(|a| a.id.clone()));
                    if !j.status.is_terminal() {
                        running.insert(j.new_account_name.clone());
                    }
                }
                if let Some(c) = self.store.read_key(&t.vault_path, &t.vault_field).await? {
                    referenced.extend(c.meta.account.map(|a| a.id));
                }
            }
            let now = Utc::now();
            for a in self.issuer.list_service_accounts(project).await? {
                if parse_account_name(&self.opts.account_prefix, &a.name).is_none() {
                    continue; // not ours
                }
                if referenced.contains(&a.id) || running.contains(&a.name) {
                    report.kept_referenced += 1;
                    continue;
                }
                let age = (now - a.created_at).to_std().unwrap_or_default();
                if age < min_age {
                    report.kept_young += 1;
                    continue;
                }
                self.issuer.delete_service_account(project, &a.id).await?;
                tracing::info!(account = %a.id, name = %a.name, "swept orphaned service account");
                report.deleted.push(a.id);
            }
        }
        Ok(report)
    }
}
