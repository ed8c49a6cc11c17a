//! The long-running service: resumes unfinished rotations, schedules every target, takes
//! triggers (signal, HTTP, CLI), keeps one rotation per target and a global bound, and shuts
//! down between steps.

use crate::config::{Config, Target};
use crate::rotation::ports::SecretStore;
use crate::rotation::{
    Engine, EngineError, Journal, Observer, RotationControl, RotationEvent, RotationRequest,
    Status, Stored, Trigger,
};
use crate::scheduler::{next_due, Backoff, Due, TargetHistory};
use crate::sync::{LockExt, RwLockExt};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub backoff: Backoff,
    /// How often orphaned managed accounts are swept.
    pub sweep_interval: Duration,
    /// How often finished rotations' pending deletions (and interrupted rotations) are retried.
    pub pending_retry_interval: Duration,
    /// The scheduler re-reads key ages at least this often.
    pub max_sleep: Duration,
    /// On shutdown, how long running steps may take to finish.
    pub shutdown_grace: Duration,
    /// Who this replica is (for "not leader" answers).
    pub identity: String,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            backoff: Backoff::default(),
            sweep_interval: Duration::from_secs(3600),
            pending_retry_interval: Duration::from_secs(300),
            max_sleep: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(60),
            identity: "openai-key-rotator".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// A new rotation with this id (it may wait for a free slot).
    Started(String),
    /// The target was mid-rotation; that rotation became an emergency one.
    Upgraded(String),
}

impl Accepted {
    pub fn rotation_id(&self) -> &str {
        match self {
            Accepted::Started(id) | Accepted::Upgraded(id) => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("unknown target {0:?}")]
    UnknownTarget(String),
    #[error("target {target} is already rotating (rotation {rotation_id})")]
    AlreadyRunning { target: String, rotation_id: String },
    #[error("this replica is not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// A configuration the running daemon refuses to take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("{field} cannot change while the daemon runs: {why}")]
    Field {
        field: &'static str,
        why: &'static str,
    },
}

/// Hears schedule changes (metrics).
pub trait ScheduleObserver: Send + Sync {
    fn next_rotation(&self, target: &str, at: Option<DateTime<Utc>>);
    fn key_created(&self, target: &str, at: Option<DateTime<Utc>>);
    fn rotation_requested(&self, request: &RotationRequest, rotation_id: &str);
    fn trigger_refused(&self, request: &RotationRequest, error: &TriggerError);
    fn rotation_upgraded(&self, request: &RotationRequest, rotation_id: &str);
    /// The sweep deleted these orphaned managed accounts.
    fn swept(&self, account_ids: &[String]);
}

pub struct NoSchedule;
impl ScheduleObserver for NoSchedule {
    fn next_rotation(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn key_created(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn rotation_requested(&self, _: &RotationRequest, _: &str) {}
    fn trigger_refused(&self, _: &RotationRequest, _: &TriggerError) {}
    fn rotation_upgraded(&self, _: &RotationRequest, _: &str) {}
    fn swept(&self, _: &[String]) {}
}

/// Live journals of recent rotations, fed by the engine's events (for the API).
#[derive(Default)]
pub struct LiveRotations {
    journals: Mutex<BTreeMap<String, Journal>>,
}

const KEEP_RECENT: usize = 500;

impl LiveRotations {
    pub fn get(&self, id: &str) -> Option<Journal> {
        self.journals.locked().get(id).cloned()
    }
    fn put(&self, j: &Journal) {
        let mut m = self.journals.locked();
        m.insert(j.rotation_id.clone(), j.clone());
        // Ids sort by time: drop the oldest finished ones beyond the bound.
        while m.len() > KEEP_RECENT {
            let oldest = m
                .iter()
                .find(|(_, j)| j.status.is_terminal())
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => m.remove(&k),
                None => break,
            };
        }
    }
}

impl Observer for LiveRotations {
    fn on_event(&self, journal: &Journal, _event: &RotationEvent) {
        self.put(journal);
    }
}

/// Fan one event stream out to several observers.
pub struct Fanout(pub Vec<Arc<dyn Observer>>);
impl Observer for Fanout {
    fn on_event(&self, journal: &Journal, event: &RotationEvent) {
        for o in &self.0 {
            o.on_event(journal, event);
        }
    }
}

#[derive(Debug, Default, Clone)]
struct TargetState {
    history: TargetHistory,
    next: Option<Due>,
    running: Option<Running>,
    last: Option<(String, Status, DateTime<Utc>)>,
    /// Accounts the last rotation left to delete (retried every `pending_retry_interval`).
    pending_deletions: Vec<String>,
}

/// What a rotation task does.
enum Work {
    Rotate(RotationRequest),
    Resume(Box<Stored>),
}

#[derive(Debug, Clone)]
struct Running {
    id: String,
    control: Arc<RotationControl>,
}

/// What `GET /v1/targets` shows for one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub state: &'static str,
    pub running_rotation: Option<String>,
    pub last_rotation: Option<String>,
    pub last_outcome: Option<&'static str>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub next_rotation_at: Option<DateTime<Utc>>,
    pub next_trigger: Option<&'static str>,
    pub key_created_at: Option<DateTime<Utc>>,
    pub key_age_seconds: Option<i64>,
    pub consecutive_failures: u32,
    /// Service accounts still to be deleted (their keys still work).
    pub pending_deletions: Vec<String>,
}

struct Inner {
    config: RwLock<Arc<Config>>,
    engine: Arc<Engine>,
    store: Arc<dyn SecretStore>,
    live: Arc<LiveRotations>,
    schedule_obs: Arc<dyn ScheduleObserver>,
    targets: Mutex<BTreeMap<String, TargetState>>,
    slots: Arc<Semaphore>,
    /// The configured size of `slots` (permits in use are not visible on the semaphore).
    slot_limit: Mutex<usize>,
    wake: Notify,
    opts: DaemonOptions,
    leader: watch::Receiver<bool>,
    leader_name: watch::Receiver<Option<String>>,
    _leadership_senders: Option<(watch::Sender<bool>, watch::Sender<Option<String>>)>,
    accepting: AtomicBool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Cloneable handle to the running daemon.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

/// Who leads: "am I the leader" and "who is", as watch channels.
pub struct Leadership {
    pub is_leader: watch::Receiver<bool>,
    pub holder: watch::Receiver<Option<String>>,
    /// For a single replica: the senders, kept so the channels never close.
    _fixed: Option<(watch::Sender<bool>, watch::Sender<Option<String>>)>,
}

impl Leadership {
    /// A single replica: always the leader.
    pub fn sole() -> Leadership {
        let (tx, is_leader) = watch::channel(true);
        let (htx, holder) = watch::channel(None);
        Leadership {
            is_leader,
            holder,
            _fixed: Some((tx, htx)),
        }
    }

