//! Activity on a stream, for the idle timeouts: the connection manager's stream idle timeout
//! (or the route's `idle_timeout`) and the router's `per_try_idle_timeout`. Every request
//! or response frame that moves counts as activity; a timer that finds no activity for its
//! whole period expires.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::BoxError;

/// The last moment something moved on a stream, and whether the request body has ended.
#[derive(Debug, Clone)]
pub(crate) struct Activity(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    epoch: Instant,
    /// Microseconds since `epoch`.
    last: AtomicU64,
    request_complete: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Self(Arc::new(Shared {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            request_complete: AtomicBool::new(false),
        }))
    }

    pub fn touch(&self) {
        let now = self.0.epoch.elapsed().as_micros() as u64;
        self.0.last.fetch_max(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.0.epoch + Duration::from_micros(self.0.last.load(Ordering::Relaxed))
    }

    pub fn request_complete(&self) -> bool {
        self.0.request_complete.load(Ordering::Relaxed)
    }

    pub fn set_request_complete(&self) {
        self.0.request_complete.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// When the stream started.
    pub fn epoch(&self) -> Instant {
        self.0.epoch
    }

    /// When the stream is idle for `timeout` unless something moves first, counting only
    /// what moved after `since` (`None` without a timeout).
    pub fn idle_due(&self, since: Instant, timeout: Option<Duration>) -> Option<Instant> {
        timeout.map(|t| self.last().max(since) + t)
    }

    /// Resolves once nothing has moved for `timeout` (never with `None`).
    #[cfg(test)]
    pub async fn expired(&self, timeout: Option<Duration>) {
        self.expired_since(self.0.epoch, timeout).await;
    }

    /// Resolves once nothing has moved for `timeout`, counting only what moved after
    /// `start` (never with `None`).
    pub async fn expired_since(&self, start: Instant, timeout: Option<Duration>) {
        loop {
            let Some(due) = self.idle_due(start, timeout) else {
                return std::future::pending().await;
            };
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that reports its frames and its end to an [`Activity`].
    pub(crate) struct Touching<B> {
        #[pin]
        inner: B,
        activity: Activity,
        received: Option<crate::report::BodyBytes>,
    }
}

impl<B> Touching<B> {
    /// `received` counts the data bytes that pass (the request body's size for reports).
    pub fn new(inner: B, activity: Activity, received: Option<crate::report::BodyBytes>) -> Self {
        Self {
            inner,
            activity,
            received,
        }
    }
}

impl<B> Body for Touching<B>
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
            Poll::Ready(None) => this.activity.set_request_complete(),
            Poll::Ready(Some(frame)) => {
                this.activity.touch();
                if let (Some(counter), Ok(frame)) = (this.received.as_ref(), frame)
                    && let Some(data) = frame.data_ref()
                {
                    counter.add(data.len());
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.activity.set_request_complete();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A re-armable timer for the response body: expires after `timeout` without a frame.
#[derive(Debug)]
pub(crate) struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep.as_mut().poll(cx).is_ready()
    }

    pub fn reset(&mut self) {
        let at = Instant::now() + self.timeout;
        self.sleep.as_mut().reset(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_expiry() {
        let a = Activity::new();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.expired(Some(Duration::from_millis(100))).await })
        };
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            a.touch();
            assert!(!waiter.is_finished(), "touched within the timeout");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(waiter.is_finished(), "idle for longer than the timeout");
    }
}
