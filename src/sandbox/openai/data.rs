//! The minimal data plane: `GET /v1/models` and `POST /v1/chat/completions`, authenticated
//! by a project (service-account) key that is neither deleted nor expired. Every accepted
//! call counts, sets the key's `last_used_at`, and chat completions feed the Usage API's
//! completions endpoint (the only usage endpoint with a data-plane call here).

use super::admin::bearer;
use super::error::ApiError;
use super::usage::{Counters, UsageDims, UsageEndpoint};
use super::{new_id, redact, OpenAiSim};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

/// The fixed model list: (id, created, owned_by).
const MODELS: &[(&str, i64, &str)] = &[
    ("gpt-4o-mini", 1_721_172_741, "system"),
    ("gpt-4o", 1_715_367_049, "system"),
    ("gpt-4.1-mini", 1_744_318_173, "system"),
    ("gpt-4.1-nano", 1_744_321_707, "system"),
    ("text-embedding-3-small", 1_705_948_997, "system"),
];

/// The canned assistant answer.
const ANSWER: &str = "Hello from the OpenAI simulator.";

/// Resolve the caller's key to its account index, counting 401s. An expired key gets the
/// same 401 as a deleted one.
fn authenticate(sim: &OpenAiSim, headers: &HeaderMap) -> Result<usize, ApiError> {
    let mut st = sim.lock();
    let found = match bearer(headers) {
        None => Err(ApiError::missing_key()),
        Some(key) => st
            .live_key(key)
            .ok_or_else(|| ApiError::incorrect_key(&redact(key, "****"))),
    };
    if found.is_err() {
        st.counts.rejected_401 += 1;
    }
    found
}

/// Count an accepted call for the account at `idx` (and its usage, for model requests).
fn record(sim: &OpenAiSim, idx: usize, tokens: Option<(&str, u64, u64)>) {
    let mut st = sim.lock();
    let now = st.now();
    let account = &mut st.accounts[idx];
    let Some(key) = account.key.as_mut() else {
        return;
    };
    key.last_used_at = Some(now);
    let key_id = key.id.clone();
    let project_id = account.project_id.clone();
    st.counts.accepted += 1;
    *st.served.entry(key_id.clone()).or_default() += 1;
    if let Some((model, input_tokens, output_tokens)) = tokens {
        let dims = UsageDims {
            model: Some(model.to_string()),
            ..UsageDims::default()
        };
        let c = Counters {
            requests: 1,
            input_tokens,
            output_tokens,
            units: 0,
        };
        st.usage.record(
            UsageEndpoint::Completions,
            &key_id,
            &project_id,
            dims,
            now,
            c,
        );
    }
}

pub(super) async fn list_models(
    State(sim): State<OpenAiSim>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let idx = authenticate(&sim, &headers)?;
    record(&sim, idx, None);
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(id, created, owner)| {
            json!({"id": id, "object": "model", "created": created, "owned_by": owner})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Rough token count (about 4 characters a token), deterministic so tests can predict it.
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// The text of a message's `content`: a string or an array of `{type: "text", text}` parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

pub(super) async fn chat_completion(
    State(sim): State<OpenAiSim>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let idx = authenticate(&sim, &headers)?;
    let body: Value = serde_json::from_slice(&body).map_err(|_| ApiError::unparsable_json())?;
    let Some(obj) = body.as_object() else {
        return Err(ApiError::bad_request(
            "Invalid request body: expected a JSON object.",
        ));
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("you must provide a model parameter"))
        }
        Some(Value::String(m)) => m.clone(),
        Some(other) => return Err(ApiError::invalid_type("model", "a string", other)),
    };
    let messages = match obj.get("messages") {
        None => return Err(ApiError::missing_param("messages")),
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(ApiError::bad_request(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, \
                 but got an empty array instead.",
            )
            .param("messages")
            .code("empty_array"))
        }
        Some(Value::Array(m)) => m,
        Some(other) => return Err(ApiError::invalid_type("messages", "an array", other)),
    };
    let mut prompt_tokens = 3;
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(ApiError::missing_param(&format!("messages[{i}].role")));
        }
        prompt_tokens += 4 + tokens(&content_text(m.get("content")));
    }
    if obj.get("stream") == Some(&Value::Bool(true)) {
        // Streaming is not modelled; say so rather than answer in the wrong format.
        return Err(
            ApiError::bad_request("The simulator does not support 'stream': true.").param("stream"),
        );
    }
    if !MODELS.iter().any(|(id, _, _)| *id == model) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found"));
    }
    let completion_tokens = tokens(ANSWER);
    record(&sim, idx, Some((&model, prompt_tokens, completion_tokens)));
    Ok(Json(json!({
        "id": new_id("chatcmpl-", 29),
        "object": "chat.completion",
        "created": sim.now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": ANSWER,
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_sim",
    })))
}
