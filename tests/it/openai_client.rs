//! The real OpenAI Admin API client (`openai_key_rotator::openai`) against the OpenAI
//! simulator: directly (CRUD, paging, usage, faults, leak check) and through Prism with the
//! official description (every `KeyIssuer` method, no contract violations).

use crate::support;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use openai_key_rotator::config::{DurationStr, OpenAiConfig};
use openai_key_rotator::openai::OpenAiClient;
use openai_key_rotator::retry::RetryPolicy;
use openai_key_rotator::rotation::ports::{
    Backend, BackendError, CallObserver, KeyIssuer, StatusClass,
};
use openai_key_rotator::sandbox::openai::{Faults, OpenAiSim, RateLimit, UsageEndpoint};
use openai_key_rotator::sandbox::{loopback, serve, Server};
use openai_key_rotator::secret::Secret;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "sk-admin-client-test-ADMINVALUE-0123456789abcdef";

/// Hears every call and retry the client reports.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(&'static str, StatusClass)>>,
    retries: Mutex<Vec<&'static str>>,
}

impl CallObserver for Recorder {
    fn call(&self, backend: Backend, op: &'static str, status: StatusClass, _: Duration) {
        assert_eq!(backend, Backend::OpenAi);
        self.calls.lock().unwrap().push((op, status));
    }
    fn retry(&self, backend: Backend, op: &'static str) {
        assert_eq!(backend, Backend::OpenAi);
        self.retries.lock().unwrap().push(op);
    }
}

impl Recorder {
    fn calls(&self, op: &str, class: StatusClass) -> usize {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(o, c)| *o == op && *c == class)
            .count()
    }
    fn retries(&self) -> usize {
        self.retries.lock().unwrap().len()
    }
}

/// A served simulator with one project.
struct Env {
    sim: OpenAiSim,
    server: Server,
    project: String,
}

async fn env() -> Env {
    let sim = OpenAiSim::new(Secret::new(ADMIN));
    let project = sim.create_project("client-test");
    let server = sim
        .serve(loopback(0), CancellationToken::new())
        .await
        .expect("serve simulator");
    Env {
        sim,
        server,
        project,
    }
}

impl Env {
    fn base(&self) -> String {
        format!("{}/v1", self.server.url())
    }

    /// A [`FailProxy`] in front of this simulator.
    async fn fail_proxy(&self) -> (FailProxy, Server) {
        start_fail_proxy(&self.server.url()).await
    }
}

// ---------------------------------------------------------------------------------------
// A usage endpoint answering a status the simulator's faults cannot give (a 4xx).

/// The usage endpoints besides completions (the simulator serves them all; these are the
/// ones only planted usage feeds, as the simulator's data plane has no such calls).
const OTHER_USAGE_ENDPOINTS: [UsageEndpoint; 7] = [
    UsageEndpoint::Embeddings,
    UsageEndpoint::Moderations,
    UsageEndpoint::Images,
    UsageEndpoint::AudioSpeeches,
    UsageEndpoint::AudioTranscriptions,
    UsageEndpoint::FileSearchCalls,
    UsageEndpoint::WebSearchCalls,
];

/// Forwards everything to the simulator, except that a usage endpoint set with `fail`
/// answers that status in OpenAI's error shape (the simulator's faults are 5xx only; a
/// 404 is what an API without the endpoint answers). Counts the usage requests it saw.
#[derive(Clone)]
struct FailProxy {
    upstream: String,
    http: reqwest::Client,
    /// endpoint path -> HTTP status to fail with
    faults: Arc<Mutex<std::collections::HashMap<String, u16>>>,
    /// endpoint path of every usage request it saw
    seen: Arc<Mutex<Vec<String>>>,
}

impl FailProxy {
    fn fail(&self, endpoint: UsageEndpoint, status: u16) {
        self.faults
            .lock()
            .unwrap()
            .insert(endpoint.path().into(), status);
    }
    fn seen(&self, endpoint: UsageEndpoint) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == endpoint.path())
            .count()
    }
}

