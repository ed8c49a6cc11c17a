//! The object store: objects as JSON, one global `resourceVersion` counter, and the event
//! history watches replay from.
//!
//! Objects are kept as `serde_json::Value` so every verb (get, list, patch, watch) works the
//! same for every kind; [`super::objects`] round-trips writes through the real `k8s-openapi`
//! types, so only well-formed objects get here.

use super::discovery::Res;
use super::error::KubeSimError;
use super::PodEvent;
use k8s_openapi::jiff::Timestamp;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// The type of a watch event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One entry of the watch history.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub res: Res,
    pub ns: String,
    pub kind: ChangeKind,
    /// The object after the change (for `Deleted`: its last state, with the delete's RV).
    pub obj: Arc<Value>,
    /// The object before a `Modified` change; watches use it to turn a change that moves
    /// an object out of (into) a selector into `DELETED` (`ADDED`), as the API server does.
    pub prev: Option<Arc<Value>>,
}

/// Which part of an object a write may change.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WriteScope {
    /// The main resource: for kinds with a status subresource, `status` is kept as stored.
    Main,
    /// The `/status` subresource: only `status` changes.
    Status,
    /// Controllers writing directly: everything changes.
    All,
}

type Key = (Res, String, String);

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Highest RV dropped from history: watches from an older RV get `410 Expired`.
    compacted_rv: u64,
    history_limit: usize,
    notify: watch::Sender<u64>,
    pod_events: broadcast::Sender<PodEvent>,
}

/// Five characters from the alphabet Kubernetes uses for generated names (no vowels).
pub fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn now_time() -> Value {
    json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::now()
    ))
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

/// A DaemonSet's template generation: server-owned, kept in an annotation in apps/v1.
fn template_generation(ds: &Value) -> i64 {
    ds.pointer("/metadata/annotations")
        .and_then(|a| a.get(super::daemonset::TEMPLATE_GENERATION))
        .and_then(Value::as_str)
        .and_then(|g| g.parse().ok())
        .unwrap_or(1)
}

fn set_template_generation(ds: &mut Value, generation: i64) {
    let m = meta_mut(ds);
    if !m.get("annotations").is_some_and(Value::is_object) {
        m.insert("annotations".into(), json!({}));
    }
    m["annotations"][super::daemonset::TEMPLATE_GENERATION] = json!(generation.to_string());
}

