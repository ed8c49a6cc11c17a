//! Deterministic simulation of the daemon and engine over the in-memory fakes, in the
//! manner of FoundationDB's: one seed drives every choice (triggers, faults at every remote
//! call, crashes, operator actions, leader changes) on tokio's paused clock, so a seed
//! replays exactly. After every event the invariants are checked; after the history
//! settles (faults off, a clean restart, a sweep) so is the absence of orphans.
//!
//! `OKR_SIM_SEED=N cargo test --lib simulation::replay -- --nocapture` replays one seed and
//! prints its history; `OKR_SIM_SEEDS=N` and `OKR_SIM_ROTATIONS=N` size the CI run (see
//! RELIABILITY.md for the long run).

use crate::config::{
    Config, DurationStr, SmokeProbe, SyncedSecret, Target, VaultConfig, WorkloadRef,
};
use crate::daemon::{Daemon, DaemonOptions, Fanout, Leadership, LiveRotations, NoSchedule};
use crate::rotation::fakes::{Behaviour, FakeAccount, FakeWorld, TokioClock};
use crate::rotation::faults::{Call, Crash, Fault, FaultPlan, Op};
use crate::rotation::ports::{AccountRef, Fence, KeyMeta, SecretStore};
use crate::rotation::{
    Engine, EngineOptions, Journal, Observer, RotationEvent, RotationRequest, Trigger,
};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Fault probabilities (per call), shared by every process's plan; zeroed to settle.
#[derive(Default)]
struct Knobs {
    on: AtomicBool,
}

/// The readable history of one seed, with virtual time.
#[derive(Clone, Default)]
struct History(Arc<Mutex<Vec<String>>>);

impl History {
    fn push(&self, clock: &TokioClock, line: impl Into<String>) {
        use crate::rotation::ports::Clock;
        let t = clock.now().format("%d %H:%M:%S");
        let line = format!("{t}  {}", line.into());
        if std::env::var_os("OKR_SIM_TRACE").is_some() {
            eprintln!("{line}");
        }
        self.0.lock().unwrap().push(line);
    }
    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// One simulated process's faults, drawn from its own seeded generator.
struct SimPlan {
    rng: Mutex<StdRng>,
    knobs: Arc<Knobs>,
    history: History,
    clock: Arc<TokioClock>,
    process: String,
    /// A concurrent writer re-saves what Vault holds (bumping its version) right before
    /// some of our key writes: a check-and-set conflict.
    store: crate::rotation::fakes::FakeStore,
}

impl FaultPlan for SimPlan {
    fn fault(&self, call: &Call) -> Option<Fault> {
        if !self.knobs.on.load(Ordering::SeqCst) {
            return None;
        }
        let mut rng = self.rng.lock().unwrap();
        let x: f64 = rng.random();
        let write = call.op.is_write() && call.op != Op::Event;
        let fault = if write && x < 0.003 {
            Some(Fault::CrashBefore)
        } else if write && x < 0.006 {
            Some(Fault::CrashAfter)
        } else if x < 0.02 {
            Some(Fault::Transient)
        } else if write && x < 0.027 {
            Some(Fault::LostAnswer)
        } else if write && x < 0.032 {
            Some(Fault::LateEffect(Duration::from_millis(
                rng.random_range(100..20_000),
            )))
        } else {
            None
        };
        if fault.is_none() && call.op == Op::WriteKey && rng.random_bool(0.02) {
            drop(rng);
            // Someone re-saves the secret (same value, new version) just before our write.
            if let Some((_, key)) = self.store.current(&call.subject, "api_key") {
                let meta = self
                    .store
                    .state
                    .lock()
                    .unwrap()
                    .meta
                    .get(&call.subject)
                    .cloned()
                    .unwrap_or_default();
                self.store.put(&call.subject, "api_key", key.expose(), meta);
                self.history.push(
                    &self.clock,
                    format!(
                        "[{}] a concurrent writer re-saved {}",
                        self.process, call.subject
                    ),
                );
            }
            return None;
        }
        if let Some(f) = fault {
            self.history.push(
                &self.clock,
                format!(
                    "[{}] fault {f:?} at {:?} {}",
                    self.process, call.op, call.subject
                ),
            );
        }
        fault
    }
}

/// Checks I1 (every path's served key is live), I2 (an old account is retired only by a
/// rotation whose verify passed) and I5 (no deleted account's key is served anywhere, unless
/// revoke_first) at every engine event; counts finished rotations.
struct SimChecker {
    fakes: FakeWorld,
    paths: Vec<String>,
    history: History,
    clock: Arc<TokioClock>,
    violations: Mutex<Vec<String>>,
    finished: AtomicU64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Every key value ever seen in Vault (for the leak scan).
    keys: Mutex<BTreeSet<String>>,
}

impl SimChecker {
    fn violation(&self, v: String) {
        self.history.push(&self.clock, format!("VIOLATION {v}"));
        self.violations.lock().unwrap().push(v);
    }

