//! `GET /v1/organization/usage/completions`: the chat completions this simulator actually
//! served, in time buckets, filtered and grouped like upstream.

use super::admin::{query_int, query_limit, query_pairs, query_value};
use super::error::ApiError;
use super::OpenAiSim;
use axum::extract::{RawQuery, State};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One served model request.
pub(super) struct UsageEvent {
    pub at: i64,
    pub project_id: String,
    pub api_key_id: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

const GROUP_FIELDS: &[&str] = &[
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
];

/// All values of an array parameter, in either encoding clients use: `name=a&name=b` (the
/// description's form style) and `name[]=a` (the official Python SDK).
fn multi(pairs: &[(String, String)], name: &str) -> Vec<String> {
    let bracketed = format!("{name}[]");
    pairs
        .iter()
        .filter(|(k, _)| *k == name || *k == bracketed)
        .map(|(_, v)| v.clone())
        .collect()
}

/// `page_` + base64 of the next bucket's start (big-endian i64), like upstream's opaque
/// `page_AAAA...` cursors.
fn encode_page(bucket_start: i64) -> String {
    format!(
        "page_{}",
        base64::engine::general_purpose::STANDARD.encode(bucket_start.to_be_bytes())
    )
}

fn decode_page(page: &str) -> Option<i64> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(page.strip_prefix("page_")?)
        .ok()?;
    Some(i64::from_be_bytes(raw.try_into().ok()?))
}

/// Group key: (project_id, api_key_id, model, batch, service_tier), each set only when
/// grouped by it. `user_id` stays null: service-account keys have no user.
type GroupKey = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<String>,
);

pub(super) async fn completions(
    State(sim): State<OpenAiSim>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(q);
    let start =
        query_int(&pairs, "start_time")?.ok_or_else(|| ApiError::missing_param("start_time"))?;
    let (width, default_limit, max_limit) = match query_value(&pairs, "bucket_width") {
        None | Some("1d") => (86_400, 7, 31),
        Some("1h") => (3_600, 24, 168),
        Some("1m") => (60, 60, 1_440),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid 'bucket_width': '{other}'. Supported values are: '1m', '1h' and '1d'."
            ))
            .param("bucket_width")
            .code("invalid_value"))
        }
    };
    let limit = query_limit(&pairs, default_limit, max_limit)?;
    let group_by = multi(&pairs, "group_by");
    if let Some(bad) = group_by
        .iter()
        .find(|g| !GROUP_FIELDS.contains(&g.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "Invalid 'group_by': '{bad}'. Supported values are: {}.",
            GROUP_FIELDS.join(", ")
        ))
        .param("group_by")
        .code("invalid_value"));
    }
    let grouped = |f: &str| group_by.iter().any(|g| g == f);
    let project_ids = multi(&pairs, "project_ids");
    let api_key_ids = multi(&pairs, "api_key_ids");
    let models = multi(&pairs, "models");
    let user_ids = multi(&pairs, "user_ids");
    // Nothing here is a batch job: `batch=true` matches nothing, `false` everything.
    let batch_only = match query_value(&pairs, "batch") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "Invalid type for 'batch': expected a boolean, but got a string instead.",
            )
            .param("batch")
            .code("invalid_type"))
        }
    };

    let st = sim.lock();
    // Without `end_time` the range runs to the end of the current bucket, so a request
    // served this very second is already counted.
    let end =
        query_int(&pairs, "end_time")?.unwrap_or_else(|| (st.now().div_euclid(width) + 1) * width);
    if end <= start {
        return Err(ApiError::bad_request(
            "Invalid 'end_time': must be greater than 'start_time'.",
        )
        .param("end_time"));
    }
    // Buckets are aligned to the width in UTC (a 1d bucket starts at midnight).
    let first = start.div_euclid(width) * width;
    let mut bucket = match query_value(&pairs, "page") {
        None => first,
        Some(p) => match decode_page(p) {
            Some(b) if b >= first && b < end && b.rem_euclid(width) == 0 => b,
            _ => {
                return Err(
                    ApiError::bad_request("Invalid 'page': not a cursor of this query.")
                        .param("page"),
                )
            }
        },
    };
    let selected = |e: &UsageEvent| {
        e.at >= start
            && e.at < end
            && !batch_only
            && user_ids.is_empty()
            && (project_ids.is_empty() || project_ids.contains(&e.project_id))
            && (api_key_ids.is_empty() || api_key_ids.contains(&e.api_key_id))
            && (models.is_empty() || models.contains(&e.model))
    };
    let mut data = Vec::new();
    while bucket < end && data.len() < limit {
        let bucket_end = bucket + width;
        let mut groups: BTreeMap<GroupKey, (u64, u64, u64)> = BTreeMap::new();
        for e in st
            .usage
            .iter()
            .filter(|e| e.at >= bucket && e.at < bucket_end && selected(e))
        {
            let key = (
                grouped("project_id").then(|| e.project_id.clone()),
                grouped("api_key_id").then(|| e.api_key_id.clone()),
                grouped("model").then(|| e.model.clone()),
                grouped("batch").then_some(false),
                grouped("service_tier").then(|| "default".to_string()),
            );
            let g = groups.entry(key).or_default();
            g.0 += 1;
            g.1 += e.input_tokens;
            g.2 += e.output_tokens;
        }
        let results: Vec<Value> = groups
            .into_iter()
            .map(
                |((project_id, api_key_id, model, batch, tier), (n, input, output))| {
                    json!({
                        "object": "organization.usage.completions.result",
                        "input_tokens": input,
                        "input_cached_tokens": 0,
                        "output_tokens": output,
                        "input_audio_tokens": 0,
                        "output_audio_tokens": 0,
                        "num_model_requests": n,
                        "project_id": project_id,
                        "user_id": null,
                        "api_key_id": api_key_id,
                        "model": model,
                        "batch": batch,
                        "service_tier": tier,
                    })
                },
            )
            .collect();
        data.push(json!({
            "object": "bucket",
            "start_time": bucket,
            "end_time": bucket_end,
            "results": results,
        }));
        bucket = bucket_end;
    }
    let has_more = bucket < end;
    Ok(Json(json!({
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": has_more.then(|| encode_page(bucket)),
    })))
}
