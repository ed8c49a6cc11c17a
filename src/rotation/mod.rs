//! The rotation: a journaled state machine over three small ports.

pub mod engine;
pub mod fakes;
pub mod journal;
pub mod ports;

pub use engine::{
    CrashPoint, Engine, EngineError, EngineOptions, Observer, RotationControl, RotationEvent,
    RotationRequest, SweepReport,
};
pub use journal::{Journal, Status, Step, StepState, Trigger};

#[cfg(test)]
mod tests;
