//! A simulated Argo Rollouts controller: Rollout → ReplicaSet (`<name>-<hash>`, labelled
//! `rollouts-pod-template-hash`) → pods, with the status fields Argo's clients read.
//!
//! What is modelled: `spec.restartAt` (Argo's `RolloutPodRestarter`: once the time has come,
//! pods created before it are deleted one at a time, only while every other pod is
//! available; when none is left, `status.restartedAt = spec.restartAt`), `spec.paused`
//! (phase `Paused`, "manually paused"; nothing progresses), and the phase Argo's controller
//! computes (`Progressing` → `Healthy`, with `observedGeneration` as a string,
//! replicas/updated/ready/available counts, `currentPodHash`, `stableRS`). A template change
//! replaces all pods at once through a new ReplicaSet (canary/blue-green steps are not
//! simulated). Test hooks ([`super::KubeSim::degrade_rollout_restarts`],
//! [`super::KubeSim::set_rollout_aborted`], [`super::KubeSim::set_rollout_pause_condition`])
//! make a Rollout degrade, abort or pause as its controller would.

use super::controller::{is_terminating, pod_is_available, pod_is_ready, pod_template_hash, Scope};
use super::discovery::Res;
use super::store::{controller_ref, meta_str, WriteScope};
use super::{objects, Inner, WorkloadKind};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HASH_LABEL: &str = "rollouts-pod-template-hash";

pub(crate) fn sync_all(inner: &mut Inner, now: Instant, scope: Scope) {
    let ros: Vec<Value> = scope
        .list(&inner.store, Res::Rollout)
        .into_iter()
        .filter(|r| !is_terminating(r))
        .cloned()
        .collect();
    for ro in ros {
        sync(inner, &ro, now);
    }
}

/// Nothing waits on time: Healthy and any restart done.
pub(crate) fn settled(ro: &Value) -> bool {
    ro.pointer("/status/phase") == Some(&json!("Healthy")) && restart_done(ro)
}

fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

fn restart_at(ro: &Value) -> Option<&str> {
    ro.pointer("/spec/restartAt").and_then(Value::as_str)
}

fn restart_done(ro: &Value) -> bool {
    match restart_at(ro) {
        None => true,
        Some(at) => {
            let done = ro.pointer("/status/restartedAt").and_then(Value::as_str);
            done.and_then(parse_time).is_some() && done.and_then(parse_time) == parse_time(at)
        }
    }
}

fn created_second(p: &Value) -> Option<i64> {
    p.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(parse_time)
}

