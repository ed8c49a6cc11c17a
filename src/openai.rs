//! The OpenAI Admin API client: the daemon's real [`KeyIssuer`], over reqwest.
//!
//! Shapes follow the official OpenAPI description (tests/contract/openai-openapi-subset.json);
//! only the fields the daemon uses are modelled, under their exact names.
//!
//! Every attempt is bounded by `openai.request_timeout` and reported to the
//! [`CallObserver`]; 429 (honouring `Retry-After`), 5xx, connect errors and timeouts are
//! retried with the shared [`RetryPolicy`]; other 4xx are final. A create is never retried
//! blindly: after an answer that leaves open whether the account was made, the accounts of
//! that name are deleted (their key value is lost to us) before creating again.
//!
//! Key values never reach logs or errors: the admin key and checked keys are only put into
//! `Authorization` headers (marked sensitive), the create response's `api_key.value` goes
//! straight into a [`Secret`], response bodies are never logged, and upstream error messages
//! are scrubbed of any key value we hold before they are quoted. The HTTP stack logs no
//! bodies either: reqwest only logs raw bytes with `connection_verbose`, which stays off,
//! and hyper logs nothing without its unstable tracing cfg.

use crate::config::OpenAiConfig;
use crate::retry::{Attempt, RetryPolicy};
use crate::rotation::ports::{
    AccountInfo, AccountRef, Backend, BackendError, CallObserver, KeyIssuer, KeyUsage, MintedKey,
    StatusClass,
};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use url::Url;

/// Operation names reported to the [`CallObserver`] (a bounded metric label set).
pub const OPERATIONS: &[&str] = &[
    "projects.list",
    "service_accounts.create",
    "service_accounts.list",
    "service_accounts.delete",
    "models.list",
    "usage.completions",
    "api_keys.get",
];

/// Largest page the list endpoints allow (`limit` is 1-100).
pub const MAX_PAGE_SIZE: u32 = 100;
/// Guard against a server that always says `has_more` (Prism's mock does): 100k accounts.
const DEFAULT_MAX_PAGES: usize = 1000;
/// Usage buckets per page: the API's maximum for `bucket_width=1m` (one day).
const USAGE_BUCKETS_PER_PAGE: u32 = 1440;
/// Usage pages followed at most (64 days of minutes); a drain looks back minutes or hours.
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
    admin_key: Secret,
    timeout: Duration,
    retry: RetryPolicy,
    page_size: u32,
    max_pages: usize,
    calls: Arc<dyn CallObserver>,
}

/// No key material: base URL and limits only.
impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base", &self.base.as_str())
            .field("admin_key", &self.admin_key)
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

/// `ProjectServiceAccountListResponse`.
#[derive(Debug, Deserialize)]
struct ServiceAccountList {
    data: Vec<ServiceAccount>,
    #[serde(default)]
    last_id: Option<String>,
    has_more: bool,
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

/// `UsageResponse`.
#[derive(Debug, Deserialize)]
struct UsagePage {
    data: Vec<UsageBucket>,
    has_more: bool,
    next_page: Option<String>,
}

/// `UsageTimeBucket` with `UsageCompletionsResult` items.
#[derive(Debug, Deserialize)]
struct UsageBucket {
    results: Vec<UsageCompletionsResult>,
}

#[derive(Debug, Deserialize)]
struct UsageCompletionsResult {
    num_model_requests: u64,
    #[serde(default)]
    api_key_id: Option<String>,
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
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => *status == 429 || *status >= 500,
            Failure::Transport { .. } => true,
            Failure::BadBody { .. } => false,
        }
    }

    /// Whether the server may have carried out the request (a create may have happened).
    fn ambiguous(&self) -> bool {
        match self {
            Failure::Status { status, .. } => *status >= 500,
            Failure::Transport { kind, .. } => *kind != Transport::NotSent,
            Failure::BadBody { .. } => true,
        }
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
            Failure::Transport { .. } => None,
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
        }
    }
}

/// A request to make, rebuilt for every attempt.
struct Req<'a> {
    op: &'static str,
    method: Method,
    url: Url,
    /// Bearer key: the admin key, or the key being checked.
    auth: &'a Secret,
    /// Pre-serialized JSON body.
    body: Option<Vec<u8>>,
    /// A 404 means "already gone" (counts as success for metrics; returned as `None`).
    gone_ok: bool,
}

/// A successful answer: the body of a 2xx, or `None` for an accepted 404.
type Reply = Option<bytes::Bytes>;

