//! Wiring: configuration → backend clients → engine → daemon → HTTP server and signals.

use crate::anomaly::{Detector, Finding};
use crate::audit::{Audit, AuditEvent, AuditFields};
use crate::config::Config;
use crate::daemon::{
    Daemon, DaemonOptions, Fanout, Leadership, LiveRotations, ScheduleObserver, TriggerError,
};
use crate::forward::{self, Forwarder};
use crate::http::{self, ApiTokens, AppState, Readiness, Unready};
use crate::kube::KubeRoller;
use crate::leader::{LeaderConfig, LeaderElector};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::openai::{load_admin_key, OpenAiClient};
use crate::retry::RetryPolicy;
use crate::rotation::ports::{CallObserver, SecretStore};
use crate::rotation::{
    Engine, EngineOptions, Journal, Observer, Ports, RotationEvent, RotationRequest, Trigger,
};
use crate::smoke::HttpProber;
use crate::sync::RwLockExt;
use crate::vault::VaultStore;
use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `run` flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub config: PathBuf,
    pub listen: Option<SocketAddr>,
    pub api_tokens_file: Option<PathBuf>,
    pub audit_file: Option<PathBuf>,
}

/// The connected backends and the engine over them.
pub struct Services {
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
    pub issuer: Arc<OpenAiClient>,
    pub store: Arc<VaultStore>,
    pub roller: Arc<KubeRoller>,
    pub engine: Arc<Engine>,
    pub live: Arc<LiveRotations>,
    pub notifier: Arc<Notifier>,
    /// Notified when a rotation ends: reconciliation runs after each one.
    pub reconcile_wake: Arc<tokio::sync::Notify>,
}

pub fn engine_options(config: &Config) -> EngineOptions {
    let d = &config.daemon;
    EngineOptions {
        account_prefix: d.account_prefix.clone(),
        state_prefix: d.state_prefix.clone(),
        poll_interval: d.poll_interval.get(),
        drain_poll_interval: d.drain_poll_interval.get(),
        delete_retry: RetryPolicy {
            max_retries: d.delete_max_retries,
            base: d.delete_retry_base.get(),
            max_backoff: d.delete_max_backoff.get(),
            ..RetryPolicy::default()
        },
        key_check_retry: RetryPolicy {
            max_retries: 2,
            base: d.poll_interval.get(),
            max_backoff: d.poll_interval.get() * 4,
            ..RetryPolicy::default()
        },
        coalesce_window: d.coalesce_window.get(),
        max_concurrent_rollouts: d.max_concurrent_rollouts,
        kv_mount: config.vault.kv_mount.clone(),
    }
}

/// Connect to OpenAI, Vault and Kubernetes and build the engine, reporting to metrics,
/// audit, the live view and the log.
pub async fn connect(
    config: &Config,
    audit: Audit,
    cancel: &CancellationToken,
) -> anyhow::Result<Services> {
    connect_with(config, audit, cancel, engine_options(config), Vec::new()).await
}

