//! Emergency forensics: when an emergency rotation ends, the old key's usage buckets over
//! a look-back window and the OpenAI audit-log events on its account and key (ids, types,
//! actors, times: never values), stored in the journal (so `GET /v1/rotations/{id}` shows
//! them) and written to the audit trail.
//!
//! Collecting never fails or blocks the rotation: each half is bounded by a timeout, and a
//! half that cannot be had is recorded as `unavailable: <reason class>` instead. It runs
//! when the rotation concludes, so a `revoke_first` revoke is never delayed by it.
//!
//! The audit-log reader here is shared with the reconciliation (`crate::reconcile`).

use crate::openai::{AdminRequest, CallError, OpenAiClient};
use crate::rotation::journal::Journal;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Audit events kept per report (newest first); the journal lives in Vault, keep it small.
pub const MAX_EVENTS: usize = 100;
/// Usage buckets kept per report (a week of hours).
pub const MAX_BUCKETS: usize = 168;
/// Pages of the audit log read per query at most.
const MAX_AUDIT_PAGES: usize = 20;
pub use crate::usage::{BucketWidth, UsageBucket};

/// An audit-log query: events since `since` (inclusive), newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub project_ids: Vec<String>,
    pub resource_ids: Vec<String>,
    pub event_types: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    /// Events read at most.
    pub max_events: usize,
}

/// One audit-log event: ids, type, actor and time. No payload beyond the resource id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLogEvent {
    pub id: String,
    pub event_type: String,
    pub effective_at: DateTime<Utc>,
    /// `session user-...`, `api_key key_... (user user-...)`,
    /// `api_key key_... (service_account svc_...)`, or `unknown`.
    pub actor: String,
    /// The API key that acted, when an API key did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_key_id: Option<String>,
    /// The account or key acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
}

/// Audit events read and whether more matched than were read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditEvents {
    pub events: Vec<AuditLogEvent>,
    pub truncated: bool,
}

/// Why a governance read failed, as a bounded class (also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("audit_logging_off")]
    AuditLoggingOff,
    #[error("timeout")]
    Timeout,
    #[error("rate_limited")]
    RateLimited,
    #[error("unauthorized")]
    Unauthorized,
    #[error("client_error")]
    ClientError,
    #[error("server_error")]
    ServerError,
    #[error("transport")]
    Transport,
    #[error("bad_response")]
    BadResponse,
}

impl SourceError {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceError::AuditLoggingOff => "audit_logging_off",
            SourceError::Timeout => "timeout",
            SourceError::RateLimited => "rate_limited",
            SourceError::Unauthorized => "unauthorized",
            SourceError::ClientError => "client_error",
            SourceError::ServerError => "server_error",
            SourceError::Transport => "transport",
            SourceError::BadResponse => "bad_response",
        }
    }

    /// The class of a failed call; `forbidden_means_off` for the audit log, whose 403 says
    /// the organization has audit logging off.
    pub fn of(e: &CallError, forbidden_means_off: bool) -> SourceError {
        match e.status {
            _ if e.timed_out => SourceError::Timeout,
            Some(403) if forbidden_means_off => SourceError::AuditLoggingOff,
            Some(401 | 403) => SourceError::Unauthorized,
            Some(429) => SourceError::RateLimited,
            Some(s) if (200..300).contains(&s) => SourceError::BadResponse,
            Some(s) if s >= 500 => SourceError::ServerError,
            Some(_) => SourceError::ClientError,
            None => SourceError::Transport,
        }
    }
}

/// What forensics and reconciliation read from OpenAI (the real client, or a fake).
#[async_trait]
pub trait GovernanceSource: Send + Sync {
    /// Requests of one key per bucket over `[start, end)`, every usage endpoint summed;
    /// empty buckets left out.
    async fn usage_buckets(
        &self,
        project: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        bucket_width: BucketWidth,
    ) -> Result<Vec<UsageBucket>, SourceError>;

    async fn audit_events(&self, q: &AuditQuery) -> Result<AuditEvents, SourceError>;
}

// ---------------------------------------------------------------------------------------
// The real client.

