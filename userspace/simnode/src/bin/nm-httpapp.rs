//! `nm-httpapp`: the HTTP application inside simulated pods. A server that answers
//! HTTP/1.1, h2c, gRPC and upgrades on one port (see `nodemesh_simnode::echo`), and clients
//! that print one JSON object on stdout for the test to read. Everything runs under a
//! deadline: a stall is reported as a failure, never a hang.
//!
//! ```text
//! nm-httpapp serve --listen 0.0.0.0:8080 --name server
//! nm-httpapp request --connect 198.18.0.3:8080 --authority api --path /x [--h2c] [--header k=v] [--count N]
//! nm-httpapp grpc --connect 198.18.0.3:8080 --authority api [--count N] [--status 14] [--timeout-ms 500]
//! nm-httpapp upgrade --connect 198.18.0.3:8080 --authority api --bytes 65536
//! nm-httpapp load --connect 198.18.0.3:8080 --authority api --protocol h2c --rate 1000
//! ```
use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_api::echo::{EchoRequest, echo_client::EchoClient};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Parser)]
#[command(about = "HTTP/gRPC test application for simulated pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1, h2c, gRPC and upgrades until killed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Reported in every answer (which upstream answered).
        #[arg(long)]
        name: String,
    },
    /// HTTP requests on one connection; prints every status and what the upstream saw.
    Request {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name=value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "")]
        body: String,
        /// HTTP/2 with prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        h2c: bool,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Include each response body as text (`body`).
        #[arg(long)]
        print_body: bool,
    },
    /// gRPC unary calls on one channel.
    Grpc {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Ask the server to answer with this gRPC status.
        #[arg(long, default_value_t = 0)]
        status: u32,
        /// Ask the server to wait this long.
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// The call's deadline (sent as grpc-timeout).
        #[arg(long)]
        deadline_ms: Option<u64>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Load at a fixed rate or closed loop, with latency percentiles (see
    /// `nodemesh_simnode::load`).
    Load {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long, value_enum, default_value = "http1")]
        protocol: nodemesh_simnode::load::Protocol,
        /// Requests per second over all connections; 0 for closed loop.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 1024)]
        response_bytes: usize,
    },
    /// An `Upgrade: websocket` request, then bytes echoed through the upgraded connection.
    Upgrade {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nm-httpapp: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.cmd));
    match result {
        Ok(doc) => {
            println!("{doc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<serde_json::Value> {
    match cmd {
        Cmd::Serve { listen, name } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind {listen}"))?;
            // The harness waits for this line.
            println!("listening on {listen}");
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            nodemesh_simnode::echo::serve_forever(&name, listener).await;
            Ok(json!({ "ok": true }))
        }
        Cmd::Request {
            connect,
            authority,
            path,
            method,
            headers,
            body,
            h2c,
            count,
            timeout_ms,
            print_body,
        } => {
            let req = RequestSpec {
                authority,
                path,
                method,
                headers: parse_headers(&headers)?,
                body,
                print_body,
            };
            deadline(timeout_ms, requests(connect, &req, h2c, count)).await
        }
        Cmd::Grpc {
            connect,
            authority,
            count,
            status,
            delay_ms,
            deadline_ms,
            timeout_ms,
        } => {
            let call = CallSpec {
                status,
                delay_ms,
                deadline: deadline_ms.map(Duration::from_millis),
            };
            deadline(timeout_ms, grpc(connect, &authority, count, &call)).await
        }
        Cmd::Upgrade {
            connect,
            authority,
            path,
            bytes,
            timeout_ms,
        } => deadline(timeout_ms, upgrade(connect, &authority, &path, bytes)).await,
        Cmd::Load {
            connect,
            authority,
            protocol,
            rate,
            connections,
            duration_ms,
            warmup_ms,
            response_bytes,
        } => {
            let plan = nodemesh_simnode::load::Plan {
                connect,
                authority,
                protocol,
                rate,
                connections,
                duration: Duration::from_millis(duration_ms),
                warmup: Duration::from_millis(warmup_ms),
                response_bytes,
            };
            let limit = duration_ms + warmup_ms + 30_000;
            deadline(limit, async move {
                Ok(serde_json::to_value(
                    nodemesh_simnode::load::run(plan).await?,
                )?)
            })
            .await
        }
    }
}

async fn deadline<F>(ms: u64, fut: F) -> anyhow::Result<serde_json::Value>
where
    F: Future<Output = anyhow::Result<serde_json::Value>>,
{
    match tokio::time::timeout(Duration::from_millis(ms), fut).await {
        Ok(r) => r,
        Err(_) => bail!("deadline of {ms} ms passed"),
    }
}

fn parse_headers(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--header {h:?}: expected name=value"))
        })
        .collect()
}

