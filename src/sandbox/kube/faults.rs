//! Fault injection: fixed latency on every API request, and the test hook that fails the
//! Nth write. Set per test through [`KubeSim::set_faults`] or `PUT /_sim/faults`
//! ([`Faults`] as JSON), like the OpenAI simulator's.

use super::error::KubeSimError;
use super::{KubeSim, Shared};
use crate::sandbox::control::parse;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The fault settings `PUT /_sim/faults` replaces as a whole; empty means no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API request (discovery included). A watch gets it once, before
    /// its response starts; its events are not delayed.
    pub latency_ms: u64,
}

impl Faults {
    pub fn latency(d: Duration) -> Self {
        Faults {
            latency_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The fault settings and the counters they fire on.
#[derive(Default)]
pub(crate) struct FaultState {
    pub settings: Faults,
    /// Write requests received over HTTP so far (the counter `fail_nth_write` targets).
    writes: u64,
    /// (write number, HTTP status) faults still to fire.
    nth_write: Vec<(u64, u16)>,
}

impl FaultState {
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
}

/// Middleware on the API routes: the latency, before the handler runs.
pub(crate) async fn layer(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let latency = shared.lock().faults.latency();
    if let Some(d) = latency {
        tokio::time::sleep(d).await;
    }
    next.run(req).await
}

/// The control API under `/_sim` (no Kubernetes path starts with it).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route(
        "/_sim/faults",
        get(get_faults).put(put_faults).delete(delete_faults),
    )
}

fn sim(shared: Arc<Shared>) -> KubeSim {
    KubeSim { shared }
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(sim(shared).faults())
}

async fn put_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse::<Faults>(&body) {
        Ok(f) => {
            let sim = sim(shared);
            sim.set_faults(f);
            Json(sim.faults()).into_response()
        }
        Err(resp) => resp,
    }
}

async fn delete_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    sim(shared).clear_faults();
    StatusCode::NO_CONTENT
}

impl KubeSim {
    /// Replace the fault settings (`PUT /_sim/faults` does the same).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults.settings = faults;
    }

    /// Remove every fault set by [`Self::set_faults`] (`DELETE /_sim/faults`).
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
