//! The OpenAI Admin API client: the daemon's real [`KeyIssuer`], over reqwest.
//!
//! Shapes follow the official OpenAPI description (tests/contract/openai-openapi-subset.json);
//! only the fields the daemon uses are modelled, under their exact names.
//!
//! Every request goes through the shared observed path ([`crate::retry::Call`]): each
//! attempt bounded by `openai.request_timeout` and reported to the [`CallObserver`]; 429
//! (honouring `Retry-After` up to `openai.max_retry_after`), 5xx, connect errors and
//! timeouts retried with the `[openai]` retry policy; other 4xx final. This module only
//! says what its failures mean ([`Failure`]'s verdicts). A create is never retried blindly:
//! after an answer that leaves open whether the account was made, the accounts of that name
//! are deleted (their key value is lost to us) before creating again (a before-retry hook).
//!
//! The drain's usage check asks every Usage API endpoint that filters by `api_key_ids`
//! ([`USAGE_ENDPOINTS`]), plus the key's `last_used_at`: a key used only for embeddings,
//! audio, images, moderations or tool calls is not quiet.
//!
//! Key values never reach logs or errors: the admin key and checked keys are only put into
//! `Authorization` headers (marked sensitive), the create response's `api_key.value` goes
//! straight into a [`Secret`], response bodies are never logged, and upstream error messages
//! are scrubbed of any key value we hold before they are quoted. The HTTP stack logs no
//! bodies either: reqwest only logs raw bytes with `connection_verbose`, which stays off,
//! and hyper logs nothing without its unstable tracing cfg.

use crate::config::OpenAiConfig;
use crate::pacer::{Limits, Pacer};
use crate::retry::{Call, GaveUp, Resume, Retry, RetryPolicy, Timeout, Verdict};
use crate::rotation::ports::{
    AccountInfo, AccountRef, Backend, BackendError, CallObserver, KeyIssuer, KeyOwner, KeyUsage,
    MintedKey, ProjectKey, StatusClass,
};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// Operation names reported to the [`CallObserver`] (a bounded metric label set).
pub const OPERATIONS: &[&str] = &[
    "projects.list",
    "service_accounts.create",
    "service_accounts.list",
    "service_accounts.delete",
    "models.list",
    "usage.completions",
    "usage.embeddings",
    "usage.moderations",
    "usage.images",
    "usage.audio_speeches",
    "usage.audio_transcriptions",
    "usage.file_search_calls",
    "usage.web_search_calls",
    "api_keys.get",
    "audit_logs.list",
    "admin_api_keys.list",
    "admin_api_keys.create",
    "admin_api_keys.delete",
];

/// Every `/organization/usage/*` endpoint of the official description that accepts
/// `api_key_ids` (path segment, operation name). `vector_stores` and
/// `code_interpreter_sessions` are per project only, so they cannot tell one key's use.
pub const USAGE_ENDPOINTS: &[(&str, &str)] = &[
    ("completions", "usage.completions"),
    ("embeddings", "usage.embeddings"),
    ("moderations", "usage.moderations"),
    ("images", "usage.images"),
    ("audio_speeches", "usage.audio_speeches"),
    ("audio_transcriptions", "usage.audio_transcriptions"),
    ("file_search_calls", "usage.file_search_calls"),
    ("web_search_calls", "usage.web_search_calls"),
];

/// Largest page the list endpoints allow (`limit` is 1-100).
pub const MAX_PAGE_SIZE: u32 = 100;
/// Guard against a server that always says `has_more` (Prism's mock does): 100k accounts.
const DEFAULT_MAX_PAGES: usize = 1000;
/// Usage buckets per page: the API's maximum for `bucket_width=1m` (one day).
const USAGE_BUCKETS_PER_PAGE: u32 = 1440;
/// Usage pages followed at most per endpoint (64 days of minutes); a drain looks back
/// minutes or hours.
const MAX_USAGE_PAGES: usize = 64;
/// Upstream error messages are quoted up to this many characters.
const MAX_QUOTED: usize = 300;

/// Why the client could not be set up (admin key, base URL, HTTP stack).
#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    #[error("cannot read the OpenAI admin key from openai.admin_key_file {path}: {source}")]
    AdminKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the OpenAI admin key from {source_desc} is empty")]
    AdminKeyEmpty { source_desc: String },
    #[error(
        "the OpenAI admin key from {source_desc} contains characters not allowed in an HTTP header"
    )]
    AdminKeyInvalid { source_desc: String },
    #[error("the OpenAI admin key given to the client is empty or contains characters not allowed in an HTTP header")]
    AdminKeyUnusable,
    #[error("no OpenAI admin key: openai.admin_key_file is unset and environment variable {var} is not set")]
    AdminKeyEnvMissing { var: String },
    #[error("environment variable {var} (the OpenAI admin key) is not valid UTF-8")]
    AdminKeyEnvNotUnicode { var: String },
    #[error("openai.base_url {url:?}: {reason}")]
    BaseUrl { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Admin key from `admin_key_file` (wins; trimmed) or the `admin_key_env` variable.
/// Errors name which source was tried, never the value.
pub fn load_admin_key(cfg: &OpenAiConfig) -> Result<Secret, OpenAiError> {
    let (value, source_desc) = match &cfg.admin_key_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| OpenAiError::AdminKeyFile {
                    path: path.clone(),
                    source,
                })?;
            (
                Secret::new(text.trim()),
                format!("openai.admin_key_file {}", path.display()),
            )
        }
        None => match std::env::var(&cfg.admin_key_env) {
            Ok(v) => (
                Secret::new(v.trim()),
                format!("environment variable {}", cfg.admin_key_env),
            ),
            Err(std::env::VarError::NotPresent) => {
                return Err(OpenAiError::AdminKeyEnvMissing {
                    var: cfg.admin_key_env.clone(),
                })
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(OpenAiError::AdminKeyEnvNotUnicode {
                    var: cfg.admin_key_env.clone(),
                })
            }
        },
    };
    if value.is_empty() {
        return Err(OpenAiError::AdminKeyEmpty { source_desc });
    }
    if !value.expose().bytes().all(|b| b.is_ascii_graphic()) {
        return Err(OpenAiError::AdminKeyInvalid { source_desc });
    }
    Ok(value)
}

