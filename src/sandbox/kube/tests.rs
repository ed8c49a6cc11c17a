//! Handle-level tests: the controller driven in process, no HTTP.

use super::*;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::time::timeout;

fn fast() -> KubeSimOptions {
    KubeSimOptions {
        pod_ready_delay: Duration::from_millis(40),
        tick: Duration::from_millis(10),
        pod_termination_delay: Duration::from_millis(30),
        ..Default::default()
    }
}

fn running(opts: KubeSimOptions) -> (KubeSim, CancellationToken) {
    let sim = KubeSim::new(opts);
    let cancel = CancellationToken::new();
    sim.start_controller(cancel.clone());
    (sim, cancel)
}

fn active(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn set_annotation(d: &mut Deployment, key: &str, value: &str) {
    let spec = d.spec.as_mut().unwrap();
    spec.template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default)
        .insert(key.into(), value.into());
}

#[tokio::test]
async fn a_new_deployment_comes_up_with_real_status() {
    let (sim, _stop) = running(fast());
    sim.create_deployment(KubeSim::simple_deployment("ns", "web", 3))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "web", Duration::from_secs(10))
            .await
    );
    let d = sim.deployment("ns", "web").unwrap();
    let st = d.status.clone().unwrap();
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        (
            st.replicas,
            st.updated_replicas,
            st.ready_replicas,
            st.available_replicas
        ),
        (Some(3), Some(3), Some(3), Some(3))
    );
    assert_eq!(st.unavailable_replicas, None, "zero is omitted, as in Go");
    let conds = st.conditions.unwrap();
    let get = |t: &str| conds.iter().find(|c| c.type_ == t).unwrap();
    assert_eq!(get("Available").status, "True");
    assert_eq!(
        get("Progressing").reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );
    assert_eq!(d.metadata.annotations.unwrap()[controller::REVISION], "1");

    let rss = sim.replica_sets("ns", "app=web");
    assert_eq!(rss.len(), 1);
    let rs = &rss[0];
    let hash = rs.metadata.labels.as_ref().unwrap()[controller::HASH_LABEL].clone();
    assert_eq!(
        rs.metadata.name.as_deref(),
        Some(format!("web-{hash}").as_str())
    );
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Deployment", Some(true))
    );

    let pods = sim.pods("ns", "app=web");
    assert_eq!(pods.len(), 3);
    for p in &pods {
        assert!(is_ready(p));
        let name = p.metadata.name.as_deref().unwrap();
        assert!(
            name.starts_with(&format!("web-{hash}-"))
                && name.len() == format!("web-{hash}-").len() + 5
        );
        assert_eq!(
            p.metadata.labels.as_ref().unwrap()[controller::HASH_LABEL],
            hash
        );
        let st = p.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert!(st.container_statuses.as_ref().unwrap()[0].ready);
    }
    // A pod-template-hash selector finds the same pods.
    assert_eq!(
        sim.pods("ns", &format!("pod-template-hash={hash}")).len(),
        3
    );
    assert!(
        sim.pods("ns", "app in (").is_empty(),
        "bad selector matches nothing"
    );
}

