//! Server-side printing: `meta.k8s.io/v1` Tables, which `kubectl get` asks for, with the
//! columns the real API server prints for the kinds we serve.

use super::discovery::{Res, ResInfo};
use axum::http::HeaderMap;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

/// `Accept: application/json;as=Table;v=v1;g=meta.k8s.io,...`
pub fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            let params: Vec<&str> = m.split(';').map(str::trim).collect();
            params.contains(&"as=Table")
                && params.contains(&"g=meta.k8s.io")
                && params.contains(&"v=v1")
        })
}

/// What a row carries besides its cells (`includeObject`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn from_query(v: Option<&str>) -> Self {
        match v {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// kubectl's `HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < 0 {
        return "<invalid>".into();
    }
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        match secs % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        }
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y{}d", d / 365, d % 365)
    }
}

fn age(obj: &Value) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(|t| human_duration(Timestamp::now().as_second() - t.as_second()))
        .unwrap_or_else(|| "<unknown>".into())
}

fn col(name: &str, type_: &str, format: &str, priority: i32) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": "", "priority": priority})
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn containers_and_images(o: &Value, ptr: &str) -> (String, String) {
    let cs = o
        .pointer(ptr)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn selector_text(o: &Value) -> String {
    o.pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn columns(res: Res) -> Vec<Value> {
    let name = col("Name", "string", "name", 0);
    let age = col("Age", "string", "", 0);
    match res {
        Res::Deployment => vec![
            name,
            col("Ready", "string", "", 0),
            col("Up-to-date", "integer", "", 0),
            col("Available", "integer", "", 0),
            age,
            col("Containers", "string", "", 1),
            col("Images", "string", "", 1),
            col("Selector", "string", "", 1),
        ],
        Res::ReplicaSet => vec![
            name,
            col("Desired", "integer", "", 0),
            col("Current", "integer", "", 0),
            col("Ready", "integer", "", 0),
            age,
            col("Containers", "string", "", 1),
            col("Images", "string", "", 1),
            col("Selector", "string", "", 1),
        ],
        Res::StatefulSet => vec![
            name,
            col("Ready", "string", "", 0),
            age,
            col("Containers", "string", "", 1),
            col("Images", "string", "", 1),
        ],
        Res::DaemonSet => vec![
            name,
            col("Desired", "integer", "", 0),
            col("Current", "integer", "", 0),
            col("Ready", "integer", "", 0),
            col("Up-to-date", "integer", "", 0),
            col("Available", "integer", "", 0),
            col("Node Selector", "string", "", 0),
            age,
            col("Containers", "string", "", 1),
            col("Images", "string", "", 1),
            col("Selector", "string", "", 1),
        ],
        Res::ControllerRevision => vec![
            name,
            col("Controller", "string", "", 0),
            col("Revision", "integer", "", 0),
            age,
        ],
        Res::Pod => vec![
            name,
            col("Ready", "string", "", 0),
            col("Status", "string", "", 0),
            col("Restarts", "string", "", 0),
            age,
            col("IP", "string", "", 1),
            col("Node", "string", "", 1),
            col("Nominated Node", "string", "", 1),
            col("Readiness Gates", "string", "", 1),
        ],
        Res::Secret => vec![
            name,
            col("Type", "string", "", 0),
            col("Data", "string", "", 0),
            age,
        ],
        Res::Lease => vec![name, col("Holder", "string", "", 0), age],
        // The argo-rollouts CRD's additionalPrinterColumns.
        Res::Rollout => vec![
            name,
            col("Desired", "integer", "", 0),
            col("Current", "integer", "", 0),
            col("Up-to-date", "integer", "", 0),
            col("Available", "integer", "", 0),
            age,
        ],
        // vault-secrets-operator's CRD declares no printer columns: the CRD default.
        Res::VaultStaticSecret => vec![name, age],
        // The external-secrets CRD's additionalPrinterColumns.
        Res::ExternalSecret => vec![
            name,
            col("Store", "string", "", 0),
            col("Refresh Interval", "string", "", 0),
            col("Status", "string", "", 0),
            col("Ready", "string", "", 0),
        ],
        Res::Namespace => vec![name, col("Status", "string", "", 0), age],
        Res::Event => vec![
            col("Last Seen", "string", "", 0),
            col("Type", "string", "", 0),
            col("Reason", "string", "", 0),
            col("Object", "string", "", 0),
            col("Message", "string", "", 0),
        ],
        _ => vec![name, col("Created At", "date", "", 0)],
    }
}

fn cells(res: Res, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    match res {
        Res::Deployment => {
            let (c, im) = containers_and_images(o, "/spec/template/spec/containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, "/status/readyReplicas"),
                    i(o, "/spec/replicas")
                )),
                json!(i(o, "/status/updatedReplicas")),
                json!(i(o, "/status/availableReplicas")),
                json!(age(o)),
                json!(c),
                json!(im),
                json!(selector_text(o)),
            ]
        }
        Res::ReplicaSet => {
            let (c, im) = containers_and_images(o, "/spec/template/spec/containers");
            vec![
                name,
                json!(i(o, "/spec/replicas")),
                json!(i(o, "/status/replicas")),
                json!(i(o, "/status/readyReplicas")),
                json!(age(o)),
                json!(c),
                json!(im),
                json!(selector_text(o)),
            ]
        }
        Res::StatefulSet => {
            let (c, im) = containers_and_images(o, "/spec/template/spec/containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, "/status/readyReplicas"),
                    i(o, "/spec/replicas")
                )),
                json!(age(o)),
                json!(c),
                json!(im),
            ]
        }
        Res::DaemonSet => {
            let (c, im) = containers_and_images(o, "/spec/template/spec/containers");
            let node_selector = o
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .filter(|m| !m.is_empty())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(i(o, "/status/desiredNumberScheduled")),
                json!(i(o, "/status/currentNumberScheduled")),
                json!(i(o, "/status/numberReady")),
                json!(i(o, "/status/updatedNumberScheduled")),
                json!(i(o, "/status/numberAvailable")),
                json!(node_selector),
                json!(age(o)),
                json!(c),
                json!(im),
                json!(selector_text(o)),
            ]
        }
        Res::ControllerRevision => {
            let owner = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .and_then(|rs| rs.iter().find(|r| r["controller"] == true))
                .map(|r| {
                    let group = s(r, "/apiVersion")
                        .split_once('/')
                        .map(|(g, _)| format!(".{g}"))
                        .unwrap_or_default();
                    format!("{}{group}/{}", s(r, "/kind").to_lowercase(), s(r, "/name"))
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(owner), json!(i(o, "/revision")), json!(age(o))]
        }
        Res::Pod => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |cs| cs.iter().filter(|c| c["ready"] == true).count());
            let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else {
                s(o, "/status/phase").to_string()
            };
            let or_none = |v: &str| {
                if v.is_empty() {
                    "<none>".to_string()
                } else {
                    v.to_string()
                }
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!("0"),
                json!(age(o)),
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        Res::Secret => vec![
            name,
            json!(s(o, "/type")),
            json!(o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())),
            json!(age(o)),
        ],
        Res::Lease => vec![name, json!(s(o, "/spec/holderIdentity")), json!(age(o))],
        Res::Rollout => vec![
            name,
            json!(o
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)),
            json!(i(o, "/status/replicas")),
            json!(i(o, "/status/updatedReplicas")),
            json!(i(o, "/status/availableReplicas")),
            json!(age(o)),
        ],
        Res::VaultStaticSecret => vec![name, json!(age(o))],
        Res::ExternalSecret => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Ready"));
            vec![
                name,
                json!(s(o, "/spec/secretStoreRef/name")),
                json!(s(o, "/spec/refreshInterval")),
                json!(ready.map_or("", |c| s(c, "/reason"))),
                json!(ready.map_or("", |c| s(c, "/status"))),
            ]
        }
        Res::Namespace => vec![name, json!(s(o, "/status/phase")), json!(age(o))],
        Res::Event => vec![
            json!(age(o)),
            json!(s(o, "/type")),
            json!(s(o, "/reason")),
            json!(format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            )),
            json!(s(o, "/message")),
        ],
        _ => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
    }
}

fn row(info: &ResInfo, o: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(info.res, o)});
    match include {
        Include::None => {}
        Include::Object => r["object"] = o.clone(),
        Include::Metadata => {
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })
        }
    }
    r
}

/// A Table of `objects`; `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(info: &ResInfo, objects: &[Value], list_meta: Value, include: Include) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns(info.res),
        "rows": objects.iter().map(|o| row(info, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        h.insert(
            "accept",
            HeaderValue::from_static("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"),
        );
        assert!(wants_table(&h));
        h.insert("accept", HeaderValue::from_static("application/json"));
        assert!(!wants_table(&h));
    }

    #[test]
    fn durations_print_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 120), "3h2m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
    }

    #[test]
    fn deployment_rows() {
        let d = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "app", "image": "img:1"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        let t = table(Res::Deployment.info(), &[d], json!({}), Include::Metadata);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "2/3");
        assert_eq!(cells[2], 3);
        assert_eq!(cells[7], "app=web");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 8);
    }
}
