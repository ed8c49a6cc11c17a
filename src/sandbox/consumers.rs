//! Simulated consumer pods: how zero downtime is measured.
//!
//! A Deployment registered as a consumer behaves like an application that reads its OpenAI
//! key once at pod start (from Vault or from a mounted Secret) and then calls the OpenAI data
//! plane until the pod terminates. A pod becomes Ready only once it holds a key (a readiness
//! gate on the Kubernetes simulator), exactly like an app whose readiness probe checks its
//! configuration. Every call is counted; a rotation that kills a key still in use shows up as
//! failed calls.

use super::kube::{KubeSim, PodEvent};
use crate::secret::Secret;
use crate::sync::LockExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Where a consumer pod reads its key at start.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A KV v2 read (`GET /v1/{mount}/data/{path}`), as an app with a Vault agent would.
    Vault {
        addr: String,
        token: Secret,
        mount: String,
        path: String,
        field: String,
    },
    /// A Secret in the pod's namespace, as if mounted as a file or env var.
    Secret { name: String, key: String },
}

#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub source: KeySource,
    /// OpenAI base URL ending in `/v1`.
    pub openai_base_url: String,
    /// Pause between calls of one pod.
    pub interval: Duration,
}

/// Counters of one consumer Deployment (or of all, from [`Consumers::total`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    pub ok: u64,
    pub failed: u64,
    pub pods_started: u64,
    /// The last failure, as "pod: status or error" (never a key value).
    pub last_failure: Option<String>,
    /// Failed calls per pod name.
    pub failures_by_pod: std::collections::BTreeMap<String, u64>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    pods_started: AtomicU64,
    last_failure: Mutex<Option<String>>,
    failures_by_pod: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            pods_started: self.pods_started.load(Ordering::Relaxed),
            last_failure: self.last_failure.locked().clone(),
            failures_by_pod: self.failures_by_pod.locked().clone(),
        }
    }
}

type WorkloadKey = (String, String);

