//! The DaemonSet controller (`pkg/controller/daemon`) over a fixed set of simulated nodes
//! (`KubeSimOptions::nodes`; there is no Node API).
//!
//! One pod per node whose labels satisfy the template's `nodeSelector`. A RollingUpdate
//! (`maxSurge` 0) deletes old pods while at most `maxUnavailable` nodes lack an available
//! pod; a node's replacement is created once its old pod is gone. `maxSurge` > 0 is not
//! modelled: such DaemonSets update as with `maxSurge` 0.

use super::controller::{
    is_terminating, pod_is_available, pod_is_ready, scaled_value, RolloutStatus, NODE_NAME,
};
use super::discovery::Res;
use super::revisions::{self, Owner, RevisionError, REVISION_LABEL};
use super::store::meta_str;
use super::{Inner, KubeSimOptions};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The annotation the API server keeps the template generation in (`spec.templateGeneration`
/// of the old extensions API), bumped whenever the pod template changes.
pub const TEMPLATE_GENERATION: &str = "deprecated.daemonset.template.generation";
const POD_TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";

/// Names of the simulated nodes: `okr-sim-node` (where every other pod runs), then
/// `okr-sim-node-2`, `okr-sim-node-3`, ...
pub fn node_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i {
            0 => NODE_NAME.to_string(),
            i => format!("{NODE_NAME}-{}", i + 1),
        })
        .collect()
}

/// The labels a simulated node carries (what a `nodeSelector` can match).
fn node_labels(node: &str) -> Value {
    json!({
        "kubernetes.io/hostname": node,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    })
}

/// kubectl's `DaemonSetStatusViewer`, message for message.
pub fn rollout_status(d: &DaemonSet) -> RolloutStatus {
    let strategy = d
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.clone())
        .unwrap_or_else(|| "RollingUpdate".into());
    if strategy != "RollingUpdate" {
        return RolloutStatus::Failed(
            "rollout status is only available for RollingUpdate strategy type".into(),
        );
    }
    let name = d.metadata.name.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return RolloutStatus::Waiting(
            "Waiting for daemon set spec update to be observed...".into(),
        );
    }
    let desired = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let available = st.number_available.unwrap_or(0);
    if updated < desired {
        return RolloutStatus::Waiting(format!(
            "Waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated..."
        ));
    }
    if available < desired {
        return RolloutStatus::Waiting(format!(
            "Waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available..."
        ));
    }
    RolloutStatus::Complete
}

/// What the rolling update sees of one pod on a node.
#[derive(Clone, Debug)]
pub(crate) struct DsPod {
    pub name: String,
    /// On the update revision (`IsPodUpdated`).
    pub new: bool,
    pub available: bool,
    pub terminating: bool,
}

/// `rollingUpdate` with `maxSurge` 0: the old pods to delete this pass. `nodes` holds each
/// node's pods; a node counts as unavailable while it has no available pod of the current
/// revision, and old pods are deleted only while fewer than `max_unavailable` are.
/// Unavailable old pods are always replaced (that costs no availability).
pub(crate) fn plan_rolling_update(nodes: &[Vec<DsPod>], max_unavailable: usize) -> Vec<String> {
    let mut unavailable = 0;
    let mut allowed = Vec::new();
    let mut candidates = Vec::new();
    for pods in nodes {
        let live: Vec<&DsPod> = pods.iter().filter(|p| !p.terminating).collect();
        let news: Vec<&&DsPod> = live.iter().filter(|p| p.new).collect();
        let olds: Vec<&&DsPod> = live.iter().filter(|p| !p.new).collect();
        if news.len() > 1 || olds.len() > 1 {
            // `manage` cleans up duplicates first.
            unavailable += 1;
            continue;
        }
        match (news.first(), olds.first()) {
            (None, None) | (Some(_), Some(_)) => unavailable += 1,
            (Some(n), None) => {
                if !n.available {
                    unavailable += 1;
                }
            }
            (None, Some(o)) => {
                if !o.available {
                    allowed.push(o.name.clone());
                } else if unavailable < max_unavailable {
                    candidates.push(o.name.clone());
                }
            }
        }
    }
    let remaining = max_unavailable
        .saturating_sub(unavailable)
        .min(candidates.len());
    allowed.extend(candidates.into_iter().take(remaining));
    allowed
}

