//! The state machine over in-memory fakes: every step outcome, rollback paths, resume from
//! every journal state, and the invariants I1–I4 checked at every step.

use super::engine::*;
use super::fakes::*;
use super::faults::{once, Call, Crash, Fault, Op};
use super::journal::*;
use super::ports::*;
use super::request::RotationRequest;
use crate::config::{
    DrainConfig, DrainTimeout, DurationStr, SmokeProbe, SyncedSecret, Target, WorkloadRef,
};
use crate::secret::Secret;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PROJECT: &str = "proj_test";
const PATH: &str = "apps/chat/openai";
const FIELD: &str = "api_key";

struct World {
    log: Log,
    issuer: FakeIssuer,
    store: FakeStore,
    roller: FakeRoller,
    prober: FakeProber,
    target: Target,
    old: FakeAccount,
    checker: Arc<InvariantChecker>,
}

fn workloads() -> Vec<WorkloadRef> {
    vec![
        "demo/Deployment/api".parse().unwrap(),
        "demo/Deployment/worker".parse().unwrap(),
    ]
}

fn world() -> World {
    let log = Log::default();
    let issuer = FakeIssuer::new(log.clone());
    let store = FakeStore::new(log.clone());
    let roller = FakeRoller::new(log.clone());
    let old = issuer.seed(PROJECT, "chat-initial");
    store.put(
        PATH,
        FIELD,
        old.key.expose(),
        KeyMeta {
            account: Some(AccountRef {
                id: old.id.clone(),
                key_id: old.key_id.clone(),
            }),
            rotation_id: Some("seed".into()),
            key_created_at: Some(old.created_at),
        },
    );
    let target = Target {
        name: "chat".into(),
        project_id: PROJECT.into(),
        vault_path: PATH.into(),
        vault_field: FIELD.into(),
        workloads: workloads(),
        waves: vec![],
        synced_secret: None,
        schedule: None,
        max_key_age: None,
        jitter: DurationStr::default(),
        grace_period: DurationStr(Duration::from_millis(5)),
        drain: None,
        adoption: None,
        unlisted_consumers: Default::default(),
        smoke_probes: vec![],
        rollout_timeout: DurationStr(Duration::from_secs(2)),
        key_expiry: None,
        anomaly: None,
    };
    let checker = Arc::new(InvariantChecker {
        issuer: issuer.clone(),
        store: store.clone(),
        roller: roller.clone(),
        log: log.clone(),
        violations: Mutex::default(),
        keys: Mutex::default(),
    });
    World {
        log,
        issuer,
        store,
        roller,
        prober: FakeProber::default(),
        target,
        old,
        checker,
    }
}

