//! Regressions for the paths where the rotator itself could kill a live key, leak one, or
//! lose a trigger (the "zero downtime, for real" issue). Each test drives the exact sequence
//! over the fakes and asserts the invariant that sequence used to break.

use super::*;
use crate::config::SyncedSecret;
use crate::rotation::faults::{Fault, PlanFn};

fn second_target(w: &World, name: &str) -> (Target, FakeAccount) {
    let old = w.issuer.seed(PROJECT, &format!("{name}-initial"));
    let path = format!("apps/{name}/openai");
    w.store.put(
        &path,
        FIELD,
        old.key.expose(),
        KeyMeta {
            account: Some(AccountRef {
                id: old.id.clone(),
                key_id: old.key_id.clone(),
            }),
            rotation_id: Some("seed".into()),
            key_created_at: Some(old.created_at),
        },
    );
    let mut t = w.target.clone();
    t.name = name.into();
    t.vault_path = path;
    (t, old)
}

async fn rotate_target(w: &World, t: &Target, req: RotationRequest) -> Journal {
    let engine = w.engine();
    let prior = engine.journal(&t.name).await.unwrap();
    engine.rotate(t, req, prior, Arc::default()).await.unwrap()
}

fn served_account(w: &World, path: &str) -> String {
    w.store.state.lock().unwrap().meta[path]
        .account
        .clone()
        .unwrap()
        .id
}

/// Scenario 1: removing a target from the config (two targets share one project) must not
/// make the sweep delete its live account; neither may a name that only looks like ours.
#[tokio::test]
async fn the_sweep_spares_a_removed_targets_live_account_and_foreign_look_alikes() {
    let w = world();
    let (embed, _) = second_target(&w, "embed");
    let je = rotate_target(&w, &embed, req()).await;
    assert_eq!(je.status, Status::Completed);
    let jc = w.rotate(req()).await.unwrap();
    assert_eq!(jc.status, Status::Completed);
    let embed_live = served_account(&w, &embed.vault_path);
    assert_eq!(Some(&embed_live), je.new_account.as_ref().map(|a| &a.id));
    // Another installation whose prefix makes its names parse as ours ("okr-x" + "chat").
    let foreign = w.issuer.seed(
        PROJECT,
        &account_name("okr-x", "chat", "20260101000000-abcdef"),
    );
    let orphan = lost_mint_orphan(&w).await;

    // The config now lists only `chat`.
    let r = w
        .engine()
        .sweep(std::slice::from_ref(&w.target), Duration::ZERO)
        .await
        .unwrap();
    let ids = w.issuer.account_ids();
    assert!(
        ids.contains(&embed_live),
        "the removed target's live account was swept: {r:?}"
    );
    assert!(ids.contains(&foreign.id), "a foreign look-alike was swept");
    assert!(
        !ids.contains(&orphan.id),
        "the proven orphan stays: {r:?} (positive control)"
    );
    assert_eq!(r.deleted, vec![orphan.id]);
    w.assert_clean();
}

