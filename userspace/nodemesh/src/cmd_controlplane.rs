//! `nodemesh controlplane`: serves a folder of xDS resource files over ADS, with an admin
//! port for what it serves (`/status` as JSON, `/stats/prometheus`, `/ready`).
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nodemesh_xds::server::{ControlPlane, ServerConfig, ServerMetrics};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The folder of resource files (DiscoveryResponse YAML/JSON, any mix of types).
    #[arg(long)]
    pub dir: PathBuf,
    /// Where ADS is served (gRPC, plaintext).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Admin port: /status (JSON), /stats/prometheus, /ready.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// How often the folder is looked at for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Serve the files without translating them first: for testing how clients reject
    /// resources nodemesh would refuse. Never in production.
    #[arg(long)]
    pub unchecked: bool,
    /// Load and check the folder, print what it holds, and exit (non-zero if it does not
    /// load): for CI before the folder is deployed.
    #[arg(long)]
    pub validate: bool,
}

/// `--validate`: the folder's resources by type, and every warning, or every error.
fn validate(args: &Args) -> anyhow::Result<()> {
    match nodemesh_xds::files::load_dir(&args.dir, !args.unchecked) {
        Ok(loaded) => {
            println!("{}: version {}", args.dir.display(), loaded.version);
            for (path, n) in &loaded.files {
                println!("  {}: {n} resources", path.display());
            }
            for ty in nodemesh_xds::ResourceType::ALL {
                let n = loaded.set.len(ty);
                if n > 0 {
                    println!("  {}: {n}", ty.kind());
                }
            }
            for w in &loaded.warnings {
                println!("  warning: {w}");
            }
            Ok(())
        }
        Err(e) => {
            for line in &e.0 {
                eprintln!("error: {line}");
            }
            anyhow::bail!("{}: {} error(s)", args.dir.display(), e.0.len())
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.validate {
        return validate(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry);
        let cp = ControlPlane::start(
            ServerConfig {
                dir: args.dir.clone(),
                poll: Duration::from_millis(args.poll_ms.max(10)),
                check: !args.unchecked,
            },
            metrics,
        )?;
        if args.unchecked {
            warn!("serving resources unchecked (--unchecked)");
        }
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding the ADS port {}", args.listen))?;
        info!(listen = %args.listen, "ADS (state of the world and delta) listening");
        if let Some(addr) = args.admin {
            let admin = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin port {addr}"))?;
            info!(admin = %addr, "admin listening");
            tokio::spawn(serve_admin(admin, cp.clone(), Arc::new(registry)));
        }
        tokio::select! {
            served = cp.serve(listener) => served,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

async fn serve_admin(listener: TcpListener, cp: ControlPlane, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let (cp, registry) = (cp.clone(), registry.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = answer(&cp, &registry, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection failed");
            }
        });
    }
}

fn answer<B>(cp: &ControlPlane, registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, ty, body) = if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else {
        match req.uri().path() {
            "/ready" => (StatusCode::OK, "text/plain", "LIVE\n".to_owned()),
            "/status" => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&cp.status()).unwrap_or_default() + "\n",
            ),
            "/stats/prometheus" | "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, registry) {
                    Ok(()) => (StatusCode::OK, "text/plain; version=0.0.4", out),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: /status, /stats/prometheus, /ready\n".to_owned(),
            ),
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ty.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}
