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

// ---------------------------------------------------------------------------------------
// Admin-key rotation: the OpenAI simulator and the Vault simulator, real clients.

use openai_key_rotator::admin_key::{
    self, AdminKey, AdminKeyApi, AdminKeyError, AdminKeyJournal, AdminKeyRotator, AdminStatus,
    NewAdminKey, Pass, Phase,
};
use openai_key_rotator::config::{VaultAuth, VaultConfig};
use openai_key_rotator::rotation::ports::{KeyMeta, SecretStore, StoredKey};
use openai_key_rotator::sandbox::vault::VaultSim;
use openai_key_rotator::vault::VaultStore;

const ADMIN_PATH: &str = "ops/openai-admin";
const JOURNAL: &str = "openai-key-rotator/state/admin-key";

struct AdminEnv {
    env: Env,
    _vault_server: Server,
    store: Arc<VaultStore>,
    _dir: tempfile::TempDir,
}

async fn admin_env(with_meta: bool) -> AdminEnv {
    let env = env().await;
    let vault = VaultSim::new(Secret::new("vault-root"));
    let vault_server = vault
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("vault sim");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "vault-root\n").unwrap();
    let store = Arc::new(
        VaultStore::connect(
            &VaultConfig {
                address: vault_server.url(),
                request_timeout: DurationStr::from_secs(5),
                max_retries: 2,
                retry_base: DurationStr(Duration::from_millis(10)),
                max_backoff: DurationStr(Duration::from_millis(50)),
                auth: VaultAuth::Token {
                    token_env: "OKR_UNSET_GOVERNANCE_TOKEN".into(),
                    token_file: Some(token),
                },
                ..VaultConfig::default()
            },
            Arc::new(NoCalls),
        )
        .await
        .unwrap(),
    );
    // The seeded admin key, as an operator put it there (with or without its id).
    let seeded = env.sim.admin_keys()[0].id.clone();
    let meta = if with_meta {
        KeyMeta {
            account: Some(AccountRef {
                id: seeded.clone(),
                key_id: seeded,
            }),
            ..KeyMeta::default()
        }
    } else {
        KeyMeta::default()
    };
    store
        .write_key(ADMIN_PATH, admin_key::FIELD, &Secret::new(ADMIN), &meta, 0)
        .await
        .unwrap();
    AdminEnv {
        env,
        _vault_server: vault_server,
        store,
        _dir: dir,
    }
}

impl AdminEnv {
    fn rotator(&self, api: Arc<dyn AdminKeyApi>) -> AdminKeyRotator {
        AdminKeyRotator {
            api,
            store: self.store.clone(),
            vault_path: ADMIN_PATH.into(),
            journal_path: JOURNAL.into(),
            name_prefix: "okr".into(),
            max_age: Some(Duration::from_secs(30 * 86_400)),
            expiry: Some(Duration::from_secs(90 * 86_400)),
            metrics: None,
            may_write: None,
        }
    }

    async fn served(&self) -> StoredKey {
        self.store
            .read_key(ADMIN_PATH, admin_key::FIELD)
            .await
            .unwrap()
            .unwrap()
    }

    async fn journal(&self) -> AdminKeyJournal {
        let (_, doc) = self.store.read_doc(JOURNAL).await.unwrap().unwrap();
        let text = doc.to_string();
        assert!(
            !text.contains("sk-admin-"),
            "a key value in the journal: {text}"
        );
        serde_json::from_value(doc).unwrap()
    }

    /// Exactly one live admin key, and it is the one Vault serves (by id and by use).
    async fn assert_one_live_key_served(&self) {
        let live: Vec<_> = self
            .env
            .sim
            .admin_keys()
            .into_iter()
            .filter(|k| k.live)
            .collect();
        assert_eq!(live.len(), 1, "{live:?}");
        let served = self.served().await;
        let client = self.env.client(served.key.expose());
        assert!(client.ping().await.is_ok(), "Vault's admin key works");
        if let Some(a) = &served.meta.account {
            assert_eq!(a.key_id, live[0].id);
        }
    }
}