/// [`connect`] with explicit engine options and extra observers (tests).
pub async fn connect_with(
    config: &Config,
    audit: Audit,
    cancel: &CancellationToken,
    opts: EngineOptions,
    extra: Vec<Arc<dyn Observer>>,
) -> anyhow::Result<Services> {
    let names: Vec<String> = config.targets.iter().map(|t| t.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let calls: Arc<dyn CallObserver> = metrics.clone();
    let store = Arc::new(
        VaultStore::connect(&config.vault, calls.clone())
            .await
            .context("connecting to Vault")?,
    );
    store.spawn_token_maintenance(cancel.child_token());
    // With openai.admin_key_vault_path, Vault serves the admin key (it may be rotated).
    let admin_key = match config.openai.admin_key_vault_path.as_deref() {
        Some(path) => crate::admin_key::read_admin_key(&*store, path)
            .await
            .context("reading the OpenAI admin key from Vault")?,
        None => load_admin_key(&config.openai).context("loading the OpenAI admin key")?,
    };
    let issuer = Arc::new(
        OpenAiClient::new(&config.openai, admin_key, calls.clone())
            .context("building the OpenAI client")?,
    );
    let roller = Arc::new(
        KubeRoller::connect(&config.kubernetes, calls)
            .await
            .context("connecting to Kubernetes")?,
    );
    let live = Arc::new(LiveRotations::default());
    let notifier = Arc::new(
        Notifier::new(config, metrics.clone(), metrics.clone())
            .context("setting up notifications")?,
    );
    notifier.spawn(cancel.child_token());
    let mut observers: Vec<Arc<dyn Observer>> = vec![
        live.clone(),
        metrics.clone(),
        Arc::new(audit.clone()),
        Arc::new(LogObserver),
        notifier.clone(),
    ];
    let reconcile_wake = Arc::new(tokio::sync::Notify::new());
    observers.push(Arc::new(crate::reconcile::WakeOnFinish(
        reconcile_wake.clone(),
    )));
    observers.extend(extra);
    let prober = Arc::new(HttpProber::new().context("building the smoke-probe client")?);
    let engine = Arc::new(
        Engine::new(
            Ports::new(issuer.clone(), store.clone(), roller.clone(), prober),
            opts,
        )
        .with_observer(Arc::new(Fanout(observers))),
    );
    engine.set_naming(crate::naming::Naming::from_config(&config.daemon));
    engine.set_forensics(crate::forensics::from_config(config, issuer.clone()));
    Ok(Services {
        metrics,
        audit,
        issuer,
        store,
        roller,
        engine,
        live,
        notifier,
        reconcile_wake,
    })
}

/// Logs each step as it starts and ends: the human-readable story of a rotation.
pub struct LogObserver;

impl Observer for LogObserver {
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        let (id, target) = (&j.rotation_id, &j.target);
        match event {
            RotationEvent::Started => {
                tracing::info!(rotation_id = %id, %target, trigger = j.trigger.as_str(), actor = %j.actor, reason = %j.reason, emergency = j.emergency, "rotation started")
            }
            RotationEvent::StepStarted(step) => {
                tracing::info!(rotation_id = %id, %target, step = step.as_str(), "step started")
            }
            RotationEvent::StepFinished {
                step,
                outcome,
                duration,
            } => {
                tracing::info!(rotation_id = %id, %target, step = step.as_str(), %outcome, elapsed = ?duration, "step finished")
            }
            RotationEvent::Finished => {
                let status = j.status.as_str();
                match &j.error {
                    Some(e) => {
                        tracing::warn!(rotation_id = %id, %target, %status, error = %e, "rotation finished")
                    }
                    None => {
                        tracing::info!(rotation_id = %id, %target, %status, "rotation finished")
                    }
                }
            }
            RotationEvent::AccountDeleted { account_id, why } => {
                tracing::info!(rotation_id = %id, %target, %account_id, %why, "service account deleted")
            }
            RotationEvent::UnlistedConsumers { found, action } => {
                tracing::warn!(rotation_id = %id, %target, action, count = found.len(), found = %found.join("; "), "workloads read this key but are not in the target")
            }
            RotationEvent::PendingRetried => {
                let left = j.pending_deletions.len();
                if left > 0 {
                    tracing::warn!(rotation_id = %id, %target, pending = left, "pending deletions retried; some are still pending")
                }
            }
            RotationEvent::RollbackRefused { reason } => {
                tracing::error!(rotation_id = %id, %target, %reason, "rollback refused: the old key no longer works")
            }
        }
    }
}

/// Writes are allowed while this replica holds the leader Lease (the elector publishes
/// "not leader" before any other replica may take over).
struct LeaseFence(tokio::sync::watch::Receiver<bool>);

impl crate::rotation::ports::Fence for LeaseFence {
    fn check(&self) -> Result<(), String> {
        if *self.0.borrow() {
            Ok(())
        } else {
            Err("this replica does not hold the leader Lease".into())
        }
    }
}

/// Daemon → metrics and audit.
struct Hooks {
    metrics: Arc<Metrics>,
    audit: Audit,
    notifier: Arc<Notifier>,
}

