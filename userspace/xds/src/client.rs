//! The ADS client: follows one aggregated control plane and publishes a snapshot each time
//! the resources it holds form a complete, valid configuration.
//!
//! # Protocol
//! - One stream, state of the world (`StreamAggregatedResources`) or incremental
//!   (`DeltaAggregatedResources`), chosen by the bootstrap's `ads_config.api_type`.
//! - CDS and LDS are wildcard subscriptions; EDS names follow the EDS clusters held, RDS
//!   names the listeners' `rds.route_config_name`s. Names no longer referenced are
//!   unsubscribed and their resources dropped.
//! - Every response is applied to a copy of the last accepted resources and the copy is
//!   translated whole (with the bootstrap's static resources). Errors: NACK with the
//!   translation's messages (each names the resource and the field) as `error_detail`, and
//!   the last accepted resources stay. No errors: ACK. A batch is never half applied.
//! - Warming: a snapshot is published only when every route configuration the listeners
//!   name has arrived, and every EDS cluster's assignment has arrived or the bootstrap's
//!   `initial_fetch_timeout` (Envoy's default: 15 s) has passed since it was asked for.
//!   Clusters therefore always arrive before the listeners that use them take traffic.
//! - Disconnects: the data path keeps the last published snapshot; the client reconnects with
//!   jittered exponential backoff and resumes: state of the world with the last accepted
//!   `version_info` per type, delta with `initial_resource_versions`.
//! - Bad input (undecodable, unnamed, wrongly typed or oversized resources, unknown type
//!   URLs) is NACKed with the reason, logged with the type and nonce, counted in
//!   `nodemesh_xds_updates_total{result="nack"}`, and kept in [`Status`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    google::rpc::Status as RpcStatus,
};
use nodemesh_config::{
    AdsSource,
    model::{Discovery, NetworkFilter, RouteSource, Snapshot},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::types::{Resource, ResourceSet, ResourceType};

/// The types this client subscribes to, in warming order.
const TYPES: [ResourceType; 5] = [
    ResourceType::Cluster,
    ResourceType::Endpoints,
    ResourceType::Listener,
    ResourceType::Route,
    ResourceType::Secret,
];

/// gRPC's INVALID_ARGUMENT, the code Envoy puts in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// What the client needs besides the control plane's address.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The control plane, `host:port` (the first endpoint of the bootstrap's ADS cluster; a
    /// name is resolved at each connect).
    pub server: String,
    pub ads: AdsSource,
    /// The bootstrap's static resources (the ADS cluster among them); every snapshot has them.
    pub base: nodemesh_config::Resources,
    /// A resource larger than this is refused (NACK), like a response over gRPC's limit.
    pub max_resource_bytes: usize,
    /// Largest gRPC message accepted on the stream.
    pub max_message_bytes: usize,
    pub backoff: Backoff,
}

impl ClientConfig {
    /// The configuration of a bootstrap's `dynamic_resources`, the control plane found in its
    /// static ADS cluster.
    pub fn from_bootstrap(base: nodemesh_config::Resources) -> anyhow::Result<Self> {
        let translated = nodemesh_config::translate_bootstrap(&base);
        let snapshot = translated.snapshot.ok_or_else(|| {
            anyhow::anyhow!(
                "the bootstrap's static resources: {}",
                translated.diagnostics.errors.join("; ")
            )
        })?;
        Self::from_translated_bootstrap(base, &snapshot)
    }

    /// [`Self::from_bootstrap`], with `snapshot` the translation of `base`'s static
    /// resources, already made.
    pub(crate) fn from_translated_bootstrap(
        base: nodemesh_config::Resources,
        snapshot: &Snapshot,
    ) -> anyhow::Result<Self> {
        let ads = base
            .ads
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the bootstrap has no dynamic_resources.ads_config"))?;
        let cluster = snapshot.clusters.get(&ads.cluster).ok_or_else(|| {
            anyhow::anyhow!(
                "ads_config names cluster {:?}, which is not in static_resources",
                ads.cluster
            )
        })?;
        let server = match &cluster.discovery {
            Discovery::Static(endpoints) => endpoints.first().map(|e| e.address.to_string()),
            Discovery::StrictDns { names, .. } => names
                .first()
                .map(|(host, port, _)| format!("{host}:{port}")),
            _ => None,
        }
        .ok_or_else(|| {
            anyhow::anyhow!(
                "ADS cluster {:?} must be STATIC or STRICT_DNS with at least one endpoint",
                ads.cluster
            )
        })?;
        Ok(Self::new(server, ads, base))
    }

