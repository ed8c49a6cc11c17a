//! The key inventory with the real clients: a real OpenBao, the OpenAI and Kubernetes
//! simulators. Ownership comes from the journals and Vault (a look-alike name is not ours),
//! paging covers projects of more than one page, an unreadable project is an error row,
//! and no key value appears in any output.

use crate::support::{self, Bao};
use openai_key_rotator::app::{self, Services};
use openai_key_rotator::audit::Audit;
use openai_key_rotator::config::{Config, DurationStr};
use openai_key_rotator::inventory::{self, Flag, Options, OwnerType, Row};
use openai_key_rotator::retry::RetryPolicy;
use openai_key_rotator::rotation::ports::SecretStore;
use openai_key_rotator::rotation::{EngineOptions, RotationRequest, Status, Trigger};
use openai_key_rotator::sandbox::openai::{FailNext, Faults};
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use openai_key_rotator::secret::Secret;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "inventory-token-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_openai-key-rotator");

struct Env {
    _bao: Bao,
    sb: Sandbox,
    config: Config,
    services: Services,
    dir: tempfile::TempDir,
    cancel: CancellationToken,
}

async fn env() -> Env {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    opts.schedule = "0 0 0 1 1 *".into();
    let sb = Sandbox::start(opts).await.expect("sandbox");
    assert!(sb.wait_ready(Duration::from_secs(30)).await);
    let mut config = sb.config.clone();
    for t in &mut config.targets {
        t.grace_period = DurationStr(Duration::from_millis(100));
        t.rollout_timeout = DurationStr(Duration::from_secs(30));
    }
    let cancel = CancellationToken::new();
    let engine = EngineOptions {
        poll_interval: Duration::from_millis(100),
        delete_retry: RetryPolicy {
            max_retries: 1,
            base: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
            ..RetryPolicy::default()
        },
        ..EngineOptions::default()
    };
    let services = app::connect_with(
        &config,
        Audit::open(None, false).unwrap(),
        &cancel,
        engine,
        vec![],
    )
    .await
    .expect("connect");
    Env {
        _bao: bao,
        sb,
        config,
        services,
        dir,
        cancel,
    }
}

/// What the seeding leaves besides the target's own key: an unmanaged account, one named
/// like ours that no journal names, an expiring one, a user's old unused key, and enough
/// accounts to need a second page (100 a page). Returns the key values handed out.
fn seed_others(env: &Env) -> Vec<Secret> {
    let sim = &env.sb.openai;
    let p = &env.sb.project_id;
    let mut values = Vec::new();
    values.push(sim.create_service_account(p, "someone-elses").unwrap().1);
    values.push(
        sim.create_service_account(p, "okr-chatbot-20260101000000-abcdef")
            .unwrap()
            .1,
    );
    values.push(
        sim.create_service_account_expiring(p, "short-lived", 3 * 86_400)
            .unwrap()
            .1,
    );
    for i in 0..100 {
        values.push(
            sim.create_service_account(p, &format!("bulk-{i}"))
                .unwrap()
                .1,
        );
    }
    let now = sim.now();
    sim.create_user_key(p, "user_alice", "alice laptop", Some(now - 40 * 86_400))
        .unwrap();
    sim.create_user_key(p, "user_bob", "bob ci", Some(now - 86_400))
        .unwrap();
    values
}

fn row(rows: &[Row], f: impl Fn(&Row) -> bool) -> &Row {
    rows.iter().find(|r| f(r)).expect("row")
}

