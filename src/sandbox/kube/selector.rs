//! Label and field selectors, with the grammar and semantics of the API server.

use super::discovery::Res;
use super::error::KubeSimError;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector` (all requirements must hold; empty matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

fn bad(sel: &str, why: &str) -> KubeSimError {
    KubeSimError::BadRequest(format!(
        "unable to parse requirement: {why} (selector \"{sel}\")"
    ))
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(s: &str) -> bool {
    s.is_empty() || valid_token(s) && !s.contains('/')
}

/// Split on commas outside parentheses.
fn split_top(sel: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sel[start..]);
    out
}

impl LabelSelector {
    pub fn parse(sel: &str) -> Result<Self, KubeSimError> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for term in split_top(sel) {
            let t = term.trim();
            if t.is_empty() {
                return Err(bad(sel, "empty requirement"));
            }
            let req = if let Some(open) = t.find('(') {
                let close = t
                    .rfind(')')
                    .filter(|c| *c == t.len() - 1)
                    .ok_or_else(|| bad(sel, "expected ')'"))?;
                let head: Vec<&str> = t[..open].split_whitespace().collect();
                let values: Vec<String> = t[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect();
                if values.iter().any(|v| !valid_value(v)) {
                    return Err(bad(sel, "invalid value in set"));
                }
                match head.as_slice() {
                    [k, "in"] if valid_token(k) => Req::In(k.to_string(), values),
                    [k, "notin"] if valid_token(k) => Req::NotIn(k.to_string(), values),
                    _ => return Err(bad(sel, "expected 'in' or 'notin'")),
                }
            } else if let Some(k) = t.strip_prefix('!') {
                let k = k.trim();
                if !valid_token(k) {
                    return Err(bad(sel, "invalid key"));
                }
                Req::NotExists(k.into())
            } else if let Some((k, v)) = t.split_once("!=") {
                Req::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==") {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                Req::Eq(k.trim().into(), v.trim().into())
            } else {
                if !valid_token(t) {
                    return Err(bad(sel, "invalid key"));
                }
                Req::Exists(t.into())
            };
            if let Req::Eq(k, v) | Req::NotEq(k, v) = &req {
                if !valid_token(k) || !valid_value(v) {
                    return Err(bad(sel, "invalid key or value"));
                }
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// From a typed `metav1.LabelSelector` (matchLabels + matchExpressions).
    pub fn from_k8s(sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> Self {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Req::Eq(k.clone(), v.clone()));
        }
        for e in sel.match_expressions.iter().flatten() {
            let vals = e.values.clone().unwrap_or_default();
            reqs.push(match e.operator.as_str() {
                "In" => Req::In(e.key.clone(), vals),
                "NotIn" => Req::NotIn(e.key.clone(), vals),
                "Exists" => Req::Exists(e.key.clone()),
                _ => Req::NotExists(e.key.clone()),
            });
        }
        LabelSelector(reqs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Exists(k) => labels.contains_key(k),
            Req::NotExists(k) => !labels.contains_key(k),
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::NotEq(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
        })
    }

    /// Match the `metadata.labels` of a JSON object.
    pub fn matches_obj(&self, obj: &Value) -> bool {
        self.is_empty() || self.matches(&labels_of(obj))
    }
}

pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A parsed `fieldSelector`: `path=value`, `path==value`, `path!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Fields each resource can be selected by, beyond `metadata.name` and `metadata.namespace`.
fn extra_fields(res: Res) -> &'static [&'static str] {
    match res {
        Res::Pod => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
        ],
        Res::Secret => &["type"],
        Res::Event => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        Res::EventV1 => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        Res::ReplicaSet => &["status.replicas"],
        _ => &[],
    }
}

impl FieldSelector {
    pub fn parse(res: Res, sel: &str) -> Result<Self, KubeSimError> {
        let mut out = Vec::new();
        for term in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(KubeSimError::BadRequest(format!(
                    "invalid selector: '{sel}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !extra_fields(res).contains(&field)
            {
                return Err(KubeSimError::BadRequest(format!(
                    "field label not supported: {field}"
                )));
            }
            out.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches_obj(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let ptr = format!("/{}", field.replace('.', "/"));
            let got = match obj.pointer(&ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web"));
        assert!(!m("app=api"));
        assert!(m("app!=api"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"), "!= matches an absent key");
        assert!(m("app in (api, web)"));
        assert!(!m("app in (api)"));
        assert!(m("app notin (api)"));
        assert!(m("missing notin (x)"));
        assert!(!m("app notin (web,api)"));
        assert!(m("tier"));
        assert!(!m("missing"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("app=web,tier in (front,back),!canary"));
        assert!(!m("app=web,tier=back"));
    }

    #[test]
    fn label_selector_rejects_garbage() {
        for s in ["app in web", "a b", "app=(x", ",", "app in (x", "=x"] {
            let e = LabelSelector::parse(s).unwrap_err();
            assert_eq!(e.reason(), "BadRequest", "{s}");
        }
    }

    #[test]
    fn field_selectors() {
        let obj =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "status": {"phase": "Running"}});
        let m = |s: &str| FieldSelector::parse(Res::Pod, s).unwrap().matches_obj(&obj);
        assert!(m("metadata.name=a"));
        assert!(!m("metadata.name=b"));
        assert!(m("metadata.name!=b,metadata.namespace==ns"));
        assert!(m("status.phase=Running"));
        assert!(FieldSelector::parse(Res::Deployment, "status.phase=x").is_err());
        assert!(FieldSelector::parse(Res::Pod, "nonsense").is_err());
    }
}
