//! A Kubernetes API server subset, in memory, faithful enough for the real `kubectl` and
//! kube-rs: discovery, get/list/watch/create/update/patch/delete with selectors and
//! optimistic concurrency for Deployments, ReplicaSets, StatefulSets, DaemonSets,
//! ControllerRevisions, Pods, Secrets, Events (both APIs), Leases, TokenReviews and Argo
//! Rollouts (`argoproj.io/v1alpha1` `Rollout`, as its CRD serves it), plus rollout
//! controllers (Deployment → ReplicaSet → Pod; StatefulSet → Pod; DaemonSet → Pod on every
//! simulated node; Rollout → ReplicaSet → Pod with `spec.restartAt`, see [`rollout`]; a
//! simulated kubelet) that write status the way the real ones do.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use openai_key_rotator::sandbox::{kube::{KubeSim, KubeSimOptions}, loopback};
//! let sim = KubeSim::new(KubeSimOptions::default());
//! let server = sim.serve(loopback(0), Default::default()).await?;
//! let kubeconfig = KubeSim::kubeconfig_yaml(&server.url(), Some("default"));
//! # let _ = kubeconfig; Ok(()) }
//! ```

mod api;
pub mod controller;
pub mod daemonset;
pub mod discovery;
mod error;
mod faults;
mod incremental;
mod objects;
mod patch;
mod revisions;
pub mod rollout;
pub mod selector;
pub mod statefulset;
mod store;
mod table;

pub use crate::config::WorkloadKind;
pub use controller::{rollout_status, RolloutStatus};
pub use error::{FieldCause, KubeSimError};
pub use faults::{operations, ConflictNext, FailNext, Faults, WatchDisconnect, WorkloadFaults};

use discovery::Res;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use selector::LabelSelector;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use store::{Store, WriteScope};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Server;

/// Lifecycle notifications for simulated pods (consumers build on these).
#[derive(Clone, Debug)]
pub enum PodEvent {
    /// A pod was created (phase Pending). `workload` is the owning Deployment, StatefulSet
    /// or DaemonSet as (kind, name).
    Started {
        namespace: String,
        pod: String,
        workload: Option<(String, String)>,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    },
    /// A pod was deleted / terminated (graceful deletion began, or it was removed outright).
    Terminated {
        namespace: String,
        pod: String,
        workload: Option<(String, String)>,
    },
}

/// A pod and its owning workload, from [`KubeSim::pod_owners`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOwner {
    pub name: String,
    /// The owning Deployment, StatefulSet or DaemonSet as (kind, name).
    pub workload: Option<(String, String)>,
    /// Graceful deletion has begun.
    pub terminating: bool,
}

/// Tunables. `Default` suits tests and the demo.
#[derive(Clone, Debug)]
pub struct KubeSimOptions {
    /// Time from pod creation until its containers report ready.
    pub pod_ready_delay: Duration,
    /// Controller/kubelet loop period.
    pub tick: Duration,
    /// How long a deleted pod stays Terminating (capped by its grace period).
    pub pod_termination_delay: Duration,
    /// Watch events kept for resuming watches; older resourceVersions get 410.
    pub watch_history: usize,
    /// Period of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Watch duration when the client sends no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    /// Simulated nodes, each running one pod of every DaemonSet (see
    /// [`daemonset::node_names`]).
    pub nodes: usize,
    /// Reconcile only namespaces that changed or still wait on time, instead of every
    /// object on every tick: what keeps thousands of workloads cheap. Spread such workloads
    /// over many namespaces (each pass lists within a namespace).
    pub incremental: bool,
    /// With `incremental`: a full pass this often anyway, as a safety net.
    pub full_resync: Duration,
    /// With `incremental`: at most this many namespaces per tick (0 = no limit), so one
    /// tick never holds the store long while thousands of workloads come up.
    pub max_namespaces_per_tick: usize,
}

impl Default for KubeSimOptions {
    fn default() -> Self {
        KubeSimOptions {
            pod_ready_delay: Duration::from_millis(300),
            tick: Duration::from_millis(50),
            pod_termination_delay: Duration::from_millis(100),
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(5),
            default_watch_timeout: Duration::from_secs(1800),
            nodes: 2,
            incremental: false,
            full_resync: Duration::from_secs(10),
            max_namespaces_per_tick: 256,
        }
    }
}