impl Hooks {
    fn record(&self, f: AuditFields) {
        if let Err(e) = self.audit.record(f) {
            tracing::error!(error = %e, "audit write failed");
        }
    }
}

impl ScheduleObserver for Hooks {
    fn next_rotation(&self, target: &str, at: Option<DateTime<Utc>>) {
        self.metrics.set_next_rotation(target, at);
    }
    fn key_created(&self, target: &str, at: Option<DateTime<Utc>>) {
        self.metrics.set_key_created(target, at);
        self.notifier.key_age(target, at, Utc::now());
    }
    fn rotation_requested(&self, r: &RotationRequest, rotation_id: &str) {
        self.record(AuditFields {
            rotation_id: Some(rotation_id.into()),
            target: Some(r.target.clone()),
            actor: Some(r.actor.clone()),
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            outcome: Some(if r.emergency { "emergency" } else { "accepted" }.into()),
            ..AuditFields::new(AuditEvent::RotationRequested)
        });
    }
    fn trigger_refused(&self, r: &RotationRequest, e: &TriggerError) {
        self.record(AuditFields {
            target: Some(r.target.clone()),
            actor: Some(r.actor.clone()),
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            outcome: Some("refused".into()),
            message: Some(e.to_string()),
            ..AuditFields::new(AuditEvent::TriggerRefused)
        });
        if matches!(r.trigger, Trigger::Schedule | Trigger::MaxAge) {
            self.notifier.due_refused(r, &e.to_string());
        }
    }
    fn inventory_taken(&self, projects: &[String], inventory: &crate::inventory::Inventory) {
        self.metrics.set_inventory(projects, inventory);
    }
    fn swept(&self, account_ids: &[String]) {
        self.metrics.orphans_swept(account_ids.len() as u64);
        for id in account_ids {
            self.record(AuditFields {
                service_account_id: Some(id.clone()),
                actor: Some("sweep".into()),
                outcome: Some("deleted".into()),
                ..AuditFields::new(AuditEvent::SweepDeleted)
            });
        }
    }
    fn rotation_resumed(&self, r: &RotationRequest, rotation_id: &str) {
        self.record(AuditFields {
            rotation_id: Some(rotation_id.into()),
            target: Some(r.target.clone()),
            actor: Some(r.actor.clone()),
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            outcome: Some(
                if r.emergency {
                    "resumed unfinished rotation as an emergency"
                } else {
                    "resumed unfinished rotation"
                }
                .into(),
            ),
            ..AuditFields::new(AuditEvent::RotationRequested)
        });
    }
    fn unconfigured_target(&self, target: &str, rotation_id: &str, resumed: bool) {
        self.record(AuditFields {
            rotation_id: Some(rotation_id.into()),
            target: Some(target.into()),
            actor: Some("daemon".into()),
            outcome: Some(if resumed { "resumed" } else { "left alone" }.into()),
            message: Some(if resumed {
                "the target is not configured any more; its unfinished rotation is finished from the journal's copy of the target".into()
            } else {
                "the target is not configured and its journal has no copy of it; nothing is done".into()
            }),
            ..AuditFields::new(AuditEvent::UnconfiguredTarget)
        });
    }
    fn rotation_upgraded(&self, r: &RotationRequest, rotation_id: &str) {
        self.record(AuditFields {
            rotation_id: Some(rotation_id.into()),
            target: Some(r.target.clone()),
            actor: Some(r.actor.clone()),
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            outcome: Some("upgraded to emergency".into()),
            ..AuditFields::new(AuditEvent::RotationRequested)
        });
        self.notifier.emergency_upgraded(r, rotation_id);
    }
}

/// Detector → metrics, audit and the `anomaly` notice.
impl crate::anomaly::AnomalyReport for Hooks {
    fn checked(&self, target: &str, outcome: &'static str, finding: Option<&Finding>) {
        self.metrics
            .anomaly_check(target, outcome, finding.map(|f| (f.ratio, f.fired)));
    }

