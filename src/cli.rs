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
    /// Run the daemon: resume unfinished rotations, schedule every target, serve the API
    /// and metrics; SIGUSR1 emergency-rotates every target, SIGHUP reloads, SIGTERM stops.
    Run(RunArgs),
    /// Rotate a target now through the running daemon (`--addr`, `--token`), or in-process
    /// with `--config FILE --once`.
    Rotate(RotateArgs),
    /// Delete orphaned managed service accounts (ones no journal or Vault version references).
    Sweep {
        #[arg(long)]
        config: PathBuf,
        /// Spare accounts younger than this (default: daemon.sweep_min_age).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_age: Option<std::time::Duration>,
    },
    /// The simulators plus the real daemon rotating two targets every few seconds, with
    /// the API, metrics and audit trail live. Runs until Ctrl-C.
    #[cfg(feature = "sandbox")]
    Demo(DemoArgs),
    /// Print the daemon's targets: state, last rotation, key age, next rotation.
    Status(RemoteArgs),
    /// Inspect the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Start the OpenAI, Vault and Kubernetes simulators with a seeded scenario, write a
    /// kubeconfig and a daemon config for them, and run until SIGTERM/SIGINT.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
    /// List every API key of every configured project: owner, last use, whether a journal
    /// or Vault path of ours names it, and flags (unmanaged, unused, pending_deletion,
    /// expiring). Exits 2 when a project or Vault path could not be read (its error row).
    Inventory(InventoryArgs),
}

#[derive(clap::Args, Debug)]
pub struct InventoryArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Only this project (configured or not).
    #[arg(long)]
    pub project: Option<String>,
    /// A key with no use for this many days is `unused` (default: daemon.inventory_unused_after).
    #[arg(long)]
    pub unused_days: Option<String>,
    #[arg(long, value_enum, default_value_t = InventoryFormat::Table)]
    pub format: InventoryFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InventoryFormat {
    /// Readable at 80 columns.
    Table,
    /// One JSON array.
    Json,
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
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Listen address (overrides daemon.listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// API tokens, one `name:token` per line (as mounted from a Kubernetes Secret).
    #[arg(long, env = "OKR_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// Audit file (overrides daemon.audit.file).
    #[arg(long)]
    pub audit_file: Option<PathBuf>,
}

/// Ports of the three simulators (0 = any free port).
#[cfg(feature = "sandbox")]
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct SimPorts {
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_OPENAI_PORT)]
    pub openai_port: u16,
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_VAULT_PORT)]
    pub vault_port: u16,
    #[arg(long, default_value_t = crate::sandbox::scenario::DEFAULT_KUBE_PORT)]
    pub kube_port: u16,
}

#[cfg(feature = "sandbox")]
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds between scheduled rotations of each target (5-59).
    #[arg(long, default_value_t = 15)]
    pub every: u32,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Daemon API and metrics address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub ports: SimPorts,
    /// Folder for the generated files (config, kubeconfig, tokens, audit trail).
    #[arg(long, default_value = "okr-demo")]
    pub dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RotateArgs {
    /// Target name (from the configuration).
    pub target: String,
    /// Run the rotation in this process with this configuration (requires --once).
    #[arg(long, requires = "once")]
    pub config: Option<PathBuf>,
    /// With --config: rotate once in-process and exit non-zero unless it completes.
    #[arg(long, requires = "config")]
    pub once: bool,
    /// With --once: print the plan and touch nothing.
    #[arg(long, requires = "once")]
    pub dry_run: bool,
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

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check an audit file's hash chain: prints `OK: N records` (exit 0) or
    /// `BROKEN at line L: reason` (exit 2); an unreadable file is an error (exit 1).
    Verify {
        /// The audit file (JSON lines).
        file: PathBuf,
    },
}