    /// Follows the control plane at `authority` (`host:port`) over ADS, state of the world,
    /// as `node_id`, on top of `base`: the agent's `control_plane` setting.
    pub fn for_control_plane(
        authority: &str,
        node_id: String,
        base: nodemesh_config::Resources,
    ) -> Self {
        let ads = AdsSource {
            cluster: String::new(),
            delta: false,
            node: envoy_types::pb::envoy::config::core::v3::Node {
                id: node_id,
                cluster: "nodemesh".into(),
                ..Default::default()
            },
            node_on_first_message_only: false,
            initial_fetch_timeout: Duration::from_secs(15),
        };
        Self::new(authority.to_owned(), ads, base)
    }

    fn new(server: String, ads: AdsSource, base: nodemesh_config::Resources) -> Self {
        Self {
            server,
            ads,
            base,
            max_resource_bytes: 4 << 20,
            max_message_bytes: 64 << 20,
            backoff: Backoff::default(),
        }
    }
}

/// Reconnect delays: exponential from `base` to `max`, each with ±50 % jitter so that the
/// proxies of a cluster do not reconnect in step after a control-plane restart.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0 is the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
            .min(self.max);
        exp.mul_f64(0.5 + fastrand::f64())
    }
}

/// What the client shows on the admin port and in `nodemesh status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub server: String,
    /// `sotw` or `delta`.
    pub variant: &'static str,
    /// `connecting`, `connected` or `disconnected`.
    pub state: &'static str,
    pub last_error: Option<String>,
    pub connects: u64,
    /// Snapshots published.
    pub published: u64,
    /// Unix seconds of the last published snapshot.
    pub last_published: Option<u64>,
    /// What a complete snapshot still waits for (`rds/NAME`, `eds/NAME`).
    pub warming: Vec<String>,
    /// What the published configuration ignores or answers locally, once each.
    pub warnings: Vec<String>,
    /// By type (`cds`, `eds`, `lds`, `rds`, `sds`).
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// The last accepted version (state of the world: `version_info`; delta: the
    /// response's `system_version_info`).
    pub version: String,
    pub resources: usize,
    pub subscribed: Vec<String>,
    pub acks: u64,
    pub nacks: u64,
    /// Unix seconds of the last accepted update.
    pub last_update: Option<u64>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub at: u64,
    pub version: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeResult {
    r#type: String,
    result: String,
}

/// The client's metrics (`nodemesh_xds_*`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    updates: Family<TypeResult, Counter>,
    connects: Counter,
    connected: Gauge,
}

/// A handle on a running client.
#[derive(Debug, Clone)]
pub struct Client {
    status: Arc<Mutex<Status>>,
    /// What the last published snapshot was made of.
    published: Published,
    base: Arc<nodemesh_config::Resources>,
}

type Published = Arc<Mutex<Arc<ResourceSet>>>;

impl Client {
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configuration being served, as an Envoy config dump.
    pub fn config_dump(&self) -> serde_json::Value {
        let published = self
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        crate::dump::config_dump(&self.base, &published)
    }
}

impl nodemesh_http::ConfigSource for Client {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(Client::status(self)).unwrap_or_default()
    }

    fn config_dump(&self) -> serde_json::Value {
        Client::config_dump(self)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts following the control plane. `apply` receives every complete snapshot and is
/// awaited before the update that produced it is ACKed. Runs until the runtime stops.
pub fn spawn<F, Fut>(config: ClientConfig, metrics: Metrics, apply: F) -> Client
where
    F: FnMut(Snapshot) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let status = Arc::new(Mutex::new(Status {
        server: config.server.to_string(),
        variant: if config.ads.delta { "delta" } else { "sotw" },
        state: "connecting",
        ..Status::default()
    }));
    let published = Published::default();
    let client = Client {
        status: status.clone(),
        published: published.clone(),
        base: Arc::new(config.base.clone()),
    };
    let state = State::new(config, status, metrics, apply, published);
    tokio::spawn(run(state));
    client
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("nodemesh_xds");
        sub.register(
            "updates",
            "xDS responses by type and result (ack, nack)",
            metrics.updates.clone(),
        );
        sub.register(
            "connects",
            "Streams opened to the control plane",
            metrics.connects.clone(),
        );
        sub.register(
            "connected",
            "1 while a stream to the control plane is up",
            metrics.connected.clone(),
        );
        metrics
    }
}

