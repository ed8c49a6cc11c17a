//! Errors, rendered as the `Status` objects a real API server returns.

use super::discovery::ResInfo;
use http::StatusCode;
use serde_json::{json, Value};

/// One invalid field, as in `Status.details.causes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldCause {
    /// `FieldValueRequired`, `FieldValueInvalid`, ...
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// A failed API request. Messages never carry object data (Secret values, tokens).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KubeSimError {
    #[error("{qualified} \"{name}\" not found")]
    NotFound {
        qualified: String,
        group: String,
        plural: String,
        name: String,
    },
    #[error("{qualified} \"{name}\" already exists")]
    AlreadyExists {
        qualified: String,
        group: String,
        plural: String,
        name: String,
    },
    #[error("Operation cannot be fulfilled on {qualified} \"{name}\": {reason}")]
    Conflict {
        qualified: String,
        group: String,
        plural: String,
        name: String,
        reason: String,
    },
    #[error("{qualified_kind} \"{name}\" is invalid: {}", causes_text(.causes))]
    Invalid {
        qualified_kind: String,
        group: String,
        kind: String,
        name: String,
        causes: Vec<FieldCause>,
    },
    #[error("{0}")]
    BadRequest(String),
    /// A well-formed request the server cannot apply (a failing JSON-patch `test`).
    #[error("{0}")]
    Unprocessable(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A `resourceVersion` older than the watch history (`reason: Expired`, code 410).
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: u64, oldest: u64 },
    /// A fault injected by a test hook; `code` is the HTTP status to answer.
    #[error("{}", injected_message(*.code))]
    Injected { code: u16 },
}

fn causes_text(causes: &[FieldCause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

fn injected_message(code: u16) -> String {
    match code {
        409 => "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again (injected fault)".into(),
        429 => "Too many requests, please try again later (injected fault)".into(),
        503 => "the server is currently unable to handle the request (injected fault)".into(),
        504 => "the server was unable to return a response in the time allotted (injected fault)".into(),
        _ => "Internal error occurred: injected fault".into(),
    }
}

impl KubeSimError {
    pub fn not_found(info: &ResInfo, name: &str) -> Self {
        KubeSimError::NotFound {
            qualified: info.qualified(),
            group: info.group.into(),
            plural: info.plural.into(),
            name: name.into(),
        }
    }

    pub fn already_exists(info: &ResInfo, name: &str) -> Self {
        KubeSimError::AlreadyExists {
            qualified: info.qualified(),
            group: info.group.into(),
            plural: info.plural.into(),
            name: name.into(),
        }
    }

    /// The optimistic-concurrency conflict of a stale `resourceVersion`.
    pub fn conflict(info: &ResInfo, name: &str) -> Self {
        KubeSimError::Conflict {
            qualified: info.qualified(),
            group: info.group.into(),
            plural: info.plural.into(),
            name: name.into(),
            reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
        }
    }

    pub fn invalid(info: &ResInfo, name: &str, causes: Vec<FieldCause>) -> Self {
        KubeSimError::Invalid {
            qualified_kind: info.qualified_kind(),
            group: info.group.into(),
            kind: info.kind.into(),
            name: name.into(),
            causes,
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            KubeSimError::NotFound { .. } => StatusCode::NOT_FOUND,
            KubeSimError::AlreadyExists { .. } | KubeSimError::Conflict { .. } => {
                StatusCode::CONFLICT
            }
            KubeSimError::Invalid { .. } | KubeSimError::Unprocessable(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            KubeSimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            KubeSimError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            KubeSimError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            KubeSimError::Expired { .. } => StatusCode::GONE,
            KubeSimError::Injected { code } => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// `Status.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            KubeSimError::NotFound { .. } => "NotFound",
            KubeSimError::AlreadyExists { .. } => "AlreadyExists",
            KubeSimError::Conflict { .. } => "Conflict",
            KubeSimError::Invalid { .. } | KubeSimError::Unprocessable(_) => "Invalid",
            KubeSimError::BadRequest(_) => "BadRequest",
            KubeSimError::MethodNotAllowed => "MethodNotAllowed",
            KubeSimError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            KubeSimError::Expired { .. } => "Expired",
            KubeSimError::Injected { code } => match code {
                409 => "Conflict",
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            },
        }
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.status_code().as_u16(),
        });
        let details = match self {
            KubeSimError::NotFound {
                group,
                plural,
                name,
                ..
            }
            | KubeSimError::AlreadyExists {
                group,
                plural,
                name,
                ..
            }
            | KubeSimError::Conflict {
                group,
                plural,
                name,
                ..
            } => Some(details(name, group, plural)),
            KubeSimError::Invalid {
                group,
                kind,
                name,
                causes,
                ..
            } => {
                let mut d = details(name, group, kind);
                d["causes"] = causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                Some(d)
            }
            KubeSimError::Injected { code: 500 } => Some(json!({
                "causes": [{"message": "injected fault"}]
            })),
            _ => None,
        };
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }
}

fn details(name: &str, group: &str, kind: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind});
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d
}

/// A `Status` for a successful delete.
pub fn success_status(info: &ResInfo, name: &str, uid: &str) -> Value {
    let mut d = details(name, info.group, info.plural);
    d["uid"] = json!(uid);
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::kube::discovery::Res;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;

    #[test]
    fn statuses_look_like_the_api_servers() {
        let e = KubeSimError::not_found(Res::Deployment.info(), "web");
        let s = e.to_status();
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["code"], 404);
        assert_eq!(s["details"]["group"], "apps");
        let typed: Status = serde_json::from_value(s).unwrap();
        assert_eq!(typed.reason.as_deref(), Some("NotFound"));

        let c = KubeSimError::conflict(Res::Lease.info(), "leader").to_status();
        assert_eq!(c["reason"], "Conflict");
        assert_eq!(c["code"], 409);
        assert!(c["message"]
            .as_str()
            .unwrap()
            .starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\""));

        let i = KubeSimError::invalid(
            Res::Deployment.info(),
            "web",
            vec![FieldCause {
                reason: "FieldValueRequired",
                field: "spec.selector".into(),
                message: "Required value".into(),
            }],
        )
        .to_status();
        assert_eq!(i["code"], 422);
        assert_eq!(
            i["message"],
            "Deployment.apps \"web\" is invalid: spec.selector: Required value"
        );
        assert_eq!(i["details"]["causes"][0]["field"], "spec.selector");
        assert_eq!(
            KubeSimError::Injected { code: 503 }.reason(),
            "ServiceUnavailable"
        );
    }
}
