//! HTTP/1 over the agent's admin unix socket.
use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// `METHOD path`; the body of a 2xx answer.
pub async fn unix_request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<String> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "agent")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    if !status.is_success() {
        bail!("{path}: {status}: {body}");
    }
    Ok(body)
}
