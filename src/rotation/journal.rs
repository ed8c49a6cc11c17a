//! The rotation journal: one JSON document per target in Vault (CAS-written), holding ids,
//! versions and hashes only (never a key value), written before and after every step so a
//! restarted or failed-over daemon knows exactly where a rotation stood.

use super::ports::AccountRef;
use super::request::RotationRequest;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The rotation steps, in order, plus the rollback pseudo-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Mint,
    Publish,
    Sync,
    Roll,
    Verify,
    Drain,
    Retire,
    Rollback,
}

impl Step {
    pub const ALL: [Step; 8] = [
        Step::Mint,
        Step::Publish,
        Step::Sync,
        Step::Roll,
        Step::Verify,
        Step::Drain,
        Step::Retire,
        Step::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Mint => "mint",
            Step::Publish => "publish",
            Step::Sync => "sync",
            Step::Roll => "roll",
            Step::Verify => "verify",
            Step::Drain => "drain",
            Step::Retire => "retire",
            Step::Rollback => "rollback",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a rotation (a bounded set: also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    MaxAge,
    Signal,
    Api,
    Cli,
    /// The usage-anomaly detector (`[targets.anomaly]` with `action = "rotate"`).
    UsageAnomaly,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::MaxAge => "max_age",
            Trigger::Signal => "signal",
            Trigger::Api => "api",
            Trigger::Cli => "cli",
            Trigger::UsageAnomaly => "usage_anomaly",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    RollingBack,
    Completed,
    RolledBack,
    Failed,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::RolledBack | Status::Failed
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::RollingBack => "rolling_back",
            Status::Completed => "completed",
            Status::RolledBack => "rolled_back",
            Status::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Done,
}

/// One step's record, for the API and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// "ok", "skipped", or the error.
    pub outcome: Option<String>,
}

/// Why an account waits for deletion (a bounded set: also a metric label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingReason {
    /// The old account of a completed rotation.
    #[default]
    Retire,
    /// The old account of an emergency rotation: a possibly leaked key, retried until gone.
    Leaked,
    /// The new account of a rotation that rolled back.
    Rollback,
    /// A minted account whose key never reached Vault.
    Unpublished,
    /// Kept by the drain's `on_timeout = "keep"` until its key is quiet.
    DrainKeep,
}

impl PendingReason {
    pub const ALL: [PendingReason; 5] = [
        PendingReason::Retire,
        PendingReason::Leaked,
        PendingReason::Rollback,
        PendingReason::Unpublished,
        PendingReason::DrainKeep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PendingReason::Retire => "retire",
            PendingReason::Leaked => "leaked",
            PendingReason::Rollback => "rollback",
            PendingReason::Unpublished => "unpublished",
            PendingReason::DrainKeep => "drain_keep",
        }
    }
}

/// Progress of one wave of a staged rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveProgress {
    pub rolled_at: Option<DateTime<Utc>>,
    pub verified_at: Option<DateTime<Utc>>,
}

/// An account the daemon still has to delete, with the conditions the deletion waits for.
/// Carried from one rotation's journal to the next until it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDeletion {
    pub account: AccountRef,
    /// Delete only once no ready pod carries this rollout id (so none still uses the
    /// account's key).
    pub unless_pods_carry: Option<String>,
    /// Delete only once the key has had no usage for this many milliseconds (an account kept by
    /// the drain's `on_timeout = "keep"`).
    #[serde(default)]
    pub once_quiet_for_ms: Option<u64>,
    pub attempts: u32,
    pub last_error: Option<String>,
    #[serde(default)]
    pub reason: PendingReason,
    /// Hex SHA-256 of the account's key, when known: the deletion point refuses while Vault
    /// or a synced Secret still holds it.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Project of the account (the target's project when the deletion was left pending).
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
}

impl PendingDeletion {
    pub fn new(
        account: AccountRef,
        reason: PendingReason,
        key_sha256: Option<String>,
        project_id: &str,
        since: DateTime<Utc>,
    ) -> PendingDeletion {
        PendingDeletion {
            account,
            unless_pods_carry: None,
            once_quiet_for_ms: None,
            attempts: 0,
            last_error: None,
            reason,
            key_sha256,
            project_id: Some(project_id.to_string()),
            since: Some(since),
        }
    }
}

