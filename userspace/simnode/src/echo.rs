//! The HTTP application of the simulated pods and of the L7 tests: one port that answers
//! HTTP/1.1, h2c (prior knowledge), gRPC (`nodemesh.echo.v1.Echo`) and WebSocket-style
//! upgrades, and tells the client what it received.
//!
//! An HTTP answer is a JSON document: the server's name, the client's address, method, path,
//! `:authority`,
//! protocol version, every request header, and the body (or its length when large). Request
//! headers steer the answer so that a test can produce every upstream outcome through a
//! proxy:
//!
//! | header | effect |
//! |---|---|
//! | `x-echo-status: N` | answer with status N |
//! | `x-echo-delay-ms: N` | wait N ms before the response headers |
//! | `x-echo-fail-first: N` | answer 503 to the first N requests this server sees |
//! | `x-echo-bytes: N` | answer with N bytes of body instead of the JSON document |
//! | `x-echo-reset-after: N` | send the headers and N body bytes, then abort the stream |
//! | `x-echo-response-header: k=v` | add a response header (repeatable) |
//!
//! A request with `Upgrade` is answered `101 Switching Protocols` and the upgraded
//! connection echoes bytes until the client closes it.
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_api::echo::{
    EchoReply, EchoRequest,
    echo_server::{Echo, EchoServer},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tower::ServiceExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Bodies up to this size are returned whole in the JSON document; larger ones by length.
const BODY_ECHO_LIMIT: usize = 64 << 10;

/// What every connection of one server shares.
#[derive(Debug)]
struct Shared {
    name: String,
    requests: AtomicU64,
}

/// A running echo server; stops when dropped.
#[derive(Debug)]
pub struct Running {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// Requests (HTTP and gRPC calls) served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

/// Binds `addr` and serves until the returned handle is dropped.
pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        name: name.to_owned(),
        requests: AtomicU64::new(0),
    });
    let task = tokio::spawn(serve(listener, shared.clone()));
    Ok(Running {
        name: name.to_owned(),
        addr,
        shared,
        task,
    })
}

/// Serves `listener` forever (the `nm-httpapp serve` entry point).
pub async fn serve_forever(name: &str, listener: TcpListener) {
    let shared = Arc::new(Shared {
        name: name.to_owned(),
        requests: AtomicU64::new(0),
    });
    serve(listener, shared).await;
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let grpc = tonic::service::Routes::new(EchoServer::new(GrpcEcho {
        shared: shared.clone(),
    }));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (shared, grpc) = (shared.clone(), grpc.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (shared, grpc) = (shared.clone(), grpc.clone());
                async move { Ok::<_, Infallible>(dispatch(&shared, grpc, req, peer).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn dispatch(
    shared: &Shared,
    grpc: tonic::service::Routes,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        // tonic hides the :authority; hand it to the service as metadata.
        let mut req = req;
        let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert("x-echo-authority", v);
        }
        if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
            req.headers_mut().insert("x-echo-peer", v);
        }
        return match grpc.oneshot(req).await {
            Ok(resp) => resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
            Err(never) => match never {},
        };
    }
    http_echo(shared, req, peer).await
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

async fn http_echo(shared: &Shared, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let n = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let number = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(ms) = number("x-echo-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut status = number("x-echo-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if number("x-echo-fail-first").is_some_and(|f| n <= f) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    let extra_headers: Vec<(String, String)> = req
        .headers()
        .get_all("x-echo-response-header")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    if req.headers().contains_key(header::UPGRADE) {
        return upgrade(req);
    }
    let reset_after = number("x-echo-reset-after");
    let sized = number("x-echo-bytes");
    let doc = describe(&shared.name, req, peer).await;

    let body = match (reset_after, sized) {
        (Some(after), _) => {
            let data = Bytes::from(vec![b'x'; after.min(1 << 20) as usize]);
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(data)),
                Err("x-echo-reset-after: aborting the response".into()),
            ];
            // The error makes hyper abort the stream (HTTP/2 RST_STREAM, HTTP/1.1 close)
            // after the data, with the response incomplete.
            let stream = futures_util::stream::iter(frames);
            UnsyncBoxBody::new(StreamBody::new(DelayedEnd::new(stream)))
        }
        (None, Some(len)) => full(vec![b'x'; len.min(64 << 20) as usize]),
        (None, None) => full(doc.to_string()),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&shared.name) {
        h.insert("x-upstream", v);
    }
    if sized.is_none() && reset_after.is_none() {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    for (k, v) in extra_headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.append(k, v);
        }
    }
    resp
}

