//! The usage-anomaly trigger end to end: the daemon in process against the simulators,
//! usage planted in the OpenAI simulator's Usage API. Steady traffic is judged normal and
//! starts nothing (the negative control); a spike (on the embeddings endpoint: every
//! key-filtering endpoint counts) starts one emergency rotation with reason
//! `usage-anomaly`, writes the audit event and an `anomaly` notice; the cooldown then
//! holds further checks back.

use crate::notify::{sample, Env, Receiver};
use chrono::Utc;
use openai_key_rotator::config::{AnomalyAction, AnomalyConfig, DurationStr};
use openai_key_rotator::rotation::ports::{KeyMeta, SecretStore};
use openai_key_rotator::rotation::{Status, Trigger};
use openai_key_rotator::sandbox::openai::UsageEndpoint;
use openai_key_rotator::usage::BucketWidth;
use std::time::{Duration, Instant};

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_spike_starts_one_emergency_rotation_and_steady_traffic_none() {
    let rx = Receiver::start().await;
    let env = Env::start_with(
        // Consumers call rarely: the planted usage is what is judged.
        |o| o.consumer_interval = Duration::from_secs(120),
        |c, _| {
            c.targets[0].anomaly = Some(AnomalyConfig {
                window: DurationStr::from_secs(120),
                baseline: DurationStr::from_secs(1200),
                ratio: 5.0,
                min_requests: 100,
                action: AnomalyAction::Rotate,
                cooldown: DurationStr::from_secs(600),
                bucket_width: BucketWidth::Minute,
                poll_interval: DurationStr(Duration::from_millis(500)),
            });
            c.notifications.webhooks = vec![toml::from_str(&format!(
                "url = \"{}/200/anomaly\"\nevents = [\"anomaly\"]",
                rx.url
            ))
            .unwrap()];
        },
    )
    .await;
    let t = env.sb.config.targets[0].clone();
    let store = env.running.services.store.clone();
    // The seeded key is minutes old; make it two hours old so it has a baseline.
    let info = store
        .read_key_meta(&t.vault_path, &t.vault_field)
        .await
        .unwrap()
        .unwrap();
    let key_id = info.meta.account.clone().unwrap().key_id;
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
    // Steady: 100 a minute for the last 30 minutes.
    let now = Utc::now().timestamp();
    for m in 0..30 {
        env.sb
            .openai
            .record_usage(&key_id, UsageEndpoint::Completions, now - m * 60, 100)
            .unwrap();
    }
    let m = || env.metrics();
    let normal =
        "openai_key_rotator_usage_anomaly_checks_total{outcome=\"normal\",target=\"chatbot\"}";
    wait_until("three normal checks", Duration::from_secs(30), || {
        sample(&m(), normal) >= 3.0
    })
    .await;
    assert_eq!(
        sample(&m(), "openai_key_rotator_usage_anomaly{target=\"chatbot\"}"),
        0.0
    );
    let ratio = sample(
        &m(),
        "openai_key_rotator_usage_anomaly_ratio{target=\"chatbot\"}",
    );
    assert!(ratio > 0.5 && ratio < 2.0, "steady ratio {ratio}");
    assert!(env.running.daemon.targets()[0].last_rotation.is_none());
    assert!(env.running.daemon.running("chatbot").is_none());
    assert!(rx.all().is_empty());

    // A spike on another endpoint: 3,000 embeddings a minute in the last 3 minutes.
    let now = Utc::now().timestamp();
    for m in 0..3 {
        env.sb
            .openai
            .record_usage(&key_id, UsageEndpoint::Embeddings, now - m * 60, 3000)
            .unwrap();
    }
    let daemon = env.running.daemon.clone();
    wait_until("the anomaly rotation", Duration::from_secs(30), || {
        daemon.targets()[0].last_rotation.is_some() || daemon.running("chatbot").is_some()
    })
    .await;
    let id = daemon
        .running("chatbot")
        .or_else(|| daemon.targets()[0].last_rotation.clone())
        .unwrap();
    assert_eq!(env.wait_rotation("chatbot", &id).await, Status::Completed);
    let j = daemon.rotation(&id).await.unwrap().unwrap();
    assert_eq!(j.trigger, Trigger::UsageAnomaly);
    assert_eq!(j.reason, "usage-anomaly");
    assert!(j.emergency);
    assert_ne!(env.vault_key("chatbot"), old_key);
    assert_eq!(
        sample(&m(), "openai_key_rotator_usage_anomaly{target=\"chatbot\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &m(),
            "openai_key_rotator_rotations_total{outcome=\"completed\",target=\"chatbot\",trigger=\"usage_anomaly\"}"
        ),
        1.0
    );
    // The audit event names target, key id and rotation; the notice links the rotation.
    let audit = std::fs::read_to_string(&env.audit).unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event"] == "usage_anomaly")
        .collect();
    assert_eq!(events.len(), 1, "{audit}");
    assert_eq!(events[0]["target"], "chatbot");
    assert_eq!(events[0]["key_id"], key_id.as_str());
    assert_eq!(events[0]["rotation_id"], id.as_str());
    assert_eq!(events[0]["reason"], "usage-anomaly");
    let notices = rx
        .wait_for("/200/anomaly", 1, Duration::from_secs(10))
        .await;
    assert_eq!(notices.len(), 1);
    let n = notices[0].json();
    assert_eq!(n["event"], "anomaly");
    assert_eq!(n["outcome"], "rotate");
    assert_eq!(n["rotation_id"], id.as_str());
    assert!(n["detail"]
        .as_str()
        .unwrap()
        .contains("requests in the last 2m"));
    for text in [&audit, &notices[0].body] {
        assert!(!text.contains(&old_key));
        assert!(!text.contains(&env.vault_key("chatbot")));
    }
    // Cooldown: checks go on without judging, and nothing more starts.
    let cooling =
        "openai_key_rotator_usage_anomaly_checks_total{outcome=\"cooldown\",target=\"chatbot\"}";
    wait_until("cooldown checks", Duration::from_secs(20), || {
        sample(&m(), cooling) >= 3.0
    })
    .await;
    assert_eq!(
        sample(
            &m(),
            "openai_key_rotator_rotations_total{outcome=\"completed\",target=\"chatbot\",trigger=\"usage_anomaly\"}"
        ),
        1.0
    );
    assert!(daemon.running("chatbot").is_none());
    env.stop().await;
}