fn opts() -> EngineOptions {
    EngineOptions {
        poll_interval: Duration::from_millis(2),
        drain_poll_interval: Duration::from_millis(20),
        delete_retry: crate::retry::RetryPolicy {
            max_retries: 2,
            base: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..Default::default()
        },
        key_check_retry: crate::retry::RetryPolicy {
            max_retries: 2,
            base: Duration::from_millis(2),
            max_backoff: Duration::from_millis(2),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Where a test "kills the process": right after the create call took effect (its answer
/// never heard), or right after the journal recorded `step` in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashAt {
    AfterMintCall,
    Journaled(Step, StepState),
}

impl CrashAt {
    fn plan(self) -> Arc<dyn super::faults::FaultPlan> {
        match self {
            CrashAt::AfterMintCall => once(|c: &Call| c.op == Op::CreateAccount, Fault::CrashAfter),
            CrashAt::Journaled(step, state) => {
                let (step, state) = (
                    step.as_str(),
                    match state {
                        StepState::Started => "started",
                        StepState::Done => "done",
                    },
                );
                once(
                    move |c: &Call| {
                        c.op == Op::WriteDoc
                            && c.subject.contains("/targets/")
                            && c.journal_state()
                                .is_some_and(|(s, st, _)| s == step && st == state)
                    },
                    Fault::CrashAfter,
                )
            }
        }
    }
}

impl World {
    fn ports(&self) -> Ports {
        Ports::new(
            Arc::new(self.issuer.clone()),
            Arc::new(self.store.clone()),
            Arc::new(self.roller.clone()),
            Arc::new(self.prober.clone()),
        )
    }

    fn engine(&self) -> Engine {
        Engine::new(self.ports(), opts()).with_observer(self.checker.clone())
    }

    fn fakes(&self) -> FakeWorld {
        FakeWorld {
            log: self.log.clone(),
            issuer: self.issuer.clone(),
            store: self.store.clone(),
            roller: self.roller.clone(),
            prober: self.prober.clone(),
        }
    }

    /// An engine whose calls go through `plan`, and its process's fate.
    fn faulty_engine(&self, plan: Arc<dyn super::faults::FaultPlan>) -> (Engine, Crash) {
        let crash = Crash::default();
        let ports = self.fakes().faulty_ports(plan, crash.clone());
        (
            Engine::new(ports, opts()).with_observer(self.checker.clone()),
            crash,
        )
    }

    /// An engine whose process dies at `at`, and its fate.
    fn crashing_engine(&self, at: CrashAt) -> (Engine, Crash) {
        self.faulty_engine(at.plan())
    }

    /// Rotate and crash at `at`; panics unless the crash happened.
    async fn rotate_and_crash(&self, at: CrashAt) {
        let (engine, crash) = self.crashing_engine(at);
        let prior = engine.journal(&self.target.name).await.unwrap();
        let r = crash
            .run(engine.rotate(&self.target, req(), prior, Arc::default()))
            .await;
        assert!(r.is_none(), "{at:?}: expected a crash, got {r:?}");
    }

    async fn rotate(&self, req: RotationRequest) -> Result<Journal, EngineError> {
        let engine = self.engine();
        let prior = engine.journal(&self.target.name).await?;
        engine
            .rotate(&self.target, req, prior, Arc::default())
            .await
    }

    /// What a restarted daemon does: read the journal and resume it.
    async fn resume(&self) -> Result<Journal, EngineError> {
        let engine = self.engine();
        let stored = engine
            .journal(&self.target.name)
            .await?
            .expect("a journal to resume");
        engine
            .resume(Some(&self.target), stored, Arc::default())
            .await
    }

    fn current_key(&self) -> Secret {
        self.store.current(PATH, FIELD).unwrap().1
    }

    fn managed_accounts(&self) -> usize {
        self.issuer.account_ids().len()
    }

    fn assert_clean(&self) {
        let v = self.checker.violations.lock().unwrap();
        assert!(v.is_empty(), "invariant violations: {v:#?}");
        assert!(self.issuer.is_live(&self.current_key()), "I1 at the end");
        self.assert_journal_has_no_keys();
    }

    /// I4: the journal documents hold ids and hashes, never a key value.
    fn assert_journal_has_no_keys(&self) {
        let docs = {
            let s = self.store.state.lock().unwrap();
            s.versions
                .iter()
                .filter(|(p, _)| p.starts_with("openai-key-rotator/state"))
                .map(|(_, v)| format!("{v:?}"))
                .collect::<String>()
        };
        assert!(!docs.is_empty(), "journal written");
        let mut keys: Vec<String> = self.checker.keys.lock().unwrap().iter().cloned().collect();
        keys.push(self.old.key.expose().to_string());
        for k in keys {
            assert!(!docs.contains(&k), "a key value is in the journal");
        }
    }
}

fn req() -> RotationRequest {
    RotationRequest::new(
        "chat",
        Trigger::Cli,
        "test",
        "unit test",
        chrono::Utc::now(),
    )
}

/// Checks I1 (Vault's current key is live) at every step boundary, I2 (the old account
/// dies only after every workload verified the new rollout) and I5 (no deleted account's
/// key is served by Vault at any path, or held by a synced Secret) at every deletion.
struct InvariantChecker {
    issuer: FakeIssuer,
    store: FakeStore,
    roller: FakeRoller,
    log: Log,
    violations: Mutex<Vec<String>>,
    /// Every key value seen in Vault (for the leak scan).
    keys: Mutex<std::collections::BTreeSet<String>>,
}

impl Observer for InvariantChecker {
    fn on_event(&self, j: &Journal, ev: &RotationEvent) {
        if let Some((_, key)) = self.store.current(PATH, FIELD) {
            self.keys.lock().unwrap().insert(key.expose().to_string());
            if !self.issuer.is_live(&key) && !j.revoke_first {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("I1: Vault serves a dead key at {ev:?}"));
            }
        }
        if let RotationEvent::AccountDeleted { account_id, why } = ev {
            if *why != "revoke_first" {
                if let Some(key) = self.issuer.deleted_key(account_id) {
                    let paths = self.store.paths_serving(&key);
                    if !paths.is_empty() {
                        self.violations.lock().unwrap().push(format!(
                            "I5: {account_id} deleted ({why}) while Vault serves its key at {paths:?}"
                        ));
                    }
                    if self.roller.secret_holds(&key.sha256_hex()) {
                        self.violations.lock().unwrap().push(format!(
                            "I5: {account_id} deleted ({why}) while a synced Secret holds its key"
                        ));
                    }
                }
            }
            let is_old = j.old_account.as_ref().map(|a| &a.id) == Some(account_id);
            if is_old && *why != "revoke_first" {
                let of_target = j.spec.as_ref().map(|t| t.workloads.clone());
                for w in of_target.unwrap_or_else(workloads) {
                    let done = format!("complete {w} {}", j.rotation_id);
                    if self.log.position(&done).is_none() {
                        self.violations.lock().unwrap().push(format!(
                            "I2: old account {account_id} deleted before {w} verified"
                        ));
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn happy_path_completes_in_order_and_retires_the_old_account() {
    let w = world();
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert!(j.error.is_none());
    let new = j.new_account.clone().unwrap();
    assert!(j.new_account_name.starts_with("okr-chat-"));
    assert!(j.old_retired);
    assert_eq!(w.issuer.account_ids(), [new.id.clone()].into());
    assert_eq!(
        w.current_key().sha256_hex(),
        j.new_key_sha256.clone().unwrap()
    );

    // Order: create < publish < roll both < both complete < delete old.
    let log = w.log.entries();
    let pos = |p: &str| {
        log.iter()
            .position(|e| e.starts_with(p))
            .unwrap_or_else(|| panic!("{p} missing in {log:#?}"))
    };
    let id = &j.rotation_id;
    assert!(pos("create") < pos("publish"));
    assert!(pos("publish") < pos(&format!("roll demo/Deployment/api {id}")));
    assert!(
        pos(&format!("complete demo/Deployment/worker {id}"))
            < pos(&format!("delete {}", w.old.id))
    );
    assert!(
        pos(&format!("complete demo/Deployment/api {id}")) < pos(&format!("delete {}", w.old.id))
    );

    let steps: Vec<_> = j
        .steps
        .iter()
        .map(|s| (s.step, s.outcome.clone().unwrap()))
        .collect();
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![
            Step::Mint,
            Step::Publish,
            Step::Sync,
            Step::Roll,
            Step::Verify,
            Step::Drain,
            Step::Retire
        ]
    );
    assert!(steps[2].1.starts_with("skipped"));
    // Vault metadata names the new account.
    let meta = w.store.state.lock().unwrap().meta[PATH].clone();
    assert_eq!(meta.account, Some(new));
    assert_eq!(meta.rotation_id.as_deref(), Some(id.as_str()));
    // History is kept under the rotation id; events went to both workloads.
    let engine = w.engine();
    assert_eq!(
        engine.history(id).await.unwrap().unwrap().status,
        Status::Completed
    );
    let events = w.roller.state.lock().unwrap().events.clone();
    assert_eq!(
        events.iter().filter(|e| e.1 == "RotationCompleted").count(),
        2
    );
    w.assert_clean();

    // A second rotation starts from the first one's key.
    let j2 = w.rotate(req()).await.unwrap();
    assert_eq!(j2.status, Status::Completed);
    assert_eq!(j2.old_account, j.new_account);
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}

#[tokio::test]
async fn never_ready_rollout_rolls_back_and_the_old_key_stays_current_and_live() {
    let mut w = world();
    w.target.rollout_timeout = DurationStr(Duration::from_millis(100));
    w.roller
        .set_behaviour(&workloads()[1], Behaviour::NeverReady);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error
            .as_deref()
            .unwrap()
            .contains("not rolled out in time"),
        "{j:?}"
    );
    // The old key is current again (as a new version) and live.
    assert_eq!(w.current_key(), w.old.key);
    assert!(w.issuer.is_live(&w.old.key));
    assert_eq!(j.rollback_vault_version, Some(3));
    // No ready pod carries the new key, so its account is gone.
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    assert!(j.pending_deletions.is_empty());
    // Both workloads were rolled again.
    assert_eq!(
        w.roller.workload(&workloads()[0]).annotation.unwrap(),
        format!("{}-rollback", j.rotation_id)
    );
    // Vault metadata points at the old account again.
    let meta = w.store.state.lock().unwrap().meta[PATH].clone();
    assert_eq!(meta.account.unwrap().id, w.old.id);
    w.assert_clean();
}

#[tokio::test]
async fn progress_deadline_exceeded_rolls_back_without_waiting_out_the_timeout() {
    let mut w = world();
    w.target.rollout_timeout = DurationStr(Duration::from_secs(3600));
    w.roller
        .set_behaviour(&workloads()[0], Behaviour::DeadlineExceeded);
    let j = tokio::time::timeout(Duration::from_secs(10), w.rotate(req()))
        .await
        .expect("no hour-long wait")
        .unwrap();
    assert_eq!(j.status, Status::RolledBack);
    assert!(j.error.unwrap().contains("progress deadline"));
    assert_eq!(w.current_key(), w.old.key);
    w.assert_clean();
}

#[tokio::test]
async fn a_refused_patch_rolls_back() {
    let w = world();
    w.roller
        .set_behaviour(&workloads()[1], Behaviour::RejectPatch);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack);
    assert!(j.error.unwrap().contains("patch refused"));
    assert_eq!(w.current_key(), w.old.key);
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}

#[tokio::test]
async fn a_new_key_that_does_not_answer_rolls_back() {
    let w = world();
    w.issuer.state.lock().unwrap().reject_minted_keys = true;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack);
    assert!(j.error.unwrap().contains("GET /v1/models"));
    assert_eq!(w.current_key(), w.old.key);
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    w.assert_clean();
}

fn probe(url: &str) -> SmokeProbe {
    SmokeProbe {
        url: url.into(),
        expect_status: 200,
        consecutive_successes: 3,
        interval: DurationStr(Duration::from_millis(5)),
        timeout: DurationStr(Duration::from_secs(1)),
        wave: None,
    }
}

#[tokio::test]
async fn smoke_probes_gate_the_rotation() {
    let good = "http://chat.demo.svc/healthz";
    let mut w = world();
    // A streak of 3 is needed: one failure in between restarts it.
    w.prober.answer(good, &[200, 503, 200, 200, 200]);
    w.target.smoke_probes = vec![probe(good)];
    assert_eq!(w.rotate(req()).await.unwrap().status, Status::Completed);
    w.assert_clean();

    // Negative control: a failing probe rolls back.
    let bad = "http://user:pw@chat.demo.svc/broken";
    let mut w = world();
    w.prober.answer(good, &[200]);
    w.prober.answer(bad, &[503]);
    w.target.rollout_timeout = DurationStr(Duration::from_millis(200));
    w.target.smoke_probes = vec![probe(good), probe(bad)];
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack);
    let e = j.error.unwrap();
    assert!(e.contains("smoke probe") && e.contains("HTTP 503"), "{e}");
    assert!(
        !e.contains("user:pw"),
        "the probe URL's credentials are in the error: {e}"
    );
    assert_eq!(w.current_key(), w.old.key);
    w.assert_clean();
}

/// A target staged in three waves of one workload each: a, b, c.
fn staged(w: &mut World) -> Vec<WorkloadRef> {
    let ws: Vec<WorkloadRef> = [
        "demo/Deployment/a",
        "demo/Deployment/b",
        "demo/Deployment/c",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    w.target.waves = ws.iter().map(|x| vec![x.clone()]).collect();
    w.target.workloads = ws.clone();
    ws
}

/// Waves: each is rolled only after the one before completed its rollout and its probes.
#[tokio::test]
async fn waves_roll_in_order_each_verified_before_the_next() {
    let mut w = world();
    let ws = staged(&mut w);
    let p1 = "http://a.demo.svc/healthz";
    w.prober.answer(p1, &[200]);
    w.target.smoke_probes = vec![SmokeProbe {
        wave: Some(1),
        ..probe(p1)
    }];
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    let at = |e: &str| {
        w.log
            .position(e)
            .unwrap_or_else(|| panic!("no {e:?} in the log"))
    };
    let id = &j.rotation_id;
    assert!(at(&format!("complete {} {id}", ws[0])) < at(&format!("roll {} {id}", ws[1])));
    assert!(at(&format!("complete {} {id}", ws[1])) < at(&format!("roll {} {id}", ws[2])));
    assert_eq!(j.waves.len(), 3);
    assert!(
        j.waves
            .iter()
            .all(|p| p.rolled_at.is_some() && p.verified_at.is_some()),
        "{j:#?}"
    );
    w.assert_clean();
}

/// A failure in wave 2 rolls back waves 1 and 2 and leaves wave 3 untouched. The negative
/// control: the same failure without waves rolls (and rolls back) every workload.
#[tokio::test]
async fn a_failing_wave_rolls_back_what_moved_and_leaves_later_waves_untouched() {
    let mut w = world();
    let ws = staged(&mut w);
    w.roller.set_behaviour(&ws[1], Behaviour::DeadlineExceeded);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error.as_deref().unwrap_or("").starts_with("wave 2:"),
        "{j:#?}"
    );
    assert_eq!(
        w.roller.workload(&ws[0]).rolls,
        2,
        "wave 1: rolled and rolled back"
    );
    assert_eq!(
        w.roller.workload(&ws[1]).rolls,
        2,
        "wave 2: rolled and rolled back"
    );
    assert_eq!(w.roller.workload(&ws[2]).rolls, 0, "wave 3 never moved");
    assert_eq!(w.current_key(), w.old.key);
    w.assert_clean();

    // A failing wave-1 probe stops before wave 2.
    let mut w = world();
    let ws = staged(&mut w);
    let p1 = "http://a.demo.svc/broken";
    w.prober.answer(p1, &[503]);
    w.target.rollout_timeout = DurationStr(Duration::from_millis(200));
    w.target.smoke_probes = vec![SmokeProbe {
        wave: Some(1),
        ..probe(p1)
    }];
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error
            .as_deref()
            .unwrap_or("")
            .starts_with("wave 1: smoke probe"),
        "{j:#?}"
    );
    assert_eq!(w.roller.workload(&ws[1]).rolls, 0);
    assert_eq!(w.roller.workload(&ws[2]).rolls, 0);
    w.assert_clean();

    // Negative control: one list of the same workloads.
    let mut w = world();
    let ws = staged(&mut w);
    w.target.waves.clear();
    w.roller.set_behaviour(&ws[1], Behaviour::DeadlineExceeded);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack);
    assert!(
        w.roller.workload(&ws[2]).rolls > 0,
        "without waves every workload moves"
    );
}

/// A crash right after wave 2's patch: the resumed rotation goes on from there, rolls no
/// wave twice, and completes.
#[tokio::test]
async fn a_crash_between_waves_resumes_without_rolling_a_wave_twice() {
    let mut w = world();
    let ws = staged(&mut w);
    let b = ws[1].to_string();
    let (engine, crash) = w.faulty_engine(once(
        move |c: &Call| c.op == Op::Roll && c.subject.contains(&b),
        Fault::CrashAfter,
    ));
    let r = crash
        .run(engine.rotate(&w.target, req(), None, Arc::default()))
        .await;
    assert!(r.is_none(), "crashed");
    let j = w.resume().await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    for x in &ws {
        assert_eq!(w.roller.workload(x).rolls, 1, "{x} rolled once");
    }
    assert!(!w.issuer.account_ids().contains(&w.old.id));
    w.assert_clean();
}

/// An unlisted consumer of the key: a Deployment whose pods the Vault Agent injects the
/// key into, not in the target; and the target's own workload, which must not count.
fn with_unlisted_consumer(w: &World) -> WorkloadRef {
    let other: WorkloadRef = "batch/Deployment/reports".parse().unwrap();
    w.roller.state.lock().unwrap().consumers = vec![
        Consumer {
            kind: "Deployment".into(),
            namespace: "batch".into(),
            name: "reports".into(),
            via: "vault.hashicorp.com/agent-inject-secret-openai".into(),
            workload: Some(other.clone()),
        },
        Consumer {
            kind: "Deployment".into(),
            namespace: "demo".into(),
            name: "api".into(),
            via: "vault.hashicorp.com/agent-inject-secret-openai".into(),
            workload: Some(workloads()[0].clone()),
        },
        Consumer {
            kind: "ExternalSecret".into(),
            namespace: "batch".into(),
            name: "reports-openai".into(),
            via: "spec.data[0].remoteRef.key".into(),
            workload: None,
        },
    ];
    other
}

/// `warn` (the default): reported to the observers, and the rotation goes on.
#[tokio::test]
async fn unlisted_consumers_are_reported_and_the_rotation_goes_on() {
    let w = world();
    let other = with_unlisted_consumer(&w);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert_eq!(
        w.roller.workload(&other).rolls,
        0,
        "warn rolls nothing extra"
    );
    let plan = w.engine().plan(&w.target).await.unwrap().join("\n");
    assert!(
        plan.contains("consumers: 1 unlisted consumer(s) read the key (unlisted_consumers = \"warn\"): Deployment batch/reports"),
        "{plan}"
    );
    w.assert_clean();
}

/// `refuse`: nothing is minted. Negative control: with none found the same target rotates.
#[tokio::test]
async fn refuse_stops_before_minting_when_an_unlisted_consumer_reads_the_key() {
    let mut w = world();
    w.target.unlisted_consumers = crate::config::UnlistedConsumers::Refuse;
    with_unlisted_consumer(&w);
    let before = w.issuer.account_ids();
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    let e = j.error.clone().unwrap_or_default();
    assert!(
        e.contains("Deployment batch/reports") && e.contains("nothing was minted"),
        "{e}"
    );
    assert!(
        !e.contains("demo/api"),
        "a listed workload is not unlisted: {e}"
    );
    assert_eq!(w.issuer.account_ids(), before, "nothing minted");
    assert_eq!(w.current_key(), w.old.key);

    w.roller.state.lock().unwrap().consumers.clear();
    assert_eq!(w.rotate(req()).await.unwrap().status, Status::Completed);
}

/// `include`: the found workload is rolled and verified with the target's.
#[tokio::test]
async fn include_rolls_the_unlisted_consumer_too() {
    let mut w = world();
    w.target.unlisted_consumers = crate::config::UnlistedConsumers::Include;
    let other = with_unlisted_consumer(&w);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(w.roller.workload(&other).rolls, 1);
    assert!(
        w.log
            .position(&format!("complete {other} {}", j.rotation_id))
            .is_some(),
        "verified before retire"
    );
    assert!(
        j.spec.unwrap().workloads.contains(&other),
        "the journal's target includes it"
    );
    w.assert_clean();
}

#[tokio::test]
async fn cas_conflict_fails_cleanly_and_loses_nothing() {
    let w = world();
    let store = w.store.clone();
    w.issuer.state.lock().unwrap().on_create = Some(Box::new(move || {
        store.put(PATH, FIELD, "someone-elses-value", KeyMeta::default());
    }));
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed);
    let e = j.error.unwrap();
    assert!(e.contains("check-and-set"), "{e}");
    // The other writer's value stands; our new account is gone; the old one lives.
    assert_eq!(w.current_key().expose(), "someone-elses-value");
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    assert!(!w.log.entries().iter().any(|e| e.starts_with("roll")));
}