/// The journal document of one target's current (or last) rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub rotation_id: String,
    pub target: String,
    pub trigger: Trigger,
    pub actor: String,
    pub reason: String,
    pub emergency: bool,
    pub revoke_first: bool,
    pub status: Status,
    pub step: Step,
    pub step_state: StepState,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Deterministic name of the new service account (found by name after a crash).
    pub new_account_name: String,
    /// The account whose key was current when the rotation started (unknown if Vault's
    /// metadata did not name it).
    pub old_account: Option<AccountRef>,
    /// Vault version current at the start (0 = the path did not exist).
    pub old_vault_version: u64,
    /// Metadata of the old key, restored with it by a rollback.
    pub old_rotation_id: Option<String>,
    pub old_key_created_at: Option<DateTime<Utc>>,
    pub new_account: Option<AccountRef>,
    pub new_key_sha256: Option<String>,
    pub new_vault_version: Option<u64>,
    /// Vault version written by a rollback (the old key, published again).
    pub rollback_vault_version: Option<u64>,
    /// The old account was deleted (by retire, or first with `revoke_first`).
    pub old_retired: bool,
    /// Requests the Usage API counted for the new key when adoption was proven (so a
    /// resumed drain does not wait for it again).
    #[serde(default)]
    pub new_key_adopted: Option<u64>,
    /// Per wave of a staged target (empty otherwise): when it was rolled (recorded before
    /// its patches, so a crash after one is still "moved") and verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveProgress>,
    /// The id the workloads were rolled with, when not this rotation's own: a coalesced
    /// roll shared with other rotations (recorded before the patches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    pub pending_deletions: Vec<PendingDeletion>,
    pub steps: Vec<StepRecord>,
    pub error: Option<String>,
    /// The target as configured when the rotation started: the rotation runs to its end
    /// (resume, rollback) with it, even if the target is changed or removed meanwhile.
    #[serde(default)]
    pub spec: Option<crate::config::Target>,
    /// Hex SHA-256 of the key Vault served when the rotation started.
    #[serde(default)]
    pub old_key_sha256: Option<String>,
    /// Failed rotations of this target in a row before this one ended (the scheduler's
    /// back-off survives restarts).
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// An emergency rotation's report on the old key (usage, audit-log events), written
    /// when it concludes; ids and counts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forensics: Option<crate::forensics::ForensicsReport>,
}

/// A journal and the Vault version it was read or written at (for check-and-set).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub version: u64,
    pub journal: Journal,
}

impl Journal {
    /// What the workloads' pod templates carry for this rotation: the coalesced roll's id,
    /// else the rotation id.
    pub fn rollout_id(&self) -> &str {
        self.rollout_id.as_deref().unwrap_or(&self.rotation_id)
    }

    /// The journal of a requested rotation, before anything is known of the old key or the
    /// new one: what the live view shows while it waits for a slot, and what the engine
    /// starts from.
    pub fn queued(request: &RotationRequest, account_prefix: &str) -> Journal {
        let now = request.requested_at;
        Journal {
            rotation_id: request.rotation_id.clone(),
            target: request.target.clone(),
            trigger: request.trigger,
            actor: request.actor.clone(),
            reason: request.reason.clone(),
            emergency: request.emergency,
            revoke_first: request.revoke_first,
            status: Status::Running,
            step: Step::Mint,
            step_state: StepState::Started,
            started_at: now,
            updated_at: now,
            new_account_name: account_name(account_prefix, &request.target, &request.rotation_id),
            old_account: None,
            old_vault_version: 0,
            old_rotation_id: None,
            old_key_created_at: None,
            new_account: None,
            new_key_sha256: None,
            new_vault_version: None,
            rollback_vault_version: None,
            old_retired: false,
            new_key_adopted: None,
            waves: Vec::new(),
            rollout_id: None,
            pending_deletions: Vec::new(),
            steps: Vec::new(),
            error: None,
            spec: None,
            old_key_sha256: None,
            consecutive_failures: 0,
            last_failure_at: None,
            forensics: None,
        }
    }