/// The JSON document describing a request (its body is read here).
async fn describe(name: &str, req: Request<Incoming>, peer: SocketAddr) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match headers.get_mut(k.as_str()) {
            // Repeated headers are joined as a list would be on the wire.
            Some(serde_json::Value::String(existing)) => {
                existing.push(',');
                existing.push_str(v.as_str().unwrap_or_default());
            }
            _ => {
                headers.insert(k.to_string(), v);
            }
        }
    }
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let (body, trailers) = match req.into_body().collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().map(|t| {
                t.iter()
                    .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                    .collect::<Vec<_>>()
            });
            (Ok(collected.to_bytes()), trailers)
        }
        Err(e) => (Err(e.to_string()), None),
    };
    let body_value = match &body {
        Ok(b) if b.len() <= BODY_ECHO_LIMIT => {
            serde_json::Value::from(String::from_utf8_lossy(b).into_owned())
        }
        Ok(_) => serde_json::Value::Null,
        Err(e) => serde_json::Value::from(format!("<error: {e}>")),
    };
    serde_json::json!({
        "upstream": name,
        "peer": peer.to_string(),
        "method": method,
        "path": path,
        "authority": authority,
        "version": version,
        "headers": headers,
        "body": body_value,
        "body_bytes": body.as_ref().map_or(0, |b| b.len()),
        "trailers": trailers,
    })
}

/// `101 Switching Protocols`, then an echo of the upgraded connection.
fn upgrade(req: Request<Incoming>) -> Response<Body> {
    let protocol = req.headers().get(header::UPGRADE).cloned();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = protocol {
        h.insert(header::UPGRADE, p);
    }
    resp
}

pin_project_lite::pin_project! {
    /// Yields the inner stream's items with a short pause before the last one, so that the
    /// data frames reach the client before the stream is aborted.
    struct DelayedEnd<S> {
        #[pin]
        inner: S,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        yielded: usize,
    }
}

impl<S> DelayedEnd<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            sleep: None,
            yielded: 0,
        }
    }
}

impl<S: futures_util::Stream> futures_util::Stream for DelayedEnd<S> {
    type Item = S::Item;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.project();
        if *this.yielded == 1 {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            if sleep.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
        }
        let item = this.inner.poll_next(cx);
        if matches!(item, std::task::Poll::Ready(Some(_))) {
            *this.yielded += 1;
        }
        item
    }
}

/// `nodemesh.echo.v1.Echo`.
#[derive(Debug)]
struct GrpcEcho {
    shared: Arc<Shared>,
}

impl GrpcEcho {
    fn reply<T>(&self, req: &tonic::Request<T>, msg: &EchoRequest) -> EchoReply {
        let metadata = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some(format!("{}: {}", k, v.to_str().unwrap_or("?")))
                }
                tonic::metadata::KeyAndValueRef::Binary(_, _) => None,
            })
            .collect();
        let payload = if msg.reply_bytes > 0 {
            vec![b'x'; msg.reply_bytes.min(16 << 20) as usize]
        } else {
            msg.payload.clone()
        };
        EchoReply {
            payload,
            server: self.shared.name.clone(),
            peer: req
                .metadata()
                .get("x-echo-peer")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            authority: req
                .metadata()
                .get("x-echo-authority")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            metadata,
            grpc_timeout: req
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

type ReplyStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Echo for GrpcEcho {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        self.shared.requests.fetch_add(1, Ordering::SeqCst);
        let msg = request.get_ref().clone();
        if msg.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(msg.delay_ms.min(60_000)))).await;
        }
        if msg.status != 0 {
            return Err(tonic::Status::new(
                tonic::Code::from(msg.status as i32),
                format!("{} answered as asked", self.shared.name),
            ));
        }
        Ok(tonic::Response::new(self.reply(&request, &msg)))
    }

    type StreamStream = ReplyStream;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        self.shared.requests.fetch_add(1, Ordering::SeqCst);
        let server = self.shared.name.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let reply = EchoReply {
                    payload: msg.payload,
                    server: server.clone(),
                    ..EchoReply::default()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
