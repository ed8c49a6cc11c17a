//! Acceptance test of the OpenAI simulator: driven through Prism (`prism proxy`) with the
//! official OpenAPI description, so every request and response is checked against it by a
//! validator nobody here wrote. Any `sl-violations` header or `Violation` line in Prism's
//! output fails the test; a negative control shows the check really fires.
//!
//! Error statuses the description does not declare for a path (401 everywhere, 404 on
//! retrieve/delete, 5xx) make Prism report "Unable to match the returned status code"
//! (a warning) for a correct upstream answer, without validating its body. Those cases are
//! sent straight to the simulator and their shape is asserted by hand. Declared errors
//! (400 on the service-account and API-key paths, 429 on usage, audit logs and chat) go
//! through Prism.
//!
//! The second test covers the paths the daemon's drain and reconciliation need (every
//! usage endpoint that filters by key, audit logs, admin API keys) and service-account key
//! expiry, which the official SDKs added after our copy of the description: it runs Prism on
//! the subset plus exactly those fields (`spec_with_key_expiry`, sources cited there).

use crate::support;
use openai_key_rotator::sandbox::openai::{FaultScope, Faults, OpenAiSim};
use openai_key_rotator::sandbox::{loopback, serve};
use openai_key_rotator::secret::Secret;
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "sk-admin-contract-test-0123456789abcdefghij";

/// Sends requests and remembers every `sl-violations` header Prism attaches.
struct Checked {
    http: reqwest::Client,
    violations: Vec<String>,
}

impl Checked {
    async fn send(&mut self, what: &str, req: RequestBuilder) -> (StatusCode, HeaderMap, Value) {
        let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = resp.status();
        let headers = resp.headers().clone();
        if let Some(v) = headers.get("sl-violations") {
            let v = v.to_str().unwrap_or("<non-ascii>").to_string();
            eprintln!("sl-violations on {what}: {v}");
            self.violations.push(format!("{what}: {v}"));
        }
        let text = resp.text().await.unwrap_or_default();
        // Prism answers a request that breaks the description itself (422 problem
        // document, no header), and with `--errors` a response that does (500).
        let problem = headers
            .get("content-type")
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/problem+json"));
        if problem {
            eprintln!("Prism problem document on {what}: {text}");
            self.violations.push(format!("{what}: {text}"));
        }
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    /// `send`, expecting 200.
    async fn ok(&mut self, what: &str, req: RequestBuilder) -> Value {
        let (status, _, body) = self.send(what, req).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        body
    }
}

/// The four-key OpenAI error shape, checked by hand (for statuses Prism cannot check).
fn assert_error_shape(v: &Value, kind: &str, code: Option<&str>) {
    let e = &v["error"];
    let obj = e
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {v}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert!(e["message"].is_string(), "{v}");
    assert!(e["param"].is_null() || e["param"].is_string(), "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"].as_str(), code, "{v}");
}

/// Prism's log lines that report a violation: `Violation: ...` (logged and passed on), a
/// request terminated with `#VIOLATIONS` (`--errors` on a bad response) or
/// `#UNPROCESSABLE_ENTITY` (a bad request).
fn violation_lines(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| {
            l.contains("Violation:")
                || l.contains("#VIOLATIONS")
                || l.contains("#UNPROCESSABLE_ENTITY")
        })
        .map(str::to_string)
        .collect()
}

