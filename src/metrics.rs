//! Prometheus metrics (prefix `openai_key_rotator_`), fed by the rotation engine's
//! [`Observer`] and the clients' [`CallObserver`].
//!
//! Every label comes from a bounded set: targets from the configuration (events for any other
//! target are ignored rather than creating series), steps, triggers, outcomes, backends and
//! status classes from enums, operations from the clients' fixed `&'static str` names. The
//! metrics live in their own [`Registry`] (not the process-global one) so several instances,
//! e.g. parallel tests, never share series. No key material reaches a label or a value: the
//! observers only read ids, statuses and times.

use crate::rotation::journal::PendingReason;
use crate::rotation::ports::{Backend, CallObserver, StatusClass};
use crate::rotation::{Journal, Observer, RotationEvent, Status, Step, Trigger};
use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::BTreeSet;
use std::sync::RwLock;
use std::time::Duration;

const PREFIX: &str = "openai_key_rotator";

/// Every trigger, for pre-creating and removing per-target series.
const TRIGGERS: [Trigger; 6] = [
    Trigger::Schedule,
    Trigger::MaxAge,
    Trigger::Signal,
    Trigger::Api,
    Trigger::Cli,
    Trigger::UsageAnomaly,
];

/// The terminal outcomes a rotation is counted under.
const OUTCOMES: [Status; 3] = [Status::Completed, Status::RolledBack, Status::Failed];

/// What became of a webhook notice (`notifications_total{outcome}`).
pub const NOTIFY_OUTCOMES: [&str; 4] = ["delivered", "failed", "dropped", "suppressed"];

/// Outcomes of a usage-anomaly check (`usage_anomaly_checks_total{outcome}`).
pub const ANOMALY_OUTCOMES: [&str; 5] = [
    "normal",
    "anomaly",
    "cooldown",
    "insufficient_history",
    "error",
];

const BACKENDS: [Backend; 3] = [Backend::OpenAi, Backend::Vault, Backend::Kubernetes];

/// Rotations and their steps take minutes (rollouts, grace periods, drains): buckets up to
/// an hour.
const ROTATION_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// Backend HTTP calls: milliseconds to the clients' timeouts.
const API_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The daemon's metric set, in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Configured targets: the only values the `target` label takes.
    targets: RwLock<BTreeSet<String>>,
    rotations: IntCounterVec,
    rotation_duration: HistogramVec,
    step_duration: HistogramVec,
    last_success: GaugeVec,
    next_rotation: GaugeVec,
    key_created: GaugeVec,
    in_progress: IntGaugeVec,
    rotation_step: IntGaugeVec,
    api_requests: IntCounterVec,
    api_duration: HistogramVec,
    retries: IntCounterVec,
    rate_limit_waits: IntCounterVec,
    orphans_swept: IntCounter,
    pending_deletion: IntGaugeVec,
    leaked_pending: IntGaugeVec,
    unlisted: IntGaugeVec,
    leader: IntGauge,
    build_info: IntGaugeVec,
    inventory_keys: IntGaugeVec,
    inventory_errors: IntGaugeVec,
    key_expires: GaugeVec,
    notifications: IntCounterVec,
    usage_anomaly: IntGaugeVec,
    usage_anomaly_ratio: GaugeVec,
    usage_anomaly_checks: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

fn name(short: &str) -> String {
    format!("{PREFIX}_{short}")
}

/// Seconds since the epoch, 0 for "unknown" (what alert rules treat as "never").
fn epoch_seconds(at: Option<DateTime<Utc>>) -> f64 {
    at.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)
}

