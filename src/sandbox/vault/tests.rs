use super::*;

const ROOT: &str = "root-token-for-tests";

fn sim() -> VaultSim {
    VaultSim::new(Secret::new(ROOT))
}

/// One request straight into the handler at time `now`: (status, JSON body or Null).
fn call_at(
    sim: &VaultSim,
    now: DateTime<Utc>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let uri: Uri = format!("/v1/{path}").parse().expect("uri");
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    match sim.handle_at(&method, &uri, &h, body.as_bytes(), now) {
        Reply::Json(s, v) | Reply::Enveloped(s, v) => (s.as_u16(), v),
        Reply::NoContent => (204, Value::Null),
        Reply::Empty(s) => (s.as_u16(), Value::Null),
    }
}

fn call(sim: &VaultSim, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_at(
        sim,
        Utc::now(),
        method,
        path,
        &[("X-Vault-Token", ROOT)],
        body,
    )
}

fn write(sim: &VaultSim, path: &str, data: Value) -> (u16, Value) {
    call(
        sim,
        "POST",
        &format!("secret/data/{path}"),
        Some(json!({ "data": data })),
    )
}

fn meta(sim: &VaultSim, path: &str) -> Value {
    let (status, body) = call(sim, "GET", &format!("secret/metadata/{path}"), None);
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

fn version_keys(meta: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = meta["versions"]
        .as_object()
        .expect("versions map")
        .keys()
        .map(|k| k.parse().expect("numeric version key"))
        .collect();
    v.sort_unstable();
    v
}

fn errors(body: &Value) -> Vec<String> {
    serde_json::from_value(body["errors"].clone()).expect("errors array")
}

#[test]
fn max_versions_drops_the_oldest_like_vault() {
    let sim = sim();
    let (s, _) = call(
        &sim,
        "POST",
        "secret/metadata/k",
        Some(json!({"max_versions": 3})),
    );
    assert_eq!(s, 204);
    // (current, oldest, kept) after each write, as OpenBao 2.7.2 reports them.
    let expected = [
        (1, 0, vec![1]),
        (2, 0, vec![1, 2]),
        (3, 1, vec![1, 2, 3]),
        (4, 2, vec![2, 3, 4]),
        (5, 3, vec![3, 4, 5]),
    ];
    for (i, (current, oldest, kept)) in expected.into_iter().enumerate() {
        let (s, _) = write(&sim, "k", json!({ "i": i }));
        assert_eq!(s, 200);
        let m = meta(&sim, "k");
        assert_eq!(m["current_version"], json!(current));
        assert_eq!(m["oldest_version"], json!(oldest));
        assert_eq!(version_keys(&m), kept);
    }
    let (s, body) = call(&sim, "GET", "secret/data/k?version=1", None);
    assert_eq!((s, errors(&body)), (404, vec![]));
}

#[test]
fn default_keeps_ten_versions_and_key_limit_beats_mount_limit() {
    let sim = sim();
    for i in 0..12 {
        write(&sim, "ten", json!({ "i": i }));
    }
    let m = meta(&sim, "ten");
    assert_eq!(m["oldest_version"], json!(3));
    assert_eq!(version_keys(&m), (3..=12).collect::<Vec<_>>());

    call(
        &sim,
        "POST",
        "secret/config",
        Some(json!({"max_versions": 2})),
    );
    for i in 0..3 {
        write(&sim, "mnt", json!({ "i": i }));
    }
    assert_eq!(version_keys(&meta(&sim, "mnt")), vec![2, 3]);
    // A larger per-key limit overrides the mount's (OpenBao: no trim at version 4).
    call(
        &sim,
        "POST",
        "secret/metadata/mnt",
        Some(json!({"max_versions": 5})),
    );
    write(&sim, "mnt", json!({"i": 3}));
    let m = meta(&sim, "mnt");
    assert_eq!(version_keys(&m), vec![2, 3, 4]);
    assert_eq!(m["max_versions"], json!(5));
}

#[test]
fn cas_required_on_the_key_and_on_the_mount() {
    let sim = sim();
    write(&sim, "k", json!({"v": 1}));
    call(
        &sim,
        "POST",
        "secret/metadata/k",
        Some(json!({"cas_required": true})),
    );
    let (s, body) = write(&sim, "k", json!({"v": 2}));
    assert_eq!(
        (s, errors(&body)),
        (400, vec![MSG_CAS_REQUIRED.to_string()])
    );
    let (s, _) = call(
        &sim,
        "POST",
        "secret/data/k",
        Some(json!({"data": {"v": 2}, "options": {"cas": 1}})),
    );
    assert_eq!(s, 200);
    assert_eq!(meta(&sim, "k")["cas_required"], json!(true));

    call(
        &sim,
        "POST",
        "secret/config",
        Some(json!({"cas_required": true})),
    );
    let (_, cfg) = call(&sim, "GET", "secret/config", None);
    assert_eq!(cfg["data"]["cas_required"], json!(true));
    let (s, body) = write(&sim, "new", json!({"v": 1}));
    assert_eq!(
        (s, errors(&body)),
        (400, vec![MSG_CAS_REQUIRED.to_string()])
    );
    let (s, _) = call(
        &sim,
        "POST",
        "secret/data/new",
        Some(json!({"data": {"v": 1}, "options": {"cas": 0}})),
    );
    assert_eq!(s, 200);
    // The key's own flag stays false: the requirement came from the mount.
    assert_eq!(meta(&sim, "new")["cas_required"], json!(false));
}

#[test]
fn deleted_and_destroyed_versions_read_as_404_with_metadata() {
    let sim = sim();
    write(&sim, "k", json!({"v": 1}));
    write(&sim, "k", json!({"v": 2}));
    let (s, _) = call(&sim, "DELETE", "secret/data/k", None);
    assert_eq!(s, 204);
    let (s, body) = call(&sim, "GET", "secret/data/k", None);
    assert_eq!(s, 404);
    assert_eq!(body["data"]["data"], Value::Null);
    assert_eq!(body["data"]["metadata"]["version"], json!(2));
    assert_ne!(body["data"]["metadata"]["deletion_time"], json!(""));
    assert!(body.get("errors").is_none());
    assert_eq!(sim.read_raw("k"), None);
    let (s, body) = call(&sim, "GET", "secret/data/k?version=1", None);
    assert_eq!((s, &body["data"]["data"]), (200, &json!({"v": 1})));

    let (s, _) = call(
        &sim,
        "POST",
        "secret/undelete/k",
        Some(json!({"versions": [2]})),
    );
    assert_eq!(s, 204);
    assert_eq!(sim.read_raw("k").map(|(v, _)| v), Some(2));

    let (s, _) = call(
        &sim,
        "POST",
        "secret/destroy/k",
        Some(json!({"versions": [2]})),
    );
    assert_eq!(s, 204);
    let (s, body) = call(&sim, "GET", "secret/data/k", None);
    assert_eq!(s, 404);
    assert_eq!(body["data"]["metadata"]["destroyed"], json!(true));
    // Undelete cannot bring back destroyed data.
    call(
        &sim,
        "POST",
        "secret/undelete/k",
        Some(json!({"versions": [2]})),
    );
    assert_eq!(call(&sim, "GET", "secret/data/k", None).0, 404);

    let (s, body) = call(&sim, "POST", "secret/delete/k", Some(json!({})));
    assert_eq!(
        (s, errors(&body)),
        (400, vec!["No version number provided".to_string()])
    );
    let (s, body) = call(
        &sim,
        "POST",
        "secret/destroy/k",
        Some(json!({"versions": []})),
    );
    assert_eq!(
        (s, errors(&body)),
        (400, vec!["no version number provided".to_string()])
    );
    // Deleting versions of a key that never existed is a no-op, as in Vault.
    assert_eq!(
        call(
            &sim,
            "POST",
            "secret/delete/none",
            Some(json!({"versions": [1]}))
        )
        .0,
        204
    );
    assert_eq!(call(&sim, "DELETE", "secret/data/none", None).0, 204);
}

#[test]
fn delete_version_after_expires_versions() {
    let sim = sim();
    let t0 = Utc::now();
    let root = [("X-Vault-Token", ROOT)];
    let (s, _) = call_at(
        &sim,
        t0,
        "POST",
        "secret/metadata/k",
        &root,
        Some(json!({"delete_version_after": "2s"})),
    );
    assert_eq!(s, 204);
    let (s, body) = call_at(
        &sim,
        t0,
        "POST",
        "secret/data/k",
        &root,
        Some(json!({"data": {"a": 1}})),
    );
    assert_eq!(s, 200);
    assert_eq!(body["data"]["deletion_time"], json!(go_time(t0 + secs(2))));
    assert_eq!(
        call_at(&sim, t0 + secs(1), "GET", "secret/data/k", &root, None).0,
        200
    );
    assert_eq!(
        call_at(&sim, t0 + secs(3), "GET", "secret/data/k", &root, None).0,
        404
    );
    call_at(
        &sim,
        t0,
        "POST",
        "secret/metadata/k",
        &root,
        Some(json!({"delete_version_after": "1h"})),
    );
    assert_eq!(meta(&sim, "k")["delete_version_after"], json!("1h0m0s"));
}

#[test]
fn list_shows_keys_and_folders_and_404s_when_empty() {
    let sim = sim();
    for p in ["a", "a/b", "a/c/d", "b/x"] {
        write(&sim, p, json!({"v": 1}));
    }
    // A key whose versions are all deleted is still listed (its metadata exists).
    call(&sim, "DELETE", "secret/data/b/x", None);
    let keys = |path: &str, method: &str| {
        let (s, body) = call(&sim, method, path, None);
        (s, body["data"]["keys"].clone())
    };
    assert_eq!(
        keys("secret/metadata", "LIST"),
        (200, json!(["a", "a/", "b/"]))
    );
    assert_eq!(
        keys("secret/metadata/", "LIST"),
        (200, json!(["a", "a/", "b/"]))
    );
    assert_eq!(keys("secret/metadata/a", "LIST"), (200, json!(["b", "c/"])));
    assert_eq!(
        keys("secret/metadata/a/?list=true", "GET"),
        (200, json!(["b", "c/"]))
    );
    assert_eq!(keys("secret/metadata/b", "LIST"), (200, json!(["x"])));
    let (s, body) = call(&sim, "LIST", "secret/metadata/a/b", None);
    assert_eq!((s, errors(&body)), (404, vec![]));
    let (s, body) = call(&sim, "LIST", "secret/data/a", None);
    assert_eq!((s, errors(&body)), (405, vec![MSG_UNSUPPORTED.to_string()]));
}

#[test]
fn health_needs_no_token_and_reports_an_active_unsealed_server() {
    let sim = sim();
    let (s, body) = call_at(&sim, Utc::now(), "GET", "sys/health", &[], None);
    assert_eq!(s, 200);
    assert_eq!(body["initialized"], json!(true));
    assert_eq!(body["sealed"], json!(false));
    assert_eq!(body["standby"], json!(false));
    assert_eq!(body["version"], json!(VERSION));
    assert!(body["server_time_utc"].as_i64().is_some_and(|t| t > 0));
    assert!(body.get("data").is_none(), "health is not enveloped");
    assert_eq!(
        call_at(&sim, Utc::now(), "POST", "sys/health", &[], None).0,
        405
    );
}

#[test]
fn tokens_missing_bad_bearer_added_expired_renewed() {
    let sim = sim();
    let now = Utc::now();
    let denied = (403, json!({"errors": ["permission denied"]}));
    let get = |h: &[(&str, &str)], at| call_at(&sim, at, "GET", "auth/token/lookup-self", h, None);
    assert_eq!(get(&[], now), denied);
    assert_eq!(get(&[("X-Vault-Token", "nope")], now), denied);
    // Unauthenticated requests are denied before routing, as in Vault.
    assert_eq!(call_at(&sim, now, "GET", "nomount/x", &[], None), denied);
    let bearer = format!("Bearer {ROOT}");
    assert_eq!(get(&[("Authorization", &bearer)], now).0, 200);

    sim.add_token(Secret::new("svc-token"));
    let svc = [("X-Vault-Token", "svc-token")];
    let (s, me) = get(&svc, Utc::now());
    assert_eq!(s, 200);
    assert_eq!(me["data"]["renewable"], json!(true));
    assert_eq!(me["data"]["policies"], json!(["default"]));
    // Expired after its TTL...
    assert_eq!(get(&svc, Utc::now() + secs(TOKEN_TTL + 1)), denied);
    // ...unless renewed.
    let (s, r) = call_at(
        &sim,
        Utc::now(),
        "POST",
        "auth/token/renew-self",
        &svc,
        Some(json!({"increment": "2h"})),
    );
    assert_eq!(s, 200);
    assert_eq!(r["auth"]["lease_duration"], json!(7200));
    assert_eq!(r["data"], Value::Null);
    assert_eq!(get(&svc, Utc::now() + secs(TOKEN_TTL + 1)).0, 200);
    assert_eq!(get(&svc, Utc::now() + secs(7201)), denied);

    let (s, body) = call(&sim, "POST", "auth/token/renew-self", None);
    assert_eq!(
        (s, errors(&body)),
        (400, vec!["lease is not renewable".to_string()])
    );
    let (s, body) = call(&sim, "GET", "nomount/x", None);
    assert_eq!(s, 404);
    assert_eq!(
        errors(&body),
        vec!["no handler for route \"nomount/x\". route entry not found.".to_string()]
    );
}

#[test]
fn fail_nth_write_fails_that_write_only_and_does_not_apply_it() {
    let sim = sim();
    sim.fail_nth_write(2, 503);
    assert_eq!(write(&sim, "k", json!({"v": 1})).0, 200);
    // Reads are not writes.
    assert_eq!(call(&sim, "GET", "secret/data/k", None).0, 200);
    let (s, body) = write(&sim, "k", json!({"v": 2}));
    assert_eq!(
        (s, errors(&body)),
        (503, vec!["Vault is sealed".to_string()])
    );
    assert_eq!(
        sim.read_raw("k").map(|(v, _)| v),
        Some(1),
        "failed write applied"
    );
    let (s, body) = write(&sim, "k", json!({"v": 3}));
    assert_eq!((s, body["data"]["version"].clone()), (200, json!(2)));
    assert_eq!(sim.write_count(), 3);

    sim.fail_nth_write(1, 500);
    let (s, body) = call(
        &sim,
        "POST",
        "secret/metadata/k",
        Some(json!({"max_versions": 1})),
    );
    assert_eq!(
        (s, errors(&body)),
        (500, vec!["internal error".to_string()])
    );
    assert_eq!(meta(&sim, "k")["max_versions"], json!(0));
}

#[test]
fn put_raw_between_read_and_cas_write_makes_the_cas_write_fail() {
    let sim = sim();
    write(&sim, "k", json!({"key": "old"}));
    let (_, read) = call(&sim, "GET", "secret/data/k", None);
    let seen = read["data"]["metadata"]["version"]
        .as_u64()
        .expect("version");
    let mut other = Map::new();
    other.insert("key".into(), json!("theirs"));
    assert_eq!(sim.put_raw("k", other.clone()), 2);
    let (s, body) = call(
        &sim,
        "POST",
        "secret/data/k",
        Some(json!({"data": {"key": "mine"}, "options": {"cas": seen}})),
    );
    assert_eq!(
        (s, errors(&body)),
        (400, vec![MSG_CAS_MISMATCH.to_string()])
    );
    assert_eq!(sim.read_raw("k"), Some((2, other)));
    assert_eq!(sim.read_raw("absent"), None);
}

#[test]
fn fault_ignore_cas_really_breaks_cas() {
    let sim = sim();
    write(&sim, "k", json!({"v": 1}));
    write(&sim, "k", json!({"v": 2}));
    let stale = Some(json!({"data": {"v": 3}, "options": {"cas": 1}}));
    assert_eq!(call(&sim, "POST", "secret/data/k", stale.clone()).0, 400);
    sim.fault_ignore_cas(true);
    assert_eq!(call(&sim, "POST", "secret/data/k", stale).0, 200);
}

#[test]
fn patch_merges_and_needs_merge_patch_content_type() {
    let sim = sim();
    write(&sim, "k", json!({"a": "1", "b": "2"}));
    let root = ("X-Vault-Token", ROOT);
    let patch = Some(json!({"data": {"b": null, "c": "3"}}));
    let now = Utc::now();
    let (s, body) = call_at(&sim, now, "PATCH", "secret/data/k", &[root], patch.clone());
    assert_eq!(
        (s, errors(&body)),
        (400, vec!["mime: no media type".to_string()])
    );
    let json_ct = [root, ("Content-Type", "application/json")];
    assert_eq!(
        call_at(&sim, now, "PATCH", "secret/data/k", &json_ct, patch.clone()).0,
        415
    );
    let merge = [root, ("Content-Type", "application/merge-patch+json")];
    let (s, body) = call_at(&sim, now, "PATCH", "secret/data/k", &merge, patch.clone());
    assert_eq!((s, body["data"]["version"].clone()), (200, json!(2)));
    let (_, read) = call(&sim, "GET", "secret/data/k", None);
    assert_eq!(read["data"]["data"], json!({"a": "1", "c": "3"}));
    assert_eq!(
        call_at(&sim, now, "PATCH", "secret/data/missing", &merge, patch),
        (404, Value::Null)
    );
}

#[test]
fn metadata_writes_replace_custom_metadata_and_coerce_values() {
    let sim = sim();
    let post = |body: Value| call(&sim, "POST", "secret/metadata/k", Some(body));
    assert_eq!(
        post(json!({"custom_metadata": {"a": "x", "b": "y"}})).0,
        204
    );
    assert_eq!(post(json!({"custom_metadata": {"n": 5}})).0, 204);
    let m = meta(&sim, "k");
    assert_eq!(m["custom_metadata"], json!({"n": "5"}));
    assert_eq!(m["current_metadata_version"], json!(2));
    assert_eq!(m["current_version"], json!(0));
    // Fields left out keep their values.
    post(json!({"cas_required": true}));
    assert_eq!(meta(&sim, "k")["custom_metadata"], json!({"n": "5"}));
    post(json!({"custom_metadata": {}}));
    assert_eq!(meta(&sim, "k")["custom_metadata"], Value::Null);
    let (s, body) = post(json!({"custom_metadata": {"a": ["x"]}}));
    assert_eq!(s, 400);
    assert!(errors(&body)[0].starts_with("custom_metadata validation failed"));
    let (s, _) = post(json!({"max_versions": "abc"}));
    assert_eq!(s, 400);
    // A metadata-only key has no data (plain 404) but is listed.
    let (s, body) = call(&sim, "GET", "secret/data/k", None);
    assert_eq!((s, errors(&body)), (404, vec![]));
    assert_eq!(
        call(&sim, "LIST", "secret/metadata", None).1["data"]["keys"],
        json!(["k"])
    );
    assert_eq!(call(&sim, "DELETE", "secret/metadata/k", None).0, 204);
    assert_eq!(call(&sim, "GET", "secret/metadata/k", None).0, 404);
}

#[test]
fn key_values_and_tokens_never_echo_in_errors_or_debug() {
    let sim = sim();
    write(&sim, "k", json!({"api_key": "sk-svcacct-SECRET-VALUE"}));
    let (s, body) = call(
        &sim,
        "POST",
        "secret/data/k",
        Some(json!({"data": "sk-svcacct-SECRET-VALUE"})),
    );
    assert_eq!(s, 400);
    assert!(!body.to_string().contains("SECRET-VALUE"), "{body}");
    let uri: Uri = "/v1/secret/data/k".parse().expect("uri");
    let mut h = HeaderMap::new();
    h.insert("x-vault-token", HeaderValue::from_static(ROOT));
    let reply = sim.handle_at(
        &Method::POST,
        &uri,
        &h,
        b"{\"data\": {\"k\": \"sk-SECRET-VALUE\"",
        Utc::now(),
    );
    let Reply::Json(status, body) = reply else {
        panic!("expected a JSON error reply");
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!body.to_string().contains("SECRET-VALUE"), "{body}");
    let dbg = format!("{sim:?}");
    assert!(
        !dbg.contains("SECRET-VALUE") && !dbg.contains(ROOT),
        "{dbg}"
    );
}

#[test]
fn go_formats() {
    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(45), "45s");
    assert_eq!(go_duration(125), "2m5s");
    assert_eq!(go_duration(3600), "1h0m0s");
    assert_eq!(parse_go_duration("1h30m"), Some(5400));
    assert_eq!(parse_go_duration("90"), Some(90));
    assert_eq!(parse_go_duration("1500ms"), Some(1));
    assert_eq!(parse_go_duration("2x"), None);
    assert_eq!(parse_go_duration("5"), Some(5));
    assert_eq!(parse_go_duration("5m3"), None);
    let t = DateTime::parse_from_rfc3339("2026-11-23T21:56:57.432612910Z")
        .expect("time")
        .with_timezone(&Utc);
    assert_eq!(go_time(t), "2026-11-23T21:56:57.43261291Z");
    let whole = DateTime::parse_from_rfc3339("2026-11-23T21:56:57Z")
        .expect("time")
        .with_timezone(&Utc);
    assert_eq!(go_time(whole), "2026-11-23T21:56:57Z");
    assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
}

