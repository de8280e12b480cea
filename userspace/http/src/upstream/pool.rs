//! Upstream connections, pooled per (endpoint, protocol, source).
//!
//! HTTP/1.1 connections carry one request at a time: an idle one is reused, else a new one
//! is opened; a connection goes back to the pool once its response has been read to the
//! end, from the task reading it ([`UpstreamBody`]). One that stays unused for the
//! cluster's idle timeout (`common_http_protocol_options.idle_timeout`, an hour unless set;
//! 0 disables it, as in Envoy) is closed by a sweeper task that the key's pool runs only
//! while it holds idle connections.
//!
//! HTTP/2 connections are shared by every request to the same key, multiplexed; one that
//! has opened no stream for the idle timeout leaves the pool, and closes (GOAWAY) once the
//! streams still open on it finish. Envoy counts the timeout from the last stream's end
//! rather than its start; it differs only for a stream that outlives the timeout, whose
//! connection closes as it ends instead of a timeout later.
//!
//! In the node proxy an upstream socket belongs to the pod that sent the request (it is
//! opened in that pod's network namespace, so the destination sees the pod's address),
//! hence the source in the key; a standalone proxy has one source.
//!
//! Pools are per data-plane worker ([`crate::workers`]): a connection, its task and the
//! requests it carries all stay on the worker that opened it, as in Envoy, so a request
//! never wakes another thread; a cluster thus holds up to one connection set per worker.
//!
//! Circuit breakers: opening a connection takes a `max_connections` slot for its life, and
//! waiting for one takes a `max_pending_requests` slot.
use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_config::model::UpstreamProtocol;
use tracing::debug;

use super::{ClusterState, Host};
use crate::{BoxError, Connector, Source, stats::Limit};

/// The body type of requests sent upstream.
pub type ReqBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    h2: bool,
    source: u64,
    /// The worker whose runtime runs the connection's task.
    worker: usize,
}

#[derive(Debug)]
struct Idle {
    sender: conn::http1::SendRequest<ReqBody>,
    since: Instant,
    /// Requests this connection has carried (`max_requests_per_connection`).
    served: u32,
}

/// A key's idle HTTP/1.1 connections, oldest first: reuse takes the newest (its socket is
/// the likeliest to be warm and still open), so the expired ones are a prefix and pruning
/// stops at the first live one.
#[derive(Debug, Default)]
struct IdleList {
    conns: VecDeque<Idle>,
    /// Whether a sweeper task is closing this list's connections as they expire.
    swept: bool,
}

impl IdleList {
    /// Drops (and so closes) the closed and expired connections at the front.
    fn prune(&mut self, now: Instant, max_idle: Option<Duration>) {
        while self.conns.front().is_some_and(|e| {
            e.sender.is_closed() || max_idle.is_some_and(|m| now.duration_since(e.since) >= m)
        }) {
            self.conns.pop_front();
        }
    }
}

/// A shared HTTP/2 connection and the streams opened on it so far.
#[derive(Debug)]
struct H2Conn {
    sender: conn::http2::SendRequest<ReqBody>,
    streams: u32,
    /// When the last stream was opened on it (the idle timeout counts from there).
    last_stream: Instant,
    /// Tells this connection from a later one under the same key (the idle sweeper's).
    id: u64,
}

/// A cluster's connections.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<foldhash::HashMap<Key, IdleList>>,
    h2: Mutex<foldhash::HashMap<Key, H2Conn>>,
}

impl Pool {
    /// Drops every pooled connection (idle HTTP/1.1 ones close now, shared HTTP/2 ones once
    /// their open streams finish).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Why a request got no response from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A circuit breaker is open (`UO`).
    #[error("overflow")]
    Overflow,
    #[error("connection timeout")]
    ConnectTimeout,
    #[error("connection failure: {0}")]
    ConnectFailure(io::Error),
    /// The connection failed or was reset before the response headers (`UC`/`UR`).
    #[error("connection termination: {0}")]
    Reset(hyper::Error),
}

/// The protocol to speak to `cluster` for a request that arrived over HTTP/2 or not.
pub(crate) fn use_h2(cluster: &ClusterState, downstream_h2: bool) -> bool {
    match cluster.config.protocol {
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Downstream => downstream_h2,
    }
}

