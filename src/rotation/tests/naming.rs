//! `account_name_template` through a crash: the create's answer is lost, and the resumed
//! rotation finds the account by the templated name its journal recorded before the create.

use super::*;
use crate::naming::{NameTemplate, Naming};

fn naming() -> Naming {
    Naming {
        template: NameTemplate::parse("{yy}-{mm}-{target}-{env}-{rotation}").unwrap(),
        env: Some("Prod".into()),
    }
}

const JOURNAL: &str = "openai-key-rotator/state/targets/chat";

/// Rotate with the template and crash right after the create took effect.
async fn crash_after_create(w: &World) -> Journal {
    let (engine, crash) = w.crashing_engine(CrashAt::AfterMintCall);
    engine.set_naming(naming());
    let prior = engine.journal(&w.target.name).await.unwrap();
    let r = crash
        .run(engine.rotate(&w.target, req(), prior, Arc::default()))
        .await;
    assert!(r.is_none(), "expected a crash, got {r:?}");
    w.engine().journal("chat").await.unwrap().unwrap().journal
}

async fn names(w: &World) -> Vec<(String, String)> {
    w.issuer
        .list_service_accounts(PROJECT)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect()
}

#[tokio::test]
async fn a_lost_create_is_found_by_its_templated_name_on_resume() {
    let w = world();
    let j = crash_after_create(&w).await;
    let at = j.started_at.format("%y-%m").to_string();
    assert_eq!(
        j.new_account_name,
        format!("{at}-chat-Prod-{}", j.rotation_id),
        "the journal holds the templated name before the create"
    );
    assert!(
        j.new_account.is_none(),
        "the create's answer was never heard"
    );
    let before = names(&w).await;
    let orphan = before
        .iter()
        .find(|(_, n)| *n == j.new_account_name)
        .expect("the lost create made an account of that name")
        .0
        .clone();
    assert_eq!(before.len(), 2);

    let engine = w.engine();
    engine.set_naming(naming());
    let stored = engine.journal("chat").await.unwrap().unwrap();
    let done = engine
        .resume(Some(&w.target), stored, Arc::default())
        .await
        .unwrap();
    assert_eq!(done.status, Status::Completed, "{:?}", done.error);
    let after = names(&w).await;
    assert!(
        after.iter().all(|(id, _)| *id != orphan),
        "the orphan of the lost create is gone: {after:?}"
    );
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].1, done.new_account_name);
    assert!(naming().template.fits(&after[0].1, "okr", Some("Prod")));
    w.assert_clean();
}

/// Negative control: when the journal's name is not the account's, the resume cannot find
/// it, and the lost create's account is left over (only the name finds it).
#[tokio::test]
async fn without_the_recorded_name_the_lost_create_is_not_found() {
    let w = world();
    let j = crash_after_create(&w).await;
    let orphan_name = j.new_account_name.clone();
    let (version, mut doc) = w.store.read_doc(JOURNAL).await.unwrap().unwrap();
    doc["new_account_name"] = serde_json::json!(format!("okr-chat-{}", j.rotation_id));
    w.store.write_doc(JOURNAL, &doc, version).await.unwrap();

    let engine = w.engine();
    engine.set_naming(naming());
    let stored = engine.journal("chat").await.unwrap().unwrap();
    let done = engine
        .resume(Some(&w.target), stored, Arc::default())
        .await
        .unwrap();
    assert_eq!(done.status, Status::Completed, "{:?}", done.error);
    let after = names(&w).await;
    assert!(
        after.iter().any(|(_, n)| *n == orphan_name),
        "left over: {after:?}"
    );
    assert_eq!(after.len(), 2, "{after:?}");
}
