//! HTTP: URL layout, verbs, query parameters, watch streams, TokenReview.
//!
//! One catch-all handler parses `/api/v1/...` and `/apis/{group}/{version}/...` the way the
//! API server lays them out (`[namespaces/{ns}/]{resource}[/{name}[/{subresource}]]`).

use super::discovery::{self, Res, ResInfo};
use super::error::{success_status, KubeSimError};
use super::objects;
use super::patch::{self, PatchKind};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{meta_str, ChangeKind, WriteScope};
use super::table::{self, Include};
use super::Shared;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    /// Ends open watches when the server stops.
    cancel: CancellationToken,
}

pub(crate) fn router(shared: Arc<Shared>, cancel: CancellationToken) -> Router {
    Router::new()
        .route(
            "/version",
            get(|| async { json_resp(StatusCode::OK, &discovery::version()) }),
        )
        .route("/api", get(core_versions))
        .route("/apis", get(group_list))
        .route("/api/{*rest}", any(dispatch))
        .route("/apis/{*rest}", any(dispatch))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            super::faults::layer,
        ))
        .merge(super::faults::routes().with_state(shared.clone()))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
        .with_state(AppState { shared, cancel })
}

fn json_resp(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

pub(crate) fn err_resp(e: &KubeSimError) -> Response {
    json_resp(e.status_code(), &e.to_status())
}

fn not_found_resource() -> Response {
    json_resp(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server could not find the requested resource",
                "reason": "NotFound", "details": {}, "code": 404}),
    )
}

/// 403 as the API server's authorizer words it.
fn forbidden_resp(method: &Method, route: &Route, info: &ResInfo, watch: bool) -> Response {
    let (verb, ns) = match route {
        Route::Collection { ns, .. } => (
            match *method {
                Method::GET if watch => "watch",
                Method::GET => "list",
                Method::POST => "create",
                Method::DELETE => "deletecollection",
                _ => "update",
            },
            ns.clone(),
        ),
        Route::Object { ns, .. } => (
            match *method {
                Method::GET => "get",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => "get",
            },
            Some(ns.clone()).filter(|n| !n.is_empty()),
        ),
        _ => ("get", None),
    };
    let scope = match ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    json_resp(
        StatusCode::FORBIDDEN,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{} is forbidden: User \"system:anonymous\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                    info.qualified(), info.plural, info.group),
                "reason": "Forbidden", "details": {"group": info.group, "kind": info.plural}, "code": 403}),
    )
}

async fn group_list(State(st): State<AppState>) -> Response {
    let unserved = st.shared.lock().unserved.clone();
    let served = |r: Res| !unserved.contains(&r);
    json_resp(StatusCode::OK, &discovery::api_group_list_served(&served))
}

async fn core_versions(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    json_resp(StatusCode::OK, &discovery::api_versions(host))
}

/// Where a request points.
pub(crate) enum Route {
    Discovery(String, String),
    GroupDoc(String),
    Collection {
        info: &'static ResInfo,
        ns: Option<String>,
    },
    Object {
        info: &'static ResInfo,
        ns: String,
        name: String,
        sub: Option<String>,
    },
}

pub(crate) fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => return Some(Route::GroupDoc(group.to_string())),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (ns, plural, name, sub) = match rest {
        [] => return Some(Route::Discovery(group.into(), version.into())),
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => (
            Some(*ns),
            *plural,
            tail.first().copied(),
            tail.get(1).copied(),
        ),
        [plural, tail @ ..] if tail.len() <= 2 => {
            (None, *plural, tail.first().copied(), tail.get(1).copied())
        }
        _ => return None,
    };
    let info = discovery::lookup(group, version, plural)?;
    if ns.is_some() && !info.namespaced {
        return None;
    }
    match name {
        None => Some(Route::Collection {
            info,
            ns: ns.map(str::to_string),
        }),
        Some(name) => {
            if info.namespaced && ns.is_none() {
                return None;
            }
            Some(Route::Object {
                info,
                ns: ns.unwrap_or("").to_string(),
                name: name.to_string(),
                sub: sub.map(str::to_string),
            })
        }
    }
}

