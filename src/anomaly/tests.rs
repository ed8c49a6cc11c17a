//! The detector over fakes on tokio's paused clock: a spike fires (and with `rotate`
//! requests an emergency rotation), steady traffic, a floor, a young key and a follower do
//! not; the cooldown holds a second fire back until it ends.

use super::*;
use crate::rotation::fakes::{FakeStore, Log, TokioClock};
use crate::rotation::ports::{AccountRef, BackendError, KeyMeta};
use crate::usage::BucketWidth;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const BASE: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn config(action: &str, cooldown: &str) -> Config {
    Config::parse(
        &format!(
            r#"
[vault]
address = "http://127.0.0.1:8200"

[[targets]]
name = "chatbot"
project_id = "proj_1"
vault_path = "apps/chatbot/openai"
workloads = ["demo/Deployment/chatbot"]

[targets.anomaly]
window = "10m"
baseline = "2h"
ratio = 5.0
min_requests = 100
bucket_width = "1m"
action = "{action}"
cooldown = "{cooldown}"
poll_interval = "1m"
"#
        ),
        "t.toml",
    )
    .unwrap()
}

/// Requests per minute as a function of the minute's start and the asked range's end.
type Rate = dyn Fn(i64, i64) -> u64 + Send + Sync;

struct FakeUsage {
    rate: Mutex<Box<Rate>>,
    calls: AtomicUsize,
    fail: AtomicBool,
}

impl FakeUsage {
    fn new(rate: impl Fn(i64, i64) -> u64 + Send + Sync + 'static) -> Arc<FakeUsage> {
        Arc::new(FakeUsage {
            rate: Mutex::new(Box::new(rate)),
            calls: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }
    fn set(&self, rate: impl Fn(i64, i64) -> u64 + Send + Sync + 'static) {
        *self.rate.locked() = Box::new(rate);
    }
}

#[async_trait]
impl UsageSource for FakeUsage {
    async fn usage_buckets(
        &self,
        _project: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        width: BucketWidth,
    ) -> Result<Vec<UsageBucket>, BackendError> {
        assert_eq!(key_id, "key_current");
        assert_eq!(width, BucketWidth::Minute);
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::Failed {
                backend: crate::rotation::ports::Backend::OpenAi,
                message: "usage.completions: HTTP 500".into(),
                transient: true,
            });
        }
        let rate = self.rate.locked();
        Ok((start.timestamp()..end.timestamp())
            .step_by(60)
            .map(|s| UsageBucket {
                start: DateTime::from_timestamp(s, 0).unwrap(),
                end: DateTime::from_timestamp(s + 60, 0).unwrap(),
                requests: rate(s, end.timestamp()),
            })
            .collect())
    }
}

struct FakeActions {
    leader: AtomicBool,
    refuse: AtomicBool,
    config: Arc<Config>,
    requests: Mutex<Vec<RotationRequest>>,
}

#[async_trait]
impl AnomalyActions for FakeActions {
    fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }
    fn config(&self) -> Arc<Config> {
        self.config.clone()
    }
    async fn rotate(&self, request: &RotationRequest) -> Result<String, String> {
        self.requests.locked().push(request.clone());
        if self.refuse.load(Ordering::SeqCst) {
            return Err("the daemon is shutting down".into());
        }
        Ok(request.rotation_id.clone())
    }
}

type Fired = (Finding, Option<Result<String, String>>);

#[derive(Default)]
struct Recorder {
    checks: Mutex<Vec<&'static str>>,
    fired: Mutex<Vec<Fired>>,
}

impl AnomalyReport for Recorder {
    fn checked(&self, _target: &str, outcome: &'static str, _finding: Option<&Finding>) {
        self.checks.locked().push(outcome);
    }
    fn fired(
        &self,
        _target: &Target,
        _cfg: &AnomalyConfig,
        finding: &Finding,
        rotation: Option<&Result<String, String>>,
    ) {
        self.fired
            .locked()
            .push((finding.clone(), rotation.cloned()));
    }
}

struct Rig {
    detector: Arc<Detector>,
    usage: Arc<FakeUsage>,
    actions: Arc<FakeActions>,
    report: Arc<Recorder>,
    target: Target,
}

