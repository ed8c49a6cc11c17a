//! Reconciliation with OpenAI's audit log: after each rotation and every
//! `[daemon.reconcile] interval`, read the project's `service_account.*` / `api_key.*`
//! events over the last `lookback` and compare them, and the project's accounts, with
//! what our journals say (ownership is proven by the journals under `state_prefix`, as for
//! the sweep). Mismatches raise `audit_mismatches_total{target,kind}` and an
//! `audit_mismatch` audit record, once per event or account per process.
//!
//! Audit logging may be off in the organization (the list answers 403): that is said once
//! (log line, `audit_log_available{target} 0`) and the checks that need no audit log (an
//! account we deleted still exists, an account named like ours that no journal names) go on.
//!
//! Metric labels are configured target names, never project or account ids: a mismatch
//! counts for the target whose journal names the account (or whose name it carries), else
//! for the first configured target of its project.

use crate::audit::{Audit, AuditEvent, AuditFields};
use crate::forensics::{AuditQuery, GovernanceSource, SourceError};
use crate::openai::OpenAiClient;
use crate::rotation::journal::{parse_account_name, Journal};
use crate::rotation::ports::{AccountInfo, BackendError, KeyIssuer};
use crate::rotation::{Engine, EngineError, Observer, RotationEvent};
use crate::sync::LockExt;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The event types read.
pub const EVENT_TYPES: &[&str] = &[
    "service_account.created",
    "service_account.updated",
    "service_account.deleted",
    "api_key.created",
    "api_key.updated",
    "api_key.deleted",
];

/// Events read per project and pass at most.
const MAX_EVENTS: usize = 1000;
/// Mismatches remembered (so each is reported once); the oldest are forgotten beyond it.
const MAX_SEEN: usize = 10_000;

/// What does not match (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MismatchKind {
    /// A managed account (or its key) created by an actor that is not our admin key.
    CreatedByOther,
    /// A managed account (or its key) deleted by an actor that is not our admin key.
    DeletedByOther,
    /// A managed account (or its key) changed by an actor that is not our admin key.
    ModifiedByOther,
    /// An account our journals say was deleted still exists.
    DeletedStillExists,
    /// An account named like ours (`<prefix>-<target>-<rotation id>`) that no journal names.
    UnknownManagedAccount,
}

impl MismatchKind {
    pub const ALL: [MismatchKind; 5] = [
        MismatchKind::CreatedByOther,
        MismatchKind::DeletedByOther,
        MismatchKind::ModifiedByOther,
        MismatchKind::DeletedStillExists,
        MismatchKind::UnknownManagedAccount,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::CreatedByOther => "created_by_other",
            MismatchKind::DeletedByOther => "deleted_by_other",
            MismatchKind::ModifiedByOther => "modified_by_other",
            MismatchKind::DeletedStillExists => "deleted_still_exists",
            MismatchKind::UnknownManagedAccount => "unknown_managed_account",
        }
    }
}

/// One mismatch: ids only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub project: String,
    /// The configured target it counts for (the metric label).
    pub target: String,
    pub kind: MismatchKind,
    /// The service account concerned.
    pub account_id: String,
    /// The audit-log event, for event mismatches.
    pub event_id: Option<String>,
    pub detail: String,
}

/// What one pass over a project found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectReport {
    /// False when the organization's audit logging is off.
    pub audit_log_available: bool,
    pub events_read: usize,
    /// Every mismatch found this pass (new or already reported).
    pub mismatches: Vec<Mismatch>,
}

/// What reconciliation reads besides the audit log.
#[async_trait]
pub trait ReconcileSource: GovernanceSource {
    async fn accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError>;
    /// Ids of the admin key(s) this daemon acts with (audit actors that are us).
    async fn our_admin_key_ids(&self) -> Result<Vec<String>, BackendError>;
}

#[async_trait]
impl ReconcileSource for OpenAiClient {
    async fn accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError> {
        self.list_service_accounts(project).await
    }

