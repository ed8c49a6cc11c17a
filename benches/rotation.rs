//! Benchmarks: what a rotation costs, measured (never asserted in tests).
//!
//! `cargo bench --bench rotation` runs them and rewrites its section of BENCHMARKS.md:
//! 1. the state machine alone over the in-memory fakes (engine overhead per rotation);
//! 2. a full rotation against the simulators with the real clients (HTTP, polling, rollout
//!    of two Deployments with 2 replicas each), while consumer pods call the data plane;
//! 3. the process's peak resident memory.

use chrono::Utc;
use openai_key_rotator::app;
use openai_key_rotator::audit::Audit;
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::rotation::fakes::FakeWorld;
use openai_key_rotator::rotation::{EngineOptions, RotationRequest, Status, Trigger};
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn engine_over_fakes(n: usize) -> Vec<Duration> {
    let world = FakeWorld::default();
    let (mut target, _) = world.seed_target("bench", Utc::now());
    target.grace_period = DurationStr(Duration::ZERO);
    let engine = world.engine(EngineOptions {
        poll_interval: Duration::from_micros(1),
        ..EngineOptions::default()
    });
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let prior = engine.journal(&target.name).await.unwrap();
        let req = RotationRequest::new(&target.name, Trigger::Cli, "bench", "bench", Utc::now());
        let j = engine
            .rotate(&target, req, prior, Arc::default())
            .await
            .unwrap();
        assert_eq!(j.status, Status::Completed);
        times.push(t.elapsed());
    }
    times
}

async fn end_to_end(n: usize) -> (Vec<Duration>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(SandboxOptions::for_tests(dir.path()))
        .await
        .unwrap();
    assert!(sb.wait_ready(Duration::from_secs(30)).await);
    let mut config = sb.config.clone();
    config.targets[0].grace_period = DurationStr(Duration::ZERO);
    let cancel = CancellationToken::new();
    let services = app::connect_with(
        &config,
        Audit::open(Some(&dir.path().join("audit.jsonl")), false).unwrap(),
        &cancel,
        EngineOptions {
            poll_interval: Duration::from_millis(50),
            ..app::engine_options(&config)
        },
        Vec::new(),
    )
    .await
    .unwrap();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let t0 = &config.targets[0];
        let prior = services.engine.journal(&t0.name).await.unwrap();
        let req = RotationRequest::new(&t0.name, Trigger::Cli, "bench", "bench", Utc::now());
        let j = services
            .engine
            .rotate(t0, req, prior, Arc::default())
            .await
            .unwrap();
        assert_eq!(j.status, Status::Completed, "{j:?}");
        times.push(t.elapsed());
    }
    let stats = sb.consumers.total();
    cancel.cancel();
    (times, stats.ok, stats.failed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fakes = rt.block_on(engine_over_fakes(500));
    let (e2e, ok, failed) = rt.block_on(end_to_end(15));
    let rss = peak_rss_kib();
    let fm = median(fakes.clone());
    let em = median(e2e.clone());
    let report = format!(
        "## In process: the state machine and one end-to-end rotation\n\n\
         Reproduce: `cargo bench --bench rotation` (rewrites this section). Machine: {cores} cores; \
         figures are medians of repeated runs in one process.\n\n\
         | benchmark | runs | median | p90 |\n|---|---|---|---|\n\
         | state machine over in-memory fakes (7 steps, 15+ journal writes) | {nf} | {fm:?} | {fp:?} |\n\
         | full rotation against the simulators with the real clients (2 Deployments × 2 replicas, pod ready delay 100 ms, 50 ms polling, no grace) | {ne} | {em:?} | {ep:?} |\n\n\
         - Consumer pods during the end-to-end runs: {ok} successful calls, {failed} failed.\n\
         - Engine overhead relative to a full rotation: {ratio:.4}% (median fakes / median end to end): \
         the wall time of a real rotation is the rollout, not the daemon. The fakes' figure is an \
         upper bound: their rollouts take two polls, each a tokio sleep of at least 1 ms.\n\
         - Peak resident memory of the benchmark process (simulators, consumers and the daemon's \
         clients in one process): {rss_mib:.1} MiB.\n",
        cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        nf = fakes.len(),
        fp = p90(fakes),
        ne = e2e.len(),
        ep = p90(e2e),
        ratio = fm.as_secs_f64() / em.as_secs_f64() * 100.0,
        rss_mib = rss as f64 / 1024.0,
    );
    print!("{report}");
    // Only its own section: `cargo bench --bench daemon` writes the others.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let (begin, end) = ("<!-- begin:in-process -->", "<!-- end:in-process -->");
    let block = format!("{begin}\n{}\n{end}", report.trim_end());
    let new = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{block}\n\n{}", text.trim_start()),
    };
    std::fs::write(&path, new).unwrap();
    eprintln!("wrote {}", path.display());
}