#[tokio::test]
async fn the_admin_key_is_rotated_published_and_switched() {
    for with_meta in [true, false] {
        let a = admin_env(with_meta).await;
        let client = a.env.client(ADMIN);
        let pass = a.rotator(client.clone()).rotate_now().await.unwrap();
        assert!(matches!(pass, Pass::Completed { .. }), "{pass:?}");
        let served = a.served().await;
        assert_ne!(served.key.expose(), ADMIN);
        // The running client switched to the new key; the old one is refused.
        assert_eq!(client.current_admin_key().expose(), served.key.expose());
        assert!(client.ping().await.is_ok());
        assert!(
            a.env.client(ADMIN).ping().await.is_err(),
            "the old admin key is deleted"
        );
        a.assert_one_live_key_served().await;
        let j = a.journal().await;
        assert_eq!((j.status, j.phase), (AdminStatus::Completed, Phase::Done));
        let new = a.env.sim.admin_keys().into_iter().find(|k| k.live).unwrap();
        assert_eq!(Some(&new.id), j.new_key_id.as_ref());
        assert!(new.name.starts_with("okr-admin-"), "{}", new.name);
        assert_eq!(new.expires_at, Some(new.created_at + 90 * 86_400));
        // Not due again: the new key is young (negative control of the schedule).
        assert_eq!(
            a.rotator(client.clone()).run_once().await.unwrap(),
            Pass::NotDue
        );
    }
}

/// Passes every call to the client, except the ones a test breaks.
struct Breaking {
    inner: Arc<OpenAiClient>,
    /// Verify answers "unauthorized" (the new key does not work).
    fail_verify: bool,
    /// Deleting this key id never answers (the process dies there).
    hang_delete_of: Option<String>,
}

#[async_trait::async_trait]
impl AdminKeyApi for Breaking {
    async fn list_admin_keys(&self) -> Result<Vec<AdminKey>, AdminKeyError> {
        self.inner.list_admin_keys().await
    }
    async fn create_admin_key(
        &self,
        name: &str,
        expires: Option<u64>,
    ) -> Result<NewAdminKey, AdminKeyError> {
        self.inner.create_admin_key(name, expires).await
    }
    async fn delete_admin_key(&self, id: &str) -> Result<(), AdminKeyError> {
        if self.hang_delete_of.as_deref() == Some(id) {
            std::future::pending::<()>().await;
        }
        self.inner.delete_admin_key(id).await
    }
    async fn verify_admin_key(&self, key: &Secret) -> Result<(), AdminKeyError> {
        if self.fail_verify {
            // What the API answers a key that does not work: the real call with a bad key.
            return self
                .inner
                .verify_admin_key(&Secret::new("sk-admin-not-a-key-0123456789"))
                .await;
        }
        self.inner.verify_admin_key(key).await
    }
    fn switch_admin_key(&self, key: Secret) -> Result<(), AdminKeyError> {
        self.inner.switch_admin_key(key)
    }
}

#[tokio::test]
async fn a_failed_verification_keeps_the_old_key_and_deletes_the_new() {
    let a = admin_env(true).await;
    let client = a.env.client(ADMIN);
    let api = Arc::new(Breaking {
        inner: client.clone(),
        fail_verify: true,
        hang_delete_of: None,
    });
    let pass = a.rotator(api).rotate_now().await.unwrap();
    let Pass::Failed { error, .. } = pass else {
        panic!("{pass:?}")
    };
    assert!(error.contains("verify"), "{error}");
    assert!(
        !error.contains("sk-admin-"),
        "a key value in the error: {error}"
    );
    assert_eq!(
        a.served().await.key.expose(),
        ADMIN,
        "Vault still serves the old key"
    );
    assert_eq!(client.current_admin_key().expose(), ADMIN);
    a.assert_one_live_key_served().await;
    assert_eq!(a.env.sim.admin_keys().len(), 2, "one was made, and deleted");
    assert_eq!(a.journal().await.status, AdminStatus::Failed);
    // The next pass starts afresh and succeeds (the failure is not sticky).
    let pass = a.rotator(client.clone()).rotate_now().await.unwrap();
    assert!(matches!(pass, Pass::Completed { .. }), "{pass:?}");
    a.assert_one_live_key_served().await;
}