async fn run<F, Fut>(mut state: State<F>)
where
    F: FnMut(Snapshot) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut attempt = 0u32;
    loop {
        state.set(|s| s.state = "connecting");
        let outcome = state.session().await;
        state.metrics.connected.set(0);
        let progressed = state.responses_this_session > 0;
        let error = match outcome {
            Ok(()) => "the control plane closed the stream".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        warn!(server = %state.config.server, error = %error, "xDS stream ended; serving the last good configuration");
        state.set(|s| {
            s.state = "disconnected";
            s.last_error = Some(error.clone());
        });
        if progressed {
            attempt = 0;
        }
        let delay = state.config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        debug!(?delay, attempt, "reconnecting to the control plane");
        tokio::time::sleep(delay).await;
    }
}

/// Everything that outlives one stream.
struct State<F> {
    config: ClientConfig,
    status: Arc<Mutex<Status>>,
    metrics: Metrics,
    apply: F,
    /// The last accepted dynamic resources.
    accepted: Arc<ResourceSet>,
    /// The translation of `accepted`, when nothing changed it since: published as it is
    /// instead of translating the same resources twice.
    translated: Option<(Snapshot, BTreeSet<String>)>,
    /// Per type: the last accepted version, the last nonce seen, the names asked for.
    versions: HashMap<ResourceType, String>,
    nonces: HashMap<ResourceType, String>,
    subscribed: HashMap<ResourceType, BTreeSet<String>>,
    /// When EDS names were first asked for, for `initial_fetch_timeout`.
    asked: HashMap<String, tokio::time::Instant>,
    /// Whether what `accepted` makes has been published.
    published_current: bool,
    responses_this_session: u64,
    /// The warnings of the last published snapshot (logged when new).
    warned: BTreeSet<String>,
    /// What the last published snapshot was made of, for the config dump.
    published: Published,
}

