//! The Usage API: `GET /v1/organization/usage/{endpoint}` for every endpoint of the official
//! description that filters by `api_key_ids` ([`UsageEndpoint`]), in time buckets, filtered
//! and grouped like upstream, from what this simulator served or a test planted.
//!
//! Storage is per (endpoint, key, dimensions) a time-ordered run of per-minute buckets (the
//! API's finest width), kept for [`HISTORY_SECS`] behind the series' newest minute: recording
//! a call at "now" is O(1) (merge into or append after the last minute, drop minutes that
//! fell out of the window), planting history out of order is a binary search and an insert.
//! Each minute also keeps the first and last second it saw use, so a query whose
//! `start_time`/`end_time` cuts through a minute counts that minute whole when any of its use
//! falls inside the range and not at all otherwise: a drain check never misses use at its
//! edge, and never sees use that ended before `since`.

use super::admin::{query_int, query_limit, query_pairs, query_value};
use super::error::ApiError;
use super::OpenAiSim;
use axum::extract::{RawQuery, State};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How long usage history is kept behind a series' newest minute: 8 days (a week of
/// baseline plus a day), so per key and endpoint at most 11,520 minutes.
pub const HISTORY_SECS: i64 = 8 * 86_400;

/// The usage endpoints that can tell one key's use (`api_key_ids`). `vector_stores` and
/// `code_interpreter_sessions` filter by project only and are not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageEndpoint {
    Completions,
    Embeddings,
    Moderations,
    Images,
    AudioSpeeches,
    AudioTranscriptions,
    FileSearchCalls,
    WebSearchCalls,
}

impl UsageEndpoint {
    pub const ALL: [UsageEndpoint; 8] = [
        UsageEndpoint::Completions,
        UsageEndpoint::Embeddings,
        UsageEndpoint::Moderations,
        UsageEndpoint::Images,
        UsageEndpoint::AudioSpeeches,
        UsageEndpoint::AudioTranscriptions,
        UsageEndpoint::FileSearchCalls,
        UsageEndpoint::WebSearchCalls,
    ];

