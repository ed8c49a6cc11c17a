//! Webhook notifications (`[[notifications.webhooks]]`): rotation outcomes, emergencies,
//! usage anomalies and overdue keys, as JSON, Slack or Mattermost messages.
//!
//! The [`Notifier`] is an engine [`Observer`] that only builds a small [`Notice`] (ids,
//! names, statuses: never a key value, the journal holds none) and puts it on a bounded
//! queue; when the queue is full the notice is dropped and counted, so a rotation never
//! waits on a webhook. A supervised background task delivers: per webhook and (target,
//! event) a cooldown against alert storms, each POST through the shared [`Call`] path
//! (timeout, bounded retry with backoff, `Retry-After`), its fate counted in
//! `notifications_total{event,outcome}`. Webhook URLs carry tokens: only their host and
//! index are ever logged. With a `secret_file`, each body is signed (HMAC-SHA256 over
//! `<timestamp>.<body>`, headers `X-OKR-Timestamp` and `X-OKR-Signature: sha256=<hex>`).

use crate::config::{
    is_webhook_url, webhook_host, Config, NotifyEvent, WebhookConfig, WebhookFormat,
};
use crate::metrics::Metrics;
use crate::retry::{Call, Retry, RetryPolicy, Timeout, Verdict};
use crate::rotation::ports::{Backend, CallObserver, StatusClass};
use crate::rotation::{Journal, Observer, RotationEvent, RotationRequest, Status};
use crate::secret::Secret;
use crate::sync::{LockExt, RwLockExt};
use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroize;

/// Header with the Unix time the signature covers (reject old ones: replay).
pub const TIMESTAMP_HEADER: &str = "x-okr-timestamp";
/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-okr-signature";
/// The event name, for routing without parsing the body.
pub const EVENT_HEADER: &str = "x-okr-event";
/// One id per notice and webhook, the same on every retry (for de-duplication).
pub const DELIVERY_HEADER: &str = "x-okr-delivery";

/// Why notifications could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notifications.webhooks[{index}].secret_file {}: {source}", path.display())]
    SecretFile {
        index: usize,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("notifications.webhooks[{index}].secret_file {}: is empty", path.display())]
    SecretEmpty { index: usize, path: PathBuf },
    #[error("notifications.webhooks[{index}].url_file {}: {source}", path.display())]
    UrlFile {
        index: usize,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file's content is not shown: it is the token.
    #[error("notifications.webhooks[{index}].url_file {}: does not hold an http(s) URL (not shown)", path.display())]
    UrlInvalid { index: usize, path: PathBuf },
    #[error("cannot build the webhook HTTP client: {0}")]
    Http(String),
}

/// What one notice says. Only ids, names, statuses and times.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub event: NotifyEvent,
    pub target: String,
    /// `completed`, `rolled_back`, `failed`, `started`, `upgraded`, `alert`, `rotate`, `overdue`.
    pub outcome: String,
    pub rotation_id: Option<String>,
    pub trigger: Option<String>,
    pub reason: Option<String>,
    /// One line of context (the rotation's error, the anomaly's numbers, the key's age).
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// HMAC-SHA256 (RFC 2104) over `msg` with `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    let out = Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into();
    k.zeroize();
    ipad.zeroize();
    opad.zeroize();
    out
}

/// The `X-OKR-Signature` value for `body` sent at `timestamp`.
pub fn signature(secret: &Secret, timestamp: i64, body: &[u8]) -> String {
    let mut msg = format!("{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.expose().as_bytes(), &msg))
    )
}

/// The link to the rotation's API resource, when a base URL is configured.
fn rotation_url(base: Option<&str>, id: Option<&str>) -> Option<String> {
    Some(format!(
        "{}/v1/rotations/{}",
        base?.trim_end_matches('/'),
        id?
    ))
}