    fn fired(
        &self,
        target: &crate::config::Target,
        cfg: &crate::config::AnomalyConfig,
        finding: &Finding,
        rotation: Option<&Result<String, String>>,
    ) {
        let detail = finding.describe(cfg);
        let (outcome, rotation_id, message) = match rotation {
            None => ("alert".to_string(), None, detail.clone()),
            Some(Ok(id)) => (
                "emergency rotation requested".into(),
                Some(id.clone()),
                detail.clone(),
            ),
            Some(Err(e)) => (
                "emergency rotation refused".into(),
                None,
                format!("{detail}; the rotation was refused: {e}"),
            ),
        };
        self.record(AuditFields {
            rotation_id: rotation_id.clone(),
            target: Some(target.name.clone()),
            actor: Some("anomaly".into()),
            trigger: Some(Trigger::UsageAnomaly.as_str().into()),
            reason: Some(crate::anomaly::REASON.into()),
            outcome: Some(outcome),
            key_id: Some(finding.key_id.clone()),
            message: Some(message.clone()),
            ..AuditFields::new(AuditEvent::UsageAnomaly)
        });
        self.notifier.notify(crate::notify::Notice {
            event: crate::config::NotifyEvent::Anomaly,
            target: target.name.clone(),
            outcome: cfg.action.as_str().into(),
            rotation_id,
            trigger: Some(Trigger::UsageAnomaly.as_str().into()),
            reason: Some(crate::anomaly::REASON.into()),
            detail: Some(message),
            at: Utc::now(),
        });
    }
}

/// `/readyz`: Vault and Kubernetes answer (the configuration loaded, or we would not run).
struct BackendReadiness {
    store: Arc<VaultStore>,
    roller: Arc<KubeRoller>,
}

