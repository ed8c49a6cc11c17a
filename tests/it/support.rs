//! Test harness: finds the real components `.ci/run` installed and starts them on
//! 127.0.0.1 with random ports. A missing component is a test failure, never a skip.

#![allow(dead_code)]

use axum::response::IntoResponse;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Find an executable: `$OKR_TOOLS_DIR` (default `<repo>/.tools`) `venv/bin` and
/// `npm/node_modules/.bin`, then `PATH`. Panics with the install hint when absent.
pub fn tool(name: &str) -> PathBuf {
    let tools = std::env::var_os("OKR_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools"));
    let mut dirs = vec![tools.join("venv/bin"), tools.join("npm/node_modules/.bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required test component `{name}` not found in {}/{{venv/bin,npm/node_modules/.bin}} or PATH; \
         run the README's test command (scripts/test.sh), which installs it",
        tools.display()
    );
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for a child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop, with its output captured to a temp file for failures.
pub struct ChildGuard {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> ChildGuard {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        ChildGuard {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `url` until it answers any HTTP status, or panic after `timeout` with `guard`'s output.
pub async fn wait_http(url: &str, timeout: Duration, guard: &mut ChildGuard) {
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!("{url}: process exited with {status}:\n{}", guard.output());
        }
        if client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok()
        {
            return;
        }
        if start.elapsed() > timeout {
            panic!("{url} not up after {timeout:?}:\n{}", guard.output());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real OpenBao dev server (root token `root`, `secret/` is KV v2).
pub struct Bao {
    pub addr: String,
    pub token: String,
    pub guard: ChildGuard,
    /// Its own HOME: a dev server writes `~/.vault-token`, and parallel ones raced on it
    /// ("rename /root/.vault-token.tmp: no such file or directory", exit 1).
    _home: tempfile::TempDir,
}

/// A free port whose successor is free too: a dev OpenBao also listens on API port + 1
/// (its cluster listener), so parallel starts must not collide there.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

impl Bao {
    /// Write `data` as a new version of `secret/<path>` (KV v2), as another client would.
    pub async fn put_json(&self, path: &str, data: &serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/secret/data/{path}", self.addr))
            .header("X-Vault-Token", &self.token)
            .json(&serde_json::json!({ "data": data }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "writing {path}: {}", r.status());
    }
}

/// Start OpenBao on a free port pair. Another test may grab the pair between our probe and
/// OpenBao's bind (tests run in parallel): then OpenBao exits at once, and we try another.
pub async fn start_bao() -> Bao {
    for attempt in 1..=5 {
        let port = free_port_pair();
        let home = tempfile::tempdir().expect("a HOME for OpenBao");
        let mut cmd = Command::new(tool("bao"));
        cmd.args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ])
        .env("BAO_DISABLE_MLOCK", "true")
        .env("HOME", home.path())
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_ADDR");
        let mut guard = ChildGuard::spawn(cmd);
        let addr = format!("http://127.0.0.1:{port}");
        let health = format!("{addr}/v1/sys/health");
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = guard.child.try_wait() {
                let out = guard.output();
                assert!(
                    attempt < 5 && out.contains("address already in use"),
                    "OpenBao exited with {status}:\n{out}"
                );
                break;
            }
            if client
                .get(&health)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok()
            {
                return Bao {
                    addr,
                    token: "root".into(),
                    guard,
                    _home: home,
                };
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "OpenBao not up after 30s:\n{}",
                guard.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    unreachable!("the last attempt panics")
}

/// The OpenAI description the contract tests validate against (copied into the repo).
pub fn openai_spec() -> PathBuf {
    repo_root().join("tests/contract/openai-openapi-subset.json")
}

/// `prism proxy` in front of `upstream` (which must end in `/v1`); clients use
/// `Prism::url` without `/v1`.
pub struct Prism {
    pub url: String,
    pub guard: ChildGuard,
}

pub async fn start_prism(spec: &Path, upstream: &str) -> Prism {
    let port = free_port();
    let mut cmd = Command::new(tool("prism"));
    cmd.args(["proxy", "-h", "127.0.0.1", "-p", &port.to_string()])
        .arg(spec)
        .arg(upstream)
        .args(["--errors"]);
    let mut guard = ChildGuard::spawn(cmd);
    let url = format!("http://127.0.0.1:{port}");
    wait_http(
        &format!("{url}/models"),
        Duration::from_secs(60),
        &mut guard,
    )
    .await;
    Prism { url, guard }
}

/// A write the proxy holds back, and how to tell its caller's handler it went.
type Held = (
    axum::http::Request<axum::body::Bytes>,
    tokio::sync::oneshot::Sender<()>,
);

/// An HTTP proxy in front of Vault that makes one key write land late: the first write to
/// `secret/data/<path>` is held (its client times out) until a second write to that path
/// arrives; then the held one is sent to Vault first, the second after it. That is the
/// order a slow network produces when a timed-out write is retried.
pub struct LateWriteProxy {
    pub url: String,
    upstream: Arc<Mutex<String>>,
    path: Arc<Mutex<String>>,
    /// Writes held and then delivered late.
    pub delivered_late: Arc<AtomicU32>,
}

impl LateWriteProxy {
    /// A proxy; [`LateWriteProxy::aim`] says where Vault is and which path to delay.
    pub async fn start() -> LateWriteProxy {
        let upstream = Arc::new(Mutex::new(String::new()));
        let path = Arc::new(Mutex::new(String::new()));
        let delivered_late = Arc::new(AtomicU32::new(0));
        let held: Arc<tokio::sync::Mutex<Option<Held>>> = Arc::default();
        let (up, late, p) = (upstream.clone(), delivered_late.clone(), path.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (up, late, held) = (up.clone(), late.clone(), held.clone());
            let target = format!("/v1/secret/data/{}", p.lock().unwrap());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20)
                    .await
                    .unwrap_or_default();
                let req = axum::http::Request::from_parts(parts, body);
                let upstream = up.lock().unwrap().clone();
                let is_write = req.uri().path() == target
                    && matches!(
                        *req.method(),
                        axum::http::Method::POST | axum::http::Method::PUT
                    );
                if is_write {
                    let mut h = held.lock().await;
                    match h.take() {
                        None if late.load(Ordering::SeqCst) == 0 => {
                            // Hold the first write; its caller gives up waiting.
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            *h = Some((req, tx));
                            drop(h);
                            let _ = rx.await;
                            return axum::http::StatusCode::GATEWAY_TIMEOUT.into_response();
                        }
                        Some((first, tx)) => {
                            let _ = forward(&upstream, first).await;
                            late.fetch_add(1, Ordering::SeqCst);
                            let _ = tx.send(());
                        }
                        None => {}
                    }
                }
                forward(&upstream, req).await
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        LateWriteProxy {
            url,
            upstream,
            path,
            delivered_late,
        }
    }

    /// Send everything on to Vault at `addr`, delaying one write to `secret/data/<path>`.
    pub fn aim(&self, addr: &str, path: &str) {
        *self.upstream.lock().unwrap() = addr.to_string();
        *self.path.lock().unwrap() = path.to_string();
    }
}

async fn forward(
    upstream: &str,
    req: axum::http::Request<axum::body::Bytes>,
) -> axum::response::Response {
    let url = format!("{upstream}{}", req.uri());
    let mut out = reqwest::Client::new().request(req.method().clone(), url);
    for (k, v) in req.headers() {
        if k != axum::http::header::HOST {
            out = out.header(k, v);
        }
    }
    match out.body(req.into_body()).send().await {
        Ok(r) => {
            let status = r.status();
            let body = r.bytes().await.unwrap_or_default();
            (status, body).into_response()
        }
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// Which request a [`HoldProxy`] holds: `(method, path, JSON body)` → hold it?
pub type HoldMatch = Arc<dyn Fn(&str, &str, &serde_json::Value) -> bool + Send + Sync>;

#[derive(Default)]
struct HoldState {
    rule: Option<(HoldMatch, bool)>,
    /// Requests held right now, and ever.
    held: u64,
    total: u64,
    /// Bumped by `abort` and `release`: a held request sees it and ends (abort: without
    /// further effect) or goes on (release: a before-effect one is forwarded now).
    epoch: u64,
    forward_on_wake: bool,
    /// Answer `status` without forwarding to the next `count` requests `m` picks.
    fail: Option<(HoldMatch, u32, u16)>,
    failed: u64,
    /// When the last write (any method but GET, HEAD and LIST) arrived: the HA tests prove
    /// a replica made no write after another took the Lease.
    last_write: Option<chrono::DateTime<chrono::Utc>>,
}

/// An HTTP proxy in front of a real server (OpenBao) that can hold the first request a
/// matcher picks, before it is forwarded (`after_effect = false`: it never takes effect) or
/// after (`true`: it took effect, the answer is held back: a lost answer). For crash tests:
/// wait until [`HoldProxy::wait_held`], kill the client, then [`HoldProxy::abort`].
#[derive(Clone)]
pub struct HoldProxy {
    pub url: String,
    state: Arc<Mutex<HoldState>>,
    changed: Arc<tokio::sync::Notify>,
}

impl HoldProxy {
    pub async fn start(upstream: &str) -> HoldProxy {
        let state: Arc<Mutex<HoldState>> = Arc::default();
        let changed = Arc::new(tokio::sync::Notify::new());
        let (st, ch, up) = (state.clone(), changed.clone(), upstream.to_string());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (st, ch, up) = (st.clone(), ch.clone(), up.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 16 << 20)
                    .await
                    .unwrap_or_default();
                let json: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                if !matches!(parts.method.as_str(), "GET" | "HEAD" | "LIST") {
                    st.lock().unwrap().last_write = Some(chrono::Utc::now());
                }
                let fail_status = {
                    let mut s = st.lock().unwrap();
                    let mut hit = None;
                    if let Some((m, left, status)) = s.fail.as_mut() {
                        if *left > 0 && m(parts.method.as_str(), parts.uri.path(), &json) {
                            *left -= 1;
                            hit = Some(*status);
                        }
                    }
                    if hit.is_some() {
                        s.failed += 1;
                    }
                    hit
                };
                if let Some(status) = fail_status {
                    let status = axum::http::StatusCode::from_u16(status).unwrap();
                    return (
                        status,
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        r#"{"errors":["injected by the test proxy"]}"#,
                    )
                        .into_response();
                }
                let held = {
                    let mut s = st.lock().unwrap();
                    match s.rule.take() {
                        Some((m, after)) if m(parts.method.as_str(), parts.uri.path(), &json) => {
                            // One request per arming: later ones pass.
                            s.held += 1;
                            s.total += 1;
                            Some((after, s.epoch))
                        }
                        other => {
                            s.rule = other;
                            None
                        }
                    }
                };
                let req = axum::http::Request::from_parts(parts, body);
                let wait_abort = |epoch: u64| {
                    let (st, ch) = (st.clone(), ch.clone());
                    async move {
                        loop {
                            let n = ch.notified();
                            {
                                let s = st.lock().unwrap();
                                if s.epoch > epoch {
                                    break s.forward_on_wake;
                                }
                            }
                            n.await;
                        }
                    }
                };
                // Counted out when the request ends, also when its client went away and the
                // server dropped it.
                struct Out(Arc<Mutex<HoldState>>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        self.0.lock().unwrap().held -= 1;
                    }
                }
                let _out = held.map(|_| Out(st.clone()));
                match held {
                    None => forward(&up, req).await,
                    Some((false, epoch)) => {
                        let go_on = wait_abort(epoch).await;
                        if go_on {
                            forward(&up, req).await
                        } else {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                        }
                    }
                    Some((true, epoch)) => {
                        let answer = forward(&up, req).await;
                        let go_on = wait_abort(epoch).await;
                        if go_on {
                            answer
                        } else {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                        }
                    }
                }
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        HoldProxy {
            url,
            state,
            changed,
        }
    }

    /// Hold the next request `m` picks (before or after its effect).
    pub fn arm(&self, m: HoldMatch, after_effect: bool) {
        self.state.lock().unwrap().rule = Some((m, after_effect));
    }

    /// Disarm, and end every held request without effect (an after-effect one has had it).
    pub fn abort(&self) {
        let mut s = self.state.lock().unwrap();
        s.rule = None;
        s.fail = None;
        s.epoch += 1;
        s.forward_on_wake = false;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Let every held request go on (a before-effect one is forwarded now).
    pub fn release(&self) {
        let mut s = self.state.lock().unwrap();
        s.epoch += 1;
        s.forward_on_wake = true;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Answer `status` (without forwarding) to the next `count` requests `m` picks.
    pub fn fail_next(&self, m: HoldMatch, count: u32, status: u16) {
        self.state.lock().unwrap().fail = Some((m, count, status));
    }

    /// Requests answered by [`HoldProxy::fail_next`] so far.
    pub fn failed(&self) -> u64 {
        self.state.lock().unwrap().failed
    }

    pub fn held(&self) -> u64 {
        self.state.lock().unwrap().held
    }

    /// When the last write request arrived (before any hold or injected failure).
    pub fn last_write(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.state.lock().unwrap().last_write
    }

    /// Wait until a request is held; false after `timeout`.
    pub async fn wait_held(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.held() == 0 {
            if start.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// One I1 sample of Vault `path` (KV v2 at `secret/`, field `api_key`): `None` when the
/// key it serves is live, else the violation. A read that fails is a violation too: a
/// sampler that skips what it cannot read could pass without looking.
pub async fn i1_violation(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    path: &str,
    sim: &openai_key_rotator::sandbox::openai::OpenAiSim,
) -> Option<String> {
    let r = http
        .get(format!("{addr}/v1/secret/data/{path}"))
        .header("X-Vault-Token", token)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let key = match r {
        Ok(r) if r.status().is_success() => {
            r.json::<serde_json::Value>().await.ok().and_then(|b| {
                b.pointer("/data/data/api_key")?
                    .as_str()
                    .map(str::to_string)
            })
        }
        _ => None,
    };
    match key {
        Some(k) if sim.key_is_live(&k) => None,
        Some(_) => Some(format!("I1: {path} serves a dead key")),
        None => Some(format!("I1 sampler: reading {path} failed")),
    }
}