/// One line for chat.
fn text_of(n: &Notice, link: Option<&str>) -> String {
    let mut s = match n.event {
        NotifyEvent::Completed => format!("Key rotation of {} completed", n.target),
        NotifyEvent::RolledBack => format!(
            "Key rotation of {} was rolled back (the old key stays in use)",
            n.target
        ),
        NotifyEvent::Failed => format!("Key rotation of {} FAILED", n.target),
        NotifyEvent::Emergency => format!("Emergency key rotation of {} {}", n.target, n.outcome),
        NotifyEvent::Anomaly => format!(
            "Usage anomaly on the key of {} (action: {})",
            n.target, n.outcome
        ),
        NotifyEvent::Overdue => format!("Key rotation of {} is overdue", n.target),
    };
    if let Some(id) = &n.rotation_id {
        s.push_str(&format!(": rotation {id}"));
    }
    if let (Some(t), Some(r)) = (&n.trigger, &n.reason) {
        s.push_str(&format!(" (trigger {t}, reason {r:?})"));
    }
    if let Some(d) = &n.detail {
        s.push_str(&format!(". {d}"));
    }
    if let Some(l) = link {
        s.push_str(&format!(" {l}"));
    }
    s
}

/// The body for `format`.
pub fn body_of(n: &Notice, format: WebhookFormat, api_base_url: Option<&str>) -> Vec<u8> {
    let link = rotation_url(api_base_url, n.rotation_id.as_deref());
    let v = match format {
        WebhookFormat::Json => json!({
            "version": 1,
            "event": n.event.as_str(),
            "target": n.target,
            "outcome": n.outcome,
            "rotation_id": n.rotation_id,
            "trigger": n.trigger,
            "reason": n.reason,
            "detail": n.detail,
            "rotation_url": link,
            "at": n.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
        WebhookFormat::Slack => {
            let text = text_of(n, link.as_deref());
            json!({
                "text": text,
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
            })
        }
        WebhookFormat::Mattermost => json!({
            "text": text_of(n, link.as_deref()),
            "username": "openai-key-rotator",
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One configured webhook, ready to send.
struct Hook {
    index: usize,
    /// The URL (from `url` or `url_file`), kept as a secret: never formatted.
    url: Secret,
    host: String,
    cfg: WebhookConfig,
    secret: Option<Secret>,
    policy: RetryPolicy,
    /// `webhooks[0] (host)`: what logs and errors say instead of the URL.
    label: String,
}

/// The reloadable part: webhooks, their secrets, the link base, what "overdue" means.
struct Settings {
    hooks: Vec<Hook>,
    api_base_url: Option<String>,
    overdue_after: Duration,
    max_key_age: BTreeMap<String, Duration>,
}

impl Settings {
    /// From a validated configuration; reads every `secret_file` (trimmed).
    fn load(config: &Config) -> Result<Settings, NotifyError> {
        let n = &config.notifications;
        let mut hooks = Vec::new();
        for (index, w) in n.webhooks.iter().enumerate() {
            let secret = match &w.secret_file {
                None => None,
                Some(path) => {
                    let mut text = std::fs::read_to_string(path).map_err(|source| {
                        NotifyError::SecretFile {
                            index,
                            path: path.clone(),
                            source,
                        }
                    })?;
                    let s = Secret::new(text.trim());
                    text.zeroize();
                    if s.is_empty() {
                        return Err(NotifyError::SecretEmpty {
                            index,
                            path: path.clone(),
                        });
                    }
                    Some(s)
                }
            };
            let url = match (&w.url, &w.url_file) {
                (Some(u), _) => Secret::new(u.clone()),
                (None, Some(path)) => {
                    let mut text =
                        std::fs::read_to_string(path).map_err(|source| NotifyError::UrlFile {
                            index,
                            path: path.clone(),
                            source,
                        })?;
                    let u = Secret::new(text.trim());
                    text.zeroize();
                    if !is_webhook_url(u.expose()) {
                        return Err(NotifyError::UrlInvalid {
                            index,
                            path: path.clone(),
                        });
                    }
                    u
                }
                // Validation refuses it; nothing to send to.
                (None, None) => continue,
            };
            let host = webhook_host(url.expose());
            hooks.push(Hook {
                index,
                url,
                label: format!("webhooks[{index}] ({host})"),
                host,
                cfg: w.clone(),
                secret,
                policy: RetryPolicy {
                    max_retries: w.max_retries,
                    base: w.retry_base.get(),
                    max_backoff: w.max_backoff.get(),
                    max_retry_after: Duration::from_secs(60),
                },
            });
        }
        Ok(Settings {
            hooks,
            api_base_url: n.api_base_url.clone(),
            overdue_after: n.overdue_after.get(),
            max_key_age: config
                .targets
                .iter()
                .filter_map(|t| t.max_key_age.map(|a| (t.name.clone(), a.get())))
                .collect(),
        })
    }
}

/// Settings read from a new configuration, not yet in use.
pub struct Staged(Settings);

/// Why one POST did not succeed. Never holds the URL (reqwest's errors do: stripped).
#[derive(Debug)]
enum Failure {
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    Transport(String),
    Timeout(Duration),
}

impl From<Timeout> for Failure {
    fn from(t: Timeout) -> Self {
        Failure::Timeout(t.after)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status { status, .. } => write!(f, "HTTP {status}"),
            Failure::Transport(e) => write!(f, "request failed: {e}"),
            Failure::Timeout(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

impl Failure {
    /// 429, 5xx, transport errors and timeouts are retried; other answers are final.
    fn verdict(&self) -> Verdict {
        match self {
            Failure::Status {
                status,
                retry_after,
            } => {
                let retry = if *status == 429 || *status >= 500 {
                    retry_after.map_or(Retry::Yes, Retry::After)
                } else {
                    Retry::No
                };
                Verdict::new(StatusClass::from_status(*status), retry)
            }
            Failure::Transport(_) | Failure::Timeout(_) => {
                Verdict::new(StatusClass::Transport, Retry::Yes)
            }
        }
    }
}

type CooldownKey = (usize, String, NotifyEvent);

/// Sends notices to the configured webhooks; see the module doc.
pub struct Notifier {
    settings: RwLock<Arc<Settings>>,
    tx: mpsc::Sender<Notice>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Notice>>>,
    metrics: Arc<Metrics>,
    calls: Arc<dyn CallObserver>,
    http: reqwest::Client,
    /// When each (webhook, target, event) last went out.
    sent: Mutex<HashMap<CooldownKey, Instant>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.settings.read_now();
        let hosts: Vec<&str> = s.hooks.iter().map(|h| h.host.as_str()).collect();
        f.debug_struct("Notifier")
            .field("webhooks", &hosts)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// From a validated configuration (reads the secret files). `queue_size` is fixed
    /// until restart.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        calls: Arc<dyn CallObserver>,
    ) -> Result<Notifier, NotifyError> {
        let settings = Settings::load(config)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("openai-key-rotator/", env!("CARGO_PKG_VERSION")))
            // A redirect could carry the signed body elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| NotifyError::Http(e.to_string()))?;
        let (tx, rx) = mpsc::channel(config.notifications.queue_size.max(1));
        Ok(Notifier {
            settings: RwLock::new(Arc::new(settings)),
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            metrics,
            calls,
            http,
            sent: Mutex::new(HashMap::new()),
        })
    }

    /// Read a reloaded configuration's webhooks and secret files, to [`Notifier::apply`]
    /// once the whole reload is accepted (on error the running settings stay).
    pub fn stage(config: &Config) -> Result<Staged, NotifyError> {
        Settings::load(config).map(Staged)
    }

    pub fn apply(&self, staged: Staged) {
        *self.settings.write_now() = Arc::new(staged.0);
    }

    /// Queue a notice; never waits. Without a webhook for its event nothing is queued.
    pub fn notify(&self, notice: Notice) {
        let wanted = self
            .settings
            .read_now()
            .hooks
            .iter()
            .filter(|h| h.cfg.events.contains(&notice.event))
            .count();
        if wanted == 0 {
            return;
        }
        let event = notice.event;
        if let Err(e) = self.tx.try_send(notice) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the queue is full",
                mpsc::error::TrySendError::Closed(_) => "the notifier stopped",
            };
            tracing::warn!(
                event = event.as_str(),
                why,
                "notification dropped (it would have gone to {wanted} webhook(s))"
            );
            for _ in 0..wanted {
                self.metrics.notification(event, "dropped");
            }
        }
    }

    /// A running rotation became an emergency one.
    pub fn emergency_upgraded(&self, r: &RotationRequest, rotation_id: &str) {
        self.notify(Notice {
            event: NotifyEvent::Emergency,
            target: r.target.clone(),
            outcome: "upgraded".into(),
            rotation_id: Some(rotation_id.into()),
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            detail: None,
            at: Utc::now(),
        });
    }

    /// The daemon read a target's key age: past `max_key_age + overdue_after` is overdue.
    pub fn key_age(&self, target: &str, created: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        let (max, after) = {
            let s = self.settings.read_now();
            match s.max_key_age.get(target) {
                Some(m) => (*m, s.overdue_after),
                None => return,
            }
        };
        let Some(created) = created else { return };
        let age = (now - created).to_std().unwrap_or_default();
        if age > max + after {
            self.notify(Notice {
                event: NotifyEvent::Overdue,
                target: target.into(),
                outcome: "overdue".into(),
                rotation_id: None,
                trigger: None,
                reason: None,
                detail: Some(format!(
                    "the key Vault serves is {} old, past max_key_age {}",
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    humantime::format_duration(max)
                )),
                at: now,
            });
        }
    }

    /// A due (scheduled or max-age) rotation could not start.
    pub fn due_refused(&self, r: &RotationRequest, error: &str) {
        self.notify(Notice {
            event: NotifyEvent::Overdue,
            target: r.target.clone(),
            outcome: "overdue".into(),
            rotation_id: None,
            trigger: Some(r.trigger.as_str().into()),
            reason: Some(r.reason.clone()),
            detail: Some(format!("the due rotation could not start: {error}")),
            at: Utc::now(),
        });
    }

    /// Run the delivery task until `cancel`, restarting it if it panics.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(crate::supervise::supervised(
            "notifications",
            Duration::from_secs(1),
            cancel.clone(),
            move || {
                let (worker, stop) = (Arc::clone(&this), cancel.clone());
                async move { worker.deliver_all(stop).await }
            },
        ))
    }

    async fn deliver_all(&self, cancel: CancellationToken) {
        let mut rx = self.rx.lock().await;
        loop {
            let notice = tokio::select! {
                _ = cancel.cancelled() => return,
                n = rx.recv() => match n {
                    Some(n) => n,
                    None => return,
                },
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.deliver(&notice) => {}
            }
        }
    }

    /// To every webhook that wants it, past its cooldown, in parallel.
    async fn deliver(&self, n: &Notice) {
        let settings = self.settings.read_now().clone();
        let now = Instant::now();
        let mut sends = Vec::new();
        for h in settings
            .hooks
            .iter()
            .filter(|h| h.cfg.events.contains(&n.event))
        {
            let key = (h.index, n.target.clone(), n.event);
            let cooldown = h.cfg.cooldown.get();
            let cooling =
                self.sent.locked().get(&key).is_some_and(|last| {
                    !cooldown.is_zero() && now.duration_since(*last) < cooldown
                });
            if cooling {
                tracing::info!(webhook = %h.label, event = n.event.as_str(), target = %n.target, "notification suppressed by the cooldown");
                self.metrics.notification(n.event, "suppressed");
                continue;
            }
            let body = body_of(n, h.cfg.format, settings.api_base_url.as_deref());
            sends.push(async move {
                // Only a delivered notice starts the cooldown: a failed one hides nothing.
                if self.send(h, n, body).await {
                    self.sent.locked().insert(key, now);
                }
            });
        }
        futures::future::join_all(sends).await;
    }

    /// Whether it was delivered.
    async fn send(&self, h: &Hook, n: &Notice, body: Vec<u8>) -> bool {
        let delivery = uuid::Uuid::new_v4().to_string();
        let result = Call::new(Backend::Webhook, "webhook.post", &h.policy, &*self.calls)
            .timeout(h.cfg.timeout.get())
            .what(&h.label)
            .run(Failure::verdict, |_| self.post(h, n, &body, &delivery))
            .await;
        match result {
            Ok(()) => {
                tracing::info!(webhook = %h.label, event = n.event.as_str(), target = %n.target, "notification delivered");
                self.metrics.notification(n.event, "delivered");
                true
            }
            Err(g) => {
                tracing::warn!(webhook = %h.label, event = n.event.as_str(), target = %n.target, error = %g.error, attempts = g.attempts, "notification failed");
                self.metrics.notification(n.event, "failed");
                false
            }
        }
    }

    async fn post(&self, h: &Hook, n: &Notice, body: &[u8], delivery: &str) -> Result<(), Failure> {
        let mut req = self
            .http
            .post(h.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(EVENT_HEADER, n.event.as_str())
            .header(DELIVERY_HEADER, delivery);
        if let Some(secret) = &h.secret {
            // Per attempt: the timestamp is the send time a receiver checks for freshness.
            let ts = Utc::now().timestamp();
            req = req
                .header(TIMESTAMP_HEADER, ts.to_string())
                .header(SIGNATURE_HEADER, signature(secret, ts, body));
        }
        let resp = req
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Failure::Transport(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(Failure::Status {
            status: status.as_u16(),
            retry_after,
        })
    }
}

/// The engine's events → notices: emergencies as they start, outcomes as they end.
impl Observer for Notifier {
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        let (ev, outcome) = match event {
            RotationEvent::Started if j.emergency => (NotifyEvent::Emergency, "started"),
            RotationEvent::Finished => match j.status {
                Status::Completed => (NotifyEvent::Completed, "completed"),
                Status::RolledBack => (NotifyEvent::RolledBack, "rolled_back"),
                Status::Failed => (NotifyEvent::Failed, "failed"),
                Status::Running | Status::RollingBack => return,
            },
            _ => return,
        };
        self.notify(Notice {
            event: ev,
            target: j.target.clone(),
            outcome: outcome.into(),
            rotation_id: Some(j.rotation_id.clone()),
            trigger: Some(j.trigger.as_str().into()),
            reason: Some(j.reason.clone()),
            detail: j.error.clone().filter(|_| ev != NotifyEvent::Emergency),
            at: j.updated_at,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(event: NotifyEvent) -> Notice {
        Notice {
            event,
            target: "chatbot".into(),
            outcome: "completed".into(),
            rotation_id: Some("20260101T000000Z-abcd".into()),
            trigger: Some("api".into()),
            reason: Some("drill".into()),
            detail: None,
            at: DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
        }
    }

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!(
                r#"
[vault]
address = "http://127.0.0.1:8200"
{extra}
"#
            ),
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1.
        let k = [0x0bu8; 20];
        assert_eq!(
            hex::encode(hmac_sha256(&k, b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let k = [0xaau8; 131];
        assert_eq!(
            hex::encode(hmac_sha256(
                &k,
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // Negative control: another key gives another MAC.
        assert_ne!(
            hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
            hmac_sha256(b"Jeff", b"what do ya want for nothing?")
        );
    }

    #[test]
    fn only_429_5xx_and_transport_failures_are_retried() {
        let status = |status, retry_after| Failure::Status {
            status,
            retry_after,
        };
        assert_eq!(status(500, None).verdict().retry, Retry::Yes);
        assert_eq!(
            status(429, Some(Duration::from_secs(3))).verdict().retry,
            Retry::After(Duration::from_secs(3))
        );
        assert_eq!(
            Failure::Timeout(Duration::from_secs(1)).verdict().retry,
            Retry::Yes
        );
        assert_eq!(
            Failure::Transport("refused".into()).verdict().retry,
            Retry::Yes
        );
        // Negative controls: a wrong or revoked URL is final.
        assert_eq!(status(404, None).verdict().retry, Retry::No);
        assert_eq!(
            status(403, Some(Duration::from_secs(3))).verdict().retry,
            Retry::No
        );
        assert_eq!(
            status(404, None).verdict().class,
            StatusClass::from_status(404)
        );
    }

    #[test]
    fn signature_covers_timestamp_and_body() {
        let s = Secret::new("whsec");
        let a = signature(&s, 100, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature(&s, 101, b"{}"), "timestamp is signed");
        assert_ne!(a, signature(&s, 100, b"{ }"), "body is signed");
    }

    #[test]
    fn bodies_have_each_format_and_the_link_only_with_a_base() {
        let n = notice(NotifyEvent::Completed);
        let v: serde_json::Value = serde_json::from_slice(&body_of(
            &n,
            WebhookFormat::Json,
            Some("https://okr.example/"),
        ))
        .unwrap();
        assert_eq!(v["event"], "completed");
        assert_eq!(v["target"], "chatbot");
        assert_eq!(v["outcome"], "completed");
        assert_eq!(v["trigger"], "api");
        assert_eq!(v["reason"], "drill");
        assert_eq!(
            v["rotation_url"],
            "https://okr.example/v1/rotations/20260101T000000Z-abcd"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&body_of(&n, WebhookFormat::Json, None)).unwrap();
        assert!(v["rotation_url"].is_null());
        let v: serde_json::Value = serde_json::from_slice(&body_of(
            &n,
            WebhookFormat::Slack,
            Some("https://o.example"),
        ))
        .unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("chatbot") && text.contains("completed"),
            "{text}"
        );
        assert!(text.contains("https://o.example/v1/rotations/"), "{text}");
        assert_eq!(v["blocks"][0]["text"]["text"], text);
        let v: serde_json::Value =
            serde_json::from_slice(&body_of(&n, WebhookFormat::Mattermost, None)).unwrap();
        assert_eq!(v["username"], "openai-key-rotator");
        assert!(v["text"].as_str().unwrap().contains("chatbot"));
        assert!(v.get("blocks").is_none());
    }

    #[test]
    fn debug_shows_neither_url_path_nor_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "topsecret-hmac\n").unwrap();
        let c = config(&format!(
            r#"
[[notifications.webhooks]]
url = "https://hooks.slack.com/services/T000/B000/XXXXSLACKTOKEN"
format = "slack"
secret_file = "{}"
"#,
            secret.display()
        ));
        let m = Arc::new(Metrics::new(&[]));
        let n = Notifier::new(&c, m.clone(), m).unwrap();
        for text in [format!("{n:?}"), format!("{c:?}")] {
            assert!(!text.contains("XXXXSLACKTOKEN"), "{text}");
            assert!(!text.contains("topsecret"), "{text}");
        }
        assert!(format!("{n:?}").contains("hooks.slack.com"));
    }

    #[test]
    fn the_url_may_come_from_a_file_and_its_content_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "https://hooks.example/services/FILETOKEN\n").unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "not a url FILETOKEN").unwrap();
        let m = Arc::new(Metrics::new(&[]));
        let c = config(&format!(
            "[[notifications.webhooks]]\nurl_file = \"{}\"\n",
            good.display()
        ));
        let n = Notifier::new(&c, m.clone(), m.clone()).unwrap();
        assert_eq!(
            n.settings.read_now().hooks[0].url.expose(),
            "https://hooks.example/services/FILETOKEN"
        );
        assert!(
            format!("{n:?}").contains("hooks.example")
                && !format!("{n:?}{c:?}").contains("FILETOKEN")
        );
        for (file, want) in [
            (bad, "does not hold an http(s) URL"),
            (dir.path().join("nope"), "url_file"),
        ] {
            let c = config(&format!(
                "[[notifications.webhooks]]\nurl_file = \"{}\"\n",
                file.display()
            ));
            let e = Notifier::new(&c, m.clone(), m.clone())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("notifications.webhooks[0]"),
                "{e}"
            );
            assert!(!e.contains("FILETOKEN"), "{e}");
        }
        // Exactly one of url and url_file.
        for (text, want) in [
            (
                "[[notifications.webhooks]]\nformat = \"json\"\n",
                "notifications.webhooks[0].url: missing",
            ),
            (
                "[[notifications.webhooks]]\nurl = \"https://h.example/x\"\nurl_file = \"/x\"\n",
                "notifications.webhooks[0].url_file: set url or url_file, not both",
            ),
        ] {
            let e = Config::parse(
                &format!("[vault]\naddress = \"http://v:8200\"\n{text}"),
                "t.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_missing_or_empty_secret_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let m = Arc::new(Metrics::new(&[]));
        for (file, want) in [
            (
                dir.path().join("nope"),
                "notifications.webhooks[0].secret_file",
            ),
            (empty, "is empty"),
        ] {
            let c = config(&format!(
                "[[notifications.webhooks]]\nurl = \"http://127.0.0.1:9/x\"\nsecret_file = \"{}\"\n",
                file.display()
            ));
            let e = Notifier::new(&c, m.clone(), m.clone())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let c = config(
            "[notifications]\nqueue_size = 1\n[[notifications.webhooks]]\nurl = \"http://127.0.0.1:9/x\"\nevents = [\"failed\"]\n",
        );
        let m = Arc::new(Metrics::new(&[]));
        let n = Notifier::new(&c, m.clone(), m.clone()).unwrap();
        // Not spawned: nothing drains the queue.
        n.notify(notice(NotifyEvent::Failed));
        n.notify(notice(NotifyEvent::Failed));
        // Negative control: an event no webhook wants is not queued, so not dropped.
        n.notify(notice(NotifyEvent::Completed));
        let text = m.render();
        assert!(
            text.contains(
                "openai_key_rotator_notifications_total{event=\"failed\",outcome=\"dropped\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "openai_key_rotator_notifications_total{event=\"completed\",outcome=\"dropped\"} 0"
        ));
    }

    fn drain(n: &Notifier) -> Vec<Notice> {
        let mut rx = n.rx.try_lock().unwrap();
        let mut out = Vec::new();
        while let Ok(x) = rx.try_recv() {
            out.push(x);
        }
        out
    }

    #[tokio::test]
    async fn overdue_fires_past_max_age_plus_grace_only() {
        let c = config(
            r#"
[notifications]
overdue_after = "1h"
[[notifications.webhooks]]
url = "http://127.0.0.1:9/x"
events = ["overdue"]

[[targets]]
name = "chatbot"
project_id = "p"
vault_path = "a/b"
workloads = ["ns/Deployment/a"]
max_key_age = "30d"

[[targets]]
name = "ageless"
project_id = "p"
vault_path = "a/c"
workloads = ["ns/Deployment/a"]
"#,
        );
        let m = Arc::new(Metrics::new(&[]));
        let n = Notifier::new(&c, m.clone(), m).unwrap();
        let now = Utc::now();
        let days =
            |d: i64, h: i64| Some(now - chrono::Duration::days(d) - chrono::Duration::hours(h));
        // Negative controls: due but within the grace, unknown age, no max_key_age.
        n.key_age("chatbot", days(30, 0), now);
        n.key_age("chatbot", None, now);
        n.key_age("ageless", days(400, 0), now);
        assert!(drain(&n).is_empty());
        n.key_age("chatbot", days(30, 2), now);
        let got = drain(&n);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event, NotifyEvent::Overdue);
        assert_eq!(got[0].target, "chatbot");
        assert!(
            got[0]
                .detail
                .as_deref()
                .unwrap()
                .contains("past max_key_age 30days"),
            "{got:?}"
        );
        let req = RotationRequest::new(
            "chatbot",
            crate::rotation::Trigger::MaxAge,
            "schedule",
            "key older than max_key_age",
            now,
        );
        n.due_refused(
            &req,
            "target chatbot: cannot read its journal (vault: down); nothing was started",
        );
        let got = drain(&n);
        assert_eq!(got[0].event, NotifyEvent::Overdue);
        assert_eq!(got[0].trigger.as_deref(), Some("max_age"));
    }

    #[tokio::test]
    async fn engine_events_map_to_notices() {
        let c = config("[[notifications.webhooks]]\nurl = \"http://127.0.0.1:9/x\"\n");
        let m = Arc::new(Metrics::new(&[]));
        let n = Notifier::new(&c, m.clone(), m).unwrap();
        let req = RotationRequest::new(
            "chatbot",
            crate::rotation::Trigger::Api,
            "oncall",
            "leak",
            Utc::now(),
        );
        let mut j = Journal::queued(&req, "okr");
        // Negative control: a plain start and steps say nothing.
        n.on_event(&j, &RotationEvent::Started);
        n.on_event(&j, &RotationEvent::StepStarted(crate::rotation::Step::Mint));
        assert!(drain(&n).is_empty());
        j.emergency = true;
        n.on_event(&j, &RotationEvent::Started);
        for status in [Status::Completed, Status::RolledBack, Status::Failed] {
            j.status = status;
            j.error =
                (status != Status::Completed).then(|| "verify: rollout timed out".to_string());
            n.on_event(&j, &RotationEvent::Finished);
        }
        let got: Vec<(NotifyEvent, String, Option<String>)> = drain(&n)
            .into_iter()
            .map(|x| (x.event, x.outcome, x.detail))
            .collect();
        assert_eq!(
            got,
            vec![
                (NotifyEvent::Emergency, "started".into(), None),
                (NotifyEvent::Completed, "completed".into(), None),
                (
                    NotifyEvent::RolledBack,
                    "rolled_back".into(),
                    Some("verify: rollout timed out".into())
                ),
                (
                    NotifyEvent::Failed,
                    "failed".into(),
                    Some("verify: rollout timed out".into())
                ),
            ]
        );
    }

    #[test]
    fn config_errors_name_the_field_and_never_the_url() {
        let e = Config::parse(
            r#"
[vault]
address = "http://127.0.0.1:8200"
[notifications]
api_base_url = "okr.example"
queue_size = 0
[[notifications.webhooks]]
url = "ftp://hooks.example/T0K3N"
events = ["completed", "completed"]
timeout = "0s"
"#,
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "notifications.api_base_url",
            "notifications.queue_size: must be at least 1",
            "notifications.webhooks[0].url: must be an http(s) URL",
            "notifications.webhooks[0].events: \"completed\" is listed twice",
            "notifications.webhooks[0].timeout: must be greater than zero",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(!e.contains("T0K3N"), "{e}");
        let e = Config::parse(
            "[vault]\naddress = \"http://v:8200\"\n[[notifications.webhooks]]\nurl = \"https://h.example/x\"\nevents = [\"nonsense\"]\nformat = \"teams\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("notifications.webhooks[0].events[0]: unknown variant `nonsense`"),
            "{e}"
        );
        assert!(
            e.contains("notifications.webhooks[0].format: unknown variant `teams`"),
            "{e}"
        );
        // Negative control: a good webhook passes.
        Config::parse(
            "[vault]\naddress = \"http://v:8200\"\n[[notifications.webhooks]]\nurl = \"https://h.example/x\"\nformat = \"mattermost\"\nevents = [\"failed\", \"overdue\"]\n",
            "t.toml",
        )
        .unwrap();
    }
}
