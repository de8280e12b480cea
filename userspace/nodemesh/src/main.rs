//! `nodemesh`: the node agent and the tools to look at it.
//!
//! ```text
//! nodemesh agent --config FILE [--cleanup]   run the node agent (or remove it from the node)
//! nodemesh status [--maps] [--json]          is the eBPF path working? what is attached, counted, enabled
//! nodemesh pod add|remove|list               the pod registry (what the Kubernetes watcher feeds)
//! nodemesh namespace label NS k=v ...        set a namespace's labels (switches the mesh per namespace)
//! nodemesh sockmap on|off                    switch the fast path at run time
//! nodemesh proxy -c FILE                      the L7 proxy alone on an Envoy bootstrap (like `envoy -c`)
//! nodemesh config check FILE                  validate a bootstrap or config dump, list what is unsupported
//! nodemesh config route FILE --listener L --host H --path P [--header k=v]
//!                                             which route and cluster a request would take
//! ```
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod admin_client;
mod cmd_config;
mod cmd_controlplane;
mod cmd_pod;
mod cmd_status;

/// Where the CLI finds a running agent.
#[derive(Debug, Clone, clap::Args)]
struct Target {
    /// The agent's run directory (its unix sockets live there).
    #[arg(
        long,
        env = "NODEMESH_RUN_DIR",
        default_value = "/var/run/nodemesh",
        global = true
    )]
    run_dir: PathBuf,
}

#[derive(Debug, Parser)]
#[command(
    name = "nodemesh",
    version,
    about = "eBPF-accelerated node-level service mesh data plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Agent {
        /// The agent configuration (YAML).
        #[arg(long, short = 'c', env = "NODEMESH_CONFIG")]
        config: PathBuf,
        /// Detach and remove everything this agent's configuration pinned, then exit.
        #[arg(long)]
        cleanup: bool,
    },
    /// Show what is attached, what the kernel programs counted, and which pods are enabled.
    Status {
        #[command(flatten)]
        target: Target,
        /// Also dump the pod and original-destination maps.
        #[arg(long)]
        maps: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Read the pinned maps directly when no agent answers (the agent's `bpffs_dir`).
        #[arg(long, default_value = "/sys/fs/bpf/nodemesh")]
        bpffs_dir: PathBuf,
    },
    /// The pod registry.
    Pod {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: cmd_pod::PodCommand,
    },
    /// Namespaces.
    Namespace {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: cmd_pod::NamespaceCommand,
    },
    /// Run the L7 proxy alone on the listeners of an Envoy bootstrap file (no eBPF, no pods).
    Proxy {
        /// The bootstrap (YAML or JSON, Envoy v3).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Worker threads (default: one per core), like Envoy's `--concurrency`.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Log filter (tracing syntax).
        #[arg(long, short = 'l', default_value = "info", env = "NODEMESH_LOG")]
        log_level: String,
        /// Per-client limit: open connections.
        #[arg(long, default_value_t = 1024)]
        max_connections_per_source: u32,
        /// Per-client limit: requests in flight.
        #[arg(long, default_value_t = 1024)]
        max_requests_per_source: u32,
        /// Per-client limit: requests waiting on an upstream.
        #[arg(long, default_value_t = 256)]
        max_pending_per_source: u32,
        /// How long listeners removed by the control plane drain before their open
        /// connections are closed, like Envoy's `--drain-time-s`.
        #[arg(long, default_value_t = 600)]
        drain_time_s: u64,
    },
    /// Serve xDS (ADS, state of the world and delta) from a folder of resource files,
    /// reloading it when it changes: the control plane for use without istiod.
    Controlplane {
        #[command(flatten)]
        args: cmd_controlplane::Args,
        /// Log filter (tracing syntax).
        #[arg(long, short = 'l', default_value = "info", env = "NODEMESH_LOG")]
        log_level: String,
    },
    /// Envoy configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Switch the sockmap fast path at run time (established connections are kept).
    Sockmap {
        #[command(flatten)]
        target: Target,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a bootstrap or an Envoy `/config_dump`; list what is unsupported or ignored.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Explain which route and cluster a request would take.
    Route(cmd_config::RouteArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent { config, cleanup } => agent(&config, cleanup),
        Command::Status {
            target,
            maps,
            json,
            bpffs_dir,
        } => runtime()
            .and_then(|rt| rt.block_on(cmd_status::run(&target.run_dir, &bpffs_dir, maps, json))),
        Command::Pod { target, command } => {
            runtime().and_then(|rt| rt.block_on(cmd_pod::pod(&target.run_dir, command)))
        }
        Command::Namespace { target, command } => {
            runtime().and_then(|rt| rt.block_on(cmd_pod::namespace(&target.run_dir, command)))
        }
        Command::Proxy {
            config,
            concurrency,
            log_level,
            max_connections_per_source,
            max_requests_per_source,
            max_pending_per_source,
            drain_time_s,
        } => nodemesh_telemetry::logging::init(&log_level, false)
            .map_err(anyhow::Error::msg)
            .and_then(|()| {
                let limits = nodemesh_http::TenantLimits {
                    max_connections: max_connections_per_source,
                    max_requests: max_requests_per_source,
                    max_pending: max_pending_per_source,
                };
                cmd_config::proxy(
                    &config,
                    concurrency,
                    limits,
                    std::time::Duration::from_secs(drain_time_s),
                )
            }),
        Command::Controlplane { args, log_level } => {
            nodemesh_telemetry::logging::init(&log_level, false)
                .map_err(anyhow::Error::msg)
                .and_then(|()| cmd_controlplane::run(&args))
        }
        Command::Config { command } => match command {
            ConfigCommand::Check { file, json } => cmd_config::check(&file, json),
            ConfigCommand::Route(args) => cmd_config::route(&args),
        },
        Command::Sockmap { target, state } => runtime().and_then(|rt| {
            rt.block_on(async {
                let path = format!("/sockmap?enabled={}", state == "on");
                let body =
                    admin_client::request(&target.run_dir, hyper::Method::POST, &path).await?;
                print!("{body}");
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodemesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn agent(config: &std::path::Path, cleanup: bool) -> anyhow::Result<()> {
    let cfg = nodemesh_agent::AgentConfig::load(config)?;
    nodemesh_telemetry::logging::init(&cfg.log.level, cfg.log.json).map_err(anyhow::Error::msg)?;
    if cleanup {
        nodemesh_agent::app::cleanup(&cfg)
    } else {
        nodemesh_agent::app::run(cfg)
    }
}