/// A store whose key writes never answer: the process dies during the publish.
struct HangingPublish(Arc<VaultStore>);

#[async_trait::async_trait]
impl SecretStore for HangingPublish {
    async fn read_key(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<StoredKey>, openai_key_rotator::rotation::ports::BackendError> {
        self.0.read_key(path, field).await
    }
    async fn read_key_version(
        &self,
        path: &str,
        field: &str,
        version: u64,
    ) -> Result<Secret, openai_key_rotator::rotation::ports::BackendError> {
        self.0.read_key_version(path, field, version).await
    }
    async fn write_key(
        &self,
        _: &str,
        _: &str,
        _: &Secret,
        _: &KeyMeta,
        _: u64,
    ) -> Result<u64, openai_key_rotator::rotation::ports::BackendError> {
        std::future::pending().await
    }
    async fn write_key_meta(
        &self,
        path: &str,
        meta: &KeyMeta,
    ) -> Result<(), openai_key_rotator::rotation::ports::BackendError> {
        self.0.write_key_meta(path, meta).await
    }
    async fn read_doc(
        &self,
        path: &str,
    ) -> Result<Option<(u64, serde_json::Value)>, openai_key_rotator::rotation::ports::BackendError>
    {
        self.0.read_doc(path).await
    }
    async fn write_doc(
        &self,
        path: &str,
        doc: &serde_json::Value,
        v: u64,
    ) -> Result<u64, openai_key_rotator::rotation::ports::BackendError> {
        self.0.write_doc(path, doc, v).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<String>, openai_key_rotator::rotation::ports::BackendError> {
        self.0.list(prefix).await
    }
}

#[tokio::test]
async fn a_crash_after_create_before_publish_resumes_to_one_live_key() {
    let a = admin_env(true).await;
    let client = a.env.client(ADMIN);
    let mut crashing = a.rotator(client.clone());
    crashing.store = Arc::new(HangingPublish(a.store.clone()));
    // The process dies during the publish: the task is dropped.
    let died = tokio::time::timeout(Duration::from_secs(2), crashing.rotate_now()).await;
    assert!(died.is_err(), "the publish hung");
    let j = a.journal().await;
    assert_eq!((j.status, j.phase), (AdminStatus::Running, Phase::Verified));
    assert_eq!(
        a.env.sim.admin_keys().iter().filter(|k| k.live).count(),
        2,
        "the new key exists (its value died with the process)"
    );
    // Restart: the admin key comes from Vault (still the old one); resume.
    let restarted = a.env.client(
        admin_key::read_admin_key(&*a.store, ADMIN_PATH)
            .await
            .unwrap()
            .expose(),
    );
    let pass = a.rotator(restarted.clone()).run_once().await.unwrap();
    assert!(matches!(pass, Pass::Failed { .. }), "{pass:?}");
    a.assert_one_live_key_served().await;
    assert_eq!(a.served().await.key.expose(), ADMIN);
}

#[tokio::test]
async fn a_crash_after_publish_before_delete_resumes_to_one_live_key() {
    let a = admin_env(true).await;
    let client = a.env.client(ADMIN);
    let old_id = a.env.sim.admin_keys()[0].id.clone();
    let api = Arc::new(Breaking {
        inner: client.clone(),
        fail_verify: false,
        hang_delete_of: Some(old_id.clone()),
    });
    let died = tokio::time::timeout(Duration::from_secs(2), a.rotator(api).rotate_now()).await;
    assert!(died.is_err(), "the delete hung");
    let j = a.journal().await;
    assert_eq!((j.status, j.phase), (AdminStatus::Running, Phase::Switched));
    assert_eq!(a.env.sim.admin_keys().iter().filter(|k| k.live).count(), 2);
    // Restart: the daemon reads the (new) admin key from Vault and resumes.
    let served = admin_key::read_admin_key(&*a.store, ADMIN_PATH)
        .await
        .unwrap();
    assert_ne!(served.expose(), ADMIN, "Vault serves the new key");
    let restarted = a.env.client(served.expose());
    let pass = a.rotator(restarted.clone()).run_once().await.unwrap();
    assert!(matches!(pass, Pass::Completed { .. }), "{pass:?}");
    a.assert_one_live_key_served().await;
    assert!(!a
        .env
        .sim
        .admin_keys()
        .iter()
        .any(|k| k.id == old_id && k.live));
    assert_eq!(a.journal().await.status, AdminStatus::Completed);
}

// ---------------------------------------------------------------------------------------
// Reconciliation: a real rotation through the engine (real OpenAI client on the simulator;
// Vault and Kubernetes in memory), then the audit log compared with the journals.

use openai_key_rotator::reconcile::{MismatchKind, Reconciler};
use openai_key_rotator::rotation::fakes::{FakeProber, FakeRoller, FakeStore, Log};
use openai_key_rotator::rotation::{Engine, EngineOptions, Ports, RotationControl};

struct Rig {
    env: Env,
    client: Arc<OpenAiClient>,
    engine: Arc<Engine>,
    old: AccountRef,
    old_key: Secret,
    target: openai_key_rotator::config::Target,
}

async fn rig() -> Rig {
    let env = env().await;
    let client = env.client(ADMIN);
    let log = Log::default();
    let store = FakeStore::new(log.clone());
    let (seed, old_key) = env
        .sim
        .create_service_account(&env.project, "chat-initial")
        .unwrap();
    let old = AccountRef {
        id: seed.id,
        key_id: seed.key_id.unwrap(),
    };
    let mut target = env.config().targets[0].clone();
    target.grace_period = DurationStr(Duration::from_millis(5));
    target.rollout_timeout = DurationStr::from_secs(5);
    store.put(
        &target.vault_path,
        &target.vault_field,
        old_key.expose(),
        KeyMeta {
            account: Some(old.clone()),
            rotation_id: Some("seed".into()),
            key_created_at: Some(Utc::now()),
        },
    );
    let ports = Ports::new(
        client.clone(),
        Arc::new(store),
        Arc::new(FakeRoller::new(log)),
        Arc::new(FakeProber::default()),
    );
    let engine = Arc::new(Engine::new(
        ports,
        EngineOptions {
            poll_interval: Duration::from_millis(10),
            ..EngineOptions::default()
        },
    ));
    Rig {
        env,
        client,
        engine,
        old,
        old_key,
        target,
    }
}

impl Rig {
    async fn rotate(&self) -> Journal {
        let req = RotationRequest::new("chat", Trigger::Cli, "test", "reconcile", Utc::now());
        let j = self
            .engine
            .rotate(
                &self.target,
                req,
                None,
                Arc::new(RotationControl::default()),
            )
            .await
            .unwrap();
        assert_eq!(j.status, Status::Completed, "{:?}", j.error);
        j
    }

    fn reconciler(&self, registry: &prometheus::Registry, audit: Option<Audit>) -> Reconciler {
        let mut r = Reconciler::new(
            self.client.clone(),
            self.engine.clone(),
            Duration::from_secs(3600),
            "okr",
        );
        r.metrics = Some(
            openai_key_rotator::reconcile::ReconcileMetrics::register(
                registry,
                &["chat".to_string()],
            )
            .unwrap(),
        );
        r.audit = audit;
        r
    }
}

/// The value of a series in `registry` (0 when absent).
fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for f in registry.gather() {
        if f.name() != name {
            continue;
        }
        for m in f.get_metric() {
            let fits = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if fits {
                // A family is either counters or gauges; the other reads 0.
                return m.get_counter().get_value() + m.get_gauge().get_value();
            }
        }
    }
    0.0
}

#[tokio::test]
async fn reconciliation_finds_what_someone_else_did_and_nothing_after_our_own_rotation() {
    let r = rig().await;
    let j = r.rotate().await;
    let new = j.new_account.clone().unwrap();
    let registry = prometheus::Registry::new();
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let audit = Audit::open(Some(&audit_path), false).unwrap();
    let rec = r.reconciler(&registry, Some(audit));
    let project = r.env.project.clone();
    let mismatches = |kind: MismatchKind| {
        metric(
            &registry,
            "openai_key_rotator_audit_mismatches_total",
            &[("target", "chat"), ("kind", kind.as_str())],
        )
    };

    // Our own rotation (create of the new account, delete of the old, by our admin key):
    // everything matches (the negative control).
    let report = rec
        .reconcile(&project, &["chat".to_string()], Utc::now())
        .await
        .unwrap();
    assert!(report.audit_log_available);
    assert!(report.events_read >= 4, "{report:?}");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);

