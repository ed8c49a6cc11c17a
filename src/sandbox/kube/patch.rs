//! The PATCH content types: JSON merge patch, strategic merge patch, JSON patch, and an
//! approximation of server-side apply.

use super::error::KubeSimError;
use serde_json::{Map, Value};

/// A PATCH body kind, from its `Content-Type`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    /// `application/apply-patch+yaml`: treated as a merge patch that may create the object
    /// (no field ownership tracking).
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Result<Self, KubeSimError> {
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime {
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Ok(PatchKind::Apply)
            }
            other => Err(KubeSimError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got \"{other}\")"
            ))),
        }
    }
}

/// Parse a patch body.
pub fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, KubeSimError> {
    let parsed = match kind {
        PatchKind::Apply => serde_yaml_ng::from_slice::<Value>(body).map_err(|e| e.to_string()),
        _ => serde_json::from_slice::<Value>(body).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| {
        KubeSimError::BadRequest(format!("error decoding patch: {}", e.replace('"', "'")))
    })
}

/// Apply `patch` to `doc` (a copy of the stored object).
pub fn apply(kind: PatchKind, doc: &mut Value, patch: &Value) -> Result<(), KubeSimError> {
    match kind {
        PatchKind::Merge | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(KubeSimError::BadRequest(
                    "error decoding patch: a merge patch must be a JSON object".into(),
                ));
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Strategic => {
            if !patch.is_object() {
                return Err(KubeSimError::BadRequest(
                    "error decoding patch: a strategic merge patch must be a JSON object".into(),
                ));
            }
            strategic_merge(doc, patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
                KubeSimError::BadRequest(format!(
                    "error decoding patch: {}",
                    e.to_string().replace('"', "'")
                ))
            })?;
            json_patch::patch(doc, &ops).map_err(|e| {
                KubeSimError::Unprocessable(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })
        }
    }
}

/// The merge key of a list field, as the Kubernetes OpenAPI `x-kubernetes-patch-merge-key`
/// declares it for the fields our objects use. Lists without one are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "readinessGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars merged as sets (`patchStrategy: merge` without a key).
fn merges_as_set(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch: maps merge, `null` deletes, keyed lists merge element-wise,
/// `$patch: replace|delete` and `$deleteFromPrimitiveList/` directives are honoured.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut clean = p.clone();
            clean.remove("$patch");
            *target = Value::Object(clean);
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, pv) in p {
        if k == "$patch" || k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), pv) {
                list.retain(|v| !del.contains(v));
            }
            continue;
        }
        match pv {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => {
                let entry = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(entry, pv);
            }
            Value::Array(items) => {
                let merged = match (merge_key(k), t.get(k)) {
                    (Some(mk), Some(Value::Array(cur))) => merge_keyed(cur, items, mk),
                    (None, Some(Value::Array(cur))) if merges_as_set(k) => {
                        let mut out = cur.clone();
                        for v in items {
                            if !out.contains(v) {
                                out.push(v.clone());
                            }
                        }
                        out
                    }
                    _ => items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect(),
                };
                t.insert(k.clone(), Value::Array(merged));
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
}

fn merge_keyed(cur: &[Value], items: &[Value], mk: &str) -> Vec<Value> {
    let mut out: Vec<Value> = cur.to_vec();
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
    }
    for item in items {
        let key = item.get(mk);
        let pos = key.and_then(|k| out.iter().position(|o| o.get(mk) == Some(k)));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut out[i], item),
            (None, false) => out.push(item.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dep() -> Value {
        json!({"metadata": {"name": "d", "annotations": {"a": "1"}, "finalizers": ["x"]},
               "spec": {"template": {"metadata": {"annotations": {"keep": "me"}},
                 "spec": {"containers": [
                    {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "side:1"}],
                  "tolerations": [{"key": "t1"}]}}}})
    }

    #[test]
    fn strategic_merges_maps_and_keyed_lists() {
        let mut d = dep();
        strategic_merge(
            &mut d,
            &json!({"spec": {"template": {
                "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "now"}},
                "spec": {"containers": [{"name": "app", "image": "app:2",
                                          "env": [{"name": "B", "value": "2"}]}],
                         "tolerations": [{"key": "t2"}]}}},
                    "metadata": {"annotations": {"a": null}, "finalizers": ["y"]}}),
        );
        let t = &d["spec"]["template"];
        assert_eq!(t["metadata"]["annotations"]["keep"], "me");
        assert_eq!(
            t["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
            "now"
        );
        let cs = t["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.len(), 2, "containers merge by name");
        assert_eq!(cs[0]["image"], "app:2");
        assert_eq!(
            cs[0]["env"].as_array().unwrap().len(),
            2,
            "env merges by name"
        );
        assert_eq!(cs[1]["name"], "side");
        assert_eq!(
            t["spec"]["tolerations"],
            json!([{"key": "t2"}]),
            "unkeyed lists replace"
        );
        assert!(d["metadata"]["annotations"].get("a").is_none());
        assert_eq!(d["metadata"]["finalizers"], json!(["x", "y"]));
    }

    #[test]
    fn strategic_directives() {
        let mut d = dep();
        strategic_merge(
            &mut d,
            &json!({"spec": {"template": {"spec": {"containers": [
                {"name": "side", "$patch": "delete"}]}}},
                "$deleteFromPrimitiveList/metadata": [],
                "metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        let cs = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["name"], "app");
        assert_eq!(d["metadata"]["finalizers"], json!([]));
        let mut d = dep();
        strategic_merge(
            &mut d,
            &json!({"metadata": {"annotations": {"$patch": "replace", "only": "this"}}}),
        );
        assert_eq!(d["metadata"]["annotations"], json!({"only": "this"}));
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let mut d = dep();
        apply(
            PatchKind::Merge,
            &mut d,
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "only", "image": "x"}]}}}}),
        )
        .unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn json_patch_ops_and_failures() {
        let mut d = dep();
        apply(
            PatchKind::Json,
            &mut d,
            &json!([{"op": "add", "path": "/spec/template/metadata/annotations/openai-key-rotator~1rotation-id", "value": "r1"}]),
        )
        .unwrap();
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"]["openai-key-rotator/rotation-id"],
            "r1"
        );
        let e = apply(
            PatchKind::Json,
            &mut d,
            &json!([{"op": "test", "path": "/metadata/name", "value": "other"}]),
        )
        .unwrap_err();
        assert_eq!(e.status_code().as_u16(), 422);
        let e = apply(PatchKind::Json, &mut d, &json!({"op": "add"})).unwrap_err();
        assert_eq!(e.reason(), "BadRequest");
        assert!(PatchKind::from_content_type("text/plain").is_err());
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
    }
}
