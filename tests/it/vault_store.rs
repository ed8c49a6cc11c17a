//! The daemon's real Vault client ([`VaultStore`]) against a real OpenBao dev server:
//! KV semantics (the same as the engine's in-memory `FakeStore`), CAS conflicts, metadata
//! merging, 403s, token sources, Kubernetes auth with token maintenance, TLS, retries and
//! ambiguous writes through a fault-injecting proxy, and a TRACE-level leak check.

use crate::support;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use openai_key_rotator::config::{DurationStr, VaultAuth, VaultConfig};
use openai_key_rotator::metrics::Metrics;
use openai_key_rotator::rotation::fakes::{FakeStore, Log};
use openai_key_rotator::rotation::ports::{
    AccountRef, Backend, BackendError, CallObserver, KeyMeta, NoCalls, SecretStore, StatusClass,
};
use openai_key_rotator::sandbox::{loopback, serve, Server};
use openai_key_rotator::secret::Secret;
use openai_key_rotator::vault::{meta, VaultError, VaultStore, OPERATIONS, QUIET_LOG_DIRECTIVES};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use vaultrs::api::kv2::requests::SetSecretMetadataRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::kv2;

const MOUNT: &str = "secret";

fn admin(addr: &str, token: &str) -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .expect("settings"),
    )
    .expect("client")
}

fn unique_base() -> String {
    format!("okr-store-{}", uuid::Uuid::new_v4().simple())
}

/// An observer for tests that do not look at calls.
fn no_calls() -> Arc<dyn CallObserver> {
    Arc::new(NoCalls)
}

/// Hears every Vault call and retry the store reports.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(&'static str, StatusClass)>>,
    retries: Mutex<Vec<&'static str>>,
}

impl CallObserver for Recorder {
    fn call(&self, backend: Backend, op: &'static str, status: StatusClass, _: Duration) {
        assert_eq!(backend, Backend::Vault);
        self.calls.lock().unwrap().push((op, status));
    }
    fn retry(&self, backend: Backend, op: &'static str) {
        assert_eq!(backend, Backend::Vault);
        self.retries.lock().unwrap().push(op);
    }
}

impl Recorder {
    fn count(&self, op: &str, class: StatusClass) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, c)| *o == op && *c == class)
            .count()
    }
    fn len(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn retries(&self) -> usize {
        self.retries.lock().unwrap().len()
    }
}

fn config(address: &str, auth: VaultAuth) -> VaultConfig {
    VaultConfig {
        address: address.to_string(),
        kv_mount: MOUNT.into(),
        ca_cert: None,
        request_timeout: DurationStr::from_secs(5),
        // Quick retries: 3, backoff ceilings from 20 ms up to 200 ms.
        max_retries: 3,
        retry_base: DurationStr(Duration::from_millis(20)),
        max_backoff: DurationStr(Duration::from_millis(200)),
        auth,
    }
}

/// Token auth from a file (the env var named is never set).
fn token_file_auth(dir: &Path, token: &str) -> VaultAuth {
    let file = dir.join(format!("token-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, format!("{token}\n")).expect("write token file");
    VaultAuth::Token {
        token_env: format!("OKR_UNSET_{}", uuid::Uuid::new_v4().simple()),
        token_file: Some(file),
    }
}

async fn store_with_token(address: &str, token: &str, dir: &Path) -> VaultStore {
    VaultStore::connect(&config(address, token_file_auth(dir, token)), no_calls())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn key(s: &str) -> Secret {
    Secret::new(format!("sk-svcacct-{s}-{}", uuid::Uuid::new_v4().simple()))
}

fn key_meta(n: u32) -> KeyMeta {
    KeyMeta {
        account: Some(AccountRef {
            id: format!("svc_acct_{n}"),
            key_id: format!("key_{n}"),
        }),
        rotation_id: Some(format!("rot-{n}")),
        key_created_at: Some(
            chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        ),
    }
}

type Data = HashMap<String, String>;

// ---- KV semantics, the same as FakeStore's ----------------------------------------------

/// One scripted sequence of port calls; each outcome as a line, so two stores can be
/// compared line by line. Key values appear only as hashes.
async fn script(s: &dyn SecretStore, base: &str) -> Vec<String> {
    fn show<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(BackendError::Conflict { .. }) => "conflict".into(),
            Err(BackendError::NotFound { .. }) => "not found".into(),
            Err(e) => format!("failed: {e}"),
        }
    }
    let p = format!("{base}/apps/chatbot/openai");
    // The version's time differs between stores; that it is known must not.
    async fn meta(
        s: &dyn SecretStore,
        p: &str,
    ) -> Result<Option<(u64, KeyMeta, bool)>, BackendError> {
        s.read_key_meta(p, "api_key")
            .await
            .map(|o| o.map(|i| (i.version, i.meta, i.version_created_at.is_some())))
    }
    // The same values for both stores, so hashes compare.
    let k1 = Secret::new(format!("sk-svcacct-one-{base}"));
    let k2 = Secret::new(format!("sk-svcacct-two-{base}"));
    let mut out = Vec::new();
    let read = |field: &'static str| {
        let p = p.clone();
        async move {
            s.read_key(&p, field)
                .await
                .map(|o| o.map(|k| (k.version, k.key.sha256_hex(), k.meta)))
        }
    };
    out.push(show(read("api_key").await));
    out.push(show(meta(s, &p).await));
    out.push(show(s.write_key(&p, "api_key", &k1, &key_meta(1), 0).await));
    out.push(show(meta(s, &p).await));
    out.push(show(s.write_key(&p, "api_key", &k2, &key_meta(2), 0).await));
    out.push(show(read("api_key").await));
    out.push(show(s.write_key(&p, "api_key", &k2, &key_meta(2), 1).await));
    out.push(show(s.write_key(&p, "api_key", &k1, &key_meta(3), 1).await));
    out.push(show(read("api_key").await));
    out.push(show(read("other_field").await));
    out.push(show(
        s.read_key_version(&p, "api_key", 1)
            .await
            .map(|k| k.sha256_hex() == k1.sha256_hex()),
    ));
    out.push(show(s.read_key_version(&p, "api_key", 7).await.map(|_| ())));
    out.push(show(s.read_key_version(&p, "nope", 1).await.map(|_| ())));
    // Rollback-style write: an earlier key back as a new version with its old metadata.
    out.push(show(
        s.write_key(&p, "api_key", &k1, &KeyMeta::default(), 2)
            .await,
    ));
    out.push(show(read("api_key").await));
    out.push(show(meta(s, &p).await));
    // Documents (the journal).
    let j = format!("{base}/state/journal/chatbot");
    out.push(show(s.read_doc(&j).await));
    out.push(show(s.write_doc(&j, &json!({"step": "mint"}), 0).await));
    out.push(show(s.write_doc(&j, &json!({"step": "lost"}), 0).await));
    out.push(show(s.write_doc(&j, &json!({"step": "publish"}), 1).await));
    out.push(show(s.write_doc(&j, &json!({"step": "lost"}), 1).await));
    out.push(show(s.read_doc(&j).await));
    out.push(show(
        s.write_doc(&format!("{base}/state/history/r1"), &json!([1, 2]), 0)
            .await,
    ));
    out.push(show(s.list(base).await));
    out.push(show(s.list(&format!("{base}/state")).await));
    out.push(show(s.list(&format!("{base}/state/")).await));
    out.push(show(s.list(&format!("{base}/nothing")).await));
    out
}

