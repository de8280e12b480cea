//! The load generator of the benchmarks (`nm-httpapp load`): HTTP/1.1, h2c or gRPC unary
//! requests against one address, at a fixed rate or as fast as possible, with latency
//! histograms (HdrHistogram) and the generator's own CPU time.
//!
//! Why not oha or wrk: the benchmark needs gRPC unary calls and HTTP/1.1 and h2c with the
//! same timing rules, and a client that runs inside a simulated pod (its network namespace
//! and cgroup, so the kernel captures it like any pod), started by the harness like the
//! other pod applications. The rules are the usual ones:
//!
//! - **Fixed rate** (`rate > 0`): request *i* of a connection is due at
//!   `start + i / (rate / connections)`. HTTP/1.1 sends one request at a time per
//!   connection; a request that the previous response held past its due time counts from
//!   that due time, so a stalled connection counts every request it delayed (no
//!   coordinated omission). Any other request counts from its send: the generator's own
//!   timer firing late is not latency (tokio's timers have millisecond granularity, which
//!   would otherwise add a millisecond of noise to every request of every scenario). h2c and gRPC start each
//!   request at its due time on the shared connection, and count from the send.
//! - **Closed loop** (`rate == 0`): each connection sends its next request when the
//!   previous one is answered; the result is the maximum throughput.
//! - A warm-up period is sent and not recorded.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_api::echo::{EchoRequest, echo_client::EchoClient};
use serde::Serialize;
use tokio::time::Instant;

/// Which protocol the load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    H2c,
    Grpc,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connect: SocketAddr,
    pub authority: String,
    pub protocol: Protocol,
    /// Requests per second over all connections; 0: closed loop.
    pub rate: u64,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Response body size (asked of the echo server).
    pub response_bytes: usize,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub protocol: Protocol,
    pub rate: u64,
    pub connections: usize,
    /// Recorded (after warm-up) successful requests.
    pub requests: u64,
    pub errors: u64,
    pub throughput_rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// CPU seconds this process used (user + system) over the whole run.
    pub cpu_seconds: f64,
    pub first_error: Option<String>,
}

#[derive(Debug)]
struct Tally {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, latency: Duration, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.requests += 1;
                let us = latency.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
                let _ = self.hist.record(us.min(self.hist.high()));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// One request, ready to send on a connection of the plan's protocol.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Grpc(EchoClient<tonic::transport::Channel>),
}

impl Sender {
    async fn open(plan: &Plan) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(plan.connect).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        Ok(match plan.protocol {
            Protocol::Http1 => {
                let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                Sender::Http1(s)
            }
            Protocol::H2c => {
                let (s, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Sender::H2(s)
            }
            Protocol::Grpc => {
                let mut once = Some(io);
                let channel =
                    tonic::transport::Endpoint::from_shared(format!("http://{}", plan.authority))?
                        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                            let io = once.take();
                            async move { io.ok_or_else(|| std::io::Error::other("one connection")) }
                        }))
                        .await?;
                Sender::Grpc(EchoClient::new(channel))
            }
        })
    }

    fn request(plan: &Plan, h2: bool) -> Request<Full<Bytes>> {
        let b = if h2 {
            Request::get(format!("http://{}/load", plan.authority))
        } else {
            Request::get("/load").header(header::HOST, plan.authority.as_str())
        };
        b.header("x-echo-bytes", plan.response_bytes.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap_or_default()
    }

    /// Sends one request and reads the whole answer.
    async fn call(&mut self, plan: &Plan) -> Result<(), String> {
        match self {
            Sender::Http1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                let resp = s
                    .send_request(Self::request(plan, false))
                    .await
                    .map_err(|e| e.to_string())?;
                check(resp).await
            }
            Sender::H2(s) => {
                let resp = s
                    .send_request(Self::request(plan, true))
                    .await
                    .map_err(|e| e.to_string())?;
                check(resp).await
            }
            Sender::Grpc(c) => c
                .unary(EchoRequest {
                    payload: Vec::new(),
                    status: 0,
                    delay_ms: 0,
                    reply_bytes: plan.response_bytes as u32,
                })
                .await
                .map(drop)
                .map_err(|s| format!("grpc {}: {}", s.code(), s.message())),
        }
    }

    fn multiplexed(&self) -> bool {
        !matches!(self, Sender::Http1(_))
    }

    fn clone_mux(&self) -> Option<Self> {
        match self {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::Grpc(c) => Some(Sender::Grpc(c.clone())),
            Sender::Http1(_) => None,
        }
    }
}

async fn check(resp: http::Response<hyper::body::Incoming>) -> Result<(), String> {
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn cpu_seconds() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Runs the plan.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    let tally = Arc::new(Mutex::new(Tally {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        requests: 0,
        errors: 0,
        first_error: None,
    }));
    let start = Instant::now();
    let record_from = start + plan.warmup;
    let end = record_from + plan.duration;
    let connections = plan.connections.max(1);
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let sender = Sender::open(&plan).await?;
        let plan = plan.clone();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            connection(plan, sender, c, connections, start, record_from, end, tally).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let q = |p: f64| t.hist.value_at_quantile(p) as f64;
    Ok(Report {
        ok: t.errors == 0 && t.requests > 0,
        protocol: plan.protocol,
        rate: plan.rate,
        connections,
        requests: t.requests,
        errors: t.errors,
        throughput_rps: t.requests as f64 / plan.duration.as_secs_f64(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: t.hist.max() as f64,
        mean_us: t.hist.mean(),
        cpu_seconds: cpu_seconds(),
        first_error: t.first_error.clone(),
    })
}

#[allow(
    clippy::too_many_arguments,
    reason = "one connection's share of the plan"
)]
async fn connection(
    plan: Plan,
    mut sender: Sender,
    index: usize,
    connections: usize,
    start: Instant,
    record_from: Instant,
    end: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    if plan.rate == 0 {
        while Instant::now() < end {
            let sent = Instant::now();
            let result = sender.call(&plan).await;
            if sent >= record_from {
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(sent.elapsed(), result);
            }
        }
        return;
    }
    // This connection's share of the rate, offset so connections do not send in bursts.
    let interval = Duration::from_secs_f64(connections as f64 / plan.rate as f64);
    let mut due = start + interval.mul_f64(index as f64 / connections as f64);
    let mut inflight = Vec::new();
    let mut sent: u64 = 0;
    // When this connection could next send: the previous response (HTTP/1.1).
    let mut free = start;
    while due < end {
        tokio::time::sleep_until(due).await;
        sent += 1;
        if sent.is_multiple_of(256) {
            inflight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
        }
        let recorded = due >= record_from;
        if sender.multiplexed()
            && let Some(mut s) = sender.clone_mux()
        {
            let (plan, tally) = (plan.clone(), tally.clone());
            let sent_at = Instant::now();
            inflight.push(tokio::spawn(async move {
                let result = s.call(&plan).await;
                if recorded {
                    tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(sent_at.elapsed(), result);
                }
            }));
        } else {
            // A request the previous response held up counts from when it was due; any
            // other wait past `due` is the timer's, and the request counts from its send.
            let from = if free > due { due } else { Instant::now() };
            let result = sender.call(&plan).await;
            free = Instant::now();
            if recorded {
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(free - from, result);
            }
        }
        due += interval;
    }
    for t in inflight {
        let _ = t.await;
    }
}