#[tokio::test]
async fn rolling_update_honours_surge_and_unavailable() {
    let (sim, _stop) = running(fast());
    let mut d = KubeSim::simple_deployment("ns", "api", 4);
    let strategy = d
        .spec
        .as_mut()
        .unwrap()
        .strategy
        .get_or_insert_with(Default::default);
    strategy.rolling_update = Some(k8s_openapi::api::apps::v1::RollingUpdateDeployment {
        max_surge: Some(IntOrString::Int(1)),
        max_unavailable: Some(IntOrString::Int(0)),
    });
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "api", Duration::from_secs(10))
            .await
    );
    let before = sim.deployment("ns", "api").unwrap();

    let after = sim
        .update_deployment("ns", "api", |d| {
            set_annotation(d, "openai-key-rotator/rotation-id", "r1")
        })
        .unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(
        before.status, after.status,
        "a main-resource update keeps status"
    );

    let started = Instant::now();
    let mut saw_old_and_new = false;
    loop {
        let pods = sim.pods("ns", "app=api");
        let live = active(&pods);
        let hashes: HashSet<&str> = live
            .iter()
            .map(|p| p.metadata.labels.as_ref().unwrap()[controller::HASH_LABEL].as_str())
            .collect();
        saw_old_and_new |= hashes.len() == 2;
        assert!(
            live.len() <= 5,
            "maxSurge 1: at most 5 pods, saw {}",
            live.len()
        );
        let ready = live.iter().filter(|p| is_ready(p)).count();
        assert!(ready >= 4, "maxUnavailable 0: saw {ready} ready");
        if let Some(RolloutStatus::Complete) =
            sim.deployment("ns", "api").map(|d| rollout_status(&d))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "rollout did not finish"
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(
        saw_old_and_new,
        "old and new pods overlapped during the rollout"
    );

    let d = sim.deployment("ns", "api").unwrap();
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()[controller::REVISION],
        "2"
    );
    let rss = sim.replica_sets("ns", "app=api");
    assert_eq!(rss.len(), 2);
    let new_rs = rss
        .iter()
        .find(|r| r.metadata.annotations.as_ref().unwrap()[controller::REVISION] == "2")
        .unwrap();
    let old_rs = rss
        .iter()
        .find(|r| r.metadata.name != new_rs.metadata.name)
        .unwrap();
    assert_eq!(old_rs.spec.as_ref().unwrap().replicas, Some(0));
    let new_hash = &new_rs.metadata.labels.as_ref().unwrap()[controller::HASH_LABEL];
    let pods = sim.pods("ns", "app=api");
    let live = active(&pods);
    assert_eq!(live.len(), 4);
    for p in live {
        assert_eq!(
            &p.metadata.labels.as_ref().unwrap()[controller::HASH_LABEL],
            new_hash
        );
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()["openai-key-rotator/rotation-id"],
            "r1"
        );
        assert!(is_ready(p));
    }
}

#[tokio::test]
async fn a_never_ready_rollout_exceeds_its_progress_deadline() {
    let (sim, _stop) = running(fast());
    // A generous deadline for the first rollout (a loaded machine must not trip it; the
    // deadline has one-second granularity and can fire up to a second early)...
    let mut d = KubeSim::simple_deployment("ns", "stuck", 2);
    d.spec.as_mut().unwrap().progress_deadline_seconds = Some(60);
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "stuck", Duration::from_secs(10))
            .await
    );

    // ...then a 1 s deadline for the rollout that never becomes ready.
    sim.set_never_ready("ns", "stuck", true);
    sim.update_deployment("ns", "stuck", |d| {
        d.spec.as_mut().unwrap().progress_deadline_seconds = Some(1);
        set_annotation(d, "x", "1")
    })
    .unwrap();
    // Not complete while the new pod is never ready...
    assert!(
        !sim.wait_rollout_complete("ns", "stuck", Duration::from_secs(5))
            .await,
        "must not complete"
    );
    let d = sim.deployment("ns", "stuck").unwrap();
    let RolloutStatus::Failed(msg) = rollout_status(&d) else {
        panic!("expected the deadline to be exceeded: {:?}", d.status);
    };
    assert!(msg.contains("exceeded its progress deadline"));
    let st = d.status.unwrap();
    let p = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_deref()),
        ("False", Some("ProgressDeadlineExceeded"))
    );
    // maxUnavailable 25% of 2 rounds down to 0: both old pods stay up and ready.
    assert_eq!(st.available_replicas, Some(2));
    assert_eq!(st.updated_replicas, Some(1));
}

#[tokio::test]
async fn recreate_stops_old_pods_before_starting_new_ones() {
    let (sim, _stop) = running(fast());
    let mut events = sim.pod_events();
    let mut d = KubeSim::simple_deployment("ns", "batch", 2);
    d.spec.as_mut().unwrap().strategy = Some(k8s_openapi::api::apps::v1::DeploymentStrategy {
        type_: Some("Recreate".into()),
        rolling_update: None,
    });
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "batch", Duration::from_secs(10))
            .await
    );
    let old: HashSet<String> = sim
        .pods("ns", "app=batch")
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    sim.update_deployment("ns", "batch", |d| set_annotation(d, "x", "2"))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "batch", Duration::from_secs(10))
            .await
    );

    let mut log = Vec::new();
    while let Ok(ev) = events.try_recv() {
        log.push(ev);
    }
    let last_old_gone = log
        .iter()
        .rposition(|e| matches!(e, PodEvent::Terminated { pod, .. } if old.contains(pod)))
        .expect("old pods terminated");
    let first_new = log
        .iter()
        .position(|e| matches!(e, PodEvent::Started { pod, .. } if !old.contains(pod)))
        .expect("new pods started");
    assert!(last_old_gone < first_new, "{log:?}");
    let live = sim.pods("ns", "app=batch");
    assert!(live
        .iter()
        .all(|p| !old.contains(p.metadata.name.as_deref().unwrap())));
}

