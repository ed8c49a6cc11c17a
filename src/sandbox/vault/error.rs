//! The simulated API's errors and replies, in Vault's status codes, bodies and encoding.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

pub(super) const MSG_UNSUPPORTED: &str = "1 error occurred:\n\t* unsupported operation\n\n";

/// The errors the simulated API answers with, each mapped to Vault's status and body.
/// Messages never contain request values (a key value must not echo back in an error).
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("permission denied")]
    PermissionDenied,
    /// A 403 that says why (Kubernetes auth's binding checks).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Vault's bare 404: `{"errors":[]}`.
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported operation")]
    Unsupported,
    #[error("no handler for route {0:?}")]
    NoRoute(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("injected fault: HTTP {0}")]
    Injected(u16),
    #[error("Vault is sealed")]
    Sealed,
    /// A 500 with a message (never a request value in it).
    #[error("{0}")]
    Internal(String),
    /// Vault's 405 outside KV (e.g. `GET auth/kubernetes/login`): one bare message.
    #[error("unsupported operation")]
    UnsupportedPlain,
}

impl ApiError {
    pub(super) fn reply(&self) -> Reply {
        let (status, errors): (StatusCode, Vec<String>) = match self {
            ApiError::PermissionDenied => (StatusCode::FORBIDDEN, vec!["permission denied".into()]),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, vec![m.to_string()]),
            ApiError::NotFound => (StatusCode::NOT_FOUND, vec![]),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, vec![m.clone()]),
            ApiError::Unsupported => (StatusCode::METHOD_NOT_ALLOWED, vec![MSG_UNSUPPORTED.into()]),
            ApiError::NoRoute(p) => (
                StatusCode::NOT_FOUND,
                vec![format!(
                    "no handler for route \"{p}\". route entry not found."
                )],
            ),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, vec![m.clone()]),
            ApiError::Sealed => (
                StatusCode::SERVICE_UNAVAILABLE,
                vec!["Vault is sealed".into()],
            ),
            ApiError::UnsupportedPlain => (
                StatusCode::METHOD_NOT_ALLOWED,
                vec!["unsupported operation".into()],
            ),
            ApiError::UnsupportedMediaType(m) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, vec![m.clone()])
            }
            ApiError::Injected(code) => {
                let status =
                    StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let msg = match status.as_u16() {
                    503 => "Vault is sealed".to_string(),
                    429 => "rate limit quota exceeded".to_string(),
                    500 => "internal error".to_string(),
                    _ => status
                        .canonical_reason()
                        .unwrap_or("injected fault")
                        .to_lowercase(),
                };
                (status, vec![msg])
            }
        };
        Reply::Json(status, json!({ "errors": errors }))
    }
}

/// A response before it becomes HTTP. No `Debug`: a success body holds key values.
pub(super) enum Reply {
    Json(StatusCode, Value),
    /// A non-2xx response that still carries the envelope (deleted version, invalid KV
    /// path): Vault writes these without the encoder's trailing newline.
    Enveloped(StatusCode, Value),
    /// 204, as Vault answers writes that return nothing.
    NoContent,
    /// A status with an empty body (Vault's PATCH of a missing key).
    Empty(StatusCode),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            // Go's json.Encoder ends every body with a newline; so do we.
            Reply::Json(s, v) => (s, format!("{v}\n")),
            Reply::Enveloped(s, v) => (s, v.to_string()),
            Reply::NoContent => (StatusCode::NO_CONTENT, String::new()),
            Reply::Empty(s) => (s, String::new()),
        };
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

pub(super) type ApiResult = Result<Reply, ApiError>;

/// Vault's response envelope around `data` (or `auth`).
pub(super) fn envelope(data: Value, auth: Value) -> Value {
    json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
    })
}

pub(super) fn ok(data: Value) -> ApiResult {
    Ok(Reply::Json(StatusCode::OK, envelope(data, Value::Null)))
}
