//! `nodemesh proxy -c FILE`: the L7 proxy alone, on the listener addresses of a bootstrap,
//! the way `envoy -c FILE` runs Envoy. No eBPF, no pods: each client is its own source.
//!
//! # Configuration updates ([`Standalone::apply`])
//!
//! Listeners are diffed by name against what is bound:
//! - **new** `bind` listeners are bound and served;
//! - **unchanged address**: the socket is kept (no rebind, open connections untouched);
//!   every new connection is served with the listener configuration current at its accept
//!   (the accept loop looks its listener up by name in the engine's state), so the new
//!   filter chains and routes apply to new connections, and to the next request of an open
//!   HTTP connection whose routes come from RDS (named route configurations are looked up
//!   per request; inline ones belong to the connection's chain);
//! - **removed** (or no longer `bind`): the socket is closed at once (the port stops
//!   accepting) and the listener's open connections drain: an HTTP/1.1 connection's next
//!   response carries `connection: close`, an HTTP/2 connection gets a GOAWAY (open streams
//!   finish), and whatever is still open after the drain time is closed (TCP proxy
//!   connections and idle HTTP/1.1 connections get only this hard close);
//! - **address changed**: the new address is bound first; on success the old socket drains
//!   as if removed, on failure the old socket keeps serving.
//!
//! A bind failure does not stop the others: it is logged with the listener's name and
//! address, counted in `nodemesh_listener_bind_failures_total{listener}` and returned in
//! [`Applied::failed`]. The engine's clusters are updated by [`Engine::update`] (unchanged
//! clusters keep their connections).
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use nodemesh_config::model::{Listener, Snapshot};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use crate::{
    Accepted, DirectConnector, Drain, Engine, Source, TenantLimits, UpdateSummary, admin,
    workers::Workers,
};

/// Envoy's `--drain-time-s` default.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(600);

/// A running standalone proxy.
#[derive(Debug)]
pub struct Standalone {
    pub engine: Arc<Engine>,
    /// Bound listener addresses, by listener name (port 0 in the file is resolved here),
    /// in configuration order; kept current by [`Self::apply`].
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    bound: HashMap<String, Bound>,
    bind_failures: Family<ListenerLabel, Counter>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Where accepted connections are served.
    workers: Workers,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

/// One bound listener socket and what its connections watch.
#[derive(Debug)]
struct Bound {
    /// The address in the configuration (port 0 stays 0).
    configured: SocketAddr,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    /// `true`: connections drain.
    drain: watch::Sender<bool>,
    /// `true`: connections still open are closed.
    close: watch::Sender<bool>,
}

impl Bound {
    /// Stops accepting now, drains the open connections and closes them after `drain`.
    fn retire(self, name: &str, drain: Duration) {
        self.accept.abort();
        let _ = self.drain.send(true);
        let open = self.close.receiver_count();
        info!(listener = %name, address = %self.local, open, drain_time = ?drain, "listener removed: draining");
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                // Every connection ended by itself.
                () = self.close.closed() => return,
            }
            let open = self.close.receiver_count();
            if open > 0 {
                info!(listener = %name, open, "drain time over: closing the remaining connections");
            }
            let _ = self.close.send(true);
        });
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for b in self.bound.values() {
            b.accept.abort();
            let _ = b.close.send(true);
        }
    }
}

/// What [`Standalone::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Newly bound (new listeners and changed addresses), with their local address.
    pub bound: Vec<(String, SocketAddr)>,
    /// Unchanged address: socket kept.
    pub kept: Vec<String>,
    /// Draining (removed, or moved to another address).
    pub draining: Vec<String>,
    /// Listeners that could not be bound, with the error (the rest were applied).
    pub failed: Vec<(String, SocketAddr, std::io::Error)>,
    pub clusters: UpdateSummary,
}

/// Binds every listener with `bind_to_port` (and the admin address) and serves them, all on
/// the caller's runtime. Unlike [`Standalone::apply`], any bind failure fails the start (as
/// Envoy's does).
pub async fn start(snapshot: Snapshot, limits: TenantLimits) -> std::io::Result<Standalone> {
    start_with(snapshot, limits, Registry::default(), Workers::current()).await
}

