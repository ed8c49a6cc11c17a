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
