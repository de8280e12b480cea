//! A Kubernetes API server fixture: serves recorded pod and namespace objects the way the
//! real one does (list, then a chunked watch stream of `{"type","object"}` lines from the
//! list's resourceVersion), and lets the test change them while agents watch.
//!
//! Only what the agent's watcher uses: `GET /api/v1/pods` (with the node's field selector)
//! and `GET /api/v1/namespaces`, with and without `watch=true`. Every request line is kept
//! so a test can check what the client asked for.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

#[derive(Default)]
struct State {
    rv: u64,
    /// kind ("pods" | "namespaces") -> "ns/name" or "name" -> object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    watchers: Vec<(&'static str, mpsc::UnboundedSender<Bytes>)>,
    requests: Vec<String>,
}

/// The running fixture. Dropping it stops the server.
pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi").field("addr", &self.addr).finish()
    }
}

fn key_of(kind: &str, obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match (kind, obj["metadata"]["namespace"].as_str()) {
        ("pods", Some(ns)) => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

impl KubeApi {
    /// Serves on 127.0.0.1 inside the network namespace file `netns` (where the agent runs).
    pub fn start_in(netns: &Path) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let netns = std::fs::File::open(netns).with_context(|| format!("{}", netns.display()))?;
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                addr_tx.send(Ok(listener.local_addr()?))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(serve(listener, st, stop_rx))
            };
            if let Err(e) = run() {
                let _ = addr_tx.send(Err(e));
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the fixture API server did not start")??;
        Ok(Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (no TLS, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: agent\n\
             current-context: fixture\n",
            self.url()
        )
    }

    /// Adds or replaces an object; watchers get ADDED or MODIFIED.
    pub fn apply(&self, kind: &'static str, mut obj: Value) {
        let mut st = self.state.lock().expect("fixture state");
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let key = key_of(kind, &obj);
        let event = if st.objects.entry(kind).or_default().contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.entry(kind).or_default().insert(key, obj.clone());
        notify(&mut st, kind, event, &obj);
    }

    /// Changes an object without telling the watchers: a change made while they were not
    /// listening (what a relist must catch).
    pub fn apply_unseen(&self, kind: &'static str, mut obj: Value) {
        let mut st = self.state.lock().expect("fixture state");
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let key = key_of(kind, &obj);
        st.objects.entry(kind).or_default().insert(key, obj);
    }

    /// Ends every watch with the API server's `410 Gone` error event (what a client sees
    /// when its resourceVersion was compacted away): the client must list again.
    pub fn expire_watches(&self) {
        let mut st = self.state.lock().expect("fixture state");
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version: 1 (2)"}});
        let line = Bytes::from(format!("{gone}\n"));
        for (_, tx) in st.watchers.drain(..) {
            let _ = tx.send(line.clone());
        }
    }

    /// Removes an object; watchers get DELETED.
    pub fn delete(&self, kind: &'static str, key: &str) {
        let mut st = self.state.lock().expect("fixture state");
        st.rv += 1;
        if let Some(mut obj) = st.objects.entry(kind).or_default().remove(key) {
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            notify(&mut st, kind, "DELETED", &obj);
        }
    }

    /// The current object.
    pub fn get(&self, kind: &'static str, key: &str) -> Option<Value> {
        let st = self.state.lock().expect("fixture state");
        st.objects.get(kind).and_then(|m| m.get(key)).cloned()
    }

    /// Waits until `n` watch streams of `kind` are open.
    pub fn wait_watchers(
        &self,
        kind: &'static str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut st = self.state.lock().expect("fixture state");
                st.watchers.retain(|(_, tx)| !tx.is_closed());
                if st.watchers.iter().filter(|(k, _)| *k == kind).count() >= n {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no watch of {kind} within {timeout:?}; requests: {:?}",
                    self.requests()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every request line (`GET /api/v1/pods?...`) so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("fixture state").requests.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn notify(st: &mut State, kind: &str, event: &str, obj: &Value) {
    let line = Bytes::from(format!("{}\n", json!({"type": event, "object": obj})));
    st.watchers
        .retain(|(k, tx)| *k != kind || tx.send(line.clone()).is_ok());
}

type Body = BoxBody<Bytes, Infallible>;

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut stop => return Ok(()),
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let mut st = state.lock().expect("fixture state");
    st.requests
        .push(format!("{} {}?{}", req.method(), path, query));
    let kind: &'static str = match path {
        "/api/v1/pods" => "pods",
        "/api/v1/namespaces" => "namespaces",
        _ => {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{path} not served")});
            return json_response(404, &body);
        }
    };
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    if watch {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        st.watchers.push((kind, tx));
        let stream = futures_stream(rx);
        return Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .expect("response");
    }
    let items: Vec<Value> = st
        .objects
        .get(kind)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let list_kind = if kind == "pods" {
        "PodList"
    } else {
        "NamespaceList"
    };
    json_response(
        200,
        &json!({"kind": list_kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

/// The watch body: one frame per event line, open until the fixture stops.
fn futures_stream(
    rx: mpsc::UnboundedReceiver<Bytes>,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        |b| Ok(Frame::data(b)),
    )
}