/// Now is BASE + 1 day (+ 30 s into the minute); the key is `key_age_h` hours old.
fn rig(
    config: Config,
    key_age_h: i64,
    rate: impl Fn(i64, i64) -> u64 + Send + Sync + 'static,
) -> Rig {
    let now = DateTime::from_timestamp(BASE + 86_400 + 30, 0).unwrap();
    let store = FakeStore::new(Log::default());
    store.put(
        "apps/chatbot/openai",
        "api_key",
        "sk-the-current-key-value",
        KeyMeta {
            account: Some(AccountRef {
                id: "svc_acct_current".into(),
                key_id: "key_current".into(),
            }),
            rotation_id: None,
            key_created_at: Some(now - chrono::Duration::hours(key_age_h)),
        },
    );
    let usage = FakeUsage::new(rate);
    let target = config.targets[0].clone();
    let actions = Arc::new(FakeActions {
        leader: AtomicBool::new(true),
        refuse: AtomicBool::new(false),
        config: Arc::new(config),
        requests: Mutex::default(),
    });
    let report = Arc::new(Recorder::default());
    let detector = Arc::new(Detector::new(
        usage.clone(),
        Arc::new(store),
        actions.clone(),
        report.clone(),
        Arc::new(TokioClock::new(now)),
    ));
    Rig {
        detector,
        usage,
        actions,
        report,
        target,
    }
}

/// 20 a minute, always.
fn steady(_: i64, _: i64) -> u64 {
    20
}

/// 20 a minute, and 200 a minute in the last 5 complete minutes.
fn spike(minute: i64, end: i64) -> u64 {
    if minute >= end - 300 {
        200
    } else {
        20
    }
}

