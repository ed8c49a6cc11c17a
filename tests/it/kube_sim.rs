//! Acceptance tests of the Kubernetes simulator with clients nobody here wrote: the real
//! `kubectl` binary and kube-rs (typed `Api`, `watcher`, events `Recorder`).

use crate::support;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::core::WatchEvent;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use openai_key_rotator::sandbox::kube::{rollout_status, KubeSim, KubeSimOptions, RolloutStatus};
use openai_key_rotator::sandbox::{loopback, Server};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

const ROTATION_ID: &str = "openai-key-rotator/rotation-id";

fn opts(ready_ms: u64) -> KubeSimOptions {
    KubeSimOptions {
        pod_ready_delay: Duration::from_millis(ready_ms),
        tick: Duration::from_millis(20),
        pod_termination_delay: Duration::from_millis(50),
        ..Default::default()
    }
}

async fn start(ready_ms: u64) -> (KubeSim, Server) {
    let sim = KubeSim::new(opts(ready_ms));
    let server = sim
        .serve(loopback(0), Default::default())
        .await
        .expect("serve the simulator");
    (sim, server)
}

/// The real kubectl, pointed at the simulator through a kubeconfig in a temp dir.
struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(server: &Server, namespace: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            KubeSim::kubeconfig_yaml(&server.url(), Some(namespace)),
        )
        .unwrap();
        Kubectl {
            kubeconfig,
            cache: dir.path().join("cache"),
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(support::tool("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} hung"))
            .expect("run kubectl")
    }

    /// Run and require success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn active_pods(pods: &[Pod]) -> Vec<&Pod> {
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

fn hash_of(p: &Pod) -> String {
    p.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone()
}

/// The pod-template-hash of the Deployment's newest ReplicaSet.
fn newest_hash(sim: &KubeSim, ns: &str, app: &str) -> String {
    let rss = sim.replica_sets(ns, &format!("app={app}"));
    let newest = rss
        .iter()
        .max_by_key(|r| {
            r.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"]
                .parse::<u32>()
                .unwrap()
        })
        .unwrap();
    newest.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone()
}

