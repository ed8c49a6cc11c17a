//! OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`, all four keys
//! always present (`param` and `code` may be null), as the description's `Error` requires.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error answered in OpenAI's shape. Messages never contain key values (callers pass
/// redacted forms only).
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An `invalid_request_error` with null param and code.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }

    /// Upstream's answer to a request without a bearer key.
    pub fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). \
             You can obtain an API key from https://platform.openai.com/account/api-keys.",
        )
    }

    /// Upstream's answer to a wrong or revoked key; `shown` is already redacted.
    pub fn incorrect_key(shown: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "Incorrect API key provided: {shown}. You can find your API key at \
                 https://platform.openai.com/account/api-keys."
            ),
        )
        .code("invalid_api_key")
    }

    /// `Missing required parameter: 'name'.`
    pub fn missing_param(param: &str) -> Self {
        Self::bad_request(format!("Missing required parameter: '{param}'."))
            .param(param)
            .code("missing_required_parameter")
    }

    /// `Invalid type for 'name': expected a string, but got an integer instead.`
    pub fn invalid_type(param: &str, expected: &str, got: &serde_json::Value) -> Self {
        let got = match got {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
            serde_json::Value::Number(_) => "a decimal",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        Self::bad_request(format!(
            "Invalid type for '{param}': expected {expected}, but got {got} instead."
        ))
        .param(param)
        .code("invalid_type")
    }

    /// A body that is not JSON (upstream's wording, shortened).
    pub fn unparsable_json() -> Self {
        Self::bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON.)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        resp.headers_mut().extend(self.headers);
        resp
    }
}
