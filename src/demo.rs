//! `openai-key-rotator demo`: the simulators, seeded with two targets and consumer
//! workloads, and the real daemon rotating them every few seconds, with metrics, the API and
//! the audit trail live. Runs until Ctrl-C (or `--duration`).

use crate::app::{self, RunOptions};
use crate::sandbox::scenario::{Sandbox, SandboxOptions};
use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub sandbox: SandboxOptions,
    pub listen: SocketAddr,
    /// Seconds between scheduled rotations of each target.
    pub every_secs: u32,
    /// Stop by itself after this long (tests); None = until Ctrl-C.
    pub duration: Option<Duration>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            sandbox: SandboxOptions {
                dir: PathBuf::from("okr-demo"),
                targets: vec!["chatbot".into(), "summarizer".into()],
                ..SandboxOptions::default()
            },
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            every_secs: 15,
            duration: None,
        }
    }
}

/// Run the demo; returns the total (successful, failed) consumer calls.
pub async fn run(mut opts: DemoOptions) -> anyhow::Result<(u64, u64)> {
    opts.sandbox.schedule = format!("*/{} * * * * *", opts.every_secs.clamp(5, 59));
    let sb = Sandbox::start(opts.sandbox.clone())
        .await
        .context("starting the simulators")?;
    anyhow::ensure!(
        sb.wait_ready(Duration::from_secs(30)).await,
        "the seeded workloads did not become ready"
    );
    let token = Alphanumeric.sample_string(&mut rand::rng(), 32);
    let tokens_file = opts.sandbox.dir.join("api-tokens");
    std::fs::write(&tokens_file, format!("demo:{token}\n"))
        .with_context(|| format!("writing {}", tokens_file.display()))?;
    let audit_file = opts.sandbox.dir.join("audit.jsonl");

    let shutdown = CancellationToken::new();
    let run = RunOptions {
        config: sb.config_path.clone(),
        listen: Some(opts.listen),
        api_tokens_file: Some(tokens_file.clone()),
        audit_file: Some(audit_file.clone()),
    };
    let config = run.load_config()?;
    let running = app::start(run, config, shutdown.clone(), true).await?;
    let api = format!("http://{}", running.addr);
    let first = &sb.config.targets[0].name;
    println!();
    println!(
        "openai-key-rotator demo: rotating {} every {}s (Ctrl-C to stop)",
        sb.config
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(" and "),
        opts.every_secs
    );
    println!("  API + metrics   {api}   (token: {token})");
    println!("  audit trail     {}", audit_file.display());
    println!("  kubeconfig      {}", sb.kubeconfig_path.display());
    println!("Try:");
    println!("  curl -s -H 'Authorization: Bearer {token}' {api}/v1/targets");
    println!("  curl -s -X POST -H 'Authorization: Bearer {token}' -d '{{\"reason\":\"leak drill\",\"emergency\":true}}' {api}/v1/targets/{first}/rotations");
    println!("  curl -s {api}/metrics | grep ^openai_key_rotator_rotations_total");
    println!(
        "  cargo run --release -- audit verify {}",
        audit_file.display()
    );
    println!();

    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    loop {
        let stop = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = stop => { shutdown.cancel(); break; }
            _ = ticker.tick() => {
                let s = sb.consumers.total();
                let per: Vec<String> = running.daemon.targets().iter().map(|t| format!(
                    "{} key age {}s{}",
                    t.name,
                    t.key_age_seconds.unwrap_or(0),
                    t.running_rotation.as_ref().map(|r| format!(" (rotating {r})")).unwrap_or_default()
                )).collect();
                println!("consumers: {} calls ok, {} failed | {}", s.ok, s.failed, per.join(" | "));
            }
        }
    }
    running.done.await??;
    let s = sb.consumers.total();
    let completed = running
        .services
        .metrics
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("openai_key_rotator_rotations_total{")
                && l.contains("outcome=\"completed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    println!("demo stopped: {completed} rotations completed; consumers made {} successful and {} failed calls", s.ok, s.failed);
    Ok((s.ok, s.failed))
}
