//! Command-line interface: argument parsing and the commands' top-level flow.

use crate::config::{Config, LogFormat};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "openai-key-rotator",
    version,
    about = "Rotates OpenAI API keys kept in Vault with zero downtime"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a configuration file: prints OK or every error, naming target and field.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Rotate a target now through the running daemon (`--addr`, `--token`), or in-process
    /// with `--config FILE --once`.
    Rotate(RotateArgs),
    /// Print the daemon's targets: state, last rotation, key age, next rotation.
    Status(RemoteArgs),
    /// Start the OpenAI, Vault and Kubernetes simulators with a seeded scenario, write a
    /// kubeconfig and a daemon config for them, and run until SIGTERM/SIGINT.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
}

/// Where the daemon's API is and how to authenticate.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Daemon API address.
    #[arg(long, env = "OKR_ADDR", default_value = "http://127.0.0.1:8080")]
    pub addr: String,
    /// API bearer token (prefer OKR_TOKEN or --token-file: arguments show up in `ps`).
    #[arg(long, env = "OKR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API bearer token.
    #[arg(long, env = "OKR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl RemoteArgs {
    fn client(&self) -> anyhow::Result<crate::client::ApiClient> {
        let token = match (&self.token_file, &self.token) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        };
        Ok(crate::client::ApiClient::new(
            &self.addr,
            token.map(crate::secret::Secret::new),
        ))
    }
}

#[derive(clap::Args, Debug)]
pub struct RotateArgs {
    /// Target name (from the configuration).
    pub target: String,
    /// Skip the grace period and the drain; upgrades a rotation already running.
    #[arg(long)]
    pub emergency: bool,
    /// With --emergency: delete the old key BEFORE rolling (a short outage over a leaked key).
    #[arg(long, requires = "emergency")]
    pub revoke_first: bool,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Follow the rotation, a line per step; exit non-zero unless it completes.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait follows before giving up.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub wait_timeout: std::time::Duration,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[cfg(feature = "sandbox")]
#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_OPENAI_PORT)]
    pub openai_port: u16,
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_VAULT_PORT)]
    pub vault_port: u16,
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_KUBE_PORT)]
    pub kube_port: u16,
    /// Folder for the generated files.
    #[arg(long, default_value = "okr-sandbox")]
    pub dir: PathBuf,
    /// Where to write the kubeconfig (default DIR/kubeconfig).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where to write the daemon config (default DIR/config.toml); the admin key and Vault
    /// token files go beside it.
    #[arg(long)]
    pub write_config: Option<PathBuf>,
}

/// Logs go to stderr: JSON when not on a terminal (or when asked), human text otherwise.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // vaultrs/rustify log every expected 404 at ERROR; our own logs say what matters.
    for d in crate::vault::QUIET_LOG_DIRECTIVES {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Run a parsed command; the process exit code comes from the result.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!("OK: {} ({} targets)", file.display(), c.targets.len());
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(std::process::ExitCode::from(1))
            }
        },
        Command::Rotate(args) => rotate_remote(args).await,
        Command::Status(remote) => {
            let v = remote.client()?.targets().await?;
            print!("{}", crate::client::format_targets(&v));
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "sandbox")]
        Command::Sandbox(args) => sandbox(args).await,
    }
}

async fn rotate_remote(args: RotateArgs) -> anyhow::Result<std::process::ExitCode> {
    let client = args.remote.client()?;
    let reason = if args.reason.is_empty() {
        "cli".to_string()
    } else {
        args.reason.clone()
    };
    let answer = client
        .trigger(&args.target, &reason, args.emergency, args.revoke_first)
        .await?;
    let id = answer["rotation_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the daemon did not return a rotation id"))?
        .to_string();
    match answer["status"].as_str() {
        Some("upgraded") => println!("rotation {id} of {} upgraded to an emergency", args.target),
        _ => println!("rotation {id} of {} started", args.target),
    }
    if !args.wait {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout();
    let status = client
        .follow(
            &id,
            &mut out,
            std::time::Duration::from_millis(500),
            args.wait_timeout,
        )
        .await?;
    Ok(if status == "completed" {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

#[cfg(feature = "sandbox")]
async fn sandbox(args: SandboxArgs) -> anyhow::Result<std::process::ExitCode> {
    use crate::sandbox::scenario::{Sandbox, SandboxOptions};
    init_tracing(LogFormat::Text);
    let sb = Sandbox::start(SandboxOptions {
        openai_port: args.openai_port,
        vault_port: args.vault_port,
        kube_port: args.kube_port,
        dir: args.dir,
        kubeconfig: args.kubeconfig,
        config: args.write_config,
        ..Default::default()
    })
    .await
    .context("starting the sandbox")?;
    println!("openai-key-rotator sandbox is running.");
    println!(
        "  OpenAI API simulator  {}   (admin key in {})",
        sb.openai_url,
        sb.config
            .openai
            .admin_key_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!(
        "  Vault simulator       {}   (token in {})",
        sb.vault_url,
        sb.config_path.with_file_name("vault-token").display()
    );
    println!("  Kubernetes simulator  {}", sb.kube_url);
    println!("  project               {}", sb.project_id);
    println!("  kubeconfig            {}", sb.kubeconfig_path.display());
    println!("  daemon config         {}", sb.config_path.display());
    println!();
    println!(
        "Try:  kubectl --kubeconfig {} get deployments,pods",
        sb.kubeconfig_path.display()
    );
    println!(
        "      curl -s -H \"X-Vault-Token: $(cat {})\" {}/v1/secret/metadata/{}",
        sb.config_path.with_file_name("vault-token").display(),
        sb.vault_url,
        sb.config
            .targets
            .first()
            .map(|t| t.vault_path.as_str())
            .unwrap_or("")
    );
    println!("Stop with Ctrl-C.");
    shutdown_signal().await;
    let stats = sb.consumers.total();
    println!(
        "stopping: consumers made {} successful and {} failed calls",
        stats.ok, stats.failed
    );
    drop(sb);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
