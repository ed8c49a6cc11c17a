//! Fault injection: latency, 5xx (or 429) for the next N requests or while set, a sealed
//! server, a concurrent writer before the next check-and-set writes, and holding named
//! operations until released; plus the older test hooks (fail the Nth mutating KV request,
//! ignore CAS as a negative control). Set per test through [`VaultSim::set_faults`] or
//! `PUT /_sim/faults` ([`Faults`] as JSON), like the OpenAI simulator's.

use super::error::{ApiError, Reply};
use super::{State, VaultSim};
use crate::sandbox::control::{unknown_operation, Block};
use chrono::{DateTime, Utc};
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;

/// Every operation name faults and blocks understand, one per kind of request the
/// simulator serves (`kv.*` under the `secret/` mount).
pub const OPERATIONS: &[&str] = &[
    "sys.health",
    "sys.seal",
    "auth.config",
    "auth.login",
    "token.lookup",
    "token.renew",
    "token.revoke",
    "kv.read",
    "kv.write",
    "kv.delete",
    "kv.metadata.read",
    "kv.metadata.write",
    "kv.metadata.delete",
    "kv.list",
    "kv.config",
];

/// The operation a request is (`None` for paths the simulator has no handler for); `list`:
/// the `LIST` verb or `?list=true`.
pub(super) fn operation(method: &Method, path: &str, list: bool) -> Option<&'static str> {
    let m = method.as_str();
    let op = match path {
        "sys/health" => "sys.health",
        "sys/seal" => "sys.seal",
        "auth/token/lookup-self" => "token.lookup",
        "auth/token/renew-self" => "token.renew",
        "auth/token/revoke-self" => "token.revoke",
        p if p.starts_with("sys/auth/") => "auth.config",
        p => {
            if let Some(rest) = p.strip_prefix("auth/") {
                return match rest.split_once('/') {
                    Some((_, "login")) => Some("auth.login"),
                    Some((_, tail)) if tail == "config" || tail.starts_with("role/") => {
                        Some("auth.config")
                    }
                    _ => None,
                };
            }
            let kv = p.strip_prefix("secret")?;
            let kv = kv.strip_prefix('/').unwrap_or(kv);
            let (area, _) = kv.split_once('/').unwrap_or((kv, ""));
            match (area, m) {
                ("config", _) => "kv.config",
                ("data", "GET") if !list => "kv.read",
                ("data", "POST" | "PUT" | "PATCH") => "kv.write",
                ("data", "DELETE") | ("delete" | "undelete" | "destroy", _) => "kv.delete",
                ("metadata", _) if list => "kv.list",
                ("metadata", "GET") => "kv.metadata.read",
                ("metadata", "POST" | "PUT") => "kv.metadata.write",
                ("metadata", "DELETE") => "kv.metadata.delete",
                _ => return None,
            }
        }
    };
    Some(op)
}

/// The fault settings `PUT /_sim/faults` replaces as a whole; empty means no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API request (`/v1/...`, not the `/_sim` control endpoints).
    pub latency_ms: u64,
    /// The next `count` matching requests answer `status`, without taking effect.
    pub fail_next: Option<FailNext>,
    /// Every matching request answers `status` while this is set.
    pub unavailable: Option<Unavailable>,
    /// Sealed, as after `sys/seal`: every request answers 503 `Vault is sealed` and
    /// `sys/health` reports `sealed: true` with 503, as OpenBao does.
    pub sealed: bool,
    /// The next this-many check-and-set writes (`options.cas` set) meet a concurrent
    /// writer: just before each, another client writes a new version (the current data
    /// again), so the write's `cas` is stale and it fails with Vault's CAS error.
    pub cas_conflict_next: u64,
    /// Hold the named operations until `POST /_sim/release`; see [`Block`].
    pub block: Option<Block>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    pub count: u64,
    #[serde(default = "default_status")]
    pub status: u16,
    /// Names from [`OPERATIONS`]; empty = every request.
    #[serde(default)]
    pub operations: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Unavailable {
    /// 503 when unset.
    pub status: Option<u16>,
    /// Names from [`OPERATIONS`]; empty = every request.
    pub operations: Vec<String>,
}