impl Store {
    pub fn new(
        history_limit: usize,
        notify: watch::Sender<u64>,
        pod_events: broadcast::Sender<PodEvent>,
    ) -> Self {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 0,
            history_limit: history_limit.max(1),
            notify,
            pod_events,
        }
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res, ns.to_string(), name.to_string()))
    }

    /// Objects of `res`, in `ns` or in all namespaces, ordered by namespace then name.
    pub fn list(&self, res: Res, ns: Option<&str>) -> Vec<&Value> {
        let lo = (res, ns.unwrap_or("").to_string(), String::new());
        self.objects
            .range(lo..)
            .take_while(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect()
    }

    /// Namespaces that hold at least one object.
    pub fn used_namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .objects
            .keys()
            .filter(|(_, ns, _)| !ns.is_empty())
            .map(|(_, ns, _)| ns.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Store a new object. `obj` is already validated; the store fills `name` from
    /// `generateName`, `namespace`, `uid`, `creationTimestamp`, `resourceVersion` and
    /// `generation`.
    pub fn create(
        &mut self,
        res: Res,
        ns: &str,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, KubeSimError> {
        let info = res.info();
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if prefix.is_empty() {
                return Err(KubeSimError::invalid(
                    info,
                    "",
                    vec![super::error::FieldCause {
                        reason: "FieldValueRequired",
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
            name = loop {
                let candidate = format!("{prefix}{}", random_suffix(5));
                if self.get(res, ns, &candidate).is_none() {
                    break candidate;
                }
            };
        }
        if self.get(res, ns, &name).is_some() {
            return Err(KubeSimError::already_exists(info, &name));
        }
        let rv = self.rv + 1;
        {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            if info.namespaced {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), now_time());
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            if info.tracks_generation {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        if res == Res::DaemonSet {
            set_template_generation(&mut obj, 1);
        }
        if dry_run {
            return Ok(obj);
        }
        self.rv = rv;
        self.objects
            .insert((res, ns.to_string(), name), obj.clone());
        self.record(res, ns, ChangeKind::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replace a stored object. A non-empty `metadata.resourceVersion` in `new` must equal
    /// the stored one (optimistic concurrency); empty means an unconditional update. A
    /// write that changes nothing keeps the resourceVersion and records no event.
    pub fn update(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        mut new: Value,
        scope: WriteScope,
        dry_run: bool,
    ) -> Result<Value, KubeSimError> {
        let info = res.info();
        let key = (res, ns.to_string(), name.to_string());
        let cur = self
            .objects
            .get(&key)
            .ok_or_else(|| KubeSimError::not_found(info, name))?;
        let body_name = meta_str(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(KubeSimError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let want_rv = meta_str(&new, "resourceVersion");
        if !want_rv.is_empty() && want_rv != meta_str(cur, "resourceVersion") {
            return Err(KubeSimError::conflict(info, name));
        }
        match scope {
            WriteScope::Main if info.status_subresource => match cur.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            },
            WriteScope::Status => {
                let status = new.get("status").cloned();
                new = cur.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            _ => {}
        }
        // Fields the server owns.
        let mut generation = cur.pointer("/metadata/generation").and_then(Value::as_i64);
        if info.tracks_generation && cur.get("spec") != new.get("spec") {
            generation = Some(generation.unwrap_or(0) + 1);
        }
        if res == Res::DaemonSet {
            let tg = template_generation(cur)
                + i64::from(cur.pointer("/spec/template") != new.pointer("/spec/template"));
            set_template_generation(&mut new, tg);
        }
        {
            let cm = cur.get("metadata").cloned().unwrap_or_else(|| json!({}));
            let m = meta_mut(&mut new);
            m.insert("name".into(), json!(name));
            if info.namespaced {
                m.insert("namespace".into(), json!(ns));
            }
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match cm.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            match generation {
                Some(g) => m.insert("generation".into(), json!(g)),
                None => m.remove("generation"),
            };
            m.insert("resourceVersion".into(), cm["resourceVersion"].clone());
        }
        if new == *cur {
            return Ok(new);
        }
        let rv = self.rv + 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        if dry_run {
            return Ok(new);
        }
        self.rv = rv;
        let prev = self.objects.insert(key, new.clone());
        self.record(res, ns, ChangeKind::Modified, new.clone(), prev);
        Ok(new)
    }

    /// Remove an object now. `expect_uid`/`expect_rv` are DeleteOptions preconditions.
    pub fn delete(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        expect_uid: Option<&str>,
        expect_rv: Option<&str>,
        dry_run: bool,
    ) -> Result<Value, KubeSimError> {
        let info = res.info();
        let key = (res, ns.to_string(), name.to_string());
        let cur = self
            .objects
            .get(&key)
            .ok_or_else(|| KubeSimError::not_found(info, name))?;
        if expect_uid.is_some_and(|u| u != meta_str(cur, "uid"))
            || expect_rv.is_some_and(|v| v != meta_str(cur, "resourceVersion"))
        {
            return Err(KubeSimError::conflict(info, name));
        }
        if dry_run {
            return Ok(cur.clone());
        }
        let mut obj = self.objects.remove(&key).expect("checked above");
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(res, ns, ChangeKind::Deleted, obj.clone(), None);
        Ok(obj)
    }

    /// Start graceful deletion: set `deletionTimestamp` (now + grace) and
    /// `deletionGracePeriodSeconds`. The object stays until its owner (the kubelet) removes
    /// it. Returns the object; a second call changes nothing.
    pub fn begin_graceful_delete(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        grace_seconds: i64,
        dry_run: bool,
    ) -> Result<Value, KubeSimError> {
        let key = (res, ns.to_string(), name.to_string());
        let cur = self
            .objects
            .get(&key)
            .ok_or_else(|| KubeSimError::not_found(res.info(), name))?;
        if cur.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(cur.clone());
        }
        let mut obj = cur.clone();
        let at = Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(grace_seconds))
            .unwrap_or_else(|_| Timestamp::now());
        let rv = self.rv + 1;
        {
            let m = meta_mut(&mut obj);
            m.insert(
                "deletionTimestamp".into(),
                json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at)),
            );
            m.insert("deletionGracePeriodSeconds".into(), json!(grace_seconds));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        if dry_run {
            return Ok(obj);
        }
        self.rv = rv;
        let prev = self.objects.insert(key, obj.clone());
        self.record(res, ns, ChangeKind::Modified, obj.clone(), prev);
        Ok(obj)
    }

    fn record(&mut self, res: Res, ns: &str, kind: ChangeKind, obj: Value, prev: Option<Value>) {
        if res == Res::Pod {
            self.pod_event(ns, kind, &obj, prev.as_ref());
        }
        self.history.push_back(Change {
            rv: self.rv,
            res,
            ns: ns.to_string(),
            kind,
            obj: Arc::new(obj),
            prev: prev.map(Arc::new),
        });
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    fn pod_event(&self, ns: &str, kind: ChangeKind, pod: &Value, prev: Option<&Value>) {
        let terminating = |p: &Value| p.pointer("/metadata/deletionTimestamp").is_some();
        let name = meta_str(pod, "name").to_string();
        let ev = match kind {
            ChangeKind::Added => PodEvent::Started {
                namespace: ns.into(),
                pod: name,
                workload: self.workload_of_pod(ns, pod),
                labels: super::selector::labels_of(pod),
                annotations: pod
                    .pointer("/metadata/annotations")
                    .and_then(|a| serde_json::from_value(a.clone()).ok())
                    .unwrap_or_default(),
            },
            ChangeKind::Modified if terminating(pod) && !prev.is_some_and(terminating) => {
                PodEvent::Terminated {
                    namespace: ns.into(),
                    pod: name,
                    workload: self.workload_of_pod(ns, pod),
                }
            }
            ChangeKind::Deleted if !terminating(pod) => PodEvent::Terminated {
                namespace: ns.into(),
                pod: name,
                workload: self.workload_of_pod(ns, pod),
            },
            _ => return,
        };
        // No receiver is fine: nobody is simulating consumers.
        let _ = self.pod_events.send(ev);
    }

    /// The workload (kind, name) that owns a pod: a ReplicaSet's owning Deployment, or the
    /// pod's direct controller for other kinds.
    pub fn workload_of_pod(&self, ns: &str, pod: &Value) -> Option<(String, String)> {
        let (kind, name) = controller_of(pod)?;
        if kind == "ReplicaSet" {
            if let Some(rs) = self.get(Res::ReplicaSet, ns, &name) {
                if let Some((k, n)) = controller_of(rs) {
                    return Some((k, n));
                }
            }
        }
        Some((kind, name))
    }

    /// History after `rv`, or `Expired` when part of it was compacted away.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Change>, KubeSimError> {
        if rv < self.compacted_rv {
            return Err(KubeSimError::Expired {
                requested: rv,
                oldest: self.compacted_rv + 1,
            });
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Namespaces with a change after `rv` ("" for cluster-scoped objects); `None` when
    /// part of that history was compacted away.
    pub fn namespaces_changed_since(&self, rv: u64) -> Option<BTreeSet<String>> {
        if rv < self.compacted_rv {
            return None;
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Some(self.history.range(start..).map(|c| c.ns.clone()).collect())
    }

    /// Drop the whole watch history, as etcd compaction does.
    pub fn compact(&mut self) {
        if let Some(last) = self.history.back() {
            self.compacted_rv = last.rv;
        }
        self.history.clear();
    }
}

/// The (kind, name) of an object's controller owner reference.
pub fn controller_of(obj: &Value) -> Option<(String, String)> {
    controller_ref(obj).map(|(k, n, _)| (k, n))
}

/// The (kind, name, uid) of an object's controller owner reference.
pub fn controller_ref(obj: &Value) -> Option<(String, String, String)> {
    obj.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|o| {
            Some((
                o.get("kind")?.as_str()?.to_string(),
                o.get("name")?.as_str()?.to_string(),
                o.get("uid")?.as_str()?.to_string(),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(limit: usize) -> Store {
        let (tx, _) = watch::channel(0);
        let (ptx, _) = broadcast::channel(16);
        Store::new(limit, tx, ptx)
    }

    fn lease(name: &str) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": name}, "spec": {"holderIdentity": "a"}})
    }

    #[test]
    fn create_fills_server_fields_and_rejects_duplicates() {
        let mut s = store(100);
        let a = s.create(Res::Lease, "ns", lease("l"), false).unwrap();
        assert_eq!(meta_str(&a, "namespace"), "ns");
        assert_eq!(meta_str(&a, "resourceVersion"), "2");
        assert!(!meta_str(&a, "uid").is_empty());
        assert!(a.pointer("/metadata/generation").is_none());
        let e = s.create(Res::Lease, "ns", lease("l"), false).unwrap_err();
        assert_eq!(e.reason(), "AlreadyExists");
        // Same name in another namespace is another object.
        s.create(Res::Lease, "other", lease("l"), false).unwrap();
        assert_eq!(s.list(Res::Lease, Some("ns")).len(), 1);
        assert_eq!(s.list(Res::Lease, None).len(), 2);
        let g = s
            .create(
                Res::Lease,
                "ns",
                json!({"metadata": {"generateName": "gen-"}}),
                false,
            )
            .unwrap();
        assert!(meta_str(&g, "name").starts_with("gen-"));
        assert_eq!(meta_str(&g, "name").len(), 9);
    }

    #[test]
    fn update_enforces_resource_version_and_skips_no_ops() {
        let mut s = store(100);
        let a = s.create(Res::Lease, "ns", lease("l"), false).unwrap();
        let mut b = a.clone();
        b["spec"]["holderIdentity"] = json!("b");
        let b2 = s
            .update(Res::Lease, "ns", "l", b.clone(), WriteScope::Main, false)
            .unwrap();
        assert_ne!(
            meta_str(&b2, "resourceVersion"),
            meta_str(&a, "resourceVersion")
        );
        // `b` still carries the old RV: stale.
        let e = s
            .update(Res::Lease, "ns", "l", b, WriteScope::Main, false)
            .unwrap_err();
        assert_eq!(e.reason(), "Conflict");
        let rv = s.rv();
        let same = s
            .update(Res::Lease, "ns", "l", b2.clone(), WriteScope::Main, false)
            .unwrap();
        assert_eq!(s.rv(), rv, "a no-op write bumps nothing");
        assert_eq!(same, b2);
    }

    #[test]
    fn generation_follows_spec_and_status_is_a_subresource() {
        let mut s = store(100);
        let d = json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}});
        let d = s.create(Res::Deployment, "ns", d, false).unwrap();
        assert_eq!(d["metadata"]["generation"], 1);
        let mut st = d.clone();
        st["status"] = json!({"replicas": 1});
        let st = s
            .update(Res::Deployment, "ns", "d", st, WriteScope::Status, false)
            .unwrap();
        assert_eq!(st["metadata"]["generation"], 1);
        assert_eq!(st["status"]["replicas"], 1);
        let mut sp = st.clone();
        sp["spec"]["replicas"] = json!(3);
        sp["status"] = json!({"replicas": 99});
        let sp = s
            .update(Res::Deployment, "ns", "d", sp, WriteScope::Main, false)
            .unwrap();
        assert_eq!(sp["metadata"]["generation"], 2);
        assert_eq!(sp["status"]["replicas"], 1, "main writes keep status");
    }

    #[test]
    fn history_replays_and_expires() {
        let mut s = store(3);
        s.create(Res::Lease, "ns", lease("a"), false).unwrap(); // rv 2
        s.create(Res::Lease, "ns", lease("b"), false).unwrap(); // rv 3
        s.delete(Res::Lease, "ns", "a", None, None, false).unwrap(); // rv 4
        let since = s.changes_since(2).unwrap();
        assert_eq!(
            since.iter().map(|c| (c.rv, c.kind)).collect::<Vec<_>>(),
            vec![(3, ChangeKind::Added), (4, ChangeKind::Deleted)]
        );
        s.create(Res::Lease, "ns", lease("c"), false).unwrap(); // rv 5, drops rv 2
        assert!(s.changes_since(2).is_ok(), "nothing after 2 was lost");
        assert_eq!(s.changes_since(1).unwrap_err().reason(), "Expired");
        s.compact();
        assert_eq!(s.changes_since(4).unwrap_err().status_code().as_u16(), 410);
        assert!(s.changes_since(5).unwrap().is_empty());
    }
}
