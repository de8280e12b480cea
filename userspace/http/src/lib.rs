//! The L7 node proxy: Envoy's listeners, HTTP connection manager, router and clusters, on
//! hyper.
//!
//! ```text
//! accepted connection (+ original destination, + source pod)
//!   -> listener ([`listener::listener_for`], `use_original_dst` hand-over)
//!   -> inspectors ([`detect`]: h2c preface, HTTP/1 request line, TLS ClientHello)
//!   -> filter chain ([`listener::select_chain`])
//!   -> http_connection_manager ([`hcm`]: hyper HTTP/1.1 or HTTP/2 server)
//!        -> route ([`route`]) -> direct response | redirect | router ([`router`])
//!        -> cluster ([`upstream`]: health, balancing, circuit breakers, pooled connections)
//!   -> or tcp_proxy ([`tcp`])
//! ```
//!
//! Owns: everything between an accepted connection and its upstream, for one immutable
//! configuration [`State`] at a time ([`Engine::update`] swaps it atomically; requests in
//! flight finish on the state they started with; clusters the update leaves unchanged keep
//! their live state and pooled connections, see ARCHITECTURE.md, "Configuration updates"),
//! its statistics ([`stats`]) and the admin endpoints ([`admin`]). Listener sockets and
//! their drain on removal are [`server`]'s (`nodemesh proxy -c`).
//!
//! Must not: know how a connection was captured (the node proxy and `nodemesh proxy -c`
//! both hand it over with an [`Accepted`]), or open upstream sockets itself: a [`Connector`]
//! does (the node proxy's opens them in the source pod's network namespace).
pub mod admin;
pub mod detect;
mod downstream;
pub mod explain;
pub mod filters;
pub mod hcm;
mod headers;
mod idle;
pub mod listener;
mod local;
pub mod policy;
pub mod report;
pub mod route;
pub mod router;
pub mod sanitize;
pub mod server;
pub mod stats;
mod steering;
pub mod tcp;
pub mod tenant;
pub mod upstream;
pub mod workers;

use std::{collections::HashMap, fmt, io, net::SocketAddr, pin::Pin, sync::Arc};

use arc_swap::ArcSwap;
use nodemesh_config::model::{Codec, Listener, NetworkFilter, Snapshot};
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tracing::{debug, warn};

pub use tenant::TenantLimits;
use upstream::ClusterState;

/// Errors carried in bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who sent a connection: the tenant for per-source limits and for upstream sockets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// Stable while the source exists: the pod's network namespace cookie in the node
    /// proxy; the client address in a standalone proxy.
    pub key: u64,
    /// For metrics and logs: `namespace/pod`, or the client IP.
    pub name: Arc<str>,
    /// The source's identity for authorization (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`):
    /// the pod's in the node proxy (until mTLS carries it); none in a standalone proxy,
    /// where, as in Envoy without TLS, `authenticated` principals never match.
    pub principal: Option<Arc<str>>,
    /// The source workload's namespace and name, when known (metrics, `istio_authn`).
    pub namespace: Option<Arc<str>>,
    pub workload: Option<Arc<str>>,
}

impl Source {
    /// The proxy itself (health checks).
    pub fn node() -> Self {
        Self {
            key: 0,
            name: Arc::from("node"),
            principal: None,
            namespace: None,
            workload: None,
        }
    }

    /// A standalone proxy's client, keyed by its IP address.
    pub fn peer(addr: SocketAddr) -> Self {
        use std::hash::BuildHasher as _;
        let ip = addr.ip().to_canonical();
        let hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        Self {
            // Never 0, which is the node's own key.
            key: hasher.hash_one(ip) | 1,
            name: Arc::from(addr.ip().to_canonical().to_string()),
            principal: None,
            namespace: None,
            workload: None,
        }
    }
}

/// A boxed connect future.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'static>>;

/// Opens upstream TCP connections.
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    fn connect(&self, addr: SocketAddr, source: &Source) -> ConnectFuture;

    /// Whether a connection belongs to its source (then pools are kept per source).
    fn per_source(&self) -> bool {
        false
    }
}

/// Plain `connect()` from the proxy's own network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectConnector;