    /// Channels fed by a leader elector.
    pub fn elected(
        is_leader: watch::Receiver<bool>,
        holder: watch::Receiver<Option<String>>,
    ) -> Leadership {
        Leadership {
            is_leader,
            holder,
            _fixed: None,
        }
    }
}

impl Daemon {
    /// `engine` must report to `live` (directly or through a [`Fanout`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        engine: Arc<Engine>,
        store: Arc<dyn SecretStore>,
        live: Arc<LiveRotations>,
        schedule_obs: Arc<dyn ScheduleObserver>,
        leadership: Leadership,
        opts: DaemonOptions,
        shutdown: CancellationToken,
    ) -> Daemon {
        let targets = config
            .targets
            .iter()
            .map(|t| (t.name.clone(), TargetState::default()))
            .collect();
        let limit = config.daemon.max_concurrent_rotations.max(1);
        let slots = Arc::new(Semaphore::new(limit));
        Daemon {
            inner: Arc::new(Inner {
                config: RwLock::new(config),
                engine,
                store,
                live,
                schedule_obs,
                targets: Mutex::new(targets),
                slots,
                slot_limit: Mutex::new(limit),
                wake: Notify::new(),
                opts,
                leader: leadership.is_leader,
                leader_name: leadership.holder,
                _leadership_senders: leadership._fixed,
                accepting: AtomicBool::new(true),
                tasks: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner.config.read_now().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.inner.leader.borrow()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Swap in a new, already validated configuration. Targets removed from it keep running
    /// rotations to the end; new targets are scheduled at once; `account_prefix` and
    /// `max_concurrent_rotations` apply to rotations started from now on. A change that
    /// cannot be applied safely to a running daemon is refused and nothing changes.
    pub fn reload(&self, config: Arc<Config>) -> Result<(), ReloadError> {
        let old = self.config();
        if old.daemon.state_prefix != config.daemon.state_prefix {
            return Err(ReloadError::Field {
                field: "daemon.state_prefix",
                why: "the journals of running and finished rotations live under it; restart the daemon to change it",
            });
        }
        {
            let mut targets = self.inner.targets.locked();
            targets.retain(|name, st| config.target(name).is_some() || st.running.is_some());
            for t in &config.targets {
                targets.entry(t.name.clone()).or_default();
            }
        }
        self.inner
            .engine
            .set_account_prefix(&config.daemon.account_prefix);
        self.resize_slots(config.daemon.max_concurrent_rotations.max(1));
        *self.inner.config.write_now() = config;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Grow at once; shrink by retiring permits as running rotations return them.
    fn resize_slots(&self, want: usize) {
        let mut limit = self.inner.slot_limit.locked();
        if want > *limit {
            self.inner.slots.add_permits(want - *limit);
        } else if want < *limit {
            let (slots, n) = (self.inner.slots.clone(), (*limit - want) as u32);
            self.inner.tasks.spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
        *limit = want;
    }

    /// Rotate a target now (or upgrade its running rotation to an emergency).
    pub fn trigger(&self, req: &RotationRequest) -> Result<Accepted, TriggerError> {
        let result = self.try_trigger(req);
        match &result {
            Err(e) => self.inner.schedule_obs.trigger_refused(req, e),
            Ok(Accepted::Upgraded(id)) => self.inner.schedule_obs.rotation_upgraded(req, id),
            Ok(Accepted::Started(id)) => self.inner.schedule_obs.rotation_requested(req, id),
        }
        result
    }

    fn try_trigger(&self, req: &RotationRequest) -> Result<Accepted, TriggerError> {
        let config = self.config();
        let Some(target) = config.target(&req.target).cloned() else {
            return Err(TriggerError::UnknownTarget(req.target.clone()));
        };
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(TriggerError::ShuttingDown);
        }
        if !self.is_leader() {
            return Err(TriggerError::NotLeader {
                leader: self.inner.leader_name.borrow().clone(),
            });
        }
        let mut targets = self.inner.targets.locked();
        let st = targets.entry(target.name.clone()).or_default();
        if let Some(r) = &st.running {
            if req.emergency {
                r.control.upgrade_to_emergency(req.revoke_first);
                return Ok(Accepted::Upgraded(r.id.clone()));
            }
            return Err(TriggerError::AlreadyRunning {
                target: target.name.clone(),
                rotation_id: r.id.clone(),
            });
        }
        if req.is_manual() {
            // A person asked: the failure back-off no longer applies.
            st.history.consecutive_failures = 0;
        }
        let id = req.rotation_id.clone();
        // Visible at once (queued for a slot), until the engine's first event replaces it.
        self.inner
            .live
            .put(&Journal::queued(req, &config.daemon.account_prefix));
        let control = Arc::new(RotationControl::default());
        st.running = Some(Running {
            id: id.clone(),
            control: control.clone(),
        });
        drop(targets);
        let this = self.clone();
        let request = req.clone();
        self.inner.tasks.spawn(async move {
            this.run_rotation(target, Work::Rotate(request), control)
                .await
        });
        Ok(Accepted::Started(id))
    }

    /// One rotation or resume, holding a concurrency slot.
    async fn run_rotation(&self, target: Target, work: Work, control: Arc<RotationControl>) {
        let permit = tokio::select! {
            p = self.inner.slots.clone().acquire_owned() => p.ok(),
            _ = self.inner.shutdown.cancelled() => None,
        };
        let engine = &self.inner.engine;
        let result = match permit {
            None => None,
            Some(_permit) => Some(match work {
                Work::Rotate(req) => match engine.journal(&target.name).await {
                    Ok(prior) => engine.rotate(&target, req, prior, control).await.map(Some),
                    Err(e) => Err(e),
                },
                Work::Resume(stored) => engine
                    .resume(Some(&target), *stored, control)
                    .await
                    .map(Some),
            }),
        };
        let now = Utc::now();
        let mut targets = self.inner.targets.locked();
        let st = targets.entry(target.name.clone()).or_default();
        st.running = None;
        match result {
            None => {}
            Some(Ok(Some(j))) => {
                st.last = Some((j.rotation_id.clone(), j.status, now));
                st.pending_deletions = j
                    .pending_deletions
                    .iter()
                    .map(|p| p.account.id.clone())
                    .collect();
                match j.status {
                    Status::Completed => {
                        st.history.consecutive_failures = 0;
                        st.history.last_failure_at = None;
                        // Until the next Vault read, the publish time is the key's age.
                        if let Some(t) = j
                            .steps
                            .iter()
                            .rev()
                            .find(|s| s.step == crate::rotation::Step::Publish)
                            .and_then(|s| s.finished_at)
                        {
                            st.history.key_created_at = Some(t);
                        }
                    }
                    Status::RolledBack | Status::Failed => {
                        st.history.consecutive_failures += 1;
                        st.history.last_failure_at = Some(now);
                    }
                    Status::Running | Status::RollingBack => {}
                }
            }
            Some(Ok(None)) => {}
            Some(Err(EngineError::Stopped { .. })) => {
                tracing::info!(target = %target.name, "rotation stopped for shutdown; it resumes on restart");
            }
            Some(Err(EngineError::Busy { rotation_id, .. })) => {
                tracing::warn!(target = %target.name, %rotation_id, "an unfinished rotation holds this target; resuming it");
                st.history.last_failure_at = Some(now);
            }
            Some(Err(e)) => {
                tracing::error!(target = %target.name, error = %e, "rotation interrupted; it will be resumed");
                st.history.consecutive_failures += 1;
                st.history.last_failure_at = Some(now);
            }
        }
        drop(targets);
        self.inner.wake.notify_one();
    }

    /// Resume what a previous run left unfinished (and retry pending deletions).
    fn resume_all(&self) {
        let config = self.config();
        for target in config.targets.iter().cloned() {
            if self.running(&target.name).is_some() {
                continue;
            }
            let this = self.clone();
            self.inner.tasks.spawn(async move {
                let journal = match this.inner.engine.journal(&target.name).await {
                    Ok(j) => j,
                    Err(e) => {
                        tracing::warn!(target = %target.name, error = %e, "cannot read the journal");
                        return;
                    }
                };
                let Some(stored) = journal else { return };
                let j = &stored.journal;
                if j.status.is_terminal() && j.pending_deletions.is_empty() {
                    return;
                }
                let control = Arc::new(RotationControl::default());
                {
                    let mut targets = this.inner.targets.locked();
                    let st = targets.entry(target.name.clone()).or_default();
                    if st.running.is_some() {
                        return;
                    }
                    st.running = Some(Running {
                        id: j.rotation_id.clone(),
                        control: control.clone(),
                    });
                }
                this.run_rotation(target, Work::Resume(Box::new(stored)), control)
                    .await
            });
        }
    }

    /// Refresh key ages from Vault and recompute every target's next rotation.
    async fn refresh(&self) -> Vec<(String, Due)> {
        let config = self.config();
        let now = Utc::now();
        let mut due_now = Vec::new();
        for t in &config.targets {
            let created = match self
                .inner
                .store
                .read_key_meta(&t.vault_path, &t.vault_field)
                .await
            {
                Ok(Some(meta)) => Some(meta.key_created_at),
                Ok(None) => Some(None),
                Err(e) => {
                    tracing::warn!(target = %t.name, error = %e, "cannot read the key's age from Vault");
                    None
                }
            };
            let mut targets = self.inner.targets.locked();
            let st = targets.entry(t.name.clone()).or_default();
            if let Some(created) = created {
                st.history.key_created_at = created;
            }
            st.next = next_due(t, &st.history, now, &self.inner.opts.backoff);
            self.inner
                .schedule_obs
                .key_created(&t.name, st.history.key_created_at);
            self.inner
                .schedule_obs
                .next_rotation(&t.name, st.next.map(|d| d.at));
            if let Some(d) = st.next {
                if d.at <= now && st.running.is_none() {
                    due_now.push((t.name.clone(), d));
                }
            }
        }
        due_now
    }

    /// Time until the earliest next rotation (bounded by `max_sleep`).
    fn sleep_for(&self) -> Duration {
        let now = Utc::now();
        let targets = self.inner.targets.locked();
        targets
            .values()
            .filter(|s| s.running.is_none())
            .filter_map(|s| s.next)
            .map(|d| (d.at - now).to_std().unwrap_or_default())
            .min()
            .unwrap_or(self.inner.opts.max_sleep)
            .min(self.inner.opts.max_sleep)
    }

    /// Run until shutdown: resume, then schedule, sweep and retry. Returns after running
    /// steps finished (or the grace period passed).
    pub async fn run(&self) {
        let mut leader = self.inner.leader.clone();
        let mut resumed = false;
        let mut last_sweep: Option<tokio::time::Instant> = None;
        let mut last_retry = tokio::time::Instant::now();
        while !self.inner.shutdown.is_cancelled() {
            if !*leader.borrow() {
                if resumed {
                    // Lost the lease: stop starting steps; the new leader resumes from the journal.
                    tracing::warn!(
                        "not the leader any more: stopping running rotations between steps"
                    );
                    self.stop_running();
                }
                resumed = false;
                tokio::select! {
                    changed = leader.changed() => {
                        if changed.is_err() {
                            // The elector is gone: never lead again; wait for shutdown.
                            tracing::error!("leader election stopped; this replica stays a follower");
                            self.inner.shutdown.cancelled().await;
                            break;
                        }
                        continue;
                    }
                    _ = self.inner.shutdown.cancelled() => break,
                }
            }
            if !resumed {
                self.resume_all();
                resumed = true;
                last_retry = tokio::time::Instant::now();
            }
            for (name, due) in self.refresh().await {
                let reason = match due.trigger {
                    Trigger::MaxAge => "key older than max_key_age",
                    _ => "scheduled",
                };
                let req = RotationRequest::new(&name, due.trigger, "schedule", reason, Utc::now());
                match self.trigger(&req) {
                    Ok(a) => {
                        tracing::info!(target = %name, rotation_id = %a.rotation_id(), trigger = due.trigger.as_str(), "scheduled rotation started")
                    }
                    Err(e) => {
                        tracing::debug!(target = %name, error = %e, "scheduled rotation not started")
                    }
                }
            }
            if last_retry.elapsed() >= self.inner.opts.pending_retry_interval {
                self.resume_all();
                last_retry = tokio::time::Instant::now();
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.inner.opts.sweep_interval) {
                self.sweep_in_background();
                last_sweep = Some(tokio::time::Instant::now());
            }
            let sleep = self.sleep_for();
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.inner.wake.notified() => {}
                changed = leader.changed() => {
                    if changed.is_err() {
                        tracing::error!("leader election stopped; stopping rotations");
                        self.stop_running();
                        self.inner.shutdown.cancelled().await;
                        break;
                    }
                }
                _ = self.inner.shutdown.cancelled() => break,
            }
        }
        self.drain_for_shutdown().await;
    }

    fn sweep_in_background(&self) {
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            let config = this.config();
            let min_age = config.daemon.sweep_min_age.get();
            match this.inner.engine.sweep(&config.targets, min_age).await {
                Ok(r) if !r.deleted.is_empty() => {
                    tracing::warn!(deleted = ?r.deleted, "swept orphaned managed service accounts");
                    this.inner.schedule_obs.swept(&r.deleted);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        });
    }

    fn stop_running(&self) {
        for st in self.inner.targets.locked().values() {
            if let Some(r) = &st.running {
                r.control.request_stop();
            }
        }
    }

    /// Stop taking work, ask running rotations to stop between steps, wait (bounded).
    async fn drain_for_shutdown(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
        self.stop_running();
        self.inner.tasks.close();
        if tokio::time::timeout(self.inner.opts.shutdown_grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.inner.opts.shutdown_grace,
                "running steps did not finish in time; exiting, the journal resumes them"
            );
        }
    }

    /// A rotation by id: live if recent, else from the journal history in Vault.
    pub async fn rotation(&self, id: &str) -> Result<Option<Journal>, EngineError> {
        if let Some(j) = self.inner.live.get(id) {
            return Ok(Some(j));
        }
        self.inner.engine.history(id).await
    }

    pub fn targets(&self) -> Vec<TargetStatus> {
        let config = self.config();
        let now = Utc::now();
        let targets = self.inner.targets.locked();
        config
            .targets
            .iter()
            .map(|t| {
                let st = targets.get(&t.name).cloned().unwrap_or_default();
                TargetStatus {
                    name: t.name.clone(),
                    state: if st.running.is_some() {
                        "rotating"
                    } else if st.history.consecutive_failures > 0 {
                        "backing_off"
                    } else {
                        "idle"
                    },
                    running_rotation: st.running.as_ref().map(|r| r.id.clone()),
                    last_rotation: st.last.as_ref().map(|l| l.0.clone()),
                    last_outcome: st.last.as_ref().map(|l| l.1.as_str()),
                    last_finished_at: st.last.as_ref().map(|l| l.2),
                    next_rotation_at: st.next.map(|d| d.at),
                    next_trigger: st.next.map(|d| d.trigger.as_str()),
                    key_created_at: st.history.key_created_at,
                    key_age_seconds: st.history.key_created_at.map(|c| (now - c).num_seconds()),
                    consecutive_failures: st.history.consecutive_failures,
                    pending_deletions: st.pending_deletions.clone(),
                }
            })
            .collect()
    }

    /// The rotation id running for `target`, if any.
    pub fn running(&self, target: &str) -> Option<String> {
        self.inner
            .targets
            .locked()
            .get(target)
            .and_then(|s| s.running.as_ref().map(|r| r.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DurationStr, VaultConfig};
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::{EngineOptions, Step};

    fn config(targets: Vec<Target>, max_concurrent: usize) -> Arc<Config> {
        let mut c = Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                kv_mount: "secret".into(),
                ca_cert: None,
                request_timeout: DurationStr::from_secs(1),
                auth: Default::default(),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            targets,
        };
        c.daemon.max_concurrent_rotations = max_concurrent;
        Arc::new(c)
    }

    fn engine_opts() -> EngineOptions {
        EngineOptions {
            poll_interval: Duration::from_millis(2),
            drain_poll_interval: Duration::from_millis(10),
            delete_retry: crate::retry::RetryPolicy {
                max_retries: 2,
                base: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    struct Harness {
        world: FakeWorld,
        daemon: Daemon,
        live: Arc<LiveRotations>,
        shutdown: CancellationToken,
    }

    fn harness(world: FakeWorld, targets: Vec<Target>, max_concurrent: usize) -> Harness {
        let live = Arc::new(LiveRotations::default());
        let engine = Arc::new(world.engine(engine_opts()).with_observer(live.clone()));
        let shutdown = CancellationToken::new();
        let daemon = Daemon::new(
            config(targets, max_concurrent),
            engine,
            Arc::new(world.store.clone()),
            live.clone(),
            Arc::new(NoSchedule),
            Leadership::sole(),
            DaemonOptions {
                max_sleep: Duration::from_millis(50),
                shutdown_grace: Duration::from_secs(5),
                ..Default::default()
            },
            shutdown.clone(),
        );
        Harness {
            world,
            daemon,
            live,
            shutdown,
        }
    }

    fn manual(target: &str) -> RotationRequest {
        RotationRequest::new(target, Trigger::Api, "ops", "test", Utc::now())
    }

    async fn wait_finished(h: &Harness, id: &str) -> Journal {
        for _ in 0..2000 {
            if let Some(j) = h.daemon.rotation(id).await.unwrap() {
                if j.status.is_terminal() && h.daemon.running(&j.target).is_none() {
                    return j;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("rotation {id} did not finish");
    }

    #[tokio::test]
    async fn one_rotation_per_target_and_emergency_upgrades_the_running_one() {
        let world = FakeWorld::default();
        let (mut t, _) = world.seed_target("chat", Utc::now());
        t.grace_period = DurationStr(Duration::from_secs(3600));
        let h = harness(world, vec![t], 2);
        let id = match h.daemon.trigger(&manual("chat")).unwrap() {
            Accepted::Started(id) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            h.daemon.trigger(&manual("chat")),
            Err(TriggerError::AlreadyRunning {
                target: "chat".into(),
                rotation_id: id.clone()
            })
        );
        // Wait until it sits in the hour-long grace period, then upgrade.
        for _ in 0..1000 {
            if h.live.get(&id).is_some_and(|j| j.step == Step::Drain) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut emergency = manual("chat");
        emergency.emergency = true;
        assert_eq!(
            h.daemon.trigger(&emergency),
            Ok(Accepted::Upgraded(id.clone()))
        );
        let j = wait_finished(&h, &id).await;
        assert_eq!(j.status, Status::Completed);
        assert!(j.emergency);
        assert_eq!(j.actor, "ops");
        // The target is free again.
        assert!(matches!(
            h.daemon.trigger(&manual("chat")),
            Ok(Accepted::Started(_))
        ));
    }

    #[tokio::test]
    async fn refusals_are_explicit() {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", Utc::now());
        let h = harness(world, vec![t.clone()], 1);
        assert_eq!(
            h.daemon.trigger(&manual("nope")),
            Err(TriggerError::UnknownTarget("nope".into()))
        );
        // Not the leader.
        let (tx, rx) = watch::channel(false);
        let (_ntx, nrx) = watch::channel(Some("okr-0".to_string()));
        let live = Arc::new(LiveRotations::default());
        let follower = Daemon::new(
            config(vec![t], 1),
            Arc::new(h.world.engine(engine_opts())),
            Arc::new(h.world.store.clone()),
            live,
            Arc::new(NoSchedule),
            Leadership::elected(rx, nrx),
            DaemonOptions::default(),
            CancellationToken::new(),
        );
        assert_eq!(
            follower.trigger(&manual("chat")),
            Err(TriggerError::NotLeader {
                leader: Some("okr-0".into())
            })
        );
        drop(tx);
        // Shutting down.
        h.shutdown.cancel();
        h.daemon.run().await;
        assert_eq!(
            h.daemon.trigger(&manual("chat")),
            Err(TriggerError::ShuttingDown)
        );
    }

    #[tokio::test]
    async fn the_global_bound_queues_rotations() {
        let world = FakeWorld::default();
        let (a, _) = world.seed_target("a", Utc::now());
        let (b, _) = world.seed_target("b", Utc::now());
        let h = harness(world, vec![a, b], 1);
        let ia = h.daemon.trigger(&manual("a")).unwrap();
        let ib = h.daemon.trigger(&manual("b")).unwrap();
        let ja = wait_finished(&h, ia.rotation_id()).await;
        let jb = wait_finished(&h, ib.rotation_id()).await;
        assert_eq!(
            (ja.status, jb.status),
            (Status::Completed, Status::Completed)
        );
        // With one slot the second rotation started only after the first finished.
        let (first, second) = if ja.started_at <= jb.started_at {
            (&ja, &jb)
        } else {
            (&jb, &ja)
        };
        assert!(
            second.started_at >= first.updated_at,
            "{} vs {}",
            second.started_at,
            first.updated_at
        );
    }

    #[tokio::test]
    async fn schedule_rotates_an_overdue_key_once_then_waits() {
        let world = FakeWorld::default();
        let (mut t, old) = world.seed_target("chat", Utc::now() - chrono::Duration::days(40));
        t.max_key_age = Some(DurationStr::from_secs(30 * 86400));
        let h = harness(world, vec![t], 1);
        let d = h.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        // The overdue key is rotated by the scheduler...
        for _ in 0..2000 {
            if !h.world.issuer.account_ids().contains(&old.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !h.world.issuer.account_ids().contains(&old.id),
            "old key retired"
        );
        // ...exactly once: the new key is young, so nothing else happens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let creates = h
            .world
            .log
            .entries()
            .iter()
            .filter(|e| e.starts_with("create"))
            .count();
        assert_eq!(creates, 1, "{:#?}", h.world.log.entries());
        let status = h.daemon.targets();
        assert_eq!(status[0].last_outcome, Some("completed"));
        assert!(status[0].key_age_seconds.unwrap() < 60);
        assert_eq!(status[0].next_trigger, Some("max_age"));
        h.shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_between_steps_and_a_new_daemon_resumes() {
        let world = FakeWorld::default();
        let (mut t, old) = world.seed_target("chat", Utc::now());
        t.grace_period = DurationStr(Duration::from_millis(300));
        let h = harness(world.clone(), vec![t.clone()], 1);
        let d = h.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        let id = h
            .daemon
            .trigger(&manual("chat"))
            .unwrap()
            .rotation_id()
            .to_string();
        for _ in 0..1000 {
            if h.live.get(&id).is_some_and(|j| j.step == Step::Drain) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        h.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("bounded shutdown")
            .unwrap();
        // Stopped after drain, before retire: the old account still lives.
        let j = h.live.get(&id).unwrap();
        assert!(!j.status.is_terminal(), "{j:#?}");
        assert!(world.issuer.account_ids().contains(&old.id));

        // A fresh daemon resumes and finishes it.
        let h2 = harness(world.clone(), vec![t], 1);
        let d2 = h2.daemon.clone();
        let run2 = tokio::spawn(async move { d2.run().await });
        for _ in 0..2000 {
            if !world.issuer.account_ids().contains(&old.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let j = wait_finished(&h2, &id).await;
        assert_eq!(j.status, Status::Completed);
        assert!(!world.issuer.account_ids().contains(&old.id));
        h2.shutdown.cancel();
        run2.await.unwrap();
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;
    use crate::config::{DurationStr, VaultConfig};
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::{EngineOptions, Step};

    fn config(targets: Vec<Target>, max_concurrent: usize) -> Config {
        let mut c = Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            targets,
        };
        c.daemon.max_concurrent_rotations = max_concurrent;
        c
    }

    fn daemon(world: &FakeWorld, config: Config) -> (Daemon, Arc<LiveRotations>) {
        let live = Arc::new(LiveRotations::default());
        let engine = Arc::new(
            world
                .engine(EngineOptions {
                    poll_interval: Duration::from_millis(2),
                    ..Default::default()
                })
                .with_observer(live.clone()),
        );
        let d = Daemon::new(
            Arc::new(config),
            engine,
            Arc::new(world.store.clone()),
            live.clone(),
            Arc::new(NoSchedule),
            Leadership::sole(),
            DaemonOptions::default(),
            CancellationToken::new(),
        );
        (d, live)
    }

    fn manual(target: &str) -> RotationRequest {
        RotationRequest::new(target, Trigger::Api, "ops", "test", Utc::now())
    }

    async fn wait_step(live: &LiveRotations, id: &str, step: Step) {
        for _ in 0..2000 {
            if live.get(id).is_some_and(|j| j.step == step) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("rotation {id} never reached {step}");
    }

    #[tokio::test]
    async fn a_reload_that_moves_the_journal_is_refused_and_changes_nothing() {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", Utc::now());
        let (d, _) = daemon(&world, config(vec![t.clone()], 1));
        let mut moved = config(vec![t.clone()], 3);
        moved.daemon.state_prefix = "elsewhere/state".into();
        let e = d.reload(Arc::new(moved)).unwrap_err();
        assert!(e.to_string().contains("daemon.state_prefix"), "{e}");
        // Nothing changed: neither the prefix nor the bound.
        assert_eq!(d.config().daemon.state_prefix, "openai-key-rotator/state");
        assert_eq!(d.config().daemon.max_concurrent_rotations, 1);
        assert_eq!(*d.inner.slot_limit.locked(), 1);
        // Control: the same file without the move is taken.
        d.reload(Arc::new(config(vec![t], 3))).unwrap();
        assert_eq!(d.config().daemon.max_concurrent_rotations, 3);
    }

    #[tokio::test]
    async fn a_reload_applies_the_account_prefix_and_the_concurrency_bound() {
        let world = FakeWorld::default();
        let (mut a, _) = world.seed_target("a", Utc::now());
        let (mut b, _) = world.seed_target("b", Utc::now());
        // Long grace periods hold each rotation (and its slot) in the drain.
        a.grace_period = DurationStr(Duration::from_secs(3600));
        b.grace_period = DurationStr(Duration::from_secs(3600));
        let (d, live) = daemon(&world, config(vec![a.clone(), b.clone()], 1));
        let ia = d.trigger(&manual("a")).unwrap().rotation_id().to_string();
        wait_step(&live, &ia, Step::Drain).await;
        let ib = d.trigger(&manual("b")).unwrap().rotation_id().to_string();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            live.get(&ib).map(|j| j.steps.len()),
            Some(0),
            "one slot: b waits"
        );
        let mut wider = config(vec![a, b], 2);
        wider.daemon.account_prefix = "team".into();
        d.reload(Arc::new(wider)).unwrap();
        wait_step(&live, &ib, Step::Drain).await;
        // b started after the reload: its account carries the new prefix.
        let jb = live.get(&ib).unwrap();
        assert!(jb.new_account_name.starts_with("team-b-"), "{jb:?}");
        assert!(live
            .get(&ia)
            .unwrap()
            .new_account_name
            .starts_with("okr-a-"));
        d.stop_running();
    }
}