    /// The listed admin keys whose redacted value fits the key the client sends now.
    async fn our_admin_key_ids(&self) -> Result<Vec<String>, BackendError> {
        use crate::admin_key::AdminKeyApi;
        let key = self.current_admin_key();
        let keys = self
            .list_admin_keys()
            .await
            .map_err(|e| BackendError::Failed {
                backend: crate::rotation::ports::Backend::OpenAi,
                message: e.to_string(),
                transient: true,
            })?;
        Ok(keys
            .into_iter()
            .filter(|k| crate::admin_key::fits_redacted(&key, k.redacted_value.as_deref()))
            .map(|k| k.id)
            .collect())
    }
}

/// What the journals prove about one project's accounts.
#[derive(Debug, Default)]
struct Ours {
    /// Account id → the rotation whose journal names it, and its target.
    accounts: BTreeMap<String, (String, String)>,
    /// Key id → account id.
    keys: BTreeMap<String, String>,
    /// Accounts a journal says were deleted (an old account retired).
    deleted: BTreeSet<String>,
    /// Deterministic names of the accounts rotations minted (or were about to).
    names: BTreeSet<String>,
}

fn ours(journals: &[Journal], project: &str) -> Ours {
    let mut o = Ours::default();
    for j in journals {
        let in_project = j.spec.as_ref().is_none_or(|t| t.project_id == project);
        if !in_project {
            continue;
        }
        o.names.insert(j.new_account_name.clone());
        for a in j.referenced_accounts() {
            o.accounts
                .insert(a.id.clone(), (j.rotation_id.clone(), j.target.clone()));
            o.keys.insert(a.key_id.clone(), a.id.clone());
        }
        if j.old_retired {
            if let Some(a) = &j.old_account {
                o.deleted.insert(a.id.clone());
            }
        }
    }
    // An account deleted by one rotation may be the old account of none later: still
    // deleted. One a later journal names as current (a rollback restored it) is not.
    o
}

/// Compare one project's events and accounts with the journals. Pure: no I/O.
pub fn compare(
    project: &str,
    targets: &[String],
    journals: &[Journal],
    events: &[crate::forensics::AuditLogEvent],
    accounts: &[AccountInfo],
    our_key_ids: &[String],
    account_prefix: &str,
) -> Vec<Mismatch> {
    let o = ours(journals, project);
    let first = targets.first().cloned().unwrap_or_default();
    // The label for a target name: itself when configured, else the project's first.
    let label = |t: &str| {
        if targets.iter().any(|c| c == t) {
            t.to_string()
        } else {
            first.clone()
        }
    };
    let target_of = |account: &str| label(o.accounts.get(account).map_or("", |(_, t)| t));
    let mut out = Vec::new();
    for e in events {
        let Some(r) = e.resource_id.as_deref() else {
            continue;
        };
        let Some(account) = o
            .accounts
            .get_key_value(r)
            .map(|(a, _)| a.clone())
            .or_else(|| o.keys.get(r).cloned())
        else {
            continue;
        };
        let by_us = e
            .actor_key_id
            .as_ref()
            .is_some_and(|k| our_key_ids.contains(k));
        if by_us {
            continue;
        }
        let kind = match e.event_type.as_str() {
            t if t.ends_with(".created") => MismatchKind::CreatedByOther,
            t if t.ends_with(".deleted") => MismatchKind::DeletedByOther,
            _ => MismatchKind::ModifiedByOther,
        };
        // The first rotation's old account was made by a person (the seed): its creation
        // is no mismatch; one a journal names as minted by us is.
        if kind == MismatchKind::CreatedByOther
            && !journals
                .iter()
                .any(|j| j.new_account.as_ref().is_some_and(|a| a.id == account))
        {
            continue;
        }
        out.push(Mismatch {
            project: project.to_string(),
            target: target_of(&account),
            kind,
            account_id: account,
            event_id: Some(e.id.clone()),
            detail: format!("{} {} by {}", e.event_type, e.id, e.actor),
        });
    }
    let live: BTreeSet<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
    for id in &o.deleted {
        if live.contains(id.as_str()) {
            out.push(Mismatch {
                project: project.to_string(),
                target: target_of(id),
                kind: MismatchKind::DeletedStillExists,
                account_id: id.clone(),
                event_id: None,
                detail: format!(
                    "service account {id} was deleted by rotation {} but still exists",
                    o.accounts.get(id).map_or("?", |(r, _)| r.as_str())
                ),
            });
        }
    }
    for a in accounts {
        let Some((named, _)) = parse_account_name(account_prefix, &a.name) else {
            continue;
        };
        if !o.names.contains(&a.name) && !o.accounts.contains_key(&a.id) {
            out.push(Mismatch {
                project: project.to_string(),
                target: label(named),
                kind: MismatchKind::UnknownManagedAccount,
                account_id: a.id.clone(),
                event_id: None,
                detail: format!(
                    "service account {} ({}) is named like ours but no journal names it",
                    a.id, a.name
                ),
            });
        }
    }
    out
}

