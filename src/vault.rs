//! Vault KV v2 access.
//!
//! Each published key version carries custom metadata naming the service account and key
//! it belongs to, so the daemon (or a human with `vault kv metadata get`) can tell which
//! OpenAI account a Vault version holds without ever reading the value.
//!
//! [`VaultStore`] is the daemon's real [`SecretStore`]: vaultrs over HTTP(S), token or
//! Kubernetes auth, and check-and-set writes that never turn an ambiguous failure into a
//! second version. Every vaultrs request (logins, renewals and health checks included) takes
//! the shared observed path ([`crate::retry::Call`]): bounded by `vault.request_timeout`,
//! retried with the `[vault]` policy, and reported to the [`CallObserver`] under one of
//! [`OPERATIONS`]. This module only says what a vaultrs error means ([`Fail`]).

use crate::config::{VaultAuth, VaultConfig};
use crate::retry::{Call, GaveUp, Resume, Retry, RetryPolicy, Timeout, Verdict};
use crate::rotation::ports::{
    AccountRef, Backend, BackendError, CallObserver, KeyInfo, KeyMeta, SecretStore, StatusClass,
    StoredKey,
};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use vaultrs::api::kv2::requests::{
    ReadSecretMetadataRequest, ReadSecretRequest, SetSecretMetadataRequest, SetSecretRequest,
    SetSecretRequestOptions,
};
use vaultrs::api::kv2::responses::{ReadSecretMetadataResponse, ReadSecretResponse};
use vaultrs::client::{VaultClient, VaultClientSettings, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// Custom-metadata keys written beside every key version. Values are ids and times only.
pub mod meta {
    /// `svc_acct_...` of the account whose key this version holds.
    pub const SERVICE_ACCOUNT_ID: &str = "okr_service_account_id";
    /// `key_...` of the key this version holds.
    pub const KEY_ID: &str = "okr_key_id";
    /// Rotation that published this version ("seed" for keys put there by hand).
    pub const ROTATION_ID: &str = "okr_rotation_id";
    /// RFC 3339 creation time of the key (key age is measured from it).
    pub const KEY_CREATED_AT: &str = "okr_key_created_at";
}

/// Operation names reported to the [`CallObserver`] (a bounded metric label set).
pub const OPERATIONS: &[&str] = &[
    OP_READ,
    OP_READ_VERSION,
    OP_WRITE,
    OP_METADATA_READ,
    OP_METADATA_WRITE,
    OP_LIST,
    OP_LOGIN,
    OP_LOOKUP_SELF,
    OP_RENEW,
    OP_HEALTH,
];
const OP_READ: &str = "kv.read";
const OP_READ_VERSION: &str = "kv.read_version";
const OP_WRITE: &str = "kv.write";
const OP_METADATA_READ: &str = "kv.metadata.read";
const OP_METADATA_WRITE: &str = "kv.metadata.write";
const OP_LIST: &str = "kv.list";
const OP_LOGIN: &str = "auth.login";
const OP_LOOKUP_SELF: &str = "token.lookup_self";
const OP_RENEW: &str = "token.renew";
const OP_HEALTH: &str = "sys.health";

/// The data field that holds a JSON document (the journal) in its secret.
pub const DOC_FIELD: &str = "doc";

/// Tracing directives the daemon's filter should force. Not for leaks: at TRACE, vaultrs,
/// rustify, reqwest and hyper log methods, paths, lengths and statuses, never bodies or the
/// token (the integration test `vault_store_logs_and_errors_never_hold_key_or_token` checks
/// it). But vaultrs and rustify log every non-2xx answer at ERROR through
/// `#[instrument(err)]`, including the 404s this store expects (a new path, no journal
/// yet), so a healthy rotation would print ERROR lines. [`VaultStore`] logs its own
/// failures with the operation and path, so nothing is lost by silencing them.
pub const QUIET_LOG_DIRECTIVES: &[&str] = &["vaultrs=off", "rustify=off"];

/// Vault's error text for a stale check-and-set (identical in Vault and OpenBao).
const CAS_MISMATCH: &str = "check-and-set parameter did not match the current version";

/// Connecting and authenticating (the daemon cannot start without it).
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("vault.address: {0:?} is not a valid http(s) URL")]
    Address(String),
    #[error("cannot read the Vault {what} from {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Vault token: {0}")]
    NoToken(String),
    #[error("cannot build the Vault client: {0}")]
    Client(String),
    #[error("Vault {method} authentication failed: {message}")]
    Auth {
        method: &'static str,
        message: String,
    },
}

/// The token in use and what Vault said about its lifetime.
struct Session {
    client: Arc<VaultClient>,
    /// Remaining lifetime when obtained; `None` = the token does not expire.
    ttl: Option<Duration>,
    /// The lifetime the login (or token) started with, to notice a max-TTL cap on renewal.
    initial_ttl: Option<Duration>,
    renewable: bool,
    obtained: Instant,
    /// sha256 of the token, to tell whether a token source now holds a different one.
    token_sha256: String,
}

/// Where the store's Vault token stands (ids and times only; for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenStatus {
    /// Time left before the token expires; `None` = it does not expire.
    pub expires_in: Option<Duration>,
    pub renewable: bool,
    /// Logins (or token reads) so far, the first one included.
    pub logins: u32,
    /// Successful renew-self calls so far.
    pub renewals: u32,
}

