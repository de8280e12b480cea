//! The data plane's threads: one single-threaded tokio runtime per worker (Envoy's worker
//! model, thread-per-core), each with its own I/O driver and timers.
//!
//! A connection is handed to one worker when it is accepted and stays there: its
//! downstream task, the upstream connections its requests open (pools are per worker, see
//! [`current`]) and every task they spawn run on that one thread. A request therefore
//! never wakes another thread. With a work-stealing runtime it did: the two tokio workers
//! woke each other through a futex about twice per request, and one request cost about a
//! third more CPU with two workers than with one (ARCHITECTURE.md, "The request path's
//! cost").
//!
//! New connections go to the worker with the fewest open connections (ties: in turn), so
//! long-lived connections spread evenly; the count per worker is the
//! `nodemesh_worker_connections{worker}` gauge. A connection whose socket cannot move to
//! its worker (the kernel refusing to deregister or register it) is closed, logged and
//! counted in `nodemesh_worker_handoff_failures_total`.
//!
//! [`Workers::current`] is the same interface over the runtime the caller is already on
//! (tests, tools): everything is spawned there.
use std::{
    cell::Cell,
    future::Future,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpStream, runtime::Handle, sync::oneshot, task};
use tracing::warn;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker this thread is (0 outside of [`Workers::start`]'s threads).
///
/// Keys per-worker state such as upstream connection pools, so that a connection opened by
/// one worker is only used by requests running on that worker.
pub fn current() -> usize {
    INDEX.get()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// The data plane's workers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Workers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    workers: Vec<Worker>,
    /// Where the next tie is broken.
    next: AtomicUsize,
    connections: Family<WorkerLabel, Gauge>,
    /// Accepted connections dropped because their socket could not move to a worker.
    handoff_failures: Counter,
    /// The workers are this value's threads (not the caller's runtime): sockets accepted
    /// elsewhere move to them.
    own_threads: bool,
    threads: Mutex<Vec<(oneshot::Sender<Duration>, JoinHandle<()>)>>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Connections open on this worker.
    open: Gauge,
}

impl Workers {
    /// Starts `n` (at least one) worker threads named `{name}-{index}`, each running its
    /// own single-threaded runtime until [`Self::shutdown`].
    pub fn start(n: usize, name: &str) -> io::Result<Self> {
        let connections = Family::<WorkerLabel, Gauge>::default();
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for index in 0..n.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<Duration>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    INDEX.set(index);
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => return drop(ready_tx.send(Err(e))),
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Dropped sender (the Workers went away): stop at once.
                    let grace = runtime.block_on(stop_rx).unwrap_or_default();
                    runtime.shutdown_timeout(grace);
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other(format!("worker {index} died starting")))??;
            let open = connections
                .get_or_create(&WorkerLabel {
                    worker: index.to_string(),
                })
                .clone();
            workers.push(Worker { handle, open });
            threads.push((stop_tx, thread));
        }
        Ok(Self::from_workers(workers, connections, threads))
    }

    /// The runtime the caller runs on, as a single worker.
    ///
    /// # Panics
    /// Outside of a tokio runtime.
    pub fn current() -> Self {
        let connections = Family::<WorkerLabel, Gauge>::default();
        let open = connections
            .get_or_create(&WorkerLabel { worker: "0".into() })
            .clone();
        let worker = Worker {
            handle: Handle::current(),
            open,
        };
        Self::from_workers(vec![worker], connections, Vec::new())
    }

    fn from_workers(
        workers: Vec<Worker>,
        connections: Family<WorkerLabel, Gauge>,
        threads: Vec<(oneshot::Sender<Duration>, JoinHandle<()>)>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                workers,
                next: AtomicUsize::new(0),
                connections,
                handoff_failures: Counter::default(),
                own_threads: !threads.is_empty(),
                threads: Mutex::new(threads),
            }),
        }
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.inner.workers.len()
    }

    /// Never: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Worker 0's runtime: where the data plane's own background work runs (health checks,
    /// DNS refresh, the xDS client), off the control thread.
    pub fn home(&self) -> &Handle {
        &self.inner.workers[0].handle
    }

    /// Open connections per worker, by index.
    pub fn connections(&self) -> Vec<i64> {
        self.inner.workers.iter().map(|w| w.open.get()).collect()
    }

    /// Registers `nodemesh_worker_connections{worker}` and
    /// `nodemesh_worker_handoff_failures_total`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("nodemesh");
        registry.register(
            "worker_connections",
            "Connections open on each data-plane worker",
            self.inner.connections.clone(),
        );
        registry.register(
            "worker_handoff_failures",
            "Accepted connections dropped because their socket could not move to a worker",
            self.inner.handoff_failures.clone(),
        );
    }

    /// Serves an accepted connection on the worker with the fewest open connections,
    /// counted there until `serve` ends.
    ///
    /// A tokio socket belongs to the I/O driver of the runtime that created it (here the
    /// accepting one); left there, every read would be woken on that thread. So the socket
    /// is moved to the worker's driver first: deregistered here, registered there.
    pub fn spawn_connection<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if !self.inner.own_threads {
            self.spawn_counted(serve(stream));
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                self.inner.handoff_failures.inc();
                return warn!(error = %e, "cannot move an accepted connection to a worker");
            }
        };
        let failures = self.inner.handoff_failures.clone();
        self.spawn_counted(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    failures.inc();
                    warn!(worker = current(), error = %e, "cannot register an accepted connection on its worker");
                }
            }
        });
    }

    /// Runs `fut` on the least loaded worker, counted as an open connection there. Sockets
    /// the future uses must be created inside it (`TcpStream::from_std` on the worker), or
    /// moved as [`Self::spawn_connection`] does.
    pub fn spawn_counted<F>(&self, fut: F) -> task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let worker = &self.inner.workers[self.pick()];
        let open = Open::new(worker.open.clone());
        worker.handle.spawn(async move {
            let _open = open;
            fut.await
        })
    }

    fn pick(&self) -> usize {
        let workers = &self.inner.workers;
        let n = workers.len();
        if n == 1 {
            return 0;
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| workers[i].open.get())
            .unwrap_or(start)
    }

    /// Stops the worker threads: tasks still running get `grace` to finish, then are
    /// dropped (their sockets close). Returns once every thread has ended. Idempotent; a
    /// [`Self::current`] has no threads of its own and is left alone.
    pub fn shutdown(&self, grace: Duration) {
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut joins = Vec::new();
        for (stop, thread) in threads {
            let _ = stop.send(grace);
            joins.push(thread);
        }
        for thread in joins {
            let _ = thread.join();
        }
    }
}