impl Metrics {
    /// A registry holding the full metric set, with the per-target series of `targets`
    /// pre-created at 0 so alerts (absent series never fire) see them from the start.
    pub fn new(targets: &[String]) -> Metrics {
        let registry = Registry::new();
        // Metric definitions are constants: a failure here is a programming error.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        let counter = |short: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name(short), help), labels).expect("valid metric"),
            )
        };
        let gauge = |short: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                GaugeVec::new(Opts::new(name(short), help), labels).expect("valid metric"),
            )
        };
        let int_gauge = |short: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name(short), help), labels).expect("valid metric"),
            )
        };
        let histogram = |short: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name(short), help).buckets(buckets.to_vec()),
                    labels,
                )
                .expect("valid metric"),
            )
        };
        let m = Metrics {
            rotations: counter(
                "rotations_total",
                "Rotations that reached a terminal status, by target, trigger and outcome.",
                &["target", "trigger", "outcome"],
            ),
            rotation_duration: histogram(
                "rotation_duration_seconds",
                "Wall time of finished rotations, start to terminal status.",
                &["target"],
                &ROTATION_BUCKETS,
            ),
            step_duration: histogram(
                "step_duration_seconds",
                "Wall time of rotation steps.",
                &["step"],
                &ROTATION_BUCKETS,
            ),
            last_success: gauge(
                "last_success_timestamp_seconds",
                "When the target's last rotation completed (0: none seen).",
                &["target"],
            ),
            next_rotation: gauge(
                "next_rotation_timestamp_seconds",
                "When the target's next scheduled rotation is due (0: none scheduled).",
                &["target"],
            ),
            key_created: gauge(
                "key_created_timestamp_seconds",
                "When the key Vault serves for the target was created (0: unknown).",
                &["target"],
            ),
            in_progress: int_gauge(
                "rotation_in_progress",
                "1 while a rotation of the target runs.",
                &["target"],
            ),
            rotation_step: int_gauge(
                "rotation_step",
                "1 for the step the target's running rotation is in, 0 otherwise.",
                &["target", "step"],
            ),
            api_requests: counter(
                "api_requests_total",
                "Backend API calls, by backend, operation and status class.",
                &["backend", "operation", "status_class"],
            ),
            api_duration: histogram(
                "api_request_duration_seconds",
                "Latency of backend API calls.",
                &["backend", "operation"],
                &API_BUCKETS,
            ),
            retries: counter(
                "retries_total",
                "Backend API calls retried by the clients.",
                &["backend"],
            ),
            rate_limit_waits: counter(
                "rate_limit_waits_total",
                "Backend API calls held by the client's rate-limit pacer before they went.",
                &["backend"],
            ),
            orphans_swept: reg(
                &registry,
                IntCounter::with_opts(Opts::new(
                    name("orphans_swept_total"),
                    "Orphaned managed service accounts deleted by the sweep.",
                ))
                .expect("valid metric"),
            ),
            pending_deletion: int_gauge(
                "old_account_pending_deletion",
                "Service accounts the target's last rotation left for later deletion.",
                &["target"],
            ),
            leaked_pending: int_gauge(
                "leaked_key_pending_revocation",
                "Old accounts of emergency rotations (possibly leaked keys) not yet deleted.",
                &["target"],
            ),
            unlisted: int_gauge(
                "unlisted_consumers",
                "Consumers of the target's key found in the cluster but not in the target, at its last rotation's start.",
                &["target"],
            ),
            leader: reg(
                &registry,
                IntGauge::with_opts(Opts::new(
                    name("leader"),
                    "1 when this replica holds the leader lease and rotates.",
                ))
                .expect("valid metric"),
            ),
            build_info: int_gauge(
                "build_info",
                "Always 1; the version is in the label.",
                &["version"],
            ),
            inventory_keys: int_gauge(
                "inventory_keys",
                "API keys of each configured project at the last inventory, by state (managed, unmanaged, unused).",
                &["project", "state"],
            ),
            inventory_errors: int_gauge(
                "inventory_errors",
                "1 when the last inventory could not list the project's keys.",
                &["project"],
            ),
            key_expires: gauge(
                "key_expires_timestamp_seconds",
                "When the key Vault serves for the target expires, from the last inventory (0: never or unknown).",
                &["target"],
            ),
            notifications: counter(
                "notifications_total",
                "Webhook notices by event and outcome (delivered, failed, dropped, suppressed), per webhook.",
                &["event", "outcome"],
            ),
            usage_anomaly: int_gauge(
                "usage_anomaly",
                "1 while the target's key's usage is past its anomaly threshold (last check).",
                &["target"],
            ),
            usage_anomaly_ratio: gauge(
                "usage_anomaly_ratio",
                "Requests in the anomaly window over the baseline's rate for the same length (0: not judged).",
                &["target"],
            ),
            usage_anomaly_checks: counter(
                "usage_anomaly_checks_total",
                "Usage-anomaly checks by outcome (normal, anomaly, cooldown, insufficient_history, error).",
                &["target", "outcome"],
            ),
            targets: RwLock::new(BTreeSet::new()),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for step in Step::ALL {
            m.step_duration.with_label_values(&[step.as_str()]);
        }
        for backend in BACKENDS {
            m.retries.with_label_values(&[backend.as_str()]);
            m.rate_limit_waits.with_label_values(&[backend.as_str()]);
        }
        for event in crate::config::NotifyEvent::ALL {
            for outcome in NOTIFY_OUTCOMES {
                m.notifications
                    .with_label_values(&[event.as_str(), outcome]);
            }
        }
        m.set_targets(targets);
        m
    }

    /// The registry, for serving or for adding process metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    fn known(&self, target: &str) -> bool {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(target)
    }

    pub fn set_next_rotation(&self, target: &str, at: Option<DateTime<Utc>>) {
        if self.known(target) {
            self.next_rotation
                .with_label_values(&[target])
                .set(epoch_seconds(at));
        }
    }

    /// The daemon sets this from Vault's metadata of the current key (so key age survives
    /// restarts); a completed rotation also sets it.
    pub fn set_key_created(&self, target: &str, at: Option<DateTime<Utc>>) {
        if self.known(target) {
            self.key_created
                .with_label_values(&[target])
                .set(epoch_seconds(at));
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Make `targets` the configured set (after a config reload): series of removed targets
    /// are dropped, those of new targets created at 0.
    pub fn set_targets(&self, targets: &[String]) {
        let mut current = self.targets.write().unwrap_or_else(|e| e.into_inner());
        let wanted: BTreeSet<String> = targets.iter().cloned().collect();
        for gone in current.difference(&wanted) {
            self.remove_target(gone);
        }
        for new in wanted.difference(&current) {
            self.create_target(new);
        }
        *current = wanted;
    }

    fn create_target(&self, t: &str) {
        for trigger in TRIGGERS {
            for outcome in OUTCOMES {
                self.rotations
                    .with_label_values(&[t, trigger.as_str(), outcome.as_str()]);
            }
        }
        self.rotation_duration.with_label_values(&[t]);
        self.last_success.with_label_values(&[t]).set(0.0);
        self.next_rotation.with_label_values(&[t]).set(0.0);
        self.key_created.with_label_values(&[t]).set(0.0);
        self.in_progress.with_label_values(&[t]).set(0);
        for step in Step::ALL {
            self.rotation_step
                .with_label_values(&[t, step.as_str()])
                .set(0);
        }
        self.pending_deletion.with_label_values(&[t]).set(0);
        self.leaked_pending.with_label_values(&[t]).set(0);
        self.unlisted.with_label_values(&[t]).set(0);
        self.usage_anomaly.with_label_values(&[t]).set(0);
        self.usage_anomaly_ratio.with_label_values(&[t]).set(0.0);
        for outcome in ANOMALY_OUTCOMES {
            self.usage_anomaly_checks.with_label_values(&[t, outcome]);
        }
    }

    fn remove_target(&self, t: &str) {
        // Errors only mean "no such series", which is the wanted end state.
        for trigger in TRIGGERS {
            for outcome in OUTCOMES {
                let _ =
                    self.rotations
                        .remove_label_values(&[t, trigger.as_str(), outcome.as_str()]);
            }
        }
        let _ = self.rotation_duration.remove_label_values(&[t]);
        let _ = self.last_success.remove_label_values(&[t]);
        let _ = self.next_rotation.remove_label_values(&[t]);
        let _ = self.key_created.remove_label_values(&[t]);
        let _ = self.in_progress.remove_label_values(&[t]);
        for step in Step::ALL {
            let _ = self.rotation_step.remove_label_values(&[t, step.as_str()]);
        }
        let _ = self.pending_deletion.remove_label_values(&[t]);
        let _ = self.leaked_pending.remove_label_values(&[t]);
        let _ = self.unlisted.remove_label_values(&[t]);
        let _ = self.key_expires.remove_label_values(&[t]);
        let _ = self.usage_anomaly.remove_label_values(&[t]);
        let _ = self.usage_anomaly_ratio.remove_label_values(&[t]);
        for outcome in ANOMALY_OUTCOMES {
            let _ = self.usage_anomaly_checks.remove_label_values(&[t, outcome]);
        }
    }

    pub fn orphans_swept(&self, n: u64) {
        self.orphans_swept.inc_by(n);
    }

    /// The pending-deletion gauges of `j`'s target, from the journal (the one truth).
    fn set_pending(&self, j: &Journal) {
        let t = j.target.as_str();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let leaked = j
            .pending_deletions
            .iter()
            .filter(|p| p.reason == PendingReason::Leaked)
            .count();
        self.pending_deletion
            .with_label_values(&[t])
            .set(count(j.pending_deletions.len()));
        self.leaked_pending
            .with_label_values(&[t])
            .set(count(leaked));
    }

    /// Publish an inventory: key counts of the configured `projects` only (the label stays
    /// bounded; series of projects no longer configured go), and the served keys' expiry.
    pub fn set_inventory(&self, projects: &[String], inv: &crate::inventory::Inventory) {
        self.inventory_keys.reset();
        self.inventory_errors.reset();
        for p in projects {
            if !inv.projects.contains(p) {
                continue;
            }
            let c = inv.counts(p);
            self.inventory_errors
                .with_label_values(&[p])
                .set(i64::from(c.error));
            if c.error {
                // Not listed: no counts rather than zeros that look like "none".
                continue;
            }
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for (state, v) in [
                ("managed", c.managed),
                ("unmanaged", c.unmanaged),
                ("unused", c.unused),
            ] {
                self.inventory_keys.with_label_values(&[p, state]).set(n(v));
            }
        }
        for s in &inv.served {
            if self.known(&s.target) {
                self.key_expires
                    .with_label_values(&[&s.target])
                    .set(epoch_seconds(s.expires_at));
            }
        }
    }

    /// Point `rotation_step` of `target` at `current` (all 0 for `None`).
    fn set_step(&self, target: &str, current: Option<Step>) {
        for step in Step::ALL {
            self.rotation_step
                .with_label_values(&[target, step.as_str()])
                .set(i64::from(Some(step) == current));
        }
    }

    /// One webhook notice's fate; `outcome` is one of [`NOTIFY_OUTCOMES`].
    pub fn notification(&self, event: crate::config::NotifyEvent, outcome: &'static str) {
        self.notifications
            .with_label_values(&[event.as_str(), outcome])
            .inc();
    }

    /// One usage-anomaly check of a configured target: its outcome (one of
    /// [`ANOMALY_OUTCOMES`]) and, when judged, the ratio and whether it is past the threshold.
    pub fn anomaly_check(&self, target: &str, outcome: &'static str, judged: Option<(f64, bool)>) {
        let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
        if !targets.contains(target) {
            return;
        }
        self.usage_anomaly_checks
            .with_label_values(&[target, outcome])
            .inc();
        if let Some((ratio, firing)) = judged {
            // +Inf when the baseline saw no use at all.
            self.usage_anomaly_ratio
                .with_label_values(&[target])
                .set(ratio);
            self.usage_anomaly
                .with_label_values(&[target])
                .set(i64::from(firing));
        }
    }
}

impl Observer for Metrics {
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        let t = j.target.as_str();
        // Holding the read lock keeps a concurrent reload from removing the target's series
        // between the check and the update (which would re-create them).
        let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
        if !targets.contains(t) {
            return;
        }
        match event {
            RotationEvent::Started => {
                self.in_progress.with_label_values(&[t]).set(1);
                self.unlisted.with_label_values(&[t]).set(0);
                self.set_step(t, None);
            }
            RotationEvent::StepStarted(step) => {
                // Also how a resumed rotation (which sends no Started) shows as running.
                self.in_progress.with_label_values(&[t]).set(1);
                self.set_step(t, Some(*step));
            }
            RotationEvent::StepFinished { step, duration, .. } => {
                self.step_duration
                    .with_label_values(&[step.as_str()])
                    .observe(duration.as_secs_f64());
            }
            RotationEvent::Finished => {
                if !OUTCOMES.contains(&j.status) {
                    return; // not terminal: nothing to count
                }
                self.rotations
                    .with_label_values(&[t, j.trigger.as_str(), j.status.as_str()])
                    .inc();
                let took = (j.updated_at - j.started_at).to_std().unwrap_or_default();
                self.rotation_duration
                    .with_label_values(&[t])
                    .observe(took.as_secs_f64());
                self.in_progress.with_label_values(&[t]).set(0);
                self.set_step(t, None);
                self.set_pending(j);
                if j.status == Status::Completed {
                    self.last_success
                        .with_label_values(&[t])
                        .set(epoch_seconds(Some(j.updated_at)));
                    // The key was created when mint finished; Vault's metadata (set by the
                    // daemon through `set_key_created`) may refine it.
                    let created = j
                        .steps
                        .iter()
                        .rev()
                        .find(|s| s.step == Step::Mint)
                        .and_then(|s| s.finished_at)
                        .unwrap_or(j.updated_at);
                    self.key_created
                        .with_label_values(&[t])
                        .set(epoch_seconds(Some(created)));
                }
            }
            // The rotation then ends `failed`, which is counted.
            RotationEvent::RollbackRefused { .. } => {}
            RotationEvent::PendingRetried => self.set_pending(j),
            RotationEvent::UnlistedConsumers { found, .. } => self
                .unlisted
                .with_label_values(&[t])
                .set(i64::try_from(found.len()).unwrap_or(i64::MAX)),
            // Counted through the journal's pending deletions (above).
            RotationEvent::AccountDeleted { .. } => {}
        }
    }
}