/// The OpenAI Admin API client. Cheap to share behind an `Arc`.
pub struct OpenAiClient {
    http: reqwest::Client,
    /// The configured base URL (normally ending in `/v1`; Prism serves without it).
    base: Url,
    /// Switchable at runtime (admin-key rotation); every request takes the current one.
    admin_key: std::sync::RwLock<Arc<Secret>>,
    timeout: Duration,
    retry: RetryPolicy,
    page_size: u32,
    max_pages: usize,
    calls: Arc<dyn CallObserver>,
    /// Paces admin-key requests to the announced rate limit (`x-ratelimit-*`, 429s),
    /// shared by every concurrent rotation.
    pacer: Pacer,
}

/// No key material: base URL and limits only.
impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base", &self.base.as_str())
            .field("admin_key", &*self.current_admin_key())
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("page_size", &self.page_size)
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Wire types (names exactly as the description; only the fields we use).

/// `ProjectServiceAccountCreateRequest`.
#[derive(Serialize)]
struct CreateServiceAccountRequest<'a> {
    name: &'a str,
    /// The SDKs' addition (September 2026): the key stops working this many seconds after
    /// creation. Left out when unset (no expiry).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_seconds: Option<u64>,
}

/// `ProjectServiceAccountCreateResponse`. Holds the key value: no Debug.
#[derive(Deserialize)]
struct CreateServiceAccountResponse {
    id: String,
    name: String,
    created_at: i64,
    api_key: Option<ServiceAccountApiKey>,
}

/// `ProjectServiceAccountApiKey`: the only place a key value is ever seen.
#[derive(Deserialize)]
struct ServiceAccountApiKey {
    #[serde(deserialize_with = "secret")]
    value: Secret,
    id: String,
}

fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    String::deserialize(d).map(Secret::new)
}

/// `ProjectServiceAccount`.
#[derive(Debug, Deserialize)]
struct ServiceAccount {
    id: String,
    name: String,
    created_at: i64,
}

/// A cursor-paged list answer (`ProjectServiceAccountListResponse`,
/// `ProjectApiKeyListResponse`): the next page starts `after` the last id.
#[derive(Debug, Deserialize)]
struct CursorPage<T> {
    data: Vec<T>,
    #[serde(default)]
    last_id: Option<String>,
    has_more: bool,
}

/// An item of a [`CursorPage`]: its id is the cursor when `last_id` is missing.
trait Listed {
    fn id(&self) -> &str;
}

impl Listed for ServiceAccount {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Listed for ListedApiKey {
    fn id(&self) -> &str {
        &self.id
    }
}

/// `ProjectServiceAccountDeleteResponse`.
#[derive(Debug, Deserialize)]
struct ServiceAccountDeleted {
    deleted: bool,
}

/// `ProjectApiKey` (redacted value only; we read `last_used_at`).
#[derive(Debug, Deserialize)]
struct ProjectApiKey {
    last_used_at: Option<i64>,
}

/// `ProjectApiKey` as the inventory reads it (never `redacted_value`). `expires_at` is the
/// SDKs' addition (nullable; absent from our copy of the description).
#[derive(Debug, Deserialize)]
struct ListedApiKey {
    id: String,
    #[serde(default)]
    name: Option<String>,
    created_at: i64,
    #[serde(default)]
    last_used_at: Option<i64>,
    #[serde(default)]
    expires_at: Option<i64>,
    owner: ListedKeyOwner,
}

/// `ProjectApiKey.owner`: `user` or `service_account` and the matching object.
#[derive(Debug, Deserialize)]
struct ListedKeyOwner {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    user: Option<ListedOwnerRef>,
    #[serde(default)]
    service_account: Option<ListedOwnerRef>,
}

#[derive(Debug, Deserialize)]
struct ListedOwnerRef {
    id: String,
    #[serde(default)]
    name: Option<String>,
}

/// `UsageResponse`.
#[derive(Debug, Deserialize)]
struct UsagePage {
    data: Vec<UsageBucket>,
    has_more: bool,
    next_page: Option<String>,
}

/// `UsageTimeBucket`.
#[derive(Debug, Deserialize)]
struct UsageBucket {
    results: Vec<UsageResult>,
}

/// The fields every per-key usage result shares: `num_model_requests` (completions,
/// embeddings, moderations, images, audio, web search) and/or `num_requests` (file search,
/// web search).
#[derive(Debug, Deserialize)]
struct UsageResult {
    #[serde(default)]
    num_model_requests: Option<u64>,
    #[serde(default)]
    num_requests: Option<u64>,
    #[serde(default)]
    api_key_id: Option<String>,
}

impl UsageResult {
    /// Requests this result counts: the larger of the two counts (a web search result
    /// carries both for the same calls). `None` when it has neither: we cannot tell.
    fn requests(&self) -> Option<u64> {
        match (self.num_model_requests, self.num_requests) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// One HTTP exchange and its failure modes.

/// How a request failed without an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Could not connect: the request never left, so any retry is safe.
    NotSent,
    /// No complete answer within the timeout: the server may have acted.
    Timeout,
    /// The connection broke after sending: the server may have acted.
    Broken,
}

/// Why one attempt did not succeed. Details are scrubbed of key values.
#[derive(Debug, Clone)]
enum Failure {
    Status {
        status: u16,
        retry_after: Option<Duration>,
        /// `type/code: message` from OpenAI's error shape, or a note on the body.
        detail: String,
    },
    Transport {
        kind: Transport,
        detail: String,
    },
    /// A 2xx whose body does not have the described shape.
    BadBody {
        status: u16,
        detail: String,
    },
    /// The clean-up before a create's retry failed (only from that hook; never retried).
    Cleanup(BackendError),
}

/// The observed path's timeout: no complete answer in time, so the server may have acted.
impl From<Timeout> for Failure {
    fn from(t: Timeout) -> Self {
        Failure::Transport {
            kind: Transport::Timeout,
            detail: format!("no answer within {:?}", t.after),
        }
    }
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => *status == 429 || *status >= 500,
            Failure::Transport { .. } => true,
            Failure::BadBody { .. } | Failure::Cleanup(_) => false,
        }
    }

