//! Fault matrix: the daemon binary (one process for all rows) against a real OpenBao
//! (through a proxy that injects 503s, holds writes and lets a concurrent writer in) and the
//! simulators' fault controls. Each row must end `completed` (after retries) or
//! `rolled_back` cleanly, and never leave a dead current key: I1 is sampled every 20 ms
//! throughout (a failed read counts), after each row exactly one account is left (the one
//! Vault serves), and no consumer call fails. The daemon's Vault token is a child token with
//! a 6 s TTL, so it must renew it all along. What the simulators' controls do by themselves
//! is shown in `sim_faults.rs`; the in-process engine's 429 storm, never-ready rollout,
//! failing probe and CAS conflict in `rotation_e2e.rs`. This is the same set, end to end.
//!
//! `cargo test --test it fault_matrix -- --nocapture` prints the matrix.

use crate::daemon_rig::Rig;
use crate::support::HoldMatch;
use openai_key_rotator::config::{DurationStr, SmokeProbe, VaultAuth};
use openai_key_rotator::sandbox::kube::{Faults as KubeFaults, WatchDisconnect};
use openai_key_rotator::sandbox::openai::{FaultScope, Faults as OpenAiFaults, RateLimit};
use openai_key_rotator::sandbox::scenario::NAMESPACE;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "chatbot";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Row {
    OpenAi429RetryAfter,
    OpenAi429NoRetryAfter,
    OpenAi5xxBurst,
    OpenAiCreateAnswerLost,
    OpenAiHangCreate,
    OpenAiHangDelete,
    Vault503OnPublish,
    Vault503OnJournal,
    VaultCasConflict,
    VaultTokenRevoked,
    Kube409,
    Kube5xx,
    KubeWatchDisconnects,
    KubeNeverReady,
    SmokeProbeFails,
}

impl Row {
    const ALL: [Row; 15] = [
        Row::OpenAi429RetryAfter,
        Row::OpenAi429NoRetryAfter,
        Row::OpenAi5xxBurst,
        Row::OpenAiCreateAnswerLost,
        Row::OpenAiHangCreate,
        Row::OpenAiHangDelete,
        Row::Vault503OnPublish,
        Row::Vault503OnJournal,
        Row::VaultCasConflict,
        Row::VaultTokenRevoked,
        Row::Kube409,
        Row::Kube5xx,
        Row::KubeWatchDisconnects,
        Row::KubeNeverReady,
        Row::SmokeProbeFails,
    ];

    fn describe(self) -> &'static str {
        match self {
            Row::OpenAi429RetryAfter => {
                "OpenAI 429 storm (2 rps, a neighbour's 2 s burst at 10 rps, Retry-After 1 s)"
            }
            Row::OpenAi429NoRetryAfter => {
                "OpenAI 429 storm (2 rps, a neighbour's 2 s burst at 10 rps, no Retry-After)"
            }
            Row::OpenAi5xxBurst => "OpenAI 5xx burst (next 3 admin calls 503)",
            Row::OpenAiCreateAnswerLost => "OpenAI create: 500 after effect (answer lost)",
            Row::OpenAiHangCreate => "OpenAI create hangs for 3 s",
            Row::OpenAiHangDelete => "OpenAI delete hangs for 3 s",
            Row::Vault503OnPublish => "Vault 503 x3 on the publish write",
            Row::Vault503OnJournal => "Vault 503 x3 on journal writes",
            Row::VaultCasConflict => "Vault CAS conflict (another writer before publish)",
            Row::VaultTokenRevoked => "Vault token revoked mid-rotation (new one in the file)",
            Row::Kube409 => "Kubernetes 409 x3 on patch",
            Row::Kube5xx => "Kubernetes 500 x3 on patch",
            Row::KubeWatchDisconnects => "Kubernetes watches cut every 200 ms",
            Row::KubeNeverReady => "Kubernetes rollout never completes",
            Row::SmokeProbeFails => "smoke probe answers 500",
        }
    }

    /// Outcomes a row may end with.
    fn allowed(self) -> &'static [&'static str] {
        match self {
            Row::KubeNeverReady | Row::SmokeProbeFails => &["rolled_back"],
            // A foreign write wins: nothing of ours was published (the new account goes).
            Row::VaultCasConflict => &["failed", "rolled_back", "completed"],
            _ => &["completed"],
        }
    }
}

fn writes_to(path: String) -> HoldMatch {
    Arc::new(move |m, p, _| (m == "POST" || m == "PUT") && p == path)
}