impl CallObserver for Metrics {
    fn call(
        &self,
        backend: Backend,
        operation: &'static str,
        status: StatusClass,
        elapsed: Duration,
    ) {
        self.api_requests
            .with_label_values(&[backend.as_str(), operation, status.as_str()])
            .inc();
        self.api_duration
            .with_label_values(&[backend.as_str(), operation])
            .observe(elapsed.as_secs_f64());
    }

    fn retry(&self, backend: Backend, _operation: &'static str) {
        self.retries.with_label_values(&[backend.as_str()]).inc();
    }

    fn paced(&self, backend: Backend, _operation: &'static str, _waited: Duration) {
        self.rate_limit_waits
            .with_label_values(&[backend.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::journal::PendingDeletion;
    use crate::rotation::ports::AccountRef;
    use crate::rotation::RotationRequest;
    use chrono::TimeZone;
    use std::collections::BTreeMap;

    /// Samples of a text exposition, keyed `name{l1="v1",l2="v2"}` with labels sorted.
    /// Strict: every sample's family has `# HELP` and `# TYPE` lines before it, every line
    /// is a comment or `name[{labels}] value`, and no series appears twice.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (n, _) = rest.split_once(' ').expect("HELP has text");
                assert!(helped.insert(n.to_string()), "HELP twice for {n}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (n, ty) = rest.split_once(' ').expect("TYPE has a type");
                assert!(["counter", "gauge", "histogram"].contains(&ty), "type {ty}");
                assert!(typed.insert(n.into(), ty.into()).is_none(), "TYPE twice");
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "line {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (metric, labels) = match series.split_once('{') {
                Some((m, l)) => (m, l.strip_suffix('}').expect("labels closed")),
                None => (series, ""),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    metric
                        .strip_suffix(s)
                        .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(metric);
            assert!(typed.contains_key(family), "no TYPE for {metric}");
            assert!(helped.contains(family), "no HELP for {metric}");
            assert!(metric.starts_with("openai_key_rotator_"), "{metric}");
            let mut pairs: Vec<(String, String)> = Vec::new();
            if !labels.is_empty() {
                for pair in labels.split("\",") {
                    let (k, v) = pair.split_once("=\"").expect("label k=\"v\"");
                    pairs.push((k.into(), v.trim_end_matches('"').into()));
                }
            }
            pairs.sort();
            let key = if pairs.is_empty() {
                metric.to_string()
            } else {
                let l: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{metric}{{{}}}", l.join(","))
            };
            assert!(out.insert(key, value).is_none(), "series twice: {line}");
        }
        out
    }

    fn get(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("missing series {key}"))
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_790_000_000 + secs, 0).unwrap()
    }

