//! The rollout machinery: a Deployment controller, a ReplicaSet controller, a garbage
//! collector and a kubelet, run together on every tick under the store lock.
//!
//! The Deployment logic follows kube-controller-manager (`pkg/controller/deployment`):
//! pod-template hash, revisions, `maxSurge`/`maxUnavailable` fenceposts, cleanup of
//! unhealthy old pods first, status and the `Progressing`/`Available` conditions. Workload
//! kinds are looked up through the pod's controller chain, so StatefulSets or DaemonSets can
//! be added beside [`sync_deployment`] without touching the kubelet: StatefulSets and
//! DaemonSets live in [`super::statefulset`] and [`super::daemonset`].

use super::discovery::Res;
use super::objects;
use super::selector::{labels_of, LabelSelector};
use super::store::{controller_ref, meta_str, now_time, random_suffix, Store, WriteScope};
use super::{Inner, KubeSimOptions, PodRuntime};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const HASH_LABEL: &str = "pod-template-hash";
pub(super) const NODE_NAME: &str = "okr-sim-node";

/// kubectl's verdict on a Deployment (`kubectl rollout status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutStatus {
    Complete,
    Waiting(String),
    Failed(String),
}

/// kubectl's `DeploymentStatusViewer` rule, message for message.
pub fn rollout_status(d: &Deployment) -> RolloutStatus {
    let name = d.metadata.name.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return RolloutStatus::Waiting(
            "Waiting for deployment spec update to be observed...".into(),
        );
    }
    let progressing = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing");
    if progressing.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded")) {
        return RolloutStatus::Failed(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let replicas = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if let Some(want) = d.spec.as_ref().and_then(|s| s.replicas) {
        if updated < want {
            return RolloutStatus::Waiting(format!(
                "Waiting for deployment {name:?} rollout to finish: {updated} out of {want} new replicas have been updated..."
            ));
        }
    }
    if replicas > updated {
        return RolloutStatus::Waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
            replicas - updated
        ));
    }
    if available < updated {
        return RolloutStatus::Waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
        ));
    }
    RolloutStatus::Complete
}

/// `GetScaledValueFromIntOrPercent`: an int, or a percentage of `total` rounded up or down.
pub fn scaled_value(v: &IntOrString, total: i32, round_up: bool) -> i32 {
    match v {
        IntOrString::Int(i) => *i,
        IntOrString::String(s) => {
            let pct: i64 = s.trim_end_matches('%').trim().parse().unwrap_or(0);
            let x = pct * i64::from(total);
            let r = if round_up { (x + 99) / 100 } else { x / 100 };
            r as i32
        }
    }
}

/// `ResolveFenceposts`: (maxSurge, maxUnavailable) for `desired` replicas; surge rounds up,
/// unavailable down, and both zero becomes unavailable = 1.
pub fn resolve_fenceposts(
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
    desired: i32,
) -> (i32, i32) {
    let pct25 = IntOrString::String("25%".into());
    let s = scaled_value(surge.unwrap_or(&pct25), desired, true);
    let u = scaled_value(unavailable.unwrap_or(&pct25), desired, false);
    if s == 0 && u == 0 {
        (0, 1)
    } else {
        (s, u)
    }
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

fn desired(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn fenceposts(d: &Deployment) -> (i32, i32) {
    if is_recreate(d) {
        return (0, 0);
    }
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    resolve_fenceposts(
        ru.and_then(|r| r.max_surge.as_ref()),
        ru.and_then(|r| r.max_unavailable.as_ref()),
        desired(d),
    )
}

/// `MaxUnavailable`: capped at the replica count; 0 for Recreate or zero replicas.
fn max_unavailable(d: &Deployment) -> i32 {
    if is_recreate(d) || desired(d) == 0 {
        return 0;
    }
    fenceposts(d).1.min(desired(d))
}

/// The `pod-template-hash` label value: a stable hash of the template (and the collision
/// count), spelled with the alphabet Kubernetes uses (`rand.SafeEncodeString`).
pub fn pod_template_hash(template: &Value, collision_count: i32) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = Sha256::new();
    // serde_json maps are sorted, so this serialisation is canonical.
    h.update(template.to_string().as_bytes());
    if collision_count > 0 {
        h.update(collision_count.to_string().as_bytes());
    }
    let digest = h.finalize();
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    n.to_string()
        .bytes()
        .map(|b| ALPHABET[b as usize % ALPHABET.len()] as char)
        .collect()
}

pub(super) fn typed<T: DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// Write a typed object back (server fields kept by the store); returns the stored version.
pub(super) fn write<T: Serialize + DeserializeOwned>(
    store: &mut Store,
    res: Res,
    obj: &T,
) -> Option<T> {
    let v = serde_json::to_value(obj).ok()?;
    let (ns, name) = (
        meta_str(&v, "namespace").to_string(),
        meta_str(&v, "name").to_string(),
    );
    let stored = store
        .update(res, &ns, &name, v, WriteScope::All, false)
        .ok()?;
    typed(&stored)
}

pub(super) fn pod_is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub(super) fn is_terminating(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

/// One controller pass: kubelet, garbage collector, ReplicaSets, Deployments,
/// StatefulSets, DaemonSets.
pub(crate) fn reconcile(inner: &mut Inner, opts: &KubeSimOptions, now: Instant) {
    reconcile_in(inner, opts, now, Scope::All);
}

/// One pass of every controller over the namespaces in `scope`. Each controller only
/// relates objects within one namespace, so a pass over some namespaces is the full pass
/// restricted to them.
pub(crate) fn reconcile_in(inner: &mut Inner, opts: &KubeSimOptions, now: Instant, scope: Scope) {
    kubelet(inner, opts, now, scope);
    collect_garbage(&mut inner.store, scope);
    replica_sets(inner, now, scope);
    deployments(&mut inner.store, scope);
    super::statefulset::sync_all(inner, now, scope);
    super::daemonset::sync_all(inner, opts, now, scope);
    super::rollout::sync_all(inner, now, scope);
}

/// The namespaces a controller pass covers.
#[derive(Clone, Copy)]
pub(crate) enum Scope<'a> {
    All,
    Namespaces(&'a BTreeSet<String>),
}

impl Scope<'_> {
    /// The objects of `res` in scope, ordered by namespace then name.
    pub fn list<'s>(&self, store: &'s Store, res: Res) -> Vec<&'s Value> {
        match self {
            Scope::All => store.list(res, None),
            Scope::Namespaces(set) => set
                .iter()
                .flat_map(|ns| store.list(res, Some(ns)))
                .collect(),
        }
    }

    pub fn covers(&self, ns: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespaces(set) => set.contains(ns),
        }
    }
}

