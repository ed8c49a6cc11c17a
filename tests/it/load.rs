//! Zero downtime under load and concurrency, with the daemon binary against a real OpenBao
//! and the simulators.
//!
//! - `consecutive_rotations_under_load`: consumers call continuously through N rotations
//!   (`OKR_LOAD_ROTATIONS`, 20 by default; 100 in the documented long form): 0 failed calls,
//!   I1 sampled throughout (a failed read counts). Negative control: an emergency
//!   `revoke_first` rotation through the same API deletes the old account before the roll,
//!   and the same counter shows failed calls.
//! - `two_hundred_targets_with_mixed_triggers`: 200 targets; a schedule firing for 8 of
//!   them, manual and emergency API triggers for 8 (4 of them also scheduled), all
//!   arriving together (few rotations: with 200 targets each deletion's I5 check reads all
//!   200 Vault paths, about 20 s per retire on the shared 2-core machine); `OKR_CONC_SIGUSR1=1` adds SIGUSR1 (an emergency rotation of all
//!   200: the long form). `/metrics` is sampled every 50 ms (a failed scrape is an error):
//!   `rotation_in_progress` never exceeds `max_concurrent_rotations`; the audit trail shows
//!   no two rotations of one target overlapping and never more than the bound at once; all
//!   finish within a bound (no deadlock).