    fn account(n: u32) -> AccountRef {
        AccountRef {
            id: format!("svc_acct_{n}"),
            key_id: format!("key_{n}"),
        }
    }

    fn journal(target: &str, trigger: Trigger) -> Journal {
        let mut req = RotationRequest::new(target, trigger, "schedule", "scheduled", at(0));
        req.rotation_id = "20261123215000-abc123".into();
        let mut j = Journal::queued(&req, "okr");
        j.old_account = Some(account(1));
        j.old_vault_version = 3;
        j
    }

    /// Run `steps` (each taking 10 s of journal time and `secs` of measured time) then
    /// finish with `status`.
    fn drive(m: &Metrics, j: &mut Journal, steps: &[(Step, u64)], status: Status) {
        m.on_event(j, &RotationEvent::Started);
        let mut clock = 0;
        for &(step, secs) in steps {
            j.begin(step, at(clock));
            m.on_event(j, &RotationEvent::StepStarted(step));
            clock += 10;
            j.finish("ok", at(clock));
            m.on_event(
                j,
                &RotationEvent::StepFinished {
                    step,
                    outcome: "ok".into(),
                    duration: Duration::from_secs(secs),
                },
            );
        }
        j.status = status;
        m.on_event(j, &RotationEvent::Finished);
    }

