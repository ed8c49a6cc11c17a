//! ControllerRevisions, the history StatefulSets and DaemonSets keep of their pod templates
//! (`pkg/controller/history`), and the pieces of pod creation both controllers share.
//!
//! A revision stores the template as the patch the real controllers write
//! (`{"spec":{"template":{...,"$patch":"replace"}}}`), so `kubectl rollout history` and
//! `rollout undo` read it back, and a StatefulSet can recreate a pod below its partition from
//! the current (older) revision's template.

use super::controller::{is_terminating, pod_template_hash};
use super::discovery::Res;
use super::objects;
use super::store::{controller_ref, meta_str, Store, WriteScope};
use serde_json::{json, Value};

/// Pod label naming the revision a pod was created from (`apps.ControllerRevisionHashLabelKey`).
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// Label a StatefulSet's revisions carry (`history.ControllerRevisionHashLabel`).
const HISTORY_HASH_LABEL: &str = "controller.kubernetes.io/hash";

/// The owner's kind, as its revisions and pods reference it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    StatefulSet,
    DaemonSet,
}

impl Owner {
    fn kind(self) -> &'static str {
        match self {
            Owner::StatefulSet => "StatefulSet",
            Owner::DaemonSet => "DaemonSet",
        }
    }
}

/// The controller owner reference to `owner` (an object as JSON).
pub fn owner_ref(kind: Owner, owner: &Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": kind.kind(),
        "name": meta_str(owner, "name"),
        "uid": meta_str(owner, "uid"),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Objects of `res` in `owner`'s namespace whose controller is `owner` (by uid).
pub fn owned(store: &Store, res: Res, owner: &Value) -> Vec<Value> {
    let uid = meta_str(owner, "uid");
    store
        .list(res, Some(meta_str(owner, "namespace")))
        .into_iter()
        .filter(|o| controller_ref(o).is_some_and(|(_, _, u)| u == uid))
        .cloned()
        .collect()
}

/// `getPatch`: what a revision stores for a template.
fn revision_data(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(o) = t.as_object_mut() {
        o.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// The pod template a revision holds.
pub fn revision_template(rev: &Value) -> Option<Value> {
    let mut t = rev.pointer("/data/spec/template")?.clone();
    t.as_object_mut()?.remove("$patch");
    Some(t)
}

fn revision_number(rev: &Value) -> i64 {
    rev.get("revision").and_then(Value::as_i64).unwrap_or(0)
}

/// The revisions of one owner after [`sync`].
#[derive(Clone, Debug)]
pub struct Revisions {
    /// What the owner's pods are moving from (StatefulSet `status.currentRevision`; the
    /// update revision when that names no revision).
    pub current: Value,
    /// The revision of the owner's current template.
    pub update: Value,
}

impl Revisions {
    pub fn current_name(&self) -> &str {
        meta_str(&self.current, "name")
    }
    pub fn update_name(&self) -> &str {
        meta_str(&self.update, "name")
    }
    /// The hash part of the update revision (a DaemonSet pod's `controller-revision-hash`).
    pub fn update_hash(&self) -> &str {
        self.update
            .pointer(&format!("/metadata/labels/{REVISION_LABEL}"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// Why [`sync`] could not settle the revisions this pass.
#[derive(Debug, PartialEq, Eq)]
pub enum RevisionError {
    /// A revision of that name exists with another template: bump `status.collisionCount`.
    Collision,
    /// The store refused a write; try again next pass.
    Store,
}

/// `getStatefulSetRevisions` / `constructHistory`: find or create the revision of the
/// owner's template (an older equal revision is renumbered as the newest, as a rollback
/// does), pick the current revision, and drop unused revisions beyond
/// `revisionHistoryLimit`. `in_use` are the revision names live pods carry.
pub fn sync(
    store: &mut Store,
    kind: Owner,
    owner: &Value,
    in_use: &[String],
) -> Result<Revisions, RevisionError> {
    let ns = meta_str(owner, "namespace").to_string();
    let name = meta_str(owner, "name").to_string();
    let template = owner
        .pointer("/spec/template")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let data = revision_data(&template);
    let mut revs = owned(store, Res::ControllerRevision, owner);
    revs.sort_by_key(revision_number);
    let max = revs.last().map(revision_number).unwrap_or(0);

    let update = match revs.iter().rposition(|r| r.get("data") == Some(&data)) {
        Some(i) if revision_number(&revs[i]) == max => revs[i].clone(),
        Some(i) => {
            let rev_name = meta_str(&revs[i], "name").to_string();
            let mut next = revs[i].clone();
            next["revision"] = json!(max + 1);
            let stored = store
                .update(
                    Res::ControllerRevision,
                    &ns,
                    &rev_name,
                    next,
                    WriteScope::All,
                    false,
                )
                .map_err(|_| RevisionError::Store)?;
            revs[i] = stored.clone();
            stored
        }
        None => {
            let collision = owner
                .pointer("/status/collisionCount")
                .and_then(Value::as_i64)
                .unwrap_or(0) as i32;
            let hash = pod_template_hash(&template, collision);
            let rev_name = format!("{name}-{hash}");
            if store.get(Res::ControllerRevision, &ns, &rev_name).is_some() {
                return Err(RevisionError::Collision);
            }
            let mut labels = template
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or_else(|| json!({}));
            match kind {
                Owner::StatefulSet => labels[HISTORY_HASH_LABEL] = json!(hash),
                Owner::DaemonSet => labels[REVISION_LABEL] = json!(hash),
            }
            let rev = json!({
                "metadata": {
                    "name": rev_name,
                    "namespace": ns,
                    "labels": labels,
                    "ownerReferences": [owner_ref(kind, owner)],
                },
                "data": data,
                "revision": max + 1,
            });
            let rev =
                objects::admit(Res::ControllerRevision, rev).map_err(|_| RevisionError::Store)?;
            let stored = store
                .create(Res::ControllerRevision, &ns, rev, false)
                .map_err(|_| RevisionError::Store)?;
            revs.push(stored.clone());
            stored
        }
    };
    let current_name = owner
        .pointer("/status/currentRevision")
        .and_then(Value::as_str)
        .unwrap_or("");
    let current = revs
        .iter()
        .find(|r| !current_name.is_empty() && meta_str(r, "name") == current_name)
        .cloned()
        .unwrap_or_else(|| update.clone());

    // `truncateHistory`: oldest unused revisions beyond the limit go.
    let limit = owner
        .pointer("/spec/revisionHistoryLimit")
        .and_then(Value::as_i64)
        .unwrap_or(10)
        .max(0) as usize;
    let keep = [meta_str(&current, "name"), meta_str(&update, "name")];
    let mut unused: Vec<&Value> = revs
        .iter()
        .filter(|r| {
            let n = meta_str(r, "name");
            !keep.contains(&n) && !in_use.iter().any(|u| u == n) && !is_terminating(r)
        })
        .collect();
    unused.sort_by_key(|r| revision_number(r));
    if unused.len() > limit {
        let doomed: Vec<String> = unused[..unused.len() - limit]
            .iter()
            .map(|r| meta_str(r, "name").to_string())
            .collect();
        for n in doomed {
            let _ = store.delete(Res::ControllerRevision, &ns, &n, None, None, false);
        }
    }
    Ok(Revisions { current, update })
}

/// A pod for `owner` from `template` (a pod template as JSON): its labels plus `labels`,
/// its annotations, its spec, and a controller reference. `name` is the full name, or
/// `None` for `<owner>-<random>` (the API server's `generateName`).
pub fn new_pod(
    kind: Owner,
    owner: &Value,
    template: &Value,
    name: Option<String>,
    labels: &[(&str, String)],
) -> Value {
    let mut l = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    for (k, v) in labels {
        l[*k] = json!(v);
    }
    let owner_name = meta_str(owner, "name");
    let mut meta = json!({
        "labels": l,
        "ownerReferences": [owner_ref(kind, owner)],
    });
    match name {
        Some(n) => meta["name"] = json!(n),
        None => meta["generateName"] = json!(format!("{owner_name}-")),
    }
    if let Some(a) = template.pointer("/metadata/annotations") {
        meta["annotations"] = a.clone();
    }
    json!({"metadata": meta, "spec": template.get("spec").cloned().unwrap_or_else(|| json!({}))})
}

/// Admit and store a pod built by [`new_pod`].
pub fn create_pod(store: &mut Store, ns: &str, pod: Value) -> Option<Value> {
    let pod = objects::admit(Res::Pod, pod).ok()?;
    store.create(Res::Pod, ns, pod, false).ok()
}

/// Start a pod's graceful deletion with its own grace period, as a controller's delete does.
pub fn delete_pod(store: &mut Store, pod: &Value) {
    let grace = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    let _ = store.begin_graceful_delete(
        Res::Pod,
        meta_str(pod, "namespace"),
        meta_str(pod, "name"),
        grace,
        false,
    );
}

/// Write `status` to a workload if it differs from the stored one.
pub fn write_status(store: &mut Store, res: Res, obj: &Value, status: Value) {
    let (ns, name) = (meta_str(obj, "namespace"), meta_str(obj, "name"));
    if let Some(cur) = store.get(res, ns, name) {
        if cur.get("status") != Some(&status) {
            let mut next = cur.clone();
            next["status"] = status;
            let (ns, name) = (ns.to_string(), name.to_string());
            let _ = store.update(res, &ns, &name, next, WriteScope::All, false);
        }
    }
}