async fn fail_proxy_handler(
    axum::extract::State(proxy): axum::extract::State<FailProxy>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    if let Some(endpoint) = parts.uri.path().strip_prefix("/v1/organization/usage/") {
        proxy.seen.lock().unwrap().push(endpoint.to_string());
        let status = proxy.faults.lock().unwrap().get(endpoint).copied();
        if let Some(status) = status {
            let body = json!({"error": {"message": "injected by the test proxy", "type": "invalid_request_error", "param": null, "code": null}});
            return (
                http::StatusCode::from_u16(status).unwrap(),
                axum::Json(body),
            )
                .into_response();
        }
    }
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut fwd = proxy
        .http
        .request(parts.method.clone(), format!("{}{target}", proxy.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            fwd = fwd.header(name, value);
        }
    }
    let resp = match fwd.send().await {
        Ok(r) => r,
        Err(_) => return (http::StatusCode::BAD_GATEWAY, "proxy: upstream failed").into_response(),
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let mut out = axum::response::Response::new(axum::body::Body::from(bytes));
    *out.status_mut() = status;
    for (name, value) in &headers {
        if name != http::header::TRANSFER_ENCODING && name != http::header::CONTENT_LENGTH {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// The proxy over `upstream` (the simulator's root URL); clients use `<server>/v1`.
async fn start_fail_proxy(upstream: &str) -> (FailProxy, Server) {
    let proxy = FailProxy {
        upstream: upstream.to_string(),
        http: reqwest::Client::new(),
        faults: Arc::default(),
        seen: Arc::default(),
    };
    let router = axum::Router::new()
        .fallback(fail_proxy_handler)
        .with_state(proxy.clone());
    let server = serve(router, loopback(0), CancellationToken::new())
        .await
        .expect("serve the fail proxy");
    (proxy, server)
}

fn config(base: &str, timeout: Duration, max_retries: u32) -> OpenAiConfig {
    OpenAiConfig {
        base_url: base.to_string(),
        request_timeout: DurationStr(timeout),
        max_retries,
        ..OpenAiConfig::default()
    }
}

/// A client with short backoffs (Retry-After still applies, capped at 10 s).
fn client(base: &str, admin: &str, rec: &Arc<Recorder>, max_retries: u32) -> OpenAiClient {
    client_with(base, admin, rec, Duration::from_secs(10), max_retries)
}

fn client_with(
    base: &str,
    admin: &str,
    rec: &Arc<Recorder>,
    timeout: Duration,
    max_retries: u32,
) -> OpenAiClient {
    let calls: Arc<dyn CallObserver> = rec.clone();
    OpenAiClient::new(
        &config(base, timeout, max_retries),
        Secret::new(admin),
        calls,
    )
    .expect("client")
    .with_retry_policy(RetryPolicy {
        max_retries,
        base: Duration::from_millis(1),
        max_backoff: Duration::from_secs(10),
        ..RetryPolicy::default()
    })
}

/// One chat completion on the simulator's data plane with `key` (feeds the Usage API).
async fn chat(base: &str, key: &Secret) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key.expose())
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(resp.status(), 200);
}

fn named(sim: &OpenAiSim, project: &str, name: &str) -> Vec<String> {
    sim.service_accounts(project)
        .into_iter()
        .filter(|a| a.name == name)
        .map(|a| a.id)
        .collect()
}

fn assert_final(e: &BackendError, needle: &str) {
    match e {
        BackendError::Failed {
            transient: false,
            message,
            ..
        } => assert!(message.contains(needle), "{message}"),
        other => panic!("expected a final error containing {needle:?}, got {other:?}"),
    }
}

fn assert_transient(e: &BackendError, needle: &str) {
    match e {
        BackendError::Failed {
            transient: true,
            message,
            ..
        } => assert!(message.contains(needle), "{message}"),
        other => panic!("expected a transient error containing {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn create_list_delete_check_key_and_ping() {
    let env = env().await;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 3);
    let p = &env.project;

    c.ping().await.expect("ping");
    assert_eq!(env.sim.calls("projects.list"), 1);

    let minted = c
        .create_service_account(p, "okr-chatbot-r1")
        .await
        .expect("create");
    assert_eq!(minted.name, "okr-chatbot-r1");
    assert!(minted.account.id.starts_with("svc_acct_"));
    assert!(minted.account.key_id.starts_with("key_"));
    assert!(env.sim.key_is_live(minted.key.expose()));
    assert_eq!(
        named(&env.sim, p, "okr-chatbot-r1"),
        vec![minted.account.id.clone()]
    );
    let age = Utc::now() - minted.created_at;
    assert!(age.num_seconds().abs() < 60, "{age}");

    // Paging: 150 more accounts, so the default page of 100 needs two pages.
    for i in 0..150 {
        env.sim
            .create_service_account(p, &format!("seed-{i:03}"))
            .unwrap();
    }
    let want: Vec<String> = env
        .sim
        .service_accounts(p)
        .into_iter()
        .map(|a| a.id)
        .collect();
    let before = env.sim.calls("service_accounts.list");
    let listed = c.list_service_accounts(p).await.expect("list");
    let ids: Vec<String> = listed.iter().map(|a| a.id.clone()).collect();
    assert_eq!(ids, want);
    assert_eq!(env.sim.calls("service_accounts.list") - before, 2);
    assert_eq!(listed[0].name, "okr-chatbot-r1");
    assert_eq!(listed[0].created_at, minted.created_at);

    // A small page size walks every `after` cursor: ceil(151 / 7) = 22 pages.
    let small = client(&env.base(), ADMIN, &rec, 3).with_page_size(7);
    let before = env.sim.calls("service_accounts.list");
    let listed = small.list_service_accounts(p).await.expect("list by 7");
    assert_eq!(listed.len(), 151);
    assert_eq!(env.sim.calls("service_accounts.list") - before, 22);
    // The page cap guards against a server that never stops saying has_more.
    let capped = client(&env.base(), ADMIN, &rec, 3)
        .with_page_size(7)
        .with_max_pages(3);
    let e = capped.list_service_accounts(p).await.unwrap_err();
    assert_final(&e, "after 3 pages");

    // The new key answers; after the delete it is dead (401, final, not retried).
    c.check_key(&minted.key).await.expect("check_key");
    c.delete_service_account(p, &minted.account.id)
        .await
        .expect("delete");
    assert!(named(&env.sim, p, "okr-chatbot-r1").is_empty());
    c.delete_service_account(p, &minted.account.id)
        .await
        .expect("delete twice: 404 counts as done");
    assert_eq!(env.sim.calls("service_accounts.delete"), 2);
    assert_eq!(
        rec.calls("service_accounts.delete", StatusClass::Success),
        2
    );
    let models_before = env.sim.calls("models.list");
    let e = c.check_key(&minted.key).await.unwrap_err();
    assert_final(&e, "HTTP 401");
    assert_final(&e, "invalid_api_key");
    assert_eq!(
        env.sim.calls("models.list") - models_before,
        1,
        "401 is not retried"
    );
    assert!(!e.to_string().contains(minted.key.expose()));

    // An unknown project is NotFound, for create and list.
    let e = c
        .create_service_account("proj_nope", "okr-x")
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::NotFound { .. }), "{e:?}");
    let e = c.list_service_accounts("proj_nope").await.unwrap_err();
    assert!(matches!(e, BackendError::NotFound { .. }), "{e:?}");
    assert_eq!(rec.retries(), 0);
}

#[tokio::test]
async fn key_usage_counts_model_requests_since_and_last_used() {
    let env = env().await;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 3);
    let p = &env.project;
    // A fixed clock an hour back, so `since` can be moved around freely.
    let t0 = env.sim.now() - 3600;
    env.sim.set_clock(Some(t0));
    let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();

    let busy = c.create_service_account(p, "okr-busy").await.unwrap();
    let quiet = c.create_service_account(p, "okr-quiet").await.unwrap();
    for _ in 0..3 {
        chat(&env.base(), &busy.key).await;
    }
    env.sim.advance_clock(300);
    for _ in 0..2 {
        chat(&env.base(), &busy.key).await;
    }
    assert_eq!(env.sim.requests_served(&busy.account.key_id), 5);

    let u = c
        .key_usage(p, &busy.account.key_id, at(t0 - 60))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 5);
    assert_eq!(u.last_used_at, Some(at(t0 + 300)));
    let u = c
        .key_usage(p, &busy.account.key_id, at(t0 + 120))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 2, "only the requests after `since`");
    let u = c
        .key_usage(p, &busy.account.key_id, at(t0 + 301))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 0);

    let u = c
        .key_usage(p, &quiet.account.key_id, at(t0 - 60))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 0, "a quiet key");
    assert_eq!(u.last_used_at, None);

    // Two days of 1-minute buckets take three pages (1440 buckets each), on every usage
    // endpoint.
    let before: Vec<u64> = UsageEndpoint::ALL
        .iter()
        .map(|e| env.sim.calls(e.operation()))
        .collect();
    let u = c
        .key_usage(p, &busy.account.key_id, at(t0 - 2 * 86_400))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 5);
    for (e, b) in UsageEndpoint::ALL.iter().zip(before) {
        assert_eq!(env.sim.calls(e.operation()) - b, 3, "{}", e.path());
    }

    // A deleted key: usage history stays, last_used_at is gone (404 → None).
    c.delete_service_account(p, &busy.account.id).await.unwrap();
    let u = c
        .key_usage(p, &busy.account.key_id, at(t0 - 60))
        .await
        .unwrap();
    assert_eq!(u.requests_since, 5);
    assert_eq!(u.last_used_at, None);
    assert!(rec.calls("api_keys.get", StatusClass::Success) >= 5);
}