type Query = HashMap<String, String>;

fn query(uri: &Uri) -> Query {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

/// A request body in the content type it declares: JSON (default) or YAML. Protobuf, which
/// client-go sends for built-in kinds unless told otherwise, is refused with 415.
fn decode_body(content_type: &str, body: &[u8]) -> Result<Value, KubeSimError> {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    match mime {
        "" | "application/json" | "*/*" => parse_json(body),
        "application/yaml" => serde_yaml_ng::from_slice(body).map_err(|e| {
            KubeSimError::BadRequest(format!("error decoding YAML: {}", e.to_string().replace('"', "'")))
        }),
        other => Err(KubeSimError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got \"{other}\")"
        ))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, KubeSimError> {
    serde_json::from_slice(body).map_err(|e| {
        KubeSimError::BadRequest(format!(
            "couldn't get version/kind; json parse error: {}",
            e.to_string().replace('"', "'")
        ))
    })
}

async fn dispatch(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(route) = parse_route(uri.path()) else {
        return not_found_resource();
    };
    let (unserved, forbidden) = {
        let inner = st.shared.lock();
        (inner.unserved.clone(), inner.forbidden.clone())
    };
    let served = |r: Res| !unserved.contains(&r);
    if let Route::Collection { info, .. } | Route::Object { info, .. } = &route {
        if !served(info.res) {
            return not_found_resource();
        }
        if forbidden.contains(&info.res) {
            return forbidden_resp(&method, &route, info, flag(&query(&uri), "watch"));
        }
    }
    let q = query(&uri);
    let tbl = table::wants_table(&headers)
        .then(|| Include::from_query(q.get("includeObject").map(String::as_str)));
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let result = match route {
        Route::Discovery(g, v) if method == Method::GET => {
            return match discovery::resource_list_served(&g, &v, &served) {
                Some(doc) => json_resp(StatusCode::OK, &doc),
                None => not_found_resource(),
            }
        }
        Route::GroupDoc(g) if method == Method::GET => {
            return match discovery::api_group_doc_served(&g, &served) {
                Some(doc) => json_resp(StatusCode::OK, &doc),
                None => not_found_resource(),
            }
        }
        Route::Discovery(..) | Route::GroupDoc(_) => Err(KubeSimError::MethodNotAllowed),
        Route::Collection { info, ns } => {
            if method != Method::GET && info.res != Res::TokenReview {
                if let Err(e) = count_write(&st.shared) {
                    return err_resp(&e);
                }
            }
            match method {
                Method::GET if flag(&q, "watch") => return watch(&st, info, ns, &q, tbl),
                Method::GET => list(&st.shared, info, ns.as_deref(), &q, tbl),
                Method::POST if info.res == Res::TokenReview => {
                    token_review(&st.shared, &ct, &body)
                }
                Method::POST => match ns.as_deref() {
                    Some(ns) => create(&st.shared, info, ns, &ct, &body, &q),
                    None if !info.namespaced => create(&st.shared, info, "", &ct, &body, &q),
                    None => Err(KubeSimError::MethodNotAllowed),
                },
                Method::DELETE => match ns.as_deref() {
                    Some(ns) => delete_collection(&st.shared, info, ns, &q),
                    None => Err(KubeSimError::MethodNotAllowed),
                },
                _ => Err(KubeSimError::MethodNotAllowed),
            }
        }
        Route::Object {
            info,
            ns,
            name,
            sub,
        } => {
            let scope = match sub.as_deref() {
                None => WriteScope::Main,
                Some("status") if info.status_subresource => WriteScope::Status,
                Some("scale") if info.has_scale() => WriteScope::Main,
                Some(_) => return not_found_resource(),
            };
            if info.res == Res::TokenReview {
                return err_resp(&KubeSimError::MethodNotAllowed);
            }
            if method != Method::GET {
                if let Err(e) = count_write(&st.shared) {
                    return err_resp(&e);
                }
            }
            if sub.as_deref() == Some("scale") {
                let r = scale(&st.shared, info, &ns, &name, &method, &ct, &body, &q);
                return match r {
                    Ok((code, v)) => json_resp(code, &v),
                    Err(e) => err_resp(&e),
                };
            }
            match method {
                Method::GET => get_object(&st.shared, info, &ns, &name, tbl),
                Method::PUT => update(&st.shared, info, &ns, &name, &ct, &body, scope, &q),
                Method::PATCH => patch_object(&st.shared, info, &ns, &name, &ct, &body, scope, &q),
                Method::DELETE if scope == WriteScope::Main => {
                    delete(&st.shared, info, &ns, &name, &body, &q)
                }
                _ => Err(KubeSimError::MethodNotAllowed),
            }
        }
    };
    match result {
        Ok((code, v)) => json_resp(code, &v),
        Err(e) => err_resp(&e),
    }
}

/// Count a write request and fire an injected fault if this is its turn.
fn count_write(shared: &Shared) -> Result<(), KubeSimError> {
    shared.lock().faults.on_write()
}

type ApiResult = Result<(StatusCode, Value), KubeSimError>;

// ---------------------------------------------------------------------------------------
// read verbs

/// Namespaces exist implicitly: a namespace that is asked for, or holds objects, is
/// materialised so it has a stable uid and creation time.
fn ensure_namespaces(inner: &mut super::Inner, names: &[String]) {
    for n in names {
        if objects::valid_name(n) && inner.store.get(Res::Namespace, "", n).is_none() {
            if let Ok(obj) = objects::admit(Res::Namespace, json!({"metadata": {"name": n}})) {
                let _ = inner.store.create(Res::Namespace, "", obj, false);
            }
        }
    }
}

fn get_object(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    name: &str,
    tbl: Option<Include>,
) -> ApiResult {
    let mut inner = shared.lock();
    if info.res == Res::Namespace {
        ensure_namespaces(&mut inner, &[name.to_string()]);
    }
    let obj = inner
        .store
        .get(info.res, ns, name)
        .cloned()
        .ok_or_else(|| KubeSimError::not_found(info, name))?;
    Ok(match tbl {
        Some(inc) => {
            let rv = json!({"resourceVersion": meta_str(&obj, "resourceVersion")});
            (StatusCode::OK, table::table(info, &[obj], rv, inc))
        }
        None => (StatusCode::OK, obj),
    })
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{ns}/{name}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(String, String), KubeSimError> {
    let bad = || {
        KubeSimError::BadRequest("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)".into())
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let start = v["start"].as_str().ok_or_else(bad)?;
    let start = start.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((ns.to_string(), name.to_string()))
}

fn selectors(info: &ResInfo, q: &Query) -> Result<(LabelSelector, FieldSelector), KubeSimError> {
    Ok((
        LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?,
        FieldSelector::parse(
            info.res,
            q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        )?,
    ))
}

fn list(
    shared: &Shared,
    info: &ResInfo,
    ns: Option<&str>,
    q: &Query,
    tbl: Option<Include>,
) -> ApiResult {
    let (labels, fields) = selectors(info, q)?;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let after = q
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(|c| decode_continue(c))
        .transpose()?;
    let mut inner = shared.lock();
    if info.res == Res::Namespace {
        let mut names: Vec<String> = ["default", "kube-system", "kube-public", "kube-node-lease"]
            .into_iter()
            .map(String::from)
            .collect();
        names.extend(inner.store.used_namespaces());
        ensure_namespaces(&mut inner, &names);
    }
    let rv = inner.store.rv();
    let mut items: Vec<Value> = inner
        .store
        .list(info.res, ns)
        .into_iter()
        .filter(|o| labels.matches_obj(o) && fields.matches_obj(o))
        .filter(|o| {
            after.as_ref().is_none_or(|(ans, aname)| {
                (meta_str(o, "namespace"), meta_str(o, "name")) > (ans.as_str(), aname.as_str())
            })
        })
        .cloned()
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit {
        if items.len() > limit {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let last = items.last().expect("limit > 0");
            meta["continue"] = json!(encode_continue(
                rv,
                meta_str(last, "namespace"),
                meta_str(last, "name")
            ));
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    if let Some(inc) = tbl {
        return Ok((StatusCode::OK, table::table(info, &items, meta, inc)));
    }
    Ok((
        StatusCode::OK,
        json!({
            "kind": format!("{}List", info.kind),
            "apiVersion": info.api_version(),
            "metadata": meta,
            "items": items,
        }),
    ))
}

// ---------------------------------------------------------------------------------------
// write verbs

fn create(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    ct: &str,
    body: &[u8],
    q: &Query,
) -> ApiResult {
    let obj = decode_body(ct, body)?;
    let body_ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    if info.namespaced && !body_ns.is_empty() && body_ns != ns {
        return Err(KubeSimError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        ));
    }
    let obj = objects::admit(info.res, obj)?;
    let created = shared.lock().store.create(info.res, ns, obj, dry_run(q))?;
    Ok((StatusCode::CREATED, created))
}

#[allow(clippy::too_many_arguments)]
fn update(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    name: &str,
    ct: &str,
    body: &[u8],
    scope: WriteScope,
    q: &Query,
) -> ApiResult {
    let obj = objects::admit(info.res, decode_body(ct, body)?)?;
    let mut inner = shared.lock();
    let cur = inner
        .store
        .get(info.res, ns, name)
        .ok_or_else(|| KubeSimError::not_found(info, name))?;
    if scope == WriteScope::Main {
        objects::validate_update(info.res, cur, &obj)?;
    }
    let stored = inner
        .store
        .update(info.res, ns, name, obj, scope, dry_run(q))?;
    Ok((StatusCode::OK, stored))
}

#[allow(clippy::too_many_arguments)]
fn patch_object(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
    scope: WriteScope,
    q: &Query,
) -> ApiResult {
    let kind = PatchKind::from_content_type(content_type)?;
    if kind == PatchKind::Strategic && info.is_custom() {
        // What the API server says for every custom resource.
        return Err(KubeSimError::UnsupportedMediaType(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
        ));
    }
    if kind == PatchKind::Apply && q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(KubeSimError::BadRequest(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(),
        ));
    }
    let p = patch::parse_body(kind, body)?;
    let mut inner = shared.lock();
    let Some(cur) = inner.store.get(info.res, ns, name).cloned() else {
        if kind == PatchKind::Apply && scope == WriteScope::Main {
            let mut obj = p;
            if obj.is_object() {
                obj["metadata"]["name"] = json!(name);
            }
            let obj = objects::admit(info.res, obj)?;
            let created = inner.store.create(info.res, ns, obj, dry_run(q))?;
            return Ok((StatusCode::CREATED, created));
        }
        return Err(KubeSimError::not_found(info, name));
    };
    let mut doc = cur.clone();
    patch::apply(kind, &mut doc, &p)?;
    let new = objects::admit(info.res, doc)?;
    if scope == WriteScope::Main {
        objects::validate_update(info.res, &cur, &new)?;
    }
    let stored = inner
        .store
        .update(info.res, ns, name, new, scope, dry_run(q))?;
    Ok((StatusCode::OK, stored))
}

/// The autoscaling/v1 `Scale` view of a Deployment or ReplicaSet.
fn scale_view(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector")
        .and_then(|s| {
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>(
                s.clone(),
            )
            .ok()
        })
        .map(|s| {
            s.match_labels
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta_str(obj, "name"),
            "namespace": meta_str(obj, "namespace"),
            "uid": meta_str(obj, "uid"),
            "resourceVersion": meta_str(obj, "resourceVersion"),
            "creationTimestamp": obj.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

/// `GET|PUT|PATCH .../{name}/scale`: reads and writes `spec.replicas` only.
#[allow(clippy::too_many_arguments)]
fn scale(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    name: &str,
    method: &Method,
    ct: &str,
    body: &[u8],
    q: &Query,
) -> ApiResult {
    let mut inner = shared.lock();
    let cur = inner
        .store
        .get(info.res, ns, name)
        .cloned()
        .ok_or_else(|| KubeSimError::not_found(info, name))?;
    let view = scale_view(&cur);
    let wanted = match *method {
        Method::GET => return Ok((StatusCode::OK, view)),
        Method::PUT => decode_body(ct, body)?,
        Method::PATCH => {
            let kind = PatchKind::from_content_type(ct)?;
            let p = patch::parse_body(kind, body)?;
            let mut doc = view;
            patch::apply(kind, &mut doc, &p)?;
            doc
        }
        _ => return Err(KubeSimError::MethodNotAllowed),
    };
    let replicas = wanted
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|r| *r >= 0 && *r <= i64::from(i32::MAX))
        .ok_or_else(|| KubeSimError::Invalid {
            qualified_kind: "Scale.autoscaling".into(),
            group: "autoscaling".into(),
            kind: "Scale".into(),
            name: name.into(),
            causes: vec![super::error::FieldCause {
                reason: "FieldValueInvalid",
                field: "spec.replicas".into(),
                message: "Invalid value: must be greater than or equal to 0".into(),
            }],
        })?;
    let mut next = cur.clone();
    next["spec"]["replicas"] = json!(replicas);
    let want_rv = meta_str(&wanted, "resourceVersion");
    next["metadata"]["resourceVersion"] = json!(want_rv);
    let stored = inner
        .store
        .update(info.res, ns, name, next, WriteScope::Main, dry_run(q))?;
    Ok((StatusCode::OK, scale_view(&stored)))
}

/// `DeleteOptions` from the body (kube-rs sends them there) and the query (kubectl).
struct DeleteOpts {
    grace: Option<i64>,
    uid: Option<String>,
    rv: Option<String>,
    dry_run: bool,
}

fn delete_opts(body: &[u8], q: &Query) -> Result<DeleteOpts, KubeSimError> {
    let b: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let grace = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or_else(|| b["gracePeriodSeconds"].as_i64());
    let body_dry = b["dryRun"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "All"));
    Ok(DeleteOpts {
        grace,
        uid: b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        rv: b
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run: dry_run(q) || body_dry,
    })
}

fn delete(
    shared: &Shared,
    info: &ResInfo,
    ns: &str,
    name: &str,
    body: &[u8],
    q: &Query,
) -> ApiResult {
    let opts = delete_opts(body, q)?;
    let mut inner = shared.lock();
    delete_one(&mut inner, info, ns, name, &opts)
}

fn delete_one(
    inner: &mut super::Inner,
    info: &ResInfo,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
) -> ApiResult {
    let cur = inner
        .store
        .get(info.res, ns, name)
        .ok_or_else(|| KubeSimError::not_found(info, name))?;
    if opts
        .uid
        .as_deref()
        .is_some_and(|u| u != meta_str(cur, "uid"))
        || opts
            .rv
            .as_deref()
            .is_some_and(|v| v != meta_str(cur, "resourceVersion"))
    {
        return Err(KubeSimError::conflict(info, name));
    }
    if info.res == Res::Pod {
        // Pods terminate gracefully and the API answers with the pod.
        let grace = opts.grace.unwrap_or_else(|| {
            cur.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        });
        let pod = if grace <= 0 {
            inner
                .store
                .delete(info.res, ns, name, None, None, opts.dry_run)?
        } else {
            inner
                .store
                .begin_graceful_delete(info.res, ns, name, grace, opts.dry_run)?
        };
        return Ok((StatusCode::OK, pod));
    }
    let gone = inner
        .store
        .delete(info.res, ns, name, None, None, opts.dry_run)?;
    Ok((
        StatusCode::OK,
        success_status(info, name, meta_str(&gone, "uid")),
    ))
}

fn delete_collection(shared: &Shared, info: &ResInfo, ns: &str, q: &Query) -> ApiResult {
    let (labels, fields) = selectors(info, q)?;
    let opts = delete_opts(b"", q)?;
    let mut inner = shared.lock();
    let names: Vec<String> = inner
        .store
        .list(info.res, Some(ns))
        .into_iter()
        .filter(|o| labels.matches_obj(o) && fields.matches_obj(o))
        .map(|o| meta_str(o, "name").to_string())
        .collect();
    let mut items = Vec::new();
    for n in names {
        let (_, v) = delete_one(&mut inner, info, ns, &n, &opts)?;
        items.push(v);
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", info.kind), "apiVersion": info.api_version(),
               "metadata": {"resourceVersion": inner.store.rv().to_string()}, "items": items}),
    ))
}

// ---------------------------------------------------------------------------------------
// TokenReview

fn token_review(shared: &Shared, ct: &str, body: &[u8]) -> ApiResult {
    let mut tr = objects::admit(Res::TokenReview, decode_body(ct, body)?)?;
    let token = tr
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    let audiences = tr
        .pointer("/spec/audiences")
        .filter(|a| a.as_array().is_some_and(|a| !a.is_empty()))
        .cloned()
        .unwrap_or_else(|| json!(["https://kubernetes.default.svc.cluster.local"]));
    let status = match shared.lock().tokens.get(&hash) {
        Some(id) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", id.namespace, id.name),
                "uid": id.uid,
                "groups": ["system:serviceaccounts",
                           format!("system:serviceaccounts:{}", id.namespace),
                           "system:authenticated"],
            },
            "audiences": audiences,
        }),
        None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
    };
    tr["status"] = status;
    tr["metadata"]["creationTimestamp"] = Value::Null;
    Ok((StatusCode::CREATED, tr))
}