#[tokio::test]
async fn vault_store_behaves_like_the_engines_fake() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_token(&bao.addr, &bao.token, dir.path()).await;
    let base = unique_base();
    let real = script(&store, &base).await;
    let fake = script(&FakeStore::new(Log::default()), &base).await;
    assert_eq!(real, fake, "VaultStore and FakeStore disagree");
    // The demo runs the same client against the Vault simulator: it must agree too.
    let sim = openai_key_rotator::sandbox::vault::VaultSim::new(Secret::new("sim-root"));
    let sim_server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("vault sim");
    let on_sim = store_with_token(&sim_server.url(), "sim-root", dir.path()).await;
    on_sim.health().await.expect("sim health");
    assert_eq!(
        script(&on_sim, &base).await,
        fake,
        "VaultStore on the simulator and FakeStore disagree"
    );
    // The script is not vacuous: it saw versions, conflicts, misses and lists.
    let all = real.join("\n");
    for expected in [
        "ok None",
        "ok Some((1, KeyMeta { account: Some(AccountRef { id: \"svc_acct_1\"",
        "true))",
        "ok 1",
        "conflict",
        "ok 3",
        "not found",
        "ok true",
        "\"apps/\"",
    ] {
        assert!(all.contains(expected), "{expected:?} missing in:\n{all}");
    }
}

#[tokio::test]
async fn vault_store_keeps_other_fields_and_user_metadata() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_token(&bao.addr, &bao.token, dir.path()).await;
    let root = admin(&bao.addr, &bao.token);
    let p = format!("{}/team-a/openai", unique_base());

    // What a user put there by hand: the key, another field, metadata of their own.
    let first = Data::from([
        ("api_key".to_string(), "sk-by-hand".to_string()),
        ("org".to_string(), "org-123".to_string()),
    ]);
    kv2::set(&root, MOUNT, &p, &first).await.expect("seed");
    kv2::set_metadata(
        &root,
        MOUNT,
        &p,
        Some(
            SetSecretMetadataRequest::builder()
                .max_versions(7u64)
                .custom_metadata(HashMap::from([("owner".to_string(), "team-a".to_string())])),
        ),
    )
    .await
    .expect("seed metadata");

    let before = store.read_key(&p, "api_key").await.unwrap().expect("key");
    assert_eq!(before.version, 1);
    assert_eq!(before.key.expose(), "sk-by-hand");
    assert_eq!(before.meta, KeyMeta::default(), "no metadata of ours yet");

    let new = key("new");
    let v = store
        .write_key(&p, "api_key", &new, &key_meta(5), 1)
        .await
        .expect("write");
    assert_eq!(v, 2);
    let data: Data = kv2::read(&root, MOUNT, &p).await.expect("read back");
    assert_eq!(data["org"], "org-123", "other fields are kept");
    assert_eq!(data["api_key"], new.expose());
    let m = kv2::read_metadata(&root, MOUNT, &p)
        .await
        .expect("metadata");
    assert_eq!(m.max_versions, 7, "metadata settings are kept");
    let custom = m.custom_metadata.expect("custom metadata");
    assert_eq!(custom["owner"], "team-a", "user custom metadata is kept");
    assert_eq!(custom[meta::SERVICE_ACCOUNT_ID], "svc_acct_5");
    assert_eq!(custom[meta::KEY_ID], "key_5");
    assert_eq!(custom[meta::ROTATION_ID], "rot-5");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&custom[meta::KEY_CREATED_AT]).unwrap(),
        key_meta(5).key_created_at.unwrap()
    );
    let now = store.read_key(&p, "api_key").await.unwrap().expect("key");
    assert_eq!((now.version, now.meta), (2, key_meta(5)));
    assert_eq!(
        store
            .read_key_version(&p, "api_key", 1)
            .await
            .unwrap()
            .expose(),
        "sk-by-hand"
    );

    // Another writer (plain vaultrs) between our read and our write: a conflict, and
    // nothing of theirs is lost.
    let seen = store.read_key(&p, "api_key").await.unwrap().expect("key");
    let theirs = Data::from([("api_key".to_string(), "sk-someone-else".to_string())]);
    kv2::set(&root, MOUNT, &p, &theirs)
        .await
        .expect("other writer");
    let e = store
        .write_key(&p, "api_key", &key("mine"), &key_meta(6), seen.version)
        .await
        .expect_err("stale write");
    assert!(matches!(e, BackendError::Conflict { .. }), "{e:?}");
    let data: Data = kv2::read(&root, MOUNT, &p).await.unwrap();
    assert_eq!(data, theirs);
    let custom = kv2::read_metadata(&root, MOUNT, &p)
        .await
        .unwrap()
        .custom_metadata
        .unwrap();
    assert_eq!(custom[meta::ROTATION_ID], "rot-5", "metadata untouched");

    // Expected version 0 on an existing path: a conflict, nothing written.
    let e = store
        .write_key(&p, "api_key", &key("zero"), &key_meta(7), 0)
        .await
        .expect_err("cas 0 on an existing path");
    assert!(matches!(e, BackendError::Conflict { .. }), "{e:?}");
    assert_eq!(
        kv2::read_metadata(&root, MOUNT, &p)
            .await
            .unwrap()
            .current_version,
        3
    );

    // A deleted latest version reads as absent; the older one is still there.
    kv2::delete_latest(&root, MOUNT, &p).await.unwrap();
    assert!(store.read_key(&p, "api_key").await.unwrap().is_none());
    assert_eq!(
        store
            .read_key_version(&p, "api_key", 2)
            .await
            .unwrap()
            .expose(),
        new.expose()
    );
    // ...and writing over it still needs its version (3) for check-and-set.
    let v = store
        .write_key(&p, "api_key", &key("after-delete"), &key_meta(8), 3)
        .await
        .expect("write over a deleted version");
    assert_eq!(v, 4);
}