#[tokio::test]
async fn kubectl_get_restart_and_rollout_status() {
    let (sim, server) = start(200).await;
    sim.create_deployment(KubeSim::simple_deployment("demo", "web", 3))
        .unwrap();
    assert!(
        sim.wait_rollout_complete("demo", "web", Duration::from_secs(10))
            .await
    );
    let k = Kubectl::new(&server, "demo");

    // `get -o json` prints the real objects.
    let list: Value =
        serde_json::from_str(&k.ok(&["get", "deployments", "-o", "json"]).await).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let d = &items[0];
    assert_eq!(
        (d["apiVersion"].as_str(), d["kind"].as_str()),
        (Some("apps/v1"), Some("Deployment"))
    );
    assert_eq!(d["metadata"]["name"], "web");
    assert_eq!(d["metadata"]["namespace"], "demo");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["status"]["readyReplicas"], 3);
    assert_eq!(d["status"]["observedGeneration"], 1);
    let typed: Deployment = serde_json::from_value(d.clone()).unwrap();
    assert_eq!(rollout_status(&typed), RolloutStatus::Complete);

    // `get pods -l` prints the server's Table.
    let out = k.ok(&["get", "pods", "-l", "app=web"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines[1..] {
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert!(cols[0].starts_with("web-"), "{l}");
        assert_eq!(&cols[1..3], ["1/1", "Running"], "{l}");
    }
    let none = k.run(&["get", "pods", "-l", "app=nothing"]).await;
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("No resources found in demo namespace"));
    let out = k
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.status.readyReplicas}/{.spec.replicas}",
        ])
        .await;
    assert_eq!(out, "3/3");

    // rollout restart, then rollout status returns exactly when the new pods are ready.
    let old_hash = newest_hash(&sim, "demo", "web");
    let out = k.ok(&["rollout", "restart", "deployment/web"]).await;
    assert!(out.contains("deployment.apps/web restarted"), "{out}");
    let t = Instant::now();
    let out = k
        .ok(&["rollout", "status", "deployment/web", "--timeout=60s"])
        .await;
    let took = t.elapsed();
    assert!(
        out.contains("deployment \"web\" successfully rolled out"),
        "{out}"
    );
    assert!(
        out.contains("Waiting for deployment \"web\" rollout to finish"),
        "kubectl watched progress: {out}"
    );
    assert!(
        took >= Duration::from_millis(200),
        "new pods need the ready delay; returned after {took:?}"
    );

    let new_hash = newest_hash(&sim, "demo", "web");
    assert_ne!(new_hash, old_hash);
    let pods = sim.pods("demo", "app=web");
    let live = active_pods(&pods);
    assert_eq!(live.len(), 3, "{pods:?}");
    for p in &live {
        assert_eq!(hash_of(p), new_hash, "only new pods remain");
        assert!(is_ready(p));
        assert!(p
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("kubectl.kubernetes.io/restartedAt"));
    }
    assert_eq!(
        rollout_status(&sim.deployment("demo", "web").unwrap()),
        RolloutStatus::Complete
    );
    let out = k.ok(&["rollout", "history", "deployment/web"]).await;
    assert!(out.lines().any(|l| l.starts_with('2')), "{out}");

    // `kubectl scale` goes through the scale subresource; deleting the Deployment
    // garbage-collects its ReplicaSets and pods.
    k.ok(&["scale", "deployment/web", "--replicas=1"]).await;
    k.ok(&["rollout", "status", "deployment/web", "--timeout=60s"])
        .await;
    assert_eq!(active_pods(&sim.pods("demo", "app=web")).len(), 1);
    let out = k.ok(&["delete", "deployment", "web"]).await;
    assert!(out.contains("deployment.apps \"web\" deleted"), "{out}");
    let t = Instant::now();
    while !(sim.pods("demo", "app=web").is_empty()
        && sim.replica_sets("demo", "app=web").is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "owned objects not collected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kubectl_rollout_status_fails_when_the_progress_deadline_passes() {
    let (sim, server) = start(50).await;
    // A generous deadline for the first rollout (one-second granularity, and a loaded
    // machine must not trip it); the short one is set before the never-ready rollout.
    let mut d = KubeSim::simple_deployment("demo", "stuck", 2);
    d.spec.as_mut().unwrap().progress_deadline_seconds = Some(60);
    sim.create_deployment(d).unwrap();
    assert!(
        sim.wait_rollout_complete("demo", "stuck", Duration::from_secs(10))
            .await
    );
    let k = Kubectl::new(&server, "demo");

    sim.update_deployment("demo", "stuck", |d| {
        d.spec.as_mut().unwrap().progress_deadline_seconds = Some(2)
    })
    .unwrap();
    sim.set_never_ready("demo", "stuck", true);
    k.ok(&["rollout", "restart", "deploy/stuck"]).await;
    let t = Instant::now();
    let out = k
        .run(&["rollout", "status", "deploy/stuck", "--timeout=60s"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("deployment \"stuck\" exceeded its progress deadline"),
        "{stderr}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    // The old pods kept serving: 25% of 2 rounds down to 0 unavailable.
    let pods = sim.pods("demo", "app=stuck");
    assert_eq!(active_pods(&pods).iter().filter(|p| is_ready(p)).count(), 2);
}

async fn kube_client(server: &Server, ns: &str) -> Client {
    let mut config = Config::new(server.url().parse().unwrap());
    config.default_namespace = ns.into();
    Client::try_from(config).unwrap()
}

fn api_code(e: &kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn annotation(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(ROTATION_ID)
        .cloned()
}

#[tokio::test]
async fn kube_rs_reads_patches_and_watches_a_rollout() {
    let (sim, server) = start(60).await;
    sim.create_deployment(KubeSim::simple_deployment("apps", "web", 2))
        .unwrap();
    sim.create_deployment(KubeSim::simple_deployment("apps", "api", 1))
        .unwrap();
    sim.create_deployment(KubeSim::simple_deployment("other", "web", 1))
        .unwrap();
    let client = kube_client(&server, "apps").await;
    let deps: Api<Deployment> = Api::default_namespaced(client.clone());

    // get / list with selectors
    let web = deps.get("web").await.unwrap();
    assert_eq!(web.metadata.namespace.as_deref(), Some("apps"));
    let names = |l: kube::core::ObjectList<Deployment>| {
        let mut v: Vec<String> = l
            .items
            .into_iter()
            .filter_map(|d| d.metadata.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(deps.list(&ListParams::default()).await.unwrap()),
        ["api", "web"]
    );
    assert_eq!(
        names(
            deps.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        ["web"]
    );
    assert_eq!(
        names(
            deps.list(&ListParams::default().labels("app!=web"))
                .await
                .unwrap()
        ),
        ["api"]
    );
    assert_eq!(
        names(
            deps.list(&ListParams::default().labels("app in (web,api)"))
                .await
                .unwrap()
        ),
        ["api", "web"]
    );
    assert_eq!(
        names(
            deps.list(&ListParams::default().labels("!app"))
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        names(
            deps.list(&ListParams::default().fields("metadata.name=api"))
                .await
                .unwrap()
        ),
        ["api"]
    );
    let everywhere: Api<Deployment> = Api::all(client.clone());
    let all = everywhere
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2, "web in two namespaces");
    let page = everywhere
        .list(&ListParams::default().limit(2))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = everywhere
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.metadata.continue_.is_none());
    let e = deps.get("nope").await.unwrap_err();
    assert_eq!(api_code(&e), (404, "NotFound".into()));
    let e = deps
        .list(&ListParams::default().labels("app in ("))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).0, 400);

    assert!(
        sim.wait_rollout_complete("apps", "web", Duration::from_secs(10))
            .await
    );
    let gen0 = deps.get("web").await.unwrap().metadata.generation.unwrap();

    // Watch from the current resourceVersion while three kinds of patch roll the pods.
    let start_rv = deps
        .get("web")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default()
        .fields("metadata.name=web")
        .timeout(60);
    let mut stream = deps.watch(&wp, &start_rv).await.unwrap().boxed();

    let pp = PatchParams::default();
    let merge =
        json!({"spec": {"template": {"metadata": {"annotations": {ROTATION_ID: "r-merge"}}}}});
    let d = deps.patch("web", &pp, &Patch::Merge(&merge)).await.unwrap();
    assert_eq!(annotation(&d).as_deref(), Some("r-merge"));
    assert_eq!(d.metadata.generation, Some(gen0 + 1));
    let strategic =
        json!({"spec": {"template": {"metadata": {"annotations": {ROTATION_ID: "r-strategic"}}}}});
    let d = deps
        .patch("web", &pp, &Patch::Strategic(&strategic))
        .await
        .unwrap();
    assert_eq!(annotation(&d).as_deref(), Some("r-strategic"));
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/template/metadata/annotations/openai-key-rotator~1rotation-id", "value": "r-json"}
    ]))
    .unwrap();
    let d = deps
        .patch("web", &pp, &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(annotation(&d).as_deref(), Some("r-json"));
    assert_eq!(d.metadata.generation, Some(gen0 + 3));

    // Follow the watch until the rollout of the last generation completes.
    let target_gen = gen0 + 3;
    let mut modified = 0;
    let mut saw_incomplete = false;
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev.expect("watch ended early").unwrap(),
            _ = &mut deadline => panic!("no completed rollout seen; {modified} MODIFIED events"),
        };
        match ev {
            WatchEvent::Modified(d) => {
                modified += 1;
                if d.metadata.generation == Some(target_gen) {
                    match rollout_status(&d) {
                        RolloutStatus::Complete => break,
                        RolloutStatus::Waiting(_) => saw_incomplete = true,
                        RolloutStatus::Failed(m) => panic!("{m}"),
                    }
                }
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_incomplete && modified >= 3, "{modified} events");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let live: Vec<Pod> = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(live.len(), 2);
    for p in &live {
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()[ROTATION_ID],
            "r-json"
        );
        assert!(is_ready(p));
    }

    // runtime::watcher (list + watch) sees the next rollout through to completion too.
    let cfg = watcher::Config::default().fields("metadata.name=api");
    let seen = async {
        let mut s = watcher(deps.clone(), cfg).applied_objects().boxed();
        let mut after_patch = false;
        while let Some(d) = s.try_next().await.unwrap() {
            if annotation(&d).as_deref() == Some("r2") {
                after_patch = true;
                if rollout_status(&d) == RolloutStatus::Complete {
                    return true;
                }
            }
            if !after_patch && rollout_status(&d) == RolloutStatus::Complete {
                let p = json!({"spec": {"template": {"metadata": {"annotations": {ROTATION_ID: "r2"}}}}});
                deps.patch("api", &pp, &Patch::Strategic(&p)).await.unwrap();
            }
        }
        false
    };
    assert!(tokio::time::timeout(Duration::from_secs(20), seen)
        .await
        .expect("watcher timed out"));
}

