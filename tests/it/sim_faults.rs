//! Fault controls of the three simulators, driven through their control endpoints
//! (`/_sim/...`) and the Rust handles, and observed through real clients (vaultrs, kube-rs,
//! reqwest against the OpenAI API). Every control is shown to take effect, and absent
//! without it (the negative control).

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, WatchEvent, WatchParams};
use openai_key_rotator::sandbox::kube::{KubeSim, KubeSimOptions};
use openai_key_rotator::sandbox::vault::VaultSim;
use openai_key_rotator::sandbox::{loopback, Server};
use openai_key_rotator::secret::Secret;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::kv2;

/// The added latency the latency tests use: large against a loopback request (about a
/// millisecond), so "with" and "without" are far apart even on a loaded 2-core machine.
pub const LATENCY: Duration = Duration::from_millis(400);

/// The fastest of `n` runs: robust against a scheduling stall in any one of them, and a
/// lower bound that an added latency must still exceed.
pub async fn fastest<F, Fut>(n: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut best = Duration::MAX;
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        best = best.min(t.elapsed());
    }
    best
}

pub fn vault_client(addr: &str, token: &str) -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .expect("vault client settings"),
    )
    .expect("vault client")
}

pub async fn serve_vault(root: &str) -> (VaultSim, Server) {
    let sim = VaultSim::new(Secret::new(root));
    let server = sim
        .serve(loopback(0), Default::default())
        .await
        .expect("serve vault sim");
    (sim, server)
}

pub async fn serve_kube() -> (KubeSim, Server) {
    let sim = KubeSim::new(KubeSimOptions {
        pod_ready_delay: Duration::from_millis(50),
        tick: Duration::from_millis(20),
        ..Default::default()
    });
    let server = sim
        .serve(loopback(0), Default::default())
        .await
        .expect("serve kube sim");
    (sim, server)
}

pub fn kube_client(server: &Server, ns: &str) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.default_namespace = ns.into();
    kube::Client::try_from(config).expect("kube client")
}

/// `PUT /_sim/faults` with `faults`, asserting the simulator accepted them.
pub async fn put_faults(base: &str, faults: Value) -> Value {
    let resp = reqwest::Client::new()
        .put(format!("{base}/_sim/faults"))
        .json(&faults)
        .send()
        .await
        .expect("PUT /_sim/faults");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "PUT /_sim/faults {faults}: {body}");
    body
}

pub async fn delete_faults(base: &str) {
    let resp = reqwest::Client::new()
        .delete(format!("{base}/_sim/faults"))
        .send()
        .await
        .expect("DELETE /_sim/faults");
    assert_eq!(resp.status(), 204);
}

// ---- latency --------------------------------------------------------------------------

#[tokio::test]
async fn vault_latency_delays_every_request_through_vaultrs() {
    let (sim, server) = serve_vault("root").await;
    let c = vault_client(&server.url(), "root");
    let data = HashMap::from([("api_key".to_string(), "sk-x".to_string())]);
    kv2::set(&c, "secret", "lat/k", &data).await.expect("write");
    let read = || async {
        let got: HashMap<String, String> = kv2::read(&c, "secret", "lat/k").await.expect("read");
        assert_eq!(got, data);
    };
    let without = fastest(3, read).await;
    assert!(without < LATENCY / 2, "no latency set, yet {without:?}");

    let body = put_faults(&server.url(), json!({"latency_ms": LATENCY.as_millis()})).await;
    assert_eq!(body["latency_ms"], json!(LATENCY.as_millis()));
    let with = fastest(2, read).await;
    assert!(with >= LATENCY, "latency set over HTTP, yet {with:?}");
    // The control endpoint itself is never delayed.
    let t = Instant::now();
    delete_faults(&server.url()).await;
    assert!(t.elapsed() < LATENCY, "{:?}", t.elapsed());
    let cleared = fastest(3, read).await;
    assert!(cleared < LATENCY / 2, "latency cleared, yet {cleared:?}");

    sim.set_latency(LATENCY);
    assert!(fastest(2, read).await >= LATENCY, "set from Rust");
    sim.set_latency(Duration::ZERO);
    assert!(fastest(3, read).await < LATENCY / 2);
}

