//! What every finished request reports, off its path: Istio's request metrics and the
//! connection manager's access logs.
//!
//! A request's facts are gathered as it goes ([`Pending`]); its response body is wrapped
//! ([`Reported`]) so that the report is made when the last byte went out (or the stream
//! ended early), with the bytes actually sent. Metrics are atomics; access log entries go
//! to a [`Writer`]'s bounded queue, never waiting (see `nodemesh_telemetry::access_log`).
//!
//! Writers outlive configurations: one per log file, opened when a configuration first
//! names the file and kept while one does.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use nodemesh_config::model::{NetworkFilter, Snapshot};
use nodemesh_telemetry::{
    access_log::{self, Entry, LogStats, Writer},
    istio::{HttpMetrics, RequestLabels, TcpLabels, TcpMetrics, UNKNOWN, Workload},
};
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::{BoxError, headers::names};

/// Names of the workload behind a destination address (the node proxy's pod table).
pub trait WorkloadNames: Send + Sync + std::fmt::Debug + 'static {
    /// `(workload, namespace, principal)` of the pod at `ip`, if it is one.
    fn by_ip(&self, ip: IpAddr) -> Option<(Arc<str>, Arc<str>, Arc<str>)>;
}

/// The engine's reporting side.
#[derive(Debug)]
pub struct Reporter {
    pub metrics: HttpMetrics,
    log_stats: LogStats,
    writers: ArcSwap<HashMap<String, Arc<Writer>>>,
    capacity: AtomicUsize,
    workloads: ArcSwap<Option<Arc<dyn WorkloadNames>>>,
    /// `istio_tcp_*` for `tcp_proxy` chains: the node proxy's families when it set them
    /// ([`Self::set_tcp_metrics`]), so the names are registered once.
    tcp: ArcSwap<Option<TcpMetrics>>,
    /// Serializes writer set-up (updates are rare).
    opening: Mutex<()>,
}

impl Reporter {
    pub fn register(registry: &mut Registry) -> Self {
        Self {
            metrics: HttpMetrics::register(registry),
            log_stats: LogStats::register(registry),
            writers: ArcSwap::from_pointee(HashMap::new()),
            capacity: AtomicUsize::new(access_log::DEFAULT_CAPACITY),
            workloads: ArcSwap::from_pointee(None),
            tcp: ArcSwap::from_pointee(None),
            opening: Mutex::new(()),
        }
    }

    /// Entries queued per log file for writers opened from now on.
    pub fn set_capacity(&self, entries: usize) {
        self.capacity.store(entries.max(1), Ordering::Relaxed);
    }

    pub fn set_workloads(&self, names: Arc<dyn WorkloadNames>) {
        self.workloads.store(Arc::new(Some(names)));
    }

    /// Where `tcp_proxy` chains count `istio_tcp_*` (unset: not counted).
    pub fn set_tcp_metrics(&self, tcp: TcpMetrics) {
        self.tcp.store(Arc::new(Some(tcp)));
    }

    /// The labels and families for one `tcp_proxy` connection, if TCP metrics are on.
    pub(crate) fn tcp_connection(
        &self,
        source: &crate::Source,
        upstream: SocketAddr,
    ) -> Option<(TcpMetrics, TcpLabels)> {
        let tcp = self.tcp.load().as_ref().clone()?;
        let dst = self.destination(Some(upstream.ip()));
        let destination = dst
            .as_ref()
            .map_or(Workload::UNKNOWN, |(n, ns, p)| Workload {
                name: n,
                namespace: ns,
                principal: p,
            });
        let src = Workload {
            name: source.workload.as_deref().unwrap_or(UNKNOWN),
            namespace: source.namespace.as_deref().unwrap_or(UNKNOWN),
            principal: source.principal.as_deref().unwrap_or(UNKNOWN),
        };
        Some((tcp, TcpLabels::tcp(src, destination)))
    }

    /// Opens a writer for every file the snapshot logs to; drops the others (their threads
    /// drain what is queued and end).
    pub fn configure(&self, snapshot: &Snapshot) {
        let _one = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.writers.load_full();
        let mut next = HashMap::new();
        let capacity = self.capacity.load(Ordering::Relaxed);
        for l in &snapshot.listeners {
            for chain in l.filter_chains.iter().chain(l.default_chain.iter()) {
                let logs = match &chain.filter {
                    NetworkFilter::Http(h) => &h.access_logs,
                    NetworkFilter::Tcp(t) => &t.access_logs,
                };
                for log in logs {
                    if next.contains_key(&log.path) {
                        continue;
                    }
                    let writer = match old.get(&log.path) {
                        Some(w) => Some(w.clone()),
                        None => match Writer::file(&log.path, capacity, &self.log_stats) {
                            Ok(w) => Some(w),
                            Err(e) => {
                                warn!(path = %log.path, error = %e, "access log writer could not start; not logging to it");
                                None
                            }
                        },
                    };
                    if let Some(w) = writer {
                        next.insert(log.path.clone(), w);
                    }
                }
            }
        }
        self.writers.store(Arc::new(next));
    }

    /// Forgets every writer (the next [`Self::configure`] opens them anew, e.g. with a new
    /// capacity).
    pub fn reset_writers(&self) {
        self.writers.store(Arc::new(HashMap::new()));
    }

    fn writer(&self, path: &str) -> Option<Arc<Writer>> {
        self.writers.load().get(path).cloned()
    }

    fn destination(&self, ip: Option<IpAddr>) -> Option<(Arc<str>, Arc<str>, Arc<str>)> {
        let ip = ip?;
        self.workloads.load().as_ref().as_ref()?.by_ip(ip)
    }
}