#[async_trait]
impl Readiness for BackendReadiness {
    async fn check(&self) -> Result<(), Vec<Unready>> {
        let (v, k) = tokio::join!(self.store.health(), self.roller.ping());
        let problems: Vec<Unready> = [("vault", v.err()), ("kubernetes", k.err())]
            .into_iter()
            .filter_map(|(backend, e)| {
                e.map(|e| Unready {
                    backend,
                    detail: e.to_string(),
                })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl RunOptions {
    /// The configuration file with this run's overrides applied.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(&self.config)?;
        if let Some(l) = self.listen {
            config.daemon.listen = l;
        }
        if let Some(f) = &self.audit_file {
            config.daemon.audit.file = Some(f.clone());
        }
        Ok(config)
    }
}

/// What a running daemon exposes to its caller (the demo and tests use it).
pub struct Running {
    pub daemon: Daemon,
    pub services: Arc<Services>,
    pub addr: SocketAddr,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Start the daemon with `config` (as [`RunOptions::load_config`] read it): connect, serve
/// HTTP, handle signals, schedule. Runs until `shutdown`
/// (or SIGTERM/SIGINT when `signals`), then stops taking work and lets running steps finish.
pub async fn start(
    opts: RunOptions,
    config: Config,
    shutdown: CancellationToken,
    signals: bool,
) -> anyhow::Result<Running> {
    let audit = Audit::open(
        config.daemon.audit.file.as_deref(),
        config.daemon.audit.stdout,
    )
    .context("opening the audit trail")?;
    let services = Arc::new(connect(&config, audit.clone(), &shutdown).await?);
    let hooks = Arc::new(Hooks {
        metrics: services.metrics.clone(),
        audit: audit.clone(),
        notifier: services.notifier.clone(),
    });
    // Bound first: the port goes into the API URL this replica advertises.
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .with_context(|| format!("listening on {}", config.daemon.listen))?;
    let addr = listener.local_addr()?;
    let election_stop = CancellationToken::new();
    let mut election_task = None;
    // (identity, own API URL) when elected: a follower then forwards API calls.
    let mut forwarding = None;
    let leader = if config.daemon.leader_election.enabled {
        let le = &config.daemon.leader_election;
        let identity = le
            .identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("openai-key-rotator-{}", std::process::id()));
        let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| le.namespace.clone());
        let api_url = advertise_url(le.advertise_url.as_deref(), addr.port());
        match &api_url {
            Some(url) => tracing::info!(%url, "advertising this replica's API URL on the Lease"),
            None => tracing::warn!(
                "no daemon.leader_election.advertise_url and no POD_IP: while this replica leads, followers cannot forward API calls to it"
            ),
        }
        forwarding = Some((identity.clone(), api_url.clone()));
        let cfg = LeaderConfig {
            namespace,
            lease_name: le.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: le.lease_duration.get(),
            renew_deadline: le.renew_deadline.get(),
            retry_period: le.retry_period.get(),
            api_url,
        };
        let elector = LeaderElector::try_new(services.roller.client(), cfg)
            .context("daemon.leader_election")?;
        // Not a child of `shutdown`: the Lease is released only after the running steps
        // stopped, or the next leader would resume them while they still run.
        let (is_leader, holder, task) = elector.spawn(election_stop.clone());
        election_task = Some(task);
        // A replica that lost (or released) the Lease makes no further remote write.
        services
            .engine
            .set_fence(Arc::new(LeaseFence(is_leader.clone())));
        tracing::info!(%identity, "leader election enabled");
        // Publish leadership as a metric.
        let (metrics, mut watch) = (services.metrics.clone(), is_leader.clone());
        tokio::spawn(async move {
            loop {
                metrics.set_leader(*watch.borrow_and_update());
                if watch.changed().await.is_err() {
                    metrics.set_leader(false);
                    break;
                }
            }
        });
        Leadership::elected(is_leader, holder)
    } else {
        services.metrics.set_leader(true);
        Leadership::sole()
    };
    let daemon = Daemon::new(
        Arc::new(config.clone()),
        services.engine.clone(),
        services.store.clone() as Arc<dyn SecretStore>,
        services.live.clone(),
        hooks.clone(),
        leader,
        daemon_options(&config),
        shutdown.clone(),
    );
    // Polls only while this replica leads; triggers through the daemon like any trigger.
    Arc::new(Detector::new(
        services.issuer.clone(),
        services.store.clone(),
        Arc::new(daemon.clone()),
        hooks.clone(),
        Arc::new(crate::rotation::ports::SystemClock),
    ))
    .spawn(shutdown.clone());
    if let Some(mut rotator) = crate::admin_key::from_config(&config, &services)? {
        let w = daemon.clone();
        if let Some(r) = Arc::get_mut(&mut rotator) {
            r.may_write = Some(Arc::new(move || w.is_leader()));
        }
        let (d, every, stop) = (
            daemon.clone(),
            config.openai.admin_key_check_interval.get(),
            shutdown.clone(),
        );
        daemon.spawn_background(crate::supervise::supervised(
            "admin-key rotation",
            Duration::from_secs(5),
            shutdown.clone(),
            move || {
                let d = d.clone();
                rotator
                    .clone()
                    .run(every, move || d.is_leader(), stop.clone())
            },
        ));
    }
    if let Some(reconciler) = crate::reconcile::from_config(&config, &services)? {
        let (d, every, wake, stop) = (
            daemon.clone(),
            config.daemon.reconcile.interval.get(),
            services.reconcile_wake.clone(),
            shutdown.clone(),
        );
        daemon.spawn_background(crate::supervise::supervised(
            "reconciliation",
            Duration::from_secs(5),
            shutdown.clone(),
            move || {
                let (p, l) = (d.clone(), d.clone());
                reconciler.clone().run(
                    every,
                    move || crate::reconcile::configured_projects(&p.config()),
                    move || l.is_leader(),
                    wake.clone(),
                    stop.clone(),
                )
            },
        ));
    }
    let tokens = match &opts.api_tokens_file {
        Some(f) => ApiTokens::load(f)?,
        None => {
            tracing::warn!("no --api-tokens-file: the trigger API refuses every call");
            ApiTokens::default()
        }
    };
    let tokens = Arc::new(RwLock::new(tokens));
    let metrics = services.metrics.clone();
    let forward = match forwarding {
        Some((identity, own_url)) => Some(Arc::new(
            Forwarder::new(
                identity,
                own_url,
                Arc::new(daemon.clone()),
                forward::DEFAULT_TIMEOUT,
            )
            .context("daemon.leader_election")?,
        )),
        None => None,
    };
    let state = AppState {
        daemon: daemon.clone(),
        tokens: tokens.clone(),
        readiness: Arc::new(BackendReadiness {
            store: services.store.clone(),
            roller: services.roller.clone(),
        }),
        metrics: Arc::new(move || metrics.render()),
        forward,
    };
    tracing::info!(%addr, targets = config.targets.len(), "openai-key-rotator running");
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    if signals {
        spawn_signal_handlers(
            daemon.clone(),
            opts.clone(),
            tokens,
            services.clone(),
            hooks,
            shutdown.clone(),
        )?;
    }
    let d = daemon.clone();
    let done = tokio::spawn(async move {
        d.run().await;
        // The steps have stopped (or their grace ran out): now let the next leader in.
        election_stop.cancel();
        if let Some(task) = election_task {
            let _ = task.await;
        }
        server.await??;
        Ok(())
    });
    Ok(Running {
        daemon,
        services,
        addr,
        done,
    })
}

/// The daemon's loop settings from the file.
fn daemon_options(config: &Config) -> DaemonOptions {
    DaemonOptions {
        pending_retry_interval: config.daemon.pending_retry_interval.get(),
        ..DaemonOptions::default()
    }
}

/// The API URL to advertise: the configured one, else `http://POD_IP:port` (the pod's IP
/// from the downward API), else none.
fn advertise_url(configured: Option<&str>, port: u16) -> Option<String> {
    if let Some(url) = configured {
        return Some(url.to_string());
    }
    let ip = std::env::var("POD_IP").ok()?;
    match ip.trim().parse::<std::net::IpAddr>() {
        Ok(ip) => Some(format!("http://{}", SocketAddr::new(ip, port))),
        Err(_) => {
            tracing::warn!(pod_ip = %ip, "POD_IP is not an IP address; not advertising an API URL");
            None
        }
    }
}

/// SIGUSR1: emergency-rotate every target (what an incident responder reaches for);
/// SIGHUP: reload config and API tokens, keeping the old ones if the new are invalid;
/// SIGTERM/SIGINT: shut down.
fn spawn_signal_handlers(
    daemon: Daemon,
    opts: RunOptions,
    tokens: Arc<RwLock<ApiTokens>>,
    services: Arc<Services>,
    hooks: Arc<Hooks>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); shutdown.cancel(); }
                _ = usr1.recv() => {
                    tracing::warn!("SIGUSR1: emergency rotation of every target");
                    for t in &daemon.config().targets {
                        let req = RotationRequest::new(&t.name, Trigger::Signal, "signal", "SIGUSR1", Utc::now())
                            .emergency(false);
                        let r = daemon.trigger(&req).await;
                        match r {
                            Ok(a) => tracing::info!(target = %t.name, rotation_id = %a.rotation_id(), "rotation requested by signal"),
                            Err(e) => tracing::warn!(target = %t.name, error = %e, "signal rotation refused"),
                        }
                    }
                }
                _ = hup.recv() => reload(&daemon, &opts, &tokens, &services, &hooks),
            }
        }
    });
    Ok(())
}