impl Connector for DirectConnector {
    fn connect(&self, addr: SocketAddr, _source: &Source) -> ConnectFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// A connection handed to the engine.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The listener that accepted it.
    pub listener: Arc<Listener>,
    pub peer: SocketAddr,
    /// Where the client meant to go: the original destination of a redirected connection,
    /// else the local address.
    pub destination: SocketAddr,
    pub source: Source,
}

/// One configuration with the live state built for it.
#[derive(Debug)]
pub struct State {
    pub snapshot: Arc<Snapshot>,
    pub clusters: foldhash::HashMap<String, Arc<ClusterState>>,
    /// The compiled filters of every filter chain, by [`policy::ChainKey`].
    pub policies: policy::Compiled,
}

/// Whether a connection's listener is draining (removed from the configuration).
#[derive(Debug, Clone)]
pub struct Drain(tokio::sync::watch::Receiver<bool>);

impl Drain {
    /// A drain signal and its sender: `send(true)` starts the drain.
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    /// A connection that never drains (its listener lives as long as the process).
    pub fn never() -> Self {
        // The sender is dropped: `started` then never resolves (see there).
        Self::channel().1
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain starts; never, if the sender is gone without starting it.
    pub async fn started(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What [`Engine::update`] did with the clusters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    /// Unchanged: live state kept.
    pub kept: usize,
    /// Only the listed endpoints changed: hosts replaced in place, the rest kept.
    pub endpoints_updated: usize,
    /// New or changed: state built from the new configuration.
    pub built: usize,
    /// Removed or replaced: health checks stopped, idle connections closed.
    pub retired: usize,
}

/// The L7 proxy.
pub struct Engine {
    state: ArcSwap<State>,
    connector: Arc<dyn Connector>,
    stats: stats::Stats,
    tenants: tenant::Tenants,
    /// What outlives a configuration: quota leases, policy counters.
    policies: nodemesh_policy::chain::Policies,
    /// Bumped after every update: open connections re-check their network policy.
    updates: tokio::sync::watch::Sender<u64>,
    /// Close open connections that a new network policy denies.
    close_denied: std::sync::atomic::AtomicBool,
    /// Istio's request metrics and the access log writers.
    reporter: report::Reporter,
    /// Serializes updates: each diffs against the state the previous one published.
    updating: std::sync::Mutex<()>,
    /// What configures this engine dynamically (the xDS client), for the admin port.
    config_source: std::sync::OnceLock<Arc<dyn ConfigSource>>,
}

/// Whatever configures the engine dynamically (the xDS client), as the admin port shows it.
pub trait ConfigSource: Send + Sync {
    /// Its state, for `/xds` and `nodemesh status`.
    fn status(&self) -> serde_json::Value;
    /// The live configuration as an Envoy config dump, for `/config_dump`.
    fn config_dump(&self) -> serde_json::Value;
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("listeners", &self.state.load().snapshot.listeners.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine serving `snapshot`. Must be called inside a tokio runtime: clusters start
    /// their health checks and DNS resolution.
    pub fn new(
        snapshot: Snapshot,
        connector: Arc<dyn Connector>,
        limits: TenantLimits,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let stats = stats::Stats::register(registry);
        let policy_stats = nodemesh_policy::stats::PolicyStats::register(registry);
        let engine = Arc::new(Self {
            state: ArcSwap::from_pointee(State {
                snapshot: Arc::new(Snapshot::default()),
                clusters: HashMap::default(),
                policies: policy::Compiled::default(),
            }),
            connector,
            tenants: tenant::Tenants::new(limits, stats.clone()),
            stats,
            policies: nodemesh_policy::chain::Policies::new(policy_stats),
            updates: tokio::sync::watch::Sender::new(0),
            close_denied: std::sync::atomic::AtomicBool::new(true),
            reporter: report::Reporter::register(registry),
            updating: std::sync::Mutex::new(()),
            config_source: std::sync::OnceLock::new(),
        });
        let _ = engine.update(snapshot);
        engine
    }

    /// Publishes a new configuration; requests in flight keep the state they started with.
    ///
    /// Clusters are diffed by name against the live state: a cluster whose `Cluster` is
    /// equal keeps its [`ClusterState`] (pooled upstream connections, health and outlier
    /// state, health check tasks); one whose listed endpoints alone changed (EDS) keeps it
    /// and gets the new host set in place; any other change builds a new state. States of
    /// removed or replaced clusters are [retired](ClusterState::retire): their health checks
    /// stop and their idle connections close. Synchronous and `&self`, so it can be called
    /// from any task (the xDS client calls it for each accepted update); concurrent calls
    /// are serialized. It must run inside a tokio runtime (new clusters start their tasks).
    pub fn update(&self, snapshot: Snapshot) -> UpdateSummary {
        let _one_at_a_time = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.state.load_full();
        let mut summary = UpdateSummary::default();
        let clusters: foldhash::HashMap<String, Arc<ClusterState>> = snapshot
            .clusters
            .iter()
            .map(|(name, config)| {
                if let Some(live) = old.clusters.get(name) {
                    if *live.config == **config {
                        summary.kept += 1;
                        return (name.clone(), live.clone());
                    }
                    if live.config.same_except_endpoints(config)
                        && let Some(endpoints) = config.endpoints()
                    {
                        live.set_endpoints(endpoints);
                        summary.endpoints_updated += 1;
                        return (name.clone(), live.clone());
                    }
                }
                let state = ClusterState::new(config.clone(), self.stats.cluster(name));
                upstream::health::start(&state, &self.connector);
                summary.built += 1;
                (name.clone(), state)
            })
            .collect();
        for (name, live) in &old.clusters {
            if !clusters.get(name).is_some_and(|c| Arc::ptr_eq(c, live)) {
                live.retire();
                summary.retired += 1;
            }
        }
        debug!(
            kept = summary.kept,
            endpoints_updated = summary.endpoints_updated,
            built = summary.built,
            retired = summary.retired,
            "clusters updated"
        );
        let policies = policy::Compiled::build(&snapshot, &self.policies);
        self.reporter.configure(&snapshot);
        self.state.store(Arc::new(State {
            snapshot: Arc::new(snapshot),
            clusters,
            policies,
        }));
        // Open connections re-check their network policy against what was just published.
        self.updates.send_modify(|v| *v += 1);
        summary
    }

    /// Whether open connections a new network policy denies are closed (default: yes).
    pub fn set_close_denied_on_update(&self, close: bool) {
        self.close_denied
            .store(close, std::sync::atomic::Ordering::Relaxed);
    }

    /// Entries queued per access log file; the writers are reopened with the new queue.
    pub fn set_access_log_queue(&self, entries: usize) {
        self.reporter.set_capacity(entries);
        self.reporter.reset_writers();
        self.reporter.configure(&self.state().snapshot);
    }

    /// Shows `source` on the admin port (`/xds`, `/config_dump`); once, later calls are
    /// ignored.
    pub fn set_config_source(&self, source: Arc<dyn ConfigSource>) {
        let _ = self.config_source.set(source);
    }

    /// The state of what configures the engine, when it is configured dynamically.
    pub fn xds_status(&self) -> Option<serde_json::Value> {
        self.config_source.get().map(|s| s.status())
    }

    /// The live configuration as an Envoy config dump, when it is configured dynamically.
    pub fn config_dump(&self) -> Option<serde_json::Value> {
        self.config_source.get().map(|s| s.config_dump())
    }

    /// The configuration requests start with now.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Request metrics, access log writers (capacity, destination workload names).
    pub fn reporter(&self) -> &report::Reporter {
        &self.reporter
    }

    pub fn stats(&self) -> &stats::Stats {
        &self.stats
    }

    /// Drops a source's per-source state and series once nothing of it is in flight (its
    /// pod was removed).
    pub fn forget_source(&self, source: &Source) {
        self.tenants.remove(source);
    }

    pub(crate) fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }

    pub(crate) fn updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.updates.subscribe()
    }

    pub(crate) fn close_denied(&self) -> bool {
        self.close_denied.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn tenants(&self) -> &tenant::Tenants {
        &self.tenants
    }

    /// Serves one accepted connection to its end.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, accepted: Accepted) {
        self.serve_draining(stream, accepted, Drain::never()).await;
    }

    /// [`Self::serve`] for a connection whose listener may drain: once `drain` starts, an
    /// HTTP/1.1 connection's next response carries `connection: close` and an HTTP/2
    /// connection gets a GOAWAY. Closing what is still open when the drain time is over is
    /// the caller's (drop this future).
    pub async fn serve_draining(
        self: Arc<Self>,
        stream: TcpStream,
        accepted: Accepted,
        drain: Drain,
    ) {
        // Responses are written as the codecs produce them; Nagle's algorithm would hold
        // small writes (gRPC trailers, HTTP/2 frames) for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let Some(_conn_slot) = self.tenants.connection(&accepted.source) else {
            warn!(source = %accepted.source.name, "connection refused: per-source connection limit");
            return;
        };
        self.stats.downstream_cx_active.inc();
        let _active = scopeguard(&self.stats.downstream_cx_active);
        let state = self.state();
        let mut listener = accepted.listener.clone();
        if listener.use_original_dst
            && let Some(target) = listener::listener_for(&state.snapshot, accepted.destination)
            && !Arc::ptr_eq(target, &listener)
        {
            debug!(from = %listener.name, to = %target.name, "handed over by original destination");
            listener = target.clone();
        }
        let (http, tls) = listener.inspectors_for(accepted.destination.port());
        let inspectors = detect::Inspectors {
            http,
            tls,
            timeout: listener.inspection_timeout,
        };
        let mut stream = stream;
        let (detected, mut prefix) = match detect::inspect(&mut stream, inspectors).await {
            Ok(found) => found,
            Err(e) => {
                debug!(peer = %accepted.peer, error = %e, "connection failed during inspection");
                return;
            }
        };
        let view = listener::ConnectionView {
            destination: accepted.destination,
            source: accepted.peer,
            detected: &detected,
        };
        let Some(chain) = listener::select_chain(&listener, &view) else {
            self.stats.downstream_connection("no_filter_chain");
            warn!(listener = %listener.name, destination = %accepted.destination, "no filter chain matches; closing (NR)");
            return;
        };
        let key = policy::ChainKey::of(&listener, chain);
        let principal = accepted.source.principal.clone();
        let conn_attrs = policy::ConnAttrs {
            peer: accepted.peer,
            destination: accepted.destination,
            principal,
            namespace: accepted.source.namespace.clone(),
            server_name: detected.server_name.clone(),
        };
        if let Some(details) = state.policies.network_check(&key, &conn_attrs) {
            self.stats.local_reply("RBAC");
            debug!(listener = %listener.name, peer = %accepted.peer, %details, "connection denied by network RBAC; closing");
            return;
        }
        let watch = policy::watch_denied(self.clone(), key.clone(), conn_attrs);
        match &chain.filter {
            NetworkFilter::Http(hcm) => {
                let hcm = hcm.clone();
                let h2 = match (hcm.codec, detected.http) {
                    (Codec::Http1, _) => false,
                    (Codec::Http2, _) => true,
                    (Codec::Auto, Some(version)) => version == detect::HttpVersion::Http2,
                    // No HTTP inspector ran: look for the h2c preface as Envoy's auto codec does.
                    (Codec::Auto, None) => {
                        let http_only = detect::Inspectors {
                            http: true,
                            tls: false,
                            timeout: hcm
                                .request_headers_timeout
                                .unwrap_or(hcm::DEFAULT_HEADER_TIMEOUT),
                        };
                        match detect::inspect_after(&mut stream, prefix.clone(), http_only).await {
                            Ok((found, read)) => {
                                prefix = read;
                                found.http == Some(detect::HttpVersion::Http2)
                            }
                            Err(e) => {
                                debug!(peer = %accepted.peer, error = %e, "connection failed during inspection");
                                return;
                            }
                        }
                    }
                };
                let io = detect::Rewind::new(prefix, stream);
                let chain_filters = state.policies.http(&key);
                tokio::select! {
                    () = hcm::serve(self.clone(), hcm, io, h2, accepted, key, chain_filters, drain) => {}
                    () = watch => {}
                }
            }
            NetworkFilter::Tcp(proxy) => {
                let io = detect::Rewind::new(prefix, stream);
                self.stats.downstream_connection("tcp");
                let proxy = proxy.clone();
                tokio::select! {
                    () = tcp::serve(&self, &state, &proxy, io, &accepted) => {}
                    () = watch => {}
                }
            }
        }
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn scopeguard(g: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard<'_> {
    GaugeGuard(g)
}
