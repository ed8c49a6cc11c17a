//! openai-key-rotator: rotates OpenAI project service-account keys with zero downtime.
#![forbid(unsafe_code)]
// Shipped code never unwraps: a failure is reported, and a true invariant says what it is
// with `expect("...")`. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
pub mod admin_key;
pub mod anomaly;
pub mod app;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
#[cfg(feature = "sandbox")]
pub mod demo;
pub mod forensics;
pub mod forward;
pub mod http;
pub mod inventory;
pub mod kube;
pub mod leader;
pub mod metrics;
pub mod naming;
pub mod notify;
pub mod openai;
pub mod pacer;
pub mod reconcile;
pub mod retry;
pub mod rng;
pub mod rotation;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod scheduler;
pub mod secret;
#[cfg(test)]
mod simulation;
pub mod smoke;
pub mod supervise;
pub mod sync;
pub mod usage;
pub mod vault;