use crate::daemon_rig::{i2_violations, InProgressSampler, Rig, BIN};
use openai_key_rotator::config::{CronSchedule, DurationStr};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_rotations_under_load() {
    let n: usize = std::env::var("OKR_LOAD_ROTATIONS")
        .ok()
        .map(|v| v.parse().expect("OKR_LOAD_ROTATIONS is a number"))
        .unwrap_or(20);
    let rig = Rig::start(
        |_| {},
        |c| c.targets[0].grace_period = DurationStr(Duration::from_millis(100)),
    )
    .await;
    let i1 = rig.i1_sampler();
    let daemon = rig.spawn().await;
    let start = Instant::now();
    let before = rig.sb.consumers.total();
    let mut durations = Vec::new();
    // 409s right after a rotation read `completed` (the target frees a moment later).
    let mut conflicts = 0u32;
    for k in 0..n {
        let t = Instant::now();
        let (id, c) = rig
            .trigger_when_free(
                "chatbot",
                serde_json::json!({"reason": format!("load {k}")}),
            )
            .await;
        conflicts += c;
        let v = rig
            .wait_terminal(&id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|last| panic!("rotation {k}: {last}\n{}", daemon.output()));
        assert_eq!(v["status"], "completed", "rotation {k}: {v}");
        durations.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    let stats = rig.sb.consumers.total();
    let (samples, violations) = i1.finish().await;
    let (ok, failed) = (stats.ok - before.ok, stats.failed - before.failed);
    durations.sort();
    println!(
        "load: {n} rotations in {:.1} s (median {:.2} s, max {:.2} s), consumer calls ok {ok} failed {failed}, {} pods started, {samples} I1 samples, {conflicts} early 409s",
        elapsed.as_secs_f64(),
        durations[n / 2].as_secs_f64(),
        durations[n - 1].as_secs_f64(),
        stats.pods_started - before.pods_started,
    );
    assert_eq!(failed, 0, "zero downtime over {n} rotations: {stats:?}");
    assert!(ok > 100 * n as u64 / 10, "consumers were busy: {ok}");
    assert_eq!(violations, Vec::<String>::new());
    assert!(samples > 50);
    assert_eq!(rig.wait_accounts(1, Duration::from_secs(10)).await.len(), 1);
    let (checked, i2) = i2_violations(&rig.audit_events());
    assert!(i2.is_empty() && checked == n, "{checked} {i2:?}");

    // Negative control: the old key dies before the roll; the same counter sees it.
    let id = rig
        .trigger(
            "chatbot",
            serde_json::json!({"reason": "negative control", "emergency": true, "revoke_first": true}),
        )
        .await;
    let v = rig
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    let after = rig.sb.consumers.total();
    println!(
        "negative control (revoke_first): {} failed calls, last: {:?}",
        after.failed - stats.failed,
        after.last_failure
    );
    assert!(
        after.failed > stats.failed,
        "revoke_first must show as failed calls: {after:?}"
    );
    let (code, out) = rig.audit_verify().await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_targets_with_mixed_triggers() {
    const TARGETS: usize = 200;
    const BOUND: usize = 4;
    let fire_at = std::sync::Mutex::new(chrono::Utc::now());
    let rig = Rig::start(
        |o| {
            o.target_count = Some(TARGETS);
            o.consumer_interval = Duration::from_millis(2000);
        },
        |c| {
            // Seeded by now: the tick comes after every key's creation, and soon.
            let at = chrono::Utc::now() + chrono::Duration::seconds(10);
            *fire_at.lock().unwrap() = at;
            c.daemon.max_concurrent_rotations = BOUND;
            for (i, t) in c.targets.iter_mut().enumerate() {
                t.grace_period = DurationStr(Duration::from_millis(50));
                t.jitter = DurationStr::default();
                // 8 targets have a schedule that fires once during the test.
                if i < 8 {
                    t.schedule = Some(
                        at.format("%S %M %H %d %m *")
                            .to_string()
                            .parse::<CronSchedule>()
                            .unwrap(),
                    );
                }
            }
        },
    )
    .await;
    let fire_at = *fire_at.lock().unwrap();
    let names: Vec<String> = rig.config.targets.iter().map(|t| t.name.clone()).collect();
    let mut daemon = rig.spawn().await;
    let sampler = InProgressSampler::start(rig.addr(), Duration::from_millis(50));
    let start = Instant::now();
    // Wait for the scheduled tick, then everything arrives at once.
    let wait = (fire_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default()
        .saturating_sub(Duration::from_millis(200));
    tokio::time::sleep(wait).await;
    let all = std::env::var_os("OKR_CONC_SIGUSR1").is_some();
    if all {
        assert!(std::process::Command::new("kill")
            .args(["-USR1", &daemon.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut triggers = Vec::new();
    for (i, name) in names.iter().enumerate().skip(4).take(8) {
        let emergency = i % 2 == 0;
        let http = rig.http.clone();
        let url = format!("{}/v1/targets/{name}/rotations", rig.addr());
        triggers.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(crate::daemon_rig::TOKEN)
                .json(&serde_json::json!({"reason": "concurrency", "emergency": emergency}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for t in triggers {
        let s = t.await.unwrap().expect("trigger answered");
        *statuses.entry(s).or_default() += 1;
    }
    // All finish: no target running, within a bound.
    let expected = if all { TARGETS } else { 12 };
    let bound = Duration::from_secs(if all { 3600 } else { 400 });
    loop {
        let r: serde_json::Value = rig
            .http
            .get(format!("{}/v1/targets", rig.addr()))
            .bearer_auth(crate::daemon_rig::TOKEN)
            .send()
            .await
            .expect("GET /v1/targets")
            .json()
            .await
            .unwrap();
        let targets = r["targets"].as_array().unwrap();
        let running = targets
            .iter()
            .filter(|t| !t["running_rotation"].is_null() || t["state"] == "queued")
            .count();
        let rotated = targets
            .iter()
            .filter(|t| !t["last_outcome"].is_null())
            .count();
        if running == 0 && rotated == expected {
            break;
        }
        if start.elapsed() > bound {
            panic!(
                "not all finished within {bound:?}: {running} running, {rotated} rotated\n{}",
                daemon
                    .output()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = start.elapsed();
    let (samples, max_seen, errors) = sampler.finish().await;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    // The audit trail: per-target serial, globally at most BOUND at once.
    let events = rig.audit_events();
    let mut running: HashMap<String, String> = HashMap::new();
    let mut max_overlap = 0usize;
    let mut finished: BTreeMap<String, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for e in &events {
        let (t, rid) = (
            e["target"].as_str().unwrap_or_default().to_string(),
            e["rotation_id"].as_str().unwrap_or_default().to_string(),
        );
        match e["event"].as_str().unwrap_or_default() {
            "rotation_started" => {
                if let Some(other) = running.insert(t.clone(), rid.clone()) {
                    problems.push(format!("{t}: {rid} started while {other} ran"));
                }
                max_overlap = max_overlap.max(running.len());
            }
            ev @ ("rotation_completed" | "rotation_rolled_back" | "rotation_failed") => {
                if running.remove(&t).as_deref() != Some(rid.as_str()) {
                    problems.push(format!("{t}: {rid} finished but was not running"));
                }
                *finished.entry(t).or_default() += 1;
                *outcomes.entry(ev.to_string()).or_default() += 1;
            }
            _ => {}
        }
    }
    let rotations: u64 = finished.values().sum();
    println!(
        "concurrency: {TARGETS} targets, {} rotated, {rotations} rotations ({outcomes:?}) in {:.1} s; triggers answered {statuses:?}; /metrics samples {samples}, max rotation_in_progress {max_seen} (bound {BOUND}); audit max overlap {max_overlap}",
        finished.len(),
        took.as_secs_f64()
    );
    assert_eq!(
        errors,
        Vec::<String>::new(),
        "the metrics sampler failed reads"
    );
    assert!(samples > 20, "{samples}");
    assert!(
        max_seen as usize <= BOUND,
        "rotation_in_progress {max_seen} > {BOUND}"
    );
    assert!(
        max_seen >= 2,
        "the bound was reached in parallel: {max_seen}"
    );
    assert!(
        max_overlap <= BOUND,
        "audit overlap {max_overlap} > {BOUND}"
    );
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(finished.len(), expected, "every triggered target rotated");
    assert_eq!(
        outcomes.get("rotation_completed").copied().unwrap_or(0) as u64,
        rotations,
        "{outcomes:?}"
    );
    let (checked, i2) = i2_violations(&events);
    assert!(i2.is_empty() && checked > 0, "{i2:?}");
    let (code, out) = rig.audit_verify().await;
    assert_eq!(code, 0, "{out}");
    let _ = BIN;
}