/// A key used only for embeddings (or audio, images, moderations, file or web search) is
/// not quiet: every usage endpoint that filters by `api_key_ids` is asked. Before, only
/// completions were, and each of these keys looked quiet.
#[tokio::test]
async fn key_usage_sees_use_on_every_usage_endpoint() {
    let env = env().await;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 2);
    let p = &env.project;
    let now = Utc::now().timestamp();
    let since = DateTime::from_timestamp(now - 600, 0).unwrap();
    let quiet = c.create_service_account(p, "okr-quiet").await.unwrap();
    let (someone_else, _) = env.sim.create_service_account(p, "someone-else").unwrap();
    let someone_else = someone_else.key_id.unwrap();
    for (i, endpoint) in OTHER_USAGE_ENDPOINTS.into_iter().enumerate() {
        let used = c
            .create_service_account(p, &format!("okr-{i}"))
            .await
            .unwrap();
        let k = &used.account.key_id;
        let plant =
            |key: &str, at: i64, n: u64| env.sim.record_usage(key, endpoint, at, n).unwrap();
        plant(k, now - 120, 2);
        plant(k, now - 60, 1);
        // Outside the window, and another key's use: not counted.
        plant(k, now - 3600, 50);
        plant(&quiet.account.key_id, now - 60, 0);
        plant(&someone_else, now - 60, 70);
        let calls = rec.calls.lock().unwrap().len();
        let u = c.key_usage(p, k, since).await.unwrap();
        assert_eq!(u.requests_since, 3, "{}", endpoint.path());
        // One call per endpoint (one page each), and the key lookup.
        let ops: Vec<&str> = rec.calls.lock().unwrap()[calls..]
            .iter()
            .map(|(op, _)| *op)
            .collect();
        assert_eq!(ops.len(), 9, "{ops:?}");
        assert!(ops.contains(&endpoint.operation()), "{ops:?}");
    }
    // Negative control: the quiet key (a zero-request result, others' use) stays quiet.
    let u = c.key_usage(p, &quiet.account.key_id, since).await.unwrap();
    assert_eq!(u.requests_since, 0);
    assert_eq!(u.last_used_at, None);
    for op in openai_key_rotator::openai::USAGE_ENDPOINTS
        .iter()
        .map(|(_, op)| *op)
    {
        assert!(
            rec.calls(op, StatusClass::Success) == OTHER_USAGE_ENDPOINTS.len() + 1,
            "{op} was not asked every time"
        );
    }
}

