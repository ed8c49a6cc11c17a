//! Fault hooks: fail the Nth mutating KV request, and (for negative controls) ignore CAS.

use super::error::ApiError;
use super::VaultSim;

/// The fault settings and the counters they fire on.
#[derive(Default)]
pub(super) struct FaultState {
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
}

impl VaultSim {
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