/// `audit_mismatches_total{target,kind}` and `audit_log_available{target}`.
#[derive(Clone)]
pub struct ReconcileMetrics {
    mismatches: IntCounterVec,
    available: IntGaugeVec,
}

impl ReconcileMetrics {
    /// Registered in `registry`, the series of `targets` pre-created.
    pub fn register(registry: &Registry, targets: &[String]) -> prometheus::Result<Self> {
        let mismatches = IntCounterVec::new(
            Opts::new(
                "openai_key_rotator_audit_mismatches_total",
                "Differences between OpenAI's audit log (or accounts) and our journals, by target (of the account's project) and kind.",
            ),
            &["target", "kind"],
        )?;
        let available = IntGaugeVec::new(
            Opts::new(
                "openai_key_rotator_audit_log_available",
                "1 when the organization's audit log could be read for the target's project, 0 when audit logging is off.",
            ),
            &["target"],
        )?;
        registry.register(Box::new(mismatches.clone()))?;
        registry.register(Box::new(available.clone()))?;
        for p in targets {
            for k in MismatchKind::ALL {
                mismatches.with_label_values(&[p.as_str(), k.as_str()]);
            }
            available.with_label_values(&[p.as_str()]).set(1);
        }
        Ok(ReconcileMetrics {
            mismatches,
            available,
        })
    }
}

/// Runs reconciliation passes; remembers what it reported.
pub struct Reconciler {
    pub source: Arc<dyn ReconcileSource>,
    pub engine: Arc<Engine>,
    pub audit: Option<Audit>,
    pub metrics: Option<ReconcileMetrics>,
    pub lookback: Duration,
    pub account_prefix: String,
    /// The admin-key rotation journal (store, path): its old and new key ids act for us
    /// too (events made before the admin key was rotated).
    pub admin_journal: Option<(Arc<dyn crate::rotation::ports::SecretStore>, String)>,
    /// Mismatches already reported (event id or kind/account).
    seen: Mutex<BTreeSet<String>>,
    /// Projects whose audit logging was found off (said once).
    off: Mutex<BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the journals: {0}")]
    Journals(#[from] EngineError),
    #[error("project {project}: {source}")]
    Accounts {
        project: String,
        source: BackendError,
    },
    #[error("project {project}: reading the audit log: {class}")]
    AuditLog { project: String, class: SourceError },
    #[error("identifying our admin key: {0}")]
    AdminKey(BackendError),
}

impl Reconciler {
    pub fn new(
        source: Arc<dyn ReconcileSource>,
        engine: Arc<Engine>,
        lookback: Duration,
        account_prefix: &str,
    ) -> Reconciler {
        Reconciler {
            source,
            engine,
            audit: None,
            metrics: None,
            lookback,
            account_prefix: account_prefix.to_string(),
            admin_journal: None,
            seen: Mutex::default(),
            off: Mutex::default(),
        }
    }

