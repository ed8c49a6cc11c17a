//! Forwarding of API calls from a follower to the leader, so that with several replicas
//! behind one Service any replica takes a trigger (and `rotate --wait`, `status` work
//! through the Service).
//!
//! A follower that receives a `/v1/...` call authenticates the bearer token itself (a wrong
//! token is refused here and never sent on), then sends the call to the leader's API URL
//! (read from the Lease, see [`crate::leader::API_URL_ANNOTATION`]) with the same
//! `Authorization` header and [`FORWARDED_BY`] naming itself, and returns the leader's
//! answer (status, body, `Location`) with [`FORWARDED_TO`] naming the leader. A call that
//! carries [`FORWARDED_BY`] is never forwarded again: a replica that is not the leader
//! answers it 503, so replicas with different views of the Lease cannot loop.
//!
//! Each call is sent once (a trigger must not start two rotations), within a timeout: if
//! the leader cannot be connected to, the answer is 503 (nothing was delivered: retry); if
//! it was sent but no answer came in time, 502 (the outcome is unknown: for a trigger, look
//! at `GET /v1/targets` before retrying). With no valid leader, or a leader that advertises
//! no URL, the call is answered here as before (a trigger gets 503 naming the leader).
//! `/healthz`, `/readyz` and `/metrics` are never forwarded.
//!
//! Whoever can write the Lease chooses where followers send the bearer tokens; the chart
//! grants that (update on this one Lease) to the daemon's own ServiceAccount only.

use crate::daemon::Daemon;
use crate::http::AppState;
use crate::leader::Holder;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Request header: the identity of the replica that forwarded the call. A call carrying it
/// is never forwarded again.
pub const FORWARDED_BY: &str = "x-okr-forwarded-by";
/// Response header: the identity of the leader that answered a forwarded call.
pub const FORWARDED_TO: &str = "x-okr-forwarded-to";
/// Bound on one forwarded call, connect to last byte. Below the CLI's own 10 s, so the
/// caller gets this replica's explanation rather than its own timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(8);
/// Bound on connecting to the leader (a dead pod's IP does not refuse, it drops).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bodies are buffered to be sent once; the leader applies its own (smaller) limit.
const BODY_LIMIT: usize = 64 * 1024;

/// What a replica knows about who leads (the daemon; a fake in tests).
pub trait LeaderView: Send + Sync {
    fn is_leader(&self) -> bool;
    /// The valid Lease holder and its advertised API URL, if any.
    fn leader(&self) -> Option<Holder>;
}

impl LeaderView for Daemon {
    fn is_leader(&self) -> bool {
        Daemon::is_leader(self)
    }
    fn leader(&self) -> Option<Holder> {
        self.leader_holder()
    }
}

/// An API URL a leader may advertise: `http(s)://host[:port]`, nothing else (no path,
/// query, fragment or credentials: the bearer token goes there).
pub fn check_api_url(url: &str) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{url:?} must be an http(s) URL"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        // The value is not repeated: it holds a credential.
        return Err("must not carry credentials".into());
    }
    if u.host().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "{url:?} must be scheme://host[:port] only (no path, query or fragment)"
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("building the HTTP client that forwards API calls to the leader: {0}")]
    Client(String),
}