struct Registered {
    spec: ConsumerSpec,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct State {
    workloads: HashMap<WorkloadKey, Registered>,
    /// Running pods: (namespace, pod) → its stop token.
    pods: HashMap<WorkloadKey, CancellationToken>,
}

/// HTTP requests all consumer pods may have in flight at once: thousands of pods starting
/// together would otherwise open a connection each and run out of file descriptors.
const MAX_IN_FLIGHT: usize = 64;

/// The consumer runtime, driven by the Kubernetes simulator's pod events.
#[derive(Clone)]
pub struct Consumers {
    kube: KubeSim,
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
    in_flight: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Consumers {
    /// Start following `kube`'s pod events; stops (with every pod loop) on `cancel`.
    pub fn start(kube: &KubeSim, cancel: CancellationToken) -> Consumers {
        let consumers = Consumers {
            kube: kube.clone(),
            state: Arc::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("reqwest client"),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            cancel,
        };
        let mut events = kube.pod_events();
        let this = consumers.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = this.cancel.cancelled() => break,
                    ev = events.recv() => match ev {
                        Ok(ev) => this.on_event(ev),
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "consumer runtime lagged behind pod events; resyncing");
                            this.resync();
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            }
        });
        consumers
    }

    /// Make the pods of workload `deployment` (a Deployment, StatefulSet or DaemonSet of that
    /// name) consumers. Register before its pods start: running pods are not retrofitted.
    pub fn add(&self, namespace: &str, deployment: &str, spec: ConsumerSpec) {
        self.kube.set_readiness_gate(namespace, deployment, true);
        self.state.locked().workloads.insert(
            (namespace.to_string(), deployment.to_string()),
            Registered {
                spec,
                counters: Arc::default(),
            },
        );
    }

    pub fn stats(&self, namespace: &str, deployment: &str) -> ConsumerStats {
        self.state
            .locked()
            .workloads
            .get(&(namespace.to_string(), deployment.to_string()))
            .map(|r| r.counters.snapshot())
            .unwrap_or_default()
    }

    /// Sum over every consumer workload.
    pub fn total(&self) -> ConsumerStats {
        let state = self.state.locked();
        let mut total = ConsumerStats::default();
        for r in state.workloads.values() {
            let s = r.counters.snapshot();
            total.ok += s.ok;
            total.failed += s.failed;
            total.pods_started += s.pods_started;
            if s.last_failure.is_some() {
                total.last_failure = s.last_failure;
            }
            total.failures_by_pod.extend(s.failures_by_pod);
        }
        total
    }

    /// Pods currently running a consumer loop.
    pub fn running_pods(&self) -> usize {
        self.state.locked().pods.len()
    }

    fn on_event(&self, ev: PodEvent) {
        match ev {
            PodEvent::Started {
                namespace,
                pod,
                workload: Some((_kind, name)),
                ..
            } => self.start_pod(namespace, pod, &name),
            PodEvent::Terminated { namespace, pod, .. } => self.stop_pod(namespace, pod),
            PodEvent::Started { .. } => {}
        }
    }

    /// Run a consumer loop for `pod` if its workload is a consumer and it has none yet.
    fn start_pod(&self, namespace: String, pod: String, workload: &str) {
        let mut state = self.state.locked();
        let key = (namespace.clone(), pod.clone());
        if state.pods.contains_key(&key) {
            return;
        }
        let Some(reg) = state
            .workloads
            .get(&(namespace.clone(), workload.to_string()))
        else {
            return;
        };
        let spec = reg.spec.clone();
        let counters = reg.counters.clone();
        let stop = self.cancel.child_token();
        state.pods.insert(key, stop.clone());
        drop(state);
        counters.pods_started.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(self.clone().run_pod(namespace, pod, spec, counters, stop));
    }

    fn stop_pod(&self, namespace: String, pod: String) {
        if let Some(stop) = self.state.locked().pods.remove(&(namespace, pod)) {
            stop.cancel();
        }
    }

    /// After missing pod events: rebuild the running set from the pods that exist now.
    fn resync(&self) {
        let namespaces: std::collections::BTreeSet<String> = {
            let state = self.state.locked();
            state.workloads.keys().map(|(ns, _)| ns.clone()).collect()
        };
        let mut live = std::collections::HashSet::new();
        for ns in namespaces {
            for p in self.kube.pod_owners(&ns) {
                match p.workload {
                    Some((_, workload)) if !p.terminating => {
                        live.insert((ns.clone(), p.name.clone()));
                        self.start_pod(ns.clone(), p.name, &workload);
                    }
                    _ => {}
                }
            }
        }
        let gone: Vec<WorkloadKey> = {
            let state = self.state.locked();
            state
                .pods
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect()
        };
        for (ns, pod) in gone {
            self.stop_pod(ns, pod);
        }
    }

    async fn run_pod(
        self,
        namespace: String,
        pod: String,
        spec: ConsumerSpec,
        counters: Arc<Counters>,
        stop: CancellationToken,
    ) {
        // Read the key once, as an app does at start; not Ready until it has one.
        let key = loop {
            match self.read_key(&namespace, &spec.source).await {
                Ok(k) => break k,
                Err(e) => {
                    tracing::debug!(%namespace, %pod, error = %e, "consumer waiting for its key");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        };
        self.kube.open_readiness_gate(&namespace, &pod);
        // A chat completion, as a real workload makes: the Usage API counts it, so drains
        // and new-key adoption see real traffic (`/models` is not usage).
        let url = format!(
            "{}/chat/completions",
            spec.openai_base_url.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "ping"}],
        });
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = async {
                    let _permit = self.in_flight.acquire().await;
                    self.http.post(&url).bearer_auth(key.expose()).json(&body).send().await
                } => r,
            };
            match outcome {
                Ok(resp) if resp.status().is_success() => {
                    counters.ok.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    let why = match other {
                        Ok(resp) => format!("HTTP {}", resp.status()),
                        Err(e) => format!("request error: {}", without_url(&e)),
                    };
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%namespace, %pod, failure = %why, "consumer call failed");
                    *counters.last_failure.locked() = Some(format!("{pod}: {why}"));
                    *counters
                        .failures_by_pod
                        .locked()
                        .entry(pod.clone())
                        .or_default() += 1;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(spec.interval) => {}
            }
        }
    }

    async fn read_key(&self, namespace: &str, source: &KeySource) -> Result<Secret, String> {
        match source {
            KeySource::Vault {
                addr,
                token,
                mount,
                path,
                field,
            } => {
                let url = format!(
                    "{}/v1/{}/data/{}",
                    addr.trim_end_matches('/'),
                    mount.trim_matches('/'),
                    path.trim_matches('/')
                );
                let _permit = self.in_flight.acquire().await;
                let resp = self
                    .http
                    .get(&url)
                    .header("X-Vault-Token", token.expose())
                    .send()
                    .await
                    .map_err(|e| without_url(&e))?;
                if !resp.status().is_success() {
                    return Err(format!("vault read: HTTP {}", resp.status()));
                }
                let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
                body.pointer(&format!("/data/data/{field}"))
                    .and_then(|v| v.as_str())
                    .map(Secret::new)
                    .ok_or_else(|| format!("vault read: no string field {field:?}"))
            }
            KeySource::Secret { name, key } => {
                let secret = self
                    .kube
                    .secret(namespace, name)
                    .ok_or_else(|| format!("secret {namespace}/{name} not found"))?;
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .ok_or_else(|| format!("secret {namespace}/{name} has no key {key:?}"))?;
                String::from_utf8(bytes.0.clone())
                    .map(Secret::new)
                    .map_err(|_| format!("secret {namespace}/{name} key {key:?} is not UTF-8"))
            }
        }
    }
}

/// reqwest errors print the URL; ours carry no secrets, but keep messages short.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}
