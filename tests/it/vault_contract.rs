//! Acceptance test of the Vault simulator: ONE vaultrs contract suite run against the
//! simulator and against a real OpenBao dev server; a raw-JSON shape comparison of the two;
//! and negative controls showing both checks catch a wrong simulator.

use crate::support;
use openai_key_rotator::sandbox::{loopback, vault::VaultSim, Server};
use openai_key_rotator::secret::Secret;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio_util::sync::CancellationToken;
use vaultrs::api::kv2::requests::{SetSecretMetadataRequest, SetSecretRequestOptions};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use vaultrs::{kv2, token};

const MOUNT: &str = "secret";
const CAS_MISMATCH: &str = "check-and-set parameter did not match the current version";
/// The panic message of the suite's CAS-conflict check (the negative control looks for it).
const CAS_CHECK: &str = "CAS conflict check";

fn client(addr: &str, token: &str) -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .expect("vault client settings"),
    )
    .expect("vault client")
}

fn unique_base() -> String {
    format!("okr-contract-{}", uuid::Uuid::new_v4().simple())
}

type Data = HashMap<String, String>;

fn data(key: &str) -> Data {
    HashMap::from([("api_key".to_string(), key.to_string())])
}

fn api_error(e: ClientError) -> (u16, Vec<String>) {
    match e {
        ClientError::APIError { code, errors } => (code, errors),
        other => panic!("expected a Vault API error, got {other:?}"),
    }
}

/// vaultrs turns a 404 whose body is Vault's envelope (a deleted or destroyed version) into
/// a RestClientError, not an APIError, because the body has no `errors`. Return that body.
fn enveloped_404(e: ClientError) -> Value {
    match e {
        ClientError::RestClientError {
            source:
                rustify::errors::ClientError::ServerResponseError {
                    code: 404,
                    content: Some(body),
                },
        } => serde_json::from_str(&body).expect("404 body is JSON"),
        other => panic!("expected a 404 carrying Vault's envelope, got {other:?}"),
    }
}

