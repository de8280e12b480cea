//! The outbound path: a pod's connection, redirected by the kernel to the node proxy, is
//! accepted, attributed to its source pod, and forwarded to where it was going.
//!
//! ```text
//! pod app --connect(dst)--> [connect4: dst := proxy]  --> listener.accept()
//!   take original dst + source pod (NM_ORIG_DST, by tuple)  -> per-pod limit
//!   socket() inside the pod's netns, SO_MARK -> connect(dst): the destination sees the pod's IP
//!   relay both ways until both ends close (or idle timeout)
//! ```
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nodemesh_http::workers::Workers;
use nodemesh_telemetry::istio::{TcpLabels, UNKNOWN, Workload};
use nodemesh_workloads::{SharedPodTable, pod::PodInfo};
use socket2::{Domain, SockRef};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    config::ProxyConfig,
    limits::{Permit, PodLimits},
    metrics::{ErrorLabels, ErrorReason, HandoffLabels, PodLabels, ProxyMetrics},
    orig_dst::{OriginalDst, Redirect},
    relay::{self, Counters, Outcome, Progress, Settings},
};

/// How a relay left the proxy's hands.
enum Ended {
    Finished(Outcome),
    /// Passed to the handoff: another agent continues it.
    HandedOff,
}

/// A proxied connection between its two sockets, as handed from one agent to the next.
#[derive(Debug)]
pub struct Connection {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub meta: ConnectionMeta,
}

/// What a new agent needs to continue a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionMeta {
    /// The pod's address as the proxy saw it.
    pub client_addr: SocketAddr,
    pub dst: SocketAddr,
    pub netns_cookie: u64,
    pub progress: Progress,
}

/// The node proxy's outbound side.
pub struct Outbound {
    cfg: ProxyConfig,
    orig_dst: Arc<dyn OriginalDst>,
    pods: SharedPodTable,
    limits: Arc<PodLimits>,
    metrics: ProxyMetrics,
    pause: watch::Sender<bool>,
    /// Where parked connections go during a handoff.
    parked: mpsc::UnboundedSender<Connection>,
    parked_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Connection>>>,
    active: AtomicU64,
    /// The L7 proxy, when configured.
    l7: Option<Arc<nodemesh_http::Engine>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("listen", &self.cfg.listen)
            .finish_non_exhaustive()
    }
}

