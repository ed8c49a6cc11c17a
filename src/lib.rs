//! openai-key-rotator: rotates OpenAI project service-account keys with zero downtime.
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod secret;