/// [`start`], with metrics registered elsewhere (an xDS client's) on the admin port too,
/// and accepted connections served on `workers` (the accept loops, the admin endpoint and
/// configuration updates stay on the caller's runtime).
pub async fn start_with(
    snapshot: Snapshot,
    limits: TenantLimits,
    mut registry: Registry,
    workers: Workers,
) -> std::io::Result<Standalone> {
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
    let bind_failures = Family::<ListenerLabel, Counter>::default();
    registry.sub_registry_with_prefix("nodemesh").register(
        "listener_bind_failures",
        "Listeners a configuration update could not bind",
        bind_failures.clone(),
    );
    workers.register(&mut registry);
    let registry = Arc::new(registry);
    let mut running = Standalone {
        engine: engine.clone(),
        listeners: Vec::new(),
        admin: None,
        bound: HashMap::new(),
        bind_failures,
        tasks: Vec::new(),
        workers,
    };
    for config in to_bind {
        let bound = bind(&engine, &config, &running.workers)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("listener {:?} on {}: {e}", config.name, config.address),
                )
            })?;
        running.bound.insert(config.name.clone(), bound);
        running
            .listeners
            .push((config.name.clone(), running.bound[&config.name].local));
    }
    if let Some(addr) = admin_addr {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("admin address {addr}: {e}")))?;
        let local = socket.local_addr()?;
        info!(address = %local, "admin listening");
        running.admin = Some(local);
        running
            .tasks
            .push(tokio::spawn(admin::serve(socket, engine.clone(), registry)));
    }
    Ok(running)
}

impl Standalone {
    /// Serves `snapshot` from now on: the engine's state is swapped ([`Engine::update`]) and
    /// listeners are bound, kept or drained as the module docs describe; removed listeners'
    /// connections are closed after `drain`. The admin address is not rebound.
    pub async fn apply(&mut self, snapshot: Snapshot, drain: Duration) -> Applied {
        let mut applied = Applied::default();
        let wanted: Vec<Arc<Listener>> = snapshot
            .listeners
            .iter()
            .filter(|l| l.bind)
            .cloned()
            .collect();
        // The state first: connections accepted from here on see the new listeners.
        applied.clusters = self.engine.update(snapshot);
        let mut bound = HashMap::new();
        for config in &wanted {
            match self.bound.remove(&config.name) {
                Some(live) if live.configured == config.address => {
                    applied.kept.push(config.name.clone());
                    bound.insert(config.name.clone(), live);
                }
                live => match bind(&self.engine, config, &self.workers).await {
                    Ok(new) => {
                        applied.bound.push((config.name.clone(), new.local));
                        if let Some(old) = live {
                            applied.draining.push(config.name.clone());
                            old.retire(&config.name, drain);
                        }
                        bound.insert(config.name.clone(), new);
                    }
                    Err(e) => {
                        warn!(listener = %config.name, address = %config.address, error = %e, "cannot bind listener; the other listeners are applied");
                        self.bind_failures
                            .get_or_create(&ListenerLabel {
                                listener: config.name.clone(),
                            })
                            .inc();
                        applied
                            .failed
                            .push((config.name.clone(), config.address, e));
                        // A listener that moved keeps serving on its old address.
                        if let Some(old) = live {
                            bound.insert(config.name.clone(), old);
                        }
                    }
                },
            }
        }
        for (name, old) in self.bound.drain() {
            applied.draining.push(name.clone());
            old.retire(&name, drain);
        }
        self.bound = bound;
        self.listeners = wanted
            .iter()
            .filter_map(|l| self.bound.get(&l.name).map(|b| (l.name.clone(), b.local)))
            .collect();
        info!(
            bound = applied.bound.len(),
            kept = applied.kept.len(),
            draining = applied.draining.len(),
            failed = applied.failed.len(),
            "listeners updated"
        );
        applied
    }

    /// The bound address of listener `name`.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.bound.get(name).map(|b| b.local)
    }
}

/// Binds `config` and serves it until the returned accept task is aborted; each accepted
/// connection is served on one of `workers`.
async fn bind(
    engine: &Arc<Engine>,
    config: &Arc<Listener>,
    workers: &Workers,
) -> std::io::Result<Bound> {
    let socket = TcpListener::bind(config.address).await?;
    let local = socket.local_addr()?;
    info!(listener = %config.name, address = %local, "listening");
    let (drain_tx, drain) = Drain::channel();
    let (close, close_rx) = watch::channel(false);
    let engine = engine.clone();
    let fallback = config.clone();
    let workers = workers.clone();
    let accept = tokio::spawn(async move {
        loop {
            let (stream, peer) = match socket.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(listener = %fallback.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let destination = stream.local_addr().unwrap_or(local);
            // The listener as configured now (an update may have changed its chains).
            let listener = engine
                .state()
                .snapshot
                .listener(&fallback.name)
                .cloned()
                .unwrap_or_else(|| fallback.clone());
            let accepted = Accepted {
                listener,
                peer,
                destination,
                source: Source::peer(peer),
            };
            let (engine, drain) = (engine.clone(), drain.clone());
            let mut close = close_rx.clone();
            workers.spawn_connection(stream, move |stream| async move {
                tokio::select! {
                    () = engine.serve_draining(stream, accepted, drain) => {}
                    // Dropping the connection's future closes its socket.
                    _ = close.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Ok(Bound {
        configured: config.address,
        local,
        accept,
        drain: drain_tx,
        close,
    })
}