/// Binds the outbound listener (blocking `std` socket, so it can also come from a handoff).
pub fn bind(cfg: &ProxyConfig) -> io::Result<std::net::TcpListener> {
    let domain = Domain::for_address(cfg.listen);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_mark(cfg.mark)?;
    socket.set_nonblocking(true)?;
    socket.bind(&cfg.listen.into())?;
    socket.listen(cfg.backlog.try_into().unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

impl Outbound {
    pub fn new(
        cfg: ProxyConfig,
        orig_dst: Arc<dyn OriginalDst>,
        pods: SharedPodTable,
        metrics: ProxyMetrics,
        l7: Option<Arc<nodemesh_http::Engine>>,
    ) -> Arc<Self> {
        let (parked, parked_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            limits: PodLimits::new(cfg.max_connections_per_pod),
            cfg,
            orig_dst,
            pods,
            metrics,
            pause: watch::Sender::new(false),
            parked,
            parked_rx: std::sync::Mutex::new(Some(parked_rx)),
            active: AtomicU64::new(0),
            l7,
        })
    }

    /// Connections being relayed now.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Accepts until `stop` turns true, then returns the listener (for a handoff). Each
    /// accepted connection is relayed on one of `workers`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        workers: Workers,
        mut stop: watch::Receiver<bool>,
    ) -> TcpListener {
        info!(addr = ?listener.local_addr().ok(), "outbound listener serving");
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return listener,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, client)) => {
                    self.metrics.accepted.inc();
                    let this = self.clone();
                    workers.spawn_connection(stream, move |stream| this.handle(stream, client));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, client: TcpStream, client_addr: SocketAddr) {
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return debug!(error = %e, "accepted socket without a local address"),
        };
        let redirect = match self.orig_dst.take(client_addr, local) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.error(None, ErrorReason::NoOriginalDestination);
                debug!(%client_addr, "connection without an original destination: not redirected by nodemesh");
                return reset(client);
            }
            Err(e) => {
                self.error(None, ErrorReason::NoOriginalDestination);
                warn!(%client_addr, error = %e, "reading the original destination failed");
                return reset(client);
            }
        };
        let span = info_span!("outbound", src = %client_addr, dst = %redirect.dst);
        async move {
            let Some(pod) = self.pods.load().by_netns_cookie(redirect.netns_cookie).cloned() else {
                self.error(None, ErrorReason::UnknownSourcePod);
                warn!(netns_cookie = redirect.netns_cookie, "connection from a pod the registry does not know");
                return reset(client);
            };
            if is_self(redirect.dst, local) {
                self.error(Some(&pod), ErrorReason::Loop);
                warn!("original destination is the proxy itself");
                return reset(client);
            }
            let Some(permit) = self.limits.try_acquire(redirect.netns_cookie) else {
                self.error(Some(&pod), ErrorReason::PodConnectionLimit);
                debug!(pod = %pod.spec.name, limit = self.cfg.max_connections_per_pod, "pod connection limit reached");
                return reset(client);
            };
            if let Some(engine) = &self.l7
                && let Some(listener) =
                    nodemesh_http::listener::listener_for(&engine.state().snapshot, redirect.dst).cloned()
            {
                // L7: the engine opens upstream connections itself, in this pod's namespace
                // (see `PodConnector`); the permit bounds the pod's connections as for L4.
                let accepted = nodemesh_http::Accepted {
                    listener,
                    peer: client_addr,
                    destination: redirect.dst,
                    source: pod_source(&pod, redirect.netns_cookie),
                };
                self.metrics.l7.inc();
                engine.clone().serve(client, accepted).await;
                drop(permit);
                return;
            }
            let upstream = match self.connect_upstream(&pod, redirect).await {
                Ok(s) => s,
                Err(reason) => {
                    self.error(Some(&pod), reason);
                    return reset(client);
                }
            };
            let meta = ConnectionMeta {
                client_addr,
                dst: redirect.dst,
                netns_cookie: redirect.netns_cookie,
                progress: Progress::default(),
            };
            self.run(Connection { client, upstream, meta }, pod, permit, true).await;
        }
        .instrument(span)
        .await;
    }

    /// Continues a connection handed over by a previous agent.
    /// Counts a connection of a restart handoff that could not be resumed (it came
    /// without its sockets, or they could not be registered); [`Self::resume`] counts the
    /// others.
    pub fn handoff_failed(&self) {
        self.metrics
            .handoff
            .get_or_create(&HandoffLabels { result: "failed" })
            .inc();
    }

    pub async fn resume(self: Arc<Self>, conn: Connection) {
        self.metrics
            .handoff
            .get_or_create(&HandoffLabels { result: "resumed" })
            .inc();
        let span = info_span!("outbound", src = %conn.meta.client_addr, dst = %conn.meta.dst, resumed = true);
        async move {
            // The source pod may be unknown if it was removed during the handoff; the
            // connection is still relayed (it was allowed when it was opened).
            let pod = self
                .pods
                .load()
                .by_netns_cookie(conn.meta.netns_cookie)
                .cloned();
            let permit = self.limits.try_acquire(conn.meta.netns_cookie);
            match (pod, permit) {
                (Some(pod), Some(permit)) => self.run(conn, pod, permit, false).await,
                _ => self.run_unattributed(conn).await,
            }
        }
        .instrument(span)
        .await;
    }

    async fn connect_upstream(
        &self,
        pod: &PodInfo,
        redirect: Redirect,
    ) -> Result<TcpStream, ErrorReason> {
        let dst = redirect.dst;
        let socket = pod.netns.tcp_socket(Domain::for_address(dst)).map_err(|e| {
            warn!(error = %e, "creating the upstream socket in the pod's network namespace failed");
            ErrorReason::UpstreamSocket
        })?;
        socket
            .set_mark(self.cfg.mark)
            .and_then(|()| socket.set_tcp_nodelay(true))
            .map_err(|e| {
                warn!(error = %e, "setting up the upstream socket failed");
                ErrorReason::UpstreamSocket
            })?;
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!("destination refused the connection");
                Err(ErrorReason::ConnectRefused)
            }
            Ok(Err(e)) => {
                debug!(error = %e, "connecting to the destination failed");
                Err(ErrorReason::ConnectError)
            }
            Err(_) => {
                debug!(timeout = ?self.cfg.connect_timeout, "connecting to the destination timed out");
                Err(ErrorReason::ConnectTimeout)
            }
        }
    }

    /// Relays until the connection ends or is handed off.
    async fn run(&self, conn: Connection, pod: Arc<PodInfo>, permit: Permit, fresh: bool) {
        let _ = conn.client.set_nodelay(true);
        let labels = self.labels(&pod, conn.meta.dst);
        if fresh {
            self.metrics.tcp.opened.get_or_create(&labels).inc();
        }
        let active = self.metrics.active.get_or_create(&pod_labels(&pod)).clone();
        active.inc();
        let counters = Counters {
            received: self
                .metrics
                .tcp
                .received_bytes
                .get_or_create(&labels)
                .clone(),
            sent: self.metrics.tcp.sent_bytes.get_or_create(&labels).clone(),
        };
        let ended = self.relay_or_hand_off(conn, &counters).await;
        active.dec();
        drop(permit);
        if let Ended::Finished(outcome) = ended {
            self.metrics.tcp.closed.get_or_create(&labels).inc();
            self.finish(&pod, outcome);
        }
    }

    /// A resumed connection whose source pod is gone: relay it without per-pod metrics.
    async fn run_unattributed(&self, conn: Connection) {
        if let Ended::Finished(Outcome::Error(e)) =
            self.relay_or_hand_off(conn, &Counters::default()).await
        {
            debug!(error = %e, "relay ended with an error");
        }
    }

    /// Relays; when parked for a handoff, passes the connection to the handoff. If the pause
    /// is withdrawn before everything parked, simply relays on.
    async fn relay_or_hand_off(&self, mut conn: Connection, counters: &Counters) -> Ended {
        let settings = Settings {
            idle_timeout: self.cfg.idle_timeout,
            buffer_size: self.cfg.buffer_size,
        };
        let mut pause = self.pause.subscribe();
        self.active.fetch_add(1, Ordering::Relaxed);
        let ended = loop {
            let progress = conn.meta.progress;
            match relay::relay(
                &mut conn.client,
                &mut conn.upstream,
                progress,
                settings,
                counters,
                &pause,
            )
            .await
            {
                Outcome::Parked(progress) => {
                    conn.meta.progress = progress;
                    if !*pause.borrow_and_update() {
                        continue;
                    }
                    match self.parked.send(conn) {
                        Ok(()) => break Ended::HandedOff,
                        Err(mpsc::error::SendError(back)) => {
                            // Nobody takes parked connections: wait for the pause to end.
                            conn = back;
                            let _ = pause.wait_for(|p| !*p).await;
                        }
                    }
                }
                outcome => break Ended::Finished(outcome),
            }
        };
        self.active.fetch_sub(1, Ordering::Relaxed);
        ended
    }

    fn finish(&self, pod: &PodInfo, outcome: Outcome) {
        match outcome {
            Outcome::Done => debug!("connection closed"),
            Outcome::IdleTimeout => {
                self.error(Some(pod), ErrorReason::IdleTimeout);
                debug!(timeout = ?self.cfg.idle_timeout, "idle connection closed");
            }
            Outcome::Error(e) => {
                self.error(Some(pod), ErrorReason::Relay);
                debug!(error = %e, "connection ended with an error");
            }
            Outcome::Parked(_) => {}
        }
    }

    fn labels(&self, pod: &PodInfo, dst: SocketAddr) -> TcpLabels {
        let table = self.pods.load();
        let dst_pod = table.by_ip(dst.ip());
        let destination = dst_pod.map_or(Workload::UNKNOWN, |p| Workload {
            name: p.workload(),
            namespace: p.namespace(),
            principal: UNKNOWN,
        });
        TcpLabels::tcp(
            Workload {
                name: pod.workload(),
                namespace: pod.namespace(),
                principal: UNKNOWN,
            },
            destination,
        )
    }

    fn error(&self, pod: Option<&PodInfo>, reason: ErrorReason) {
        let (workload, namespace) =
            pod.map_or((UNKNOWN, UNKNOWN), |p| (p.workload(), p.namespace()));
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                source_workload: workload.to_owned(),
                source_workload_namespace: namespace.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Asks every relay to park (true) or to carry on (false).
    pub fn set_pause(&self, pause: bool) {
        self.pause.send_replace(pause);
    }

    /// The stream of parked connections, for the handoff (taken once).
    pub fn take_parked(&self) -> Option<mpsc::UnboundedReceiver<Connection>> {
        self.parked_rx.lock().ok()?.take()
    }
}