    /// Mark `step` started (journal it before doing anything).
    pub fn begin(&mut self, step: Step, now: DateTime<Utc>) {
        self.step = step;
        self.step_state = StepState::Started;
        self.updated_at = now;
        self.steps.push(StepRecord {
            step,
            started_at: now,
            finished_at: None,
            outcome: None,
        });
    }

    /// Mark the current step done with `outcome` ("ok", "skipped" or an error).
    pub fn finish(&mut self, outcome: impl Into<String>, now: DateTime<Utc>) {
        self.step_state = StepState::Done;
        self.updated_at = now;
        if let Some(r) = self
            .steps
            .iter_mut()
            .rev()
            .find(|r| r.step == self.step && r.finished_at.is_none())
        {
            r.finished_at = Some(now);
            r.outcome = Some(outcome.into());
        }
    }

    /// When `step` first started in this rotation (a resumed step keeps its first start).
    pub fn step_first_started_at(&self, step: Step) -> Option<DateTime<Utc>> {
        self.steps
            .iter()
            .find(|r| r.step == step)
            .map(|r| r.started_at)
    }

    /// When the current step's latest attempt was journaled as started.
    pub fn last_step_started_at(&self) -> Option<DateTime<Utc>> {
        self.steps
            .iter()
            .rev()
            .find(|r| r.step == self.step)
            .map(|r| r.started_at)
    }

    /// Accounts this journal refers to (the sweep never deletes them).
    pub fn referenced_accounts(&self) -> impl Iterator<Item = &AccountRef> {
        self.old_account
            .iter()
            .chain(self.new_account.iter())
            .chain(self.pending_deletions.iter().map(|p| &p.account))
    }
}

/// Rotation ids: UTC time to the second plus randomness, so two rotations started in the
/// same second (or by two replicas) never share an id, and ids sort by time.
pub fn new_rotation_id(now: DateTime<Utc>) -> String {
    let suffix = crate::rng::range_u64(0..=0xff_ffff);
    format!("{}-{suffix:06x}", now.format("%Y%m%d%H%M%S"))
}

/// `true` for ids made by [`new_rotation_id`].
pub fn is_rotation_id(s: &str) -> bool {
    let Some((time, rand)) = s.split_once('-') else {
        return false;
    };
    time.len() == 14
        && time.bytes().all(|b| b.is_ascii_digit())
        && rand.len() == 6
        && rand
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `<prefix>-<target>-<rotation-id>`: the deterministic service account name.
pub fn account_name(prefix: &str, target: &str, rotation_id: &str) -> String {
    format!("{prefix}-{target}-{rotation_id}")
}

/// The target and rotation id of a managed account name, if it is one.
pub fn parse_account_name<'a>(prefix: &str, name: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    // The id is the last 21 characters: 14 digits, '-', 6 hex.
    if rest.len() < 23 {
        return None;
    }
    let (target, id) = rest.split_at(rest.len() - 21);
    let target = target.strip_suffix('-')?;
    (is_rotation_id(id) && !target.is_empty()).then_some((target, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_parse_back_from_names() {
        let now = Utc::now();
        let a = new_rotation_id(now);
        let b = new_rotation_id(now);
        assert_ne!(a, b);
        assert!(is_rotation_id(&a), "{a}");
        let name = account_name("okr", "chat-bot", &a);
        assert_eq!(
            parse_account_name("okr", &name),
            Some(("chat-bot", a.as_str()))
        );
        assert_eq!(parse_account_name("okr", "okr-chat-bot"), None);
        assert_eq!(
            parse_account_name("okr", "other-chat-20261123215000-abcdef"),
            None
        );
        assert_eq!(
            parse_account_name("okr", "okrx-chat-20261123215000-abcdef"),
            None
        );
        assert_eq!(
            parse_account_name("okr", "okr-chat-20261123215000-ABCDEF"),
            None
        );
    }
}