/// Scenario 3: a rollback must wait until the synced Secret holds the old key again before
/// rolling, and delete the new account only when no Secret holds it.
#[tokio::test]
async fn rollback_waits_for_the_synced_secret_before_rolling_and_deleting() {
    let mut w = world();
    let secret = SyncedSecret {
        namespace: "demo".into(),
        name: "chat-openai".into(),
        key: "api_key".into(),
        force_sync_annotation: None,
        timeout: DurationStr(Duration::from_secs(5)),
    };
    w.target.synced_secret = Some(secret);
    let bad = "http://chat.demo.svc/broken";
    w.prober.answer(bad, &[503]);
    w.target.smoke_probes = vec![probe(bad)];
    w.target.rollout_timeout = DurationStr(Duration::from_millis(100));
    let old_sha = w.old.key.sha256_hex();
    w.roller
        .set_secret_hash("demo", "chat-openai", "api_key", &old_sha);
    // An operator that mirrors Vault into the Secret 80 ms after every change.
    let (store, roller) = (w.store.clone(), w.roller.clone());
    let syncer = tokio::spawn(async move {
        let mut mirrored = old_sha;
        loop {
            if let Some((_, k)) = store.current(PATH, FIELD) {
                if k.sha256_hex() != mirrored {
                    tokio::time::sleep(Duration::from_millis(80)).await;
                    mirrored = k.sha256_hex();
                    roller.set_secret_hash("demo", "chat-openai", "api_key", &mirrored);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let j = w.rotate(req()).await.unwrap();
    syncer.abort();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    let rolls = w.roller.state.lock().unwrap().rolls.clone();
    let back: Vec<_> = rolls
        .iter()
        .filter(|r| r.1.ends_with("-rollback"))
        .collect();
    assert_eq!(back.len(), 2, "{rolls:?}");
    for (workload, _, secrets) in back {
        assert_eq!(
            secrets.get("demo/chat-openai/api_key"),
            Some(&w.old.key.sha256_hex()),
            "{workload} restarted while the Secret still held the new key"
        );
    }
    assert_eq!(w.current_key(), w.old.key);
    w.assert_clean();
}

/// Scenario 4: a deletion left pending by one rotation (a leaked key whose revoke failed)
/// must not be forgotten when the next rotation starts.
#[tokio::test]
async fn the_next_rotation_carries_pending_deletions_forward() {
    let w = world();
    w.issuer.state.lock().unwrap().fail_deletes = 100;
    let j1 = w.rotate(req().emergency(false)).await.unwrap();
    assert_eq!(j1.status, Status::Completed);
    assert_eq!(j1.pending_deletions.len(), 1, "{j1:#?}");
    assert_eq!(j1.pending_deletions[0].account.id, w.old.id);
    // OpenAI recovers; the next emergency rotation begins.
    w.issuer.state.lock().unwrap().fail_deletes = 0;
    let j2 = w.rotate(req().emergency(false)).await.unwrap();
    assert_eq!(j2.status, Status::Completed);
    let ids = w.issuer.account_ids();
    assert!(
        !ids.contains(&w.old.id)
            || j2
                .pending_deletions
                .iter()
                .any(|p| p.account.id == w.old.id),
        "the leaked key's pending revoke was forgotten: {j2:#?}"
    );
    assert_eq!(
        ids,
        [j2.new_account.unwrap().id].into(),
        "only the served account is left"
    );
    w.assert_clean();
}

/// Scenario 6: a Vault write that times out and lands late must not be taken for "not
/// published": deleting the new account would leave Vault serving a dead key.
#[tokio::test]
async fn a_late_landing_publish_never_leaves_vault_serving_a_dead_key() {
    let w = world();
    let (engine, _crash) = w.faulty_engine(once(
        |c: &Call| c.op == Op::WriteKey && c.subject == PATH,
        Fault::LateEffect(Duration::from_millis(50)),
    ));
    let prior = engine.journal("chat").await.unwrap();
    let j = engine.rotate(&w.target, req(), prior, Arc::default()).await;
    // Let the late write land, then look.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        w.issuer.is_live(&w.current_key()),
        "I1: Vault serves a dead key after the late write landed ({j:?})"
    );
    w.assert_clean();
}

/// Scenario 8: when the old key died (revoke_first reached the delete, but the crash came
/// before the journal recorded it), a rollback must not write that dead key back.
#[tokio::test]
async fn a_rollback_never_restores_a_dead_old_key() {
    let w = world();
    let control = Arc::new(RotationControl::default());
    let (old_id, c2) = (w.old.id.clone(), control.clone());
    let (engine, crash) = w.faulty_engine(Arc::new(PlanFn(move |c: &Call| {
        match c.op {
            // An incident responder upgrades the running rotation to revoke_first.
            Op::WriteKey => {
                c2.upgrade_to_emergency(true);
                None
            }
            Op::DeleteAccount if c.subject == old_id => Some(Fault::CrashAfter),
            _ => None,
        }
    })));
    let prior = engine.journal("chat").await.unwrap();
    let r = crash
        .run(engine.rotate(&w.target, req(), prior, control))
        .await;
    assert!(r.is_none(), "crashed inside the revoke: {r:?}");
    assert!(!w.issuer.account_ids().contains(&w.old.id), "old key dead");
    // The restarted daemon resumes; the rollout then fails.
    for wl in workloads() {
        w.roller.set_behaviour(&wl, Behaviour::DeadlineExceeded);
    }
    let j = w.resume().await;
    assert!(
        w.issuer.is_live(&w.current_key()),
        "I1: the rollback restored the dead old key ({j:?})"
    );
    w.assert_clean();
}

/// Scenario 9: the key's data and its metadata are two Vault writes. When the metadata write
/// fails, the journal (not the stale metadata) must name the old account next time, and the
/// metadata must be repaired.
#[tokio::test]
async fn stale_metadata_never_names_the_wrong_old_account() {
    let w = world();
    w.store.state.lock().unwrap().fail_meta_writes = 1;
    let j1 = w.rotate(req()).await.unwrap();
    assert_eq!(j1.status, Status::Completed, "{j1:#?}");
    let a1 = j1.new_account.clone().unwrap();
    assert_eq!(
        w.store.state.lock().unwrap().meta[PATH].account,
        Some(a1.clone()),
        "the metadata was repaired"
    );
    let j2 = w.rotate(req()).await.unwrap();
    assert_eq!(j2.status, Status::Completed, "{j2:#?}");
    assert_eq!(
        j2.old_account,
        Some(a1),
        "the journal names the old account"
    );
    assert_eq!(
        w.issuer.account_ids(),
        [j2.new_account.unwrap().id].into(),
        "the first rotation's account was retired, none leaked"
    );
    w.assert_clean();
}

/// Scenario 10: the grace period counts the time already served when a rotation resumes.
#[tokio::test(start_paused = true)]
async fn a_resumed_drain_serves_only_the_rest_of_the_grace_period() {
    let mut w = world();
    w.target.grace_period = DurationStr(Duration::from_secs(10));
    let clock = Arc::new(TokioClock::new(chrono::Utc::now()));
    let engine_on_clock = |w: &World| {
        let mut ports = w.ports();
        ports.clock = clock.clone();
        Engine::new(ports, opts()).with_observer(w.checker.clone())
    };
    let control = Arc::new(RotationControl::default());
    let engine = engine_on_clock(&w);
    let run = engine.rotate(&w.target, req(), None, control.clone());
    let stop_after_6s = async {
        loop {
            let drain = w
                .engine()
                .journal("chat")
                .await
                .unwrap()
                .is_some_and(|s| s.journal.step == Step::Drain);
            if drain {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        control.request_stop();
    };
    let (r, ()) = futures::future::join(run, stop_after_6s).await;
    assert!(matches!(r, Err(EngineError::Stopped { .. })), "{r:?}");
    let started = tokio::time::Instant::now();
    let engine = engine_on_clock(&w);
    let stored = engine.journal("chat").await.unwrap().unwrap();
    let j = engine
        .resume(Some(&w.target), stored, Arc::default())
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed);
    let rest = started.elapsed();
    assert!(
        rest <= Duration::from_secs(5),
        "the grace period started again on resume: {rest:?} instead of about 4s"
    );
    assert!(rest >= Duration::from_secs(3), "{rest:?}");
    w.assert_clean();
}

/// Scenario 7: a replica that lost the leader Lease mid-rotation makes no further remote
/// write; the next leader resumes from the journal.
#[tokio::test]
async fn a_fenced_engine_makes_no_further_write_and_the_next_leader_resumes() {
    use crate::rotation::ports::Fence;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Lease(Arc<AtomicBool>);
    impl Fence for Lease {
        fn check(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Err("lost the Lease".into())
            } else {
                Ok(())
            }
        }
    }
    let w = world();
    let lost = Arc::new(AtomicBool::new(false));
    let l2 = lost.clone();
    // The Lease is lost while the publish write is in flight.
    let (engine, _crash) = w.faulty_engine(Arc::new(PlanFn(move |c: &Call| {
        if c.op == Op::WriteKey {
            l2.store(true, Ordering::SeqCst);
        }
        None
    })));
    engine.set_fence(Arc::new(Lease(lost)));
    let r = engine.rotate(&w.target, req(), None, Arc::default()).await;
    assert!(matches!(r, Err(EngineError::Fenced { .. })), "{r:?}");
    let log = w.log.entries();
    let published = log.iter().position(|e| e.starts_with("publish")).unwrap();
    assert!(
        log[published + 1..].is_empty(),
        "writes after the Lease was lost: {:?}",
        &log[published + 1..]
    );
    assert!(w.issuer.is_live(&w.current_key()), "I1");
    // The next leader resumes the journal (left at publish) and finishes.
    let j = w.resume().await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}

/// Found by the simulation (seed 1022): a create that timed out and landed late, in a
/// rotation whose history copy was never written, was no longer named by any journal once
/// the next rotation overwrote the target's journal: the sweep could not prove it ours.
#[tokio::test]
async fn a_late_mint_stays_provably_ours_after_the_next_rotation() {
    let w = world();
    let (engine, _crash) = w.faulty_engine(Arc::new(PlanFn({
        let (created, history) = (
            std::sync::atomic::AtomicBool::new(false),
            std::sync::atomic::AtomicBool::new(false),
        );
        move |c: &Call| match c.op {
            Op::CreateAccount if !created.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                Some(Fault::LateEffect(Duration::from_millis(50)))
            }
            Op::WriteDoc
                if c.subject.contains("/rotations/")
                    && !history.swap(true, std::sync::atomic::Ordering::SeqCst) =>
            {
                Some(Fault::Transient)
            }
            _ => None,
        }
    })));
    let j1 = engine
        .rotate(&w.target, req(), None, Arc::default())
        .await
        .unwrap();
    assert_eq!(j1.status, Status::Failed, "{j1:#?}");
    // The next rotation overwrites the target's journal; then the late create lands.
    assert_eq!(w.rotate(req()).await.unwrap().status, Status::Completed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let orphan = w
        .issuer
        .list_service_accounts(PROJECT)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == j1.new_account_name)
        .expect("the late create landed");
    let r = w
        .engine()
        .sweep(std::slice::from_ref(&w.target), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec![orphan.id], "{r:?}");
    assert_eq!(w.managed_accounts(), 1);
    w.assert_clean();
}