#[tokio::test]
async fn readiness_gates_and_pod_events() {
    let (sim, _stop) = running(fast());
    let mut events = sim.pod_events();
    sim.set_readiness_gate("ns", "consumer", true);
    let mut d = KubeSim::simple_deployment("ns", "consumer", 1);
    set_annotation(&mut d, "consumer/key-source", "vault");
    sim.create_deployment(d).unwrap();

    let ev = timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    let PodEvent::Started {
        namespace,
        pod,
        workload,
        labels,
        annotations,
    } = ev
    else {
        panic!("expected Started, got {ev:?}");
    };
    assert_eq!(namespace, "ns");
    assert_eq!(
        workload,
        Some(("Deployment".to_string(), "consumer".to_string()))
    );
    assert_eq!(labels["app"], "consumer");
    assert_eq!(annotations["consumer/key-source"], "vault");

    // Gated: never ready on its own, however long the delay.
    assert!(
        !sim.wait_rollout_complete("ns", "consumer", Duration::from_millis(400))
            .await
    );
    assert!(!is_ready(&sim.pods("ns", "app=consumer")[0]));
    sim.open_readiness_gate("ns", &pod);
    assert!(
        sim.wait_rollout_complete("ns", "consumer", Duration::from_secs(5))
            .await
    );

    // A rollout terminates the old pod: its consumer hears about it.
    sim.set_readiness_gate("ns", "consumer", false);
    sim.update_deployment("ns", "consumer", |d| set_annotation(d, "r", "2"))
        .unwrap();
    let term = timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(PodEvent::Terminated {
                pod: p, workload, ..
            }) = events.recv().await
            {
                break (p, workload);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(term.0, pod);
    assert_eq!(
        term.1,
        Some(("Deployment".to_string(), "consumer".to_string()))
    );
}

#[tokio::test]
async fn ready_delay_is_per_workload() {
    let (sim, _stop) = running(fast());
    sim.set_ready_delay("ns", "slow", Duration::from_millis(600));
    sim.create_deployment(KubeSim::simple_deployment("ns", "slow", 1))
        .unwrap();
    sim.create_deployment(KubeSim::simple_deployment("ns", "quick", 1))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "quick", Duration::from_secs(5))
            .await
    );
    let t = Instant::now();
    assert!(
        sim.wait_rollout_complete("ns", "slow", Duration::from_secs(5))
            .await
    );
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn secrets_and_tokens_through_the_handle() {
    let sim = KubeSim::new(fast());
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "k", "namespace": "ns"}, "stringData": {"OPENAI_API_KEY": "sk-1"}
    }))
    .unwrap();
    let stored = sim.put_secret(s.clone()).unwrap();
    assert_eq!(stored.data.unwrap()["OPENAI_API_KEY"].0, b"sk-1");
    let rv1 = stored.metadata.resource_version.clone();
    let mut s2 = s;
    s2.string_data = Some([("OPENAI_API_KEY".to_string(), "sk-2".to_string())].into());
    let stored = sim.put_secret(s2).unwrap();
    assert_ne!(stored.metadata.resource_version, rv1);
    assert_eq!(
        sim.secret("ns", "k").unwrap().data.unwrap()["OPENAI_API_KEY"].0,
        b"sk-2"
    );
    assert!(sim.secret("ns", "missing").is_none());
    let dbg = format!("{sim:?}");
    assert!(!dbg.contains("sk-2"), "{dbg}");
}

// ---------------------------------------------------------------------------------------
// StatefulSets and DaemonSets

fn labels(p: &Pod) -> &BTreeMap<String, String> {
    p.metadata.labels.as_ref().unwrap()
}

fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap()
}

/// Template annotation change on any workload kind, through the client-side update path.
fn sts_roll(sim: &KubeSim, ns: &str, name: &str, value: &str) {
    sim.update_statefulset(ns, name, |s| {
        s.spec
            .as_mut()
            .unwrap()
            .template
            .metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert("r".into(), value.into());
    })
    .unwrap();
}

