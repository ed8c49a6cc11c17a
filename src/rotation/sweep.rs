//! The sweep: delete service accounts a crash left behind. An account is ours only when a
//! journal under the state prefix (of any target, configured or not, current or history)
//! names it as the account that rotation minted; a name that merely looks like ours proves
//! nothing (another installation may use a prefix that parses the same). Even then it goes
//! only when nothing references it and the deletion point finds its key unused (I5).

use super::deletion::{Deletion, Doomed, Why};
use super::engine::{Engine, EngineError};
use super::journal::Journal;
use super::ports::AccountRef;
use crate::config::Target;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Result of a sweep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub deleted: Vec<String>,
    /// Referenced by an unfinished rotation or a pending deletion (handled there).
    pub kept_referenced: usize,
    pub kept_young: usize,
    /// Vault, a synced Secret or ready pods still use the key.
    pub kept_in_use: usize,
    /// Named like ours, but no journal names them: left alone.
    pub kept_unproven: usize,
    /// Targets with a journal under the state prefix that the configuration does not list:
    /// their accounts are never swept while Vault serves them; reported so someone decides.
    pub unconfigured_targets: Vec<String>,
    /// Deletions that failed (the next sweep tries again).
    pub failed: Vec<String>,
}

impl Engine {
    /// Delete orphaned accounts of ours older than `min_age`; `targets` is the configuration.
    pub async fn sweep(
        &self,
        targets: &[Target],
        min_age: Duration,
    ) -> Result<SweepReport, EngineError> {
        self.know_targets(targets);
        let mut report = SweepReport::default();
        let current: Vec<Journal> = self
            .journals()
            .await?
            .into_iter()
            .map(|s| s.journal)
            .collect();
        let histories = self.histories().await?;
        let configured: BTreeMap<&str, &Target> =
            targets.iter().map(|t| (t.name.as_str(), t)).collect();
        let target_of = |j: &Journal| -> Option<Target> {
            j.spec
                .clone()
                .or_else(|| configured.get(j.target.as_str()).map(|t| (*t).clone()))
        };
        let mut referenced = BTreeSet::new();
        for j in &current {
            if !configured.contains_key(j.target.as_str()) {
                report.unconfigured_targets.push(j.target.clone());
            }
            if !j.status.is_terminal() {
                referenced.extend(j.referenced_accounts().map(|a| a.id.clone()));
            }
            referenced.extend(j.pending_deletions.iter().map(|p| p.account.id.clone()));
        }
        // The account each rotation minted, by its deterministic name.
        let mut minted: BTreeMap<&str, &Journal> = BTreeMap::new();
        for j in histories.iter().chain(current.iter()) {
            minted.insert(j.new_account_name.as_str(), j);
        }
        let mut projects: BTreeSet<String> = targets.iter().map(|t| t.project_id.clone()).collect();
        projects.extend(
            current
                .iter()
                .chain(histories.iter())
                .filter_map(|j| j.spec.as_ref().map(|t| t.project_id.clone())),
        );
        let now = self.now();
        for project in projects {
            for a in self.issuer.list_service_accounts(&project).await? {
                let Some(j) = minted.get(a.name.as_str()).copied() else {
                    if self.named_like_ours(&a.name) {
                        report.kept_unproven += 1;
                    }
                    continue;
                };
                let target = target_of(j);
                if target.as_ref().is_some_and(|t| t.project_id != project) {
                    continue;
                }
                if referenced.contains(&a.id) {
                    report.kept_referenced += 1;
                    continue;
                }
                let age = (now - a.created_at).to_std().unwrap_or_default();
                if age < min_age {
                    report.kept_young += 1;
                    continue;
                }
                let account = AccountRef {
                    id: a.id.clone(),
                    key_id: String::new(),
                };
                let sha = j
                    .new_account
                    .as_ref()
                    .filter(|n| n.id == a.id)
                    .and(j.new_key_sha256.as_deref());
                let doomed = Doomed {
                    project: &project,
                    account: &account,
                    key_sha256: sha,
                    why: Why::Sweep,
                    unless_pods_carry: None,
                };
                match self.delete_account(target.as_ref(), j, doomed).await? {
                    Deletion::Deleted => {
                        tracing::info!(account = %a.id, name = %a.name, "swept orphaned service account");
                        report.deleted.push(a.id);
                    }
                    Deletion::Refused(_) => report.kept_in_use += 1,
                    Deletion::Failed { .. } => report.failed.push(a.id),
                }
            }
        }
        report.unconfigured_targets.sort();
        report.unconfigured_targets.dedup();
        Ok(report)
    }
}
