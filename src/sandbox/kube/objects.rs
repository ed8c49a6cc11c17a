//! Per-kind knowledge applied to every write: decoding into the real `k8s-openapi` type
//! (unknown fields dropped, as the API server does), defaulting and validation.

use super::discovery::{Res, ResInfo};
use super::error::{FieldCause, KubeSimError};
use super::selector::{labels_of, LabelSelector};
use base64::Engine;
use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Serde messages can quote input (a Secret's data); keep only their shape.
fn scrub(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        match c {
            '"' if !in_quote => {
                in_quote = true;
                out.push_str("\"…");
            }
            '"' => {
                in_quote = false;
                out.push('"');
            }
            _ if !in_quote => out.push(c),
            _ => {}
        }
    }
    out
}

fn roundtrip<T: DeserializeOwned + Serialize>(
    info: &ResInfo,
    v: Value,
) -> Result<Value, KubeSimError> {
    let typed: T = serde_json::from_value(v).map_err(|e| {
        KubeSimError::BadRequest(format!(
            "{} in version \"{}\" cannot be handled as a {}: {}",
            info.kind,
            info.version,
            info.kind,
            scrub(&e.to_string())
        ))
    })?;
    serde_json::to_value(typed).map_err(|e| KubeSimError::BadRequest(scrub(&e.to_string())))
}

fn cause(reason: &'static str, field: &str, message: impl Into<String>) -> FieldCause {
    FieldCause {
        reason,
        field: field.into(),
        message: message.into(),
    }
}