    /// Whether the server may have carried out the request (a create may have happened).
    fn ambiguous(&self) -> bool {
        match self {
            Failure::Status { status, .. } => *status >= 500,
            Failure::Transport { kind, .. } => *kind != Transport::NotSent,
            Failure::BadBody { .. } => true,
            Failure::Cleanup(_) => false,
        }
    }

    fn class(&self) -> StatusClass {
        self.status()
            .map_or(StatusClass::Transport, StatusClass::from_status)
    }

    fn retry(&self, allowed: bool) -> Retry {
        match (allowed, self.retry_after()) {
            (false, _) => Retry::No,
            (true, Some(d)) => Retry::After(d),
            (true, None) => Retry::Yes,
        }
    }

    /// Any request but a create: 429, 5xx and transport failures are worth retrying.
    fn verdict(&self) -> Verdict {
        Verdict::new(self.class(), self.retry(self.retryable()))
    }

    /// A create also retries after an ambiguous answer (a garbled body): the before-retry
    /// hook cleans up first. A 404 (no such project) is final.
    fn create_verdict(&self) -> Verdict {
        let not_found = matches!(self, Failure::Status { status: 404, .. });
        let allowed = !not_found && (self.retryable() || self.ambiguous());
        Verdict::new(self.class(), self.retry(allowed))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Failure::Status { status, .. } | Failure::BadBody { status, .. } => Some(*status),
            Failure::Transport { .. } | Failure::Cleanup(_) => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { status, detail, .. } => write!(f, "HTTP {status}: {detail}"),
            Failure::Transport { kind, detail } => match kind {
                Transport::NotSent => write!(f, "connection failed: {detail}"),
                Transport::Timeout => write!(f, "{detail}"),
                Transport::Broken => write!(f, "request failed: {detail}"),
            },
            Failure::BadBody { status, detail } => {
                write!(f, "HTTP {status} with an unexpected body: {detail}")
            }
            Failure::Cleanup(e) => write!(f, "clean-up before retrying failed: {e}"),
        }
    }
}

/// A request to make, rebuilt for every attempt.
struct Req<'a> {
    op: &'static str,
    method: Method,
    url: Url,
    /// Bearer key: the admin key, or the key being checked.
    auth: Auth<'a>,
    /// Pre-serialized JSON body.
    body: Option<Vec<u8>>,
    /// A 404 means "already gone" (counts as success for metrics; returned as `None`).
    gone_ok: bool,
}

/// Whose key a request carries: the admin key current when it was built, or another.
enum Auth<'a> {
    Admin(Arc<Secret>),
    Key(&'a Secret),
}

impl Auth<'_> {
    fn secret(&self) -> &Secret {
        match self {
            Auth::Admin(s) => s,
            Auth::Key(k) => k,
        }
    }
}

/// A successful answer: the body of a 2xx, or `None` for an accepted 404.
type Reply = Option<bytes::Bytes>;