/// Through real HTTP: the `LIST` verb and percent-encoded paths reach the handler.
#[tokio::test]
async fn serves_list_verb_and_encoded_paths_over_http() {
    let sim = sim();
    sim.put_raw("team a/openai", Map::new());
    let server = sim
        .serve(crate::sandbox::loopback(0), CancellationToken::new())
        .await
        .expect("serve");
    let http = reqwest::Client::new();
    let list = reqwest::Method::from_bytes(b"LIST").expect("LIST");
    let resp = http
        .request(
            list,
            format!("{}/v1/secret/metadata/team%20a", server.url()),
        )
        .header("X-Vault-Token", ROOT)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body = resp.text().await.expect("body");
    assert!(body.ends_with('\n'));
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["data"]["keys"], json!(["openai"]));
    server.shutdown().await;
}

#[test]
fn requests_map_to_the_documented_operation_names() {
    use super::faults::operation;
    let list = Method::from_bytes(b"LIST").expect("LIST");
    let cases: &[(&Method, &str, bool, Option<&str>)] = &[
        (&Method::GET, "sys/health", false, Some("sys.health")),
        (&Method::PUT, "sys/seal", false, Some("sys.seal")),
        (
            &Method::POST,
            "sys/auth/kubernetes",
            false,
            Some("auth.config"),
        ),
        (
            &Method::POST,
            "auth/kubernetes/config",
            false,
            Some("auth.config"),
        ),
        (
            &Method::POST,
            "auth/kubernetes/role/okr",
            false,
            Some("auth.config"),
        ),
        (
            &Method::POST,
            "auth/kubernetes/login",
            false,
            Some("auth.login"),
        ),
        (
            &Method::GET,
            "auth/token/lookup-self",
            false,
            Some("token.lookup"),
        ),
        (
            &Method::POST,
            "auth/token/renew-self",
            false,
            Some("token.renew"),
        ),
        (
            &Method::POST,
            "auth/token/revoke-self",
            false,
            Some("token.revoke"),
        ),
        (&Method::GET, "secret/data/a/b", false, Some("kv.read")),
        (&Method::POST, "secret/data/a/b", false, Some("kv.write")),
        (&Method::PATCH, "secret/data/a/b", false, Some("kv.write")),
        (&Method::DELETE, "secret/data/a/b", false, Some("kv.delete")),
        (
            &Method::POST,
            "secret/destroy/a/b",
            false,
            Some("kv.delete"),
        ),
        (
            &Method::GET,
            "secret/metadata/a/b",
            false,
            Some("kv.metadata.read"),
        ),
        (
            &Method::POST,
            "secret/metadata/a/b",
            false,
            Some("kv.metadata.write"),
        ),
        (
            &Method::DELETE,
            "secret/metadata/a/b",
            false,
            Some("kv.metadata.delete"),
        ),
        (&list, "secret/metadata/a", true, Some("kv.list")),
        (&Method::GET, "secret/metadata/a", true, Some("kv.list")),
        (&Method::GET, "secret/config", false, Some("kv.config")),
        (&Method::GET, "nomount/x", false, None),
    ];
    for (m, p, l, want) in cases {
        assert_eq!(operation(m, p, *l), *want, "{m} {p}");
        if let Some(op) = want {
            assert!(super::OPERATIONS.contains(op), "{op} not in OPERATIONS");
        }
    }
}
