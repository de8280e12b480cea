//! The file-backed control plane: serves a folder of resource files (see [`crate::files`])
//! over ADS, both variants, and reloads it when it changes.
//!
//! # Serving
//! - The folder is loaded whole and, unless unchecked, translated as a complete proxy
//!   configuration before anything of it is served. A reload that fails keeps the last
//!   good set serving; the failure is logged, counted
//!   (`nodemesh_controlplane_reloads_total{result="error"}`) and shown on `/status`.
//! - Versions are content hashes: per resource (delta), per type (`version_info`) and for
//!   the whole set (`system_version_info`). They survive a restart of the control plane, so
//!   a resuming client is not sent what it holds.
//! - State of the world: CDS and LDS are wildcard; EDS, RDS and SDS answer the names asked
//!   for. A type is sent when a client first asks for it (unless it resumes with the
//!   current version), whenever its version changes, and when the client asks again with
//!   a nonce it has already answered (Envoy re-requesting the endpoints of a modified,
//!   warming cluster); a NACK is logged and not answered until the next change, so a
//!   client that rejects something is not sent it in a loop.
//! - Incremental: per stream and type, the names and versions the client holds (from
//!   `initial_resource_versions` and what was sent); each change sends only what differs
//!   and names what was removed.
//! - After a change, types go out in Envoy's recommended order: clusters, endpoints,
//!   listeners, routes, secrets, so a client never sees a listener before its clusters.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::envoy::{
    config::core::v3::{ControlPlane as ControlPlaneId, Node},
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource as WireResource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus, Streaming};
use tracing::{debug, info, warn};

use crate::{
    files::{self, Loaded},
    types::ResourceType,
};

/// The order types are pushed in after a change.
const PUSH_ORDER: [ResourceType; 5] = [
    ResourceType::Cluster,
    ResourceType::Endpoints,
    ResourceType::Listener,
    ResourceType::Route,
    ResourceType::Secret,
];

const IDENTIFIER: &str = "nodemesh-controlplane";

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub dir: PathBuf,
    /// How often the folder is looked at for changes.
    pub poll: Duration,
    /// Translate the set before serving it (off only to test clients with resources
    /// nodemesh would refuse).
    pub check: bool,
}

/// The control plane's own state, as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerStatus {
    pub dir: String,
    pub version: String,
    /// The version of each type being served (`cds`, `eds`, ...): what a state-of-the-world
    /// client's `acked` reaches once it holds everything.
    pub versions: BTreeMap<&'static str, String>,
    /// Unix seconds of the last successful load.
    pub loaded_at: Option<u64>,
    pub reloads: u64,
    pub reload_errors: u64,
    /// Why the last load failed, if the last attempt failed (the previous set serves).
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    pub files: Vec<FileStatus>,
    /// Resource names and versions by type (`cds`, `eds`, ...).
    pub resources: BTreeMap<&'static str, BTreeMap<String, String>>,
    pub clients: Vec<ClientStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    pub path: String,
    pub resources: usize,
}

/// One connected stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientStatus {
    pub stream: u64,
    pub peer: Option<String>,
    pub node: String,
    pub cluster: String,
    pub variant: &'static str,
    pub connected_at: u64,
    pub types: BTreeMap<&'static str, ClientTypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientTypeStatus {
    /// The version last sent.
    pub sent: String,
    /// The version the client last acknowledged.
    pub acked: String,
    pub responses: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// The control plane's metrics.
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    reloads: Family<ResultLabel, Counter>,
    streams: Gauge,
    responses: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "nodemesh_controlplane_reloads",
            "Loads of the resource folder, by result (ok, error, unchanged)",
            m.reloads.clone(),
        );
        registry.register(
            "nodemesh_controlplane_streams",
            "Open ADS streams",
            m.streams.clone(),
        );
        registry.register(
            "nodemesh_controlplane_responses",
            "Discovery responses sent, by type",
            m.responses.clone(),
        );
        registry.register(
            "nodemesh_controlplane_nacks",
            "Responses clients rejected, by type",
            m.nacks.clone(),
        );
        m
    }

    fn reload(&self, result: &str) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    fn typed(family: &Family<TypeLabel, Counter>, ty: ResourceType) {
        family
            .get_or_create(&TypeLabel {
                r#type: ty.short().to_owned(),
            })
            .inc();
    }
}

