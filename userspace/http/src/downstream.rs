//! A downstream HTTP connection's own timers, as Envoy's connection manager keeps them:
//!
//! - the **idle timeout** (`common_http_protocol_options.idle_timeout`, 1 h by default):
//!   a connection with no active stream for that long is shut down gracefully (HTTP/1.1:
//!   closed once idle; HTTP/2: GOAWAY);
//! - the **request headers timeout** (`request_headers_timeout`; nodemesh applies 30 s when
//!   it is unset, see ARCHITECTURE.md): from the first byte of a request's headers to the
//!   last. The timer starts at that first byte, so a kept-alive connection waiting for its
//!   next request is governed by the idle timeout only. A connection whose headers do not
//!   complete in time is closed.
//!
//! A stream is active from its complete request headers until its response body has been
//! sent (or dropped).
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
    time::Instant,
};

use crate::{BoxError, idle::Activity};

/// What the connection's timers watch.
#[derive(Debug)]
pub(crate) struct Tracker {
    active: AtomicUsize,
    /// Touched whenever the number of active streams changes.
    changes: Activity,
    /// When the first byte of the request headers being read now arrived.
    head_started: Mutex<Option<Instant>>,
    head_notify: Notify,
}

/// Why a connection's timers ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No active stream for the idle timeout: shut down gracefully.
    Idle,
    /// Request headers incomplete after the headers timeout: close now.
    Headers,
}

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            changes: Activity::new(),
            head_started: Mutex::new(None),
            head_notify: Notify::new(),
        })
    }

    /// A request's headers are complete: the stream is active until the guard (moved into
    /// the response body) is dropped.
    pub fn stream_started(self: &Arc<Self>) -> StreamGuard {
        *self.head_started.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.active.fetch_add(1, Ordering::AcqRel);
        self.changes.touch();
        StreamGuard(self.clone())
    }

    /// Bytes arrived: the first ones while no stream is active start a request's headers.
    fn bytes_read(&self) {
        if self.active.load(Ordering::Acquire) != 0 {
            return;
        }
        let mut started = self.head_started.lock().unwrap_or_else(|p| p.into_inner());
        if started.is_none() {
            *started = Some(Instant::now());
            self.head_notify.notify_one();
        }
    }

    /// Resolves when one of the timers expires.
    pub async fn expired(&self, idle: Option<Duration>, headers: Duration) -> Expired {
        let idle_timer = async {
            loop {
                self.changes.expired_since(self.changes.epoch(), idle).await;
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Streams are active: the idle period starts again when they end.
                self.changes.touch();
            }
        };
        let header_timer = async {
            loop {
                let started = *self.head_started.lock().unwrap_or_else(|p| p.into_inner());
                match started {
                    Some(at) if Instant::now() >= at + headers => return,
                    Some(at) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at + headers) => {}
                            () = self.head_notify.notified() => {}
                        }
                    }
                    None => self.head_notify.notified().await,
                }
            }
        };
        tokio::select! {
            () = idle_timer => Expired::Idle,
            () = header_timer => Expired::Headers,
        }
    }
}

/// Keeps a stream active; dropping it ends the stream.
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<Tracker>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changes.touch();
    }
}

pin_project_lite::pin_project! {
    /// The connection's socket, reporting reads to its [`Tracker`].
    pub(crate) struct Watched<T> {
        #[pin]
        inner: T,
        tracker: Arc<Tracker>,
    }
}

impl<T> Watched<T> {
    pub fn new(inner: T, tracker: Arc<Tracker>) -> Self {
        Self { inner, tracker }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.tracker.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream active until it is done or dropped.
    pub(crate) struct Guarded<B> {
        #[pin]
        inner: B,
        guard: Option<StreamGuard>,
    }
}

impl<B> Guarded<B> {
    pub fn new(inner: B, guard: StreamGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> Body for Guarded<B>
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
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_only_without_streams_and_headers_from_the_first_byte() {
        let t = Tracker::new();
        let guard = t.stream_started();
        let timers = {
            let t = t.clone();
            tokio::spawn(async move {
                t.expired(Some(Duration::from_millis(100)), Duration::from_millis(50))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !timers.is_finished(),
            "an active stream keeps the connection"
        );
        drop(guard);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(timers.await.expect("timers"), Expired::Idle);

        let timers = {
            let t = t.clone();
            tokio::spawn(async move { t.expired(None, Duration::from_millis(50)).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!timers.is_finished(), "no header byte yet: no header timer");
        t.bytes_read();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(timers.await.expect("timers"), Expired::Headers);
    }
}