    /// The path segment under `/v1/organization/usage/`.
    pub fn path(self) -> &'static str {
        match self {
            UsageEndpoint::Completions => "completions",
            UsageEndpoint::Embeddings => "embeddings",
            UsageEndpoint::Moderations => "moderations",
            UsageEndpoint::Images => "images",
            UsageEndpoint::AudioSpeeches => "audio_speeches",
            UsageEndpoint::AudioTranscriptions => "audio_transcriptions",
            UsageEndpoint::FileSearchCalls => "file_search_calls",
            UsageEndpoint::WebSearchCalls => "web_search_calls",
        }
    }

    /// The operation name in [`super::OPERATIONS`] (as the real client names it too).
    pub fn operation(self) -> &'static str {
        match self {
            UsageEndpoint::Completions => "usage.completions",
            UsageEndpoint::Embeddings => "usage.embeddings",
            UsageEndpoint::Moderations => "usage.moderations",
            UsageEndpoint::Images => "usage.images",
            UsageEndpoint::AudioSpeeches => "usage.audio_speeches",
            UsageEndpoint::AudioTranscriptions => "usage.audio_transcriptions",
            UsageEndpoint::FileSearchCalls => "usage.file_search_calls",
            UsageEndpoint::WebSearchCalls => "usage.web_search_calls",
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.path() == path)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The result object's `object` (the description's discriminator).
    fn result_object(self) -> &'static str {
        match self {
            UsageEndpoint::Completions => "organization.usage.completions.result",
            UsageEndpoint::Embeddings => "organization.usage.embeddings.result",
            UsageEndpoint::Moderations => "organization.usage.moderations.result",
            UsageEndpoint::Images => "organization.usage.images.result",
            UsageEndpoint::AudioSpeeches => "organization.usage.audio_speeches.result",
            UsageEndpoint::AudioTranscriptions => "organization.usage.audio_transcriptions.result",
            UsageEndpoint::FileSearchCalls => "organization.usage.file_searches.result",
            UsageEndpoint::WebSearchCalls => "organization.usage.web_searches.result",
        }
    }

    /// `group_by` values the description allows here.
    fn group_fields(self) -> &'static [&'static str] {
        match self {
            UsageEndpoint::Completions => &[
                "project_id",
                "user_id",
                "api_key_id",
                "model",
                "batch",
                "service_tier",
            ],
            UsageEndpoint::Images => &[
                "project_id",
                "user_id",
                "api_key_id",
                "model",
                "size",
                "source",
            ],
            UsageEndpoint::FileSearchCalls => {
                &["project_id", "user_id", "api_key_id", "vector_store_id"]
            }
            UsageEndpoint::WebSearchCalls => &[
                "project_id",
                "user_id",
                "api_key_id",
                "model",
                "context_level",
            ],
            _ => &["project_id", "user_id", "api_key_id", "model"],
        }
    }

    /// What one planted request ([`OpenAiSim::record_usage`]) is: its dimensions and amounts.
    /// Fixed and documented so tests can predict them.
    pub(super) fn planted(self, n: u64) -> (UsageDims, Counters) {
        let dims = |model: &str| UsageDims {
            model: Some(model.to_string()),
            ..UsageDims::default()
        };
        let c = |input_tokens: u64, output_tokens: u64, units: u64| Counters {
            requests: n,
            input_tokens: input_tokens * n,
            output_tokens: output_tokens * n,
            units: units * n,
        };
        match self {
            UsageEndpoint::Completions => (dims("gpt-4o-mini"), c(10, 10, 0)),
            UsageEndpoint::Embeddings => (dims("text-embedding-3-small"), c(10, 0, 0)),
            UsageEndpoint::Moderations => (dims("omni-moderation-latest"), c(10, 0, 0)),
            UsageEndpoint::Images => (
                UsageDims {
                    size: Some("1024x1024".into()),
                    source: Some("image.generation".into()),
                    ..dims("gpt-image-1")
                },
                c(0, 0, 1),
            ),
            UsageEndpoint::AudioSpeeches => (dims("gpt-4o-mini-tts"), c(0, 0, 100)),
            UsageEndpoint::AudioTranscriptions => (dims("gpt-4o-transcribe"), c(0, 0, 5)),
            UsageEndpoint::FileSearchCalls => (
                UsageDims {
                    vector_store_id: Some("vs_sim".into()),
                    ..UsageDims::default()
                },
                c(0, 0, 0),
            ),
            UsageEndpoint::WebSearchCalls => (
                UsageDims {
                    context_level: Some("medium".into()),
                    ..dims("gpt-4o-mini")
                },
                // One search per model request.
                c(0, 0, 1),
            ),
        }
    }
}

impl std::str::FromStr for UsageEndpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_path(s).ok_or_else(|| format!("no usage endpoint {s:?}"))
    }
}

/// The dimensions a series is recorded under (besides project and key); unset ones are
/// meaningless for the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct UsageDims {
    pub model: Option<String>,
    pub vector_store_id: Option<String>,
    pub size: Option<String>,
    pub source: Option<String>,
    pub context_level: Option<String>,
}

/// Amounts of one minute. `requests` is `num_model_requests` (`num_requests` for file
/// searches); `units` is images, characters, seconds, or web searches (`num_requests`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counters {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub units: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.units = self.units.saturating_add(o.units);
    }
}

struct Minute {
    /// Start of the minute (Unix seconds, a multiple of 60).
    start: i64,
    /// First and last second with use in this minute.
    first: i64,
    last: i64,
    c: Counters,
}

struct Series {
    project_id: String,
    dims: UsageDims,
    /// Ascending by `start`, at most `HISTORY_SECS / 60` entries.
    minutes: VecDeque<Minute>,
}