/// Per-workload behaviour set through the handle.
#[derive(Clone, Debug, Default)]
pub(crate) struct WorkloadSettings {
    pub never_ready: bool,
    pub ready_delay: Option<Duration>,
    pub gated: bool,
    /// Rollouts: this many coming restarts degrade (ProgressDeadlineExceeded; the restart
    /// halts) instead of completing.
    pub degrade_restarts: u32,
    /// The `spec.restartAt` of the restart that degraded.
    pub degraded_restart: Option<String>,
    /// Rollouts: aborted (`status.abort`, phase Degraded) until cleared.
    pub aborted: bool,
    /// Rollouts: a controller pause condition with this reason (e.g. `CanaryPauseStep`).
    pub rollout_pause: Option<String>,
}

/// Who a registered service-account token authenticates as.
#[derive(Clone, Debug)]
pub(crate) struct TokenIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Simulated kubelet state of one pod (monotonic times the JSON cannot hold).
#[derive(Clone, Debug)]
pub(crate) struct PodRuntime {
    pub created: Instant,
    pub terminating_since: Option<Instant>,
    pub ready_since: Option<Instant>,
}

pub(crate) struct Inner {
    pub store: Store,
    /// Keyed by (kind, namespace, name) of the pods' workload.
    pub workloads: HashMap<(WorkloadKind, String, String), WorkloadSettings>,
    /// (namespace, pod) whose readiness gate a consumer opened.
    pub open_gates: HashSet<(String, String)>,
    /// SHA-256 of the token → identity; the tokens themselves are not kept.
    pub tokens: HashMap<String, TokenIdentity>,
    pub faults: faults::FaultState,
    /// Namespaces whose simulation inputs a handle call changed (a readiness gate, a
    /// workload setting): the incremental controller must look at them.
    pub touched: BTreeSet<String>,
    pub tracker: incremental::Tracker,
    /// Open watches by id, so the control API can close them.
    pub watches: BTreeMap<u64, faults::WatchCtl>,
    pub next_watch: u64,
    pub pods: HashMap<(String, String), PodRuntime>,
    /// Custom resources whose CRD is "not installed": absent from discovery, 404 on use.
    pub unserved: BTreeSet<Res>,
    /// Resources every request for is refused with 403 Forbidden (RBAC not granted).
    pub forbidden: BTreeSet<Res>,
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    /// Calls held by `Faults::block` (outside the store lock: they wait).
    pub holds: crate::sandbox::control::Holds,
    pub opts: KubeSimOptions,
    pub changes: watch::Receiver<u64>,
    pub pod_events: broadcast::Sender<PodEvent>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough state for a simulator.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulator handle. Cheap to clone; all clones share one cluster.
#[derive(Clone)]
pub struct KubeSim {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubeSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSim")
            .field("resource_version", &self.resource_version())
            .finish_non_exhaustive()
    }
}

fn typed<T: DeserializeOwned>(v: &serde_json::Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// The workload kind a pod's owner chain names (`Deployment`, `StatefulSet`, `DaemonSet`).
pub(crate) fn workload_kind(kind: &str) -> Option<WorkloadKind> {
    match kind {
        "Deployment" => Some(WorkloadKind::Deployment),
        "StatefulSet" => Some(WorkloadKind::StatefulSet),
        "DaemonSet" => Some(WorkloadKind::DaemonSet),
        "Rollout" => Some(WorkloadKind::Rollout),
        _ => None,
    }
}

const ALL_KINDS: [WorkloadKind; 4] = [
    WorkloadKind::Deployment,
    WorkloadKind::StatefulSet,
    WorkloadKind::DaemonSet,
    WorkloadKind::Rollout,
];

fn workload_res(kind: WorkloadKind) -> Res {
    match kind {
        WorkloadKind::Deployment => Res::Deployment,
        WorkloadKind::StatefulSet => Res::StatefulSet,
        WorkloadKind::DaemonSet => Res::DaemonSet,
        WorkloadKind::Rollout => Res::Rollout,
    }
}

/// A minimal workload literal: labels and selector `app=<name>`, one container `app`.
fn simple_workload(kind: &str, ns: &str, name: &str, replicas: Option<i32>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": format!("registry.example/{name}:1.0")}]}
            }
        }
    });
    if let Some(r) = replicas {
        v["spec"]["replicas"] = serde_json::json!(r);
    }
    v
}