/// One usage endpoint failing fails the check (the drain keeps waiting) instead of
/// counting only the endpoints that answered.
#[tokio::test]
async fn key_usage_fails_closed_when_a_usage_endpoint_fails() {
    let env = env().await;
    let (proxy, proxy_server) = env.fail_proxy().await;
    let rec = Arc::new(Recorder::default());
    let c = client(&format!("{}/v1", proxy_server.url()), ADMIN, &rec, 2);
    let p = &env.project;
    let k = c.create_service_account(p, "okr-fc").await.unwrap();
    let since = Utc::now() - chrono::Duration::minutes(5);
    // Control: it answers.
    c.key_usage(p, &k.account.key_id, since)
        .await
        .expect("usage");

    proxy.fail(UsageEndpoint::Images, 404);
    let e = c.key_usage(p, &k.account.key_id, since).await.unwrap_err();
    assert_final(&e, "usage.images");
    assert_final(&e, "HTTP 404");
    proxy.fail(UsageEndpoint::Images, 503);
    let seen = proxy.seen(UsageEndpoint::Images);
    let e = c.key_usage(p, &k.account.key_id, since).await.unwrap_err();
    assert_transient(&e, "usage.images");
    assert_transient(&e, "gave up after 3 attempts");
    assert_eq!(proxy.seen(UsageEndpoint::Images) - seen, 3);
    // Negative control: the simulator's own 5xx on one endpoint fails it the same way.
    proxy.faults.lock().unwrap().clear();
    env.sim
        .set_faults(Faults::fail_next(3, 502).only("usage.web_search_calls"));
    let e = c.key_usage(p, &k.account.key_id, since).await.unwrap_err();
    assert_transient(&e, "usage.web_search_calls");
    env.sim.clear_faults();
    c.key_usage(p, &k.account.key_id, since)
        .await
        .expect("usage once the faults are gone");
}

#[tokio::test]
async fn bad_admin_key_is_final_and_not_retried() {
    let env = env().await;
    let rec = Arc::new(Recorder::default());
    let wrong = "sk-admin-WRONGVALUE-not-the-admin-key-0123456789";
    let c = client(&env.base(), wrong, &rec, 5);
    let e = c.list_service_accounts(&env.project).await.unwrap_err();
    assert_final(&e, "HTTP 401");
    assert_final(&e, "invalid_api_key");
    assert_eq!(env.sim.calls("service_accounts.list"), 1, "no retry on 401");
    assert_eq!(rec.retries(), 0);
    assert_eq!(
        rec.calls("service_accounts.list", StatusClass::ClientError),
        1
    );
    let e = c.ping().await.unwrap_err();
    assert_final(&e, "HTTP 401");
    let e = c
        .create_service_account(&env.project, "okr-x")
        .await
        .unwrap_err();
    assert_final(&e, "HTTP 401");
    assert_eq!(env.sim.calls("service_accounts.create"), 1);
    for shown in [format!("{e}"), format!("{e:?}")] {
        assert!(!shown.contains(wrong) && !shown.contains(ADMIN), "{shown}");
    }
}

/// Sequential calls against a limit of 2 per second: the client reads the
/// `x-ratelimit-*-requests` headers and waits for the announced reset instead of running into
/// the limit, so no call meets a 429.
#[tokio::test]
async fn rate_limit_is_paced_by_the_headers() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 5);
    env.sim.set_faults(Faults::rate_limit(2));

    let minted = c
        .create_service_account(p, "okr-storm")
        .await
        .expect("create");
    for _ in 0..2 {
        c.list_service_accounts(p).await.expect("list");
    }
    c.key_usage(
        p,
        &minted.account.key_id,
        Utc::now() - chrono::Duration::minutes(5),
    )
    .await
    .expect("usage");
    c.delete_service_account(p, &minted.account.id)
        .await
        .expect("delete");
    c.list_service_accounts(p).await.expect("list");

    let limited: usize = rec
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, c)| *c == StatusClass::RateLimited)
        .count();
    // 14 admin calls at 2 per second (8 of them usage calls), none refused.
    assert_eq!(limited, 0, "the client ran into the limit");
    assert_eq!(rec.retries(), 0);
    assert_eq!(rec.calls.lock().unwrap().len(), 14);
    assert!(named(&env.sim, p, "okr-storm").is_empty());

    // Negative control: a limit of 0 cannot be paced around; with max_retries 0 the call
    // fails after exactly one attempt.
    env.sim.set_faults(Faults {
        rate_limit: Some(RateLimit {
            requests_per_second: 0,
            retry_after_secs: Some(1),
            omit_retry_after: false,
        }),
        ..Faults::default()
    });
    let rec0 = Arc::new(Recorder::default());
    let c0 = client(&env.base(), ADMIN, &rec0, 0);
    let before = env.sim.calls("service_accounts.list");
    let e = c0.list_service_accounts(p).await.unwrap_err();
    assert_transient(&e, "HTTP 429");
    assert_transient(&e, "rate_limit_exceeded");
    assert_eq!(env.sim.calls("service_accounts.list") - before, 1);
    assert_eq!(rec0.retries(), 0);
}

