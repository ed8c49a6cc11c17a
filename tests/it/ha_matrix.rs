//! HA matrix: two replicas of the real binary share a Lease. The leader is stopped with
//! SIGTERM or killed with SIGKILL at every step boundary and inside the remote calls of a
//! rotation (held by its own Vault proxy or by the simulators), and the follower must take
//! over within the lease and finish the rotation from the journal. Then: I1 (sampled every
//! 20 ms throughout, a failed read is a violation), I2 over both replicas' audit trails, I3/I5
//! (after a sweep one account is left, the one Vault serves), both trails verify, no consumer
//! call failed, and the stopped leader made no Vault write after the follower acquired the
//! Lease (each replica talks to Vault through its own proxy, so its writes are its own).
//!
//! `cargo test --test it ha_matrix` runs every point once per signal (what CI runs);
//! `OKR_HA_REPEATS=3 cargo test --test it ha_matrix -- --nocapture` runs each three times.

use crate::daemon_rig::{i2_violations, Rig, TOKEN};
use crate::support::{ChildGuard, HoldMatch, HoldProxy};
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::sandbox::kube::Faults as KubeFaults;
use openai_key_rotator::sandbox::openai::Faults as OpenAiFaults;
use openai_key_rotator::sandbox::Block;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "chatbot";
const LEASE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
enum Point {
    /// The journal write that begins `step` is held before it lands.
    Begin(&'static str),
    /// An OpenAI Admin API call held before (`false`) or after (`true`) its effect.
    OpenAi(&'static str, bool),
    /// A Kubernetes call held before or after its effect.
    Kube(&'static str, bool),
    /// The publish (the Vault write of the key) held after its effect (answer lost).
    VaultKey,
}

impl Point {
    fn name(&self) -> String {
        let phase = |after: bool| if after { "after" } else { "before" };
        match self {
            Point::Begin(s) => format!("before {s} (journal write held)"),
            Point::OpenAi(op, a) => format!("openai {op}, {} effect", phase(*a)),
            Point::Kube(op, a) => format!("kube {op}, {} effect", phase(*a)),
            Point::VaultKey => "vault publish write, after effect".into(),
        }
    }
}

const POINTS: &[Point] = &[
    Point::Begin("mint"),
    Point::OpenAi("service_accounts.create", false),
    Point::Begin("publish"),
    Point::VaultKey,
    Point::Begin("roll"),
    Point::Kube("deployments.patch", true),
    Point::Begin("verify"),
    Point::Begin("drain"),
    Point::Begin("retire"),
    Point::OpenAi("service_accounts.delete", false),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Signal {
    Term,
    Kill,
}

fn journal_write(step: &'static str) -> HoldMatch {
    let path = format!("/v1/secret/data/openai-key-rotator/state/targets/{TARGET}");
    Arc::new(move |method, p, body| {
        let doc = &body["data"]["doc"];
        (method == "POST" || method == "PUT")
            && p == path
            && doc["step"] == step
            && doc["step_state"] == "started"
            && doc["status"] == "running"
    })
}

/// One replica: its name, port, audit file, Vault proxy and (while it runs) process.
struct Replica {
    name: &'static str,
    port: u16,
    config: PathBuf,
    audit: PathBuf,
    proxy: HoldProxy,
    child: Option<ChildGuard>,
}

impl Replica {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

struct Row {
    point: String,
    signal: Signal,
    outcome: String,
    takeover: Duration,
    settle: Duration,
    problems: Vec<String>,
}

async fn wait_for<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_matrix() {
    let repeats: usize = std::env::var("OKR_HA_REPEATS")
        .ok()
        .map(|v| v.parse().expect("OKR_HA_REPEATS is a number"))
        .unwrap_or(1);
    let test_start = Instant::now();
    let rig = Rig::start(
        |_| {},
        |c| {
            let le = &mut c.daemon.leader_election;
            le.enabled = true;
            le.namespace = "okr".into();
            le.lease_name = "okr-leader".into();
            le.lease_duration = DurationStr(LEASE);
            le.renew_deadline = DurationStr::from_secs(2);
            le.retry_period = DurationStr(Duration::from_millis(250));
        },
    )
    .await;
    let vault_path = rig.config.targets[0].vault_path.clone();
    let key_path = format!("/v1/secret/data/{vault_path}");
    // Each replica reaches Vault through its own proxy (and so has its own config file).
    let mut replicas = Vec::new();
    for name in ["okr-a", "okr-b"] {
        let proxy = HoldProxy::start(&rig.bao.addr).await;
        let mut config = rig.config.clone();
        config.vault.address = proxy.url.clone();
        let path = rig.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        replicas.push(Replica {
            name,
            port: crate::support::free_port(),
            config: path,
            audit: rig.dir.path().join(format!("audit-{name}.jsonl")),
            proxy,
            child: None,
        });
    }
    let holder = {
        let kube = rig.sb.kube.clone();
        move || {
            kube.lease("okr", "okr-leader")
                .and_then(|l| l.spec)
                .map(|s| {
                    (
                        s.holder_identity.unwrap_or_default(),
                        s.acquire_time.map(|t| t.0.as_microsecond()),
                    )
                })
                .unwrap_or_default()
        }
    };
    let i1 = rig.i1_sampler();
    for r in replicas.iter_mut() {
        r.child = Some(
            rig.spawn_replica(&r.config, Some(r.name), r.port, &r.audit)
                .await,
        );
        if r.name == "okr-a" {
            assert!(
                wait_for(Duration::from_secs(30), || holder().0 == "okr-a").await,
                "okr-a never led:\n{}",
                r.child.as_ref().unwrap().output()
            );
        }
    }
    let mut leader = 0usize;
    let mut rows: Vec<Row> = Vec::new();

    for round in 0..repeats {
        for signal in [Signal::Kill, Signal::Term] {
            for point in POINTS {
                let (l, f) = (leader, 1 - leader);
                let mut problems = Vec::new();
                let failed_before = rig.sb.consumers.total().failed;
                let lp = &replicas[l].proxy;
                match *point {
                    Point::Begin(step) => lp.arm(journal_write(step), false),
                    Point::VaultKey => {
                        let kp = key_path.clone();
                        lp.arm(
                            Arc::new(move |m, p, _| (m == "POST" || m == "PUT") && p == kp),
                            true,
                        )
                    }
                    Point::OpenAi(op, after) => {
                        let mut b = Block::only(op);
                        b.after_effect = after;
                        rig.sb.openai.set_faults(OpenAiFaults {
                            block: Some(b),
                            ..Default::default()
                        });
                    }
                    Point::Kube(op, after) => {
                        let mut b = Block::only(op);
                        b.after_effect = after;
                        rig.sb.kube.set_faults(KubeFaults::block(b));
                    }
                }
                let name = format!("{:?} at {}", signal, point.name());
                let r = rig
                    .http
                    .post(replicas[l].url(&format!("/v1/targets/{TARGET}/rotations")))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({"reason": format!("ha matrix: {name}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "{name}: {}", r.text().await.unwrap());
                let id = r.json::<serde_json::Value>().await.unwrap()["rotation_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let wait = Duration::from_secs(60);
                let held = match point {
                    Point::OpenAi(..) => rig.sb.openai.wait_blocked(1, wait).await,
                    Point::Kube(..) => rig.sb.kube.wait_blocked(1, wait).await,
                    _ => replicas[l].proxy.wait_held(wait).await,
                };
                assert!(
                    held,
                    "{name}: the leader never reached the held call\n{}",
                    replicas[l].child.as_ref().unwrap().output()
                );
                let signalled = Instant::now();
                let mut old = replicas[l].child.take().unwrap();
                match signal {
                    Signal::Kill => {
                        old.child.kill().unwrap();
                        old.child.wait().unwrap();
                        replicas[l].proxy.abort();
                        rig.sb.openai.clear_faults();
                        rig.sb.kube.clear_faults();
                    }
                    Signal::Term => {
                        let ok = Command::new("kill")
                            .args(["-TERM", &old.child.id().to_string()])
                            .status()
                            .unwrap();
                        assert!(ok.success());
                        // The call in flight completes (a step runs to its end on SIGTERM).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        replicas[l].proxy.release();
                        rig.sb.openai.release();
                        rig.sb.kube.release();
                        rig.sb.openai.clear_faults();
                        rig.sb.kube.clear_faults();
                        let start = Instant::now();
                        while old.child.try_wait().unwrap().is_none() {
                            if start.elapsed() > Duration::from_secs(60) {
                                problems.push("the leader did not exit within 60 s".into());
                                old.child.kill().unwrap();
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                let stopped = signalled.elapsed();
                // The follower takes the Lease within the lease duration of the stop.
                let follower = replicas[f].name;
                if !wait_for(Duration::from_secs(30), || holder().0 == follower).await {
                    problems.push(format!("{follower} never took the Lease"));
                }
                let takeover = signalled.elapsed().saturating_sub(stopped);
                if takeover > LEASE + Duration::from_millis(1500) {
                    problems.push(format!("takeover took {takeover:?} after the stop"));
                }
                // No Vault write from the old leader after the follower acquired the Lease.
                let acquired = holder().1;
                match (replicas[l].proxy.last_write(), acquired) {
                    (Some(w), Some(a)) if w.timestamp_micros() >= a => problems.push(format!(
                        "two leaders: {} wrote to Vault at {w} after {follower} acquired \
                         (at {a} µs since the epoch)",
                        replicas[l].name
                    )),
                    (_, None) => problems.push("the Lease has no acquireTime".into()),
                    _ => {}
                }
                // The follower finishes (or rolls back) the rotation from the journal.
                let settle_start = Instant::now();
                let outcome = rotation_outcome(&rig, &replicas[f], &id, *point, signal).await;
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => {
                        problems.push(e);
                        "stuck".into()
                    }
                };
                let mut accounts = rig.wait_accounts(1, Duration::from_secs(30)).await;
                let settle = settle_start.elapsed();
                let (code, out) = rig.sweep().await;
                if code != 0 {
                    problems.push(format!("sweep exited {code}: {out}"));
                }
                if out.contains("deleted orphaned service account") {
                    accounts = rig.wait_accounts(1, Duration::from_secs(5)).await;
                }
                match rig.served(&vault_path).await {
                    Ok((key, sa)) => {
                        if !rig.sb.openai.key_is_live(&key) {
                            problems.push("I1: Vault serves a dead key after settle".into());
                        }
                        if accounts.len() != 1 || sa.as_ref() != accounts.first() {
                            problems.push(format!(
                                "I3: accounts after settle+sweep {accounts:?}, Vault names {sa:?}"
                            ));
                        }
                    }
                    Err(e) => problems.push(format!("reading Vault after settle: {e}")),
                }
                let failed = rig.sb.consumers.total().failed - failed_before;
                if failed > 0 {
                    problems.push(format!(
                        "{failed} consumer calls failed: {:?}",
                        rig.sb.consumers.total().last_failure
                    ));
                }
                // The stopped replica comes back as the follower.
                replicas[l].child = Some(
                    rig.spawn_replica(
                        &replicas[l].config,
                        Some(replicas[l].name),
                        replicas[l].port,
                        &replicas[l].audit,
                    )
                    .await,
                );
                leader = f;
                let row = Row {
                    point: if repeats > 1 {
                        format!("{} #{}", point.name(), round + 1)
                    } else {
                        point.name()
                    },
                    signal,
                    outcome,
                    takeover,
                    settle,
                    problems,
                };
                eprintln!(
                    "ha point {:<50} {:?} {:<12} takeover {:>4.1}s settle {:>4.1}s {}",
                    row.point,
                    row.signal,
                    row.outcome,
                    row.takeover.as_secs_f64(),
                    row.settle.as_secs_f64(),
                    if row.problems.is_empty() {
                        "ok".into()
                    } else {
                        row.problems.join("; ")
                    }
                );
                rows.push(row);
            }
        }
    }
    for r in replicas.iter_mut() {
        if let Some(mut c) = r.child.take() {
            c.child.kill().unwrap();
            c.child.wait().unwrap();
        }
    }
    let (samples, i1_violations) = i1.finish().await;
    // I2 over both trails, in time order: a rotation may start on one replica and delete
    // its old account on the other.
    let mut events: Vec<serde_json::Value> = replicas
        .iter()
        .flat_map(|r| {
            std::fs::read_to_string(&r.audit)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    events.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    let (i2_checked, i2) = i2_violations(&events);
    let mut verify = Vec::new();
    for r in &replicas {
        let out = Command::new(crate::daemon_rig::BIN)
            .args(["audit", "verify"])
            .arg(&r.audit)
            .output()
            .unwrap();
        if !out.status.success() {
            verify.push(format!(
                "{}: {}{}",
                r.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }

    let mut table = String::from(
        "| stop point | signal | outcome | takeover after the stop | time to settle | invariants |\n|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.1} s | {:.1} s | {} |\n",
            r.point,
            match r.signal {
                Signal::Kill => "SIGKILL",
                Signal::Term => "SIGTERM",
            },
            r.outcome,
            r.takeover.as_secs_f64(),
            r.settle.as_secs_f64(),
            if r.problems.is_empty() {
                "ok".into()
            } else {
                r.problems.join("; ")
            }
        ));
    }
    println!(
        "{table}\n{} runs, {samples} I1 samples, {} audit records, {i2_checked} old-account deletions checked, total {:.0} s",
        rows.len(),
        events.len(),
        test_start.elapsed().as_secs_f64()
    );
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.problems.is_empty()).collect();
    assert!(samples > 100, "the I1 sampler ran: {samples}");
    assert_eq!(i1_violations, Vec::<String>::new(), "{table}");
    assert_eq!(i2, Vec::<String>::new(), "{table}");
    assert!(
        i2_checked >= rows.len() / 2,
        "I2 checked {i2_checked} old-account deletions"
    );
    assert_eq!(verify, Vec::<String>::new());
    assert!(failed.is_empty(), "{table}");
    assert!(rig.sb.consumers.total().ok > 100, "consumers were calling");
}

/// What became of rotation `id`, asked of the new leader: its terminal status, or "lost
/// (404)" for a rotation killed before its first journal write (nothing of it was durable).
async fn rotation_outcome(
    rig: &Rig,
    leader: &Replica,
    id: &str,
    point: Point,
    signal: Signal,
) -> Result<String, String> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let r = rig
            .http
            .get(leader.url(&format!("/v1/rotations/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await;
        if let Ok(r) = r {
            let forwarded = r.headers().contains_key("x-okr-forwarded-to");
            let s = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            if !forwarded {
                match (s, v["status"].as_str()) {
                    (200, Some(st @ ("completed" | "rolled_back"))) => return Ok(st.into()),
                    (200, Some("failed")) => return Err(format!("failed: {v}")),
                    (404, _)
                        if matches!(point, Point::Begin("mint"))
                            && signal == Signal::Kill
                            && start.elapsed() > Duration::from_secs(2) =>
                    {
                        return Ok("lost (404)".into())
                    }
                    _ => {}
                }
            }
            last = format!(
                "HTTP {s}{}: {v}",
                if forwarded { " (forwarded)" } else { "" }
            );
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("not terminal after 60 s: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
