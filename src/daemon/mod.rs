//! The long-running service: resumes unfinished rotations, schedules every target, takes
//! triggers (signal, HTTP, CLI), keeps one rotation per target and a global bound, and shuts
//! down between steps.

use crate::config::{Config, Target};
use crate::leader::Holder;
use crate::rotation::ports::{Clock, SecretStore, SystemClock};
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

/// How long after start the first inventory is taken (or sooner, every interval).
const FIRST_INVENTORY_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
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
    /// Wall time for schedules (a simulation runs it on tokio's paused clock).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonOptions")
            .field("backoff", &self.backoff)
            .field("sweep_interval", &self.sweep_interval)
            .field("pending_retry_interval", &self.pending_retry_interval)
            .field("max_sleep", &self.max_sleep)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
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
            clock: Arc::new(SystemClock),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// A new rotation with this id (it may wait for a free slot).
    Started(String),
    /// The target was mid-rotation; that rotation became an emergency one.
    Upgraded(String),
    /// The target had an unfinished rotation (a crash, a shutdown, a failover): it resumes
    /// now, with the request's emergency upgrade, instead of a new one.
    Resumed(String),
}

impl Accepted {
    pub fn rotation_id(&self) -> &str {
        match self {
            Accepted::Started(id) | Accepted::Upgraded(id) | Accepted::Resumed(id) => id,
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
    /// The target's journal could not be read, so whether a rotation is unfinished is
    /// unknown: nothing was started.
    #[error("target {target}: cannot read its journal ({message}); nothing was started")]
    Unavailable { target: String, message: String },
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
    /// The request met an unfinished rotation, which resumes instead.
    fn rotation_resumed(&self, request: &RotationRequest, rotation_id: &str);
    /// A journal names a target the configuration does not list; `resumed` when its
    /// unfinished rotation resumes from the journal's copy of the target.
    fn unconfigured_target(&self, target: &str, rotation_id: &str, resumed: bool);
    /// The sweep deleted these orphaned managed accounts.
    fn swept(&self, account_ids: &[String]);
    /// A full inventory was taken (of the configured `projects`).
    fn inventory_taken(&self, _projects: &[String], _inventory: &crate::inventory::Inventory) {}
}

pub struct NoSchedule;
impl ScheduleObserver for NoSchedule {
    fn next_rotation(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn key_created(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn rotation_requested(&self, _: &RotationRequest, _: &str) {}
    fn trigger_refused(&self, _: &RotationRequest, _: &TriggerError) {}
    fn rotation_upgraded(&self, _: &RotationRequest, _: &str) {}
    fn rotation_resumed(&self, _: &RotationRequest, _: &str) {}
    fn unconfigured_target(&self, _: &str, _: &str, _: bool) {}
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
    /// A due rotation that could not start (its journal unreadable, another replica's
    /// rotation in the way) is not tried again before this: no busy loop on a refusal.
    hold_until: Option<DateTime<Utc>>,
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// How long a due target waits after its scheduled trigger was refused.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// How long a trigger waits for a target whose rotation has finished but whose task has not
/// yet let go of it (bookkeeping only: no remote call happens in between).
const FINISHING_WAIT: Duration = Duration::from_secs(5);

/// What a rotation task does: rotate from the journal the trigger read, or resume one.
enum Work {
    Rotate(Box<(RotationRequest, Option<Stored>)>),
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
    /// Notified whenever a target is let go (its rotation task ended or never started).
    freed: Notify,
    opts: DaemonOptions,
    leader: watch::Receiver<bool>,
    leader_name: watch::Receiver<Option<Holder>>,
    _leadership_senders: Option<(watch::Sender<bool>, watch::Sender<Option<Holder>>)>,
    accepting: AtomicBool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Cloneable handle to the running daemon.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

/// Who leads: "am I the leader" and "who is" (with its API URL), as watch channels.
pub struct Leadership {
    pub is_leader: watch::Receiver<bool>,
    pub holder: watch::Receiver<Option<Holder>>,
    /// For a single replica: the senders, kept so the channels never close.
    _fixed: Option<(watch::Sender<bool>, watch::Sender<Option<Holder>>)>,
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
        holder: watch::Receiver<Option<Holder>>,
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
                freed: Notify::new(),
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

    fn now(&self) -> DateTime<Utc> {
        self.inner.opts.clock.now()
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner.config.read_now().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.inner.leader.borrow()
    }

    /// Who holds the Lease and where its API answers (`None`: nobody validly, or no election).
    pub fn leader_holder(&self) -> Option<Holder> {
        self.inner.leader_name.borrow().clone()
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
        self.inner
            .engine
            .set_naming(crate::naming::Naming::from_config(&config.daemon));
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
    pub async fn trigger(&self, req: &RotationRequest) -> Result<Accepted, TriggerError> {
        let result = self.try_trigger(req).await;
        let obs = &self.inner.schedule_obs;
        match &result {
            Err(e) => obs.trigger_refused(req, e),
            Ok(Accepted::Upgraded(id)) => obs.rotation_upgraded(req, id),
            Ok(Accepted::Started(id)) => obs.rotation_requested(req, id),
            Ok(Accepted::Resumed(id)) => obs.rotation_resumed(req, id),
        }
        result
    }

    async fn try_trigger(&self, req: &RotationRequest) -> Result<Accepted, TriggerError> {
        let config = self.config();
        let Some(target) = config.target(&req.target).cloned() else {
            return Err(TriggerError::UnknownTarget(req.target.clone()));
        };
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(TriggerError::ShuttingDown);
        }
        if !self.is_leader() {
            return Err(TriggerError::NotLeader {
                leader: self
                    .inner
                    .leader_name
                    .borrow()
                    .as_ref()
                    .map(|h| h.identity.clone()),
            });
        }
        let control = Arc::new(RotationControl::default());
        let mut waited = false;
        loop {
            // Registered before the check, so a release in between is not missed.
            let freed = self.inner.freed.notified();
            let finishing = {
                // Claim the target before reading its journal, so a second trigger in
                // between upgrades or is refused instead of starting another rotation.
                let mut targets = self.inner.targets.locked();
                let st = targets.entry(target.name.clone()).or_default();
                match &st.running {
                    // Its view already reads terminal: the task is only letting go of the
                    // target. Refusing (or upgrading a finished rotation) would drop this
                    // request, so wait for the target instead, once and briefly.
                    Some(r)
                        if !waited
                            && self
                                .inner
                                .live
                                .get(&r.id)
                                .is_some_and(|j| j.status.is_terminal()) =>
                    {
                        true
                    }
                    Some(r) => {
                        if req.emergency {
                            r.control.upgrade_to_emergency(req.revoke_first);
                            return Ok(Accepted::Upgraded(r.id.clone()));
                        }
                        return Err(TriggerError::AlreadyRunning {
                            target: target.name.clone(),
                            rotation_id: r.id.clone(),
                        });
                    }
                    None => {
                        st.running = Some(Running {
                            id: req.rotation_id.clone(),
                            control: control.clone(),
                        });
                        false
                    }
                }
            };
            if !finishing {
                break;
            }
            waited = true;
            let _ = tokio::time::timeout(FINISHING_WAIT, freed).await;
        }
        if req.emergency {
            control.upgrade_to_emergency(req.revoke_first);
        }
        let prior = match self.inner.engine.journal(&target.name).await {
            Ok(p) => p,
            Err(e) => {
                self.release(&target.name, &req.rotation_id);
                return Err(TriggerError::Unavailable {
                    target: target.name.clone(),
                    message: e.to_string(),
                });
            }
        };
        let this = self.clone();
        if let Some(stored) = prior.clone().filter(|s| !s.journal.status.is_terminal()) {
            // An unfinished rotation holds the target: finish that one, now.
            let id = stored.journal.rotation_id.clone();
            {
                let mut targets = self.inner.targets.locked();
                if let Some(r) = targets
                    .get_mut(&target.name)
                    .and_then(|st| st.running.as_mut())
                {
                    r.id = id.clone();
                }
            }
            self.inner.live.put(&stored.journal);
            let target = stored.journal.spec.clone().unwrap_or(target);
            self.inner.tasks.spawn(async move {
                this.run_rotation(target, Work::Resume(Box::new(stored)), control)
                    .await
            });
            return Ok(Accepted::Resumed(id));
        }
        if req.is_manual() {
            // A person asked: the failure back-off no longer applies.
            if let Some(st) = self.inner.targets.locked().get_mut(&target.name) {
                st.history.consecutive_failures = 0;
            }
        }
        let id = req.rotation_id.clone();
        // Visible at once (queued for a slot), until the engine's first event replaces it.
        let mut queued = Journal::queued(req, &config.daemon.account_prefix);
        queued.new_account_name =
            self.inner
                .engine
                .account_name_for(&req.target, &req.rotation_id, req.requested_at);
        self.inner.live.put(&queued);
        let request = req.clone();
        let interest = self.inner.engine.expect_roll(&id, &target);
        self.inner.tasks.spawn(async move {
            let _interest = interest;
            this.run_rotation(target, Work::Rotate(Box::new((request, prior))), control)
                .await
        });
        Ok(Accepted::Started(id))
    }

    /// Give the target back when a claimed rotation did not start.
    fn release(&self, target: &str, rotation_id: &str) {
        let mut targets = self.inner.targets.locked();
        if let Some(st) = targets.get_mut(target) {
            if st.running.as_ref().is_some_and(|r| r.id == rotation_id) {
                st.running = None;
            }
        }
        drop(targets);
        self.inner.freed.notify_waiters();
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
                Work::Rotate(work) => {
                    let (req, prior) = *work;
                    engine.rotate(&target, req, prior, control).await.map(Some)
                }
                Work::Resume(stored) => engine
                    .resume(Some(&target), *stored, control)
                    .await
                    .map(Some),
            }),
        };
        let now = self.now();
        let configured = self.config().target(&target.name).is_some();
        let mut targets = self.inner.targets.locked();
        if !configured {
            // Removed from the configuration while this ran: nothing more to schedule.
            targets.remove(&target.name);
            drop(targets);
            self.inner.wake.notify_one();
            self.inner.freed.notify_waiters();
            return;
        }
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
                // The journal counts failures in a row (it survives restarts).
                st.history.consecutive_failures = j.consecutive_failures;
                st.history.last_failure_at = j.last_failure_at;
                if j.status == Status::Completed {
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
            }
            Some(Ok(None)) => {}
            Some(Err(EngineError::Stopped { .. })) => {
                tracing::info!(target = %target.name, "rotation stopped for shutdown; it resumes on restart");
            }
            Some(Err(EngineError::Busy { rotation_id, .. })) => {
                // Another replica's (or a racing) rotation wrote the journal after the
                // trigger read it: the next pass resumes it.
                tracing::warn!(target = %target.name, %rotation_id, "an unfinished rotation holds this target; the next pass resumes it");
                st.hold_until = Some(now + chrono_of(REFUSED_RETRY));
            }
            Some(Err(e @ (EngineError::Fenced { .. } | EngineError::JournalConflict { .. }))) => {
                tracing::warn!(target = %target.name, error = %e, "rotation stopped: another replica leads; it resumes from the journal");
                st.hold_until = Some(now + chrono_of(REFUSED_RETRY));
            }
            Some(Err(e)) => {
                tracing::error!(target = %target.name, error = %e, "rotation interrupted; it will be resumed");
                st.history.consecutive_failures += 1;
                st.history.last_failure_at = Some(now);
            }
        }
        drop(targets);
        self.inner.wake.notify_one();
        self.inner.freed.notify_waiters();
    }

    /// Resume what a previous run left unfinished (and retry pending deletions).
    /// Resume what a previous run left unfinished and retry pending deletions, for every
    /// journal under the state prefix: a target removed from the configuration still gets
    /// its unfinished rotation finished from the journal's copy of it (and is reported).
    /// The journals also restore each target's failure back-off.
    async fn resume_all(&self, restore_backoff: bool) {
        let this = self;
        {
            let journals = match this.inner.engine.journals().await {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the journals; resuming on the next pass");
                    return;
                }
            };
            let config = this.config();
            for stored in journals {
                let j = &stored.journal;
                let configured = config.target(&j.target).cloned();
                if restore_backoff && configured.is_some() {
                    let mut targets = this.inner.targets.locked();
                    let st = targets.entry(j.target.clone()).or_default();
                    st.history.consecutive_failures = j.consecutive_failures;
                    st.history.last_failure_at = j.last_failure_at;
                }
                if j.status.is_terminal() {
                    // Killed between the concluding journal write and the history copy:
                    // write it now, so the rotation stays known by id.
                    if let Err(e) = this.inner.engine.ensure_history(j).await {
                        tracing::warn!(error = %e, rotation_id = %j.rotation_id, "could not write a missing rotation history copy");
                    }
                    if j.pending_deletions.is_empty() {
                        continue;
                    }
                }
                let Some(target) = j.spec.clone().or(configured.clone()) else {
                    tracing::warn!(target = %j.target, rotation_id = %j.rotation_id, "a journal names a target that is not configured, and predates target snapshots: left alone");
                    this.inner
                        .schedule_obs
                        .unconfigured_target(&j.target, &j.rotation_id, false);
                    continue;
                };
                if configured.is_none() {
                    tracing::warn!(target = %j.target, rotation_id = %j.rotation_id, "target not configured any more: finishing its unfinished rotation from the journal");
                    this.inner
                        .schedule_obs
                        .unconfigured_target(&j.target, &j.rotation_id, true);
                }
                let control = Arc::new(RotationControl::default());
                {
                    let mut targets = this.inner.targets.locked();
                    let st = targets.entry(j.target.clone()).or_default();
                    if st.running.is_some() {
                        continue;
                    }
                    st.running = Some(Running {
                        id: j.rotation_id.clone(),
                        control: control.clone(),
                    });
                }
                let worker = this.clone();
                this.inner.tasks.spawn(async move {
                    worker
                        .run_rotation(target, Work::Resume(Box::new(stored)), control)
                        .await
                });
            }
        }
    }

    /// Refresh key ages from Vault and recompute every target's next rotation.
    async fn refresh(&self) -> Vec<(String, Due)> {
        let config = self.config();
        let now = self.now();
        let mut due_now = Vec::new();
        for t in &config.targets {
            let created = match self
                .inner
                .store
                .read_key_meta(&t.vault_path, &t.vault_field)
                .await
            {
                // Without a creation time in the metadata (a key written by hand), the
                // Vault version's time is the key's age.
                Ok(Some(info)) => Some(info.meta.key_created_at.or(info.version_created_at)),
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
                let held = st.hold_until.is_some_and(|h| h > now);
                if d.at <= now && st.running.is_none() && !held {
                    due_now.push((t.name.clone(), d));
                }
            }
        }
        due_now
    }

    /// Do not try `target`'s due rotation again for a while (its trigger was refused).
    fn hold(&self, target: &str) {
        let until = self.now() + chrono_of(REFUSED_RETRY);
        if let Some(st) = self.inner.targets.locked().get_mut(target) {
            st.hold_until = Some(until);
        }
    }

    /// Time until the earliest next rotation (bounded by `max_sleep`).
    fn sleep_for(&self) -> Duration {
        let now = self.now();
        let config = self.config();
        let targets = self.inner.targets.locked();
        targets
            .iter()
            // A removed target's state lingers while its last rotation finishes; its old
            // schedule must not wake the loop (it would spin: nothing refreshes it).
            .filter(|(name, _)| config.target(name).is_some())
            .map(|(_, s)| s)
            .filter(|s| s.running.is_none())
            .filter_map(|s| s.next.map(|d| s.hold_until.map_or(d.at, |h| h.max(d.at))))
            .map(|at| (at - now).to_std().unwrap_or_default())
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
        let mut last_inventory: Option<tokio::time::Instant> = None;
        let started = tokio::time::Instant::now();
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
                self.resume_all(true).await;
                resumed = true;
                last_retry = tokio::time::Instant::now();
            }
            for (name, due) in self.refresh().await {
                let reason = match due.trigger {
                    Trigger::MaxAge => "key older than max_key_age",
                    _ => "scheduled",
                };
                let req = RotationRequest::new(&name, due.trigger, "schedule", reason, self.now());
                match self.trigger(&req).await {
                    Ok(a) => {
                        tracing::info!(target = %name, rotation_id = %a.rotation_id(), trigger = due.trigger.as_str(), "scheduled rotation started")
                    }
                    Err(e) => {
                        tracing::debug!(target = %name, error = %e, "scheduled rotation not started");
                        self.hold(&name);
                    }
                }
            }
            if last_retry.elapsed() >= self.inner.opts.pending_retry_interval {
                self.resume_all(false).await;
                last_retry = tokio::time::Instant::now();
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.inner.opts.sweep_interval) {
                self.sweep_in_background();
                last_sweep = Some(tokio::time::Instant::now());
            }
            let every = self.config().daemon.inventory_interval.get();
            // The first one soon after start (the metrics survive no restart), but not in
            // the middle of resuming.
            let inventory_in = |last: Option<tokio::time::Instant>| match last {
                None => every
                    .min(FIRST_INVENTORY_AFTER)
                    .saturating_sub(started.elapsed()),
                Some(t) => every.saturating_sub(t.elapsed()),
            };
            if !every.is_zero() && inventory_in(last_inventory).is_zero() {
                self.inventory_in_background();
                last_inventory = Some(tokio::time::Instant::now());
            }
            let mut sleep = self.sleep_for();
            if !every.is_zero() {
                sleep = sleep.min(inventory_in(last_inventory).max(Duration::from_millis(100)));
            }
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

    /// Take the inventory for the metrics; read-only, so shutdown just drops it.
    fn inventory_in_background(&self) {
        let this = self.clone();
        let stop = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let config = this.config();
            let opts = crate::inventory::Options::from_config(&config.daemon);
            let taken = tokio::select! {
                r = this.inventory(&opts) => r,
                _ = stop.cancelled() => return,
            };
            match taken {
                Ok(inv) => {
                    let projects: Vec<String> = config
                        .targets
                        .iter()
                        .map(|t| t.project_id.clone())
                        .collect();
                    if inv.has_errors() {
                        tracing::warn!("inventory: some projects or Vault paths could not be read");
                    }
                    this.inner.schedule_obs.inventory_taken(&projects, &inv);
                }
                Err(e) => tracing::warn!(error = %e, "inventory failed"),
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
        // A copy a killed daemon did not write is written when the journals are resumed.
        self.inner.engine.history(id).await
    }

    pub fn targets(&self) -> Vec<TargetStatus> {
        let config = self.config();
        let now = self.now();
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

    /// The key inventory of the configured targets' projects (or `opts.project`).
    pub async fn inventory(
        &self,
        opts: &crate::inventory::Options,
    ) -> Result<crate::inventory::Inventory, crate::inventory::InventoryError> {
        let config = self.config();
        crate::inventory::take(&self.inner.engine, &config.targets, opts).await
    }

    /// Run `task` as one of the daemon's own: shutdown waits for it (bounded by the
    /// grace), so it must watch the daemon's shutdown token.
    pub fn spawn_background<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }
}

#[cfg(test)]
mod tests;