fn ds_roll(sim: &KubeSim, ns: &str, name: &str, value: &str) {
    sim.update_daemonset(ns, name, |d| {
        d.spec
            .as_mut()
            .unwrap()
            .template
            .metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert("r".into(), value.into());
    })
    .unwrap();
}

fn drain(events: &mut broadcast::Receiver<PodEvent>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(ev) = events.try_recv() {
        out.push(match ev {
            PodEvent::Started { pod, workload, .. } => {
                assert_eq!(workload.unwrap().0, "StatefulSet");
                format!("+{pod}")
            }
            PodEvent::Terminated { pod, workload, .. } => {
                assert_eq!(workload.unwrap().0, "StatefulSet");
                format!("-{pod}")
            }
        });
    }
    out
}

#[tokio::test]
async fn a_statefulset_starts_in_order_and_rolls_in_reverse_one_pod_at_a_time() {
    let (sim, _stop) = running(fast());
    let mut events = sim.pod_events();
    sim.create_statefulset(KubeSim::simple_statefulset("ns", "db", 3))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "db", Duration::from_secs(10))
            .await
    );
    assert_eq!(drain(&mut events), ["+db-0", "+db-1", "+db-2"]);

    let s = sim.statefulset("ns", "db").unwrap();
    let spec = s.spec.clone().unwrap();
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(strategy.rolling_update.unwrap().partition, Some(0));
    let st = s.status.unwrap();
    let rev1 = st.update_revision.clone().unwrap();
    assert_eq!(st.current_revision.as_deref(), Some(rev1.as_str()));
    assert_eq!(
        (
            st.observed_generation,
            st.replicas,
            st.ready_replicas,
            st.available_replicas,
            st.current_replicas,
            st.updated_replicas
        ),
        (Some(1), 3, Some(3), Some(3), Some(3), Some(3))
    );
    let pods = sim.pods("ns", "app=db");
    let mut names: Vec<&str> = pods.iter().map(name).collect();
    names.sort();
    assert_eq!(names, ["db-0", "db-1", "db-2"]);
    for p in &pods {
        assert_eq!(labels(p)[revisions::REVISION_LABEL], rev1);
        assert_eq!(labels(p)["statefulset.kubernetes.io/pod-name"], name(p));
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some(name(p)));
        assert_eq!(spec.subdomain.as_deref(), Some("db"));
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("StatefulSet", "db")
        );
    }
    let revs = sim.controller_revisions("ns", "app=db");
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].metadata.name.as_deref(), Some(rev1.as_str()));
    assert_eq!(revs[0].revision, 1);

    // Roll. At no moment may two pods be out of service, and pods go 2, 1, 0.
    sts_roll(&sim, "ns", "db", "2");
    let t = Instant::now();
    loop {
        let pods = sim.pods("ns", "app=db");
        let down = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some() || !is_ready(p))
            .count()
            + 3usize.saturating_sub(pods.len());
        assert!(
            down <= 1,
            "two pods out at once: {:?}",
            pods.iter().map(name).collect::<Vec<_>>()
        );
        if sim
            .workload_rollout_status(WorkloadKind::StatefulSet, "ns", "db")
            .unwrap()
            == RolloutStatus::Complete
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "rollout stuck");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(
        drain(&mut events),
        ["-db-2", "+db-2", "-db-1", "+db-1", "-db-0", "+db-0"]
    );
    let st = sim.statefulset("ns", "db").unwrap().status.unwrap();
    let rev2 = st.update_revision.clone().unwrap();
    assert_ne!(rev2, rev1);
    assert_eq!(st.current_revision.as_deref(), Some(rev2.as_str()));
    assert_eq!(st.observed_generation, Some(2));
    assert!(sim
        .pods("ns", "app=db")
        .iter()
        .all(|p| labels(p)[revisions::REVISION_LABEL] == rev2 && is_ready(p)));
    let mut revs: Vec<i64> = sim
        .controller_revisions("ns", "app=db")
        .iter()
        .map(|r| r.revision)
        .collect();
    revs.sort();
    assert_eq!(revs, [1, 2]);

    // Scale down removes the highest ordinals; the selector is immutable.
    sim.update_statefulset("ns", "db", |s| s.spec.as_mut().unwrap().replicas = Some(1))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "db", Duration::from_secs(10))
            .await
    );
    let t = Instant::now();
    while active(&sim.pods("ns", "app=db")).len() != 1 || sim.pods("ns", "app=db").len() != 1 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(name(&sim.pods("ns", "app=db")[0]), "db-0");
    let e = sim
        .update_statefulset("ns", "db", |s| {
            s.spec.as_mut().unwrap().service_name = Some("x".into())
        })
        .unwrap_err();
    assert_eq!(e.reason(), "Invalid");
}

