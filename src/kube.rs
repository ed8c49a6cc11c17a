//! The daemon's Kubernetes client: rolls workloads by annotating their pod template, judges
//! rollouts by kubectl's `rollout status` rule plus "every ready pod carries the rotation
//! id", reads synced Secrets by hash only, and records Events on the rolled workloads.
//!
//! Argo Rollouts (`argoproj.io/v1alpha1`, through kube's `DynamicObject`) are restarted
//! instead, by a merge patch of `spec.restartAt` (see [`restart_patch`]), judged by Argo's
//! own rule ([`argo_rollout_state`]), and a ready pod runs the restart when it was created
//! at or after its `restartAt` (Argo replaces every older pod; the template, and so the
//! pods' annotations, do not change). [`WorkloadRoller::paused`] reads `spec.paused` of a
//! Deployment and `spec.paused` / `status.pauseConditions` of a Rollout.
//!
//! Every request takes the shared observed path ([`crate::retry::Call`]): a per-attempt
//! timeout (`kubernetes.request_timeout`), bounded retry on 409/429/5xx/transport failures
//! with the `[kubernetes]` policy (the API server's `retryAfterSeconds` honoured up to
//! `max_retry_after`), and each attempt reported to the [`CallObserver`]. This module only
//! classifies kube's errors ([`classify`]). kube's own retry layer is switched off so the
//! observer sees every attempt and there is one retry bound, not two stacked ones.

mod consumers;

pub use consumers::{
    agent_path_matches, eso_key_matches, external_secret_resource, vault_static_secret_resource,
    vso_matches,
};

use crate::config::{KubernetesConfig, WorkloadKind, WorkloadRef};
use crate::retry::{Call, GaveUp, Retry, RetryPolicy, Timeout, Verdict};
use crate::rotation::ports::{
    Backend, BackendError, CallObserver, Consumer, EventType, RolloutState, StatusClass,
    WorkloadRoller,
};
use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret as K8sSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Selector;
use kube::runtime::events::{self, Recorder, Reporter};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::fmt::Debug;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The pod-template annotation a roll sets; its value is the rotation (rollout) id.
pub const ROTATION_ANNOTATION: &str = "openai-key-rotator/rotation-id";

/// On a Rollout (its own metadata, not the pod template): the rotation id of the last
/// restart we asked for, and the `spec.restartAt` we set for it.
pub const RESTART_AT_ANNOTATION: &str = "openai-key-rotator/restart-at";
/// The rotation id and restart time of the restart before that (see
/// [`WorkloadRoller::ready_pods_with`] for Rollouts).
pub const PREVIOUS_ROTATION_ANNOTATION: &str = "openai-key-rotator/previous-rotation-id";
pub const PREVIOUS_RESTART_AT_ANNOTATION: &str = "openai-key-rotator/previous-restart-at";

/// Name under which writes (managedFields) and Events are attributed to us.
const MANAGER: &str = "openai-key-rotator";
/// Operation names reported to the [`CallObserver`] (a bounded metric label set).
pub const OPERATIONS: &[&str] = &[
    "version.get",
    "workload.get",
    "workload.patch",
    "pods.list",
    "rollout.get",
    "rollout.patch",
    "secret.get",
    "secret.patch",
    "event.create",
    "consumers.pods.list",
    "consumers.replicasets.get",
    "consumers.vaultstaticsecrets.list",
    "consumers.externalsecrets.list",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The Events API rejects notes over 1 kB.
const MAX_NOTE_BYTES: usize = 1024;
const K8S: Backend = Backend::Kubernetes;

/// Setting up the client (talking to the API server maps to [`BackendError`]).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot load the default kubeconfig with context {context:?}: {source}")]
    Context {
        context: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration found (kubeconfig or in-cluster): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// [`WorkloadRoller`] over kube-rs.
#[derive(Clone)]
pub struct KubeRoller {
    client: kube::Client,
    calls: Arc<dyn CallObserver>,
    /// One recorder for the roller's life, so repeats of an Event become a series.
    recorder: Recorder,
    retry: RetryPolicy,
    timeout: Duration,
    /// Consumer sources already warned about as unreadable (forbidden or not installed).
    unseen: Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
}

impl KubeRoller {
    /// From a kubeconfig path (+ context) or, when unset, `kube::Config::infer()`
    /// (`KUBECONFIG` / `~/.kube/config`, else in-cluster); timeout and retry policy from
    /// `cfg`.
    pub async fn connect(
        cfg: &KubernetesConfig,
        calls: Arc<dyn CallObserver>,
    ) -> Result<Self, KubeError> {
        let options = KubeConfigOptions {
            context: cfg.context.clone(),
            ..Default::default()
        };
        let config = match (&cfg.kubeconfig, &cfg.context) {
            (Some(path), _) => {
                let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|source| KubeError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })?
            }
            (None, Some(context)) => {
                kube::Config::from_kubeconfig(&options)
                    .await
                    .map_err(|source| KubeError::Context {
                        context: context.clone(),
                        source,
                    })?
            }
            (None, None) => kube::Config::infer().await.map_err(KubeError::Infer)?,
        };
        Ok(Self::from_config(config, calls)?
            .with_retry(cfg.retry_policy())
            .with_timeout(cfg.request_timeout.get()))
    }

    /// From a ready `kube::Config` (kube's retry layer is turned off: ours is used), with
    /// the `[kubernetes]` defaults for timeout and retries. Must run inside a Tokio runtime.
    pub fn from_config(
        mut config: kube::Config,
        calls: Arc<dyn CallObserver>,
    ) -> Result<Self, KubeError> {
        config.default_retry = false;
        config.connect_timeout = Some(config.connect_timeout.unwrap_or(CONNECT_TIMEOUT));
        // No client-wide read timeout: `client()` is shared with watches and long polls;
        // each of our calls gets its own bound instead.
        let client = kube::Client::try_from(config).map_err(KubeError::Client)?;
        let reporter = match std::env::var("POD_NAME") {
            Ok(pod) if !pod.is_empty() => Reporter {
                controller: MANAGER.into(),
                instance: Some(pod),
            },
            _ => Reporter::from(MANAGER), // hostname as the instance
        };
        let defaults = KubernetesConfig::default();
        Ok(KubeRoller {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            calls,
            retry: defaults.retry_policy(),
            timeout: defaults.request_timeout.get(),
            unseen: Arc::default(),
        })
    }

    /// Replace the retry policy (tests use short backoffs).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replace the per-attempt timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// For /readyz: the API server answers (`/version`).
    pub async fn ping(&self) -> Result<(), BackendError> {
        self.call("version.get", "the API server version", false, || {
            self.client.apiserver_version()
        })
        .await
        .map(|_| ())
    }

    /// One logical call on the observed path. `absent_ok`: a 404 is an expected answer
    /// (reported as success, not retried, returned as `NotFound`).
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        what: &str,
        absent_ok: bool,
        f: F,
    ) -> Result<T, BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        Call::new(K8S, op, &self.retry, &*self.calls)
            .timeout(self.timeout)
            .what(what)
            .run(
                |e: &KubeFail| {
                    let v = e.verdict();
                    match e {
                        KubeFail::Api(kube::Error::Api(s)) if s.code == 404 && absent_ok => {
                            Verdict::new(StatusClass::Success, Retry::No)
                        }
                        _ => v,
                    }
                },
                |_| {
                    let fut = f();
                    async move { fut.await.map_err(KubeFail::Api) }
                },
            )
            .await
            .map_err(|g| self.backend_error(op, what, g))
    }

    /// The [`BackendError`] of a call that gave up, naming the operation and object.
    fn backend_error(&self, op: &str, what: &str, g: GaveUp<KubeFail>) -> BackendError {
        let suffix = g.suffix(&self.retry);
        match g.error {
            KubeFail::Timeout(after) => BackendError::Failed {
                backend: K8S,
                message: format!("{op} {what}: no answer within {after:?}{suffix}"),
                transient: true,
            },
            KubeFail::Api(e) => match error_of(&e, op, what) {
                BackendError::Failed {
                    backend,
                    message,
                    transient,
                } => BackendError::Failed {
                    backend,
                    message: message + &suffix,
                    transient,
                },
                other => other,
            },
        }
    }

    async fn get<K>(
        &self,
        op: &'static str,
        ns: &str,
        name: &str,
        what: &str,
    ) -> Result<K, BackendError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        self.call(op, what, false, || api.get(name)).await
    }

    async fn patch<K>(
        &self,
        op: &'static str,
        ns: &str,
        name: &str,
        what: &str,
        patch: &Patch<serde_json::Value>,
    ) -> Result<(), BackendError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        self.call(op, what, false, || api.patch(name, &params, patch))
            .await
            .map(|_| ())
    }

    async fn workload(&self, w: &WorkloadRef) -> Result<Workload, BackendError> {
        let what = describe(w);
        let (ns, name) = (w.namespace.as_str(), w.name.as_str());
        Ok(match w.kind {
            WorkloadKind::Deployment => {
                Workload::Deployment(self.get("workload.get", ns, name, &what).await?)
            }
            WorkloadKind::StatefulSet => {
                Workload::StatefulSet(self.get("workload.get", ns, name, &what).await?)
            }
            WorkloadKind::DaemonSet => {
                Workload::DaemonSet(self.get("workload.get", ns, name, &what).await?)
            }
            WorkloadKind::Rollout => {
                let api = self.rollouts(ns);
                Workload::Rollout(Box::new(
                    self.call("rollout.get", &what, false, || api.get(name))
                        .await?,
                ))
            }
        })
    }

    /// `argoproj.io/v1alpha1` Rollouts in `ns`, through kube's dynamic API.
    fn rollouts(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &rollout_resource())
    }

    /// Pods the workload's selector picks that are Ready and not terminating (terminating
    /// pods are out of the Service endpoints and on their way out, as kubectl counts them).
    async fn ready_pods(&self, w: &WorkloadRef, wl: &Workload) -> Result<Vec<Pod>, BackendError> {
        let selector = wl.selector().ok_or_else(|| invalid(w, "has no selector"))?;
        let selector = Selector::try_from(selector)
            .map_err(|e| invalid(w, &format!("has an unusable selector: {e}")))?;
        if selector.selects_all() {
            return Err(invalid(w, "has an empty selector"));
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &w.namespace);
        let params = ListParams::default().labels_from(&selector);
        let what = format!("pods of {}", describe(w));
        let pods = self
            .call("pods.list", &what, false, || api.list(&params))
            .await?;
        Ok(pods.items.into_iter().filter(pod_is_ready).collect())
    }
}

