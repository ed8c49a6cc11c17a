//! Thin entry point: parse the command line and dispatch.
use clap::Parser;
use openai_key_rotator::cli::{self, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    cli::run(Cli::parse()).await
}
