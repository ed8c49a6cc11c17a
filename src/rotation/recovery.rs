//! Resuming after a crash, a restart or a failover: read what the systems hold, then
//! continue the rotation, roll it back, or retry what a finished one left to delete.

use super::deletion::{Deletion, Doomed, Why};
use super::engine::{Engine, EngineError, Record, RotationControl};
use super::journal::{Journal, PendingDeletion, PendingReason, Status, Step, Stored};
use super::ports::{BackendError, StoredKey};
use crate::config::Target;
use std::sync::Arc;
use tracing::Instrument;

impl Engine {
    /// Pick up an unfinished rotation (`stored`, as the caller read it); for a finished
    /// one, retry its pending deletions. A rotation runs to its end with the target as it
    /// was configured when it started (the journal keeps a copy); `configured` serves only
    /// journals written before that copy existed. Returns the journal as it ends.
    pub async fn resume(
        &self,
        configured: Option<&Target>,
        stored: Stored,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let Some(target) = stored.journal.spec.clone().or_else(|| configured.cloned()) else {
            return Err(EngineError::NoTarget {
                rotation_id: stored.journal.rotation_id,
                target: stored.journal.target,
            });
        };
        self.know_targets(std::slice::from_ref(&target));
        let span = tracing::info_span!("resume", target = %target.name);
        self.resume_inner(&target, stored, control)
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
        if rec.journal.spec.is_none() {
            rec.journal.spec = Some(target.clone());
        }
        if rec.journal.status.is_terminal() {
            if !rec.journal.pending_deletions.is_empty() {
                self.retry_pending(target, &mut rec, None).await?;
                self.save(&mut rec).await?;
                self.observer
                    .on_event(&rec.journal, &super::engine::RotationEvent::PendingRetried);
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
                self.restart_unpublished(target, &mut rec, current, &control)
                    .await
            }
            (Step::Mint | Step::Publish, Some(current)) => {
                if rec.journal.new_vault_version.is_none() {
                    rec.journal.new_vault_version = Some(current.version);
                }
                self.repair_own_meta(target, &rec, &current).await;
                self.forward(target, &mut rec, Step::Sync, Some(current.key), &control)
                    .await
            }
            (step, Some(current)) if published => {
                self.repair_own_meta(target, &rec, &current).await;
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

    /// Vault serves this rotation's key but its metadata names another account (the
    /// metadata half of the publish failed): repair it.
    async fn repair_own_meta(&self, target: &Target, rec: &Record, current: &StoredKey) {
        if rec.journal.new_account.is_some() && current.meta.account != rec.journal.new_account {
            let meta = super::ports::KeyMeta {
                account: rec.journal.new_account.clone(),
                rotation_id: Some(rec.journal.rotation_id.clone()),
                key_created_at: current.meta.key_created_at,
            };
            self.repair_meta(target, &meta).await;
        }
    }

    /// The crash came before Vault held the new key (as far as Vault shows now). Its value
    /// was never journaled, so that account is useless: delete it and mint again. If a
    /// publish was under way, its write may still land: fence it out first by re-publishing
    /// what Vault serves (check-and-set on the old version), so it never can.
    async fn restart_unpublished(
        &self,
        target: &Target,
        rec: &mut Record,
        current: Option<StoredKey>,
        control: &RotationControl,
    ) -> Result<Journal, EngineError> {
        let orphan = match rec.journal.new_account.clone() {
            Some(a) => Some(a),
            None => self
                .issuer
                .list_service_accounts(&target.project_id)
                .await
                .map_err(|e| Self::interrupted(rec, e))?
                .into_iter()
                .find(|a| a.name == rec.journal.new_account_name)
                .map(|a| super::ports::AccountRef {
                    id: a.id,
                    key_id: String::new(),
                }),
        };
        let version = current.as_ref().map_or(0, |c| c.version);
        if version != rec.journal.old_vault_version {
            if let Some(a) = orphan {
                self.delete_or_keep(target, rec, a, PendingReason::Unpublished)
                    .await?;
            }
            return self
                .fail(
                    rec,
                    "Vault changed under the rotation before publish; not retrying".into(),
                )
                .await;
        }
        let mut fenced_out = rec.journal.step == Step::Mint;
        if !fenced_out {
            if let Some(c) = &current {
                self.fenced(&rec.journal)?;
                match self
                    .store
                    .write_key(
                        &target.vault_path,
                        &target.vault_field,
                        &c.key,
                        &c.meta,
                        c.version,
                    )
                    .await
                {
                    Ok(v) => {
                        tracing::warn!(
                            version = v,
                            "re-published the current key to fence out an interrupted publish"
                        );
                        rec.journal.old_vault_version = v;
                        fenced_out = true;
                    }
                    // Something landed after all: the next resume looks again.
                    Err(e @ BackendError::Conflict { .. }) => {
                        return Err(Self::interrupted(rec, e))
                    }
                    Err(e) => return Err(Self::interrupted(rec, e)),
                }
            }
        }
        if let Some(a) = orphan {
            if fenced_out {
                self.delete_or_keep(target, rec, a, PendingReason::Unpublished)
                    .await?;
            } else {
                // A first publish (nothing to re-publish): the write may still land, so keep
                // the account; the deletion point deletes it once Vault provably does not
                // serve it.
                let mut p = PendingDeletion::new(
                    a,
                    PendingReason::Unpublished,
                    rec.journal.new_key_sha256.clone(),
                    &target.project_id,
                    self.now(),
                );
                p.last_error = Some("an interrupted first publish may still land".into());
                rec.journal.pending_deletions.push(p);
                return self
                    .fail(
                        rec,
                        "the first publish to this path was interrupted and its outcome is unknown; its account is kept pending".into(),
                    )
                    .await;
            }
        }
        rec.journal.new_account = None;
        rec.journal.new_key_sha256 = None;
        self.forward(target, rec, Step::Mint, None, control).await
    }

    /// Delete `account` through the deletion point; keep it pending when that does not
    /// happen.
    async fn delete_or_keep(
        &self,
        target: &Target,
        rec: &mut Record,
        account: super::ports::AccountRef,
        reason: PendingReason,
    ) -> Result<(), EngineError> {
        let sha = rec.journal.new_key_sha256.clone();
        let doomed = Doomed {
            project: &target.project_id,
            account: &account,
            key_sha256: sha.as_deref(),
            why: Why::Unpublished,
            unless_pods_carry: None,
        };
        let outcome = self
            .delete_account(Some(target), &rec.journal, doomed)
            .await?;
        if let Some(problem) = outcome.problem() {
            let mut p = PendingDeletion::new(account, reason, sha, &target.project_id, self.now());
            p.attempts = 1;
            p.last_error = Some(problem);
            rec.journal.pending_deletions.push(p);
        }
        Ok(())
    }

    /// Ready pods, over all the target's workloads, that carry `rollout_id`.
    pub(super) async fn pods_carrying(
        &self,
        target: &Target,
        rollout_id: &str,
    ) -> Result<u32, BackendError> {
        let mut n = 0;
        for w in &target.workloads {
            n += self.roller.ready_pods_with(w, rollout_id).await?;
        }
        Ok(n)
    }

    /// Retry the journal's pending deletions whose conditions allow it (only those left
    /// pending before `older_than`, when given). The caller saves.
    pub(super) async fn retry_pending(
        &self,
        target: &Target,
        rec: &mut Record,
        older_than: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), EngineError> {
        let mut remaining = Vec::new();
        let mut pending = std::mem::take(&mut rec.journal.pending_deletions).into_iter();
        while let Some(mut p) = pending.next() {
            if older_than.is_some_and(|t| p.since.is_none_or(|s| s >= t)) {
                remaining.push(p);
                continue;
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
            let project = p
                .project_id
                .clone()
                .unwrap_or_else(|| target.project_id.clone());
            let doomed = Doomed {
                project: &project,
                account: &p.account,
                key_sha256: p.key_sha256.as_deref(),
                why: Why::Pending,
                unless_pods_carry: p.unless_pods_carry.as_deref(),
            };
            match self
                .delete_account(Some(target), &rec.journal, doomed)
                .await
            {
                Ok(Deletion::Deleted) => {
                    if Some(&p.account) == rec.journal.old_account.as_ref() {
                        rec.journal.old_retired = true;
                    }
                }
                Ok(outcome) => {
                    p.attempts += 1;
                    p.last_error = outcome.problem();
                    remaining.push(p);
                }
                Err(e) => {
                    // Fenced: keep every entry for whoever resumes.
                    remaining.push(p);
                    remaining.extend(pending);
                    rec.journal.pending_deletions = remaining;
                    return Err(e);
                }
            }
        }
        rec.journal.pending_deletions = remaining;
        Ok(())
    }
}