/// The suite: everything the daemon relies on, checked through vaultrs (a client nobody
/// here wrote). `token` must be a root token of a fresh server.
pub async fn contract(addr: &str, token: &str) {
    let c = client(addr, token);
    let base = unique_base();
    let path = format!("{base}/team-a/openai");

    // Write.
    let m1 = kv2::set(&c, MOUNT, &path, &data("sk-one"))
        .await
        .expect("write");
    assert_eq!(m1.version, 1);
    assert!(!m1.destroyed);
    assert_eq!(m1.deletion_time, "");
    assert!(m1.custom_metadata.is_none());
    assert!(m1.created_time.ends_with('Z'), "{}", m1.created_time);

    // CAS success.
    let m2 = kv2::set_with_options(
        &c,
        MOUNT,
        &path,
        &data("sk-two"),
        SetSecretRequestOptions { cas: 1 },
    )
    .await
    .expect("CAS write with the current version");
    assert_eq!(m2.version, 2);

    // CAS conflict: a stale version, then cas=0 on an existing key.
    for stale in [1, 0] {
        let res = kv2::set_with_options(
            &c,
            MOUNT,
            &path,
            &data("sk-lost"),
            SetSecretRequestOptions { cas: stale },
        )
        .await;
        let Err(e) = res else {
            panic!("{CAS_CHECK}: write with cas={stale} on version 2 succeeded");
        };
        assert_eq!(
            api_error(e),
            (400, vec![CAS_MISMATCH.to_string()]),
            "{CAS_CHECK}: cas={stale}"
        );
    }
    // cas=0 on an absent key creates it.
    let fresh = format!("{base}/fresh");
    let f1 = kv2::set_with_options(
        &c,
        MOUNT,
        &fresh,
        &data("sk-new"),
        SetSecretRequestOptions { cas: 0 },
    )
    .await
    .expect("cas=0 on an absent key");
    assert_eq!(f1.version, 1);

    // Read current and a previous version.
    let cur: Data = kv2::read(&c, MOUNT, &path).await.expect("read current");
    assert_eq!(cur, data("sk-two"));
    let prev: Data = kv2::read_version(&c, MOUNT, &path, 1)
        .await
        .expect("read version 1");
    assert_eq!(prev, data("sk-one"));
    let beyond = kv2::read_version::<Data>(&c, MOUNT, &path, 9).await;
    assert_eq!(api_error(beyond.unwrap_err()), (404, vec![]));

    // Metadata round trip with custom_metadata.
    let custom = HashMap::from([
        ("service_account_id".to_string(), "svc_acct_123".to_string()),
        ("key_id".to_string(), "key_abc".to_string()),
        ("rotation_id".to_string(), "rot-1".to_string()),
    ]);
    kv2::set_metadata(
        &c,
        MOUNT,
        &path,
        Some(SetSecretMetadataRequest::builder().custom_metadata(custom.clone())),
    )
    .await
    .expect("set metadata");
    let meta = kv2::read_metadata(&c, MOUNT, &path)
        .await
        .expect("read metadata");
    assert_eq!(meta.custom_metadata.as_ref(), Some(&custom));
    assert_eq!(meta.current_version, 2);
    assert_eq!(meta.oldest_version, 0);
    assert_eq!(meta.max_versions, 0);
    assert!(!meta.cas_required);
    assert_eq!(meta.delete_version_after, "0s");
    let keys: BTreeSet<&str> = meta.versions.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["1", "2"]));
    assert!(meta
        .versions
        .values()
        .all(|v| !v.destroyed && v.deletion_time.is_empty()));
    assert_eq!(meta.created_time, m1.created_time);
    assert_eq!(meta.versions["2"].created_time, m2.created_time);
    // The write response carries the key's custom metadata too.
    let m3 = kv2::set_with_options(
        &c,
        MOUNT,
        &path,
        &data("sk-three"),
        SetSecretRequestOptions { cas: 2 },
    )
    .await
    .expect("CAS write after metadata");
    assert_eq!(m3.version, 3);
    assert_eq!(m3.custom_metadata.as_ref(), Some(&custom));

    // List: keys and folders (a name can be both).
    kv2::set(&c, MOUNT, &format!("{base}/team-b/openai"), &data("sk-b"))
        .await
        .expect("write team-b");
    kv2::set(&c, MOUNT, &format!("{path}/nested"), &data("sk-n"))
        .await
        .expect("write nested");
    let top = kv2::list(&c, MOUNT, &base).await.expect("list base");
    assert_eq!(top, vec!["fresh", "team-a/", "team-b/"]);
    let team_a = kv2::list(&c, MOUNT, &format!("{base}/team-a/"))
        .await
        .expect("list team-a");
    assert_eq!(team_a, vec!["openai", "openai/"]);
    let none = kv2::list(&c, MOUNT, &format!("{base}/nothing-here")).await;
    assert_eq!(api_error(none.unwrap_err()), (404, vec![]));

    // 404 on a missing path.
    let missing = format!("{base}/missing");
    let r = kv2::read::<Data>(&c, MOUNT, &missing).await;
    assert_eq!(api_error(r.unwrap_err()), (404, vec![]));
    let r = kv2::read_metadata(&c, MOUNT, &missing).await;
    assert_eq!(api_error(r.unwrap_err()), (404, vec![]));

    // 404 on a deleted latest version, with the version's metadata in the envelope.
    kv2::delete_latest(&c, MOUNT, &path)
        .await
        .expect("delete latest");
    let body = enveloped_404(kv2::read::<Data>(&c, MOUNT, &path).await.unwrap_err());
    assert_eq!(body["data"]["data"], Value::Null);
    assert_eq!(body["data"]["metadata"]["version"], json!(3));
    assert_eq!(body["data"]["metadata"]["destroyed"], json!(false));
    assert_ne!(body["data"]["metadata"]["deletion_time"], json!(""));
    assert!(body.get("request_id").is_some());
    let older: Data = kv2::read_version(&c, MOUNT, &path, 2)
        .await
        .expect("older version survives a soft delete");
    assert_eq!(older, data("sk-two"));
    // The deleted version still counts for CAS.
    let r = kv2::set_with_options(
        &c,
        MOUNT,
        &path,
        &data("x"),
        SetSecretRequestOptions { cas: 2 },
    )
    .await;
    assert_eq!(
        api_error(r.unwrap_err()).0,
        400,
        "{CAS_CHECK}: after delete"
    );
    kv2::undelete_versions(&c, MOUNT, &path, vec![3])
        .await
        .expect("undelete");
    let back: Data = kv2::read(&c, MOUNT, &path).await.expect("read undeleted");
    assert_eq!(back, data("sk-three"));
    kv2::destroy_versions(&c, MOUNT, &path, vec![1])
        .await
        .expect("destroy");
    let body = enveloped_404(
        kv2::read_version::<Data>(&c, MOUNT, &path, 1)
            .await
            .unwrap_err(),
    );
    assert_eq!(body["data"]["metadata"]["destroyed"], json!(true));
    let meta = kv2::read_metadata(&c, MOUNT, &path)
        .await
        .expect("metadata");
    assert!(meta.versions["1"].destroyed);
    assert!(meta.versions["3"].deletion_time.is_empty(), "undeleted");

    // 403 with a bad token, and with none.
    for bad in ["not-a-token", ""] {
        let r = kv2::read::<Data>(&client(addr, bad), MOUNT, &path).await;
        assert_eq!(
            api_error(r.unwrap_err()),
            (403, vec!["permission denied".to_string()]),
            "token {bad:?}"
        );
    }

    // Token lookup-self (and the root token is not renewable).
    let me = token::lookup_self(&c).await.expect("lookup-self");
    assert_eq!(me.id, token);
    assert_eq!(me.policies, vec!["root"]);
    assert_eq!(me.ttl, 0);
    assert!(me.expire_time.is_none());
    let r = token::renew_self(&c, None).await;
    assert_eq!(
        api_error(r.unwrap_err()),
        (400, vec!["lease is not renewable".to_string()])
    );

    // vaultrs 0.8's health type requires `performance_standby`, which OpenBao 2.7.2 does
    // not send: `sys::health` fails to parse on the real server, so the simulator must not
    // "fix" it (the daemon has to read `sys/health` itself).
    match vaultrs::sys::health(&c).await {
        Err(ClientError::RestClientError {
            source: rustify::errors::ClientError::ResponseParseError { .. },
        }) => {}
        other => panic!("vaultrs sys::health: expected a parse error, got {other:?}"),
    }

    // Mount configuration as a fresh dev server has it.
    let cfg = kv2::config::read(&c, MOUNT).await.expect("read config");
    assert!(!cfg.cas_required);
    assert_eq!(cfg.max_versions, 0);
    assert_eq!(cfg.delete_version_after, "0s");

    // Delete everything of a key.
    kv2::delete_metadata(&c, MOUNT, &path)
        .await
        .expect("delete metadata");
    let r = kv2::read_metadata(&c, MOUNT, &path).await;
    assert_eq!(api_error(r.unwrap_err()), (404, vec![]));
}

