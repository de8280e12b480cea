//! `nodemesh proxy -c FILE`: the L7 proxy alone, on the listener addresses of a bootstrap,
//! the way `envoy -c FILE` runs Envoy. No eBPF, no pods: each client is its own source.
use std::{net::SocketAddr, sync::Arc};

use nodemesh_config::model::Snapshot;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{Accepted, DirectConnector, Engine, Source, TenantLimits, admin};

/// A running standalone proxy.
#[derive(Debug)]
pub struct Standalone {
    pub engine: Arc<Engine>,
    /// Bound listener addresses, by listener name (port 0 in the file is resolved here).
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds every listener with `bind_to_port` (and the admin address) and serves them.
pub async fn start(snapshot: Snapshot, limits: TenantLimits) -> std::io::Result<Standalone> {
    let mut registry = Registry::default();
    let admin_addr = snapshot.admin;
    let to_bind: Vec<_> = snapshot
        .listeners
        .iter()
        .filter(|l| l.bind)
        .cloned()
        .collect();
    let engine = Engine::new(snapshot, Arc::new(DirectConnector), limits, &mut registry);
    // Alone, the engine registers `istio_tcp_*` itself (the node proxy shares its own).
    engine
        .reporter()
        .set_tcp_metrics(nodemesh_telemetry::istio::TcpMetrics::register(
            &mut registry,
        ));
    let registry = Arc::new(registry);
    let mut tasks = Vec::new();
    let mut listeners = Vec::new();
    for config in to_bind {
        let socket = TcpListener::bind(config.address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("listener {:?} on {}: {e}", config.name, config.address),
            )
        })?;
        let local = socket.local_addr()?;
        info!(listener = %config.name, address = %local, "listening");
        listeners.push((config.name.clone(), local));
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let (stream, peer) = match socket.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(listener = %config.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let destination = stream.local_addr().unwrap_or(local);
                let accepted = Accepted {
                    listener: config.clone(),
                    peer,
                    destination,
                    source: Source::peer(peer),
                };
                tokio::spawn(engine.clone().serve(stream, accepted));
            }
        }));
    }
    let mut admin = None;
    if let Some(addr) = admin_addr {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("admin address {addr}: {e}")))?;
        let local = socket.local_addr()?;
        info!(address = %local, "admin listening");
        admin = Some(local);
        tasks.push(tokio::spawn(admin::serve(socket, engine.clone(), registry)));
    }
    Ok(Standalone {
        engine,
        listeners,
        admin,
        tasks,
    })
}