impl OpenAiClient {
    /// A client for `cfg.base_url` with `cfg.request_timeout` per attempt and the retry
    /// policy of `cfg` (`max_retries`, `retry_base`, `max_backoff`, `max_retry_after`).
    pub fn new(
        cfg: &OpenAiConfig,
        admin_key: Secret,
        calls: Arc<dyn CallObserver>,
    ) -> Result<Self, OpenAiError> {
        let bad = |reason: &str| OpenAiError::BaseUrl {
            url: cfg.base_url.clone(),
            reason: reason.to_string(),
        };
        let base =
            Url::parse(cfg.base_url.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("must be an http(s) URL"));
        }
        if base.cannot_be_a_base() || base.query().is_some() || base.fragment().is_some() {
            return Err(bad("must be a plain base URL without query or fragment"));
        }
        if !usable(&admin_key) {
            return Err(OpenAiError::AdminKeyUnusable);
        }
        let timeout = cfg.request_timeout.get();
        let http = reqwest::Client::builder()
            .user_agent(concat!("openai-key-rotator/", env!("CARGO_PKG_VERSION")))
            // The admin key must never follow a redirect anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .build()
            .map_err(|e| OpenAiError::Http(e.to_string()))?;
        Ok(OpenAiClient {
            http,
            base,
            admin_key: std::sync::RwLock::new(Arc::new(admin_key)),
            timeout,
            retry: cfg.retry_policy(),
            page_size: MAX_PAGE_SIZE,
            max_pages: DEFAULT_MAX_PAGES,
            calls,
            pacer: Pacer::new(),
        })
    }

    /// Replace the backoff policy (tests use short backoffs).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Page size of `list_service_accounts` (clamped to 1-100; default 100).
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        self
    }

    /// Most pages `list_service_accounts` follows before giving up (default 1000).
    pub fn with_max_pages(mut self, max_pages: usize) -> Self {
        self.max_pages = max_pages.max(1);
        self
    }

    /// For `/readyz`: one authenticated cheap admin call (`GET /organization/projects?limit=1`),
    /// without retries so a probe answers within one request timeout.
    /// Every page of the cursor-paged list at `segments` (with `query`), bounded by
    /// `max_pages`, through the retried, paced path; a 404 is `NotFound`.
    async fn list_all<T: serde::de::DeserializeOwned + Listed>(
        &self,
        op: &'static str,
        segments: &[&str],
        query: &[(&str, &str)],
        what: &str,
    ) -> Result<Vec<T>, BackendError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..self.max_pages {
            let mut url = self.url(segments);
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("limit", &self.page_size.to_string());
                for (k, v) in query {
                    q.append_pair(k, v);
                }
                if let Some(a) = &after {
                    q.append_pair("after", a);
                }
            }
            let req = self.admin_req(op, Method::GET, url);
            let body = match self.call(&req).await {
                Ok(body) => body.unwrap_or_default(),
                Err(GaveUp {
                    error: Failure::Status { status: 404, .. },
                    ..
                }) => {
                    return Err(BackendError::NotFound {
                        backend: Backend::OpenAi,
                        what: what.to_string(),
                    })
                }
                Err(g) => return Err(self.failed(op, what, &g)),
            };
            let page: CursorPage<T> = parse(200, &body).map_err(|f| failed_once(op, what, &f))?;
            let next = page
                .last_id
                .or_else(|| page.data.last().map(|i| i.id().to_string()));
            out.extend(page.data);
            if !page.has_more {
                return Ok(out);
            }
            match next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => {
                    return Err(failed_msg(
                        op,
                        what,
                        "has_more is true but the page gives no new cursor",
                        false,
                    ))
                }
            }
        }
        Err(failed_msg(
            op,
            what,
            &format!(
                "still has_more after {} pages of {}; giving up",
                self.max_pages, self.page_size
            ),
            false,
        ))
    }

    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut url = self.url(&["organization", "projects"]);
        url.query_pairs_mut().append_pair("limit", "1");
        let req = self.admin_req("projects.list", Method::GET, url);
        let no_retry = RetryPolicy {
            max_retries: 0,
            ..self.retry
        };
        self.call_with(&no_retry, &req)
            .await
            .map(|_| ())
            .map_err(|g| self.failed("projects.list", "admin key check", &g))
    }

    /// `base` + path segments, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn admin_req(&self, op: &'static str, method: Method, url: Url) -> Req<'_> {
        Req {
            op,
            method,
            url,
            auth: Auth::Admin(self.current_admin_key()),
            body: None,
            gone_ok: false,
        }
    }

    /// One attempt: send and read the whole answer (the observed path bounds and reports
    /// it).
    async fn attempt(&self, req: &Req<'_>) -> Result<Reply, Failure> {
        let mut builder = self
            .http
            .request(req.method.clone(), req.url.clone())
            .bearer_auth(req.auth.secret().expose())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = &req.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let exchange = async {
            let resp = builder.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        };
        let (status, headers, body) = exchange
            .await
            .map_err(|e| transport_failure(&e, self.timeout))?;
        let rejected = status == StatusCode::TOO_MANY_REQUESTS;
        if self.paced(req) {
            self.pacer.observe(&Limits {
                rejected,
                retry_after: retry_after(&headers).filter(|_| rejected),
                ..Limits::from_headers(&headers)
            });
        }
        if status.is_success() {
            Ok(Some(body))
        } else if status == StatusCode::NOT_FOUND && req.gone_ok {
            Ok(None)
        } else {
            Err(Failure::Status {
                status: status.as_u16(),
                retry_after: retry_after(&headers),
                detail: error_detail(&body, &[&self.current_admin_key(), req.auth.secret()]),
            })
        }
    }

    /// The observed path for `op`: the client's timeout and observer, the given policy.
    fn observed<'a>(
        &'a self,
        op: &'static str,
        policy: &'a RetryPolicy,
        what: &'a str,
    ) -> Call<'a> {
        Call::new(Backend::OpenAi, op, policy, &*self.calls)
            .timeout(self.timeout)
            .what(what)
    }

    /// Requests with the admin key share the organization's Admin API limit; a checked
    /// key's data-plane call has limits of its own.
    fn paced(&self, req: &Req<'_>) -> bool {
        matches!(req.auth, Auth::Admin(_))
    }

    /// Attempts under the client's retry policy.
    async fn call(&self, req: &Req<'_>) -> Result<Reply, GaveUp<Failure>> {
        self.call_with(&self.retry, req).await
    }

    async fn call_with(
        &self,
        policy: &RetryPolicy,
        req: &Req<'_>,
    ) -> Result<Reply, GaveUp<Failure>> {
        let call = self.observed(req.op, policy, req.url.path());
        let call = if self.paced(req) {
            call.paced(&self.pacer)
        } else {
            call
        };
        call.run(Failure::verdict, |_| self.attempt(req)).await
    }

    /// The final error of a call: its failure, attempts or the server's hint.
    fn failed(&self, op: &str, what: &str, g: &GaveUp<Failure>) -> BackendError {
        BackendError::Failed {
            backend: Backend::OpenAi,
            message: format!("{op} ({what}): {}{}", g.error, g.suffix(&self.retry)),
            transient: g.error.retryable(),
        }
    }

    /// One attempt at the create; the whole answer is parsed here so a garbled body counts
    /// as an ambiguous failure (the account may exist).
    async fn create_once(&self, project: &str, body: &[u8]) -> Result<MintedKey, Failure> {
        let req = Req {
            body: Some(body.to_vec()),
            ..self.admin_req(
                "service_accounts.create",
                Method::POST,
                self.url(&["organization", "projects", project, "service_accounts"]),
            )
        };
        let body = self.attempt(&req).await?.unwrap_or_default();
        let created: CreateServiceAccountResponse = parse(200, &body)?;
        let created_at = timestamp(created.created_at).ok_or_else(|| Failure::BadBody {
            status: 200,
            detail: format!("created_at {} is out of range", created.created_at),
        })?;
        let Some(key) = created.api_key else {
            return Err(Failure::BadBody {
                status: 200,
                detail: format!(
                    "service account {} came back without an api_key",
                    created.id
                ),
            });
        };
        Ok(MintedKey {
            account: AccountRef {
                id: created.id,
                key_id: key.id,
            },
            name: created.name,
            key: key.value,
            created_at,
        })
    }

    /// Delete every account named exactly `name` except `keep`; returns how many went.
    async fn delete_named(
        &self,
        project: &str,
        name: &str,
        keep: Option<&str>,
    ) -> Result<usize, BackendError> {
        let mut deleted = 0;
        for a in self.list_service_accounts(project).await? {
            if a.name == name && Some(a.id.as_str()) != keep {
                self.delete_service_account(project, &a.id).await?;
                tracing::warn!(
                    project,
                    account_id = %a.id,
                    name,
                    "deleted a service account left by a create whose answer was lost"
                );
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

#[async_trait]
impl KeyIssuer for OpenAiClient {
    /// Retries only where no duplicate can result: a 429 or a connect failure (the create
    /// did not happen). After an ambiguous failure (5xx, timeout, broken connection, garbled
    /// body) the accounts of that name are deleted before the next create (after the
    /// backoff, so an earlier create still in flight has landed before we look); after a
    /// success that followed one, any straggler of that name (a late-landing earlier
    /// create) too.
    async fn create_service_account(
        &self,
        project: &str,
        name: &str,
    ) -> Result<MintedKey, BackendError> {
        self.create_service_account_expiring(project, name, None)
            .await
    }

    async fn create_service_account_expiring(
        &self,
        project: &str,
        name: &str,
        expires_in: Option<Duration>,
    ) -> Result<MintedKey, BackendError> {
        const OP: &str = "service_accounts.create";
        let what = format!("project {project} name {name:?}");
        let body = serde_json::to_vec(&CreateServiceAccountRequest {
            name,
            expires_in_seconds: expires_in.map(|d| d.as_secs().max(1)),
        })
        .map_err(|e| failed_msg(OP, &what, &format!("cannot encode the request: {e}"), false))?;
        let had_ambiguous = AtomicBool::new(false);
        let had = &had_ambiguous;
        let result = self
            .observed(OP, &self.retry, &what)
            .paced(&self.pacer)
            .run_with(
                Failure::create_verdict,
                |f: &Failure, _| {
                    let ambiguous = f.ambiguous();
                    async move {
                        if ambiguous {
                            had.store(true, Ordering::SeqCst);
                            if let Err(e) = self.delete_named(project, name, None).await {
                                return Resume::Finish(Err(Failure::Cleanup(e)));
                            }
                        }
                        Resume::Retry
                    }
                },
                |_| self.create_once(project, &body),
            )
            .await;
        let minted = match result {
            Ok(minted) => minted,
            Err(GaveUp {
                error: Failure::Cleanup(e),
                ..
            }) => return Err(e),
            Err(GaveUp {
                error: Failure::Status { status: 404, .. },
                ..
            }) => {
                return Err(BackendError::NotFound {
                    backend: Backend::OpenAi,
                    what: format!("project {project}"),
                })
            }
            Err(g) => return Err(self.failed(OP, &what, &g)),
        };
        if had_ambiguous.load(Ordering::SeqCst) {
            if let Err(e) = self
                .delete_named(project, name, Some(&minted.account.id))
                .await
            {
                tracing::warn!(project, name, error = %e, "could not check for duplicate service accounts after a retried create; the sweep will remove any");
            }
        }
        tracing::info!(
            project,
            account_id = %minted.account.id,
            key_id = %minted.account.key_id,
            "service account created"
        );
        Ok(minted)
    }

    async fn list_service_accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError> {
        const OP: &str = "service_accounts.list";
        let what = format!("project {project}");
        let listed: Vec<ServiceAccount> = self
            .list_all(
                OP,
                &["organization", "projects", project, "service_accounts"],
                &[],
                &what,
            )
            .await?;
        listed
            .into_iter()
            .map(|a| {
                let created_at = timestamp(a.created_at).ok_or_else(|| {
                    failed_once(
                        OP,
                        &what,
                        &Failure::BadBody {
                            status: 200,
                            detail: format!("created_at {} is out of range", a.created_at),
                        },
                    )
                })?;
                Ok(AccountInfo {
                    id: a.id,
                    name: a.name,
                    created_at,
                })
            })
            .collect()
    }

    async fn delete_service_account(&self, project: &str, id: &str) -> Result<(), BackendError> {
        const OP: &str = "service_accounts.delete";
        let what = format!("project {project} account {id}");
        let req = Req {
            gone_ok: true,
            ..self.admin_req(
                OP,
                Method::DELETE,
                self.url(&["organization", "projects", project, "service_accounts", id]),
            )
        };
        match self.call(&req).await {
            Ok(None) => {
                tracing::debug!(project, account_id = id, "service account already gone");
                Ok(())
            }
            Ok(Some(body)) => {
                let d: ServiceAccountDeleted =
                    parse(200, &body).map_err(|f| failed_once(OP, &what, &f))?;
                if d.deleted {
                    Ok(())
                } else {
                    Err(failed_msg(
                        OP,
                        &what,
                        "the API answered deleted: false",
                        true,
                    ))
                }
            }
            Err(g) => Err(self.failed(OP, &what, &g)),
        }
    }

    async fn check_key(&self, key: &Secret) -> Result<(), BackendError> {
        const OP: &str = "models.list";
        let req = Req {
            auth: Auth::Key(key),
            ..self.admin_req(OP, Method::GET, self.url(&["models"]))
        };
        let what = format!("key sha256:{}", &key.sha256_hex()[..12]);
        self.call(&req)
            .await
            .map(|_| ())
            .map_err(|g| self.failed(OP, &what, &g))
    }

    /// Requests of the key on every usage endpoint since `since`, and its `last_used_at`.
    /// Any endpoint failing fails the whole check: a drain must not call a key quiet on
    /// the strength of the endpoints that happened to answer.
    async fn key_usage(
        &self,
        project: &str,
        key_id: &str,
        since: DateTime<Utc>,
    ) -> Result<KeyUsage, BackendError> {
        let what = format!("project {project} key {key_id}");
        let mut requests_since = 0u64;
        for (endpoint, op) in USAGE_ENDPOINTS {
            requests_since = requests_since.saturating_add(
                self.usage_requests(project, key_id, since, endpoint, op, &what)
                    .await?,
            );
        }

        const KEY: &str = "api_keys.get";
        let req = Req {
            gone_ok: true,
            ..self.admin_req(
                KEY,
                Method::GET,
                self.url(&["organization", "projects", project, "api_keys", key_id]),
            )
        };
        let last_used_at = match self
            .call(&req)
            .await
            .map_err(|g| self.failed(KEY, &what, &g))?
        {
            // The key is gone: nothing can use it any more.
            None => None,
            Some(body) => {
                let k: ProjectApiKey =
                    parse(200, &body).map_err(|f| failed_once(KEY, &what, &f))?;
                k.last_used_at.and_then(timestamp)
            }
        };
        Ok(KeyUsage {
            last_used_at,
            requests_since,
        })
    }

    /// Every page of `GET /organization/projects/{id}/api_keys?owner_project_access=any`
    /// (bounded by `max_pages`), through the retried, paced path.
    async fn list_project_keys(&self, project: &str) -> Result<Vec<ProjectKey>, BackendError> {
        const OP: &str = "api_keys.list";
        let what = format!("project {project}");
        let listed: Vec<ListedApiKey> = self
            .list_all(
                OP,
                &["organization", "projects", project, "api_keys"],
                &[("owner_project_access", "any")],
                &what,
            )
            .await?;
        listed
            .into_iter()
            .map(|k| listed_key(k).map_err(|m| failed_msg(OP, &what, &m, false)))
            .collect()
    }
}

impl OpenAiClient {
    /// `GET /organization/usage/{endpoint}` for one key in 1-minute buckets since `since`,
    /// every page (bounded): the requests it counts.
    async fn usage_requests(
        &self,
        project: &str,
        key_id: &str,
        since: DateTime<Utc>,
        endpoint: &str,
        op: &'static str,
        what: &str,
    ) -> Result<u64, BackendError> {
        let mut requests = 0u64;
        let mut page: Option<String> = None;
        for _ in 0..MAX_USAGE_PAGES {
            let mut url = self.url(&["organization", "usage", endpoint]);
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("start_time", &since.timestamp().to_string())
                    .append_pair("bucket_width", "1m")
                    .append_pair("group_by", "api_key_id")
                    .append_pair("api_key_ids", key_id)
                    .append_pair("project_ids", project)
                    .append_pair("limit", &USAGE_BUCKETS_PER_PAGE.to_string());
                if let Some(p) = &page {
                    q.append_pair("page", p);
                }
            }
            let req = self.admin_req(op, Method::GET, url);
            let body = self
                .call(&req)
                .await
                .map_err(|g| self.failed(op, what, &g))?
                .unwrap_or_default();
            let usage: UsagePage = parse(200, &body).map_err(|f| failed_once(op, what, &f))?;
            for r in usage.data.iter().flat_map(|b| &b.results) {
                if r.api_key_id.as_deref().is_some_and(|k| k != key_id) {
                    continue;
                }
                let n = r.requests().ok_or_else(|| {
                    failed_msg(
                        op,
                        what,
                        "a usage result has neither num_model_requests nor num_requests",
                        false,
                    )
                })?;
                requests = requests.saturating_add(n);
            }
            match (usage.has_more, usage.next_page) {
                (true, Some(next)) if page.as_deref() != Some(next.as_str()) => page = Some(next),
                (true, _) => {
                    return Err(failed_msg(
                        op,
                        what,
                        "has_more is true but next_page gives no new cursor",
                        false,
                    ))
                }
                (false, _) => return Ok(requests),
            }
        }
        Err(failed_msg(
            op,
            what,
            &format!("still has_more after {MAX_USAGE_PAGES} pages; `since` is too far back"),
            false,
        ))
    }
}

/// A failed [`OpenAiClient::admin_json`] call: the HTTP status when there was one (a 403
/// tells "audit logging is off" from the rest), whether it timed out, and the error.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CallError {
    pub status: Option<u16>,
    pub timed_out: bool,
    pub error: BackendError,
}

/// One Admin API request for the governance modules (forensics, reconciliation, admin-key
/// rotation): built by them, sent through the same observed, paced, retried path.
pub struct AdminRequest<'a> {
    pub op: &'static str,
    pub method: Method,
    pub segments: &'a [&'a str],
    pub query: &'a [(&'a str, String)],
    pub body: Option<Vec<u8>>,
    /// Another key to send instead of the admin key (to verify a new admin key).
    pub key: Option<&'a Secret>,
    /// Retries under the client's policy (false: one attempt).
    pub retry: bool,
    /// A 404 is an answer (`Ok(None)`), not a failure.
    pub gone_ok: bool,
    pub what: &'a str,
}

