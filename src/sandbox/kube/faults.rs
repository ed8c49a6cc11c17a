//! Fault injection: fixed latency, 409 Conflict on the next N patches, 5xx (or 429) on
//! the next N requests, holding named operations until released, closing open watches, and
//! never-ready or slow pods; plus the older test hook that fails the Nth write. Set per test
//! through the [`KubeSim`] handle or the control API under `/_sim` (no Kubernetes path
//! starts with it), like the OpenAI simulator's:
//!
//! - `PUT|GET|DELETE /_sim/faults`: [`Faults`] as JSON, replaced as a whole;
//! - `POST /_sim/release`, `GET /_sim/blocked`: calls held by `Faults::block`;
//! - `POST /_sim/watches/disconnect` ([`WatchDisconnect`]), `GET /_sim/watches`;
//! - `PUT /_sim/workloads/{namespace}/{name}` ([`WorkloadFaults`]): never-ready pods
//!   (rollouts that never complete) and ready delays.
//!
//! Operation names are `<resource>[.<subresource>].<verb>` for every resource and verb the
//! simulator serves ([`operations`]), e.g. `deployments.patch`, `deployments.get`,
//! `deployments.watch`, `deployments.status.update`, `pods.list`, `secrets.get`,
//! `secrets.patch`, `events.create` (both Event APIs), `leases.update`,
//! `tokenreviews.create`; plus `discovery` (`/version`, `/api`, `/apis` and the group
//! documents).

use super::api::{self, Route};
use super::discovery::RESOURCES;
use super::error::KubeSimError;
use super::{KubeSim, Shared, WorkloadKind};
use crate::sandbox::control::{bad_request, parse, unknown_operation, Block, Blocked, Phase};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Every operation name faults and blocks understand (see the module docs).
pub fn operations() -> &'static [String] {
    static OPS: OnceLock<Vec<String>> = OnceLock::new();
    OPS.get_or_init(|| {
        let mut ops = vec!["discovery".to_string()];
        for r in RESOURCES {
            for v in r.verbs {
                ops.push(format!("{}.{v}", r.plural));
            }
            let mut subs = Vec::new();
            if r.status_subresource {
                subs.push("status");
            }
            if r.has_scale() {
                subs.push("scale");
            }
            for sub in subs {
                for v in ["get", "update", "patch"] {
                    ops.push(format!("{}.{sub}.{v}", r.plural));
                }
            }
        }
        ops.sort();
        ops.dedup();
        ops
    })
}

/// The operation a request is; `None` outside the API (`/_sim`, unknown paths).
fn operation(method: &Method, route: &Route, watch: bool) -> Option<String> {
    let (info, sub, object) = match route {
        Route::Discovery(..) | Route::GroupDoc(_) => return Some("discovery".into()),
        Route::Collection { info, .. } => (info, None, false),
        Route::Object { info, sub, .. } => (info, sub.as_deref(), true),
    };
    let verb = match (method.as_str(), object) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(match sub {
        Some(s) => format!("{}.{s}.{verb}", info.plural),
        None => format!("{}.{verb}", info.plural),
    })
}

/// The fault settings `PUT /_sim/faults` replaces as a whole; empty means no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API request (discovery included). A watch gets it once, before
    /// its response starts; its events are not delayed.
    pub latency_ms: u64,
    /// The next `count` matching requests answer 409 Conflict (the API server's
    /// "the object has been modified" Status) without taking effect.
    pub conflict_next: Option<ConflictNext>,
    /// The next `count` matching requests answer `status` without taking effect.
    pub fail_next: Option<FailNext>,
    /// Hold the named operations until `POST /_sim/release`; see [`Block`].
    pub block: Option<Block>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictNext {
    pub count: u64,
    /// Names from [`operations`]; empty = every `*.patch` request.
    #[serde(default)]
    pub operations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    pub count: u64,
    /// 5xx or 429; default 500.
    #[serde(default = "default_status")]
    pub status: u16,
    /// Names from [`operations`]; empty = every request.
    #[serde(default)]
    pub operations: Vec<String>,
}

fn default_status() -> u16 {
    500
}