/// A pod is available once it has been ready for `min_ready` (`IsPodAvailable`).
pub(super) fn pod_is_available(
    inner: &Inner,
    pod: &Value,
    min_ready: Duration,
    now: Instant,
) -> bool {
    pod_is_ready(pod)
        && inner
            .pods
            .get(&(
                meta_str(pod, "namespace").to_string(),
                meta_str(pod, "name").to_string(),
            ))
            .and_then(|r| r.ready_since)
            .is_some_and(|t| now.duration_since(t) >= min_ready)
}

// ---------------------------------------------------------------------------------------
// kubelet

fn kubelet(inner: &mut Inner, opts: &KubeSimOptions, now: Instant, scope: Scope) {
    let pods: Vec<Value> = scope
        .list(&inner.store, Res::Pod)
        .into_iter()
        .cloned()
        .collect();
    let live: std::collections::HashSet<(String, String)> = pods
        .iter()
        .map(|p| {
            (
                meta_str(p, "namespace").to_string(),
                meta_str(p, "name").to_string(),
            )
        })
        .collect();
    inner
        .pods
        .retain(|k, _| !scope.covers(&k.0) || live.contains(k));
    inner
        .open_gates
        .retain(|k| !scope.covers(&k.0) || live.contains(k));

    for pod in pods {
        let ns = meta_str(&pod, "namespace").to_string();
        let name = meta_str(&pod, "name").to_string();
        let key = (ns.clone(), name.clone());
        let first_seen = !inner.pods.contains_key(&key);
        let rt = inner.pods.entry(key.clone()).or_insert(PodRuntime {
            created: now,
            terminating_since: None,
            ready_since: None,
        });
        if is_terminating(&pod) {
            let since = *rt.terminating_since.get_or_insert(now);
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            let delay = opts.pod_termination_delay.min(Duration::from_secs(grace));
            if now.duration_since(since) >= delay {
                let _ = inner.store.delete(Res::Pod, &ns, &name, None, None, false);
                inner.pods.remove(&key);
                continue;
            }
        }
        let created = rt.created;
        let workload = inner.store.workload_of_pod(&ns, &pod);
        let settings = workload
            .as_ref()
            .and_then(|(kind, wl)| {
                let kind = super::workload_kind(kind)?;
                inner.workloads.get(&(kind, ns.clone(), wl.clone()))
            })
            .cloned()
            .unwrap_or_default();
        let delay = settings.ready_delay.unwrap_or(opts.pod_ready_delay);
        let running = !first_seen;
        let rt = inner.pods.get_mut(&key).expect("inserted above");
        // Never-ready and gates hold pods back from becoming ready; a pod that is ready
        // stays ready until it terminates (the "new pods never become ready" fault).
        let ready = running
            && !is_terminating(&pod)
            && (rt.ready_since.is_some()
                || (!settings.never_ready
                    && now.duration_since(created) >= delay
                    && (!settings.gated || inner.open_gates.contains(&key))));
        match (ready, rt.ready_since) {
            (true, None) => rt.ready_since = Some(now),
            (false, Some(_)) => rt.ready_since = None,
            _ => {}
        }
        let mut next = pod.clone();
        next["status"] = pod_status(&pod, running, ready);
        if next["spec"].get("nodeName").is_none() {
            next["spec"]["nodeName"] = json!(NODE_NAME);
        }
        if next != pod {
            let _ = inner
                .store
                .update(Res::Pod, &ns, &name, next, WriteScope::All, false);
        }
    }
}