#[tokio::test]
async fn kube_latency_delays_requests_and_the_start_of_a_watch_but_not_its_events() {
    let (sim, server) = serve_kube().await;
    sim.create_deployment(KubeSim::simple_deployment("lat", "web", 1))
        .expect("seed");
    let api: Api<Deployment> = Api::namespaced(kube_client(&server, "lat"), "lat");
    let get = || async {
        api.get("web").await.expect("get");
    };
    let without = fastest(3, get).await;
    assert!(without < LATENCY / 2, "no latency set, yet {without:?}");

    put_faults(&server.url(), json!({"latency_ms": LATENCY.as_millis()})).await;
    let with = fastest(2, get).await;
    assert!(with >= LATENCY, "latency set over HTTP, yet {with:?}");

    // A watch: the latency once, before the response starts...
    let t = Instant::now();
    let stream = api
        .watch(&WatchParams::default().timeout(60), "0")
        .await
        .expect("watch");
    let mut stream = Box::pin(stream);
    let first = stream.next().await.expect("initial event").expect("event");
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
    assert!(t.elapsed() >= LATENCY, "watch start {:?}", t.elapsed());
    // ...and not per event: three changes made through the handle (no HTTP, so no
    // latency of their own) arrive together in well under three latencies.
    let t = Instant::now();
    for i in 0..3 {
        sim.update_deployment("lat", "web", |d| {
            d.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert("n".into(), i.to_string());
        })
        .expect("update");
        loop {
            match stream.next().await.expect("event").expect("event") {
                WatchEvent::Modified(d)
                    if d.metadata.labels.as_ref().and_then(|l| l.get("n"))
                        == Some(&i.to_string()) =>
                {
                    break
                }
                _ => continue,
            }
        }
    }
    let events = t.elapsed();
    assert!(
        events < LATENCY * 3 / 2,
        "3 watch events took {events:?}: latency added per event?"
    );

    sim.clear_faults();
    assert!(fastest(3, get).await < LATENCY / 2, "cleared");
    sim.set_latency(LATENCY);
    assert!(fastest(2, get).await >= LATENCY, "set from Rust");
}

// ---- shared helpers ---------------------------------------------------------------------

async fn post_json(url: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(resp.status(), 200, "POST {url}");
    resp.json().await.expect("json")
}

async fn blocked(base: &str) -> Value {
    reqwest::get(format!("{base}/_sim/blocked"))
        .await
        .expect("GET /_sim/blocked")
        .json()
        .await
        .expect("json")
}

/// Poll `GET /_sim/blocked` (what a crash test does) until `n` calls are held.
async fn wait_blocked(base: &str, n: u64) -> Value {
    let start = Instant::now();
    loop {
        let b = blocked(base).await;
        if b["blocked"].as_u64() >= Some(n) {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never {n} held: {b}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `fut` is still pending after `d`: the call is held.
async fn still_pending<T>(fut: &mut tokio::task::JoinHandle<T>, d: Duration) -> bool {
    tokio::time::timeout(d, fut).await.is_err()
}

// ---- OpenAI: block, and the faults a retry policy meets ---------------------------------

const ADMIN: &str = "sk-admin-sim-faults-0123456789abcdefghij";

struct OpenAi {
    sim: openai_key_rotator::sandbox::openai::OpenAiSim,
    server: Server,
    project: String,
}

impl OpenAi {
    async fn start() -> Self {
        let sim = openai_key_rotator::sandbox::openai::OpenAiSim::new(Secret::new(ADMIN));
        let project = sim.create_project("faults");
        let server = sim.serve(loopback(0), Default::default()).await.unwrap();
        OpenAi {
            sim,
            server,
            project,
        }
    }

    fn accounts_url(&self) -> String {
        format!(
            "{}/v1/organization/projects/{}/service_accounts",
            self.server.url(),
            self.project
        )
    }

    fn create(&self, name: &str) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        let req = reqwest::Client::new()
            .post(self.accounts_url())
            .bearer_auth(ADMIN)
            .json(&json!({ "name": name }));
        tokio::spawn(req.send())
    }

    async fn list(&self) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.accounts_url())
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
    }

    fn names(&self) -> Vec<String> {
        self.sim
            .service_accounts(&self.project)
            .into_iter()
            .map(|a| a.name)
            .collect()
    }
}

