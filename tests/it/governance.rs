//! Key governance against the OpenAI simulator with the real client: emergency forensics
//! (usage buckets and audit-log events of the old key), admin-key rotation, audit-log
//! reconciliation.

use chrono::{DateTime, Utc};
use openai_key_rotator::audit::Audit;
use openai_key_rotator::config::{Config, DurationStr, OpenAiConfig};
use openai_key_rotator::forensics::{
    AuditQuery, BucketWidth, Forensics, GovernanceSource, SourceError,
};
use openai_key_rotator::openai::OpenAiClient;
use openai_key_rotator::retry::RetryPolicy;
use openai_key_rotator::rotation::ports::{AccountRef, NoCalls};
use openai_key_rotator::rotation::{
    Journal, Observer, RotationEvent, RotationRequest, Status, Trigger,
};
use openai_key_rotator::sandbox::openai::{AuditActor, Faults, OpenAiSim, UsageEndpoint};
use openai_key_rotator::sandbox::{loopback, Server};
use openai_key_rotator::secret::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "sk-admin-governance-test-ADMINVALUE-0123456789";

pub(crate) struct Env {
    pub sim: OpenAiSim,
    pub server: Server,
    pub project: String,
}

pub(crate) async fn env() -> Env {
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("governance");
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve simulator");
    Env {
        sim,
        server,
        project,
    }
}

impl Env {
    pub fn openai_config(&self) -> OpenAiConfig {
        OpenAiConfig {
            base_url: format!("{}/v1", self.server.url()),
            request_timeout: DurationStr::from_secs(5),
            max_retries: 2,
            ..OpenAiConfig::default()
        }
    }

    pub fn client(&self, admin: &str) -> Arc<OpenAiClient> {
        Arc::new(
            OpenAiClient::new(&self.openai_config(), Secret::new(admin), Arc::new(NoCalls))
                .unwrap()
                .with_retry_policy(RetryPolicy {
                    max_retries: 2,
                    base: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(50),
                    ..RetryPolicy::default()
                }),
        )
    }

    fn config(&self) -> Config {
        toml::from_str(&format!(
            "[vault]\naddress = \"http://127.0.0.1:8200\"\n\n[[targets]]\nname = \"chat\"\nproject_id = \"{}\"\nvault_path = \"apps/chat/openai\"\nworkloads = [\"demo/Deployment/chat\"]\n",
            self.project
        ))
        .unwrap()
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.sim.now(), 0).unwrap()
    }
}

/// An emergency rotation's journal whose old key is `old`.
fn emergency_journal(env: &Env, old: &AccountRef) -> Journal {
    let req = RotationRequest::new("chat", Trigger::Api, "oncall", "leaked", env.now());
    let mut j = Journal::queued(&req, "okr");
    j.emergency = true;
    j.old_account = Some(old.clone());
    j.spec = Some(env.config().targets[0].clone());
    j
}

#[tokio::test]
async fn forensics_reads_the_old_keys_usage_and_audit_events() {
    let env = env().await;
    let (old, old_key) = env
        .sim
        .create_service_account(&env.project, "okr-chat-initial")
        .unwrap();
    let old = AccountRef {
        id: old.id,
        key_id: old.key_id.unwrap(),
    };
    let (other, _) = env
        .sim
        .create_service_account(&env.project, "someone-else")
        .unwrap();
    let other_key = other.key_id.unwrap();
    let now = env.sim.now();
    env.sim
        .record_usage(&old.key_id, UsageEndpoint::Completions, now - 3 * 3600, 5)
        .unwrap();
    env.sim
        .record_usage(&old.key_id, UsageEndpoint::Embeddings, now - 3600, 2)
        .unwrap();
    // Usage older than the look-back, and another key's: not in the report.
    env.sim
        .record_usage(
            &old.key_id,
            UsageEndpoint::Completions,
            now - 30 * 3600,
            100,
        )
        .unwrap();
    env.sim
        .record_usage(&other_key, UsageEndpoint::Completions, now - 3600, 50)
        .unwrap();
    let intruder = env
        .sim
        .inject_audit_event(
            "api_key.updated",
            &old.key_id,
            Some(&env.project),
            AuditActor::Session {
                user_id: "user-intruder".into(),
                email: "intruder@example.com".into(),
            },
        )
        .unwrap();
    let client = env.client(ADMIN);
    let forensics = Forensics::new(
        client.clone(),
        Duration::from_secs(24 * 3600),
        Duration::from_secs(10),
    );
    let j = emergency_journal(&env, &old);
    let r = forensics.collect(&j, env.now()).await;
    assert_eq!(r.usage_unavailable, None);
    assert_eq!(r.audit_unavailable, None);
    assert_eq!(r.usage_requests, 7, "{:?}", r.usage_buckets);
    assert_eq!(r.usage_buckets.len(), 2, "{:?}", r.usage_buckets);
    assert!(r
        .usage_buckets
        .iter()
        .all(|b| b.end - b.start == chrono::Duration::hours(1)));
    // Created (account and key, by the owner's session) and the intruder's update; nothing
    // on the other account.
    let types: Vec<&str> = r
        .audit_events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        vec![
            "api_key.updated",
            "api_key.created",
            "service_account.created"
        ],
        "{:?}",
        r.audit_events
    );
    assert_eq!(r.audit_events[0].id, intruder);
    assert_eq!(r.audit_events[0].actor, "session user-intruder");
    // No key value anywhere in what is stored or written.
    let stored = serde_json::to_string(&r).unwrap() + &r.summary();
    for value in [old_key.expose(), ADMIN] {
        assert!(!stored.contains(value), "a key value leaked: {stored}");
    }
    assert!(
        !stored.contains("intruder@example.com"),
        "emails are not kept"
    );
}