/// A token for the daemon: a child of root with a short TTL (renewable).
async fn child_token(http: &reqwest::Client, addr: &str) -> String {
    let r: serde_json::Value = http
        .post(format!("{addr}/v1/auth/token/create"))
        .header("X-Vault-Token", "root")
        .json(&serde_json::json!({"ttl": "6s", "renewable": true, "policies": ["root"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["auth"]["client_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let test_start = Instant::now();
    // A smoke probe of the workload that answers what the test says.
    let probe_status = Arc::new(AtomicU16::new(200));
    let ps = probe_status.clone();
    let app = axum::Router::new().fallback(move || {
        let s = ps.load(Ordering::SeqCst);
        async move { axum::http::StatusCode::from_u16(s).unwrap() }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_url = format!("http://{}/healthz", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let token_file = std::sync::Mutex::new(None);
    let rig = Rig::start(
        |_| {},
        |c| {
            c.openai.request_timeout = DurationStr::from_secs(2);
            c.kubernetes.request_timeout = DurationStr::from_secs(2);
            let t = &mut c.targets[0];
            t.rollout_timeout = DurationStr::from_secs(6);
            t.smoke_probes = vec![SmokeProbe {
                url: probe_url.clone(),
                expect_status: 200,
                consecutive_successes: 1,
                interval: DurationStr(Duration::from_millis(100)),
                timeout: DurationStr::from_secs(1),
                wave: None,
            }];
            if let VaultAuth::Token { token_file: f, .. } = &mut c.vault.auth {
                let path = f.clone().unwrap().with_file_name("daemon-vault-token");
                *f = Some(path.clone());
                *token_file.lock().unwrap() = Some(path);
            }
        },
    )
    .await;
    let token_file = token_file.into_inner().unwrap().expect("token auth");
    std::fs::write(&token_file, child_token(&rig.http, &rig.bao.addr).await).unwrap();
    let vault_path = rig.config.targets[0].vault_path.clone();
    let key_path = format!("/v1/secret/data/{vault_path}");
    let journal_path = format!("/v1/secret/data/openai-key-rotator/state/targets/{TARGET}");
    let i1 = rig.i1_sampler();
    let daemon = rig.spawn().await;
    let mut table =
        String::from("| fault | outcome | time to outcome | notes |\n|---|---|---|---|\n");
    let mut problems_all = Vec::new();

    // `OKR_FAULT_ROWS=Kube409,VaultCasConflict` runs only those rows.
    let only: Option<Vec<String>> = std::env::var("OKR_FAULT_ROWS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    for row in Row::ALL {
        if only
            .as_ref()
            .is_some_and(|o| !o.contains(&format!("{row:?}")))
        {
            continue;
        }
        let mut problems = Vec::new();
        let mut notes = String::new();
        let failed_before = rig.sb.consumers.total().failed;
        let creates_before = rig.sb.openai.calls("service_accounts.create");
        let hung_before = rig.sb.openai.calls(if row == Row::OpenAiHangDelete {
            "service_accounts.delete"
        } else {
            "service_accounts.create"
        });
        let retries_before = metric(&rig, "openai_key_rotator_retries_total").await;
        let waits_before = metric(&rig, "openai_key_rotator_rate_limit_waits_total").await;
        let admin = |f: OpenAiFaults| f.in_scope(FaultScope::Admin);
        match row {
            Row::OpenAi429RetryAfter | Row::OpenAi429NoRetryAfter => {
                rig.sb.openai.set_faults(admin(OpenAiFaults {
                    rate_limit: Some(RateLimit {
                        requests_per_second: 2,
                        retry_after_secs: Some(1),
                        omit_retry_after: row == Row::OpenAi429NoRetryAfter,
                    }),
                    ..Default::default()
                }))
            }
            Row::OpenAi5xxBurst => rig
                .sb
                .openai
                .set_faults(admin(OpenAiFaults::fail_next(3, 503))),
            Row::OpenAiCreateAnswerLost => rig.sb.openai.set_faults(
                OpenAiFaults::fail_next(1, 500)
                    .after_effect()
                    .only("service_accounts.create"),
            ),
            Row::OpenAiHangCreate => rig
                .sb
                .openai
                .set_faults(OpenAiFaults::hang().only("service_accounts.create")),
            Row::OpenAiHangDelete => rig
                .sb
                .openai
                .set_faults(OpenAiFaults::hang().only("service_accounts.delete")),
            Row::Vault503OnPublish => rig.proxy.fail_next(writes_to(key_path.clone()), 3, 503),
            Row::Vault503OnJournal => rig.proxy.fail_next(writes_to(journal_path.clone()), 3, 503),
            Row::VaultCasConflict | Row::VaultTokenRevoked => {
                rig.proxy.arm(writes_to(key_path.clone()), false)
            }
            Row::Kube409 => rig
                .sb
                .kube
                .set_faults(KubeFaults::conflict_next(3).only("deployments.patch")),
            Row::Kube5xx => rig
                .sb
                .kube
                .set_faults(KubeFaults::fail_next(3, 500).only("deployments.patch")),
            Row::KubeWatchDisconnects => {}
            Row::KubeNeverReady => rig.sb.kube.set_never_ready(NAMESPACE, "chatbot-api", true),
            Row::SmokeProbeFails => probe_status.store(500, Ordering::SeqCst),
        }
        // A neighbour sharing the org's admin rate limit uses it up during a 429 storm.
        let limited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let neighbour =
            matches!(row, Row::OpenAi429RetryAfter | Row::OpenAi429NoRetryAfter).then(|| {
                let url = format!("{}/organization/projects?limit=1", rig.sb.openai_url);
                let admin = rig.sb.admin_key.expose().to_string();
                let limited = limited.clone();
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    // A 2 s storm; the rotation starts once the neighbour is limited, so its
                    // mint lands in the storm.
                    for _ in 0..20 {
                        if let Ok(r) = http
                            .get(&url)
                            .bearer_auth(&admin)
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await
                        {
                            if r.status() == 429 {
                                limited.store(true, Ordering::SeqCst);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            });
        if neighbour.is_some() {
            let t = Instant::now();
            while !limited.load(Ordering::SeqCst) {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the storm never began"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let started = Instant::now();
        let id = rig
            .trigger(TARGET, serde_json::json!({"reason": row.describe()}))
            .await;
        // Faults that act during the rotation.
        let cutter = (row == Row::KubeWatchDisconnects).then(|| {
            let kube = rig.sb.kube.clone();
            tokio::spawn(async move {
                let mut cut = 0usize;
                for _ in 0..100 {
                    cut += kube.disconnect_watches(&WatchDisconnect {
                        after_events: 0,
                        resources: vec!["deployments".into()],
                    });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                cut
            })
        });
        match row {
            Row::OpenAiHangCreate | Row::OpenAiHangDelete => {
                // Three seconds from the first hung call, not from the arming: on a loaded
                // machine the rotation may reach the call later, and would not feel it.
                let op = if row == Row::OpenAiHangCreate {
                    "service_accounts.create"
                } else {
                    "service_accounts.delete"
                };
                let start = Instant::now();
                while rig.sb.openai.calls(op) == hung_before {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "{row:?}: no {op} call\n{}",
                        daemon.output()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                rig.sb.openai.clear_faults();
            }
            Row::VaultCasConflict | Row::VaultTokenRevoked => {
                assert!(
                    rig.proxy.wait_held(Duration::from_secs(30)).await,
                    "{row:?}: no publish\n{}",
                    daemon.output()
                );
                if row == Row::VaultCasConflict {
                    // Another client writes a version (the same data) first.
                    let (key, _) = rig.served(&vault_path).await.unwrap();
                    rig.bao
                        .put_json(&vault_path, &serde_json::json!({ "api_key": key }))
                        .await;
                } else {
                    // Revoke the daemon's token, then hand it a new one in its file.
                    let old = std::fs::read_to_string(&token_file).unwrap();
                    let r = rig
                        .http
                        .post(format!("{}/v1/auth/token/revoke", rig.bao.addr))
                        .header("X-Vault-Token", "root")
                        .json(&serde_json::json!({ "token": old.trim() }))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "revoke: {}", r.status());
                    std::fs::write(&token_file, child_token(&rig.http, &rig.bao.addr).await)
                        .unwrap();
                }
                rig.proxy.release();
            }
            _ => {}
        }
        let (outcome, took) = match rig.wait_terminal(&id, Duration::from_secs(120)).await {
            Ok(v) => {
                if let Some(e) = v["error"].as_str() {
                    notes.push_str(&format!(
                        "error: {}",
                        e.chars().take(120).collect::<String>()
                    ));
                }
                (
                    v["status"].as_str().unwrap_or("?").to_string(),
                    started.elapsed(),
                )
            }
            Err(last) => {
                let log = daemon.output();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!(
                    "{row:?} stuck; daemon log tail (newest first):\n{}",
                    tail.join("\n")
                );
                problems.push(format!("not terminal after 120 s: {last}"));
                ("stuck".to_string(), started.elapsed())
            }
        };
        if let Some(c) = cutter {
            c.abort();
        }
        if let Some(n) = neighbour {
            n.abort();
        }
        rig.proxy.abort();
        rig.sb.openai.clear_faults();
        rig.sb.kube.clear_faults();
        rig.sb.kube.set_never_ready(NAMESPACE, "chatbot-api", false);
        probe_status.store(200, Ordering::SeqCst);
        if !row.allowed().contains(&outcome.as_str()) {
            problems.push(format!(
                "outcome {outcome}, expected one of {:?}",
                row.allowed()
            ));
        }
        // Settled: one account, the one Vault serves, live.
        let accounts = rig.wait_accounts(1, Duration::from_secs(30)).await;
        match rig.served(&vault_path).await {
            Ok((key, sa)) => {
                if !rig.sb.openai.key_is_live(&key) {
                    problems.push("I1: Vault serves a dead key".into());
                }
                if accounts.len() != 1 || sa.as_ref() != accounts.first() {
                    problems.push(format!("accounts {accounts:?}, Vault names {sa:?}"));
                }
            }
            Err(e) => problems.push(format!("reading Vault: {e}")),
        }
        let failed = rig.sb.consumers.total().failed - failed_before;
        if failed > 0 {
            problems.push(format!(
                "{failed} consumer calls failed ({:?})",
                rig.sb.consumers.total().last_failure
            ));
        }
        let retries = metric(&rig, "openai_key_rotator_retries_total").await - retries_before;
        // Held by the Admin API pacer (it reads x-ratelimit-*): a 429 storm can be felt
        // without a single 429 reaching us.
        let waits = metric(&rig, "openai_key_rotator_rate_limit_waits_total").await - waits_before;
        let creates = rig.sb.openai.calls("service_accounts.create") - creates_before;
        // The fault was felt (a row that nothing retried proves nothing).
        let must_retry = matches!(
            row,
            Row::OpenAi429RetryAfter
                | Row::OpenAi429NoRetryAfter
                | Row::OpenAi5xxBurst
                | Row::OpenAiCreateAnswerLost
                | Row::OpenAiHangCreate
                | Row::Vault503OnPublish
                | Row::Vault503OnJournal
                | Row::Kube409
                | Row::Kube5xx
        );
        let paced_ok = matches!(row, Row::OpenAi429RetryAfter | Row::OpenAi429NoRetryAfter);
        if must_retry && retries == 0 && !(paced_ok && waits > 0) {
            problems.push("no retry: the fault was not felt".into());
        }
        if row == Row::OpenAiCreateAnswerLost && creates < 2 {
            problems.push(format!(
                "the lost create was not re-sent ({creates} creates)"
            ));
        }
        if notes.is_empty() {
            notes = format!("{retries} retries, {waits} pacer waits, {creates} create calls");
        } else {
            notes =
                format!("{retries} retries, {waits} pacer waits, {creates} create calls; {notes}");
        }
        eprintln!(
            "fault {:<55} {:<12} {:>5.1}s {} {}",
            row.describe(),
            outcome,
            took.as_secs_f64(),
            notes,
            problems.join("; ")
        );
        table.push_str(&format!(
            "| {} | {} | {:.1} s | {} |\n",
            row.describe(),
            outcome,
            took.as_secs_f64(),
            if problems.is_empty() {
                notes.replace('|', "/")
            } else {
                format!("**{}**; {}", problems.join("; "), notes).replace('|', "/")
            }
        ));
        problems_all.extend(problems.into_iter().map(|p| format!("{row:?}: {p}")));
    }
    let (samples, i1_violations) = i1.finish().await;
    let (code, verify) = rig.audit_verify().await;
    println!(
        "{table}\n{samples} I1 samples; total {:.0} s",
        test_start.elapsed().as_secs_f64()
    );
    drop(daemon);
    assert!(samples > 100, "the I1 sampler ran: {samples}");
    assert_eq!(i1_violations, Vec::<String>::new(), "{table}");
    assert_eq!(code, 0, "audit verify: {verify}");
    assert_eq!(problems_all, Vec::<String>::new(), "{table}");
}

/// Sum of a counter over its labels in the daemon's `/metrics` (a failed scrape panics).
async fn metric(rig: &Rig, name: &str) -> u64 {
    let text = rig
        .http
        .get(format!("{}/metrics", rig.addr()))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("scrape body");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