/// Renewal with a non-root (renewable) token: what a daemon holding a service token does.
pub async fn renew_contract(addr: &str, renewable_token: &str) {
    let c = client(addr, renewable_token);
    let me = token::lookup_self(&c).await.expect("lookup-self");
    assert_eq!(me.id, renewable_token);
    assert_eq!(me.renewable, Some(true));
    assert!(me.ttl > 0 && me.ttl <= 3600, "ttl {}", me.ttl);
    assert!(me.expire_time.is_some());
    let auth = token::renew_self(&c, Some("2h")).await.expect("renew-self");
    assert_eq!(auth.lease_duration, 7200);
    assert!(auth.renewable);
    assert_eq!(auth.client_token, renewable_token);
    let me = token::lookup_self(&c)
        .await
        .expect("lookup-self after renew");
    assert!(
        me.ttl > 3600 && me.ttl <= 7200,
        "ttl after renew {}",
        me.ttl
    );
}

async fn serve_sim(root: &str) -> (VaultSim, Server) {
    let sim = VaultSim::new(Secret::new(root));
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve vault sim");
    (sim, server)
}

#[tokio::test]
async fn vault_contract_simulator() {
    let (sim, server) = serve_sim("sim-root-token").await;
    contract(&server.url(), "sim-root-token").await;
    sim.add_token(Secret::new("sim-service-token"));
    renew_contract(&server.url(), "sim-service-token").await;
}

