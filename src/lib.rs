//! openai-key-rotator: rotates OpenAI project service-account keys with zero downtime.
pub mod cli;
pub mod config;
pub mod secret;
pub mod vault;
#[cfg(feature = "sandbox")]
pub mod sandbox;