impl KubeSim {
    pub fn new(opts: KubeSimOptions) -> Self {
        let (tx, rx) = watch::channel(1);
        // Large: thousands of pods can start in one tick; a receiver that lags anyway resyncs
        // from [`KubeSim::pod_owners`].
        let (pod_events, _) = broadcast::channel(16_384);
        let store = Store::new(opts.watch_history, tx, pod_events.clone());
        KubeSim {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    store,
                    workloads: HashMap::new(),
                    open_gates: HashSet::new(),
                    tokens: HashMap::new(),
                    faults: faults::FaultState::default(),
                    touched: BTreeSet::new(),
                    tracker: incremental::Tracker::default(),
                    watches: BTreeMap::new(),
                    next_watch: 0,
                    pods: HashMap::new(),
                    unserved: BTreeSet::new(),
                    forbidden: BTreeSet::new(),
                }),
                holds: Default::default(),
                opts,
                changes: rx,
                pod_events,
            }),
        }
    }

    /// The API routes. Watches on this router end only when their client leaves or times
    /// out; [`KubeSim::serve`] also ends them on cancellation.
    pub fn router(&self) -> axum::Router {
        api::router(self.shared.clone(), CancellationToken::new())
    }

    /// Serve and start the controller; both stop on `cancel` or when the [`Server`] drops.
    pub async fn serve(
        &self,
        bind: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<Server> {
        let server = self.serve_api(bind, cancel.clone()).await?;
        self.start_controller(cancel);
        Ok(server)
    }

    /// Serve without starting the controller (call [`Self::start_controller`] later): for
    /// seeding many workloads first without competing with their rollouts for the store.
    pub async fn serve_api(
        &self,
        bind: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<Server> {
        let router = api::router(self.shared.clone(), cancel.clone());
        super::serve(router, bind, cancel).await
    }

    /// Run the controller loop until `cancel` (for callers that serve [`Self::router`]
    /// themselves).
    pub fn start_controller(&self, cancel: CancellationToken) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.opts.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        let mut inner = shared.lock();
                        if shared.opts.incremental {
                            incremental::tick(&mut inner, &shared.opts, Instant::now());
                        } else {
                            controller::reconcile(&mut inner, &shared.opts, Instant::now());
                        }
                    }
                }
            }
        });
    }

    /// kubeconfig YAML for `server_url` (no auth; current-context set; namespace optional).
    pub fn kubeconfig_yaml(server_url: &str, namespace: Option<&str>) -> String {
        let ns = namespace
            .map(|n| format!("\n    namespace: {n}"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: okr-sim
  cluster:
    server: {server_url}
contexts:
- name: okr-sim
  context:
    cluster: okr-sim
    user: okr-sim{ns}
current-context: okr-sim
users:
- name: okr-sim
  user: {{}}
preferences: {{}}
"
        )
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.rv()
    }

    /// A minimal Deployment to seed with: labels and selector `app=<name>`, one container
    /// `app` (image `registry.example/<name>:1.0`). Add env or annotations before creating.
    pub fn simple_deployment(ns: &str, name: &str, replicas: i32) -> Deployment {
        serde_json::from_value(simple_workload("Deployment", ns, name, Some(replicas)))
            .expect("a well-formed Deployment literal")
    }

    /// A minimal StatefulSet, shaped like [`Self::simple_deployment`], governed by a
    /// Service named after it (`serviceName: <name>`).
    pub fn simple_statefulset(ns: &str, name: &str, replicas: i32) -> StatefulSet {
        let mut v = simple_workload("StatefulSet", ns, name, Some(replicas));
        v["spec"]["serviceName"] = serde_json::json!(name);
        serde_json::from_value(v).expect("a well-formed StatefulSet literal")
    }

    /// A minimal DaemonSet, shaped like [`Self::simple_deployment`]: one pod per node.
    pub fn simple_daemonset(ns: &str, name: &str) -> DaemonSet {
        serde_json::from_value(simple_workload("DaemonSet", ns, name, None))
            .expect("a well-formed DaemonSet literal")
    }

    /// Create a Deployment (namespace from its metadata, default `default`) through the
    /// same admission as the API; the controller brings it up.
    pub fn create_deployment(&self, dep: Deployment) -> Result<Deployment, KubeSimError> {
        let v = self.create(Res::Deployment, &dep)?;
        typed(&v).ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))
    }

    /// Create a StatefulSet through the API's admission (defaults: OrderedReady,
    /// RollingUpdate with partition 0); the controller brings up `<name>-0..N-1`.
    pub fn create_statefulset(&self, sts: StatefulSet) -> Result<StatefulSet, KubeSimError> {
        let v = self.create(Res::StatefulSet, &sts)?;
        typed(&v).ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))
    }

    /// Create a DaemonSet through the API's admission (defaults: RollingUpdate,
    /// maxUnavailable 1); the controller runs one pod on each simulated node.
    pub fn create_daemonset(&self, ds: DaemonSet) -> Result<DaemonSet, KubeSimError> {
        let v = self.create(Res::DaemonSet, &ds)?;
        typed(&v).ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))
    }

    pub fn statefulset(&self, ns: &str, name: &str) -> Option<StatefulSet> {
        self.get_typed(Res::StatefulSet, ns, name)
    }

    pub fn daemonset(&self, ns: &str, name: &str) -> Option<DaemonSet> {
        self.get_typed(Res::DaemonSet, ns, name)
    }

    /// ControllerRevisions in `ns` matching `label_selector` (StatefulSet and DaemonSet
    /// history).
    pub fn controller_revisions(
        &self,
        ns: &str,
        label_selector: &str,
    ) -> Vec<k8s_openapi::api::apps::v1::ControllerRevision> {
        self.list_typed(Res::ControllerRevision, ns, label_selector)
    }

    /// Change a StatefulSet as a client's update would (admission, immutable fields,
    /// generation bump, status kept).
    pub fn update_statefulset(
        &self,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut StatefulSet),
    ) -> Result<StatefulSet, KubeSimError> {
        self.update_typed(Res::StatefulSet, ns, name, change)
    }

    /// Change a DaemonSet as a client's update would.
    pub fn update_daemonset(
        &self,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut DaemonSet),
    ) -> Result<DaemonSet, KubeSimError> {
        self.update_typed(Res::DaemonSet, ns, name, change)
    }

    fn create<
        T: serde::Serialize
            + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    >(
        &self,
        res: Res,
        obj: &T,
    ) -> Result<serde_json::Value, KubeSimError> {
        let ns = obj
            .metadata()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let v = serde_json::to_value(obj)
            .map_err(|e| KubeSimError::BadRequest(format!("cannot encode object: {e}")))?;
        let v = objects::admit(res, v)?;
        self.shared.lock().store.create(res, &ns, v, false)
    }

    fn get_typed<T: DeserializeOwned>(&self, res: Res, ns: &str, name: &str) -> Option<T> {
        self.shared.lock().store.get(res, ns, name).and_then(typed)
    }

    fn list_typed<T: DeserializeOwned>(&self, res: Res, ns: &str, label_selector: &str) -> Vec<T> {
        let Ok(sel) = LabelSelector::parse(label_selector) else {
            return Vec::new();
        };
        let inner = self.shared.lock();
        inner
            .store
            .list(res, Some(ns))
            .into_iter()
            .filter(|o| sel.matches_obj(o))
            .filter_map(typed)
            .collect()
    }

    /// Change a Deployment as a client's update would (admission, generation bump, status
    /// kept); e.g. set a pod-template annotation to start a rollout.
    pub fn update_deployment(
        &self,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut Deployment),
    ) -> Result<Deployment, KubeSimError> {
        self.update_typed(Res::Deployment, ns, name, change)
    }

    fn update_typed<T: DeserializeOwned + serde::Serialize>(
        &self,
        res: Res,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<T, KubeSimError> {
        let info = res.info();
        let mut inner = self.shared.lock();
        let cur = inner
            .store
            .get(res, ns, name)
            .cloned()
            .ok_or_else(|| KubeSimError::not_found(info, name))?;
        let mut obj: T = typed(&cur)
            .ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))?;
        change(&mut obj);
        let v = serde_json::to_value(&obj)
            .map_err(|e| KubeSimError::BadRequest(format!("cannot encode object: {e}")))?;
        let v = objects::admit(res, v)?;
        objects::validate_update(res, &cur, &v)?;
        let stored = inner
            .store
            .update(res, ns, name, v, WriteScope::Main, false)?;
        typed(&stored)
            .ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))
    }

    pub fn deployment(&self, ns: &str, name: &str) -> Option<Deployment> {
        self.get_typed(Res::Deployment, ns, name)
    }

    /// ReplicaSets in `ns` matching `label_selector` (an invalid selector matches nothing).
    pub fn replica_sets(&self, ns: &str, label_selector: &str) -> Vec<ReplicaSet> {
        self.list_typed(Res::ReplicaSet, ns, label_selector)
    }

    /// Pods in `ns` matching `label_selector` (an invalid selector matches nothing),
    /// Terminating ones included (check `metadata.deletionTimestamp`).
    pub fn pods(&self, ns: &str, label_selector: &str) -> Vec<Pod> {
        self.list_typed(Res::Pod, ns, label_selector)
    }

    /// Create the Secret, or replace it unconditionally if it exists.
    pub fn put_secret(&self, secret: Secret) -> Result<Secret, KubeSimError> {
        let ns = secret
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut v = serde_json::to_value(&secret)
            .map_err(|e| KubeSimError::BadRequest(format!("cannot encode object: {e}")))?;
        v["metadata"]
            .as_object_mut()
            .map(|m| m.remove("resourceVersion"));
        let v = objects::admit(Res::Secret, v)?;
        let mut inner = self.shared.lock();
        let stored = if inner.store.get(Res::Secret, &ns, &name).is_some() {
            inner
                .store
                .update(Res::Secret, &ns, &name, v, WriteScope::All, false)?
        } else {
            inner.store.create(Res::Secret, &ns, v, false)?
        };
        typed(&stored)
            .ok_or_else(|| KubeSimError::BadRequest("stored object did not decode".into()))
    }

    pub fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.get_typed(Res::Secret, ns, name)
    }

    pub fn lease(&self, ns: &str, name: &str) -> Option<Lease> {
        self.get_typed(Res::Lease, ns, name)
    }

    /// events.k8s.io/v1 Events in `ns` (what kube-rs' `Recorder` publishes).
    pub fn events(&self, ns: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        self.list_typed(Res::EventV1, ns, "")
    }

    /// core/v1 Events in `ns`.
    pub fn core_events(&self, ns: &str) -> Vec<k8s_openapi::api::core::v1::Event> {
        self.list_typed(Res::Event, ns, "")
    }

    fn with_workload(
        &self,
        kinds: &[WorkloadKind],
        ns: &str,
        name: &str,
        f: impl Fn(&mut WorkloadSettings),
    ) {
        let mut inner = self.shared.lock();
        inner.touched.insert(ns.to_string());
        for kind in kinds {
            f(inner
                .workloads
                .entry((*kind, ns.to_string(), name.to_string()))
                .or_default());
        }
    }

    /// New pods of the workloads named `name` (a Deployment, StatefulSet or DaemonSet; all
    /// of them if several kinds share the name) never become Ready (a broken image or
    /// readiness probe); pods that are already ready stay ready.
    pub fn set_never_ready(&self, ns: &str, name: &str, never: bool) {
        self.with_workload(&ALL_KINDS, ns, name, |w| w.never_ready = never);
    }

    /// [`Self::set_never_ready`] for one kind only.
    pub fn set_never_ready_for(&self, kind: WorkloadKind, ns: &str, name: &str, never: bool) {
        self.with_workload(&[kind], ns, name, |w| w.never_ready = never);
    }

    /// Ready delay for the pods of the workloads named `name` (instead of
    /// `pod_ready_delay`).
    pub fn set_ready_delay(&self, ns: &str, name: &str, delay: Duration) {
        self.with_workload(&ALL_KINDS, ns, name, |w| w.ready_delay = Some(delay));
    }

    /// [`Self::set_ready_delay`] for one kind only.
    pub fn set_ready_delay_for(&self, kind: WorkloadKind, ns: &str, name: &str, delay: Duration) {
        self.with_workload(&[kind], ns, name, |w| w.ready_delay = Some(delay));
    }

    /// When set for a workload, its pods become Ready only after BOTH the ready delay passed
    /// and `open_readiness_gate(ns, pod)` was called (a consumer calls it once it holds a key).
    pub fn set_readiness_gate(&self, namespace: &str, name: &str, gated: bool) {
        self.with_workload(&ALL_KINDS, namespace, name, |w| w.gated = gated);
    }

    /// [`Self::set_readiness_gate`] for one kind only.
    pub fn set_readiness_gate_for(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        gated: bool,
    ) {
        self.with_workload(&[kind], namespace, name, |w| w.gated = gated);
    }

    pub fn open_readiness_gate(&self, namespace: &str, pod: &str) {
        let mut inner = self.shared.lock();
        inner.touched.insert(namespace.to_string());
        inner
            .open_gates
            .insert((namespace.to_string(), pod.to_string()));
    }

    pub fn pod_events(&self) -> broadcast::Receiver<PodEvent> {
        self.shared.pod_events.subscribe()
    }

    /// Every pod in `ns` with the workload that owns it: what a [`PodEvent`] receiver that
    /// lagged behind rebuilds its view from.
    pub fn pod_owners(&self, ns: &str) -> Vec<PodOwner> {
        let inner = self.shared.lock();
        inner
            .store
            .list(Res::Pod, Some(ns))
            .into_iter()
            .map(|p| PodOwner {
                name: store::meta_str(p, "name").to_string(),
                workload: inner.store.workload_of_pod(ns, p),
                terminating: p.pointer("/metadata/deletionTimestamp").is_some(),
            })
            .collect()
    }

    /// Register a bearer token TokenReview will authenticate as
    /// `system:serviceaccount:NS:NAME`. Only its SHA-256 is kept. Returns the service
    /// account's uid (see [`KubeSim::service_account_uid`]), which a JWT for it carries.
    pub fn add_service_account_token(&self, token: &str, namespace: &str, name: &str) -> String {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        let uid = Self::service_account_uid(namespace, name);
        self.shared.lock().tokens.insert(
            hash,
            TokenIdentity {
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.clone(),
            },
        );
        uid
    }

    /// The uid TokenReview reports for a service account: stable per (namespace, name), so
    /// a JWT can carry it in `kubernetes.io/serviceaccount/service-account.uid` (OpenBao
    /// checks that the two match).
    pub fn service_account_uid(namespace: &str, name: &str) -> String {
        let d = Sha256::digest(format!("serviceaccount/{namespace}/{name}").as_bytes());
        let h = hex::encode(&d[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// Drop the watch history, as an etcd compaction would: watches resuming from any
    /// earlier resourceVersion get `410 Expired`.
    pub fn compact_watch_history(&self) {
        self.shared.lock().store.compact();
    }

    /// kubectl's `rollout status` verdict on a workload, `None` if it does not exist.
    pub fn workload_rollout_status(
        &self,
        kind: WorkloadKind,
        ns: &str,
        name: &str,
    ) -> Option<RolloutStatus> {
        match kind {
            WorkloadKind::Deployment => self.deployment(ns, name).map(|d| rollout_status(&d)),
            WorkloadKind::StatefulSet => self
                .statefulset(ns, name)
                .map(|s| statefulset::rollout_status(&s)),
            WorkloadKind::DaemonSet => self
                .daemonset(ns, name)
                .map(|d| daemonset::rollout_status(&d)),
            WorkloadKind::Rollout => self.rollout(ns, name).map(|r| {
                let phase = r.pointer("/status/phase").and_then(|v| v.as_str());
                let message = r.pointer("/status/message").and_then(|v| v.as_str());
                match phase {
                    _ if rollout::settled(&r) => RolloutStatus::Complete,
                    Some("Degraded") => RolloutStatus::Failed(message.unwrap_or("").into()),
                    p => RolloutStatus::Waiting(format!(
                        "{}: {}",
                        p.unwrap_or("(no phase)"),
                        message.unwrap_or("")
                    )),
                }
            }),
        }
    }

    /// A minimal Argo Rollout, shaped like [`Self::simple_deployment`] (canary strategy
    /// without steps): JSON, as there is no typed struct for it.
    pub fn simple_rollout(ns: &str, name: &str, replicas: i32) -> serde_json::Value {
        let mut v = simple_workload("Rollout", ns, name, Some(replicas));
        v["apiVersion"] = serde_json::json!("argoproj.io/v1alpha1");
        v["spec"]["strategy"] = serde_json::json!({"canary": {}});
        v
    }

    /// Create a Rollout through the API's admission; the simulated Argo controller brings
    /// it up (see [`rollout`]).
    pub fn create_rollout(&self, ro: serde_json::Value) -> Result<serde_json::Value, KubeSimError> {
        let ns = ro
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let v = objects::admit(Res::Rollout, ro)?;
        self.shared.lock().store.create(Res::Rollout, &ns, v, false)
    }

    /// Install or uninstall a custom resource's CRD, named as kubectl names it
    /// (`vaultstaticsecrets.secrets.hashicorp.com`, `externalsecrets.external-secrets.io`,
    /// `rollouts.argoproj.io`). Uninstalled, it leaves discovery and its URLs answer 404
    /// (its objects are kept, as they would be for a reinstall). False for a name that is
    /// not a simulated custom resource.
    pub fn set_crd_installed(&self, qualified: &str, installed: bool) -> bool {
        let Some(info) = discovery::RESOURCES
            .iter()
            .find(|r| r.is_custom() && r.qualified() == qualified)
        else {
            return false;
        };
        let mut inner = self.shared.lock();
        if installed {
            inner.unserved.remove(&info.res);
        } else {
            inner.unserved.insert(info.res);
        }
        true
    }

    /// Refuse (or stop refusing) every request for a resource with 403 Forbidden, as an
    /// API server does when RBAC grants the client nothing on it; named as kubectl names it
    /// (`pods`, `deployments.apps`, `externalsecrets.external-secrets.io`). False for a
    /// resource that is not served.
    pub fn set_forbidden(&self, qualified: &str, forbidden: bool) -> bool {
        let Some(info) = discovery::RESOURCES
            .iter()
            .find(|r| r.qualified() == qualified)
        else {
            return false;
        };
        let mut inner = self.shared.lock();
        if forbidden {
            inner.forbidden.insert(info.res);
        } else {
            inner.forbidden.remove(&info.res);
        }
        true
    }

    pub fn rollout(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        self.shared
            .lock()
            .store
            .get(Res::Rollout, ns, name)
            .cloned()
    }

    /// Change a Rollout as a client's update would (e.g. `spec.paused = true`).
    pub fn update_rollout(
        &self,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut serde_json::Value),
    ) -> Result<serde_json::Value, KubeSimError> {
        self.update_typed(Res::Rollout, ns, name, change)
    }

    /// The next `n` restarts of the Rollout degrade as Argo reports a rollout whose new pods
    /// never come up: phase `Degraded`, `ProgressDeadlineExceeded`, the restart halted. A
    /// later restart (a rollback's) proceeds.
    pub fn degrade_rollout_restarts(&self, ns: &str, name: &str, n: u32) {
        self.with_workload(&[WorkloadKind::Rollout], ns, name, |w| {
            w.degrade_restarts = n
        });
    }

    /// Abort the Rollout (`status.abort: true`, phase `Degraded`, `RolloutAborted`), as
    /// `kubectl argo rollouts abort` does, until cleared.
    pub fn set_rollout_aborted(&self, ns: &str, name: &str, aborted: bool) {
        self.with_workload(&[WorkloadKind::Rollout], ns, name, |w| w.aborted = aborted);
    }

    /// Pause the Rollout as its controller does at a canary `pause` step
    /// (`status.pauseConditions`, `controllerPause`); `None` resumes it.
    pub fn set_rollout_pause_condition(&self, ns: &str, name: &str, reason: Option<&str>) {
        self.with_workload(&[WorkloadKind::Rollout], ns, name, |w| {
            w.rollout_pause = reason.map(str::to_string)
        });
    }

    /// Wait until the rollout of the workload named `name` is complete by kubectl's rule:
    /// the Deployment of that name, else the StatefulSet, else the DaemonSet (use
    /// [`Self::wait_rollout_complete_for`] when kinds share a name). False on timeout, on a
    /// failed rollout (`ProgressDeadlineExceeded`, a strategy `rollout status` rejects), or
    /// if no such workload exists.
    pub async fn wait_rollout_complete(&self, ns: &str, name: &str, timeout: Duration) -> bool {
        let kind = {
            let inner = self.shared.lock();
            ALL_KINDS
                .into_iter()
                .find(|k| inner.store.get(workload_res(*k), ns, name).is_some())
        };
        match kind {
            Some(kind) => {
                self.wait_rollout_complete_for(kind, ns, name, timeout)
                    .await
            }
            None => false,
        }
    }

    /// [`Self::wait_rollout_complete`] for one kind.
    pub async fn wait_rollout_complete_for(
        &self,
        kind: WorkloadKind,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changes.clone();
        loop {
            changes.borrow_and_update();
            match self.workload_rollout_status(kind, ns, name) {
                Some(RolloutStatus::Complete) => return true,
                Some(RolloutStatus::Failed(_)) | None => return false,
                Some(RolloutStatus::Waiting(_)) => {}
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests;
