//! [`WorkloadRoller::consumers_of`](crate::rotation::ports::WorkloadRoller::consumers_of)
//! for Kubernetes: what in the cluster reads a Vault path, whether or not a target lists it.
//!
//! Three sources, each listed across all namespaces:
//! - pods whose Vault Agent injector annotations name the path
//!   (`vault.hashicorp.com/agent-inject: "true"` and
//!   `vault.hashicorp.com/agent-inject-secret-<name>: <mount>/data/<path>`, or
//!   `<mount>/<path>`);
//! - Vault Secrets Operator `VaultStaticSecret`s (`secrets.hashicorp.com/v1beta1`) with that
//!   `spec.mount` and `spec.path`;
//! - External Secrets Operator `ExternalSecret`s (`external-secrets.io/v1beta1`) whose
//!   `spec.data[].remoteRef.key` or `spec.dataFrom[].extract.key` names the path (with or
//!   without the mount prefix).
//!
//! For the operators, the Secret each writes is reported too, and so is every pod that
//! mounts it (`volumes[].secret`, projected volumes) or reads it (`envFrom[].secretRef`,
//! `env[].valueFrom.secretKeyRef`). Pods resolve to their workload (Pod → ReplicaSet →
//! Deployment or Rollout; StatefulSet; DaemonSet); a pod without one is reported itself.
//!
//! A kind that is not installed (404: no VSO or ESO in the cluster) is skipped with a
//! warning (once per kind for the roller's life): nothing of it can read the key. A kind the
//! roller may not read (403) is an error: the answer would be incomplete, and "not checked"
//! must not pass for "none found" (the caller's policy decides: `warn` rotates anyway,
//! `refuse` and `include` stop). A 5xx, 429 or timeout (after the bounded retries) is a
//! transient error.

use super::{KubeFail, KubeRoller, K8S};
use crate::config::{WorkloadKind, WorkloadRef};
use crate::retry::{Call, Retry, Verdict};
use crate::rotation::ports::{BackendError, Consumer, StatusClass};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

/// Vault Agent injector: the pod opts in with this set to `"true"`.
pub const AGENT_INJECT: &str = "vault.hashicorp.com/agent-inject";
/// Vault Agent injector: `<prefix><file name>: <secret path>`.
pub const AGENT_INJECT_SECRET_PREFIX: &str = "vault.hashicorp.com/agent-inject-secret-";

/// Page size of the cluster-wide lists.
const PAGE: u32 = 500;

/// Vault Secrets Operator's `VaultStaticSecret`.
pub fn vault_static_secret_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("secrets.hashicorp.com", "v1beta1", "VaultStaticSecret"),
        "vaultstaticsecrets",
    )
}

/// External Secrets Operator's `ExternalSecret`.
pub fn external_secret_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1beta1", "ExternalSecret"),
        "externalsecrets",
    )
}

/// `a//b/` → `a/b`: Vault paths compare without empty segments.
pub fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether an injector annotation's value names `mount`/`path` (KV v2):
/// `<mount>/data/<path>` (the API path the agent reads) or `<mount>/<path>`.
pub fn agent_path_matches(value: &str, mount: &str, path: &str) -> bool {
    let (mount, path) = (normalize(mount), normalize(path));
    if mount.is_empty() || path.is_empty() {
        return false;
    }
    let v = normalize(value);
    v == format!("{mount}/data/{path}") || v == format!("{mount}/{path}")
}

/// Whether an ExternalSecret key (Vault provider: the path under the store's mount, or
/// the path with the mount in front) names `mount`/`path`.
pub fn eso_key_matches(key: &str, mount: &str, path: &str) -> bool {
    let (mount, path) = (normalize(mount), normalize(path));
    if path.is_empty() {
        return false;
    }
    let k = normalize(key);
    k == path
        || (!mount.is_empty()
            && (k == format!("{mount}/{path}") || k == format!("{mount}/data/{path}")))
}

/// Whether a VaultStaticSecret's `spec.mount` and `spec.path` name `mount`/`path` (VSO
/// keeps them apart; a path that repeats the mount is accepted too).
pub fn vso_matches(spec_mount: &str, spec_path: &str, mount: &str, path: &str) -> bool {
    let (mount, path) = (normalize(mount), normalize(path));
    if path.is_empty() {
        return false;
    }
    let (m, p) = (normalize(spec_mount), normalize(spec_path));
    (m == mount && (p == path || p == format!("{mount}/{path}")))
        || (m.is_empty() && !mount.is_empty() && p == format!("{mount}/{path}"))
}