/// A request to send on whichever stream is open.
enum Out {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

impl<F, Fut> State<F>
where
    F: FnMut(Snapshot) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn new(
        config: ClientConfig,
        status: Arc<Mutex<Status>>,
        metrics: Metrics,
        apply: F,
        published: Published,
    ) -> Self {
        Self {
            published,
            config,
            status,
            metrics,
            apply,
            accepted: Arc::default(),
            translated: None,
            versions: HashMap::new(),
            nonces: HashMap::new(),
            subscribed: HashMap::new(),
            asked: HashMap::new(),
            published_current: false,
            responses_this_session: 0,
            warned: BTreeSet::new(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn delta(&self) -> bool {
        self.config.ads.delta
    }

    async fn session(&mut self) -> anyhow::Result<()> {
        self.responses_this_session = 0;
        let uri = format!("http://{}", self.config.server);
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect()
            .await?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes);
        self.metrics.connects.inc();
        let (tx, rx) = mpsc::channel::<Out>(64);
        let mut first = true;
        for ty in TYPES {
            if ty.is_wildcard() || self.subscribed.get(&ty).is_some_and(|s| !s.is_empty()) {
                let req = self.initial(ty, first);
                first = false;
                tx.send(req).await?;
            }
        }
        if self.delta() {
            let (dtx, drx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
            tokio::spawn(forward(rx, dtx, |o| match o {
                Out::Delta(d) => Some(d),
                Out::Sotw(_) => None,
            }));
            let mut stream = grpc
                .delta_aggregated_resources(ReceiverStream::new(drx))
                .await?
                .into_inner();
            self.connected();
            loop {
                tokio::select! {
                    msg = stream.message() => match msg? {
                        Some(resp) => self.on_delta(resp, &tx).await?,
                        None => return Ok(()),
                    },
                    () = sleep_until(self.warming_deadline()) => self.publish_if_ready().await,
                }
            }
        } else {
            let (stx, srx) = mpsc::channel::<DiscoveryRequest>(64);
            tokio::spawn(forward(rx, stx, |o| match o {
                Out::Sotw(s) => Some(s),
                Out::Delta(_) => None,
            }));
            let mut stream = grpc
                .stream_aggregated_resources(ReceiverStream::new(srx))
                .await?
                .into_inner();
            self.connected();
            loop {
                tokio::select! {
                    msg = stream.message() => match msg? {
                        Some(resp) => self.on_sotw(resp, &tx).await?,
                        None => return Ok(()),
                    },
                    () = sleep_until(self.warming_deadline()) => self.publish_if_ready().await,
                }
            }
        }
    }

    fn connected(&self) {
        self.metrics.connected.set(1);
        info!(server = %self.config.server, variant = if self.delta() { "delta" } else { "sotw" }, "xDS stream open");
        self.set(|s| {
            s.state = "connected";
            s.connects += 1;
        });
    }

    /// The first request of a type on a new stream: resumes from what is held.
    fn initial(&self, ty: ResourceType, first: bool) -> Out {
        let node = (first || !self.config.ads.node_on_first_message_only)
            .then(|| self.config.ads.node.clone());
        let names: Vec<String> = if ty.is_wildcard() {
            Vec::new()
        } else {
            self.subscribed
                .get(&ty)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default()
        };
        if self.delta() {
            Out::Delta(DeltaDiscoveryRequest {
                node,
                type_url: ty.type_url().to_owned(),
                resource_names_subscribe: if ty.is_wildcard() {
                    vec!["*".to_owned()]
                } else {
                    names
                },
                initial_resource_versions: self
                    .accepted
                    .of(ty)
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect(),
                ..Default::default()
            })
        } else {
            Out::Sotw(DiscoveryRequest {
                node,
                type_url: ty.type_url().to_owned(),
                version_info: self.versions.get(&ty).cloned().unwrap_or_default(),
                resource_names: names,
                ..Default::default()
            })
        }
    }

    fn node_if_needed(&self) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        (!self.config.ads.node_on_first_message_only).then(|| self.config.ads.node.clone())
    }

    async fn on_sotw(
        &mut self,
        resp: DiscoveryResponse,
        tx: &mpsc::Sender<Out>,
    ) -> anyhow::Result<()> {
        self.responses_this_session += 1;
        let Some(ty) = ResourceType::from_type_url(&resp.type_url) else {
            tx.send(self.refuse_unknown_type(&resp.type_url, &resp.nonce))
                .await?;
            return Ok(());
        };
        self.nonces.insert(ty, resp.nonce.clone());
        let decoded: Result<Vec<Resource>, String> = resp
            .resources
            .into_iter()
            .map(|any| {
                Resource::decode(ty, any, &resp.version_info, self.config.max_resource_bytes)
                    .map_err(|e| e.to_string())
            })
            .collect();
        let outcome = decoded.and_then(|resources| {
            let mut candidate = (*self.accepted).clone();
            candidate.replace(ty, resources);
            self.check(candidate)
        });
        let ack_version = match &outcome {
            Ok(_) => resp.version_info.clone(),
            Err(_) => self.versions.get(&ty).cloned().unwrap_or_default(),
        };
        let error_detail = self.record(ty, &resp.version_info, &resp.nonce, outcome.as_ref().err());
        if let Ok(checked) = outcome {
            self.versions.insert(ty, resp.version_info.clone());
            self.after_accept(checked, tx).await?;
        }
        tx.send(Out::Sotw(DiscoveryRequest {
            node: self.node_if_needed(),
            type_url: ty.type_url().to_owned(),
            version_info: ack_version,
            response_nonce: resp.nonce,
            resource_names: self.names(ty),
            error_detail,
            ..Default::default()
        }))
        .await?;
        Ok(())
    }

    async fn on_delta(
        &mut self,
        resp: DeltaDiscoveryResponse,
        tx: &mpsc::Sender<Out>,
    ) -> anyhow::Result<()> {
        self.responses_this_session += 1;
        let Some(ty) = ResourceType::from_type_url(&resp.type_url) else {
            tx.send(self.refuse_unknown_type(&resp.type_url, &resp.nonce))
                .await?;
            return Ok(());
        };
        self.nonces.insert(ty, resp.nonce.clone());
        let mut candidate = (*self.accepted).clone();
        let mut outcome = Ok(());
        for r in resp.resources {
            let Some(any) = r.resource else {
                // A resource without a body is the server saying "you have it" (delta allows
                // that for versions the client announced); nothing to apply.
                continue;
            };
            match Resource::decode(ty, any, &r.version, self.config.max_resource_bytes) {
                Ok(mut res) => {
                    if !r.name.is_empty() && r.name != res.name {
                        outcome = Err(format!(
                            "{ty} resource {:?} carries a resource named {:?}",
                            r.name, res.name
                        ));
                        break;
                    }
                    res.version = r.version;
                    candidate.insert(ty, res);
                }
                Err(e) => {
                    outcome = Err(format!("{ty} resource {:?}: {e}", r.name));
                    break;
                }
            }
        }
        for name in &resp.removed_resources {
            candidate.remove(ty, name);
        }
        let outcome = outcome.and_then(|()| self.check(candidate));
        let error_detail = self.record(
            ty,
            &resp.system_version_info,
            &resp.nonce,
            outcome.as_ref().err(),
        );
        if let Ok(checked) = outcome {
            self.versions.insert(ty, resp.system_version_info.clone());
            self.after_accept(checked, tx).await?;
        }
        tx.send(Out::Delta(DeltaDiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        }))
        .await?;
        Ok(())
    }

    /// Translates a candidate set with the bootstrap's static resources.
    fn check(&self, resources: ResourceSet) -> Result<Checked, String> {
        let started = std::time::Instant::now();
        let translated = nodemesh_config::translate(&resources.to_config(&self.config.base));
        debug!(
            took_us = started.elapsed().as_micros(),
            "candidate translated"
        );
        match translated.snapshot {
            Some(snapshot) => Ok(Checked {
                resources,
                snapshot,
                missing_routes: translated.missing_routes,
            }),
            None => Err(translated.diagnostics.errors.join("; ")),
        }
    }

    /// The NACK of a response of a type nodemesh does not subscribe to (logged, counted).
    fn refuse_unknown_type(&self, type_url: &str, nonce: &str) -> Out {
        let reason = format!("type {type_url:?} is not one nodemesh subscribes to");
        warn!(nonce, "{reason}");
        self.metrics
            .updates
            .get_or_create(&TypeResult {
                r#type: "unknown".to_owned(),
                result: "nack".to_owned(),
            })
            .inc();
        let error_detail = Some(rpc_error(&reason));
        if self.delta() {
            Out::Delta(DeltaDiscoveryRequest {
                type_url: type_url.to_owned(),
                response_nonce: nonce.to_owned(),
                error_detail,
                ..Default::default()
            })
        } else {
            Out::Sotw(DiscoveryRequest {
                node: self.node_if_needed(),
                type_url: type_url.to_owned(),
                response_nonce: nonce.to_owned(),
                error_detail,
                ..Default::default()
            })
        }
    }

    /// Counts, logs and keeps the outcome of one response; the `error_detail` of its reply.
    fn record(
        &self,
        ty: ResourceType,
        version: &str,
        nonce: &str,
        error: Option<&String>,
    ) -> Option<RpcStatus> {
        let result = if error.is_some() { "nack" } else { "ack" };
        self.metrics
            .updates
            .get_or_create(&TypeResult {
                r#type: ty.short().to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.set(|s| {
            let t = s.types.entry(ty.short()).or_default();
            match error {
                Some(reason) => {
                    t.nacks += 1;
                    t.last_nack = Some(Nack {
                        at: now(),
                        version: version.to_owned(),
                        reason: reason.clone(),
                    });
                }
                None => {
                    t.acks += 1;
                    t.version = version.to_owned();
                    t.last_update = Some(now());
                }
            }
        });
        match error {
            Some(reason) => {
                warn!(r#type = %ty, version, nonce, reason = %reason, "xDS update rejected (NACK); the last good configuration keeps serving");
                Some(rpc_error(reason))
            }
            None => {
                debug!(r#type = %ty, version, nonce, "xDS update accepted");
                None
            }
        }
    }

    /// After an accepted update: follow the names it references, drop what nothing
    /// references any more, and publish if nothing is warming.
    async fn after_accept(
        &mut self,
        checked: Checked,
        tx: &mpsc::Sender<Out>,
    ) -> anyhow::Result<()> {
        let Checked {
            resources,
            snapshot,
            missing_routes,
        } = checked;
        self.accepted = Arc::new(resources);
        self.published_current = false;
        let mut wanted: HashMap<ResourceType, BTreeSet<String>> = HashMap::new();
        let eds = wanted.entry(ResourceType::Endpoints).or_default();
        for c in snapshot.clusters.values() {
            if let Discovery::Eds { service_name, .. } = &c.discovery {
                eds.insert(service_name.clone());
            }
        }
        let rds = wanted.entry(ResourceType::Route).or_default();
        for l in &snapshot.listeners {
            for chain in l.filter_chains.iter().chain(l.default_chain.iter()) {
                if let NetworkFilter::Http(h) = &chain.filter
                    && let RouteSource::Named(name) = &h.routes
                {
                    rds.insert(name.clone());
                }
            }
        }
        self.translated = Some((snapshot, missing_routes));
        let base = &self.config.base;
        let holders = base
            .clusters
            .iter()
            .chain(&base.listeners)
            .chain(self.accepted.of(ResourceType::Cluster).map(|r| &r.message))
            .chain(self.accepted.of(ResourceType::Listener).map(|r| &r.message));
        wanted.insert(ResourceType::Secret, crate::refs::secret_names(holders));
        for (ty, names) in wanted {
            let old = self.subscribed.get(&ty).cloned().unwrap_or_default();
            if old == names {
                continue;
            }
            // What nothing references any more goes now; it cannot be asked for again
            // without a new reference.
            if self.accepted.of(ty).any(|r| !names.contains(&r.name)) {
                Arc::make_mut(&mut self.accepted).retain(ty, |n| names.contains(n));
                self.translated = None;
            }
            let added: Vec<String> = names.difference(&old).cloned().collect();
            let removed: Vec<String> = old.difference(&names).cloned().collect();
            let asked_at = tokio::time::Instant::now();
            for n in &added {
                if ty == ResourceType::Endpoints {
                    self.asked.entry(n.clone()).or_insert(asked_at);
                }
            }
            for n in &removed {
                self.asked.remove(n);
            }
            self.subscribed.insert(ty, names.clone());
            let names_vec: Vec<String> = names.iter().cloned().collect();
            self.set(|s| s.types.entry(ty.short()).or_default().subscribed = names_vec.clone());
            let req = if self.delta() {
                Out::Delta(DeltaDiscoveryRequest {
                    node: self.node_if_needed(),
                    type_url: ty.type_url().to_owned(),
                    resource_names_subscribe: added,
                    resource_names_unsubscribe: removed,
                    ..Default::default()
                })
            } else {
                Out::Sotw(DiscoveryRequest {
                    node: self.node_if_needed(),
                    type_url: ty.type_url().to_owned(),
                    version_info: self.versions.get(&ty).cloned().unwrap_or_default(),
                    response_nonce: self.nonces.get(&ty).cloned().unwrap_or_default(),
                    resource_names: names_vec,
                    ..Default::default()
                })
            };
            tx.send(req).await?;
        }
        let counts: Vec<(ResourceType, usize)> =
            TYPES.iter().map(|t| (*t, self.accepted.len(*t))).collect();
        self.set(|s| {
            for (ty, n) in counts {
                s.types.entry(ty.short()).or_default().resources = n;
            }
        });
        self.publish_if_ready().await;
        Ok(())
    }

    fn names(&self, ty: ResourceType) -> Vec<String> {
        if ty.is_wildcard() {
            return Vec::new();
        }
        self.subscribed
            .get(&ty)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// What a complete snapshot still waits for; EDS names whose `initial_fetch_timeout`
    /// has passed no longer count.
    fn warming(&self) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let timeout = self.config.ads.initial_fetch_timeout;
        let mut out = Vec::new();
        for (ty, names) in &self.subscribed {
            // Secrets are held for the TLS a later version terminates; nothing waits on them.
            if *ty == ResourceType::Secret {
                continue;
            }
            for n in names {
                if self.accepted.get(*ty, n).is_some() {
                    continue;
                }
                if *ty == ResourceType::Endpoints
                    && !timeout.is_zero()
                    && self
                        .asked
                        .get(n)
                        .is_some_and(|t| now.duration_since(*t) >= timeout)
                {
                    continue;
                }
                out.push(format!("{ty}/{n}"));
            }
        }
        out.sort();
        out
    }

    /// When the oldest EDS name still warming reaches its fetch timeout.
    fn warming_deadline(&self) -> Option<tokio::time::Instant> {
        let timeout = self.config.ads.initial_fetch_timeout;
        let pending = self
            .subscribed
            .get(&ResourceType::Endpoints)
            .into_iter()
            .flatten()
            .filter(|n| self.accepted.get(ResourceType::Endpoints, n).is_none())
            .filter_map(|n| self.asked.get(n))
            .map(|t| *t + timeout)
            .filter(|d| *d > tokio::time::Instant::now())
            .min();
        pending.filter(|_| !self.published_current && !timeout.is_zero())
    }

    async fn publish_if_ready(&mut self) {
        let warming = self.warming();
        self.set(|s| s.warming = warming.clone());
        if self.published_current {
            return;
        }
        if !warming.is_empty() {
            debug!(?warming, "xDS configuration warming");
            return;
        }
        let (snapshot, missing_routes) = match self.translated.take() {
            Some(t) => t,
            None => {
                let t = nodemesh_config::translate(&self.accepted.to_config(&self.config.base));
                let Some(snapshot) = t.snapshot else {
                    // Every accepted set translated; what remains of one after unreferenced
                    // resources are dropped translates too.
                    warn!(errors = ?t.diagnostics.errors, "accepted xDS resources no longer translate");
                    return;
                };
                (snapshot, t.missing_routes)
            }
        };
        if !missing_routes.is_empty() {
            self.translated = Some((snapshot, missing_routes));
            return;
        }
        // What is ignored or answered locally (unknown clusters): once per new warning, and
        // all of the current ones on the status.
        let warnings: BTreeSet<String> = snapshot.warnings.iter().cloned().collect();
        for w in warnings.difference(&self.warned) {
            warn!("xDS configuration: {w}");
        }
        self.set(|s| s.warnings = warnings.iter().cloned().collect());
        self.warned = warnings;
        let (listeners, clusters, routes) = (
            snapshot.listeners.len(),
            snapshot.clusters.len(),
            snapshot.routes.len(),
        );
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = self.accepted.clone();
        let started = std::time::Instant::now();
        (self.apply)(snapshot).await;
        // The update's translation and the replaced state are freed: give the memory back
        // (see nodemesh_config::memory).
        nodemesh_config::memory::release_free_memory();
        info!(
            listeners,
            clusters,
            routes,
            apply_us = started.elapsed().as_micros(),
            "xDS configuration published"
        );
        self.published_current = true;
        self.set(|s| {
            s.published += 1;
            s.last_published = Some(now());
        });
    }
}

struct Checked {
    resources: ResourceSet,
    snapshot: Snapshot,
    missing_routes: BTreeSet<String>,
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn rpc_error(message: &str) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message: message.to_owned(),
        details: Vec::new(),
    }
}

async fn forward<T>(
    mut rx: mpsc::Receiver<Out>,
    tx: mpsc::Sender<T>,
    pick: impl Fn(Out) -> Option<T>,
) {
    while let Some(o) = rx.recv().await {
        if let Some(t) = pick(o)
            && tx.send(t).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let nominal = Duration::from_millis(100)
                .saturating_mul(1u32 << attempt.min(16))
                .min(Duration::from_secs(2));
            assert!(
                d >= nominal.mul_f64(0.5) && d <= nominal.mul_f64(1.5),
                "{attempt}: {d:?}"
            );
        }
        assert!(b.delay(30) >= Duration::from_secs(1));
    }
}