    /// One pass over `project` (of the configured `targets`) at `now`. New mismatches are
    /// counted and audited.
    pub async fn reconcile(
        &self,
        project: &str,
        targets: &[String],
        now: DateTime<Utc>,
    ) -> Result<ProjectReport, ReconcileError> {
        let journals = self.engine.all_journals().await?;
        let accounts =
            self.source
                .accounts(project)
                .await
                .map_err(|source| ReconcileError::Accounts {
                    project: project.to_string(),
                    source,
                })?;
        let since = now - chrono::Duration::from_std(self.lookback).unwrap_or_default();
        let query = AuditQuery {
            project_ids: vec![project.to_string()],
            event_types: EVENT_TYPES.iter().map(|t| t.to_string()).collect(),
            since: Some(since),
            max_events: MAX_EVENTS,
            ..AuditQuery::default()
        };
        let (events, available) = match self.source.audit_events(&query).await {
            Ok(e) => (e.events, true),
            Err(SourceError::AuditLoggingOff) => (Vec::new(), false),
            Err(class) => {
                return Err(ReconcileError::AuditLog {
                    project: project.to_string(),
                    class,
                })
            }
        };
        self.audit_log_state(project, targets, available);
        let mut events = events;
        let mut our_ids = Vec::new();
        if !events.is_empty() {
            match self.source.our_admin_key_ids().await {
                Ok(ids) => our_ids = ids,
                // Without our own id every event would look foreign: skip the event checks
                // this pass rather than raise false mismatches; the account checks go on.
                Err(e) => {
                    tracing::warn!(project, error = %e, "cannot tell which admin key is ours (listing admin keys failed); audit-log events not compared this pass");
                    events.clear();
                }
            }
        }
        if let Some((store, path)) = &self.admin_journal {
            let doc = store
                .read_doc(path)
                .await
                .map_err(ReconcileError::AdminKey)?;
            if let Some(j) = doc.and_then(|(_, d)| {
                serde_json::from_value::<crate::admin_key::AdminKeyJournal>(d).ok()
            }) {
                our_ids.push(j.old_key_id);
                our_ids.extend(j.new_key_id);
            }
        }
        let mismatches = compare(
            project,
            targets,
            &journals,
            &events,
            &accounts,
            &our_ids,
            &self.account_prefix,
        );
        for m in &mismatches {
            self.report(m);
        }
        Ok(ProjectReport {
            audit_log_available: available,
            events_read: events.len(),
            mismatches,
        })
    }

    /// Say once when audit logging goes off (and when it is back).
    fn audit_log_state(&self, project: &str, targets: &[String], available: bool) {
        if let Some(m) = &self.metrics {
            for t in targets {
                m.available
                    .with_label_values(&[t.as_str()])
                    .set(i64::from(available));
            }
        }
        let mut off = self.off.locked();
        if !available && off.insert(project.to_string()) {
            tracing::warn!(project, "audit logging is off in the OpenAI organization: reconciliation checks accounts only until it is on");
        } else if available && off.remove(project) {
            tracing::info!(
                project,
                "audit logging is on again: reconciliation reads the audit log"
            );
        }
    }

    fn report(&self, m: &Mismatch) {
        let key = match &m.event_id {
            Some(e) => e.clone(),
            None => format!("{}/{}", m.kind.as_str(), m.account_id),
        };
        {
            let mut seen = self.seen.locked();
            if !seen.insert(key) {
                return;
            }
            while seen.len() > MAX_SEEN {
                let first = seen.iter().next().cloned();
                if let Some(f) = first {
                    seen.remove(&f);
                }
            }
        }
        tracing::warn!(project = %m.project, kind = m.kind.as_str(), account_id = %m.account_id, detail = %m.detail, "OpenAI audit log does not match our journals");
        if let Some(metrics) = &self.metrics {
            metrics
                .mismatches
                .with_label_values(&[m.target.as_str(), m.kind.as_str()])
                .inc();
        }
        if let Some(a) = &self.audit {
            let f = AuditFields {
                target: Some(m.target.clone()),
                outcome: Some(m.kind.as_str().into()),
                service_account_id: Some(m.account_id.clone()),
                message: Some(format!("project {}: {}", m.project, m.detail)),
                ..AuditFields::new(AuditEvent::AuditMismatch)
            };
            if let Err(e) = a.record(f) {
                tracing::error!(error = %e, "could not write an audit record");
            }
        }
    }