/// A request's facts, gathered until its response is done.
#[derive(Debug)]
pub(crate) struct Pending {
    pub engine: Arc<crate::Engine>,
    pub hcm: Arc<nodemesh_config::model::HttpManager>,
    pub source: crate::Source,
    pub started: Instant,
    pub entry: Entry,
    pub grpc: bool,
    /// The request head's size.
    pub request_head: u64,
    /// The request body's `content-length`, when it had one.
    pub content_length: u64,
    /// The request body bytes that went through the proxy, for a body of undeclared
    /// length (chunked, HTTP/2, gRPC).
    pub received: Option<BodyBytes>,
}

/// Counts a request body's bytes as they are forwarded (`Touching` adds to it), so that a
/// body without `content-length` (chunked HTTP/1.1, HTTP/2, gRPC streams) is reported
/// with its real size in `istio_request_bytes` and `%BYTES_RECEIVED%`.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyBytes(Arc<std::sync::atomic::AtomicU64>);

impl BodyBytes {
    pub fn add(&self, n: usize) {
        self.0
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Pending {
    /// Reports the request (once): metrics, then an entry for every access log.
    fn finish(mut self, bytes_sent: u64, head_bytes: u64) {
        let duration = self.started.elapsed();
        self.entry.duration = duration;
        self.entry.bytes_sent = bytes_sent;
        // What was forwarded; a body the upstream did not read counts as declared.
        let body = self
            .received
            .as_ref()
            .map_or(0, BodyBytes::get)
            .max(self.content_length);
        self.entry.bytes_received = body;
        let request_bytes = self.request_head + body;
        let reporter = self.engine.reporter();
        let dst = reporter.destination(self.entry.upstream_host.map(|a| a.ip()));
        let destination = dst
            .as_ref()
            .map_or(Workload::UNKNOWN, |(n, ns, p)| Workload {
                name: n,
                namespace: ns,
                principal: p,
            });
        let source = Workload {
            name: self.source.workload.as_deref().unwrap_or(UNKNOWN),
            namespace: self.source.namespace.as_deref().unwrap_or(UNKNOWN),
            principal: self.source.principal.as_deref().unwrap_or(UNKNOWN),
        };
        let grpc_status = self
            .entry
            .response_headers
            .get(names::GRPC_STATUS)
            .and_then(|v| v.to_str().ok());
        let labels = RequestLabels::new(
            source,
            destination,
            self.entry.upstream_cluster.as_deref(),
            self.grpc,
            self.entry.response_code,
            grpc_status,
            self.entry.response_flags,
        );
        reporter.metrics.record(
            &labels,
            duration.as_secs_f64() * 1000.0,
            request_bytes,
            head_bytes + bytes_sent,
        );
        if self.hcm.access_logs.is_empty() {
            return;
        }
        let entry = Arc::new(self.entry);
        for log in &self.hcm.access_logs {
            if let Some(w) = reporter.writer(&log.path) {
                w.log(log.format.clone(), entry.clone());
            }
        }
    }
}

/// Writes one entry to each of `logs` (a TCP connection's, when it closes).
pub(crate) fn log_entry(
    reporter: &Reporter,
    logs: &[nodemesh_config::access_log::AccessLog],
    entry: Entry,
) {
    if logs.is_empty() {
        return;
    }
    let entry = Arc::new(entry);
    for log in logs {
        if let Some(w) = reporter.writer(&log.path) {
            w.log(log.format.clone(), entry.clone());
        }
    }
}

/// A new entry for a TCP connection: no request line or response code (`-` and 0, as
/// Envoy logs a tcp_proxy connection).
pub(crate) fn tcp_entry(peer: SocketAddr, local: SocketAddr, principal: Option<Arc<str>>) -> Entry {
    let mut e = entry(
        "",
        "",
        "",
        http::Version::HTTP_11,
        peer.ip(),
        peer,
        local,
        principal,
    );
    e.protocol = "";
    e
}

/// The size of a header block as it travels (name, value, `: ` and CRLF).
pub(crate) fn head_size(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// A new entry for a request (response fields filled in later).
#[expect(
    clippy::too_many_arguments,
    reason = "the request's facts, spelled out"
)]
pub(crate) fn entry(
    method: &str,
    path: &str,
    authority: &str,
    version: http::Version,
    remote: IpAddr,
    peer: SocketAddr,
    local: SocketAddr,
    principal: Option<Arc<str>>,
) -> Entry {
    Entry {
        start: SystemTime::now(),
        method: method.to_owned(),
        path: path.to_owned(),
        authority: authority.to_owned(),
        protocol: match version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        // Set once the connection manager is done with them, and only for a log.
        request_headers: HeaderMap::new(),
        response_headers: HeaderMap::new(),
        response_code: 0,
        response_flags: None,
        details: None,
        bytes_received: 0,
        bytes_sent: 0,
        duration: Default::default(),
        upstream_host: None,
        upstream_cluster: None,
        route_name: None,
        remote: if remote == peer.ip() {
            peer
        } else {
            SocketAddr::new(remote, 0)
        },
        direct_remote: peer,
        local,
        principal,
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports its request when it ends or is dropped.
    pub(crate) struct Reported<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
        sent: u64,
        head: u64,
    }

    impl<B> PinnedDrop for Reported<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(p) = this.pending.take() {
                p.finish(*this.sent, *this.head);
            }
        }
    }
}

impl<B> Reported<B> {
    pub fn new(inner: B, pending: Pending, head: u64) -> Self {
        Self {
            inner,
            pending: Some(pending),
            sent: 0,
            head,
        }
    }
}

impl<B> Body for Reported<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.sent += d.len() as u64;
                }
            }
            Poll::Ready(None | Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.finish(*this.sent, *this.head);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