impl OpenAiClient {
    /// Send `r` and parse a 2xx body as `T` (`None` for an accepted 404). Errors carry no
    /// key value (upstream messages are scrubbed, serde's are reduced to a position).
    pub async fn admin_json<T: serde::de::DeserializeOwned>(
        &self,
        r: AdminRequest<'_>,
    ) -> Result<Option<T>, CallError> {
        let mut url = self.url(r.segments);
        if !r.query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in r.query {
                q.append_pair(k, v);
            }
        }
        let req = Req {
            op: r.op,
            method: r.method,
            url,
            auth: match r.key {
                Some(k) => Auth::Key(k),
                None => Auth::Admin(self.current_admin_key()),
            },
            body: r.body,
            gone_ok: r.gone_ok,
        };
        let once = RetryPolicy {
            max_retries: 0,
            ..self.retry
        };
        let policy = if r.retry { self.retry } else { once };
        match self.call_with(&policy, &req).await {
            Ok(None) => Ok(None),
            Ok(Some(body)) => parse(200, &body).map(Some).map_err(|f| CallError {
                status: f.status(),
                timed_out: false,
                error: failed_once(r.op, r.what, &f),
            }),
            Err(g) => Err(CallError {
                status: g.error.status(),
                timed_out: matches!(
                    g.error,
                    Failure::Transport {
                        kind: Transport::Timeout,
                        ..
                    }
                ),
                error: self.failed(r.op, r.what, &g),
            }),
        }
    }

    /// The admin key requests are sent with now.
    pub fn current_admin_key(&self) -> Arc<Secret> {
        use crate::sync::RwLockExt;
        self.admin_key.read_now().clone()
    }

    /// Send every request from now on with `key` (admin-key rotation switches to the new
    /// key once it is verified and published).
    pub fn set_admin_key(&self, key: Secret) -> Result<(), OpenAiError> {
        use crate::sync::RwLockExt;
        if !usable(&key) {
            return Err(OpenAiError::AdminKeyUnusable);
        }
        *self.admin_key.write_now() = Arc::new(key);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// Non-empty and fit for an `Authorization` header.
fn usable(key: &Secret) -> bool {
    !key.is_empty() && key.expose().bytes().all(|b| b.is_ascii_graphic())
}

/// A failure outside the retried path (a body that does not parse).
fn failed_once(op: &str, what: &str, f: &Failure) -> BackendError {
    BackendError::Failed {
        backend: Backend::OpenAi,
        message: format!("{op} ({what}): {f}"),
        transient: f.retryable(),
    }
}

fn failed_msg(op: &str, what: &str, msg: &str, transient: bool) -> BackendError {
    BackendError::Failed {
        backend: Backend::OpenAi,
        message: format!("{op} ({what}): {msg}"),
        transient,
    }
}

/// Parse a 2xx body. serde's messages can quote the offending value (which could be a key
/// value), so only its category and position are kept.
fn parse<T: serde::de::DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::BadBody {
        status,
        detail: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// A listed key in our terms; the error names the key and the field.
fn listed_key(k: ListedApiKey) -> Result<ProjectKey, String> {
    let at = |field: &str, v: i64| {
        timestamp(v).ok_or_else(|| format!("key {}: {field} {v} is out of range", k.id))
    };
    let created_at = at("created_at", k.created_at)?;
    let last_used_at = k.last_used_at.map(|v| at("last_used_at", v)).transpose()?;
    let expires_at = k.expires_at.map(|v| at("expires_at", v)).transpose()?;
    let owner = match (
        k.owner.type_.as_str(),
        k.owner.user,
        k.owner.service_account,
    ) {
        ("user", Some(u), _) => KeyOwner::User { id: u.id },
        ("service_account", _, Some(a)) => KeyOwner::ServiceAccount {
            id: a.id,
            name: a.name.unwrap_or_default(),
        },
        (t, _, _) => {
            return Err(format!(
                "key {}: owner.type {t:?} without its owner object",
                k.id
            ))
        }
    };
    Ok(ProjectKey {
        name: k.name.unwrap_or_default(),
        id: k.id,
        owner,
        created_at,
        last_used_at,
        expires_at,
    })
}

fn timestamp(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    let kind = if e.is_connect() {
        Transport::NotSent
    } else if e.is_timeout() {
        Transport::Timeout
    } else {
        Transport::Broken
    };
    let detail = if kind == Transport::Timeout {
        format!("no answer within {timeout:?}")
    } else {
        // Without the URL; the source chain says what broke (refused, reset, ...).
        let mut text = String::new();
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            let part = s.to_string();
            if !text.contains(&part) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&part);
            }
            source = s.source();
        }
        strip_url(&text)
    };
    Failure::Transport { kind, detail }
}

