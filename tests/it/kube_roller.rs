//! The daemon's real Kubernetes client (`KubeRoller`) against the Kubernetes simulator,
//! served on a random port and reached through a kubeconfig file, as in production.

use k8s_openapi::api::core::v1::{Pod, Secret as K8sSecret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use openai_key_rotator::config::{DurationStr, KubernetesConfig, WorkloadKind, WorkloadRef};
use openai_key_rotator::kube::{KubeError, KubeRoller, ROTATION_ANNOTATION};
use openai_key_rotator::retry::RetryPolicy;
use openai_key_rotator::rotation::ports::{
    Backend, BackendError, CallObserver, EventType, RolloutState, StatusClass, WorkloadRoller,
};
use openai_key_rotator::sandbox::kube::{rollout_status, KubeSim, KubeSimOptions, RolloutStatus};
use openai_key_rotator::sandbox::{loopback, Server};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records every call and retry the roller reports.
#[derive(Default)]
struct Calls {
    calls: Mutex<Vec<(&'static str, StatusClass)>>,
    retries: Mutex<Vec<&'static str>>,
}

impl CallObserver for Calls {
    fn call(&self, backend: Backend, op: &'static str, status: StatusClass, _: Duration) {
        assert_eq!(backend, Backend::Kubernetes);
        self.calls.lock().unwrap().push((op, status));
    }
    fn retry(&self, backend: Backend, op: &'static str) {
        assert_eq!(backend, Backend::Kubernetes);
        self.retries.lock().unwrap().push(op);
    }
}

impl Calls {
    /// Outcomes of `op` since the call log held `from` entries.
    fn of(&self, op: &str, from: usize) -> Vec<StatusClass> {
        self.calls.lock().unwrap()[from..]
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, s)| *s)
            .collect()
    }
    fn len(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn retries(&self) -> usize {
        self.retries.lock().unwrap().len()
    }
}

const MAX_RETRIES: u32 = 3;

struct Env {
    sim: KubeSim,
    server: Server,
    roller: KubeRoller,
    calls: Arc<Calls>,
    _dir: tempfile::TempDir,
}

async fn env(ready_ms: u64) -> Env {
    let sim = KubeSim::new(KubeSimOptions {
        pod_ready_delay: Duration::from_millis(ready_ms),
        tick: Duration::from_millis(20),
        pod_termination_delay: Duration::from_millis(50),
        ..Default::default()
    });
    let server = sim
        .serve(loopback(0), Default::default())
        .await
        .expect("serve the simulator");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, KubeSim::kubeconfig_yaml(&server.url(), None)).unwrap();
    let calls = Arc::new(Calls::default());
    let cfg = KubernetesConfig {
        kubeconfig: Some(path),
        context: Some("okr-sim".into()),
        ..KubernetesConfig::default()
    };
    let roller = KubeRoller::connect(&cfg, calls.clone())
        .await
        .expect("connect through the kubeconfig")
        .with_retry(RetryPolicy {
            max_retries: MAX_RETRIES,
            base: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .with_timeout(Duration::from_secs(5));
    Env {
        sim,
        server,
        roller,
        calls,
        _dir: dir,
    }
}

fn deployment_ref(ns: &str, name: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: ns.into(),
        kind: WorkloadKind::Deployment,
        name: name.into(),
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn template_id(sim: &KubeSim, ns: &str, name: &str) -> Option<String> {
    sim.deployment(ns, name)?
        .spec?
        .template
        .metadata?
        .annotations?
        .get(ROTATION_ANNOTATION)
        .cloned()
}

async fn seed(sim: &KubeSim, ns: &str, name: &str, replicas: i32) {
    let mut d = KubeSim::simple_deployment(ns, name, replicas);
    let tm = d.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
    tm.annotations = Some([("team".to_string(), "payments".to_string())].into());
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete(ns, name, Duration::from_secs(15))
            .await
    );
}

/// Poll `rollout_state` until it leaves Progressing, cross-checking every answer with the
/// simulator's own kubectl-rule status read just before and just after: ours may say
/// Complete only if the simulator does, and must once the simulator does (the state only
/// moves forward). Returns the final state and the Progressing messages seen.
async fn until_settled(
    e: &Env,
    w: &WorkloadRef,
    id: &str,
    timeout: Duration,
) -> (RolloutState, Vec<String>) {
    let t = Instant::now();
    let mut seen = Vec::new();
    let sim_status = || rollout_status(&e.sim.deployment(&w.namespace, &w.name).unwrap());
    loop {
        let before = sim_status();
        let ours = e.roller.rollout_state(w, id).await.unwrap();
        let after = sim_status();
        if before == RolloutStatus::Complete {
            assert_eq!(ours, RolloutState::Complete, "the simulator was done first");
        }
        if ours == RolloutState::Complete {
            assert_eq!(after, RolloutStatus::Complete, "we said Complete too early");
        }
        match ours {
            RolloutState::Progressing(m) => {
                if seen.last() != Some(&m) {
                    seen.push(m);
                }
            }
            done => return (done, seen),
        }
        assert!(
            t.elapsed() < timeout,
            "not settled in {timeout:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn roll_completes_when_the_rollout_does_and_repeating_is_a_no_op() {
    let e = env(150).await;
    seed(&e.sim, "okr", "web", 3).await;
    let w = deployment_ref("okr", "web");

    e.roller.roll(&w, "r0").await.unwrap();
    assert_eq!(template_id(&e.sim, "okr", "web").as_deref(), Some("r0"));
    let (state, seen) = until_settled(&e, &w, "r0", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete);
    assert!(!seen.is_empty(), "the rollout was observed in progress");
    assert!(
        seen.iter().any(|m| m.starts_with("Waiting for deployment")),
        "kubectl's wording: {seen:?}"
    );
    assert_eq!(e.roller.ready_pods_with(&w, "r0").await.unwrap(), 3);

    // A second rotation.
    e.roller.roll(&w, "r1").await.unwrap();
    let d = e.sim.deployment("okr", "web").unwrap();
    let tm = d.spec.unwrap().template.metadata.unwrap();
    assert_eq!(
        tm.annotations.unwrap()["team"],
        "payments",
        "the patch touched only our annotation"
    );
    let (state, _) = until_settled(&e, &w, "r1", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete);
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 3);
    assert_eq!(e.roller.ready_pods_with(&w, "r0").await.unwrap(), 0);
    let active = e
        .sim
        .pods("okr", "app=web")
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    assert_eq!(active, 3);

    // Our earlier rollout was superseded.
    match e.roller.rollout_state(&w, "r0").await.unwrap() {
        RolloutState::Failed(m) => {
            assert!(m.contains("\"r1\"") && m.contains("rolled again"), "{m}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    // Rolling to the id it already has writes nothing.
    let generation = e.sim.deployment("okr", "web").unwrap().metadata.generation;
    let replica_sets = e.sim.replica_sets("okr", "app=web").len();
    let writes = e.sim.write_count();
    let from = e.calls.len();
    e.roller.roll(&w, "r1").await.unwrap();
    assert_eq!(e.sim.write_count(), writes, "no write request");
    assert_eq!(
        e.sim.deployment("okr", "web").unwrap().metadata.generation,
        generation
    );
    assert_eq!(e.sim.replica_sets("okr", "app=web").len(), replica_sets);
    assert_eq!(e.calls.of("workload.get", from), [StatusClass::Success]);
    assert!(e.calls.of("workload.patch", from).is_empty());
    assert_eq!(
        e.roller.rollout_state(&w, "r1").await.unwrap(),
        RolloutState::Complete
    );
}

#[tokio::test]
async fn a_never_ready_rollout_fails_at_its_progress_deadline_not_before() {
    let e = env(50).await;
    // A generous deadline for the first rollout (one-second granularity, and a loaded
    // machine must not trip it); the short one is set before the never-ready rollout.
    let mut d = KubeSim::simple_deployment("okr", "stuck", 2);
    d.spec.as_mut().unwrap().progress_deadline_seconds = Some(60);
    e.sim.create_deployment(d).unwrap();
    assert!(
        e.sim
            .wait_rollout_complete("okr", "stuck", Duration::from_secs(15))
            .await
    );
    let w = deployment_ref("okr", "stuck");
    e.sim
        .update_deployment("okr", "stuck", |d| {
            d.spec.as_mut().unwrap().progress_deadline_seconds = Some(2)
        })
        .unwrap();
    e.sim.set_never_ready("okr", "stuck", true);

    let t = Instant::now();
    e.roller.roll(&w, "r1").await.unwrap();
    let mut progressing = 0;
    let failure = loop {
        let state = e.roller.rollout_state(&w, "r1").await.unwrap();
        match state {
            RolloutState::Progressing(_) => progressing += 1,
            RolloutState::Failed(m) => break m,
            RolloutState::Complete => panic!("a never-ready rollout cannot complete"),
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        failure.contains("exceeded its progress deadline"),
        "{failure}"
    );
    // The controller measures the deadline from the Progressing condition's
    // lastUpdateTime, which the API stores with whole seconds: it can fire up to 1 s early.
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "failed before the deadline: {:?}",
        t.elapsed()
    );
    assert!(progressing >= 5, "seen in progress first ({progressing}x)");
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 0);
    // The old pods kept serving.
    let ready_old = e
        .sim
        .pods("okr", "app=stuck")
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| is_ready(p))
        .count();
    assert_eq!(ready_old, 2);
}

#[tokio::test]
async fn a_roll_by_someone_else_fails_ours() {
    let e = env(50).await;
    seed(&e.sim, "okr", "web", 2).await;
    let w = deployment_ref("okr", "web");
    e.roller.roll(&w, "ours").await.unwrap();
    let (state, _) = until_settled(&e, &w, "ours", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete);

    // Another writer (a second daemon, a human) sets another id.
    e.sim
        .update_deployment("okr", "web", |d| {
            let tm = d.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
            tm.annotations
                .get_or_insert_with(Default::default)
                .insert(ROTATION_ANNOTATION.into(), "theirs".into());
        })
        .unwrap();
    match e.roller.rollout_state(&w, "ours").await.unwrap() {
        RolloutState::Failed(m) => {
            assert!(m.contains("\"theirs\"") && m.contains("\"ours\""), "{m}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Theirs is judged on its own merits: in progress, then complete.
    let (state, seen) = until_settled(&e, &w, "theirs", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete);
    assert!(!seen.is_empty());

    // The annotation removed (e.g. `kubectl rollout undo` to a template without it).
    e.sim
        .update_deployment("okr", "web", |d| {
            let tm = d.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
            tm.annotations.as_mut().unwrap().remove(ROTATION_ANNOTATION);
        })
        .unwrap();
    match e.roller.rollout_state(&w, "theirs").await.unwrap() {
        RolloutState::Failed(m) => assert!(m.contains("carries no"), "{m}"),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_ready_pod_on_an_older_template_holds_completion() {
    let e = env(50).await;
    seed(&e.sim, "okr", "web", 2).await;
    let w = deployment_ref("okr", "web");
    e.roller.roll(&w, "r1").await.unwrap();
    let (state, _) = until_settled(&e, &w, "r1", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete);

    // A pod the selector picks that the rollout did not replace (here a bare pod; in real
    // life e.g. one left over from another controller), still on the old id.
    let pods: Api<Pod> = Api::namespaced(e.roller.client(), "okr");
    let stray: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "stray", "labels": {"app": "web"},
                     "annotations": {ROTATION_ANNOTATION: "r0"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/web:1.0"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &stray).await.unwrap();
    let t = Instant::now();
    while !e
        .sim
        .pods("okr", "app=web")
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some("stray") && is_ready(p))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "stray pod never ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kubectl's rule alone says done; ours does not.
    assert_eq!(
        rollout_status(&e.sim.deployment("okr", "web").unwrap()),
        RolloutStatus::Complete
    );
    assert_eq!(
        e.roller.rollout_state(&w, "r1").await.unwrap(),
        RolloutState::Progressing("1 ready pods still run an older template".into())
    );
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 2);
    assert_eq!(e.roller.ready_pods_with(&w, "r0").await.unwrap(), 1);

    // Once it is terminating it no longer counts.
    pods.delete("stray", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        e.roller.rollout_state(&w, "r1").await.unwrap(),
        RolloutState::Complete
    );
    assert_eq!(e.roller.ready_pods_with(&w, "r0").await.unwrap(), 0);
}

#[tokio::test]
async fn failed_writes_are_retried_and_bounded() {
    let e = env(50).await;
    seed(&e.sim, "okr", "web", 1).await;
    let w = deployment_ref("okr", "web");

    // One injected failure per status: the roll still succeeds, one extra request, and the
    // observer sees the failed attempt and the retry.
    for (n, (status, class)) in [
        (409, StatusClass::ClientError),
        (500, StatusClass::ServerError),
        (429, StatusClass::RateLimited),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("r{n}");
        let writes = e.sim.write_count();
        let from = e.calls.len();
        let retries = e.calls.retries();
        e.sim.fail_nth_write(1, status);
        e.roller.roll(&w, &id).await.unwrap();
        assert_eq!(
            e.sim.write_count(),
            writes + 2,
            "{status}: failed + retried"
        );
        assert_eq!(
            e.calls.of("workload.patch", from),
            [class, StatusClass::Success],
            "{status}"
        );
        assert_eq!(e.calls.retries(), retries + 1, "{status}");
        assert_eq!(template_id(&e.sim, "okr", "web"), Some(id));
    }

    // A persistent failure: 1 + MAX_RETRIES attempts, then the error; nothing changed.
    let persistent = 1 + u64::from(MAX_RETRIES);
    for (status, conflict) in [(500, false), (409, true)] {
        let writes = e.sim.write_count();
        let from = e.calls.len();
        for n in 1..=persistent {
            e.sim.fail_nth_write(n, status);
        }
        let err = e.roller.roll(&w, "never").await.unwrap_err();
        match (&err, conflict) {
            (BackendError::Conflict { what, .. }, true) => {
                assert_eq!(what, "Deployment okr/web")
            }
            (
                BackendError::Failed {
                    transient, message, ..
                },
                false,
            ) => {
                assert!(*transient);
                assert!(message.contains("HTTP 500"), "{message}");
            }
            other => panic!("{status}: unexpected {other:?}"),
        }
        assert_eq!(e.sim.write_count(), writes + persistent);
        assert_eq!(e.calls.of("workload.patch", from).len() as u64, persistent);
        assert_eq!(template_id(&e.sim, "okr", "web").as_deref(), Some("r2"));
    }
    // The faults are spent: the same roll now goes through.
    e.roller.roll(&w, "never").await.unwrap();
    assert_eq!(template_id(&e.sim, "okr", "web").as_deref(), Some("never"));

    // 404 is an answer, not retried.
    let missing = deployment_ref("okr", "gone");
    let retries = e.calls.retries();
    for r in [
        e.roller.roll(&missing, "r1").await.map(|_| ()),
        e.roller.rollout_state(&missing, "r1").await.map(|_| ()),
        e.roller.ready_pods_with(&missing, "r1").await.map(|_| ()),
    ] {
        match r {
            Err(BackendError::NotFound { backend, what }) => {
                assert_eq!(backend, Backend::Kubernetes);
                assert_eq!(what, "Deployment okr/gone");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    assert_eq!(e.calls.retries(), retries);
    // StatefulSets are not served by the simulator: a real 404 for the resource.
    let sts = WorkloadRef {
        namespace: "okr".into(),
        kind: WorkloadKind::StatefulSet,
        name: "web".into(),
    };
    assert!(matches!(
        e.roller.roll(&sts, "r1").await,
        Err(BackendError::NotFound { .. })
    ));
}

#[tokio::test]
async fn secret_hash_and_nudge() {
    let e = env(50).await;
    let value = b"sk-proj-not-a-real-key-0123456789";
    e.sim
        .put_secret(K8sSecret {
            metadata: ObjectMeta {
                name: Some("openai".into()),
                namespace: Some("okr".into()),
                ..Default::default()
            },
            data: Some(
                [
                    ("OPENAI_API_KEY".to_string(), ByteString(value.to_vec())),
                    ("other".to_string(), ByteString(b"x".to_vec())),
                ]
                .into(),
            ),
            ..Default::default()
        })
        .unwrap();
    let want = hex::encode(Sha256::digest(value));
    assert_eq!(
        want,
        openai_key_rotator::secret::Secret::new(std::str::from_utf8(value).unwrap()).sha256_hex()
    );
    let from = e.calls.len();
    assert_eq!(
        e.roller
            .secret_sha256("okr", "openai", "OPENAI_API_KEY")
            .await
            .unwrap(),
        Some(want.clone())
    );
    assert_ne!(
        e.roller
            .secret_sha256("okr", "openai", "other")
            .await
            .unwrap(),
        Some(want.clone())
    );
    assert_eq!(
        e.roller
            .secret_sha256("okr", "openai", "absent")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        e.roller
            .secret_sha256("okr", "missing", "OPENAI_API_KEY")
            .await
            .unwrap(),
        None
    );
    // A missing Secret is an expected answer while an operator has not synced yet.
    assert_eq!(
        e.calls.of("secret.get", from),
        [StatusClass::Success; 4],
        "404 reported as an answer"
    );

    for v in ["r1", "r2"] {
        e.roller
            .nudge_secret("okr", "openai", "force-sync", v)
            .await
            .unwrap();
        let s = e.sim.secret("okr", "openai").unwrap();
        assert_eq!(s.metadata.annotations.unwrap()["force-sync"], v);
        assert_eq!(s.data.unwrap()["OPENAI_API_KEY"].0, value, "data untouched");
    }
    assert!(matches!(
        e.roller
            .nudge_secret("okr", "missing", "force-sync", "r1")
            .await,
        Err(BackendError::NotFound { .. })
    ));
    assert_eq!(
        e.calls.of("secret.patch", from),
        [
            StatusClass::Success,
            StatusClass::Success,
            StatusClass::ClientError
        ]
    );
}

#[tokio::test]
async fn events_land_on_the_workload() {
    let e = env(50).await;
    seed(&e.sim, "okr", "web", 1).await;
    let w = deployment_ref("okr", "web");
    let uid = e.sim.deployment("okr", "web").unwrap().metadata.uid;

    let long_note = "x".repeat(4000);
    e.roller
        .event(&w, EventType::Warning, "RotationRolledBack", &long_note)
        .await
        .unwrap();
    e.roller
        .event(
            &w,
            EventType::Normal,
            "RotationStarted",
            "rotation r1 rolled this workload",
        )
        .await
        .unwrap();
    e.roller
        .event(
            &w,
            EventType::Normal,
            "RotationStarted",
            "rotation r1 rolled this workload",
        )
        .await
        .unwrap();

    // Read back through the API, as `kubectl get events` would.
    let api: Api<K8sEvent> = Api::namespaced(e.roller.client(), "okr");
    let events = api.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(events.len(), 2, "the repeat became a series");
    for ev in &events {
        let r = ev.regarding.as_ref().unwrap();
        assert_eq!(r.kind.as_deref(), Some("Deployment"));
        assert_eq!(r.api_version.as_deref(), Some("apps/v1"));
        assert_eq!(r.name.as_deref(), Some("web"));
        assert_eq!(r.namespace.as_deref(), Some("okr"));
        assert_eq!(r.uid, uid);
        assert_eq!(
            ev.reporting_controller.as_deref(),
            Some("openai-key-rotator")
        );
    }
    let warning = events
        .iter()
        .find(|ev| ev.reason.as_deref() == Some("RotationRolledBack"))
        .unwrap();
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert_eq!(
        warning.note.as_deref().map(str::len),
        Some(1024),
        "note capped at 1 kB"
    );
    let started = events
        .iter()
        .find(|ev| ev.reason.as_deref() == Some("RotationStarted"))
        .unwrap();
    assert_eq!(started.type_.as_deref(), Some("Normal"));
    assert_eq!(
        started.note.as_deref(),
        Some("rotation r1 rolled this workload")
    );
    assert_eq!(started.series.as_ref().map(|s| s.count), Some(2));

    assert!(matches!(
        e.roller
            .event(&deployment_ref("okr", "gone"), EventType::Normal, "X", "y")
            .await,
        Err(BackendError::NotFound { .. })
    ));
}

#[tokio::test]
async fn connect_ping_and_transport_failures() {
    let e = env(50).await;
    e.roller.ping().await.unwrap();
    assert_eq!(e.calls.of("version.get", 0), [StatusClass::Success]);

    let calls: Arc<dyn CallObserver> = Arc::new(Calls::default());
    let missing = KubernetesConfig {
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
        context: None,
        ..KubernetesConfig::default()
    };
    assert!(matches!(
        KubeRoller::connect(&missing, calls.clone()).await,
        Err(KubeError::Kubeconfig { .. })
    ));
    let path = e._dir.path().join("kubeconfig");
    let bad_context = KubernetesConfig {
        kubeconfig: Some(path),
        context: Some("no-such-context".into()),
        ..KubernetesConfig::default()
    };
    let err = KubeRoller::connect(&bad_context, calls)
        .await
        .err()
        .expect("an unknown context is an error");
    assert!(err.to_string().contains("no-such-context"), "{err}");

    // The API server goes away: bounded transient failure, each attempt reported.
    let Env {
        server,
        roller,
        calls,
        ..
    } = e;
    server.shutdown().await;
    let from = calls.len();
    let retries = calls.retries();
    match roller.ping().await {
        Err(BackendError::Failed { transient, .. }) => assert!(transient),
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert_eq!(
        calls.of("version.get", from),
        vec![StatusClass::Transport; 1 + MAX_RETRIES as usize]
    );
    assert_eq!(calls.retries(), retries + MAX_RETRIES as usize);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections and reads nothing back: each attempt must hit our timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let calls = Arc::new(Calls::default());
    let config = kube::Config::new(url.parse().unwrap());
    let roller = KubeRoller::from_config(config, calls.clone())
        .unwrap()
        .with_retry(RetryPolicy {
            max_retries: 1,
            base: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        })
        .with_timeout(Duration::from_millis(300));
    let t = Instant::now();
    match roller.ping().await {
        Err(BackendError::Failed {
            transient, message, ..
        }) => {
            assert!(transient);
            assert!(message.contains("no answer within"), "{message}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        calls.of("version.get", 0),
        [StatusClass::Transport, StatusClass::Transport]
    );
    hold.abort();
}

/// An API server that answers `GET /version` with 429 and `retryAfterSeconds` for the
/// first `busy` requests, then with a version. Counts requests.
async fn busy_api_server(
    busy: usize,
    retry_after: u32,
) -> (String, Arc<Mutex<usize>>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(Mutex::new(0usize));
    let h = hits.clone();
    let router = axum::Router::new().route(
        "/version",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                let n = {
                    let mut n = h.lock().unwrap();
                    *n += 1;
                    *n
                };
                if n <= busy {
                    (
                        http::StatusCode::TOO_MANY_REQUESTS,
                        axum::Json(serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": "slow down", "reason": "TooManyRequests",
                            "details": {"retryAfterSeconds": retry_after}, "code": 429
                        })),
                    )
                } else {
                    (
                        http::StatusCode::OK,
                        axum::Json(serde_json::json!({
                            "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "",
                            "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""
                        })),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (url, hits, task)
}

/// `retryAfterSeconds` within `kubernetes.max_retry_after` is waited, then retried; above
/// it the call ends at once (transient, with the hint) instead of a cut-short wait that
/// burns a retry. Timeout and retries come from `[kubernetes]` through `connect`.
#[tokio::test]
async fn retry_after_seconds_is_honoured_up_to_the_cap_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_for = |name: &str, url: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, KubeSim::kubeconfig_yaml(url, None)).unwrap();
        KubernetesConfig {
            kubeconfig: Some(path),
            context: Some("okr-sim".into()),
            max_retries: 2,
            max_retry_after: DurationStr::from_secs(3),
            ..KubernetesConfig::default()
        }
    };

    // Within the cap: one wait of 1 s, then through.
    let (url, hits, task) = busy_api_server(1, 1).await;
    let calls = Arc::new(Calls::default());
    let roller = KubeRoller::connect(&cfg_for("within", &url), calls.clone())
        .await
        .unwrap();
    let t = Instant::now();
    roller.ping().await.expect("through after the wait");
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(*hits.lock().unwrap(), 2);
    assert_eq!(
        calls.of("version.get", 0),
        [StatusClass::RateLimited, StatusClass::Success]
    );
    assert_eq!(calls.retries(), 1);
    task.abort();

    // Above it: no sleep, no retry, the hint in a transient error.
    let (url, hits, task) = busy_api_server(100, 600).await;
    let calls = Arc::new(Calls::default());
    let roller = KubeRoller::connect(&cfg_for("above", &url), calls.clone())
        .await
        .unwrap();
    let t = Instant::now();
    match roller.ping().await {
        Err(BackendError::Failed {
            transient: true,
            message,
            ..
        }) => {
            assert!(message.contains("HTTP 429"), "{message}");
            assert!(message.contains("retry after 10m"), "{message}");
        }
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(*hits.lock().unwrap(), 1);
    assert_eq!(calls.retries(), 0);
    task.abort();
}

/// `kubernetes.request_timeout` and `max_retries` reach the roller through `connect`
/// (before, `connect` always used 30 s and 5 retries).
#[tokio::test]
async fn connect_takes_timeout_and_retries_from_config() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, KubeSim::kubeconfig_yaml(&url, None)).unwrap();
    let cfg = KubernetesConfig {
        kubeconfig: Some(path),
        context: Some("okr-sim".into()),
        request_timeout: DurationStr(Duration::from_millis(300)),
        max_retries: 1,
        retry_base: DurationStr(Duration::from_millis(10)),
        max_backoff: DurationStr(Duration::from_millis(10)),
        ..KubernetesConfig::default()
    };
    let calls = Arc::new(Calls::default());
    let roller = KubeRoller::connect(&cfg, calls.clone()).await.unwrap();
    let t = Instant::now();
    let e = roller.ping().await.unwrap_err();
    assert!(e.to_string().contains("no answer within 300ms"), "{e}");
    assert!(e.to_string().contains("gave up after 2 attempts"), "{e}");
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        calls.of("version.get", 0),
        [StatusClass::Transport, StatusClass::Transport]
    );
    hold.abort();
}

// ---------------------------------------------------------------------------------------
// StatefulSets and DaemonSets

fn workload_ref(kind: WorkloadKind, ns: &str, name: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: ns.into(),
        kind,
        name: name.into(),
    }
}

/// [`until_settled`] for any kind, cross-checked with the simulator's kubectl rule for it.
async fn until_settled_kind(
    e: &Env,
    w: &WorkloadRef,
    id: &str,
    timeout: Duration,
) -> (RolloutState, Vec<String>) {
    let t = Instant::now();
    let mut seen = Vec::new();
    let sim_status = || {
        e.sim
            .workload_rollout_status(w.kind, &w.namespace, &w.name)
            .unwrap()
    };
    loop {
        let before = sim_status();
        let ours = e.roller.rollout_state(w, id).await.unwrap();
        let after = sim_status();
        if before == RolloutStatus::Complete {
            assert_eq!(ours, RolloutState::Complete, "the simulator was done first");
        }
        if ours == RolloutState::Complete {
            assert_eq!(after, RolloutStatus::Complete, "we said Complete too early");
        }
        match ours {
            RolloutState::Progressing(m) => {
                if seen.last() != Some(&m) {
                    seen.push(m);
                }
            }
            done => return (done, seen),
        }
        assert!(
            t.elapsed() < timeout,
            "not settled in {timeout:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ready, non-terminating pods matching `selector` whose template carries `id`.
fn ready_with(e: &Env, ns: &str, selector: &str, id: &str) -> usize {
    e.sim
        .pods(ns, selector)
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ROTATION_ANNOTATION))
                .map(String::as_str)
                == Some(id)
        })
        .count()
}

#[tokio::test]
async fn statefulsets_and_daemonsets_roll_to_completion() {
    let e = env(100).await;
    e.sim
        .create_statefulset(KubeSim::simple_statefulset("okr", "db", 3))
        .unwrap();
    e.sim
        .create_daemonset(KubeSim::simple_daemonset("okr", "agent"))
        .unwrap();
    for name in ["db", "agent"] {
        assert!(
            e.sim
                .wait_rollout_complete("okr", name, Duration::from_secs(15))
                .await
        );
    }
    let sts = workload_ref(WorkloadKind::StatefulSet, "okr", "db");
    let ds = workload_ref(WorkloadKind::DaemonSet, "okr", "agent");

    for (w, selector, pods, wording) in [
        (&sts, "app=db", 3, "Waiting for"),
        (&ds, "app=agent", 2, "Waiting for daemon set \"agent\""),
    ] {
        e.roller.roll(w, "r0").await.unwrap();
        let (state, seen) = until_settled_kind(&e, w, "r0", Duration::from_secs(30)).await;
        assert_eq!(state, RolloutState::Complete, "{w}");
        assert!(
            !seen.is_empty(),
            "{w}: the rollout was observed in progress"
        );
        assert!(
            seen.iter().any(|m| m.starts_with(wording)),
            "{w}: kubectl's wording: {seen:?}"
        );
        assert_eq!(
            e.roller.ready_pods_with(w, "r0").await.unwrap(),
            pods,
            "{w}"
        );
        assert_eq!(ready_with(&e, "okr", selector, "r0"), pods as usize, "{w}");

        // A second rotation replaces every pod again.
        e.roller.roll(w, "r1").await.unwrap();
        let (state, _) = until_settled_kind(&e, w, "r1", Duration::from_secs(30)).await;
        assert_eq!(state, RolloutState::Complete, "{w}");
        assert_eq!(
            e.roller.ready_pods_with(w, "r1").await.unwrap(),
            pods,
            "{w}"
        );
        assert_eq!(e.roller.ready_pods_with(w, "r0").await.unwrap(), 0, "{w}");
        let writes = e.sim.write_count();
        e.roller.roll(w, "r1").await.unwrap();
        assert_eq!(
            e.sim.write_count(),
            writes,
            "{w}: rolling to the same id writes nothing"
        );
    }
}

#[tokio::test]
async fn never_ready_statefulsets_and_daemonsets_stay_progressing() {
    let e = env(50).await;
    e.sim
        .create_statefulset(KubeSim::simple_statefulset("okr", "db", 3))
        .unwrap();
    e.sim
        .create_daemonset(KubeSim::simple_daemonset("okr", "agent"))
        .unwrap();
    for name in ["db", "agent"] {
        assert!(
            e.sim
                .wait_rollout_complete("okr", name, Duration::from_secs(15))
                .await
        );
        e.sim.set_never_ready("okr", name, true);
    }
    let sts = workload_ref(WorkloadKind::StatefulSet, "okr", "db");
    let ds = workload_ref(WorkloadKind::DaemonSet, "okr", "agent");
    e.roller.roll(&sts, "r1").await.unwrap();
    e.roller.roll(&ds, "r1").await.unwrap();

    // Far longer than a healthy rollout takes (tens of milliseconds per pod here).
    let t = Instant::now();
    let mut polls = 0;
    while t.elapsed() < Duration::from_millis(1500) {
        for w in [&sts, &ds] {
            match e.roller.rollout_state(w, "r1").await.unwrap() {
                RolloutState::Progressing(_) => {}
                other => panic!("{w}: a never-ready rollout must stay Progressing, got {other:?}"),
            }
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(polls >= 10);
    for w in [&sts, &ds] {
        assert_eq!(e.roller.ready_pods_with(w, "r1").await.unwrap(), 0, "{w}");
    }
    // Only one pod of each was taken out: the rest keep serving on the old template.
    let ready_old = |sel: &str| {
        e.sim
            .pods("okr", sel)
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
            .count()
    };
    assert_eq!(ready_old("app=db"), 2);
    assert_eq!(ready_old("app=agent"), 1);
    let db2 = e
        .sim
        .pods("okr", "statefulset.kubernetes.io/pod-name=db-2")
        .pop()
        .unwrap();
    assert!(
        !is_ready(&db2),
        "db-2, the highest ordinal, is the one replaced"
    );

    // Fixed: the same rollouts now complete, so the check above could have failed.
    for (w, name) in [(&sts, "db"), (&ds, "agent")] {
        e.sim.set_never_ready("okr", name, false);
        let (state, _) = until_settled_kind(&e, w, "r1", Duration::from_secs(30)).await;
        assert_eq!(state, RolloutState::Complete, "{w}");
    }
}

// ---------------------------------------------------------------------------------------
// Argo Rollouts

const RESTART_AT: &str = "openai-key-rotator/restart-at";

async fn seed_rollout(e: &Env, ns: &str, name: &str, replicas: i32) -> WorkloadRef {
    e.sim
        .create_rollout(KubeSim::simple_rollout(ns, name, replicas))
        .unwrap();
    assert!(
        e.sim
            .wait_rollout_complete_for(WorkloadKind::Rollout, ns, name, Duration::from_secs(15))
            .await,
        "{:?}",
        e.sim.rollout(ns, name)
    );
    workload_ref(WorkloadKind::Rollout, ns, name)
}

/// Ready, live pods of a Rollout and their creation times (seconds).
fn ready_rollout_pods(e: &Env, ns: &str, name: &str) -> Vec<(String, i64)> {
    e.sim
        .pods(ns, &format!("app={name}"))
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .unwrap()
                    .0
                    .as_second(),
            )
        })
        .collect()
}

fn restart_at(e: &Env, ns: &str, name: &str) -> (String, String) {
    let ro = e.sim.rollout(ns, name).unwrap();
    (
        ro["spec"]["restartAt"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        ro["metadata"]["annotations"][RESTART_AT]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn secs(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp()
}

#[tokio::test]
async fn kube_roller_restarts_a_rollout_through_restart_at_and_judges_it_by_argos_rule() {
    let e = env(100).await;
    let w = seed_rollout(&e, "ro", "web", 3).await;
    let template_before = e.sim.rollout("ro", "web").unwrap()["spec"]["template"].clone();
    let pods_before = ready_rollout_pods(&e, "ro", "web");
    assert_eq!(pods_before.len(), 3);
    assert!(!e.roller.paused(&w).await.unwrap());
    let from = e.calls.len();

    e.roller.roll(&w, "r1").await.unwrap();
    // The roll is a merge patch of spec.restartAt (whole seconds, after now) plus our id
    // on the Rollout's metadata; the pod template is untouched (no new update, no steps).
    assert_eq!(e.calls.of("rollout.patch", from), [StatusClass::Success]);
    let (spec_at, ann_at) = restart_at(&e, "ro", "web");
    assert_eq!(spec_at, ann_at);
    assert!(
        spec_at.ends_with('Z') && !spec_at.contains('.'),
        "{spec_at}"
    );
    assert!(secs(&spec_at) > chrono::Utc::now().timestamp() - 1);
    let ro = e.sim.rollout("ro", "web").unwrap();
    assert_eq!(ro["metadata"]["annotations"][ROTATION_ANNOTATION], "r1");
    assert_eq!(ro["spec"]["template"], template_before);

    let (state, seen) = until_settled_kind(&e, &w, "r1", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete, "{seen:?}");
    assert!(
        seen.iter().any(|m| m.contains("restarting")),
        "it waited for the restart: {seen:?}"
    );
    // Every ready pod was created at or after restartAt: all three replaced.
    let pods = ready_rollout_pods(&e, "ro", "web");
    assert_eq!(pods.len(), 3);
    for (name, created) in &pods {
        assert!(*created >= secs(&spec_at), "{name} created {created}");
        assert!(
            !pods_before.iter().any(|(n, _)| n == name),
            "{name} is an old pod"
        );
    }
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 3);
    assert_eq!(e.roller.ready_pods_with(&w, "other").await.unwrap(), 0);

    // Repeating is a no-op: no second restart.
    let rv = e.sim.rollout("ro", "web").unwrap()["metadata"]["resourceVersion"].clone();
    e.roller.roll(&w, "r1").await.unwrap();
    assert_eq!(
        e.sim.rollout("ro", "web").unwrap()["metadata"]["resourceVersion"],
        rv
    );

    // A second restart (a rollback's): the pods move to it, the first id keeps none.
    e.roller.roll(&w, "r1-rollback").await.unwrap();
    let ro = e.sim.rollout("ro", "web").unwrap();
    assert_eq!(
        ro["metadata"]["annotations"]["openai-key-rotator/previous-rotation-id"],
        "r1"
    );
    // While it runs, the first restart's pods still count as on "r1".
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 3);
    let (state, seen) = until_settled_kind(&e, &w, "r1-rollback", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete, "{seen:?}");
    assert_eq!(
        e.roller.ready_pods_with(&w, "r1-rollback").await.unwrap(),
        3
    );
    assert_eq!(e.roller.ready_pods_with(&w, "r1").await.unwrap(), 0);
    // The old id, asked about after the restart moved on, is a failure (rolled again).
    assert!(matches!(
        e.roller.rollout_state(&w, "r1").await.unwrap(),
        RolloutState::Failed(m) if m.contains("rolled again")
    ));

    // Events name the Rollout with Argo's apiVersion.
    e.roller
        .event(&w, EventType::Normal, "RotationStarted", "rotation r1")
        .await
        .unwrap();
    let api: Api<K8sEvent> = Api::namespaced(e.roller.client(), "ro");
    let ev = api.list(&ListParams::default()).await.unwrap().items;
    let r = ev[0].regarding.as_ref().unwrap();
    assert_eq!(r.kind.as_deref(), Some("Rollout"));
    assert_eq!(r.api_version.as_deref(), Some("argoproj.io/v1alpha1"));
    assert_eq!(
        r.uid.as_deref(),
        e.sim.rollout("ro", "web").unwrap()["metadata"]["uid"].as_str()
    );
    // A missing Rollout is NotFound.
    assert!(matches!(
        e.roller
            .roll(&workload_ref(WorkloadKind::Rollout, "ro", "gone"), "r1")
            .await,
        Err(BackendError::NotFound { .. })
    ));
}

#[tokio::test]
async fn kube_roller_fails_a_degraded_or_aborted_rollout_and_sees_pauses() {
    let e = env(50).await;
    let w = seed_rollout(&e, "ro", "web", 2).await;

    // A restart that degrades fails at once (no waiting out the deadline).
    e.sim.degrade_rollout_restarts("ro", "web", 1);
    e.roller.roll(&w, "r1").await.unwrap();
    let t = Instant::now();
    let (state, seen) = until_settled_kind(&e, &w, "r1", Duration::from_secs(10)).await;
    assert!(
        matches!(&state, RolloutState::Failed(m) if m.contains("Degraded") && m.contains("ProgressDeadlineExceeded")),
        "{state:?} {seen:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // The next restart proceeds (the degrade was one-shot).
    e.roller.roll(&w, "r2").await.unwrap();
    let (state, seen) = until_settled_kind(&e, &w, "r2", Duration::from_secs(20)).await;
    assert_eq!(state, RolloutState::Complete, "{seen:?}");

    // An aborted Rollout fails.
    e.sim.set_rollout_aborted("ro", "web", true);
    let t = Instant::now();
    loop {
        match e.roller.rollout_state(&w, "r2").await.unwrap() {
            RolloutState::Failed(m) => {
                assert!(m.contains("aborted"), "{m}");
                break;
            }
            s => assert!(t.elapsed() < Duration::from_secs(5), "{s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.sim.set_rollout_aborted("ro", "web", false);

    // Paused: by hand (spec.paused) or by its controller (pauseConditions).
    assert!(!e.roller.paused(&w).await.unwrap());
    e.sim
        .update_rollout("ro", "web", |r| {
            r["spec"]["paused"] = serde_json::json!(true)
        })
        .unwrap();
    assert!(e.roller.paused(&w).await.unwrap());
    e.sim
        .update_rollout("ro", "web", |r| {
            r["spec"]["paused"] = serde_json::json!(false)
        })
        .unwrap();
    assert!(!e.roller.paused(&w).await.unwrap());
    e.sim
        .set_rollout_pause_condition("ro", "web", Some("CanaryPauseStep"));
    let t = Instant::now();
    while !e.roller.paused(&w).await.unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "pause condition not seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.sim.set_rollout_pause_condition("ro", "web", None);

    // A paused Deployment too; StatefulSets have no pause.
    seed(&e.sim, "ro", "api", 1).await;
    let d = deployment_ref("ro", "api");
    assert!(!e.roller.paused(&d).await.unwrap());
    e.sim
        .update_deployment("ro", "api", |d| {
            d.spec.as_mut().unwrap().paused = Some(true)
        })
        .unwrap();
    assert!(e.roller.paused(&d).await.unwrap());
}

// ---------------------------------------------------------------------------------------
// consumers_of: what reads a Vault path, listed or not

/// A Deployment whose pod template carries `annotations` and `spec` (merged into the
/// simple one), created through the API so the simulator makes its pods from the template.
fn consumer_deployment(
    sim: &KubeSim,
    ns: &str,
    name: &str,
    annotations: serde_json::Value,
    pod_spec: serde_json::Value,
) {
    let mut v = serde_json::to_value(KubeSim::simple_deployment(ns, name, 1)).unwrap();
    v["spec"]["template"]["metadata"]["annotations"] = annotations;
    for (k, val) in pod_spec.as_object().cloned().unwrap_or_default() {
        v["spec"]["template"]["spec"][k] = val;
    }
    sim.create_deployment(serde_json::from_value(v).unwrap())
        .unwrap();
}

async fn create_dynamic(e: &Env, ar: &kube::api::ApiResource, ns: &str, v: serde_json::Value) {
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(e.roller.client(), ns, ar);
    let obj: kube::api::DynamicObject = serde_json::from_value(v).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

async fn create_secret(e: &Env, ns: &str, name: &str) {
    let api: Api<K8sSecret> = Api::namespaced(e.roller.client(), ns);
    let s = K8sSecret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &s).await.unwrap();
}

/// Wait until the Deployment's pods exist (the simulator's controller makes them).
async fn pods_of(e: &Env, ns: &str, app: &str) {
    let api: Api<Pod> = Api::namespaced(e.roller.client(), ns);
    let t = Instant::now();
    loop {
        let pods = api
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .unwrap();
        if !pods.items.is_empty() {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no pods of {app}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn summary(cs: &[openai_key_rotator::rotation::ports::Consumer]) -> Vec<String> {
    cs.iter()
        .map(|c| {
            format!(
                "{}/{}/{} -> {}",
                c.kind,
                c.namespace,
                c.name,
                c.workload
                    .as_ref()
                    .map(|w| w.to_string())
                    .unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test]
async fn consumers_are_found_through_agent_annotations_operators_and_their_secrets() {
    let e = env(20).await;
    let agent = |path: &str| {
        serde_json::json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-openai": path,
        })
    };
    // Vault Agent: one naming the path (KV v2 API path), one another path (control), one
    // naming the path without opting in (control).
    consumer_deployment(
        &e.sim,
        "apps",
        "agent-app",
        agent("secret/data/demo/chatbot"),
        serde_json::json!({}),
    );
    consumer_deployment(
        &e.sim,
        "apps",
        "agent-other",
        agent("secret/data/demo/other"),
        serde_json::json!({}),
    );
    consumer_deployment(
        &e.sim,
        "apps",
        "agent-off",
        serde_json::json!({"vault.hashicorp.com/agent-inject-secret-openai": "secret/demo/chatbot"}),
        serde_json::json!({}),
    );
    // External Secrets: one reading the path (key without the mount), writing chat-openai;
    // one reading another key (control), writing other-openai.
    let es = openai_key_rotator::kube::external_secret_resource();
    create_dynamic(&e, &es, "apps", serde_json::json!({
        "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
        "metadata": {"name": "chat", "namespace": "apps"},
        "spec": {"secretStoreRef": {"name": "vault", "kind": "ClusterSecretStore"},
                 "target": {"name": "chat-openai"},
                 "data": [{"secretKey": "OPENAI_API_KEY", "remoteRef": {"key": "demo/chatbot", "property": "api_key"}}]}
    })).await;
    create_dynamic(
        &e,
        &es,
        "apps",
        serde_json::json!({
            "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
            "metadata": {"name": "other", "namespace": "apps"},
            "spec": {"target": {"name": "other-openai"},
                     "dataFrom": [{"extract": {"key": "secret/demo/other"}}]}
        }),
    )
    .await;
    // Vault Secrets Operator in another namespace, writing vso-openai (no target name:
    // destination.name is required).
    let vss = openai_key_rotator::kube::vault_static_secret_resource();
    create_dynamic(
        &e,
        &vss,
        "web",
        serde_json::json!({
            "apiVersion": "secrets.hashicorp.com/v1beta1", "kind": "VaultStaticSecret",
            "metadata": {"name": "chat-vso", "namespace": "web"},
            "spec": {"mount": "secret", "path": "demo/chatbot", "type": "kv-v2",
                     "destination": {"name": "vso-openai", "create": true}}
        }),
    )
    .await;
    for (ns, s) in [
        ("apps", "chat-openai"),
        ("apps", "other-openai"),
        ("web", "vso-openai"),
        ("apps", "unrelated"),
    ] {
        create_secret(&e, ns, s).await;
    }
    // Consumers of the written Secrets: a volume, envFrom, env secretKeyRef; controls: a
    // Deployment mounting an unrelated Secret, one envFrom-ing the other ExternalSecret's.
    consumer_deployment(
        &e.sim,
        "apps",
        "mounts-es",
        serde_json::json!({}),
        serde_json::json!({
        "volumes": [{"name": "key", "secret": {"secretName": "chat-openai"}}]}),
    );
    consumer_deployment(
        &e.sim,
        "web",
        "envfrom-vso",
        serde_json::json!({}),
        serde_json::json!({
        "containers": [{"name": "app", "image": "registry.example/x:1", "envFrom": [{"secretRef": {"name": "vso-openai"}}]}]}),
    );
    consumer_deployment(
        &e.sim,
        "apps",
        "env-es",
        serde_json::json!({}),
        serde_json::json!({
        "containers": [{"name": "app", "image": "registry.example/x:1", "env": [{"name": "K",
            "valueFrom": {"secretKeyRef": {"name": "chat-openai", "key": "OPENAI_API_KEY"}}}]}]}),
    );
    consumer_deployment(
        &e.sim,
        "apps",
        "mounts-unrelated",
        serde_json::json!({}),
        serde_json::json!({
        "volumes": [{"name": "key", "secret": {"secretName": "unrelated"}}]}),
    );
    consumer_deployment(
        &e.sim,
        "apps",
        "envfrom-other",
        serde_json::json!({}),
        serde_json::json!({
        "containers": [{"name": "app", "image": "registry.example/x:1", "envFrom": [{"secretRef": {"name": "other-openai"}}]}]}),
    );
    // The same Secret name in another namespace is another Secret (control).
    consumer_deployment(
        &e.sim,
        "web",
        "mounts-es-elsewhere",
        serde_json::json!({}),
        serde_json::json!({
        "volumes": [{"name": "key", "secret": {"secretName": "chat-openai"}}]}),
    );
    for (ns, d) in [
        ("apps", "agent-app"),
        ("apps", "agent-other"),
        ("apps", "agent-off"),
        ("apps", "mounts-es"),
        ("web", "envfrom-vso"),
        ("apps", "env-es"),
        ("apps", "mounts-unrelated"),
        ("apps", "envfrom-other"),
        ("web", "mounts-es-elsewhere"),
    ] {
        pods_of(&e, ns, d).await;
    }

    let found = e
        .roller
        .consumers_of("secret", "demo/chatbot", "api_key")
        .await
        .unwrap();
    assert_eq!(
        summary(&found),
        [
            "Deployment/apps/agent-app -> apps/Deployment/agent-app",
            "Deployment/apps/env-es -> apps/Deployment/env-es",
            "Deployment/apps/mounts-es -> apps/Deployment/mounts-es",
            "Deployment/web/envfrom-vso -> web/Deployment/envfrom-vso",
            "ExternalSecret/apps/chat -> ",
            "Secret/apps/chat-openai -> ",
            "Secret/web/vso-openai -> ",
            "VaultStaticSecret/web/chat-vso -> ",
        ],
        "{found:#?}"
    );
    let via = |name: &str| found.iter().find(|c| c.name == name).unwrap().via.clone();
    assert_eq!(
        via("agent-app"),
        "vault.hashicorp.com/agent-inject-secret-openai"
    );
    assert!(
        via("mounts-es").contains("volume key (Secret chat-openai)")
            && via("mounts-es").contains("ExternalSecret chat"),
        "{}",
        via("mounts-es")
    );
    assert!(
        via("envfrom-vso").contains("envFrom Secret vso-openai")
            && via("envfrom-vso").contains("VaultStaticSecret chat-vso")
    );
    assert_eq!(via("chat"), "spec.data[0].remoteRef.key");
    // Deterministic: asking again gives the same answer.
    assert_eq!(
        e.roller
            .consumers_of("secret", "/demo//chatbot/", "api_key")
            .await
            .unwrap(),
        found
    );
    // Negative control: the other path finds only its own readers.
    let other = e
        .roller
        .consumers_of("secret", "demo/other", "api_key")
        .await
        .unwrap();
    assert_eq!(
        summary(&other),
        [
            "Deployment/apps/agent-other -> apps/Deployment/agent-other",
            "Deployment/apps/envfrom-other -> apps/Deployment/envfrom-other",
            "ExternalSecret/apps/other -> ",
            "Secret/apps/other-openai -> ",
        ]
    );
    // A path nothing reads.
    assert!(e
        .roller
        .consumers_of("secret", "demo/nobody", "api_key")
        .await
        .unwrap()
        .is_empty());
    let ok: Vec<_> = e.calls.of("consumers.pods.list", 0);
    assert!(!ok.is_empty() && ok.iter().all(|s| *s == StatusClass::Success));
}

#[tokio::test]
async fn consumers_skip_an_uninstalled_crd_but_fail_on_a_server_error() {
    let e = env(20).await;
    consumer_deployment(
        &e.sim,
        "apps",
        "agent-app",
        serde_json::json!({"vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-k": "secret/demo/chatbot"}),
        serde_json::json!({}),
    );
    pods_of(&e, "apps", "agent-app").await;
    assert!(e
        .sim
        .set_crd_installed("vaultstaticsecrets.secrets.hashicorp.com", false));
    assert!(e
        .sim
        .set_crd_installed("externalsecrets.external-secrets.io", false));
    let from = e.calls.len();
    let found = e
        .roller
        .consumers_of("secret", "demo/chatbot", "k")
        .await
        .unwrap();
    assert_eq!(
        summary(&found),
        ["Deployment/apps/agent-app -> apps/Deployment/agent-app"]
    );
    // A 404 is an answer ("not installed"), not retried.
    assert_eq!(
        e.calls.of("consumers.externalsecrets.list", from),
        [StatusClass::Success]
    );
    assert_eq!(
        e.calls.of("consumers.vaultstaticsecrets.list", from),
        [StatusClass::Success]
    );
    // A 5xx on a source is an error (transient), after the bounded retries.
    e.sim
        .set_crd_installed("externalsecrets.external-secrets.io", true);
    e.sim.set_faults(openai_key_rotator::sandbox::kube::Faults {
        fail_next: Some(openai_key_rotator::sandbox::kube::FailNext {
            count: 100,
            status: 503,
            operations: vec!["externalsecrets.list".into()],
        }),
        ..Default::default()
    });
    let err = e
        .roller
        .consumers_of("secret", "demo/chatbot", "k")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Failed {
                transient: true,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn consumer_pods_resolve_to_statefulsets_daemonsets_rollouts_or_themselves() {
    let e = env(20).await;
    let ann = serde_json::json!({"vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/agent-inject-secret-openai": "secret/data/demo/chatbot"});
    let with_ann = |mut v: serde_json::Value| {
        v["spec"]["template"]["metadata"]["annotations"] = ann.clone();
        v
    };
    let sts = with_ann(serde_json::to_value(KubeSim::simple_statefulset("apps", "db", 1)).unwrap());
    e.sim
        .create_statefulset(serde_json::from_value(sts).unwrap())
        .unwrap();
    let ds = with_ann(serde_json::to_value(KubeSim::simple_daemonset("apps", "agent")).unwrap());
    e.sim
        .create_daemonset(serde_json::from_value(ds).unwrap())
        .unwrap();
    e.sim
        .create_rollout(with_ann(KubeSim::simple_rollout("apps", "canary", 1)))
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(e.roller.client(), "apps");
    let bare: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bare", "annotations": ann},
        "spec": {"containers": [{"name": "app", "image": "registry.example/x:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &bare).await.unwrap();
    for app in ["db", "agent", "canary"] {
        pods_of(&e, "apps", app).await;
    }
    let found = e
        .roller
        .consumers_of("secret", "demo/chatbot", "api_key")
        .await
        .unwrap();
    assert_eq!(
        summary(&found),
        [
            "DaemonSet/apps/agent -> apps/DaemonSet/agent",
            "Pod/apps/bare -> ",
            "Rollout/apps/canary -> apps/Rollout/canary",
            "StatefulSet/apps/db -> apps/StatefulSet/db",
        ],
        "{found:#?}"
    );
}

#[tokio::test]
async fn a_forbidden_source_is_an_error_not_an_empty_answer() {
    let e = env(20).await;
    let es = openai_key_rotator::kube::external_secret_resource();
    create_dynamic(
        &e,
        &es,
        "apps",
        serde_json::json!({
            "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
            "metadata": {"name": "chat", "namespace": "apps"},
            "spec": {"data": [{"secretKey": "k", "remoteRef": {"key": "secret/demo/chatbot"}}]}
        }),
    )
    .await;
    consumer_deployment(
        &e.sim,
        "apps",
        "mounts-es",
        serde_json::json!({}),
        serde_json::json!({
        "volumes": [{"name": "key", "secret": {"secretName": "chat"}}]}),
    );
    pods_of(&e, "apps", "mounts-es").await;
    // RBAC without discovery.enabled: no cluster-wide pods list.
    assert!(e.sim.set_forbidden("pods", true));
    let from = e.calls.len();
    let err = e
        .roller
        .consumers_of("secret", "demo/chatbot", "k")
        .await
        .expect_err("not checked must not pass for none found");
    assert!(err.to_string().contains("forbidden"), "{err}");
    // Forbidden is final: asked once, not retried.
    assert_eq!(
        e.calls.of("consumers.pods.list", from),
        [StatusClass::ClientError]
    );
    // Granted again: the Deployment mounting the Secret shows up.
    e.sim.set_forbidden("pods", false);
    let found = e
        .roller
        .consumers_of("secret", "demo/chatbot", "k")
        .await
        .unwrap();
    assert_eq!(
        summary(&found),
        [
            "Deployment/apps/mounts-es -> apps/Deployment/mounts-es",
            "ExternalSecret/apps/chat -> ",
            "Secret/apps/chat -> ",
        ]
    );
}