/// Vault KV v2 through vaultrs. Cheap to share behind an `Arc`; the token is swapped in
/// place after a re-login, so every later call uses the new one.
pub struct VaultStore {
    address: Url,
    mount: String,
    auth: VaultAuth,
    retry: RetryPolicy,
    /// Bound on one attempt.
    timeout: Duration,
    calls: Arc<dyn CallObserver>,
    /// Address, CA, timeout and TLS settings with an empty token; a client per token is
    /// built from it.
    template: VaultClientSettings,
    session: RwLock<Session>,
    logins: AtomicU32,
    renewals: AtomicU32,
}

impl fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // vaultrs' settings and middleware Debug-print the token: never include them.
        f.debug_struct("VaultStore")
            .field("address", &self.address.as_str())
            .field("mount", &self.mount)
            .field("auth", &auth_method(&self.auth))
            .finish_non_exhaustive()
    }
}

fn auth_method(auth: &VaultAuth) -> &'static str {
    match auth {
        VaultAuth::Token { .. } => "token",
        VaultAuth::Kubernetes { .. } => "kubernetes",
    }
}

/// What a failed vaultrs call amounts to; never holds a response body.
#[derive(Debug)]
enum Fail {
    /// HTTP 404 (a missing path, or a deleted or destroyed version).
    NotFound,
    /// HTTP 400 with Vault's check-and-set mismatch error.
    CasMismatch,
    /// Any other HTTP error status, with Vault's `errors` (never data).
    Status { code: u16, errors: Vec<String> },
    /// No HTTP answer. `maybe_applied`: the request may have reached Vault (a timeout or a
    /// broken connection), as opposed to a refused connection.
    Transport {
        message: String,
        maybe_applied: bool,
    },
    /// An answer we cannot use (unparseable, empty); retrying will not help.
    Other(String),
    /// After an ambiguous write, the read-back found a version someone else wrote.
    Moved { expected: u64, now: u64 },
}

/// The observed path's timeout: the request may have reached Vault.
impl From<Timeout> for Fail {
    fn from(t: Timeout) -> Self {
        Fail::Transport {
            message: format!("no answer within {:?}", t.after),
            maybe_applied: true,
        }
    }
}

/// Short, for logs beside the operation and path (never data or tokens).
impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::NotFound => write!(f, "not found (HTTP 404)"),
            Fail::CasMismatch => write!(f, "HTTP 400: {CAS_MISMATCH}"),
            Fail::Status { code, errors } if errors.is_empty() => write!(f, "HTTP {code}"),
            Fail::Status { code, errors } => write!(f, "HTTP {code}: {}", errors.join("; ")),
            Fail::Transport { message, .. } | Fail::Other(message) => f.write_str(message),
            Fail::Moved { expected, now } => write!(
                f,
                "expected version {expected}, Vault now has {now} written by someone else"
            ),
        }
    }
}

impl Fail {
    fn from_client(e: ClientError) -> Fail {
        use rustify::errors::ClientError as Rest;
        match e {
            ClientError::APIError { code: 404, .. } => Fail::NotFound,
            ClientError::APIError { code: 400, errors }
                if errors.iter().any(|m| m.contains(CAS_MISMATCH)) =>
            {
                Fail::CasMismatch
            }
            ClientError::APIError { code, errors } => Fail::Status {
                code,
                errors: errors.into_iter().map(|m| clip(&m)).collect(),
            },
            ClientError::RestClientError { source } => match source {
                // A body without `errors` (e.g. the envelope of a deleted version, or a
                // proxy's HTML page): keep only the status, never the body.
                Rest::ServerResponseError { code: 404, .. } => Fail::NotFound,
                Rest::ServerResponseError { code, .. } => Fail::Status {
                    code,
                    errors: Vec::new(),
                },
                Rest::RequestError { source, .. } => {
                    let refused = source
                        .downcast_ref::<reqwest::Error>()
                        .is_some_and(|r| r.is_connect() && !r.is_timeout());
                    Fail::Transport {
                        message: error_chain(source.as_ref()),
                        maybe_applied: !refused,
                    }
                }
                Rest::ResponseError { source } => Fail::Transport {
                    message: format!("reading the response: {}", error_chain(source.as_ref())),
                    maybe_applied: true,
                },
                Rest::ResponseParseError { .. } => {
                    Fail::Other("unparseable response from Vault".into())
                }
                other => Fail::Other(other.to_string()),
            },
            // These variants carry no body; their Display is a fixed text.
            other => Fail::Other(other.to_string()),
        }
    }

    /// For the observed path. `absent_ok`: a 404 is an answer ("no such path"), not a
    /// failure, for the metrics.
    fn verdict(&self, absent_ok: bool) -> Verdict {
        let class = match self {
            Fail::NotFound if absent_ok => StatusClass::Success,
            Fail::NotFound => StatusClass::ClientError,
            Fail::CasMismatch | Fail::Moved { .. } => StatusClass::ClientError,
            Fail::Status { code, .. } => StatusClass::from_status(*code),
            Fail::Transport { .. } => StatusClass::Transport,
            Fail::Other(_) => StatusClass::ServerError,
        };
        let retry = if self.transient() {
            Retry::Yes
        } else {
            Retry::No
        };
        Verdict::new(class, retry)
    }