impl ClusterState {
    /// Sends `req` to `host` over a pooled or new connection.
    pub(crate) async fn send(
        self: &Arc<Self>,
        host: &Host,
        req: Request<ReqBody>,
        h2: bool,
        source: &Source,
        connector: &Arc<dyn Connector>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let key = Key {
            addr: host.address,
            h2,
            source: if connector.per_source() {
                source.key
            } else {
                0
            },
            worker: crate::workers::current(),
        };
        // Opening a connection is the rare path: its futures are boxed so that the state of
        // every request (pooled, the common case) does not carry them.
        if h2 {
            let mut sender = match self.h2_pooled(key) {
                Some(sender) => sender,
                None => Box::pin(self.h2_connect(key, source, connector)).await?,
            };
            let response = sender.send_request(req).await;
            return response
                .map(|r| r.map(UpstreamBody::shared))
                .map_err(UpstreamError::Reset);
        }
        let (mut sender, served) = match self.take_idle(key) {
            Some(reused) => reused,
            None => (Box::pin(self.connect_h1(key, source, connector)).await?, 0),
        };
        let response = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Reset)?;
        let served = served + 1;
        // Back to the pool once this response is read to its end, unless the connection has
        // carried `max_requests_per_connection` (then dropping the sender closes it).
        let give_back = self
            .config
            .max_requests_per_connection
            .is_none_or(|max| max == 0 || served < max)
            .then(|| GiveBack {
                sender,
                key,
                served,
                pool: Arc::downgrade(self),
            });
        Ok(response.map(|inner| UpstreamBody { inner, give_back }))
    }

    fn take_idle(&self, key: Key) -> Option<(conn::http1::SendRequest<ReqBody>, u32)> {
        let max_idle = self.config.idle_timeout;
        let now = Instant::now();
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&key)?;
        // Anything passed over here is closed or stale, and is dropped (closing it).
        while let Some(entry) = list.conns.pop_back() {
            if entry.sender.is_ready()
                && max_idle.is_none_or(|m| now.duration_since(entry.since) < m)
            {
                return Some((entry.sender, entry.served));
            }
        }
        None
    }

    fn put_idle(
        self: &Arc<Self>,
        key: Key,
        sender: conn::http1::SendRequest<ReqBody>,
        served: u32,
    ) {
        if self.is_retired() {
            return;
        }
        let max_idle = self.config.idle_timeout;
        let now = Instant::now();
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        // This usually looks at one entry. A closed one further in goes when it reaches
        // the front or is taken.
        list.prune(now, max_idle);
        list.conns.push_back(Idle {
            sender,
            since: now,
            served,
        });
        if let Some(max_idle) = max_idle
            && !list.swept
        {
            list.swept = true;
            drop(idle);
            tokio::spawn(sweep(Arc::downgrade(self), key, max_idle));
        }
    }

    /// A sender on the shared HTTP/2 connection for `key`, if one is open and has budget.
    fn h2_pooled(&self, key: Key) -> Option<conn::http2::SendRequest<ReqBody>> {
        let max = self.config.max_requests_per_connection.filter(|m| *m > 0);
        let mut shared = self.pool.h2.lock().unwrap_or_else(|p| p.into_inner());
        let conn = shared.get_mut(&key).filter(|c| !c.sender.is_closed())?;
        conn.streams += 1;
        if self.config.idle_timeout.is_some() {
            conn.last_stream = Instant::now();
        }
        let sender = conn.sender.clone();
        // A connection that reached its stream budget takes no new streams; those open on
        // it finish, then it closes with its last sender.
        if max.is_some_and(|m| conn.streams >= m) {
            shared.remove(&key);
        }
        Some(sender)
    }

    /// Opens the HTTP/2 connection for `key` and shares it (unless it may carry only one
    /// stream).
    async fn h2_connect(
        self: &Arc<Self>,
        key: Key,
        source: &Source,
        connector: &Arc<dyn Connector>,
    ) -> Result<conn::http2::SendRequest<ReqBody>, UpstreamError> {
        let max = self.config.max_requests_per_connection.filter(|m| *m > 0);
        let io = self.open(key.addr, source, connector).await?;
        let mut builder = conn::http2::Builder::new(TokioExecutor::new());
        let h2 = &self.config.http2;
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(h2.initial_stream_window_size)
            .initial_connection_window_size(h2.initial_connection_window_size);
        let (sender, connection) = builder
            .handshake(TokioIo::new(io.stream))
            .await
            .map_err(UpstreamError::Reset)?;
        let slot = io.slot;
        let addr = key.addr;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                debug!(upstream = %addr, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        if max.is_none_or(|m| m > 1) && !self.is_retired() {
            let id = H2_IDS.fetch_add(1, Ordering::Relaxed);
            self.pool
                .h2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    key,
                    H2Conn {
                        sender: sender.clone(),
                        streams: 1,
                        last_stream: Instant::now(),
                        id,
                    },
                );
            if let Some(max_idle) = self.config.idle_timeout {
                tokio::spawn(sweep_h2(Arc::downgrade(self), key, id, max_idle));
            }
        }
        Ok(sender)
    }

    async fn connect_h1(
        self: &Arc<Self>,
        key: Key,
        source: &Source,
        connector: &Arc<dyn Connector>,
    ) -> Result<conn::http1::SendRequest<ReqBody>, UpstreamError> {
        let io = self.open(key.addr, source, connector).await?;
        let (sender, connection) = conn::http1::Builder::new()
            .handshake(TokioIo::new(io.stream))
            .await
            .map_err(UpstreamError::Reset)?;
        let slot = io.slot;
        let addr = key.addr;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.with_upgrades().await {
                debug!(upstream = %addr, error = %e, "HTTP/1 upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Opens a TCP connection under the `max_connections` and `max_pending_requests`
    /// breakers and the cluster's connect timeout.
    pub(crate) async fn open(
        self: &Arc<Self>,
        addr: SocketAddr,
        source: &Source,
        connector: &Arc<dyn Connector>,
    ) -> Result<Opened, UpstreamError> {
        let _pending = self
            .try_slot(Limit::Pending)
            .ok_or(UpstreamError::Overflow)?;
        let slot = self
            .try_owned_slot(Limit::Connections)
            .ok_or(UpstreamError::Overflow)?;
        self.stats.connections_total.inc();
        let connect = connector.connect(addr, source);
        let stream = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Err(_) => {
                self.stats.connect_failures.inc();
                return Err(UpstreamError::ConnectTimeout);
            }
            Ok(Err(e)) => {
                self.stats.connect_failures.inc();
                return Err(UpstreamError::ConnectFailure(e));
            }
            Ok(Ok(stream)) => stream,
        };
        Ok(Opened { stream, slot })
    }
}

/// Closes `key`'s idle connections as they reach `max_idle`, sleeping until the oldest
/// does; ends when none is left (the next one returned starts another) or the cluster is
/// gone.
async fn sweep(cluster: std::sync::Weak<ClusterState>, key: Key, max_idle: Duration) {
    loop {
        let due = {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let mut idle = cluster.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let Some(list) = idle.get_mut(&key) else {
                return;
            };
            list.prune(Instant::now(), Some(max_idle));
            match list.conns.front() {
                // A timeout beyond the clock's range never expires.
                Some(oldest) => match oldest.since.checked_add(max_idle) {
                    Some(due) => due,
                    None => return,
                },
                None => {
                    idle.remove(&key);
                    return;
                }
            }
        };
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Numbers the shared HTTP/2 connections.
static H2_IDS: AtomicU64 = AtomicU64::new(0);

/// Takes the shared HTTP/2 connection `id` out of `key`'s pool once no stream has been
/// opened on it for `max_idle`; dropping the pool's sender lets hyper close it when its
/// open streams end. Ends early if the connection closed or was replaced.
async fn sweep_h2(cluster: std::sync::Weak<ClusterState>, key: Key, id: u64, max_idle: Duration) {
    loop {
        let due = {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let mut shared = cluster.pool.h2.lock().unwrap_or_else(|p| p.into_inner());
            let Some(conn) = shared.get(&key).filter(|c| c.id == id) else {
                return;
            };
            let Some(due) = conn.last_stream.checked_add(max_idle) else {
                return;
            };
            if conn.sender.is_closed() || due <= Instant::now() {
                debug!(upstream = %key.addr, "idle HTTP/2 upstream connection leaves the pool");
                shared.remove(&key);
                return;
            }
            due
        };
        tokio::time::sleep_until(due.into()).await;
    }
}

/// An upstream response body: hyper's, and for HTTP/1.1 the connection to return to the
/// pool once the body has been read to its end.
///
/// The return happens in the task that reads the body (the downstream connection's, on the
/// same worker), when the last frame passes or the body is dropped: hyper's connection has
/// usually asked for its next request by then, and the connection goes straight back to
/// the pool. Only when it has not (`SendRequest::is_ready` false) does a task wait for it;
/// a task for every response was ~1,150 instructions a request (callgrind).
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

impl UpstreamBody {
    /// A body on a shared HTTP/2 connection (nothing to return).
    fn shared(inner: Incoming) -> Self {
        Self {
            inner,
            give_back: None,
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(_))) if !this.inner.is_end_stream() => {}
            // A broken response leaves the connection unusable: dropping the sender closes it.
            Poll::Ready(Some(Err(_))) => drop(this.give_back.take()),
            Poll::Ready(_) => {
                if let Some(give_back) = this.give_back.take() {
                    give_back.give();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped unread (a bodiless response, a client gone) returns the connection
        // if hyper still finds it reusable.
        if let Some(give_back) = self.give_back.take() {
            give_back.give();
        }
    }
}

/// An HTTP/1.1 connection whose response is in flight, and where it goes back.
#[derive(Debug)]
struct GiveBack {
    sender: conn::http1::SendRequest<ReqBody>,
    key: Key,
    served: u32,
    pool: std::sync::Weak<ClusterState>,
}

impl GiveBack {
    fn give(self) {
        // Outside a runtime (shutting down) there is nowhere to keep it.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Some(cluster) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_ready() {
            cluster.put_idle(self.key, self.sender, self.served);
            return;
        }
        let GiveBack {
            mut sender,
            key,
            served,
            pool,
        } = self;
        tokio::spawn(async move {
            if sender.ready().await.is_ok()
                && let Some(cluster) = pool.upgrade()
            {
                cluster.put_idle(key, sender, served);
            }
        });
    }
}

/// A new upstream connection and its circuit breaker slot.
#[derive(Debug)]
pub(crate) struct Opened {
    pub stream: tokio::net::TcpStream,
    pub slot: super::OwnedSlot,
}