    fn check_served(&self, when: &str) {
        for p in &self.paths {
            if let Some((_, key)) = self.fakes.store.current(p, "api_key") {
                self.keys.lock().unwrap().insert(key.expose().to_string());
                if !self.fakes.issuer.is_live(&key) {
                    self.violation(format!("I1: Vault serves a dead key at {p} ({when})"));
                }
            }
        }
    }
}

impl Observer for SimChecker {
    fn on_event(&self, j: &Journal, ev: &RotationEvent) {
        self.check_served(&format!("{} {:?}", j.rotation_id, ev));
        match ev {
            RotationEvent::Finished => {
                self.finished.fetch_add(1, Ordering::SeqCst);
                *self
                    .outcomes
                    .lock()
                    .unwrap()
                    .entry(j.status.as_str())
                    .or_default() += 1;
                self.history.push(
                    &self.clock,
                    format!(
                        "rotation {} of {}: {}{}",
                        j.rotation_id,
                        j.target,
                        j.status.as_str(),
                        j.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                );
            }
            RotationEvent::AccountDeleted { account_id, why } => {
                self.history.push(
                    &self.clock,
                    format!("deleted {account_id} ({why}) in rotation {}", j.rotation_id),
                );
                if *why == "revoke_first" {
                    return;
                }
                if let Some(key) = self.fakes.issuer.deleted_key(account_id) {
                    let served = self.fakes.store.paths_serving(&key);
                    if !served.is_empty() {
                        self.violation(format!(
                            "I5: {account_id} deleted ({why}) while Vault serves it at {served:?}"
                        ));
                    }
                }
                let is_old = j.old_account.as_ref().map(|a| &a.id) == Some(account_id);
                let verified = j.steps.iter().any(|s| {
                    s.step == crate::rotation::Step::Verify && s.outcome.as_deref() == Some("ok")
                });
                if is_old && *why == "retire" && !verified {
                    self.violation(format!(
                        "I2: old account {account_id} retired by {} before its verify passed",
                        j.rotation_id
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Writes are allowed while the flag is set (this process "holds the Lease").
struct Flag(Arc<AtomicBool>);
impl Fence for Flag {
    fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("lost the Lease".into())
        }
    }
}

/// One daemon process.
struct Process {
    name: String,
    daemon: Daemon,
    engine: Arc<Engine>,
    crash: Crash,
    leads: Arc<AtomicBool>,
    leader_tx: watch::Sender<bool>,
    _holder_tx: watch::Sender<Option<crate::leader::Holder>>,
    run: tokio::task::JoinHandle<()>,
}

impl Process {
    fn kill(self) {
        self.crash.crash();
        self.leads.store(false, Ordering::SeqCst);
        self.run.abort();
    }
}

struct Sim {
    rng: StdRng,
    fakes: FakeWorld,
    clock: Arc<TokioClock>,
    all: Vec<Target>,
    configured: BTreeSet<String>,
    history: History,
    checker: Arc<SimChecker>,
    knobs: Arc<Knobs>,
    processes: u32,
    probe_urls: Vec<String>,
}

fn workload(name: &str) -> WorkloadRef {
    format!("sim/Deployment/{name}")
        .parse()
        .expect("valid workload")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let clock = Arc::new(TokioClock::new(
            DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                .expect("a valid time")
                .with_timezone(&Utc),
        ));
        let fakes = FakeWorld::default();
        fakes.set_clock(clock.clone());
        let history = History::default();
        let n = rng.random_range(2..=5);
        let shared = workload("shared");
        let mut all = Vec::new();
        let mut probe_urls = Vec::new();
        for i in 0..n {
            let name = format!("t{i}");
            let project = if i % 2 == 0 { "proj_a" } else { "proj_b" };
            let old = fakes.issuer.seed(project, &format!("{name}-initial"));
            let path = format!("apps/{name}/openai");
            fakes.store.put(
                &path,
                "api_key",
                old.key.expose(),
                KeyMeta {
                    account: Some(AccountRef {
                        id: old.id.clone(),
                        key_id: old.key_id.clone(),
                    }),
                    rotation_id: Some("seed".into()),
                    key_created_at: Some(clock_now(&clock)),
                },
            );
            let mut workloads = vec![workload(&format!("{name}-api"))];
            if rng.random_bool(0.4) {
                workloads.push(shared.clone());
            }
            // Staged: one wave per workload.
            let waves: Vec<Vec<crate::config::WorkloadRef>> =
                if workloads.len() > 1 && rng.random_bool(0.5) {
                    workloads.iter().map(|w| vec![w.clone()]).collect()
                } else {
                    vec![]
                };
            let synced_secret = rng.random_bool(0.3).then(|| SyncedSecret {
                namespace: "sim".into(),
                name: format!("{name}-openai"),
                key: "api_key".into(),
                force_sync_annotation: None,
                timeout: DurationStr::from_secs(120),
            });
            if let Some(s) = &synced_secret {
                fakes
                    .roller
                    .set_secret_hash(&s.namespace, &s.name, &s.key, &old.key.sha256_hex());
            }
            let smoke_probes = if rng.random_bool(0.3) {
                let url = format!("http://{name}.sim.svc/healthz");
                fakes.prober.answer(&url, &[200]);
                probe_urls.push(url.clone());
                vec![SmokeProbe {
                    url,
                    expect_status: 200,
                    consecutive_successes: 2,
                    interval: DurationStr::from_secs(2),
                    timeout: DurationStr::from_secs(1),
                    wave: (!waves.is_empty() && rng.random_bool(0.5)).then_some(1),
                }]
            } else {
                vec![]
            };
            all.push(Target {
                name,
                project_id: project.into(),
                vault_path: path,
                vault_field: "api_key".into(),
                workloads,
                waves,
                synced_secret,
                schedule: Some(
                    format!("0 */{} * * * *", rng.random_range(10..=30))
                        .parse()
                        .expect("a valid cron"),
                ),
                max_key_age: None,
                jitter: DurationStr::from_secs(rng.random_range(0..60)),
                grace_period: DurationStr::from_secs(rng.random_range(0..90)),
                drain: rng.random_bool(0.3).then(|| crate::config::DrainConfig {
                    quiet_for: DurationStr::from_secs(60),
                    max_wait: DurationStr::from_secs(600),
                    on_timeout: if rng.random_bool(0.5) {
                        crate::config::DrainTimeout::Keep
                    } else {
                        crate::config::DrainTimeout::Retire
                    },
                }),
                adoption: None,
                unlisted_consumers: Default::default(),
                smoke_probes,
                rollout_timeout: DurationStr::from_secs(300),
                key_expiry: None,
                anomaly: None,
            });
        }
        let paths = all.iter().map(|t| t.vault_path.clone()).collect();
        let checker = Arc::new(SimChecker {
            fakes: fakes.clone(),
            paths,
            history: history.clone(),
            clock: clock.clone(),
            violations: Mutex::default(),
            finished: AtomicU64::new(0),
            outcomes: Mutex::default(),
            keys: Mutex::default(),
        });
        let configured = all.iter().map(|t| t.name.clone()).collect();
        fakes.roller.state.lock().unwrap().polls_to_complete = 5;
        Sim {
            rng,
            fakes,
            clock,
            all,
            configured,
            history,
            checker,
            knobs: Arc::new(Knobs::default()),
            processes: 0,
            probe_urls,
        }
    }

    fn log(&self, line: impl Into<String>) {
        self.history.push(&self.clock, line);
    }

    fn config(&self) -> Arc<Config> {
        let mut c = Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            notifications: Default::default(),
            targets: self
                .all
                .iter()
                .filter(|t| self.configured.contains(&t.name))
                .cloned()
                .collect(),
        };
        c.daemon.max_concurrent_rotations = 2;
        Arc::new(c)
    }

    /// Start a daemon process over the shared backends (leading or not).
    fn start(&mut self, leads: bool) -> Process {
        self.processes += 1;
        let name = format!("p{}", self.processes);
        let crash = Crash::default();
        let plan = Arc::new(SimPlan {
            rng: Mutex::new(StdRng::seed_from_u64(self.rng.random())),
            knobs: self.knobs.clone(),
            history: self.history.clone(),
            clock: self.clock.clone(),
            process: name.clone(),
            store: self.fakes.store.clone(),
        });
        let mut ports = self.fakes.faulty_ports(plan, crash.clone());
        ports.clock = self.clock.clone();
        let live = Arc::new(LiveRotations::default());
        // Some processes coalesce restarts of shared workloads and bound rollouts.
        let coalesce_window = if self.rng.random_bool(0.5) {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        let max_concurrent_rollouts = self.rng.random_bool(0.3).then_some(2);
        let engine = Arc::new(
            Engine::new(
                ports,
                EngineOptions {
                    poll_interval: Duration::from_secs(2),
                    drain_poll_interval: Duration::from_secs(30),
                    coalesce_window,
                    max_concurrent_rollouts,
                    ..EngineOptions::default()
                },
            )
            .with_observer(Arc::new(Fanout(vec![live.clone(), self.checker.clone()]))),
        );
        let lead = Arc::new(AtomicBool::new(leads));
        engine.set_fence(Arc::new(Flag(lead.clone())));
        let (leader_tx, is_leader) = watch::channel(leads);
        let (holder_tx, holder) = watch::channel(None);
        let daemon = Daemon::new(
            self.config(),
            engine.clone(),
            Arc::new(self.fakes.store.clone()) as Arc<dyn SecretStore>,
            live,
            Arc::new(NoSchedule),
            Leadership::elected(is_leader, holder),
            DaemonOptions {
                sweep_interval: Duration::from_secs(3600),
                pending_retry_interval: Duration::from_secs(300),
                max_sleep: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(60),
                identity: name.clone(),
                clock: self.clock.clone(),
                ..DaemonOptions::default()
            },
            CancellationToken::new(),
        );
        let d = daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        self.log(format!(
            "start process {name}{}",
            if leads { " (leader)" } else { "" }
        ));
        Process {
            name,
            daemon,
            engine,
            crash,
            leads: lead,
            leader_tx,
            _holder_tx: holder_tx,
            run,
        }
    }

    fn target(&mut self) -> Target {
        let i = self.rng.random_range(0..self.all.len());
        self.all[i].clone()
    }

    /// Synced Secrets follow Vault with a lag (an operator); run as a background task.
    fn spawn_syncer(&self) -> tokio::task::JoinHandle<()> {
        let (fakes, all) = (self.fakes.clone(), self.all.clone());
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, (String, tokio::time::Instant)> = BTreeMap::new();
            loop {
                for t in &all {
                    let Some(s) = &t.synced_secret else { continue };
                    let Some((_, k)) = fakes.store.current(&t.vault_path, "api_key") else {
                        continue;
                    };
                    let sha = k.sha256_hex();
                    let e = seen
                        .entry(t.name.clone())
                        .or_insert_with(|| (sha.clone(), tokio::time::Instant::now()));
                    if e.0 != sha {
                        *e = (sha.clone(), tokio::time::Instant::now());
                    } else if e.1.elapsed() >= Duration::from_secs(15) {
                        fakes
                            .roller
                            .set_secret_hash(&s.namespace, &s.name, &s.key, &sha);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// Straggler traffic: a little use of every live key, now and then (drains wait on it).
    fn spawn_traffic(&mut self) -> tokio::task::JoinHandle<()> {
        let (fakes, mut rng) = (self.fakes.clone(), StdRng::seed_from_u64(self.rng.random()));
        let clock = self.clock.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(rng.random_range(5..120))).await;
                let keys: Vec<String> = fakes
                    .issuer
                    .state
                    .lock()
                    .unwrap()
                    .accounts
                    .values()
                    .map(|a| a.key_id.clone())
                    .collect();
                if let Some(k) = keys.get(rng.random_range(0..keys.len().max(1))) {
                    fakes.issuer.record_use(k, clock_now(&clock));
                }
            }
        })
    }

    fn violations(&self) -> Vec<String> {
        self.checker.violations.lock().unwrap().clone()
    }
}

fn clock_now(c: &TokioClock) -> DateTime<Utc> {
    use crate::rotation::ports::Clock;
    c.now()
}

/// What one seed did.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub rotations: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub history: String,
    pub violations: Vec<String>,
}

/// Run one seed until `rotations` rotations finished (or the event budget is spent), then
/// settle and check for orphans.
/// A bug planted in the simulation, to show its checks can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plant {
    None,
    /// The sweep's old rule, run hourly: delete every account whose name parses as ours and
    /// that no *configured* target's current key names (it kills removed targets' keys).
    OldSweep,
    /// Retire before verify: delete a rotation's old account as soon as its publish is done.
    RetireBeforeVerify,
}

/// The planted bugs, as test-side actors over the same fakes (the shipped code has none).
fn spawn_plant(sim: &Sim, plant: Plant) -> Option<tokio::task::JoinHandle<()>> {
    let (fakes, checker, configured) = (sim.fakes.clone(), sim.checker.clone(), sim.all.clone());
    let configured = Arc::new(Mutex::new(configured));
    match plant {
        Plant::None => None,
        Plant::OldSweep => Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1800)).await;
                let targets = configured.lock().unwrap().clone();
                // Only the first target counts as configured (the others were "removed").
                let t = &targets[0];
                let referenced = fakes
                    .store
                    .state
                    .lock()
                    .unwrap()
                    .meta
                    .get(&t.vault_path)
                    .and_then(|m| m.account.clone())
                    .map(|a| a.id);
                let accounts: Vec<FakeAccount> = fakes
                    .issuer
                    .state
                    .lock()
                    .unwrap()
                    .accounts
                    .values()
                    .cloned()
                    .collect();
                for a in accounts {
                    let ours =
                        crate::rotation::journal::parse_account_name("okr", &a.name).is_some();
                    if ours && Some(&a.id) != referenced.as_ref() {
                        fakes.issuer.state.lock().unwrap().accounts.remove(&a.id);
                        fakes
                            .issuer
                            .state
                            .lock()
                            .unwrap()
                            .deleted
                            .insert(a.id.clone(), a.clone());
                        let mut j = Journal::queued(
                            &RotationRequest::new(
                                &t.name,
                                Trigger::Schedule,
                                "sweep",
                                "old rule",
                                Utc::now(),
                            ),
                            "okr",
                        );
                        j.status = crate::rotation::Status::Completed;
                        checker.on_event(
                            &j,
                            &RotationEvent::AccountDeleted {
                                account_id: a.id,
                                why: "sweep",
                            },
                        );
                    }
                }
            }
        })),
        Plant::RetireBeforeVerify => Some(tokio::spawn(async move {
            let engine = fakes.engine(EngineOptions::default());
            let mut done = BTreeSet::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let targets = configured.lock().unwrap().clone();
                for t in &targets {
                    let Ok(Some(s)) = engine.journal(&t.name).await else {
                        continue;
                    };
                    let j = s.journal;
                    let published = j.steps.iter().any(|s| {
                        s.step == crate::rotation::Step::Publish && s.finished_at.is_some()
                    });
                    let verified = j.steps.iter().any(|s| {
                        s.step == crate::rotation::Step::Verify
                            && s.outcome.as_deref() == Some("ok")
                    });
                    let Some(old) = j.old_account.clone() else {
                        continue;
                    };
                    if published && !verified && done.insert(j.rotation_id.clone()) {
                        let gone = fakes.issuer.state.lock().unwrap().accounts.remove(&old.id);
                        if let Some(a) = gone {
                            fakes
                                .issuer
                                .state
                                .lock()
                                .unwrap()
                                .deleted
                                .insert(a.id.clone(), a);
                            checker.on_event(
                                &j,
                                &RotationEvent::AccountDeleted {
                                    account_id: old.id,
                                    why: "retire",
                                },
                            );
                        }
                    }
                }
            }
        })),
    }
}