#[cfg(feature = "sandbox")]
#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub ports: SimPorts,
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
    /// Milliseconds added to every request of all three simulators (after seeding), to see
    /// how the daemon copes with slow backends.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Seed this many generated targets (`app-00001`, ...; each in its own namespace with
    /// one 1-replica consumer Deployment) instead of the `chatbot` target.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub targets: Option<u32>,
    /// With --targets: spread them over this many projects (default: 2 to 8, one per 250).
    #[arg(long, requires = "targets", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub projects: Option<u32>,
    /// Milliseconds between two OpenAI calls of one consumer pod (default 200; with
    /// --targets, about 50 calls a second in all).
    #[arg(long)]
    pub consumer_interval_ms: Option<u64>,
    /// Milliseconds a new pod takes to become ready (default 500): the length of a rollout
    /// step.
    #[arg(long)]
    pub pod_ready_delay_ms: Option<u64>,
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
        .with_ansi(std::io::stderr().is_terminal())
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
        Command::Run(args) => {
            let opts = crate::app::RunOptions {
                config: args.config,
                listen: args.listen,
                api_tokens_file: args.api_tokens_file,
                audit_file: args.audit_file,
            };
            let config = opts.load_config()?;
            init_tracing(config.daemon.log_format);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let running = crate::app::start(opts, config, shutdown, true).await?;
            running.done.await??;
            tracing::info!("stopped");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Rotate(args) => match &args.config {
            Some(config) => {
                init_tracing(LogFormat::Auto);
                crate::app::rotate_once(
                    config,
                    &args.target,
                    args.dry_run,
                    args.emergency,
                    &args.reason,
                )
                .await
            }
            None => rotate_remote(args).await,
        },
        Command::Sweep { config, min_age } => {
            init_tracing(LogFormat::Auto);
            crate::app::sweep_once(&config, min_age).await
        }
        #[cfg(feature = "sandbox")]
        Command::Demo(args) => {
            init_tracing(LogFormat::Text);
            let opts = crate::demo::DemoOptions {
                sandbox: crate::sandbox::scenario::SandboxOptions {
                    openai_port: args.ports.openai_port,
                    vault_port: args.ports.vault_port,
                    kube_port: args.ports.kube_port,
                    dir: args.dir,
                    ..crate::demo::DemoOptions::default().sandbox
                },
                listen: args.listen,
                every_secs: args.every,
                duration: args.duration,
            };
            crate::demo::run(opts).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Status(remote) => {
            let v = remote.client()?.targets().await?;
            print!("{}", crate::client::format_targets(&v));
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => Ok(audit_verify(&file)),
        #[cfg(feature = "sandbox")]
        Command::Sandbox(args) => sandbox(args).await,
        Command::Inventory(args) => {
            init_tracing(LogFormat::Auto);
            crate::app::inventory_once(&args).await
        }
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

/// `audit verify FILE`: the result on stdout, the exit code says which.
fn audit_verify(file: &std::path::Path) -> std::process::ExitCode {
    use crate::audit::{verify, VerifyOutcome};
    match verify(file) {
        Ok(VerifyOutcome::Ok { records }) => {
            println!("OK: {records} records");
            std::process::ExitCode::SUCCESS
        }
        Ok(VerifyOutcome::Broken { line, reason }) => {
            println!("BROKEN at line {line}: {reason}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(feature = "sandbox")]
async fn sandbox(args: SandboxArgs) -> anyhow::Result<std::process::ExitCode> {
    use crate::sandbox::scenario::{Sandbox, SandboxOptions};
    init_tracing(LogFormat::Text);
    let latency_ms = args.latency_ms;
    let target_count = args.targets.map(|n| n as usize);
    let consumer_interval = match (args.consumer_interval_ms, target_count) {
        (Some(ms), _) => std::time::Duration::from_millis(ms),
        (None, Some(n)) => crate::sandbox::scenario::default_consumer_interval(n),
        (None, None) => SandboxOptions::default().consumer_interval,
    };
    let started = std::time::Instant::now();
    let sb = Sandbox::start(SandboxOptions {
        openai_port: args.ports.openai_port,
        vault_port: args.ports.vault_port,
        kube_port: args.ports.kube_port,
        dir: args.dir,
        kubeconfig: args.kubeconfig,
        config: args.write_config,
        latency: std::time::Duration::from_millis(latency_ms),
        target_count,
        projects: args.projects.map(|p| p as usize),
        consumer_interval,
        pod_ready_delay: args
            .pod_ready_delay_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(SandboxOptions::default().pod_ready_delay),
        ..Default::default()
    })
    .await
    .context("starting the sandbox")?;
    println!("openai-key-rotator sandbox is running.");
    println!(
        "  seeded                {} target(s) over {} project(s) in {:.1?}; consumer pods call every {:?}",
        sb.config.targets.len(),
        sb.project_ids.len(),
        started.elapsed(),
        consumer_interval
    );
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
    println!("  project               {}", sb.project_ids.join(", "));
    println!("  kubeconfig            {}", sb.kubeconfig_path.display());
    println!("  daemon config         {}", sb.config_path.display());
    if latency_ms > 0 {
        println!(
            "  added latency         {} ms per request, every simulator",
            latency_ms
        );
    }
    println!();
    println!(
        "Try:  kubectl --kubeconfig {} get deployments,pods{}",
        sb.kubeconfig_path.display(),
        // Generated targets each have their own namespace; the kubeconfig's is `demo`.
        if target_count.is_some() { " -A" } else { "" }
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