#[tokio::test]
async fn kube_rs_optimistic_concurrency_leases_secrets_and_faults() {
    let (sim, server) = start(50).await;
    sim.create_deployment(KubeSim::simple_deployment("okr", "web", 1))
        .unwrap();
    let client = kube_client(&server, "okr").await;
    let deps: Api<Deployment> = Api::default_namespaced(client.clone());

    // Replace with a stale resourceVersion → 409 Conflict. (Wait for the rollout first: the
    // controller's status writes bump the resourceVersion too, as on a real cluster.)
    assert!(
        sim.wait_rollout_complete("okr", "web", Duration::from_secs(10))
            .await
    );
    let stale = deps.get("web").await.unwrap();
    let mut fresh = stale.clone();
    fresh
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("tier".into(), "a".into());
    deps.replace("web", &PostParams::default(), &fresh)
        .await
        .unwrap();
    let mut again = stale.clone();
    again
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("tier".into(), "b".into());
    let e = deps
        .replace("web", &PostParams::default(), &again)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (409, "Conflict".into()));
    assert_eq!(
        deps.get("web").await.unwrap().metadata.labels.unwrap()["tier"],
        "a"
    );

    // Leases: create, get, replace, stale replace → 409, AlreadyExists.
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("okr-leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("pod-a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let e = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (409, "AlreadyExists".into()));
    let mut take = leases.get("okr-leader").await.unwrap();
    take.spec.as_mut().unwrap().holder_identity = Some("pod-b".into());
    let taken = leases
        .replace("okr-leader", &PostParams::default(), &take)
        .await
        .unwrap();
    assert_ne!(
        taken.metadata.resource_version,
        created.metadata.resource_version
    );
    let mut late = created.clone();
    late.spec.as_mut().unwrap().holder_identity = Some("pod-c".into());
    let e = leases
        .replace("okr-leader", &PostParams::default(), &late)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (409, "Conflict".into()));
    assert_eq!(
        sim.lease("okr", "okr-leader")
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("pod-b")
    );

    // Secrets: create with stringData, read back as data.
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let s = Secret {
        metadata: ObjectMeta {
            name: Some("openai".into()),
            ..Default::default()
        },
        string_data: Some([("OPENAI_API_KEY".to_string(), "sk-test-value".to_string())].into()),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let got = secrets.get("openai").await.unwrap();
    assert_eq!(got.data.unwrap()["OPENAI_API_KEY"].0, b"sk-test-value");
    assert_eq!(got.type_.as_deref(), Some("Opaque"));
    assert!(got.string_data.is_none());
    assert!(sim.secret("okr", "openai").is_some());

    // Injected faults. A 500 on the 2nd write from now surfaces as an error and changes
    // nothing; the writes around it go through.
    let before = sim.write_count();
    sim.fail_nth_write(2, 500);
    let l1 = json!({"metadata": {"labels": {"f": "1"}}});
    deps.patch("web", &PatchParams::default(), &Patch::Merge(&l1))
        .await
        .unwrap();
    let l2 = json!({"metadata": {"labels": {"f": "2"}}});
    let e = deps
        .patch("web", &PatchParams::default(), &Patch::Merge(&l2))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (500, "InternalError".into()));
    assert_eq!(
        deps.get("web").await.unwrap().metadata.labels.unwrap()["f"],
        "1",
        "the failed write changed nothing"
    );
    deps.patch("web", &PatchParams::default(), &Patch::Merge(&l2))
        .await
        .unwrap();
    assert_eq!(sim.write_count(), before + 3);
    // kube 5 retries 429/503/504 itself: a single 503 costs one extra request, no error.
    let before = sim.write_count();
    sim.fail_nth_write(1, 503);
    let l3 = json!({"metadata": {"labels": {"f": "3"}}});
    deps.patch("web", &PatchParams::default(), &Patch::Merge(&l3))
        .await
        .unwrap();
    assert_eq!(
        sim.write_count(),
        before + 2,
        "the 503 was observed and retried"
    );
    sim.fail_nth_write(1, 409);
    let e = leases
        .delete("okr-leader", &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (409, "Conflict".into()));
    leases
        .delete("okr-leader", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        api_code(&leases.get("okr-leader").await.unwrap_err()).0,
        404
    );

    // A label-selected watch sees an object leave (DELETED) and re-enter (ADDED) the
    // selection, as the API server's watch cache reports it.
    let rv = secrets
        .get("openai")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = secrets
        .watch(&WatchParams::default().labels("team=a").timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    for team in ["a", "b", "a"] {
        let p = json!({"metadata": {"labels": {"team": team}}});
        secrets
            .patch("openai", &PatchParams::default(), &Patch::Merge(&p))
            .await
            .unwrap();
    }
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
        {
            Some(Ok(WatchEvent::Added(_))) => kinds.push("ADDED"),
            Some(Ok(WatchEvent::Modified(_))) => kinds.push("MODIFIED"),
            Some(Ok(WatchEvent::Deleted(_))) => kinds.push("DELETED"),
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "DELETED", "ADDED"]);

    // A watch from a compacted resourceVersion gets a 410 ERROR event.
    let rv = deps
        .get("web")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    deps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"g": "1"}}})),
    )
    .await
    .unwrap();
    sim.compact_watch_history();
    let mut s = deps
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .unwrap()
    {
        Some(Ok(WatchEvent::Error(st))) => assert_eq!(st.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_rs_events_recorder_and_token_review() {
    let (sim, server) = start(50).await;
    sim.create_deployment(KubeSim::simple_deployment("okr", "web", 1))
        .unwrap();
    let client = kube_client(&server, "okr").await;

    // events.k8s.io/v1 through kube-rs' Recorder: first a create, then a series patch.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "openai-key-rotator".into(),
            instance: Some("okr-0".into()),
        },
    );
    let dep = sim.deployment("okr", "web").unwrap();
    let reference = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: dep.metadata.name.clone(),
        namespace: dep.metadata.namespace.clone(),
        uid: dep.metadata.uid.clone(),
        ..Default::default()
    };
    let ev = KubeEvent {
        type_: EventType::Normal,
        reason: "KeyRotated".into(),
        note: Some("rotation r1 rolled this workload".into()),
        action: "Roll".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events = sim.events("okr");
    assert_eq!(
        events.len(),
        1,
        "the repeat is patched into a series, not a new event"
    );
    let e = &events[0];
    assert_eq!(e.reason.as_deref(), Some("KeyRotated"));
    assert_eq!(
        e.reporting_controller.as_deref(),
        Some("openai-key-rotator")
    );
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some("web"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));

    // TokenReview as OpenBao's Kubernetes auth sends it.
    sim.add_service_account_token("jwt-of-okr", "okr", "okr");
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str| TokenReview {
        metadata: ObjectMeta::default(),
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: None,
        },
        status: None,
    };
    let ok = reviews
        .create(&PostParams::default(), &review("jwt-of-okr"))
        .await
        .unwrap();
    let st = ok.status.unwrap();
    assert_eq!(st.authenticated, Some(true));
    let user = st.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:okr:okr")
    );
    assert!(user
        .groups
        .unwrap()
        .contains(&"system:serviceaccounts:okr".to_string()));
    let bad = reviews
        .create(&PostParams::default(), &review("forged"))
        .await
        .unwrap();
    let st = bad.status.unwrap();
    assert_ne!(st.authenticated, Some(true));
    assert!(st.error.is_some());
}