/// The injector annotations of a pod (template) that name the path: the annotation keys.
pub fn agent_annotations_naming(meta: &ObjectMeta, mount: &str, path: &str) -> Vec<String> {
    let Some(ann) = meta.annotations.as_ref() else {
        return Vec::new();
    };
    if ann.get(AGENT_INJECT).map(|v| v.trim()) != Some("true") {
        return Vec::new();
    }
    ann.iter()
        .filter(|(k, v)| {
            k.strip_prefix(AGENT_INJECT_SECRET_PREFIX)
                .is_some_and(|name| !name.is_empty())
                && agent_path_matches(v, mount, path)
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// How an ExternalSecret reads the path: `spec.data[i].remoteRef.key` (only when its
/// `property`, if any, is `field`: another property is another value of the secret) and
/// `spec.dataFrom[i].extract.key` (every property).
pub fn external_secret_reads(es: &Value, mount: &str, path: &str, field: &str) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &es["spec"];
    for (i, d) in spec["data"].as_array().into_iter().flatten().enumerate() {
        let r = &d["remoteRef"];
        let key_ok = r["key"]
            .as_str()
            .is_some_and(|k| eso_key_matches(k, mount, path));
        let prop_ok = match r["property"].as_str() {
            None | Some("") => true,
            Some(p) => field.is_empty() || p == field,
        };
        if key_ok && prop_ok {
            out.push(format!("spec.data[{i}].remoteRef.key"));
        }
    }
    for (i, d) in spec["dataFrom"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if d["extract"]["key"]
            .as_str()
            .is_some_and(|k| eso_key_matches(k, mount, path))
        {
            out.push(format!("spec.dataFrom[{i}].extract.key"));
        }
    }
    out
}

/// The Secret an ExternalSecret writes: `spec.target.name`, by default its own name.
pub fn external_secret_target(es: &DynamicObject) -> Option<String> {
    es.data["spec"]["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| es.metadata.name.clone())
}

/// How a pod spec uses Secret `secret`: each volume, `envFrom` and `env` reference.
pub fn pod_uses_secret(spec: &PodSpec, secret: &str) -> Vec<String> {
    let mut out = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if v.secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            .is_some_and(|n| n == secret)
        {
            out.push(format!("volume {} (Secret {secret})", v.name));
        }
        let projected = v
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|s| s.secret.as_ref())
            .any(|s| s.name == secret);
        if projected {
            out.push(format!("projected volume {} (Secret {secret})", v.name));
        }
    }
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    for c in containers {
        if c.env_from
            .iter()
            .flatten()
            .filter_map(|e| e.secret_ref.as_ref())
            .any(|r| r.name == secret)
        {
            out.push(format!("envFrom Secret {secret} (container {})", c.name));
        }
        if c.env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref())
            .filter_map(|v| v.secret_key_ref.as_ref())
            .any(|r| r.name == secret)
        {
            out.push(format!(
                "env secretKeyRef Secret {secret} (container {})",
                c.name
            ));
        }
    }
    out
}

/// Collected consumers, deduplicated by (kind, namespace, name), the ways joined.
#[derive(Default)]
struct Found(BTreeMap<ConsumerKey, (BTreeSet<String>, Option<WorkloadRef>)>);

/// (kind, namespace, name).
type ConsumerKey = (String, String, String);

impl Found {
    fn add(&mut self, kind: &str, ns: &str, name: &str, via: String, w: Option<WorkloadRef>) {
        let e = self
            .0
            .entry((kind.to_string(), ns.to_string(), name.to_string()))
            .or_insert_with(|| (BTreeSet::new(), None));
        e.0.insert(via);
        if e.1.is_none() {
            e.1 = w;
        }
    }

    fn into_vec(self) -> Vec<Consumer> {
        let mut out: Vec<Consumer> = self
            .0
            .into_iter()
            .map(|((kind, namespace, name), (vias, workload))| Consumer {
                kind,
                namespace,
                name,
                via: vias.into_iter().collect::<Vec<_>>().join("; "),
                workload,
            })
            .collect();
        out.sort();
        out
    }
}

fn controller_of(meta: &ObjectMeta) -> Option<(&str, &str)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.name.as_str()))
}

fn workload(ns: &str, kind: WorkloadKind, name: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: ns.to_string(),
        kind,
        name: name.to_string(),
    }
}

