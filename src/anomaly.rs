//! The usage-anomaly trigger (`[targets.anomaly]`): a leaked key shows as a spike in its
//! use. Per target, every `poll_interval`, the leader asks the Usage API for the current
//! key's requests ([`UsageSource::usage_buckets`], all key-filtering endpoints summed) in
//! complete buckets and compares the last `window` with the `baseline` before it:
//!
//! - `expected` = the baseline's requests scaled to one window (`sum / baseline * window`);
//!   the baseline starts no earlier than the key's creation (Vault metadata), and a key
//!   with less than one window of history is not judged (`insufficient_history`), so a
//!   freshly rotated key never "spikes" from zero;
//! - it fires when `current >= min_requests` and `current >= ratio * expected`.
//!
//! A fire sets `usage_anomaly{target}` and writes an audit event and an `anomaly` notice
//! (through [`AnomalyReport`]); with `action = "rotate"` it also asks the daemon for an
//! emergency rotation (trigger `usage_anomaly`, reason `usage-anomaly`) through the normal
//! trigger path, so the per-target lock, the upgrade of a running rotation and the bounds
//! apply. Then the target is not judged for `cooldown` (kept in memory: a restart forgets
//! it, but the rotated key has no history to fire on anyway); a refused rotation (Vault
//! down, shutting down) starts no cooldown, so the next poll tries again.

use crate::config::{AnomalyAction, AnomalyConfig, Config, Target};
use crate::daemon::{Accepted, Daemon};
use crate::rotation::ports::{Clock, SecretStore};
use crate::rotation::{RotationRequest, Trigger};
use crate::sync::LockExt;
use crate::usage::{UsageBucket, UsageSource};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The reason an anomaly rotation carries.
pub const REASON: &str = "usage-anomaly";
/// The loop looks at the configuration at least this often (a reload may add targets).
const MAX_IDLE: Duration = Duration::from_secs(30);

/// What one check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub key_id: String,
    /// Requests in the last window.
    pub current: u64,
    /// The baseline's requests scaled to one window.
    pub expected: f64,
    /// `current / expected` (+Inf when the baseline saw none).
    pub ratio: f64,
    /// The baseline actually used (shorter than configured for a young key).
    pub baseline: Duration,
    pub fired: bool,
}

impl Finding {
    /// One line for the audit trail and notices (numbers only).
    pub fn describe(&self, cfg: &AnomalyConfig) -> String {
        format!(
            "{} requests in the last {}; the baseline ({}) averages {:.1} per window; ratio {:.1} (threshold {} and at least {} requests)",
            self.current,
            humantime::format_duration(cfg.window.get()),
            humantime::format_duration(self.baseline),
            self.expected,
            self.ratio,
            cfg.ratio,
            cfg.min_requests
        )
    }
}

/// The verdict of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Judged(Finding),
    /// Less than one window of history before the window (a young key).
    InsufficientHistory,
}

/// Window and baseline ends for a check at `now`: complete buckets only.
pub fn ranges(
    cfg: &AnomalyConfig,
    now: DateTime<Utc>,
    key_created: Option<DateTime<Utc>>,
) -> (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) {
    let width = cfg.bucket_width.seconds() as i64;
    let end_s = now.timestamp().div_euclid(width) * width;
    let window = cfg.window.get().as_secs() as i64;
    let baseline = cfg.baseline.get().as_secs() as i64;
    let mut base_s = end_s - window - baseline;
    if let Some(c) = key_created {
        // The first whole bucket after the key existed.
        let created = (c.timestamp() + width - 1).div_euclid(width) * width;
        base_s = base_s.max(created);
    }
    let ts = |s: i64| DateTime::from_timestamp(s, 0).unwrap_or(now);
    (ts(base_s), ts(end_s - window), ts(end_s))
}