/// A service-account-shaped JWT. OpenBao does not check the signature when a TokenReview
/// endpoint is configured: the review is the authentication.
fn service_account_jwt(ns: &str, name: &str, uid: &str) -> String {
    use base64::Engine;
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        enc(json!({"alg": "RS256", "typ": "JWT"})),
        enc(json!({
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": ns,
            "kubernetes.io/serviceaccount/secret.name": format!("{name}-token"),
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "sub": format!("system:serviceaccount:{ns}:{name}"),
        })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"not-checked"),
    )
}

#[tokio::test]
async fn openbao_kubernetes_auth_logs_in_through_our_token_review() {
    let (sim, server) = start(50).await;
    let bao = support::start_bao().await;
    let http = reqwest::Client::new();
    let call = |path: &str, body: Value| {
        http.post(format!("{}/v1/{path}", bao.addr))
            .header("X-Vault-Token", &bao.token)
            .json(&body)
            .send()
    };
    // Any well-formed certificate: the simulator is plain HTTP, the CA is never used.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=okr-sim",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let pem = std::fs::read_to_string(&cert).unwrap();

    for (path, body) in [
        ("sys/auth/kubernetes", json!({"type": "kubernetes"})),
        (
            "auth/kubernetes/config",
            json!({"kubernetes_host": server.url(), "disable_local_ca_jwt": true,
                   "token_reviewer_jwt": "reviewer-token", "kubernetes_ca_cert": pem}),
        ),
        (
            "auth/kubernetes/role/okr",
            json!({"bound_service_account_names": "okr", "bound_service_account_namespaces": "okr",
                   "policies": "default", "ttl": "1h"}),
        ),
    ] {
        let r = call(path, body).await.unwrap();
        assert!(
            r.status().is_success(),
            "{path}: {}",
            r.text().await.unwrap()
        );
    }

    let uid = KubeSim::service_account_uid("okr", "okr");
    let jwt = service_account_jwt("okr", "okr", &uid);
    let login = |jwt: String| {
        http.post(format!("{}/v1/auth/kubernetes/login", bao.addr))
            .json(&json!({"role": "okr", "jwt": jwt}))
            .send()
    };
    // Negative control: not registered with the simulator, so its review says no.
    let r = login(jwt.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "{}", r.text().await.unwrap());

    assert_eq!(sim.add_service_account_token(&jwt, "okr", "okr"), uid);
    let r = login(jwt).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(
        !body["auth"]["client_token"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{body}"
    );
    assert_eq!(body["auth"]["metadata"]["service_account_name"], "okr");
    assert_eq!(
        body["auth"]["metadata"]["service_account_uid"],
        uid.as_str()
    );
}

// ---------------------------------------------------------------------------------------
// StatefulSets and DaemonSets with the real kubectl

fn revision_label(p: &Pod) -> String {
    p.metadata.labels.as_ref().unwrap()["controller-revision-hash"].clone()
}

fn restarted(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubectl.kubernetes.io/restartedAt"))
}

#[tokio::test]
async fn kubectl_gets_restarts_and_waits_for_statefulsets_and_daemonsets() {
    let (sim, server) = start(200).await;
    sim.create_statefulset(KubeSim::simple_statefulset("demo", "db", 3))
        .unwrap();
    sim.create_daemonset(KubeSim::simple_daemonset("demo", "agent"))
        .unwrap();
    for name in ["db", "agent"] {
        assert!(
            sim.wait_rollout_complete("demo", name, Duration::from_secs(15))
                .await
        );
    }
    let k = Kubectl::new(&server, "demo");

    // `get sts,ds` resolves both short names and prints the server's Tables.
    let out = k.ok(&["get", "sts,ds"]).await;
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAME", "READY", "AGE"], "{out}");
    assert_eq!(lines[1][..2], ["statefulset.apps/db", "3/3"], "{out}");
    let ds_header = lines
        .iter()
        .position(|l| l.first() == Some(&"NAME") && l.len() > 3)
        .unwrap();
    assert_eq!(
        lines[ds_header],
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "NODE",
            "SELECTOR",
            "AGE"
        ],
        "{out}"
    );
    assert_eq!(
        lines[ds_header + 1][..7],
        ["daemonset.apps/agent", "2", "2", "2", "2", "2", "<none>"],
        "{out}"
    );
    let sts: Value =
        serde_json::from_str(&k.ok(&["get", "statefulset", "db", "-o", "json"]).await).unwrap();
    assert_eq!(
        sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        0
    );
    assert_eq!(
        sts["status"]["currentRevision"],
        sts["status"]["updateRevision"]
    );
    let out = k.ok(&["get", "pods", "-l", "app=db", "-o", "name"]).await;
    assert_eq!(out, "pod/db-0\npod/db-1\npod/db-2\n");

    // rollout restart + rollout status: returns only once every pod runs the new revision.
    let out = k.ok(&["rollout", "restart", "sts/db"]).await;
    assert!(out.contains("statefulset.apps/db restarted"), "{out}");
    let t = Instant::now();
    let out = k
        .ok(&["rollout", "status", "sts/db", "--timeout=60s"])
        .await;
    let took = t.elapsed();
    let st = sim.statefulset("demo", "db").unwrap().status.unwrap();
    let pods = sim.pods("demo", "app=db");
    assert!(
        out.contains("partitioned roll out complete: 3 new pods have been updated..."),
        "{out}"
    );
    assert!(
        out.contains("Waiting for"),
        "kubectl watched progress: {out}"
    );
    assert!(
        took >= Duration::from_millis(600),
        "three pods, one at a time: {took:?}"
    );
    assert_eq!(active_pods(&pods).len(), 3);
    for p in &pods {
        assert_eq!(
            Some(revision_label(p)),
            st.update_revision,
            "{}",
            p.metadata.name.as_deref().unwrap()
        );
        assert!(restarted(p) && is_ready(p));
    }
    assert_eq!(st.current_revision, st.update_revision);
    let out = k.ok(&["rollout", "history", "sts/db"]).await;
    assert!(out.lines().any(|l| l.starts_with('2')), "{out}");

    let out = k.ok(&["rollout", "restart", "ds/agent"]).await;
    assert!(out.contains("daemonset.apps/agent restarted"), "{out}");
    let out = k
        .ok(&["rollout", "status", "ds/agent", "--timeout=60s"])
        .await;
    assert!(
        out.contains("daemon set \"agent\" successfully rolled out"),
        "{out}"
    );
    assert!(
        out.contains("Waiting for daemon set \"agent\" rollout to finish"),
        "{out}"
    );
    let pods = sim.pods("demo", "app=agent");
    let live = active_pods(&pods);
    assert_eq!(live.len(), 2);
    assert!(live.iter().all(|p| restarted(p) && is_ready(p)), "{pods:?}");
    assert!(
        pods.iter().all(|p| p.metadata.deletion_timestamp.is_none()),
        "old pods gone"
    );

    // Negative control: a StatefulSet whose new pods never become ready.
    sim.set_never_ready("demo", "db", true);
    k.ok(&["rollout", "restart", "sts/db"]).await;
    let out = k
        .run(&["rollout", "status", "sts/db", "--timeout=5s"])
        .await;
    assert!(
        !out.status.success(),
        "must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out waiting for the condition"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Waiting for 1 pods to be ready..."),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Only db-2 was replaced; db-0 and db-1 keep serving.
    let pods = sim.pods("demo", "app=db");
    let ready: Vec<&str> = pods
        .iter()
        .filter(|p| is_ready(p))
        .map(|p| p.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(ready, ["db-0", "db-1"]);

    // Deleting the StatefulSet collects its pods and revisions.
    k.ok(&["delete", "sts", "db"]).await;
    let t = Instant::now();
    while !(sim.pods("demo", "app=db").is_empty()
        && sim.controller_revisions("demo", "app=db").is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "owned objects not collected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kubectl_gets_patches_and_waits_for_argo_rollouts() {
    let (sim, server) = start(100).await;
    let k = Kubectl::new(&server, "demo");
    // Created by kubectl from a manifest, as a user would (the simulator serves no OpenAPI
    // documents for client-side validation).
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("rollout.json");
    std::fs::write(
        &manifest,
        serde_json::to_string(&KubeSim::simple_rollout("demo", "web", 2)).unwrap(),
    )
    .unwrap();
    let out = k
        .ok(&[
            "create",
            "--validate=false",
            "-f",
            manifest.to_str().unwrap(),
        ])
        .await;
    assert!(out.contains("rollout.argoproj.io/web created"), "{out}");
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Healthy",
        "rollout/web",
        "--timeout=30s",
    ])
    .await;
    // The table has the CRD's printer columns; the short name and the full name resolve.
    let table = k.ok(&["get", "rollouts.argoproj.io"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["web", "2", "2", "2", "2"], "{table}");
    let ro: Value = serde_json::from_str(&k.ok(&["get", "ro", "web", "-o", "json"]).await).unwrap();
    assert_eq!(ro["apiVersion"], "argoproj.io/v1alpha1");
    assert_eq!(
        ro["status"]["observedGeneration"],
        ro["metadata"]["generation"].to_string()
    );
    let before: Vec<String> = active_pods(&sim.pods("demo", "app=web"))
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();

    // `kubectl argo rollouts restart` is a merge patch of spec.restartAt; the simulated
    // controller replaces every older pod, then records status.restartedAt.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = format!(r#"{{"spec":{{"restartAt":"{at}"}}}}"#);
    let out = k
        .ok(&["patch", "rollout", "web", "--type", "merge", "-p", &patch])
        .await;
    assert!(out.contains("rollout.argoproj.io/web patched"), "{out}");
    k.ok(&[
        "wait",
        &format!("--for=jsonpath={{.status.restartedAt}}={at}"),
        "rollout/web",
        "--timeout=30s",
    ])
    .await;
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Healthy",
        "rollout/web",
        "--timeout=30s",
    ])
    .await;
    let pods = sim.pods("demo", "app=web");
    let after = active_pods(&pods)
        .into_iter()
        .filter(|p| is_ready(p))
        .collect::<Vec<_>>();
    assert_eq!(after.len(), 2);
    for p in after {
        assert!(!before.contains(p.metadata.name.as_ref().unwrap()));
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .unwrap()
            .0
            .as_second();
        let at_s = chrono::DateTime::parse_from_rfc3339(&at)
            .unwrap()
            .timestamp();
        assert!(
            created >= at_s,
            "{:?} created before restartAt",
            p.metadata.name
        );
        assert!(
            p.metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key("rollouts-pod-template-hash"),
            "{:?}",
            p.metadata.labels
        );
    }

    // A strategic merge patch is refused as for every custom resource.
    let out = k
        .run(&[
            "patch",
            "rollout",
            "web",
            "-p",
            r#"{"spec":{"paused":true}}"#,
        ])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("merge-patch+json"), "{err}");
    // Paused by hand: phase Paused.
    k.ok(&[
        "patch",
        "ro",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ])
    .await;
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Paused",
        "rollout/web",
        "--timeout=30s",
    ])
    .await;
    let msg = k
        .ok(&["get", "ro", "web", "-o", "jsonpath={.status.message}"])
        .await;
    assert_eq!(msg, "manually paused");
    // Aborted through the test hook: Degraded, status.abort.
    k.ok(&[
        "patch",
        "ro",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":false}}"#,
    ])
    .await;
    sim.set_rollout_aborted("demo", "web", true);
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.abort}=true",
        "rollout/web",
        "--timeout=30s",
    ])
    .await;
    let phase = k
        .ok(&["get", "ro", "web", "-o", "jsonpath={.status.phase}"])
        .await;
    assert_eq!(phase, "Degraded");
}