#[derive(Deserialize)]
struct AuditPage {
    data: Vec<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// The actor of an audit event as text, and the acting API key's id.
fn actor_of(v: Option<&serde_json::Value>) -> (String, Option<String>) {
    let s =
        |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
    let Some(a) = v else {
        return ("unknown".into(), None);
    };
    match a.get("type").and_then(|t| t.as_str()) {
        Some("session") => (
            format!(
                "session {}",
                s(a, "/session/user/id").unwrap_or_else(|| "unknown".into())
            ),
            None,
        ),
        Some("api_key") => {
            let key = s(a, "/api_key/id");
            let owner = match s(a, "/api_key/type").as_deref() {
                Some("service_account") => {
                    s(a, "/api_key/service_account/id").map(|id| format!(" (service_account {id})"))
                }
                Some("user") => s(a, "/api_key/user/id").map(|id| format!(" (user {id})")),
                _ => None,
            };
            (
                format!(
                    "api_key {}{}",
                    key.as_deref().unwrap_or("unknown"),
                    owner.unwrap_or_default()
                ),
                key,
            )
        }
        _ => ("unknown".into(), None),
    }
}

/// An event of the page, or `None` when it lacks the id, type or time.
fn audit_event(e: &serde_json::Map<String, serde_json::Value>) -> Option<AuditLogEvent> {
    let id = e.get("id")?.as_str()?.to_string();
    let event_type = e.get("type")?.as_str()?.to_string();
    let effective_at = DateTime::from_timestamp(e.get("effective_at")?.as_i64()?, 0)?;
    let (actor, actor_key_id) = actor_of(e.get("actor"));
    let resource_id = e
        .get(&event_type)
        .and_then(|p| p.get("id"))
        .and_then(|i| i.as_str())
        .map(str::to_string);
    let project_id = e
        .get("project")
        .and_then(|p| p.get("id"))
        .and_then(|i| i.as_str())
        .map(str::to_string);
    Some(AuditLogEvent {
        id,
        event_type,
        effective_at,
        actor,
        actor_key_id,
        resource_id,
        project_id,
    })
}

#[async_trait]
impl GovernanceSource for OpenAiClient {
    async fn usage_buckets(
        &self,
        project: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        bucket_width: BucketWidth,
    ) -> Result<Vec<UsageBucket>, SourceError> {
        crate::usage::fetch(self, project, key_id, start, end, bucket_width)
            .await
            .map(|all| all.into_iter().filter(|b| b.requests > 0).collect())
            .map_err(|e| SourceError::of(&e, false))
    }