#[tokio::test]
async fn a_never_ready_statefulset_stops_after_its_highest_pod() {
    let (sim, _stop) = running(fast());
    sim.create_statefulset(KubeSim::simple_statefulset("ns", "db", 3))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "db", Duration::from_secs(10))
            .await
    );
    let old = sim
        .statefulset("ns", "db")
        .unwrap()
        .status
        .unwrap()
        .update_revision;
    sim.set_never_ready_for(WorkloadKind::StatefulSet, "ns", "db", true);
    sts_roll(&sim, "ns", "db", "2");
    assert!(
        !sim.wait_rollout_complete("ns", "db", Duration::from_millis(800))
            .await
    );
    let pods = sim.pods("ns", "app=db");
    let rev = |n: &str| {
        let p = pods.iter().find(|p| name(p) == n).unwrap();
        (labels(p)[revisions::REVISION_LABEL].clone(), is_ready(p))
    };
    assert_eq!(rev("db-0"), (old.clone().unwrap(), true));
    assert_eq!(
        rev("db-1"),
        (old.unwrap(), true),
        "the rollout waits on db-2"
    );
    assert!(!rev("db-2").1);
    assert_eq!(
        sim.workload_rollout_status(WorkloadKind::StatefulSet, "ns", "db"),
        Some(RolloutStatus::Waiting(
            "Waiting for 1 pods to be ready...".into()
        ))
    );
    // Fixed: the rollout finishes.
    sim.set_never_ready("ns", "db", false);
    assert!(
        sim.wait_rollout_complete("ns", "db", Duration::from_secs(10))
            .await
    );
}

#[tokio::test]
async fn kind_specific_settings_leave_a_same_named_deployment_alone() {
    let (sim, _stop) = running(fast());
    sim.set_never_ready_for(WorkloadKind::StatefulSet, "ns", "x", true);
    sim.create_statefulset(KubeSim::simple_statefulset("ns", "x", 1))
        .unwrap();
    let mut d = KubeSim::simple_deployment("ns", "x", 1);
    // Distinct pods: a label the StatefulSet's selector does not need.
    d.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .insert("kind".into(), "deploy".into());
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete_for(WorkloadKind::Deployment, "ns", "x", Duration::from_secs(5))
            .await
    );
    assert!(
        !sim.wait_rollout_complete_for(
            WorkloadKind::StatefulSet,
            "ns",
            "x",
            Duration::from_millis(300)
        )
        .await
    );
}