    /// Every `interval`, and when `wake` is notified (a rotation finished), reconcile every
    /// project of `projects()` with its targets (the leader only) until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        projects: impl Fn() -> Vec<(String, Vec<String>)> + Send + Sync + 'static,
        is_leader: impl Fn() -> bool + Send + Sync + 'static,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        loop {
            if is_leader() {
                for (p, targets) in projects() {
                    if let Err(e) = self.reconcile(&p, &targets, Utc::now()).await {
                        tracing::warn!(error = %e, "reconciliation pass failed; retrying at the next one");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
            }
        }
    }
}

/// Wakes the reconciler when a rotation ends.
pub struct WakeOnFinish(pub Arc<Notify>);

impl Observer for WakeOnFinish {
    fn on_event(&self, _: &Journal, event: &RotationEvent) {
        if matches!(event, RotationEvent::Finished) {
            self.0.notify_one();
        }
    }
}

/// The configured targets' projects, each with its targets' names (sorted).
pub fn configured_projects(c: &crate::config::Config) -> Vec<(String, Vec<String>)> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &c.targets {
        by.entry(t.project_id.clone())
            .or_default()
            .push(t.name.clone());
    }
    by.into_iter()
        .map(|(p, mut t)| {
            t.sort();
            (p, t)
        })
        .collect()
}

