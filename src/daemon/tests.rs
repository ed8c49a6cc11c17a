//! The daemon over the in-memory fakes.

use super::*;
use crate::config::{DurationStr, VaultConfig};
use crate::rotation::fakes::FakeWorld;
use crate::rotation::{EngineOptions, Step};

fn config(targets: Vec<Target>, max_concurrent: usize) -> Arc<Config> {
    let mut c = Config {
        daemon: Default::default(),
        openai: Default::default(),
        vault: VaultConfig {
            address: "http://127.0.0.1:1".into(),
            kv_mount: "secret".into(),
            ca_cert: None,
            request_timeout: DurationStr::from_secs(1),
            auth: Default::default(),
            ..VaultConfig::default()
        },
        kubernetes: Default::default(),
        notifications: Default::default(),
        targets,
    };
    c.daemon.max_concurrent_rotations = max_concurrent;
    Arc::new(c)
}

fn engine_opts() -> EngineOptions {
    EngineOptions {
        poll_interval: Duration::from_millis(2),
        drain_poll_interval: Duration::from_millis(10),
        delete_retry: crate::retry::RetryPolicy {
            max_retries: 2,
            base: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Harness {
    world: FakeWorld,
    daemon: Daemon,
    live: Arc<LiveRotations>,
    shutdown: CancellationToken,
}

fn harness(world: FakeWorld, targets: Vec<Target>, max_concurrent: usize) -> Harness {
    let engine = world.engine(engine_opts());
    harness_on(&world, engine, vec![], targets, max_concurrent, |_| {})
}

/// What `harness_on` lets a test change before the daemon is built.
struct HarnessParts {
    schedule: Arc<dyn ScheduleObserver>,
    opts: DaemonOptions,
}

/// A daemon over `engine` (observed by the live view and `observers`).
fn harness_on(
    world: &FakeWorld,
    engine: crate::rotation::Engine,
    observers: Vec<Arc<dyn Observer>>,
    targets: Vec<Target>,
    max_concurrent: usize,
    tweak: impl FnOnce(&mut HarnessParts),
) -> Harness {
    let live = Arc::new(LiveRotations::default());
    let mut all: Vec<Arc<dyn Observer>> = vec![live.clone()];
    all.extend(observers);
    let engine = Arc::new(engine.with_observer(Arc::new(Fanout(all))));
    let mut parts = HarnessParts {
        schedule: Arc::new(NoSchedule),
        opts: DaemonOptions {
            max_sleep: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        },
    };
    tweak(&mut parts);
    let shutdown = CancellationToken::new();
    let daemon = Daemon::new(
        config(targets, max_concurrent),
        engine,
        Arc::new(world.store.clone()),
        live.clone(),
        parts.schedule,
        Leadership::sole(),
        parts.opts,
        shutdown.clone(),
    );
    Harness {
        world: world.clone(),
        daemon,
        live,
        shutdown,
    }
}

fn manual(target: &str) -> RotationRequest {
    RotationRequest::new(target, Trigger::Api, "ops", "test", Utc::now())
}

async fn wait_finished(h: &Harness, id: &str) -> Journal {
    for _ in 0..2000 {
        if let Some(j) = h.daemon.rotation(id).await.unwrap() {
            if j.status.is_terminal() && h.daemon.running(&j.target).is_none() {
                return j;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("rotation {id} did not finish");
}

#[tokio::test]
async fn one_rotation_per_target_and_emergency_upgrades_the_running_one() {
    let world = FakeWorld::default();
    let (mut t, _) = world.seed_target("chat", Utc::now());
    t.grace_period = DurationStr(Duration::from_secs(3600));
    let h = harness(world, vec![t], 2);
    let id = match h.daemon.trigger(&manual("chat")).await.unwrap() {
        Accepted::Started(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        h.daemon.trigger(&manual("chat")).await,
        Err(TriggerError::AlreadyRunning {
            target: "chat".into(),
            rotation_id: id.clone()
        })
    );
    // Wait until it sits in the hour-long grace period, then upgrade.
    for _ in 0..1000 {
        if h.live.get(&id).is_some_and(|j| j.step == Step::Drain) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut emergency = manual("chat");
    emergency.emergency = true;
    assert_eq!(
        h.daemon.trigger(&emergency).await,
        Ok(Accepted::Upgraded(id.clone()))
    );
    let j = wait_finished(&h, &id).await;
    assert_eq!(j.status, Status::Completed);
    assert!(j.emergency);
    assert_eq!(j.actor, "ops");
    // The target is free again.
    assert!(matches!(
        h.daemon.trigger(&manual("chat")).await,
        Ok(Accepted::Started(_))
    ));
}

#[tokio::test]
async fn refusals_are_explicit() {
    let world = FakeWorld::default();
    let (t, _) = world.seed_target("chat", Utc::now());
    let h = harness(world, vec![t.clone()], 1);
    assert_eq!(
        h.daemon.trigger(&manual("nope")).await,
        Err(TriggerError::UnknownTarget("nope".into()))
    );
    // Not the leader.
    let (tx, rx) = watch::channel(false);
    let (_ntx, nrx) = watch::channel(Some(crate::leader::Holder::new("okr-0")));
    let live = Arc::new(LiveRotations::default());
    let follower = Daemon::new(
        config(vec![t], 1),
        Arc::new(h.world.engine(engine_opts())),
        Arc::new(h.world.store.clone()),
        live,
        Arc::new(NoSchedule),
        Leadership::elected(rx, nrx),
        DaemonOptions::default(),
        CancellationToken::new(),
    );
    assert_eq!(
        follower.trigger(&manual("chat")).await,
        Err(TriggerError::NotLeader {
            leader: Some("okr-0".into())
        })
    );
    drop(tx);
    // Shutting down.
    h.shutdown.cancel();
    h.daemon.run().await;
    assert_eq!(
        h.daemon.trigger(&manual("chat")).await,
        Err(TriggerError::ShuttingDown)
    );
}

#[tokio::test]
async fn the_global_bound_queues_rotations() {
    let world = FakeWorld::default();
    let (a, _) = world.seed_target("a", Utc::now());
    let (b, _) = world.seed_target("b", Utc::now());
    let h = harness(world, vec![a, b], 1);
    let ia = h.daemon.trigger(&manual("a")).await.unwrap();
    let ib = h.daemon.trigger(&manual("b")).await.unwrap();
    let ja = wait_finished(&h, ia.rotation_id()).await;
    let jb = wait_finished(&h, ib.rotation_id()).await;
    assert_eq!(
        (ja.status, jb.status),
        (Status::Completed, Status::Completed)
    );
    // With one slot the second rotation started only after the first finished.
    let (first, second) = if ja.started_at <= jb.started_at {
        (&ja, &jb)
    } else {
        (&jb, &ja)
    };
    assert!(
        second.started_at >= first.updated_at,
        "{} vs {}",
        second.started_at,
        first.updated_at
    );
}

#[tokio::test]
async fn schedule_rotates_an_overdue_key_once_then_waits() {
    let world = FakeWorld::default();
    let (mut t, old) = world.seed_target("chat", Utc::now() - chrono::Duration::days(40));
    t.max_key_age = Some(DurationStr::from_secs(30 * 86400));
    let h = harness(world, vec![t], 1);
    let d = h.daemon.clone();
    let run = tokio::spawn(async move { d.run().await });
    // The overdue key is rotated by the scheduler...
    for _ in 0..2000 {
        if !h.world.issuer.account_ids().contains(&old.id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !h.world.issuer.account_ids().contains(&old.id),
        "old key retired"
    );
    // ...exactly once: the new key is young, so nothing else happens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let creates = h
        .world
        .log
        .entries()
        .iter()
        .filter(|e| e.starts_with("create"))
        .count();
    assert_eq!(creates, 1, "{:#?}", h.world.log.entries());
    let status = h.daemon.targets();
    assert_eq!(status[0].last_outcome, Some("completed"));
    assert!(status[0].key_age_seconds.unwrap() < 60);
    assert_eq!(status[0].next_trigger, Some("max_age"));
    h.shutdown.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_between_steps_and_a_new_daemon_resumes() {
    let world = FakeWorld::default();
    let (mut t, old) = world.seed_target("chat", Utc::now());
    t.grace_period = DurationStr(Duration::from_millis(300));
    let h = harness(world.clone(), vec![t.clone()], 1);
    let d = h.daemon.clone();
    let run = tokio::spawn(async move { d.run().await });
    let id = h
        .daemon
        .trigger(&manual("chat"))
        .await
        .unwrap()
        .rotation_id()
        .to_string();
    for _ in 0..1000 {
        if h.live.get(&id).is_some_and(|j| j.step == Step::Drain) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("bounded shutdown")
        .unwrap();
    // Stopped after drain, before retire: the old account still lives.
    let j = h.live.get(&id).unwrap();
    assert!(!j.status.is_terminal(), "{j:#?}");
    assert!(world.issuer.account_ids().contains(&old.id));

    // A fresh daemon resumes and finishes it.
    let h2 = harness(world.clone(), vec![t], 1);
    let d2 = h2.daemon.clone();
    let run2 = tokio::spawn(async move { d2.run().await });
    for _ in 0..2000 {
        if !world.issuer.account_ids().contains(&old.id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let j = wait_finished(&h2, &id).await;
    assert_eq!(j.status, Status::Completed);
    assert!(!world.issuer.account_ids().contains(&old.id));
    h2.shutdown.cancel();
    run2.await.unwrap();
}

mod reload {
    use super::*;
    use crate::config::{DurationStr, VaultConfig};
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::{EngineOptions, Step};

    fn config(targets: Vec<Target>, max_concurrent: usize) -> Config {
        let mut c = Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            notifications: Default::default(),
            targets,
        };
        c.daemon.max_concurrent_rotations = max_concurrent;
        c
    }

    fn daemon(world: &FakeWorld, config: Config) -> (Daemon, Arc<LiveRotations>) {
        let live = Arc::new(LiveRotations::default());
        let engine = Arc::new(
            world
                .engine(EngineOptions {
                    poll_interval: Duration::from_millis(2),
                    ..Default::default()
                })
                .with_observer(live.clone()),
        );
        let d = Daemon::new(
            Arc::new(config),
            engine,
            Arc::new(world.store.clone()),
            live.clone(),
            Arc::new(NoSchedule),
            Leadership::sole(),
            DaemonOptions::default(),
            CancellationToken::new(),
        );
        (d, live)
    }

    fn manual(target: &str) -> RotationRequest {
        RotationRequest::new(target, Trigger::Api, "ops", "test", Utc::now())
    }

    async fn wait_step(live: &LiveRotations, id: &str, step: Step) {
        for _ in 0..2000 {
            if live.get(id).is_some_and(|j| j.step == step) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("rotation {id} never reached {step}");
    }

    #[tokio::test]
    async fn a_reload_that_moves_the_journal_is_refused_and_changes_nothing() {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", Utc::now());
        let (d, _) = daemon(&world, config(vec![t.clone()], 1));
        let mut moved = config(vec![t.clone()], 3);
        moved.daemon.state_prefix = "elsewhere/state".into();
        let e = d.reload(Arc::new(moved)).unwrap_err();
        assert!(e.to_string().contains("daemon.state_prefix"), "{e}");
        // Nothing changed: neither the prefix nor the bound.
        assert_eq!(d.config().daemon.state_prefix, "openai-key-rotator/state");
        assert_eq!(d.config().daemon.max_concurrent_rotations, 1);
        assert_eq!(*d.inner.slot_limit.locked(), 1);
        // Control: the same file without the move is taken.
        d.reload(Arc::new(config(vec![t], 3))).unwrap();
        assert_eq!(d.config().daemon.max_concurrent_rotations, 3);
    }

    #[tokio::test]
    async fn a_reload_applies_the_account_prefix_and_the_concurrency_bound() {
        let world = FakeWorld::default();
        let (mut a, _) = world.seed_target("a", Utc::now());
        let (mut b, _) = world.seed_target("b", Utc::now());
        // Long grace periods hold each rotation (and its slot) in the drain.
        a.grace_period = DurationStr(Duration::from_secs(3600));
        b.grace_period = DurationStr(Duration::from_secs(3600));
        let (d, live) = daemon(&world, config(vec![a.clone(), b.clone()], 1));
        let ia = d
            .trigger(&manual("a"))
            .await
            .unwrap()
            .rotation_id()
            .to_string();
        wait_step(&live, &ia, Step::Drain).await;
        let ib = d
            .trigger(&manual("b"))
            .await
            .unwrap()
            .rotation_id()
            .to_string();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            live.get(&ib).map(|j| j.steps.len()),
            Some(0),
            "one slot: b waits"
        );
        let mut wider = config(vec![a, b], 2);
        wider.daemon.account_prefix = "team".into();
        d.reload(Arc::new(wider)).unwrap();
        wait_step(&live, &ib, Step::Drain).await;
        // b started after the reload: its account carries the new prefix.
        let jb = live.get(&ib).unwrap();
        assert!(jb.new_account_name.starts_with("team-b-"), "{jb:?}");
        assert!(live
            .get(&ia)
            .unwrap()
            .new_account_name
            .starts_with("okr-a-"));
        d.stop_running();
    }
}

/// Regressions for the daemon's outage paths (the "zero downtime" issue).
mod outage {
    use super::*;
    use crate::metrics::Metrics;
    use crate::rotation::faults::{once, Call, Crash, Fault, Op};
    use crate::rotation::ports::KeyMeta;
    use crate::rotation::Engine;

    /// Run a rotation of `t` in a process that dies right after the journal recorded `step`
    /// started.
    async fn crash_at(world: &FakeWorld, t: &Target, step: Step) -> String {
        let crash = Crash::default();
        let s = step.as_str();
        let plan = once(
            move |c: &Call| {
                c.op == Op::WriteDoc
                    && c.subject.contains("/targets/")
                    && c.journal_state()
                        .is_some_and(|(st, state, _)| st == s && state == "started")
            },
            Fault::CrashAfter,
        );
        let engine = Engine::new(world.faulty_ports(plan, crash.clone()), engine_opts());
        let req = manual(&t.name);
        let id = req.rotation_id.clone();
        let r = crash.run(engine.rotate(t, req, None, Arc::default())).await;
        assert!(r.is_none(), "crashed at {step}");
        id
    }

    async fn journal_of(world: &FakeWorld, target: &str) -> Journal {
        world
            .engine(engine_opts())
            .journal(target)
            .await
            .unwrap()
            .unwrap()
            .journal
    }

    async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
        for _ in 0..2500 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Scenario 1: a target removed from the config while its rotation was unfinished:
    /// the restarted daemon finishes it from the journal instead of leaving two live keys.
    #[tokio::test]
    async fn a_removed_targets_unfinished_rotation_is_resumed_from_its_journal() {
        let world = FakeWorld::default();
        let (a, _) = world.seed_target("a", Utc::now());
        let (b, b_old) = world.seed_target("b", Utc::now());
        let id = crash_at(&world, &b, Step::Verify).await;
        // The config now lists only `a`.
        let h = harness(world.clone(), vec![a], 1);
        let d = h.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        until("b's rotation finished", async || {
            journal_of(&world, "b").await.status.is_terminal()
        })
        .await;
        let j = journal_of(&world, "b").await;
        assert_eq!(j.rotation_id, id);
        assert_eq!(j.status, Status::Completed, "{j:#?}");
        assert!(!world.issuer.account_ids().contains(&b_old.id));
        let (_, served) = world.store.current("apps/b/openai", "api_key").unwrap();
        assert!(world.issuer.is_live(&served));
        h.shutdown.cancel();
        run.await.unwrap();
    }

    /// Scenario 5: a trigger that meets an unfinished rotation resumes it at once, carrying
    /// the emergency upgrade, and answers with that rotation's id.
    #[tokio::test]
    async fn a_trigger_that_meets_an_unfinished_rotation_resumes_it_as_asked() {
        let world = FakeWorld::default();
        let (mut t, old) = world.seed_target("chat", Utc::now());
        t.grace_period = DurationStr(Duration::from_secs(3600));
        let id = crash_at(&world, &t, Step::Drain).await;
        let h = harness(world.clone(), vec![t], 1);
        let answer = h.daemon.trigger(&manual("chat").emergency(false)).await;
        let answered = answer.as_ref().map(|a| a.rotation_id().to_string());
        assert_eq!(answered.as_deref(), Ok(id.as_str()), "{answer:?}");
        // The emergency skips the hour-long grace period: done at once.
        until("the resumed rotation finished", async || {
            journal_of(&world, "chat").await.status.is_terminal()
        })
        .await;
        let j = journal_of(&world, "chat").await;
        assert_eq!(
            (j.rotation_id.as_str(), j.status),
            (id.as_str(), Status::Completed)
        );
        assert!(j.emergency);
        assert!(!world.issuer.account_ids().contains(&old.id));
    }

    /// Scenario 10: the failure back-off is in the journal, so a restarted (or crash-
    /// looping) daemon does not retry a failing rotation at once.
    #[tokio::test]
    async fn the_failure_back_off_survives_a_restart() {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", Utc::now());
        world.roller.set_behaviour(
            &t.workloads[0],
            crate::rotation::fakes::Behaviour::RejectPatch,
        );
        let h = harness(world.clone(), vec![t.clone()], 1);
        let id = h.daemon.trigger(&manual("chat")).await.unwrap();
        let j = wait_finished(&h, id.rotation_id()).await;
        assert_eq!(j.status, Status::RolledBack);
        assert_eq!(h.daemon.targets()[0].consecutive_failures, 1);
        // Restart.
        let h2 = harness(world.clone(), vec![t], 1);
        let d = h2.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = h2.daemon.targets();
        assert_eq!(status[0].consecutive_failures, 1, "{status:?}");
        h2.shutdown.cancel();
        run.await.unwrap();
    }

    /// Scenario 10: a key whose metadata has no creation time is scheduled from its Vault
    /// version's `created_time`; anchoring on "now" at every pass meant it never fired.
    #[tokio::test]
    async fn a_key_without_creation_metadata_is_scheduled_by_its_version_time() {
        let world = FakeWorld::default();
        let (mut t, old) = world.seed_target("chat", Utc::now());
        t.schedule = Some("0 0 * * * *".parse().unwrap());
        world.store.put(
            &t.vault_path,
            &t.vault_field,
            old.key.expose(),
            KeyMeta {
                account: Some(crate::rotation::ports::AccountRef {
                    id: old.id.clone(),
                    key_id: old.key_id.clone(),
                }),
                rotation_id: None,
                key_created_at: None,
            },
        );
        world
            .store
            .set_created(&t.vault_path, Utc::now() - chrono::Duration::hours(3));
        let h = harness(world.clone(), vec![t], 1);
        let d = h.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        until("the overdue key was rotated", async || {
            !world.issuer.account_ids().contains(&old.id)
        })
        .await;
        h.shutdown.cancel();
        run.await.unwrap();
    }

    /// Scenario 10: two targets that share a workload never roll it at once.
    #[tokio::test]
    async fn two_targets_never_roll_one_workload_at_once() {
        let world = FakeWorld::default();
        world.roller.state.lock().unwrap().polls_to_complete = 30;
        let (mut a, _) = world.seed_target("a", Utc::now());
        let (mut b, _) = world.seed_target("b", Utc::now());
        let shared: crate::config::WorkloadRef = "demo/Deployment/shared".parse().unwrap();
        a.workloads = vec![shared.clone()];
        b.workloads = vec![shared];
        let h = harness(world.clone(), vec![a, b], 2);
        let ia = h.daemon.trigger(&manual("a")).await.unwrap();
        let ib = h.daemon.trigger(&manual("b")).await.unwrap();
        let ja = wait_finished(&h, ia.rotation_id()).await;
        let jb = wait_finished(&h, ib.rotation_id()).await;
        assert_eq!(
            (ja.status, jb.status),
            (Status::Completed, Status::Completed)
        );
        let overlaps = world.roller.state.lock().unwrap().overlaps.clone();
        assert!(overlaps.is_empty(), "{overlaps:#?}");
    }

    /// A daemon whose engine also feeds `metrics` (as `app::start` wires it).
    fn harness_with_metrics(world: &FakeWorld, t: &Target, metrics: Arc<Metrics>) -> Harness {
        harness_on(
            world,
            world.engine(engine_opts()),
            vec![metrics],
            vec![t.clone()],
            1,
            |p| p.opts.pending_retry_interval = Duration::from_millis(100),
        )
    }

    fn gauge(m: &Metrics, series: &str) -> Option<f64> {
        m.render().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    }

    /// Scenario 4: a leaked key whose revoke keeps failing is retried and alerted on. The
    /// alert's gauge must survive a restart: the retry of a finished rotation's pending
    /// deletions has to report what is still pending, or a restarted daemon shows 0 while
    /// the leaked key still works.
    #[tokio::test]
    async fn a_pending_revoke_of_a_leaked_key_stays_visible_across_restarts() {
        let world = FakeWorld::default();
        let (t, old) = world.seed_target("chat", Utc::now());
        world.issuer.state.lock().unwrap().fail_deletes = 1_000;
        let pending = r#"openai_key_rotator_old_account_pending_deletion{target="chat"}"#;
        let leaked = r#"openai_key_rotator_leaked_key_pending_revocation{target="chat"}"#;

        let m1 = Arc::new(Metrics::new(&["chat".into()]));
        let h = harness_with_metrics(&world, &t, m1.clone());
        let id = h
            .daemon
            .trigger(&manual("chat").emergency(false))
            .await
            .unwrap();
        let j = wait_finished(&h, id.rotation_id()).await;
        assert_eq!(j.status, Status::Completed);
        assert_eq!(j.pending_deletions.len(), 1, "{j:#?}");
        assert_eq!(j.pending_deletions[0].account.id, old.id);
        assert_eq!(gauge(&m1, pending), Some(1.0));
        assert_eq!(gauge(&m1, leaked), Some(1.0));

        // Restart: the new daemon retries the pending revoke (it fails again).
        let attempts = j.pending_deletions[0].attempts;
        let m2 = Arc::new(Metrics::new(&["chat".into()]));
        let h2 = harness_with_metrics(&world, &t, m2.clone());
        let d = h2.daemon.clone();
        let run = tokio::spawn(async move { d.run().await });
        until("the restarted daemon retried the revoke", async || {
            journal_of(&world, "chat").await.pending_deletions[0].attempts > attempts
        })
        .await;
        assert_eq!(
            gauge(&m2, pending),
            Some(1.0),
            "the restarted daemon does not show the leaked key's pending revoke"
        );
        assert_eq!(gauge(&m2, leaked), Some(1.0));
        // OpenAI recovers: the next retry deletes it and the gauge goes to 0.
        world.issuer.state.lock().unwrap().fail_deletes = 0;
        until("the leaked account is gone", async || {
            !world.issuer.account_ids().contains(&old.id)
        })
        .await;
        until("the gauges are back to 0", async || {
            gauge(&m2, pending) == Some(0.0) && gauge(&m2, leaked) == Some(0.0)
        })
        .await;
        h2.shutdown.cancel();
        run.await.unwrap();
    }
}

/// Found by the simulation: a target removed while its rotation ran kept its old schedule
/// in the daemon's state, nothing refreshed it, and the scheduler loop spun on it.
#[tokio::test]
async fn removing_a_target_mid_rotation_does_not_make_the_scheduler_spin() {
    let world = FakeWorld::default();
    let (mut a, _) = world.seed_target("a", Utc::now());
    let (b, _) = world.seed_target("b", Utc::now());
    a.grace_period = DurationStr(Duration::from_millis(200));
    // Due at once (every second), so it has a next time that passes.
    a.schedule = Some("* * * * * *".parse().unwrap());
    let h = harness(world.clone(), vec![a, b.clone()], 1);
    let d = h.daemon.clone();
    let run = tokio::spawn(async move { d.run().await });
    let id = loop {
        if let Some(id) = h.daemon.running("a") {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    h.daemon.reload(config(vec![b], 1)).unwrap();
    wait_finished(&h, &id).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = world.store.state.lock().unwrap().meta_reads;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let polls = world.store.state.lock().unwrap().meta_reads - before;
    // max_sleep is 50 ms: about 10 passes over one target in 500 ms; a spin makes thousands.
    assert!(
        polls < 100,
        "{polls} key reads in 500 ms: the scheduler spins"
    );
    h.shutdown.cancel();
    run.await.unwrap();
}

/// Counts refused triggers (the scheduler's attempts that did not start a rotation).
#[derive(Default)]
struct CountRefusals(std::sync::atomic::AtomicUsize);
impl ScheduleObserver for CountRefusals {
    fn next_rotation(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn key_created(&self, _: &str, _: Option<DateTime<Utc>>) {}
    fn rotation_requested(&self, _: &RotationRequest, _: &str) {}
    fn trigger_refused(&self, _: &RotationRequest, _: &TriggerError) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn rotation_upgraded(&self, _: &RotationRequest, _: &str) {}
    fn rotation_resumed(&self, _: &RotationRequest, _: &str) {}
    fn unconfigured_target(&self, _: &str, _: &str, _: bool) {}
    fn swept(&self, _: &[String]) {}
}

/// Found by the simulation: a due target whose scheduled trigger is refused (here: its
/// journal cannot be read, so nothing may start) stayed due, and the loop retried it with
/// no pause, hammering Vault. A refusal holds the target for a while.
#[tokio::test]
async fn a_refused_scheduled_trigger_is_held_not_retried_in_a_loop() {
    use crate::rotation::faults::{Call, Crash, Fault, Op, PlanFn};
    let world = FakeWorld::default();
    let (mut t, _) = world.seed_target("chat", Utc::now());
    t.schedule = Some("* * * * * *".parse().unwrap());
    let unreadable = PlanFn(|c: &Call| {
        (c.op == Op::ReadDoc && c.subject.contains("/targets/")).then_some(Fault::Transient)
    });
    let refusals = Arc::new(CountRefusals::default());
    let engine = crate::rotation::Engine::new(
        world.faulty_ports(Arc::new(unreadable), Crash::default()),
        engine_opts(),
    );
    let r = refusals.clone();
    let h = harness_on(&world, engine, vec![], vec![t], 1, move |p| p.schedule = r);
    let (daemon, shutdown) = (h.daemon.clone(), h.shutdown.clone());
    let d = daemon.clone();
    let run = tokio::spawn(async move { d.run().await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = refusals.0.load(std::sync::atomic::Ordering::SeqCst);
    // Due every second for 1.5 s: at most two attempts; without the hold, one per pass.
    assert!(
        (1..=2).contains(&n),
        "{n} refused scheduled triggers in 1.5 s"
    );
    shutdown.cancel();
    run.await.unwrap();
}

/// Restart coalescing: an emergency of three targets that share a Deployment restarts it
/// once, not three times; each rotation still verifies and retires its own old account.
mod coalescing {
    use super::*;
    use crate::config::WorkloadRef;
    use std::collections::BTreeSet;

    fn shared_targets(world: &FakeWorld) -> (Vec<Target>, WorkloadRef, Vec<String>) {
        let shared: WorkloadRef = "demo/Deployment/shared".parse().unwrap();
        let mut targets = Vec::new();
        let mut olds = Vec::new();
        for name in ["a", "b", "c"] {
            let (mut t, old) = world.seed_target(name, Utc::now());
            t.workloads.push(shared.clone());
            targets.push(t);
            olds.push(old.id);
        }
        (targets, shared, olds)
    }

    async fn emergency_of_all(window: Duration) -> (FakeWorld, WorkloadRef, Vec<Journal>) {
        let world = FakeWorld::default();
        world.roller.state.lock().unwrap().polls_to_complete = 5;
        let (targets, shared, olds) = shared_targets(&world);
        let engine = world.engine(EngineOptions {
            coalesce_window: window,
            ..engine_opts()
        });
        let h = harness_on(&world, engine, vec![], targets, 3, |_| {});
        let mut ids = Vec::new();
        for name in ["a", "b", "c"] {
            let a = h
                .daemon
                .trigger(&manual(name).emergency(false))
                .await
                .unwrap();
            ids.push(a.rotation_id().to_string());
        }
        let mut done = Vec::new();
        for id in &ids {
            done.push(wait_finished(&h, id).await);
        }
        for old in &olds {
            assert!(!world.issuer.account_ids().contains(old), "{old} retired");
        }
        (world, shared, done)
    }

    #[tokio::test]
    async fn an_emergency_of_every_target_restarts_a_shared_workload_once() {
        let (world, shared, done) = emergency_of_all(Duration::from_secs(3)).await;
        for j in &done {
            assert_eq!(j.status, Status::Completed, "{j:#?}");
        }
        assert_eq!(
            world.roller.workload(&shared).rolls,
            1,
            "one restart for all three"
        );
        let ids: BTreeSet<&str> = done.iter().map(|j| j.rollout_id()).collect();
        assert_eq!(ids.len(), 1, "one shared rollout id: {ids:?}");
        let overlaps = world.roller.state.lock().unwrap().overlaps.clone();
        assert!(overlaps.is_empty(), "{overlaps:#?}");
    }

    /// Negative control: with coalescing off the shared workload restarts once per target.
    #[tokio::test]
    async fn without_coalescing_it_restarts_once_per_target() {
        let (world, shared, done) = emergency_of_all(Duration::ZERO).await;
        for j in &done {
            assert_eq!(j.status, Status::Completed, "{j:#?}");
        }
        assert_eq!(world.roller.workload(&shared).rolls, 3);
    }
}

/// `max_concurrent_rollouts`: three targets of two workloads each, rotated at once, never
/// have more than two workloads rolling (patched, rollout not complete). The negative
/// control without the bound sees more.
mod rollout_bound {
    use super::*;

    async fn max_rolling(bound: Option<usize>) -> usize {
        let world = FakeWorld::default();
        world.roller.state.lock().unwrap().polls_to_complete = 20;
        let targets: Vec<Target> = ["a", "b", "c"]
            .iter()
            .map(|n| world.seed_target(n, Utc::now()).0)
            .collect();
        let engine = world.engine(EngineOptions {
            max_concurrent_rollouts: bound,
            ..engine_opts()
        });
        let h = harness_on(&world, engine, vec![], targets, 3, |_| {});
        let mut ids = Vec::new();
        for n in ["a", "b", "c"] {
            ids.push(
                h.daemon
                    .trigger(&manual(n))
                    .await
                    .unwrap()
                    .rotation_id()
                    .to_string(),
            );
        }
        let mut most = 0;
        loop {
            let rolling = world
                .roller
                .state
                .lock()
                .unwrap()
                .workloads
                .values()
                .filter(|w| w.annotation.is_some() && !w.complete)
                .count();
            most = most.max(rolling);
            let mut done = true;
            for id in &ids {
                let j = h.daemon.rotation(id).await.unwrap();
                done &= j.is_some_and(|j| j.status.is_terminal());
            }
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for id in &ids {
            assert_eq!(wait_finished(&h, id).await.status, Status::Completed);
        }
        most
    }

    #[tokio::test]
    async fn the_bound_holds_across_rotations() {
        let most = max_rolling(Some(2)).await;
        assert!((1..=2).contains(&most), "{most} workloads rolling at once");
    }

    #[tokio::test]
    async fn without_a_bound_more_roll_at_once() {
        assert!(max_rolling(None).await > 2);
    }
}

/// Triggers the target again from inside the finishing rotation's `Finished` event (its view
/// reads terminal; its task still holds the target), holding that task for 200 ms so the
/// trigger lands in the window.
struct TriggerOnFinish {
    daemon: std::sync::OnceLock<Daemon>,
    emergency: bool,
    fired: AtomicBool,
    result: Arc<Mutex<Option<Result<Accepted, TriggerError>>>>,
}

impl Observer for TriggerOnFinish {
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        if !matches!(event, RotationEvent::Finished) || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        let daemon = self.daemon.get().expect("daemon set").clone();
        let mut req = manual(&j.target);
        if self.emergency {
            req = req.emergency(false);
        }
        let out = self.result.clone();
        // Its own thread: a task spawned here would wait in this worker's LIFO slot until
        // the finishing task yields, after the window.
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let r = rt.block_on(daemon.trigger(&req));
            *out.lock().unwrap() = Some(r);
        });
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Regression: a trigger arriving after `GET /v1/rotations/{id}` reads `completed` but before
/// the rotation's task let go of the target was refused `409 already rotating`, and an
/// emergency one was "upgraded" into the finished rotation: accepted, and nothing rotated.
/// Either now waits for the target and starts a new rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_right_after_a_rotation_finished_starts_a_new_one() {
    for emergency in [false, true] {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", Utc::now());
        let result: Arc<Mutex<Option<Result<Accepted, TriggerError>>>> = Arc::default();
        let obs = Arc::new(TriggerOnFinish {
            daemon: std::sync::OnceLock::new(),
            emergency,
            fired: AtomicBool::new(false),
            result: result.clone(),
        });
        let engine = world.engine(engine_opts());
        let h = harness_on(&world, engine, vec![obs.clone()], vec![t], 2, |_| {});
        assert!(obs.daemon.set(h.daemon.clone()).is_ok());
        let first = h.daemon.trigger(&manual("chat")).await.unwrap();
        let j = wait_finished(&h, first.rotation_id()).await;
        assert_eq!(j.status, Status::Completed);
        let second = loop {
            if let Some(r) = result.lock().unwrap().take() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let second = match second {
            Ok(Accepted::Started(id)) => id,
            other => {
                panic!("emergency={emergency}: the trigger in the finishing window got {other:?}")
            }
        };
        assert_ne!(second, first.rotation_id());
        let j2 = wait_finished(&h, &second).await;
        assert_eq!(j2.status, Status::Completed, "emergency={emergency}");
        assert_eq!(j2.emergency, emergency);
        h.shutdown.cancel();
    }
}