#[tokio::test]
async fn a_failed_mint_changes_nothing_and_a_lost_create_answer_leaves_no_orphan() {
    let w = world();
    w.issuer.state.lock().unwrap().fail_creates = 1;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed);
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    assert_eq!(w.current_key(), w.old.key);

    w.issuer.state.lock().unwrap().lose_next_create_response = true;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed);
    assert_eq!(
        w.issuer.account_ids(),
        [w.old.id.clone()].into(),
        "found by name and deleted"
    );
    // And the target is free for the next rotation.
    assert_eq!(w.rotate(req()).await.unwrap().status, Status::Completed);
    w.assert_clean();
}

#[tokio::test]
async fn a_paused_workload_is_refused_before_anything_is_minted() {
    let w = world();
    let paused = workloads()[1].clone();
    w.roller.set_paused(&paused, true);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    let err = j.error.clone().unwrap();
    assert!(
        err.contains("demo/Deployment/worker") && err.contains("is paused"),
        "{err}"
    );
    // Nothing minted, published or rolled; the old key is untouched.
    assert!(j.new_account.is_none() && j.steps.is_empty(), "{j:#?}");
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    assert!(w.issuer.state.lock().unwrap().minted.is_empty());
    assert_eq!(w.current_key(), w.old.key);
    let log = w.log.entries();
    assert!(
        !log.iter()
            .any(|e| e.starts_with("create") || e.starts_with("roll")),
        "{log:#?}"
    );
    // Resumed, the same target rotates.
    w.roller.set_paused(&paused, false);
    assert_eq!(w.rotate(req()).await.unwrap().status, Status::Completed);
    w.assert_clean();
}