// ---- fault-injecting proxy in front of OpenBao -----------------------------------------

/// What the proxy does to the next request matching `method path`.
enum Fault {
    /// Answer this status (Vault's error shape) without forwarding.
    Refuse(u16),
    /// Forward (Vault applies it), then answer 504 as a gateway that lost the answer.
    LoseAnswer,
    /// Forward, then hold the answer this long (the client times out meanwhile).
    HoldAnswer(Duration),
    /// First write this body to the same path directly (another writer wins the race).
    RaceWrite(Value),
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    root: String,
    http: reqwest::Client,
    faults: Arc<Mutex<Vec<(String, Fault)>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn inject(&self, method: &str, path: &str, f: Fault) {
        self.faults
            .lock()
            .unwrap()
            .push((format!("{method} {path}"), f));
    }
    fn count(&self, method: &str, path: &str) -> usize {
        let want = format!("{method} {path}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == want)
            .count()
    }
    async fn forward(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let m = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{}", self.upstream, uri))
            .body(body);
        for name in ["x-vault-token", "content-type", "x-vault-request"] {
            if let Some(v) = headers.get(name) {
                req = req.header(name, v.as_bytes());
            }
        }
        let resp = req.send().await.expect("upstream");
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let body = resp.bytes().await.unwrap();
        (status, [("content-type", "application/json")], body).into_response()
    }
}

async fn proxy_handler(
    State(p): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let line = format!("{} {}", method, uri.path());
    p.seen.lock().unwrap().push(line.clone());
    let fault = {
        let mut faults = p.faults.lock().unwrap();
        faults
            .iter()
            .position(|(k, _)| *k == line)
            .map(|i| faults.remove(i).1)
    };
    match fault {
        None => p.forward(&method, &uri, &headers, body).await,
        Some(Fault::Refuse(code)) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"errors": ["injected by the test proxy"]})),
        )
            .into_response(),
        Some(Fault::LoseAnswer) => {
            let _ = p.forward(&method, &uri, &headers, body).await;
            (StatusCode::GATEWAY_TIMEOUT, "upstream timed out").into_response()
        }
        Some(Fault::HoldAnswer(d)) => {
            let r = p.forward(&method, &uri, &headers, body).await;
            tokio::time::sleep(d).await;
            r
        }
        Some(Fault::RaceWrite(v)) => {
            let status = p
                .http
                .post(format!("{}{}", p.upstream, uri.path()))
                .header("x-vault-token", &p.root)
                .json(&json!({ "data": v }))
                .send()
                .await
                .expect("race write")
                .status();
            assert!(status.is_success(), "race write: {status}");
            p.forward(&method, &uri, &headers, body).await
        }
    }
}

async fn start_proxy(upstream: &str, root: &str) -> (Proxy, Server) {
    let p = Proxy {
        upstream: upstream.to_string(),
        root: root.to_string(),
        http: reqwest::Client::new(),
        faults: Arc::default(),
        seen: Arc::default(),
    };
    let router = Router::new().fallback(proxy_handler).with_state(p.clone());
    let server = serve(router, loopback(0), CancellationToken::new())
        .await
        .expect("proxy");
    (p, server)
}

async fn current_version(root: &VaultClient, p: &str) -> u64 {
    kv2::read_metadata(root, MOUNT, p)
        .await
        .map_or(0, |m| m.current_version)
}

