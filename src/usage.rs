//! One key's requests over time from the Usage API, summed over every endpoint that
//! filters by `api_key_ids` ([`crate::openai::USAGE_ENDPOINTS`]): what the usage-anomaly
//! detector compares. A port ([`UsageSource`]) so the detector is tested over a fake.

use crate::openai::{AdminRequest, CallError, OpenAiClient, USAGE_ENDPOINTS};
use crate::rotation::ports::{Backend, BackendError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Usage API `bucket_width` the daemon asks for (`1d` is too coarse to judge a spike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BucketWidth {
    #[serde(rename = "1m")]
    Minute,
    #[default]
    #[serde(rename = "1h")]
    Hour,
}

impl BucketWidth {
    pub fn as_str(self) -> &'static str {
        match self {
            BucketWidth::Minute => "1m",
            BucketWidth::Hour => "1h",
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            BucketWidth::Minute => 60,
            BucketWidth::Hour => 3600,
        }
    }

    /// Buckets per page: the API's maximum for the width.
    fn page_limit(self) -> u32 {
        match self {
            BucketWidth::Minute => 1440,
            BucketWidth::Hour => 168,
        }
    }
}

/// Requests of one key in `[start, end)`, all endpoints together (journaled by forensics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub requests: u64,
}

#[async_trait]
pub trait UsageSource: Send + Sync {
    /// Buckets of `key_id` (of `project`) from `start` to `end`, ascending by start; a
    /// bucket without use may be missing. Any endpoint failing fails the whole answer:
    /// a partial sum would under-count.
    async fn usage_buckets(
        &self,
        project: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        width: BucketWidth,
    ) -> Result<Vec<UsageBucket>, BackendError>;
}

/// Pages followed per endpoint at most (30 days of hours is 5).
const MAX_PAGES: usize = 8;

#[derive(Deserialize)]
struct Page {
    data: Vec<Bucket>,
    has_more: bool,
    next_page: Option<String>,
}

#[derive(Deserialize)]
struct Bucket {
    start_time: i64,
    end_time: i64,
    results: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    #[serde(default)]
    num_model_requests: Option<u64>,
    #[serde(default)]
    num_requests: Option<u64>,
    #[serde(default)]
    api_key_id: Option<String>,
}

impl Row {
    /// As the drain counts: the larger of the two counts (web search carries both).
    fn requests(&self) -> Option<u64> {
        match (self.num_model_requests, self.num_requests) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        }
    }
}

/// A 2xx answer the daemon cannot use: a `CallError` with the status it came with, so
/// callers that classify by status see "bad response", not a transport failure.
fn bad(op: &str, what: &str, msg: String) -> CallError {
    CallError {
        status: Some(200),
        timed_out: false,
        error: BackendError::Failed {
            backend: Backend::OpenAi,
            message: format!("{op} ({what}): {msg}"),
            transient: false,
        },
    }
}

#[async_trait]
impl UsageSource for OpenAiClient {
    async fn usage_buckets(
        &self,
        project: &str,
        key_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        width: BucketWidth,
    ) -> Result<Vec<UsageBucket>, BackendError> {
        fetch(self, project, key_id, start, end, width)
            .await
            .map_err(|e| e.error)
    }
}

/// The buckets of `key_id`, every endpoint summed, through the client's observed path (the
/// one fetch behind the anomaly detector and emergency forensics). The error keeps the
/// HTTP status, for callers that tell a 403 or a timeout from the rest.
pub(crate) async fn fetch(
    client: &OpenAiClient,
    project: &str,
    key_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    width: BucketWidth,
) -> Result<Vec<UsageBucket>, CallError> {
    let what = format!("project {project} key {key_id}");
    let mut sums: BTreeMap<(i64, i64), u64> = BTreeMap::new();
    for (endpoint, op) in USAGE_ENDPOINTS {
        let mut page: Option<String> = None;
        let mut done = false;
        for _ in 0..MAX_PAGES {
            let mut query = vec![
                ("start_time", start.timestamp().to_string()),
                ("end_time", end.timestamp().to_string()),
                ("bucket_width", width.as_str().to_string()),
                ("group_by", "api_key_id".to_string()),
                ("api_key_ids", key_id.to_string()),
                ("project_ids", project.to_string()),
                ("limit", width.page_limit().to_string()),
            ];
            if let Some(p) = &page {
                query.push(("page", p.clone()));
            }
            let parsed: Page = client
                .admin_json(AdminRequest {
                    op,
                    method: Method::GET,
                    segments: &["organization", "usage", endpoint],
                    query: &query,
                    body: None,
                    key: None,
                    retry: true,
                    gone_ok: false,
                    what: &what,
                })
                .await?
                .ok_or_else(|| bad(op, &what, "no body".into()))?;
            for b in &parsed.data {
                let mut n = 0u64;
                for r in &b.results {
                    if r.api_key_id.as_deref().is_some_and(|k| k != key_id) {
                        continue;
                    }
                    n = n.saturating_add(r.requests().ok_or_else(|| {
                        bad(
                            op,
                            &what,
                            "a usage result has neither num_model_requests nor num_requests".into(),
                        )
                    })?);
                }
                let e = sums.entry((b.start_time, b.end_time)).or_default();
                *e = e.saturating_add(n);
            }
            match (parsed.has_more, parsed.next_page) {
                (true, Some(next)) if page.as_deref() != Some(next.as_str()) => page = Some(next),
                (true, _) => {
                    return Err(bad(
                        op,
                        &what,
                        "has_more is true but next_page gives no new cursor".into(),
                    ))
                }
                (false, _) => {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            return Err(bad(
                op,
                &what,
                format!("still has_more after {MAX_PAGES} pages"),
            ));
        }
    }
    sums.into_iter()
        .map(|((s, e), requests)| {
            match (
                DateTime::from_timestamp(s, 0),
                DateTime::from_timestamp(e, 0),
            ) {
                (Some(start), Some(end)) => Ok(UsageBucket {
                    start,
                    end,
                    requests,
                }),
                _ => Err(bad("usage", &what, "a bucket time is out of range".into())),
            }
        })
        .collect()
}
