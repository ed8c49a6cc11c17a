//! What the journals and Vault prove is ours, for the inventory: the same evidence the
//! sweep uses (journals of every target under the state prefix, current and history, and
//! the Vault paths they and the configuration name), gathered once. A name alone proves
//! nothing: a minted name counts only in the project of the journal that minted it.

use super::engine::{Engine, EngineError};
use super::journal::Journal;
use super::ports::{BackendError, ProjectKey};
use crate::config::Target;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};

/// The target that proves an account (or key) ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub target: String,
    /// Project of that target, when known (configuration or the journal's copy).
    pub project: Option<String>,
}

/// A key Vault serves as current at a target's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub target: String,
    pub account_id: Option<String>,
    pub key_id: Option<String>,
}

/// Everything the journals and Vault say about ownership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Service-account ids a journal names (old, new or pending deletion).
    pub accounts: BTreeMap<String, Owned>,
    /// Key ids a journal names.
    pub keys: BTreeMap<String, Owned>,
    /// Deterministic names of the accounts journals minted (found by name after a crash).
    pub names: BTreeMap<String, Owned>,
    /// Accounts a current journal still has to delete.
    pub pending: BTreeSet<String>,
    /// The current key at each known target path.
    pub served: Vec<Served>,
    /// Paths that could not be read (`target: error`): what they serve is unknown.
    pub problems: Vec<String>,
}

impl Ownership {
    /// The target that proves `account_id` (named `name`, in `project`) ours, if any.
    pub fn owner_of(&self, project: &str, account_id: &str, name: &str) -> Option<&Owned> {
        let in_project = |o: &&Owned| o.project.as_deref().is_none_or(|p| p == project);
        self.accounts
            .get(account_id)
            .filter(in_project)
            .or_else(|| self.names.get(name).filter(in_project))
    }
}

impl Engine {
    /// Gather [`Ownership`] from every journal and the Vault paths of `targets` and of the
    /// journals' copies of theirs.
    pub async fn ownership(&self, targets: &[Target]) -> Result<Ownership, EngineError> {
        self.know_targets(targets);
        let current: Vec<Journal> = self
            .journals()
            .await?
            .into_iter()
            .map(|s| s.journal)
            .collect();
        let histories = self.histories().await?;
        let configured: BTreeMap<&str, &Target> =
            targets.iter().map(|t| (t.name.as_str(), t)).collect();
        let project_of = |j: &Journal| -> Option<String> {
            configured
                .get(j.target.as_str())
                .map(|t| t.project_id.clone())
                .or_else(|| j.spec.as_ref().map(|t| t.project_id.clone()))
        };
        let mut own = Ownership::default();
        for j in histories.iter().chain(current.iter()) {
            let owned = Owned {
                target: j.target.clone(),
                project: project_of(j),
            };
            for a in j.referenced_accounts() {
                own.accounts.insert(a.id.clone(), owned.clone());
                if !a.key_id.is_empty() {
                    own.keys.insert(a.key_id.clone(), owned.clone());
                }
            }
            own.names.insert(j.new_account_name.clone(), owned);
        }
        for j in &current {
            own.pending
                .extend(j.pending_deletions.iter().map(|p| p.account.id.clone()));
        }
        // Each target path once: the configuration's, else the journal's copy.
        let mut paths: BTreeMap<String, (String, String)> = BTreeMap::new();
        for j in current.iter().chain(histories.iter()) {
            if let Some(t) = &j.spec {
                paths.insert(
                    t.name.clone(),
                    (t.vault_path.clone(), t.vault_field.clone()),
                );
            }
        }
        for t in targets {
            paths.insert(
                t.name.clone(),
                (t.vault_path.clone(), t.vault_field.clone()),
            );
        }
        for (target, (path, field)) in paths {
            match self.store.read_key_meta(&path, &field).await {
                Ok(Some(info)) => {
                    let account = info.meta.account.as_ref();
                    let owned = Owned {
                        target: target.clone(),
                        project: configured
                            .get(target.as_str())
                            .map(|t| t.project_id.clone()),
                    };
                    if let Some(a) = account {
                        own.accounts.entry(a.id.clone()).or_insert(owned.clone());
                        if !a.key_id.is_empty() {
                            own.keys.entry(a.key_id.clone()).or_insert(owned);
                        }
                    }
                    own.served.push(Served {
                        target,
                        account_id: account.map(|a| a.id.clone()),
                        key_id: account.map(|a| a.key_id.clone()),
                    });
                }
                Ok(None) => {}
                Err(e) => own.problems.push(format!("{target}: {e}")),
            }
        }
        Ok(own)
    }

    /// Every API key of `project` (through the issuer's retried, paced path).
    pub async fn project_keys(&self, project: &str) -> Result<Vec<ProjectKey>, BackendError> {
        self.issuer.list_project_keys(project).await
    }

    /// The engine's clock (the inventory's "now").
    pub fn clock_now(&self) -> DateTime<Utc> {
        self.now()
    }
}