/// One open connection on a worker, for as long as it lives.
struct Open(Gauge);

impl Open {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn connections_run_on_the_least_loaded_worker_and_stay_there() {
        let workers = Workers::start(3, "nm-test-worker").expect("workers");
        assert_eq!(workers.len(), 3);
        // Three long connections: one per worker, each on its own thread and index.
        let mut release = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel::<()>();
            let (where_tx, where_rx) = std::sync::mpsc::channel();
            workers.spawn_counted(async move {
                let before = (current(), std::thread::current().id());
                // A task spawned by the connection runs on its worker too.
                let child = tokio::spawn(async { (current(), std::thread::current().id()) })
                    .await
                    .expect("child");
                where_tx.send((before, child)).expect("send");
                let _ = rx.await;
            });
            let (before, child) = where_rx.recv_timeout(Duration::from_secs(5)).expect("ran");
            assert_eq!(before, child, "a spawned task left its worker");
            seen.push(before);
            release.push(tx);
        }
        let indexes: HashSet<_> = seen.iter().map(|(i, _)| *i).collect();
        let threads: HashSet<_> = seen.iter().map(|(_, t)| *t).collect();
        assert_eq!(indexes, HashSet::from([0, 1, 2]), "{seen:?}");
        assert_eq!(threads.len(), 3);
        assert_eq!(workers.connections(), vec![1, 1, 1]);

        // The second worker's connection ends: the next one goes there.
        let worker_of_second = seen[1].0;
        release.remove(1).send(()).expect("release");
        wait_for(|| workers.connections()[worker_of_second] == 0);
        let (where_tx, where_rx) = std::sync::mpsc::channel();
        workers.spawn_counted(async move { where_tx.send(current()).expect("send") });
        assert_eq!(
            where_rx.recv_timeout(Duration::from_secs(5)).expect("ran"),
            worker_of_second
        );
        drop(release);
        wait_for(|| workers.connections() == vec![0, 0, 0]);
        workers.shutdown(Duration::from_secs(1));
        // Idempotent.
        workers.shutdown(Duration::from_secs(1));
    }

    #[test]
    fn shutdown_drops_what_is_still_running_after_the_grace_time() {
        let workers = Workers::start(2, "nm-test-worker").expect("workers");
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..2 {
            let guard = dropped_tx.clone();
            workers.spawn_counted(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        drop(dropped_tx);
        workers.shutdown(Duration::from_millis(10));
        // Every sender was dropped with its task: the channel is closed, not waiting.
        assert_eq!(
            dropped_rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
        assert_eq!(workers.connections(), vec![0, 0]);
    }

    #[tokio::test]
    async fn current_is_the_callers_runtime() {
        let workers = Workers::current();
        assert_eq!(workers.len(), 1);
        let here = std::thread::current().id();
        let there = workers
            .spawn_counted(async { std::thread::current().id() })
            .await
            .expect("ran");
        assert_eq!(here, there);
        workers.shutdown(Duration::ZERO);
    }

    #[test]
    fn an_accepted_socket_is_served_by_its_workers_driver() {
        use std::io::{Read, Write};

        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let workers = Workers::start(2, "nm-test-worker").expect("workers");
        let control = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (where_tx, where_rx) = std::sync::mpsc::channel();
        let mut client = control.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            workers.spawn_connection(accepted, |mut stream| async move {
                let mut buf = [0u8; 4];
                stream.read_exact(&mut buf).await.expect("read");
                stream.write_all(&buf).await.expect("write");
                let _ = where_tx.send(std::thread::current().name().map(str::to_owned));
            });
            client
        });
        // The accepting runtime is not driven any more: had the socket stayed with its
        // driver, the worker (which has polled it by now and waits for readiness) would
        // never hear of the bytes and this read would time out.
        std::thread::sleep(Duration::from_millis(200));
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client.write_all(b"ping").expect("write");
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).expect("echo from the worker");
        assert_eq!(&echo, b"ping");
        let name = where_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("served")
            .expect("named thread");
        assert!(name.starts_with("nm-test-worker-"), "{name}");
        drop(control);
        workers.shutdown(Duration::from_secs(1));
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached in 5 s");
    }
}
