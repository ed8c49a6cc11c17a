//! Crash matrix: the daemon binary is SIGKILLed at every step boundary and inside every
//! remote call of a rotation (held by the simulators or the Vault proxy before the call took
//! effect, or after it, with the answer lost), restarted, and left to settle. Then: I1 (what
//! Vault serves authenticates, sampled every 20 ms throughout, a failed read counts as a
//! violation), I2 (the audit trail: no old account deleted before its rotation's verify
//! passed), I3/I5 (after settle and a sweep exactly one account is left, the one Vault
//! serves), `audit verify` passes, and no consumer call failed.
//!
//! `cargo test --test it crash_matrix` runs every point once (what CI runs);
//! `OKR_CRASH_REPEATS=3 cargo test --test it crash_matrix -- --nocapture` runs each three times.
//! The matrix (point × outcome × time to settle) is printed.

use crate::daemon_rig::{i2_violations, Rig};
use openai_key_rotator::sandbox::kube::Faults as KubeFaults;
use openai_key_rotator::sandbox::openai::Faults as OpenAiFaults;
use openai_key_rotator::sandbox::Block;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "chatbot";

#[derive(Clone, Copy, Debug)]
enum Point {
    /// The journal write that begins `step` is held before it lands: killed at the boundary
    /// (the previous step done and journaled, this one not begun).
    Begin(&'static str),
    /// The journal write that begins `step` landed; its answer is lost.
    BeganLost(&'static str),
    /// The final journal write (status completed) landed; its answer is lost.
    Conclude,
    /// An OpenAI Admin API call held before (`false`) or after (`true`) its effect.
    OpenAi(&'static str, bool),
    /// A Kubernetes call held before or after its effect.
    Kube(&'static str, bool),
    /// The publish (the Vault write of the key) held before or after its effect.
    VaultKey(bool),
}

impl Point {
    fn name(&self) -> String {
        let phase = |after: bool| {
            if after {
                "after effect"
            } else {
                "before effect"
            }
        };
        match self {
            Point::Begin(s) => format!("boundary: before {s} (journal write held)"),
            Point::BeganLost(s) => format!("boundary: {s} journaled, answer lost"),
            Point::Conclude => "boundary: conclude journaled, answer lost".into(),
            Point::OpenAi(op, a) => format!("openai {op}, {}", phase(*a)),
            Point::Kube(op, a) => format!("kube {op}, {}", phase(*a)),
            Point::VaultKey(a) => format!("vault publish write, {}", phase(*a)),
        }
    }
}

const POINTS: &[Point] = &[
    Point::Begin("mint"),
    Point::OpenAi("service_accounts.create", false),
    Point::OpenAi("service_accounts.create", true),
    Point::Begin("publish"),
    Point::VaultKey(false),
    Point::VaultKey(true),
    Point::Begin("roll"),
    Point::Kube("deployments.patch", false),
    Point::Kube("deployments.patch", true),
    Point::Begin("verify"),
    Point::BeganLost("verify"),
    Point::Begin("drain"),
    Point::Begin("retire"),
    Point::OpenAi("service_accounts.delete", false),
    Point::OpenAi("service_accounts.delete", true),
    Point::Conclude,
];

fn journal_path() -> String {
    format!("/v1/secret/data/openai-key-rotator/state/targets/{TARGET}")
}

fn journal_write(step: &'static str) -> crate::support::HoldMatch {
    let path = journal_path();
    Arc::new(move |method, p, body| {
        let doc = &body["data"]["doc"];
        (method == "POST" || method == "PUT")
            && p == path
            && doc["step"] == step
            && doc["step_state"] == "started"
            && doc["status"] == "running"
    })
}

struct Row {
    point: String,
    outcome: String,
    settle: Duration,
    sweep_deleted: usize,
    problems: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_matrix() {
    let repeats: usize = std::env::var("OKR_CRASH_REPEATS")
        .ok()
        .map(|v| v.parse().expect("OKR_CRASH_REPEATS is a number"))
        .unwrap_or(1);
    let test_start = Instant::now();
    let rig = Rig::start(|_| {}, |_| {}).await;
    let vault_path = rig.config.targets[0].vault_path.clone();
    let key_path = format!("/v1/secret/data/{vault_path}");
    let i1 = rig.i1_sampler();
    let mut daemon = rig.spawn().await;
    let mut rows: Vec<Row> = Vec::new();

    for round in 0..repeats {
        for point in POINTS {
            let mut problems = Vec::new();
            let failed_before = rig.sb.consumers.total().failed;
            // Arm the hold.
            match *point {
                Point::Begin(step) => rig.proxy.arm(journal_write(step), false),
                Point::BeganLost(step) => rig.proxy.arm(journal_write(step), true),
                Point::Conclude => {
                    let path = journal_path();
                    rig.proxy.arm(
                        Arc::new(move |m, p, b| {
                            (m == "POST" || m == "PUT")
                                && p == path
                                && b["data"]["doc"]["status"] == "completed"
                        }),
                        true,
                    )
                }
                Point::VaultKey(after) => {
                    let kp = key_path.clone();
                    rig.proxy.arm(
                        Arc::new(move |m, p, _| (m == "POST" || m == "PUT") && p == kp),
                        after,
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
            let abandoned_before = (
                rig.sb.openai.blocked().abandoned,
                rig.sb.kube.blocked().abandoned,
            );
            let id = rig
                .trigger(
                    TARGET,
                    serde_json::json!({"reason": format!("crash matrix: {}", point.name())}),
                )
                .await;
            // Wait until the daemon is inside the held call.
            let wait = Duration::from_secs(60);
            let held = match point {
                Point::OpenAi(..) => rig.sb.openai.wait_blocked(1, wait).await,
                Point::Kube(..) => rig.sb.kube.wait_blocked(1, wait).await,
                _ => rig.proxy.wait_held(wait).await,
            };
            assert!(
                held,
                "{}: the daemon never reached the held call\n{}",
                point.name(),
                daemon.output()
            );
            // SIGKILL: no graceful stop, no release.
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
            // A call held before its effect must be dropped with its client, not land late.
            let deadline = Instant::now() + Duration::from_secs(10);
            match point {
                Point::OpenAi(_, false) => {
                    while rig.sb.openai.blocked().abandoned == abandoned_before.0
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if rig.sb.openai.blocked().abandoned == abandoned_before.0 {
                        problems
                            .push("the held OpenAI call was not dropped with its client".into());
                    }
                }
                Point::Kube(_, false) => {
                    while rig.sb.kube.blocked().abandoned == abandoned_before.1
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if rig.sb.kube.blocked().abandoned == abandoned_before.1 {
                        problems.push(
                            "the held Kubernetes call was not dropped with its client".into(),
                        );
                    }
                }
                _ => {}
            }
            rig.proxy.abort();
            rig.sb.openai.clear_faults();
            rig.sb.kube.clear_faults();

            // Restart and let it settle.
            let restarted = Instant::now();
            daemon = rig.spawn().await;
            let outcome = if matches!(point, Point::Begin("mint")) {
                // Killed before the rotation's first journal write: nothing of it is
                // durable, so the restarted daemon does not know it (404), and nothing was
                // minted. The 202 the trigger got was only an acceptance.
                tokio::time::sleep(Duration::from_secs(2)).await;
                match rig.rotation(&id).await {
                    Some((404, _)) => "lost (404)".to_string(),
                    other => {
                        problems.push(format!(
                            "expected the unjournaled rotation unknown: {other:?}"
                        ));
                        "?".into()
                    }
                }
            } else {
                match rig.wait_terminal(&id, Duration::from_secs(60)).await {
                    Ok(v) => v["status"].as_str().unwrap_or("?").to_string(),
                    Err(last) => {
                        problems.push(format!("not terminal after 60 s: {last}"));
                        "stuck".into()
                    }
                }
            };
            // Pending deletions (a rolled-back account waits for its pods to go) finish.
            let mut accounts = rig.wait_accounts(1, Duration::from_secs(30)).await;
            let settle = restarted.elapsed();
            let (code, out) = rig.sweep().await;
            if code != 0 {
                problems.push(format!("sweep exited {code}: {out}"));
            }
            let sweep_deleted = out.matches("deleted orphaned service account").count();
            if sweep_deleted > 0 {
                accounts = rig.wait_accounts(1, Duration::from_secs(5)).await;
            }
            // I3/I5: exactly one account left, the one Vault serves, and its key is live.
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
            if !matches!(outcome.as_str(), "completed" | "rolled_back" | "lost (404)") {
                problems.push(format!("outcome {outcome}"));
            }
            let row = Row {
                point: if repeats > 1 {
                    format!("{} #{}", point.name(), round + 1)
                } else {
                    point.name()
                },
                outcome,
                settle,
                sweep_deleted,
                problems,
            };
            eprintln!(
                "crash point {:<55} {:<12} settle {:>5.1}s sweep {} {}",
                row.point,
                row.outcome,
                row.settle.as_secs_f64(),
                row.sweep_deleted,
                if row.problems.is_empty() {
                    "ok".to_string()
                } else {
                    row.problems.join("; ")
                }
            );
            rows.push(row);
        }
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let (samples, i1_violations) = i1.finish().await;
    let events = rig.audit_events();
    let (i2_checked, i2) = i2_violations(&events);
    let (code, verify_out) = rig.audit_verify().await;

    // The matrix.
    let mut table = String::from(
        "| crash point | outcome | time to settle | swept | invariants |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {:.1} s | {} | {} |\n",
            r.point,
            r.outcome,
            r.settle.as_secs_f64(),
            r.sweep_deleted,
            if r.problems.is_empty() {
                "ok".into()
            } else {
                r.problems.join("; ")
            }
        ));
    }
    println!(
        "{table}\n{} points, {samples} I1 samples, {} audit records, total {:.0} s",
        rows.len(),
        events.len(),
        test_start.elapsed().as_secs_f64()
    );
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.problems.is_empty()).collect();
    assert!(samples > 100, "the I1 sampler ran: {samples}");
    assert_eq!(i1_violations, Vec::<String>::new(), "{table}");
    assert_eq!(i2, Vec::<String>::new(), "{table}");
    assert!(
        i2_checked >= POINTS.len() * repeats / 2,
        "I2 checked {i2_checked} old-account deletions"
    );
    assert_eq!(code, 0, "audit verify: {verify_out}");
    assert!(failed.is_empty(), "{table}");
    assert!(rig.sb.consumers.total().ok > 100, "consumers were calling");
}