    // Someone changes our new account's key in the dashboard, and someone makes an account
    // named like ours that no journal names.
    r.env
        .sim
        .inject_audit_event(
            "api_key.updated",
            &new.key_id,
            Some(&project),
            AuditActor::Session {
                user_id: "user-mallory".into(),
                email: "mallory@example.com".into(),
            },
        )
        .unwrap();
    let (stray, stray_key) = r
        .env
        .sim
        .create_service_account(&project, "okr-chat-20990101000000-abcdef")
        .unwrap();
    let report = rec
        .reconcile(&project, &["chat".to_string()], Utc::now())
        .await
        .unwrap();
    let mut kinds: Vec<(MismatchKind, String)> = report
        .mismatches
        .iter()
        .map(|m| (m.kind, m.account_id.clone()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            (MismatchKind::ModifiedByOther, new.id.clone()),
            (MismatchKind::UnknownManagedAccount, stray.id.clone()),
        ]
    );
    assert_eq!(mismatches(MismatchKind::ModifiedByOther), 1.0);
    assert_eq!(mismatches(MismatchKind::UnknownManagedAccount), 1.0);
    assert_eq!(mismatches(MismatchKind::DeletedByOther), 0.0);
    // The next pass sees them again but counts them once.
    rec.reconcile(&project, &["chat".to_string()], Utc::now())
        .await
        .unwrap();
    assert_eq!(mismatches(MismatchKind::ModifiedByOther), 1.0);
    let text = std::fs::read_to_string(&audit_path).unwrap();
    assert_eq!(text.matches("\"audit_mismatch\"").count(), 2, "{text}");
    for value in [r.old_key.expose(), stray_key.expose(), ADMIN] {
        assert!(!text.contains(value), "a key value in the audit trail");
    }
    // The old account we retired is gone: no deleted_still_exists.
    assert!(!r
        .env
        .sim
        .service_accounts(&project)
        .iter()
        .any(|a| a.id == r.old.id));
    assert_eq!(mismatches(MismatchKind::DeletedStillExists), 0.0);
}