/// The trust domain of pod identities (Istio's default).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The L7 proxy's view of a pod: its namespace cookie, `namespace/name` and identity.
fn pod_source(pod: &PodInfo, netns_cookie: u64) -> nodemesh_http::Source {
    nodemesh_http::Source {
        key: netns_cookie,
        name: Arc::from(format!("{}/{}", pod.namespace(), pod.spec.name)),
        // Until mTLS carries peer certificates, the pod's identity is the one the registry
        // gives it: Istio's SPIFFE form of its namespace and service account.
        principal: Some(Arc::from(pod_principal(pod))),
        namespace: Some(Arc::from(pod.namespace())),
        workload: Some(Arc::from(pod.workload())),
    }
}

/// The pod's identity as metrics and policy name it (until mTLS carries certificates).
pub fn pod_principal(pod: &PodInfo) -> String {
    let account = if pod.spec.service_account.is_empty() {
        "default"
    } else {
        &pod.spec.service_account
    };
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{account}",
        pod.namespace()
    )
}

/// Destination workload names for the L7 proxy's Istio metrics: the node's pods by address.
#[derive(Debug, Clone)]
pub struct PodNames(pub SharedPodTable);

impl nodemesh_http::report::WorkloadNames for PodNames {
    fn by_ip(&self, ip: std::net::IpAddr) -> Option<(Arc<str>, Arc<str>, Arc<str>)> {
        let table = self.0.load();
        let pod = table.by_ip(ip)?;
        Some((
            Arc::from(pod.workload()),
            Arc::from(pod.namespace()),
            Arc::from(pod_principal(pod)),
        ))
    }
}