/// Concurrent callers share one pacer: 16 lists at once against a limit of 4 per second.
/// Unpaced, 12 of them meet a 429 at once and more after each `Retry-After`; paced, the first
/// call learns the limit and the rest wait for the window (at most a stray 429 at a window
/// edge).
#[tokio::test]
async fn concurrent_calls_share_the_pace() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 10);
    env.sim.set_faults(Faults::rate_limit(4));
    let all = futures::future::join_all((0..16).map(|_| c.list_service_accounts(p))).await;
    assert!(all.iter().all(Result::is_ok), "{all:?}");
    let limited = rec.calls("service_accounts.list", StatusClass::RateLimited);
    assert!(limited <= 2, "{limited} calls met a 429: not paced");
    assert_eq!(rec.calls("service_accounts.list", StatusClass::Success), 16);
}

#[tokio::test]
async fn max_retries_bounds_the_attempts() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 2);

    // Every call 429 with Retry-After: 0.
    env.sim.set_faults(Faults {
        rate_limit: Some(RateLimit {
            requests_per_second: 0,
            retry_after_secs: Some(0),
            omit_retry_after: false,
        }),
        ..Faults::default()
    });
    let e = c.list_service_accounts(p).await.unwrap_err();
    assert_transient(&e, "gave up after 3 attempts");
    assert_eq!(env.sim.calls("service_accounts.list"), 3);
    assert_eq!(rec.retries(), 2);

    // A 429 on create is answered before processing: retried, bounded, nothing created.
    let e = c.create_service_account(p, "okr-429").await.unwrap_err();
    assert_transient(&e, "HTTP 429");
    assert_eq!(env.sim.calls("service_accounts.create"), 3);
    assert_eq!(
        env.sim.calls("service_accounts.list"),
        3,
        "a 429 needs no clean-up listing"
    );

    // 5xx storms are bounded the same way.
    env.sim.set_faults(Faults::fail_next(100, 503));
    let before = env.sim.calls("service_accounts.delete");
    let e = c.delete_service_account(p, "svc_acct_x").await.unwrap_err();
    assert_transient(&e, "HTTP 503");
    assert_eq!(env.sim.calls("service_accounts.delete") - before, 3);
}

/// The policy comes from `[openai]`: a `Retry-After` above `max_retry_after` ends the call
/// at once (transient, with the server's hint), where it used to be cut to the backoff cap
/// and retried into the same limit; one within the cap is waited in full.
#[tokio::test]
async fn retry_after_above_max_retry_after_gives_up_at_once() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let cfg = OpenAiConfig {
        max_retries: 3,
        retry_base: DurationStr(Duration::from_millis(1)),
        max_backoff: DurationStr(Duration::from_millis(5)),
        max_retry_after: DurationStr::from_secs(2),
        ..config(&env.base(), Duration::from_secs(5), 3)
    };
    let calls: Arc<dyn CallObserver> = rec.clone();
    let c = OpenAiClient::new(&cfg, Secret::new(ADMIN), calls).expect("client");
    let limit = |secs| Faults {
        rate_limit: Some(RateLimit {
            requests_per_second: 0,
            retry_after_secs: Some(secs),
            omit_retry_after: false,
        }),
        ..Faults::default()
    };

    env.sim.set_faults(limit(60));
    let start = Instant::now();
    let e = c.list_service_accounts(p).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_transient(&e, "HTTP 429");
    assert_transient(&e, "retry after 1m");
    assert_transient(&e, "max_retry_after 2s");
    assert_eq!(env.sim.calls("service_accounts.list"), 1, "no retry burnt");
    assert_eq!(rec.retries(), 0);
    // A create the same: one attempt, nothing to clean up.
    let e = c.create_service_account(p, "okr-later").await.unwrap_err();
    assert_transient(&e, "retry after 1m");
    assert_eq!(env.sim.calls("service_accounts.create"), 1);

    // Control: within the cap the wait is the server's, in full, then the retries.
    env.sim.set_faults(limit(1));
    let start = Instant::now();
    let e = c.list_service_accounts(p).await.unwrap_err();
    assert_transient(&e, "gave up after 4 attempts");
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(env.sim.calls("service_accounts.list"), 1 + 4);
    assert_eq!(rec.retries(), 3);
}

#[tokio::test]
async fn server_error_on_the_nth_call_is_retried() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 3);
    let (acct, _key) = env.sim.create_service_account(p, "okr-victim").unwrap();

    env.sim.set_faults(Faults::fail_nth(2, 503));
    c.list_service_accounts(p).await.expect("call 1 passes");
    c.delete_service_account(p, &acct.id)
        .await
        .expect("call 2 fails with 503, the retry passes");
    assert_eq!(env.sim.calls("service_accounts.delete"), 2);
    assert_eq!(
        rec.calls("service_accounts.delete", StatusClass::ServerError),
        1
    );
    assert_eq!(rec.retries(), 1);
    assert!(env.sim.service_accounts(p).is_empty());
}

