//! openai-key-rotator: rotates OpenAI project service-account keys with zero downtime.
pub mod secret;
#[cfg(feature = "sandbox")]
pub mod sandbox;