/// reqwest's messages name the URL ("... for url (http://...)"); ids only, but drop it to
/// keep messages short and free of query strings.
fn strip_url(text: &str) -> String {
    if let Some(start) = text.find(" for url (") {
        if let Some(len) = text[start..].find(')') {
            return format!("{}{}", &text[..start], &text[start + len + 1..]);
        }
    }
    text.to_string()
}

/// `Retry-After-Ms` (as the official SDKs honour) or `Retry-After` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let num = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    if let Some(ms) = num("retry-after-ms") {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(86_400.0)));
    }
    num("retry-after").map(|s| Duration::from_secs_f64(s.min(86_400.0)))
}

/// `type/code: message` from OpenAI's error shape, scrubbed of `secrets` and shortened; a
/// body of another shape (a proxy's HTML page) is described, not quoted.
fn error_detail(body: &[u8], secrets: &[&Secret]) -> String {
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let Some(err) = value.as_ref().and_then(|v| v.get("error")) else {
        return format!("no OpenAI error object in the body ({} bytes)", body.len());
    };
    let field = |name: &str| match err.get(name) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    let kind = field("type").unwrap_or_else(|| "error".into());
    let code = field("code").map_or(String::new(), |c| format!("/{c}"));
    let message = field("message").unwrap_or_default();
    scrub(&format!("{kind}{code}: {message}"), secrets)
}