#[tokio::test]
async fn openai_block_holds_a_create_before_or_after_its_effect_until_released() {
    let o = OpenAi::start().await;
    let base = o.server.url();
    put_faults(
        &base,
        json!({"block": {"operations": ["service_accounts.create"], "after_effect": false}}),
    )
    .await;
    let mut call = o.create("held-before");
    let b = wait_blocked(&base, 1).await;
    assert_eq!(b["operations"]["service_accounts.create"], 1, "{b}");
    assert!(still_pending(&mut call, Duration::from_millis(200)).await);
    assert!(
        o.names().is_empty(),
        "held before its effect: nothing created yet"
    );
    // Negative control: operations not named are not held.
    assert_eq!(o.list().await.status(), 200);
    let r = post_json(&format!("{base}/_sim/release"), json!({})).await;
    assert_eq!(r["released"], 1);
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(o.names(), ["held-before"]);
    assert_eq!(blocked(&base).await["blocked"], 0);

    // After the effect: the account exists while its answer is held back.
    put_faults(
        &base,
        json!({"block": {"operations": ["service_accounts.create"], "after_effect": true}}),
    )
    .await;
    let mut call = o.create("held-after");
    wait_blocked(&base, 1).await;
    assert!(still_pending(&mut call, Duration::from_millis(200)).await);
    assert_eq!(o.names(), ["held-before", "held-after"]);
    // Clearing the faults lets held calls go too.
    delete_faults(&base).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);

    // A client that dies while held (a SIGKILLed daemon): the held call is dropped and a
    // before-effect call never takes effect.
    o.sim
        .set_faults(openai_key_rotator::sandbox::openai::Faults {
            block: Some(openai_key_rotator::sandbox::Block::only(
                "service_accounts.create",
            )),
            ..Default::default()
        });
    let call = o.create("abandoned");
    assert!(o.sim.wait_blocked(1, Duration::from_secs(10)).await);
    call.abort();
    let start = Instant::now();
    while o.sim.blocked().blocked > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "held call not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(o.sim.blocked().abandoned, 1);
    o.sim.clear_faults();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(o.names(), ["held-before", "held-after"], "no late effect");
    // An unknown operation name is refused.
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/faults"))
        .json(&json!({"block": {"operations": ["service_accounts.mint"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn openai_429_storms_5xx_bursts_and_hangs_over_the_control_endpoint() {
    let o = OpenAi::start().await;
    let base = o.server.url();
    // A 429 storm with Retry-After...
    put_faults(
        &base,
        json!({"rate_limit": {"requests_per_second": 0, "retry_after_secs": 7}}),
    )
    .await;
    for _ in 0..3 {
        let r = o.list().await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    }
    // ...and without it.
    put_faults(
        &base,
        json!({"rate_limit": {"requests_per_second": 0, "omit_retry_after": true}}),
    )
    .await;
    let r = o.list().await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
    // A 5xx burst: the next 3 calls, then normal service.
    put_faults(&base, json!({"fail_next": {"count": 3, "status": 503}})).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(o.list().await.status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 503, 200]);
    // A hang: no answer while set, the answer once cleared.
    put_faults(&base, json!({"hang": true})).await;
    let url = o.accounts_url();
    let mut call = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(still_pending(&mut call, Duration::from_millis(300)).await);
    delete_faults(&base).await;
    assert_eq!(call.await.unwrap().unwrap(), 200);
    // Negative control: without faults, none of it.
    let r = o.list().await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
}

#[tokio::test]
async fn openai_rate_limit_headers_are_on_every_admin_response_while_a_limit_is_set() {
    let o = OpenAi::start().await;
    let base = o.server.url();
    // Only creates are limited, yet every Admin API answer reports the window.
    put_faults(
        &base,
        json!({"rate_limit": {"requests_per_second": 3}, "operations": ["service_accounts.create"]}),
    )
    .await;
    let header = |r: &reqwest::Response, n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let r = o.list().await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-limit-requests").as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("3")
    );
    let reset = header(&r, "x-ratelimit-reset-requests").unwrap();
    assert!(reset == "1s" || reset.ends_with("ms"), "{reset}");
    let r = o.create("a").await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("2")
    );
    let reset = header(&r, "x-ratelimit-reset-requests").unwrap();
    let ms: u64 = match reset.strip_suffix("ms") {
        Some(ms) => ms.parse().unwrap(),
        None => 1000,
    };
    assert!(ms <= 1000, "{reset}");
    // A 401 and an injected 5xx carry them too.
    let r = reqwest::Client::new()
        .get(o.accounts_url())
        .bearer_auth("sk-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(header(&r, "x-ratelimit-limit-requests").is_some());
    put_faults(
        &base,
        json!({"rate_limit": {"requests_per_second": 3}, "fail_next": {"count": 1, "status": 502}}),
    )
    .await;
    let r = o.list().await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("2")
    );
    // Negative control: no rate limit, no headers.
    put_faults(&base, json!({"fail_next": {"count": 1, "status": 502}})).await;
    let r = o.list().await;
    assert_eq!(r.status(), 502);
    assert!(header(&r, "x-ratelimit-limit-requests").is_none());
}

// ---- Vault --------------------------------------------------------------------------------

type Data = HashMap<String, String>;

fn data(v: &str) -> Data {
    HashMap::from([("api_key".to_string(), v.to_string())])
}

fn api_error(e: vaultrs::error::ClientError) -> (u16, Vec<String>) {
    match e {
        vaultrs::error::ClientError::APIError { code, errors } => (code, errors),
        other => panic!("expected a Vault API error, got {other:?}"),
    }
}

#[tokio::test]
async fn vault_block_holds_a_write_before_or_after_its_effect_through_vaultrs() {
    let (sim, server) = serve_vault("root").await;
    let base = server.url();
    let c = std::sync::Arc::new(vault_client(&base, "root"));
    kv2::set(&*c, "secret", "b/k", &data("v1")).await.unwrap();
    put_faults(&base, json!({"block": {"operations": ["kv.write"]}})).await;
    let c2 = c.clone();
    let mut write = tokio::spawn(async move { kv2::set(&*c2, "secret", "b/k", &data("v2")).await });
    let b = wait_blocked(&base, 1).await;
    assert_eq!(b["operations"]["kv.write"], 1, "{b}");
    assert!(still_pending(&mut write, Duration::from_millis(200)).await);
    assert_eq!(
        sim.read_raw("b/k").map(|(v, _)| v),
        Some(1),
        "not applied yet"
    );
    // Negative control: reads are not held.
    let got: Data = kv2::read(&*c, "secret", "b/k").await.unwrap();
    assert_eq!(got, data("v1"));
    assert_eq!(
        post_json(&format!("{base}/_sim/release"), json!({})).await["released"],
        1
    );
    assert_eq!(write.await.unwrap().unwrap().version, 2);

    put_faults(
        &base,
        json!({"block": {"operations": ["kv.write"], "after_effect": true}}),
    )
    .await;
    let c2 = c.clone();
    let mut write = tokio::spawn(async move { kv2::set(&*c2, "secret", "b/k", &data("v3")).await });
    wait_blocked(&base, 1).await;
    assert!(still_pending(&mut write, Duration::from_millis(200)).await);
    assert_eq!(
        sim.read_raw("b/k").map(|(v, _)| v),
        Some(3),
        "applied, answer held"
    );
    sim.release();
    assert_eq!(write.await.unwrap().unwrap().version, 3);
    assert_eq!(sim.blocked().total, 2);
}

#[tokio::test]
async fn vault_fail_next_and_unavailable_answer_503_through_vaultrs() {
    let (_sim, server) = serve_vault("root").await;
    let base = server.url();
    let c = vault_client(&base, "root");
    kv2::set(&c, "secret", "f/k", &data("v1")).await.unwrap();
    put_faults(
        &base,
        json!({"fail_next": {"count": 2, "status": 503, "operations": ["kv.read"]}}),
    )
    .await;
    // Writes are not named: unaffected (the negative control).
    kv2::set(&c, "secret", "f/k", &data("v2")).await.unwrap();
    for _ in 0..2 {
        let e = kv2::read::<Data>(&c, "secret", "f/k").await.unwrap_err();
        assert_eq!(api_error(e).0, 503);
    }
    let got: Data = kv2::read(&c, "secret", "f/k").await.unwrap();
    assert_eq!(got, data("v2"), "the third read is served");

    put_faults(&base, json!({"unavailable": {"status": 503}})).await;
    for _ in 0..3 {
        let e = kv2::read::<Data>(&c, "secret", "f/k").await.unwrap_err();
        assert_eq!(api_error(e).0, 503);
        let e = kv2::set(&c, "secret", "f/k", &data("x")).await.unwrap_err();
        assert_eq!(api_error(e).0, 503);
    }
    delete_faults(&base).await;
    let got: Data = kv2::read(&c, "secret", "f/k").await.unwrap();
    assert_eq!(got, data("v2"), "nothing applied while unavailable");
    // Only 429 and 5xx are faults.
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/faults"))
        .json(&json!({"fail_next": {"count": 1, "status": 404}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn vault_sealed_mode_answers_like_a_sealed_vault() {
    let (sim, server) = serve_vault("root").await;
    let base = server.url();
    let c = vault_client(&base, "root");
    kv2::set(&c, "secret", "s/k", &data("v1")).await.unwrap();
    let health = || async {
        let r = reqwest::get(format!("{base}/v1/sys/health")).await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (s, h) = health().await;
    assert_eq!((s, &h["sealed"]), (200, &json!(false)), "negative control");
    put_faults(&base, json!({"sealed": true})).await;
    let (s, h) = health().await;
    assert_eq!(
        (s, &h["sealed"], &h["standby"]),
        (503, &json!(true), &json!(true))
    );
    let e = kv2::read::<Data>(&c, "secret", "s/k").await.unwrap_err();
    assert_eq!(api_error(e), (503, vec!["Vault is sealed".to_string()]));
    let e = vaultrs::token::lookup_self(&c).await.unwrap_err();
    assert_eq!(api_error(e).0, 503);
    sim.set_sealed(false);
    let got: Data = kv2::read(&c, "secret", "s/k").await.unwrap();
    assert_eq!(got, data("v1"));
    // Sealing through the API, as an operator does.
    vaultrs::sys::seal(&c).await.expect("seal");
    assert_eq!(health().await.0, 503);
    assert!(sim.faults().sealed);
}

#[tokio::test]
async fn vault_cas_conflict_next_makes_the_next_cas_write_stale() {
    let (sim, server) = serve_vault("root").await;
    let base = server.url();
    let c = vault_client(&base, "root");
    let opts = |cas| vaultrs::api::kv2::requests::SetSecretRequestOptions { cas };
    kv2::set(&c, "secret", "c/k", &data("v1")).await.unwrap();
    put_faults(&base, json!({"cas_conflict_next": 1})).await;
    // A write without CAS is not a CAS write: unaffected, and it does not use the fault up.
    assert_eq!(
        kv2::set(&c, "secret", "c/k", &data("v2"))
            .await
            .unwrap()
            .version,
        2
    );
    let e = kv2::set_with_options(&c, "secret", "c/k", &data("mine"), opts(2))
        .await
        .unwrap_err();
    assert_eq!(
        api_error(e),
        (
            400,
            vec!["check-and-set parameter did not match the current version".to_string()]
        )
    );
    // The concurrent writer wrote version 3 with the data it found: the key is unchanged.
    let (v, d) = sim.read_raw("c/k").unwrap();
    assert_eq!((v, d["api_key"].as_str()), (3, Some("v2")));
    // Only the next one: a fresh CAS write now succeeds (the negative control).
    let m = kv2::set_with_options(&c, "secret", "c/k", &data("mine"), opts(3))
        .await
        .unwrap();
    assert_eq!(m.version, 4);
}

fn service_account_jwt(ns: &str, name: &str, uid: &str) -> String {
    use base64::Engine;
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        enc(json!({"alg": "RS256", "typ": "JWT"})),
        enc(json!({
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": ns,
            "kubernetes.io/serviceaccount/secret.name": format!("{name}-token"),
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "sub": format!("system:serviceaccount:{ns}:{name}"),
        })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"not-checked"),
    )
}

/// Kubernetes auth on a Vault at `addr` (root token `root`) against the TokenReview of the
/// Kubernetes simulator at `kube_url`, role `okr` for `okr/okr`, with the HTTP calls an
/// operator makes (the same for OpenBao and the simulator).
pub async fn setup_kubernetes_auth(addr: &str, kube_url: &str, extra_role: Value) {
    let http = reqwest::Client::new();
    let mut role = json!({"bound_service_account_names": "okr",
                          "bound_service_account_namespaces": "okr",
                          "token_policies": "default", "token_ttl": "1h"});
    role.as_object_mut()
        .unwrap()
        .extend(extra_role.as_object().cloned().unwrap_or_default());
    for (path, body) in [
        ("sys/auth/kubernetes", json!({"type": "kubernetes"})),
        (
            "auth/kubernetes/config",
            json!({"kubernetes_host": kube_url, "disable_local_ca_jwt": true,
                   "token_reviewer_jwt": "reviewer-token",
                   "kubernetes_ca_cert": UNUSED_CA_PEM}),
        ),
        ("auth/kubernetes/role/okr", role),
    ] {
        let r = http
            .post(format!("{addr}/v1/{path}"))
            .header("X-Vault-Token", "root")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "{path}: {}",
            r.text().await.unwrap()
        );
    }
}

/// Some certificate: OpenBao wants a `kubernetes_ca_cert` when `disable_local_ca_jwt` is
/// set; the reviewer is plain HTTP, so it is never used.
pub const UNUSED_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
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

/// A JWT the Kubernetes simulator's TokenReview accepts as `okr/okr`.
pub fn registered_jwt(kube: &KubeSim) -> String {
    let uid = KubeSim::service_account_uid("okr", "okr");
    let jwt = service_account_jwt("okr", "okr", &uid);
    kube.add_service_account_token(&jwt, "okr", "okr");
    jwt
}

#[tokio::test]
async fn vault_token_revoked_mid_run_gets_403_and_a_kubernetes_login_recovers() {
    let (kube, kube_server) = serve_kube().await;
    let (sim, server) = serve_vault("root").await;
    let base = server.url();
    setup_kubernetes_auth(&base, &kube_server.url(), json!({})).await;
    let jwt = registered_jwt(&kube);
    let anonymous = vault_client(&base, "");
    let login = || async {
        vaultrs::auth::kubernetes::login(&anonymous, "kubernetes", "okr", &jwt)
            .await
            .expect("kubernetes login")
    };
    let auth = login().await;
    assert!(auth.renewable);
    assert_eq!(auth.lease_duration, 3600);
    let c = vault_client(&base, &auth.client_token);
    kv2::set(&c, "secret", "t/k", &data("v1"))
        .await
        .expect("write with the login token");

    // Negative control: a filter that matches nothing revokes nothing.
    let r = post_json(
        &format!("{base}/_sim/tokens/revoke"),
        json!({"role": "other"}),
    )
    .await;
    assert_eq!(r["revoked"], 0);
    let _: Data = kv2::read(&c, "secret", "t/k").await.expect("still valid");

    let tokens: Value = reqwest::get(format!("{base}/_sim/tokens"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k8s: Vec<&Value> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["method"] == "kubernetes")
        .collect();
    assert_eq!(k8s.len(), 1, "{tokens}");
    assert!(
        !tokens.to_string().contains(&auth.client_token),
        "no token values listed"
    );
    let r = post_json(
        &format!("{base}/_sim/tokens/revoke"),
        json!({"accessor": k8s[0]["accessor"]}),
    )
    .await;
    assert_eq!(r["revoked"], 1);
    let e = kv2::read::<Data>(&c, "secret", "t/k").await.unwrap_err();
    assert_eq!(api_error(e), (403, vec!["permission denied".to_string()]));
    let e = vaultrs::token::renew_self(&c, None).await.unwrap_err();
    assert_eq!(api_error(e).0, 403);

    // Logging in again recovers.
    let again = login().await;
    assert_ne!(again.client_token, auth.client_token);
    let c = vault_client(&base, &again.client_token);
    let got: Data = kv2::read(&c, "secret", "t/k")
        .await
        .expect("the new token works");
    assert_eq!(got, data("v1"));
    // The root token survives a revocation by method.
    assert_eq!(
        sim.revoke_tokens(&openai_key_rotator::sandbox::vault::TokenFilter::kubernetes()),
        1
    );
    let root = vault_client(&base, "root");
    let _: Data = kv2::read(&root, "secret", "t/k")
        .await
        .expect("root untouched");
}

// ---- Kubernetes ---------------------------------------------------------------------------

fn kube_code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn seeded_kube(ns: &str, names: &[&str]) -> (KubeSim, Server, Api<Deployment>) {
    let (sim, server) = serve_kube().await;
    for n in names {
        sim.create_deployment(KubeSim::simple_deployment(ns, n, 1))
            .unwrap();
    }
    let api: Api<Deployment> = Api::namespaced(kube_client(&server, ns), ns);
    (sim, server, api)
}

fn label_patch(v: &str) -> kube::api::Patch<Value> {
    kube::api::Patch::Merge(json!({"metadata": {"labels": {"mark": v}}}))
}

fn mark(d: &Deployment) -> Option<String> {
    d.metadata.labels.as_ref()?.get("mark").cloned()
}

#[tokio::test]
async fn kube_block_holds_a_patch_before_or_after_its_effect_through_kube_rs() {
    let (sim, server, api) = seeded_kube("blk", &["web"]).await;
    let base = server.url();
    let pp = kube::api::PatchParams::default();
    put_faults(
        &base,
        json!({"block": {"operations": ["deployments.patch"]}}),
    )
    .await;
    let (a, p) = (api.clone(), pp.clone());
    let mut patch = tokio::spawn(async move { a.patch("web", &p, &label_patch("1")).await });
    let b = wait_blocked(&base, 1).await;
    assert_eq!(b["operations"]["deployments.patch"], 1, "{b}");
    assert!(still_pending(&mut patch, Duration::from_millis(200)).await);
    assert_eq!(
        mark(&sim.deployment("blk", "web").unwrap()),
        None,
        "not applied yet"
    );
    // Negative control: a get is not held.
    assert_eq!(mark(&api.get("web").await.unwrap()), None);
    assert_eq!(
        post_json(&format!("{base}/_sim/release"), json!({})).await["released"],
        1
    );
    assert_eq!(mark(&patch.await.unwrap().unwrap()).as_deref(), Some("1"));

    put_faults(
        &base,
        json!({"block": {"operations": ["deployments.patch"], "after_effect": true}}),
    )
    .await;
    let (a, p) = (api.clone(), pp.clone());
    let mut patch = tokio::spawn(async move { a.patch("web", &p, &label_patch("2")).await });
    wait_blocked(&base, 1).await;
    assert!(still_pending(&mut patch, Duration::from_millis(200)).await);
    assert_eq!(
        mark(&sim.deployment("blk", "web").unwrap()).as_deref(),
        Some("2")
    );
    delete_faults(&base).await;
    assert!(patch.await.unwrap().is_ok());
    assert_eq!(sim.blocked().blocked, 0);
}

#[tokio::test]
async fn kube_conflict_and_fail_next_through_kube_rs() {
    let (_sim, server, api) = seeded_kube("flt", &["web"]).await;
    let base = server.url();
    let pp = kube::api::PatchParams::default();
    put_faults(&base, json!({"conflict_next": {"count": 2}})).await;
    // Gets are not patches (the negative control).
    api.get("web").await.unwrap();
    for _ in 0..2 {
        let e = api.patch("web", &pp, &label_patch("x")).await.unwrap_err();
        assert_eq!(kube_code(e), (409, "Conflict".to_string()));
    }
    assert_eq!(
        mark(&api.patch("web", &pp, &label_patch("y")).await.unwrap()).as_deref(),
        Some("y")
    );
    // Scoped to another operation: deployment patches are untouched.
    put_faults(
        &base,
        json!({"conflict_next": {"count": 1, "operations": ["leases.update"]}}),
    )
    .await;
    api.patch("web", &pp, &label_patch("z")).await.unwrap();

    // 5xx for the next N requests of one operation (500: kube-rs itself retries 503s).
    put_faults(
        &base,
        json!({"fail_next": {"count": 2, "status": 500, "operations": ["deployments.get"]}}),
    )
    .await;
    api.list(&Default::default())
        .await
        .expect("lists are not named");
    for _ in 0..2 {
        let e = api.get("web").await.unwrap_err();
        assert_eq!(kube_code(e), (500, "InternalError".to_string()));
    }
    assert_eq!(mark(&api.get("web").await.unwrap()).as_deref(), Some("z"));
    // Unknown operation names are refused.
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/faults"))
        .json(&json!({"fail_next": {"count": 1, "operations": ["deployment.get"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn kube_watch_disconnects_close_open_watches_and_a_new_watch_works() {
    let (sim, server, api) = seeded_kube("wd", &["web"]).await;
    let base = server.url();
    // Settled first, so no controller update is in flight when the counting starts.
    assert!(
        sim.wait_rollout_complete("wd", "web", Duration::from_secs(10))
            .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = |api: Api<Deployment>| async move {
        let s = api
            .watch(&WatchParams::default().timeout(120), "0")
            .await
            .expect("watch");
        let mut s = Box::pin(s);
        assert!(matches!(s.next().await, Some(Ok(WatchEvent::Added(_)))));
        s
    };
    let touch = |i: u32| {
        sim.update_deployment("wd", "web", |d| {
            d.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert("n".into(), i.to_string());
        })
        .unwrap();
    };
    let mut first = open(api.clone()).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(kube_client(&server, "wd"), "wd");
    let pod_watch = pods
        .watch(&WatchParams::default().timeout(120), "0")
        .await
        .unwrap();
    let mut pod_watch = Box::pin(pod_watch);
    let watches: Value = reqwest::get(format!("{base}/_sim/watches"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(watches["resources"]["deployments"], 1, "{watches}");

    // Closed after 2 more events; the pod watch is not named and stays open.
    let r = post_json(
        &format!("{base}/_sim/watches/disconnect"),
        json!({"after_events": 2, "resources": ["deployments"]}),
    )
    .await;
    assert_eq!(r["watches"], 1);
    let mut got = 0;
    let mut i = 0;
    loop {
        i += 1;
        touch(i);
        match tokio::time::timeout(Duration::from_secs(10), first.next()).await {
            Ok(Some(Ok(WatchEvent::Modified(_)))) => got += 1,
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            Ok(None) => break,
            other => panic!("unexpected {other:?}"),
        }
        assert!(got <= 2, "more than 2 events after the disconnect");
    }
    assert_eq!(got, 2);

    // A new watch works, and `after_events: 0` closes it at once.
    let mut second = open(api.clone()).await;
    touch(100);
    assert!(matches!(
        second.next().await,
        Some(Ok(WatchEvent::Modified(_)))
    ));
    let r = post_json(
        &format!("{base}/_sim/watches/disconnect"),
        json!({"after_events": 0}),
    )
    .await;
    assert_eq!(r["watches"], 2, "both open watches");
    let end = tokio::time::timeout(Duration::from_secs(10), second.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    // The pod watch ends too, once what was sent before the order is read.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = pod_watch.next().await {
            assert!(ev.is_ok(), "{ev:?}");
        }
    })
    .await;
    assert!(ended.is_ok(), "pod watch still open");
    assert_eq!(sim.open_watches(), 0);
}

#[tokio::test]
async fn kube_never_ready_rollouts_over_the_control_endpoint() {
    let (sim, server, api) = seeded_kube("nr", &["web", "other"]).await;
    let base = server.url();
    for n in ["web", "other"] {
        assert!(
            sim.wait_rollout_complete("nr", n, Duration::from_secs(10))
                .await
        );
    }
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/workloads/nr/web"))
        .json(&json!({"kind": "Deployment", "never_ready": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pp = kube::api::PatchParams::default();
    let restart = |v: &str| {
        kube::api::Patch::Merge(
            json!({"spec": {"template": {"metadata": {"annotations": {"restartedAt": v}}}}}),
        )
    };
    api.patch("web", &pp, &restart("1")).await.unwrap();
    api.patch("other", &pp, &restart("1")).await.unwrap();
    // The other workload rolls (the negative control); this one never completes.
    assert!(
        sim.wait_rollout_complete("nr", "other", Duration::from_secs(10))
            .await
    );
    assert!(
        !sim.wait_rollout_complete("nr", "web", Duration::from_secs(1))
            .await
    );
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/workloads/nr/web"))
        .json(&json!({"never_ready": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        sim.wait_rollout_complete("nr", "web", Duration::from_secs(10))
            .await
    );
    let r = reqwest::Client::new()
        .put(format!("{base}/_sim/workloads/nr/web"))
        .json(&json!({"kind": "CronJob", "never_ready": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