async fn run_seed_with(seed: u64, rotations: u64, plant: Plant) -> Outcome {
    crate::rng::seed_thread(Some(seed ^ 0x5eed));
    let mut sim = Sim::new(seed);
    sim.log(format!(
        "seed {seed}: targets {}",
        sim.all
            .iter()
            .map(|t| format!(
                "{}[{}{}{}]",
                t.name,
                t.workloads
                    .iter()
                    .map(|w| w.name.as_str())
                    .collect::<Vec<_>>()
                    .join("+"),
                if t.synced_secret.is_some() {
                    ",secret"
                } else {
                    ""
                },
                if t.smoke_probes.is_empty() {
                    ""
                } else {
                    ",probe"
                }
            ))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let syncer = sim.spawn_syncer();
    let traffic = sim.spawn_traffic();
    let planted = spawn_plant(&sim, plant);
    sim.knobs.on.store(true, Ordering::SeqCst);
    let mut leader = sim.start(true);
    let mut lagging: Vec<Process> = Vec::new();
    let mut events = 0u64;
    while sim.checker.finished.load(Ordering::SeqCst) < rotations && events < rotations * 40 {
        events += 1;
        if leader.crash.crashed() {
            sim.log(format!("process {} crashed", leader.name));
            let dead = std::mem::replace(&mut leader, sim.start(true));
            dead.kill();
        }
        let roll: u32 = sim.rng.random_range(0..100);
        match roll {
            0..=34 => {
                let secs = sim.rng.random_range(1..300);
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            35..=59 => {
                let t = sim.target();
                let mut req = RotationRequest::new(
                    &t.name,
                    Trigger::Api,
                    "sim",
                    "sim",
                    clock_now(&sim.clock),
                );
                let kind = sim.rng.random_range(0..10);
                if kind < 4 {
                    req = req.emergency(kind == 0);
                }
                let r = leader.daemon.trigger(&req).await;
                sim.log(format!(
                    "trigger {} {} -> {r:?}",
                    t.name,
                    match kind {
                        0 => "emergency+revoke_first",
                        1..=3 => "emergency",
                        _ => "manual",
                    }
                ));
            }
            60..=69 => {
                let t = sim.target();
                let w = t.workloads[sim.rng.random_range(0..t.workloads.len())].clone();
                let b = if sim.rng.random_bool(0.5) {
                    Behaviour::NeverReady
                } else {
                    Behaviour::DeadlineExceeded
                };
                sim.fakes.roller.set_behaviour(&w, b);
                sim.log(format!("workload {w} becomes {b:?}"));
                let secs = sim.rng.random_range(10..600);
                let roller = sim.fakes.roller.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    roller.set_behaviour(&w, Behaviour::Healthy);
                });
            }
            70..=74 if !sim.probe_urls.is_empty() => {
                let url = sim.probe_urls[sim.rng.random_range(0..sim.probe_urls.len())].clone();
                sim.fakes.prober.answer(&url, &[503]);
                sim.log(format!("probe {url} fails for a while"));
                let secs = sim.rng.random_range(10..600);
                let prober = sim.fakes.prober.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    prober.answer(&url, &[200]);
                });
            }
            75..=79 => {
                // An operator removes a target, or adds one back; SIGHUP.
                let t = sim.target();
                if sim.configured.contains(&t.name) && sim.configured.len() > 1 {
                    sim.configured.remove(&t.name);
                    sim.log(format!("operator removes target {}", t.name));
                } else {
                    sim.configured.insert(t.name.clone());
                    sim.log(format!("operator adds target {}", t.name));
                }
                let r = leader.daemon.reload(sim.config());
                sim.log(format!("reload -> {r:?}"));
            }
            80..=82 => {
                // Leadership moves; the old leader lags: its running steps go on until the
                // fence stops their next write.
                let old = std::mem::replace(&mut leader, sim.start(true));
                sim.log(format!(
                    "leader {} loses the Lease to {}",
                    old.name, leader.name
                ));
                old.leads.store(false, Ordering::SeqCst);
                let _ = old.leader_tx.send(false);
                lagging.push(old);
            }
            83..=85 => {
                sim.log(format!("process {} is killed", leader.name));
                let dead = std::mem::replace(&mut leader, sim.start(true));
                dead.kill();
            }
            _ => {
                let secs = sim.rng.random_range(1..30);
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
        }
        // Let what was started run a little before the next event.
        tokio::time::sleep(Duration::from_secs(sim.rng.random_range(0..10))).await;
        sim.checker.check_served("after an event");
        if !sim.violations().is_empty() {
            break;
        }
    }
    // Settle: no more faults, every target back, healthy workloads and probes, one clean
    // process; let it resume, retry and sweep.
    sim.knobs.on.store(false, Ordering::SeqCst);
    traffic.abort();
    if let Some(p) = planted {
        p.abort();
    }
    sim.log("settle: faults off, traffic stops");
    for t in &sim.all {
        for w in &t.workloads {
            sim.fakes.roller.set_behaviour(w, Behaviour::Healthy);
        }
    }
    for url in &sim.probe_urls {
        sim.fakes.prober.answer(url, &[200]);
    }
    for old in lagging.drain(..) {
        old.kill();
    }
    // Late effects still in flight land now.
    tokio::time::sleep(Duration::from_secs(60)).await;
    leader.kill();
    sim.configured = sim.all.iter().map(|t| t.name.clone()).collect();
    let settled = sim.start(true);
    let mut quiet = false;
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut busy = false;
        for t in &sim.all {
            if let Ok(Some(s)) = settled.engine.journal(&t.name).await {
                busy |= !s.journal.status.is_terminal() || !s.journal.pending_deletions.is_empty();
            }
        }
        if !busy
            && settled
                .daemon
                .targets()
                .iter()
                .all(|t| t.running_rotation.is_none())
        {
            quiet = true;
            break;
        }
    }
    if !quiet {
        sim.checker
            .violation("the history did not settle within 4 hours".into());
    }
    let swept = settled
        .engine
        .sweep(&sim.all, Duration::ZERO)
        .await
        .map_err(|e| e.to_string());
    sim.log(format!("settled; sweep -> {swept:?}"));
    // I3: every account left is one Vault serves.
    let mut served = BTreeSet::new();
    for t in &sim.all {
        if let Some((_, k)) = sim.fakes.store.current(&t.vault_path, "api_key") {
            served.insert(k.sha256_hex());
        }
    }
    let accounts: Vec<FakeAccount> = sim
        .fakes
        .issuer
        .state
        .lock()
        .unwrap()
        .accounts
        .values()
        .cloned()
        .collect();
    for a in accounts {
        if !served.contains(&a.key.sha256_hex()) {
            sim.checker.violation(format!(
                "I3: account {} ({}) is left, and Vault does not serve its key",
                a.id, a.name
            ));
        }
    }
    sim.checker.check_served("at the end");
    // I4: no key value in any journal document or in the history.
    let state_docs = {
        let s = sim.fakes.store.state.lock().unwrap();
        s.versions
            .iter()
            .filter(|(p, _)| p.starts_with("openai-key-rotator/state"))
            .map(|(_, v)| format!("{v:?}"))
            .collect::<String>()
    };
    let history_text = sim.history.text();
    let mut keys: Vec<String> = sim.checker.keys.lock().unwrap().iter().cloned().collect();
    keys.extend(
        sim.fakes
            .issuer
            .state
            .lock()
            .unwrap()
            .deleted
            .values()
            .map(|a| a.key.expose().to_string()),
    );
    for k in keys {
        if state_docs.contains(&k) || history_text.contains(&k) {
            sim.checker
                .violation("I4: a key value is in a journal or in the history".into());
            break;
        }
    }
    settled.kill();
    syncer.abort();
    crate::rng::seed_thread(None);
    let outcomes = sim.checker.outcomes.lock().unwrap().clone();
    Outcome {
        rotations: sim.checker.finished.load(Ordering::SeqCst),
        outcomes,
        history: sim.history.text(),
        violations: sim.violations(),
    }
}