impl Faults {
    pub fn latency(d: Duration) -> Self {
        Faults {
            latency_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            ..Faults::default()
        }
    }

    /// 409 on the next `count` patches.
    pub fn conflict_next(count: u64) -> Self {
        Faults {
            conflict_next: Some(ConflictNext {
                count,
                operations: Vec::new(),
            }),
            ..Faults::default()
        }
    }

    pub fn fail_next(count: u64, status: u16) -> Self {
        Faults {
            fail_next: Some(FailNext {
                count,
                status,
                operations: Vec::new(),
            }),
            ..Faults::default()
        }
    }

    pub fn block(block: Block) -> Self {
        Faults {
            block: Some(block),
            ..Faults::default()
        }
    }

    /// Restrict `conflict_next` and `fail_next` to one more operation.
    pub fn only(mut self, operation: &str) -> Self {
        if let Some(c) = &mut self.conflict_next {
            c.operations.push(operation.into());
        }
        if let Some(f) = &mut self.fail_next {
            f.operations.push(operation.into());
        }
        self
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(f) = &self.fail_next {
            if !(f.status == 429 || (500..=599).contains(&f.status)) {
                return Err(format!("status {} is not 429 or a 5xx status", f.status));
            }
        }
        let lists = [
            self.conflict_next.as_ref().map(|c| &c.operations),
            self.fail_next.as_ref().map(|f| &f.operations),
            self.block.as_ref().map(|b| &b.operations),
        ];
        for ops in lists.into_iter().flatten() {
            if let Some(op) = unknown_operation(ops, operations()) {
                return Err(format!("unknown operation {op:?}"));
            }
        }
        Ok(())
    }
}

/// `POST /_sim/watches/disconnect`: end open watches, as an API server restart or a
/// load balancer's idle timeout does. Watches opened later are not affected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchDisconnect {
    /// Close each after this many more events (BOOKMARKs not counted); 0 = now.
    pub after_events: u64,
    /// Resource plurals (`deployments`, `pods`, ...); empty = every watch.
    pub resources: Vec<String>,
}

/// `PUT /_sim/workloads/{namespace}/{name}`: how the pods of the workloads of that name
/// behave (all kinds sharing the name, unless `kind` is given). Unset fields stay as they
/// are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadFaults {
    /// `Deployment`, `StatefulSet`, `DaemonSet` or `Rollout`.
    pub kind: Option<String>,
    /// New pods never become Ready: the rollout never completes (and a Deployment's
    /// progress deadline eventually fails it).
    pub never_ready: Option<bool>,
    /// Time from pod creation to Ready, instead of the simulator's default.
    pub ready_delay_ms: Option<u64>,
    /// Rollouts: the next this many restarts degrade (`ProgressDeadlineExceeded`).
    pub degrade_restarts: Option<u32>,
    /// Rollouts: aborted (`status.abort`, phase Degraded) or not.
    pub aborted: Option<bool>,
    /// Rollouts: a controller pause condition with this reason (e.g. `CanaryPauseStep`);
    /// an empty string clears it.
    pub pause_condition: Option<String>,
}

/// The fault settings and the counters they fire on.
#[derive(Default)]
pub(crate) struct FaultState {
    pub settings: Faults,
    conflicts_left: u64,
    fail_next_left: u64,
    /// Write requests received over HTTP so far (the counter `fail_nth_write` targets).
    writes: u64,
    /// (write number, HTTP status) faults still to fire.
    nth_write: Vec<(u64, u16)>,
}

impl FaultState {
    fn set(&mut self, faults: Faults) {
        self.conflicts_left = faults.conflict_next.as_ref().map_or(0, |c| c.count);
        self.fail_next_left = faults.fail_next.as_ref().map_or(0, |f| f.count);
        self.settings = faults;
    }

    /// Count a write request; the injected error if this is a failing one's turn.
    pub fn on_write(&mut self) -> Result<(), KubeSimError> {
        self.writes += 1;
        let n = self.writes;
        if let Some(pos) = self.nth_write.iter().position(|(at, _)| *at == n) {
            let (_, code) = self.nth_write.remove(pos);
            return Err(KubeSimError::Injected { code });
        }
        Ok(())
    }