#[tokio::test]
async fn a_hang_fails_within_timeout_times_attempts() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let timeout = Duration::from_millis(300);
    let c = client_with(&env.base(), ADMIN, &rec, timeout, 2);

    env.sim.set_faults(Faults::hang());
    let start = Instant::now();
    let e = c.list_service_accounts(p).await.unwrap_err();
    let elapsed = start.elapsed();
    assert_transient(&e, "no answer within");
    assert_eq!(env.sim.calls("service_accounts.list"), 3);
    assert_eq!(
        rec.calls("service_accounts.list", StatusClass::Transport),
        3
    );
    assert!(elapsed >= timeout * 3, "{elapsed:?}");
    assert!(
        elapsed < timeout * 3 + Duration::from_secs(2),
        "{elapsed:?}"
    );

    // A hang on create only: each attempt times out (ambiguous), the name is looked up
    // between attempts, and nothing is left behind.
    env.sim
        .set_faults(Faults::hang().only("service_accounts.create"));
    let lists = env.sim.calls("service_accounts.list");
    let start = Instant::now();
    let e = c.create_service_account(p, "okr-hung").await.unwrap_err();
    let elapsed = start.elapsed();
    assert_transient(&e, "no answer within");
    assert!(
        elapsed < timeout * 3 + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(env.sim.calls("service_accounts.create"), 3);
    assert_eq!(env.sim.calls("service_accounts.list") - lists, 2);
    env.sim.clear_faults();
    assert!(named(&env.sim, p, "okr-hung").is_empty());
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_leaves_exactly_one_account() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 3);

    // Control: the fault really creates the account before answering 500, so a blind
    // retry (what the official SDK does) leaves two accounts of one name.
    env.sim.set_faults(
        Faults::fail_nth(1, 500)
            .after_effect()
            .only("service_accounts.create"),
    );
    let http = reqwest::Client::new();
    for _ in 0..2 {
        http.post(format!(
            "{}/organization/projects/{p}/service_accounts",
            env.base()
        ))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "okr-naive"}))
        .send()
        .await
        .unwrap();
    }
    assert_eq!(
        named(&env.sim, p, "okr-naive").len(),
        2,
        "the fault took effect"
    );

    env.sim.set_faults(
        Faults::fail_nth(1, 500)
            .after_effect()
            .only("service_accounts.create"),
    );
    let creates = env.sim.calls("service_accounts.create");
    let minted = c
        .create_service_account(p, "okr-lost")
        .await
        .expect("create");
    assert_eq!(env.sim.calls("service_accounts.create") - creates, 2);
    assert_eq!(
        named(&env.sim, p, "okr-lost"),
        vec![minted.account.id.clone()]
    );
    assert!(env.sim.key_is_live(minted.key.expose()));
    // The lost one was deleted: one delete by the clean-up, and the key we hold works.
    assert_eq!(
        rec.calls("service_accounts.delete", StatusClass::Success),
        1
    );
    c.check_key(&minted.key)
        .await
        .expect("the minted key works");

    // A rate-limited create is paced, not refused: the second waits for the announced
    // reset (a 429 on create, answered before processing, is covered by
    // max_retries_bounds_the_attempts).
    env.sim
        .set_faults(Faults::rate_limit(1).only("service_accounts.create"));
    let lists = env.sim.calls("service_accounts.list");
    c.create_service_account(p, "okr-rl-1").await.unwrap();
    c.create_service_account(p, "okr-rl-2").await.unwrap();
    assert_eq!(env.sim.calls("service_accounts.list"), lists);
    assert_eq!(
        rec.calls("service_accounts.create", StatusClass::RateLimited),
        0
    );
    assert_eq!(named(&env.sim, p, "okr-rl-2").len(), 1);
}

// ---------------------------------------------------------------------------------------
// Leak check.

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