/// Poll a DaemonSet's rollout to completion; returns the most nodes seen at once without
/// an available-looking (ready, not terminating) pod.
async fn ds_rollout_max_down(sim: &KubeSim, ns: &str, name: &str, nodes: usize) -> usize {
    let t = Instant::now();
    let mut max_down = 0;
    loop {
        let pods = sim.pods(ns, &format!("app={name}"));
        let up = daemonset::node_names(nodes)
            .iter()
            .filter(|n| {
                pods.iter().any(|p| {
                    p.spec.as_ref().unwrap().node_name.as_deref() == Some(n.as_str())
                        && p.metadata.deletion_timestamp.is_none()
                        && is_ready(p)
                })
            })
            .count();
        max_down = max_down.max(nodes - up);
        if sim.workload_rollout_status(WorkloadKind::DaemonSet, ns, name)
            == Some(RolloutStatus::Complete)
        {
            return max_down;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "rollout stuck");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_daemonset_runs_one_pod_per_node_and_rolls_within_max_unavailable() {
    let (sim, _stop) = running(KubeSimOptions { nodes: 4, ..fast() });
    sim.create_daemonset(KubeSim::simple_daemonset("ns", "agent"))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "agent", Duration::from_secs(10))
            .await
    );
    let ds = sim.daemonset("ns", "agent").unwrap();
    assert_eq!(
        ds.metadata.annotations.as_ref().unwrap()[daemonset::TEMPLATE_GENERATION],
        "1"
    );
    let st = ds.status.unwrap();
    assert_eq!(
        (
            st.desired_number_scheduled,
            st.current_number_scheduled,
            st.number_ready,
            st.updated_number_scheduled,
            st.number_available,
            st.number_unavailable,
            st.observed_generation
        ),
        (4, 4, 4, Some(4), Some(4), None, Some(1))
    );
    let pods = sim.pods("ns", "app=agent");
    let mut nodes: Vec<String> = pods
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, daemonset::node_names(4));
    let hash1 = labels(&pods[0])[revisions::REVISION_LABEL].clone();
    assert!(pods
        .iter()
        .all(|p| labels(p)["pod-template-generation"] == "1"
            && labels(p)[revisions::REVISION_LABEL] == hash1));

    // maxUnavailable 1 (the default): one node at a time.
    ds_roll(&sim, "ns", "agent", "2");
    assert_eq!(ds_rollout_max_down(&sim, "ns", "agent", 4).await, 1);
    let pods = sim.pods("ns", "app=agent");
    assert_eq!(active(&pods).len(), 4);
    let hash2 = labels(&pods[0])[revisions::REVISION_LABEL].clone();
    assert_ne!(hash1, hash2);
    assert!(active(&pods)
        .iter()
        .all(|p| labels(p)["pod-template-generation"] == "2" && is_ready(p)));

    // maxUnavailable 3: several nodes at once, never all four.
    sim.update_daemonset("ns", "agent", |d| {
        let ru = d
            .spec
            .as_mut()
            .unwrap()
            .update_strategy
            .as_mut()
            .unwrap()
            .rolling_update
            .as_mut()
            .unwrap();
        ru.max_unavailable = Some(IntOrString::Int(3));
    })
    .unwrap();
    ds_roll(&sim, "ns", "agent", "3");
    let down = ds_rollout_max_down(&sim, "ns", "agent", 4).await;
    assert!((2..=3).contains(&down), "{down}");
}

#[tokio::test]
async fn a_never_ready_daemonset_holds_at_one_node() {
    let (sim, _stop) = running(KubeSimOptions { nodes: 3, ..fast() });
    sim.create_daemonset(KubeSim::simple_daemonset("ns", "agent"))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("ns", "agent", Duration::from_secs(10))
            .await
    );
    sim.set_never_ready("ns", "agent", true);
    ds_roll(&sim, "ns", "agent", "2");
    assert!(
        !sim.wait_rollout_complete("ns", "agent", Duration::from_millis(800))
            .await
    );
    let pods = sim.pods("ns", "app=agent");
    let live = active(&pods);
    assert_eq!(live.len(), 3);
    assert_eq!(
        live.iter().filter(|p| is_ready(p)).count(),
        2,
        "only one node is out"
    );
    assert_eq!(
        live.iter()
            .filter(|p| labels(p)["pod-template-generation"] == "2")
            .count(),
        1
    );
    assert!(matches!(
        sim.workload_rollout_status(WorkloadKind::DaemonSet, "ns", "agent"),
        Some(RolloutStatus::Waiting(m)) if m.contains("1 out of 3 new pods have been updated")
    ));
}

#[tokio::test]
async fn readiness_gates_and_pod_events_for_daemonsets() {
    let (sim, _stop) = running(fast());
    let mut events = sim.pod_events();
    sim.set_readiness_gate("ns", "agent", true);
    sim.create_daemonset(KubeSim::simple_daemonset("ns", "agent"))
        .unwrap();
    let mut started = Vec::new();
    while started.len() < 2 {
        let ev = timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        if let PodEvent::Started { pod, workload, .. } = ev {
            assert_eq!(
                workload,
                Some(("DaemonSet".to_string(), "agent".to_string()))
            );
            started.push(pod);
        }
    }
    // Gated: never ready on its own.
    assert!(
        !sim.wait_rollout_complete("ns", "agent", Duration::from_millis(400))
            .await
    );
    sim.open_readiness_gate("ns", &started[0]);
    assert!(
        !sim.wait_rollout_complete("ns", "agent", Duration::from_millis(300))
            .await,
        "one node is still gated"
    );
    sim.open_readiness_gate("ns", &started[1]);
    assert!(
        sim.wait_rollout_complete("ns", "agent", Duration::from_secs(5))
            .await
    );
}