#[derive(Debug)]
struct Shared {
    status: Mutex<ServerStatus>,
    metrics: ServerMetrics,
    streams: AtomicU64,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut ServerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn client(&self, stream: u64, f: impl FnOnce(&mut ClientStatus)) {
        self.set(|s| {
            if let Some(c) = s.clients.iter_mut().find(|c| c.stream == stream) {
                f(c);
            }
        });
    }
}

/// A running control plane: the gRPC service to mount, and its state.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    served: Arc<watch::Sender<Arc<Loaded>>>,
    shared: Arc<Shared>,
}

impl ControlPlane {
    /// Loads the folder (failing if it does not load) and starts watching it.
    pub fn start(config: ServerConfig, metrics: ServerMetrics) -> anyhow::Result<Self> {
        let loaded = files::load_dir(&config.dir, config.check).map_err(|e| {
            anyhow::anyhow!(
                "{}: the resource folder does not load:\n  {}",
                config.dir.display(),
                e.0.join("\n  ")
            )
        })?;
        for w in &loaded.warnings {
            warn!(dir = %config.dir.display(), "ignored: {w}");
        }
        let shared = Arc::new(Shared {
            status: Mutex::new(ServerStatus {
                dir: config.dir.display().to_string(),
                ..Default::default()
            }),
            metrics,
            streams: AtomicU64::new(0),
        });
        shared.metrics.reload("ok");
        record_loaded(&shared, &loaded);
        info!(dir = %config.dir.display(), version = %loaded.version, files = loaded.files.len(), "serving");
        let served = Arc::new(watch::Sender::new(Arc::new(loaded)));
        tokio::spawn(watch_dir(config, Arc::downgrade(&served), shared.clone()));
        Ok(Self { served, shared })
    }

    pub fn status(&self) -> ServerStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version of the set being served.
    pub fn version(&self) -> String {
        self.served.borrow().version.clone()
    }

    /// Serves `loaded` instead of what the folder holds, until the folder next changes:
    /// for embedding the control plane in a program that makes its resources itself.
    pub fn publish(&self, loaded: Loaded) {
        record_loaded(&self.shared, &loaded);
        self.served.send_replace(Arc::new(loaded));
    }

    /// The ADS service.
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(usize::MAX)
    }

    /// Serves ADS on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(self.service())
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    }

    fn open_stream(&self, peer: Option<SocketAddr>, variant: &'static str) -> u64 {
        let id = self.shared.streams.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.metrics.streams.inc();
        self.shared.set(|s| {
            s.clients.push(ClientStatus {
                stream: id,
                peer: peer.map(|p| p.to_string()),
                variant,
                connected_at: now(),
                ..Default::default()
            });
        });
        id
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record_loaded(shared: &Shared, loaded: &Loaded) {
    shared.set(|s| {
        s.version = loaded.version.clone();
        s.versions = ResourceType::ALL
            .into_iter()
            .map(|ty| (ty.short(), loaded.type_version(ty).to_owned()))
            .collect();
        s.loaded_at = Some(now());
        s.reloads += 1;
        s.last_error = None;
        s.warnings = loaded.warnings.clone();
        s.files = loaded
            .files
            .iter()
            .map(|(p, n)| FileStatus {
                path: p.display().to_string(),
                resources: *n,
            })
            .collect();
        s.resources = ResourceType::ALL
            .into_iter()
            .map(|ty| {
                let names = loaded
                    .set
                    .of(ty)
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect();
                (ty.short(), names)
            })
            .collect();
    });
}

/// Polls the folder; loads it when its fingerprint changes.
async fn watch_dir(
    config: ServerConfig,
    tx: std::sync::Weak<watch::Sender<Arc<Loaded>>>,
    shared: Arc<Shared>,
) {
    let mut seen = files::fingerprint(&config.dir).ok();
    let mut ticker = tokio::time::interval(config.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Every handle of the control plane is gone: stop watching.
        let Some(tx) = tx.upgrade() else {
            return;
        };
        let now_seen = files::fingerprint(&config.dir).ok();
        if now_seen == seen {
            continue;
        }
        seen = now_seen;
        let dir = config.dir.clone();
        let check = config.check;
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || files::load_dir(&dir, check)).await;
        let took_ms = started.elapsed().as_millis();
        match result {
            Ok(Ok(loaded)) => {
                if loaded.version == tx.borrow().version {
                    shared.metrics.reload("unchanged");
                    continue;
                }
                for w in &loaded.warnings {
                    warn!(dir = %config.dir.display(), "ignored: {w}");
                }
                info!(dir = %config.dir.display(), version = %loaded.version, took_ms, "reloaded");
                shared.metrics.reload("ok");
                record_loaded(&shared, &loaded);
                tx.send_replace(Arc::new(loaded));
            }
            Ok(Err(e)) => {
                warn!(dir = %config.dir.display(), error = %e, took_ms, "reload failed; the previous resources keep serving");
                shared.metrics.reload("error");
                shared.set(|s| {
                    s.reload_errors += 1;
                    s.last_error = Some(e.to_string());
                });
            }
            Err(e) => warn!(error = %e, "reload task failed"),
        }
    }
}

