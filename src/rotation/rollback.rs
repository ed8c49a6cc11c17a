//! Rollback: put the old key back (as a new Vault version), roll the workloads again, and
//! delete the new account once nothing uses it.

use super::engine::{Engine, EngineError, Record, RotationEvent};
use super::journal::{Journal, PendingDeletion, Status, Step, StepState};
use super::ports::{EventType, KeyMeta};
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
        // 1. Vault serves the old key again (only if it still serves ours).
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
                let meta = KeyMeta {
                    account: rec.journal.old_account.clone(),
                    rotation_id: rec.journal.old_rotation_id.clone(),
                    key_created_at: rec.journal.old_key_created_at,
                };
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
        // 2. Roll again so pods that took the new key go back to the old one.
        let rolled = rec.journal.steps.iter().any(|s| s.step == Step::Roll);
        let rb_id = format!("{}-rollback", rec.journal.rotation_id);
        let mut rolled_back_cleanly = true;
        if rolled {
            for w in &target.workloads {
                if let Err(e) = self.roller.roll(w, &rb_id).await {
                    tracing::error!(workload = %w, error = %e, "rollback roll failed");
                    rolled_back_cleanly = false;
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
            if rolled_back_cleanly {
                let deadline = Instant::now() + target.rollout_timeout.get();
                if let Err(e) = self.wait_rollouts(target, &rb_id, deadline).await {
                    tracing::error!(error = %e, "rollback rollout incomplete");
                    rolled_back_cleanly = false;
                }
            }
        }
        // 3. Delete the new account, but never under a ready pod that still uses it.
        let mut outcome = "ok".to_string();
        if let Some(new) = rec.journal.new_account.clone() {
            let safe = rolled_back_cleanly
                || !rolled
                || self
                    .pods_carrying(target, &rec.journal.rotation_id)
                    .await
                    .is_ok_and(|n| n == 0);
            let deleted = safe
                && self
                    .issuer
                    .delete_service_account(&target.project_id, &new.id)
                    .await
                    .is_ok();
            if deleted {
                self.observer.on_event(
                    &rec.journal,
                    &RotationEvent::AccountDeleted {
                        account_id: new.id,
                        why: "rollback",
                    },
                );
            } else if !rec
                .journal
                .pending_deletions
                .iter()
                .any(|p| p.account == new)
            {
                outcome = format!("new account {} pending deletion", new.id);
                rec.journal.pending_deletions.push(PendingDeletion {
                    account: new,
                    unless_pods_carry: rolled.then(|| rec.journal.rotation_id.clone()),
                    once_quiet_for_ms: None,
                    attempts: 1,
                    last_error: Some("rollback rollout incomplete or delete failed".into()),
                });
            }
        }
        rec.journal.finish(outcome, self.now());
        self.conclude(rec, Status::RolledBack).await
    }
}