// ---------------------------------------------------------------------------------------
// incremental reconciling (large clusters)

fn incremental(cap: usize) -> KubeSimOptions {
    KubeSimOptions {
        incremental: true,
        // Only the incremental bookkeeping may drive progress in these tests.
        full_resync: Duration::from_secs(3600),
        max_namespaces_per_tick: cap,
        ..fast()
    }
}

#[tokio::test]
async fn incremental_mode_rolls_out_waits_on_time_and_follows_handle_changes() {
    // A cap of 2 namespaces per tick over 6 namespaces: the round-robin must reach all.
    let (sim, _stop) = running(incremental(2));
    for i in 0..5 {
        let ns = format!("ns{i}");
        sim.create_deployment(KubeSim::simple_deployment(&ns, "web", 2))
            .unwrap();
    }
    // Pods that wait on time (the ready delay) come up with no full pass to help.
    sim.set_ready_delay("ns0", "web", Duration::from_millis(300));
    for i in 0..5 {
        assert!(
            sim.wait_rollout_complete(&format!("ns{i}"), "web", Duration::from_secs(10))
                .await,
            "ns{i}"
        );
    }
    // Idle: nothing changed and nothing waits, so a tick reconciles no namespace.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sim.shared.lock().tracker.last_pass(), Some(0));
    let untouched_rv = sim
        .deployment("ns4", "web")
        .and_then(|d| d.metadata.resource_version);

    // A change in one namespace rolls it out; the others are left alone.
    sim.update_deployment("ns1", "web", |d| {
        set_annotation(d, "openai-key-rotator/rotation-id", "r1")
    })
    .unwrap();
    assert!(
        sim.wait_rollout_complete("ns1", "web", Duration::from_secs(10))
            .await
    );
    let pods = sim.pods("ns1", "app=web");
    assert!(active(&pods).iter().all(|p| p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("openai-key-rotator/rotation-id"))));
    assert_eq!(
        sim.deployment("ns4", "web")
            .and_then(|d| d.metadata.resource_version),
        untouched_rv
    );

    // A progress deadline is time too: a never-ready rollout fails on its own.
    sim.set_never_ready("ns2", "web", true);
    sim.update_deployment("ns2", "web", |d| {
        d.spec.as_mut().unwrap().progress_deadline_seconds = Some(1);
        set_annotation(d, "x", "1");
    })
    .unwrap();
    let failed = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(RolloutStatus::Failed(_)) =
                sim.workload_rollout_status(WorkloadKind::Deployment, "ns2", "web")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "ProgressDeadlineExceeded never came");

    // A gated pod becomes ready once its gate opens.
    sim.set_readiness_gate("ns5", "web", true);
    sim.create_deployment(KubeSim::simple_deployment("ns5", "web", 1))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pod = active(&sim.pods("ns5", "app=web"))
        .first()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .expect("a pod");
    assert!(
        !sim.wait_rollout_complete("ns5", "web", Duration::from_millis(200))
            .await
    );
    sim.open_readiness_gate("ns5", &pod);
    assert!(
        sim.wait_rollout_complete("ns5", "web", Duration::from_secs(10))
            .await
    );
}

#[test]
fn operation_names_cover_what_the_daemon_calls() {
    let ops = operations();
    for op in [
        "deployments.get",
        "deployments.patch",
        "deployments.watch",
        "deployments.status.update",
        "deployments.scale.patch",
        "statefulsets.patch",
        "daemonsets.patch",
        "pods.list",
        "secrets.get",
        "secrets.patch",
        "events.create",
        "leases.get",
        "leases.update",
        "leases.create",
        "tokenreviews.create",
        "discovery",
    ] {
        assert!(ops.iter().any(|o| o == op), "{op} missing from {ops:?}");
    }
    // Only verbs a resource really serves: TokenReviews are create-only.
    assert!(!ops.iter().any(|o| o == "tokenreviews.get"));
    let mut sorted = ops.to_vec();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ops.len(),
        "no duplicates (two Event APIs share names)"
    );
}

