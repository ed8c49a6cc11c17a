//! What the three simulators' control APIs (`/_sim/...`) share: JSON in and out, one error
//! shape, and holding chosen operations until released, so a test drives every simulator
//! the same way.
//!
//! Holding ("block") is for crash and fault matrices: a test blocks, say,
//! `service_accounts.create`, waits until [`Holds::status`] shows the daemon's call is held,
//! kills the daemon, then releases (or clears) and restarts it. A call held *before* its
//! effect has changed nothing; one held *after* it (`after_effect`) has taken effect and only
//! its answer is held back: the lost-response case. A held call whose client disconnects is
//! dropped by the server, so a before-effect call never takes effect late.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// A control request the simulator refuses: 400 `{"error": "..."}`.
pub(crate) fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

/// Decode a control request body; an empty body is `T::default()`. The error is for
/// [`bad_request`].
pub(crate) fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}"))
}

/// The first name in `names` that `known` does not list.
pub(crate) fn unknown_operation<'a, S: AsRef<str>>(
    names: &'a [String],
    known: &[S],
) -> Option<&'a str> {
    names
        .iter()
        .map(String::as_str)
        .find(|n| !known.iter().any(|k| k.as_ref() == *n))
}

/// Hold matching calls until released: `{"operations": [...], "after_effect": false}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Block {
    /// Operations to hold (each simulator's operation names); empty = every operation.
    pub operations: Vec<String>,
    /// Hold the answer after the call took effect, instead of the call before it.
    pub after_effect: bool,
}

impl Block {
    pub fn only(operation: &str) -> Self {
        Block {
            operations: vec![operation.to_string()],
            after_effect: false,
        }
    }

    pub fn after_effect(mut self) -> Self {
        self.after_effect = true;
        self
    }

    fn holds(&self, op: &str, phase: Phase) -> bool {
        self.after_effect == (phase == Phase::AfterEffect)
            && (self.operations.is_empty() || self.operations.iter().any(|o| o == op))
    }
}

/// Where in a call the simulator asks [`Holds::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    BeforeEffect,
    AfterEffect,
}

/// What `GET /_sim/blocked` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// Calls held right now.
    pub blocked: u64,
    /// Calls held right now, per operation.
    pub operations: BTreeMap<String, u64>,
    /// Calls ever held (since the simulator started).
    pub total: u64,
    /// Held calls whose client went away before they were released.
    pub abandoned: u64,
}

#[derive(Default)]
struct HoldState {
    block: Option<Block>,
    /// Bumped by every release: a call held at epoch E goes on once the epoch passes E.
    epoch: u64,
    status: Blocked,
}

/// The holding machinery one simulator owns.
pub(crate) struct Holds {
    state: Mutex<HoldState>,
    changed: watch::Sender<u64>,
}

impl Default for Holds {
    fn default() -> Self {
        Holds {
            state: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// Counts a held call out when it goes on or its request is dropped.
struct Held<'a> {
    holds: &'a Holds,
    op: String,
    released: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut st = self.holds.lock();
        st.status.blocked = st.status.blocked.saturating_sub(1);
        if let Some(n) = st.status.operations.get_mut(&self.op) {
            *n -= 1;
            if *n == 0 {
                st.status.operations.remove(&self.op);
            }
        }
        if !self.released {
            st.status.abandoned += 1;
        }
    }
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        // Counters only: a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace the block (`None` clears it); held calls it no longer matches go on.
    pub fn set(&self, block: Option<Block>) {
        self.lock().block = block;
        self.changed.send_modify(|g| *g += 1);
    }

    /// Let every call held now go on; returns how many. Later calls are held again while
    /// the block is set.
    pub fn release(&self) -> u64 {
        let n = {
            let mut st = self.lock();
            st.epoch += 1;
            st.status.blocked
        };
        self.changed.send_modify(|g| *g += 1);
        n
    }

    pub fn status(&self) -> Blocked {
        self.lock().status.clone()
    }

    /// Wait while the block holds `op` at `phase`, until released or the block changes.
    pub async fn hold(&self, op: &str, phase: Phase) {
        // Subscribe first: a release between the check and the wait is not missed.
        let mut changed = self.changed.subscribe();
        let epoch = {
            let mut st = self.lock();
            if !st.block.as_ref().is_some_and(|b| b.holds(op, phase)) {
                return;
            }
            st.status.blocked += 1;
            st.status.total += 1;
            *st.status.operations.entry(op.to_string()).or_default() += 1;
            st.epoch
        };
        let mut held = Held {
            holds: self,
            op: op.to_string(),
            released: false,
        };
        loop {
            {
                let st = self.lock();
                if st.epoch > epoch || !st.block.as_ref().is_some_and(|b| b.holds(op, phase)) {
                    break;
                }
            }
            if changed.changed().await.is_err() {
                break;
            }
        }
        held.released = true;
    }

    /// Wait until at least `n` calls are held; false after `timeout`.
    pub async fn wait_blocked(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.status().blocked >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