#[tokio::test]
async fn vault_store_retries_transient_failures_and_never_duplicates_an_ambiguous_write() {
    let bao = support::start_bao().await;
    let (proxy, server) = start_proxy(&bao.addr, &bao.token).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&server.url(), token_file_auth(dir.path(), &bao.token));
    cfg.request_timeout = DurationStr::from_secs(1);
    let store = VaultStore::connect(&cfg, no_calls())
        .await
        .expect("connect");
    let root = admin(&bao.addr, &bao.token);
    let base = unique_base();
    let p = format!("{base}/svc/openai");
    let data_path = format!("/v1/secret/data/{p}");

    // 503 twice, then through: retried, one version.
    proxy.inject(
        "GET",
        &format!("/v1/secret/metadata/{p}"),
        Fault::Refuse(503),
    );
    proxy.inject("POST", &data_path, Fault::Refuse(503));
    proxy.inject("POST", &data_path, Fault::Refuse(429));
    let v = store
        .write_key(&p, "api_key", &key("a"), &key_meta(1), 0)
        .await
        .expect("write after transient failures");
    assert_eq!(v, 1);
    assert_eq!(
        proxy.count("POST", &data_path),
        3,
        "two refused, one through"
    );
    assert_eq!(current_version(&root, &p).await, 1);

    // Applied, but the answer was lost (504): read back, no second version, no conflict.
    proxy.inject("POST", &data_path, Fault::LoseAnswer);
    let k = key("b");
    let v = store
        .write_key(&p, "api_key", &k, &key_meta(2), 1)
        .await
        .expect("ambiguous write resolves to success");
    assert_eq!(v, 2);
    assert_eq!(proxy.count("POST", &data_path), 4, "not sent again");
    assert_eq!(current_version(&root, &p).await, 2);
    let cur = store.read_key(&p, "api_key").await.unwrap().unwrap();
    assert_eq!((cur.version, cur.key.expose()), (2, k.expose()));
    assert_eq!(
        cur.meta,
        key_meta(2),
        "metadata written after the read-back"
    );

    // Applied, but the client timed out: the same.
    proxy.inject(
        "POST",
        &data_path,
        Fault::HoldAnswer(Duration::from_millis(1500)),
    );
    let v = store
        .write_key(&p, "api_key", &key("c"), &key_meta(3), 2)
        .await
        .expect("timed-out write resolves to success");
    assert_eq!(v, 3);
    assert_eq!(current_version(&root, &p).await, 3);

    // Journal documents too.
    let j = format!("{base}/state/journal");
    let jpath = format!("/v1/secret/data/{j}");
    proxy.inject("POST", &jpath, Fault::LoseAnswer);
    assert_eq!(store.write_doc(&j, &json!({"n": 1}), 0).await.unwrap(), 1);
    assert_eq!(
        store.read_doc(&j).await.unwrap(),
        Some((1, json!({"n": 1})))
    );

    // Someone else's write lands between our check and our CAS write: Vault's CAS
    // refuses ours, that is a Conflict, and their data stays.
    proxy.inject(
        "POST",
        &data_path,
        Fault::RaceWrite(json!({"api_key": "sk-theirs"})),
    );
    let e = store
        .write_key(&p, "api_key", &key("d"), &key_meta(4), 3)
        .await
        .expect_err("lost race");
    assert!(matches!(e, BackendError::Conflict { .. }), "{e:?}");
    let data: Data = kv2::read(&root, MOUNT, &p).await.unwrap();
    assert_eq!(data["api_key"], "sk-theirs");
    assert_eq!(current_version(&root, &p).await, 4);

    // 4xx is final (one attempt); retries are bounded for 5xx.
    let before = proxy.count("GET", &data_path);
    proxy.inject("GET", &data_path, Fault::Refuse(400));
    let e = store.read_key(&p, "api_key").await.expect_err("400");
    assert!(
        matches!(
            e,
            BackendError::Failed {
                transient: false,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(proxy.count("GET", &data_path), before + 1);
    for _ in 0..10 {
        proxy.inject("GET", &data_path, Fault::Refuse(502));
    }
    let e = store.read_key(&p, "api_key").await.expect_err("502s");
    assert!(
        matches!(e, BackendError::Failed { transient: true, ref message, .. } if message.contains("HTTP 502")),
        "{e:?}"
    );
    assert_eq!(
        proxy.count("GET", &data_path),
        before + 1 + 4,
        "first try + max_retries"
    );
    proxy.faults.lock().unwrap().clear();

    // Health: fine through the proxy, failing when Vault says it is sealed.
    store.health().await.expect("healthy");
    proxy.inject("GET", "/v1/sys/health", Fault::Refuse(503));
    let e = store.health().await.expect_err("sealed");
    assert!(e.to_string().contains("HTTP 503"), "{e}");
}

/// Every HTTP request the store sends (login, reads, writes, metadata, list, health, the
/// read-back after an ambiguous write, retries) is reported to the observer exactly once,
/// under a name from `vault::OPERATIONS`, with its status class; re-sent attempts count as
/// retries. Before, the store had no observer at all.
#[tokio::test]
async fn vault_store_reports_every_request_to_the_observer() {
    let bao = support::start_bao().await;
    let (proxy, server) = start_proxy(&bao.addr, &bao.token).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&server.url(), token_file_auth(dir.path(), &bao.token));
    let rec = Arc::new(Recorder::default());
    let observer: Arc<dyn CallObserver> = rec.clone();
    let store = VaultStore::connect(&cfg, observer).await.expect("connect");
    assert_eq!(rec.count("token.lookup_self", StatusClass::Success), 1);

    let base = unique_base();
    let p = format!("{base}/svc/openai");
    let data_path = format!("/v1/secret/data/{p}");
    // A new path: its metadata read is a 404 the store expects (a success for metrics).
    store
        .write_key(&p, "api_key", &key("a"), &key_meta(1), 0)
        .await
        .unwrap();
    assert_eq!(rec.count("kv.metadata.read", StatusClass::Success), 2);
    assert_eq!(rec.count("kv.write", StatusClass::Success), 1);
    assert_eq!(rec.count("kv.metadata.write", StatusClass::Success), 1);
    store.read_key(&p, "api_key").await.unwrap().unwrap();
    store.read_key_version(&p, "api_key", 1).await.unwrap();
    store.read_key_meta(&p, "api_key").await.unwrap();
    store.list(&base).await.unwrap();
    store.health().await.unwrap();
    for op in ["kv.read", "kv.read_version", "kv.list", "sys.health"] {
        assert_eq!(rec.count(op, StatusClass::Success), 1, "{op}");
    }
    assert_eq!(rec.retries(), 0);

    // A 503, retried: both attempts reported, one retry.
    proxy.inject("GET", &data_path, Fault::Refuse(503));
    store.read_key(&p, "api_key").await.unwrap().unwrap();
    assert_eq!(rec.count("kv.read", StatusClass::ServerError), 1);
    assert_eq!(rec.count("kv.read", StatusClass::Success), 2);
    assert_eq!(rec.retries.lock().unwrap().clone(), ["kv.read"]);
    // A lost answer: the write's 504, then the read-back's calls; no write re-sent.
    proxy.inject("POST", &data_path, Fault::LoseAnswer);
    store
        .write_key(&p, "api_key", &key("b"), &key_meta(2), 1)
        .await
        .unwrap();
    assert_eq!(rec.count("kv.write", StatusClass::ServerError), 1);
    assert_eq!(rec.retries(), 1, "the read-back found it; nothing re-sent");
    // A 403 is a client error, reported once.
    proxy.inject("GET", &data_path, Fault::Refuse(403));
    store.read_key(&p, "api_key").await.unwrap_err();
    assert_eq!(rec.count("kv.read", StatusClass::ClientError), 1);

    let seen = proxy.seen.lock().unwrap().len();
    assert_eq!(rec.len(), seen, "one observed call per request Vault saw");
    for (op, _) in rec.calls.lock().unwrap().iter() {
        assert!(OPERATIONS.contains(op), "{op} is not a declared operation");
    }
    // Negative control: a request someone else sends through the proxy is seen there and
    // not by the store's observer, so the comparison above can fail.
    let other = admin(&server.url(), &bao.token);
    kv2::read_metadata(&other, MOUNT, &p).await.unwrap();
    assert_eq!(proxy.seen.lock().unwrap().len(), seen + 1);
    assert_eq!(rec.len(), seen);
}

#[tokio::test]
async fn vault_store_health_reports_a_sealed_or_unreachable_vault() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_token(&bao.addr, &bao.token, dir.path()).await;
    store.health().await.expect("unsealed dev server");
    vaultrs::sys::seal(&admin(&bao.addr, &bao.token))
        .await
        .expect("seal");
    let e = store.health().await.expect_err("sealed");
    assert!(e.to_string().contains("sealed"), "{e}");
    drop(bao);
    let e = store.health().await.expect_err("gone");
    assert!(
        matches!(
            e,
            BackendError::Failed {
                transient: true,
                ..
            }
        ),
        "{e:?}"
    );
}

