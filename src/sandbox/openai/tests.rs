//! Unit tests against a served simulator with reqwest (real HTTP, real timeouts).

use super::*;
use crate::sandbox::loopback;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const ADMIN: &str = "sk-admin-unit-test-0123456789abcdefghij";

struct Fx {
    sim: OpenAiSim,
    server: Server,
    http: reqwest::Client,
    project: String,
}

async fn fx() -> Fx {
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("Unit");
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve");
    Fx {
        sim,
        server,
        http: reqwest::Client::new(),
        project,
    }
}

impl Fx {
    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.server.url())
    }

    fn sa_path(&self) -> String {
        format!("/organization/projects/{}/service_accounts", self.project)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(ADMIN), body).await
    }

    async fn create(&self, name: &str) -> Value {
        let (s, v) = self
            .admin(Method::POST, &self.sa_path(), Some(json!({"name": name})))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    async fn chat(&self, key: &str, content: &str) -> (StatusCode, Value) {
        let body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]});
        self.call(Method::POST, "/chat/completions", Some(key), Some(body))
            .await
    }
}

/// The error body has exactly upstream's four keys; returns it.
fn assert_error(v: &Value, kind: &str, code: Option<&str>) -> Value {
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("no error object: {v}"));
    let keys: Vec<&String> = e.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 4, "{e}");
    assert!(e["message"].is_string(), "{e}");
    assert!(e["param"].is_string() || e["param"].is_null(), "{e}");
    assert_eq!(e["type"], kind, "{e}");
    assert_eq!(e["code"].as_str(), code, "{e}");
    e.clone()
}