impl Series {
    fn add(&mut self, at: i64, c: &Counters) {
        let start = at.div_euclid(60) * 60;
        let merge = |m: &mut Minute| {
            m.first = m.first.min(at);
            m.last = m.last.max(at);
            m.c.add(c);
        };
        let fresh = || Minute {
            start,
            first: at,
            last: at,
            c: *c,
        };
        match self.minutes.back_mut() {
            Some(m) if m.start == start => merge(m),
            Some(m) if m.start > start => {
                // Planted history: out of order.
                let i = self.minutes.partition_point(|m| m.start < start);
                match self.minutes.get_mut(i) {
                    Some(m) if m.start == start => merge(m),
                    _ => self.minutes.insert(i, fresh()),
                }
            }
            _ => self.minutes.push_back(fresh()),
        }
        let newest = self.minutes.back().map_or(start, |m| m.start);
        while self
            .minutes
            .front()
            .is_some_and(|m| m.start <= newest - HISTORY_SECS)
        {
            self.minutes.pop_front();
        }
    }
}

/// All usage, per endpoint and key id.
#[derive(Default)]
pub(super) struct UsageStore {
    series: [HashMap<String, Vec<Series>>; 8],
}

impl UsageStore {
    /// Add `c` at second `at` for `key_id` (of `project_id`) under `dims`.
    pub fn record(
        &mut self,
        endpoint: UsageEndpoint,
        key_id: &str,
        project_id: &str,
        dims: UsageDims,
        at: i64,
        c: Counters,
    ) {
        let list = self.series[endpoint.index()]
            .entry(key_id.to_string())
            .or_default();
        let i = match list.iter().position(|s| s.dims == dims) {
            Some(i) => i,
            None => {
                list.push(Series {
                    project_id: project_id.to_string(),
                    dims,
                    minutes: VecDeque::new(),
                });
                list.len() - 1
            }
        };
        list[i].add(at, &c);
    }

    /// Minutes kept for one key on one endpoint (all dimensions): what the history bound
    /// is checked against.
    pub fn minutes_kept(&self, endpoint: UsageEndpoint, key_id: &str) -> usize {
        self.series[endpoint.index()]
            .get(key_id)
            .map_or(0, |l| l.iter().map(|s| s.minutes.len()).sum())
    }
}

/// All values of an array parameter, in either encoding clients use: `name=a&name=b` (the
/// description's form style) and `name[]=a` (the official Python SDK).
pub(super) fn multi(pairs: &[(String, String)], name: &str) -> Vec<String> {
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

/// One result group: each field set only when grouped by it. `user_id` stays null:
/// service-account keys have no user.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    project_id: Option<String>,
    api_key_id: Option<String>,
    model: Option<String>,
    batch: Option<bool>,
    service_tier: Option<String>,
    size: Option<String>,
    source: Option<String>,
    vector_store_id: Option<String>,
    context_level: Option<String>,
}

fn invalid_value(param: &str, got: &str, allowed: &[&str]) -> ApiError {
    ApiError::bad_request(format!(
        "Invalid '{param}': '{got}'. Supported values are: {}.",
        allowed.join(", ")
    ))
    .param(param)
    .code("invalid_value")
}

/// An array filter whose items the description restricts to `allowed`.
fn enum_filter(
    pairs: &[(String, String)],
    name: &str,
    allowed: &[&str],
) -> Result<Vec<String>, ApiError> {
    let values = multi(pairs, name);
    match values.iter().find(|v| !allowed.contains(&v.as_str())) {
        Some(bad) => Err(invalid_value(name, bad, allowed)),
        None => Ok(values),
    }
}

/// The filters of one query; an empty list matches everything.
struct Filters {
    project_ids: Vec<String>,
    api_key_ids: Vec<String>,
    user_ids: Vec<String>,
    models: Vec<String>,
    sources: Vec<String>,
    sizes: Vec<String>,
    vector_store_ids: Vec<String>,
    context_levels: Vec<String>,
    batch_only: bool,
}

