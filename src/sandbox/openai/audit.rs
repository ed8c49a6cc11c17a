//! Audit logs: `GET /v1/organization/audit_logs`, newest first, with the description's
//! filters, from the events this simulator records for what it does (service accounts and
//! keys made or deleted through the API or the seeding helpers) and ones a test injects as
//! made by someone else.
//!
//! Audit logging can be switched off for the organization ([`super::OpenAiSim::set_audit_logging`]):
//! then nothing is recorded (as upstream, where the log only holds what happened while it
//! was on) and the list answers 403. The real API's answer to an organization without audit
//! logging is not published; 403 `invalid_request_error` with a message naming the setting
//! is this simulator's choice (the organization lacks a feature, the caller is not wrong).

use super::admin::{query_int, query_limit, query_pairs, query_value};
use super::error::ApiError;
use super::usage::multi;
use super::{new_id, OpenAiSim};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

/// Who did it, as the description's `AuditLogActor` has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditActor {
    /// A person in the dashboard.
    Session { user_id: String, email: String },
    /// A user's API key (an admin key is one: the simulator's own calls are made so).
    UserApiKey {
        key_id: String,
        user_id: String,
        email: String,
    },
    /// A service account's API key.
    ServiceAccountApiKey {
        key_id: String,
        service_account_id: String,
    },
}

impl AuditActor {
    fn json(&self) -> Value {
        match self {
            AuditActor::Session { user_id, email } => json!({
                "type": "session",
                "session": {
                    "user": {"id": user_id, "email": email},
                    "ip_address": "203.0.113.7",
                },
            }),
            AuditActor::UserApiKey {
                key_id,
                user_id,
                email,
            } => json!({
                "type": "api_key",
                "api_key": {
                    "id": key_id,
                    "type": "user",
                    "user": {"id": user_id, "email": email},
                },
            }),
            AuditActor::ServiceAccountApiKey {
                key_id,
                service_account_id,
            } => json!({
                "type": "api_key",
                "api_key": {
                    "id": key_id,
                    "type": "service_account",
                    "service_account": {"id": service_account_id},
                },
            }),
        }
    }

    /// `actor_ids[]` matches a user id, a service account id or an API key id.
    fn has_id(&self, id: &str) -> bool {
        match self {
            AuditActor::Session { user_id, .. } => user_id == id,
            AuditActor::UserApiKey {
                key_id, user_id, ..
            } => key_id == id || user_id == id,
            AuditActor::ServiceAccountApiKey {
                key_id,
                service_account_id,
            } => key_id == id || service_account_id == id,
        }
    }

    fn email(&self) -> Option<&str> {
        match self {
            AuditActor::Session { email, .. } | AuditActor::UserApiKey { email, .. } => Some(email),
            AuditActor::ServiceAccountApiKey { .. } => None,
        }
    }
}

/// A recorded event, as tests see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEventInfo {
    pub id: String,
    pub event_type: String,
    pub effective_at: i64,
    pub project_id: Option<String>,
    /// The `id` of the per-type payload: the service account or key acted on.
    pub resource_id: String,
    pub actor: AuditActor,
}

/// Event types the simulator records or lets a test inject.
pub(super) const MODELLED_TYPES: &[&str] = &[
    "service_account.created",
    "service_account.updated",
    "service_account.deleted",
    "api_key.created",
    "api_key.updated",
    "api_key.deleted",
];

/// The per-type payload, in the description's shape for each type.
pub(super) fn payload(event_type: &str, resource_id: &str, role: &str) -> Value {
    match event_type {
        "service_account.created" => json!({"id": resource_id, "data": {"role": role}}),
        "service_account.updated" => {
            json!({"id": resource_id, "changes_requested": {"role": role}})
        }
        "api_key.updated" => json!({"id": resource_id, "changes_requested": {}}),
        _ => json!({"id": resource_id}),
    }
}

struct AuditRec {
    info: AuditEventInfo,
    project_name: Option<String>,
    payload: Value,
}

/// The organization's audit log: on by default (so tests see events without setup).
pub(super) struct AuditLog {
    pub enabled: bool,
    /// Oldest first.
    events: Vec<AuditRec>,
}

impl Default for AuditLog {
    fn default() -> Self {
        AuditLog {
            enabled: true,
            events: Vec::new(),
        }
    }
}