/// Everything at TRACE (our events, hyper-util's, and reqwest's `log` records through the
/// bridge that `SubscriberInitExt::set_default` installs) goes to one buffer; no key value
/// may appear there or in any error. Current-thread runtime: the simulator's and hyper's
/// tasks run on this thread, under this thread's subscriber.
#[tokio::test]
async fn no_key_value_reaches_logs_or_errors() {
    use tracing_subscriber::util::SubscriberInitExt;
    // tracing caches each callsite's interest process-wide. With a single registered
    // dispatcher it computes that from the default of whichever thread hits the callsite
    // first, so a callsite first reached by another test's thread is cached as "never"
    // and this subscriber would silently miss it. A second live dispatcher makes the cached
    // interest "sometimes", i.e. asked per event of this thread's subscriber.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let buf = LogBuf::default();
    let _guard = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(buf.clone())
        .finish()
        .set_default();
    // A callsite registered by another thread while the two were being set up may still
    // hold a stale interest: rebuild now and once any such registration has finished.
    tracing::callsite::rebuild_interest_cache();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::callsite::rebuild_interest_cache();

    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 2);
    let mut shown = vec![format!("{c:?}")];

    // A lost create first (retry and clean-up paths log), then the normal cycle.
    env.sim.set_faults(
        Faults::fail_nth(1, 500)
            .after_effect()
            .only("service_accounts.create"),
    );
    let minted = c.create_service_account(p, "okr-leak").await.unwrap();
    env.sim.clear_faults();
    shown.push(format!("{minted:?}"));
    c.check_key(&minted.key).await.unwrap();
    c.delete_service_account(p, &minted.account.id)
        .await
        .unwrap();
    let e = c.check_key(&minted.key).await.unwrap_err();
    shown.extend([format!("{e}"), format!("{e:?}")]);
    let wrong = "sk-admin-WRONGVALUE-not-the-admin-key-0123456789";
    let bad = client(&env.base(), wrong, &rec, 2);
    shown.push(format!("{bad:?}"));
    let e = bad
        .create_service_account(p, "okr-leak-2")
        .await
        .unwrap_err();
    shown.extend([format!("{e}"), format!("{e:?}")]);

    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    // The capture works: our events and reqwest's `log` records are there.
    assert!(logs.contains("service_accounts.create"), "{logs}");
    assert!(logs.contains(&minted.account.id), "{logs}");
    assert!(logs.contains("starting new connection"), "{logs}");
    assert!(logs.contains("TRACE"), "{logs}");
    // Every call's event arrived (a stale callsite would lose some, and hide a leak).
    let events = logs
        .lines()
        .filter(|l| {
            // One per attempt (the retry notices carry `retry=`, not `attempt=`).
            l.contains("openai_key_rotator::retry: backend call")
                && l.contains("backend=\"openai\"")
                && l.contains(" attempt=")
        })
        .count();
    assert_eq!(events, rec.calls.lock().unwrap().len(), "{logs}");
    for secret in [minted.key.expose(), ADMIN, wrong] {
        assert!(!logs.contains(secret), "a key value is in the logs");
        for s in &shown {
            assert!(!s.contains(secret), "a key value is in {s}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through Prism.

/// A recording forwarder between the client and Prism: keeps every `sl-violations` header
/// and every Prism problem document the client's own requests got.
#[derive(Clone)]
pub(crate) struct Tap {
    pub(crate) upstream: String,
    pub(crate) http: reqwest::Client,
    pub(crate) seen: Arc<Mutex<Vec<String>>>,
    pub(crate) violations: Arc<Mutex<Vec<String>>>,
}

pub(crate) async fn tap(
    axum::extract::State(t): axum::extract::State<Tap>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let what = format!("{} {}", parts.method, parts.uri.path());
    let mut fwd = t
        .http
        .request(parts.method.clone(), format!("{}{target}", t.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            fwd = fwd.header(name, value);
        }
    }
    let resp = match fwd.send().await {
        Ok(r) => r,
        Err(e) => {
            t.violations.lock().unwrap().push(format!("{what}: {e}"));
            return (http::StatusCode::BAD_GATEWAY, "tap: upstream failed").into_response();
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    t.seen
        .lock()
        .unwrap()
        .push(format!("{what} -> {}", status.as_u16()));
    if let Some(v) = headers.get("sl-violations") {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        t.violations.lock().unwrap().push(format!("{what}: {v}"));
    }
    if headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/problem+json"))
    {
        let doc = String::from_utf8_lossy(&bytes).to_string();
        t.violations.lock().unwrap().push(format!("{what}: {doc}"));
    }
    let mut out = axum::response::Response::new(axum::body::Body::from(bytes));
    *out.status_mut() = status;
    for (name, value) in &headers {
        if name != http::header::TRANSFER_ENCODING && name != http::header::CONTENT_LENGTH {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// Prism's log lines reporting a violation (as the simulator's contract test reads them).
pub(crate) fn violation_lines(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| {
            l.contains("Violation:")
                || l.contains("#VIOLATIONS")
                || l.contains("#UNPROCESSABLE_ENTITY")
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn every_key_issuer_method_passes_the_official_description_through_prism() {
    let env = env().await;
    let p = &env.project;
    // Prism checks the simulator's answers on every usage endpoint too.
    let prism = support::start_prism(&support::openai_spec(), &env.base()).await;
    let t = Tap {
        upstream: prism.url.clone(),
        http: reqwest::Client::new(),
        seen: Arc::default(),
        violations: Arc::default(),
    };
    let router = axum::Router::new().fallback(tap).with_state(t.clone());
    let tap_server = serve(router, loopback(0), CancellationToken::new())
        .await
        .expect("serve tap");
    let rec = Arc::new(Recorder::default());
    // Prism serves without /v1: the client's base URL is the tap's root.
    let c = client(&tap_server.url(), ADMIN, &rec, 2).with_page_size(2);

    c.ping().await.expect("ping");
    for i in 0..3 {
        env.sim
            .create_service_account(p, &format!("seed-{i}"))
            .unwrap();
    }
    let minted = c
        .create_service_account(p, "okr-prism")
        .await
        .expect("create");
    let listed = c.list_service_accounts(p).await.expect("list (2 per page)");
    assert_eq!(listed.len(), 4);
    c.check_key(&minted.key).await.expect("check_key");
    for _ in 0..2 {
        chat(&env.base(), &minted.key).await;
    }
    let now = Utc::now().timestamp();
    for (i, e) in OTHER_USAGE_ENDPOINTS.into_iter().enumerate() {
        env.sim
            .record_usage(&minted.account.key_id, e, now - 60, i as u64 + 1)
            .unwrap();
    }
    let u = c
        .key_usage(
            p,
            &minted.account.key_id,
            Utc::now() - chrono::Duration::minutes(5),
        )
        .await
        .expect("key_usage");
    assert_eq!(u.requests_since, 2 + (1..=7).sum::<u64>());
    assert!(u.last_used_at.is_some());
    c.delete_service_account(p, &minted.account.id)
        .await
        .expect("delete");

    let seen = t.seen.lock().unwrap().clone();
    for want in [
        "GET /organization/projects -> 200",
        "POST /organization/projects/",
        "GET /models -> 200",
        "GET /organization/usage/completions -> 200",
        "DELETE /organization/projects/",
    ] {
        assert!(
            seen.iter().any(|s| s.contains(want)),
            "{want} not in {seen:#?}"
        );
    }
    for e in OTHER_USAGE_ENDPOINTS {
        let want = format!("GET /organization/usage/{} -> 200", e.path());
        assert!(seen.contains(&want), "{want} not in {seen:#?}");
    }
    assert!(
        seen.iter()
            .filter(|s| s.contains("/service_accounts -> 200") && s.starts_with("GET"))
            .count()
            >= 2,
        "paging did not go through Prism: {seen:#?}"
    );
    assert!(seen.iter().all(|s| s.ends_with("-> 200")), "{seen:#?}");
    let violations = t.violations.lock().unwrap().clone();
    let lines = violation_lines(&prism.guard.output());
    assert!(
        violations.is_empty() && lines.is_empty(),
        "contract violations:\n{}\nPrism log:\n{}",
        violations.join("\n"),
        lines.join("\n")
    );

    // Negative control: deleting again gets a 404, a status the description does not
    // declare for this path. The client takes it as done, and the tap sees Prism flag it.
    c.delete_service_account(p, &minted.account.id)
        .await
        .expect("404 counts as done");
    let violations = t.violations.lock().unwrap().clone();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(
        violations[0].contains("Unable to match the returned status code"),
        "{}",
        violations[0]
    );
    // Prism logs after answering: once the control's line is there, every earlier request
    // has been logged too, and the control must be the only violation line.
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = violation_lines(&prism.guard.output());
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines_now = violation_lines(&prism.guard.output());
    assert_eq!(lines_now.len(), 1, "Prism log:\n{}", prism.guard.output());
    assert_eq!(lines, lines_now);
}

#[tokio::test]
async fn project_keys_are_listed_page_by_page_with_both_owners_and_a_5xx_is_retried() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    for i in 0..9 {
        env.sim
            .create_service_account(p, &format!("seed-{i}"))
            .unwrap();
    }
    let user = env
        .sim
        .create_user_key(p, "user_ada", "ada laptop", Some(1_700_000_000))
        .unwrap();
    let c = client(&env.base(), ADMIN, &rec, 3).with_page_size(4);
    env.sim
        .set_faults(Faults::fail_nth(2, 503).only("api_keys.list"));
    let keys = c.list_project_keys(p).await.expect("list");
    assert_eq!(keys.len(), 10);
    // 10 keys in pages of 4: 3 pages, plus the retried 503.
    assert_eq!(env.sim.calls("api_keys.list"), 4);
    assert_eq!(rec.calls("api_keys.list", StatusClass::ServerError), 1);
    let want: Vec<String> = env
        .sim
        .service_accounts(p)
        .into_iter()
        .filter_map(|a| a.key_id)
        .chain([user.clone()])
        .collect();
    let got: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
    assert_eq!(got, want);
    let ada = keys.iter().find(|k| k.id == user).unwrap();
    assert_eq!(
        ada.owner,
        openai_key_rotator::rotation::ports::KeyOwner::User {
            id: "user_ada".into()
        }
    );
    assert_eq!(ada.last_used_at.map(|t| t.timestamp()), Some(1_700_000_000));
    assert!(matches!(
        &keys[0].owner,
        openai_key_rotator::rotation::ports::KeyOwner::ServiceAccount { name, .. } if name == "seed-0"
    ));
    env.sim.clear_faults();

    // Negative controls: the page cap ends a list that will not end; an unknown project is
    // not found.
    let capped = client(&env.base(), ADMIN, &rec, 3)
        .with_page_size(4)
        .with_max_pages(2);
    let e = capped.list_project_keys(p).await.unwrap_err();
    assert_final(&e, "after 2 pages");
    let e = c.list_project_keys("proj_nosuch").await.unwrap_err();
    assert!(matches!(e, BackendError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn a_key_expiry_is_sent_as_expires_in_seconds() {
    let env = env().await;
    let p = &env.project;
    let rec = Arc::new(Recorder::default());
    let c = client(&env.base(), ADMIN, &rec, 3);
    let minted = c
        .create_service_account_expiring(p, "okr-expiring", Some(Duration::from_secs(3600)))
        .await
        .expect("create");
    let a = env
        .sim
        .service_accounts(p)
        .into_iter()
        .find(|a| a.id == minted.account.id)
        .unwrap();
    assert_eq!(a.key_expires_at, Some(a.created_at + 3600));
    // Negative control: no expiry asked, none set.
    let plain = c
        .create_service_account_expiring(p, "okr-plain", None)
        .await
        .expect("create");
    let a = env
        .sim
        .service_accounts(p)
        .into_iter()
        .find(|a| a.id == plain.account.id)
        .unwrap();
    assert_eq!(a.key_expires_at, None);
    // An organization policy that requires an expiry refuses a create without one.
    env.sim.set_key_lifetime_policy(Some(7200));
    let e = c
        .create_service_account_expiring(p, "okr-refused", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expires_in_seconds"), "{e}");
    c.create_service_account_expiring(p, "okr-within", Some(Duration::from_secs(7200)))
        .await
        .expect("within the policy");
}