fn default_status() -> u16 {
    503
}

impl Faults {
    pub fn latency(d: Duration) -> Self {
        Faults {
            latency_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
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

    pub fn unavailable() -> Self {
        Faults {
            unavailable: Some(Unavailable::default()),
            ..Faults::default()
        }
    }

    pub fn sealed() -> Self {
        Faults {
            sealed: true,
            ..Faults::default()
        }
    }

    pub fn cas_conflict_next(count: u64) -> Self {
        Faults {
            cas_conflict_next: count,
            ..Faults::default()
        }
    }

    pub fn block(block: Block) -> Self {
        Faults {
            block: Some(block),
            ..Faults::default()
        }
    }

    /// Restrict `fail_next` and `unavailable` to one more operation.
    pub fn only(mut self, operation: &str) -> Self {
        for ops in [
            self.fail_next.as_mut().map(|f| &mut f.operations),
            self.unavailable.as_mut().map(|u| &mut u.operations),
        ]
        .into_iter()
        .flatten()
        {
            ops.push(operation.to_string());
        }
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let statuses = self
            .fail_next
            .iter()
            .map(|f| f.status)
            .chain(self.unavailable.iter().map(|u| u.status.unwrap_or(503)));
        for s in statuses {
            if !(s == 429 || (500..=599).contains(&s)) {
                return Err(format!("status {s} is not 429 or a 5xx status"));
            }
        }
        let lists = [
            self.fail_next.as_ref().map(|f| &f.operations),
            self.unavailable.as_ref().map(|u| &u.operations),
            self.block.as_ref().map(|b| &b.operations),
        ];
        for ops in lists.into_iter().flatten() {
            if let Some(op) = unknown_operation(ops, OPERATIONS) {
                return Err(format!("unknown operation {op:?}"));
            }
        }
        Ok(())
    }
}

fn matches(operations: &[String], op: Option<&str>) -> bool {
    operations.is_empty() || op.is_some_and(|op| operations.iter().any(|o| o == op))
}

/// The fault settings and the counters they fire on.
#[derive(Default)]
pub(super) struct FaultState {
    pub(super) settings: Faults,
    fail_next_left: u64,
    cas_conflicts_left: u64,
    /// Mutating KV requests seen so far (the counter `fail_nth_write` targets).
    writes_seen: u64,
    /// (absolute write number, HTTP status) still to fire.
    nth_write: Vec<(u64, u16)>,
    pub(super) ignore_cas: bool,
}

impl FaultState {
    fn set(&mut self, faults: Faults) {
        self.fail_next_left = faults.fail_next.as_ref().map_or(0, |f| f.count);
        self.cas_conflicts_left = faults.cas_conflict_next;
        self.settings = faults;
    }

    /// Count a mutating KV request; the injected error if this is a failing one's turn.
    pub(super) fn on_write(&mut self) -> Result<(), ApiError> {
        self.writes_seen += 1;
        let n = self.writes_seen;
        if let Some(i) = self.nth_write.iter().position(|(at, _)| *at == n) {
            let (_, status) = self.nth_write.remove(i);
            return Err(ApiError::Injected(status));
        }
        Ok(())
    }

    pub(super) fn latency(&self) -> Option<Duration> {
        (self.settings.latency_ms > 0).then(|| Duration::from_millis(self.settings.latency_ms))
    }

    /// The answer a fault gives instead of the handler's, if any: sealed, unavailable,
    /// then fail-next (which counts the request).
    pub(super) fn refuse(&mut self, op: Option<&str>) -> Option<ApiError> {
        if self.settings.sealed {
            return Some(ApiError::Sealed);
        }
        if let Some(u) = &self.settings.unavailable {
            if matches(&u.operations, op) {
                return Some(ApiError::Injected(u.status.unwrap_or(503)));
            }
        }
        if self.fail_next_left > 0 {
            if let Some(f) = &self.settings.fail_next {
                if matches(&f.operations, op) {
                    self.fail_next_left -= 1;
                    return Some(ApiError::Injected(f.status));
                }
            }
        }
        None
    }
}

impl State {
    /// `cas_conflict_next`: another client's write lands between the caller's read and its
    /// check-and-set write (only writes that carry `options.cas`).
    pub(super) fn concurrent_writer(
        &mut self,
        body: &Map<String, Value>,
        path: &str,
        now: DateTime<Utc>,
    ) {
        let has_cas = body
            .get("options")
            .and_then(Value::as_object)
            .is_some_and(|o| o.get("cas").is_some_and(|c| !c.is_null()));
        if !has_cas || self.faults.cas_conflicts_left == 0 {
            return;
        }
        self.faults.cas_conflicts_left -= 1;
        let now_data = self
            .entries
            .get(path)
            .and_then(|e| e.versions.get(&e.current_version))
            .filter(|v| v.readable(now))
            .and_then(|v| v.data.clone())
            .unwrap_or_default();
        self.write_version(path, now_data, now);
    }

    /// Sealed `sys/health`: 503 with what a sealed OpenBao reports (no cluster yet).
    pub(super) fn sealed_health(&self, now: DateTime<Utc>) -> Reply {
        Reply::Json(
            http::StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "initialized": true,
                "sealed": true,
                "standby": true,
                "replication_performance_mode": "unknown",
                "replication_dr_mode": "unknown",
                "server_time_utc": now.timestamp(),
                "version": super::sys::VERSION,
            }),
        )
    }
}

