//! Acceptance tests of the Kubernetes simulator with real clients: kubectl and kube-rs.

use openai_key_rotator::sandbox::kube::{KubeSim, KubeSimOptions};
use openai_key_rotator::sandbox::loopback;
use std::time::Duration;

#[tokio::test]
#[ignore = "manual: serves a seeded simulator for 10 minutes"]
async fn serve_for_manual_poking() {
    let sim = KubeSim::new(KubeSimOptions::default());
    sim.create_deployment(KubeSim::simple_deployment("default", "web", 2))
        .unwrap();
    let server = sim.serve(loopback(0), Default::default()).await.unwrap();
    let dir = std::env::temp_dir().join("kube-sim-manual");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kubeconfig"),
        KubeSim::kubeconfig_yaml(&server.url(), Some("default")),
    )
    .unwrap();
    eprintln!("SERVING {}", server.url());
    tokio::time::sleep(Duration::from_secs(600)).await;
}
