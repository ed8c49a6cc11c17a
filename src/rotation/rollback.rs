//! Rollback: put the old key back (as a new Vault version), roll the workloads again, and
//! delete the new account once nothing uses it.

use super::deletion::{Doomed, Why};
use super::engine::{Engine, EngineError, Record, RotationEvent};
use super::journal::{Journal, PendingDeletion, PendingReason, Status, Step, StepState};
use super::ports::{BackendError, EventType, KeyMeta};
use crate::config::Target;
use tokio::time::Instant;

impl Engine {
    /// Put the old key back (as a new Vault version), roll again, delete the new account.
    #[tracing::instrument(level = "info", name = "step", skip_all, fields(step = "rollback"))]
    pub(super) async fn rollback(
        &self,
        target: &Target,
        rec: &mut Record,
        why: String,
    ) -> Result<Journal, EngineError> {
        tracing::warn!(rotation_id = %rec.journal.rotation_id, target = %target.name, reason = %why, "rolling back");
        if rec.journal.step_state == StepState::Started && rec.journal.step != Step::Rollback {
            rec.journal.finish(why.clone(), self.now());
        }
        rec.journal.status = Status::RollingBack;
        rec.journal.error = Some(why.clone());
        if rec.journal.step != Step::Rollback {
            self.begin(rec, Step::Rollback).await?;
        }
        if rec.journal.old_retired {
            // revoke_first: the old key is dead; the new one stays, whatever its state.
            let reason =
                format!("{why}; no rollback: the old account was already revoked (revoke_first)");
            rec.journal
                .finish("impossible (old account revoked)", self.now());
            self.announce(
                target,
                EventType::Warning,
                "RotationFailed",
                &format!("rotation {} failed: {reason}", rec.journal.rotation_id),
            )
            .await;
            rec.journal.error = Some(reason);
            return self.conclude(rec, Status::Failed).await;
        }
        if rec.journal.old_vault_version == 0 {
            let reason = format!("{why}; no rollback: there was no previous key");
            rec.journal
                .finish("impossible (no previous key)", self.now());
            rec.journal.error = Some(reason);
            return self.conclude(rec, Status::Failed).await;
        }
        // 1. Vault serves the old key again (only if it still serves ours), provided the old
        //    key still works: writing back a dead key would break every pod that reads it.
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await
            .map_err(|e| Self::interrupted(rec, e))?;
        match current {
            Some(c) if Some(c.key.sha256_hex()) == rec.journal.new_key_sha256 => {
                let old_key = self
                    .store
                    .read_key_version(
                        &target.vault_path,
                        &target.vault_field,
                        rec.journal.old_vault_version,
                    )
                    .await
                    .map_err(|e| Self::interrupted(rec, e))?;
                if rec.journal.old_key_sha256.is_none() {
                    rec.journal.old_key_sha256 = Some(old_key.sha256_hex());
                }
                match self.issuer.check_key(&old_key).await {
                    Ok(()) => {}
                    Err(
                        e @ (BackendError::NotFound { .. }
                        | BackendError::Failed {
                            transient: false, ..
                        }),
                    ) => return self.refuse_rollback(target, rec, why, e).await,
                    Err(e) => return Err(Self::interrupted(rec, e)),
                }
                let meta = KeyMeta {
                    account: rec.journal.old_account.clone(),
                    rotation_id: rec.journal.old_rotation_id.clone(),
                    key_created_at: rec.journal.old_key_created_at,
                };
                self.fenced(&rec.journal)?;
                let v = self
                    .store
                    .write_key(
                        &target.vault_path,
                        &target.vault_field,
                        &old_key,
                        &meta,
                        c.version,
                    )
                    .await
                    .map_err(|e| Self::interrupted(rec, e))?;
                rec.journal.rollback_vault_version = Some(v);
                self.save(rec).await?;
            }
            _ => {} // already restored (resumed rollback) or replaced by someone else
        }
        // 2. A synced Secret must hold the old key again before pods restart on it.
        let mut secret_back = true;
        if let (Some(s), Some(old_sha)) =
            (&target.synced_secret, rec.journal.old_key_sha256.clone())
        {
            if let Err(e) = self
                .wait_secret(s, &old_sha, "the old key", &rec.journal)
                .await
            {
                tracing::error!(error = %e, "rollback: the synced Secret did not get the old key back; not rolling");
                secret_back = false;
            }
        }
        // 3. Roll again so pods that took the new key go back to the old one.
        let rolled = rec.journal.steps.iter().any(|s| s.step == Step::Roll);
        let _held = self.hold_workloads(target, rec).await;
        let rb_id = format!("{}-rollback", rec.journal.rotation_id);
        let mut outcome = "ok".to_string();
        if rolled && !secret_back {
            outcome = "Vault holds the old key again, but the synced Secret did not; workloads not rolled".into();
        } else if rolled {
            let mut rolled_all = true;
            // A staged rollout rolls back only the waves that moved; later ones never took
            // the new key.
            let moved: Vec<crate::config::WorkloadRef> = if rec.journal.waves.is_empty() {
                target.workloads.clone()
            } else {
                target
                    .wave_list()
                    .into_iter()
                    .zip(&rec.journal.waves)
                    .filter(|(_, p)| p.rolled_at.is_some())
                    .flat_map(|(wave, _)| wave.iter().cloned())
                    .collect()
            };
            for w in &moved {
                self.fenced(&rec.journal)?;
                if let Err(e) = self.roller.roll(w, &rb_id).await {
                    tracing::error!(workload = %w, error = %e, "rollback roll failed");
                    rolled_all = false;
                }
                let _ = self
                    .roller
                    .event(
                        w,
                        EventType::Warning,
                        "RotationRolledBack",
                        &format!("rotation {} rolled back: {why}", rec.journal.rotation_id),
                    )
                    .await;
            }
            if rolled_all {
                let deadline = Instant::now() + target.rollout_timeout.get();
                if let Err(e) = self.wait_rollouts_of(&moved, &rb_id, deadline).await {
                    tracing::error!(error = %e, "rollback rollout incomplete");
                }
            }
        }
        // 4. Delete the new account, unless Vault, the Secret or a ready pod still uses it.
        if let Some(new) = rec.journal.new_account.clone() {
            let sha = rec.journal.new_key_sha256.clone();
            let carry = rolled.then(|| rec.journal.rollout_id().to_string());
            let doomed = Doomed {
                project: &target.project_id,
                account: &new,
                key_sha256: sha.as_deref(),
                why: Why::Rollback,
                unless_pods_carry: carry.as_deref(),
            };
            let deleted = self
                .delete_account(Some(target), &rec.journal, doomed)
                .await?;
            if let Some(problem) = deleted.problem() {
                if !rec
                    .journal
                    .pending_deletions
                    .iter()
                    .any(|p| p.account == new)
                {
                    outcome = format!("new account {} pending deletion: {problem}", new.id);
                    let mut p = PendingDeletion::new(
                        new,
                        PendingReason::Rollback,
                        sha,
                        &target.project_id,
                        self.now(),
                    );
                    p.unless_pods_carry = carry;
                    p.attempts = 1;
                    p.last_error = Some(problem);
                    rec.journal.pending_deletions.push(p);
                }
            }
        }
        rec.journal.finish(outcome, self.now());
        self.conclude(rec, Status::RolledBack).await
    }

    /// The old key no longer works (revoked): putting it back would break every consumer.
    /// Go forward instead: Vault keeps the new key (live), nothing is deleted, and the
    /// rotation ends `failed` saying so.
    async fn refuse_rollback(
        &self,
        target: &Target,
        rec: &mut Record,
        why: String,
        check: BackendError,
    ) -> Result<Journal, EngineError> {
        let reason = format!(
            "{why}; rollback refused: the old key no longer works ({check}), so Vault keeps the new key"
        );
        tracing::error!(rotation_id = %rec.journal.rotation_id, %reason, "rollback refused");
        self.observer.on_event(
            &rec.journal,
            &RotationEvent::RollbackRefused {
                reason: reason.clone(),
            },
        );
        rec.journal
            .finish("refused (the old key no longer works)", self.now());
        self.announce(
            target,
            EventType::Warning,
            "RotationFailed",
            &format!("rotation {} failed: {reason}", rec.journal.rotation_id),
        )
        .await;
        rec.journal.error = Some(reason);
        self.conclude(rec, Status::Failed).await
    }
}