    /// Worth retrying: no answer, 429, 5xx.
    fn transient(&self) -> bool {
        match self {
            Fail::Transport { .. } => true,
            Fail::Status { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        }
    }

    /// The request may have been applied although we saw no success.
    fn maybe_applied(&self) -> bool {
        match self {
            Fail::Transport { maybe_applied, .. } => *maybe_applied,
            Fail::Status { code, .. } => *code >= 500,
            _ => false,
        }
    }

    /// A one-line description naming the operation and path (never data or tokens).
    fn describe(&self, op: &str, at: &str) -> String {
        match self {
            Fail::NotFound => format!("{op} {at}: not found (HTTP 404)"),
            Fail::CasMismatch => format!("{op} {at}: HTTP 400: {CAS_MISMATCH}"),
            Fail::Status { code: 403, .. } => {
                format!("permission denied for {op} on {at} (HTTP 403)")
            }
            Fail::Status { code, errors } if errors.is_empty() => {
                format!("{op} {at}: HTTP {code}")
            }
            Fail::Status { code, errors } => {
                format!("{op} {at}: HTTP {code}: {}", errors.join("; "))
            }
            Fail::Transport { message, .. } => format!("{op} {at}: {message}"),
            Fail::Other(m) => format!("{op} {at}: {m}"),
            moved @ Fail::Moved { .. } => format!("{op} {at}: {moved}"),
        }
    }

    fn into_backend(self, op: &str, at: &str) -> BackendError {
        match self {
            Fail::NotFound => BackendError::NotFound {
                backend: Backend::Vault,
                what: at.to_string(),
            },
            Fail::CasMismatch => BackendError::Conflict {
                backend: Backend::Vault,
                what: at.to_string(),
                message: CAS_MISMATCH.into(),
            },
            moved @ Fail::Moved { .. } => BackendError::Conflict {
                backend: Backend::Vault,
                what: at.to_string(),
                message: moved.to_string(),
            },
            other => BackendError::Failed {
                backend: Backend::Vault,
                message: other.describe(op, at),
                transient: other.transient(),
            },
        }
    }
}

/// Vault error strings are short; cap them anyway so a misbehaving proxy cannot flood logs.
fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// `e: cause: cause` (reqwest's top-level message alone hides "connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    clip(&out)
}

fn conflict(at: &str, message: String) -> BackendError {
    BackendError::Conflict {
        backend: Backend::Vault,
        what: at.to_string(),
        message,
    }
}

fn not_found(what: String) -> BackendError {
    BackendError::NotFound {
        backend: Backend::Vault,
        what,
    }
}

fn norm(path: &str) -> &str {
    path.trim_matches('/')
}