async fn until_rollout(
    sim: &KubeSim,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let ro = sim.rollout("ns", "ro").unwrap();
        if f(&ro) {
            return ro;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: {ro:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn rollouts_come_up_and_the_control_knobs_degrade_abort_and_pause_them() {
    let (sim, _stop) = running(fast());
    // Admission: a Rollout needs a selector and a pod template with containers.
    let mut bad = KubeSim::simple_rollout("ns", "bad", 1);
    bad["spec"].as_object_mut().unwrap().remove("selector");
    assert!(matches!(
        sim.create_rollout(bad),
        Err(KubeSimError::Invalid { .. })
    ));
    sim.create_rollout(KubeSim::simple_rollout("ns", "ro", 2))
        .unwrap();
    assert!(
        sim.wait_rollout_complete_for(WorkloadKind::Rollout, "ns", "ro", Duration::from_secs(10))
            .await
    );
    let ro = sim.rollout("ns", "ro").unwrap();
    let st = &ro["status"];
    assert_eq!(st["observedGeneration"], "1");
    assert_eq!(
        (
            st["replicas"].as_i64(),
            st["updatedReplicas"].as_i64(),
            st["availableReplicas"].as_i64()
        ),
        (Some(2), Some(2), Some(2))
    );
    assert_eq!(st["stableRS"], st["currentPodHash"]);
    // The pods' owner chain names the Rollout (what consumers and PodEvents key on).
    let owners = sim.pod_owners("ns");
    assert_eq!(owners.len(), 2);
    assert!(owners
        .iter()
        .all(|o| o.workload == Some(("Rollout".into(), "ro".into()))));

    // Through the control API's settings: abort, then clear.
    sim.set_workload_faults(
        "ns",
        "ro",
        &WorkloadFaults {
            kind: Some("Rollout".into()),
            aborted: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    until_rollout(&sim, "aborted", |r| {
        r["status"]["abort"] == true && r["status"]["phase"] == "Degraded"
    })
    .await;
    assert!(
        matches!(sim.workload_rollout_status(WorkloadKind::Rollout, "ns", "ro"), Some(RolloutStatus::Failed(m)) if m.contains("RolloutAborted"))
    );
    sim.set_workload_faults(
        "ns",
        "ro",
        &WorkloadFaults {
            aborted: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    until_rollout(&sim, "healthy again", |r| {
        r["status"]["phase"] == "Healthy" && r["status"].get("abort").is_none()
    })
    .await;

    // A controller pause, then resumed ("" clears it).
    sim.set_workload_faults(
        "ns",
        "ro",
        &WorkloadFaults {
            pause_condition: Some("CanaryPauseStep".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let ro = until_rollout(&sim, "paused", |r| r["status"]["phase"] == "Paused").await;
    assert_eq!(
        ro["status"]["pauseConditions"][0]["reason"],
        "CanaryPauseStep"
    );
    assert_eq!(ro["status"]["controllerPause"], true);
    sim.set_workload_faults(
        "ns",
        "ro",
        &WorkloadFaults {
            pause_condition: Some(String::new()),
            ..Default::default()
        },
    )
    .unwrap();
    until_rollout(&sim, "resumed", |r| r["status"]["phase"] == "Healthy").await;

    // One degraded restart, then a restart that completes.
    sim.set_workload_faults(
        "ns",
        "ro",
        &WorkloadFaults {
            degrade_restarts: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let at = |s: i64| {
        chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + s, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let first = at(1);
    sim.update_rollout("ns", "ro", |r| {
        r["spec"]["restartAt"] = serde_json::json!(first)
    })
    .unwrap();
    let ro = until_rollout(&sim, "degraded", |r| r["status"]["phase"] == "Degraded").await;
    assert!(
        ro["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("ProgressDeadlineExceeded"),
        "{ro:#}"
    );
    let second = at(2);
    sim.update_rollout("ns", "ro", |r| {
        r["spec"]["restartAt"] = serde_json::json!(second)
    })
    .unwrap();
    until_rollout(&sim, "restarted", |r| {
        r["status"]["restartedAt"] == serde_json::json!(second) && r["status"]["phase"] == "Healthy"
    })
    .await;
    // Unknown kinds are still refused by name.
    let err = sim
        .set_workload_faults(
            "ns",
            "ro",
            &WorkloadFaults {
                kind: Some("CronJob".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.contains("Rollout"), "{err}");
}