#[tokio::test]
async fn admin_api_requires_the_admin_key() {
    let f = fx().await;
    let (s, v) = f
        .call(Method::GET, "/organization/projects", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "invalid_request_error", None);

    let wrong = "sk-admin-WRONG-0123456789abcdefghijklmnopqrstuv";
    let (s, v) = f
        .call(Method::GET, "/organization/projects", Some(wrong), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let e = assert_error(&v, "invalid_request_error", Some("invalid_api_key"));
    let msg = e["message"].as_str().unwrap();
    assert!(!msg.contains(wrong), "{msg}");
    assert!(msg.contains("sk-admin****stuv"), "{msg}");

    // A project key is not an admin key.
    let (_, key) = f.sim.create_service_account(&f.project, "svc").unwrap();
    let (s, _) = f
        .call(
            Method::GET,
            "/organization/projects",
            Some(key.expose()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = f.admin(Method::GET, "/organization/projects", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"][0]["id"], f.project.as_str());
    assert_eq!(v["data"][0]["object"], "organization.project");
}

#[tokio::test]
async fn service_accounts_create_list_paginate_get_delete() {
    let f = fx().await;
    let mut created = Vec::new();
    for i in 0..5 {
        let v = f.create(&format!("okr-app-{i}")).await;
        assert_eq!(v["object"], "organization.project.service_account");
        assert_eq!(v["role"], "member");
        assert!(v["id"].as_str().unwrap().starts_with("svc_acct_"));
        let key = &v["api_key"];
        assert_eq!(
            key["object"],
            "organization.project.service_account.api_key"
        );
        assert!(key["id"].as_str().unwrap().starts_with("key_"));
        let value = key["value"].as_str().unwrap();
        assert!(
            value.starts_with("sk-svcacct-") && value.len() > 100,
            "{value}"
        );
        created.push(v);
    }
    // Page with limit=2 until has_more is false.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("?limit=2&after={a}"),
            None => "?limit=2".to_string(),
        };
        let (s, v) = f
            .admin(Method::GET, &format!("{}{q}", f.sa_path()), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        assert_eq!(v["first_id"], data[0]["id"]);
        assert_eq!(v["last_id"], data[data.len() - 1]["id"]);
        seen.extend(data.iter().map(|d| d["id"].as_str().unwrap().to_string()));
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
    }
    let ids: Vec<String> = created
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        seen, ids,
        "ascending creation order, nothing lost or repeated"
    );

    // Get.
    let one = format!("{}/{}", f.sa_path(), ids[1]);
    let (s, v) = f.admin(Method::GET, &one, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["name"], "okr-app-1");
    assert!(v.get("api_key").is_none());

    // Delete, then 404; the cursor of a deleted account still pages on.
    let (s, v) = f.admin(Method::DELETE, &one, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"object": "organization.project.service_account.deleted", "id": ids[1], "deleted": true})
    );
    let (s, v) = f.admin(Method::GET, &one, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "invalid_request_error", None);
    let (s, _) = f.admin(Method::DELETE, &one, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = f
        .admin(
            Method::GET,
            &format!("{}?after={}", f.sa_path(), ids[1]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["first_id"], ids[2].as_str());
    assert_eq!(f.sim.service_accounts(&f.project).len(), 4);

    // Bad input.
    for (q, code) in [
        ("limit=0", "integer_below_min_value"),
        ("limit=101", "integer_above_max_value"),
        ("limit=abc", "invalid_type"),
    ] {
        let (s, v) = f
            .admin(Method::GET, &format!("{}?{q}", f.sa_path()), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}");
        let e = assert_error(&v, "invalid_request_error", Some(code));
        assert_eq!(e["param"], "limit");
    }
    let (s, v) = f
        .admin(Method::POST, &f.sa_path(), Some(json!({"nom": "x"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        assert_error(
            &v,
            "invalid_request_error",
            Some("missing_required_parameter")
        )["param"],
        "name"
    );
    let (s, v) = f
        .admin(Method::POST, &f.sa_path(), Some(json!({"name": 7})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_request_error", Some("invalid_type"));
    let resp = f
        .http
        .post(f.url(&f.sa_path()))
        .bearer_auth(ADMIN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, v) = f
        .admin(
            Method::GET,
            "/organization/projects/proj_nope/service_accounts",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "invalid_request_error", None);
    let (s, v) = f
        .admin(Method::GET, "/organization/projects/proj_nope", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // Default limit 20.
    for i in 0..21 {
        f.sim
            .create_service_account(&f.project, &format!("bulk-{i}"))
            .unwrap();
    }
    let (_, v) = f.admin(Method::GET, &f.sa_path(), None).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 20);
    assert_eq!(v["has_more"], true);
    let (_, v) = f
        .admin(Method::GET, &format!("{}?limit=100", f.sa_path()), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 25);
    assert_eq!(v["has_more"], false);
    assert!(!format!("{:?}", f.sim).contains("sk-svcacct"));
    // Empty list: nulls for the cursors.
    let empty = f.sim.create_project("Empty");
    let (_, v) = f
        .admin(
            Method::GET,
            &format!("/organization/projects/{empty}/service_accounts"),
            None,
        )
        .await;
    assert_eq!(
        v,
        json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
    );
}

#[tokio::test]
async fn key_value_is_shown_once_and_never_again() {
    let f = fx().await;
    let v = f.create("once").await;
    let value = v["api_key"]["value"].as_str().unwrap().to_string();
    let key_id = v["api_key"]["id"].as_str().unwrap().to_string();
    let sa_id = v["id"].as_str().unwrap().to_string();
    let keys = format!("/organization/projects/{}/api_keys", f.project);
    let mut bodies = Vec::new();
    for path in [
        f.sa_path(),
        format!("{}/{sa_id}", f.sa_path()),
        keys.clone(),
        format!("{keys}/{key_id}"),
    ] {
        let (s, body) = f.admin(Method::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {body}");
        bodies.push(body.to_string());
    }
    for b in &bodies {
        assert!(!b.contains(&value), "key value leaked: {b}");
        assert!(!b.contains(&value[11..30]), "part of the key leaked: {b}");
    }
    let (_, k) = f
        .admin(Method::GET, &format!("{keys}/{key_id}"), None)
        .await;
    assert_eq!(k["object"], "organization.project.api_key");
    assert_eq!(k["owner"]["type"], "service_account");
    assert_eq!(k["owner"]["service_account"]["id"], sa_id.as_str());
    assert_eq!(k["last_used_at"], Value::Null);
    let redacted = k["redacted_value"].as_str().unwrap();
    assert_eq!(
        redacted,
        format!("{}...{}", &value[..8], &value[value.len() - 4..])
    );
    // Seeding helper: the Secret's Debug and the info's Debug hide the value.
    let (info, secret) = f.sim.create_service_account(&f.project, "seeded").unwrap();
    let dbg = format!("{info:?} {secret:?}");
    assert!(!dbg.contains(secret.expose()));
    assert!(f.sim.key_is_live(secret.expose()));
    // create_service_account_only: no key at all.
    let (s, v) = f
        .admin(
            Method::POST,
            &f.sa_path(),
            Some(json!({"name": "bare", "create_service_account_only": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["api_key"], Value::Null);
    assert_eq!(v["role"], "none");
}

#[tokio::test]
async fn key_dies_when_its_service_account_is_deleted() {
    let f = fx().await;
    let v = f.create("doomed").await;
    let value = v["api_key"]["value"].as_str().unwrap().to_string();
    let key_id = v["api_key"]["id"].as_str().unwrap().to_string();
    let (s, m) = f.call(Method::GET, "/models", Some(&value), None).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["object"], "model");
    let (s, c) = f.chat(&value, "hi there").await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    assert_eq!(f.sim.requests_served(&key_id), 2);
    assert!(f.sim.key_is_live(&value));

    let (s, _) = f
        .admin(
            Method::DELETE,
            &format!("{}/{}", f.sa_path(), v["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!f.sim.key_is_live(&value));
    for _ in 0..2 {
        let (s, e) = f.call(Method::GET, "/models", Some(&value), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let e = assert_error(&e, "invalid_request_error", Some("invalid_api_key"));
        let msg = e["message"].as_str().unwrap();
        assert!(!msg.contains(&value), "{msg}");
        assert!(!msg.contains(&value[8..value.len() - 4]), "{msg}");
        assert!(
            msg.contains(&format!("{}****{}", &value[..8], &value[value.len() - 4..])),
            "{msg}"
        );
    }
    let (s, _) = f.call(Method::GET, "/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(f.sim.requests_served(&key_id), 2);
    assert_eq!(
        f.sim.data_plane_counts(),
        DataPlaneCounts {
            accepted: 2,
            rejected_401: 3,
            faulted: 0
        }
    );
    // The key is gone from the key list too.
    let (_, keys) = f
        .admin(
            Method::GET,
            &format!("/organization/projects/{}/api_keys", f.project),
            None,
        )
        .await;
    assert_eq!(keys["data"], json!([]));
}

#[tokio::test]
async fn service_account_key_cannot_be_deleted_alone_and_last_used_is_tracked() {
    let f = fx().await;
    f.sim.set_clock(Some(1_750_000_123));
    let (info, key) = f.sim.create_service_account(&f.project, "svc").unwrap();
    let key_id = info.key_id.clone().unwrap();
    let path = format!("/organization/projects/{}/api_keys/{key_id}", f.project);
    let (s, v) = f.admin(Method::DELETE, &path, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = assert_error(&v, "invalid_request_error", None)["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("delete the service account"), "{msg}");
    assert!(f.sim.key_is_live(key.expose()));
    let (s, _) = f
        .admin(
            Method::DELETE,
            &format!("/organization/projects/{}/api_keys/key_nope", f.project),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (_, k) = f.admin(Method::GET, &path, None).await;
    assert_eq!(k["last_used_at"], Value::Null);
    f.sim.set_clock(Some(1_750_000_456));
    let (s, _) = f
        .call(Method::GET, "/models", Some(key.expose()), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, k) = f.admin(Method::GET, &path, None).await;
    assert_eq!(k["last_used_at"], 1_750_000_456);
    assert_eq!(k["created_at"], 1_750_000_123);
}

#[tokio::test]
async fn chat_completions_validates_its_input() {
    let f = fx().await;
    let (_, key) = f.sim.create_service_account(&f.project, "svc").unwrap();
    let k = Some(key.expose());
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"model": "gpt-4o-mini"}),
            StatusCode::BAD_REQUEST,
            Some("missing_required_parameter"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": []}),
            StatusCode::BAD_REQUEST,
            Some("empty_array"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": "hi"}),
            StatusCode::BAD_REQUEST,
            Some("invalid_type"),
        ),
        (
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            StatusCode::NOT_FOUND,
            Some("model_not_found"),
        ),
    ];
    for (body, status, code) in cases {
        let (s, v) = f
            .call(Method::POST, "/chat/completions", k, Some(body.clone()))
            .await;
        assert_eq!(s, status, "{body}: {v}");
        assert_error(&v, "invalid_request_error", code);
    }
    let resp = f
        .http
        .post(f.url("/chat/completions"))
        .bearer_auth(key.expose())
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // None of these were accepted calls.
    assert_eq!(f.sim.data_plane_counts().accepted, 0);
    let (s, v) = f.chat(key.expose(), "abcdefgh").await;
    assert_eq!(s, StatusCode::OK);
    // 3 + (4 + 2) prompt tokens for one 8-character message.
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    // Unknown path and method: upstream's 404 "Invalid URL".
    let (s, v) = f.call(Method::GET, "/nope", k, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        assert_error(&v, "invalid_request_error", None)["message"],
        "Invalid URL (GET /v1/nope)"
    );
    let (s, _) = f.call(Method::PUT, "/models", k, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn usage_reports_exactly_the_served_calls() {
    let f = fx().await;
    let t0 = 1_749_999_980; // 20 s into a minute; that day starts at 1_749_945_600.
    f.sim.set_clock(Some(t0));
    let (a, ka) = f.sim.create_service_account(&f.project, "a").unwrap();
    let (b, kb) = f.sim.create_service_account(&f.project, "b").unwrap();
    let other = f.sim.create_project("Other");
    let (c, kc) = f.sim.create_service_account(&other, "c").unwrap();
    let (ka_id, kb_id, kc_id) = (a.key_id.unwrap(), b.key_id.unwrap(), c.key_id.unwrap());
    // Minute 0: a x2, b x1; minute 2: a x1, c x1. A models call is not a model request.
    for _ in 0..2 {
        assert_eq!(f.chat(ka.expose(), "abcd").await.0, StatusCode::OK);
    }
    assert_eq!(f.chat(kb.expose(), "abcd").await.0, StatusCode::OK);
    assert_eq!(
        f.call(Method::GET, "/models", Some(ka.expose()), None)
            .await
            .0,
        StatusCode::OK
    );
    f.sim.set_clock(Some(t0 + 120));
    assert_eq!(f.chat(ka.expose(), "abcd").await.0, StatusCode::OK);
    assert_eq!(f.chat(kc.expose(), "abcd").await.0, StatusCode::OK);
    f.sim.set_clock(Some(t0 + 200));
    assert_eq!(f.sim.requests_served(&ka_id), 4);
    // Each chat: 3 + 4 + 1 = 8 input tokens, "Hello from the OpenAI simulator." = 8 output.

    let usage = |q: String| {
        let f = &f;
        async move {
            let (s, v) = f
                .admin(
                    Method::GET,
                    &format!("/organization/usage/completions?{q}"),
                    None,
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            assert_eq!(v["object"], "page");
            v
        }
    };
    let start = t0 - 20;
    let v = usage(format!(
        "start_time={start}&bucket_width=1m&group_by=api_key_id"
    ))
    .await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 4, "minutes 0..=3 up to now: {v}");
    assert_eq!(v["has_more"], false);
    assert_eq!(v["next_page"], Value::Null);
    assert_eq!(data[0]["object"], "bucket");
    assert_eq!(data[0]["start_time"], start);
    assert_eq!(data[0]["end_time"], start + 60);
    let per_key = |bucket: &Value| -> Vec<(String, u64, u64, u64)> {
        let mut r: Vec<_> = bucket["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["object"], "organization.usage.completions.result");
                (
                    r["api_key_id"].as_str().unwrap().to_string(),
                    r["num_model_requests"].as_u64().unwrap(),
                    r["input_tokens"].as_u64().unwrap(),
                    r["output_tokens"].as_u64().unwrap(),
                )
            })
            .collect();
        r.sort();
        r
    };
    let mut want0 = vec![(ka_id.clone(), 2, 16, 16), (kb_id.clone(), 1, 8, 8)];
    want0.sort();
    assert_eq!(per_key(&data[0]), want0);
    assert_eq!(data[1]["results"], json!([]));
    let mut want2 = vec![(ka_id.clone(), 1, 8, 8), (kc_id.clone(), 1, 8, 8)];
    want2.sort();
    assert_eq!(per_key(&data[2]), want2);

    // Python SDK encoding, plus filters.
    let v = usage(format!(
        "start_time={start}&bucket_width=1m&group_by[]=api_key_id&api_key_ids[]={ka_id}"
    ))
    .await;
    assert_eq!(per_key(&v["data"][0]), vec![(ka_id.clone(), 2, 16, 16)]);
    assert_eq!(per_key(&v["data"][2]), vec![(ka_id.clone(), 1, 8, 8)]);
    let v = usage(format!(
        "start_time={start}&bucket_width=1m&group_by=api_key_id&project_ids={other}"
    ))
    .await;
    assert_eq!(v["data"][0]["results"], json!([]));
    assert_eq!(per_key(&v["data"][2]), vec![(kc_id.clone(), 1, 8, 8)]);

    // No group_by: one aggregate per bucket, group fields null; default width 1d.
    let v = usage(format!("start_time={start}")).await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["start_time"], 1_749_945_600);
    assert_eq!(data[0]["end_time"], 1_749_945_600 + 86_400);
    let r = &data[0]["results"][0];
    assert_eq!(data[0]["results"].as_array().unwrap().len(), 1);
    assert_eq!(r["num_model_requests"], 5);
    assert_eq!(r["input_tokens"], 40);
    assert_eq!(r["api_key_id"], Value::Null);
    assert_eq!(r["project_id"], Value::Null);
    // Events before start_time are excluded even inside the first bucket.
    let v = usage(format!("start_time={}&bucket_width=1d", t0 + 100)).await;
    assert_eq!(v["data"][0]["results"][0]["num_model_requests"], 2);
    // Repeated group_by.
    let v = usage(format!(
        "start_time={start}&bucket_width=1h&group_by=project_id&group_by=model"
    ))
    .await;
    let rs = v["data"][0]["results"].as_array().unwrap();
    assert_eq!(rs.len(), 2);
    assert!(rs
        .iter()
        .all(|r| r["model"] == "gpt-4o-mini" && r["api_key_id"].is_null()));
    let n: Vec<u64> = rs
        .iter()
        .map(|r| r["num_model_requests"].as_u64().unwrap())
        .collect();
    assert_eq!(n.iter().sum::<u64>(), 5);

    // Paging: limit counts buckets; next_page continues.
    let v = usage(format!(
        "start_time={start}&bucket_width=1m&limit=3&end_time={}",
        start + 300
    ))
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["has_more"], true);
    let next = v["next_page"].as_str().unwrap().to_string();
    assert!(next.starts_with("page_"));
    let v = usage(format!(
        "start_time={start}&bucket_width=1m&limit=3&end_time={}&page={next}",
        start + 300
    ))
    .await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["start_time"], start + 180);
    assert_eq!(v["has_more"], false);

    // Bad input.
    for (q, param) in [
        ("bucket_width=1d".to_string(), "start_time"),
        (
            format!("start_time={start}&bucket_width=1w"),
            "bucket_width",
        ),
        (
            format!("start_time={start}&bucket_width=1d&limit=32"),
            "limit",
        ),
        (format!("start_time={start}&group_by=colour"), "group_by"),
        (format!("start_time={start}&page=page_garbage"), "page"),
        (format!("start_time={start}&end_time={start}"), "end_time"),
    ] {
        let (s, v) = f
            .admin(
                Method::GET,
                &format!("/organization/usage/completions?{q}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(
            assert_error(&v, "invalid_request_error", v["error"]["code"].as_str())["param"],
            param
        );
    }
}

#[tokio::test]
async fn rate_limit_fault_answers_429_with_headers() {
    let f = fx().await;
    let (_, key) = f.sim.create_service_account(&f.project, "svc").unwrap();
    f.sim.set_faults(Faults::rate_limit(2));
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let r = f
            .http
            .get(f.url("/organization/projects"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        statuses.push(r.status());
        last = Some(r);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let r = last.unwrap();
    let h = r.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "{retry}");
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert!(h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .ends_with('s'));
    let v: Value = r.json().await.unwrap();
    assert_error(&v, "requests", Some("rate_limit_exceeded"));
    // Admin scope only: the data plane is untouched.
    for _ in 0..4 {
        assert_eq!(
            f.call(Method::GET, "/models", Some(key.expose()), None)
                .await
                .0,
            StatusCode::OK
        );
    }
    // The window slides: after a second the admin API answers again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = f
        .http
        .get(f.url("/organization/projects"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "1");
    assert_eq!(f.sim.calls("projects.list"), 4);

    // Data-plane scope, counted as faulted.
    f.sim
        .set_faults(Faults::rate_limit(0).in_scope(FaultScope::DataPlane));
    let (s, _) = f
        .call(Method::GET, "/models", Some(key.expose()), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(f.sim.data_plane_counts().faulted, 1);
    f.sim.clear_faults();
    assert_eq!(
        f.call(Method::GET, "/models", Some(key.expose()), None)
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn fail_nth_and_fail_next_hit_exactly_the_chosen_calls() {
    let f = fx().await;
    let list = f.sa_path();
    // Two calls before the fault is set do not count toward N.
    for _ in 0..2 {
        assert_eq!(f.admin(Method::GET, &list, None).await.0, StatusCode::OK);
    }
    f.sim.set_faults(Faults::fail_nth(3, 503));
    let mut got = Vec::new();
    for _ in 0..5 {
        let (s, v) = f.admin(Method::GET, &list, None).await;
        if s.is_server_error() {
            assert_error(&v, "server_error", None);
        }
        got.push(s.as_u16());
    }
    assert_eq!(got, [200, 200, 503, 200, 200]);

    // Only the create operation; other operations pass and do not count.
    f.sim
        .set_faults(Faults::fail_next(2, 502).only("service_accounts.create"));
    let before = f.sim.calls("service_accounts.create");
    let mut got = Vec::new();
    for i in 0..3 {
        assert_eq!(f.admin(Method::GET, &list, None).await.0, StatusCode::OK);
        let (s, _) = f
            .admin(Method::POST, &list, Some(json!({"name": format!("r{i}")})))
            .await;
        got.push(s.as_u16());
    }
    assert_eq!(got, [502, 502, 200]);
    assert_eq!(f.sim.calls("service_accounts.create") - before, 3);
    assert_eq!(
        f.sim.service_accounts(&f.project).len(),
        1,
        "failed creates made nothing"
    );
    assert_eq!(f.sim.calls("service_accounts.list"), 2 + 5 + 3);

    // A lost response: the create takes effect, the client still sees a 500.
    f.sim.set_faults(
        Faults::fail_nth(1, 500)
            .after_effect()
            .only("service_accounts.create"),
    );
    let (s, _) = f
        .admin(Method::POST, &list, Some(json!({"name": "lost"})))
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let names: Vec<String> = f
        .sim
        .service_accounts(&f.project)
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["r2", "lost"]);

    let bad = Faults::fail_next(1, 404);
    assert!(matches!(
        f.sim.try_set_faults(bad),
        Err(OpenAiSimError::InvalidFaults(_))
    ));
    assert!(f.sim.try_set_faults(Faults::hang().only("nope")).is_err());
}

#[tokio::test]
async fn latency_fault_is_measurable() {
    let f = fx().await;
    f.admin(Method::GET, "/organization/projects", None).await; // warm the connection
    let t = Instant::now();
    f.admin(Method::GET, "/organization/projects", None).await;
    let fast = t.elapsed();
    f.sim
        .set_faults(Faults::latency(Duration::from_millis(300)));
    let t = Instant::now();
    let (s, _) = f.admin(Method::GET, "/organization/projects", None).await;
    let slow = t.elapsed();
    assert_eq!(s, StatusCode::OK);
    assert!(slow >= Duration::from_millis(300), "{slow:?}");
    assert!(fast < Duration::from_millis(300), "{fast:?}");
}

#[tokio::test]
async fn hang_fault_times_clients_out_until_cleared() {
    let f = fx().await;
    f.sim.set_faults(Faults::hang());
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = short
        .get(f.url("/organization/projects"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect_err("a hung call must time out");
    assert!(err.is_timeout(), "{err}");
    // A call in flight while the fault is cleared gets its answer.
    let url = f.url("/organization/projects");
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(ADMIN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    f.sim.clear_faults();
    let resp = pending.await.unwrap().expect("answered after clear");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(f.sim.calls("projects.list"), 2);
}

#[tokio::test]
async fn control_api_sets_reports_and_clears_faults() {
    let f = fx().await;
    let base = f.server.url();
    let r = f
        .http
        .put(format!("{base}/_sim/faults"))
        .json(&json!({"scope": "both", "fail_next": {"count": 1, "status": 500}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set: Faults = r.json().await.unwrap();
    assert_eq!(set, Faults::fail_next(1, 500).in_scope(FaultScope::Both));
    assert_eq!(
        f.admin(Method::GET, "/organization/projects", None).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        f.admin(Method::GET, "/organization/projects", None).await.0,
        StatusCode::OK
    );
    for bad in [
        json!({"fail_next": {"count": 1, "status": 200}}),
        json!({"bogus": true}),
    ] {
        let r = f
            .http
            .put(format!("{base}/_sim/faults"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let stats: Value = f
        .http
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["calls"]["projects.list"], 2);
    assert_eq!(stats["data_plane"]["accepted"], 0);
    assert_eq!(stats["faults"]["scope"], "both");
    f.http
        .put(format!("{base}/_sim/faults"))
        .json(&json!({"hang": true}))
        .send()
        .await
        .unwrap();
    let r = f
        .http
        .delete(format!("{base}/_sim/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(f.sim.faults(), Faults::default());
    assert_eq!(
        f.admin(Method::GET, "/organization/projects", None).await.0,
        StatusCode::OK
    );
}

#[test]
fn redaction_shows_at_most_head_and_tail() {
    assert_eq!(
        redact("sk-svcacct-abcdefghijklmnopqrstuvwxyz", "****"),
        "sk-svcac****wxyz"
    );
    assert_eq!(redact("short-key", "****"), "****");
    assert_eq!(
        redact("ééééééééééééééééééééééééé", "..."),
        "éééééééé...éééé"
    );
    let v = new_key_value();
    assert!(v.starts_with("sk-svcacct-") && v.len() == 11 + 64 + 8 + 64);
    assert_ne!(v, new_key_value());
    assert!(operation(&Method::GET, "/v1/organization/projects").is_some());
    assert!(OPERATIONS.iter().all(|op| !op.is_empty()));
}

// ---------------------------------------------------------------------------------------
// Every usage endpoint, history, admin keys, audit logs, key expiry.

/// `GET /organization/usage/{endpoint}?{q}`, expecting 200 and a page.
async fn usage_page(f: &Fx, endpoint: UsageEndpoint, q: &str) -> Value {
    let (s, v) = f
        .admin(
            Method::GET,
            &format!("/organization/usage/{}?{q}", endpoint.path()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{} {q}: {v}", endpoint.path());
    assert_eq!(v["object"], "page");
    v
}

/// Requests per api_key_id over a page (`num_model_requests`, or `num_requests` for file
/// searches), checking each result's object name.
fn requests_per_key(endpoint: UsageEndpoint, v: &Value) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for b in v["data"].as_array().unwrap() {
        assert_eq!(b["object"], "bucket");
        for r in b["results"].as_array().unwrap() {
            let field = if endpoint == UsageEndpoint::FileSearchCalls {
                "num_requests"
            } else {
                "num_model_requests"
            };
            *m.entry(r["api_key_id"].as_str().unwrap_or("<null>").to_string())
                .or_insert(0) += r[field].as_u64().unwrap();
        }
    }
    m
}

#[tokio::test]
async fn every_usage_endpoint_reports_planted_use_per_key_in_its_own_shape() {
    let f = fx().await;
    let t0 = 1_750_000_020; // a minute boundary
    f.sim.set_clock(Some(t0 + 600));
    let (a, _) = f.sim.create_service_account(&f.project, "a").unwrap();
    let (b, _) = f.sim.create_service_account(&f.project, "b").unwrap();
    let (ka, kb) = (a.key_id.unwrap(), b.key_id.unwrap());
    let want_fields: [(UsageEndpoint, &str, &[&str]); 8] = [
        (
            UsageEndpoint::Completions,
            "organization.usage.completions.result",
            &[
                "input_tokens",
                "output_tokens",
                "num_model_requests",
                "model",
                "batch",
                "service_tier",
            ],
        ),
        (
            UsageEndpoint::Embeddings,
            "organization.usage.embeddings.result",
            &["input_tokens", "num_model_requests", "model"],
        ),
        (
            UsageEndpoint::Moderations,
            "organization.usage.moderations.result",
            &["input_tokens", "num_model_requests", "model"],
        ),
        (
            UsageEndpoint::Images,
            "organization.usage.images.result",
            &["images", "num_model_requests", "source", "size", "model"],
        ),
        (
            UsageEndpoint::AudioSpeeches,
            "organization.usage.audio_speeches.result",
            &["characters", "num_model_requests", "model"],
        ),
        (
            UsageEndpoint::AudioTranscriptions,
            "organization.usage.audio_transcriptions.result",
            &["seconds", "num_model_requests", "model"],
        ),
        (
            UsageEndpoint::FileSearchCalls,
            "organization.usage.file_searches.result",
            &["num_requests", "vector_store_id"],
        ),
        (
            UsageEndpoint::WebSearchCalls,
            "organization.usage.web_searches.result",
            &[
                "num_model_requests",
                "num_requests",
                "model",
                "context_level",
            ],
        ),
    ];
    for (i, (ep, object, fields)) in want_fields.iter().enumerate() {
        let n = i as u64 + 1;
        f.sim.record_usage(&ka, *ep, t0 + 5, n).unwrap();
        f.sim.record_usage(&ka, *ep, t0 + 125, 1).unwrap();
        f.sim.record_usage(&kb, *ep, t0 + 65, 7).unwrap();
        let q = format!("start_time={t0}&bucket_width=1m&group_by=api_key_id&limit=5");
        let v = usage_page(&f, *ep, &q).await;
        assert_eq!(
            requests_per_key(*ep, &v),
            BTreeMap::from([(ka.clone(), n + 1), (kb.clone(), 7)]),
            "{}: {v}",
            ep.path()
        );
        let r = &v["data"][0]["results"][0];
        assert_eq!(r["object"], *object, "{r}");
        for field in ["project_id", "user_id", "api_key_id"]
            .iter()
            .chain(fields.iter())
        {
            assert!(r.get(*field).is_some(), "{} lacks {field}: {r}", ep.path());
        }
        assert_eq!(
            r.as_object().unwrap().len(),
            4 + fields.len() + usize::from(*ep == UsageEndpoint::Completions) * 3,
            "{} has fields the description does not: {r}",
            ep.path()
        );
        assert_eq!(v["data"][1]["results"][0]["api_key_id"], kb.as_str());
        // The description's array form and the Python SDK's, key filter.
        for key_param in ["api_key_ids", "api_key_ids[]"] {
            let v = usage_page(
                &f,
                *ep,
                &format!("start_time={t0}&bucket_width=1h&group_by[]=api_key_id&{key_param}={kb}"),
            )
            .await;
            assert_eq!(requests_per_key(*ep, &v), BTreeMap::from([(kb.clone(), 7)]));
        }
        // Negative control: another project sees none of it.
        let v = usage_page(&f, *ep, &format!("start_time={t0}&project_ids=proj_other")).await;
        assert!(requests_per_key(*ep, &v).is_empty(), "{v}");
    }
    // Each endpoint holds only its own use: 3+1+7 requests on moderations (no mixing).
    let v = usage_page(&f, UsageEndpoint::Moderations, &format!("start_time={t0}")).await;
    assert_eq!(
        requests_per_key(UsageEndpoint::Moderations, &v)["<null>"],
        11
    );
    assert_eq!(v["data"][0]["results"][0]["input_tokens"], 110);
    let v = usage_page(
        &f,
        UsageEndpoint::Images,
        &format!("start_time={t0}&group_by=size&group_by=source&sources=image.generation"),
    )
    .await;
    let r = &v["data"][0]["results"][0];
    assert_eq!(
        (
            r["size"].as_str(),
            r["source"].as_str(),
            r["images"].as_u64()
        ),
        (Some("1024x1024"), Some("image.generation"), Some(4 + 1 + 7))
    );
    let v = usage_page(
        &f,
        UsageEndpoint::Images,
        &format!("start_time={t0}&sources=image.edit"),
    )
    .await;
    assert_eq!(v["data"][0]["results"], json!([]), "filtered out by source");
    let v = usage_page(
        &f,
        UsageEndpoint::FileSearchCalls,
        &format!("start_time={t0}&group_by=vector_store_id&vector_store_ids=vs_sim"),
    )
    .await;
    assert_eq!(v["data"][0]["results"][0]["vector_store_id"], "vs_sim");
    let v = usage_page(
        &f,
        UsageEndpoint::FileSearchCalls,
        &format!("start_time={t0}&vector_store_ids=vs_other"),
    )
    .await;
    assert_eq!(v["data"][0]["results"], json!([]));
    let v = usage_page(
        &f,
        UsageEndpoint::WebSearchCalls,
        &format!("start_time={t0}&group_by=context_level&context_levels=medium"),
    )
    .await;
    let r = &v["data"][0]["results"][0];
    assert_eq!(
        (r["context_level"].as_str(), r["num_requests"].as_u64()),
        (Some("medium"), Some(8 + 1 + 7))
    );
    let v = usage_page(
        &f,
        UsageEndpoint::Embeddings,
        &format!("start_time={t0}&models=text-embedding-3-small&group_by=model"),
    )
    .await;
    assert_eq!(
        v["data"][0]["results"][0]["model"],
        "text-embedding-3-small"
    );
    let v = usage_page(
        &f,
        UsageEndpoint::Embeddings,
        &format!("start_time={t0}&models=gpt-4o"),
    )
    .await;
    assert_eq!(v["data"][0]["results"], json!([]));
    // Per-endpoint validation: group_by and enum filters follow the description.
    for (ep, q, param) in [
        (UsageEndpoint::FileSearchCalls, "group_by=model", "group_by"),
        (UsageEndpoint::Embeddings, "group_by=batch", "group_by"),
        (UsageEndpoint::Images, "sizes=9x9", "sizes"),
        (
            UsageEndpoint::WebSearchCalls,
            "context_levels=huge",
            "context_levels",
        ),
        (
            UsageEndpoint::AudioSpeeches,
            "bucket_width=1m&limit=1441",
            "limit",
        ),
        (
            UsageEndpoint::AudioTranscriptions,
            "bucket_width=1h&limit=169",
            "limit",
        ),
    ] {
        let (s, v) = f
            .admin(
                Method::GET,
                &format!("/organization/usage/{}?start_time={t0}&{q}", ep.path()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(
            assert_error(&v, "invalid_request_error", v["error"]["code"].as_str())["param"],
            param
        );
    }
    for ep in UsageEndpoint::ALL {
        assert!(f.sim.calls(ep.operation()) >= 1, "{}", ep.operation());
        assert!(OPERATIONS.contains(&ep.operation()));
    }
    assert!(f
        .sim
        .record_usage("key_nope", UsageEndpoint::Images, t0, 1)
        .is_err());
}

#[tokio::test]
async fn usage_default_limits_and_paging_on_a_new_endpoint() {
    let f = fx().await;
    let now = 1_750_003_620;
    f.sim.set_clock(Some(now));
    let (a, _) = f.sim.create_service_account(&f.project, "a").unwrap();
    let k = a.key_id.unwrap();
    for m in 0..100 {
        f.sim
            .record_usage(&k, UsageEndpoint::AudioSpeeches, now - 6000 + m * 60, 1)
            .unwrap();
    }
    let start = now - 6000;
    // Defaults: 1d -> 7 buckets, 1h -> 24, 1m -> 60.
    for (width, want) in [("1d", 7), ("1h", 24), ("1m", 60)] {
        let v = usage_page(
            &f,
            UsageEndpoint::AudioSpeeches,
            &format!(
                "start_time={}&bucket_width={width}&end_time={}",
                start - 40 * 86_400,
                now + 1
            ),
        )
        .await;
        assert_eq!(v["data"].as_array().unwrap().len(), want, "{width}");
        assert_eq!(v["has_more"], true);
    }
    let mut total = 0;
    let mut pages = 0;
    let mut page: Option<String> = None;
    loop {
        let mut q = format!("start_time={start}&bucket_width=1m&limit=30&group_by=api_key_id");
        if let Some(p) = &page {
            q.push_str(&format!("&page={p}"));
        }
        let v = usage_page(&f, UsageEndpoint::AudioSpeeches, &q).await;
        total += requests_per_key(UsageEndpoint::AudioSpeeches, &v)
            .get(&k)
            .copied()
            .unwrap_or(0);
        pages += 1;
        if v["has_more"] == false {
            assert_eq!(v["next_page"], Value::Null);
            break;
        }
        page = Some(v["next_page"].as_str().unwrap().to_string());
        assert!(pages < 10);
    }
    assert_eq!(
        (total, pages),
        (100, 4),
        "101 minutes up to now in pages of 30"
    );
}

#[tokio::test]
async fn a_week_of_planted_baseline_and_a_spike_with_bounded_history() {
    let f = fx().await;
    let now = 1_750_000_000 - 1_750_000_000 % 86_400 + 12 * 3_600; // noon UTC
    f.sim.set_clock(Some(now));
    let (a, _) = f.sim.create_service_account(&f.project, "steady").unwrap();
    let k = a.key_id.unwrap();
    // 7 days of one request a minute, then a spike of 500 in the last minute.
    let week = 7 * 86_400;
    let t = Instant::now();
    for m in 0..(week / 60) {
        f.sim
            .record_usage(&k, UsageEndpoint::Embeddings, now - week + m * 60, 1)
            .unwrap();
    }
    f.sim
        .record_usage(&k, UsageEndpoint::Embeddings, now - 30, 500)
        .unwrap();
    let planted = t.elapsed();
    assert!(
        planted < Duration::from_secs(5),
        "10,081 plantings took {planted:?}"
    );
    let v = usage_page(
        &f,
        UsageEndpoint::Embeddings,
        &format!("start_time={}&bucket_width=1d&limit=8", now - week),
    )
    .await;
    let days: Vec<u64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["num_model_requests"].as_u64().unwrap())
                .sum()
        })
        .collect();
    assert_eq!(
        days,
        [720, 1440, 1440, 1440, 1440, 1440, 1440, 720 - 1 + 500 + 1]
    );
    let v = usage_page(
        &f,
        UsageEndpoint::Embeddings,
        &format!("start_time={}&bucket_width=1h&limit=2", now - 3_600),
    )
    .await;
    let hour: u64 = v["data"][0]["results"][0]["num_model_requests"]
        .as_u64()
        .unwrap();
    assert_eq!(hour, 59 + 501, "the spike shows in the last hour");
    // last_used_at follows the planted use.
    let (_, key) = f
        .admin(
            Method::GET,
            &format!("/organization/projects/{}/api_keys/{k}", f.project),
            None,
        )
        .await;
    assert_eq!(key["last_used_at"], now - 30);
    // History is bounded: two more days push the oldest minutes out.
    for m in 0..(2 * 86_400 / 60) {
        f.sim
            .record_usage(&k, UsageEndpoint::Embeddings, now + m * 60, 1)
            .unwrap();
    }
    let kept = f.sim.usage_minutes_kept(&k, UsageEndpoint::Embeddings);
    assert!(kept <= (HISTORY_SECS / 60) as usize, "{kept}");
    assert_eq!(kept, (HISTORY_SECS / 60) as usize);
    // Planting far behind the window is dropped at once.
    f.sim
        .record_usage(&k, UsageEndpoint::Embeddings, now - 30 * 86_400, 9)
        .unwrap();
    assert_eq!(
        f.sim.usage_minutes_kept(&k, UsageEndpoint::Embeddings),
        kept
    );
    // Negative control: other endpoints of the key hold nothing.
    assert_eq!(f.sim.usage_minutes_kept(&k, UsageEndpoint::Moderations), 0);
}

#[tokio::test]
async fn a_minute_cut_by_start_time_counts_whole_only_if_used_after_start() {
    let f = fx().await;
    let m0 = 1_750_000_020; // a minute boundary
    f.sim.set_clock(Some(m0 + 300));
    let (a, _) = f.sim.create_service_account(&f.project, "edge").unwrap();
    let k = a.key_id.unwrap();
    f.sim
        .record_usage(&k, UsageEndpoint::Images, m0 + 10, 1)
        .unwrap();
    f.sim
        .record_usage(&k, UsageEndpoint::Images, m0 + 50, 1)
        .unwrap();
    let count = |start: i64| {
        let f = &f;
        async move {
            let v = usage_page(
                f,
                UsageEndpoint::Images,
                &format!("start_time={start}&bucket_width=1m"),
            )
            .await;
            requests_per_key(UsageEndpoint::Images, &v)
                .values()
                .sum::<u64>()
        }
    };
    assert_eq!(count(m0).await, 2);
    assert_eq!(
        count(m0 + 30).await,
        2,
        "use at +50 is inside: the minute counts whole"
    );
    assert_eq!(count(m0 + 50).await, 2);
    assert_eq!(
        count(m0 + 51).await,
        0,
        "all of the minute's use was before start"
    );
    let (s, v) = f
        .admin(
            Method::GET,
            &format!(
                "/organization/usage/images?start_time={m0}&end_time={}",
                m0 + 10
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["data"][0]["results"],
        json!([]),
        "end_time is exclusive: {v}"
    );
    // A zero-request planting makes a zero result but is no use: last_used_at stays null.
    let (z, _) = f.sim.create_service_account(&f.project, "zero").unwrap();
    let zk = z.key_id.unwrap();
    f.sim
        .record_usage(&zk, UsageEndpoint::Images, m0 + 10, 0)
        .unwrap();
    let v = usage_page(
        &f,
        UsageEndpoint::Images,
        &format!("start_time={m0}&api_key_ids={zk}&group_by=api_key_id"),
    )
    .await;
    assert_eq!(v["data"][0]["results"][0]["num_model_requests"], 0, "{v}");
    let (_, key) = f
        .admin(
            Method::GET,
            &format!("/organization/projects/{}/api_keys/{zk}", f.project),
            None,
        )
        .await;
    assert_eq!(key["last_used_at"], Value::Null);
}

#[tokio::test]
async fn recording_usage_stays_fast_with_ten_thousand_keys() {
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("Big");
    let now = 1_750_000_000;
    sim.set_clock(Some(now));
    let keys: Vec<String> = (0..10_000)
        .map(|i| {
            sim.create_service_account(&project, &format!("t-{i}"))
                .unwrap()
                .0
                .key_id
                .unwrap()
        })
        .collect();
    let t = Instant::now();
    for round in 0..5 {
        for k in &keys {
            sim.record_usage(k, UsageEndpoint::Completions, now + round, 1)
                .unwrap();
        }
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "50,000 recordings took {took:?}"
    );
    assert_eq!(
        sim.usage_minutes_kept(&keys[9_999], UsageEndpoint::Completions),
        1
    );
}

#[tokio::test]
async fn admin_api_keys_list_create_get_delete_and_dead_keys_are_refused() {
    let f = fx().await;
    f.sim.set_clock(Some(1_750_000_000));
    let list = "/organization/admin_api_keys";
    let (s, v) = f.admin(Method::GET, list, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let first = &v["data"][0];
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(first["object"], "organization.admin_api_key");
    assert_eq!(first["redacted_value"], redact(ADMIN, "..."));
    assert_eq!(
        first["last_used_at"], 1_750_000_000,
        "this very call used it"
    );
    assert_eq!(first["owner"]["type"], "user");
    assert_eq!(first["expires_at"], Value::Null);
    let first_id = first["id"].as_str().unwrap().to_string();
    assert_eq!(f.sim.admin_keys()[0].id, first_id);
    assert!(!v.to_string().contains(ADMIN));

    let (s, made) = f
        .admin(
            Method::POST,
            list,
            Some(json!({"name": "ci", "expires_in_seconds": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{made}");
    let value = made["value"].as_str().unwrap().to_string();
    assert!(
        value.starts_with("sk-admin-") && value.len() > 40,
        "{value}"
    );
    assert_eq!(made["expires_at"], 1_750_003_600);
    assert_eq!(made["name"], "ci");
    let id = made["id"].as_str().unwrap().to_string();
    // The new key works; its value is never shown again.
    let (s, got) = f
        .call(Method::GET, &format!("{list}/{id}"), Some(&value), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert!(got.get("value").is_none() && !got.to_string().contains(&value));
    assert_eq!(got["last_used_at"], 1_750_000_000);
    let (_, v) = f
        .admin(Method::GET, &format!("{list}?order=desc&limit=1"), None)
        .await;
    assert_eq!(v["data"][0]["id"], id.as_str());
    assert_eq!(v["has_more"], true);
    let (_, v) = f
        .admin(Method::GET, &format!("{list}?after={first_id}"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    // Expired: 401 everywhere on the Admin API.
    f.sim.advance_clock(3600);
    let (s, e) = f
        .call(Method::GET, "/organization/projects", Some(&value), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&e, "invalid_request_error", Some("invalid_api_key"));
    assert!(!f.sim.admin_keys()[1].live);
    // Negative control: the first key still works; delete the expired one.
    let (s, v) = f.admin(Method::DELETE, &format!("{list}/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"id": id, "object": "organization.admin_api_key.deleted", "deleted": true})
    );
    let (s, _) = f.admin(Method::GET, &format!("{list}/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A deleted key is refused at once, also by every other Admin API route.
    let (info, other) = f.sim.create_admin_key("other", None).unwrap();
    let (s, _) = f.call(Method::GET, list, Some(other.expose()), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .call(
            Method::DELETE,
            &format!("{list}/{}", info.id),
            Some(other.expose()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "a key may delete itself");
    for path in [
        "/organization/projects".to_string(),
        f.sa_path(),
        "/organization/usage/embeddings?start_time=0".into(),
        "/organization/audit_logs".into(),
    ] {
        let (s, _) = f.call(Method::GET, &path, Some(other.expose()), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(f.admin(Method::GET, list, None).await.0, StatusCode::OK);
    // Bad input.
    for (body, code) in [
        (json!({}), "missing_required_parameter"),
        (
            json!({"name": "x", "expires_in_seconds": 0}),
            "integer_below_min_value",
        ),
        (
            json!({"name": "x", "expires_in_seconds": 31_536_001}),
            "integer_above_max_value",
        ),
        (
            json!({"name": "x", "expires_in_seconds": "1h"}),
            "invalid_type",
        ),
    ] {
        let (s, v) = f.admin(Method::POST, list, Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&v, "invalid_request_error", Some(code));
    }
    let (s, _) = f
        .admin(Method::GET, &format!("{list}?order=sideways"), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let keys = f.sim.admin_keys();
    assert_eq!(keys.iter().filter(|k| k.live).count(), 1);
    assert!(!format!("{keys:?}").contains("sk-admin-"));
    assert!(f.sim.delete_admin_key(&info.id).is_err(), "already gone");
    for op in [
        "admin_api_keys.list",
        "admin_api_keys.create",
        "admin_api_keys.retrieve",
        "admin_api_keys.delete",
    ] {
        assert!(f.sim.calls(op) > 0, "{op}");
    }
}

/// `GET /organization/audit_logs?{q}`, expecting 200.
async fn audit(f: &Fx, q: &str) -> Value {
    let (s, v) = f
        .admin(Method::GET, &format!("/organization/audit_logs?{q}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{q}: {v}");
    assert_eq!(v["object"], "list");
    v
}

fn types_of(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn audit_logs_record_what_the_api_did_with_filters_paging_and_foreign_actors() {
    let f = fx().await;
    let t0 = 1_750_000_000;
    f.sim.set_clock(Some(t0));
    let admin_id = f.sim.admin_keys()[0].id.clone();
    let made = f.create("audited").await;
    let sa = made["id"].as_str().unwrap().to_string();
    let key = made["api_key"]["id"].as_str().unwrap().to_string();
    f.sim.set_clock(Some(t0 + 100));
    let (s, _) = f
        .admin(Method::DELETE, &format!("{}/{sa}", f.sa_path()), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    f.sim.set_clock(Some(t0 + 200));
    let intruder = AuditActor::UserApiKey {
        key_id: "key_someoneelse00".into(),
        user_id: "user-mallory".into(),
        email: "mallory@example.com".into(),
    };
    let foreign = f
        .sim
        .inject_audit_event(
            "service_account.deleted",
            "svc_acct_theirs",
            Some(&f.project),
            intruder,
        )
        .unwrap();

    let v = audit(&f, "").await;
    assert_eq!(
        types_of(&v),
        [
            "service_account.deleted",
            "api_key.deleted",
            "service_account.deleted",
            "api_key.created",
            "service_account.created"
        ],
        "newest first: {v}"
    );
    let created = &v["data"][4];
    assert_eq!(created["effective_at"], t0);
    assert_eq!(created["project"]["id"], f.project.as_str());
    assert_eq!(created["project"]["name"], "Unit");
    assert_eq!(
        created["service_account.created"],
        json!({"id": sa, "data": {"role": "member"}})
    );
    assert_eq!(created["actor"]["type"], "api_key");
    assert_eq!(created["actor"]["api_key"]["id"], admin_id.as_str());
    assert_eq!(created["actor"]["api_key"]["type"], "user");
    assert_eq!(v["data"][3]["api_key.created"]["id"], key.as_str());
    assert_eq!(v["data"][0]["id"], foreign.as_str());
    assert_eq!(
        v["data"][0]["actor"]["api_key"]["user"]["email"],
        "mallory@example.com"
    );
    assert!(v["data"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("audit_log-"));
    assert!(!v.to_string().contains(ADMIN));

    // Filters.
    let ours = audit(&f, &format!("actor_ids[]={admin_id}")).await;
    assert_eq!(
        ours["data"].as_array().unwrap().len(),
        4,
        "the foreign event is not ours"
    );
    let theirs = audit(&f, "actor_emails[]=mallory@example.com").await;
    assert_eq!(types_of(&theirs), ["service_account.deleted"]);
    let theirs = audit(&f, "actor_ids[]=user-mallory").await;
    assert_eq!(theirs["data"][0]["id"], foreign.as_str());
    let v = audit(
        &f,
        "event_types[]=api_key.created&event_types[]=api_key.deleted",
    )
    .await;
    assert_eq!(types_of(&v), ["api_key.deleted", "api_key.created"]);
    let v = audit(&f, &format!("resource_ids[]={sa}")).await;
    assert_eq!(
        types_of(&v),
        ["service_account.deleted", "service_account.created"]
    );
    let v = audit(
        &f,
        &format!(
            "effective_at[gte]={}&effective_at[lt]={}",
            t0 + 100,
            t0 + 200
        ),
    )
    .await;
    assert_eq!(types_of(&v), ["api_key.deleted", "service_account.deleted"]);
    let v = audit(
        &f,
        &format!("effective_at[gt]={t0}&effective_at[lte]={}", t0 + 200),
    )
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    let v = audit(&f, "project_ids[]=proj_elsewhere").await;
    assert_eq!(v["data"], json!([]));
    let v = audit(&f, "tenant_only=true").await;
    assert_eq!(v["data"], json!([]));
    // Paging both ways.
    let p1 = audit(&f, "limit=2").await;
    assert_eq!(p1["has_more"], true);
    let p2 = audit(
        &f,
        &format!("limit=2&after={}", p1["last_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        types_of(&p2),
        ["service_account.deleted", "api_key.created"]
    );
    assert_eq!(p2["has_more"], true);
    let back = audit(
        &f,
        &format!("limit=2&before={}", p2["first_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(back["data"], p1["data"]);
    assert_eq!(back["has_more"], false);
    for q in [
        "limit=0",
        "limit=101",
        "after=audit_log-nope",
        "effective_at[gt]=soon",
        "tenant_only=maybe",
    ] {
        let (s, v) = f
            .admin(Method::GET, &format!("/organization/audit_logs?{q}"), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    // Seeding helpers act as the owner in the dashboard.
    let (seeded, _) = f.sim.create_service_account(&f.project, "seeded").unwrap();
    let last = f.sim.audit_events().into_iter().rev().nth(1).unwrap();
    assert_eq!(last.resource_id, seeded.id);
    assert!(matches!(last.actor, AuditActor::Session { .. }));
    assert!(f
        .sim
        .inject_audit_event("project.created", "proj_x", None, last.actor.clone())
        .is_err());
    assert!(f.sim.calls("audit_logs.list") > 10);
}

#[tokio::test]
async fn audit_logging_off_records_nothing_and_the_list_answers_403() {
    let f = fx().await;
    f.sim.set_audit_logging(false);
    f.create("unlogged").await;
    let (s, v) = f.admin(Method::GET, "/organization/audit_logs", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let msg = assert_error(&v, "invalid_request_error", None)["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("Audit logging is not enabled"), "{msg}");
    assert!(matches!(
        f.sim.inject_audit_event(
            "api_key.deleted",
            "key_x",
            None,
            AuditActor::Session {
                user_id: "u".into(),
                email: "e".into()
            }
        ),
        Err(OpenAiSimError::AuditLoggingOff)
    ));
    // Back on: only what happens from now on is there.
    f.sim.set_audit_logging(true);
    let v = audit(&f, "").await;
    assert_eq!(v["data"], json!([]));
    f.create("logged").await;
    assert_eq!(audit(&f, "").await["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_key_with_expires_in_seconds_dies_on_time_and_shows_its_expiry() {
    let f = fx().await;
    let t0 = 1_750_000_000;
    f.sim.set_clock(Some(t0));
    let (s, v) = f
        .admin(
            Method::POST,
            &f.sa_path(),
            Some(json!({"name": "short", "expires_in_seconds": 60})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["api_key"]["expires_at"], t0 + 60);
    let value = v["api_key"]["value"].as_str().unwrap().to_string();
    let key_id = v["api_key"]["id"].as_str().unwrap().to_string();
    let forever = f.create("forever").await;
    assert_eq!(forever["api_key"]["expires_at"], Value::Null);
    let forever_value = forever["api_key"]["value"].as_str().unwrap().to_string();
    let key_path = format!("/organization/projects/{}/api_keys/{key_id}", f.project);
    let (_, k) = f.admin(Method::GET, &key_path, None).await;
    assert_eq!(k["expires_at"], t0 + 60);
    let (_, list) = f
        .admin(
            Method::GET,
            &format!("/organization/projects/{}/api_keys", f.project),
            None,
        )
        .await;
    assert_eq!(list["data"][0]["expires_at"], t0 + 60);
    assert_eq!(list["data"][1]["expires_at"], Value::Null);

    f.sim.set_clock(Some(t0 + 59));
    assert_eq!(
        f.call(Method::GET, "/models", Some(&value), None).await.0,
        StatusCode::OK
    );
    assert!(f.sim.key_is_live(&value));
    f.sim.set_clock(Some(t0 + 60));
    let (s, e) = f.call(Method::GET, "/models", Some(&value), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&e, "invalid_request_error", Some("invalid_api_key"));
    assert_eq!(f.chat(&value, "hi").await.0, StatusCode::UNAUTHORIZED);
    assert!(!f.sim.key_is_live(&value));
    // Negative control: the key without expiry still works; the expired key is still listed.
    assert_eq!(f.chat(&forever_value, "hi").await.0, StatusCode::OK);
    assert_eq!(
        f.admin(Method::GET, &key_path, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        f.sim.service_accounts(&f.project)[0].key_expires_at,
        Some(t0 + 60)
    );

    // Input rules.
    for (body, code) in [
        (
            json!({"name": "x", "expires_in_seconds": 0}),
            Some("integer_below_min_value"),
        ),
        (
            json!({"name": "x", "expires_in_seconds": "soon"}),
            Some("invalid_type"),
        ),
        (
            json!({"name": "x", "expires_in_seconds": 1.5}),
            Some("invalid_type"),
        ),
        (
            json!({"name": "x", "create_service_account_only": true, "expires_in_seconds": 60}),
            None,
        ),
    ] {
        let (s, v) = f
            .admin(Method::POST, &f.sa_path(), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(
            assert_error(&v, "invalid_request_error", code)["param"],
            "expires_in_seconds"
        );
    }
    let (s, _) = f
        .admin(
            Method::POST,
            &f.sa_path(),
            Some(json!({"name": "x", "expires_in_seconds": null})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // A lifetime policy: the field becomes required and bounded.
    f.sim.set_key_lifetime_policy(Some(3600));
    for (body, code) in [
        (json!({"name": "p"}), "missing_required_parameter"),
        (
            json!({"name": "p", "expires_in_seconds": 3601}),
            "integer_above_max_value",
        ),
    ] {
        let (s, v) = f
            .admin(Method::POST, &f.sa_path(), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error(&v, "invalid_request_error", Some(code));
    }
    let (s, v) = f
        .admin(
            Method::POST,
            &f.sa_path(),
            Some(json!({"name": "p", "expires_in_seconds": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The seeding helper.
    let (info, secret) = f
        .sim
        .create_service_account_expiring(&f.project, "seeded", 10)
        .unwrap();
    assert_eq!(info.key_expires_at, Some(t0 + 70));
    assert!(f.sim.key_is_live(secret.expose()));
    f.sim.advance_clock(10);
    assert!(!f.sim.key_is_live(secret.expose()));
    assert!(f
        .sim
        .create_service_account_expiring(&f.project, "bad", 0)
        .is_err());
}