/// RFC 1123 subdomain, as object names must be.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Decode, default and validate an object written to `res`. `apiVersion` and `kind` are set
/// (and checked if the client sent them).
pub fn admit(res: Res, mut obj: Value) -> Result<Value, KubeSimError> {
    let info = res.info();
    if !obj.is_object() {
        return Err(KubeSimError::BadRequest(format!(
            "{} in version \"{}\" cannot be handled as a {}: expected a JSON object",
            info.kind, info.version, info.kind
        )));
    }
    let api_version = info.api_version();
    if let Some(v) = obj.get("apiVersion").and_then(Value::as_str) {
        if v != api_version {
            return Err(KubeSimError::BadRequest(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if k != info.kind {
            return Err(KubeSimError::BadRequest(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                info.kind
            )));
        }
    }
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(info.kind);
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !name.is_empty() && !valid_name(&name) {
        return Err(KubeSimError::invalid(
            info,
            &name,
            vec![cause(
                "FieldValueInvalid",
                "metadata.name",
                format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            )],
        ));
    }
    match res {
        Res::Deployment | Res::ReplicaSet | Res::StatefulSet | Res::DaemonSet => {
            require_workload_shape(info, &name, &obj)?;
            default_workload(res, &mut obj);
        }
        Res::Pod => {
            if obj.pointer("/spec/containers").is_none() {
                return Err(KubeSimError::invalid(
                    info,
                    &name,
                    vec![cause(
                        "FieldValueRequired",
                        "spec.containers",
                        "Required value",
                    )],
                ));
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            if obj.get("status").is_none() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
        }
        Res::Secret => default_secret(&mut obj),
        // The CRD's schema: a pod template and a selector (workloadRef is not simulated).
        Res::Rollout => {
            require_workload_shape(info, &name, &obj)?;
            if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
                default_pod_spec(spec);
            }
        }
        // The CRDs' required fields (their OpenAPI schemas; the rest is kept as sent).
        Res::VaultStaticSecret => require_fields(
            info,
            &name,
            &obj,
            &["mount", "path", "type", "destination/name"],
        )?,
        Res::ExternalSecret => require_fields(info, &name, &obj, &[])?,
        Res::Namespace => {
            let labels = obj["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let mut labels = labels;
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            obj["metadata"]["labels"] = Value::Object(labels);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        _ => {}
    }
    let obj = match res {
        Res::Namespace => roundtrip::<Namespace>(info, obj)?,
        Res::Pod => roundtrip::<Pod>(info, obj)?,
        Res::Secret => roundtrip::<Secret>(info, obj)?,
        Res::Event => roundtrip::<Event>(info, obj)?,
        Res::Deployment => roundtrip::<Deployment>(info, obj)?,
        Res::ReplicaSet => roundtrip::<ReplicaSet>(info, obj)?,
        Res::StatefulSet => roundtrip::<StatefulSet>(info, obj)?,
        Res::DaemonSet => roundtrip::<DaemonSet>(info, obj)?,
        Res::ControllerRevision => roundtrip::<ControllerRevision>(info, obj)?,
        Res::Lease => roundtrip::<Lease>(info, obj)?,
        Res::EventV1 => roundtrip::<k8s_openapi::api::events::v1::Event>(info, obj)?,
        Res::TokenReview => roundtrip::<TokenReview>(info, obj)?,
        // No typed struct: the CRD keeps unknown fields of spec and status as sent.
        Res::Rollout | Res::VaultStaticSecret | Res::ExternalSecret => obj,
    };
    if is_workload(res) {
        validate_workload(info, &name, &obj)?;
    }
    Ok(obj)
}

/// `spec` must be an object holding each of `fields` (`a/b` = `spec.a.b`), as a CRD's
/// structural schema requires.
fn require_fields(
    info: &ResInfo,
    name: &str,
    obj: &Value,
    fields: &[&str],
) -> Result<(), KubeSimError> {
    if !obj.get("spec").is_some_and(Value::is_object) {
        return Err(KubeSimError::invalid(
            info,
            name,
            vec![cause("FieldValueRequired", "spec", "Required value")],
        ));
    }
    let missing: Vec<FieldCause> = fields
        .iter()
        .filter(|f| {
            obj.pointer(&format!("/spec/{f}"))
                .is_none_or(Value::is_null)
        })
        .map(|f| {
            cause(
                "FieldValueRequired",
                &format!("spec.{}", f.replace('/', ".")),
                "Required value",
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KubeSimError::invalid(info, name, missing))
    }
}

fn is_workload(res: Res) -> bool {
    matches!(
        res,
        Res::Deployment | Res::ReplicaSet | Res::StatefulSet | Res::DaemonSet | Res::Rollout
    )
}

/// StatefulSet spec fields an update may change (`ValidateStatefulSetUpdate`).
const STS_MUTABLE: &[&str] = &[
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

/// Checks on an update that the object alone cannot show.
pub fn validate_update(res: Res, old: &Value, new: &Value) -> Result<(), KubeSimError> {
    if res == Res::StatefulSet {
        let frozen = |v: &Value| {
            let mut spec = v.get("spec").cloned().unwrap_or_else(|| json!({}));
            if let Some(o) = spec.as_object_mut() {
                o.retain(|k, _| !STS_MUTABLE.contains(&k.as_str()));
            }
            spec
        };
        if frozen(old) != frozen(new) {
            let name = super::store::meta_str(old, "name");
            return Err(KubeSimError::invalid(
                res.info(),
                name,
                vec![cause(
                    "FieldValueForbidden",
                    "spec",
                    "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                )],
            ));
        }
    }
    if is_workload(res) && old.pointer("/spec/selector") != new.pointer("/spec/selector") {
        let name = super::store::meta_str(old, "name");
        return Err(KubeSimError::invalid(
            res.info(),
            name,
            vec![cause(
                "FieldValueInvalid",
                "spec.selector",
                "Invalid value: field is immutable",
            )],
        ));
    }
    Ok(())
}

fn require_workload_shape(info: &ResInfo, name: &str, obj: &Value) -> Result<(), KubeSimError> {
    let mut causes = Vec::new();
    if obj.pointer("/spec/selector").is_none() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.selector",
            "Required value",
        ));
    }
    match obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
    {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                for f in ["name", "image"] {
                    if c.get(f).and_then(Value::as_str).unwrap_or("").is_empty() {
                        causes.push(cause(
                            "FieldValueRequired",
                            &format!("spec.template.spec.containers[{i}].{f}"),
                            "Required value",
                        ));
                    }
                }
            }
        }
        _ => causes.push(cause(
            "FieldValueRequired",
            "spec.template.spec.containers",
            "Required value",
        )),
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(KubeSimError::invalid(info, name, causes))
    }
}

fn validate_workload(info: &ResInfo, name: &str, obj: &Value) -> Result<(), KubeSimError> {
    let mut causes = Vec::new();
    let sel: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        serde_json::from_value(obj["spec"]["selector"].clone()).unwrap_or_default();
    let sel = LabelSelector::from_k8s(&sel);
    if sel.is_empty() {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.selector",
            "Invalid value: empty selector is invalid for deployment",
        ));
    } else if !sel.matches(&labels_of(&obj["spec"]["template"])) {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.template.metadata.labels",
            "Invalid value: `selector` does not match template `labels`",
        ));
    }
    if obj["spec"]["replicas"].as_i64().is_some_and(|r| r < 0) {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.replicas",
            "Invalid value: must be greater than or equal to 0",
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(KubeSimError::invalid(info, name, causes))
    }
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(o) = obj.as_object_mut() {
        if o.get(key).is_none_or(Value::is_null) {
            o.insert(key.into(), v);
        }
    }
}