/// Run `seed` on its own paused, single-threaded runtime: the same seed, the same history.
pub(crate) fn simulate(seed: u64, rotations: u64) -> Outcome {
    simulate_with(seed, rotations, Plant::None)
}

fn simulate_with(seed: u64, rotations: u64, plant: Plant) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(run_seed_with(seed, rotations, plant))
}

/// The negative controls: each planted bug is caught within a few seeds.
#[test]
fn the_simulation_catches_planted_bugs() {
    for (plant, invariant) in [(Plant::OldSweep, "I1"), (Plant::RetireBeforeVerify, "I2")] {
        let caught = (1..=10).find_map(|seed| {
            let o = simulate_with(seed, 20, plant);
            o.violations
                .iter()
                .find(|v| v.starts_with(invariant))
                .map(|v| (seed, v.clone()))
        });
        let (seed, v) = caught.unwrap_or_else(|| panic!("{plant:?} was not caught in 10 seeds"));
        eprintln!("{plant:?} caught at seed {seed}: {v}");
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeds_keep_every_invariant() {
    let seeds = env_u64("OKR_SIM_SEEDS", 40);
    let rotations = env_u64("OKR_SIM_ROTATIONS", 30);
    let first = env_u64("OKR_SIM_FIRST_SEED", 1);
    let mut total = 0;
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let started = std::time::Instant::now();
    for seed in first..first + seeds {
        let o = simulate(seed, rotations);
        total += o.rotations;
        for (k, v) in &o.outcomes {
            *outcomes.entry(k).or_default() += v;
        }
        assert!(
            o.violations.is_empty(),
            "seed {seed} broke an invariant: {:#?}\n--- history (replay: OKR_SIM_SEED={seed} cargo test --lib simulation::replay -- --nocapture) ---\n{}",
            o.violations,
            tail(&o.history, 150)
        );
    }
    eprintln!(
        "simulation: {seeds} seeds, {total} rotations ({outcomes:?}) in {:?}",
        started.elapsed()
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `OKR_SIM_SEED=N`: replay one seed, print its whole history.
#[test]
fn replay() {
    let Some(seed) = std::env::var("OKR_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    let o = simulate(seed, env_u64("OKR_SIM_ROTATIONS", 30));
    println!("{}", o.history);
    assert!(o.violations.is_empty(), "{:#?}", o.violations);
}

#[test]
fn the_same_seed_replays_the_same_history() {
    let a = simulate(7, 10);
    let b = simulate(7, 10);
    assert!(a.rotations > 0);
    assert_eq!(a.history, b.history);
}
