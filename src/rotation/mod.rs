//! The rotation: a journaled state machine over small ports (key issuer, secret store,
//! workload roller, smoke prober, clock), one file per concern.

mod coalesce;
mod deletion;
pub mod engine;
pub mod journal;
mod locks;
mod names;
pub mod ownership;
pub mod plan;
pub mod ports;
pub mod recovery;
pub mod request;
pub mod rollback;
pub mod smoke;
pub mod sweep;

#[cfg(any(test, feature = "test-support"))]
pub mod fakes;
#[cfg(any(test, feature = "test-support"))]
pub mod faults;

pub use engine::{
    Engine, EngineError, EngineOptions, Observer, Ports, RotationControl, RotationEvent,
};
pub use journal::{Journal, Status, Step, StepState, Stored, Trigger};
pub use request::RotationRequest;
pub use sweep::SweepReport;

#[cfg(test)]
mod tests;
