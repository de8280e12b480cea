//! `nodemesh config check|route` and `nodemesh proxy -c`: Envoy configuration files, read
//! the way the proxy reads them.
use std::path::Path;

use anyhow::{Context as _, bail};
use http::{HeaderMap, HeaderName, HeaderValue};
use nodemesh_config::{Translated, model::Snapshot};

/// Reads and translates `path`, printing the diagnostics to stderr. Fails on errors.
pub fn load(path: &Path) -> anyhow::Result<Snapshot> {
    report(path, read(path)?)
}

/// Prints `translated`'s diagnostics to stderr; fails on errors.
fn report(path: &Path, translated: Translated) -> anyhow::Result<Snapshot> {
    for w in &translated.diagnostics.warnings {
        eprintln!("warning: {w}");
    }
    if !translated.diagnostics.errors.is_empty() {
        for e in &translated.diagnostics.errors {
            eprintln!("error: {e}");
        }
        bail!(
            "{}: {} error(s); nodemesh will not run a configuration it would not honour",
            path.display(),
            translated.diagnostics.errors.len()
        );
    }
    translated.snapshot.context("no configuration produced")
}

fn read(path: &Path) -> anyhow::Result<Translated> {
    nodemesh_config::load_file(path).with_context(|| format!("reading {}", path.display()))
}

/// `nodemesh config check FILE`: what is unsupported, what is ignored.
pub fn check(path: &Path, json: bool) -> anyhow::Result<()> {
    let t = read(path)?;
    let d = &t.diagnostics;
    if json {
        let out = serde_json::json!({
            "ok": d.errors.is_empty(),
            "errors": d.errors,
            "warnings": d.warnings,
            "listeners": t.snapshot.as_ref().map(|s| s.listeners.iter().map(|l| l.name.clone()).collect::<Vec<_>>()),
            "clusters": t.snapshot.as_ref().map(|s| { let mut c: Vec<_> = s.clusters.keys().cloned().collect(); c.sort(); c }),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for e in &d.errors {
            println!("error: {e}");
        }
        for w in &d.warnings {
            println!("warning: {w}");
        }
        if let Some(s) = &t.snapshot {
            println!(
                "ok: {} listener(s), {} route configuration(s), {} cluster(s)",
                s.listeners.len(),
                s.routes.len(),
                s.clusters.len()
            );
        }
    }
    if d.errors.is_empty() {
        Ok(())
    } else {
        bail!("{} error(s)", d.errors.len())
    }
}

/// The question of `nodemesh config route`.
#[derive(Debug, clap::Args)]
pub struct RouteArgs {
    /// The bootstrap or config dump.
    pub file: std::path::PathBuf,
    /// The listener, by name.
    #[arg(long)]
    pub listener: String,
    /// The request's host (`:authority`).
    #[arg(long)]
    pub host: String,
    /// The request's path, with its query string.
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// The connection's destination address (selects among filter chains).
    #[arg(long)]
    pub destination: Option<std::net::SocketAddr>,
}

/// `nodemesh config route`: which route and cluster a request takes.
pub fn route(args: &RouteArgs) -> anyhow::Result<()> {
    let snapshot = load(&args.file)?;
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?}: expected name=value"))?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("header name {name:?}"))?,
            HeaderValue::from_str(value).with_context(|| format!("header value {value:?}"))?,
        );
    }
    let query = nodemesh_http::explain::Query {
        listener: args.listener.clone(),
        destination: args.destination,
        host: args.host.clone(),
        path: args.path.clone(),
        method: args.method.clone(),
        headers,
    };
    let explanation =
        nodemesh_http::explain::explain(&snapshot, &query).map_err(anyhow::Error::msg)?;
    println!("{}", serde_json::to_string_pretty(&explanation)?);
    Ok(())
}

/// `nodemesh proxy -c FILE`: serve the file's listeners until interrupted.
pub fn proxy(
    path: &Path,
    concurrency: Option<usize>,
    limits: nodemesh_http::TenantLimits,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // A bootstrap with `dynamic_resources` follows its control plane.
    let start = nodemesh_xds::startup::read(&text, None)
        .with_context(|| format!("reading {}", path.display()))?;
    let snapshot = report(path, start.translated)?;
    let xds = start.xds;
    // Envoy's threading: connections on `concurrency` workers, each a single-threaded
    // runtime; accepting, admin and xDS on the main thread's.
    let workers =
        concurrency.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
    let workers = nodemesh_http::workers::Workers::start(workers, "nm-worker")
        .context("starting the worker threads")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = nodemesh_xds::client::Metrics::register(&mut registry);
        let running =
            nodemesh_http::server::start_with(snapshot, limits, registry, workers.clone()).await?;
        for (name, addr) in &running.listeners {
            eprintln!("listener {name} on {addr}");
        }
        if let Some(admin) = running.admin {
            eprintln!("admin on {admin}");
        }
        // The bootstrap's parse is over: give its memory back (with Envoy's type
        // descriptors, unless a control plane will send more).
        if xds.is_none() {
            nodemesh_config::pool::release();
        }
        nodemesh_config::memory::release_free_memory();
        let engine = running.engine.clone();
        let running = std::sync::Arc::new(tokio::sync::Mutex::new(running));
        if let Some(config) = xds {
            eprintln!(
                "following the control plane at {} ({})",
                config.server,
                if config.ads.delta {
                    "delta"
                } else {
                    "state of the world"
                }
            );
            let target = running.clone();
            let client = nodemesh_xds::client::spawn(config, metrics, move |snapshot| {
                let target = target.clone();
                async move {
                    let applied = target.lock().await.apply(snapshot, drain).await;
                    for (name, addr, e) in &applied.failed {
                        eprintln!("listener {name} on {addr}: {e}");
                    }
                }
            });
            engine.set_config_source(std::sync::Arc::new(client));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("shutting down");
        drop(running);
        anyhow::Ok(())
    });
    workers.shutdown(std::time::Duration::from_secs(1));
    served
}