impl KubeRoller {
    /// See the module documentation.
    pub(super) async fn find_consumers(
        &self,
        mount: &str,
        path: &str,
        field: &str,
    ) -> Result<Vec<Consumer>, BackendError> {
        let what = format!("consumers of {}/{}", normalize(mount), normalize(path));
        let pods: Option<Vec<Pod>> = self
            .list_all(
                "consumers.pods.list",
                "pods",
                &what,
                &Api::all(self.client.clone()),
            )
            .await?;
        let vss_api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &vault_static_secret_resource());
        let vss = self
            .list_all(
                "consumers.vaultstaticsecrets.list",
                "vaultstaticsecrets.secrets.hashicorp.com",
                &what,
                &vss_api,
            )
            .await?;
        let es_api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &external_secret_resource());
        let es = self
            .list_all(
                "consumers.externalsecrets.list",
                "externalsecrets.external-secrets.io",
                &what,
                &es_api,
            )
            .await?;

        let mut found = Found::default();
        // (namespace, Secret) → what writes it, e.g. "ExternalSecret chat".
        let mut written: BTreeMap<(String, String), String> = BTreeMap::new();
        for o in vss.iter().flatten() {
            let spec = &o.data["spec"];
            let (m, p) = (
                spec["mount"].as_str().unwrap_or(""),
                spec["path"].as_str().unwrap_or(""),
            );
            if !vso_matches(m, p, mount, path) {
                continue;
            }
            let (ns, name) = (ns_of(&o.metadata), name_of(&o.metadata));
            found.add(
                "VaultStaticSecret",
                ns,
                name,
                "spec.mount + spec.path".into(),
                None,
            );
            if let Some(dest) = spec["destination"]["name"]
                .as_str()
                .filter(|d| !d.is_empty())
            {
                written.insert(
                    (ns.to_string(), dest.to_string()),
                    format!("VaultStaticSecret {name}"),
                );
            }
        }
        for o in es.iter().flatten() {
            let reads = external_secret_reads(&o.data, mount, path, field);
            if reads.is_empty() {
                continue;
            }
            let (ns, name) = (ns_of(&o.metadata), name_of(&o.metadata));
            found.add("ExternalSecret", ns, name, reads.join(", "), None);
            if let Some(target) = external_secret_target(o) {
                written.insert((ns.to_string(), target), format!("ExternalSecret {name}"));
            }
        }
        for ((ns, secret), by) in &written {
            found.add("Secret", ns, secret, format!("written by {by}"), None);
        }

        let mut owners: HashMap<(String, String), Option<WorkloadRef>> = HashMap::new();
        for pod in pods.iter().flatten() {
            let ns = ns_of(&pod.metadata);
            let mut vias = agent_annotations_naming(&pod.metadata, mount, path);
            if let Some(spec) = pod.spec.as_ref() {
                for ((sns, secret), by) in written.range((ns.to_string(), String::new())..) {
                    if sns != ns {
                        break;
                    }
                    vias.extend(
                        pod_uses_secret(spec, secret)
                            .into_iter()
                            .map(|v| format!("{v}, written by {by}")),
                    );
                }
            }
            if vias.is_empty() {
                continue;
            }
            let w = self.owner_of(pod, &mut owners).await?;
            for via in vias {
                match &w {
                    Some(w) => {
                        found.add(w.kind.as_str(), &w.namespace, &w.name, via, Some(w.clone()))
                    }
                    None => found.add("Pod", ns, name_of(&pod.metadata), via, None),
                }
            }
        }
        Ok(found.into_vec())
    }

    /// The workload a pod belongs to; `None` for a pod without a controller we know (or
    /// whose ReplicaSet is gone or unreadable: the pod is reported itself).
    async fn owner_of(
        &self,
        pod: &Pod,
        cache: &mut HashMap<(String, String), Option<WorkloadRef>>,
    ) -> Result<Option<WorkloadRef>, BackendError> {
        let ns = ns_of(&pod.metadata);
        let Some((kind, name)) = controller_of(&pod.metadata) else {
            return Ok(None);
        };
        Ok(match kind {
            "StatefulSet" => Some(workload(ns, WorkloadKind::StatefulSet, name)),
            "DaemonSet" => Some(workload(ns, WorkloadKind::DaemonSet, name)),
            "ReplicaSet" => {
                let key = (ns.to_string(), name.to_string());
                if let Some(w) = cache.get(&key) {
                    return Ok(w.clone());
                }
                let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
                let what = format!("ReplicaSet {ns}/{name}");
                let rs = self
                    .optional("consumers.replicasets.get", "replicasets", &what, || {
                        api.get(name)
                    })
                    .await?;
                let w = rs.and_then(|rs| match controller_of(&rs.metadata) {
                    Some(("Deployment", d)) => Some(workload(ns, WorkloadKind::Deployment, d)),
                    Some(("Rollout", r)) => Some(workload(ns, WorkloadKind::Rollout, r)),
                    _ => None,
                });
                cache.insert(key, w.clone());
                w
            }
            _ => None,
        })
    }

    /// Every object of a kind across all namespaces, page by page; `None` when the kind is
    /// not served (warned once per `source`).
    async fn list_all<K>(
        &self,
        op: &'static str,
        source: &'static str,
        what: &str,
        api: &Api<K>,
    ) -> Result<Option<Vec<K>>, BackendError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut params = ListParams::default().limit(PAGE);
            if let Some(t) = token.as_deref() {
                params = params.continue_token(t);
            }
            let page = self
                .optional(op, source, what, || api.list(&params))
                .await?;
            let Some(page) = page else {
                return Ok(None);
            };
            items.extend(page.items);
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(Some(items)),
            }
        }
    }

    /// One call on the observed path where 404 means "not installed" (`None`, warned once
    /// per `source`); other failures (403 included) as [`KubeRoller::call`] maps them.
    async fn optional<T, F, Fut>(
        &self,
        op: &'static str,
        source: &'static str,
        what: &str,
        f: F,
    ) -> Result<Option<T>, BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let r = Call::new(K8S, op, &self.retry, &*self.calls)
            .timeout(self.timeout)
            .what(what)
            .run(
                |e: &KubeFail| match e {
                    KubeFail::Api(kube::Error::Api(s)) if s.code == 404 => {
                        Verdict::new(StatusClass::Success, Retry::No)
                    }
                    _ => e.verdict(),
                },
                |_| {
                    let fut = f();
                    async move { fut.await.map_err(KubeFail::Api) }
                },
            )
            .await;
        match r {
            Ok(v) => Ok(Some(v)),
            Err(g) => match &g.error {
                KubeFail::Api(kube::Error::Api(s)) if s.code == 404 => {
                    let first = self
                        .unseen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(source);
                    if first {
                        tracing::warn!(
                            source,
                            "looking for unlisted consumers: {source} not served (CRD not installed?); skipping that kind"
                        );
                    }
                    Ok(None)
                }
                KubeFail::Api(kube::Error::Api(s)) if s.code == 403 => Err(BackendError::Failed {
                    backend: crate::rotation::ports::Backend::Kubernetes,
                    message: format!(
                        "looking for unlisted consumers: listing {source} is forbidden (grant list/get, e.g. the chart's discovery.enabled)"
                    ),
                    transient: false,
                }),
                _ => Err(self.backend_error(op, what, g)),
            },
        }
    }
}

