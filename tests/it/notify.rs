//! Webhook notifications end to end: the daemon in process against the simulators, a local
//! HTTP receiver capturing every POST (body and headers). Proves the payload carries ids
//! and a link but never a key value (read back from Vault), that the HMAC signature
//! verifies (and a tampered body does not), that a receiver answering 500 is retried and
//! then counted failed while the rotation completes, and the per-event cooldown.

#![allow(dead_code)]

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use chrono::Utc;
use openai_key_rotator::app::{self, RunOptions, Running};
use openai_key_rotator::config::{Config, DurationStr};
use openai_key_rotator::notify::{signature, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use openai_key_rotator::rotation::{RotationRequest, Status, Trigger};
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use openai_key_rotator::secret::Secret;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A receiver on 127.0.0.1: `POST /<status>/<name>` answers `<status>` and keeps the request.
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Captured>>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Captured>>> = Arc::default();
        async fn take(
            State(got): State<Arc<Mutex<Vec<Captured>>>>,
            Path((status, name)): Path<(u16, String)>,
            headers: HeaderMap,
            body: String,
        ) -> axum::http::StatusCode {
            got.lock().unwrap().push(Captured {
                path: format!("/{status}/{name}"),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                body,
            });
            axum::http::StatusCode::from_u16(status).unwrap()
        }
        let app = axum::Router::new()
            .route("/{status}/{name}", post(take))
            .with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got }
    }

    pub fn at(&self, path: &str) -> Vec<Captured> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Captured> {
        self.got.lock().unwrap().clone()
    }

    /// Wait until `path` got at least `n` requests (or the timeout).
    pub async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Captured> {
        let start = Instant::now();
        loop {
            let got = self.at(path);
            if got.len() >= n || start.elapsed() > timeout {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The simulators and the daemon in process.
pub struct Env {
    pub sb: Sandbox,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
    pub audit: std::path::PathBuf,
}

impl Env {
    pub async fn start(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> Env {
        Env::start_with(|_| {}, tweak).await
    }

    pub async fn start_with(
        opts_tweak: impl FnOnce(&mut SandboxOptions),
        tweak: impl FnOnce(&mut Config, &std::path::Path),
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SandboxOptions::for_tests(dir.path());
        // Only the test's rotations run.
        opts.schedule = "0 0 0 1 1 *".into();
        opts_tweak(&mut opts);
        let sb = Sandbox::start(opts).await.unwrap();
        assert!(
            sb.wait_ready(Duration::from_secs(60)).await,
            "sandbox not ready"
        );
        let mut config = sb.config.clone();
        config.daemon.listen = "127.0.0.1:0".parse().unwrap();
        let audit = dir.path().join("audit.jsonl");
        config.daemon.audit.file = Some(audit.clone());
        for t in &mut config.targets {
            t.grace_period = DurationStr(Duration::from_millis(200));
            t.rollout_timeout = DurationStr::from_secs(20);
        }
        tweak(&mut config, dir.path());
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let shutdown = CancellationToken::new();
        let run = RunOptions {
            config: dir.path().join("unused.toml"),
            ..Default::default()
        };
        let running = app::start(run, config, shutdown.clone(), false)
            .await
            .unwrap();
        Env {
            sb,
            running,
            shutdown,
            dir,
            audit,
        }
    }

    /// The key value Vault serves for `target` now.
    pub fn vault_key(&self, target: &str) -> String {
        let t = self.sb.config.target(target).unwrap();
        let (_, data) = self
            .sb
            .vault
            .as_ref()
            .unwrap()
            .read_raw(&t.vault_path)
            .unwrap();
        data[&t.vault_field].as_str().unwrap().to_string()
    }

    /// Trigger a rotation and wait for its end; its id and status.
    pub async fn rotate(&self, target: &str, emergency: bool) -> (String, Status) {
        let mut req = RotationRequest::new(target, Trigger::Api, "tester", "drill", Utc::now());
        if emergency {
            req = req.emergency(false);
        }
        let id = self
            .running
            .daemon
            .trigger(&req)
            .await
            .unwrap()
            .rotation_id()
            .to_string();
        (id.clone(), self.wait_rotation(target, &id).await)
    }

    /// Wait until rotation `id` ended and the target is free again.
    pub async fn wait_rotation(&self, target: &str, id: &str) -> Status {
        let start = Instant::now();
        loop {
            if let Some(j) = self.running.daemon.rotation(id).await.unwrap() {
                if j.status.is_terminal() && self.running.daemon.running(target).is_none() {
                    return j.status;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "rotation {id} did not end"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metrics(&self) -> String {
        self.running.services.metrics.render()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.running.done).await;
    }
}

/// Wait until `series` in `env`'s metrics reaches `want` (or 10 s), then return it.
pub async fn settled(env: &Env, series: &str, want: f64) -> f64 {
    let start = Instant::now();
    loop {
        let v = sample(&env.metrics(), series);
        if v >= want || start.elapsed() > Duration::from_secs(10) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn webhook(url: &str, format: &str, events: &str, extra: &str) -> toml::Value {
    toml::from_str(&format!(
        "url = \"{url}\"\nformat = \"{format}\"\nevents = {events}\ncooldown = \"0s\"\n{extra}"
    ))
    .unwrap()
}

fn set_webhooks(config: &mut Config, hooks: Vec<toml::Value>) {
    config.notifications.webhooks = hooks.into_iter().map(|h| h.try_into().unwrap()).collect();
}

const ALL: &str = r#"["completed", "rolled_back", "failed", "emergency", "anomaly", "overdue"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_carry_ids_and_a_verifiable_signature_but_never_a_key() {
    let rx = Receiver::start().await;
    let secret = "whsec-test-0123456789";
    let env = Env::start(|c, dir| {
        let file = dir.join("webhook-secret");
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        c.notifications.api_base_url = Some("https://okr.example".into());
        set_webhooks(
            c,
            vec![
                webhook(
                    &format!("{}/200/json", rx.url),
                    "json",
                    ALL,
                    &format!("secret_file = \"{}\"", file.display()),
                ),
                webhook(&format!("{}/200/slack", rx.url), "slack", ALL, ""),
                webhook(&format!("{}/200/mm", rx.url), "mattermost", ALL, ""),
                // Negative control: wants only failures; gets nothing here.
                webhook(
                    &format!("{}/200/failed-only", rx.url),
                    "json",
                    r#"["failed"]"#,
                    "",
                ),
            ],
        );
    })
    .await;
    let mut keys = vec![env.vault_key("chatbot")];
    let (r1, s1) = env.rotate("chatbot", false).await;
    assert_eq!(s1, Status::Completed);
    keys.push(env.vault_key("chatbot"));
    let (r2, s2) = env.rotate("chatbot", true).await;
    assert_eq!(s2, Status::Completed);
    keys.push(env.vault_key("chatbot"));
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);

    // completed (r1), emergency (r2), completed (r2).
    let json = rx.wait_for("/200/json", 3, Duration::from_secs(20)).await;
    let events: Vec<(String, String)> = json
        .iter()
        .map(|c| {
            let v = c.json();
            (
                v["event"].as_str().unwrap().to_string(),
                v["rotation_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("completed".into(), r1.clone()),
            ("emergency".into(), r2.clone()),
            ("completed".into(), r2.clone()),
        ]
    );
    let first = json[0].json();
    assert_eq!(first["target"], "chatbot");
    assert_eq!(first["outcome"], "completed");
    assert_eq!(first["trigger"], "api");
    assert_eq!(first["reason"], "drill");
    assert_eq!(
        first["rotation_url"],
        format!("https://okr.example/v1/rotations/{r1}")
    );
    assert_eq!(json[1].json()["outcome"], "started");
    // The signature verifies over timestamp and body; a tampered body does not.
    let s = Secret::new(secret);
    for c in &json {
        let ts: i64 = c.header(TIMESTAMP_HEADER).unwrap().parse().unwrap();
        assert!((Utc::now().timestamp() - ts).abs() < 120);
        assert_eq!(
            c.header(SIGNATURE_HEADER).unwrap(),
            signature(&s, ts, c.body.as_bytes())
        );
        let tampered = c.body.replace("chatbot", "chatbox");
        assert_ne!(
            c.header(SIGNATURE_HEADER).unwrap(),
            signature(&s, ts, tampered.as_bytes())
        );
        assert_eq!(c.header("x-okr-event"), c.json()["event"].as_str());
    }
    let slack = rx.wait_for("/200/slack", 3, Duration::from_secs(10)).await;
    assert_eq!(slack.len(), 3);
    let text = slack[0].json()["text"].as_str().unwrap().to_string();
    assert!(
        text.contains("chatbot")
            && text.contains(&r1)
            && text.contains("https://okr.example/v1/rotations/"),
        "{text}"
    );
    assert!(slack[0].json()["blocks"].is_array());
    assert!(
        slack[0].header(SIGNATURE_HEADER).is_none(),
        "no secret, no signature"
    );
    let mm = rx.wait_for("/200/mm", 3, Duration::from_secs(10)).await;
    assert_eq!(mm.len(), 3);
    assert_eq!(mm[0].json()["username"], "openai-key-rotator");
    assert!(rx.at("/200/failed-only").is_empty());

    // No key value anywhere: bodies, headers (old, intermediate and current keys).
    let everything: Vec<String> = rx
        .all()
        .iter()
        .map(|c| format!("{:?} {}", c.headers, c.body))
        .collect();
    assert!(everything.len() >= 9);
    for k in &keys {
        assert!(k.len() > 20);
        for e in &everything {
            assert!(!e.contains(k.as_str()), "a key value was sent to a webhook");
        }
    }
    // Positive control of the scan: the rotation id it looks for alongside is there.
    assert!(everything.iter().any(|e| e.contains(&r1)));
    let delivered =
        "openai_key_rotator_notifications_total{event=\"completed\",outcome=\"delivered\"}";
    assert_eq!(
        settled(&env, delivered, 6.0).await,
        6.0,
        "{}",
        env.metrics()
    );
    assert!(!env.metrics().contains(&keys[2]));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_then_counted_and_the_rotation_still_completes() {
    let rx = Receiver::start().await;
    let env = Env::start(|c, dir| {
        let fast =
            "max_retries = 2\nretry_base = \"10ms\"\nmax_backoff = \"20ms\"\ntimeout = \"2s\"";
        set_webhooks(
            c,
            vec![
                webhook(&format!("{}/500/broken", rx.url), "json", ALL, fast),
                // Negative control: a healthy receiver of the same notice is delivered.
                webhook(&format!("{}/200/fine", rx.url), "json", ALL, fast),
            ],
        );
        // The healthy one's URL comes from a file (as from a mounted Secret).
        let file = dir.join("fine-url");
        std::fs::write(&file, format!("{}/200/fine\n", rx.url)).unwrap();
        c.notifications.webhooks[1].url = None;
        c.notifications.webhooks[1].url_file = Some(file);
    })
    .await;
    let (_, status) = env.rotate("chatbot", false).await;
    assert_eq!(status, Status::Completed);
    let broken = rx.wait_for("/500/broken", 3, Duration::from_secs(20)).await;
    assert_eq!(broken.len(), 3, "1 attempt + 2 retries");
    let start = Instant::now();
    let series = "openai_key_rotator_notifications_total{event=\"completed\",outcome=\"failed\"}";
    while sample(&env.metrics(), series) < 1.0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = env.metrics();
    assert_eq!(sample(&m, series), 1.0, "{m}");
    let delivered =
        "openai_key_rotator_notifications_total{event=\"completed\",outcome=\"delivered\"}";
    assert_eq!(settled(&env, delivered, 1.0).await, 1.0);
    assert_eq!(rx.at("/200/fine").len(), 1);
    // Every attempt went through the shared observed path.
    assert_eq!(
        sample(
            &m,
            "openai_key_rotator_api_requests_total{backend=\"webhook\",operation=\"webhook.post\",status_class=\"5xx\"}"
        ),
        3.0,
        "{m}"
    );
    // The same identity on every retry, for de-duplication.
    let ids: std::collections::BTreeSet<_> = broken
        .iter()
        .map(|c| c.header("x-okr-delivery").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cooldown_suppresses_a_repeat_of_the_same_event_and_target() {
    let rx = Receiver::start().await;
    let env = Env::start(|c, _| {
        set_webhooks(
            c,
            vec![
                webhook(
                    &format!("{}/200/cooled", rx.url),
                    "json",
                    r#"["completed"]"#,
                    "",
                ),
                // Negative control: cooldown off (the helper's "0s").
                webhook(
                    &format!("{}/200/every", rx.url),
                    "json",
                    r#"["completed"]"#,
                    "",
                ),
            ],
        );
        c.notifications.webhooks[0].cooldown = DurationStr::from_secs(3600);
    })
    .await;
    for _ in 0..2 {
        let (_, status) = env.rotate("chatbot", false).await;
        assert_eq!(status, Status::Completed);
    }
    let every = rx.wait_for("/200/every", 2, Duration::from_secs(20)).await;
    assert_eq!(every.len(), 2);
    assert_eq!(rx.at("/200/cooled").len(), 1);
    let m = env.metrics();
    assert_eq!(
        sample(
            &m,
            "openai_key_rotator_notifications_total{event=\"completed\",outcome=\"suppressed\"}"
        ),
        1.0,
        "{m}"
    );
    env.stop().await;
}

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

/// Webhook URLs (path and query are tokens) and the signing secret never reach the log,
/// whether the receiver answers 500 or cannot be reached; the log names the webhook by
/// index and host (the positive control that the capture works). Current-thread runtime:
/// every task logs under this thread's subscriber (as in `openai_client`'s leak test).
#[tokio::test]
async fn webhook_urls_and_the_signing_secret_never_reach_the_log() {
    use openai_key_rotator::config::NotifyEvent;
    use openai_key_rotator::metrics::Metrics;
    use openai_key_rotator::notify::{Notice, Notifier};
    use tracing_subscriber::util::SubscriberInitExt;
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let buf = LogBuf::default();
    let _guard = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(buf.clone())
        .finish()
        .set_default();
    tracing::callsite::rebuild_interest_cache();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::callsite::rebuild_interest_cache();

    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "whsec-LOGSECRET-1\n").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let text = format!(
        r#"
[vault]
address = "http://127.0.0.1:8200"
[[notifications.webhooks]]
url = "{}/500/PATHSECRET-1?token=QUERYSECRET-1"
secret_file = "{}"
max_retries = 1
retry_base = "1ms"
max_backoff = "2ms"
[[notifications.webhooks]]
url = "http://127.0.0.1:{closed_port}/CLOSEDSECRET-1"
max_retries = 1
retry_base = "1ms"
max_backoff = "2ms"
"#,
        rx.url,
        secret.display()
    );
    let config = Config::parse(&text, "t.toml").unwrap();
    let metrics = Arc::new(Metrics::new(&["chatbot".to_string()]));
    let n = Arc::new(Notifier::new(&config, metrics.clone(), metrics.clone()).unwrap());
    let cancel = CancellationToken::new();
    let task = n.spawn(cancel.clone());
    n.notify(Notice {
        event: NotifyEvent::Failed,
        target: "chatbot".into(),
        outcome: "failed".into(),
        rotation_id: Some("r-1".into()),
        trigger: Some("api".into()),
        reason: Some("drill".into()),
        detail: None,
        at: Utc::now(),
    });
    let failed = "openai_key_rotator_notifications_total{event=\"failed\",outcome=\"failed\"}";
    let start = Instant::now();
    while sample(&metrics.render(), failed) < 2.0 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sample(&metrics.render(), failed),
        2.0,
        "{}",
        metrics.render()
    );
    assert_eq!(rx.at("/500/PATHSECRET-1").len(), 2, "1 attempt + 1 retry");
    cancel.cancel();
    task.await.unwrap();
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("webhooks[0] (127.0.0.1)"), "{logs}");
    assert!(logs.contains("webhooks[1] (127.0.0.1)"), "{logs}");
    assert!(logs.contains("notification failed"), "{logs}");
    for banned in ["PATHSECRET", "QUERYSECRET", "CLOSEDSECRET", "LOGSECRET"] {
        assert!(!logs.contains(banned), "{banned} in the log:\n{logs}");
    }
}

/// `overdue` from the daemon's schedule pass: a key older than `max_key_age` +
/// `overdue_after` is told once (cooldown off), then rotated by the max-age trigger; before
/// the target has a `max_key_age` the same old key is not overdue (the negative control),
/// nor is the fresh key after the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_key_is_reported_overdue_once_and_then_rotated() {
    use openai_key_rotator::notify::Notifier;
    use openai_key_rotator::rotation::ports::{KeyMeta, SecretStore};
    let rx = Receiver::start().await;
    let env = Env::start(|c, _| {
        set_webhooks(
            c,
            vec![webhook(
                &format!("{}/200/overdue", rx.url),
                "json",
                r#"["overdue"]"#,
                "",
            )],
        );
        c.notifications.overdue_after = DurationStr::from_secs(60);
    })
    .await;
    let t = env.sb.config.targets[0].clone();
    let store = env.running.services.store.clone();
    let info = store
        .read_key_meta(&t.vault_path, &t.vault_field)
        .await
        .unwrap()
        .unwrap();
    store
        .write_key_meta(
            &t.vault_path,
            &KeyMeta {
                key_created_at: Some(Utc::now() - chrono::Duration::hours(2)),
                ..info.meta.clone()
            },
        )
        .await
        .unwrap();
    let old_key = env.vault_key("chatbot");
    // A pass of the schedule sees the old key, but no max_key_age: nothing to tell.
    let mut config = (*env.running.daemon.config()).clone();
    env.running.daemon.reload(Arc::new(config.clone())).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.all().is_empty());
    // As SIGHUP does: the daemon and the notifier take the new configuration.
    config.targets[0].max_key_age = Some(DurationStr::from_secs(3600));
    env.running
        .services
        .notifier
        .apply(Notifier::stage(&config).unwrap());
    env.running.daemon.reload(Arc::new(config)).unwrap();
    let got = rx
        .wait_for("/200/overdue", 1, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 1);
    let v = got[0].json();
    assert_eq!(v["event"], "overdue");
    assert_eq!(v["target"], "chatbot");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("past max_key_age 1h"),
        "{v}"
    );
    // The max-age rotation replaces the key; the fresh one is not overdue.
    let start = Instant::now();
    while env.vault_key("chatbot") == old_key || env.running.daemon.running("chatbot").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no max-age rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = env.running.daemon.targets()[0]
        .last_rotation
        .clone()
        .unwrap();
    let j = env.running.daemon.rotation(&last).await.unwrap().unwrap();
    assert_eq!((j.trigger, j.status), (Trigger::MaxAge, Status::Completed));
    let again = env.running.daemon.config();
    env.running.daemon.reload(again).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.at("/200/overdue").len(), 1, "{:?}", rx.all());
    env.stop().await;
}

/// An emergency request for a target mid-rotation upgrades that rotation: the `emergency`
/// notice says `upgraded` (the plain start before it said nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_emergency_is_told() {
    use openai_key_rotator::daemon::Accepted;
    let rx = Receiver::start().await;
    let env = Env::start(|c, _| {
        set_webhooks(
            c,
            vec![webhook(
                &format!("{}/200/emergency", rx.url),
                "json",
                r#"["emergency"]"#,
                "",
            )],
        );
    })
    .await;
    let plain = RotationRequest::new("chatbot", Trigger::Api, "tester", "routine", Utc::now());
    let id = env
        .running
        .daemon
        .trigger(&plain)
        .await
        .unwrap()
        .rotation_id()
        .to_string();
    let urgent = RotationRequest::new("chatbot", Trigger::Api, "oncall", "leak", Utc::now())
        .emergency(false);
    assert_eq!(
        env.running.daemon.trigger(&urgent).await.unwrap(),
        Accepted::Upgraded(id.clone())
    );
    assert_eq!(env.wait_rotation("chatbot", &id).await, Status::Completed);
    let got = rx
        .wait_for("/200/emergency", 1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_all = rx.at("/200/emergency");
    assert!(!got.is_empty());
    let upgraded: Vec<_> = got_all
        .iter()
        .map(|c| c.json())
        .filter(|v| v["outcome"] == "upgraded")
        .collect();
    assert_eq!(upgraded.len(), 1, "{got_all:?}");
    assert_eq!(upgraded[0]["rotation_id"], id.as_str());
    assert_eq!(upgraded[0]["reason"], "leak");
    env.stop().await;
}