#[tokio::test]
async fn vault_contract_openbao() {
    let bao = support::start_bao().await;
    contract(&bao.addr, &bao.token).await;
    // Ask for the same 1h TTL the simulator gives added tokens (the default would be 768h).
    let short = token::new(
        &client(&bao.addr, &bao.token),
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .ttl("1h")
                .policies(vec!["default".to_string()]),
        ),
    )
    .await
    .expect("create a 1h token");
    renew_contract(&bao.addr, &short.client_token).await;
}

/// Negative control: the suite must fail on a simulator that does not enforce CAS.
#[tokio::test]
async fn vault_contract_catches_missing_cas_enforcement() {
    let (sim, server) = serve_sim("sim-root-token").await;
    sim.fault_ignore_cas(true);
    let url = server.url();
    let outcome = tokio::spawn(async move { contract(&url, "sim-root-token").await }).await;
    let panic = outcome.expect_err("the contract passed against a simulator that ignores CAS");
    let payload = panic.into_panic();
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains(CAS_CHECK), "failed for another reason: {msg}");
}

// ---- raw shape comparison --------------------------------------------------------------

/// One raw HTTP exchange's observable result: status, content type and body.
#[derive(Debug)]
struct Seen {
    label: &'static str,
    status: u16,
    content_type: String,
    body: String,
}