    fn latency(&self) -> Option<Duration> {
        (self.settings.latency_ms > 0).then(|| Duration::from_millis(self.settings.latency_ms))
    }

    /// The error a fault answers instead of the handler: conflict, then fail-next.
    fn refuse(&mut self, op: &str, route: &Route) -> Option<KubeSimError> {
        if self.conflicts_left > 0 {
            if let Some(c) = &self.settings.conflict_next {
                let hit = if c.operations.is_empty() {
                    op.ends_with(".patch")
                } else {
                    c.operations.iter().any(|o| o == op)
                };
                if hit {
                    self.conflicts_left -= 1;
                    return Some(match route {
                        Route::Object { info, name, .. } => KubeSimError::conflict(info, name),
                        _ => KubeSimError::Injected { code: 409 },
                    });
                }
            }
        }
        if self.fail_next_left > 0 {
            if let Some(f) = &self.settings.fail_next {
                if f.operations.is_empty() || f.operations.iter().any(|o| o == op) {
                    self.fail_next_left -= 1;
                    return Some(KubeSimError::Injected { code: f.status });
                }
            }
        }
        None
    }
}

/// One open watch, as the registry knows it.
pub(crate) struct WatchCtl {
    pub resource: &'static str,
    /// `Some(n)`: close after `n` more events.
    pub stop: tokio::sync::watch::Sender<Option<u64>>,
}

/// Middleware on the API routes: latency, a block before the effect, an injected
/// refusal, the handler, a block after the effect.
pub(crate) async fn layer(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let latency = shared.lock().faults.latency();
    if let Some(d) = latency {
        tokio::time::sleep(d).await;
    }
    let path = req.uri().path();
    let route = match path {
        "/version" | "/api" | "/apis" => Some(Route::Discovery(String::new(), String::new())),
        p => api::parse_route(p),
    };
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let Some((route, op)) =
        route.and_then(|r| operation(req.method(), &r, watch).map(|op| (r, op)))
    else {
        return next.run(req).await;
    };
    shared.holds.hold(&op, Phase::BeforeEffect).await;
    let refused = shared.lock().faults.refuse(&op, &route);
    if let Some(e) = refused {
        return api::err_resp(&e);
    }
    let resp = next.run(req).await;
    shared.holds.hold(&op, Phase::AfterEffect).await;
    resp
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/_sim/faults",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
        .route("/_sim/release", post(post_release))
        .route("/_sim/blocked", get(get_blocked))
        .route("/_sim/watches", get(get_watches))
        .route("/_sim/watches/disconnect", post(post_disconnect))
        .route("/_sim/workloads/{namespace}/{name}", put(put_workload))
}

fn sim(shared: Arc<Shared>) -> KubeSim {
    KubeSim { shared }
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(sim(shared).faults())
}

async fn put_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults = match parse::<Faults>(&body) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let sim = sim(shared);
    match sim.try_set_faults(faults) {
        Ok(()) => Json(sim.faults()).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    sim(shared).clear_faults();
    StatusCode::NO_CONTENT
}

async fn post_release(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "released": sim(shared).release() }))
}

async fn get_blocked(State(shared): State<Arc<Shared>>) -> Json<Blocked> {
    Json(sim(shared).blocked())
}

async fn get_watches(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let by: BTreeMap<&'static str, usize> =
        shared
            .lock()
            .watches
            .values()
            .fold(BTreeMap::new(), |mut m, w| {
                *m.entry(w.resource).or_default() += 1;
                m
            });
    let open: usize = by.values().sum();
    Json(serde_json::json!({ "open": open, "resources": by }))
}

async fn post_disconnect(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse::<WatchDisconnect>(&body) {
        Ok(d) => Json(serde_json::json!({ "watches": sim(shared).disconnect_watches(&d) }))
            .into_response(),
        Err(e) => bad_request(e),
    }
}

async fn put_workload(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let w = match parse::<WorkloadFaults>(&body) {
        Ok(w) => w,
        Err(e) => return bad_request(e),
    };
    match sim(shared).set_workload_faults(&namespace, &name, &w) {
        Ok(()) => Json(w).into_response(),
        Err(e) => bad_request(e),
    }
}