    const FORWARD: [(Step, u64); 7] = [
        (Step::Mint, 1),
        (Step::Publish, 1),
        (Step::Sync, 4),
        (Step::Roll, 1),
        (Step::Verify, 90),
        (Step::Drain, 700),
        (Step::Retire, 2),
    ];

    #[test]
    fn new_pre_creates_every_per_target_series_at_zero() {
        let m = Metrics::new(&["a".into(), "b".into()]);
        let s = parse(&m.render());
        for t in ["a", "b"] {
            for trigger in TRIGGERS {
                for outcome in OUTCOMES {
                    let key = format!(
                        "openai_key_rotator_rotations_total{{outcome=\"{}\",target=\"{t}\",trigger=\"{}\"}}",
                        outcome.as_str(),
                        trigger.as_str()
                    );
                    assert_eq!(get(&s, &key), 0.0);
                }
            }
            for g in [
                "last_success_timestamp_seconds",
                "next_rotation_timestamp_seconds",
                "key_created_timestamp_seconds",
                "rotation_in_progress",
                "old_account_pending_deletion",
            ] {
                assert_eq!(
                    get(&s, &format!("openai_key_rotator_{g}{{target=\"{t}\"}}")),
                    0.0
                );
            }
            for step in Step::ALL {
                let key =
                    format!("openai_key_rotator_rotation_step{{step=\"{step}\",target=\"{t}\"}}");
                assert_eq!(get(&s, &key), 0.0);
            }
            let key =
                format!("openai_key_rotator_rotation_duration_seconds_count{{target=\"{t}\"}}");
            assert_eq!(get(&s, &key), 0.0);
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            get(
                &s,
                &format!("openai_key_rotator_build_info{{version=\"{version}\"}}")
            ),
            1.0
        );
        assert_eq!(get(&s, "openai_key_rotator_leader"), 0.0);
        assert_eq!(get(&s, "openai_key_rotator_orphans_swept_total"), 0.0);
        assert_eq!(
            get(&s, "openai_key_rotator_retries_total{backend=\"vault\"}"),
            0.0
        );
    }

