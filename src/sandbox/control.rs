//! What the three simulators' control APIs (`/_sim/...`) share: JSON in and out, and one
//! error shape, so a test drives every simulator the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

/// A control request the simulator refuses: 400 `{"error": "..."}`.
pub(crate) fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

/// Decode a control request body; an empty body is `T::default()`.
pub(crate) fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid body: {e}")))
}