impl KubeSim {
    /// Replace the fault settings (`PUT /_sim/faults` does the same); counting restarts.
    /// Panics on invalid settings (a test bug); [`Self::try_set_faults`] reports them.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(e) = self.try_set_faults(faults) {
            panic!("{e}");
        }
    }

    /// [`Self::set_faults`] that reports invalid settings instead of panicking.
    pub fn try_set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        self.shared.holds.set(faults.block.clone());
        self.shared.lock().faults.set(faults);
        Ok(())
    }

    /// Remove every fault set by [`Self::set_faults`] (`DELETE /_sim/faults`); held calls
    /// go on.
    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.settings.clone()
    }

    /// Add `latency` before every API request from now on, other faults unchanged
    /// (`Duration::ZERO` removes it).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().faults.settings.latency_ms = Faults::latency(latency).latency_ms;
    }

    /// Let every call held by `Faults::block` now go on (`POST /_sim/release`); returns
    /// how many. Later calls are held again while the block is set.
    pub fn release(&self) -> u64 {
        self.shared.holds.release()
    }

    /// Calls held right now and so far (`GET /_sim/blocked`).
    pub fn blocked(&self) -> Blocked {
        self.shared.holds.status()
    }

    /// Wait until at least `n` calls are held; false after `timeout`.
    pub async fn wait_blocked(&self, n: u64, timeout: Duration) -> bool {
        self.shared.holds.wait_blocked(n, timeout).await
    }

    /// Watches open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().watches.len()
    }

    /// Close the matching open watches after `after_events` more events (0: now); returns
    /// how many were told.
    pub fn disconnect_watches(&self, d: &WatchDisconnect) -> usize {
        let inner = self.shared.lock();
        let mut n = 0;
        for w in inner.watches.values() {
            if d.resources.is_empty() || d.resources.iter().any(|r| r == w.resource) {
                w.stop.send_replace(Some(d.after_events));
                n += 1;
            }
        }
        n
    }

    /// [`WorkloadFaults`] from Rust (what `PUT /_sim/workloads/{ns}/{name}` does); an
    /// unknown `kind` is refused.
    pub fn set_workload_faults(
        &self,
        ns: &str,
        name: &str,
        w: &WorkloadFaults,
    ) -> Result<(), String> {
        let kind: Option<WorkloadKind> = match w.kind.as_deref() {
            None => None,
            Some(k) => Some(super::workload_kind(k).ok_or_else(|| {
                format!("kind {k:?} is not one of Deployment, StatefulSet, DaemonSet, Rollout")
            })?),
        };
        match (kind, w.never_ready) {
            (Some(k), Some(never)) => self.set_never_ready_for(k, ns, name, never),
            (None, Some(never)) => self.set_never_ready(ns, name, never),
            _ => {}
        }
        match (kind, w.ready_delay_ms) {
            (Some(k), Some(ms)) => self.set_ready_delay_for(k, ns, name, Duration::from_millis(ms)),
            (None, Some(ms)) => self.set_ready_delay(ns, name, Duration::from_millis(ms)),
            _ => {}
        }
        if let Some(n) = w.degrade_restarts {
            self.degrade_rollout_restarts(ns, name, n);
        }
        if let Some(a) = w.aborted {
            self.set_rollout_aborted(ns, name, a);
        }
        if let Some(r) = &w.pause_condition {
            self.set_rollout_pause_condition(ns, name, Some(r.as_str()).filter(|r| !r.is_empty()));
        }
        Ok(())
    }

    /// Make the `n`-th write request from now (1 = the next; create, update, patch and
    /// delete over HTTP, not this handle's helpers) fail with `status` (409 → Conflict,
    /// 429, 5xx), without touching the store.
    pub fn fail_nth_write(&self, n: u64, status: u16) {
        let mut inner = self.shared.lock();
        let at = inner.faults.writes + n.max(1);
        inner.faults.nth_write.push((at, status));
    }

    /// Write requests received over HTTP so far (injected failures included).
    pub fn write_count(&self) -> u64 {
        self.shared.lock().faults.writes
    }
}