    async fn audit_events(&self, q: &AuditQuery) -> Result<AuditEvents, SourceError> {
        let mut out = AuditEvents::default();
        let mut after: Option<String> = None;
        let max = q.max_events.max(1);
        for _ in 0..MAX_AUDIT_PAGES {
            let mut query: Vec<(&str, String)> = vec![("limit", "100".to_string())];
            query.extend(q.project_ids.iter().map(|p| ("project_ids[]", p.clone())));
            query.extend(q.resource_ids.iter().map(|p| ("resource_ids[]", p.clone())));
            query.extend(q.event_types.iter().map(|p| ("event_types[]", p.clone())));
            if let Some(s) = q.since {
                query.push(("effective_at[gte]", s.timestamp().to_string()));
            }
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page: AuditPage = self
                .admin_json(AdminRequest {
                    op: "audit_logs.list",
                    method: Method::GET,
                    segments: &["organization", "audit_logs"],
                    query: &query,
                    body: None,
                    key: None,
                    retry: true,
                    gone_ok: false,
                    what: "audit log",
                })
                .await
                .map_err(|e| SourceError::of(&e, true))?
                .ok_or(SourceError::BadResponse)?;
            for e in &page.data {
                if out.events.len() >= max {
                    out.truncated = true;
                    return Ok(out);
                }
                out.events
                    .push(audit_event(e).ok_or(SourceError::BadResponse)?);
            }
            if !page.has_more {
                return Ok(out);
            }
            match page.last_id {
                Some(l) if after.as_deref() != Some(l.as_str()) => after = Some(l),
                _ => return Err(SourceError::BadResponse),
            }
        }
        out.truncated = true;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// The report.

/// What an emergency rotation's journal holds about the old key (bounded; ids only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForensicsReport {
    pub collected_at: DateTime<Utc>,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub service_account_id: Option<String>,
    pub key_id: Option<String>,
    /// Hourly buckets with requests, oldest first (at most [`MAX_BUCKETS`], the newest).
    pub usage_buckets: Vec<UsageBucket>,
    pub usage_requests: u64,
    /// `forensics unavailable: <reason class>` when usage could not be read.
    pub usage_unavailable: Option<String>,
    /// Newest first, at most [`MAX_EVENTS`].
    pub audit_events: Vec<AuditLogEvent>,
    pub audit_events_truncated: bool,
    pub audit_unavailable: Option<String>,
}

impl ForensicsReport {
    /// One line for the audit trail's `message`.
    pub fn summary(&self) -> String {
        let usage = match &self.usage_unavailable {
            Some(u) => format!("usage {u}"),
            None => format!(
                "usage {} requests in {} buckets{}",
                self.usage_requests,
                self.usage_buckets.len(),
                match (self.usage_buckets.first(), self.usage_buckets.last()) {
                    (Some(f), Some(l)) => format!(
                        " (first {}, last {})",
                        f.start.to_rfc3339(),
                        l.end.to_rfc3339()
                    ),
                    _ => String::new(),
                }
            ),
        };
        let audit = match &self.audit_unavailable {
            Some(u) => format!("audit log {u}"),
            None => {
                let events: Vec<String> = self
                    .audit_events
                    .iter()
                    .take(20)
                    .map(|e| {
                        format!(
                            "{} {} {} by {}",
                            e.effective_at.to_rfc3339(),
                            e.event_type,
                            e.id,
                            e.actor
                        )
                    })
                    .collect();
                format!(
                    "audit log {} events{}{}",
                    self.audit_events.len(),
                    if self.audit_events_truncated { "+" } else { "" },
                    if events.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", events.join("; "))
                    }
                )
            }
        };
        format!(
            "forensics {}..{}: {usage}; {audit}",
            self.window_start.to_rfc3339(),
            self.window_end.to_rfc3339()
        )
    }
}

/// Collects reports for emergency rotations.
pub struct Forensics {
    source: std::sync::Arc<dyn GovernanceSource>,
    pub lookback: Duration,
    pub timeout: Duration,
}

fn unavailable(class: &str) -> String {
    format!("forensics unavailable: {class}")
}

impl Forensics {
    pub fn new(
        source: std::sync::Arc<dyn GovernanceSource>,
        lookback: Duration,
        timeout: Duration,
    ) -> Forensics {
        Forensics {
            source,
            lookback,
            timeout,
        }
    }