/// Sends a follower's API calls to the leader. See the module docs.
pub struct Forwarder {
    identity: String,
    /// `identity` as a header value (or a placeholder: the header must always be sent).
    by: HeaderValue,
    own_url: Option<String>,
    view: Arc<dyn LeaderView>,
    http: reqwest::Client,
    timeout: Duration,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("identity", &self.identity)
            .field("own_url", &self.own_url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// `identity` and `own_url` are this replica's (a Lease naming either is not forwarded
    /// to); `timeout` bounds each forwarded call.
    pub fn new(
        identity: impl Into<String>,
        own_url: Option<String>,
        view: Arc<dyn LeaderView>,
        timeout: Duration,
    ) -> Result<Forwarder, ForwardError> {
        let identity = identity.into();
        let by = HeaderValue::from_str(&identity)
            .unwrap_or_else(|_| HeaderValue::from_static("follower"));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            // The bearer token goes to the leader and nowhere else: no redirects, and no
            // HTTP(S)_PROXY from the environment.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| ForwardError::Client(e.to_string()))?;
        Ok(Forwarder {
            identity,
            by,
            own_url,
            view,
            http,
            timeout,
        })
    }

    /// Where to send an API call this replica cannot answer as leader: `None` = answer here.
    fn target(&self) -> Option<(String, String)> {
        let leader = self.view.leader()?;
        let url = leader.api_url?;
        if leader.identity == self.identity || Some(&url) == self.own_url.as_ref() {
            // The Lease still names us (stepping down): no call to ourselves.
            return None;
        }
        Some((leader.identity, url))
    }

    /// Send `req` to the leader once and relay its answer.
    async fn forward(&self, leader: &str, base: &str, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is too large or could not be read",
                    Some(leader),
                )
            }
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let mut rb = self
            .http
            .request(parts.method.clone(), &url)
            .header(FORWARDED_BY, self.by.clone());
        for name in [AUTHORIZATION, CONTENT_TYPE, ACCEPT] {
            for v in parts.headers.get_all(&name) {
                rb = rb.header(&name, v.clone());
            }
        }
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            rb = rb.body(body);
        }
        let method = parts.method.as_str();
        let path = parts.uri.path();
        match rb.send().await {
            Ok(resp) => {
                tracing::debug!(%method, %path, %leader, status = resp.status().as_u16(), "forwarded an API call to the leader");
                relay(leader, resp)
            }
            // Connecting failed: nothing reached the leader, so retrying is safe.
            Err(e) if e.is_connect() => {
                tracing::warn!(%method, %path, %leader, leader_api_url = %base, error = %e, "cannot reach the leader to forward an API call");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this replica ({}) is not the leader and cannot reach the leader {leader} at {base}; nothing was sent to it: retry",
                        self.identity
                    ),
                    Some(leader),
                )
            }
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("did not answer within {:?}", self.timeout)
                } else {
                    "did not answer".into()
                };
                tracing::warn!(%method, %path, %leader, leader_api_url = %base, error = %e, "a forwarded API call got no answer from the leader");
                error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "this replica ({}) forwarded the call to the leader {leader} at {base}, which {why}; whether it took the call is unknown (for a trigger, check GET /v1/targets before retrying)",
                        self.identity
                    ),
                    Some(leader),
                )
            }
        }
    }
}