fn opts() -> Options {
    Options {
        project: None,
        unused_after: chrono::Duration::days(30),
        expiring_within: chrono::Duration::days(7),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_once_with_owner_and_flags_ownership_from_journals_not_names() {
    let env = env().await;
    let target = env.config.targets[0].clone();
    let sim = env.sb.openai.clone();
    let seeded_key = env
        .services
        .store
        .read_key(&target.vault_path, &target.vault_field)
        .await
        .unwrap()
        .unwrap();
    let mut values = seed_others(&env);
    values.push(seeded_key.key.clone());

    // A rotation whose retire fails (503 on every delete): the old account stays pending.
    sim.set_faults(Faults {
        operations: vec!["service_accounts.delete".into()],
        fail_next: Some(FailNext {
            count: 1000,
            status: 503,
            after_effect: false,
        }),
        ..Faults::default()
    });
    let engine = &env.services.engine;
    let prior = engine.journal(&target.name).await.unwrap();
    let j = engine
        .rotate(
            &target,
            RotationRequest::new(
                &target.name,
                Trigger::Cli,
                "test",
                "inventory",
                chrono::Utc::now(),
            ),
            prior,
            Default::default(),
        )
        .await
        .unwrap();
    sim.clear_faults();
    assert_eq!(j.status, Status::Completed, "{:?}", j.error);
    let old = j.old_account.clone().expect("old account");
    assert_eq!(j.pending_deletions.len(), 1, "{:?}", j.pending_deletions);
    let new = j.new_account.clone().expect("new account");
    let served = env
        .services
        .store
        .read_key(&target.vault_path, &target.vault_field)
        .await
        .unwrap()
        .unwrap();
    values.push(served.key.clone());

    let inv = inventory::take(engine, &env.config.targets, &opts())
        .await
        .unwrap();
    let rows = &inv.rows;
    // Every live key exactly once, across pages (105 service-account keys + 2 users').
    let live: Vec<String> = sim
        .service_accounts(&env.sb.project_id)
        .into_iter()
        .filter_map(|a| a.key_id)
        .collect();
    assert_eq!(live.len(), 105);
    assert_eq!(rows.len(), live.len() + 2, "{rows:#?}");
    for k in &live {
        assert_eq!(
            rows.iter().filter(|r| r.key_id.as_ref() == Some(k)).count(),
            1,
            "{k}"
        );
    }
    assert!(!inv.has_errors());

    let current = row(rows, |r| r.key_id.as_deref() == Some(&new.key_id));
    assert!(current.managed);
    assert_eq!(current.target.as_deref(), Some(target.name.as_str()));
    assert_eq!(current.owner_type, Some(OwnerType::ServiceAccount));
    assert_eq!(current.service_account_id.as_deref(), Some(new.id.as_str()));
    assert!(current.flags.is_empty(), "{:?}", current.flags);

    let pending = row(rows, |r| r.service_account_id.as_deref() == Some(&old.id));
    assert!(pending.managed, "the journal names the old account");
    assert_eq!(pending.flags, vec![Flag::PendingDeletion]);

    // Negative control: named exactly like ours, but no journal minted it.
    let lookalike = row(rows, |r| {
        r.name.as_deref() == Some("okr-chatbot-20260101000000-abcdef")
    });
    assert!(!lookalike.managed);
    assert_eq!(lookalike.flags, vec![Flag::Unmanaged]);

    let expiring = row(rows, |r| r.name.as_deref() == Some("short-lived"));
    assert_eq!(expiring.flags, vec![Flag::Unmanaged, Flag::Expiring]);
    assert!(expiring.expires_at.is_some());

    let alice = row(rows, |r| r.name.as_deref() == Some("alice laptop"));
    assert_eq!(alice.owner_type, Some(OwnerType::User));
    assert_eq!(alice.service_account_id, None);
    assert_eq!(alice.flags, vec![Flag::Unmanaged, Flag::Unused]);
    // Negative control: used yesterday is not unused; with a 1-day window it is.
    let bob = row(rows, |r| r.name.as_deref() == Some("bob ci"));
    assert_eq!(bob.flags, vec![Flag::Unmanaged]);
    let narrow = Options {
        unused_after: chrono::Duration::days(1),
        ..opts()
    };
    let inv1 = inventory::take(engine, &env.config.targets, &narrow)
        .await
        .unwrap();
    assert!(row(&inv1.rows, |r| r.name.as_deref() == Some("bob ci")).has(Flag::Unused));

    let c = inv.counts(&env.sb.project_id);
    assert_eq!((c.managed, c.unmanaged, c.unused), (2, 105, 1));
    // The served key's expiry is known (never: 0 in the metric).
    assert_eq!(inv.served.len(), 1);
    assert_eq!(inv.served[0].expires_at, None);

    // No key value in any output.
    let (json, table) = (inv.to_json(), inv.to_table());
    for v in &values {
        assert!(!json.contains(v.expose()) && !table.contains(v.expose()));
    }

    // A project that cannot be read is an error row, not a failure.
    let missing = Options {
        project: Some("proj_nosuchproject000000000".into()),
        ..opts()
    };
    let inv = inventory::take(engine, &env.config.targets, &missing)
        .await
        .unwrap();
    assert_eq!(inv.rows.len(), 1, "{:?}", inv.rows);
    assert!(inv.rows[0].error.as_deref().unwrap().contains("not found"));
    assert!(inv.has_errors());
    env.cancel.cancel();
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_the_cli_and_the_metric() {
    let env = env().await;
    let values = seed_others(&env);
    let project = env.sb.project_id.clone();
    let mut config = env.config.clone();
    config.daemon.listen = "127.0.0.1:0".parse().unwrap();
    config.daemon.inventory_interval = DurationStr::from_secs(1);
    let config_path = env.dir.path().join("inventory.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();
    let shutdown = CancellationToken::new();
    let running = app::start(
        app::RunOptions {
            config: config_path.clone(),
            api_tokens_file: Some(tokens),
            ..Default::default()
        },
        config.clone(),
        shutdown.clone(),
        false,
    )
    .await
    .unwrap();
    let base = format!("http://{}", running.addr);

    let (status, body) = get(&format!("{base}/v1/inventory"), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(&format!("{base}/v1/inventory"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    for v in &values {
        assert!(!body.contains(v.expose()), "a key value in /v1/inventory");
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rows.len(),
        103 + 1 + 2,
        "seeded key + 103 others + 2 users'"
    );
    let seeded = rows.iter().find(|r| r["managed"] == true).unwrap();
    for field in [
        "project_id",
        "key_id",
        "name",
        "owner_type",
        "service_account_id",
        "created_at",
        "last_used_at",
        "managed",
        "target",
        "flags",
    ] {
        assert!(seeded.get(field).is_some(), "{field} missing: {seeded}");
    }
    let (status, body) = get(&format!("{base}/v1/inventory?unused_days=0"), Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert!(body.contains("unused_days"), "{body}");
    let (status, body) = get(&format!("{base}/v1/inventory?colour=red"), Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert!(body.contains("colour"), "{body}");
    let (status, body) = get(
        &format!("{base}/v1/inventory?project=proj_nosuch&unused_days=10"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["error"].is_string());

    // The periodic inventory feeds the metric (the daemon takes one at start).
    let start = Instant::now();
    let want = format!(
        "openai_key_rotator_inventory_keys{{project=\"{project}\",state=\"unmanaged\"}} 105"
    );
    loop {
        let (_, m) = get(&format!("{base}/metrics"), None).await;
        if m.contains(&want) {
            assert!(m.contains(&format!(
                "openai_key_rotator_inventory_keys{{project=\"{project}\",state=\"managed\"}} 1"
            )));
            assert!(m.contains(&format!(
                "openai_key_rotator_inventory_errors{{project=\"{project}\"}} 0"
            )));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{want} not in:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The CLI, in its own process.
    let out = std::process::Command::new(BIN)
        .args(["inventory", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{table}{stderr}");
    for v in &values {
        assert!(!table.contains(v.expose()) && !stderr.contains(v.expose()));
    }
    assert!(
        table.contains("unmanaged") && table.contains("user"),
        "{table}"
    );
    for line in table.lines() {
        assert!(line.chars().count() <= 80, "wider than 80: {line:?}");
    }
    let out = std::process::Command::new(BIN)
        .args([
            "inventory",
            "--format",
            "json",
            "--unused-days",
            "7",
            "--project",
        ])
        .arg(&project)
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 106);
    // Negative control: an unreadable project exits 2 with its error row.
    let out = std::process::Command::new(BIN)
        .args([
            "inventory",
            "--format",
            "json",
            "--project",
            "proj_nosuch",
            "--config",
        ])
        .arg(&config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(BIN)
        .args(["inventory", "--unused-days", "zero", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--unused-days"));

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.done).await;
    env.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_backstop_reaches_the_key_the_inventory_and_the_metric() {
    let env = env().await;
    let sim = env.sb.openai.clone();
    let mut target = env.config.targets[0].clone();
    let three_days = 3 * 86_400;
    target.key_expiry = Some(DurationStr::from_secs(three_days));
    let engine = &env.services.engine;
    let prior = engine.journal(&target.name).await.unwrap();
    let j = engine
        .rotate(
            &target,
            RotationRequest::new(
                &target.name,
                Trigger::Cli,
                "test",
                "expiry",
                chrono::Utc::now(),
            ),
            prior,
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed, "{:?}", j.error);
    let new = j.new_account.unwrap();
    let account = sim
        .service_accounts(&env.sb.project_id)
        .into_iter()
        .find(|a| a.id == new.id)
        .unwrap();
    let expires = account
        .key_expires_at
        .expect("minted with expires_in_seconds");
    assert_eq!(expires, account.created_at + three_days as i64);

    let targets = vec![target.clone()];
    let inv = inventory::take(engine, &targets, &opts()).await.unwrap();
    let row = row(&inv.rows, |r| r.key_id.as_deref() == Some(&new.key_id));
    assert_eq!(row.expires_at.map(|t| t.timestamp()), Some(expires));
    assert_eq!(
        row.flags,
        vec![Flag::Expiring],
        "3 days is within the 7-day window"
    );
    assert_eq!(inv.served.len(), 1);
    assert_eq!(
        inv.served[0].expires_at.map(|t| t.timestamp()),
        Some(expires)
    );
    // Negative control: with a 1-day window it is not expiring yet.
    let narrow = Options {
        expiring_within: chrono::Duration::days(1),
        ..opts()
    };
    let inv1 = inventory::take(engine, &targets, &narrow).await.unwrap();
    assert!(!row_of(&inv1, &new.key_id).has(Flag::Expiring));

    let m = openai_key_rotator::metrics::Metrics::new(&[target.name.clone()]);
    m.set_inventory(std::slice::from_ref(&env.sb.project_id), &inv);
    let text = m.render();
    let want = format!(
        "openai_key_rotator_key_expires_timestamp_seconds{{target=\"{}\"}} {expires}",
        target.name
    );
    assert!(text.contains(&want), "{want} not in:\n{text}");

    // The next rotation without key_expiry mints a key that never expires (negative control).
    target.key_expiry = None;
    let prior = engine.journal(&target.name).await.unwrap();
    let j = engine
        .rotate(
            &target,
            RotationRequest::new(
                &target.name,
                Trigger::Cli,
                "test",
                "no expiry",
                chrono::Utc::now(),
            ),
            prior,
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed, "{:?}", j.error);
    let id = j.new_account.unwrap().id;
    let account = sim
        .service_accounts(&env.sb.project_id)
        .into_iter()
        .find(|a| a.id == id)
        .unwrap();
    assert_eq!(account.key_expires_at, None);
    let inv = inventory::take(engine, &[target], &opts()).await.unwrap();
    m.set_inventory(std::slice::from_ref(&env.sb.project_id), &inv);
    assert_eq!(inv.served[0].expires_at, None);
    assert!(m.render().contains(&format!(
        "openai_key_rotator_key_expires_timestamp_seconds{{target=\"{}\"}} 0",
        env.config.targets[0].name
    )));
    env.cancel.cancel();
}

fn row_of<'a>(inv: &'a inventory::Inventory, key_id: &str) -> &'a Row {
    row(&inv.rows, |r| r.key_id.as_deref() == Some(key_id))
}