#[async_trait]
impl WorkloadRoller for KubeRoller {
    async fn roll(&self, w: &WorkloadRef, rollout_id: &str) -> Result<(), BackendError> {
        let current = self.workload(w).await?;
        if current.rotation_id() == Some(rollout_id) {
            tracing::debug!(workload = %w, rollout_id, "already rolled to this id");
            return Ok(());
        }
        if let Workload::Rollout(ro) = &current {
            // What `kubectl argo rollouts restart` does: a merge patch of spec.restartAt.
            // The pod template stays as it is (a template change would start a new
            // canary/blue-green update with its steps); our id and the restart time go on
            // the Rollout's own metadata, with the previous pair kept for
            // `ready_pods_with`.
            let patch = Patch::Merge(restart_patch(ro, rollout_id, chrono::Utc::now()));
            let what = describe(w);
            let api = self.rollouts(&w.namespace);
            let params = PatchParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            self.call("rollout.patch", &what, false, || {
                api.patch(&w.name, &params, &patch)
            })
            .await?;
            tracing::info!(workload = %w, rollout_id, "restarted");
            return Ok(());
        }
        // What `kubectl rollout restart` does, with our annotation: a strategic merge patch
        // of the pod template (no resourceVersion: it touches only our key).
        let patch = Patch::Strategic(serde_json::json!({
            "spec": {"template": {"metadata": {"annotations": {ROTATION_ANNOTATION: rollout_id}}}}
        }));
        let what = describe(w);
        let (ns, name) = (w.namespace.as_str(), w.name.as_str());
        match w.kind {
            WorkloadKind::Deployment => {
                self.patch::<Deployment>("workload.patch", ns, name, &what, &patch)
                    .await
            }
            WorkloadKind::StatefulSet => {
                self.patch::<StatefulSet>("workload.patch", ns, name, &what, &patch)
                    .await
            }
            WorkloadKind::DaemonSet => {
                self.patch::<DaemonSet>("workload.patch", ns, name, &what, &patch)
                    .await
            }
            WorkloadKind::Rollout => Err(invalid(w, "is not a Rollout")),
        }?;
        tracing::info!(workload = %w, rollout_id, "rolled");
        Ok(())
    }