/// The leader's answer: its status, the headers a client reads, and its body as it comes.
fn relay(leader: &str, resp: reqwest::Response) -> Response {
    let mut out = Response::builder().status(resp.status());
    for name in [CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE, RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            out = out.header(name, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(leader) {
        out = out.header(FORWARDED_TO, v);
    }
    // Streamed (a /v1/targets of many targets is large); the client's timeout bounds it.
    let chunks = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(c)) => Some((Ok(c), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    match out.body(Body::from_stream(chunks)) {
        Ok(r) => r,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("the leader's answer could not be relayed: {e}"),
            Some(leader),
        ),
    }
}

fn error(status: StatusCode, message: impl Into<String>, leader: Option<&str>) -> Response {
    (
        status,
        Json(json!({ "error": message.into(), "leader": leader })),
    )
        .into_response()
}

/// The API, as opposed to health, readiness and metrics.
fn is_api(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The axum middleware (`router()` wires it with the [`AppState`]): on a follower with a
/// [`Forwarder`], `/v1` calls go to the leader; everything else passes through.
pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(fwd) = state.forward.clone() else {
        return next.run(req).await;
    };
    if !is_api(req.uri().path()) || fwd.view.is_leader() {
        return next.run(req).await;
    }
    // Refused here, never sent on.
    if let Err(r) = crate::http::authenticate(&state, req.headers()) {
        return r;
    }
    if req.headers().contains_key(FORWARDED_BY) {
        // Sent here by a replica that took us for the leader: one hop only.
        let leader = fwd.view.leader().map(|h| h.identity);
        tracing::warn!(path = %req.uri().path(), leader = leader.as_deref().unwrap_or("unknown"), "a forwarded API call reached this replica, which is not the leader");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is not the leader (the call was forwarded here and is not forwarded again); retry",
            leader.as_deref(),
        );
    }
    match fwd.target() {
        Some((leader, url)) => fwd.forward(&leader, &url, req).await,
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DurationStr, VaultConfig};
    use crate::daemon::{DaemonOptions, Leadership, LiveRotations, NoSchedule};
    use crate::http::{router, AlwaysReady, ApiTokens};
    use crate::rotation::fakes::FakeWorld;
    use crate::rotation::EngineOptions;
    use axum::Router;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, RwLock};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    const TOKEN: &str = "oncall-token-0123456789";

    /// A fixed view of the Lease.
    struct FakeView {
        leading: bool,
        leader: Option<Holder>,
    }
    impl LeaderView for FakeView {
        fn is_leader(&self) -> bool {
            self.leading
        }
        fn leader(&self) -> Option<Holder> {
            self.leader.clone()
        }
    }

    /// What the fake leader saw: method, path, headers, body.
    #[derive(Default)]
    struct Seen {
        calls: Mutex<Vec<(String, String, axum::http::HeaderMap, String)>>,
        count: AtomicUsize,
    }

    /// A fake leader on 127.0.0.1 that records each call and answers like the real one;
    /// `hang` keeps every call open (no answer).
    async fn fake_leader(hang: bool) -> (String, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let app = Router::new().fallback(move |req: Request| {
            let s = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                s.count.fetch_add(1, Ordering::SeqCst);
                s.calls.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.to_string(),
                    parts.headers.clone(),
                    String::from_utf8_lossy(&body).into(),
                ));
                if hang {
                    std::future::pending::<()>().await;
                }
                let mut r = (
                    StatusCode::ACCEPTED,
                    Json(json!({"rotation_id": "20990101000000-abcdef", "served_by": "leader"})),
                )
                    .into_response();
                r.headers_mut().insert(
                    LOCATION,
                    HeaderValue::from_static("/v1/rotations/20990101000000-abcdef"),
                );
                r
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    /// The real router with a follower's forwarder over `view` (a sole daemon answers what
    /// is not forwarded: its trigger handler would take any trigger).
    fn follower(view: FakeView, timeout: Duration) -> (Router, FakeWorld) {
        let world = FakeWorld::default();
        let (t, _) = world.seed_target("chat", chrono::Utc::now());
        let config = Arc::new(Config {
            daemon: Default::default(),
            openai: Default::default(),
            vault: VaultConfig {
                address: "http://127.0.0.1:1".into(),
                kv_mount: "secret".into(),
                request_timeout: DurationStr::from_secs(1),
                ..VaultConfig::default()
            },
            kubernetes: Default::default(),
            notifications: Default::default(),
            targets: vec![t],
        });
        let live = Arc::new(LiveRotations::default());
        let engine = Arc::new(
            world
                .engine(EngineOptions::default())
                .with_observer(live.clone()),
        );
        let daemon = Daemon::new(
            config,
            engine,
            Arc::new(world.store.clone()),
            live,
            Arc::new(NoSchedule),
            Leadership::sole(),
            DaemonOptions::default(),
            CancellationToken::new(),
        );
        let tokens = ApiTokens::parse(&format!("oncall:{TOKEN}\n"), "t").unwrap();
        let fwd =
            Forwarder::new("okr-b", None, Arc::new(view), timeout).expect("forwarding client");
        let state = AppState {
            daemon,
            tokens: Arc::new(RwLock::new(tokens)),
            readiness: Arc::new(AlwaysReady),
            metrics: Arc::new(|| "openai_key_rotator_up 1\n".to_string()),
            forward: Some(Arc::new(fwd)),
        };
        (router(state), world)
    }

    fn view(leading: bool, leader: &str, url: Option<&str>) -> FakeView {
        FakeView {
            leading,
            leader: Some(Holder {
                identity: leader.into(),
                api_url: url.map(Into::into),
            }),
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let h = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into(),
        ));
        (status, h, v)
    }

    const BEARER: &str = "Bearer oncall-token-0123456789";

    #[tokio::test]
    async fn a_follower_forwards_a_trigger_once_with_the_same_token_and_relays_the_answer() {
        let (url, seen) = fake_leader(false).await;
        let (app, world) = follower(view(false, "okr-a", Some(&url)), DEFAULT_TIMEOUT);
        let (s, h, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations?x=1",
            &[
                ("authorization", BEARER),
                ("content-type", "application/json"),
            ],
            r#"{"reason":"via the follower"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["served_by"], "leader");
        assert_eq!(h["location"], "/v1/rotations/20990101000000-abcdef");
        assert_eq!(h[FORWARDED_TO], "okr-a");
        assert_eq!(seen.count.load(Ordering::SeqCst), 1, "sent exactly once");
        let (m, uri, hdrs, body) = seen.calls.lock().unwrap()[0].clone();
        assert_eq!(
            (m.as_str(), uri.as_str()),
            ("POST", "/v1/targets/chat/rotations?x=1")
        );
        assert_eq!(hdrs["authorization"], BEARER);
        assert_eq!(hdrs[FORWARDED_BY], "okr-b");
        assert_eq!(hdrs["content-type"], "application/json");
        assert_eq!(body, r#"{"reason":"via the follower"}"#);
        // The follower's own daemon (a sole one, which would take it) started nothing.
        assert!(world.log.entries().is_empty());

        // Reads go too.
        for uri in ["/v1/targets", "/v1/rotations/20990101000000-abcdef"] {
            let (s, h, _) = call(&app, "GET", uri, &[("authorization", BEARER)], "").await;
            assert_eq!(s, StatusCode::ACCEPTED, "{uri}");
            assert_eq!(h[FORWARDED_TO], "okr-a");
        }
        assert_eq!(seen.count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused_on_the_follower_and_never_forwarded() {
        let (url, seen) = fake_leader(false).await;
        let (app, _world) = follower(view(false, "okr-a", Some(&url)), DEFAULT_TIMEOUT);
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789"),
            Some("oncall-token-0123456789"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            let (s, h, v) = call(&app, "POST", "/v1/targets/chat/rotations", &headers, "{}").await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{auth:?}: {v}");
            assert_eq!(h["www-authenticate"], "Bearer");
            assert!(h.get(FORWARDED_TO).is_none());
        }
        assert_eq!(
            seen.count.load(Ordering::SeqCst),
            0,
            "nothing reached the leader"
        );
    }

    #[tokio::test]
    async fn a_forwarded_call_reaching_a_non_leader_is_not_forwarded_again() {
        let (url, seen) = fake_leader(false).await;
        // This replica believes okr-a leads (with a URL), but the call was forwarded already.
        let (app, world) = follower(view(false, "okr-a", Some(&url)), DEFAULT_TIMEOUT);
        for (m, uri) in [
            ("POST", "/v1/targets/chat/rotations"),
            ("GET", "/v1/targets"),
        ] {
            let (s, h, v) = call(
                &app,
                m,
                uri,
                &[("authorization", BEARER), (FORWARDED_BY, "okr-c")],
                "",
            )
            .await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{m} {uri}: {v}");
            assert_eq!(v["leader"], "okr-a");
            assert!(
                v["error"].as_str().unwrap().contains("not the leader"),
                "{v}"
            );
            assert!(h.get(FORWARDED_TO).is_none());
        }
        assert_eq!(seen.count.load(Ordering::SeqCst), 0);
        assert!(world.log.entries().is_empty());
    }

    #[tokio::test]
    async fn the_leader_and_a_follower_without_a_leader_url_answer_themselves() {
        let (url, seen) = fake_leader(false).await;
        // Leading: handled here even if the Lease view names someone else with a URL, and
        // even when forwarded (that is what the hop is for).
        let (app, _w) = follower(view(true, "okr-a", Some(&url)), DEFAULT_TIMEOUT);
        let (s, h, v) = call(
            &app,
            "GET",
            "/v1/targets",
            &[("authorization", BEARER), (FORWARDED_BY, "okr-c")],
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["targets"][0]["name"], "chat");
        assert!(h.get(FORWARDED_TO).is_none());
        // A leader without a URL, no leader, or a Lease still naming this replica: local.
        for v in [
            view(false, "okr-a", None),
            FakeView {
                leading: false,
                leader: None,
            },
            view(false, "okr-b", Some(&url)),
        ] {
            let (app, _w) = follower(v, DEFAULT_TIMEOUT);
            let (s, h, _) =
                call(&app, "GET", "/v1/targets", &[("authorization", BEARER)], "").await;
            assert_eq!(s, StatusCode::OK);
            assert!(h.get(FORWARDED_TO).is_none());
        }
        assert_eq!(seen.count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_are_never_forwarded() {
        let (url, seen) = fake_leader(false).await;
        let (app, _w) = follower(view(false, "okr-a", Some(&url)), DEFAULT_TIMEOUT);
        for uri in ["/healthz", "/readyz", "/metrics"] {
            let (s, h, _) = call(&app, "GET", uri, &[("authorization", BEARER)], "").await;
            assert_eq!(s, StatusCode::OK, "{uri}");
            assert!(h.get(FORWARDED_TO).is_none(), "{uri}");
        }
        assert_eq!(seen.count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_unreachable_leader_is_503_and_a_silent_one_502_after_one_attempt() {
        // Nothing listens there: connection refused, nothing delivered.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (app, _w) = follower(view(false, "okr-a", Some(&closed)), DEFAULT_TIMEOUT);
        let (s, _, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            &[("authorization", BEARER)],
            "{}",
        )
        .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["leader"], "okr-a");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("cannot reach the leader okr-a") && e.contains("retry"),
            "{e}"
        );
        assert!(!e.contains(TOKEN), "{e}");

        // Accepts the call and never answers: one attempt, then 502 at the timeout.
        let (url, seen) = fake_leader(true).await;
        let (app, _w) = follower(view(false, "okr-a", Some(&url)), Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let (s, _, v) = call(
            &app,
            "POST",
            "/v1/targets/chat/rotations",
            &[("authorization", BEARER)],
            "{}",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(v["leader"], "okr-a");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("unknown") && e.contains("300ms"), "{e}");
        assert!(!e.contains(TOKEN), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            seen.count.load(Ordering::SeqCst),
            1,
            "a POST is never retried"
        );
    }

    #[test]
    fn the_config_checks_advertise_url() {
        let text = |url: &str| {
            format!(
                "[daemon.leader_election]\nenabled = true\nadvertise_url = {url:?}\n\n[vault]\naddress = \"http://127.0.0.1:8200\"\n"
            )
        };
        let c = Config::parse(&text("http://10.0.0.7:8080"), "t").unwrap();
        assert_eq!(
            c.daemon.leader_election.advertise_url.as_deref(),
            Some("http://10.0.0.7:8080")
        );
        let e = Config::parse(&text("10.0.0.7:8080"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("daemon.leader_election.advertise_url"), "{e}");
        let e = Config::parse(&text("http://u:hunter2-pass@10.0.0.7"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn api_urls_are_origins_only() {
        for ok in [
            "http://10.0.0.7:8080",
            "https://okr.example:443/",
            "http://[fd00::1]:8080",
        ] {
            assert_eq!(check_api_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "10.0.0.7:8080",
            "ftp://10.0.0.7",
            "http://10.0.0.7:8080/api",
            "http://10.0.0.7:8080?x=1",
            "http://",
        ] {
            assert!(check_api_url(bad).is_err(), "{bad}");
        }
        let e = check_api_url("http://user:hunter2-secret@10.0.0.7").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