struct RequestSpec {
    authority: String,
    path: String,
    method: String,
    headers: Vec<(String, String)>,
    body: String,
    print_body: bool,
}

impl RequestSpec {
    fn build(&self, h2: bool) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder().method(self.method.as_str());
        b = if h2 {
            b.uri(format!("http://{}{}", self.authority, self.path))
        } else {
            b.uri(self.path.as_str())
                .header(header::HOST, self.authority.as_str())
        };
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        Ok(b.body(Full::new(Bytes::from(self.body.clone())))?)
    }
}

async fn requests(
    connect: SocketAddr,
    spec: &RequestSpec,
    h2c: bool,
    count: usize,
) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::net::TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let mut responses = Vec::with_capacity(count);
    if h2c {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        for _ in 0..count {
            let resp = sender.clone().send_request(spec.build(true)?).await?;
            responses.push(describe(resp, spec.print_body).await?);
        }
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(conn);
        for _ in 0..count {
            sender.ready().await.context("connection closed")?;
            let resp = sender.send_request(spec.build(false)?).await?;
            responses.push(describe(resp, spec.print_body).await?);
        }
    }
    Ok(json!({ "ok": true, "responses": responses }))
}

async fn describe(
    resp: http::Response<hyper::body::Incoming>,
    print_body: bool,
) -> anyhow::Result<serde_json::Value> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.context("response body")?.to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let mut doc = json!({
        "status": parts.status.as_u16(),
        "headers": headers,
        "upstream": seen.get("upstream"),
        "seen": seen,
        "body_bytes": body.len(),
    });
    if print_body {
        doc["body"] = String::from_utf8_lossy(&body).into_owned().into();
    }
    Ok(doc)
}

struct CallSpec {
    status: u32,
    delay_ms: u32,
    deadline: Option<Duration>,
}

async fn grpc(
    connect: SocketAddr,
    authority: &str,
    count: usize,
    call: &CallSpec,
) -> anyhow::Result<serde_json::Value> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))?
        .origin(format!("http://{authority}").parse()?)
        .connect_with_connector(Connector(connect))
        .await
        .context("gRPC channel")?;
    let mut client = EchoClient::new(channel);
    let mut results = Vec::with_capacity(count);
    for i in 0..count {
        let mut req = tonic::Request::new(EchoRequest {
            payload: format!("call {i}").into_bytes(),
            status: call.status,
            delay_ms: call.delay_ms,
            reply_bytes: 0,
        });
        if let Some(d) = call.deadline {
            req.set_timeout(d);
        }
        results.push(match client.unary(req).await {
            Ok(resp) => {
                let reply = resp.into_inner();
                json!({
                    "code": 0,
                    "server": reply.server,
                    "peer": reply.peer,
                    "authority": reply.authority,
                    "payload_ok": reply.payload == format!("call {i}").into_bytes(),
                    "grpc_timeout": reply.grpc_timeout,
                })
            }
            Err(status) => json!({
                "code": status.code() as i32,
                "message": status.message(),
            }),
        });
    }
    Ok(json!({ "ok": true, "calls": results }))
}

/// Connects every channel to one address whatever the URI's authority says (the authority
/// is what the proxy routes on).
#[derive(Clone, Copy)]
struct Connector(SocketAddr);

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

async fn upgrade(
    connect: SocketAddr,
    authority: &str,
    path: &str,
    bytes: usize,
) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::net::TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    if status != 101 {
        return Ok(json!({ "ok": true, "status": status, "echoed": 0 }));
    }
    let upgraded = hyper::upgrade::on(resp).await.context("upgrade")?;
    let io = TokioIo::new(upgraded);
    let (mut rd, mut wr) = tokio::io::split(io);
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let send = {
        let pattern = pattern.clone();
        async move {
            wr.write_all(&pattern).await?;
            wr.shutdown().await?;
            Ok::<_, std::io::Error>(())
        }
    };
    let receive = async move {
        let mut got = Vec::with_capacity(bytes);
        rd.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    let ((), got) = tokio::try_join!(send, receive)?;
    Ok(json!({
        "ok": true,
        "status": status,
        "echoed": got.len(),
        "intact": got == pattern,
    }))
}