    async fn rollout_state(
        &self,
        w: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<RolloutState, BackendError> {
        let wl = self.workload(w).await?;
        match wl.rotation_id() {
            Some(id) if id == rollout_id => {}
            Some(other) => {
                return Ok(RolloutState::Failed(format!(
                    "{} was rolled again: its pod template now carries rotation id {other:?}, not {rollout_id:?}",
                    describe(w)
                )))
            }
            None => {
                return Ok(RolloutState::Failed(format!(
                    "{}'s {} carries no {ROTATION_ANNOTATION} annotation (expected {rollout_id:?}): it was rolled back or replaced",
                    describe(w),
                    if matches!(wl, Workload::Rollout(_)) { "metadata" } else { "pod template" }
                )))
            }
        }
        let state = wl.kubectl_state();
        if state != RolloutState::Complete {
            return Ok(state);
        }
        let pods = self.ready_pods(w, &wl).await?;
        let stale = match &wl {
            Workload::Rollout(ro) => {
                let Some(since) = restart_at_of(ro) else {
                    return Ok(RolloutState::Failed(format!(
                        "{} carries no valid {RESTART_AT_ANNOTATION} annotation: it was not restarted by us",
                        describe(w)
                    )));
                };
                pods.iter()
                    .filter(|p| !created_at_or_after(p, since))
                    .count()
            }
            _ => pods
                .iter()
                .filter(|p| pod_rotation_id(p) != Some(rollout_id))
                .count(),
        };
        if stale == 0 {
            return Ok(RolloutState::Complete);
        }
        if let Some(partition) = wl.partition().filter(|p| *p > 0) {
            return Ok(RolloutState::Failed(format!(
                "{stale} ready pods still run an older template: rollingUpdate.partition={partition} keeps pods with a lower ordinal on it, so they would keep the old key"
            )));
        }
        Ok(RolloutState::Progressing(format!(
            "{stale} ready pods still run an older template"
        )))
    }

    async fn ready_pods_with(
        &self,
        w: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<u32, BackendError> {
        let wl = self.workload(w).await?;
        let pods = self.ready_pods(w, &wl).await?;
        let n = match &wl {
            Workload::Rollout(ro) => {
                let window = restart_window(ro, rollout_id);
                pods.iter().filter(|p| window.holds(p)).count()
            }
            _ => pods
                .iter()
                .filter(|p| pod_rotation_id(p) == Some(rollout_id))
                .count(),
        };
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn consumers_of(
        &self,
        mount: &str,
        path: &str,
        field: &str,
    ) -> Result<Vec<Consumer>, BackendError> {
        self.find_consumers(mount, path, field).await
    }

    async fn paused(&self, w: &WorkloadRef) -> Result<bool, BackendError> {
        Ok(match self.workload(w).await? {
            Workload::Deployment(d) => d.spec.and_then(|s| s.paused) == Some(true),
            Workload::Rollout(ro) => rollout_paused(&ro),
            Workload::StatefulSet(_) | Workload::DaemonSet(_) => false,
        })
    }

    async fn secret_sha256(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        let api: Api<K8sSecret> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("Secret {namespace}/{name}");
        let secret = match self.call("secret.get", &what, true, || api.get(name)).await {
            Ok(s) => s,
            Err(BackendError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Hash the bytes in place; they are never formatted or kept.
        Ok(secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| hex::encode(Sha256::digest(&v.0))))
    }

    async fn nudge_secret(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: &str,
    ) -> Result<(), BackendError> {
        let patch = Patch::Merge(serde_json::json!({
            "metadata": {"annotations": {annotation: value}}
        }));
        let what = format!("Secret {namespace}/{name}");
        self.patch::<K8sSecret>("secret.patch", namespace, name, &what, &patch)
            .await
    }

    async fn event(
        &self,
        w: &WorkloadRef,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), BackendError> {
        let wl = self.workload(w).await?;
        let meta = wl.meta();
        let reference = ObjectReference {
            api_version: Some(w.kind.api_version().into()),
            kind: Some(w.kind.as_str().into()),
            namespace: Some(w.namespace.clone()),
            name: Some(w.name.clone()),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..Default::default()
        };
        let ev = events::Event {
            type_: match type_ {
                EventType::Normal => events::EventType::Normal,
                EventType::Warning => events::EventType::Warning,
            },
            reason: reason.into(),
            note: Some(truncate(note, MAX_NOTE_BYTES).into()),
            action: "RotateKey".into(),
            secondary: None,
        };
        let what = format!("Event on {}", describe(w));
        self.call("event.create", &what, false, || {
            self.recorder.publish(&ev, &reference)
        })
        .await
    }
}

/// A fetched workload of any supported kind.
enum Workload {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
    /// An Argo Rollout, read through kube's dynamic API.
    Rollout(Box<DynamicObject>),
}

impl Workload {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Workload::Deployment(d) => &d.metadata,
            Workload::StatefulSet(s) => &s.metadata,
            Workload::DaemonSet(d) => &d.metadata,
            Workload::Rollout(r) => &r.metadata,
        }
    }

    /// The metadata that carries our rotation id: the pod template's, or a Rollout's own.
    fn id_meta(&self) -> Option<&ObjectMeta> {
        match self {
            Workload::Deployment(d) => d.spec.as_ref()?.template.metadata.as_ref(),
            Workload::StatefulSet(s) => s.spec.as_ref()?.template.metadata.as_ref(),
            Workload::DaemonSet(d) => d.spec.as_ref()?.template.metadata.as_ref(),
            Workload::Rollout(r) => Some(&r.metadata),
        }
    }

    fn selector(&self) -> Option<LabelSelector> {
        match self {
            Workload::Deployment(d) => d.spec.as_ref().map(|s| s.selector.clone()),
            Workload::StatefulSet(s) => s.spec.as_ref().map(|s| s.selector.clone()),
            Workload::DaemonSet(d) => d.spec.as_ref().map(|s| s.selector.clone()),
            Workload::Rollout(r) => r
                .data
                .pointer("/spec/selector")
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
        }
    }

    /// The rotation id the pod template (a Rollout: its metadata) carries.
    fn rotation_id(&self) -> Option<&str> {
        self.id_meta()?
            .annotations
            .as_ref()?
            .get(ROTATION_ANNOTATION)
            .map(String::as_str)
    }

    /// A StatefulSet's rolling-update partition.
    fn partition(&self) -> Option<i32> {
        match self {
            Workload::StatefulSet(s) => {
                s.spec
                    .as_ref()?
                    .update_strategy
                    .as_ref()?
                    .rolling_update
                    .as_ref()?
                    .partition
            }
            _ => None,
        }
    }

    fn kubectl_state(&self) -> RolloutState {
        match self {
            Workload::Deployment(d) => deployment_state(d),
            Workload::StatefulSet(s) => statefulset_state(s),
            Workload::DaemonSet(d) => daemonset_state(d),
            Workload::Rollout(r) => argo_rollout_state(r),
        }
    }
}

/// kubectl's `DeploymentStatusViewer`: where a Deployment's current rollout stands.
pub fn deployment_state(d: &Deployment) -> RolloutState {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return RolloutState::Progressing(
            "Waiting for deployment spec update to be observed...".into(),
        );
    }
    let timed_out = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
        .is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if timed_out {
        return RolloutState::Failed(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let spec = d.spec.as_ref();
    let updated = st.updated_replicas.unwrap_or(0);
    let replicas = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    // kubectl does not look at `paused`; say so, as such a rollout waits for a human.
    let paused = if spec.and_then(|s| s.paused) == Some(true) {
        " (the deployment is paused)"
    } else {
        ""
    };
    if let Some(want) = spec.and_then(|s| s.replicas) {
        if updated < want {
            return RolloutState::Progressing(format!(
                "Waiting for deployment {name:?} rollout to finish: {updated} out of {want} new replicas have been updated...{paused}"
            ));
        }
    }
    if replicas > updated {
        return RolloutState::Progressing(format!(
            "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...{paused}",
            replicas - updated
        ));
    }
    if available < updated {
        return RolloutState::Progressing(format!(
            "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
        ));
    }
    RolloutState::Complete
}

/// kubectl's `StatefulSetStatusViewer`. An unset strategy type is the API default,
/// RollingUpdate; `OnDelete` never replaces pods by itself, hence `Failed`.
pub fn statefulset_state(s: &StatefulSet) -> RolloutState {
    let name = s.metadata.name.as_deref().unwrap_or_default();
    let spec = s.spec.as_ref();
    let strategy = spec.and_then(|s| s.update_strategy.as_ref());
    if let Some(kind) = strategy.and_then(|u| u.type_.as_deref()) {
        if kind != "RollingUpdate" {
            return RolloutState::Failed(format!(
                "statefulset {name:?} uses the {kind} update strategy: rollout status is only available for RollingUpdate, and its pods are replaced only when deleted"
            ));
        }
    }
    let st = s.status.clone().unwrap_or_default();
    let observed = st.observed_generation.unwrap_or(0);
    if observed == 0 || s.metadata.generation.unwrap_or(0) > observed {
        return RolloutState::Progressing(
            "Waiting for statefulset spec update to be observed...".into(),
        );
    }
    let replicas = spec.and_then(|s| s.replicas);
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    if let Some(want) = replicas {
        if ready < want {
            return RolloutState::Progressing(format!(
                "Waiting for {} pods to be ready...",
                want - ready
            ));
        }
    }
    if let Some(rolling) = strategy.and_then(|u| u.rolling_update.as_ref()) {
        if let (Some(want), Some(partition)) = (replicas, rolling.partition) {
            if updated < want - partition {
                return RolloutState::Progressing(format!(
                    "Waiting for partitioned roll out to finish: {updated} out of {} new pods have been updated...",
                    want - partition
                ));
            }
        }
        return RolloutState::Complete;
    }
    if st.update_revision != st.current_revision {
        return RolloutState::Progressing(format!(
            "waiting for statefulset rolling update to complete {updated} pods at revision {}...",
            st.update_revision.as_deref().unwrap_or_default()
        ));
    }
    RolloutState::Complete
}

/// kubectl's `DaemonSetStatusViewer` (same strategy handling as StatefulSets).
pub fn daemonset_state(d: &DaemonSet) -> RolloutState {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let strategy = d
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref());
    if let Some(kind) = strategy {
        if kind != "RollingUpdate" {
            return RolloutState::Failed(format!(
                "daemon set {name:?} uses the {kind} update strategy: rollout status is only available for RollingUpdate, and its pods are replaced only when deleted"
            ));
        }
    }
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return RolloutState::Progressing(
            "Waiting for daemon set spec update to be observed...".into(),
        );
    }
    let desired = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let available = st.number_available.unwrap_or(0);
    if updated < desired {
        return RolloutState::Progressing(format!(
            "Waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated..."
        ));
    }
    if available < desired {
        return RolloutState::Progressing(format!(
            "Waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available..."
        ));
    }
    RolloutState::Complete
}

/// Argo Rollouts' `Rollout` as kube's dynamic API addresses it.
pub fn rollout_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Rollout"),
        "rollouts",
    )
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

