//! The resources the simulator serves and the discovery documents that describe them.
//!
//! kubectl resolves `deploy`, `po`, `deployments.apps` through these documents, so names,
//! kinds, scopes, verbs and short names match a real v1.33 API server.

use serde_json::{json, Value};

/// A resource kind the simulator stores. One entry per REST collection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    Namespace,
    Pod,
    Secret,
    Event,
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    ControllerRevision,
    Lease,
    EventV1,
    TokenReview,
    /// Argo Rollouts' `Rollout` (a CustomResourceDefinition on a real cluster).
    Rollout,
    /// Vault Secrets Operator's `VaultStaticSecret` (a CRD on a real cluster).
    VaultStaticSecret,
    /// External Secrets Operator's `ExternalSecret` (a CRD on a real cluster).
    ExternalSecret,
}

/// Static facts about a [`Res`]: where it lives in the API and what it supports.
#[derive(Debug)]
pub struct ResInfo {
    pub res: Res,
    /// API group; "" is the legacy core group served under `/api`.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub verbs: &'static [&'static str],
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `/status` subresource: writes to the main resource keep the old status.
    pub status_subresource: bool,
    /// `metadata.generation` is bumped whenever `spec` changes (workload controllers).
    pub tracks_generation: bool,
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub static RESOURCES: &[ResInfo] = &[
    ResInfo {
        res: Res::Namespace,
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        verbs: &[
            "create", "delete", "get", "list", "patch", "update", "watch",
        ],
        short_names: &["ns"],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::Pod,
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["po"],
        categories: &["all"],
        status_subresource: true,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::Secret,
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &[],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::Event,
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["ev"],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::Deployment,
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["deploy"],
        categories: &["all"],
        status_subresource: true,
        tracks_generation: true,
    },
    ResInfo {
        res: Res::ReplicaSet,
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["rs"],
        categories: &["all"],
        status_subresource: true,
        tracks_generation: true,
    },
    ResInfo {
        res: Res::StatefulSet,
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        singular: "statefulset",
        kind: "StatefulSet",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["sts"],
        categories: &["all"],
        status_subresource: true,
        tracks_generation: true,
    },
    ResInfo {
        res: Res::DaemonSet,
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["ds"],
        categories: &["all"],
        status_subresource: true,
        tracks_generation: true,
    },
    ResInfo {
        res: Res::ControllerRevision,
        group: "apps",
        version: "v1",
        plural: "controllerrevisions",
        singular: "controllerrevision",
        kind: "ControllerRevision",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &[],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::Lease,
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &[],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::EventV1,
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        verbs: ALL_VERBS,
        short_names: &["ev"],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    ResInfo {
        res: Res::TokenReview,
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenreviews",
        singular: "tokenreview",
        kind: "TokenReview",
        namespaced: false,
        verbs: &["create"],
        short_names: &[],
        categories: &[],
        status_subresource: false,
        tracks_generation: false,
    },
    // As the argo-rollouts CRD declares it (`kubectl get ro`, status subresource).
    ResInfo {
        res: Res::Rollout,
        group: "argoproj.io",
        version: "v1alpha1",
        plural: "rollouts",
        singular: "rollout",
        kind: "Rollout",
        namespaced: true,
        verbs: &[
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "create",
            "update",
            "watch",
        ],
        short_names: &["ro"],
        categories: &[],
        status_subresource: true,
        tracks_generation: true,
    },
    // As the vault-secrets-operator CRD declares it (status subresource, no short name).
    ResInfo {
        res: Res::VaultStaticSecret,
        group: "secrets.hashicorp.com",
        version: "v1beta1",
        plural: "vaultstaticsecrets",
        singular: "vaultstaticsecret",
        kind: "VaultStaticSecret",
        namespaced: true,
        verbs: CRD_VERBS,
        short_names: &[],
        categories: &[],
        status_subresource: true,
        tracks_generation: true,
    },
    // As the external-secrets CRD declares it (`kubectl get es`, category external-secrets).
    ResInfo {
        res: Res::ExternalSecret,
        group: "external-secrets.io",
        version: "v1beta1",
        plural: "externalsecrets",
        singular: "externalsecret",
        kind: "ExternalSecret",
        namespaced: true,
        verbs: CRD_VERBS,
        short_names: &["es"],
        categories: &["external-secrets"],
        status_subresource: true,
        tracks_generation: true,
    },
];

/// The verbs the API server serves for a custom resource, in its order.
const CRD_VERBS: &[&str] = &[
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "create",
    "update",
    "watch",
];

impl Res {
    pub fn info(self) -> &'static ResInfo {
        RESOURCES
            .iter()
            .find(|r| r.res == self)
            .expect("every Res has a table entry")
    }
}

impl ResInfo {
    /// `apps/v1` or `v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Has a `/scale` subresource (autoscaling/v1 `Scale`), as `kubectl scale` uses.
    /// A custom resource: no strategic merge patch (the API server answers 415).
    pub fn is_custom(&self) -> bool {
        matches!(
            self.res,
            Res::Rollout | Res::VaultStaticSecret | Res::ExternalSecret
        )
    }

    pub fn has_scale(&self) -> bool {
        matches!(
            self.res,
            Res::Deployment | Res::ReplicaSet | Res::StatefulSet
        )
    }