fn reload(
    daemon: &Daemon,
    opts: &RunOptions,
    tokens: &Arc<RwLock<ApiTokens>>,
    services: &Services,
    hooks: &Hooks,
) {
    let result = opts.load_config().and_then(|new| {
        let new_tokens = match &opts.api_tokens_file {
            Some(f) => Some(ApiTokens::load(f)?),
            None => None,
        };
        let notify = Notifier::stage(&new)?;
        Ok((new, new_tokens, notify))
    });
    let rejected = |e: String| {
        tracing::error!(error = %e, "SIGHUP: new configuration rejected; keeping the running one");
        hooks.record(AuditFields {
            actor: Some("signal".into()),
            outcome: Some("rejected".into()),
            message: Some(e),
            ..AuditFields::new(AuditEvent::ConfigReloaded)
        });
    };
    let (new, new_tokens, notify) = match result {
        Ok(r) => r,
        Err(e) => return rejected(format!("{e:#}")),
    };
    let old = daemon.config();
    let on_restart = restart_only_changes(&old, &new);
    let names: Vec<String> = new.targets.iter().map(|t| t.name.clone()).collect();
    if let Err(e) = daemon.reload(Arc::new(new)) {
        return rejected(e.to_string());
    }
    services.metrics.set_targets(&names);
    services.notifier.apply(notify);
    if let Some(t) = new_tokens {
        *tokens.write_now() = t;
    }
    let mut message = format!("{} targets", names.len());
    if !on_restart.is_empty() {
        let fields = on_restart.join(", ");
        tracing::warn!(%fields, "SIGHUP: these settings changed and take effect only on restart");
        message.push_str(&format!("; on restart only: {fields}"));
    }
    tracing::info!(targets = names.len(), "SIGHUP: configuration reloaded");
    hooks.record(AuditFields {
        actor: Some("signal".into()),
        outcome: Some("reloaded".into()),
        message: Some(message),
        ..AuditFields::new(AuditEvent::ConfigReloaded)
    });
}

