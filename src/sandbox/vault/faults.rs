//! Fault injection: fixed latency, plus the test hooks that fail the Nth mutating KV request
//! and (for negative controls) ignore CAS. Set per test through [`VaultSim::set_faults`]
//! or `PUT /_sim/faults` ([`Faults`] as JSON), like the OpenAI simulator's.

use super::error::ApiError;
use super::VaultSim;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The fault settings `PUT /_sim/faults` replaces as a whole; empty means no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API request (`/v1/...`, not the `/_sim` control endpoints).
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
pub(super) struct FaultState {
    pub(super) settings: Faults,
    /// Mutating KV requests seen so far (the counter `fail_nth_write` targets).
    writes_seen: u64,
    /// (absolute write number, HTTP status) still to fire.
    nth_write: Vec<(u64, u16)>,
    pub(super) ignore_cas: bool,
}

impl FaultState {
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
}

impl VaultSim {
    /// Replace the fault settings (`PUT /_sim/faults` does the same).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults.settings = faults;
    }

    /// Remove every fault set by [`Self::set_faults`] (`DELETE /_sim/faults`). The test
    /// hooks below keep their state.
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