/// The `spec.restartAt` our last restart of the Rollout set, in seconds.
fn restart_at_of(ro: &DynamicObject) -> Option<i64> {
    annotation(&ro.metadata, RESTART_AT_ANNOTATION).and_then(parse_time)
}

/// The merge patch that restarts a Rollout for `rollout_id`, as `kubectl argo rollouts
/// restart` does (`spec.restartAt`), with the id and time on the Rollout's metadata and the
/// previous pair kept. The time is rounded up to the next whole second: Argo restarts the
/// pods created *before* `restartAt` and creation times have whole seconds, so a pod that
/// started earlier in the current second is restarted too (Argo waits until a future
/// `restartAt`, here about a second). It is also later than the Rollout's last restart.
pub fn restart_patch(
    ro: &DynamicObject,
    rollout_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> serde_json::Value {
    // Strictly after the last restart too: two restarts within one second (a rollback
    // right after a restart that degraded) would otherwise set the same restartAt, which
    // Argo takes as already done.
    let last = [
        rollout_spec(ro).get("restartAt").and_then(|v| v.as_str()),
        annotation(&ro.metadata, RESTART_AT_ANNOTATION),
    ]
    .into_iter()
    .flatten()
    .filter_map(parse_time)
    .max();
    let secs = (now.timestamp() + 1).max(last.map_or(i64::MIN, |l| l + 1));
    let at = chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or(now)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let prev_id = annotation(&ro.metadata, ROTATION_ANNOTATION);
    let prev_at = annotation(&ro.metadata, RESTART_AT_ANNOTATION);
    serde_json::json!({
        "metadata": {"annotations": {
            ROTATION_ANNOTATION: rollout_id,
            RESTART_AT_ANNOTATION: at,
            PREVIOUS_ROTATION_ANNOTATION: prev_id,
            PREVIOUS_RESTART_AT_ANNOTATION: prev_id.and(prev_at),
        }},
        "spec": {"restartAt": at}
    })
}

fn created_second(p: &Pod) -> Option<i64> {
    p.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

/// Argo's own rule, inverted: its restart replaces every pod created before `restartAt`,
/// so a pod created at or after it runs on what was published before the restart.
fn created_at_or_after(p: &Pod, since: i64) -> bool {
    created_second(p).is_some_and(|c| c >= since)
}

/// Which of a Rollout's pods belong to one of our restarts: created in `[from, until)`
/// (`None`: none can be told to).
struct RestartWindow(Option<(i64, Option<i64>)>);

impl RestartWindow {
    fn holds(&self, p: &Pod) -> bool {
        match (self.0, created_second(p)) {
            (Some((from, until)), Some(c)) => c >= from && until.is_none_or(|u| c < u),
            // A pod without a creation time: count it while any window is open (safe side).
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// The pods that still run on what restart `rollout_id` started with. Restarts do not
/// label pods, so a Rollout remembers its last two restarts (id and `restartAt`): the
/// current one owns the pods created since its time; the previous one those created
/// between its time and the current one's. An older id owns, while the current restart is
/// unfinished, every pod older than the current restart (it cannot be told apart; counting
/// it errs on the side of keeping a key alive), and nothing once it has finished.
fn restart_window(ro: &DynamicObject, rollout_id: &str) -> RestartWindow {
    let meta = &ro.metadata;
    let current = restart_at_of(ro);
    if annotation(meta, ROTATION_ANNOTATION) == Some(rollout_id) {
        return RestartWindow(Some((current.unwrap_or(i64::MIN), None)));
    }
    if annotation(meta, PREVIOUS_ROTATION_ANNOTATION) == Some(rollout_id) {
        let from = annotation(meta, PREVIOUS_RESTART_AT_ANNOTATION)
            .and_then(parse_time)
            .unwrap_or(i64::MIN);
        return RestartWindow(Some((from, current)));
    }
    match current {
        Some(at) if !restart_finished(ro) => RestartWindow(Some((i64::MIN, Some(at)))),
        _ => RestartWindow(None),
    }
}

fn rollout_spec(ro: &DynamicObject) -> &serde_json::Value {
    ro.data.get("spec").unwrap_or(&serde_json::Value::Null)
}

fn rollout_status(ro: &DynamicObject) -> &serde_json::Value {
    ro.data.get("status").unwrap_or(&serde_json::Value::Null)
}

/// Argo marks a restart done by copying `spec.restartAt` into `status.restartedAt`.
fn restart_finished(ro: &DynamicObject) -> bool {
    let want = rollout_spec(ro).get("restartAt").and_then(|v| v.as_str());
    let done = rollout_status(ro)
        .get("restartedAt")
        .and_then(|v| v.as_str());
    match (want, done) {
        (None, _) => true,
        (Some(w), Some(d)) => parse_time(w).is_some() && parse_time(w) == parse_time(d),
        (Some(_), None) => false,
    }
}

/// A paused Rollout: `spec.paused` (manually) or pause conditions set by its controller
/// (a canary pause step, an inconclusive analysis, ...). Either waits for a human.
pub fn rollout_paused(ro: &DynamicObject) -> bool {
    rollout_spec(ro).get("paused").and_then(|v| v.as_bool()) == Some(true)
        || rollout_status(ro)
            .get("pauseConditions")
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
}

fn int(v: &serde_json::Value, key: &str) -> Option<i64> {
    v.get(key).and_then(|v| v.as_i64())
}

/// Where an Argo Rollout stands, by Argo's own rule (`GetRolloutPhase` /
/// `CalculateRolloutPhase` in `utils/rollout`, what `kubectl argo rollouts status` waits
/// on), made strict where the rotation needs it: the controller must have observed the
/// current generation (a missing or unparsable `observedGeneration` waits, where Argo would
/// take it for an old controller's), `Degraded`, an abort, `InvalidSpec` or a progress
/// deadline fail (no waiting them out), the restart must be done
/// (`status.restartedAt == spec.restartAt`), the phase `Healthy`, and updated and available
/// replicas must reach `spec.replicas` (default 1).
pub fn argo_rollout_state(ro: &DynamicObject) -> RolloutState {
    let name = ro.metadata.name.as_deref().unwrap_or_default();
    let spec = rollout_spec(ro);
    let st = rollout_status(ro);
    let observed = match st.get("observedGeneration") {
        Some(serde_json::Value::String(s)) => s.parse::<i64>().ok(),
        Some(v) => v.as_i64(),
        None => None,
    };
    if observed.is_none_or(|o| o < ro.metadata.generation.unwrap_or(0)) {
        return RolloutState::Progressing("waiting for rollout spec update to be observed".into());
    }
    let message = st.get("message").and_then(|v| v.as_str()).unwrap_or("");
    if st.get("abort").and_then(|v| v.as_bool()) == Some(true) {
        return RolloutState::Failed(format!("rollout {name:?} was aborted: {message}"));
    }
    for c in st
        .get("conditions")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let field = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let reason = field("reason");
        if field("type") == "InvalidSpec"
            || reason == "RolloutAborted"
            || reason == "ProgressDeadlineExceeded"
        {
            let why = if field("type") == "InvalidSpec" {
                "InvalidSpec"
            } else {
                reason
            };
            return RolloutState::Failed(format!(
                "rollout {name:?} is Degraded: {why}: {}",
                field("message")
            ));
        }
    }
    let phase = st.get("phase").and_then(|v| v.as_str()).unwrap_or("");
    if phase == "Degraded" {
        return RolloutState::Failed(format!("rollout {name:?} is Degraded: {message}"));
    }
    let pause_conditions = st
        .get("pauseConditions")
        .and_then(|v| v.as_array())
        .map_or(0, Vec::len);
    if st.get("controllerPause").and_then(|v| v.as_bool()) == Some(true) && pause_conditions == 0 {
        return RolloutState::Progressing("waiting for rollout to unpause".into());
    }
    if rollout_paused(ro) {
        return RolloutState::Progressing(format!(
            "rollout {name:?} is paused{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        ));
    }
    if !restart_finished(ro) {
        return RolloutState::Progressing(format!("rollout {name:?} is restarting"));
    }
    if !phase.is_empty() && phase != "Healthy" {
        return RolloutState::Progressing(format!("rollout {name:?} is {phase}: {message}"));
    }
    let want = int(spec, "replicas").unwrap_or(1);
    let updated = int(st, "updatedReplicas").unwrap_or(0);
    let available = int(st, "availableReplicas").unwrap_or(0);
    if updated < want {
        return RolloutState::Progressing(format!(
            "rollout {name:?}: {updated} of {want} replicas updated"
        ));
    }
    if available < want {
        return RolloutState::Progressing(format!(
            "rollout {name:?}: {available} of {want} replicas available"
        ));
    }
    let canary_without_routing = spec
        .pointer("/strategy/canary")
        .is_some_and(|c| c.get("trafficRouting").is_none());
    if canary_without_routing && int(st, "replicas").unwrap_or(0) > updated {
        return RolloutState::Progressing(format!(
            "rollout {name:?}: old replicas are pending termination"
        ));
    }
    RolloutState::Complete
}

fn pod_is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_rotation_id(p: &Pod) -> Option<&str> {
    p.metadata
        .annotations
        .as_ref()?
        .get(ROTATION_ANNOTATION)
        .map(String::as_str)
}

fn describe(w: &WorkloadRef) -> String {
    format!("{} {}/{}", w.kind.as_str(), w.namespace, w.name)
}

fn invalid(w: &WorkloadRef, why: &str) -> BackendError {
    BackendError::Failed {
        backend: K8S,
        message: format!("{} {why}", describe(w)),
        transient: false,
    }
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One failed attempt: kube's error, or our per-attempt timeout.
#[derive(Debug)]
enum KubeFail {
    Api(kube::Error),
    Timeout(Duration),
}

impl From<Timeout> for KubeFail {
    fn from(t: Timeout) -> Self {
        KubeFail::Timeout(t.after)
    }
}

impl std::fmt::Display for KubeFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeFail::Api(e) => write!(f, "{e}"),
            KubeFail::Timeout(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

impl KubeFail {
    fn verdict(&self) -> Verdict {
        match self {
            KubeFail::Api(e) => classify(e),
            KubeFail::Timeout(_) => Verdict::new(StatusClass::Transport, Retry::Yes),
        }
    }
}

/// What a kube error means: 404 final; 409 (a conflict), 429 and 5xx retried (with the
/// server's `retryAfterSeconds` when given); transport failures retried; other 4xx and
/// undecodable answers final.
fn classify(e: &kube::Error) -> Verdict {
    match e {
        kube::Error::Api(status) => {
            let code = status.code;
            let class = StatusClass::from_status(code);
            let after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            let retry = match (code, after) {
                (409 | 429 | 500..=599, Some(d)) => Retry::After(d),
                (409 | 429 | 500..=599, None) => Retry::Yes,
                _ => Retry::No,
            };
            Verdict::new(class, retry)
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::Auth(_) => {
            Verdict::new(StatusClass::Transport, Retry::Yes)
        }
        kube::Error::SerdeError(_) | kube::Error::FromUtf8(_) => {
            Verdict::new(StatusClass::ServerError, Retry::No)
        }
        _ => Verdict::new(StatusClass::ClientError, Retry::No),
    }
}

/// Map a kube error: 404 → NotFound, 409 → Conflict, 429/5xx/transport → transient,
/// other 4xx and undecodable answers → permanent.
fn error_of(e: &kube::Error, op: &str, what: &str) -> BackendError {
    match e {
        kube::Error::Api(status) => {
            let code = status.code;
            let message = format!(
                "{op} {what}: HTTP {code} {}: {}",
                status.reason, status.message
            );
            match code {
                404 => BackendError::NotFound {
                    backend: K8S,
                    what: what.into(),
                },
                409 => BackendError::Conflict {
                    backend: K8S,
                    what: what.into(),
                    message,
                },
                429 | 500..=599 => BackendError::Failed {
                    backend: K8S,
                    message,
                    transient: true,
                },
                _ => BackendError::Failed {
                    backend: K8S,
                    message,
                    transient: false,
                },
            }
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::Auth(_) => {
            BackendError::Failed {
                backend: K8S,
                message: format!("{op} {what}: {e}"),
                transient: true,
            }
        }
        kube::Error::SerdeError(_) | kube::Error::FromUtf8(_) => BackendError::Failed {
            backend: K8S,
            message: format!("{op} {what}: undecodable answer: {e}"),
            transient: false,
        },
        other => BackendError::Failed {
            backend: K8S,
            message: format!("{op} {what}: {other}"),
            transient: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T: DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("a well-formed literal")
    }

    fn progressing(s: RolloutState) -> String {
        match s {
            RolloutState::Progressing(m) => m,
            other => panic!("expected Progressing, got {other:?}"),
        }
    }

    fn failed(s: RolloutState) -> String {
        match s {
            RolloutState::Failed(m) => m,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn deployment(
        generation: i64,
        spec: serde_json::Value,
        status: serde_json::Value,
    ) -> Deployment {
        let mut spec_full = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}
        });
        for (k, v) in spec.as_object().expect("object") {
            spec_full[k] = v.clone();
        }
        from(json!({
            "metadata": {"name": "web", "namespace": "ns", "generation": generation},
            "spec": spec_full,
            "status": status
        }))
    }

    #[test]
    fn deployment_rules_follow_kubectl() {
        let spec = json!({"replicas": 3});
        let m = progressing(deployment_state(&deployment(
            2,
            spec.clone(),
            json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
        )));
        assert_eq!(m, "Waiting for deployment spec update to be observed...");

        let m = failed(deployment_state(&deployment(
            2,
            spec.clone(),
            json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1,
                   "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
        )));
        assert_eq!(m, "deployment \"web\" exceeded its progress deadline");
        // The same condition with another reason is no failure.
        assert_eq!(
            progressing(deployment_state(&deployment(
                2,
                spec.clone(),
                json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1,
                       "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}),
            ))),
            "Waiting for deployment \"web\" rollout to finish: 1 out of 3 new replicas have been updated..."
        );

        let m = progressing(deployment_state(&deployment(
            2,
            spec.clone(),
            json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3}),
        )));
        assert_eq!(
            m,
            "Waiting for deployment \"web\" rollout to finish: 1 old replicas are pending termination..."
        );

        let m = progressing(deployment_state(&deployment(
            2,
            spec.clone(),
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2}),
        )));
        assert_eq!(
            m,
            "Waiting for deployment \"web\" rollout to finish: 2 of 3 updated replicas are available..."
        );

        assert_eq!(
            deployment_state(&deployment(
                2,
                spec.clone(),
                json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
            )),
            RolloutState::Complete
        );
        // Zero replicas and no status counts: complete, as kubectl says.
        assert_eq!(
            deployment_state(&deployment(
                1,
                json!({"replicas": 0}),
                json!({"observedGeneration": 1})
            )),
            RolloutState::Complete
        );
        let m = progressing(deployment_state(&deployment(
            2,
            json!({"replicas": 3, "paused": true}),
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 0}),
        )));
        assert!(m.ends_with("(the deployment is paused)"), "{m}");
    }

    fn statefulset(
        generation: i64,
        strategy: serde_json::Value,
        status: serde_json::Value,
    ) -> StatefulSet {
        from(json!({
            "metadata": {"name": "db", "namespace": "ns", "generation": generation},
            "spec": {
                "replicas": 3,
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}},
                "updateStrategy": strategy
            },
            "status": status
        }))
    }

    #[test]
    fn statefulset_rules_follow_kubectl() {
        let rolling = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
        let m = failed(statefulset_state(&statefulset(
            1,
            json!({"type": "OnDelete"}),
            json!({"replicas": 3, "observedGeneration": 1, "readyReplicas": 3}),
        )));
        assert!(
            m.contains("OnDelete") && m.contains("only available for RollingUpdate"),
            "{m}"
        );

        for status in [
            json!({"replicas": 3}),
            json!({"replicas": 3, "observedGeneration": 1}),
        ] {
            assert_eq!(
                progressing(statefulset_state(&statefulset(2, rolling.clone(), status))),
                "Waiting for statefulset spec update to be observed..."
            );
        }
        assert_eq!(
            progressing(statefulset_state(&statefulset(
                2,
                rolling.clone(),
                json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 2, "updatedReplicas": 3}),
            ))),
            "Waiting for 1 pods to be ready..."
        );
        assert_eq!(
            progressing(statefulset_state(&statefulset(
                2,
                rolling.clone(),
                json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 1}),
            ))),
            "Waiting for partitioned roll out to finish: 1 out of 3 new pods have been updated..."
        );
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 1}});
        assert_eq!(
            progressing(statefulset_state(&statefulset(
                2,
                partitioned.clone(),
                json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 1}),
            ))),
            "Waiting for partitioned roll out to finish: 1 out of 2 new pods have been updated..."
        );
        // With rollingUpdate set, kubectl is done once enough pods are updated (revisions
        // are not compared; our ready-pod check covers the rest).
        assert_eq!(
            statefulset_state(&statefulset(
                2,
                partitioned,
                json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 2,
                       "currentRevision": "db-1", "updateRevision": "db-2"}),
            )),
            RolloutState::Complete
        );
        // Without rollingUpdate (and with the type left to its default) the revisions decide.
        for strategy in [json!({"type": "RollingUpdate"}), json!({})] {
            assert_eq!(
                progressing(statefulset_state(&statefulset(
                    2,
                    strategy.clone(),
                    json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 2,
                           "currentRevision": "db-1", "updateRevision": "db-2"}),
                ))),
                "waiting for statefulset rolling update to complete 2 pods at revision db-2..."
            );
            assert_eq!(
                statefulset_state(&statefulset(
                    2,
                    strategy,
                    json!({"replicas": 3, "observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3,
                           "currentRevision": "db-2", "updateRevision": "db-2"}),
                )),
                RolloutState::Complete
            );
        }
    }

    fn daemonset(
        generation: i64,
        strategy: serde_json::Value,
        status: serde_json::Value,
    ) -> DaemonSet {
        from(json!({
            "metadata": {"name": "agent", "namespace": "ns", "generation": generation},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": []}},
                "updateStrategy": strategy
            },
            "status": status
        }))
    }

    #[test]
    fn daemonset_rules_follow_kubectl() {
        let rolling = json!({"type": "RollingUpdate"});
        let base = |updated: i32, available: i32, observed: i64| {
            json!({"currentNumberScheduled": 4, "desiredNumberScheduled": 4, "numberMisscheduled": 0,
                   "numberReady": available, "numberAvailable": available,
                   "updatedNumberScheduled": updated, "observedGeneration": observed})
        };
        let m = failed(daemonset_state(&daemonset(
            1,
            json!({"type": "OnDelete"}),
            base(4, 4, 1),
        )));
        assert!(m.contains("daemon set \"agent\" uses the OnDelete"), "{m}");
        assert_eq!(
            progressing(daemonset_state(&daemonset(
                2,
                rolling.clone(),
                base(4, 4, 1)
            ))),
            "Waiting for daemon set spec update to be observed..."
        );
        assert_eq!(
            progressing(daemonset_state(&daemonset(2, rolling.clone(), base(1, 4, 2)))),
            "Waiting for daemon set \"agent\" rollout to finish: 1 out of 4 new pods have been updated..."
        );
        assert_eq!(
            progressing(daemonset_state(&daemonset(2, rolling.clone(), base(4, 3, 2)))),
            "Waiting for daemon set \"agent\" rollout to finish: 3 of 4 updated pods are available..."
        );
        assert_eq!(
            daemonset_state(&daemonset(2, rolling, base(4, 4, 2))),
            RolloutState::Complete
        );
        assert_eq!(
            daemonset_state(&daemonset(2, json!({}), base(4, 4, 2))),
            RolloutState::Complete
        );
    }

    #[test]
    fn workload_accessors_read_template_and_partition() {
        let mut s = statefulset(
            1,
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}),
            json!({"replicas": 3}),
        );
        let tm = s.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
        tm.annotations = Some([(ROTATION_ANNOTATION.to_string(), "r7".to_string())].into());
        let w = Workload::StatefulSet(s);
        assert_eq!(w.rotation_id(), Some("r7"));
        assert_eq!(w.partition(), Some(2));
        assert_eq!(
            w.selector()
                .and_then(|s| s.match_labels)
                .map(|m| m["app"].clone()),
            Some("db".to_string())
        );
        let d = Workload::Deployment(deployment(1, json!({}), json!({})));
        assert_eq!(d.rotation_id(), None);
        assert_eq!(d.partition(), None);
    }

    fn rollout(
        generation: i64,
        spec: serde_json::Value,
        status: serde_json::Value,
    ) -> DynamicObject {
        let mut spec_full = json!({
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}},
            "strategy": {"canary": {}},
            "restartAt": "2026-01-01T00:00:10Z"
        });
        for (k, v) in spec.as_object().expect("object") {
            spec_full[k] = v.clone();
        }
        from(json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "ns", "generation": generation,
                         "annotations": {ROTATION_ANNOTATION: "r2", RESTART_AT_ANNOTATION: "2026-01-01T00:00:10Z",
                                         PREVIOUS_ROTATION_ANNOTATION: "r1", PREVIOUS_RESTART_AT_ANNOTATION: "2026-01-01T00:00:05Z"}},
            "spec": spec_full,
            "status": status
        }))
    }

    fn healthy(extra: serde_json::Value) -> serde_json::Value {
        let mut st = json!({"observedGeneration": "2", "phase": "Healthy", "message": "",
                            "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3,
                            "restartedAt": "2026-01-01T00:00:10Z", "currentPodHash": "abc", "stableRS": "abc"});
        for (k, v) in extra.as_object().expect("object") {
            st[k] = v.clone();
        }
        st
    }

    #[test]
    fn rollout_rules_follow_argo() {
        assert_eq!(
            argo_rollout_state(&rollout(2, json!({}), healthy(json!({})))),
            RolloutState::Complete
        );
        // observedGeneration may also be a number (older controllers).
        assert_eq!(
            argo_rollout_state(&rollout(
                2,
                json!({}),
                healthy(json!({"observedGeneration": 2}))
            )),
            RolloutState::Complete
        );
        // Negative control: a Healthy phase the controller computed for an older generation
        // (the restart patch not yet seen) is no completion.
        for stale in [
            json!("1"),
            json!(1),
            json!("not-a-number"),
            serde_json::Value::Null,
        ] {
            let mut st = healthy(json!({}));
            st["observedGeneration"] = stale.clone();
            assert_eq!(
                progressing(argo_rollout_state(&rollout(2, json!({}), st))),
                "waiting for rollout spec update to be observed",
                "{stale}"
            );
        }
        // The restart not yet done (status.restartedAt behind spec.restartAt) waits even when
        // the phase still says Healthy.
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"restartedAt": "2026-01-01T00:00:05Z"})),
        )));
        assert!(m.contains("restarting"), "{m}");
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"phase": "Progressing", "message": "more replicas need to be updated"})),
        )));
        assert!(m.contains("Progressing: more replicas"), "{m}");
        // Counts short of spec.replicas wait, whatever the phase says.
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"availableReplicas": 2})),
        )));
        assert!(m.contains("2 of 3 replicas available"), "{m}");
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"updatedReplicas": 1})),
        )));
        assert!(m.contains("1 of 3 replicas updated"), "{m}");
        // Degraded, an abort, InvalidSpec and a progress deadline fail at once.
        let m = failed(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"phase": "Degraded", "message": "ProgressDeadlineExceeded: timed out"})),
        )));
        assert!(m.contains("Degraded") && m.contains("timed out"), "{m}");
        let m = failed(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"abort": true, "phase": "Degraded", "message": "RolloutAborted: x"})),
        )));
        assert!(m.contains("aborted"), "{m}");
        for (type_, reason) in [
            ("InvalidSpec", "InvalidSpec"),
            ("Progressing", "RolloutAborted"),
            ("Progressing", "ProgressDeadlineExceeded"),
        ] {
            let st = healthy(
                json!({"phase": "", "conditions": [{"type": type_, "status": "False", "reason": reason, "message": "m"}]}),
            );
            let m = failed(argo_rollout_state(&rollout(2, json!({}), st)));
            assert!(m.contains(reason), "{m}");
        }
        // Paused (by hand or at a canary pause step) and unpausing wait.
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({"paused": true}),
            healthy(json!({"phase": "Paused", "message": "manually paused"})),
        )));
        assert!(m.contains("paused"), "{m}");
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(
                json!({"pauseConditions": [{"reason": "CanaryPauseStep"}], "controllerPause": true}),
            ),
        )));
        assert!(m.contains("paused"), "{m}");
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"controllerPause": true})),
        )));
        assert_eq!(m, "waiting for rollout to unpause");
        // A basic canary with old replicas left waits for them to go.
        let m = progressing(argo_rollout_state(&rollout(
            2,
            json!({}),
            healthy(json!({"replicas": 4})),
        )));
        assert!(m.contains("old replicas"), "{m}");
        // replicas defaults to 1.
        let mut r = rollout(
            2,
            json!({}),
            healthy(json!({"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1})),
        );
        r.data["spec"].as_object_mut().unwrap().remove("replicas");
        assert_eq!(argo_rollout_state(&r), RolloutState::Complete);
    }

    #[test]
    fn rollout_paused_reads_spec_and_pause_conditions() {
        assert!(!rollout_paused(&rollout(1, json!({}), healthy(json!({})))));
        assert!(rollout_paused(&rollout(
            1,
            json!({"paused": true}),
            healthy(json!({}))
        )));
        assert!(rollout_paused(&rollout(
            1,
            json!({}),
            healthy(json!({"pauseConditions": [{"reason": "CanaryPauseStep"}]}))
        )));
        assert!(!rollout_paused(&rollout(
            1,
            json!({"paused": false}),
            healthy(json!({"pauseConditions": []}))
        )));
    }

    #[test]
    fn restart_patch_rounds_up_and_keeps_the_previous_restart() {
        let ro = rollout(2, json!({}), healthy(json!({})));
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:01:00.250Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let p = restart_patch(&ro, "r3", now);
        assert_eq!(p["spec"]["restartAt"], "2026-01-01T00:01:01Z");
        // Within the second of the last restart (or before it, a skewed clock): one second
        // after it, never the same restartAt (Argo would take that as done).
        for early in ["2026-01-01T00:00:09.500Z", "2026-01-01T00:00:03Z"] {
            let t = chrono::DateTime::parse_from_rfc3339(early)
                .unwrap()
                .with_timezone(&chrono::Utc);
            assert_eq!(
                restart_patch(&ro, "r3", t)["spec"]["restartAt"],
                "2026-01-01T00:00:11Z"
            );
        }
        let a = &p["metadata"]["annotations"];
        assert_eq!(a[ROTATION_ANNOTATION], "r3");
        assert_eq!(a[RESTART_AT_ANNOTATION], "2026-01-01T00:01:01Z");
        assert_eq!(a[PREVIOUS_ROTATION_ANNOTATION], "r2");
        assert_eq!(a[PREVIOUS_RESTART_AT_ANNOTATION], "2026-01-01T00:00:10Z");
        // Nothing to keep on a first restart: the previous pair is cleared (merge-patch null).
        let mut fresh = ro.clone();
        fresh.metadata.annotations = None;
        let p = restart_patch(&fresh, "r1", now);
        assert!(p["metadata"]["annotations"][PREVIOUS_ROTATION_ANNOTATION].is_null());
        assert!(p["metadata"]["annotations"][PREVIOUS_RESTART_AT_ANNOTATION].is_null());
    }

    #[test]
    fn restart_windows_tell_which_pods_a_restart_made() {
        let pod = |created: &str| -> Pod {
            from(json!({"metadata": {"name": "p", "creationTimestamp": created}}))
        };
        let (before, between, after) = (
            pod("2026-01-01T00:00:01Z"),
            pod("2026-01-01T00:00:07Z"),
            pod("2026-01-01T00:00:10Z"),
        );
        let ro = rollout(2, json!({}), healthy(json!({})));
        let w = restart_window(&ro, "r2");
        assert!(!w.holds(&before) && !w.holds(&between) && w.holds(&after));
        let w = restart_window(&ro, "r1");
        assert!(!w.holds(&before) && w.holds(&between) && !w.holds(&after));
        // An older id: nothing once the current restart is done...
        assert!(!restart_window(&ro, "r0").holds(&before));
        // ...and every older pod while it is not (the safe side).
        let unfinished = rollout(
            2,
            json!({}),
            healthy(json!({"restartedAt": "2026-01-01T00:00:05Z"})),
        );
        let w = restart_window(&unfinished, "r0");
        assert!(w.holds(&before) && w.holds(&between) && !w.holds(&after));
        // Argo's rule: a pod created at restartAt is new.
        assert!(created_at_or_after(
            &after,
            parse_time("2026-01-01T00:00:10Z").unwrap()
        ));
        assert!(!created_at_or_after(
            &between,
            parse_time("2026-01-01T00:00:10Z").unwrap()
        ));
    }

    #[test]
    fn ready_means_condition_true_and_not_terminating() {
        let pod = |ready: &str, deleting: bool| -> Pod {
            let mut meta = json!({"name": "p"});
            if deleting {
                meta["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
            }
            from(
                json!({"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": ready}]}}),
            )
        };
        assert!(pod_is_ready(&pod("True", false)));
        assert!(!pod_is_ready(&pod("False", false)));
        assert!(!pod_is_ready(&pod("True", true)));
        assert!(!pod_is_ready(&from(json!({"metadata": {"name": "p"}}))));
    }

    fn api_error(code: u16, reason: &str, retry_after: u32) -> kube::Error {
        let status: kube::core::Status = from(json!({
            "status": "Failure", "code": code, "reason": reason, "message": "boom",
            "details": {"retryAfterSeconds": retry_after}
        }));
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn errors_map_to_backend_errors_and_verdicts() {
        let e = api_error(404, "NotFound", 0);
        assert!(
            matches!(error_of(&e, "workload.get", "Deployment ns/web"), BackendError::NotFound { ref what, .. } if what == "Deployment ns/web")
        );
        assert_eq!(
            classify(&e),
            Verdict::new(StatusClass::ClientError, Retry::No)
        );

        let e = api_error(409, "Conflict", 0);
        assert!(matches!(
            error_of(&e, "workload.patch", "x"),
            BackendError::Conflict { .. }
        ));
        assert_eq!(classify(&e).retry, Retry::Yes);

        let e = api_error(429, "TooManyRequests", 3);
        assert_eq!(
            classify(&e),
            Verdict::new(
                StatusClass::RateLimited,
                Retry::After(Duration::from_secs(3))
            )
        );
        assert!(matches!(
            error_of(&e, "pods.list", "x"),
            BackendError::Failed {
                transient: true,
                ..
            }
        ));

        let e = api_error(500, "InternalError", 0);
        assert_eq!(
            classify(&e),
            Verdict::new(StatusClass::ServerError, Retry::Yes)
        );
        let msg = error_of(&e, "pods.list", "x").to_string();
        assert!(
            msg.contains("pods.list x: HTTP 500 InternalError: boom"),
            "{msg}"
        );

        let e = api_error(403, "Forbidden", 0);
        assert_eq!(classify(&e).retry, Retry::No);
        assert!(matches!(
            error_of(&e, "secret.get", "x"),
            BackendError::Failed {
                transient: false,
                ..
            }
        ));

        let bad_json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert_eq!(
            classify(&kube::Error::SerdeError(bad_json)).retry,
            Retry::No
        );
        assert_eq!(
            KubeFail::Timeout(Duration::from_secs(1)).verdict(),
            Verdict::new(StatusClass::Transport, Retry::Yes)
        );
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }
}