// ---- permissions and token sources --------------------------------------------------------

#[tokio::test]
async fn vault_store_403_is_final_and_names_the_path_not_the_token() {
    let bao = support::start_bao().await;
    let root = admin(&bao.addr, &bao.token);
    let base = unique_base();
    let policy = format!("okr-only-{base}");
    vaultrs::sys::policy::set(
        &root,
        &policy,
        &format!(r#"path "secret/data/{base}/allowed/*" {{ capabilities = ["read"] }}"#),
    )
    .await
    .expect("policy");
    let limited = vaultrs::token::new(
        &root,
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec![policy.clone()]),
        ),
    )
    .await
    .expect("token")
    .client_token;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_token(&bao.addr, &limited, dir.path()).await;
    let p = format!("{base}/forbidden/openai");
    for e in [
        store
            .write_key(&p, "api_key", &key("x"), &key_meta(1), 0)
            .await
            .expect_err("write"),
        store.read_key(&p, "api_key").await.expect_err("read"),
        store.list(&base).await.expect_err("list"),
    ] {
        let BackendError::Failed {
            transient: false,
            message,
            ..
        } = &e
        else {
            panic!("expected a final failure, got {e:?}");
        };
        assert!(message.contains("permission denied"), "{message}");
        assert!(message.contains(&format!("secret/{base}")), "{message}");
        assert!(!message.contains(&limited), "token in {message}");
        assert!(!format!("{e:?}").contains(&limited));
    }
    assert!(!format!("{store:?}").contains(&limited), "token in Debug");
    // The allowed path answers (so the 403 above is the policy, not a broken token).
    let allowed = format!("{base}/allowed/openai");
    kv2::set(
        &root,
        MOUNT,
        &allowed,
        &Data::from([("api_key".into(), "sk-ok".into())]),
    )
    .await
    .unwrap();
    assert!(store.read_key(&allowed, "api_key").await.unwrap().is_some());
}

#[tokio::test]
async fn vault_store_token_file_wins_over_env() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let var = format!("OKR_IT_TOKEN_{}", uuid::Uuid::new_v4().simple());
    let bogus = format!("bogus-{}", uuid::Uuid::new_v4().simple());
    std::env::set_var(&var, &bogus);
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{}\n", bao.token)).unwrap();
    let with_file = VaultAuth::Token {
        token_env: var.clone(),
        token_file: Some(file),
    };
    let env_only = VaultAuth::Token {
        token_env: var.clone(),
        token_file: None,
    };
    // File (good) wins over env (bogus).
    let store = VaultStore::connect(&config(&bao.addr, with_file), no_calls())
        .await
        .expect("file token");
    store.list("anything").await.expect("authenticated");
    // Env alone (bogus): rejected, and the error does not show the token.
    let e = VaultStore::connect(&config(&bao.addr, env_only.clone()), no_calls())
        .await
        .expect_err("bogus env token");
    assert!(matches!(e, VaultError::Auth { .. }), "{e:?}");
    assert!(e.to_string().contains("HTTP 403"), "{e}");
    assert!(!e.to_string().contains(&bogus) && !format!("{e:?}").contains(&bogus));
    // Env alone (good).
    std::env::set_var(&var, &bao.token);
    VaultStore::connect(&config(&bao.addr, env_only), no_calls())
        .await
        .expect("env token");
    std::env::remove_var(&var);
}

// ---- Kubernetes auth --------------------------------------------------------------------

/// A TokenReview endpoint: authenticates the JWTs in `accepted` as
/// `system:serviceaccount:okr:okr` and counts reviews per JWT.
#[derive(Clone, Default)]
struct Reviewer {
    accepted: Arc<Mutex<HashSet<String>>>,
    reviews: Arc<Mutex<HashMap<String, u32>>>,
}