/// Judge `buckets` for the ranges of [`ranges`].
pub fn judge(
    cfg: &AnomalyConfig,
    key_id: &str,
    buckets: &[UsageBucket],
    (base_start, window_start, end): (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>),
) -> Judgement {
    let window = cfg.window.get().as_secs_f64();
    let baseline_secs = (window_start - base_start).num_seconds();
    if baseline_secs < cfg.window.get().as_secs() as i64 {
        return Judgement::InsufficientHistory;
    }
    let sum = |from: DateTime<Utc>, to: DateTime<Utc>| -> u64 {
        buckets
            .iter()
            .filter(|b| b.start >= from && b.start < to)
            .map(|b| b.requests)
            .fold(0u64, u64::saturating_add)
    };
    let current = sum(window_start, end);
    let expected = sum(base_start, window_start) as f64 / baseline_secs as f64 * window;
    let ratio = if expected > 0.0 {
        current as f64 / expected
    } else if current == 0 {
        0.0
    } else {
        f64::INFINITY
    };
    let fired = current >= cfg.min_requests && current as f64 >= cfg.ratio * expected;
    Judgement::Judged(Finding {
        key_id: key_id.to_string(),
        current,
        expected,
        ratio,
        baseline: Duration::from_secs(baseline_secs.max(0) as u64),
        fired,
    })
}

/// What the detector may do to the daemon.
#[async_trait]
pub trait AnomalyActions: Send + Sync {
    fn is_leader(&self) -> bool;
    fn config(&self) -> Arc<Config>;
    /// Start (or upgrade to) an emergency rotation; the rotation id, or why not.
    async fn rotate(&self, request: &RotationRequest) -> Result<String, String>;
}

