//! Key-governance options: webhook notifications (`[notifications]`) and the per-target
//! usage-anomaly trigger (`[targets.anomaly]`), with their checks.

use super::{check_backoff, check_timeout, Config, DurationStr};
use crate::usage::BucketWidth;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// What a webhook can be told about (a bounded set: also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// A rotation completed.
    Completed,
    /// A rotation was rolled back (the old key stays).
    RolledBack,
    /// A rotation failed.
    Failed,
    /// An emergency rotation started (or a running one was upgraded to one).
    Emergency,
    /// The usage-anomaly detector fired.
    Anomaly,
    /// A key is past its `max_key_age` by `notifications.overdue_after`, or a due rotation
    /// could not start.
    Overdue,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 6] = [
        NotifyEvent::Completed,
        NotifyEvent::RolledBack,
        NotifyEvent::Failed,
        NotifyEvent::Emergency,
        NotifyEvent::Anomaly,
        NotifyEvent::Overdue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Completed => "completed",
            NotifyEvent::RolledBack => "rolled_back",
            NotifyEvent::Failed => "failed",
            NotifyEvent::Emergency => "emergency",
            NotifyEvent::Anomaly => "anomaly",
            NotifyEvent::Overdue => "overdue",
        }
    }
}

/// The body shape a webhook receiver expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The documented JSON object (README, "Notifications").
    #[default]
    Json,
    /// A Slack incoming webhook: `{"text": ..., "blocks": [...]}`.
    Slack,
    /// A Mattermost incoming webhook: `{"text": ..., "username": ...}`.
    Mattermost,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Slack => "slack",
            WebhookFormat::Mattermost => "mattermost",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// This daemon's API as people reach it (`https://okr.example.com`): notices link
    /// `<api_base_url>/v1/rotations/<id>`. Unset = no link.
    pub api_base_url: Option<String>,
    /// Notices waiting for delivery; when full, new ones are dropped (and counted) so a
    /// rotation never waits on a webhook.
    pub queue_size: usize,
    /// A key older than its target's `max_key_age` by this much is reported `overdue`
    /// (the max-age rotation should have completed by then).
    pub overdue_after: DurationStr,
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            api_base_url: None,
            queue_size: 256,
            overdue_after: DurationStr::from_secs(3600),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST. Often a secret itself (Slack's): never logged, only its host. Set
    /// this or `url_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub format: WebhookFormat,
    /// What to send; default every event.
    #[serde(default = "all_events")]
    pub events: Vec<NotifyEvent>,
    /// A file holding the HMAC-SHA256 key for `X-OKR-Signature` (read at start and reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Bound on one POST.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: DurationStr,
    /// Attempts after the first (429, 5xx and transport errors are retried).
    #[serde(default = "default_webhook_retries")]
    pub max_retries: u32,
    #[serde(default = "default_webhook_retry_base")]
    pub retry_base: DurationStr,
    #[serde(default = "default_webhook_max_backoff")]
    pub max_backoff: DurationStr,
    /// After a notice for a (target, event), further ones within this are suppressed
    /// (counted): no alert storm from a flapping target. "0s" = off.
    #[serde(default = "default_webhook_cooldown")]
    pub cooldown: DurationStr,
    /// A file holding the URL (a mounted Secret), read at start and reload: keeps the
    /// token out of the configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("host", &self.url.as_deref().map(webhook_host))
            .field("url_file", &self.url_file)
            .field("format", &self.format)
            .field("events", &self.events)
            .field("secret_file", &self.secret_file)
            .finish_non_exhaustive()
    }
}

/// An absolute http(s) URL with a host: what a webhook may POST to.
pub fn is_webhook_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// What may be shown of a webhook URL: its host (the path and query carry tokens).
pub fn webhook_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn all_events() -> Vec<NotifyEvent> {
    NotifyEvent::ALL.to_vec()
}
fn default_webhook_timeout() -> DurationStr {
    DurationStr::from_secs(10)
}
fn default_webhook_retries() -> u32 {
    3
}
fn default_webhook_retry_base() -> DurationStr {
    DurationStr::from_secs(1)
}
fn default_webhook_max_backoff() -> DurationStr {
    DurationStr::from_secs(30)
}
fn default_webhook_cooldown() -> DurationStr {
    DurationStr::from_secs(300)
}

/// What a fired anomaly does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyAction {
    /// Metric, audit event and `anomaly` notice only.
    #[default]
    Alert,
    /// Also start an emergency rotation (reason `usage-anomaly`).
    Rotate,
}

impl AnomalyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyAction::Alert => "alert",
            AnomalyAction::Rotate => "rotate",
        }
    }
}

/// Compare the current key's requests in the last `window` with its average over the
/// `baseline` before it; fire at `ratio` times that (and at least `min_requests`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    #[serde(default = "default_anomaly_window")]
    pub window: DurationStr,
    #[serde(default = "default_anomaly_baseline")]
    pub baseline: DurationStr,
    #[serde(default = "default_anomaly_ratio")]
    pub ratio: f64,
    #[serde(default = "default_anomaly_min_requests")]
    pub min_requests: u64,
    #[serde(default)]
    pub action: AnomalyAction,
    /// After a fire, the target is not judged again for this long (no rotation loops).
    #[serde(default = "default_anomaly_cooldown")]
    pub cooldown: DurationStr,
    /// Usage API bucket width: "1m" or "1h"; window and baseline are multiples of it.
    #[serde(default)]
    pub bucket_width: BucketWidth,
    /// How often the Usage API is asked.
    #[serde(default = "default_anomaly_poll")]
    pub poll_interval: DurationStr,
}