    /// `deployments.apps` or `pods`: how the API server names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Deployment.apps` or `Pod`: how `Invalid` messages name a kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

/// Find the resource served at `group/version/plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Which resources are served (a custom resource whose CRD is uninstalled is not).
pub type Served<'a> = &'a dyn Fn(Res) -> bool;

fn all_served(_: Res) -> bool {
    true
}

/// Groups served (each with its one version), in the order the real server lists them.
fn groups(served: Served<'_>) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| served(r.res)) {
        if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// `GET /version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0-okr-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `GET /api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ]
    })
}

fn api_group((name, version): (&str, &str)) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({
        "name": name,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

/// `GET /apis`.
pub fn api_group_list() -> Value {
    api_group_list_served(&all_served)
}

/// `GET /apis` with only the `served` resources.
pub fn api_group_list_served(served: Served<'_>) -> Value {
    let groups: Vec<Value> = groups(served).into_iter().map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`, or `None` for a group we do not serve.
pub fn api_group_doc(group: &str) -> Option<Value> {
    api_group_doc_served(group, &all_served)
}

/// `GET /apis/{group}` with only the `served` resources.
pub fn api_group_doc_served(group: &str, served: Served<'_>) -> Option<Value> {
    groups(served)
        .into_iter()
        .find(|(g, _)| *g == group)
        .map(|gv| {
            let mut g = api_group(gv);
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        })
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`, or `None` if not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    resource_list_served(group, version, &all_served)
}

/// `GET /api/v1` or `GET /apis/{group}/{version}` with only the `served` resources.
pub fn resource_list_served(group: &str, version: &str, served: Served<'_>) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && served(r.res))
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.has_scale() {
            resources.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIGroupList, APIResourceList};

    #[test]
    fn discovery_documents_parse_as_the_real_types() {
        let list: APIGroupList = serde_json::from_value(api_group_list()).unwrap();
        let names: Vec<_> = list.groups.iter().map(|g| g.name.as_str()).collect();
        assert!(names.contains(&"apps") && names.contains(&"events.k8s.io"));
        let apps: APIResourceList =
            serde_json::from_value(resource_list("apps", "v1").unwrap()).unwrap();
        let deploy = apps
            .resources
            .iter()
            .find(|r| r.name == "deployments")
            .unwrap();
        assert_eq!(deploy.kind, "Deployment");
        assert!(deploy.namespaced);
        assert_eq!(
            deploy.short_names.as_deref(),
            Some(&["deploy".to_string()][..])
        );
        assert!(apps
            .resources
            .iter()
            .any(|r| r.name == "deployments/status"));
        let core: APIResourceList =
            serde_json::from_value(resource_list("", "v1").unwrap()).unwrap();
        assert_eq!(core.group_version, "v1");
        assert!(core
            .resources
            .iter()
            .any(|r| r.name == "pods" && r.short_names.as_deref() == Some(&["po".into()][..])));
        assert!(resource_list("batch", "v1").is_none());
    }

    #[test]
    fn apps_serves_statefulsets_daemonsets_and_their_history() {
        let apps: APIResourceList =
            serde_json::from_value(resource_list("apps", "v1").unwrap()).unwrap();
        let find = |n: &str| apps.resources.iter().find(|r| r.name == n);
        let short = |n: &str| find(n).unwrap().short_names.clone().unwrap_or_default();
        assert_eq!(short("statefulsets"), ["sts"]);
        assert_eq!(short("daemonsets"), ["ds"]);
        assert!(short("controllerrevisions").is_empty());
        assert_eq!(find("statefulsets").unwrap().kind, "StatefulSet");
        assert_eq!(find("daemonsets").unwrap().kind, "DaemonSet");
        assert!(find("statefulsets/status").is_some() && find("daemonsets/status").is_some());
        // Only StatefulSets scale (kubectl scale); DaemonSets follow the nodes.
        assert!(find("statefulsets/scale").is_some());
        assert!(find("daemonsets/scale").is_none());
        assert!(
            Res::StatefulSet.info().tracks_generation && Res::DaemonSet.info().tracks_generation
        );
    }

    #[test]
    fn argoproj_serves_rollouts_at_v1alpha1() {
        let list: APIGroupList = serde_json::from_value(api_group_list()).unwrap();
        let argo = list
            .groups
            .iter()
            .find(|g| g.name == "argoproj.io")
            .unwrap();
        assert_eq!(argo.versions[0].group_version, "argoproj.io/v1alpha1");
        assert_eq!(argo.preferred_version.as_ref().unwrap().version, "v1alpha1");
        let doc = api_group_doc("argoproj.io").unwrap();
        assert_eq!(
            doc["preferredVersion"]["groupVersion"],
            "argoproj.io/v1alpha1"
        );
        let res: APIResourceList =
            serde_json::from_value(resource_list("argoproj.io", "v1alpha1").unwrap()).unwrap();
        let ro = res.resources.iter().find(|r| r.name == "rollouts").unwrap();
        assert_eq!(ro.kind, "Rollout");
        assert_eq!(ro.short_names.as_deref(), Some(&["ro".to_string()][..]));
        assert!(res.resources.iter().any(|r| r.name == "rollouts/status"));
        assert!(resource_list("argoproj.io", "v1").is_none());
        assert!(Res::Rollout.info().is_custom() && !Res::Deployment.info().is_custom());
    }

    #[test]
    fn lookup_finds_both_event_apis() {
        assert_eq!(lookup("", "v1", "events").unwrap().res, Res::Event);
        assert_eq!(
            lookup("events.k8s.io", "v1", "events").unwrap().res,
            Res::EventV1
        );
        assert_eq!(Res::Deployment.info().qualified(), "deployments.apps");
        assert_eq!(Res::Pod.info().qualified(), "pods");
    }
}