fn default_workload(res: Res, obj: &mut Value) {
    let spec = &mut obj["spec"];
    if res != Res::DaemonSet {
        set_default(spec, "replicas", json!(1));
    }
    if res == Res::StatefulSet {
        // `SetDefaults_StatefulSet`: partition 0 only when the server picked the strategy
        // or the client asked for RollingUpdate with a rollingUpdate block.
        set_default(spec, "podManagementPolicy", json!("OrderedReady"));
        set_default(spec, "revisionHistoryLimit", json!(10));
        set_default(
            spec,
            "persistentVolumeClaimRetentionPolicy",
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
        );
        set_default(spec, "updateStrategy", json!({}));
        let strategy = &mut spec["updateStrategy"];
        if strategy.get("type").is_none_or(Value::is_null) {
            strategy["type"] = json!("RollingUpdate");
            set_default(strategy, "rollingUpdate", json!({}));
        }
        if strategy["type"] == "RollingUpdate" {
            if let Some(ru) = strategy.get_mut("rollingUpdate").filter(|r| r.is_object()) {
                set_default(ru, "partition", json!(0));
            }
        }
    }
    if res == Res::DaemonSet {
        set_default(spec, "revisionHistoryLimit", json!(10));
        set_default(spec, "updateStrategy", json!({}));
        let strategy = &mut spec["updateStrategy"];
        set_default(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            set_default(strategy, "rollingUpdate", json!({}));
            set_default(&mut strategy["rollingUpdate"], "maxUnavailable", json!(1));
            set_default(&mut strategy["rollingUpdate"], "maxSurge", json!(0));
        }
    }
    if res == Res::Deployment {
        set_default(spec, "revisionHistoryLimit", json!(10));
        set_default(spec, "progressDeadlineSeconds", json!(600));
        set_default(spec, "strategy", json!({"type": "RollingUpdate"}));
        let strategy = &mut spec["strategy"];
        set_default(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            set_default(strategy, "rollingUpdate", json!({}));
            set_default(&mut strategy["rollingUpdate"], "maxSurge", json!("25%"));
            set_default(
                &mut strategy["rollingUpdate"],
                "maxUnavailable",
                json!("25%"),
            );
        }
    }
    if let Some(ps) = spec.pointer_mut("/template/spec") {
        default_pod_spec(ps);
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in cs {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let tagged = image.rsplit('/').next().is_some_and(|last| {
                last.contains('@') || last.split_once(':').is_some_and(|(_, t)| t != "latest")
            });
            set_default(
                c,
                "imagePullPolicy",
                json!(if tagged { "IfNotPresent" } else { "Always" }),
            );
            set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(c, "terminationMessagePolicy", json!("File"));
            set_default(c, "resources", json!({}));
        }
    }
}