#[tokio::test]
async fn the_simulated_argo_controller_restarts_one_pod_at_a_time_and_waits_for_restart_at() {
    use openai_key_rotator::sandbox::kube::WorkloadKind;
    let (sim, _server) = start(150).await;
    sim.create_rollout(KubeSim::simple_rollout("demo", "web", 3))
        .unwrap();
    assert!(
        sim.wait_rollout_complete_for(
            WorkloadKind::Rollout,
            "demo",
            "web",
            Duration::from_secs(15)
        )
        .await
    );
    let ready = |sim: &KubeSim| {
        sim.pods("demo", "app=web")
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
            .map(|p| p.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let before = ready(&sim);
    assert_eq!(before.len(), 3);
    let rs_before = sim.replica_sets("demo", "app=web");
    assert_eq!(rs_before.len(), 1);

    // A restartAt two seconds ahead: nothing happens before it.
    let at_s = chrono::Utc::now().timestamp() + 2;
    let at = chrono::DateTime::from_timestamp(at_s, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let gen = sim
        .update_rollout("demo", "web", |r| r["spec"]["restartAt"] = json!(at))
        .unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();
    let mut phases = Vec::new();
    let mut min_ready = usize::MAX;
    let t = Instant::now();
    loop {
        let ro = sim.rollout("demo", "web").unwrap();
        let phase = ro["status"]["phase"].as_str().unwrap_or("").to_string();
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
        }
        let now_ready = ready(&sim);
        if chrono::Utc::now().timestamp() < at_s - 1 {
            assert_eq!(now_ready, before, "a pod was replaced before restartAt");
        }
        min_ready = min_ready.min(now_ready.len());
        if ro["status"]["restartedAt"] == json!(at) && phase == "Healthy" {
            assert_eq!(ro["status"]["observedGeneration"], json!(gen.to_string()));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{ro:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // maxUnavailable 1: never fewer than two ready pods; all three replaced in place.
    assert!(min_ready >= 2, "{min_ready}");
    assert!(phases.contains(&"Progressing".to_string()), "{phases:?}");
    let after = ready(&sim);
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{after:?} {before:?}"
    );
    let rs_after = sim.replica_sets("demo", "app=web");
    assert_eq!(rs_after.len(), 1, "same ReplicaSet, no new template hash");
    assert_eq!(rs_after[0].metadata.name, rs_before[0].metadata.name);
    for p in sim.pods("demo", "app=web") {
        if p.metadata.deletion_timestamp.is_none() {
            assert!(p.metadata.creation_timestamp.unwrap().0.as_second() >= at_s);
        }
    }
}

#[tokio::test]
async fn kube_rs_discovers_lists_patches_and_watches_rollouts_dynamically() {
    use kube::api::{ApiResource, DynamicObject};
    use kube::discovery::{Discovery, Scope};
    let (sim, server) = start(50).await;
    sim.create_rollout(KubeSim::simple_rollout("demo", "web", 1))
        .unwrap();
    let client = kube_client(&server, "demo").await;
    // kube's discovery finds the group, its one version and the resource.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery
        .groups()
        .find(|g| g.name() == "argoproj.io")
        .expect("argoproj.io discovered");
    assert_eq!(group.preferred_version_or_latest(), "v1alpha1");
    let (ar, caps): (ApiResource, _) = group
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.kind == "Rollout")
        .unwrap();
    assert_eq!(ar.plural, "rollouts");
    assert_eq!(caps.scope, Scope::Namespaced);
    let api: Api<DynamicObject> = Api::namespaced_with(client, "demo", &ar);
    let list = api
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.clone().unwrap();
    // A watch from the list's resourceVersion sees the restart patch and the controller's
    // status writes.
    let mut stream = api
        .watch(&WatchParams::default().fields("metadata.name=web"), &rv)
        .await
        .unwrap()
        .boxed();
    let at = (chrono::Utc::now() + chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"restartAt": at}})),
    )
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event")
            .expect("stream open")
            .unwrap();
        if let WatchEvent::Modified(o) = ev {
            if o.data["status"]["restartedAt"] == json!(at)
                && o.data["status"]["phase"] == "Healthy"
            {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20));
    }
    // A strategic merge patch gets the API server's 415.
    let err = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err).0, 415, "{err}");
}