impl AuditLog {
    /// Record an event; nothing (`None`) while audit logging is off.
    pub fn record(
        &mut self,
        now: i64,
        event_type: &str,
        resource_id: &str,
        project: Option<(&str, &str)>,
        actor: AuditActor,
        payload: Value,
    ) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let day = chrono::DateTime::from_timestamp(now, 0)
            .map(|t| t.format("%Y%m%d").to_string())
            .unwrap_or_default();
        let id = format!("{}_{day}", new_id("audit_log-", 24));
        self.events.push(AuditRec {
            info: AuditEventInfo {
                id: id.clone(),
                event_type: event_type.to_string(),
                effective_at: now,
                project_id: project.map(|(id, _)| id.to_string()),
                resource_id: resource_id.to_string(),
                actor,
            },
            project_name: project.map(|(_, name)| name.to_string()),
            payload,
        });
        Some(id)
    }

    pub fn infos(&self) -> Vec<AuditEventInfo> {
        self.events.iter().map(|e| e.info.clone()).collect()
    }
}

fn event_json(e: &AuditRec) -> Value {
    let mut v = json!({
        "id": e.info.id,
        "type": e.info.event_type,
        "effective_at": e.info.effective_at,
        "actor": e.info.actor.json(),
    });
    if let (Some(id), Some(name)) = (&e.info.project_id, &e.project_name) {
        v["project"] = json!({"id": id, "name": name});
    }
    v[e.info.event_type.as_str()] = e.payload.clone();
    v
}

/// The answer while audit logging is off (see the module doc).
fn audit_off() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Audit logging is not enabled for this organization. An organization owner can \
         enable it in the organization settings (Data controls).",
    )
}

pub(super) async fn list(
    State(sim): State<OpenAiSim>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(q);
    let limit = query_limit(&pairs, 20, 100)?;
    let bound = |op: &str| query_int(&pairs, &format!("effective_at[{op}]"));
    let (gt, gte, lt, lte) = (bound("gt")?, bound("gte")?, bound("lt")?, bound("lte")?);
    let project_ids = multi(&pairs, "project_ids");
    let event_types = multi(&pairs, "event_types");
    let actor_ids = multi(&pairs, "actor_ids");
    let actor_emails = multi(&pairs, "actor_emails");
    let resource_ids = multi(&pairs, "resource_ids");
    // No event here is tenant-scoped: `tenant_only=true` matches nothing.
    let tenant_only = match query_value(&pairs, "tenant_only") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "Invalid type for 'tenant_only': expected a boolean, but got a string instead.",
            )
            .param("tenant_only")
            .code("invalid_type"))
        }
    };
    let st = sim.lock();
    if !st.audit.enabled {
        return Err(audit_off());
    }
    let keep = |e: &AuditRec| {
        let i = &e.info;
        let t = i.effective_at;
        !tenant_only
            && gt.is_none_or(|b| t > b)
            && gte.is_none_or(|b| t >= b)
            && lt.is_none_or(|b| t < b)
            && lte.is_none_or(|b| t <= b)
            && (project_ids.is_empty()
                || i.project_id
                    .as_ref()
                    .is_some_and(|p| project_ids.contains(p)))
            && (event_types.is_empty() || event_types.contains(&i.event_type))
            && (actor_ids.is_empty() || actor_ids.iter().any(|a| i.actor.has_id(a)))
            && (actor_emails.is_empty()
                || i.actor
                    .email()
                    .is_some_and(|m| actor_emails.iter().any(|a| a == m)))
            && (resource_ids.is_empty() || resource_ids.contains(&i.resource_id))
    };
    // Newest first; `after` pages on to older events, `before` back to newer ones.
    let all: Vec<&AuditRec> = st.audit.events.iter().rev().collect();
    let cursor = |name: &str| -> Result<Option<usize>, ApiError> {
        match query_value(&pairs, name) {
            None => Ok(None),
            Some(id) => all
                .iter()
                .position(|e| e.info.id == id)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Invalid '{name}': no object with id '{id}' in this list."
                    ))
                    .param(name)
                }),
        }
    };
    let (after, before) = (cursor("after")?, cursor("before")?);
    let lo = after.map_or(0, |i| i + 1);
    let hi = before.unwrap_or(all.len()).max(lo);
    let window: Vec<&AuditRec> = all[lo..hi].iter().copied().filter(|e| keep(e)).collect();
    let (page, has_more) = if before.is_some() && after.is_none() {
        // The `limit` events just before the cursor.
        let skip = window.len().saturating_sub(limit);
        (window[skip..].to_vec(), skip > 0)
    } else {
        let more = window.len() > limit;
        (window.into_iter().take(limit).collect(), more)
    };
    let data: Vec<Value> = page.iter().map(|e| event_json(e)).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": page.first().map(|e| e.info.id.clone()),
        "last_id": page.last().map(|e| e.info.id.clone()),
        "has_more": has_more,
    })))
}