    /// The report on `j`'s old key over `[now - lookback, now]`. Never fails: each half
    /// that cannot be read in `timeout` says why instead.
    pub async fn collect(&self, j: &Journal, now: DateTime<Utc>) -> ForensicsReport {
        let start = now - chrono::Duration::from_std(self.lookback).unwrap_or_default();
        let mut r = ForensicsReport {
            collected_at: now,
            window_start: start,
            window_end: now,
            service_account_id: j.old_account.as_ref().map(|a| a.id.clone()),
            key_id: j.old_account.as_ref().map(|a| a.key_id.clone()),
            usage_buckets: Vec::new(),
            usage_requests: 0,
            usage_unavailable: None,
            audit_events: Vec::new(),
            audit_events_truncated: false,
            audit_unavailable: None,
        };
        let (Some(old), Some(target)) = (j.old_account.as_ref(), j.spec.as_ref()) else {
            let why = unavailable("old_account_unknown");
            r.usage_unavailable = Some(why.clone());
            r.audit_unavailable = Some(why);
            return r;
        };
        let project = target.project_id.as_str();
        // Usage buckets end on the hour: cover the current one too.
        let end = now + chrono::Duration::hours(1);
        let usage = tokio::time::timeout(
            self.timeout,
            self.source
                .usage_buckets(project, &old.key_id, start, end, BucketWidth::Hour),
        );
        let query = AuditQuery {
            project_ids: vec![project.to_string()],
            resource_ids: vec![old.id.clone(), old.key_id.clone()],
            event_types: Vec::new(),
            since: Some(start),
            max_events: MAX_EVENTS,
        };
        let audit = tokio::time::timeout(self.timeout, self.source.audit_events(&query));
        let (usage, audit) = tokio::join!(usage, audit);
        match usage {
            Ok(Ok(mut buckets)) => {
                r.usage_requests = buckets.iter().map(|b| b.requests).sum();
                if buckets.len() > MAX_BUCKETS {
                    buckets.drain(..buckets.len() - MAX_BUCKETS);
                }
                r.usage_buckets = buckets;
            }
            Ok(Err(e)) => r.usage_unavailable = Some(unavailable(e.as_str())),
            Err(_) => r.usage_unavailable = Some(unavailable("timeout")),
        }
        match audit {
            Ok(Ok(events)) => {
                r.audit_events = events.events;
                r.audit_events_truncated = events.truncated;
            }
            Ok(Err(e)) => r.audit_unavailable = Some(unavailable(e.as_str())),
            Err(_) => r.audit_unavailable = Some(unavailable("timeout")),
        }
        if r.usage_unavailable.is_some() || r.audit_unavailable.is_some() {
            tracing::warn!(
                rotation_id = %j.rotation_id,
                target = %j.target,
                usage = r.usage_unavailable.as_deref().unwrap_or("ok"),
                audit = r.audit_unavailable.as_deref().unwrap_or("ok"),
                "emergency forensics incomplete"
            );
        }
        r
    }
}

/// Checks of the governance options (`[daemon.forensics]`, `[daemon.reconcile]`,
/// `openai.admin_key_*`); every message names its field.
pub fn validate_config(c: &crate::config::Config) -> Vec<String> {
    const MAX_LOOKBACK: Duration = Duration::from_secs(30 * 24 * 3600);
    const MAX_EXPIRY: Duration = Duration::from_secs(31_536_000);
    let mut errors = Vec::new();
    let f = &c.daemon.forensics;
    if f.lookback.get().is_zero() || f.lookback.get() > MAX_LOOKBACK {
        errors.push("daemon.forensics.lookback: must be above zero and at most 30d".into());
    }
    if f.timeout.get().is_zero() {
        errors.push("daemon.forensics.timeout: must be greater than zero".into());
    }
    let r = &c.daemon.reconcile;
    if r.interval.get().is_zero() {
        errors.push(
            "daemon.reconcile.interval: must be greater than zero (it paces a polling loop)".into(),
        );
    }
    if r.lookback.get().is_zero() || r.lookback.get() > MAX_LOOKBACK {
        errors.push("daemon.reconcile.lookback: must be above zero and at most 30d".into());
    }
    let o = &c.openai;
    match o.admin_key_vault_path.as_deref() {
        Some(p) => {
            let p = p.trim_matches('/');
            if p.is_empty() {
                errors.push("openai.admin_key_vault_path: must not be empty".into());
            } else {
                if let Some(t) = c
                    .targets
                    .iter()
                    .find(|t| t.vault_path.trim_matches('/') == p)
                {
                    errors.push(format!(
                        "openai.admin_key_vault_path: {p:?} is also targets {:?}'s vault_path (a rotation of it would overwrite the admin key)",
                        t.name
                    ));
                }
                let state = c.daemon.state_prefix.trim_matches('/');
                if !state.is_empty() && (p == state || p.starts_with(&format!("{state}/"))) {
                    errors.push(format!(
                        "openai.admin_key_vault_path: {p:?} must not be under daemon.state_prefix {state:?}"
                    ));
                }
            }
        }
        None => {
            for (field, set) in [
                ("admin_key_max_age", o.admin_key_max_age.is_some()),
                ("admin_key_expiry", o.admin_key_expiry.is_some()),
            ] {
                if set {
                    errors.push(format!(
                        "openai.{field}: needs openai.admin_key_vault_path (only a key kept in Vault is rotated)"
                    ));
                }
            }
        }
    }
    if o.admin_key_vault_path.is_some()
        && o.admin_key_expiry.is_some()
        && o.admin_key_max_age.is_none()
    {
        errors.push("openai.admin_key_expiry: needs openai.admin_key_max_age (or the admin key expires and is never rotated)".into());
    }
    if o.admin_key_max_age.is_some_and(|a| a.get().is_zero()) {
        errors.push("openai.admin_key_max_age: must be greater than zero".into());
    }
    if let Some(e) = o.admin_key_expiry {
        if e.get() < Duration::from_secs(1) || e.get() > MAX_EXPIRY {
            errors.push(
                "openai.admin_key_expiry: must be between 1s and 365d (the API's expires_in_seconds)"
                    .into(),
            );
        } else if o.admin_key_max_age.is_some_and(|a| a >= e) {
            errors.push("openai.admin_key_expiry: must be longer than openai.admin_key_max_age (or the key expires before it is rotated)".into());
        }
    }
    if o.admin_key_check_interval.get().is_zero() {
        errors.push("openai.admin_key_check_interval: must be greater than zero".into());
    }
    errors
}

/// The collector `[daemon.forensics]` asks for (None when disabled).
pub fn from_config(
    c: &crate::config::Config,
    source: std::sync::Arc<dyn GovernanceSource>,
) -> Option<std::sync::Arc<Forensics>> {
    let f = &c.daemon.forensics;
    f.enabled
        .then(|| std::sync::Arc::new(Forensics::new(source, f.lookback.get(), f.timeout.get())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::{EngineOptions, RotationControl, RotationRequest, Status, Trigger};
    use std::sync::{Arc, Mutex};

    /// Answers from a script; records each call and whether the old account was still
    /// live when it was asked.
    #[derive(Default)]
    struct FakeSource {
        usage: Mutex<Option<Result<Vec<UsageBucket>, SourceError>>>,
        audit: Mutex<Option<Result<AuditEvents, SourceError>>>,
        /// Never answer (a hung backend).
        hang: bool,
        queries: Mutex<Vec<AuditQuery>>,
        usage_calls: Mutex<Vec<String>>,
        /// The world's log, to tell when the source was asked (its length then).
        log: Option<crate::rotation::fakes::Log>,
        asked_at: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl GovernanceSource for FakeSource {
        async fn usage_buckets(
            &self,
            _project: &str,
            key_id: &str,
            _start: DateTime<Utc>,
            _end: DateTime<Utc>,
            _w: BucketWidth,
        ) -> Result<Vec<UsageBucket>, SourceError> {
            self.usage_calls.lock().unwrap().push(key_id.to_string());
            if let Some(log) = &self.log {
                self.asked_at.lock().unwrap().push(log.entries().len());
            }
            if self.hang {
                std::future::pending::<()>().await;
            }
            self.usage.lock().unwrap().clone().unwrap_or(Ok(vec![]))
        }
        async fn audit_events(&self, q: &AuditQuery) -> Result<AuditEvents, SourceError> {
            self.queries.lock().unwrap().push(q.clone());
            if self.hang {
                std::future::pending::<()>().await;
            }
            self.audit
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Ok(AuditEvents::default()))
        }
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn bucket(h: i64, n: u64) -> UsageBucket {
        UsageBucket {
            start: t(h * 3600),
            end: t((h + 1) * 3600),
            requests: n,
        }
    }

    fn event(id: &str) -> AuditLogEvent {
        AuditLogEvent {
            id: id.into(),
            event_type: "api_key.created".into(),
            effective_at: t(10),
            actor: "session user-x".into(),
            actor_key_id: None,
            resource_id: Some("key_1".into()),
            project_id: Some("proj_test".into()),
        }
    }

    fn request(emergency: bool, revoke_first: bool) -> RotationRequest {
        let mut r = RotationRequest::new("chat", Trigger::Api, "oncall", "leak", Utc::now());
        r.emergency = emergency;
        r.revoke_first = revoke_first;
        r
    }

    async fn rotate(
        source: Arc<FakeSource>,
        world: &FakeWorld,
        req: RotationRequest,
        timeout: Duration,
    ) -> Journal {
        let (target, _) = world.seed_target("chat", Utc::now());
        let engine = world.engine(EngineOptions::default());
        engine.set_forensics(Some(Arc::new(Forensics::new(
            source,
            Duration::from_secs(24 * 3600),
            timeout,
        ))));
        engine
            .rotate(&target, req, None, Arc::new(RotationControl::default()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_emergency_rotation_records_usage_and_audit_events_of_the_old_key() {
        let source = Arc::new(FakeSource::default());
        *source.usage.lock().unwrap() = Some(Ok(vec![bucket(0, 3), bucket(5, 4)]));
        *source.audit.lock().unwrap() = Some(Ok(AuditEvents {
            events: vec![event("audit_log-1")],
            truncated: false,
        }));
        let world = FakeWorld::default();
        let j = rotate(
            source.clone(),
            &world,
            request(true, false),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(j.status, Status::Completed);
        let r = j
            .forensics
            .clone()
            .expect("an emergency rotation has forensics");
        let old = j.old_account.clone().unwrap();
        assert_eq!(r.key_id.as_deref(), Some(old.key_id.as_str()));
        assert_eq!(r.usage_requests, 7);
        assert_eq!(r.usage_buckets.len(), 2);
        assert_eq!(r.audit_events.len(), 1);
        assert!(r.usage_unavailable.is_none() && r.audit_unavailable.is_none());
        assert_eq!(r.window_end - r.window_start, chrono::Duration::hours(24));
        // Asked about the old account and its key, in the target's project.
        let q = source.queries.lock().unwrap()[0].clone();
        assert_eq!(q.resource_ids, vec![old.id.clone(), old.key_id.clone()]);
        assert_eq!(q.project_ids, vec!["proj_test".to_string()]);
        assert_eq!(*source.usage_calls.lock().unwrap(), vec![old.key_id]);
        // The report survives the journal's round trip (it is stored in Vault).
        let doc = serde_json::to_value(&j.forensics).unwrap();
        let back: Option<ForensicsReport> = serde_json::from_value(doc).unwrap();
        assert_eq!(back, Some(r));
    }

    #[tokio::test]
    async fn a_routine_rotation_collects_nothing() {
        let source = Arc::new(FakeSource::default());
        let world = FakeWorld::default();
        let j = rotate(
            source.clone(),
            &world,
            request(false, false),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(j.status, Status::Completed);
        assert!(j.forensics.is_none());
        assert!(source.queries.lock().unwrap().is_empty());
        assert!(source.usage_calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_hung_source_does_not_hold_up_a_revoke_first_rotation() {
        let world = FakeWorld::default();
        let source = Arc::new(FakeSource {
            hang: true,
            log: Some(world.log.clone()),
            ..FakeSource::default()
        });
        let started = std::time::Instant::now();
        let j = tokio::time::timeout(
            Duration::from_secs(10),
            rotate(
                source.clone(),
                &world,
                request(true, true),
                Duration::from_millis(200),
            ),
        )
        .await
        .expect("the forensics timeout bounds the conclusion");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(j.status, Status::Completed);
        assert!(j.old_retired);
        let r = j.forensics.unwrap();
        assert_eq!(
            r.usage_unavailable.as_deref(),
            Some("forensics unavailable: timeout")
        );
        assert_eq!(
            r.audit_unavailable.as_deref(),
            Some("forensics unavailable: timeout")
        );
        // The revoke came first: the old account was gone before forensics asked.
        let old = j.old_account.unwrap();
        let delete = world.log.position(&format!("delete {}", old.id)).unwrap();
        let asked = source.asked_at.lock().unwrap()[0];
        assert!(
            delete < asked,
            "revoke at {delete}, forensics asked at {asked}"
        );
        assert!(!world.issuer.account_ids().contains(&old.id));
    }

    #[tokio::test]
    async fn audit_logging_off_is_recorded_and_usage_still_kept() {
        let source = Arc::new(FakeSource::default());
        *source.usage.lock().unwrap() = Some(Ok(vec![bucket(1, 2)]));
        *source.audit.lock().unwrap() = Some(Err(SourceError::AuditLoggingOff));
        let world = FakeWorld::default();
        let j = rotate(source, &world, request(true, false), Duration::from_secs(5)).await;
        let r = j.forensics.unwrap();
        assert_eq!(r.usage_requests, 2);
        assert_eq!(
            r.audit_unavailable.as_deref(),
            Some("forensics unavailable: audit_logging_off")
        );
        assert!(r
            .summary()
            .contains("audit log forensics unavailable: audit_logging_off"));
    }

    #[tokio::test]
    async fn buckets_are_capped_to_the_newest() {
        let source = Arc::new(FakeSource::default());
        let many: Vec<UsageBucket> = (0..(MAX_BUCKETS as i64 + 10))
            .map(|h| bucket(h, 1))
            .collect();
        *source.usage.lock().unwrap() = Some(Ok(many));
        let world = FakeWorld::default();
        let j = rotate(source, &world, request(true, false), Duration::from_secs(5)).await;
        let r = j.forensics.unwrap();
        assert_eq!(r.usage_buckets.len(), MAX_BUCKETS);
        assert_eq!(r.usage_requests, MAX_BUCKETS as u64 + 10);
        assert_eq!(r.usage_buckets[0].start, t(10 * 3600));
    }

    #[test]
    fn source_errors_classify_calls() {
        let e = |status: Option<u16>, timed_out| CallError {
            status,
            timed_out,
            error: crate::rotation::ports::BackendError::Failed {
                backend: crate::rotation::ports::Backend::OpenAi,
                message: "x".into(),
                transient: false,
            },
        };
        assert_eq!(
            SourceError::of(&e(Some(403), false), true),
            SourceError::AuditLoggingOff
        );
        // Only the audit log's 403 means "logging off".
        assert_eq!(
            SourceError::of(&e(Some(403), false), false),
            SourceError::Unauthorized
        );
        assert_eq!(
            SourceError::of(&e(Some(429), false), true),
            SourceError::RateLimited
        );
        assert_eq!(
            SourceError::of(&e(Some(503), false), true),
            SourceError::ServerError
        );
        assert_eq!(
            SourceError::of(&e(Some(200), false), true),
            SourceError::BadResponse
        );
        assert_eq!(SourceError::of(&e(None, true), true), SourceError::Timeout);
        assert_eq!(
            SourceError::of(&e(None, false), true),
            SourceError::Transport
        );
    }

    #[test]
    fn actors_are_described_by_ids() {
        let v = serde_json::json!({"type": "api_key", "api_key": {"id": "key_a", "type": "user", "user": {"id": "user-1", "email": "a@b"}}});
        assert_eq!(
            actor_of(Some(&v)),
            (
                "api_key key_a (user user-1)".to_string(),
                Some("key_a".to_string())
            )
        );
        let v = serde_json::json!({"type": "session", "session": {"user": {"id": "user-2"}}});
        assert_eq!(actor_of(Some(&v)).0, "session user-2");
        assert_eq!(actor_of(None).0, "unknown");
    }

    fn config(extra: &str) -> crate::config::Config {
        let text = format!(
            "{extra}\n[vault]\naddress = \"http://127.0.0.1:8200\"\n\n[[targets]]\nname = \"chat\"\nproject_id = \"proj_abc\"\nvault_path = \"apps/chat/openai\"\nworkloads = [\"demo/Deployment/chat\"]\n"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn governance_options_are_checked_and_name_their_field() {
        assert!(
            validate_config(&config("")).is_empty(),
            "defaults are valid"
        );
        let ok = config(
            "[daemon.forensics]\nlookback = \"48h\"\n[openai]\nadmin_key_vault_path = \"ops/openai-admin\"\nadmin_key_max_age = \"30d\"\nadmin_key_expiry = \"60d\"\n",
        );
        assert!(
            validate_config(&ok).is_empty(),
            "{:?}",
            validate_config(&ok)
        );
        for (extra, field) in [
            ("[daemon.forensics]\nlookback = \"0s\"\n", "daemon.forensics.lookback"),
            ("[daemon.forensics]\nlookback = \"31d\"\n", "daemon.forensics.lookback"),
            ("[daemon.forensics]\ntimeout = \"0s\"\n", "daemon.forensics.timeout"),
            ("[daemon.reconcile]\ninterval = \"0s\"\n", "daemon.reconcile.interval"),
            ("[openai]\nadmin_key_max_age = \"30d\"\n", "openai.admin_key_max_age"),
            (
                "[openai]\nadmin_key_vault_path = \"apps/chat/openai\"\n",
                "openai.admin_key_vault_path",
            ),
            (
                "[openai]\nadmin_key_vault_path = \"openai-key-rotator/state/admin\"\n",
                "openai.admin_key_vault_path",
            ),
            (
                "[openai]\nadmin_key_vault_path = \"ops/a\"\nadmin_key_max_age = \"30d\"\nadmin_key_expiry = \"7d\"\n",
                "openai.admin_key_expiry",
            ),
            (
                "[openai]\nadmin_key_vault_path = \"ops/a\"\nadmin_key_max_age = \"30d\"\nadmin_key_expiry = \"400d\"\n",
                "openai.admin_key_expiry",
            ),
            (
                "[openai]\nadmin_key_vault_path = \"ops/a\"\nadmin_key_expiry = \"40d\"\n",
                "openai.admin_key_expiry: needs openai.admin_key_max_age",
            ),
        ] {
            let errors = validate_config(&config(extra));
            assert_eq!(errors.len(), 1, "{extra}: {errors:?}");
            assert!(errors[0].starts_with(field), "{extra}: {errors:?}");
        }
    }
}