impl OpenAiClient {
    /// A client for `cfg.base_url` with `cfg.request_timeout` per attempt and
    /// `cfg.max_retries` retries.
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
        if admin_key.is_empty() || !admin_key.expose().bytes().all(|b| b.is_ascii_graphic()) {
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
            admin_key,
            timeout,
            retry: RetryPolicy {
                max_retries: cfg.max_retries,
                ..RetryPolicy::default()
            },
            page_size: MAX_PAGE_SIZE,
            max_pages: DEFAULT_MAX_PAGES,
            calls,
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
            .map_err(|(f, n)| failed("projects.list", "admin key check", &f, n))
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
            auth: &self.admin_key,
            body: None,
            gone_ok: false,
        }
    }

    /// One attempt: send, read the whole answer within the timeout, report it.
    async fn attempt(&self, req: &Req<'_>) -> Result<Reply, Failure> {
        let started = Instant::now();
        let mut builder = self
            .http
            .request(req.method.clone(), req.url.clone())
            .bearer_auth(req.auth.expose())
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
        let outcome = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(Failure::Transport {
                kind: Transport::Timeout,
                detail: format!("no answer within {:?}", self.timeout),
            }),
            Ok(Err(e)) => Err(transport_failure(&e, self.timeout)),
            Ok(Ok((status, headers, body))) => {
                if status.is_success() {
                    Ok(Some(body))
                } else if status == StatusCode::NOT_FOUND && req.gone_ok {
                    Ok(None)
                } else {
                    Err(Failure::Status {
                        status: status.as_u16(),
                        retry_after: retry_after(&headers),
                        detail: error_detail(&body, &[&self.admin_key, req.auth]),
                    })
                }
            }
        };
        let class = match &outcome {
            Ok(_) => StatusClass::Success,
            Err(f) => f
                .status()
                .map_or(StatusClass::Transport, StatusClass::from_status),
        };
        let elapsed = started.elapsed();
        self.calls.call(Backend::OpenAi, req.op, class, elapsed);
        match &outcome {
            Ok(_) => tracing::debug!(
                operation = req.op,
                status = class.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                "openai call"
            ),
            Err(f) => tracing::debug!(
                operation = req.op,
                status = class.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                error = %f,
                "openai call failed"
            ),
        }
        outcome
    }

    /// Attempts under the client's retry policy; on failure also how many attempts ran.
    async fn call(&self, req: &Req<'_>) -> Result<Reply, (Failure, u32)> {
        self.call_with(&self.retry, req).await
    }

    async fn call_with(
        &self,
        policy: &RetryPolicy,
        req: &Req<'_>,
    ) -> Result<Reply, (Failure, u32)> {
        let attempts = AtomicU32::new(0);
        policy
            .run(
                |_| async {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    match self.attempt(req).await {
                        Ok(reply) => Attempt::Done(Ok(reply)),
                        Err(f) if f.retryable() => {
                            let after = f.retry_after();
                            Attempt::Retry(f, after)
                        }
                        Err(f) => Attempt::Done(Err(f)),
                    }
                },
                |f, n| {
                    self.calls.retry(Backend::OpenAi, req.op);
                    tracing::warn!(operation = req.op, retry = n + 1, error = %f, "retrying OpenAI call");
                },
            )
            .await
            .map_err(|f| (f, attempts.load(Ordering::Relaxed)))
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
    /// body) the accounts of that name are deleted before the next create; after a success
    /// that followed one, any straggler of that name (a late-landing earlier create) too.
    async fn create_service_account(
        &self,
        project: &str,
        name: &str,
    ) -> Result<MintedKey, BackendError> {
        const OP: &str = "service_accounts.create";
        let what = format!("project {project} name {name:?}");
        let body = serde_json::to_vec(&CreateServiceAccountRequest { name }).map_err(|e| {
            failed_msg(OP, &what, &format!("cannot encode the request: {e}"), false)
        })?;
        let mut retries = 0u32;
        let mut had_ambiguous = false;
        loop {
            let failure = match self.create_once(project, &body).await {
                Ok(minted) => {
                    if had_ambiguous {
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
                    return Ok(minted);
                }
                Err(f) => f,
            };
            if matches!(failure, Failure::Status { status: 404, .. }) {
                return Err(BackendError::NotFound {
                    backend: Backend::OpenAi,
                    what: format!("project {project}"),
                });
            }
            let ambiguous = failure.ambiguous();
            if !(failure.retryable() || ambiguous) || retries >= self.retry.max_retries {
                return Err(failed(OP, &what, &failure, retries + 1));
            }
            self.calls.retry(Backend::OpenAi, OP);
            tracing::warn!(operation = OP, retry = retries + 1, ambiguous, error = %failure, "retrying OpenAI call");
            let wait = match failure.retry_after() {
                Some(d) => d.min(self.retry.max_backoff),
                None => self.retry.backoff(retries),
            };
            // Wait first, so an earlier create still in flight has landed before we look.
            tokio::time::sleep(wait).await;
            if ambiguous {
                had_ambiguous = true;
                self.delete_named(project, name, None).await?;
            }
            retries += 1;
        }
    }

    async fn list_service_accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError> {
        const OP: &str = "service_accounts.list";
        let what = format!("project {project}");
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..self.max_pages {
            let mut url = self.url(&["organization", "projects", project, "service_accounts"]);
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("limit", &self.page_size.to_string());
                if let Some(a) = &after {
                    q.append_pair("after", a);
                }
            }
            let req = self.admin_req(OP, Method::GET, url);
            let body = match self.call(&req).await {
                Ok(body) => body.unwrap_or_default(),
                Err((Failure::Status { status: 404, .. }, _)) => {
                    return Err(BackendError::NotFound {
                        backend: Backend::OpenAi,
                        what,
                    })
                }
                Err((f, n)) => return Err(failed(OP, &what, &f, n)),
            };
            let page: ServiceAccountList =
                parse(200, &body).map_err(|f| failed(OP, &what, &f, 1))?;
            let next = page
                .last_id
                .or_else(|| page.data.last().map(|a| a.id.clone()));
            for a in page.data {
                let created_at = timestamp(a.created_at).ok_or_else(|| {
                    failed(
                        OP,
                        &what,
                        &Failure::BadBody {
                            status: 200,
                            detail: format!("created_at {} is out of range", a.created_at),
                        },
                        1,
                    )
                })?;
                out.push(AccountInfo {
                    id: a.id,
                    name: a.name,
                    created_at,
                });
            }
            if !page.has_more {
                return Ok(out);
            }
            match next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => {
                    return Err(failed_msg(
                        OP,
                        &what,
                        "has_more is true but the page gives no new cursor",
                        false,
                    ))
                }
            }
        }
        Err(failed_msg(
            OP,
            &what,
            &format!(
                "still has_more after {} pages of {}; giving up",
                self.max_pages, self.page_size
            ),
            false,
        ))
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
                    parse(200, &body).map_err(|f| failed(OP, &what, &f, 1))?;
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
            Err((f, n)) => Err(failed(OP, &what, &f, n)),
        }
    }

    async fn check_key(&self, key: &Secret) -> Result<(), BackendError> {
        const OP: &str = "models.list";
        let req = Req {
            auth: key,
            ..self.admin_req(OP, Method::GET, self.url(&["models"]))
        };
        let what = format!("key sha256:{}", &key.sha256_hex()[..12]);
        self.call(&req)
            .await
            .map(|_| ())
            .map_err(|(f, n)| failed(OP, &what, &f, n))
    }

    async fn key_usage(
        &self,
        project: &str,
        key_id: &str,
        since: DateTime<Utc>,
    ) -> Result<KeyUsage, BackendError> {
        const USAGE: &str = "usage.completions";
        let what = format!("project {project} key {key_id}");
        let mut requests_since = 0u64;
        let mut page: Option<String> = None;
        let mut done = false;
        for _ in 0..MAX_USAGE_PAGES {
            let mut url = self.url(&["organization", "usage", "completions"]);
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
            let req = self.admin_req(USAGE, Method::GET, url);
            let body = self
                .call(&req)
                .await
                .map_err(|(f, n)| failed(USAGE, &what, &f, n))?
                .unwrap_or_default();
            let usage: UsagePage = parse(200, &body).map_err(|f| failed(USAGE, &what, &f, 1))?;
            requests_since += usage
                .data
                .iter()
                .flat_map(|b| &b.results)
                .filter(|r| r.api_key_id.as_deref().is_none_or(|k| k == key_id))
                .map(|r| r.num_model_requests)
                .sum::<u64>();
            match (usage.has_more, usage.next_page) {
                (true, Some(next)) if page.as_deref() != Some(next.as_str()) => page = Some(next),
                (true, _) => {
                    return Err(failed_msg(
                        USAGE,
                        &what,
                        "has_more is true but next_page gives no new cursor",
                        false,
                    ))
                }
                (false, _) => {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            return Err(failed_msg(
                USAGE,
                &what,
                &format!("still has_more after {MAX_USAGE_PAGES} pages; `since` is too far back"),
                false,
            ));
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
            .map_err(|(f, n)| failed(KEY, &what, &f, n))?
        {
            // The key is gone: nothing can use it any more.
            None => None,
            Some(body) => {
                let k: ProjectApiKey = parse(200, &body).map_err(|f| failed(KEY, &what, &f, 1))?;
                k.last_used_at.and_then(timestamp)
            }
        };
        Ok(KeyUsage {
            last_used_at,
            requests_since,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn failed(op: &str, what: &str, f: &Failure, attempts: u32) -> BackendError {
    let transient = f.retryable();
    let mut message = format!("{op} ({what}): {f}");
    if attempts > 1 {
        message.push_str(&format!(" (gave up after {attempts} attempts)"));
    }
    BackendError::Failed {
        backend: Backend::OpenAi,
        message,
        transient,
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
    use crate::rotation::ports::NoCalls;

    fn cfg(base: &str) -> OpenAiConfig {
        OpenAiConfig {
            base_url: base.into(),
            admin_key_env: "OKR_TEST_UNSET_ADMIN_KEY_VAR".into(),
            admin_key_file: None,
            request_timeout: DurationStr::from_secs(5),
            max_retries: 2,
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
        let e = failed("x", "y", &st(401), 1);
        assert!(matches!(
            e,
            BackendError::Failed {
                transient: false,
                ..
            }
        ));
        let e = failed("x", "y", &st(503), 3);
        assert!(matches!(
            e,
            BackendError::Failed {
                transient: true,
                ..
            }
        ));
        assert!(e.to_string().contains("after 3 attempts"), "{e}");
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
