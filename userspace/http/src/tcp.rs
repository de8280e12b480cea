//! `envoy.filters.network.tcp_proxy`: bytes both ways between the client and an endpoint of
//! the chain's cluster, with half-close and an idle timeout.
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nodemesh_config::model::{ClusterTarget, Discovery, TcpProxy};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tracing::{debug, warn};

use crate::{
    Accepted, Engine, State,
    upstream::{Host, Outcome, lb},
};

/// Serves a TCP proxy connection to its end.
pub async fn serve<S>(
    engine: &Arc<Engine>,
    state: &State,
    proxy: &TcpProxy,
    mut client: S,
    accepted: &Accepted,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut entry = crate::report::tcp_entry(
        accepted.peer,
        accepted.destination,
        accepted.source.principal.clone(),
    );
    // Every way the connection ends is logged (Envoy logs refused ones with their flag).
    let log = |mut entry: nodemesh_telemetry::access_log::Entry, flag: Option<&'static str>| {
        entry.response_flags = flag;
        entry.duration = started.elapsed();
        crate::report::log_entry(engine.reporter(), &proxy.access_logs, entry);
    };
    // A connection has no headers: a header-named cluster is never found.
    let name = match &proxy.target {
        ClusterTarget::Header(_) => None,
        target => crate::route::pick_cluster(target, &http::HeaderMap::new()).map(|(n, _)| n),
    };
    let Some(cluster) = name.and_then(|n| state.clusters.get(&*n).cloned()) else {
        warn!(stat_prefix = %proxy.stat_prefix, "tcp_proxy: no such cluster; closing");
        engine.stats().local_reply("NC");
        log(entry, Some("NC"));
        return;
    };
    entry.upstream_cluster = Some(cluster.label.clone());
    let host = match &cluster.config.discovery {
        Discovery::OriginalDst { .. } => Some(Host::transient(accepted.destination)),
        _ => lb::pick(&cluster),
    };
    let Some(host) = host else {
        engine.stats().local_reply("UH");
        debug!(cluster = %cluster.name(), "tcp_proxy: no healthy upstream; closing");
        log(entry, Some("UH"));
        return;
    };
    entry.upstream_host = Some(host.address);
    let opened = match cluster
        .open(host.address, &accepted.source, engine.connector())
        .await
    {
        Ok(o) => o,
        Err(e) => {
            cluster.record(&host, Outcome::GatewayError);
            engine.stats().local_reply("UF");
            debug!(cluster = %cluster.name(), upstream = %host.address, error = %e, "tcp_proxy: connect failed");
            log(entry, Some("UF"));
            return;
        }
    };
    let mut upstream = opened.stream;
    let report = engine
        .reporter()
        .tcp_connection(&accepted.source, host.address);
    if let Some((m, labels)) = &report {
        m.opened.get_or_create(labels).inc();
    }
    let (up, down) = match relay(&mut client, &mut upstream, proxy.idle_timeout).await {
        Ok((up, down)) => {
            debug!(
                bytes_up = up,
                bytes_down = down,
                "tcp_proxy connection closed"
            );
            (up, down)
        }
        Err(e) => {
            debug!(error = %e, "tcp_proxy connection failed");
            (0, 0)
        }
    };
    // Counted at the end (a failed relay's bytes are not known; it counts as closed).
    if let Some((m, labels)) = &report {
        m.received_bytes.get_or_create(labels).inc_by(up);
        m.sent_bytes.get_or_create(labels).inc_by(down);
        m.closed.get_or_create(labels).inc();
    }
    entry.bytes_received = up;
    entry.bytes_sent = down;
    log(entry, None);
}

/// Copies both ways until both directions have ended, or nothing moved for `idle`
/// (`Duration::ZERO`: no idle timeout). Returns the bytes copied client→upstream and back.
pub async fn relay<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let origin = Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = one_way(&mut ar, &mut bw, &last, origin, idle);
    let down = one_way(&mut br, &mut aw, &last, origin, idle);
    let (up, down) = tokio::try_join!(up, down)?;
    Ok((up, down))
}

async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    last: &AtomicU64,
    origin: Instant,
    idle: Duration,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = if idle.is_zero() {
            r.read(&mut buf).await?
        } else {
            loop {
                // Wait until `idle` has passed since the last activity in either direction.
                let since = origin
                    .elapsed()
                    .saturating_sub(Duration::from_micros(last.load(Ordering::Relaxed)));
                let Some(left) = idle.checked_sub(since).filter(|d| !d.is_zero()) else {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                };
                if let Ok(read) = tokio::time::timeout(left, r.read(&mut buf)).await {
                    break read?;
                }
            }
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        last.store(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}
