//! Resuming after a crash, a restart or a failover: read what the systems hold, then
//! continue the rotation, roll it back, or retry what a finished one left to delete.

use super::engine::{Engine, EngineError, Record, RotationControl, RotationEvent};
use super::journal::{Journal, Status, Step, Stored};
use crate::config::Target;
use std::sync::Arc;
use tracing::Instrument;

impl Engine {
    /// Pick up an unfinished rotation (`stored`, as the caller read it); for a finished
    /// one, retry its pending deletions. Returns the journal as it ends.
    pub async fn resume(
        &self,
        target: &Target,
        stored: Stored,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let span = tracing::info_span!("resume", target = %target.name);
        self.resume_inner(target, stored, control)
            .instrument(span)
            .await
    }

    async fn resume_inner(
        &self,
        target: &Target,
        stored: Stored,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let mut rec = Record::from_stored(stored);
        if rec.journal.status.is_terminal() {
            if !rec.journal.pending_deletions.is_empty() {
                self.retry_pending(target, &mut rec).await?;
            }
            return Ok(rec.journal);
        }
        if rec.journal.emergency {
            control.upgrade_to_emergency(rec.journal.revoke_first);
        }
        tracing::info!(
            rotation_id = %rec.journal.rotation_id,
            target = %target.name,
            step = %rec.journal.step,
            "resuming rotation"
        );
        if rec.journal.status == Status::RollingBack {
            let why = rec.journal.error.clone().unwrap_or_default();
            return self.rollback(target, &mut rec, why).await;
        }
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await
            .map_err(|e| Self::interrupted(&rec, e))?;
        let published = matches!(
            (&current, &rec.journal.new_key_sha256),
            (Some(c), Some(h)) if &c.key.sha256_hex() == h
        );
        match (rec.journal.step, current) {
            (Step::Mint | Step::Publish, current) if !published => {
                // The new key's value was never journaled: if it is not in Vault it is lost.
                // Delete its account (found by its deterministic name if the crash came
                // before the journal recorded it) and mint again.
                let orphan = match rec.journal.new_account.clone() {
                    Some(a) => Some(a.id),
                    None => self
                        .issuer
                        .list_service_accounts(&target.project_id)
                        .await
                        .map_err(|e| Self::interrupted(&rec, e))?
                        .into_iter()
                        .find(|a| a.name == rec.journal.new_account_name)
                        .map(|a| a.id),
                };
                if let Some(id) = orphan {
                    self.issuer
                        .delete_service_account(&target.project_id, &id)
                        .await
                        .map_err(|e| Self::interrupted(&rec, e))?;
                    self.observer.on_event(
                        &rec.journal,
                        &RotationEvent::AccountDeleted {
                            account_id: id,
                            why: "unpublished mint after a crash",
                        },
                    );
                }
                if current.as_ref().map_or(0, |c| c.version) != rec.journal.old_vault_version {
                    return self
                        .fail(
                            &mut rec,
                            "Vault changed under the rotation before publish; not retrying".into(),
                        )
                        .await;
                }
                rec.journal.new_account = None;
                rec.journal.new_key_sha256 = None;
                self.forward(target, &mut rec, Step::Mint, None, &control)
                    .await
            }
            (Step::Mint | Step::Publish, Some(current)) => {
                if rec.journal.new_vault_version.is_none() {
                    rec.journal.new_vault_version = Some(current.version);
                }
                self.forward(target, &mut rec, Step::Sync, Some(current.key), &control)
                    .await
            }
            (step, Some(current)) if published => {
                self.forward(target, &mut rec, step, Some(current.key), &control)
                    .await
            }
            _ => {
                // Someone replaced the key; retiring now could kill what Vault serves.
                self.fail(
                    &mut rec,
                    "Vault no longer holds this rotation's key; stopping without retiring".into(),
                )
                .await
            }
        }
    }

    /// Ready pods, over all the target's workloads, that carry `rollout_id`.
    pub(super) async fn pods_carrying(
        &self,
        target: &Target,
        rollout_id: &str,
    ) -> Result<u32, super::ports::BackendError> {
        let mut n = 0;
        for w in &target.workloads {
            n += self.roller.ready_pods_with(w, rollout_id).await?;
        }
        Ok(n)
    }

    /// Retry deletions left pending by an earlier rotation of this target.
    async fn retry_pending(&self, target: &Target, rec: &mut Record) -> Result<(), EngineError> {
        let mut remaining = Vec::new();
        for mut p in std::mem::take(&mut rec.journal.pending_deletions) {
            if let Some(id) = &p.unless_pods_carry {
                if !self.pods_carrying(target, id).await.is_ok_and(|n| n == 0) {
                    remaining.push(p);
                    continue;
                }
            }
            if let Some(ms) = p.once_quiet_for_ms {
                let since = self.now() - chrono::Duration::milliseconds(ms as i64);
                let quiet = self
                    .issuer
                    .key_usage(&target.project_id, &p.account.key_id, since)
                    .await
                    .is_ok_and(|u| {
                        u.requests_since == 0 && u.last_used_at.is_none_or(|t| t <= since)
                    });
                if !quiet {
                    p.last_error = Some("old key still in use".into());
                    remaining.push(p);
                    continue;
                }
            }
            match self
                .issuer
                .delete_service_account(&target.project_id, &p.account.id)
                .await
            {
                Ok(()) => {
                    if Some(&p.account) == rec.journal.old_account.as_ref() {
                        rec.journal.old_retired = true;
                    }
                    self.observer.on_event(
                        &rec.journal,
                        &RotationEvent::AccountDeleted {
                            account_id: p.account.id.clone(),
                            why: "pending deletion",
                        },
                    );
                }
                Err(e) => {
                    p.attempts += 1;
                    p.last_error = Some(e.to_string());
                    remaining.push(p);
                }
            }
        }
        rec.journal.pending_deletions = remaining;
        self.save(rec).await
    }
}