/// A fixed script of raw requests (no vaultrs) covering every response kind; run against
/// each server from a fresh state under a unique base path.
async fn script(addr: &str, token: &str) -> Vec<Seen> {
    let http = reqwest::Client::new();
    let base = unique_base();
    let p = format!("{base}/svc/openai");
    let list = reqwest::Method::from_bytes(b"LIST").expect("LIST method");
    let steps: Vec<(&'static str, reqwest::Method, String, Option<Value>, bool)> = vec![
        (
            "write",
            reqwest::Method::POST,
            format!("data/{p}"),
            Some(json!({"data": {"api_key": "sk-1"}})),
            true,
        ),
        (
            "cas write",
            reqwest::Method::PUT,
            format!("data/{p}"),
            Some(json!({"data": {"api_key": "sk-2"}, "options": {"cas": 1}})),
            true,
        ),
        (
            "cas mismatch",
            reqwest::Method::POST,
            format!("data/{p}"),
            Some(json!({"data": {"api_key": "x"}, "options": {"cas": 1}})),
            true,
        ),
        (
            "no data",
            reqwest::Method::POST,
            format!("data/{p}"),
            Some(json!({"options": {}})),
            true,
        ),
        (
            "read",
            reqwest::Method::GET,
            format!("data/{p}"),
            None,
            true,
        ),
        (
            "read v1",
            reqwest::Method::GET,
            format!("data/{p}?version=1"),
            None,
            true,
        ),
        (
            "read bad version",
            reqwest::Method::GET,
            format!("data/{p}?version=abc"),
            None,
            true,
        ),
        (
            "read missing",
            reqwest::Method::GET,
            format!("data/{base}/missing"),
            None,
            true,
        ),
        (
            "set metadata",
            reqwest::Method::POST,
            format!("metadata/{p}"),
            Some(json!({"custom_metadata": {"key_id": "key_1"}, "max_versions": 5})),
            true,
        ),
        (
            "read metadata",
            reqwest::Method::GET,
            format!("metadata/{p}"),
            None,
            true,
        ),
        (
            "metadata only",
            reqwest::Method::POST,
            format!("metadata/{base}/empty"),
            Some(json!({"custom_metadata": {"a": "b"}})),
            true,
        ),
        (
            "read metadata only",
            reqwest::Method::GET,
            format!("metadata/{base}/empty"),
            None,
            true,
        ),
        ("list", list.clone(), format!("metadata/{base}"), None, true),
        (
            "list via get",
            reqwest::Method::GET,
            format!("metadata/{base}/svc?list=true"),
            None,
            true,
        ),
        (
            "list missing",
            list.clone(),
            format!("metadata/{base}/nope"),
            None,
            true,
        ),
        (
            "delete latest",
            reqwest::Method::DELETE,
            format!("data/{p}"),
            None,
            true,
        ),
        (
            "read deleted",
            reqwest::Method::GET,
            format!("data/{p}"),
            None,
            true,
        ),
        (
            "undelete no versions",
            reqwest::Method::POST,
            format!("undelete/{p}"),
            Some(json!({})),
            true,
        ),
        (
            "destroy v1",
            reqwest::Method::POST,
            format!("destroy/{p}"),
            Some(json!({"versions": [1]})),
            true,
        ),
        (
            "read destroyed",
            reqwest::Method::GET,
            format!("data/{p}?version=1"),
            None,
            true,
        ),
        (
            "patch wrong type",
            reqwest::Method::PATCH,
            format!("data/{p}"),
            Some(json!({"data": {"b": "c"}})),
            true,
        ),
        (
            "bad kv path",
            reqwest::Method::GET,
            format!("nonsense/{p}"),
            None,
            true,
        ),
        (
            "unsupported op",
            reqwest::Method::GET,
            format!("delete/{p}"),
            None,
            true,
        ),
        ("config", reqwest::Method::GET, "config".into(), None, true),
        (
            "no token",
            reqwest::Method::GET,
            format!("data/{p}"),
            None,
            false,
        ),
    ];
    let mut seen = Vec::new();
    for (label, method, rel, body, with_token) in steps {
        let mut req = http.request(method, format!("{addr}/v1/{MOUNT}/{rel}"));
        if with_token {
            req = req.header("X-Vault-Token", token);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        seen.push(fetch(label, req).await);
    }
    let auth = |path: &str| {
        http.get(format!("{addr}/v1/{path}"))
            .header("X-Vault-Token", token)
    };
    seen.push(fetch("lookup-self", auth("auth/token/lookup-self")).await);
    seen.push(
        fetch(
            "renew root",
            http.post(format!("{addr}/v1/auth/token/renew-self"))
                .header("X-Vault-Token", token),
        )
        .await,
    );
    seen.push(
        fetch(
            "bad token",
            http.get(format!("{addr}/v1/auth/token/lookup-self"))
                .header("X-Vault-Token", "nope"),
        )
        .await,
    );
    seen.push(fetch("health", http.get(format!("{addr}/v1/sys/health"))).await);
    seen
}

async fn fetch(label: &'static str, req: reqwest::RequestBuilder) -> Seen {
    let resp = req.send().await.unwrap_or_else(|e| panic!("{label}: {e}"));
    Seen {
        label,
        status: resp.status().as_u16(),
        content_type: resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: resp.text().await.unwrap_or_default(),
    }
}

/// A JSON value's shape: the same structure with every scalar replaced by its type name.
/// Maps keep their keys, so a missing or extra field shows up as a difference.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), shape(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(a) => {
            let shapes: BTreeMap<String, Value> =
                a.iter().map(|v| (shape(v).to_string(), shape(v))).collect();
            Value::Array(shapes.into_values().collect())
        }
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