#[async_trait]
impl AnomalyActions for Daemon {
    fn is_leader(&self) -> bool {
        Daemon::is_leader(self)
    }
    fn config(&self) -> Arc<Config> {
        Daemon::config(self)
    }
    async fn rotate(&self, request: &RotationRequest) -> Result<String, String> {
        match self.trigger(request).await {
            Ok(Accepted::Started(id) | Accepted::Upgraded(id) | Accepted::Resumed(id)) => Ok(id),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Where the detector's results go (metrics, audit, notices).
pub trait AnomalyReport: Send + Sync {
    /// Every check: its outcome (one of `metrics::ANOMALY_OUTCOMES`) and the finding.
    fn checked(&self, target: &str, outcome: &'static str, finding: Option<&Finding>);
    /// A fire: what was done (`rotation`: the rotation started, or why it was not).
    fn fired(
        &self,
        target: &Target,
        cfg: &AnomalyConfig,
        finding: &Finding,
        rotation: Option<&Result<String, String>>,
    );
}

/// Polls every target with `[targets.anomaly]`; see the module doc.
pub struct Detector {
    usage: Arc<dyn UsageSource>,
    store: Arc<dyn SecretStore>,
    actions: Arc<dyn AnomalyActions>,
    report: Arc<dyn AnomalyReport>,
    clock: Arc<dyn Clock>,
    /// Targets in cooldown after a fire, until then.
    cooling: Mutex<HashMap<String, Instant>>,
}

impl Detector {
    pub fn new(
        usage: Arc<dyn UsageSource>,
        store: Arc<dyn SecretStore>,
        actions: Arc<dyn AnomalyActions>,
        report: Arc<dyn AnomalyReport>,
        clock: Arc<dyn Clock>,
    ) -> Detector {
        Detector {
            usage,
            store,
            actions,
            report,
            clock,
            cooling: Mutex::new(HashMap::new()),
        }
    }

    /// One check of `target` (with an anomaly section); returns its outcome.
    pub async fn check(&self, target: &Target) -> &'static str {
        let Some(cfg) = &target.anomaly else {
            return "normal";
        };
        let name = target.name.as_str();
        if self
            .cooling
            .locked()
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
        {
            self.report.checked(name, "cooldown", None);
            return "cooldown";
        }
        let info = match self
            .store
            .read_key_meta(&target.vault_path, &target.vault_field)
            .await
        {
            Ok(Some(info)) => info,
            Ok(None) => {
                tracing::warn!(target = name, "usage anomaly: no key in Vault to watch");
                self.report.checked(name, "error", None);
                return "error";
            }
            Err(e) => {
                tracing::warn!(target = name, error = %e, "usage anomaly: cannot read the key's metadata");
                self.report.checked(name, "error", None);
                return "error";
            }
        };
        let Some(key_id) = info.meta.account.as_ref().map(|a| a.key_id.clone()) else {
            tracing::warn!(
                target = name,
                "usage anomaly: Vault's metadata does not name the key's id; cannot ask the Usage API"
            );
            self.report.checked(name, "error", None);
            return "error";
        };
        let created = info.meta.key_created_at.or(info.version_created_at);
        let now = self.clock.now();
        let r = ranges(cfg, now, created);
        if r.1 <= r.0 {
            self.report.checked(name, "insufficient_history", None);
            return "insufficient_history";
        }
        let buckets = match self
            .usage
            .usage_buckets(&target.project_id, &key_id, r.0, r.2, cfg.bucket_width)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(target = name, error = %e, "usage anomaly: the Usage API did not answer; judged next time");
                self.report.checked(name, "error", None);
                return "error";
            }
        };
        let finding = match judge(cfg, &key_id, &buckets, r) {
            Judgement::InsufficientHistory => {
                self.report.checked(name, "insufficient_history", None);
                return "insufficient_history";
            }
            Judgement::Judged(f) => f,
        };
        if !finding.fired {
            self.report.checked(name, "normal", Some(&finding));
            return "normal";
        }
        self.report.checked(name, "anomaly", Some(&finding));
        tracing::warn!(target = name, key_id = %key_id, action = cfg.action.as_str(), detail = %finding.describe(cfg), "usage anomaly");
        self.cooling
            .locked()
            .insert(name.to_string(), Instant::now() + cfg.cooldown.get());
        let rotation = match cfg.action {
            AnomalyAction::Alert => None,
            AnomalyAction::Rotate => {
                let req = RotationRequest::new(name, Trigger::UsageAnomaly, "anomaly", REASON, now)
                    .emergency(false);
                let r = self.actions.rotate(&req).await;
                match &r {
                    Ok(id) => {
                        tracing::warn!(target = name, rotation_id = %id, "usage anomaly: emergency rotation requested")
                    }
                    Err(e) => {
                        // Not rotated: judge (and try) again at the next poll.
                        self.cooling.locked().remove(name);
                        tracing::error!(target = name, error = %e, "usage anomaly: the emergency rotation was refused; trying again at the next poll")
                    }
                }
                Some(r)
            }
        };
        self.report.fired(target, cfg, &finding, rotation.as_ref());
        "anomaly"
    }

    /// Poll until `cancel`: each target on its own interval, only while this replica leads.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut next: HashMap<String, Instant> = HashMap::new();
        loop {
            let config = self.actions.config();
            let mut sleep = MAX_IDLE;
            if self.actions.is_leader() {
                for t in config.targets.iter() {
                    let Some(cfg) = &t.anomaly else { continue };
                    let now = Instant::now();
                    let due = *next.entry(t.name.clone()).or_insert(now);
                    if due <= now {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = self.check(t) => {}
                        }
                        next.insert(t.name.clone(), Instant::now() + cfg.poll_interval.get());
                    }
                    let due = next.get(&t.name).copied().unwrap_or(now);
                    sleep = sleep.min(due.saturating_duration_since(Instant::now()));
                }
                next.retain(|n, _| config.target(n).is_some_and(|t| t.anomaly.is_some()));
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Run the loop in a task until `cancel`, restarting it if it panics.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(crate::supervise::supervised(
            "usage-anomaly",
            Duration::from_secs(5),
            cancel.clone(),
            move || {
                let (worker, stop) = (Arc::clone(&this), cancel.clone());
                async move { worker.run(stop).await }
            },
        ))
    }
}

#[cfg(test)]
mod tests;