/// Opens the L7 proxy's upstream connections inside the source pod's network namespace,
/// marked so the connect hooks pass them: the destination sees the pod's own address, and
/// same-node destinations are reached without a second proxy hop. Sources that are not
/// pods (health checks) connect from the node.
#[derive(Debug, Clone)]
pub struct PodConnector {
    pods: SharedPodTable,
    mark: u32,
}

impl PodConnector {
    pub fn new(pods: SharedPodTable, mark: u32) -> Self {
        Self { pods, mark }
    }
}

impl nodemesh_http::Connector for PodConnector {
    fn connect(
        &self,
        addr: SocketAddr,
        source: &nodemesh_http::Source,
    ) -> nodemesh_http::ConnectFuture {
        let pod = self.pods.load().by_netns_cookie(source.key).cloned();
        let socket = match &pod {
            Some(pod) => pod.netns.tcp_socket(Domain::for_address(addr)),
            None => socket2::Socket::new(
                Domain::for_address(addr),
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            ),
        };
        let mark = self.mark;
        Box::pin(async move {
            let socket = socket?;
            socket.set_mark(mark)?;
            socket.set_tcp_nodelay(true)?;
            TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await
        })
    }

    fn per_source(&self) -> bool {
        true
    }
}

fn pod_labels(pod: &PodInfo) -> PodLabels {
    PodLabels {
        source_workload: pod.workload().to_owned(),
        source_workload_namespace: pod.namespace().to_owned(),
    }
}

/// Whether `dst` is the proxy's own listener (a pod connecting to the proxy address).
fn is_self(dst: SocketAddr, local: SocketAddr) -> bool {
    dst.port() == local.port() && dst.ip().to_canonical() == local.ip().to_canonical()
}

/// Closes with a reset, so the pod's app sees a failed connection at once rather than an
/// orderly end of stream.
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