/// Fields whose value legitimately differs between two servers (ids, times, counters of
/// server-wide state); everywhere else bodies must match exactly, not just in shape.
const VOLATILE: &[&str] = &[
    "request_id",
    "created_time",
    "updated_time",
    "deletion_time",
    "accessor",
    "creation_time",
    "issue_time",
    "server_time_utc",
    "cluster_name",
    "cluster_id",
    "expire_time",
];

/// Replace volatile values (and those named in `extra`) by their shape so the rest can be
/// compared for equality.
fn normalise(v: &Value, extra: &[&str]) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let n = if VOLATILE.contains(&k.as_str()) || extra.contains(&k.as_str()) {
                        shape(v)
                    } else {
                        normalise(v, extra)
                    };
                    (k.clone(), n)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| normalise(v, extra)).collect()),
        other => other.clone(),
    }
}

/// Differences between two scripted runs, one line per mismatch (empty = indistinguishable).
fn differences(sim: &[Seen], real: &[Seen]) -> Vec<String> {
    differences_with(sim, real, &[])
}

/// [`differences`], with more fields treated as volatile.
fn differences_with(sim: &[Seen], real: &[Seen], extra: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (s, r) in sim.iter().zip(real) {
        let l = s.label;
        if s.status != r.status {
            out.push(format!("{l}: status sim {} vs real {}", s.status, r.status));
        }
        if s.content_type != r.content_type {
            out.push(format!(
                "{l}: content-type sim {:?} vs real {:?}",
                s.content_type, r.content_type
            ));
        }
        if s.body.ends_with('\n') != r.body.ends_with('\n') {
            out.push(format!("{l}: trailing newline differs"));
        }
        if s.body.is_empty() || r.body.is_empty() {
            if s.body != r.body {
                out.push(format!("{l}: body sim {:?} vs real {:?}", s.body, r.body));
            }
            continue;
        }
        let (Ok(sj), Ok(rj)) = (
            serde_json::from_str::<Value>(&s.body),
            serde_json::from_str::<Value>(&r.body),
        ) else {
            out.push(format!("{l}: body is not JSON on one side"));
            continue;
        };
        if normalise(&sj, extra) != normalise(&rj, extra) {
            out.push(format!(
                "{l}:\n  sim  {}\n  real {}",
                normalise(&sj, extra),
                normalise(&rj, extra)
            ));
        }
    }
    if sim.len() != real.len() {
        out.push(format!(
            "script length sim {} vs real {}",
            sim.len(),
            real.len()
        ));
    }
    out
}

#[tokio::test]
async fn vault_sim_raw_responses_match_openbao() {
    let bao = support::start_bao().await;
    let (_sim, server) = serve_sim("root").await;
    let real = script(&bao.addr, &bao.token).await;
    let sim = script(&server.url(), "root").await;
    let diff = differences(&sim, &real);
    assert!(
        diff.is_empty(),
        "simulator differs from OpenBao:\n{}",
        diff.join("\n")
    );
}

/// Negative control for the comparison: a body missing one field, or with a different
/// value outside the volatile fields, is reported.
#[test]
fn vault_shape_comparison_catches_a_missing_field() {
    let good = r#"{"request_id":"a","data":{"current_version":2,"custom_metadata":null,"versions":{"1":{"destroyed":false}}}}"#;
    let seen = |body: &str| Seen {
        label: "x",
        status: 200,
        content_type: "application/json".into(),
        body: format!("{body}\n"),
    };
    let other_id = good.replace("\"a\"", "\"b\"");
    assert!(differences(&[seen(good)], &[seen(&other_id)]).is_empty());
    let missing = good.replace(",\"custom_metadata\":null", "");
    assert_eq!(differences(&[seen(&missing)], &[seen(good)]).len(), 1);
    let wrong_value = good.replace("\"current_version\":2", "\"current_version\":3");
    assert_eq!(differences(&[seen(&wrong_value)], &[seen(good)]).len(), 1);
    let no_newline = Seen {
        body: good.to_string(),
        ..seen(good)
    };
    assert_eq!(differences(&[no_newline], &[seen(good)]).len(), 1);
}