fn matches(list: &[String], v: &Option<String>) -> bool {
    list.is_empty() || v.as_ref().is_some_and(|v| list.contains(v))
}

impl Filters {
    fn parse(ep: UsageEndpoint, pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let only = |yes: bool, name: &str| if yes { multi(pairs, name) } else { Vec::new() };
        let images = ep == UsageEndpoint::Images;
        // Nothing here is a batch job: `batch=true` matches nothing, `false` everything.
        let batch_only = match query_value(pairs, "batch") {
            _ if ep != UsageEndpoint::Completions => false,
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
        Ok(Filters {
            project_ids: multi(pairs, "project_ids"),
            api_key_ids: multi(pairs, "api_key_ids"),
            user_ids: multi(pairs, "user_ids"),
            models: only(ep != UsageEndpoint::FileSearchCalls, "models"),
            sources: if images {
                enum_filter(
                    pairs,
                    "sources",
                    &["image.generation", "image.edit", "image.variation"],
                )?
            } else {
                Vec::new()
            },
            sizes: if images {
                enum_filter(
                    pairs,
                    "sizes",
                    &["256x256", "512x512", "1024x1024", "1792x1792", "1024x1792"],
                )?
            } else {
                Vec::new()
            },
            vector_store_ids: only(ep == UsageEndpoint::FileSearchCalls, "vector_store_ids"),
            context_levels: if ep == UsageEndpoint::WebSearchCalls {
                enum_filter(pairs, "context_levels", &["low", "medium", "high"])?
            } else {
                Vec::new()
            },
            batch_only,
        })
    }

    fn selects(&self, key_id: &str, s: &Series) -> bool {
        !self.batch_only
            && self.user_ids.is_empty()
            && (self.project_ids.is_empty() || self.project_ids.contains(&s.project_id))
            && (self.api_key_ids.is_empty() || self.api_key_ids.iter().any(|k| k == key_id))
            && matches(&self.models, &s.dims.model)
            && matches(&self.sources, &s.dims.source)
            && matches(&self.sizes, &s.dims.size)
            && matches(&self.vector_store_ids, &s.dims.vector_store_id)
            && matches(&self.context_levels, &s.dims.context_level)
    }
}

/// The result object of `ep` for one group, exactly the description's fields.
fn result_json(ep: UsageEndpoint, g: GroupKey, c: Counters) -> Value {
    let mut r = json!({
        "object": ep.result_object(),
        "project_id": g.project_id,
        "user_id": null,
        "api_key_id": g.api_key_id,
    });
    let fields = match ep {
        UsageEndpoint::Completions => json!({
            "input_tokens": c.input_tokens,
            "input_cached_tokens": 0,
            "output_tokens": c.output_tokens,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": c.requests,
            "model": g.model,
            "batch": g.batch,
            "service_tier": g.service_tier,
        }),
        UsageEndpoint::Embeddings | UsageEndpoint::Moderations => json!({
            "input_tokens": c.input_tokens,
            "num_model_requests": c.requests,
            "model": g.model,
        }),
        UsageEndpoint::Images => json!({
            "images": c.units,
            "num_model_requests": c.requests,
            "source": g.source,
            "size": g.size,
            "model": g.model,
        }),
        UsageEndpoint::AudioSpeeches => json!({
            "characters": c.units,
            "num_model_requests": c.requests,
            "model": g.model,
        }),
        UsageEndpoint::AudioTranscriptions => json!({
            "seconds": c.units,
            "num_model_requests": c.requests,
            "model": g.model,
        }),
        UsageEndpoint::FileSearchCalls => json!({
            "num_requests": c.requests,
            "vector_store_id": g.vector_store_id,
        }),
        UsageEndpoint::WebSearchCalls => json!({
            "num_model_requests": c.requests,
            "num_requests": c.units,
            "model": g.model,
            "context_level": g.context_level,
        }),
    };
    if let (Some(r), Value::Object(f)) = (r.as_object_mut(), fields) {
        r.extend(f);
    }
    r
}

/// The handler of every usage route; the endpoint comes from the route.
pub(super) async fn usage(
    ep: UsageEndpoint,
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
        Some(other) => return Err(invalid_value("bucket_width", other, &["1m", "1h", "1d"])),
    };
    let limit = query_limit(&pairs, default_limit, max_limit)?;
    let group_by = multi(&pairs, "group_by");
    let allowed = ep.group_fields();
    if let Some(bad) = group_by.iter().find(|g| !allowed.contains(&g.as_str())) {
        return Err(invalid_value("group_by", bad, allowed));
    }
    let grouped = |f: &str| group_by.iter().any(|g| g == f);
    let filters = Filters::parse(ep, &pairs)?;

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
    let page_start = match query_value(&pairs, "page") {
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
    // Buckets of this page: from page_start, at most `limit`, the last one reaching `end`.
    let n_buckets = usize::try_from((end - page_start + width - 1).div_euclid(width))
        .unwrap_or(0)
        .min(limit);
    let page_end = page_start + width * n_buckets as i64;
    let mut buckets: Vec<BTreeMap<GroupKey, Counters>> = vec![BTreeMap::new(); n_buckets];

    let store = &st.usage.series[ep.index()];
    let mut add_key = |key_id: &str, list: &Vec<Series>| {
        for s in list.iter().filter(|s| filters.selects(key_id, s)) {
            let from = s.minutes.partition_point(|m| m.start < page_start);
            for m in s.minutes.range(from..) {
                if m.start >= page_end {
                    break;
                }
                if m.last < start || m.first >= end {
                    continue;
                }
                let Ok(b) = usize::try_from((m.start - page_start).div_euclid(width)) else {
                    continue;
                };
                let g = GroupKey {
                    project_id: grouped("project_id").then(|| s.project_id.clone()),
                    api_key_id: grouped("api_key_id").then(|| key_id.to_string()),
                    model: if grouped("model") {
                        s.dims.model.clone()
                    } else {
                        None
                    },
                    batch: grouped("batch").then_some(false),
                    service_tier: grouped("service_tier").then(|| "default".to_string()),
                    size: if grouped("size") {
                        s.dims.size.clone()
                    } else {
                        None
                    },
                    source: if grouped("source") {
                        s.dims.source.clone()
                    } else {
                        None
                    },
                    vector_store_id: if grouped("vector_store_id") {
                        s.dims.vector_store_id.clone()
                    } else {
                        None
                    },
                    context_level: if grouped("context_level") {
                        s.dims.context_level.clone()
                    } else {
                        None
                    },
                };
                if let Some(bucket) = buckets.get_mut(b) {
                    bucket.entry(g).or_default().add(&m.c);
                }
            }
        }
    };
    if filters.api_key_ids.is_empty() {
        for (key_id, list) in store {
            add_key(key_id, list);
        }
    } else {
        let mut keys = filters.api_key_ids.clone();
        keys.sort();
        keys.dedup();
        for key_id in &keys {
            if let Some(list) = store.get(key_id) {
                add_key(key_id, list);
            }
        }
    }
    let data: Vec<Value> = buckets
        .into_iter()
        .enumerate()
        .map(|(i, groups)| {
            let bucket = page_start + width * i as i64;
            let results: Vec<Value> = groups
                .into_iter()
                .map(|(g, c)| result_json(ep, g, c))
                .collect();
            json!({
                "object": "bucket",
                "start_time": bucket,
                "end_time": bucket + width,
                "results": results,
            })
        })
        .collect();
    let has_more = page_end < end;
    Ok(Json(json!({
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": has_more.then(|| encode_page(page_end)),
    })))
}