/// `UnavailableCount` and its guard: a percentage rounds up, and a DaemonSet that allows
/// neither surge nor unavailability gets 1.
pub(crate) fn max_unavailable(ds: &Value, desired: usize) -> usize {
    let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    let get = |k: &str| -> IntOrString {
        serde_json::from_value(ru[k].clone()).unwrap_or(IntOrString::Int(0))
    };
    let d = desired as i32;
    let unavailable = scaled_value(&get("maxUnavailable"), d, true).max(0) as usize;
    let surge = scaled_value(&get("maxSurge"), d, true).max(0);
    if desired > 0 && unavailable == 0 && surge == 0 {
        1
    } else {
        unavailable
    }
}

pub(crate) fn sync_all(
    inner: &mut Inner,
    opts: &KubeSimOptions,
    now: Instant,
    scope: super::controller::Scope,
) {
    let sets: Vec<Value> = scope
        .list(&inner.store, Res::DaemonSet)
        .into_iter()
        .filter(|s| !is_terminating(s))
        .cloned()
        .collect();
    let nodes = node_names(opts.nodes);
    for ds in sets {
        sync(inner, &ds, &nodes, now);
    }
}

fn should_run(ds: &Value, node: &str) -> bool {
    let labels = node_labels(node);
    ds.pointer("/spec/template/spec/nodeSelector")
        .and_then(Value::as_object)
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn node_of(p: &Value) -> &str {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Oldest first (`podByCreationTimestampAndPhase`, names breaking ties).
fn by_age(pods: &mut [Value]) {
    pods.sort_by(|a, b| {
        let key = |p: &Value| {
            (
                p.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                meta_str(p, "name").to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
}

fn sync(inner: &mut Inner, ds: &Value, nodes: &[String], now: Instant) {
    let min_ready = Duration::from_secs(ds["spec"]["minReadySeconds"].as_u64().unwrap_or(0));
    let pods = revisions::owned(&inner.store, Res::Pod, ds);
    // Pods carry the hash; the revision is `<name>-<hash>`.
    let in_use: Vec<String> = pods
        .iter()
        .filter_map(|p| p.pointer(&format!("/metadata/labels/{REVISION_LABEL}")))
        .filter_map(Value::as_str)
        .map(|h| format!("{}-{h}", meta_str(ds, "name")))
        .collect();
    let revs = match revisions::sync(&mut inner.store, Owner::DaemonSet, ds, &in_use) {
        Ok(r) => r,
        Err(RevisionError::Collision) => {
            let mut status = ds.get("status").cloned().unwrap_or_else(|| json!({}));
            status["collisionCount"] = json!(status["collisionCount"].as_i64().unwrap_or(0) + 1);
            revisions::write_status(&mut inner.store, Res::DaemonSet, ds, status);
            return;
        }
        Err(RevisionError::Store) => return,
    };
    let hash = revs.update_hash().to_string();
    let template_generation = ds
        .pointer(&format!(
            "/metadata/annotations/{}",
            TEMPLATE_GENERATION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .unwrap_or("1")
        .to_string();
    let is_new = |p: &Value| {
        let label = |k: &str| {
            p.pointer(&format!("/metadata/labels/{k}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        label(REVISION_LABEL) == hash || label(POD_TEMPLATE_GENERATION_LABEL) == template_generation
    };

    // manage: one pod per eligible node, none elsewhere.
    let mut creates = Vec::new();
    let mut deletes: Vec<Value> = Vec::new();
    let mut per_node: Vec<Vec<Value>> = Vec::new();
    for node in nodes {
        let mut on: Vec<Value> = pods
            .iter()
            .filter(|p| node_of(p) == node)
            .cloned()
            .collect();
        by_age(&mut on);
        let live: Vec<&Value> = on.iter().filter(|p| !is_terminating(p)).collect();
        if should_run(ds, node) {
            if on.is_empty() {
                creates.push(node.clone());
            } else if live.len() > 1 {
                deletes.extend(live[1..].iter().map(|p| (*p).clone()));
            }
        } else {
            deletes.extend(live.into_iter().cloned());
        }
        per_node.push(on);
    }
    deletes.extend(
        pods.iter()
            .filter(|p| !is_terminating(p) && !nodes.iter().any(|n| n == node_of(p)))
            .cloned(),
    );
    let managed = !creates.is_empty() || !deletes.is_empty();
    for node in creates {
        create(inner, ds, &node, &hash, &template_generation);
    }
    for p in &deletes {
        revisions::delete_pod(&mut inner.store, p);
    }

    // rollingUpdate, once manage's own changes are done (the expectations).
    let rolling = ds["spec"]["updateStrategy"]["type"] == "RollingUpdate";
    if !managed && rolling {
        let eligible: Vec<usize> = (0..nodes.len())
            .filter(|i| should_run(ds, &nodes[*i]))
            .collect();
        let views: Vec<Vec<DsPod>> = eligible
            .iter()
            .map(|&i| {
                per_node[i]
                    .iter()
                    .map(|p| DsPod {
                        name: meta_str(p, "name").to_string(),
                        new: is_new(p),
                        available: pod_is_available(inner, p, min_ready, now),
                        terminating: is_terminating(p),
                    })
                    .collect()
            })
            .collect();
        let max = max_unavailable(ds, eligible.len());
        for name in plan_rolling_update(&views, max) {
            if let Some(p) = pods.iter().find(|p| meta_str(p, "name") == name) {
                revisions::delete_pod(&mut inner.store, p);
            }
        }
    }

    // updateDaemonSetStatus: each eligible node's oldest pod speaks for it.
    let pods = revisions::owned(&inner.store, Res::Pod, ds);
    let (mut desired, mut current, mut misscheduled, mut ready, mut updated, mut available) =
        (0, 0, 0, 0, 0, 0);
    for node in nodes {
        let mut on: Vec<Value> = pods
            .iter()
            .filter(|p| node_of(p) == node)
            .cloned()
            .collect();
        by_age(&mut on);
        if !should_run(ds, node) {
            if !on.is_empty() {
                misscheduled += 1;
            }
            continue;
        }
        desired += 1;
        let Some(p) = on.first() else { continue };
        current += 1;
        if pod_is_ready(p) {
            ready += 1;
            if pod_is_available(inner, p, min_ready, now) {
                available += 1;
            }
        }
        if is_new(p) {
            updated += 1;
        }
    }
    let mut st = json!({
        "observedGeneration": ds.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
    });
    for (k, v) in [
        ("updatedNumberScheduled", updated),
        ("numberAvailable", available),
        ("numberUnavailable", desired - available),
    ] {
        if v > 0 {
            st[k] = json!(v);
        }
    }
    if let Some(c) = ds.pointer("/status/collisionCount") {
        st["collisionCount"] = c.clone();
    }
    revisions::write_status(&mut inner.store, Res::DaemonSet, ds, st);
}

/// A daemon pod bound to `node` (`CreatePodTemplate` + the node affinity and the
/// tolerations the controller adds).
fn create(inner: &mut Inner, ds: &Value, node: &str, hash: &str, template_generation: &str) {
    let template = ds["spec"]["template"].clone();
    let mut pod = revisions::new_pod(
        Owner::DaemonSet,
        ds,
        &template,
        None,
        &[
            (REVISION_LABEL, hash.to_string()),
            (
                POD_TEMPLATE_GENERATION_LABEL,
                template_generation.to_string(),
            ),
        ],
    );
    let spec = &mut pod["spec"];
    spec["affinity"]["nodeAffinity"] = json!({
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
        ]}
    });
    let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for (key, effect) in [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ] {
        if !tolerations.iter().any(|t| t["key"] == key) {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": effect}));
        }
    }
    spec["tolerations"] = json!(tolerations);
    // The scheduler binds it at once: there is nothing else to place it on.
    spec["nodeName"] = json!(node);
    let ns = meta_str(ds, "namespace").to_string();
    let name = loop {
        let n = format!(
            "{}-{}",
            meta_str(ds, "name"),
            super::store::random_suffix(5)
        );
        if inner.store.get(Res::Pod, &ns, &n).is_none() {
            break n;
        }
    };
    pod["metadata"]["name"] = json!(name);
    revisions::create_pod(&mut inner.store, &ns, pod);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, new: bool, available: bool) -> DsPod {
        DsPod {
            name: name.into(),
            new,
            available,
            terminating: false,
        }
    }

    #[test]
    fn max_unavailable_bounds_the_old_pods_deleted_per_pass() {
        let four_old: Vec<Vec<DsPod>> = (0..4)
            .map(|i| vec![p(&format!("o{i}"), false, true)])
            .collect();
        assert_eq!(plan_rolling_update(&four_old, 1), ["o0"]);
        assert_eq!(plan_rolling_update(&four_old, 2), ["o0", "o1"]);
        assert_eq!(plan_rolling_update(&four_old, 10).len(), 4);

        // Node 0's replacement is not available yet: with maxUnavailable 1 nothing else goes.
        let mut s = four_old.clone();
        s[0] = vec![p("n0", true, false)];
        assert!(plan_rolling_update(&s, 1).is_empty());
        assert_eq!(plan_rolling_update(&s, 2), ["o1"]);
        // A node whose old pod is terminating (its replacement not created yet) is unavailable.
        let mut s = four_old.clone();
        s[0][0].terminating = true;
        assert!(plan_rolling_update(&s, 1).is_empty());
        // Available: the next one goes.
        let mut s = four_old.clone();
        s[0] = vec![p("n0", true, true)];
        assert_eq!(plan_rolling_update(&s, 1), ["o1"]);
        // An unavailable old pod is replaced regardless of the budget.
        let mut s = four_old;
        s[0] = vec![p("n0", true, false)];
        s[3] = vec![p("o3", false, false)];
        assert_eq!(plan_rolling_update(&s, 1), ["o3"]);
        // All new and available: done.
        let done: Vec<Vec<DsPod>> = (0..3)
            .map(|i| vec![p(&format!("n{i}"), true, true)])
            .collect();
        assert!(plan_rolling_update(&done, 1).is_empty());
    }

    #[test]
    fn max_unavailable_scales_like_upstream() {
        let ds = |mu: Value, ms: Value| {
            json!({"spec": {"updateStrategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": mu, "maxSurge": ms}}}})
        };
        assert_eq!(max_unavailable(&ds(json!(1), json!(0)), 4), 1);
        assert_eq!(
            max_unavailable(&ds(json!("50%"), json!(0)), 3),
            2,
            "rounds up"
        );
        assert_eq!(max_unavailable(&ds(json!("10%"), json!(0)), 4), 1);
        assert_eq!(
            max_unavailable(&ds(json!(0), json!(0)), 4),
            1,
            "never stuck at 0"
        );
        assert_eq!(max_unavailable(&ds(json!(0), json!(0)), 0), 0);
    }

    #[test]
    fn nodes_and_selectors() {
        assert_eq!(
            node_names(3),
            ["okr-sim-node", "okr-sim-node-2", "okr-sim-node-3"]
        );
        let ds = json!({"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/hostname": "okr-sim-node-2"}}}}});
        assert!(!should_run(&ds, "okr-sim-node"));
        assert!(should_run(&ds, "okr-sim-node-2"));
        assert!(should_run(&json!({"spec": {}}), "okr-sim-node"));
    }

    #[test]
    fn kubectl_daemonset_rule() {
        let ds = |generation: i64, status: Value| -> DaemonSet {
            serde_json::from_value(json!({
                "metadata": {"name": "agent", "generation": generation},
                "spec": {"selector": {"matchLabels": {"app": "agent"}},
                         "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": []}}},
                "status": status,
            }))
            .unwrap()
        };
        let base = json!({"observedGeneration": 2, "desiredNumberScheduled": 2,
            "currentNumberScheduled": 2, "numberMisscheduled": 0, "numberReady": 2});
        let mut done = base.clone();
        done["updatedNumberScheduled"] = json!(2);
        done["numberAvailable"] = json!(2);
        assert_eq!(
            rollout_status(&ds(2, done.clone())),
            RolloutStatus::Complete
        );
        assert!(
            matches!(rollout_status(&ds(3, done)), RolloutStatus::Waiting(m) if m.contains("spec update"))
        );
        let mut s = base.clone();
        s["updatedNumberScheduled"] = json!(1);
        s["numberAvailable"] = json!(2);
        assert_eq!(
            rollout_status(&ds(2, s)),
            RolloutStatus::Waiting(
                "Waiting for daemon set \"agent\" rollout to finish: 1 out of 2 new pods have been updated...".into()
            )
        );
        let mut s = base;
        s["updatedNumberScheduled"] = json!(2);
        s["numberAvailable"] = json!(1);
        assert!(
            matches!(rollout_status(&ds(2, s)), RolloutStatus::Waiting(m) if m.contains("1 of 2 updated pods are available"))
        );
    }
}