/// Settings a running daemon keeps until restart (its connections and listener were built
/// from them), named as in the file.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.daemon, &new.daemon);
    [
        ("vault", old.vault != new.vault),
        ("openai", old.openai != new.openai),
        ("kubernetes", old.kubernetes != new.kubernetes),
        ("daemon.listen", o.listen != n.listen),
        ("daemon.audit", o.audit != n.audit),
        ("daemon.log_format", o.log_format != n.log_format),
        (
            "daemon.leader_election",
            o.leader_election != n.leader_election,
        ),
        // The engine's options are fixed when it is built.
        ("daemon.poll_interval", o.poll_interval != n.poll_interval),
        (
            "daemon.drain_poll_interval",
            o.drain_poll_interval != n.drain_poll_interval,
        ),
        (
            "daemon.delete_max_retries",
            o.delete_max_retries != n.delete_max_retries,
        ),
        (
            "daemon.delete_retry_base",
            o.delete_retry_base != n.delete_retry_base,
        ),
        (
            "daemon.delete_max_backoff",
            o.delete_max_backoff != n.delete_max_backoff,
        ),
        (
            "daemon.coalesce_window",
            o.coalesce_window != n.coalesce_window,
        ),
        (
            "daemon.max_concurrent_rollouts",
            o.max_concurrent_rollouts != n.max_concurrent_rollouts,
        ),
        (
            "daemon.pending_retry_interval",
            o.pending_retry_interval != n.pending_retry_interval,
        ),
        (
            "notifications.queue_size",
            old.notifications.queue_size != new.notifications.queue_size,
        ),
    ]
    .into_iter()
    .filter_map(|(f, changed)| changed.then_some(f))
    .collect()
}