#[tokio::test]
async fn kubectl_creates_and_lists_vault_static_secrets_and_external_secrets() {
    let (sim, server) = start(100).await;
    let k = Kubectl::new(&server, "demo");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("crs.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "secrets.hashicorp.com/v1beta1", "kind": "VaultStaticSecret",
         "metadata": {"name": "chat-vso", "namespace": "web"},
         "spec": {"mount": "secret", "path": "demo/chatbot", "type": "kv-v2",
                  "destination": {"name": "vso-openai", "create": true}}},
        {"apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
         "metadata": {"name": "chat", "namespace": "demo"},
         "spec": {"secretStoreRef": {"name": "vault", "kind": "ClusterSecretStore"},
                  "refreshInterval": "1h",
                  "data": [{"secretKey": "k", "remoteRef": {"key": "demo/chatbot"}}]}},
    ]});
    std::fs::write(&manifest, manifest_text(&list)).unwrap();
    let out = k
        .ok(&[
            "create",
            "--validate=false",
            "-f",
            manifest.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.contains("vaultstaticsecret.secrets.hashicorp.com/chat-vso created"),
        "{out}"
    );
    assert!(
        out.contains("externalsecret.external-secrets.io/chat created"),
        "{out}"
    );
    let vss = k
        .ok(&["get", "vaultstaticsecrets.secrets.hashicorp.com", "-A"])
        .await;
    let header: Vec<&str> = vss.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAMESPACE", "NAME", "AGE"], "{vss}");
    assert!(vss.lines().nth(1).unwrap().starts_with("web"), "{vss}");
    let es = k.ok(&["get", "es", "-A"]).await;
    let header: Vec<&str> = es.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "STORE",
            "REFRESH",
            "INTERVAL",
            "STATUS",
            "READY"
        ],
        "{es}"
    );
    assert!(es.contains("vault") && es.contains("1h"), "{es}");
    // The CRD's required fields are checked.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        json!({"apiVersion": "secrets.hashicorp.com/v1beta1", "kind": "VaultStaticSecret",
               "metadata": {"name": "x", "namespace": "web"}, "spec": {"mount": "secret"}})
        .to_string(),
    )
    .unwrap();
    let out = k
        .run(&["create", "--validate=false", "-f", bad.to_str().unwrap()])
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.path: Required value"));
    // Uninstalled: gone from discovery, as kubectl sees it.
    assert!(sim.set_crd_installed("vaultstaticsecrets.secrets.hashicorp.com", false));
    let k2 = Kubectl::new(&server, "demo");
    let out = k2
        .run(&["get", "vaultstaticsecrets.secrets.hashicorp.com", "-A"])
        .await;
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!sim.set_crd_installed("deployments.apps", false));
}

fn manifest_text(v: &Value) -> String {
    v.to_string()
}