/// A condition that keeps its `lastTransitionTime` while its status does not change.
fn pod_condition(old: &Value, type_: &str, ok: bool, reason: Option<(&str, String)>) -> Value {
    let status = if ok { "True" } else { "False" };
    let prev = old
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_));
    let ltt = prev
        .filter(|c| c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(now_time);
    let mut c =
        json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": ltt});
    if let Some((r, m)) = reason {
        c["reason"] = json!(r);
        c["message"] = json!(m);
    }
    c
}

fn pod_status(pod: &Value, running: bool, ready: bool) -> Value {
    let old = pod.get("status").cloned().unwrap_or_else(|| json!({}));
    let scheduled = pod_condition(&old, "PodScheduled", true, None);
    if !running {
        return json!({"phase": "Pending", "conditions": [scheduled], "qosClass": "BestEffort"});
    }
    let uid = meta_str(pod, "uid");
    let uid_hash = Sha256::digest(uid.as_bytes());
    let ip = format!("10.244.{}.{}", uid_hash[0], uid_hash[1].max(2));
    let start = old.get("startTime").cloned().unwrap_or_else(now_time);
    let containers: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = containers
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let not_ready = (!ready).then(|| {
        (
            "ContainersNotReady",
            format!("containers with unready status: [{}]", names.join(" ")),
        )
    });
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let image_id = hex::encode(Sha256::digest(image.as_bytes()));
            let cid = hex::encode(Sha256::digest(format!("{uid}/{name}").as_bytes()));
            json!({
                "name": name,
                "state": {"running": {"startedAt": start}},
                "lastState": {},
                "ready": ready,
                "restartCount": 0,
                "image": image,
                "imageID": format!("{image}@sha256:{image_id}"),
                "containerID": format!("containerd://{cid}"),
                "started": true,
            })
        })
        .collect();
    json!({
        "phase": "Running",
        "conditions": [
            pod_condition(&old, "PodReadyToStartContainers", true, None),
            pod_condition(&old, "Initialized", true, None),
            pod_condition(&old, "Ready", ready, not_ready.clone()),
            pod_condition(&old, "ContainersReady", ready, not_ready),
            scheduled,
        ],
        "hostIP": "10.0.0.10",
        "hostIPs": [{"ip": "10.0.0.10"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": start,
        "containerStatuses": statuses,
        "qosClass": "BestEffort",
    })
}

// ---------------------------------------------------------------------------------------
// garbage collector (background propagation)

fn owner_alive(store: &Store, ns: &str, kind: &str, name: &str, uid: &str) -> bool {
    let res = match kind {
        "Deployment" => Res::Deployment,
        "ReplicaSet" => Res::ReplicaSet,
        "StatefulSet" => Res::StatefulSet,
        "DaemonSet" => Res::DaemonSet,
        "Rollout" => Res::Rollout,
        // Owners we do not model are assumed alive.
        _ => return true,
    };
    store
        .get(res, ns, name)
        .is_some_and(|o| meta_str(o, "uid") == uid)
}

fn collect_garbage(store: &mut Store, scope: Scope) {
    let orphans: Vec<(Res, String, String)> = [Res::ReplicaSet, Res::ControllerRevision, Res::Pod]
        .into_iter()
        .flat_map(|res| {
            scope
                .list(store, res)
                .into_iter()
                .filter(|o| !is_terminating(o))
                .filter(|o| {
                    controller_ref(o).is_some_and(|(k, n, u)| {
                        !owner_alive(store, meta_str(o, "namespace"), &k, &n, &u)
                    })
                })
                .map(|o| {
                    (
                        res,
                        meta_str(o, "namespace").to_string(),
                        meta_str(o, "name").to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for (res, ns, name) in orphans {
        let _ = match res {
            Res::Pod => store.begin_graceful_delete(res, &ns, &name, 30, false),
            _ => store.delete(res, &ns, &name, None, None, false),
        };
    }
}

// ---------------------------------------------------------------------------------------
// ReplicaSet controller

fn replica_sets(inner: &mut Inner, now: Instant, scope: Scope) {
    let rss: Vec<Value> = scope
        .list(&inner.store, Res::ReplicaSet)
        .into_iter()
        .filter(|r| !is_terminating(r))
        .cloned()
        .collect();
    for rs in rss {
        sync_replica_set(inner, &rs, now);
    }
}

fn sync_replica_set(inner: &mut Inner, rs: &Value, now: Instant) {
    let ns = meta_str(rs, "namespace").to_string();
    let name = meta_str(rs, "name").to_string();
    let uid = meta_str(rs, "uid").to_string();
    let want = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let min_ready = Duration::from_secs(rs["spec"]["minReadySeconds"].as_u64().unwrap_or(0));
    let mut active: Vec<Value> = inner
        .store
        .list(Res::Pod, Some(&ns))
        .into_iter()
        .filter(|p| !is_terminating(p))
        .filter(|p| controller_ref(p).is_some_and(|(k, _, u)| k == "ReplicaSet" && u == uid))
        .cloned()
        .collect();

    if active.len() > want {
        // Delete the least useful first: not running, not ready, then the newest.
        let created = |p: &Value| {
            inner
                .pods
                .get(&(ns.clone(), meta_str(p, "name").to_string()))
                .map(|r| r.created)
        };
        active.sort_by_key(|p| {
            (
                pod_is_ready(p),
                p.pointer("/status/phase") == Some(&json!("Running")),
                std::cmp::Reverse(created(p)),
            )
        });
        let grace = rs
            .pointer("/spec/template/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let extra = active.len() - want;
        for victim in active.drain(..extra) {
            let _ = inner.store.begin_graceful_delete(
                Res::Pod,
                &ns,
                meta_str(&victim, "name"),
                grace,
                false,
            );
        }
    }
    while active.len() < want {
        match create_pod(&mut inner.store, rs) {
            Some(p) => active.push(p),
            None => break,
        }
    }

    let ready = active.iter().filter(|p| pod_is_ready(p)).count();
    let available = active
        .iter()
        .filter(|p| pod_is_ready(p))
        .filter(|p| {
            inner
                .pods
                .get(&(ns.clone(), meta_str(p, "name").to_string()))
                .and_then(|r| r.ready_since)
                .is_some_and(|t| now.duration_since(t) >= min_ready)
        })
        .count();
    let template_sel = LabelSelector::parse(
        &labels_of(&rs["spec"]["template"])
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
    .unwrap_or_default();
    let labeled = active
        .iter()
        .filter(|p| template_sel.matches_obj(p))
        .count();
    let mut status = json!({"replicas": active.len()});
    for (k, v) in [
        ("fullyLabeledReplicas", labeled),
        ("readyReplicas", ready),
        ("availableReplicas", available),
    ] {
        if v > 0 {
            status[k] = json!(v);
        }
    }
    if let Some(g) = rs.pointer("/metadata/generation") {
        status["observedGeneration"] = g.clone();
    }
    if let Some(cur) = inner.store.get(Res::ReplicaSet, &ns, &name) {
        if cur.get("status") != Some(&status) {
            let mut next = cur.clone();
            next["status"] = status;
            let _ = inner
                .store
                .update(Res::ReplicaSet, &ns, &name, next, WriteScope::All, false);
        }
    }
}

fn create_pod(store: &mut Store, rs: &Value) -> Option<Value> {
    let ns = meta_str(rs, "namespace");
    let rs_name = meta_str(rs, "name");
    let template = &rs["spec"]["template"];
    let mut meta = json!({
        "generateName": format!("{rs_name}-"),
        "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
        "ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs_name,
            "uid": meta_str(rs, "uid"),
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        meta["annotations"] = a.clone();
    }
    let name = loop {
        let n = format!("{rs_name}-{}", random_suffix(5));
        if store.get(Res::Pod, ns, &n).is_none() {
            break n;
        }
    };
    meta["name"] = json!(name);
    let pod = json!({"metadata": meta, "spec": template["spec"].clone()});
    let pod = objects::admit(Res::Pod, pod).ok()?;
    store.create(Res::Pod, ns, pod, false).ok()
}

// ---------------------------------------------------------------------------------------
// Deployment controller

fn deployments(store: &mut Store, scope: Scope) {
    let deps: Vec<Deployment> = scope
        .list(store, Res::Deployment)
        .into_iter()
        .filter(|d| !is_terminating(d))
        .filter_map(typed)
        .collect();
    for d in deps {
        sync_deployment(store, d);
    }
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn rs_available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn rs_created(rs: &ReplicaSet) -> (Option<Timestamp>, String) {
    (
        rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
        rs.metadata.name.clone().unwrap_or_default(),
    )
}

/// `EqualIgnoreHash`: the RS template minus its `pod-template-hash` label equals `template`.
fn equal_ignore_hash(rs: &ReplicaSet, template: &Value) -> bool {
    let Some(spec) = rs.spec.as_ref().and_then(|s| s.template.as_ref()) else {
        return false;
    };
    let Ok(mut t) = serde_json::to_value(spec) else {
        return false;
    };
    if let Some(labels) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(HASH_LABEL);
    }
    t == *template
}

fn owner_ref(d: &Deployment) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.metadata.name.clone().unwrap_or_default(),
        uid: d.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn scale(store: &mut Store, d: &Deployment, rs: &mut ReplicaSet, replicas: i32) -> bool {
    if rs_replicas(rs) == replicas {
        return false;
    }
    let mut next = rs.clone();
    if let Some(spec) = next.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
    let ann = next
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    ann.insert(DESIRED_REPLICAS.into(), desired(d).to_string());
    ann.insert(
        MAX_REPLICAS.into(),
        (desired(d) + fenceposts(d).0).to_string(),
    );
    match write(store, Res::ReplicaSet, &next) {
        Some(stored) => {
            *rs = stored;
            true
        }
        None => false,
    }
}

fn new_condition(type_: &str, ok: bool, reason: &str, message: String) -> DeploymentCondition {
    let now = Time(Timestamp::now());
    DeploymentCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// `SetDeploymentCondition`: same status and reason is a no-op; same status keeps the
/// transition time.
fn set_condition(st: &mut DeploymentStatus, mut c: DeploymentCondition) {
    let conds = st.conditions.get_or_insert_with(Vec::new);
    if let Some(cur) = conds.iter().find(|x| x.type_ == c.type_) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
    }
    conds.retain(|x| x.type_ != c.type_);
    conds.push(c);
}

fn progressing_cond(st: &DeploymentStatus) -> Option<&DeploymentCondition> {
    st.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
}

fn nz(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

fn calculate_status(
    d: &Deployment,
    all: &[ReplicaSet],
    new_rs: Option<&ReplicaSet>,
) -> DeploymentStatus {
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| all.iter().map(f).sum::<i32>();
    let actual = |rs: &ReplicaSet| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0);
    let available = sum(&rs_available);
    let total = sum(&rs_replicas);
    let old = d.status.clone().unwrap_or_default();
    let mut st = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: nz(sum(&actual)),
        updated_replicas: nz(new_rs.map(actual).unwrap_or(0)),
        ready_replicas: nz(sum(&|rs| {
            rs.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
        })),
        available_replicas: nz(available),
        unavailable_replicas: nz((total - available).max(0)),
        collision_count: old.collision_count,
        conditions: old.conditions.clone(),
        terminating_replicas: None,
    };
    if available >= desired(d) - max_unavailable(d) {
        set_condition(
            &mut st,
            new_condition(
                "Available",
                true,
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            ),
        );
    } else {
        set_condition(
            &mut st,
            new_condition(
                "Available",
                false,
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            ),
        );
    }
    st
}

/// `DeploymentComplete`.
fn deployment_complete(d: &Deployment, st: &DeploymentStatus) -> bool {
    let want = desired(d);
    st.updated_replicas.unwrap_or(0) == want
        && st.replicas.unwrap_or(0) == want
        && st.available_replicas.unwrap_or(0) == want
        && st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
}

/// `DeploymentProgressing`: the new status moved forward compared with the stored one.
fn deployment_progressing(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let g = |v: Option<i32>| v.unwrap_or(0);
    let old_old = g(old.replicas) - g(old.updated_replicas);
    let new_old = g(new.replicas) - g(new.updated_replicas);
    g(new.updated_replicas) > g(old.updated_replicas)
        || new_old < old_old
        || g(new.ready_replicas) > g(old.ready_replicas)
        || g(new.available_replicas) > g(old.available_replicas)
}

fn deadline_seconds(d: &Deployment) -> Option<i64> {
    let s = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600);
    (s != i32::MAX).then_some(i64::from(s))
}

fn deployment_timed_out(d: &Deployment, st: &DeploymentStatus) -> bool {
    let (Some(deadline), Some(c)) = (deadline_seconds(d), progressing_cond(st)) else {
        return false;
    };
    match c.reason.as_deref() {
        Some("NewReplicaSetAvailable") => false,
        Some("ProgressDeadlineExceeded") => true,
        _ => c.last_update_time.as_ref().is_some_and(|t| {
            t.0.checked_add(SignedDuration::from_secs(deadline))
                .is_ok_and(|end| end < Timestamp::now())
        }),
    }
}

fn sync_rollout_status(
    store: &mut Store,
    d: &Deployment,
    all: &[ReplicaSet],
    new_rs: Option<&ReplicaSet>,
) {
    let mut st = calculate_status(d, all, new_rs);
    let old = d.status.clone().unwrap_or_default();
    let rs_name = new_rs.and_then(|r| r.metadata.name.clone());
    if deadline_seconds(d).is_some() {
        let cur = progressing_cond(&st).cloned();
        let complete = st.replicas == st.updated_replicas
            && cur
                .as_ref()
                .is_some_and(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"));
        if !complete {
            if deployment_complete(d, &st) {
                let msg = match &rs_name {
                    Some(n) => format!("ReplicaSet {n:?} has successfully progressed."),
                    None => "Deployment has successfully progressed.".into(),
                };
                set_condition(
                    &mut st,
                    new_condition("Progressing", true, "NewReplicaSetAvailable", msg),
                );
            } else if deployment_progressing(&old, &st) {
                let msg = match &rs_name {
                    Some(n) => format!("ReplicaSet {n:?} is progressing."),
                    None => "Deployment is progressing.".into(),
                };
                let mut c = new_condition("Progressing", true, "ReplicaSetUpdated", msg);
                if let Some(cur) = cur.as_ref().filter(|c| c.status == "True") {
                    c.last_transition_time = cur.last_transition_time.clone();
                }
                if let Some(conds) = st.conditions.as_mut() {
                    conds.retain(|x| x.type_ != "Progressing");
                }
                st.conditions.get_or_insert_with(Vec::new).push(c);
            } else if deployment_timed_out(d, &st) {
                let msg = match &rs_name {
                    Some(n) => format!("ReplicaSet {n:?} has timed out progressing."),
                    None => format!(
                        "Deployment {:?} has timed out progressing.",
                        d.metadata.name.clone().unwrap_or_default()
                    ),
                };
                set_condition(
                    &mut st,
                    new_condition("Progressing", false, "ProgressDeadlineExceeded", msg),
                );
            }
        }
    } else if let Some(conds) = st.conditions.as_mut() {
        conds.retain(|c| c.type_ != "Progressing");
    }
    if d.status.as_ref() != Some(&st) {
        let mut next = d.clone();
        next.status = Some(st);
        write(store, Res::Deployment, &next);
    }
}

fn sync_deployment(store: &mut Store, mut d: Deployment) {
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let Some(spec) = d.spec.clone() else { return };
    let selector = LabelSelector::from_k8s(&spec.selector);

    // Owned ReplicaSets; adopt matching orphans as the real controller does.
    let mut all: Vec<ReplicaSet> = Vec::new();
    let candidates: Vec<Value> = store
        .list(Res::ReplicaSet, Some(&ns))
        .into_iter()
        .filter(|r| !is_terminating(r))
        .cloned()
        .collect();
    for rv in candidates {
        match controller_ref(&rv) {
            Some((_, _, owner)) if owner == uid => {
                if let Some(rs) = typed(&rv) {
                    all.push(rs);
                }
            }
            None if !selector.is_empty() && selector.matches_obj(&rv) => {
                if let Some(mut rs) = typed::<ReplicaSet>(&rv) {
                    rs.metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(owner_ref(&d));
                    if let Some(stored) = write(store, Res::ReplicaSet, &rs) {
                        all.push(stored);
                    }
                }
            }
            _ => {}
        }
    }
    all.sort_by_key(rs_created);

    let Ok(template) = serde_json::to_value(&spec.template) else {
        return;
    };
    let mut new_idx = all.iter().position(|rs| equal_ignore_hash(rs, &template));
    let max_old_rev = all
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != new_idx)
        .map(|(_, rs)| revision(rs))
        .max()
        .unwrap_or(0);
    let new_rev = max_old_rev + 1;

    if spec.paused == Some(true) {
        let new_rs = new_idx.map(|i| all[i].clone());
        sync_rollout_status(store, &d, &all, new_rs.as_ref());
        return;
    }

    // An existing RS that matches the template again (a rollback) becomes the newest revision.
    if let Some(i) = new_idx {
        if revision(&all[i]) < new_rev {
            let mut rs = all[i].clone();
            rs.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(REVISION.into(), new_rev.to_string());
            if let Some(stored) = write(store, Res::ReplicaSet, &rs) {
                all[i] = stored;
            }
        }
        if set_deployment_revision(&mut d, revision(&all[i])) {
            if let Some(stored) = write(store, Res::Deployment, &d) {
                d = stored;
            }
        }
    }

    let recreate = is_recreate(&d);
    if recreate {
        let mut scaled = false;
        for (i, rs) in all.iter_mut().enumerate() {
            if Some(i) != new_idx && rs_replicas(rs) > 0 {
                scaled |= scale(store, &d, rs, 0);
            }
        }
        let old_names: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != new_idx)
            .filter_map(|(_, rs)| rs.metadata.uid.clone())
            .collect();
        let old_pods_running = store.list(Res::Pod, Some(&ns)).into_iter().any(|p| {
            controller_ref(p).is_some_and(|(k, _, u)| k == "ReplicaSet" && old_names.contains(&u))
        });
        if scaled || old_pods_running {
            let new_rs = new_idx.map(|i| all[i].clone());
            sync_rollout_status(store, &d, &all, new_rs.as_ref());
            return;
        }
    }

    if new_idx.is_none() {
        let collision = d
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0);
        let hash = pod_template_hash(&template, collision);
        let rs_name = format!("{name}-{hash}");
        if store.get(Res::ReplicaSet, &ns, &rs_name).is_some() {
            // Hash collision with a ReplicaSet that is not ours: bump and retry next tick.
            let mut next = d.clone();
            next.status
                .get_or_insert_with(Default::default)
                .collision_count = Some(collision + 1);
            write(store, Res::Deployment, &next);
            return;
        }
        let replicas = if recreate {
            desired(&d)
        } else {
            new_rs_replicas(&d, &all, 0)
        };
        match create_replica_set(store, &d, &template, &hash, &rs_name, replicas, new_rev) {
            Some(rs) => {
                all.push(rs);
                new_idx = Some(all.len() - 1);
                let mut st = d.status.clone().unwrap_or_default();
                set_condition(
                    &mut st,
                    new_condition(
                        "Progressing",
                        true,
                        "NewReplicaSetCreated",
                        format!("Created new replica set {rs_name:?}"),
                    ),
                );
                d.status = Some(st);
                set_deployment_revision(&mut d, new_rev);
                if let Some(stored) = write(store, Res::Deployment, &d) {
                    d = stored;
                }
            }
            None => return,
        }
    }
    let ni = new_idx.expect("set above");

    if recreate {
        let want = desired(&d);
        scale(store, &d, &mut all[ni], want);
    } else if !reconcile_new_rs(store, &d, &mut all, ni) {
        reconcile_old_rss(store, &d, &mut all, ni);
    }

    let new_rs = all[ni].clone();
    if deployment_complete(&d, &d.status.clone().unwrap_or_default()) {
        cleanup_old(store, &d, &all, ni);
    }
    sync_rollout_status(store, &d, &all, Some(&new_rs));
}

fn set_deployment_revision(d: &mut Deployment, rev: i64) -> bool {
    let ann = d.metadata.annotations.get_or_insert_with(Default::default);
    let rev = rev.to_string();
    if ann.get(REVISION) == Some(&rev) {
        return false;
    }
    ann.insert(REVISION.into(), rev);
    true
}

fn create_replica_set(
    store: &mut Store,
    d: &Deployment,
    template: &Value,
    hash: &str,
    rs_name: &str,
    replicas: i32,
    rev: i64,
) -> Option<ReplicaSet> {
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let spec = d.spec.as_ref()?;
    let mut t = template.clone();
    t["metadata"]["labels"][HASH_LABEL] = json!(hash);
    let mut selector = serde_json::to_value(&spec.selector).ok()?;
    selector["matchLabels"][HASH_LABEL] = json!(hash);
    let mut labels = t["metadata"]["labels"].clone();
    labels[HASH_LABEL] = json!(hash);
    let rs = json!({
        "metadata": {
            "name": rs_name,
            "labels": labels,
            "annotations": {
                REVISION: rev.to_string(),
                DESIRED_REPLICAS: desired(d).to_string(),
                MAX_REPLICAS: (desired(d) + fenceposts(d).0).to_string(),
            },
            "ownerReferences": [serde_json::to_value(owner_ref(d)).ok()?],
        },
        "spec": {
            "replicas": replicas,
            "minReadySeconds": spec.min_ready_seconds.unwrap_or(0),
            "selector": selector,
            "template": t,
        }
    });
    let rs = objects::admit(Res::ReplicaSet, rs).ok()?;
    let stored = store.create(Res::ReplicaSet, &ns, rs, false).ok()?;
    typed(&stored)
}

/// `NewRSNewReplicas` for RollingUpdate: scale up within `replicas + maxSurge` total.
fn new_rs_replicas(d: &Deployment, all: &[ReplicaSet], new_current: i32) -> i32 {
    let want = desired(d);
    let (surge, _) = fenceposts(d);
    let current: i32 = all.iter().map(rs_replicas).sum();
    let max_total = want + surge;
    if current >= max_total {
        return new_current;
    }
    let up = (max_total - current).min(want - new_current).max(0);
    new_current + up
}

fn reconcile_new_rs(store: &mut Store, d: &Deployment, all: &mut [ReplicaSet], ni: usize) -> bool {
    let want = desired(d);
    let cur = rs_replicas(&all[ni]);
    if cur == want {
        return false;
    }
    if cur > want {
        return scale(store, d, &mut all[ni], want);
    }
    let next = new_rs_replicas(d, all, cur);
    scale(store, d, &mut all[ni], next)
}

fn reconcile_old_rss(store: &mut Store, d: &Deployment, all: &mut [ReplicaSet], ni: usize) -> bool {
    let old_idx: Vec<usize> = (0..all.len())
        .filter(|i| *i != ni && rs_replicas(&all[*i]) > 0)
        .collect();
    if old_idx.is_empty() {
        return false;
    }
    let want = desired(d);
    let min_available = want - max_unavailable(d);
    let all_pods: i32 = all.iter().map(rs_replicas).sum();
    let new_unavailable = rs_replicas(&all[ni]) - rs_available(&all[ni]);
    let max_scaled_down = all_pods - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return false;
    }
    // Unhealthy old replicas go first: removing them costs no availability.
    let mut cleaned = 0;
    for &i in &old_idx {
        if cleaned >= max_scaled_down {
            break;
        }
        let (r, a) = (rs_replicas(&all[i]), rs_available(&all[i]));
        if r == 0 || r == a {
            continue;
        }
        let down = (max_scaled_down - cleaned).min(r - a);
        if scale(store, d, &mut all[i], r - down) {
            cleaned += down;
        }
    }
    // Then healthy ones, as long as availability stays at or above the minimum.
    let available: i32 = all.iter().map(rs_available).sum();
    let mut scaled = 0;
    if available > min_available {
        let total = available - min_available;
        for &i in &old_idx {
            if scaled >= total {
                break;
            }
            let r = rs_replicas(&all[i]);
            if r == 0 {
                continue;
            }
            let down = r.min(total - scaled);
            if scale(store, d, &mut all[i], r - down) {
                scaled += down;
            }
        }
    }
    cleaned + scaled > 0
}

/// Delete old, fully scaled-down ReplicaSets beyond `revisionHistoryLimit`.
fn cleanup_old(store: &mut Store, d: &Deployment, all: &[ReplicaSet], ni: usize) {
    let limit = d
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(10)
        .max(0) as usize;
    let mut dead: Vec<&ReplicaSet> = all
        .iter()
        .enumerate()
        .filter(|(i, rs)| {
            *i != ni
                && rs_replicas(rs) == 0
                && rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0
                && rs.metadata.generation == rs.status.as_ref().and_then(|s| s.observed_generation)
        })
        .map(|(_, rs)| rs)
        .collect();
    if dead.len() <= limit {
        return;
    }
    dead.sort_by_key(|rs| revision(rs));
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    for rs in &dead[..dead.len() - limit] {
        if let Some(n) = rs.metadata.name.as_deref() {
            let _ = store.delete(Res::ReplicaSet, &ns, n, None, None, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn fenceposts_round_like_upstream() {
        // Defaults 25%/25%: surge rounds up, unavailable rounds down.
        assert_eq!(resolve_fenceposts(None, None, 2), (1, 0));
        assert_eq!(resolve_fenceposts(None, None, 4), (1, 1));
        assert_eq!(resolve_fenceposts(None, None, 10), (3, 2));
        assert_eq!(
            resolve_fenceposts(Some(&pct("50%")), Some(&pct("10%")), 3),
            (2, 0)
        );
        assert_eq!(
            resolve_fenceposts(Some(&IntOrString::Int(0)), Some(&pct("10%")), 3),
            (0, 1),
            "both zero resolves to maxUnavailable 1"
        );
        assert_eq!(
            resolve_fenceposts(Some(&IntOrString::Int(2)), Some(&IntOrString::Int(1)), 1),
            (2, 1)
        );
    }

    #[test]
    fn template_hash_is_stable_and_safe() {
        let t = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}});
        let h = pod_template_hash(&t, 0);
        assert_eq!(h, pod_template_hash(&t.clone(), 0));
        assert_ne!(h, pod_template_hash(&t, 1));
        assert!(!h.is_empty() && h.len() <= 10);
        assert!(h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        let mut t2 = t.clone();
        t2["metadata"]["annotations"] = json!({"openai-key-rotator/rotation-id": "r1"});
        assert_ne!(h, pod_template_hash(&t2, 0));
    }

    fn dep(generation: i64, replicas: i32, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn kubectl_rollout_rule() {
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(
            rollout_status(&dep(2, 3, done.clone())),
            RolloutStatus::Complete
        );
        // Spec change not yet observed.
        assert!(
            matches!(rollout_status(&dep(3, 3, done)), RolloutStatus::Waiting(m) if m.contains("spec update"))
        );
        let s = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 2, "availableReplicas": 3});
        assert!(
            matches!(rollout_status(&dep(2, 3, s)), RolloutStatus::Waiting(m) if m.contains("2 out of 3 new replicas"))
        );
        let s = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3});
        assert!(
            matches!(rollout_status(&dep(2, 3, s)), RolloutStatus::Waiting(m) if m.contains("1 old replicas are pending termination"))
        );
        let s = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2});
        assert!(
            matches!(rollout_status(&dep(2, 3, s)), RolloutStatus::Waiting(m) if m.contains("2 of 3 updated replicas are available"))
        );
        let s = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]});
        assert_eq!(
            rollout_status(&dep(2, 3, s)),
            RolloutStatus::Failed("deployment \"web\" exceeded its progress deadline".into())
        );
    }

    #[test]
    fn new_rs_scale_up_respects_surge() {
        let rs = |n: i32| -> ReplicaSet {
            serde_json::from_value(
                json!({"metadata": {"name": "r"}, "spec": {"replicas": n, "selector": {}}}),
            )
            .unwrap()
        };
        let d = dep(1, 4, json!({}));
        // 4 old, surge 1 → new may have 1.
        assert_eq!(new_rs_replicas(&d, &[rs(4)], 0), 1);
        // 3 old + 1 new at total 4+1=5 limit: can go to 2.
        assert_eq!(new_rs_replicas(&d, &[rs(3), rs(1)], 1), 2);
        // At the limit: no change.
        assert_eq!(new_rs_replicas(&d, &[rs(4), rs(1)], 1), 1);
        // Never beyond desired.
        assert_eq!(new_rs_replicas(&d, &[rs(4)], 4), 4);
    }

    #[test]
    fn conditions_keep_transition_time() {
        let mut st = DeploymentStatus::default();
        let mut c = new_condition("Available", true, "MinimumReplicasAvailable", "m".into());
        let early = Time(Timestamp::from_second(1_000).unwrap());
        c.last_transition_time = Some(early.clone());
        c.last_update_time = Some(early.clone());
        set_condition(&mut st, c);
        set_condition(
            &mut st,
            new_condition("Available", true, "MinimumReplicasAvailable", "m".into()),
        );
        assert_eq!(
            st.conditions.as_ref().unwrap()[0].last_update_time,
            Some(early.clone()),
            "no-op"
        );
        set_condition(
            &mut st,
            new_condition("Available", true, "Other", "m".into()),
        );
        let c = &st.conditions.as_ref().unwrap()[0];
        assert_eq!(
            c.last_transition_time,
            Some(early),
            "same status keeps transition time"
        );
        assert_eq!(c.reason.as_deref(), Some("Other"));
    }
}