// ---------------------------------------------------------------------------------------
// watch

fn watch_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(info: &ResInfo, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": meta}),
    )
}

fn watch(
    st: &AppState,
    info: &'static ResInfo,
    ns: Option<String>,
    q: &Query,
    tbl: Option<Include>,
) -> Response {
    // With a Table Accept header every event carries a one-row Table.
    let line = move |kind: &str, o: &Value| match tbl {
        Some(inc) => watch_line(
            kind,
            &table::table(info, std::slice::from_ref(o), json!({}), inc),
        ),
        None => watch_line(kind, o),
    };
    let (labels, fields) = match selectors(info, q) {
        Ok(s) => s,
        Err(e) => return err_resp(&e),
    };
    let matches = move |o: &Value| labels.matches_obj(o) && fields.matches_obj(o);
    let bookmarks = flag(q, "allowWatchBookmarks");
    let send_initial = flag(q, "sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs)
        .unwrap_or(st.shared.opts.default_watch_timeout);
    let from_rv = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<u64>());
    let from_rv = match from_rv {
        Some(Err(_)) => {
            return err_resp(&KubeSimError::BadRequest(
                "resourceVersion: Invalid value: must be an integer".into(),
            ))
        }
        Some(Ok(v)) => Some(v),
        None => None,
    };

    let mut changes = st.shared.changes.clone();
    changes.borrow_and_update();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut expired = false;
    let start_rv = {
        let inner = st.shared.lock();
        let rv = inner.store.rv();
        match from_rv {
            // "0", absent, or an explicit initial-events request: current state as ADDED.
            Some(0) | None => {
                for o in inner.store.list(info.res, ns.as_deref()) {
                    if matches(o) {
                        initial.push(line("ADDED", o));
                    }
                }
                if send_initial && bookmarks {
                    initial.push(bookmark(info, rv, true));
                }
                rv
            }
            Some(v) if send_initial => {
                for o in inner.store.list(info.res, ns.as_deref()) {
                    if matches(o) {
                        initial.push(line("ADDED", o));
                    }
                }
                if bookmarks {
                    initial.push(bookmark(info, rv.max(v), true));
                }
                rv.max(v)
            }
            Some(v) => {
                if let Err(e) = inner.store.changes_since(v) {
                    initial.push(watch_line("ERROR", &e.to_status()));
                    expired = true;
                }
                v
            }
        }
    };

    let shared = st.shared.clone();
    let cancel = st.cancel.clone();
    // Registered so the control API can close it; unregistered when the task ends.
    let (stop_tx, mut stop) = tokio::sync::watch::channel(None::<u64>);
    let id = {
        let mut inner = shared.lock();
        inner.next_watch += 1;
        let id = inner.next_watch;
        inner.watches.insert(
            id,
            super::faults::WatchCtl {
                resource: info.plural,
                stop: stop_tx,
            },
        );
        id
    };
    tokio::spawn(async move {
        struct Registered(Arc<Shared>, u64);
        impl Drop for Registered {
            fn drop(&mut self) {
                self.0.lock().watches.remove(&self.1);
            }
        }
        let _registered = Registered(shared.clone(), id);
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        // Events left before a disconnect the control API asked for (`None`: no limit).
        let mut budget: Option<u64> = *stop.borrow_and_update();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(shared.opts.bookmark_interval);
        ticker.tick().await;
        let mut last = start_rv;
        // Catch up on anything between the snapshot and now, then follow notifications.
        let mut pending = true;
        loop {
            if budget == Some(0) {
                return;
            }
            if pending {
                pending = false;
                let batch = {
                    let inner = shared.lock();
                    inner.store.changes_since(last)
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Ok(watch_line("ERROR", &e.to_status()))).await;
                        return;
                    }
                };
                for c in batch {
                    last = c.rv;
                    if c.res != info.res || ns.as_deref().is_some_and(|n| n != c.ns) {
                        continue;
                    }
                    let now_in = matches(&c.obj);
                    let kind = match c.kind {
                        ChangeKind::Modified => {
                            let was_in = c.prev.as_deref().is_some_and(&matches);
                            match (was_in, now_in) {
                                (true, true) => "MODIFIED",
                                (false, true) => "ADDED",
                                (true, false) => "DELETED",
                                (false, false) => continue,
                            }
                        }
                        k if now_in => k.as_str(),
                        _ => continue,
                    };
                    if tx.send(Ok(line(kind, &c.obj))).await.is_err() {
                        return;
                    }
                    if let Some(left) = &mut budget {
                        *left = left.saturating_sub(1);
                        if *left == 0 {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = stop.changed() => {
                    if r.is_err() {
                        return;
                    }
                    budget = *stop.borrow_and_update();
                }
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(info, last, false))).await.is_err() {
                        return;
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    pending = true;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_like_the_api_server() {
        let r = parse_route("/apis/apps/v1/namespaces/ns/deployments/web/status").unwrap();
        assert!(matches!(r, Route::Object { info, ns, name, sub: Some(s) }
            if info.res == Res::Deployment && ns == "ns" && name == "web" && s == "status"));
        let r = parse_route("/apis/apps/v1/deployments").unwrap();
        assert!(matches!(r, Route::Collection { info, ns: None } if info.res == Res::Deployment));
        let r = parse_route("/api/v1/namespaces/okr").unwrap();
        assert!(
            matches!(r, Route::Object { info, name, .. } if info.res == Res::Namespace && name == "okr")
        );
        let r = parse_route("/api/v1/namespaces/ns/pods").unwrap();
        assert!(
            matches!(r, Route::Collection { info, ns: Some(n) } if info.res == Res::Pod && n == "ns")
        );
        assert!(
            matches!(parse_route("/api/v1").unwrap(), Route::Discovery(g, v) if g.is_empty() && v == "v1")
        );
        assert!(matches!(parse_route("/apis/apps").unwrap(), Route::GroupDoc(g) if g == "apps"));
        assert!(
            parse_route("/apis/apps/v1/deployments/web").is_none(),
            "namespaced object needs a namespace"
        );
        assert!(parse_route("/apis/batch/v1/namespaces/ns/jobs").is_none());
        assert!(parse_route("/apis/authentication.k8s.io/v1/namespaces/ns/tokenreviews").is_none());
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, "ns", "b");
        assert_eq!(decode_continue(&t).unwrap(), ("ns".into(), "b".into()));
        assert_eq!(
            decode_continue("garbage!").unwrap_err().reason(),
            "BadRequest"
        );
    }
}