fn create_rs(inner: &mut Inner, ro: &Value, hash: &str, replicas: i64) -> Option<Value> {
    let ns = meta_str(ro, "namespace");
    let name = meta_str(ro, "name");
    let mut t = ro.pointer("/spec/template").cloned()?;
    t["metadata"]["labels"][HASH_LABEL] = json!(hash);
    let mut selector = ro.pointer("/spec/selector").cloned()?;
    selector["matchLabels"][HASH_LABEL] = json!(hash);
    let rs = json!({
        "metadata": {
            "name": format!("{name}-{hash}"),
            "labels": t["metadata"]["labels"].clone(),
            "annotations": {"rollout.argoproj.io/revision": "1"},
            "ownerReferences": [{
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
                "name": name,
                "uid": meta_str(ro, "uid"),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "replicas": replicas,
            "minReadySeconds": ro.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
            "selector": selector,
            "template": t,
        }
    });
    let rs = objects::admit(Res::ReplicaSet, rs).ok()?;
    inner.store.create(Res::ReplicaSet, ns, rs, false).ok()
}

fn set_rs_replicas(inner: &mut Inner, rs: &Value, replicas: i64) {
    if rs.pointer("/spec/replicas").and_then(Value::as_i64) == Some(replicas) {
        return;
    }
    let mut next = rs.clone();
    next["spec"]["replicas"] = json!(replicas);
    let (ns, name) = (meta_str(rs, "namespace"), meta_str(rs, "name"));
    let _ = inner
        .store
        .update(Res::ReplicaSet, ns, name, next, WriteScope::All, false);
}

fn sync(inner: &mut Inner, ro: &Value, now: Instant) {
    let ns = meta_str(ro, "namespace").to_string();
    let name = meta_str(ro, "name").to_string();
    let uid = meta_str(ro, "uid").to_string();
    let key = (WorkloadKind::Rollout, ns.clone(), name.clone());
    let settings = inner.workloads.get(&key).cloned().unwrap_or_default();
    let desired = ro
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0);
    let paused = ro.pointer("/spec/paused").and_then(Value::as_bool) == Some(true)
        || settings.rollout_pause.is_some();
    let Some(template) = ro.pointer("/spec/template") else {
        return;
    };
    let hash = pod_template_hash(template, 0);
    let owned: Vec<Value> = inner
        .store
        .list(Res::ReplicaSet, Some(&ns))
        .into_iter()
        .filter(|rs| controller_ref(rs).is_some_and(|(k, _, u)| k == "Rollout" && u == uid))
        .cloned()
        .collect();
    let current = owned
        .iter()
        .find(|rs| {
            rs.pointer(&format!("/metadata/labels/{HASH_LABEL}")) == Some(&json!(hash.clone()))
        })
        .cloned();
    let current = match current {
        Some(rs) => Some(rs),
        // A paused Rollout starts no update.
        None if paused && !owned.is_empty() => None,
        None => create_rs(inner, ro, &hash, desired),
    };
    if let Some(rs) = &current {
        if !paused {
            set_rs_replicas(inner, rs, desired);
            for old in owned
                .iter()
                .filter(|o| meta_str(o, "uid") != meta_str(rs, "uid"))
            {
                set_rs_replicas(inner, old, 0);
            }
        }
    }
    let rs_uids: Vec<String> = inner
        .store
        .list(Res::ReplicaSet, Some(&ns))
        .into_iter()
        .filter(|rs| controller_ref(rs).is_some_and(|(k, _, u)| k == "Rollout" && u == uid))
        .map(|rs| meta_str(rs, "uid").to_string())
        .collect();
    let current_uid = current.as_ref().map(|rs| meta_str(rs, "uid").to_string());
    let min_ready = Duration::from_secs(
        ro.pointer("/spec/minReadySeconds")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let pods: Vec<Value> = inner
        .store
        .list(Res::Pod, Some(&ns))
        .into_iter()
        .filter(|p| {
            controller_ref(p).is_some_and(|(k, _, u)| k == "ReplicaSet" && rs_uids.contains(&u))
        })
        .cloned()
        .collect();
    let live: Vec<&Value> = pods.iter().filter(|p| !is_terminating(p)).collect();

    // Degrade on a restart the test asked to fail (its new pods "crash"): the restart halts.
    let mut settings_now = settings.clone();
    if let Some(at) = restart_at(ro) {
        if !restart_done(ro)
            && settings_now.degrade_restarts > 0
            && settings_now.degraded_restart.as_deref() != Some(at)
        {
            settings_now.degrade_restarts -= 1;
            settings_now.degraded_restart = Some(at.to_string());
        }
    }
    let degraded =
        restart_at(ro).is_some_and(|at| settings_now.degraded_restart.as_deref() == Some(at));
    if settings_now.degrade_restarts != settings.degrade_restarts
        || settings_now.degraded_restart != settings.degraded_restart
    {
        inner.workloads.insert(key.clone(), settings_now);
    }

    // RolloutPodRestarter: one pod at a time, only while all others are available.
    let mut restarted_at = ro.pointer("/status/restartedAt").cloned();
    if let Some(at) = restart_at(ro).map(str::to_string) {
        let due = parse_time(&at).is_some_and(|t| chrono::Utc::now().timestamp() >= t);
        if !restart_done(ro) && due && !paused && !degraded && !settings.aborted {
            let old: Vec<&&Value> = live
                .iter()
                .filter(|p| created_second(p).is_none_or(|c| c < parse_time(&at).unwrap_or(0)))
                .collect();
            let all_available = pods.len() == live.len()
                && live
                    .iter()
                    .all(|p| pod_is_available(inner, p, min_ready, now))
                && live.len() as i64 >= desired;
            if old.is_empty() {
                restarted_at = Some(json!(at));
            } else if all_available {
                let victim = meta_str(old[0], "name").to_string();
                let grace = ro
                    .pointer("/spec/template/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30);
                let _ = inner
                    .store
                    .begin_graceful_delete(Res::Pod, &ns, &victim, grace, false);
            }
        }
    }

    let in_current = |p: &&&Value| {
        controller_ref(p).is_some_and(|(_, _, u)| current_uid.as_deref() == Some(u.as_str()))
    };
    let updated = live.iter().filter(in_current).count() as i64;
    let ready = live.iter().filter(|p| pod_is_ready(p)).count() as i64;
    let available = live
        .iter()
        .filter(in_current)
        .filter(|p| pod_is_available(inner, p, min_ready, now))
        .count() as i64;
    let replicas = live.len() as i64;
    let restart_pending = restart_at(ro).is_some()
        && restarted_at
            .as_ref()
            .and_then(Value::as_str)
            .and_then(parse_time)
            != restart_at(ro).and_then(parse_time);

    let old_status = ro.get("status").cloned().unwrap_or(json!({}));
    let mut conditions: Vec<Value> = Vec::new();
    let mut status = json!({
        "observedGeneration": ro.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1).to_string(),
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "currentPodHash": hash,
        "selector": selector_string(ro),
    });
    let (phase, message) = if settings.aborted {
        status["abort"] = json!(true);
        conditions.push(condition(
            "Progressing",
            "False",
            "RolloutAborted",
            "Rollout aborted update to revision 1",
        ));
        (
            "Degraded",
            "RolloutAborted: Rollout aborted update to revision 1".to_string(),
        )
    } else if degraded {
        let msg = format!("ReplicaSet \"{name}-{hash}\" has timed out progressing.");
        conditions.push(condition(
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &msg,
        ));
        ("Degraded", format!("ProgressDeadlineExceeded: {msg}"))
    } else if let Some(reason) = &settings.rollout_pause {
        status["controllerPause"] = json!(true);
        status["pauseConditions"] = json!([{"reason": reason, "startTime": old_status.pointer("/pauseConditions/0/startTime").cloned().unwrap_or_else(super::store::now_time)}]);
        ("Paused", reason.clone())
    } else if ro.pointer("/spec/paused").and_then(Value::as_bool) == Some(true) {
        ("Paused", "manually paused".to_string())
    } else if restart_pending {
        ("Progressing", "rollout is restarting".to_string())
    } else if updated < desired {
        (
            "Progressing",
            "more replicas need to be updated".to_string(),
        )
    } else if available < updated {
        (
            "Progressing",
            "updated replicas are still becoming available".to_string(),
        )
    } else if replicas > updated {
        (
            "Progressing",
            "old replicas are pending termination".to_string(),
        )
    } else {
        ("Healthy", String::new())
    };
    if phase == "Healthy" {
        status["stableRS"] = json!(hash);
        conditions.push(condition(
            "Healthy",
            "True",
            "RolloutHealthy",
            "Rollout is healthy",
        ));
    } else if let Some(s) = old_status.get("stableRS") {
        status["stableRS"] = s.clone();
    }
    if phase == "Progressing" {
        conditions.push(condition(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{name}-{hash}\" is progressing."),
        ));
    }
    status["phase"] = json!(phase);
    status["message"] = json!(message);
    status["conditions"] = json!(conditions);
    if let Some(r) = restarted_at {
        status["restartedAt"] = r;
    }
    // Keep condition times stable while nothing changes.
    if same_ignoring_times(&old_status, &status) {
        return;
    }
    let mut next = ro.clone();
    next["status"] = status;
    let _ = inner
        .store
        .update(Res::Rollout, &ns, &name, next, WriteScope::All, false);
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    let t = super::store::now_time();
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastUpdateTime": t.clone(), "lastTransitionTime": t})
}

fn same_ignoring_times(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastUpdateTime");
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

fn selector_string(ro: &Value) -> String {
    ro.pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}