fn ns_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("")
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agent_paths_match_kv2_api_path_and_plain_path() {
        assert!(agent_path_matches(
            "secret/data/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(agent_path_matches(
            "secret/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(agent_path_matches(
            "/secret//data/demo/chatbot/",
            "secret/",
            "/demo/chatbot"
        ));
        // Negative controls: another path, a prefix, another mount, the metadata API.
        assert!(!agent_path_matches(
            "secret/data/demo/other",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches(
            "secret/data/demo/chatbot/x",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches(
            "secret/data/demo",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches(
            "kv/data/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches(
            "secret/metadata/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches(
            "demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!agent_path_matches("secret/data/", "secret", ""));
    }

    #[test]
    fn eso_keys_match_with_or_without_the_mount() {
        assert!(eso_key_matches("demo/chatbot", "secret", "demo/chatbot"));
        assert!(eso_key_matches(
            "secret/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(eso_key_matches(
            "/secret/data/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!eso_key_matches("demo/chatbot2", "secret", "demo/chatbot"));
        assert!(!eso_key_matches(
            "kv/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!eso_key_matches("demo", "secret", "demo/chatbot"));
    }

    #[test]
    fn vso_matches_mount_and_path() {
        assert!(vso_matches(
            "secret",
            "demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(vso_matches(
            "secret/",
            "/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(vso_matches(
            "secret",
            "secret/demo/chatbot",
            "secret",
            "demo/chatbot"
        ));
        assert!(!vso_matches("kv", "demo/chatbot", "secret", "demo/chatbot"));
        assert!(!vso_matches(
            "secret",
            "demo/other",
            "secret",
            "demo/chatbot"
        ));
    }

    fn meta(ann: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(json!({"annotations": ann})).expect("meta")
    }

    #[test]
    fn injector_annotations_need_agent_inject_true() {
        let on = meta(json!({
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-inject-secret-openai": "secret/data/demo/chatbot",
            "vault.hashicorp.com/agent-inject-secret-db": "secret/data/demo/db",
            "vault.hashicorp.com/agent-inject-template-openai": "secret/data/demo/chatbot",
            "vault.hashicorp.com/agent-inject-secret-": "secret/data/demo/chatbot",
        }));
        assert_eq!(
            agent_annotations_naming(&on, "secret", "demo/chatbot"),
            ["vault.hashicorp.com/agent-inject-secret-openai"]
        );
        let off = meta(json!({
            "vault.hashicorp.com/agent-inject": "false",
            "vault.hashicorp.com/agent-inject-secret-openai": "secret/data/demo/chatbot",
        }));
        assert!(agent_annotations_naming(&off, "secret", "demo/chatbot").is_empty());
        let missing = meta(json!({
            "vault.hashicorp.com/agent-inject-secret-openai": "secret/data/demo/chatbot",
        }));
        assert!(agent_annotations_naming(&missing, "secret", "demo/chatbot").is_empty());
    }

    #[test]
    fn external_secrets_read_by_key_and_property() {
        let es = json!({"spec": {
            "data": [
                {"secretKey": "k", "remoteRef": {"key": "demo/chatbot", "property": "api_key"}},
                {"secretKey": "o", "remoteRef": {"key": "demo/chatbot", "property": "other"}},
                {"secretKey": "x", "remoteRef": {"key": "demo/unrelated"}},
                {"secretKey": "y", "remoteRef": {"key": "secret/demo/chatbot"}},
            ],
            "dataFrom": [{"extract": {"key": "demo/unrelated"}}, {"extract": {"key": "demo/chatbot"}}],
        }});
        assert_eq!(
            external_secret_reads(&es, "secret", "demo/chatbot", "api_key"),
            [
                "spec.data[0].remoteRef.key",
                "spec.data[3].remoteRef.key",
                "spec.dataFrom[1].extract.key"
            ]
        );
        let other = json!({"spec": {"data": [{"remoteRef": {"key": "demo/other"}}]}});
        assert!(external_secret_reads(&other, "secret", "demo/chatbot", "api_key").is_empty());
        assert!(external_secret_reads(&json!({}), "secret", "demo/chatbot", "api_key").is_empty());
    }

    #[test]
    fn external_secret_target_defaults_to_its_name() {
        let mut es = DynamicObject::new("chat", &external_secret_resource()).within("demo");
        assert_eq!(external_secret_target(&es).as_deref(), Some("chat"));
        es.data = json!({"spec": {"target": {"name": "chat-openai"}}});
        assert_eq!(external_secret_target(&es).as_deref(), Some("chat-openai"));
    }

    #[test]
    fn pod_secret_references_are_found() {
        let spec: PodSpec = serde_json::from_value(json!({
            "volumes": [
                {"name": "key", "secret": {"secretName": "chat-openai"}},
                {"name": "other", "secret": {"secretName": "unrelated"}},
                {"name": "proj", "projected": {"sources": [{"secret": {"name": "chat-openai"}}]}},
            ],
            "initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "chat-openai"}}]}],
            "containers": [{"name": "app", "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "chat-openai", "key": "api_key"}}}]}],
        }))
        .expect("spec");
        assert_eq!(
            pod_uses_secret(&spec, "chat-openai"),
            [
                "volume key (Secret chat-openai)",
                "projected volume proj (Secret chat-openai)",
                "envFrom Secret chat-openai (container init)",
                "env secretKeyRef Secret chat-openai (container app)",
            ]
        );
        assert!(pod_uses_secret(&spec, "nothing").is_empty());
    }

    #[test]
    fn found_dedupes_and_sorts() {
        let w = workload("demo", WorkloadKind::Deployment, "api");
        let mut f = Found::default();
        f.add("Deployment", "demo", "api", "b".into(), Some(w.clone()));
        f.add("Deployment", "demo", "api", "a".into(), Some(w.clone()));
        f.add("Deployment", "demo", "api", "a".into(), Some(w.clone()));
        f.add("ExternalSecret", "demo", "chat", "x".into(), None);
        let v = f.into_vec();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].kind, "Deployment");
        assert_eq!(v[0].via, "a; b");
        assert_eq!(v[0].workload, Some(w));
    }
}