#[tokio::test]
async fn forensics_says_why_a_half_is_unavailable_and_keeps_the_other() {
    let env = env().await;
    let (old, _) = env
        .sim
        .create_service_account(&env.project, "okr-chat-initial")
        .unwrap();
    let old = AccountRef {
        id: old.id,
        key_id: old.key_id.unwrap(),
    };
    env.sim
        .record_usage(
            &old.key_id,
            UsageEndpoint::Completions,
            env.sim.now() - 60,
            3,
        )
        .unwrap();
    let client = env.client(ADMIN);
    let forensics = Forensics::new(
        client.clone(),
        Duration::from_secs(24 * 3600),
        Duration::from_secs(10),
    );
    let j = emergency_journal(&env, &old);

    // Audit logging off in the organization: the audit half says so, usage is kept.
    env.sim.set_audit_logging(false);
    let r = forensics.collect(&j, env.now()).await;
    assert_eq!(
        r.audit_unavailable.as_deref(),
        Some("forensics unavailable: audit_logging_off")
    );
    assert_eq!(r.usage_requests, 3);
    assert!(r.usage_unavailable.is_none());
    env.sim.set_audit_logging(true);

    // The usage API failing (every retry): usage unavailable, audit events kept.
    env.sim
        .set_faults(Faults::fail_next(100, 500).only("usage.completions"));
    let r = forensics.collect(&j, env.now()).await;
    assert_eq!(
        r.usage_unavailable.as_deref(),
        Some("forensics unavailable: server_error")
    );
    assert!(r.audit_unavailable.is_none());
    assert!(!r.audit_events.is_empty());
    env.sim.clear_faults();

    // A hung API: bounded by the timeout.
    env.sim.set_faults(Faults::hang());
    let short = Forensics::new(
        client,
        Duration::from_secs(3600),
        Duration::from_millis(300),
    );
    let started = std::time::Instant::now();
    let r = short.collect(&j, env.now()).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        r.usage_unavailable.as_deref(),
        Some("forensics unavailable: timeout")
    );
    assert_eq!(
        r.audit_unavailable.as_deref(),
        Some("forensics unavailable: timeout")
    );
    env.sim.clear_faults();
}

#[tokio::test]
async fn the_audit_log_reader_filters_and_classifies() {
    let env = env().await;
    let client = env.client(ADMIN);
    let (a, _) = env
        .sim
        .create_service_account(&env.project, "okr-a")
        .unwrap();
    let since = env.now();
    let all = client
        .audit_events(&AuditQuery {
            project_ids: vec![env.project.clone()],
            event_types: vec!["service_account.created".into()],
            since: Some(since),
            max_events: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.events.len(), 1);
    assert_eq!(all.events[0].resource_id.as_deref(), Some(a.id.as_str()));
    assert!(!all.truncated);
    // More events than asked for: truncated, not an error.
    for i in 0..3 {
        env.sim
            .create_service_account(&env.project, &format!("okr-{i}"))
            .unwrap();
    }
    let some = client
        .audit_events(&AuditQuery {
            max_events: 2,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(some.events.len(), 2);
    assert!(some.truncated);
    // A wrong admin key is "unauthorized", not "audit logging off".
    let wrong = env.client("sk-admin-wrong-0123456789");
    let e = wrong
        .audit_events(&AuditQuery::default())
        .await
        .unwrap_err();
    assert_eq!(e, SourceError::Unauthorized);
    let e = wrong
        .usage_buckets(
            &env.project,
            "key_x",
            since,
            since + chrono::Duration::hours(1),
            BucketWidth::Hour,
        )
        .await
        .unwrap_err();
    assert_eq!(e, SourceError::Unauthorized);
}

#[tokio::test]
async fn the_report_reaches_the_audit_trail_and_the_rotation_view() {
    let env = env().await;
    let (old, old_key) = env
        .sim
        .create_service_account(&env.project, "okr-chat-initial")
        .unwrap();
    let old = AccountRef {
        id: old.id,
        key_id: old.key_id.unwrap(),
    };
    let client = env.client(ADMIN);
    let forensics = Forensics::new(client, Duration::from_secs(3600), Duration::from_secs(10));
    let mut j = emergency_journal(&env, &old);
    j.status = Status::Completed;
    j.forensics = Some(forensics.collect(&j, env.now()).await);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Audit::open(Some(&path), false).unwrap();
    audit.on_event(&j, &RotationEvent::Finished);
    // A routine rotation's conclusion writes no forensics record (negative control).
    let mut routine = j.clone();
    routine.forensics = None;
    routine.emergency = false;
    audit.on_event(&routine, &RotationEvent::Finished);
    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["event"] == "emergency_forensics")
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    let r = &records[0];
    assert_eq!(r["old_service_account_id"], old.id.as_str());
    assert_eq!(r["outcome"], "collected");
    let message = r["message"].as_str().unwrap();
    assert!(message.contains("service_account.created"), "{message}");
    assert!(!text.contains(old_key.expose()) && !text.contains(ADMIN));
    assert!(matches!(
        openai_key_rotator::audit::verify(&path).unwrap(),
        openai_key_rotator::audit::VerifyOutcome::Ok { .. }
    ));

    let view = serde_json::to_value(openai_key_rotator::http::RotationView::from(&j)).unwrap();
    assert_eq!(view["forensics"]["key_id"], old.key_id.as_str());
    assert!(view["forensics"]["audit_events"].as_array().unwrap().len() >= 2);
    let view =
        serde_json::to_value(openai_key_rotator::http::RotationView::from(&routine)).unwrap();
    assert!(view.get("forensics").is_none());
}
