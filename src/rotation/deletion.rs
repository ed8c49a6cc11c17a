//! The one place a service account is deleted. Retire, revoke_first, a rollback's clean-up,
//! an unpublished or failed mint, a pending retry and the sweep all call
//! [`Engine::delete_account`], which refuses while the account's key may still be in use:
//!
//! - served by Vault at any known path, configured or named by a journal (I5). Only an
//!   explicit revoke_first emergency skips this;
//! - held by the target's synced Secret (pods restarting would mount it);
//! - used by ready pods of a rollout that carries a given rotation id.
//!
//! A check that cannot be made (a read fails) refuses: not knowing is not proof. A refused or
//! failed deletion is the caller's to keep pending; it is retried later.

use super::engine::{Engine, EngineError, RotationEvent};
use super::journal::Journal;
use super::ports::{AccountRef, BackendError};
use crate::config::Target;
use crate::retry::Retry;
use crate::sync::LockExt;

/// Why an account is deleted (the audit trail's `why`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    Retire,
    /// The emergency choice of an outage over a leaked key: Vault may still serve it.
    RevokeFirst,
    Rollback,
    Unpublished,
    FailedMint,
    Pending,
    Sweep,
}

impl Why {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Why::Retire => "retire",
            Why::RevokeFirst => "revoke_first",
            Why::Rollback => "rollback",
            Why::Unpublished => "unpublished",
            Why::FailedMint => "failed mint",
            Why::Pending => "pending deletion",
            Why::Sweep => "sweep",
        }
    }
}

/// An account to delete and what is known about its key.
pub(super) struct Doomed<'a> {
    pub(super) project: &'a str,
    pub(super) account: &'a AccountRef,
    /// Hex SHA-256 of its key, when known (compared with what Vault and Secrets hold).
    pub(super) key_sha256: Option<&'a str>,
    pub(super) why: Why,
    /// Refuse while ready pods of the target carry this rotation id.
    pub(super) unless_pods_carry: Option<&'a str>,
}

/// What became of a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Deletion {
    Deleted,
    /// The key may still be in use: not deleted.
    Refused(String),
    /// The delete call itself failed after its retries.
    Failed {
        error: String,
        attempts: u32,
    },
}

impl Deletion {
    /// The reason it did not happen, if it did not.
    pub(super) fn problem(&self) -> Option<String> {
        match self {
            Deletion::Deleted => None,
            Deletion::Refused(r) => Some(format!("not deleted: {r}")),
            Deletion::Failed { error, .. } => Some(error.clone()),
        }
    }
}

impl Engine {
    /// Delete `doomed` unless its key may still be in use (see the module doc). `target` is
    /// the target the account belongs to, when known (its Secret and pods are checked).
    pub(super) async fn delete_account(
        &self,
        target: Option<&Target>,
        journal: &Journal,
        doomed: Doomed<'_>,
    ) -> Result<Deletion, EngineError> {
        self.fenced(journal)?;
        if let Some(why) = self.in_use(target, &doomed).await {
            tracing::warn!(
                account = %doomed.account.id,
                why = doomed.why.as_str(),
                reason = %why,
                "deletion refused: the key may still be in use"
            );
            return Ok(Deletion::Refused(why));
        }
        let policy = &self.opts.delete_retry;
        let deleted = policy
            .run(
                |e: &BackendError| match e {
                    BackendError::Failed {
                        transient: false, ..
                    } => Retry::No,
                    _ => Retry::Yes,
                },
                |_| {
                    self.issuer
                        .delete_service_account(doomed.project, &doomed.account.id)
                },
            )
            .await;
        match deleted {
            Ok(()) => {
                self.observer.on_event(
                    journal,
                    &RotationEvent::AccountDeleted {
                        account_id: doomed.account.id.clone(),
                        why: doomed.why.as_str(),
                    },
                );
                Ok(Deletion::Deleted)
            }
            Err(g) => Ok(Deletion::Failed {
                error: format!("{}{}", g.error, g.suffix(policy)),
                attempts: g.attempts,
            }),
        }
    }

    /// Why the key may still be in use, or None when every check says it is not.
    async fn in_use(&self, target: Option<&Target>, d: &Doomed<'_>) -> Option<String> {
        if d.why != Why::RevokeFirst {
            if let Some(why) = self.served_by_vault(target, d).await {
                return Some(why);
            }
            if let (Some(s), Some(sha)) =
                (target.and_then(|t| t.synced_secret.as_ref()), d.key_sha256)
            {
                match self
                    .roller
                    .secret_sha256(&s.namespace, &s.name, &s.key)
                    .await
                {
                    Ok(Some(h)) if h == sha => {
                        return Some(format!(
                            "Secret {}/{} still holds its key",
                            s.namespace, s.name
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Some(format!(
                            "cannot read Secret {}/{} to prove it does not hold the key: {e}",
                            s.namespace, s.name
                        ))
                    }
                }
            }
        }
        if let (Some(t), Some(id)) = (target, d.unless_pods_carry) {
            match self.pods_carrying(t, id).await {
                Ok(0) => {}
                Ok(n) => return Some(format!("{n} ready pod(s) still run rotation {id}")),
                Err(e) => return Some(format!("cannot count the pods of rotation {id}: {e}")),
            }
        }
        None
    }

    /// I5: a path (any known one) whose current key is this account's. With the key's hash
    /// known, what Vault serves decides; without it, the metadata's account id does. The
    /// paths are read [`I5_READS_IN_FLIGHT`] at a time: every deletion reads them all, so
    /// one by one a fleet's retires cost N sequential reads each.
    async fn served_by_vault(&self, target: Option<&Target>, d: &Doomed<'_>) -> Option<String> {
        use futures::StreamExt;
        let mut paths = self.known_paths.locked().clone();
        if let Some(t) = target {
            paths.insert((t.vault_path.clone(), t.vault_field.clone()));
        }
        let mut reads = futures::stream::iter(paths)
            .map(|(path, field)| async move {
                let read = self.store.read_key(&path, &field).await;
                (path, read)
            })
            .buffer_unordered(I5_READS_IN_FLIGHT);
        while let Some((path, read)) = reads.next().await {
            match read {
                Ok(Some(c)) => {
                    let served = match d.key_sha256 {
                        Some(sha) => c.key.sha256_hex() == sha,
                        None => c
                            .meta
                            .account
                            .as_ref()
                            .is_some_and(|a| a.id == d.account.id),
                    };
                    if served {
                        return Some(format!("Vault serves its key at {path}"));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return Some(format!(
                        "cannot read {path} to prove Vault does not serve its key: {e}"
                    ))
                }
            }
        }
        None
    }
}

/// Vault reads of the I5 check in flight at once (per deletion).
const I5_READS_IN_FLIGHT: usize = 16;
