//! The byte relay between a pod's connection and its destination.
//!
//! Each direction reads into its own bounded buffer and writes it out before reading again,
//! so a slow receiver slows its sender (TCP backpressure end to end, no unbounded queue).
//! End of stream in one direction becomes a half-close (`shutdown(SHUT_WR)`) on the other
//! socket; the relay ends when both directions have ended, on an I/O error, or after
//! `idle_timeout` without a byte either way.
//!
//! A relay can be *parked* for a handoff to a new agent process: each direction stops at a
//! read boundary (never with bytes read but not yet written), and once every live direction
//! is parked [`relay`] returns [`Outcome::Parked`] with the state needed to continue
//! elsewhere. If the pause is withdrawn before that, parked directions simply continue.
use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::{Notify, watch},
    time::Instant,
};

/// Which directions already ended (EOF read and the write side shut down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Client to destination.
    pub upstream_done: bool,
    /// Destination to client.
    pub downstream_done: bool,
}

/// How a relay ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Done,
    /// No byte moved for the idle timeout.
    IdleTimeout,
    /// An I/O error on either socket.
    Error(io::Error),
    /// Paused for a handoff; the sockets are intact and can be relayed again.
    Parked(Progress),
}

/// Byte counters of one connection (Istio's received = client to destination, sent =
/// destination to client).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub received: Counter,
    pub sent: Counter,
}

/// Relay settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub idle_timeout: Duration,
    pub buffer_size: usize,
}

/// Relays between `client` and `upstream` until one of the [`Outcome`]s. `pause` is the
/// handoff switch (true = park).
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    progress: Progress,
    settings: Settings,
    counters: &Counters,
    pause: &watch::Receiver<bool>,
) -> Outcome {
    let (mut client_r, mut client_w) = client.split();
    let (mut up_r, mut up_w) = upstream.split();
    let up_done = AtomicBool::new(progress.upstream_done);
    let down_done = AtomicBool::new(progress.downstream_done);
    let live = usize::from(!progress.upstream_done) + usize::from(!progress.downstream_done);
    let park = Park {
        live: AtomicUsize::new(live),
        parked: AtomicUsize::new(0),
        all_parked: Notify::new(),
    };
    let clock = Activity::new();

    let to_upstream = Pump {
        bytes: &counters.received,
        done: &up_done,
        clock: &clock,
        park: &park,
    };
    let to_client = Pump {
        bytes: &counters.sent,
        done: &down_done,
        clock: &clock,
        park: &park,
    };
    let both = async {
        tokio::try_join!(
            to_upstream.run(
                &mut client_r,
                &mut up_w,
                settings.buffer_size,
                pause.clone()
            ),
            to_client.run(
                &mut up_r,
                &mut client_w,
                settings.buffer_size,
                pause.clone()
            ),
        )
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Error(e),
        },
        () = park.wait_all_parked() => Outcome::Parked(Progress {
            upstream_done: up_done.load(Ordering::Acquire),
            downstream_done: down_done.load(Ordering::Acquire),
        }),
        () = clock.idle(settings.idle_timeout) => Outcome::IdleTimeout,
    }
}

/// One direction of a relay.
struct Pump<'a> {
    bytes: &'a Counter,
    /// Set once this direction reached end of stream and shut its writer down.
    done: &'a AtomicBool,
    clock: &'a Activity,
    park: &'a Park,
}

impl Pump<'_> {
    /// Copies until end of stream (then shuts the writer down) or an error. Parking
    /// happens inside, at a read boundary, so no byte is ever held back.
    async fn run<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
        buffer_size: usize,
        mut pause: watch::Receiver<bool>,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut buf = vec![0u8; buffer_size];
        // Without a sender no pause can come; stop watching instead of spinning.
        let mut watching = true;
        loop {
            if watching && *pause.borrow_and_update() {
                self.park.park();
                // Either the relay is dropped here (everything parked: handed off), or
                // the pause is withdrawn and this direction carries on.
                watching = pause.wait_for(|p| !*p).await.is_ok();
                self.park.unpark();
                continue;
            }
            let n = tokio::select! {
                biased;
                r = pause.changed(), if watching => {
                    watching = r.is_ok();
                    continue;
                }
                r = reader.read(&mut buf) => r?,
            };
            if n == 0 {
                writer.shutdown().await?;
                self.done.store(true, Ordering::Release);
                self.park.finish();
                return Ok(());
            }
            self.bytes.inc_by(n as u64);
            self.clock.touch();
            writer.write_all(&buf[..n]).await?;
            self.clock.touch();
        }
    }
}

/// Parking bookkeeping shared by the two directions of one relay.
struct Park {
    /// Directions that have not ended.
    live: AtomicUsize,
    parked: AtomicUsize,
    all_parked: Notify,
}

impl Park {
    fn park(&self) {
        let parked = self.parked.fetch_add(1, Ordering::AcqRel) + 1;
        if parked >= self.live.load(Ordering::Acquire) {
            self.all_parked.notify_one();
        }
    }

    fn unpark(&self) {
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// A direction ended; if the other one is parked, everything live is parked.
    fn finish(&self) {
        let live = self.live.fetch_sub(1, Ordering::AcqRel) - 1;
        if live > 0 && self.parked.load(Ordering::Acquire) >= live {
            self.all_parked.notify_one();
        }
    }

    async fn wait_all_parked(&self) {
        loop {
            self.all_parked.notified().await;
            let live = self.live.load(Ordering::Acquire);
            if live > 0 && self.parked.load(Ordering::Acquire) >= live {
                return;
            }
        }
    }
}

/// When bytes last moved.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests;