#[tokio::test]
async fn retire_failure_completes_with_pending_deletion_retried_later() {
    let w = world();
    w.issuer.state.lock().unwrap().fail_deletes = 3;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert_eq!(j.pending_deletions.len(), 1);
    assert_eq!(j.pending_deletions[0].account.id, w.old.id);
    assert!(!j.old_retired);
    assert!(w.issuer.account_ids().contains(&w.old.id));
    // The retry (resume on a finished rotation) deletes it.
    let j = w.resume().await.unwrap();
    assert!(j.pending_deletions.is_empty());
    assert!(j.old_retired);
    assert!(!w.issuer.account_ids().contains(&w.old.id));
    w.assert_clean();
}

#[tokio::test]
async fn emergency_skips_grace_and_drain() {
    let mut w = world();
    w.target.grace_period = DurationStr(Duration::from_secs(3600));
    w.target.drain = Some(DrainConfig {
        quiet_for: DurationStr(Duration::from_secs(3600)),
        max_wait: DurationStr(Duration::from_secs(7200)),
        on_timeout: DrainTimeout::Keep,
    });
    let mut r = req();
    r.emergency = true;
    let j = tokio::time::timeout(Duration::from_secs(10), w.rotate(r))
        .await
        .expect("no grace wait")
        .unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(j.emergency);
    let drain = j.steps.iter().find(|s| s.step == Step::Drain).unwrap();
    assert_eq!(drain.outcome.as_deref(), Some("skipped (emergency)"));
    w.assert_clean();
}