fn default_anomaly_window() -> DurationStr {
    DurationStr::from_secs(3600)
}
fn default_anomaly_baseline() -> DurationStr {
    DurationStr::from_secs(7 * 86_400)
}
fn default_anomaly_ratio() -> f64 {
    5.0
}
fn default_anomaly_min_requests() -> u64 {
    100
}
fn default_anomaly_cooldown() -> DurationStr {
    DurationStr::from_secs(6 * 3600)
}
fn default_anomaly_poll() -> DurationStr {
    DurationStr::from_secs(300)
}

/// Longest window + baseline asked for per bucket width: one page per usage endpoint for
/// minutes (1,440 buckets), five for hours.
fn max_span(width: BucketWidth) -> u64 {
    match width {
        BucketWidth::Minute => 86_400,
        BucketWidth::Hour => 30 * 86_400,
    }
}

/// The checks of `[notifications]` and every `[targets.anomaly]`.
pub(super) fn validate(config: &Config, errors: &mut Vec<String>) {
    let n = &config.notifications;
    if n.queue_size == 0 {
        errors.push("notifications.queue_size: must be at least 1".into());
    }
    if let Some(base) = &n.api_base_url {
        match url::Url::parse(base) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.has_host()
                    && u.query().is_none()
                    && u.fragment().is_none() => {}
            _ => errors.push(format!(
                "notifications.api_base_url: {:?} must be an http(s) URL without query or fragment",
                super::redacted_url(base)
            )),
        }
    }
    for (i, w) in n.webhooks.iter().enumerate() {
        let at = format!("notifications.webhooks[{i}]");
        match (&w.url, &w.url_file) {
            (Some(url), None) => {
                if !is_webhook_url(url) {
                    // Not even redacted: a webhook URL's path is often its token.
                    errors.push(format!(
                        "{at}.url: must be an http(s) URL (not shown: webhook URLs carry tokens)"
                    ));
                }
            }
            (None, Some(_)) => {}
            (Some(_), Some(_)) => {
                errors.push(format!("{at}.url_file: set url or url_file, not both"))
            }
            (None, None) => errors.push(format!(
                "{at}.url: missing (set url, or url_file naming a file that holds it)"
            )),
        }
        if w.events.is_empty() {
            errors.push(format!(
                "{at}.events: must name at least one event (or leave it out for all)"
            ));
        }
        let mut seen = BTreeSet::new();
        for e in &w.events {
            if !seen.insert(*e) {
                errors.push(format!("{at}.events: {:?} is listed twice", e.as_str()));
            }
        }
        check_timeout(errors, &format!("{at}.timeout"), w.timeout);
        check_backoff(errors, &at, w.retry_base, w.max_backoff);
    }
    for (i, t) in config.targets.iter().enumerate() {
        let Some(a) = &t.anomaly else { continue };
        let at = format!("targets[{i}] ({:?}).anomaly", t.name);
        if !(a.ratio.is_finite() && a.ratio > 1.0) {
            errors.push(format!(
                "{at}.ratio: ({}) must be a number above 1 (the window against the baseline's rate)",
                a.ratio
            ));
        }
        if a.min_requests == 0 {
            errors.push(format!(
                "{at}.min_requests: must be at least 1 (a floor against noise on idle keys)"
            ));
        }
        let width = a.bucket_width.seconds();
        for (field, d) in [("window", a.window), ("baseline", a.baseline)] {
            let secs = d.get().as_secs();
            if d.get().is_zero() || d.get().subsec_nanos() != 0 || secs % width != 0 {
                errors.push(format!(
                    "{at}.{field}: ({d:?}) must be a non-zero multiple of bucket_width {:?}",
                    a.bucket_width.as_str()
                ));
            }
        }
        if a.baseline < a.window {
            errors.push(format!(
                "{at}.baseline: ({:?}) must be at least window ({:?})",
                a.baseline, a.window
            ));
        }
        let span = a.window.get().as_secs() + a.baseline.get().as_secs();
        if span > max_span(a.bucket_width) {
            errors.push(format!(
                "{at}.baseline: window + baseline ({}) must be at most {} with bucket_width {:?}",
                humantime::format_duration(std::time::Duration::from_secs(span)),
                humantime::format_duration(std::time::Duration::from_secs(max_span(
                    a.bucket_width
                ))),
                a.bucket_width.as_str()
            ));
        }
        if a.cooldown < a.window {
            errors.push(format!(
                "{at}.cooldown: ({:?}) must be at least window ({:?}), or one spike fires twice",
                a.cooldown, a.window
            ));
        }
        check_timeout(errors, &format!("{at}.poll_interval"), a.poll_interval);
    }
}
