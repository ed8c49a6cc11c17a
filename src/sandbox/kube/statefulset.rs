//! The StatefulSet controller (`pkg/controller/statefulset`, v1.33 defaults: the
//! `MaxUnavailableStatefulSet` gate is off, so updates go one pod at a time).
//!
//! Pods are `<name>-<ordinal>`; with `OrderedReady` they are created in ordinal order, each
//! waiting for the previous to be Running and Ready (and available for `minReadySeconds`).
//! A RollingUpdate deletes the highest-ordinal pod not on the update revision, waits for its
//! replacement (created from the update revision) to be healthy, then the next, down to the
//! partition. Revisions are real ControllerRevisions (see [`super::revisions`]).

use super::controller::{is_terminating, pod_is_available, pod_is_ready, RolloutStatus};
use super::discovery::Res;
use super::revisions::{self, Owner, RevisionError, Revisions, REVISION_LABEL};
use super::store::meta_str;
use super::Inner;
use k8s_openapi::api::apps::v1::StatefulSet;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// kubectl's `StatefulSetStatusViewer`, message for message. The API server defaults
/// `rollingUpdate.partition` to 0, so a finished rollout usually reads "partitioned roll out
/// complete".
pub fn rollout_status(s: &StatefulSet) -> RolloutStatus {
    let spec = s.spec.clone().unwrap_or_default();
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref().unwrap_or("RollingUpdate") != "RollingUpdate" {
        return RolloutStatus::Failed(
            "rollout status is only available for RollingUpdate strategy type".into(),
        );
    }
    let st = s.status.clone().unwrap_or_default();
    let observed = st.observed_generation.unwrap_or(0);
    if observed == 0 || s.metadata.generation.unwrap_or(0) > observed {
        return RolloutStatus::Waiting(
            "Waiting for statefulset spec update to be observed...".into(),
        );
    }
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    if let Some(want) = spec.replicas {
        if ready < want {
            return RolloutStatus::Waiting(format!(
                "Waiting for {} pods to be ready...",
                want - ready
            ));
        }
    }
    if let Some(ru) = strategy.rolling_update {
        if let (Some(want), Some(p)) = (spec.replicas, ru.partition) {
            if updated < want - p {
                return RolloutStatus::Waiting(format!(
                    "Waiting for partitioned roll out to finish: {updated} out of {} new pods have been updated...",
                    want - p
                ));
            }
        }
        return RolloutStatus::Complete;
    }
    if st.update_revision != st.current_revision {
        return RolloutStatus::Waiting(format!(
            "waiting for statefulset rolling update to complete {updated} pods at revision {}...",
            st.update_revision.unwrap_or_default()
        ));
    }
    RolloutStatus::Complete
}

/// What the controller sees of one pod.
#[derive(Clone, Debug)]
pub(crate) struct StsPod {
    pub name: String,
    pub revision: String,
    pub terminating: bool,
    /// Ready for `minReadySeconds` (and not terminating): `isHealthy`.
    pub healthy: bool,
}

/// How pods move to a new revision.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// RollingUpdate with a `rollingUpdate` block: pods at ordinals >= partition update.
    Partitioned(usize),
    /// RollingUpdate without one: pods below `status.currentReplicas` are recreated from the
    /// current revision (the upstream quirk), all are updated.
    Rolling { current_replicas: usize },
    /// Pods change only when someone deletes them.
    OnDelete,
}

/// One step the controller takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StsAction {
    /// Create the pod at this index (ordinal − start) from the current revision or the update one.
    Create {
        index: usize,
        current: bool,
    },
    Delete(String),
}

/// `updateStatefulSet`'s decisions for one pass. `slots[i]` is the pod at index `i` of the
/// wanted replicas; `condemned` are pods beyond them, highest ordinal first.
pub(crate) fn plan(
    slots: &[Option<StsPod>],
    condemned: &[StsPod],
    update_revision: &str,
    strategy: Strategy,
    monotonic: bool,
) -> Vec<StsAction> {
    let mut out = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        match slot {
            None => {
                let current = match strategy {
                    Strategy::Partitioned(p) => i < p,
                    Strategy::Rolling { current_replicas } => i < current_replicas,
                    Strategy::OnDelete => false,
                };
                out.push(StsAction::Create { index: i, current });
                if monotonic {
                    return out;
                }
            }
            // OrderedReady: nothing further happens until this pod is healthy.
            Some(p) if monotonic && (p.terminating || !p.healthy) => return out,
            Some(_) => {}
        }
    }
    for c in condemned {
        if c.terminating {
            if monotonic {
                return out;
            }
            continue;
        }
        out.push(StsAction::Delete(c.name.clone()));
        if monotonic {
            return out;
        }
    }
    let update_min = match strategy {
        Strategy::OnDelete => return out,
        Strategy::Partitioned(p) => p,
        Strategy::Rolling { .. } => 0,
    };
    // The highest ordinal not on the update revision goes first, one at a time.
    for i in (update_min..slots.len()).rev() {
        let Some(p) = &slots[i] else { return out };
        if p.revision != update_revision && !p.terminating {
            out.push(StsAction::Delete(p.name.clone()));
            return out;
        }
        if !p.healthy {
            return out;
        }
    }
    out
}