/// `stringData` is write-only: merged into `data` (base64) and dropped.
fn default_secret(obj: &mut Value) {
    set_default(obj, "type", json!("Opaque"));
    let Some(o) = obj.as_object_mut() else { return };
    if let Some(Value::Object(sd)) = o.remove("stringData") {
        let mut data = o
            .get("data")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (k, v) in sd {
            if let Some(s) = v.as_str() {
                data.insert(
                    k,
                    json!(base64::engine::general_purpose::STANDARD.encode(s)),
                );
            }
        }
        o.insert("data".into(), Value::Object(data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}
                }
            },
            "bogusField": 1
        })
    }

    #[test]
    fn deployments_get_real_defaults_and_lose_unknown_fields() {
        let d = admit(Res::Deployment, deployment()).unwrap();
        assert_eq!(d["apiVersion"], "apps/v1");
        assert_eq!(d["kind"], "Deployment");
        assert!(d.get("bogusField").is_none());
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn invalid_deployments_are_422_with_causes() {
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("other");
        let e = admit(Res::Deployment, d).unwrap_err();
        assert_eq!(e.status_code().as_u16(), 422);
        let s = e.to_status();
        assert_eq!(
            s["details"]["causes"][0]["field"],
            "spec.template.metadata.labels"
        );

        let mut d = deployment();
        d["spec"].as_object_mut().unwrap().remove("selector");
        let e = admit(Res::Deployment, d).unwrap_err();
        assert!(
            e.to_string().contains("spec.selector: Required value"),
            "{e}"
        );

        let mut d = deployment();
        d["metadata"]["name"] = json!("Bad_Name");
        assert_eq!(admit(Res::Deployment, d).unwrap_err().reason(), "Invalid");

        let mut d = deployment();
        d["kind"] = json!("Pod");
        assert_eq!(
            admit(Res::Deployment, d).unwrap_err().reason(),
            "BadRequest"
        );
    }

    #[test]
    fn secret_string_data_is_encoded_and_errors_do_not_echo_values() {
        let s = admit(
            Res::Secret,
            json!({"metadata": {"name": "k"}, "stringData": {"key": "sk-THE-VALUE"}}),
        )
        .unwrap();
        assert!(s.get("stringData").is_none());
        assert_eq!(s["type"], "Opaque");
        assert_eq!(
            s["data"]["key"],
            base64::engine::general_purpose::STANDARD.encode("sk-THE-VALUE")
        );
        // Not base64: the decode error must not quote the value.
        let e = admit(
            Res::Secret,
            json!({"metadata": {"name": "k"}, "data": {"key": "sk-THE-VALUE!!"}}),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "BadRequest");
        assert!(!e.to_string().contains("THE-VALUE"), "{e}");
        assert!(!e.to_status().to_string().contains("THE-VALUE"));
    }

    #[test]
    fn statefulset_and_daemonset_defaults_follow_upstream() {
        let workload = |kind: &str| {
            let mut v = deployment();
            v["kind"] = json!(kind);
            v
        };
        let s = admit(Res::StatefulSet, workload("StatefulSet")).unwrap();
        assert_eq!(s["spec"]["podManagementPolicy"], "OrderedReady");
        assert_eq!(
            s["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        );
        assert_eq!(s["spec"]["replicas"], 1);
        // An explicit RollingUpdate without a rollingUpdate block stays without one.
        let mut v = workload("StatefulSet");
        v["spec"]["updateStrategy"] = json!({"type": "RollingUpdate"});
        let s = admit(Res::StatefulSet, v).unwrap();
        assert_eq!(
            s["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate"})
        );

        let d = admit(Res::DaemonSet, workload("DaemonSet")).unwrap();
        assert!(d["spec"].get("replicas").is_none());
        assert_eq!(
            d["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
        );
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
    }

    #[test]
    fn statefulset_updates_may_change_only_some_fields() {
        let mut v = deployment();
        v["kind"] = json!("StatefulSet");
        let old = admit(Res::StatefulSet, v).unwrap();
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(5);
        new["spec"]["template"]["metadata"]["annotations"] = json!({"r": "1"});
        assert!(validate_update(Res::StatefulSet, &old, &new).is_ok());
        new["spec"]["podManagementPolicy"] = json!("Parallel");
        let e = validate_update(Res::StatefulSet, &old, &new).unwrap_err();
        assert_eq!(e.status_code().as_u16(), 422);
        assert!(e.to_string().contains("Forbidden"), "{e}");
    }

    #[test]
    fn selector_is_immutable() {
        let old = admit(Res::Deployment, deployment()).unwrap();
        let mut new = old.clone();
        new["spec"]["selector"]["matchLabels"]["extra"] = json!("x");
        assert_eq!(
            validate_update(Res::Deployment, &old, &new)
                .unwrap_err()
                .reason(),
            "Invalid"
        );
        assert!(validate_update(Res::Deployment, &old, &old).is_ok());
    }
}