/// `rotate TARGET --config FILE --once [--dry-run]`: one rotation in-process.
pub async fn rotate_once(
    config_path: &Path,
    target: &str,
    dry_run: bool,
    emergency: bool,
    reason: &str,
) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(config_path)?;
    let t = config
        .target(target)
        .with_context(|| format!("no target {target:?} in {}", config_path.display()))?
        .clone();
    let cancel = CancellationToken::new();
    let audit = Audit::open(
        config.daemon.audit.file.as_deref(),
        config.daemon.audit.stdout,
    )?;
    let services = connect(&config, audit, &cancel).await?;
    if dry_run {
        println!("plan for target {target} (nothing is changed):");
        for line in services.engine.plan(&t).await? {
            println!("  {line}");
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let reason = if reason.is_empty() {
        "cli --once"
    } else {
        reason
    };
    let mut req = RotationRequest::new(target, Trigger::Cli, "cli", reason, Utc::now());
    if emergency {
        req = req.emergency(false);
    }
    let engine = &services.engine;
    let journal = match engine.journal(target).await? {
        Some(stored) if !stored.journal.status.is_terminal() => {
            println!(
                "rotation {} of {target} is unfinished; resuming it",
                stored.journal.rotation_id
            );
            engine.resume(Some(&t), stored, Arc::default()).await?
        }
        prior => engine.rotate(&t, req, prior, Arc::default()).await?,
    };
    cancel.cancel();
    println!(
        "rotation {} of {target}: {}",
        journal.rotation_id,
        journal.status.as_str()
    );
    for s in &journal.steps {
        println!(
            "  {:<8} {}",
            s.step.as_str(),
            s.outcome.as_deref().unwrap_or("-")
        );
    }
    if let Some(e) = &journal.error {
        println!("error: {e}");
    }
    Ok(if journal.status == crate::rotation::Status::Completed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

/// `sweep --config FILE [--min-age D]`: delete orphaned managed accounts now.
pub async fn sweep_once(
    config_path: &Path,
    min_age: Option<Duration>,
) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(config_path)?;
    let cancel = CancellationToken::new();
    let audit = Audit::open(
        config.daemon.audit.file.as_deref(),
        config.daemon.audit.stdout,
    )?;
    let services = connect(&config, audit.clone(), &cancel).await?;
    let r = services
        .engine
        .sweep(
            &config.targets,
            min_age.unwrap_or(config.daemon.sweep_min_age.get()),
        )
        .await?;
    cancel.cancel();
    for id in &r.deleted {
        let _ = audit.record(AuditFields {
            service_account_id: Some(id.clone()),
            actor: Some("cli".into()),
            outcome: Some("deleted".into()),
            ..AuditFields::new(AuditEvent::SweepDeleted)
        });
        println!("deleted orphaned service account {id}");
    }
    println!(
        "sweep: {} deleted, {} kept (referenced), {} kept (younger than the safety margin), {} kept (key still in use), {} left alone (named like ours, but no journal names them)",
        r.deleted.len(),
        r.kept_referenced,
        r.kept_young,
        r.kept_in_use,
        r.kept_unproven
    );
    for t in &r.unconfigured_targets {
        println!("note: target {t} has a journal under the state prefix but is not configured; its accounts are left alone");
    }
    for id in &r.failed {
        println!("could not delete {id} (the next sweep tries again)");
    }
    Ok(if r.failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

/// `inventory --config FILE`: connect, take the inventory once, print it (table or JSON).
pub async fn inventory_once(
    args: &crate::cli::InventoryArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(&args.config)?;
    let mut opts = crate::inventory::Options::from_config(&config.daemon);
    opts.project = args.project.clone();
    if let Some(raw) = &args.unused_days {
        opts.unused_after =
            crate::inventory::unused_days("--unused-days", raw).map_err(anyhow::Error::msg)?;
    }
    let cancel = CancellationToken::new();
    // The inventory writes nothing: no audit sink.
    let services = connect(&config, Audit::open(None, false)?, &cancel).await?;
    let inv = crate::inventory::take(&services.engine, &config.targets, &opts).await;
    cancel.cancel();
    let inv = inv?;
    match args.format {
        crate::cli::InventoryFormat::Table => print!("{}", inv.to_table()),
        crate::cli::InventoryFormat::Json => println!("{}", inv.to_json()),
    }
    Ok(if inv.has_errors() {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = r#"
[vault]
address = "http://127.0.0.1:8200"

[[targets]]
name = "chatbot"
project_id = "proj_abc"
vault_path = "apps/chatbot/openai"
workloads = ["demo/Deployment/chatbot"]
"#;

    #[test]
    fn the_pending_retry_interval_comes_from_the_file_and_changes_only_on_restart() {
        let default = Config::parse(TARGET, "t").unwrap();
        assert_eq!(
            daemon_options(&default).pending_retry_interval,
            Duration::from_secs(300)
        );
        let set = Config::parse(
            &format!("[daemon]\npending_retry_interval = \"30s\"\n{TARGET}"),
            "t",
        )
        .unwrap();
        assert_eq!(
            daemon_options(&set).pending_retry_interval,
            Duration::from_secs(30)
        );
        assert_eq!(
            restart_only_changes(&default, &set),
            vec!["daemon.pending_retry_interval"]
        );
        assert!(restart_only_changes(&default, &default).is_empty());
    }
}
