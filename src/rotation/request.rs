//! The one request type every trigger builds (HTTP, CLI, signals, the scheduler), so a
//! rotation's origin is described once and the journal is born from it in one place.

use super::journal::{new_rotation_id, Trigger};
use chrono::{DateTime, Utc};

/// A request to rotate one target now. Its id is fixed when it is made, so a caller can
/// answer with the id before the rotation starts and the queued view and the journal agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationRequest {
    pub target: String,
    pub rotation_id: String,
    pub trigger: Trigger,
    /// Token name, "schedule", "signal" or "cli".
    pub actor: String,
    pub reason: String,
    /// Skip the grace period and the drain.
    pub emergency: bool,
    /// Delete the old account before rolling (a short outage over a leaked key).
    pub revoke_first: bool,
    pub requested_at: DateTime<Utc>,
}

impl RotationRequest {
    /// A non-emergency request with a fresh rotation id.
    pub fn new(
        target: &str,
        trigger: Trigger,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> RotationRequest {
        RotationRequest {
            target: target.to_string(),
            rotation_id: new_rotation_id(now),
            trigger,
            actor: actor.to_string(),
            reason: reason.to_string(),
            emergency: false,
            revoke_first: false,
            requested_at: now,
        }
    }

    /// The same request as an emergency (with `revoke_first` if asked).
    pub fn emergency(mut self, revoke_first: bool) -> RotationRequest {
        self.emergency = true;
        self.revoke_first = revoke_first;
        self
    }

    /// Triggers a person asked for (they reset the failure back-off).
    pub fn is_manual(&self) -> bool {
        !matches!(self.trigger, Trigger::Schedule | Trigger::MaxAge)
    }
}