    #[test]
    fn completed_rotation_updates_counters_histograms_and_timestamps() {
        let m = Metrics::new(&["chat".into()]);
        let mut j = journal("chat", Trigger::Schedule);

        // Mid-rotation: in progress, exactly the current step is 1.
        m.on_event(&j, &RotationEvent::Started);
        j.begin(Step::Roll, at(0));
        m.on_event(&j, &RotationEvent::StepStarted(Step::Roll));
        let s = parse(&m.render());
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_rotation_in_progress{target=\"chat\"}"
            ),
            1.0
        );
        for step in Step::ALL {
            let key =
                format!("openai_key_rotator_rotation_step{{step=\"{step}\",target=\"chat\"}}");
            assert_eq!(
                get(&s, &key),
                f64::from(u8::from(step == Step::Roll)),
                "{step}"
            );
        }

        let mut j = journal("chat", Trigger::Schedule);
        drive(&m, &mut j, &FORWARD, Status::Completed);
        let s = parse(&m.render());
        let c = |outcome: &str| {
            get(
                &s,
                &format!("openai_key_rotator_rotations_total{{outcome=\"{outcome}\",target=\"chat\",trigger=\"schedule\"}}"),
            )
        };
        assert_eq!(c("completed"), 1.0);
        assert_eq!(c("rolled_back"), 0.0);
        assert_eq!(c("failed"), 0.0);
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_rotation_in_progress{target=\"chat\"}"
            ),
            0.0
        );
        for step in Step::ALL {
            let key =
                format!("openai_key_rotator_rotation_step{{step=\"{step}\",target=\"chat\"}}");
            assert_eq!(get(&s, &key), 0.0, "{step} after finish");
        }
        // 7 steps of 10 s of journal time each.
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_rotation_duration_seconds_sum{target=\"chat\"}"
            ),
            70.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_rotation_duration_seconds_bucket{le=\"60\",target=\"chat\"}"
            ),
            0.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_rotation_duration_seconds_bucket{le=\"120\",target=\"chat\"}"
            ),
            1.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_last_success_timestamp_seconds{target=\"chat\"}"
            ),
            epoch_seconds(Some(at(70)))
        );
        // Key created when mint finished.
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_key_created_timestamp_seconds{target=\"chat\"}"
            ),
            epoch_seconds(Some(at(10)))
        );
        // Step histograms hold the measured durations.
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_sum{step=\"drain\"}"
            ),
            700.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_bucket{le=\"600\",step=\"drain\"}"
            ),
            0.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_bucket{le=\"1200\",step=\"drain\"}"
            ),
            1.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_count{step=\"verify\"}"
            ),
            1.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_count{step=\"rollback\"}"
            ),
            0.0
        );

        // The daemon may refine the key's creation time from Vault's metadata.
        m.set_key_created("chat", Some(at(5)));
        m.set_next_rotation("chat", Some(at(86_400)));
        m.set_leader(true);
        m.orphans_swept(2);
        let s = parse(&m.render());
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_key_created_timestamp_seconds{target=\"chat\"}"
            ),
            epoch_seconds(Some(at(5)))
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_next_rotation_timestamp_seconds{target=\"chat\"}"
            ),
            epoch_seconds(Some(at(86_400)))
        );
        assert_eq!(get(&s, "openai_key_rotator_leader"), 1.0);
        assert_eq!(get(&s, "openai_key_rotator_orphans_swept_total"), 2.0);
        m.set_next_rotation("chat", None);
        let s = parse(&m.render());
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_next_rotation_timestamp_seconds{target=\"chat\"}"
            ),
            0.0
        );
    }

    #[test]
    fn rolled_back_rotation_counts_as_such_and_tracks_pending_deletions() {
        let m = Metrics::new(&["chat".into()]);
        let mut j = journal("chat", Trigger::Api);
        j.new_account = Some(account(2));
        j.pending_deletions.push(PendingDeletion {
            account: account(2),
            once_quiet_for_ms: None,
            unless_pods_carry: Some(j.rotation_id.clone()),
            attempts: 1,
            last_error: Some("rollback rollout incomplete".into()),
            ..PendingDeletion::new(account(0), Default::default(), None, "proj", Utc::now())
        });
        drive(
            &m,
            &mut j,
            &[
                (Step::Mint, 1),
                (Step::Publish, 1),
                (Step::Sync, 1),
                (Step::Roll, 1),
                (Step::Rollback, 30),
            ],
            Status::RolledBack,
        );
        let s = parse(&m.render());
        let key = |o: &str| {
            format!("openai_key_rotator_rotations_total{{outcome=\"{o}\",target=\"chat\",trigger=\"api\"}}")
        };
        assert_eq!(get(&s, &key("rolled_back")), 1.0);
        assert_eq!(get(&s, &key("completed")), 0.0);
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_old_account_pending_deletion{target=\"chat\"}"
            ),
            1.0
        );
        // No success: the success and key timestamps stay unset.
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_last_success_timestamp_seconds{target=\"chat\"}"
            ),
            0.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_key_created_timestamp_seconds{target=\"chat\"}"
            ),
            0.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_step_duration_seconds_sum{step=\"rollback\"}"
            ),
            30.0
        );

        // A later resume deletes it and reports what is left.
        j.pending_deletions.clear();
        m.on_event(
            &j,
            &RotationEvent::AccountDeleted {
                account_id: "svc_acct_2".into(),
                why: "pending deletion",
            },
        );
        m.on_event(&j, &RotationEvent::PendingRetried);
        let s = parse(&m.render());
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_old_account_pending_deletion{target=\"chat\"}"
            ),
            0.0
        );
    }

    #[test]
    fn unlisted_consumers_are_counted_until_the_next_rotation_starts() {
        let m = Metrics::new(&["chat".into()]);
        let j = journal("chat", Trigger::Api);
        let series = "openai_key_rotator_unlisted_consumers{target=\"chat\"}";
        m.on_event(
            &j,
            &RotationEvent::UnlistedConsumers {
                found: vec!["Deployment a/b (x)".into(), "Pod a/c (y)".into()],
                action: "warn",
            },
        );
        assert_eq!(get(&parse(&m.render()), series), 2.0);
        m.on_event(&j, &RotationEvent::Started);
        assert_eq!(get(&parse(&m.render()), series), 0.0);
    }

    #[test]
    fn events_for_unknown_targets_create_no_series() {
        let m = Metrics::new(&["chat".into()]);
        let before = m.render();
        let mut j = journal("intruder", Trigger::Cli);
        drive(&m, &mut j, &FORWARD, Status::Completed);
        m.set_key_created("intruder", Some(at(1)));
        m.set_next_rotation("intruder", Some(at(1)));
        let after = m.render();
        assert!(!after.contains("intruder"), "{after}");
        // Ignored entirely, step histograms included.
        assert_eq!(before, after);
    }

    #[test]
    fn set_targets_drops_removed_targets_and_creates_new_ones() {
        let m = Metrics::new(&["a".into(), "b".into()]);
        let mut j = journal("b", Trigger::Schedule);
        drive(&m, &mut j, &FORWARD, Status::Completed);
        m.set_targets(&["a".into(), "c".into()]);
        let text = m.render();
        assert!(!text.contains("target=\"b\""), "{text}");
        let s = parse(&text);
        assert_eq!(
            get(&s, "openai_key_rotator_rotation_in_progress{target=\"c\"}"),
            0.0
        );
        assert_eq!(
            get(&s, "openai_key_rotator_rotation_in_progress{target=\"a\"}"),
            0.0
        );
        // Events for the removed target no longer land.
        let mut j = journal("b", Trigger::Schedule);
        drive(&m, &mut j, &FORWARD, Status::Completed);
        assert!(!m.render().contains("target=\"b\""));
        // Re-adding starts it from zero.
        m.set_targets(&["b".into()]);
        let s = parse(&m.render());
        assert_eq!(
            get(&s, "openai_key_rotator_rotations_total{outcome=\"completed\",target=\"b\",trigger=\"schedule\"}"),
            0.0
        );
        assert!(!m.render().contains("target=\"a\""));
    }

    #[test]
    fn backend_calls_and_retries_are_counted() {
        let m = Metrics::new(&[]);
        m.call(
            Backend::OpenAi,
            "service_accounts.create",
            StatusClass::Success,
            Duration::from_millis(30),
        );
        m.call(
            Backend::OpenAi,
            "service_accounts.create",
            StatusClass::RateLimited,
            Duration::from_millis(3),
        );
        m.call(
            Backend::Vault,
            "kv2.write",
            StatusClass::Transport,
            Duration::from_secs(40),
        );
        m.retry(Backend::OpenAi, "service_accounts.create");
        let s = parse(&m.render());
        let req = |b: &str, o: &str, c: &str| {
            get(&s, &format!("openai_key_rotator_api_requests_total{{backend=\"{b}\",operation=\"{o}\",status_class=\"{c}\"}}"))
        };
        assert_eq!(req("openai", "service_accounts.create", "2xx"), 1.0);
        assert_eq!(req("openai", "service_accounts.create", "429"), 1.0);
        assert_eq!(req("vault", "kv2.write", "transport"), 1.0);
        assert_eq!(
            get(&s, "openai_key_rotator_api_request_duration_seconds_count{backend=\"openai\",operation=\"service_accounts.create\"}"),
            2.0
        );
        assert_eq!(
            get(&s, "openai_key_rotator_api_request_duration_seconds_bucket{backend=\"openai\",le=\"0.005\",operation=\"service_accounts.create\"}"),
            1.0
        );
        assert_eq!(
            get(&s, "openai_key_rotator_api_request_duration_seconds_bucket{backend=\"vault\",le=\"30\",operation=\"kv2.write\"}"),
            0.0
        );
        assert_eq!(
            get(&s, "openai_key_rotator_retries_total{backend=\"openai\"}"),
            1.0
        );
        assert_eq!(
            get(
                &s,
                "openai_key_rotator_retries_total{backend=\"kubernetes\"}"
            ),
            0.0
        );
    }

    #[test]
    fn instances_do_not_share_series() {
        let a = Metrics::new(&["x".into()]);
        let b = Metrics::new(&["x".into()]);
        a.orphans_swept(5);
        assert_eq!(
            get(
                &parse(&b.render()),
                "openai_key_rotator_orphans_swept_total"
            ),
            0.0
        );
        assert_eq!(
            get(
                &parse(&a.render()),
                "openai_key_rotator_orphans_swept_total"
            ),
            5.0
        );
    }
}
