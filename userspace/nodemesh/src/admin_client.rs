//! A minimal HTTP/1 client for the agent's admin unix socket.
use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// `METHOD path` on `<run_dir>/admin.sock`; the body of a 2xx answer.
pub async fn request(run_dir: &Path, method: hyper::Method, path: &str) -> anyhow::Result<String> {
    let socket = run_dir.join("admin.sock");
    let stream = UnixStream::connect(&socket).await.with_context(|| {
        format!(
            "no agent answers at {} (is it running? --run-dir)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "nodemesh-agent")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{path}: {status}: {}", body.trim());
    }
    Ok(body)
}