#[tokio::test]
async fn an_emergency_upgrade_cuts_a_running_grace_period_short() {
    let mut w = world();
    w.target.grace_period = DurationStr(Duration::from_secs(3600));
    let control = Arc::new(RotationControl::default());
    let engine = w.engine();
    let c2 = control.clone();
    let upgrade = async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.upgrade_to_emergency(false);
    };
    let (j, ()) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(engine.rotate(&w.target, req(), None, control), upgrade),
    )
    .await
    .expect("upgrade must end the grace period");
    let j = j.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(j.emergency);
    w.assert_clean();
}

#[tokio::test]
async fn revoke_first_deletes_the_old_account_before_rolling() {
    let w = world();
    let mut r = req();
    r.emergency = true;
    r.revoke_first = true;
    let j = w.rotate(r).await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(j.revoke_first);
    let delete = w.log.position(&format!("delete {}", w.old.id)).unwrap();
    let roll = w.log.position("roll").unwrap();
    assert!(delete < roll, "{:#?}", w.log.entries());
    assert!(w.issuer.is_live(&w.current_key()));

    // With revoke_first there is no way back: a failed rollout is Failed, new key kept.
    let w = world();
    w.roller
        .set_behaviour(&workloads()[0], Behaviour::DeadlineExceeded);
    let mut r = req();
    r.emergency = true;
    r.revoke_first = true;
    let j = w.rotate(r).await.unwrap();
    assert_eq!(j.status, Status::Failed);
    assert!(j.error.unwrap().contains("revoke_first"));
    assert!(
        w.issuer.is_live(&w.current_key()),
        "I1 holds: Vault serves the new key"
    );
    let events = w.roller.state.lock().unwrap().events.clone();
    assert_eq!(
        events.iter().filter(|e| e.1 == "RotationFailed").count(),
        2,
        "{events:?}"
    );
}