// ---- sealed mode and Kubernetes auth, against OpenBao -----------------------------------

/// Raw requests a client may send to a sealed server.
async fn sealed_script(addr: &str, token: &str) -> Vec<Seen> {
    let http = reqwest::Client::new();
    let with = |m: reqwest::Method, path: &str| {
        http.request(m, format!("{addr}/v1/{path}"))
            .header("X-Vault-Token", token)
    };
    let list = reqwest::Method::from_bytes(b"LIST").expect("LIST method");
    vec![
        fetch("health", http.get(format!("{addr}/v1/sys/health"))).await,
        fetch("read", with(reqwest::Method::GET, "secret/data/a/b")).await,
        fetch(
            "write",
            with(reqwest::Method::POST, "secret/data/a/b").body(r#"{"data":{"k":"v"}}"#),
        )
        .await,
        fetch("list", with(list, "secret/metadata/a")).await,
        fetch(
            "metadata",
            with(reqwest::Method::GET, "secret/metadata/a/b"),
        )
        .await,
        fetch(
            "lookup-self",
            with(reqwest::Method::GET, "auth/token/lookup-self"),
        )
        .await,
        fetch(
            "renew-self",
            with(reqwest::Method::POST, "auth/token/renew-self"),
        )
        .await,
        fetch(
            "login",
            http.post(format!("{addr}/v1/auth/kubernetes/login"))
                .body(r#"{"role":"okr","jwt":"x"}"#),
        )
        .await,
        fetch("no token", http.get(format!("{addr}/v1/secret/data/a/b"))).await,
        fetch("unknown path", with(reqwest::Method::GET, "nomount/x")).await,
    ]
}

#[tokio::test]
async fn vault_sim_sealed_responses_match_openbao() {
    let bao = support::start_bao().await;
    vaultrs::sys::seal(&client(&bao.addr, &bao.token))
        .await
        .expect("seal OpenBao");
    let (sim, server) = serve_sim("root").await;
    let real = sealed_script(&bao.addr, &bao.token).await;
    // Negative control: an unsealed simulator is told apart.
    let unsealed = sealed_script(&server.url(), "root").await;
    let diff = differences(&unsealed, &real);
    assert!(
        diff.iter()
            .any(|d| d.starts_with("health: status sim 200 vs real 503")),
        "{diff:?}"
    );
    sim.set_faults(openai_key_rotator::sandbox::vault::Faults::sealed());
    let sealed = sealed_script(&server.url(), "root").await;
    let diff = differences(&sealed, &real);
    assert!(
        diff.is_empty(),
        "sealed simulator differs from a sealed OpenBao:\n{}",
        diff.join("\n")
    );
}

/// Raw requests of a Kubernetes-auth client and operator: logins that work and fail, and
/// what a logged-in token can do. `jwt` is registered with the TokenReview, `stranger` not.
async fn kubernetes_auth_script(addr: &str, jwt: &str, stranger: &str) -> Vec<Seen> {
    let http = reqwest::Client::new();
    let login = |label: &'static str, mount: &str, body: Value| {
        fetch(
            label,
            http.post(format!("{addr}/v1/auth/{mount}/login"))
                .body(body.to_string()),
        )
    };
    let mut seen = vec![login("login", "kubernetes", json!({"role": "okr", "jwt": jwt})).await];
    let token = serde_json::from_str::<Value>(&seen[0].body)
        .ok()
        .and_then(|v| v["auth"]["client_token"].as_str().map(str::to_string))
        .unwrap_or_default();
    seen.push(
        login(
            "rejected jwt",
            "kubernetes",
            json!({"role": "okr", "jwt": stranger}),
        )
        .await,
    );
    seen.push(
        login(
            "unknown role",
            "kubernetes",
            json!({"role": "nope", "jwt": jwt}),
        )
        .await,
    );
    seen.push(login("missing role", "kubernetes", json!({"jwt": jwt})).await);
    seen.push(login("missing jwt", "kubernetes", json!({"role": "okr"})).await);
    seen.push(
        login(
            "not a jwt",
            "kubernetes",
            json!({"role": "okr", "jwt": "garbage"}),
        )
        .await,
    );
    seen.push(
        login(
            "name not bound",
            "kubernetes",
            json!({"role": "elsewhere", "jwt": jwt}),
        )
        .await,
    );
    seen.push(
        login(
            "namespace not bound",
            "kubernetes",
            json!({"role": "other-ns", "jwt": jwt}),
        )
        .await,
    );
    seen.push(
        login(
            "unknown mount",
            "nomount",
            json!({"role": "okr", "jwt": jwt}),
        )
        .await,
    );
    seen.push(
        fetch(
            "login via GET",
            http.get(format!("{addr}/v1/auth/kubernetes/login")),
        )
        .await,
    );
    let with = |m: reqwest::Method, path: &str| {
        http.request(m, format!("{addr}/v1/{path}"))
            .header("X-Vault-Token", &token)
    };
    seen.push(
        fetch(
            "lookup-self",
            with(reqwest::Method::GET, "auth/token/lookup-self"),
        )
        .await,
    );
    seen.push(
        fetch(
            "renew-self",
            with(reqwest::Method::POST, "auth/token/renew-self").body("{}"),
        )
        .await,
    );
    seen.push(
        fetch(
            "revoke-self",
            with(reqwest::Method::POST, "auth/token/revoke-self"),
        )
        .await,
    );
    seen.push(
        fetch(
            "after revoke",
            with(reqwest::Method::GET, "auth/token/lookup-self"),
        )
        .await,
    );
    seen
}

#[tokio::test]
async fn vault_sim_kubernetes_auth_matches_openbao() {
    use crate::sim_faults::{registered_jwt, serve_kube, setup_kubernetes_auth};
    let (kube, kube_server) = serve_kube().await;
    let jwt = registered_jwt(&kube);
    // Claims of the same service account, but not registered: the review says no.
    let stranger = {
        let mut parts: Vec<&str> = jwt.split('.').collect();
        parts[2] = "c3RyYW5nZXI";
        parts.join(".")
    };
    let bao = support::start_bao().await;
    let (_sim, server) = serve_sim("root").await;
    let roles = [
        (
            "elsewhere",
            json!({"bound_service_account_names": "someone-else",
                   "bound_service_account_namespaces": "okr"}),
        ),
        (
            "other-ns",
            json!({"bound_service_account_names": "*",
                   "bound_service_account_namespaces": "other"}),
        ),
    ];
    for addr in [bao.addr.as_str(), &server.url()] {
        setup_kubernetes_auth(addr, &kube_server.url(), json!({})).await;
        for (name, body) in &roles {
            let r = reqwest::Client::new()
                .post(format!("{addr}/v1/auth/kubernetes/role/{name}"))
                .header("X-Vault-Token", "root")
                .json(body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    }
    let real = kubernetes_auth_script(&bao.addr, &jwt, &stranger).await;
    let sim = kubernetes_auth_script(&server.url(), &jwt, &stranger).await;
    assert_eq!(real[0].status, 200, "OpenBao login: {}", real[0].body);
    let diff = differences_with(&sim, &real, &["client_token", "entity_id", "id", "ttl"]);
    assert!(
        diff.is_empty(),
        "simulator's Kubernetes auth differs from OpenBao:\n{}",
        diff.join("\n")
    );
}