#[tokio::test]
async fn audit_logging_off_is_reported_and_the_account_checks_go_on() {
    let r = rig().await;
    r.rotate().await;
    r.env.sim.set_audit_logging(false);
    let registry = prometheus::Registry::new();
    let rec = r.reconciler(&registry, None);
    let project = r.env.project.clone();
    let available = || {
        metric(
            &registry,
            "openai_key_rotator_audit_log_available",
            &[("target", "chat")],
        )
    };
    assert_eq!(available(), 1.0, "pre-created as available");
    let (stray, _) = r
        .env
        .sim
        .create_service_account(&project, "okr-chat-20990101000000-abcdef")
        .unwrap();
    let report = rec
        .reconcile(&project, &["chat".to_string()], Utc::now())
        .await
        .unwrap();
    assert!(!report.audit_log_available);
    assert_eq!(available(), 0.0);
    assert_eq!(report.events_read, 0);
    assert_eq!(
        report
            .mismatches
            .iter()
            .map(|m| (m.kind, m.account_id.clone()))
            .collect::<Vec<_>>(),
        vec![(MismatchKind::UnknownManagedAccount, stray.id)]
    );
    // Back on: available again.
    r.env.sim.set_audit_logging(true);
    assert!(
        rec.reconcile(&project, &["chat".to_string()], Utc::now())
            .await
            .unwrap()
            .audit_log_available
    );
    assert_eq!(available(), 1.0);
    // A failure that is not "logging off" is an error, not "unavailable".
    r.env
        .sim
        .set_faults(Faults::fail_next(100, 500).only("audit_logs.list"));
    let e = rec
        .reconcile(&project, &["chat".to_string()], Utc::now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("server_error"), "{e}");
    r.env.sim.clear_faults();
}