/// The reconciler `[daemon.reconcile]` asks for (None when disabled).
pub fn from_config(
    c: &crate::config::Config,
    services: &crate::app::Services,
) -> anyhow::Result<Option<Arc<Reconciler>>> {
    let r = &c.daemon.reconcile;
    if !r.enabled {
        return Ok(None);
    }
    let names: Vec<String> = c.targets.iter().map(|t| t.name.clone()).collect();
    let metrics = ReconcileMetrics::register(services.metrics.registry(), &names)
        .map_err(|e| anyhow::anyhow!("registering the reconciliation metrics: {e}"))?;
    let mut rec = Reconciler::new(
        services.issuer.clone(),
        services.engine.clone(),
        r.lookback.get(),
        &c.daemon.account_prefix,
    );
    rec.audit = Some(services.audit.clone());
    rec.metrics = Some(metrics);
    if c.openai.admin_key_vault_path.is_some() {
        rec.admin_journal = Some((
            services.store.clone(),
            format!("{}/admin-key", c.daemon.state_prefix.trim_matches('/')),
        ));
    }
    Ok(Some(Arc::new(rec)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::AuditLogEvent;
    use crate::rotation::ports::AccountRef;
    use crate::rotation::{RotationRequest, Trigger};

    const P: &str = "proj_1";
    const US: &str = "key_admin_us";

    fn journal(old: (&str, &str), new: (&str, &str), retired: bool) -> Journal {
        let req = RotationRequest::new("chat", Trigger::Cli, "t", "r", Utc::now());
        let mut j = Journal::queued(&req, "okr");
        j.old_account = Some(AccountRef {
            id: old.0.into(),
            key_id: old.1.into(),
        });
        j.new_account = Some(AccountRef {
            id: new.0.into(),
            key_id: new.1.into(),
        });
        j.old_retired = retired;
        j
    }

    fn ev(id: &str, t: &str, resource: &str, actor_key: Option<&str>) -> AuditLogEvent {
        AuditLogEvent {
            id: id.into(),
            event_type: t.into(),
            effective_at: Utc::now(),
            actor: actor_key.map_or("session user-x".into(), |k| format!("api_key {k}")),
            actor_key_id: actor_key.map(str::to_string),
            resource_id: Some(resource.into()),
            project_id: Some(P.into()),
        }
    }

    fn targets() -> Vec<String> {
        vec!["chat".into()]
    }

    fn acct(id: &str, name: &str) -> AccountInfo {
        AccountInfo {
            id: id.into(),
            name: name.into(),
            created_at: Utc::now(),
        }
    }

    fn kinds(m: &[Mismatch]) -> Vec<(MismatchKind, &str)> {
        m.iter().map(|m| (m.kind, m.account_id.as_str())).collect()
    }

    #[test]
    fn our_own_events_match_and_others_on_managed_accounts_do_not() {
        let j = journal(("svc_old", "key_old"), ("svc_new", "key_new"), true);
        let live = [acct("svc_new", &j.new_account_name)];
        let ours = vec![
            ev("e1", "service_account.created", "svc_new", Some(US)),
            ev("e2", "api_key.created", "key_new", Some(US)),
            ev("e3", "service_account.deleted", "svc_old", Some(US)),
            // The seed account was made by a person: not a mismatch.
            ev("e4", "service_account.created", "svc_old", None),
            // Someone else's account: none of our business.
            ev("e5", "service_account.deleted", "svc_stranger", None),
        ];
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&j),
            &ours,
            &live,
            &[US.into()],
            "okr",
        );
        assert!(m.is_empty(), "{m:?}");

        let others = vec![
            ev("e6", "service_account.deleted", "svc_new", None),
            ev("e7", "api_key.updated", "key_new", Some("key_someone")),
            ev("e8", "api_key.created", "key_new", Some("key_someone")),
        ];
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&j),
            &others,
            &live,
            &[US.into()],
            "okr",
        );
        assert_eq!(
            kinds(&m),
            vec![
                (MismatchKind::DeletedByOther, "svc_new"),
                (MismatchKind::ModifiedByOther, "svc_new"),
                (MismatchKind::CreatedByOther, "svc_new"),
            ]
        );
        assert_eq!(m[0].event_id.as_deref(), Some("e6"));
        assert!(m.iter().all(|m| m.target == "chat"), "{m:?}");
        // Without knowing our key, our own events would look foreign: the ids matter.
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&j),
            &ours[..1],
            &live,
            &[],
            "okr",
        );
        assert_eq!(kinds(&m), vec![(MismatchKind::CreatedByOther, "svc_new")]);
    }

    #[test]
    fn accounts_are_checked_against_the_journals() {
        let j = journal(("svc_old", "key_old"), ("svc_new", "key_new"), true);
        let ours_named = acct("svc_new", &j.new_account_name);
        // Deleted by us, yet listed.
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&j),
            &[],
            &[ours_named.clone(), acct("svc_old", "chat-initial")],
            &[],
            "okr",
        );
        assert_eq!(
            kinds(&m),
            vec![(MismatchKind::DeletedStillExists, "svc_old")]
        );
        // Not retired (a rollback kept it): no mismatch.
        let kept = journal(("svc_old", "key_old"), ("svc_new", "key_new"), false);
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&kept),
            &[],
            &[ours_named.clone(), acct("svc_old", "chat-initial")],
            &[],
            "okr",
        );
        assert!(m.is_empty(), "{m:?}");
        // Named like ours, no journal names it; another prefix or a plain name is left alone.
        let stray = acct("svc_stray", "okr-chat-20990101000000-abcdef");
        let m = compare(
            P,
            &targets(),
            std::slice::from_ref(&j),
            &[],
            &[
                ours_named,
                stray,
                acct("svc_x", "other-chat-20990101000000-abcdef"),
                acct("svc_y", "okr-notes"),
            ],
            &[],
            "okr",
        );
        assert_eq!(
            kinds(&m),
            vec![(MismatchKind::UnknownManagedAccount, "svc_stray")]
        );
        // Labelled with a configured target only: a name naming another target counts for
        // the project's first configured one.
        let m = compare(
            P,
            &["alpha".to_string(), "chat".to_string()],
            &[],
            &[],
            &[
                acct("svc_1", "okr-chat-20990101000000-abcdef"),
                acct("svc_2", "okr-ghost-20990101000000-abcdef"),
            ],
            &[],
            "okr",
        );
        let labels: Vec<&str> = m.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(labels, vec!["chat", "alpha"]);
    }

    /// Events by someone else on a managed account; whether our admin key can be told.
    struct Source {
        events: Vec<AuditLogEvent>,
        accounts: Vec<AccountInfo>,
        ours: Result<Vec<String>, BackendError>,
    }

    #[async_trait]
    impl GovernanceSource for Source {
        async fn usage_buckets(
            &self,
            _: &str,
            _: &str,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
            _: crate::forensics::BucketWidth,
        ) -> Result<Vec<crate::forensics::UsageBucket>, SourceError> {
            Ok(vec![])
        }
        async fn audit_events(
            &self,
            _: &AuditQuery,
        ) -> Result<crate::forensics::AuditEvents, SourceError> {
            Ok(crate::forensics::AuditEvents {
                events: self.events.clone(),
                truncated: false,
            })
        }
    }

    #[async_trait]
    impl ReconcileSource for Source {
        async fn accounts(&self, _: &str) -> Result<Vec<AccountInfo>, BackendError> {
            Ok(self.accounts.clone())
        }
        async fn our_admin_key_ids(&self) -> Result<Vec<String>, BackendError> {
            self.ours.clone()
        }
    }

    #[tokio::test]
    async fn when_our_admin_key_cannot_be_told_events_are_not_judged() {
        use crate::rotation::fakes::FakeWorld;
        use crate::rotation::{EngineOptions, RotationControl};
        let world = FakeWorld::default();
        let (target, _) = world.seed_target("chat", Utc::now());
        let engine = Arc::new(world.engine(EngineOptions::default()));
        let req = RotationRequest::new("chat", Trigger::Cli, "t", "r", Utc::now());
        let j = engine
            .rotate(&target, req, None, Arc::new(RotationControl::default()))
            .await
            .unwrap();
        let new = j.new_account.clone().unwrap();
        let events = vec![ev(
            "e1",
            "api_key.updated",
            &new.key_id,
            Some("key_someone"),
        )];
        let stray = acct("svc_stray", "okr-chat-20990101000000-abcdef");
        let run = |ours: Result<Vec<String>, BackendError>| {
            let rec = Reconciler::new(
                Arc::new(Source {
                    events: events.clone(),
                    accounts: vec![stray.clone()],
                    ours,
                }),
                engine.clone(),
                Duration::from_secs(3600),
                "okr",
            );
            async move { rec.reconcile("proj_test", &targets(), Utc::now()).await }
        };
        // Our key known: the foreign change is a mismatch (the control).
        let r = run(Ok(vec![US.into()])).await.unwrap();
        let mut k: Vec<MismatchKind> = r.mismatches.iter().map(|m| m.kind).collect();
        k.sort();
        assert_eq!(
            k,
            vec![
                MismatchKind::ModifiedByOther,
                MismatchKind::UnknownManagedAccount
            ]
        );
        // Not known: no event is judged (no false alarms), the account check still runs.
        let failed = Err(BackendError::Failed {
            backend: crate::rotation::ports::Backend::OpenAi,
            message: "403".into(),
            transient: false,
        });
        let r = run(failed).await.unwrap();
        let k: Vec<MismatchKind> = r.mismatches.iter().map(|m| m.kind).collect();
        assert_eq!(k, vec![MismatchKind::UnknownManagedAccount]);
    }

    #[test]
    fn kinds_are_a_bounded_label_set() {
        let names: BTreeSet<&str> = MismatchKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), MismatchKind::ALL.len());
    }
}