type Outbox<T> = mpsc::Sender<Result<T, GrpcStatus>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for ControlPlane {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, GrpcStatus>>;
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, GrpcStatus>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, GrpcStatus> {
        let id = self.open_stream(request.remote_addr(), "sotw");
        let (tx, rx) = mpsc::channel(16);
        let stream = SotwStream {
            id,
            cp: self.clone(),
            tx,
            watches: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(run_stream(stream, request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, GrpcStatus> {
        let id = self.open_stream(request.remote_addr(), "delta");
        let (tx, rx) = mpsc::channel(16);
        let stream = DeltaStream {
            id,
            cp: self.clone(),
            tx,
            watches: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(run_stream(stream, request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Closes a stream's bookkeeping when its task ends, however it ends.
struct StreamGuard {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared.metrics.streams.dec();
        let id = self.id;
        self.shared.set(|s| s.clients.retain(|c| c.stream != id));
    }
}

/// Records the client's identity from the first request that carries it.
fn identify(shared: &Shared, id: u64, node: Option<&Node>) {
    if let Some(node) = node {
        shared.client(id, |c| {
            if c.node.is_empty() {
                c.node.clone_from(&node.id);
                c.cluster.clone_from(&node.cluster);
            }
        });
    }
}

/// A client's ACK or NACK of what it was sent.
fn acknowledge(
    shared: &Shared,
    id: u64,
    ty: ResourceType,
    version: &str,
    nonce: &str,
    error: Option<&str>,
) {
    let node = shared
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clients
        .iter()
        .find(|c| c.stream == id)
        .map(|c| c.node.clone())
        .unwrap_or_default();
    match error {
        Some(reason) => {
            warn!(stream = id, node = %node, r#type = %ty, nonce, reason, "client rejected the resources (NACK)");
            ServerMetrics::typed(&shared.metrics.nacks, ty);
            shared.client(id, |c| {
                let t = c.types.entry(ty.short()).or_default();
                t.nacks += 1;
                t.last_nack = Some(reason.to_owned());
            });
        }
        None => {
            debug!(stream = id, node = %node, r#type = %ty, version, "ACK");
            shared.client(id, |c| {
                c.types.entry(ty.short()).or_default().acked = version.to_owned();
            });
        }
    }
}

/// What differs between the two ADS variants on one stream.
trait Variant: Send + 'static {
    type Request: Send + 'static;
    fn id(&self) -> u64;
    fn control_plane(&self) -> &ControlPlane;
    /// A request from the client, against the set being served.
    fn on_request(
        &mut self,
        req: Self::Request,
        current: &Loaded,
    ) -> impl Future<Output = Result<(), ()>> + Send;
    /// The served set changed: send what is due, in [`PUSH_ORDER`].
    fn on_change(&mut self, current: &Loaded) -> impl Future<Output = Result<(), ()>> + Send;
}

/// Runs one stream until the client ends it, it fails, or the control plane stops; an
/// `Err` from the variant means the client is gone.
async fn run_stream<V: Variant>(mut v: V, mut inbound: Streaming<V::Request>) {
    let _guard = StreamGuard {
        id: v.id(),
        shared: v.control_plane().shared.clone(),
    };
    let mut served = v.control_plane().served.subscribe();
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let current = served.borrow().clone();
                    if v.on_request(req, &current).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(stream = v.id(), error = %e, "stream ended");
                    return;
                }
            },
            changed = served.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = served.borrow_and_update().clone();
                if v.on_change(&current).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Variant for SotwStream {
    type Request = DiscoveryRequest;

    fn id(&self) -> u64 {
        self.id
    }

    fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    async fn on_request(&mut self, req: DiscoveryRequest, current: &Loaded) -> Result<(), ()> {
        self.handle(req, current).await
    }

    async fn on_change(&mut self, current: &Loaded) -> Result<(), ()> {
        for ty in PUSH_ORDER {
            let due = self
                .watches
                .get(&ty)
                .is_some_and(|w| w.sent.as_deref() != Some(current.type_version(ty)));
            if due {
                self.respond(ty, current).await?;
            }
        }
        Ok(())
    }
}

impl Variant for DeltaStream {
    type Request = DeltaDiscoveryRequest;

    fn id(&self) -> u64 {
        self.id
    }

    fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest, current: &Loaded) -> Result<(), ()> {
        self.handle(req, current).await
    }

    async fn on_change(&mut self, current: &Loaded) -> Result<(), ()> {
        for ty in PUSH_ORDER {
            if self.watches.contains_key(&ty) {
                self.respond(ty, current).await?;
            }
        }
        Ok(())
    }
}

/// State of the world, per type.
#[derive(Default)]
struct SotwWatch {
    /// `None`: everything (wildcard).
    names: Option<BTreeSet<String>>,
    sent: Option<String>,
    nonce: String,
    /// Whether the client has answered `nonce` (ACK or NACK) already.
    answered: bool,
}

struct SotwStream {
    id: u64,
    cp: ControlPlane,
    tx: Outbox<DiscoveryResponse>,
    watches: BTreeMap<ResourceType, SotwWatch>,
    nonce: u64,
}

impl SotwStream {
    async fn handle(&mut self, req: DiscoveryRequest, current: &Loaded) -> Result<(), ()> {
        let shared = &self.cp.shared;
        identify(shared, self.id, req.node.as_ref());
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            warn!(stream = self.id, type_url = %req.type_url, "request for a type this control plane does not serve");
            return Ok(());
        };
        let first = !self.watches.contains_key(&ty);
        let w = self.watches.entry(ty).or_default();
        // A second request with a nonce the client has answered already asks again for
        // what it holds: Envoy does this for EDS when a modified cluster warms (it waits for
        // a ClusterLoadAssignment even when the endpoints did not change, see "Resource
        // warming" in the xDS protocol), with the same names, version and nonce as its ACK.
        let mut asked_again = false;
        // Nonces belong to a stream: one from an earlier stream on a first request is
        // treated as no nonce (the request is this stream's initial one).
        if !first && !req.response_nonce.is_empty() {
            if req.response_nonce != w.nonce {
                debug!(stream = self.id, r#type = %ty, nonce = %req.response_nonce, "stale nonce; ignored");
                return Ok(());
            }
            if w.answered {
                asked_again = true;
                debug!(stream = self.id, r#type = %ty, nonce = %req.response_nonce, "asked again with an answered nonce");
            } else {
                w.answered = true;
                acknowledge(
                    shared,
                    self.id,
                    ty,
                    &req.version_info,
                    &req.response_nonce,
                    req.error_detail.as_ref().map(|e| e.message.as_str()),
                );
            }
        }
        let names = if ty.is_wildcard()
            && (req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"))
        {
            None
        } else {
            Some(req.resource_names.iter().cloned().collect())
        };
        let names_changed = first || w.names != names;
        w.names = names;
        let due = if first {
            // A client resuming with the version being served holds it already.
            req.version_info.is_empty() || req.version_info != current.type_version(ty)
        } else {
            (names_changed || asked_again) && req.error_detail.is_none()
        };
        if first && !due {
            w.sent = Some(req.version_info.clone());
        }
        if due {
            self.respond(ty, current).await?;
        }
        Ok(())
    }

    async fn respond(&mut self, ty: ResourceType, current: &Loaded) -> Result<(), ()> {
        let Some(w) = self.watches.get_mut(&ty) else {
            return Ok(());
        };
        let resources = current
            .set
            .of(ty)
            .filter(|r| w.names.as_ref().is_none_or(|n| n.contains(&r.name)))
            .map(|r| r.any.clone())
            .collect();
        self.nonce += 1;
        w.nonce = self.nonce.to_string();
        w.answered = false;
        let version = current.type_version(ty).to_owned();
        w.sent = Some(version.clone());
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: ty.type_url().to_owned(),
            nonce: w.nonce.clone(),
            control_plane: Some(ControlPlaneId {
                identifier: IDENTIFIER.to_owned(),
            }),
            ..Default::default()
        };
        sent(&self.cp.shared, self.id, ty, &version);
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}

/// The ClusterLoadAssignment name an EDS cluster takes its endpoints from.
fn eds_name(any: &envoy_types::pb::google::protobuf::Any) -> Option<String> {
    use envoy_types::pb::envoy::config::cluster::v3::{
        Cluster,
        cluster::{ClusterDiscoveryType, DiscoveryType},
    };
    use prost::Message as _;
    let cluster = Cluster::decode(any.value.as_slice()).ok()?;
    let eds = cluster.eds_cluster_config?;
    let is_eds = matches!(cluster.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
    if !is_eds {
        return None;
    }
    Some(if eds.service_name.is_empty() {
        cluster.name
    } else {
        eds.service_name
    })
}

fn sent(shared: &Shared, id: u64, ty: ResourceType, version: &str) {
    ServerMetrics::typed(&shared.metrics.responses, ty);
    shared.client(id, |c| {
        let t = c.types.entry(ty.short()).or_default();
        t.sent = version.to_owned();
        t.responses += 1;
    });
}

/// Incremental, per type.
#[derive(Default)]
struct DeltaWatch {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: name → version.
    known: HashMap<String, String>,
    nonce: String,
    /// The `system_version_info` sent with `nonce`: what an ACK of it acknowledges.
    nonce_version: String,
}

struct DeltaStream {
    id: u64,
    cp: ControlPlane,
    tx: Outbox<DeltaDiscoveryResponse>,
    watches: BTreeMap<ResourceType, DeltaWatch>,
    nonce: u64,
}

impl DeltaStream {
    async fn handle(&mut self, req: DeltaDiscoveryRequest, current: &Loaded) -> Result<(), ()> {
        let shared = &self.cp.shared;
        identify(shared, self.id, req.node.as_ref());
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            warn!(stream = self.id, type_url = %req.type_url, "request for a type this control plane does not serve");
            return Ok(());
        };
        let first = !self.watches.contains_key(&ty);
        let w = self.watches.entry(ty).or_default();
        if first {
            w.known = req.initial_resource_versions.clone();
            // Legacy wildcard: a first request for a wildcard type that names nothing.
            w.wildcard = ty.is_wildcard() && req.resource_names_subscribe.is_empty();
        }
        if !req.response_nonce.is_empty() {
            if req.response_nonce == w.nonce {
                acknowledge(
                    shared,
                    self.id,
                    ty,
                    &w.nonce_version,
                    &req.response_nonce,
                    req.error_detail.as_ref().map(|e| e.message.as_str()),
                );
            } else {
                debug!(stream = self.id, r#type = %ty, nonce = %req.response_nonce, "stale nonce");
            }
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                w.wildcard = true;
            } else {
                w.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                w.wildcard = false;
            } else {
                w.names.remove(&name);
                w.known.remove(&name);
            }
        }
        self.respond(ty, current).await
    }

    /// Sends what the client lacks of `ty`, if anything.
    async fn respond(&mut self, ty: ResourceType, current: &Loaded) -> Result<(), ()> {
        let Some(w) = self.watches.get_mut(&ty) else {
            return Ok(());
        };
        let mut resources = Vec::new();
        let mut rebuilt = Vec::new();
        for r in current.set.of(ty) {
            if !(w.wildcard || w.names.contains(&r.name)) {
                continue;
            }
            if w.known.get(&r.name) == Some(&r.version) {
                continue;
            }
            if ty == ResourceType::Cluster && w.known.contains_key(&r.name) {
                rebuilt.extend(eds_name(&r.any));
            }
            w.known.insert(r.name.clone(), r.version.clone());
            resources.push(WireResource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            });
        }
        let removed: Vec<String> = w
            .known
            .keys()
            .filter(|n| current.set.get(ty, n).is_none())
            .cloned()
            .collect();
        for n in &removed {
            w.known.remove(n);
        }
        // A client rebuilds a modified EDS cluster and keeps it warming until it receives
        // its ClusterLoadAssignment again ("Resource warming" in the xDS protocol), and a
        // delta client has no way to ask for what it is subscribed to already: send the
        // endpoints of every modified cluster again, right after the clusters (PUSH_ORDER).
        if let Some(eds) = self.watches.get_mut(&ResourceType::Endpoints) {
            for name in &rebuilt {
                eds.known.remove(name);
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let Some(w) = self.watches.get_mut(&ty) else {
            return Ok(());
        };
        self.nonce += 1;
        w.nonce = self.nonce.to_string();
        w.nonce_version.clone_from(&current.version);
        sent(&self.cp.shared, self.id, ty, &current.version);
        let resp = DeltaDiscoveryResponse {
            system_version_info: current.version.clone(),
            resources,
            type_url: ty.type_url().to_owned(),
            removed_resources: removed,
            nonce: w.nonce.clone(),
            control_plane: Some(ControlPlaneId {
                identifier: IDENTIFIER.to_owned(),
            }),
            ..Default::default()
        };
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