/// Replace any full key value we hold with `[redacted]` and cap the length.
fn scrub(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.expose(), "[redacted]");
        }
    }
    if out.chars().count() > MAX_QUOTED {
        out = out.chars().take(MAX_QUOTED).collect::<String>() + "...";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DurationStr;
    use crate::retry::Stop;
    use crate::rotation::ports::NoCalls;

    fn cfg(base: &str) -> OpenAiConfig {
        OpenAiConfig {
            base_url: base.into(),
            admin_key_env: "OKR_TEST_UNSET_ADMIN_KEY_VAR".into(),
            admin_key_file: None,
            request_timeout: DurationStr::from_secs(5),
            max_retries: 2,
            ..OpenAiConfig::default()
        }
    }

    #[test]
    fn admin_key_file_wins_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin");
        std::fs::write(&path, "  sk-admin-from-file\n").unwrap();
        let mut c = cfg("http://x/v1");
        c.admin_key_file = Some(path.clone());
        // Even with the env var set, the file wins.
        c.admin_key_env = "OKR_TEST_ADMIN_KEY_FILE_WINS".into();
        std::env::set_var(&c.admin_key_env, "sk-admin-from-env");
        assert_eq!(load_admin_key(&c).unwrap().expose(), "sk-admin-from-file");

        std::fs::write(&path, " \n").unwrap();
        let e = load_admin_key(&c).unwrap_err().to_string();
        assert!(e.contains("admin_key_file") && e.contains("empty"), "{e}");

        c.admin_key_file = Some(dir.path().join("missing"));
        let e = load_admin_key(&c).unwrap_err().to_string();
        assert!(e.contains("admin_key_file") && e.contains("missing"), "{e}");
    }

    #[test]
    fn admin_key_env_is_the_fallback_and_errors_name_it() {
        let mut c = cfg("http://x/v1");
        c.admin_key_env = "OKR_TEST_ADMIN_KEY_ENV_FALLBACK".into();
        std::env::set_var(&c.admin_key_env, "sk-admin-from-env\n");
        assert_eq!(load_admin_key(&c).unwrap().expose(), "sk-admin-from-env");

        std::env::set_var(&c.admin_key_env, "sk admin with spaces");
        let e = load_admin_key(&c).unwrap_err().to_string();
        assert!(e.contains("OKR_TEST_ADMIN_KEY_ENV_FALLBACK"), "{e}");
        assert!(!e.contains("spaces"), "the value leaked: {e}");

        c.admin_key_env = "OKR_TEST_UNSET_ADMIN_KEY_VAR".into();
        let e = load_admin_key(&c).unwrap_err().to_string();
        assert!(
            e.contains("OKR_TEST_UNSET_ADMIN_KEY_VAR") && e.contains("admin_key_file"),
            "{e}"
        );
    }

    #[test]
    fn debug_shows_no_key_and_urls_are_encoded() {
        let c = OpenAiClient::new(
            &cfg("http://127.0.0.1:1/v1/"),
            Secret::new("sk-admin-SECRET-VALUE"),
            Arc::new(NoCalls),
        )
        .unwrap();
        let d = format!("{c:?}");
        assert!(
            !d.contains("SECRET-VALUE") && d.contains("127.0.0.1"),
            "{d}"
        );
        let u = c.url(&[
            "organization",
            "projects",
            "proj/../x?y",
            "service_accounts",
        ]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/v1/organization/projects/proj%2F..%2Fx%3Fy/service_accounts"
        );
        // Without /v1 (Prism) the segments go straight under the root.
        let c = OpenAiClient::new(&cfg("http://h:2"), Secret::new("k"), Arc::new(NoCalls)).unwrap();
        assert_eq!(c.url(&["models"]).as_str(), "http://h:2/models");
    }

    #[test]
    fn bad_base_urls_are_rejected() {
        for bad in ["ftp://x/v1", "not a url", "http://x/v1?q=1"] {
            let e = OpenAiClient::new(&cfg(bad), Secret::new("k"), Arc::new(NoCalls))
                .unwrap_err()
                .to_string();
            assert!(e.contains("openai.base_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn retry_after_prefers_ms_and_ignores_junk() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.remove("retry-after-ms");
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "-1".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_detail_quotes_openai_errors_scrubbed() {
        let key = Secret::new("sk-svcacct-FULLVALUE");
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-svcacct-FULLVALUE.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let d = error_detail(body, &[&key]);
        assert_eq!(
            d,
            "invalid_request_error/invalid_api_key: Incorrect API key provided: [redacted]."
        );
        let d = error_detail(b"<html>sk-svcacct-FULLVALUE</html>", &[&key]);
        assert!(!d.contains("FULLVALUE") && d.contains("bytes"), "{d}");
        let long = format!(
            r#"{{"error":{{"message":"{}","type":"x"}}}}"#,
            "a".repeat(1000)
        );
        assert!(error_detail(long.as_bytes(), &[]).len() < 320);
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let body = br#"{"id":"svc","name":"n","created_at":"sk-svcacct-LEAK","api_key":null}"#;
        let e = match parse::<CreateServiceAccountResponse>(200, body) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("parsed a bad body"),
        };
        assert!(!e.contains("LEAK") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn failures_classify_for_retry_and_ambiguity() {
        let st = |status| Failure::Status {
            status,
            retry_after: None,
            detail: String::new(),
        };
        assert!(st(429).retryable() && !st(429).ambiguous());
        assert!(st(503).retryable() && st(503).ambiguous());
        assert!(!st(400).retryable() && !st(401).ambiguous());
        let tr = |kind| Failure::Transport {
            kind,
            detail: String::new(),
        };
        assert!(tr(Transport::NotSent).retryable() && !tr(Transport::NotSent).ambiguous());
        assert!(tr(Transport::Timeout).ambiguous() && tr(Transport::Broken).ambiguous());
        let c =
            OpenAiClient::new(&cfg("http://x/v1"), Secret::new("k"), Arc::new(NoCalls)).unwrap();
        let gave_up = |error, attempts, stop| GaveUp {
            error,
            attempts,
            stop,
        };
        let e = c.failed("x", "y", &gave_up(st(401), 1, Stop::Final));
        assert!(matches!(
            e,
            BackendError::Failed {
                transient: false,
                ..
            }
        ));
        let e = c.failed("x", "y", &gave_up(st(503), 3, Stop::Exhausted));
        assert!(matches!(
            e,
            BackendError::Failed {
                transient: true,
                ..
            }
        ));
        assert!(e.to_string().contains("after 3 attempts"), "{e}");
        let e = c.failed(
            "x",
            "y",
            &gave_up(st(429), 1, Stop::WaitTooLong(Duration::from_secs(900))),
        );
        assert!(
            matches!(e, BackendError::Failed { transient: true, ref message, .. } if message.contains("retry after 15m")),
            "{e}"
        );
    }

    #[test]
    fn verdicts_say_what_is_retried_and_how_long_to_wait() {
        let st = |status, after: Option<u64>| Failure::Status {
            status,
            retry_after: after.map(Duration::from_secs),
            detail: String::new(),
        };
        let body = Failure::BadBody {
            status: 200,
            detail: String::new(),
        };
        let timeout = Failure::from(Timeout {
            after: Duration::from_secs(1),
        });
        let v = |f: &Failure| (f.verdict().class, f.verdict().retry);
        assert_eq!(
            v(&st(429, Some(7))),
            (
                StatusClass::RateLimited,
                Retry::After(Duration::from_secs(7))
            )
        );
        assert_eq!(v(&st(502, None)), (StatusClass::ServerError, Retry::Yes));
        assert_eq!(v(&st(401, None)), (StatusClass::ClientError, Retry::No));
        assert_eq!(v(&body), (StatusClass::Success, Retry::No));
        assert_eq!(v(&timeout), (StatusClass::Transport, Retry::Yes));
        assert!(timeout.ambiguous());
        // A create also retries after a garbled body (the hook cleans up first), never
        // after a 404 (no such project) or another 4xx.
        assert_eq!(body.create_verdict().retry, Retry::Yes);
        assert_eq!(st(404, None).create_verdict().retry, Retry::No);
        assert_eq!(st(400, None).create_verdict().retry, Retry::No);
        assert_eq!(
            st(503, Some(2)).create_verdict().retry,
            Retry::After(Duration::from_secs(2))
        );
    }

    #[test]
    fn usage_results_count_either_request_field() {
        let r = |m: Option<u64>, n: Option<u64>| UsageResult {
            num_model_requests: m,
            num_requests: n,
            api_key_id: None,
        };
        assert_eq!(r(Some(3), None).requests(), Some(3));
        assert_eq!(r(None, Some(4)).requests(), Some(4));
        assert_eq!(r(Some(2), Some(5)).requests(), Some(5));
        assert_eq!(r(None, None).requests(), None);
        let ops: Vec<&str> = USAGE_ENDPOINTS.iter().map(|(_, op)| *op).collect();
        assert!(ops.iter().all(|op| OPERATIONS.contains(op)), "{ops:?}");
        assert_eq!(ops.len(), 8);
    }

    #[test]
    fn strip_url_removes_the_url_part() {
        assert_eq!(
            strip_url("error sending request for url (http://h/v1/x?y=1): connection closed"),
            "error sending request: connection closed"
        );
        assert_eq!(strip_url("plain"), "plain");
    }
}