// ---------------------------------------------------------------------------------------
// The governance calls through Prism with the official description (plus the admin-key
// and expiry fields the SDKs added, as the simulator's contract test has them).

#[tokio::test]
async fn governance_calls_satisfy_the_description_through_prism() {
    use crate::openai_client::{tap, violation_lines, Tap};
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
            env.sim.now() - 600,
            2,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = crate::openai_sim::spec_with_key_expiry(dir.path());
    let prism = crate::support::start_prism(&spec, &format!("{}/v1", env.server.url())).await;
    let t = Tap {
        upstream: prism.url.clone(),
        http: reqwest::Client::new(),
        seen: Arc::default(),
        violations: Arc::default(),
    };
    let router = axum::Router::new().fallback(tap).with_state(t.clone());
    let tap_server =
        openai_key_rotator::sandbox::serve(router, loopback(0), CancellationToken::new())
            .await
            .expect("serve tap");
    // Prism serves without /v1: the client's base URL is the tap's root.
    let mut cfg = env.openai_config();
    cfg.base_url = tap_server.url();
    let client = Arc::new(OpenAiClient::new(&cfg, Secret::new(ADMIN), Arc::new(NoCalls)).unwrap());

    // Forensics: usage buckets on every usage endpoint, audit events by resource.
    let forensics = Forensics::new(
        client.clone(),
        Duration::from_secs(24 * 3600),
        Duration::from_secs(30),
    );
    let r = forensics
        .collect(&emergency_journal(&env, &old), env.now())
        .await;
    assert_eq!(r.usage_unavailable, None);
    assert_eq!(r.audit_unavailable, None);
    assert_eq!(r.usage_requests, 2);
    // Reconciliation's query: project and event types.
    client
        .audit_events(&AuditQuery {
            project_ids: vec![env.project.clone()],
            event_types: openai_key_rotator::reconcile::EVENT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            since: Some(env.now() - chrono::Duration::hours(1)),
            max_events: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    // Admin keys: list, create with expiry, verify with the new key, delete.
    let keys = client.list_admin_keys().await.unwrap();
    assert!(!keys.is_empty());
    let new = client
        .create_admin_key("okr-admin-prism", Some(86_400))
        .await
        .unwrap();
    client.verify_admin_key(&new.key).await.unwrap();
    client.delete_admin_key(&new.id).await.unwrap();

    let seen = t.seen.lock().unwrap().clone();
    for want in [
        "GET /organization/usage/completions -> 200",
        "GET /organization/usage/web_search_calls -> 200",
        "GET /organization/audit_logs -> 200",
        "POST /organization/admin_api_keys -> 200",
        "DELETE /organization/admin_api_keys/",
    ] {
        assert!(
            seen.iter().any(|s| s.starts_with(want) || s.contains(want)),
            "{want} not in {seen:#?}"
        );
    }
    assert!(seen.iter().all(|s| s.ends_with("-> 200")), "{seen:#?}");
    let violations = t.violations.lock().unwrap().clone();
    let lines = violation_lines(&prism.guard.output());
    assert!(
        violations.is_empty() && lines.is_empty(),
        "contract violations:\n{}\nPrism log:\n{}",
        violations.join("\n"),
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The daemon's wiring (app::connect_with over the sandbox): the admin key from Vault, and
// forensics in an emergency rotation's journal.

use openai_key_rotator::app;
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};

#[tokio::test]
async fn the_daemon_reads_its_admin_key_from_vault_and_records_forensics() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(SandboxOptions::for_tests(dir.path()))
        .await
        .expect("sandbox");
    assert!(
        sb.wait_ready(Duration::from_secs(30)).await,
        "seeded rollouts"
    );
    let vault = sb.vault.as_ref().expect("the Vault simulator");
    let mut data = serde_json::Map::new();
    data.insert("value".into(), sb.admin_key.expose().into());
    vault.put_raw("ops/openai-admin", data);
    // The file holds a key that does not work: only Vault's can.
    let wrong = dir.path().join("wrong-admin-key");
    std::fs::write(&wrong, "sk-admin-wrong-0123456789abcdef").unwrap();
    let mut config = sb.config.clone();
    config.openai.admin_key_file = Some(wrong);
    for t in &mut config.targets {
        t.grace_period = DurationStr(Duration::from_millis(100));
        t.rollout_timeout = DurationStr::from_secs(30);
    }
    let cancel = CancellationToken::new();
    let connect = |config: Config| {
        let cancel = cancel.clone();
        async move {
            let audit = Audit::open(None, false).unwrap();
            let opts = EngineOptions {
                poll_interval: Duration::from_millis(100),
                ..app::engine_options(&config)
            };
            app::connect_with(&config, audit, &cancel, opts, vec![])
                .await
                .expect("connect")
        }
    };
    // Negative control: without the Vault path the file's (wrong) key is used.
    let from_file = connect(config.clone()).await;
    assert!(from_file.issuer.ping().await.is_err());

    config.openai.admin_key_vault_path = Some("ops/openai-admin".into());
    let services = connect(config.clone()).await;
    services
        .issuer
        .ping()
        .await
        .expect("Vault's admin key works");
    assert_eq!(
        services.issuer.current_admin_key().expose(),
        sb.admin_key.expose()
    );

    // An emergency rotation through the daemon's engine records forensics (wired from
    // [daemon.forensics], on by default); a routine one does not.
    let target = config.targets[0].clone();
    let mut req = RotationRequest::new(&target.name, Trigger::Api, "oncall", "leak", Utc::now());
    req.emergency = true;
    let prior = services.engine.journal(&target.name).await.unwrap();
    let j = services
        .engine
        .rotate(&target, req, prior, Arc::new(RotationControl::default()))
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed, "{:?}", j.error);
    let r = j.forensics.clone().expect("forensics");
    assert_eq!(r.audit_unavailable, None, "{r:?}");
    assert!(
        r.audit_events
            .iter()
            .any(|e| e.event_type == "service_account.deleted"),
        "the revoke is in the audit log: {:?}",
        r.audit_events
    );
    let stored = services
        .engine
        .history(&j.rotation_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.forensics, j.forensics, "kept in the history copy");
    let req = RotationRequest::new(&target.name, Trigger::Cli, "test", "routine", Utc::now());
    let prior = services.engine.journal(&target.name).await.unwrap();
    let j = services
        .engine
        .rotate(&target, req, prior, Arc::new(RotationControl::default()))
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(j.forensics.is_none());
    cancel.cancel();
}

#[tokio::test]
async fn a_replica_that_may_not_write_rotates_nothing() {
    let a = admin_env(true).await;
    let client = a.env.client(ADMIN);
    let mut fenced = a.rotator(client.clone());
    fenced.may_write = Some(Arc::new(|| false));
    let e = fenced.rotate_now().await.unwrap_err();
    assert!(e.to_string().contains("not the leader"), "{e}");
    assert_eq!(a.env.sim.admin_keys().len(), 1, "no admin key was created");
    assert!(
        a.store.read_doc(JOURNAL).await.unwrap().is_none(),
        "nothing journaled"
    );
    assert_eq!(a.served().await.key.expose(), ADMIN);
    // Allowed again (the control): it rotates.
    fenced.may_write = Some(Arc::new(|| true));
    assert!(matches!(
        fenced.rotate_now().await.unwrap(),
        Pass::Completed { .. }
    ));
    a.assert_one_live_key_served().await;
}