impl Reviewer {
    fn reviews_of(&self, jwt: &str) -> u32 {
        self.reviews.lock().unwrap().get(jwt).copied().unwrap_or(0)
    }
}

async fn token_review(State(r): State<Reviewer>, Json(body): Json<Value>) -> Json<Value> {
    let token = body["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    *r.reviews.lock().unwrap().entry(token.clone()).or_default() += 1;
    if r.accepted.lock().unwrap().contains(&token) {
        Json(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {
                "authenticated": true,
                "user": {
                    "username": "system:serviceaccount:okr:okr",
                    "uid": SA_UID,
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:okr"],
                },
            },
        }))
    } else {
        Json(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": false, "error": "token rejected by the test reviewer"},
        }))
    }
}

const SA_UID: &str = "6c1b2f0e-1111-4222-8333-944455556666";

/// A service-account JWT (unsigned: OpenBao leaves the check to the TokenReview).
fn service_account_jwt() -> String {
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = chrono::Utc::now().timestamp();
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256", "kid": "test", "typ": "JWT"})),
        b64(json!({
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:okr:okr",
            "kubernetes.io/serviceaccount/namespace": "okr",
            "kubernetes.io/serviceaccount/service-account.name": "okr",
            "kubernetes.io/serviceaccount/service-account.uid": SA_UID,
            "kubernetes.io/serviceaccount/secret.name": "okr-token",
            "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(),
        })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("not-a-real-signature"),
    )
}

/// A self-signed certificate: OpenBao wants some `kubernetes_ca_cert` when
/// `disable_local_ca_jwt` is set; the reviewer is plain http, so it is never used.
const UNUSED_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUYrxIuTa6xgkNDKX1EMfqMdzp/pgwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSb2tyLXRlc3QtdW51c2VkLWNhMCAXDTI2MTEyMzIyMjAyM1oY
DzIxMjYxMDMwMjIyMDIzWjAdMRswGQYDVQQDDBJva3ItdGVzdC11bnVzZWQtY2Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATqmbv+1NCfx7CC2uJNlOrxE5MXyBkO
V03taKR5wLC12Vzf4Sh1qRhOIOmtM/LARVqmmoHObVMKEfhgfVjPBSqao1MwUTAd
BgNVHQ4EFgQUyyV0Z0/g4svxKmisRt+8KRxU/rYwHwYDVR0jBBgwFoAUyyV0Z0/g
4svxKmisRt+8KRxU/rYwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiEAv1MgeGPTIfqGPByYHiWWYquYqBfR9hPX07TtFtwpL60CIFjkCV6K9lZ2iid4
6Y5MPboUIcfYejyc+6ndGpalMiqf
-----END CERTIFICATE-----
";

async fn bao_post(bao: &support::Bao, path: &str, body: Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/{path}", bao.addr))
        .header("X-Vault-Token", &bao.token)
        .json(&body)
        .send()
        .await
        .expect("bao request");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "POST {path}: {status} {text}");
}

fn k8s_auth(role: &str, jwt_path: &Path) -> VaultAuth {
    VaultAuth::Kubernetes {
        role: role.into(),
        mount: "kubernetes".into(),
        jwt_path: jwt_path.to_path_buf(),
    }
}

