//! Acceptance test of the OpenAI simulator: driven through Prism (`prism proxy`) with the
//! official OpenAPI description, so every request and response is checked against it by a
//! validator nobody here wrote. Any `sl-violations` header or `Violation` line in Prism's
//! output fails the test; a negative control shows the check really fires.
//!
//! Error statuses the description does not declare for a path (401 everywhere, 404 on
//! retrieve/delete, 5xx) make Prism report "Unable to match the returned status code"
//! (a warning) for a correct upstream answer, without validating its body. Those cases are
//! sent straight to the simulator and their shape is asserted by hand. Declared errors
//! (400 on the service-account and API-key paths, 429 on usage and chat) go through Prism.

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