#[tokio::test]
async fn a_lagging_synced_secret_is_waited_for() {
    let mut w = world();
    w.target.synced_secret = Some(SyncedSecret {
        namespace: "demo".into(),
        name: "chat-openai".into(),
        key: "api_key".into(),
        force_sync_annotation: Some("force-sync".into()),
        timeout: DurationStr(Duration::from_secs(5)),
    });
    // The "operator" syncs 150 ms after Vault holds the new key.
    let (store, roller) = (w.store.clone(), w.roller.clone());
    let old = w.old.key.clone();
    let syncer = tokio::spawn(async move {
        loop {
            if let Some((_, k)) = store.current(PATH, FIELD) {
                if k != old {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    roller.set_secret_hash("demo", "chat-openai", "api_key", &k.sha256_hex());
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let j = w.rotate(req()).await.unwrap();
    syncer.await.unwrap();
    assert_eq!(j.status, Status::Completed);
    let sync = j.steps.iter().find(|s| s.step == Step::Sync).unwrap();
    let waited = sync.finished_at.unwrap() - sync.started_at;
    assert!(waited >= chrono::Duration::milliseconds(140), "{waited}");
    // Rolling waited for the sync.
    assert_eq!(w.roller.state.lock().unwrap().nudges.len(), 1);
    w.assert_clean();

    // Negative control: a Secret that never syncs rolls back before any roll.
    let mut w = world();
    w.target.synced_secret = Some(SyncedSecret {
        namespace: "demo".into(),
        name: "chat-openai".into(),
        key: "api_key".into(),
        force_sync_annotation: None,
        timeout: DurationStr(Duration::from_millis(50)),
    });
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack);
    assert!(j.error.unwrap().contains("did not receive the new key"));
    assert!(
        !w.log.entries().iter().any(|e| e.starts_with("roll")),
        "no roll before sync"
    );
    assert_eq!(w.current_key(), w.old.key);
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}

#[tokio::test]
async fn drain_waits_until_the_old_key_is_quiet() {
    let mut w = world();
    w.target.drain = Some(DrainConfig {
        quiet_for: DurationStr(Duration::from_millis(200)),
        max_wait: DurationStr(Duration::from_secs(10)),
        on_timeout: DrainTimeout::Keep,
    });
    // A straggler uses the old key for 300 ms more.
    let issuer = w.issuer.clone();
    let key_id = w.old.key_id.clone();
    let straggler = tokio::spawn(async move {
        let end = tokio::time::Instant::now() + Duration::from_millis(300);
        while tokio::time::Instant::now() < end {
            issuer.record_use(&key_id, chrono::Utc::now());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let start = std::time::Instant::now();
    let j = w.rotate(req()).await.unwrap();
    straggler.await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
    let drain = j.steps.iter().find(|s| s.step == Step::Drain).unwrap();
    assert!(
        drain.outcome.as_deref().unwrap().contains("quiet"),
        "{drain:?}"
    );
    // The old key was last used at most quiet_for before the delete... i.e. not after it.
    let last = w.issuer.state.lock().unwrap().usage[&w.old.key_id]
        .iter()
        .max()
        .copied()
        .unwrap();
    let retire = j.steps.iter().find(|s| s.step == Step::Retire).unwrap();
    assert!(retire.started_at - last >= chrono::Duration::milliseconds(200));
    w.assert_clean();
}

/// Workloads that use whatever key was minted: every minted account's key is used
/// every 10 ms (the Usage API then counts it), until `stop`.
fn users_of_minted_keys(w: &World, stop: tokio_util::sync::CancellationToken) {
    let issuer = w.issuer.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let keys: Vec<String> = {
                let s = issuer.state.lock().unwrap();
                s.minted
                    .iter()
                    .filter_map(|id| s.accounts.get(id).map(|a| a.key_id.clone()))
                    .collect()
            };
            for k in keys {
                issuer.record_use(&k, chrono::Utc::now());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

fn adoption(min_requests: u64, timeout_ms: u64) -> Option<crate::config::AdoptionConfig> {
    Some(crate::config::AdoptionConfig {
        min_requests,
        timeout: DurationStr(Duration::from_millis(timeout_ms)),
    })
}

/// New-key adoption: the drain starts only once the Usage API shows the new key in use.
#[tokio::test]
async fn adoption_waits_for_the_new_key_to_be_used() {
    let mut w = world();
    w.target.adoption = adoption(5, 5_000);
    let stop = tokio_util::sync::CancellationToken::new();
    users_of_minted_keys(&w, stop.clone());
    let j = w.rotate(req()).await.unwrap();
    stop.cancel();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert!(j.new_key_adopted.is_some_and(|n| n >= 5), "{j:#?}");
    let drain = j.steps.iter().find(|s| s.step == Step::Drain).unwrap();
    assert!(
        drain
            .outcome
            .as_deref()
            .unwrap()
            .starts_with("new key adopted"),
        "{drain:?}"
    );
    assert!(!w.issuer.account_ids().contains(&w.old.id));
    w.assert_clean();
}

/// Workloads that never use the new key (they read it from somewhere else): the rotation
/// rolls back instead of retiring the key they still use. The negative control: without
/// `adoption` the same rotation completes and the old key dies under them.
#[tokio::test]
async fn a_new_key_nobody_uses_is_rolled_back_not_retired() {
    let mut w = world();
    w.target.adoption = adoption(1, 300);
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    let why = j.error.clone().unwrap_or_default();
    assert!(why.contains("do not use it"), "{why}");
    assert_eq!(j.new_key_adopted, None);
    assert_eq!(w.current_key(), w.old.key, "Vault serves the old key again");
    assert!(w.issuer.account_ids().contains(&w.old.id));
    w.assert_clean();

    let mut w = world();
    w.target.adoption = None;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(!w.issuer.account_ids().contains(&w.old.id));
}

/// An emergency does not wait for adoption: the old key is the danger.
#[tokio::test]
async fn an_emergency_does_not_wait_for_adoption() {
    let mut w = world();
    w.target.adoption = adoption(1, 60_000);
    let j = tokio::time::timeout(Duration::from_secs(10), w.rotate(req().emergency(false)))
        .await
        .expect("no adoption wait")
        .unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert!(!w.issuer.account_ids().contains(&w.old.id));
}

#[tokio::test]
async fn drain_timeout_with_keep_leaves_the_old_account_pending() {
    let mut w = world();
    w.target.drain = Some(DrainConfig {
        quiet_for: DurationStr(Duration::from_millis(100)),
        max_wait: DurationStr(Duration::from_millis(150)),
        on_timeout: DrainTimeout::Keep,
    });
    let issuer = w.issuer.clone();
    let key_id = w.old.key_id.clone();
    let busy = tokio::spawn(async move {
        for _ in 0..100 {
            issuer.record_use(&key_id, chrono::Utc::now());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed);
    assert!(!j.old_retired);
    assert_eq!(j.pending_deletions[0].account.id, w.old.id);
    assert!(w.issuer.account_ids().contains(&w.old.id));
    // The retry keeps it while the key is in use...
    let j = w.resume().await.unwrap();
    assert_eq!(j.pending_deletions.len(), 1, "still in use: kept");
    assert!(w.issuer.account_ids().contains(&w.old.id));
    // ...and deletes it once it has been quiet for quiet_for.
    busy.abort();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let j = w.resume().await.unwrap();
    assert!(j.pending_deletions.is_empty(), "{j:#?}");
    assert!(j.old_retired);
    assert!(!w.issuer.account_ids().contains(&w.old.id));
    w.assert_clean();
}

#[tokio::test]
async fn a_running_rotation_makes_the_target_busy() {
    let w = world();
    w.rotate_and_crash(CrashAt::Journaled(Step::Roll, StepState::Started))
        .await;
    match w.rotate(req()).await {
        Err(EngineError::Busy { rotation_id, .. }) => assert!(is_rotation_id(&rotation_id)),
        other => panic!("{other:?}"),
    }
}

fn all_crash_points() -> Vec<CrashAt> {
    let mut v = vec![CrashAt::AfterMintCall];
    for step in [
        Step::Mint,
        Step::Publish,
        Step::Sync,
        Step::Roll,
        Step::Verify,
        Step::Drain,
        Step::Retire,
    ] {
        v.push(CrashAt::Journaled(step, StepState::Started));
        v.push(CrashAt::Journaled(step, StepState::Done));
    }
    v
}

#[tokio::test]
async fn resume_from_every_journal_state_completes_without_orphans() {
    for point in all_crash_points() {
        let w = world();
        w.rotate_and_crash(point).await;
        assert!(
            w.issuer.is_live(&w.current_key()),
            "{point:?}: I1 after the crash"
        );

        let j = w
            .resume()
            .await
            .unwrap_or_else(|e| panic!("{point:?}: {e}"));
        assert_eq!(j.status, Status::Completed, "{point:?}: {j:#?}");
        // Exactly one account remains: the one whose key Vault serves (I3: no orphan).
        let ids = w.issuer.account_ids();
        assert_eq!(ids.len(), 1, "{point:?}: {ids:?}");
        let meta = w.store.state.lock().unwrap().meta[PATH].clone();
        assert!(ids.contains(&meta.account.unwrap().id), "{point:?}");
        assert!(!ids.contains(&w.old.id), "{point:?}: old retired");
        w.assert_clean();
        // Resuming again is a no-op.
        let again = w.resume().await.unwrap();
        assert_eq!(again.rotation_id, j.rotation_id);
        assert_eq!(w.issuer.account_ids(), ids);
    }
}

#[tokio::test]
async fn resume_during_rollback_finishes_the_rollback() {
    for point in [
        CrashAt::Journaled(Step::Rollback, StepState::Started),
        CrashAt::Journaled(Step::Verify, StepState::Started),
    ] {
        let mut w = world();
        w.target.rollout_timeout = DurationStr(Duration::from_millis(50));
        w.roller
            .set_behaviour(&workloads()[0], Behaviour::DeadlineExceeded);
        w.rotate_and_crash(point).await;
        let j = w.resume().await.unwrap();
        assert_eq!(j.status, Status::RolledBack, "{point:?}: {j:#?}");
        assert_eq!(w.current_key(), w.old.key, "{point:?}");
        assert_eq!(
            w.issuer.account_ids(),
            [w.old.id.clone()].into(),
            "{point:?}"
        );
        w.assert_clean();
    }
}

#[tokio::test]
async fn vault_failures_at_publish_fail_cleanly_or_interrupt_for_resume() {
    // The write fails but Vault answers the read-back: nothing was written, so the
    // rotation fails cleanly and its new account is deleted.
    let w = world();
    w.store.state.lock().unwrap().fail_key_writes = 1;
    let j = w.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    assert_eq!(w.issuer.account_ids(), [w.old.id.clone()].into());
    assert_eq!(w.current_key(), w.old.key);

    // Vault goes down right after the create call: the journal cannot record the new
    // account, so the engine stops; resume finds the account by its name, deletes it (its
    // key was never stored anywhere) and mints again.
    let store = w.store.clone();
    w.issuer.state.lock().unwrap().on_create = Some(Box::new(move || {
        store.state.lock().unwrap().down = true;
    }));
    let e = w.rotate(req()).await.unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::Interrupted {
                step: Step::Mint,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("vault"), "{e}");
    w.store.state.lock().unwrap().down = false;
    let j = w.resume().await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}

/// A real orphan of ours: a create whose answer was lost and whose by-name clean-up failed
/// leaves an account that only the (failed) rotation's journal names.
async fn lost_mint_orphan(w: &World) -> AccountInfo {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (lost, listed) = (AtomicBool::new(false), AtomicBool::new(false));
    let (engine, _crash) =
        w.faulty_engine(Arc::new(super::faults::PlanFn(move |c: &Call| {
            match c.op {
                Op::CreateAccount if !lost.swap(true, Ordering::SeqCst) => Some(Fault::LostAnswer),
                Op::ListAccounts if !listed.swap(true, Ordering::SeqCst) => Some(Fault::Transient),
                _ => None,
            }
        })));
    let prior = engine.journal(&w.target.name).await.unwrap();
    let failed = engine
        .rotate(&w.target, req(), prior, Arc::default())
        .await
        .unwrap();
    assert_eq!(failed.status, Status::Failed, "{failed:#?}");
    w.issuer
        .list_service_accounts(PROJECT)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == failed.new_account_name)
        .expect("the lost create left an account")
}

#[tokio::test]
async fn sweep_deletes_only_proven_orphans_older_than_the_margin() {
    let w = world();
    let j = w.rotate(req()).await.unwrap();
    let current = j.new_account.unwrap().id;
    let orphan = lost_mint_orphan(&w).await;
    // Names that parse as ours but that no journal names prove nothing.
    let look_alike = w.issuer.seed(
        PROJECT,
        &account_name("okr", "chat", "20260101000000-abcdef"),
    );
    let other_target = w.issuer.seed(
        PROJECT,
        &account_name("okr", "gone-target", "20260101000000-abcdef"),
    );
    let unmanaged = w.issuer.seed(PROJECT, "hand-made-account");
    let engine = w.engine();
    // Everything is younger than an hour: nothing is swept.
    let r = engine
        .sweep(std::slice::from_ref(&w.target), Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(r.deleted.is_empty());
    assert_eq!(r.kept_young, 2, "the orphan and the served account: {r:?}");
    let r = engine
        .sweep(std::slice::from_ref(&w.target), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec![orphan.id]);
    assert_eq!(r.kept_unproven, 2, "{r:?}");
    assert_eq!(r.kept_in_use, 1, "the served account: {r:?}");
    assert_eq!(
        w.issuer.account_ids(),
        [current, look_alike.id, other_target.id, unmanaged.id].into()
    );
    w.assert_clean();
}

#[tokio::test]
async fn dry_run_plan_touches_nothing() {
    let mut w = world();
    w.target.drain = Some(DrainConfig {
        quiet_for: DurationStr(Duration::from_secs(60)),
        max_wait: DurationStr(Duration::from_secs(600)),
        on_timeout: DrainTimeout::Retire,
    });
    let plan = w.engine().plan(&w.target).await.unwrap();
    let text = plan.join("\n");
    assert!(
        text.contains("mint: create service account okr-chat-<rotation-id>"),
        "{text}"
    );
    assert!(text.contains("check-and-set on version 1"), "{text}");
    assert!(
        text.contains("roll: annotate demo/Deployment/worker"),
        "{text}"
    );
    assert!(
        text.contains(&format!("retire: delete service account {}", w.old.id)),
        "{text}"
    );
    assert!(!text.contains("refused"), "{text}");
    // A Rollout is restarted, and a paused workload is named as the refusal.
    let ro: WorkloadRef = "demo/Rollout/canary".parse().unwrap();
    w.target.workloads.push(ro.clone());
    w.roller.set_paused(&ro, true);
    let text = w.engine().plan(&w.target).await.unwrap().join("\n");
    assert!(
        text.contains("roll: restart demo/Rollout/canary through spec.restartAt"),
        "{text}"
    );
    assert!(
        text.starts_with("refused: target chat: workload demo/Rollout/canary is paused"),
        "{text}"
    );
    assert!(w.log.entries().is_empty(), "{:?}", w.log.entries());
    assert!(!text.contains(w.old.key.expose()));
}

#[tokio::test]
async fn the_plan_shows_the_waves() {
    let mut w = world();
    staged(&mut w);
    let plan = w.engine().plan(&w.target).await.unwrap().join("\n");
    assert!(
        plan.contains("roll wave 1/3: annotate demo/Deployment/a with openai-key-rotator/rotation-id, then wait until its rollouts complete and 0 probe(s) pass"),
        "{plan}"
    );
    assert!(
        plan.contains("roll wave 3/3: annotate demo/Deployment/c with openai-key-rotator/rotation-id, then verify with everything else"),
        "{plan}"
    );
    assert!(w.log.entries().is_empty());
}

mod naming;
mod outage;