pub(crate) fn sync_all(inner: &mut Inner, now: Instant, scope: super::controller::Scope) {
    let sets: Vec<Value> = scope
        .list(&inner.store, Res::StatefulSet)
        .into_iter()
        .filter(|s| !is_terminating(s))
        .cloned()
        .collect();
    for set in sets {
        sync(inner, &set, now);
    }
}

fn strategy_of(set: &Value) -> Strategy {
    let s = &set["spec"]["updateStrategy"];
    if s["type"] == "OnDelete" {
        return Strategy::OnDelete;
    }
    match s.get("rollingUpdate").filter(|r| r.is_object()) {
        Some(ru) => Strategy::Partitioned(ru["partition"].as_u64().unwrap_or(0) as usize),
        None => Strategy::Rolling {
            current_replicas: set
                .pointer("/status/currentReplicas")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
        },
    }
}

fn pod_revision(p: &Value) -> String {
    p.pointer(&format!("/metadata/labels/{REVISION_LABEL}"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn sync(inner: &mut Inner, set: &Value, now: Instant) {
    let name = meta_str(set, "name").to_string();
    let spec = &set["spec"];
    let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let start = spec
        .pointer("/ordinals/start")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let min_ready = Duration::from_secs(spec["minReadySeconds"].as_u64().unwrap_or(0));
    let strategy = strategy_of(set);
    let monotonic = spec["podManagementPolicy"] != "Parallel";

    let pods = revisions::owned(&inner.store, Res::Pod, set);
    let in_use: Vec<String> = pods.iter().map(pod_revision).collect();
    let revs = match revisions::sync(&mut inner.store, Owner::StatefulSet, set, &in_use) {
        Ok(r) => r,
        Err(RevisionError::Collision) => {
            let mut status = set.get("status").cloned().unwrap_or_else(|| json!({}));
            status["collisionCount"] = json!(status["collisionCount"].as_i64().unwrap_or(0) + 1);
            revisions::write_status(&mut inner.store, Res::StatefulSet, set, status);
            return;
        }
        Err(RevisionError::Store) => return,
    };

    let prefix = format!("{name}-");
    let mut slots: Vec<Option<StsPod>> = vec![None; replicas];
    let mut condemned: Vec<(usize, StsPod)> = Vec::new();
    for p in &pods {
        let pod_name = meta_str(p, "name");
        let Some(ord) = pod_name
            .strip_prefix(&prefix)
            .and_then(|o| o.parse::<usize>().ok())
        else {
            continue;
        };
        let view = StsPod {
            name: pod_name.to_string(),
            revision: pod_revision(p),
            terminating: is_terminating(p),
            healthy: !is_terminating(p) && pod_is_available(inner, p, min_ready, now),
        };
        match ord.checked_sub(start).filter(|i| *i < replicas) {
            Some(i) => slots[i] = Some(view),
            None => condemned.push((ord, view)),
        }
    }
    condemned.sort_by_key(|c| std::cmp::Reverse(c.0));
    let condemned: Vec<StsPod> = condemned.into_iter().map(|(_, p)| p).collect();

    for action in plan(&slots, &condemned, revs.update_name(), strategy, monotonic) {
        match action {
            StsAction::Create { index, current } => {
                create(inner, set, &revs, start + index, current);
            }
            StsAction::Delete(pod) => {
                if let Some(p) = pods.iter().find(|p| meta_str(p, "name") == pod) {
                    revisions::delete_pod(&mut inner.store, p);
                }
            }
        }
    }

    let status = status(inner, set, &revs, min_ready, now);
    revisions::write_status(&mut inner.store, Res::StatefulSet, set, status);
}

/// `newVersionedStatefulSetPod`: `<name>-<ordinal>` from the chosen revision.
fn create(inner: &mut Inner, set: &Value, revs: &Revisions, ordinal: usize, current: bool) {
    let (rev, template) = if current {
        match revisions::revision_template(&revs.current) {
            Some(t) => (revs.current_name(), t),
            None => return,
        }
    } else {
        (revs.update_name(), set["spec"]["template"].clone())
    };
    let name = format!("{}-{ordinal}", meta_str(set, "name"));
    let mut pod = revisions::new_pod(
        Owner::StatefulSet,
        set,
        &template,
        Some(name.clone()),
        &[
            (REVISION_LABEL, rev.to_string()),
            (POD_NAME_LABEL, name.clone()),
            (POD_INDEX_LABEL, ordinal.to_string()),
        ],
    );
    // Stable network identity: the pod's hostname, under the governing Service.
    pod["spec"]["hostname"] = json!(name);
    if let Some(svc) = set["spec"]["serviceName"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        pod["spec"]["subdomain"] = json!(svc);
    }
    let ns = meta_str(set, "namespace").to_string();
    revisions::create_pod(&mut inner.store, &ns, pod);
}

/// `computeReplicaStatus` + `completeRollingUpdate`, from the pods as they are now.
fn status(
    inner: &Inner,
    set: &Value,
    revs: &Revisions,
    min_ready: Duration,
    now: Instant,
) -> Value {
    let pods = revisions::owned(&inner.store, Res::Pod, set);
    let (mut ready, mut available, mut current, mut updated) = (0, 0, 0, 0);
    for p in &pods {
        if pod_is_ready(p) {
            ready += 1;
            if pod_is_available(inner, p, min_ready, now) {
                available += 1;
            }
        }
        if !is_terminating(p) {
            let rev = pod_revision(p);
            if rev == revs.current_name() {
                current += 1;
            }
            if rev == revs.update_name() {
                updated += 1;
            }
        }
    }
    let replicas = pods.len();
    let mut current_revision = revs.current_name().to_string();
    let rolling = set["spec"]["updateStrategy"]["type"] == "RollingUpdate";
    if rolling && updated == replicas && ready == replicas {
        current = updated;
        current_revision = revs.update_name().to_string();
    }
    let mut st = json!({
        "observedGeneration": set.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": replicas,
        "availableReplicas": available,
        "currentRevision": current_revision,
        "updateRevision": revs.update_name(),
        "collisionCount": set.pointer("/status/collisionCount").and_then(Value::as_i64).unwrap_or(0),
    });
    for (k, v) in [
        ("readyReplicas", ready),
        ("currentReplicas", current),
        ("updatedReplicas", updated),
    ] {
        if v > 0 {
            st[k] = json!(v);
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, rev: &str, healthy: bool) -> Option<StsPod> {
        Some(StsPod {
            name: name.into(),
            revision: rev.into(),
            terminating: false,
            healthy,
        })
    }

    fn terminating(name: &str, rev: &str) -> Option<StsPod> {
        let mut p = pod(name, rev, false)?;
        p.terminating = true;
        Some(p)
    }

    const P0: Strategy = Strategy::Partitioned(0);

    #[test]
    fn ordered_ready_creates_one_pod_at_a_time_in_ordinal_order() {
        let acts = plan(&[None, None, None], &[], "new", P0, true);
        assert_eq!(
            acts,
            [StsAction::Create {
                index: 0,
                current: false
            }]
        );
        // web-0 exists but is not ready yet: wait.
        assert!(plan(
            &[pod("web-0", "new", false), None, None],
            &[],
            "new",
            P0,
            true
        )
        .is_empty());
        let acts = plan(
            &[pod("web-0", "new", true), None, None],
            &[],
            "new",
            P0,
            true,
        );
        assert_eq!(
            acts,
            [StsAction::Create {
                index: 1,
                current: false
            }]
        );
        // Parallel creates every missing pod at once.
        assert_eq!(plan(&[None, None, None], &[], "new", P0, false).len(), 3);
    }

    #[test]
    fn rolling_update_goes_in_reverse_ordinal_order_one_at_a_time() {
        let all_old = [
            pod("web-0", "old", true),
            pod("web-1", "old", true),
            pod("web-2", "old", true),
        ];
        assert_eq!(
            plan(&all_old, &[], "new", P0, true),
            [StsAction::Delete("web-2".into())]
        );
        // web-2 terminating: nothing else happens (OrderedReady waits on it).
        let s = [
            pod("web-0", "old", true),
            pod("web-1", "old", true),
            terminating("web-2", "old"),
        ];
        assert!(plan(&s, &[], "new", P0, true).is_empty());
        // Gone: recreated from the update revision.
        let s = [pod("web-0", "old", true), pod("web-1", "old", true), None];
        assert_eq!(
            plan(&s, &[], "new", P0, true),
            [StsAction::Create {
                index: 2,
                current: false
            }]
        );
        // Replacement not ready yet: web-1 is not touched.
        let s = [
            pod("web-0", "old", true),
            pod("web-1", "old", true),
            pod("web-2", "new", false),
        ];
        assert!(plan(&s, &[], "new", P0, true).is_empty());
        // Even with Parallel management, updates stay one at a time and wait for health.
        assert!(plan(&s, &[], "new", P0, false).is_empty());
        // Ready: next is web-1.
        let s = [
            pod("web-0", "old", true),
            pod("web-1", "old", true),
            pod("web-2", "new", true),
        ];
        assert_eq!(
            plan(&s, &[], "new", P0, true),
            [StsAction::Delete("web-1".into())]
        );
        let done = [
            pod("web-0", "new", true),
            pod("web-1", "new", true),
            pod("web-2", "new", true),
        ];
        assert!(plan(&done, &[], "new", P0, true).is_empty());
    }

    #[test]
    fn partition_and_on_delete_hold_pods_back() {
        let s = [
            pod("web-0", "old", true),
            pod("web-1", "old", true),
            pod("web-2", "new", true),
        ];
        // Partition 2: web-0 and web-1 stay on the old revision.
        assert!(plan(&s, &[], "new", Strategy::Partitioned(2), true).is_empty());
        assert_eq!(
            plan(&s, &[], "new", Strategy::Partitioned(1), true),
            [StsAction::Delete("web-1".into())]
        );
        // A pod below the partition is recreated from the current revision.
        let s = [None, pod("web-1", "new", true)];
        assert_eq!(
            plan(&s, &[], "new", Strategy::Partitioned(1), true),
            [StsAction::Create {
                index: 0,
                current: true
            }]
        );
        let all_old = [pod("web-0", "old", true), pod("web-1", "old", true)];
        assert!(plan(&all_old, &[], "new", Strategy::OnDelete, true).is_empty());
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_first() {
        let s = [pod("web-0", "new", true)];
        let condemned = [
            pod("web-2", "new", true).unwrap(),
            pod("web-1", "new", true).unwrap(),
        ];
        assert_eq!(
            plan(&s, &condemned, "new", P0, true),
            [StsAction::Delete("web-2".into())]
        );
        let condemned = [
            terminating("web-2", "new").unwrap(),
            pod("web-1", "new", true).unwrap(),
        ];
        assert!(plan(&s, &condemned, "new", P0, true).is_empty());
    }

    fn sts(generation: i64, status: Value) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "db", "generation": generation},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "db"}},
                     "serviceName": "db",
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
                     "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn kubectl_statefulset_rule() {
        let done = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3,
            "updatedReplicas": 3, "currentRevision": "db-a", "updateRevision": "db-a"});
        assert_eq!(
            rollout_status(&sts(2, done.clone())),
            RolloutStatus::Complete
        );
        assert!(
            matches!(rollout_status(&sts(3, done)), RolloutStatus::Waiting(m) if m.contains("spec update"))
        );
        let s = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 2,
            "updatedReplicas": 1, "currentRevision": "db-a", "updateRevision": "db-b"});
        assert_eq!(
            rollout_status(&sts(2, s)),
            RolloutStatus::Waiting("Waiting for 1 pods to be ready...".into())
        );
        let s = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3,
            "updatedReplicas": 1, "currentRevision": "db-a", "updateRevision": "db-b"});
        assert!(
            matches!(rollout_status(&sts(2, s)), RolloutStatus::Waiting(m) if m.contains("1 out of 3 new pods"))
        );
        let mut on_delete = sts(1, json!({"observedGeneration": 1}));
        on_delete.spec.as_mut().unwrap().update_strategy = Some(Default::default());
        on_delete
            .spec
            .as_mut()
            .unwrap()
            .update_strategy
            .as_mut()
            .unwrap()
            .type_ = Some("OnDelete".into());
        assert!(matches!(
            rollout_status(&on_delete),
            RolloutStatus::Failed(_)
        ));
    }
}