#[tokio::test(start_paused = true)]
async fn a_spike_fires_and_rotate_asks_for_an_emergency_rotation() {
    let r = rig(config("rotate", "1h"), 48, spike);
    assert_eq!(r.detector.check(&r.target).await, "anomaly");
    let reqs = r.actions.requests.locked().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].target, "chatbot");
    assert_eq!(reqs[0].trigger, Trigger::UsageAnomaly);
    assert_eq!(reqs[0].reason, "usage-anomaly");
    assert!(reqs[0].emergency && !reqs[0].revoke_first);
    let fired = r.report.fired.locked().clone();
    let (f, rotation) = &fired[0];
    // Window: the last 10 complete minutes, 5 of them at 200: 1100 against 200 expected.
    assert_eq!(f.current, 5 * 200 + 5 * 20);
    assert!((f.expected - 200.0).abs() < 1e-9, "{f:?}");
    assert!(f.fired && (f.ratio - 5.5).abs() < 1e-9);
    assert_eq!(
        rotation.as_ref().unwrap().as_ref().unwrap(),
        &reqs[0].rotation_id
    );
    let text = f.describe(r.target.anomaly.as_ref().unwrap());
    assert!(text.contains("1100 requests in the last 10m"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn steady_traffic_a_small_spike_and_a_young_key_do_not_fire() {
    // Negative controls of the spike test, one condition each.
    let r = rig(config("rotate", "1h"), 48, steady);
    assert_eq!(r.detector.check(&r.target).await, "normal");
    // Past the ratio (9x) but under the floor: 90 requests in the window.
    let r2 = rig(config("rotate", "1h"), 48, |m, e| {
        if spike(m, e) == 200 {
            17
        } else {
            1
        }
    });
    assert_eq!(r2.detector.check(&r2.target).await, "normal");
    // The same spike on a key created just now: no history to compare with.
    let r3 = rig(config("rotate", "1h"), 0, spike);
    assert_eq!(r3.detector.check(&r3.target).await, "insufficient_history");
    for r in [&r, &r2, &r3] {
        assert!(r.actions.requests.locked().is_empty());
        assert!(r.report.fired.locked().is_empty());
    }
    // A key younger than window + baseline is judged against the history it has.
    let r4 = rig(config("alert", "1h"), 1, spike);
    assert_eq!(r4.detector.check(&r4.target).await, "anomaly");
    assert_eq!(
        r4.report.fired.locked()[0].0.baseline,
        Duration::from_secs(49 * 60)
    );
    assert!(
        r4.actions.requests.locked().is_empty(),
        "alert does not rotate"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cooldown_stops_a_second_fire_until_it_ends() {
    let r = rig(config("rotate", "30m"), 48, spike);
    let cancel = CancellationToken::new();
    let task = r.detector.spawn(cancel.clone());
    // Polls every minute for 20 minutes: one fire, then cooldown checks without Usage API calls.
    tokio::time::sleep(Duration::from_secs(20 * 60 + 1)).await;
    assert_eq!(r.actions.requests.locked().len(), 1);
    let calls = r.usage.calls.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "no Usage API call during the cooldown");
    assert!(
        r.report
            .checks
            .locked()
            .iter()
            .filter(|c| **c == "cooldown")
            .count()
            >= 19
    );
    // Negative control: past the cooldown the same spike fires again.
    tokio::time::sleep(Duration::from_secs(11 * 60)).await;
    assert_eq!(r.actions.requests.locked().len(), 2);
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_follower_does_not_poll_and_a_failed_poll_does_not_fire() {
    let r = rig(config("rotate", "1h"), 48, spike);
    r.actions.leader.store(false, Ordering::SeqCst);
    let cancel = CancellationToken::new();
    let task = r.detector.spawn(cancel.clone());
    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    assert_eq!(r.usage.calls.load(Ordering::SeqCst), 0);
    assert!(r.actions.requests.locked().is_empty());
    // Leading, but the Usage API fails: an error, no fire, judged again next poll.
    r.usage.fail.store(true, Ordering::SeqCst);
    r.actions.leader.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(r.actions.requests.locked().is_empty());
    assert!(r.report.checks.locked().contains(&"error"));
    r.usage.fail.store(false, Ordering::SeqCst);
    r.usage.set(spike);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(r.actions.requests.locked().len(), 1);
    cancel.cancel();
    task.await.unwrap();
}

#[test]
fn config_checks_name_the_field() {
    let text = r#"
[vault]
address = "http://127.0.0.1:8200"

[[targets]]
name = "chatbot"
project_id = "proj_1"
vault_path = "apps/chatbot/openai"
workloads = ["demo/Deployment/chatbot"]

[targets.anomaly]
window = "90s"
baseline = "1m"
ratio = 1.0
min_requests = 0
bucket_width = "1m"
cooldown = "30s"
poll_interval = "0s"
"#;
    let e = Config::parse(text, "t.toml").unwrap_err().to_string();
    for want in [
        "targets[0] (\"chatbot\").anomaly.ratio: (1) must be a number above 1",
        "targets[0] (\"chatbot\").anomaly.min_requests: must be at least 1",
        "targets[0] (\"chatbot\").anomaly.window: (1m 30s) must be a non-zero multiple of bucket_width \"1m\"",
        "targets[0] (\"chatbot\").anomaly.baseline: (1m) must be at least window",
        "targets[0] (\"chatbot\").anomaly.cooldown: (30s) must be at least window",
        "targets[0] (\"chatbot\").anomaly.poll_interval: must be greater than zero",
    ] {
        assert!(e.contains(want), "{want}\n{e}");
    }
    let long = text
        .replace("window = \"90s\"", "window = \"1h\"")
        .replace("baseline = \"1m\"", "baseline = \"7d\"");
    let e = Config::parse(&long, "t.toml").unwrap_err().to_string();
    assert!(
        e.contains("window + baseline (7days 1h) must be at most 1day"),
        "{e}"
    );
    // Negative control: the defaults (1h buckets, 1h window, 7d baseline) pass.
    let ok = text.split("[targets.anomaly]").next().unwrap().to_string() + "[targets.anomaly]\n";
    let c = Config::parse(&ok, "t.toml").unwrap();
    let a = c.targets[0].anomaly.as_ref().unwrap();
    assert_eq!(a.bucket_width, BucketWidth::Hour);
    assert_eq!(a.action, AnomalyAction::Alert);
}

#[tokio::test(start_paused = true)]
async fn a_refused_rotation_starts_no_cooldown() {
    let r = rig(config("rotate", "1h"), 48, spike);
    r.actions.refuse.store(true, Ordering::SeqCst);
    assert_eq!(r.detector.check(&r.target).await, "anomaly");
    let fired = r.report.fired.locked().clone();
    assert!(fired[0].1.as_ref().unwrap().is_err());
    // Tried again at once, not after an hour; once accepted, the cooldown holds.
    assert_eq!(r.detector.check(&r.target).await, "anomaly");
    r.actions.refuse.store(false, Ordering::SeqCst);
    assert_eq!(r.detector.check(&r.target).await, "anomaly");
    assert_eq!(r.detector.check(&r.target).await, "cooldown");
    assert_eq!(r.actions.requests.locked().len(), 3);
}
