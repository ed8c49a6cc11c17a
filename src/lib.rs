//! openai-key-rotator: rotates OpenAI project service-account keys with zero downtime.
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod http;
pub mod leader;
pub mod retry;
pub mod rotation;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod scheduler;
pub mod secret;
pub mod vault;