#[tokio::test]
async fn vault_store_kubernetes_auth_and_token_maintenance() {
    let bao = support::start_bao().await;
    let reviewer = Reviewer::default();
    let review_server = serve(
        Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .with_state(reviewer.clone()),
        loopback(0),
        CancellationToken::new(),
    )
    .await
    .expect("token review server");
    let root = admin(&bao.addr, &bao.token);
    vaultrs::sys::auth::enable(&root, "kubernetes", "kubernetes", None)
        .await
        .expect("enable kubernetes auth");
    bao_post(
        &bao,
        "auth/kubernetes/config",
        json!({
            "kubernetes_host": review_server.url(),
            "disable_local_ca_jwt": true,
            "token_reviewer_jwt": "reviewer-token",
            "kubernetes_ca_cert": UNUSED_CA_PEM,
        }),
    )
    .await;
    let base = unique_base();
    vaultrs::sys::policy::set(
        &root,
        "okr-k8s",
        &format!(
            r#"
path "secret/data/{base}/*" {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/{base}/*" {{ capabilities = ["create", "read", "update", "list"] }}
"#
        ),
    )
    .await
    .expect("policy");
    let role = |name: &str, extra: Value| {
        let mut body = json!({
            "bound_service_account_names": ["okr"],
            "bound_service_account_namespaces": ["okr"],
            "token_policies": ["okr-k8s"],
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        (format!("auth/kubernetes/role/{name}"), body)
    };
    for (path, body) in [
        role("okr", json!({"token_ttl": "1h"})),
        role(
            "okr-short",
            json!({"token_ttl": "3s", "token_max_ttl": "1h"}),
        ),
        role(
            "okr-batch",
            json!({"token_ttl": "3s", "token_type": "batch"}),
        ),
    ] {
        bao_post(&bao, &path, body).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let jwt_file = dir.path().join("token");
    let jwt = service_account_jwt();
    std::fs::write(&jwt_file, &jwt).unwrap();
    let p = format!("{base}/k8s/openai");

    // A JWT the reviewer rejects: login fails with Vault's 403, the JWT is not shown.
    let e = VaultStore::connect(&config(&bao.addr, k8s_auth("okr", &jwt_file)), no_calls())
        .await
        .expect_err("rejected JWT");
    assert!(
        matches!(
            e,
            VaultError::Auth {
                method: "kubernetes",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains(&jwt) && !format!("{e:?}").contains(&jwt));
    assert_eq!(
        reviewer.reviews_of(&jwt),
        1,
        "OpenBao asked our TokenReview"
    );

    // Accepted: log in, write and read.
    reviewer.accepted.lock().unwrap().insert(jwt.clone());
    let store = VaultStore::connect(&config(&bao.addr, k8s_auth("okr", &jwt_file)), no_calls())
        .await
        .expect("kubernetes login");
    let k = key("k8s");
    assert_eq!(
        store
            .write_key(&p, "api_key", &k, &key_meta(1), 0)
            .await
            .expect("write with the kubernetes token"),
        1
    );
    let got = store.read_key(&p, "api_key").await.unwrap().unwrap();
    assert_eq!(got.key.expose(), k.expose());
    assert_eq!(got.meta, key_meta(1));

    // Short TTL (3s, renewable): with maintenance the store keeps working past the TTL by
    // renewing; without it the same kind of store gets 403 (and logs in again). Batch tokens (3s) cannot be
    // renewed: maintenance logs in again.
    let cfg_short = config(&bao.addr, k8s_auth("okr-short", &jwt_file));
    let rec_m = Arc::new(Recorder::default());
    let rec_b = Arc::new(Recorder::default());
    let maintained = Arc::new(
        VaultStore::connect(&cfg_short, rec_m.clone())
            .await
            .unwrap(),
    );
    let unmaintained = VaultStore::connect(&cfg_short, no_calls()).await.unwrap();
    let batch = Arc::new(
        VaultStore::connect(
            &config(&bao.addr, k8s_auth("okr-batch", &jwt_file)),
            rec_b.clone(),
        )
        .await
        .unwrap(),
    );
    assert!(maintained.token_status().renewable);
    assert!(!batch.token_status().renewable);
    let cancel = CancellationToken::new();
    let h1 = maintained.spawn_token_maintenance(cancel.clone());
    let h2 = batch.spawn_token_maintenance(cancel.clone());
    let keep_reading = |what: &'static str| {
        let (maintained, batch, p) = (maintained.clone(), batch.clone(), p.clone());
        async move {
            for _ in 0..9 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                maintained
                    .read_key(&p, "api_key")
                    .await
                    .unwrap_or_else(|e| panic!("{what}: renewable token lapsed: {e}"));
                batch
                    .read_key(&p, "api_key")
                    .await
                    .unwrap_or_else(|e| panic!("{what}: batch token lapsed: {e}"));
            }
        }
    };
    keep_reading("phase 1").await; // 4.5 s > TTL
                                   // Its token expired: the read gets 403, logs in again (the JWT file) and is retried
                                   // once, so it succeeds, but only through a second login.
    assert_eq!(unmaintained.token_status().logins, 1);
    unmaintained
        .read_key(&p, "api_key")
        .await
        .expect("a 403 from an expired token is answered by a new login");
    assert_eq!(
        unmaintained.token_status().logins,
        2,
        "the unmaintained token had expired: {:?}",
        unmaintained.token_status()
    );
    let (m1, b1) = (maintained.token_status(), batch.token_status());
    assert!(
        m1.renewals >= 1 && m1.logins == 1,
        "renewed, not logged in again: {m1:?}"
    );
    assert!(
        b1.logins >= 2 && b1.renewals == 0,
        "batch logged in again: {b1:?}"
    );
    // Logins and renewals are observed calls like any other (maintenance keeps running:
    // a call is reported just before the counter moves, so allow one in flight).
    let renews = rec_m.count("token.renew", StatusClass::Success);
    let logins = rec_b.count("auth.login", StatusClass::Success);
    let (m, b) = (maintained.token_status(), batch.token_status());
    assert!(
        (m1.renewals as usize..=m.renewals as usize + 1).contains(&renews),
        "{renews} renewals observed, {m1:?} .. {m:?}"
    );
    assert!(
        (b1.logins as usize..=b.logins as usize + 1).contains(&logins),
        "{logins} logins observed, {b1:?} .. {b:?}"
    );
    assert!(renews >= 1 && logins >= 2);
    assert_eq!(rec_m.count("auth.login", StatusClass::Success), 1);

    // The projected token rotates on disk and the old one stops being accepted: the
    // stores re-read the file when they log in again.
    let rotated = service_account_jwt();
    reviewer.accepted.lock().unwrap().insert(rotated.clone());
    reviewer.accepted.lock().unwrap().remove(&jwt);
    std::fs::write(&jwt_file, &rotated).unwrap();
    keep_reading("phase 2").await;
    let (m2, b2) = (maintained.token_status(), batch.token_status());
    assert!(b2.logins > b1.logins, "{b2:?}");
    assert!(
        reviewer.reviews_of(&rotated) >= 1,
        "the rotated JWT was used"
    );
    // OpenBao re-runs the TokenReview of the login JWT when a Kubernetes-auth token is
    // renewed: with that JWT rejected, renewal fails and the store logs in afresh.
    assert!(
        m2.logins > m1.logins,
        "renewable store logged in with the new JWT: {m2:?}"
    );
    cancel.cancel();
    h1.await.unwrap();
    h2.await.unwrap();
}

// ---- TLS ----------------------------------------------------------------------------------

#[tokio::test]
async fn vault_store_verifies_tls_with_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mut cmd = std::process::Command::new(support::tool("bao"));
    cmd.args([
        "server",
        "-dev",
        "-dev-tls",
        "-dev-root-token-id=root",
        &format!("-dev-listen-address=127.0.0.1:{port}"),
    ])
    .arg(format!("-dev-tls-cert-dir={}", certs.path().display()))
    .env("BAO_DISABLE_MLOCK", "true")
    // Its own HOME: parallel dev servers race on ~/.vault-token (see support::Bao).
    .env("HOME", certs.path())
    .env_remove("BAO_ADDR")
    .env_remove("VAULT_ADDR");
    let guard = support::ChildGuard::spawn(cmd);
    let address = format!("https://127.0.0.1:{port}");
    let ca = find_ca(certs.path(), &guard).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&address, token_file_auth(dir.path(), "root"));
    cfg.ca_cert = Some(ca);
    let store = {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match VaultStore::connect(&cfg, no_calls()).await {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("TLS connect: {e}\n{}", guard.output()),
            }
        }
    };
    store.health().await.expect("health over TLS");
    let p = format!("{}/tls/openai", unique_base());
    store
        .write_key(&p, "api_key", &key("tls"), &key_meta(1), 0)
        .await
        .expect("write over TLS");
    // Without the CA the server certificate is not trusted.
    cfg.ca_cert = None;
    let e = VaultStore::connect(&cfg, no_calls())
        .await
        .expect_err("untrusted certificate");
    let msg = e.to_string().to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("issuer"), "{e}");
}

async fn find_ca(dir: &Path, guard: &support::ChildGuard) -> PathBuf {
    for _ in 0..300 {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with("-ca.pem") {
                    return e.path();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no CA file in {}:\n{}", dir.display(), guard.output());
}

// ---- leak check -----------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Everything vaultrs, rustify, reqwest and we log at TRACE (spans with their fields, and
/// `log` records routed into tracing) during connect, writes, reads and failures: neither
/// the key nor the token appears.
#[tokio::test(flavor = "current_thread")]
async fn vault_store_logs_and_errors_never_hold_key_or_token() {
    let bao = support::start_bao().await;
    let root = admin(&bao.addr, &bao.token);
    vaultrs::sys::policy::set(
        &root,
        "okr-all",
        r#"path "secret/*" { capabilities = ["create", "read", "update", "list"] }"#,
    )
    .await
    .unwrap();
    let token = vaultrs::token::new(
        &root,
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec!["okr-all".to_string()])
                .ttl("1h"),
        ),
    )
    .await
    .unwrap()
    .client_token;
    let dir = tempfile::tempdir().unwrap();

    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let _ = tracing_log::LogTracer::init();

    // The observer path too: the store reports into the daemon's real metrics.
    let metrics = Arc::new(Metrics::new(&[]));
    let store = Arc::new(
        VaultStore::connect(
            &config(&bao.addr, token_file_auth(dir.path(), &token)),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let h = store.spawn_token_maintenance(CancellationToken::new());
    let p = format!("{}/leak/openai", unique_base());
    let k = key("LEAKCANARY");
    let v = store
        .write_key(&p, "api_key", &k, &key_meta(1), 0)
        .await
        .unwrap();
    let got = store.read_key(&p, "api_key").await.unwrap().unwrap();
    assert_eq!(got.key.expose(), k.expose());
    let _ = store.read_key_version(&p, "api_key", v).await.unwrap();
    let mut errors = Vec::new();
    errors.push(
        store
            .write_key(&p, "api_key", &k, &key_meta(2), 0)
            .await
            .unwrap_err(),
    );
    errors.push(store.read_key_version(&p, "api_key", 99).await.unwrap_err());
    let e = VaultStore::connect(
        &config(&bao.addr, token_file_auth(dir.path(), "not-a-token")),
        no_calls(),
    )
    .await
    .unwrap_err();
    h.abort();

    let text = logs.text();
    assert!(
        text.contains("start request") && text.contains("Sending Request"),
        "the capture did not see vaultrs/rustify at TRACE:\n{text}"
    );
    assert!(
        text.contains("DEBUG") && text.contains(&p),
        "request paths are logged"
    );
    for (what, needle) in [("key", k.expose()), ("token", token.as_str())] {
        assert!(!text.contains(needle), "{what} in logs:\n{text}");
        for err in &errors {
            assert!(!err.to_string().contains(needle), "{what} in {err}");
            assert!(!format!("{err:?}").contains(needle), "{what} in {err:?}");
        }
        assert!(!format!("{store:?}").contains(needle), "{what} in Debug");
        assert!(
            !format!("{got:?}").contains(needle),
            "{what} in StoredKey Debug"
        );
    }
    assert!(!e.to_string().contains("not-a-token") && !format!("{e:?}").contains("not-a-token"));
    let exposition = metrics.render();
    assert!(
        exposition.contains(r#"backend="vault",operation="kv.write",status_class="2xx""#),
        "the store's calls reached the metrics:\n{exposition}"
    );
    for needle in [k.expose(), token.as_str()] {
        assert!(!exposition.contains(needle), "a secret in the metrics");
    }

    // The check can fail: a value logged at TRACE does land in the capture.
    tracing::trace!(canary = k.expose(), "negative control");
    assert!(
        logs.text().contains(k.expose()),
        "capture misses TRACE events"
    );
}

/// vaultrs and rustify report an expected 404 (a path not written yet) at ERROR; the
/// directives in `QUIET_LOG_DIRECTIVES` silence that, and only that.
#[tokio::test(flavor = "current_thread")]
async fn vault_store_quiet_log_directives_silence_expected_404_errors() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_token(&bao.addr, &bao.token, dir.path()).await;
    let missing = format!("{}/not-yet", unique_base());
    let capture = |directives: &[&str]| {
        let logs = Captured::default();
        let filter = tracing_subscriber::EnvFilter::new(
            std::iter::once("info")
                .chain(directives.iter().copied())
                .collect::<Vec<_>>()
                .join(","),
        );
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish();
        (logs, subscriber)
    };
    // Without the directives: ERROR lines for a normal miss (the control).
    let (loud, subscriber) = capture(&[]);
    {
        let _g = tracing::subscriber::set_default(subscriber);
        assert!(store.read_key(&missing, "api_key").await.unwrap().is_none());
    }
    assert!(loud.text().contains("ERROR"), "{}", loud.text());
    // With them: none, while our own logs still come through.
    let (quiet, subscriber) = capture(QUIET_LOG_DIRECTIVES);
    {
        let _g = tracing::subscriber::set_default(subscriber);
        assert!(store.read_key(&missing, "api_key").await.unwrap().is_none());
        store
            .write_key(&missing, "api_key", &key("q"), &key_meta(1), 0)
            .await
            .unwrap();
    }
    let text = quiet.text();
    assert!(!text.contains("ERROR"), "{text}");
    assert!(text.contains("published key to Vault"), "{text}");
}
