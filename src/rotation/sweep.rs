//! The sweep: delete managed service accounts that a crash left behind and nothing
//! references.

use super::engine::{Engine, EngineError};
use super::journal::{parse_account_name, Stored};
use crate::config::Target;
use std::collections::BTreeSet;
use std::time::Duration;

/// Result of a sweep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub deleted: Vec<String>,
    pub kept_referenced: usize,
    pub kept_young: usize,
}

impl Engine {
    /// Delete managed accounts (our name prefix) that no journal and no Vault version
    /// references, older than `min_age`.
    pub async fn sweep(
        &self,
        targets: &[Target],
        min_age: Duration,
    ) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        let projects: BTreeSet<&str> = targets.iter().map(|t| t.project_id.as_str()).collect();
        for project in projects {
            let mut referenced = BTreeSet::new();
            let mut running = BTreeSet::new();
            for t in targets.iter().filter(|t| t.project_id == project) {
                if let Some(Stored { journal: j, .. }) = self.journal(&t.name).await? {
                    referenced.extend(j.referenced_accounts().map(|a| a.id.clone()));
                    if !j.status.is_terminal() {
                        running.insert(j.new_account_name.clone());
                    }
                }
                if let Some(c) = self.store.read_key(&t.vault_path, &t.vault_field).await? {
                    referenced.extend(c.meta.account.map(|a| a.id));
                }
            }
            let now = self.now();
            for a in self.issuer.list_service_accounts(project).await? {
                if parse_account_name(&self.account_prefix(), &a.name).is_none() {
                    continue; // not ours
                }
                if referenced.contains(&a.id) || running.contains(&a.name) {
                    report.kept_referenced += 1;
                    continue;
                }
                let age = (now - a.created_at).to_std().unwrap_or_default();
                if age < min_age {
                    report.kept_young += 1;
                    continue;
                }
                self.issuer.delete_service_account(project, &a.id).await?;
                tracing::info!(account = %a.id, name = %a.name, "swept orphaned service account");
                report.deleted.push(a.id);
            }
        }
        Ok(report)
    }
}