/// Our metadata keys, read from a path's custom metadata. Absent or malformed values are
/// `None` (a key put there by hand may have none).
fn key_meta_from(custom: Option<&HashMap<String, String>>) -> KeyMeta {
    let Some(c) = custom else {
        return KeyMeta::default();
    };
    let get = |k: &str| c.get(k).filter(|v| !v.is_empty()).cloned();
    let account = match (get(meta::SERVICE_ACCOUNT_ID), get(meta::KEY_ID)) {
        (Some(id), Some(key_id)) => Some(AccountRef { id, key_id }),
        _ => None,
    };
    KeyMeta {
        account,
        rotation_id: get(meta::ROTATION_ID),
        key_created_at: get(meta::KEY_CREATED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
    }
}

/// Set our keys to `m` inside the user's custom metadata (absent values remove ours).
fn merge_key_meta(custom: &mut HashMap<String, String>, m: &KeyMeta) {
    let mut put = |k: &str, v: Option<String>| match v {
        Some(v) => {
            custom.insert(k.to_string(), v);
        }
        None => {
            custom.remove(k);
        }
    };
    put(
        meta::SERVICE_ACCOUNT_ID,
        m.account.as_ref().map(|a| a.id.clone()),
    );
    put(meta::KEY_ID, m.account.as_ref().map(|a| a.key_id.clone()));
    put(meta::ROTATION_ID, m.rotation_id.clone());
    put(
        meta::KEY_CREATED_AT,
        m.key_created_at.map(|t| t.to_rfc3339()),
    );
}

fn read_trimmed(what: &'static str, path: &Path) -> Result<String, VaultError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| VaultError::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// The token a `Token` auth config points at: `token_file` wins over `token_env`.
fn token_from_source(token_env: &str, token_file: Option<&Path>) -> Result<Secret, VaultError> {
    let token = match token_file {
        Some(p) => read_trimmed("token file", p)?,
        None => std::env::var(token_env)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    };
    if token.is_empty() {
        return Err(VaultError::NoToken(match token_file {
            Some(p) => format!("token file {} is empty", p.display()),
            None => format!("set the environment variable {token_env} or vault.auth.token_file"),
        }));
    }
    Ok(Secret::new(token))
}

/// A token and its lifetime, as a login or lookup reported it.
struct Grant {
    token: Secret,
    ttl: Option<Duration>,
    renewable: bool,
}

fn ttl_of(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl VaultStore {
    /// Build the client (address, CA cert, timeout and retry policy from config) and
    /// authenticate: token from `token_file` (wins) or env var `token_env`; or Kubernetes
    /// auth: read the JWT from `jwt_path`, `POST auth/<mount>/login` with the role. Every
    /// request from here on is reported to `calls`.
    pub async fn connect(
        cfg: &VaultConfig,
        calls: Arc<dyn CallObserver>,
    ) -> Result<VaultStore, VaultError> {
        let retry = cfg.retry_policy();
        let timeout = cfg.request_timeout.get();
        let address = Url::parse(&cfg.address)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| VaultError::Address(cfg.address.clone()))?;
        // Everything explicit: vaultrs would otherwise take VAULT_SKIP_VERIFY, VAULT_CACERT
        // and client certificates from the environment.
        let template = VaultClientSettingsBuilder::default()
            .address(address.as_str())
            .token("")
            .ca_certs(
                cfg.ca_cert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>(),
            )
            .identity(None)
            .verify(true)
            .timeout(Some(cfg.request_timeout.get()))
            .build()
            .map_err(|e| VaultError::Client(e.to_string()))?;
        if let Some(ca) = &cfg.ca_cert {
            // vaultrs reads it only for https; check it now either way, naming the file.
            std::fs::metadata(ca).map_err(|source| VaultError::ReadFile {
                what: "CA certificate",
                path: ca.clone(),
                source,
            })?;
        }
        let anonymous = client_for(&template, &Secret::new(""))?;
        let store_mount = cfg.kv_mount.trim_matches('/').to_string();
        let observed = Observed {
            retry: &retry,
            timeout,
            calls: &*calls,
        };
        let grant = authenticate(&anonymous, &template, &cfg.auth, &observed).await?;
        let session = Session {
            client: Arc::new(client_for(&template, &grant.token)?),
            ttl: grant.ttl,
            initial_ttl: grant.ttl,
            renewable: grant.renewable,
            obtained: Instant::now(),
            token_sha256: grant.token.sha256_hex(),
        };
        tracing::info!(
            address = %address,
            auth = auth_method(&cfg.auth),
            ttl_secs = grant.ttl.map(|t| t.as_secs()),
            renewable = grant.renewable,
            "authenticated to Vault"
        );
        Ok(VaultStore {
            address,
            mount: store_mount,
            auth: cfg.auth.clone(),
            retry,
            timeout,
            calls,
            template,
            session: RwLock::new(session),
            logins: AtomicU32::new(1),
            renewals: AtomicU32::new(0),
        })
    }

    /// Vault answers and is unsealed (for /readyz). A standby counts as ready (it forwards).
    /// One attempt, so a probe answers within one request timeout.
    pub async fn health(&self) -> Result<(), BackendError> {
        let client = self.client();
        let mut url = self.address.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().extend(["v1", "sys", "health"]);
        }
        let once = RetryPolicy {
            max_retries: 0,
            ..self.retry
        };
        // Read it ourselves: vaultrs' health type does not parse OpenBao's answer.
        let r = self
            .observed()
            .call(OP_HEALTH, "sys/health", &once)
            .run(
                |f: &Fail| f.verdict(false),
                |_| async {
                    let resp = client
                        .http
                        .http
                        .get(url.clone())
                        .query(&[("standbyok", "true"), ("perfstandbyok", "true")])
                        .send()
                        .await
                        .map_err(|e| Fail::Transport {
                            message: format!("health check: {}", error_chain(&e)),
                            maybe_applied: false,
                        })?;
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let sealed = body.get("sealed").and_then(Value::as_bool);
                    let initialized = body.get("initialized").and_then(Value::as_bool);
                    let why = match (status, initialized, sealed) {
                        (200, Some(true), Some(false)) => return Ok(()),
                        (_, Some(false), _) => {
                            format!("Vault is not initialized (HTTP {status})")
                        }
                        (_, _, Some(true)) => format!("Vault is sealed (HTTP {status})"),
                        _ => format!("health check: HTTP {status}"),
                    };
                    Err(Fail::Status {
                        code: if status == 200 { 500 } else { status },
                        errors: vec![why],
                    })
                },
            )
            .await;
        r.map_err(|g| BackendError::Failed {
            backend: Backend::Vault,
            message: match g.error {
                Fail::Status { mut errors, .. } if errors.len() == 1 => errors.remove(0),
                f => format!("health check: {f}"),
            },
            transient: true,
        })
    }

    /// Keep the token alive: renew-self at ~2/3 of its TTL; if not renewable or renewal
    /// fails, log in again (Kubernetes auth re-reads the JWT file: projected tokens rotate).
    /// Token auth with a non-expiring token (ttl 0) needs nothing. Stops on `cancel`.
    pub fn spawn_token_maintenance(self: &Arc<Self>, cancel: CancellationToken) -> JoinHandle<()> {
        let store = Arc::clone(self);
        tokio::spawn(async move { store.maintain(cancel).await })
    }

    async fn maintain(&self, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let due = {
                let s = self.read_session();
                match s.ttl {
                    None => {
                        tracing::info!("Vault token does not expire; no renewal needed");
                        return;
                    }
                    Some(ttl) => (ttl * 2 / 3).saturating_sub(s.obtained.elapsed()),
                }
            };
            // After a failed refresh the due time has passed: back off instead.
            let wait = if failures == 0 {
                due
            } else {
                self.retry.backoff(failures - 1)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.refresh_token().await {
                Ok(how) => {
                    failures = 0;
                    let ttl = self.read_session().ttl;
                    tracing::debug!(
                        how,
                        ttl_secs = ttl.map(|t| t.as_secs()),
                        "Vault token refreshed"
                    );
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, failures, "Vault token refresh failed; retrying");
                }
            }
        }
    }

    /// Renew the token, or log in again when it cannot be renewed (or renewal hit the
    /// token's max TTL). Returns how.
    async fn refresh_token(&self) -> Result<&'static str, VaultError> {
        let (client, renewable, initial) = {
            let s = self.read_session();
            (Arc::clone(&s.client), s.renewable, s.initial_ttl)
        };
        if renewable {
            let once = RetryPolicy {
                max_retries: 0,
                ..self.retry
            };
            let renewed = self
                .observed()
                .call(OP_RENEW, "auth/token/renew-self", &once)
                .run(
                    |f: &Fail| f.verdict(false),
                    |_| async {
                        vaultrs::token::renew_self(&*client, None)
                            .await
                            .map_err(Fail::from_client)
                    },
                )
                .await
                .map_err(|g| g.error);
            match renewed {
                Ok(auth) => {
                    let ttl = ttl_of(auth.lease_duration);
                    // A renewal capped by the max TTL gives less and less: log in afresh
                    // instead, where that yields a new token (Kubernetes auth).
                    let capped = match (ttl, initial) {
                        (Some(t), Some(i)) => t < i / 2,
                        _ => false,
                    };
                    if !(capped && matches!(self.auth, VaultAuth::Kubernetes { .. })) {
                        let mut s = self.write_session();
                        s.ttl = ttl;
                        s.renewable = auth.renewable;
                        s.obtained = Instant::now();
                        self.renewals.fetch_add(1, Ordering::Relaxed);
                        return Ok("renewed");
                    }
                }
                Err(f) => {
                    tracing::warn!(error = %f.describe("renew-self", "auth/token/renew-self"), "Vault token renewal failed; logging in again");
                }
            }
        }
        let anonymous = client_for(&self.template, &Secret::new(""))?;
        let grant = authenticate(&anonymous, &self.template, &self.auth, &self.observed()).await?;
        if matches!(self.auth, VaultAuth::Token { .. })
            && grant.token.sha256_hex() == self.read_session().token_sha256
        {
            return Err(VaultError::Auth {
                method: "token",
                message: "the token cannot be renewed and its source still holds the same token; provide a new one".into(),
            });
        }
        let client = Arc::new(client_for(&self.template, &grant.token)?);
        let mut s = self.write_session();
        *s = Session {
            client,
            ttl: grant.ttl,
            initial_ttl: grant.ttl,
            renewable: grant.renewable,
            obtained: Instant::now(),
            token_sha256: grant.token.sha256_hex(),
        };
        self.logins.fetch_add(1, Ordering::Relaxed);
        Ok("logged in again")
    }

    /// Where the token stands.
    pub fn token_status(&self) -> TokenStatus {
        let s = self.read_session();
        TokenStatus {
            expires_in: s.ttl.map(|t| t.saturating_sub(s.obtained.elapsed())),
            renewable: s.renewable,
            logins: self.logins.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
        }
    }

    fn read_session(&self) -> std::sync::RwLockReadGuard<'_, Session> {
        self.session.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_session(&self) -> std::sync::RwLockWriteGuard<'_, Session> {
        self.session.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The client holding the current token.
    fn client(&self) -> Arc<VaultClient> {
        Arc::clone(&self.read_session().client)
    }

    /// `<mount>/<path>`, how errors name a path.
    fn at(&self, path: &str) -> String {
        format!("{}/{}", self.mount, path)
    }

    fn observed(&self) -> Observed<'_> {
        Observed {
            retry: &self.retry,
            timeout: self.timeout,
            calls: &*self.calls,
        }
    }

    /// Run one vaultrs call on the observed path: transient failures are retried,
    /// everything else is final. `absent_ok`: a 404 is an expected answer.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        path: &str,
        absent_ok: bool,
        call: F,
    ) -> Result<T, Fail>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let at = self.at(path);
        let run = || async {
            self.observed()
                .call(op, &at, &self.retry)
                .run(
                    |f: &Fail| f.verdict(absent_ok),
                    |_| {
                        let fut = call(self.client());
                        async move { fut.await.map_err(Fail::from_client) }
                    },
                )
                .await
        };
        match run().await.map_err(|g| g.error) {
            // A token revoked or expired before its renewal: log in again (token auth
            // re-reads its source) and try once more; a 403 was not applied. If no new
            // token can be had, the 403 stands.
            Err(Fail::Status { code: 403, .. }) if self.refresh_token().await.is_ok() => {
                tracing::info!(op, "Vault answered 403; logged in again and retrying once");
                run().await.map_err(|g| g.error)
            }
            r => r,
        }
    }

    /// `GET data/<path>[?version=n]`; `None` on 404.
    async fn read_data(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<ReadSecretResponse>, Fail> {
        let mount = self.mount.as_str();
        let op = if version.is_some() {
            OP_READ_VERSION
        } else {
            OP_READ
        };
        let r = self
            .retrying(op, path, true, |c| async move {
                let req = ReadSecretRequest {
                    mount: mount.to_string(),
                    path: path.to_string(),
                    version,
                };
                vaultrs::api::exec_with_result(&*c, req).await
            })
            .await;
        match r {
            Ok(r) => Ok(Some(r)),
            Err(Fail::NotFound) => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// `GET metadata/<path>`; `None` on 404.
    async fn read_metadata(&self, path: &str) -> Result<Option<ReadSecretMetadataResponse>, Fail> {
        let mount = self.mount.as_str();
        let r = self
            .retrying(OP_METADATA_READ, path, true, |c| async move {
                let req = ReadSecretMetadataRequest {
                    mount: mount.to_string(),
                    path: path.to_string(),
                };
                vaultrs::api::exec_with_result(&*c, req).await
            })
            .await;
        match r {
            Ok(m) => Ok(Some(m)),
            Err(Fail::NotFound) => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// Write `data` as a new version with `cas = expected`. Transient failures are
    /// retried, but after one that may have been applied the next step (a before-retry
    /// hook) is to read back: if our data is there as `expected + 1` that is the answer, if
    /// the version moved otherwise it is a conflict, and only if nothing changed is the
    /// write sent again.
    async fn cas_write(
        &self,
        path: &str,
        data: &Map<String, Value>,
        expected: u64,
    ) -> Result<u64, BackendError> {
        let at = self.at(path);
        let cas = u32::try_from(expected).map_err(|_| BackendError::Failed {
            backend: Backend::Vault,
            message: format!("write {at}: version {expected} exceeds what check-and-set accepts"),
            transient: false,
        })?;
        // Set when a read-back could not tell whether an ambiguous write landed.
        let unresolved = AtomicBool::new(false);
        let unresolved = &unresolved;
        let mount = self.mount.as_str();
        let mut relogged = false;
        loop {
            let outcome = self
                .observed()
                .call(OP_WRITE, &at, &self.retry)
                .run_with(
                    |f: &Fail| f.verdict(false),
                    |f: &Fail, _| {
                        let ambiguous = f.maybe_applied();
                        async move {
                            if !ambiguous {
                                return Resume::Retry;
                            }
                            match self.landed(path, data, expected).await {
                                Ok(Landed::Yes(v)) => Resume::Finish(Ok(v)),
                                Ok(Landed::Unchanged) => Resume::Retry,
                                Ok(Landed::Moved(now)) => {
                                    Resume::Finish(Err(Fail::Moved { expected, now }))
                                }
                                Err(f) => {
                                    unresolved.store(true, Ordering::SeqCst);
                                    Resume::Finish(Err(f))
                                }
                            }
                        }
                    },
                    |_| {
                        let c = self.client();
                        let req = SetSecretRequest {
                            mount: mount.to_string(),
                            path: path.to_string(),
                            data: Value::Object(data.clone()),
                            options: Some(SetSecretRequestOptions { cas }),
                        };
                        async move {
                            vaultrs::api::exec_with_result(&*c, req)
                                .await
                                .map(|m| m.version)
                                .map_err(Fail::from_client)
                        }
                    },
                )
                .await;
            let g: GaveUp<Fail> = match outcome {
                Ok(v) => return Ok(v),
                Err(g) => g,
            };
            // A revoked or expired token: log in again and write once more (a 403 was not
            // applied); without a new token the 403 stands.
            if !relogged
                && matches!(g.error, Fail::Status { code: 403, .. })
                && self.refresh_token().await.is_ok()
            {
                relogged = true;
                tracing::info!("Vault answered 403 to a write; logged in again and retrying once");
                continue;
            }
            return match g.error {
                Fail::CasMismatch => Err(conflict(
                    &at,
                    format!("{CAS_MISMATCH} (expected version {expected})"),
                )),
                f => {
                    let maybe_applied = f.maybe_applied() || unresolved.load(Ordering::SeqCst);
                    let mut e = f.into_backend("write", &at);
                    if maybe_applied {
                        if let BackendError::Failed { message, .. } = &mut e {
                            message
                                .push_str(" (the write may have been applied; read back to know)");
                        }
                    }
                    Err(e)
                }
            };
        }
    }

    /// After an ambiguous write: is `data` at `expected + 1`?
    async fn landed(
        &self,
        path: &str,
        data: &Map<String, Value>,
        expected: u64,
    ) -> Result<Landed, Fail> {
        let current = self
            .read_metadata(path)
            .await?
            .map_or(0, |m| m.current_version);
        if current == expected {
            return Ok(Landed::Unchanged);
        }
        if current == expected + 1 {
            if let Some(r) = self.read_data(path, Some(current)).await? {
                if r.data.as_object() == Some(data) {
                    return Ok(Landed::Yes(current));
                }
            }
        }
        Ok(Landed::Moved(current))
    }

    /// Merge our keys into the path's custom metadata (Vault's POST replaces the whole map,
    /// so read, merge, write).
    async fn merge_metadata(&self, path: &str, m: &KeyMeta) -> Result<(), Fail> {
        let mut custom = self
            .read_metadata(path)
            .await?
            .and_then(|r| r.custom_metadata)
            .unwrap_or_default();
        let before = custom.clone();
        merge_key_meta(&mut custom, m);
        if custom == before {
            return Ok(());
        }
        let mount = self.mount.as_str();
        let custom = &custom;
        self.retrying(OP_METADATA_WRITE, path, false, |c| async move {
            let req = SetSecretMetadataRequest {
                mount: mount.to_string(),
                path: path.to_string(),
                custom_metadata: Some(custom.clone()),
                ..Default::default()
            };
            vaultrs::api::exec_with_empty(&*c, req).await
        })
        .await
    }
}

enum Landed {
    Yes(u64),
    Unchanged,
    Moved(u64),
}

/// A vaultrs client for `token` with the template's address, CA and timeout.
fn client_for(template: &VaultClientSettings, token: &Secret) -> Result<VaultClient, VaultError> {
    let mut settings = template.clone();
    settings.token = token.expose().to_string();
    VaultClient::new(settings).map_err(|e| {
        let detail = match &e {
            ClientError::FileReadError { path, source } => format!("{path}: {source}"),
            ClientError::ParseCertificateError { path, source } => {
                format!("{path}: not a PEM certificate bundle: {source}")
            }
            other => error_chain(other),
        };
        VaultError::Client(detail)
    })
}

/// What the observed path needs from the store; also usable before the store exists
/// (the first login).
struct Observed<'a> {
    retry: &'a RetryPolicy,
    timeout: Duration,
    calls: &'a dyn CallObserver,
}

impl<'a> Observed<'a> {
    fn call(&self, op: &'static str, what: &'a str, retry: &'a RetryPolicy) -> Call<'a> {
        Call::new(Backend::Vault, op, retry, self.calls)
            .timeout(self.timeout)
            .what(what)
    }
}

/// Obtain a token as `auth` says, with the retry policy on transient failures.
async fn authenticate(
    anonymous: &VaultClient,
    template: &VaultClientSettings,
    auth: &VaultAuth,
    observed: &Observed<'_>,
) -> Result<Grant, VaultError> {
    let verdict = |f: &Fail| f.verdict(false);
    match auth {
        VaultAuth::Token {
            token_env,
            token_file,
        } => {
            let token = token_from_source(token_env, token_file.as_deref())?;
            let client = client_for(template, &token)?;
            let me = observed
                .call(OP_LOOKUP_SELF, "auth/token/lookup-self", observed.retry)
                .run(verdict, |_| async {
                    vaultrs::token::lookup_self(&client)
                        .await
                        .map_err(Fail::from_client)
                })
                .await
                .map_err(|g| VaultError::Auth {
                    method: "token",
                    message: match g.error {
                        Fail::Status { code: 403, .. } => {
                            "Vault rejected the token (lookup-self: HTTP 403); it is invalid or expired, or lacks the default policy".into()
                        }
                        f => f.describe("lookup-self", "auth/token/lookup-self"),
                    },
                })?;
            Ok(Grant {
                token,
                ttl: ttl_of(me.ttl),
                renewable: me.renewable.unwrap_or(false),
            })
        }
        VaultAuth::Kubernetes {
            role,
            mount,
            jwt_path,
        } => {
            // Re-read every time: projected service-account tokens rotate on disk.
            let jwt = Secret::new(read_trimmed("service-account token", jwt_path)?);
            let mount = mount.trim_matches('/');
            let at = format!("auth/{mount}/login");
            let info = observed
                .call(OP_LOGIN, &at, observed.retry)
                .run(verdict, |_| async {
                    vaultrs::auth::kubernetes::login(anonymous, mount, role, jwt.expose())
                        .await
                        .map_err(Fail::from_client)
                })
                .await
                .map_err(|g| VaultError::Auth {
                    method: "kubernetes",
                    message: g.error.describe(&format!("login with role {role:?}"), &at),
                })?;
            Ok(Grant {
                token: Secret::new(info.client_token),
                ttl: ttl_of(info.lease_duration),
                renewable: info.renewable,
            })
        }
    }
}

#[async_trait]
impl SecretStore for VaultStore {
    async fn read_key(&self, path: &str, field: &str) -> Result<Option<StoredKey>, BackendError> {
        let path = norm(path);
        let Some(r) = self
            .read_data(path, None)
            .await
            .map_err(|f| f.into_backend("read", &self.at(path)))?
        else {
            return Ok(None);
        };
        let Some(key) = r.data.get(field).and_then(Value::as_str) else {
            return Ok(None);
        };
        Ok(Some(StoredKey {
            version: r.metadata.version,
            key: Secret::new(key),
            meta: key_meta_from(r.metadata.custom_metadata.as_ref()),
        }))
    }

    async fn read_key_meta(
        &self,
        path: &str,
        _field: &str,
    ) -> Result<Option<KeyInfo>, BackendError> {
        let path = norm(path);
        Ok(self
            .read_metadata(path)
            .await
            .map_err(|f| f.into_backend("read metadata", &self.at(path)))?
            .map(|m| KeyInfo {
                meta: key_meta_from(m.custom_metadata.as_ref()),
                version: m.current_version,
                version_created_at: m
                    .versions
                    .get(&m.current_version.to_string())
                    .and_then(|v| DateTime::parse_from_rfc3339(&v.created_time).ok())
                    .map(|t| t.with_timezone(&Utc)),
            }))
    }

    async fn read_key_version(
        &self,
        path: &str,
        field: &str,
        version: u64,
    ) -> Result<Secret, BackendError> {
        let path = norm(path);
        let what = format!("{} version {version}", self.at(path));
        let r = self
            .read_data(path, Some(version))
            .await
            .map_err(|f| f.into_backend("read", &what))?
            .ok_or_else(|| not_found(what.clone()))?;
        r.data
            .get(field)
            .and_then(Value::as_str)
            .map(Secret::new)
            .ok_or_else(|| not_found(format!("field {field:?} of {what}")))
    }

    async fn write_key(
        &self,
        path: &str,
        field: &str,
        key: &Secret,
        meta: &KeyMeta,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let path = norm(path);
        let at = self.at(path);
        let current = self
            .read_metadata(path)
            .await
            .map_err(|f| f.into_backend("read metadata", &at))?
            .map_or(0, |m| m.current_version);
        if current != expected_version {
            return Err(conflict(
                &at,
                format!("expected version {expected_version}, Vault has {current}"),
            ));
        }
        // Keep the other fields users store beside the key.
        let mut data = if current == 0 {
            Map::new()
        } else {
            match self
                .read_data(path, Some(current))
                .await
                .map_err(|f| f.into_backend("read", &at))?
            {
                Some(ReadSecretResponse {
                    data: Value::Object(m),
                    ..
                }) => m,
                _ => Map::new(), // deleted or destroyed: nothing to keep
            }
        };
        data.insert(field.to_string(), Value::String(key.expose().to_string()));
        let version = self.cas_write(path, &data, expected_version).await?;
        self.merge_metadata(path, meta).await.map_err(|f| {
            let mut e = f.into_backend("write metadata", &at);
            if let BackendError::Failed { message, .. } = &mut e {
                message.push_str(&format!(
                    " (version {version} was written; its metadata was not updated)"
                ));
            }
            e
        })?;
        tracing::info!(path = %at, version, field, "published key to Vault");
        Ok(version)
    }

    async fn write_key_meta(&self, path: &str, meta: &KeyMeta) -> Result<(), BackendError> {
        let path = norm(path);
        self.merge_metadata(path, meta)
            .await
            .map_err(|f| f.into_backend("write metadata", &self.at(path)))
    }

    async fn read_doc(&self, path: &str) -> Result<Option<(u64, Value)>, BackendError> {
        let path = norm(path);
        let r = self
            .read_data(path, None)
            .await
            .map_err(|f| f.into_backend("read", &self.at(path)))?;
        Ok(r.map(|r| {
            (
                r.metadata.version,
                r.data.get(DOC_FIELD).cloned().unwrap_or(Value::Null),
            )
        }))
    }

    async fn write_doc(
        &self,
        path: &str,
        doc: &Value,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let path = norm(path);
        let mut data = Map::new();
        data.insert(DOC_FIELD.to_string(), doc.clone());
        self.cas_write(path, &data, expected_version).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let prefix = norm(prefix);
        let mount = self.mount.as_str();
        let r = self
            .retrying(OP_LIST, prefix, true, |c| async move {
                let dir = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                vaultrs::kv2::list(&*c, mount, &dir).await
            })
            .await;
        match r {
            Ok(mut keys) => {
                keys.sort();
                Ok(keys)
            }
            Err(Fail::NotFound) => Ok(Vec::new()),
            Err(f) => Err(f.into_backend("list", &self.at(prefix))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_meta_round_trips_through_custom_metadata_and_keeps_user_keys() {
        let m = KeyMeta {
            account: Some(AccountRef {
                id: "svc_acct_1".into(),
                key_id: "key_1".into(),
            }),
            rotation_id: Some("rot-1".into()),
            key_created_at: Some(
                DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
        };
        let mut custom = HashMap::from([("owner".to_string(), "team-a".to_string())]);
        merge_key_meta(&mut custom, &m);
        assert_eq!(custom["owner"], "team-a");
        assert_eq!(custom[meta::SERVICE_ACCOUNT_ID], "svc_acct_1");
        assert_eq!(key_meta_from(Some(&custom)), m);
        // Absent values remove ours, and only ours.
        merge_key_meta(&mut custom, &KeyMeta::default());
        assert_eq!(
            custom,
            HashMap::from([("owner".to_string(), "team-a".to_string())])
        );
        assert_eq!(key_meta_from(None), KeyMeta::default());
    }

    #[test]
    fn malformed_metadata_reads_as_unknown() {
        let custom = HashMap::from([
            (
                meta::SERVICE_ACCOUNT_ID.to_string(),
                "svc_acct_1".to_string(),
            ),
            (meta::KEY_CREATED_AT.to_string(), "yesterday".to_string()),
        ]);
        let m = key_meta_from(Some(&custom));
        assert_eq!(m.account, None, "an account needs both ids");
        assert_eq!(m.key_created_at, None);
    }

    #[test]
    fn failures_are_classified_like_vault_means_them() {
        let api = |code, errors: &[&str]| {
            Fail::from_client(ClientError::APIError {
                code,
                errors: errors.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert!(matches!(api(404, &[]), Fail::NotFound));
        assert!(matches!(api(400, &[CAS_MISMATCH]), Fail::CasMismatch));
        let denied = api(403, &["permission denied"]);
        assert!(!denied.transient());
        let msg = denied.describe("read", "secret/apps/x");
        assert!(
            msg.contains("permission denied") && msg.contains("secret/apps/x"),
            "{msg}"
        );
        assert!(api(503, &["Vault is sealed"]).transient());
        assert!(api(429, &[]).transient());
        assert!(!api(400, &["bad"]).transient());
        let envelope = Fail::from_client(ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError {
                code: 404,
                content: Some(r#"{"data":{"data":null}}"#.into()),
            },
        });
        assert!(matches!(envelope, Fail::NotFound));
        let bad_gateway = Fail::from_client(ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError {
                code: 502,
                content: Some("<html>sk-should-not-appear</html>".into()),
            },
        });
        assert!(bad_gateway.transient() && bad_gateway.maybe_applied());
        assert!(!bad_gateway.describe("write", "p").contains("sk-should"));
    }

    #[test]
    fn token_file_wins_over_env_and_empty_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let var = format!("OKR_UNIT_TOKEN_{}", uuid::Uuid::new_v4().simple());
        // The name is unique to this test, so no other test sees it change.
        std::env::set_var(&var, "from-env");
        assert_eq!(
            token_from_source(&var, Some(&file)).unwrap().expose(),
            "from-file"
        );
        assert_eq!(token_from_source(&var, None).unwrap().expose(), "from-env");
        std::env::remove_var(&var);
        let e = token_from_source(&var, None).unwrap_err().to_string();
        assert!(e.contains(&var), "{e}");
        std::fs::write(&file, "  \n").unwrap();
        assert!(token_from_source(&var, Some(&file)).is_err());
        let e = token_from_source(&var, Some(&dir.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("token file") && e.contains("absent"), "{e}");
    }
}