/// Prism writes its log after answering: wait a little for `n` violation lines.
async fn await_violation_lines(guard: &support::ChildGuard, n: usize) -> Vec<String> {
    for _ in 0..50 {
        let lines = violation_lines(&guard.output());
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    violation_lines(&guard.output())
}

#[tokio::test]
async fn openai_sim_satisfies_the_official_description_through_prism() {
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("contract");
    let other_projects = [
        sim.create_project("contract-2"),
        sim.create_project("contract-3"),
    ];
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve simulator");
    let direct = format!("{}/v1", server.url());
    let prism = support::start_prism(&support::openai_spec(), &direct).await;
    let p = prism.url.clone();
    let mut c = Checked {
        http: reqwest::Client::new(),
        violations: Vec::new(),
    };
    let http = c.http.clone();
    let admin = |req: RequestBuilder| req.bearer_auth(ADMIN);

    // Projects: list page by page (limit=1), get.
    let mut project_ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req =
            admin(http.get(format!("{p}/organization/projects"))).query(&[("limit", "1")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let v = c.ok("projects.list", req).await;
        project_ids.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string()),
        );
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
        assert!(project_ids.len() < 10, "paging does not end");
    }
    let mut want = vec![project.clone()];
    want.extend(other_projects.iter().cloned());
    assert_eq!(project_ids, want);
    let v = c
        .ok(
            "projects.retrieve",
            admin(http.get(format!("{p}/organization/projects/{project}"))),
        )
        .await;
    assert_eq!(v["id"], project.as_str());

    // Service accounts: create five, page with limit=2 until has_more is false.
    let sa = format!("{p}/organization/projects/{project}/service_accounts");
    let mut created = Vec::new();
    for i in 0..5 {
        let v = c
            .ok(
                "service_accounts.create",
                admin(http.post(&sa)).json(&json!({"name": format!("okr-contract-{i}")})),
            )
            .await;
        created.push(v);
    }
    let created_ids: Vec<String> = created
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = admin(http.get(&sa)).query(&[("limit", "2")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let v = c.ok("service_accounts.list", req).await;
        listed.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string()),
        );
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
        assert!(listed.len() < 20, "paging does not end");
    }
    assert_eq!(listed, created_ids);
    let v = c
        .ok(
            "service_accounts.retrieve",
            admin(http.get(format!("{sa}/{}", created_ids[0]))),
        )
        .await;
    assert_eq!(v["name"], "okr-contract-0");

    // API keys: list (paged) and get.
    let keys_url = format!("{p}/organization/projects/{project}/api_keys");
    let mut key_ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = admin(http.get(&keys_url)).query(&[("limit", "2")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let v = c.ok("api_keys.list", req).await;
        key_ids.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string()),
        );
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
        assert!(key_ids.len() < 20, "paging does not end");
    }
    let want_keys: Vec<String> = created
        .iter()
        .map(|v| v["api_key"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(key_ids, want_keys);

    // A user-owned key (the inventory's other owner type), listed with
    // owner_project_access=any, paged across the service-account keys before it.
    let user_project = &other_projects[0];
    sim.create_service_account(user_project, "okr-contract-user-neighbour")
        .unwrap();
    let user_key = sim
        .create_user_key(user_project, "user_contract", "laptop", Some(1_700_000_000))
        .unwrap();
    let v = c
        .ok(
            "api_keys.list (user-owned key, owner_project_access=any)",
            admin(http.get(format!("{p}/organization/projects/{user_project}/api_keys")))
                .query(&[("owner_project_access", "any"), ("limit", "1")]),
        )
        .await;
    assert_eq!(v["has_more"], true);
    let after = v["last_id"].as_str().unwrap().to_string();
    let v = c
        .ok(
            "api_keys.list (user-owned key, second page)",
            admin(http.get(format!("{p}/organization/projects/{user_project}/api_keys")))
                .query(&[("owner_project_access", "any"), ("after", after.as_str())]),
        )
        .await;
    assert_eq!(v["data"][0]["id"], user_key.as_str());
    assert_eq!(v["data"][0]["owner"]["type"], "user");
    assert_eq!(v["data"][0]["owner"]["user"]["id"], "user_contract");
    assert_eq!(v["data"][0]["last_used_at"], 1_700_000_000);
    let v = c
        .ok(
            "api_keys.retrieve",
            admin(http.get(format!("{keys_url}/{}", key_ids[0]))),
        )
        .await;
    assert_eq!(v["owner"]["service_account"]["id"], created_ids[0].as_str());

    // Data plane with two of the keys.
    let key0 = created[0]["api_key"]["value"].as_str().unwrap().to_string();
    let key1 = created[1]["api_key"]["value"].as_str().unwrap().to_string();
    let v = c
        .ok(
            "models.list",
            http.get(format!("{p}/models")).bearer_auth(&key0),
        )
        .await;
    assert!(!v["data"].as_array().unwrap().is_empty());
    let chat =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]});
    for (key, n) in [(&key0, 2), (&key1, 1)] {
        for _ in 0..n {
            let v = c
                .ok(
                    "chat.completions.create",
                    http.post(format!("{p}/chat/completions"))
                        .bearer_auth(key)
                        .json(&chat),
                )
                .await;
            assert_eq!(v["object"], "chat.completion");
        }
    }
    assert_eq!(sim.requests_served(&key_ids[0]), 3);
    assert_eq!(sim.requests_served(&key_ids[1]), 1);
    let v = c
        .ok(
            "api_keys.retrieve",
            admin(http.get(format!("{keys_url}/{}", key_ids[0]))),
        )
        .await;
    assert!(v["last_used_at"].is_i64(), "{v}");

    // Usage: the description's array encoding (repeated `group_by=`), the Python SDK's
    // `group_by[]=`, with and without a key filter.
    let start = (sim.now() - 120).to_string();
    let usage_url = format!("{p}/organization/usage/completions");
    let count_per_key = |v: &Value| {
        let mut m = std::collections::BTreeMap::new();
        for b in v["data"].as_array().unwrap() {
            assert_eq!(b["object"], "bucket");
            for r in b["results"].as_array().unwrap() {
                *m.entry(r["api_key_id"].as_str().unwrap_or("<null>").to_string())
                    .or_insert(0) += r["num_model_requests"].as_u64().unwrap();
            }
        }
        m
    };
    let expect =
        std::collections::BTreeMap::from([(key_ids[0].clone(), 2u64), (key_ids[1].clone(), 1)]);
    let v = c
        .ok(
            "usage (group_by=)",
            admin(http.get(&usage_url)).query(&[
                ("start_time", start.as_str()),
                ("bucket_width", "1m"),
                ("group_by", "api_key_id"),
            ]),
        )
        .await;
    assert_eq!(count_per_key(&v), expect, "{v}");
    let v = c
        .ok(
            "usage (repeated group_by=)",
            admin(http.get(&usage_url)).query(&[
                ("start_time", start.as_str()),
                ("bucket_width", "1h"),
                ("group_by", "api_key_id"),
                ("group_by", "model"),
            ]),
        )
        .await;
    assert_eq!(count_per_key(&v), expect, "{v}");
    let v = c
        .ok(
            "usage (group_by[]=, api_key_ids[]=)",
            admin(http.get(&usage_url)).query(&[
                ("start_time", start.as_str()),
                ("bucket_width", "1m"),
                ("group_by[]", "api_key_id"),
                ("api_key_ids[]", key_ids[1].as_str()),
            ]),
        )
        .await;
    assert_eq!(
        count_per_key(&v),
        std::collections::BTreeMap::from([(key_ids[1].clone(), 1u64)]),
        "{v}"
    );
    let v = c
        .ok(
            "usage (api_key_ids=, no group_by)",
            admin(http.get(&usage_url)).query(&[
                ("start_time", start.as_str()),
                ("api_key_ids", key_ids[0].as_str()),
            ]),
        )
        .await;
    assert_eq!(
        count_per_key(&v),
        std::collections::BTreeMap::from([("<null>".to_string(), 2u64)]),
        "{v}"
    );

    // Declared errors, validated by Prism: 400 on the service-account list and on deleting
    // a service account's key; 429 (with Retry-After) on usage and chat.
    for limit in ["0", "101"] {
        let (s, _, v) = c
            .send(
                "service_accounts.list bad limit",
                admin(http.get(&sa)).query(&[("limit", limit)]),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_error_shape(&v, "invalid_request_error", v["error"]["code"].as_str());
    }
    let (s, _, v) = c
        .send(
            "api_keys.delete (service account key)",
            admin(http.delete(format!("{keys_url}/{}", key_ids[2]))),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    sim.set_faults(
        Faults::rate_limit(0)
            .in_scope(FaultScope::Both)
            .only("usage.completions")
            .only("chat.completions.create"),
    );
    let (s, h, v) = c
        .send(
            "usage 429",
            admin(http.get(&usage_url)).query(&[("start_time", start.as_str())]),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(h.contains_key("retry-after"));
    let (s, h, v) = c
        .send(
            "chat 429",
            http.post(format!("{p}/chat/completions"))
                .bearer_auth(&key0)
                .json(&chat),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    for name in [
        "retry-after",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ] {
        assert!(h.contains_key(name), "{name} missing: {h:?}");
    }
    assert_error_shape(&v, "requests", Some("rate_limit_exceeded"));
    // Under a rate limit every Admin API answer carries the x-ratelimit headers, and the
    // description still holds for the successful ones.
    sim.set_faults(Faults::rate_limit(100));
    let (s, h, v) = c
        .send(
            "projects.list with rate-limit headers",
            admin(http.get(format!("{p}/organization/projects"))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h["x-ratelimit-limit-requests"], "100");
    assert_eq!(h["x-ratelimit-remaining-requests"], "99");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    sim.clear_faults();

    // `expires_in_seconds` (from the SDKs, newer than this description) passes the
    // unmodified subset unchecked, as does `expires_at` in the answer: the schemas leave
    // additional properties open. The next test checks both against the subset plus the
    // SDKs' fields, where a wrong type is caught.
    let v = c
        .ok(
            "service_accounts.create (expires_in_seconds, unknown to the subset)",
            admin(http.post(&sa))
                .json(&json!({"name": "okr-contract-expiring", "expires_in_seconds": 60})),
        )
        .await;
    assert!(v["api_key"]["expires_at"].is_i64(), "{v}");

    // Delete through Prism; the key dies.
    let victim = format!("{sa}/{}", created_ids[0]);
    let v = c
        .ok("service_accounts.delete", admin(http.delete(&victim)))
        .await;
    assert_eq!(v["deleted"], true);
    assert!(!sim.key_is_live(&key0));

    // Undeclared error statuses, straight to the simulator (see the module doc).
    let (s, _, v) = c
        .send(
            "direct: get after delete",
            admin(http.get(format!(
                "{direct}/organization/projects/{project}/service_accounts/{}",
                created_ids[0]
            ))),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error_shape(&v, "invalid_request_error", None);
    let (s, _, v) = c
        .send(
            "direct: dead key",
            http.get(format!("{direct}/models")).bearer_auth(&key0),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "invalid_request_error", Some("invalid_api_key"));
    assert!(!v["error"]["message"].as_str().unwrap().contains(&key0));
    let (s, _, v) = c
        .send(
            "direct: bad admin key",
            http.get(format!("{direct}/organization/projects"))
                .bearer_auth("sk-admin-not-the-right-one-0123456789"),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "invalid_request_error", Some("invalid_api_key"));
    let (s, _, v) = c
        .send(
            "direct: no key",
            http.get(format!("{direct}/organization/projects")),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "invalid_request_error", None);

    // Nothing so far broke the description, on the wire or in Prism's log.
    let output = prism.guard.output();
    assert!(
        c.violations.is_empty() && violation_lines(&output).is_empty(),
        "contract violations:\n{}\nPrism log lines:\n{}",
        c.violations.join("\n"),
        violation_lines(&output).join("\n")
    );

    // Negative controls in this same Prism: the checks fire. (1) A wrong-typed query
    // parameter breaks the description on the request side: Prism answers 422 itself.
    // (2) An injected 500 on a path that declares only 200 is reported in `sl-violations`.
    let (s, _, v) = c
        .send(
            "negative control: bad request",
            admin(http.get(&sa)).query(&[("limit", "two")]),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        c.violations.len(),
        1,
        "the bad request was not flagged: {v}"
    );
    assert!(c.violations[0].contains("limit"), "{}", c.violations[0]);
    sim.set_faults(Faults::fail_next(1, 500).only("projects.list"));
    let (s, h, v) = c
        .send(
            "negative control: undeclared 500",
            admin(http.get(format!("{p}/organization/projects"))),
        )
        .await;
    sim.clear_faults();
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let header = h
        .get("sl-violations")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    assert!(
        header
            .as_deref()
            .is_some_and(|v| v.contains("Unable to match the returned status code")),
        "the undeclared status was not flagged: {header:?}"
    );
    assert_error_shape(&v, "server_error", None);
    let lines = await_violation_lines(&prism.guard, 2).await;
    assert_eq!(lines.len(), 2, "Prism log:\n{}", prism.guard.output());
}

/// Negative control for the response side: Prism in front of a deliberately wrong upstream
/// (a project list missing `object` and `has_more`, a project without `object` and
/// `created_at`) must report it.
#[tokio::test]
async fn prism_flags_an_upstream_that_breaks_the_description() {
    use axum::routing::get;
    let bad = axum::Router::new().route(
        "/v1/organization/projects",
        get(|| async { axum::Json(json!({"data": [{"id": "proj_bad", "name": "x"}]})) }),
    );
    let server = serve(bad, loopback(0), CancellationToken::new())
        .await
        .expect("serve");
    let prism =
        support::start_prism(&support::openai_spec(), &format!("{}/v1", server.url())).await;
    let mut c = Checked {
        http: reqwest::Client::new(),
        violations: Vec::new(),
    };
    let req = c
        .http
        .get(format!("{}/organization/projects", prism.url))
        .bearer_auth(ADMIN);
    let (status, _, body) = c.send("bad upstream", req).await;
    // One from the header, one for the problem document `--errors` sent instead.
    assert_eq!(
        c.violations.len(),
        2,
        "no violation reported: {status} {body}"
    );
    let v = &c.violations[0];
    assert!(v.contains("has_more") && v.contains("object"), "{v}");
    // `--errors` turns response violations into a 500 problem document.
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(!await_violation_lines(&prism.guard, 1).await.is_empty());
}

/// The contract subset plus what the official SDKs added for service-account key expiry
/// after our copy of the description (2026-08-21) was cut, so Prism type-checks those
/// fields instead of letting them through unchecked as unknown properties (the description
/// leaves `additionalProperties` open, so the old one accepts them silently; see the first
/// test). Sources: the merged SDK pull requests of 2026-09-09, openai/openai-python#3825
/// ("Add the optional `expires_in_seconds` parameter to ... service account creation";
/// "Add `expires_at` expiration metadata to project API key and service account creation
/// response types"), openai/openai-ruby#689 (`lib/openai/models/admin/organization/projects/
/// service_account_create_params.rb`: `expires_in_seconds`, `[Integer, nil]`; nullable
/// `expires_at` on `ProjectAPIKey` and on the created account's `api_key`), and the same in
/// openai-node#2708, openai-java#984, openai-go#906. The SDK source after that change is
/// not in the stored snapshots (they end 2026-08-22), so the field types come from those
/// threads: integer or null both ways, no published bounds. Only optional properties are
/// added; nothing the subset says is loosened. `tests/contract/` keeps the unmodified excerpt.
pub(crate) fn spec_with_key_expiry(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(support::openai_spec()).expect("read the subset");
    let mut spec: Value = serde_json::from_str(&text).expect("parse the subset");
    let nullable_int = json!({"anyOf": [{"type": "integer"}, {"type": "null"}]});
    let schemas = &mut spec["components"]["schemas"];
    for (schema, field) in [
        ("ProjectServiceAccountCreateRequest", "expires_in_seconds"),
        ("ProjectServiceAccountApiKey", "expires_at"),
        ("ProjectApiKey", "expires_at"),
    ] {
        let props = &mut schemas[schema]["properties"];
        assert!(
            props.is_object(),
            "{schema} has no properties in the subset"
        );
        assert!(
            props.get(field).is_none(),
            "{schema}.{field} is already described"
        );
        props[field] = nullable_int.clone();
    }
    let path = dir.join("openai-openapi-subset-with-key-expiry.json");
    std::fs::write(&path, spec.to_string()).expect("write the patched subset");
    path
}

/// Requests per `api_key_id` in a usage page (`num_model_requests`, else `num_requests`).
fn usage_per_key(v: &Value) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for b in v["data"].as_array().expect("data") {
        assert_eq!(b["object"], "bucket");
        for r in b["results"].as_array().expect("results") {
            let n = r["num_model_requests"]
                .as_u64()
                .or_else(|| r["num_requests"].as_u64())
                .expect("a request count");
            *m.entry(r["api_key_id"].as_str().unwrap_or("<null>").to_string())
                .or_insert(0) += n;
        }
    }
    m
}

/// Every usage endpoint that filters by key, audit logs, admin API keys and key expiry,
/// through Prism; then negative controls that the checks fire on these paths.
#[tokio::test]
async fn usage_audit_logs_admin_keys_and_key_expiry_satisfy_the_description_through_prism() {
    use openai_key_rotator::sandbox::openai::{AuditActor, UsageEndpoint};
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("contract");
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve simulator");
    let direct = format!("{}/v1", server.url());
    let dir = tempfile::tempdir().expect("tempdir");
    let prism = support::start_prism(&spec_with_key_expiry(dir.path()), &direct).await;
    let p = prism.url.clone();
    let mut c = Checked {
        http: reqwest::Client::new(),
        violations: Vec::new(),
    };
    let http = c.http.clone();
    let admin = |req: RequestBuilder| req.bearer_auth(ADMIN);
    let sa = format!("{p}/organization/projects/{project}/service_accounts");
    let keys_url = format!("{p}/organization/projects/{project}/api_keys");

    // Key expiry: create with and without `expires_in_seconds`; the expiry shows on the
    // create answer and on the key object.
    let now = sim.now();
    let short = c
        .ok(
            "service_accounts.create (expires_in_seconds)",
            admin(http.post(&sa)).json(&json!({"name": "okr-short", "expires_in_seconds": 3600})),
        )
        .await;
    let expires_at = short["api_key"]["expires_at"].as_i64().expect("expires_at");
    assert!((now + 3600..=now + 3602).contains(&expires_at), "{short}");
    let plain = c
        .ok(
            "service_accounts.create (expires_in_seconds: null)",
            admin(http.post(&sa)).json(&json!({"name": "okr-plain", "expires_in_seconds": null})),
        )
        .await;
    assert_eq!(plain["api_key"]["expires_at"], Value::Null);
    let short_key = short["api_key"]["id"].as_str().unwrap().to_string();
    let plain_key = plain["api_key"]["id"].as_str().unwrap().to_string();
    let short_value = short["api_key"]["value"].as_str().unwrap().to_string();
    let v = c
        .ok(
            "api_keys.retrieve (expires_at)",
            admin(http.get(format!("{keys_url}/{short_key}"))),
        )
        .await;
    assert_eq!(v["expires_at"], expires_at);
    let v = c
        .ok("api_keys.list (expires_at)", admin(http.get(&keys_url)))
        .await;
    assert_eq!(v["data"][1]["expires_at"], Value::Null);
    let (s, _, v) = c
        .send(
            "service_accounts.create (expiry without a key): 400",
            admin(http.post(&sa)).json(&json!({
                "name": "okr-bare", "create_service_account_only": true, "expires_in_seconds": 60
            })),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error_shape(&v, "invalid_request_error", None);

    // Usage on every endpoint: planted for both keys, asked per key in both array forms.
    let t = sim.now();
    for (i, ep) in UsageEndpoint::ALL.into_iter().enumerate() {
        sim.record_usage(&short_key, ep, t - 90, i as u64 + 1)
            .unwrap();
        sim.record_usage(&plain_key, ep, t - 30, 2).unwrap();
    }
    let start = (t - 600).to_string();
    for (i, ep) in UsageEndpoint::ALL.into_iter().enumerate() {
        let url = format!("{p}/organization/usage/{}", ep.path());
        let v = c
            .ok(
                &format!("{} (group_by=api_key_id)", ep.operation()),
                admin(http.get(&url)).query(&[
                    ("start_time", start.as_str()),
                    ("bucket_width", "1m"),
                    ("group_by", "api_key_id"),
                    ("limit", "20"),
                ]),
            )
            .await;
        assert_eq!(
            usage_per_key(&v),
            std::collections::BTreeMap::from([
                (short_key.clone(), i as u64 + 1),
                (plain_key.clone(), 2)
            ]),
            "{}: {v}",
            ep.path()
        );
        let v = c
            .ok(
                &format!(
                    "{} (group_by[]=, api_key_ids[]=, project_ids[]=)",
                    ep.operation()
                ),
                admin(http.get(&url)).query(&[
                    ("start_time", start.as_str()),
                    ("bucket_width", "1h"),
                    ("group_by[]", "api_key_id"),
                    ("group_by[]", "project_id"),
                    ("api_key_ids[]", plain_key.as_str()),
                    ("project_ids[]", project.as_str()),
                ]),
            )
            .await;
        assert_eq!(
            usage_per_key(&v),
            std::collections::BTreeMap::from([(plain_key.clone(), 2)]),
            "{}: {v}",
            ep.path()
        );
        let v = c
            .ok(
                &format!("{} (no group_by, default width)", ep.operation()),
                admin(http.get(&url)).query(&[("start_time", start.as_str())]),
            )
            .await;
        assert_eq!(usage_per_key(&v)["<null>"], i as u64 + 3, "{v}");
    }
    // Each endpoint's own dimensions and filters.
    let usage = |ep: &str| format!("{p}/organization/usage/{ep}");
    for (what, ep, query) in [
        (
            "usage.completions (model, batch, service_tier)",
            "completions",
            vec![
                ("group_by", "model"),
                ("group_by", "batch"),
                ("group_by", "service_tier"),
                ("models", "gpt-4o-mini"),
                ("batch", "false"),
            ],
        ),
        (
            "usage.images (size, source)",
            "images",
            vec![
                ("group_by", "size"),
                ("group_by", "source"),
                ("sources", "image.generation"),
                ("sizes", "1024x1024"),
            ],
        ),
        (
            "usage.file_search_calls (vector_store_id)",
            "file_search_calls",
            vec![
                ("group_by", "vector_store_id"),
                ("vector_store_ids", "vs_sim"),
            ],
        ),
        (
            "usage.web_search_calls (context_level)",
            "web_search_calls",
            vec![
                ("group_by", "context_level"),
                ("group_by", "model"),
                ("context_levels", "medium"),
            ],
        ),
        (
            "usage.audio_transcriptions (models)",
            "audio_transcriptions",
            vec![("group_by", "model"), ("models", "gpt-4o-transcribe")],
        ),
    ] {
        let mut q = vec![("start_time", start.as_str()), ("bucket_width", "1d")];
        q.extend(query);
        let v = c.ok(what, admin(http.get(usage(ep))).query(&q)).await;
        let r = &v["data"][0]["results"][0];
        assert!(r.is_object(), "{what}: nothing matched: {v}");
    }
    // Paging: limit counts buckets, next_page continues.
    let mut pages = 0;
    let mut total = 0;
    let mut page: Option<String> = None;
    loop {
        let mut req = admin(http.get(usage("embeddings"))).query(&[
            ("start_time", start.as_str()),
            ("bucket_width", "1m"),
            ("limit", "4"),
            ("api_key_ids", short_key.as_str()),
        ]);
        if let Some(pg) = &page {
            req = req.query(&[("page", pg)]);
        }
        let v = c.ok("usage.embeddings (paged)", req).await;
        total += usage_per_key(&v).values().sum::<u64>();
        pages += 1;
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        page = Some(v["next_page"].as_str().unwrap().to_string());
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(
        total, 2,
        "embeddings is endpoint 1: 2 requests of the short key"
    );
    assert!(pages >= 3, "{pages}");
    // last_used_at follows the use.
    let v = c
        .ok(
            "api_keys.retrieve (last_used_at)",
            admin(http.get(format!("{keys_url}/{plain_key}"))),
        )
        .await;
    assert_eq!(v["last_used_at"], t - 30);

    // Admin API keys: the simulator's own key is the first; create, page, get, delete.
    let list = format!("{p}/organization/admin_api_keys");
    let made = c
        .ok(
            "admin_api_keys.create",
            admin(http.post(&list)).json(&json!({"name": "okr-ci", "expires_in_seconds": 86_400})),
        )
        .await;
    let made_id = made["id"].as_str().unwrap().to_string();
    let made_value = made["value"].as_str().unwrap().to_string();
    let v = c
        .ok(
            "admin_api_keys.create (no expiry)",
            admin(http.post(&list)).json(&json!({"name": "okr-forever"})),
        )
        .await;
    assert_eq!(v["expires_at"], Value::Null);
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = admin(http.get(&list)).query(&[("limit", "1")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let v = c.ok("admin_api_keys.list (paged)", req).await;
        ids.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["id"].as_str().unwrap().to_string()),
        );
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
        assert!(ids.len() < 10, "paging does not end");
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[1], made_id);
    let v = c
        .ok(
            "admin_api_keys.list (order=desc)",
            admin(http.get(&list)).query(&[("order", "desc")]),
        )
        .await;
    assert_eq!(v["data"][0]["id"], ids[2].as_str());
    let v = c
        .ok(
            "admin_api_keys.retrieve (with the new key)",
            http.get(format!("{list}/{made_id}"))
                .bearer_auth(&made_value),
        )
        .await;
    assert!(
        v["last_used_at"].is_i64() && v.get("value").is_none(),
        "{v}"
    );
    let v = c
        .ok(
            "admin_api_keys.delete",
            admin(http.delete(format!("{list}/{made_id}"))),
        )
        .await;
    assert_eq!(v["deleted"], true);
    let (s, _, v) = c
        .send(
            "direct: deleted admin key",
            http.get(format!("{direct}/organization/projects"))
                .bearer_auth(&made_value),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "invalid_request_error", Some("invalid_api_key"));

    // Audit logs: what the calls above did, plus events by others in the other actor shapes.
    let admin_id = sim.admin_keys()[0].id.clone();
    sim.inject_audit_event(
        "service_account.created",
        "svc_acct_dashboard",
        Some(&project),
        AuditActor::Session {
            user_id: "user-alice".into(),
            email: "alice@example.com".into(),
        },
    )
    .unwrap();
    sim.inject_audit_event(
        "api_key.updated",
        &plain_key,
        Some(&project),
        AuditActor::ServiceAccountApiKey {
            key_id: "key_robot".into(),
            service_account_id: "svc_acct_robot".into(),
        },
    )
    .unwrap();
    let audit = format!("{p}/organization/audit_logs");
    let all = c
        .ok(
            "audit_logs.list",
            admin(http.get(&audit)).query(&[("limit", "100")]),
        )
        .await;
    let types: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "api_key.updated",
            "service_account.created",
            "api_key.deleted",
            "api_key.created",
            "api_key.created",
            "api_key.created",
            "service_account.created",
            "api_key.created",
            "service_account.created",
        ],
        "{all}"
    );
    let v = c
        .ok(
            "audit_logs.list (filters)",
            admin(http.get(&audit)).query(&[
                ("event_types[]", "service_account.created"),
                ("actor_ids[]", admin_id.as_str()),
                ("project_ids[]", project.as_str()),
                ("effective_at[gte]", &(now - 5).to_string()),
                ("effective_at[lt]", &(sim.now() + 5).to_string()),
            ]),
        )
        .await;
    assert_eq!(
        v["data"].as_array().unwrap().len(),
        2,
        "our two creates: {v}"
    );
    let v = c
        .ok(
            "audit_logs.list (resource_ids[], actor_emails[])",
            admin(http.get(&audit)).query(&[
                ("resource_ids[]", "svc_acct_dashboard"),
                ("actor_emails[]", "alice@example.com"),
            ]),
        )
        .await;
    assert_eq!(v["data"][0]["actor"]["type"], "session", "{v}");
    let first = c
        .ok(
            "audit_logs.list (limit=2)",
            admin(http.get(&audit)).query(&[("limit", "2")]),
        )
        .await;
    let next = c
        .ok(
            "audit_logs.list (after)",
            admin(http.get(&audit)).query(&[
                ("limit", "2"),
                ("after", first["last_id"].as_str().unwrap()),
            ]),
        )
        .await;
    let back = c
        .ok(
            "audit_logs.list (before)",
            admin(http.get(&audit)).query(&[
                ("limit", "2"),
                ("before", next["first_id"].as_str().unwrap()),
            ]),
        )
        .await;
    assert_eq!(back["data"], first["data"]);
    // Declared 429s on the new paths.
    sim.set_faults(
        Faults::rate_limit(0)
            .only("audit_logs.list")
            .only("usage.web_search_calls"),
    );
    for (what, url) in [
        ("audit_logs.list 429", audit.clone()),
        ("usage.web_search_calls 429", usage("web_search_calls")),
    ] {
        let (s, h, v) = c
            .send(
                what,
                admin(http.get(&url)).query(&[("start_time", start.as_str())]),
            )
            .await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{what}: {v}");
        assert!(h.contains_key("retry-after"));
    }
    sim.clear_faults();
    // Audit logging off: the simulator's 403 (undeclared, so straight to it).
    sim.set_audit_logging(false);
    let (s, _, v) = c
        .send(
            "direct: audit logging off",
            admin(http.get(format!("{direct}/organization/audit_logs"))),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_error_shape(&v, "invalid_request_error", None);
    sim.set_audit_logging(true);
    // The expired key gets 401 on the data plane (undeclared: straight to the simulator).
    assert_eq!(
        c.send(
            "direct: models before expiry",
            http.get(format!("{direct}/models"))
                .bearer_auth(&short_value)
        )
        .await
        .0,
        StatusCode::OK
    );
    sim.advance_clock(3601);
    let (s, _, v) = c
        .send(
            "direct: expired key",
            http.get(format!("{direct}/models"))
                .bearer_auth(&short_value),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "invalid_request_error", Some("invalid_api_key"));

    let output = prism.guard.output();
    assert!(
        c.violations.is_empty() && violation_lines(&output).is_empty(),
        "contract violations:\n{}\nPrism log lines:\n{}",
        c.violations.join("\n"),
        violation_lines(&output).join("\n")
    );

    // Negative controls: (1) a wrong-typed `expires_in_seconds` is caught by Prism itself
    // (only because of the added property: the unpatched subset lets it through), (2) a
    // `group_by` value file searches do not have, (3) an undeclared 500 on an admin-key path.
    let (s, _, v) = c
        .send(
            "negative control: expires_in_seconds as a string",
            admin(http.post(&sa)).json(&json!({"name": "okr-bad", "expires_in_seconds": "soon"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("expires_in_seconds"), "{v}");
    let (s, _, v) = c
        .send(
            "negative control: group_by=model on file searches",
            admin(http.get(usage("file_search_calls")))
                .query(&[("start_time", start.as_str()), ("group_by", "model")]),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(c.violations.len(), 2, "{:#?}", c.violations);
    sim.set_faults(Faults::fail_next(1, 500).only("admin_api_keys.list"));
    let (s, h, _) = c
        .send("negative control: undeclared 500", admin(http.get(&list)))
        .await;
    sim.clear_faults();
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        h.get("sl-violations").is_some_and(|v| v
            .to_str()
            .unwrap_or_default()
            .contains("Unable to match the returned status code")),
        "the undeclared status was not flagged: {h:?}"
    );
    let lines = await_violation_lines(&prism.guard, 3).await;
    assert_eq!(lines.len(), 3, "Prism log:\n{}", prism.guard.output());
}

/// `usage_buckets` (the anomaly detector's Usage API read: `end_time`, `bucket_width` 1m
/// and 1h, every key-filtering endpoint) through Prism: per-bucket sums over all endpoints,
/// only the asked key, nothing outside `[start, end)`, and no contract violation on the
/// wire or in Prism's log (the negative controls above show the checks fire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_buckets_satisfy_the_description_through_prism() {
    use chrono::DateTime;
    use openai_key_rotator::config::OpenAiConfig;
    use openai_key_rotator::rotation::ports::NoCalls;
    use openai_key_rotator::sandbox::openai::UsageEndpoint;
    use openai_key_rotator::usage::{BucketWidth, UsageSource};
    use std::sync::Arc;
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("buckets");
    let (watched, _) = sim.create_service_account(&project, "okr-watched").unwrap();
    let (other, _) = sim.create_service_account(&project, "okr-other").unwrap();
    let (watched, other) = (watched.key_id.unwrap(), other.key_id.unwrap());
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve simulator");
    let direct = format!("{}/v1", server.url());
    let prism = support::start_prism(&support::openai_spec(), &direct).await;
    let client = openai_key_rotator::openai::OpenAiClient::new(
        &OpenAiConfig {
            base_url: prism.url.clone(),
            ..OpenAiConfig::default()
        },
        Secret::new(ADMIN),
        Arc::new(NoCalls),
    )
    .unwrap();
    // Minute m (0 = the current hour's start) gets m+1 requests on each endpoint.
    let hour = sim.now().div_euclid(3600) * 3600 - 3 * 3600;
    for m in 0..5i64 {
        for ep in UsageEndpoint::ALL {
            sim.record_usage(&watched, ep, hour + m * 60 + 5, m as u64 + 1)
                .unwrap();
        }
        sim.record_usage(&other, UsageEndpoint::Completions, hour + m * 60, 1000)
            .unwrap();
    }
    // Outside the asked range: counted nowhere.
    sim.record_usage(&watched, UsageEndpoint::Embeddings, hour + 3600 + 10, 7777)
        .unwrap();
    let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
    let minutes = client
        .usage_buckets(
            &project,
            &watched,
            at(hour),
            at(hour + 3600),
            BucketWidth::Minute,
        )
        .await
        .unwrap();
    let n = UsageEndpoint::ALL.len() as u64;
    let with_use: Vec<(i64, u64)> = minutes
        .iter()
        .filter(|b| b.requests > 0)
        .map(|b| (b.start.timestamp() - hour, b.requests))
        .collect();
    assert_eq!(
        with_use,
        (0..5)
            .map(|m| (m * 60, (m as u64 + 1) * n))
            .collect::<Vec<_>>()
    );
    assert!(minutes
        .iter()
        .all(|b| b.end.timestamp() - b.start.timestamp() == 60));
    assert!(minutes
        .iter()
        .all(|b| b.start >= at(hour) && b.start < at(hour + 3600)));
    let hours = client
        .usage_buckets(
            &project,
            &watched,
            at(hour - 3600),
            at(hour + 3600),
            BucketWidth::Hour,
        )
        .await
        .unwrap();
    let total: u64 = hours.iter().map(|b| b.requests).sum();
    assert_eq!(total, 15 * n, "{hours:?}");
    let output = prism.guard.output();
    assert!(
        violation_lines(&output).is_empty(),
        "Prism log lines:\n{}",
        violation_lines(&output).join("\n")
    );
}