impl VaultSim {
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
        self.holds.set(faults.block.clone());
        self.lock().faults.set(faults);
        Ok(())
    }

    /// Remove every fault set by [`Self::set_faults`] (`DELETE /_sim/faults`); held calls
    /// go on. The test hooks below keep their state.
    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.settings.clone()
    }

    /// Add `latency` before every API request from now on, other faults unchanged
    /// (`Duration::ZERO` removes it).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().faults.settings.latency_ms = Faults::latency(latency).latency_ms;
    }

    /// Seal or unseal, other faults unchanged (`PUT sys/seal` over the API seals too).
    pub fn set_sealed(&self, sealed: bool) {
        self.lock().faults.settings.sealed = sealed;
    }

    /// Let every call held by `Faults::block` now go on (`POST /_sim/release`); returns
    /// how many. Later calls are held again while the block is set.
    pub fn release(&self) -> u64 {
        self.holds.release()
    }

    /// Calls held right now and so far (`GET /_sim/blocked`).
    pub fn blocked(&self) -> crate::sandbox::Blocked {
        self.holds.status()
    }

    /// Wait until at least `n` calls are held; false after `timeout`.
    pub async fn wait_blocked(&self, n: u64, timeout: Duration) -> bool {
        self.holds.wait_blocked(n, timeout).await
    }

    /// Make the `n`th mutating KV request from now on (1 = the next one) fail with `status`
    /// and Vault's error body for it, without applying it. Mutating: POST/PUT/PATCH/DELETE
    /// under `secret/` (data, metadata, delete, undelete, destroy, config).
    pub fn fail_nth_write(&self, n: u64, status: u16) {
        let mut st = self.lock();
        let at = st.faults.writes_seen + n.max(1);
        st.faults.nth_write.push((at, status));
    }

    /// Mutating KV requests served so far (failed ones included).
    pub fn write_count(&self) -> u64 {
        self.lock().faults.writes_seen
    }

    /// Fault for negative controls: when on, a stale or `cas=0` check-and-set write succeeds
    /// instead of answering 400, i.e. the simulator becomes wrong on purpose.
    pub fn fault_ignore_cas(&self, on: bool) {
        self.lock().faults.ignore_cas = on;
    }
}
