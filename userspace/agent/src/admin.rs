//! The admin endpoint, on `admin.listen` (TCP, loopback by default) and on
//! `<run_dir>/admin.sock` (so `nodemesh status` works from any network namespace).
//!
//! | path | |
//! |---|---|
//! | `GET /healthz` | liveness: the process serves |
//! | `GET /ready` | readiness: programs attached, proxy listening |
//! | `GET /metrics` | Prometheus text: Istio-named TCP metrics, proxy, registry, kernel counters |
//! | `GET /status` | the status document (JSON), see [`crate::status`] |
//! | `GET /debug/maps` | the kernel maps, decoded (JSON) |
//! | `POST /sockmap?enabled=true\|false` | switch the fast path at run time |
//! | `GET /route?listener=L&host=H&path=P&header=k:v` | which route and cluster a request takes (L7) |
//! | `GET /clusters` | the L7 clusters' endpoints and their health |
//! | `GET /config_dump` | the live L7 configuration from xDS, as an Envoy config dump |
//! | `GET /xds` | the xDS client: server, connection state, per type version, ACKs, NACKs and the last NACK's reason |
use std::{
    convert::Infallible,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_loader::maps::PinnedMaps;
use nodemesh_proxy::Outbound;
use nodemesh_workloads::{Registry, pod::PodInfo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Mutex, watch},
};
use tracing::{debug, warn};

use crate::{
    sockmap::SockmapSwitch,
    status::{self, MapDump, Status},
};

/// Everything the admin endpoint reports on.
pub struct AdminState {
    pub ready: AtomicBool,
    pub metrics: prometheus_client::registry::Registry,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub programs: Vec<nodemesh_loader::datapath::AttachedProgram>,
    pub checks: Vec<nodemesh_loader::probe::Check>,
    pub sockmap: Arc<SockmapSwitch>,
    pub registry: Arc<Mutex<Registry<nodemesh_loader::maps::PodMap>>>,
    pub outbound: Arc<Outbound>,
    /// The L7 proxy, when `proxy.l7` is configured.
    pub l7: Option<Arc<nodemesh_http::Engine>>,
    pub proxy_listen: std::net::SocketAddr,
    /// The Kubernetes pod source: node name, API server, its metrics.
    pub kubernetes: Option<(String, String, nodemesh_kube::SourceMetrics)>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    async fn status(&self) -> Status {
        let maps = PinnedMaps::open(&self.pin_dir).ok();
        let counters = maps
            .as_ref()
            .and_then(|m| m.stats.read().ok())
            .unwrap_or_default();
        let pods = self.registry.lock().await.list(None);
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.ready.load(Ordering::Relaxed),
            datapath: status::Datapath {
                pin_dir: self.pin_dir.display().to_string(),
                cgroup: self.cgroup.display().to_string(),
                programs: self
                    .programs
                    .iter()
                    .map(|p| status::Program {
                        name: p.name.to_owned(),
                        attach_point: p.attach_point.clone(),
                        outcome: serde_json::to_value(p.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                    })
                    .collect(),
                features: self
                    .checks
                    .iter()
                    .map(|c| status::Feature {
                        feature: c.feature.clone(),
                        ok: c.ok,
                        detail: c.detail.clone(),
                    })
                    .collect(),
                sockmap: status::Sockmap {
                    enabled: self.sockmap.enabled(),
                    mode: format!("{:?}", self.sockmap.mode()).to_lowercase(),
                    selftest: self.sockmap.selftest().cloned(),
                },
            },
            counters: status::group_counters(&counters),
            maps: maps.as_ref().map(PinnedMaps::sizes),
            pods: pods.iter().map(|p| pod_summary(p)).collect(),
            proxy: status::ProxySummary {
                listen: self.proxy_listen.to_string(),
                active_connections: self.outbound.active_connections(),
            },
            xds: self.l7.as_ref().and_then(|e| e.xds_status()),
            kubernetes: self.kubernetes.as_ref().map(|(node, api, metrics)| {
                status::KubernetesSummary {
                    node_name: node.clone(),
                    api_server: api.clone(),
                    pending_pods: metrics.pending_pods(),
                }
            }),
        }
    }
}

fn pod_summary(p: &PodInfo) -> status::PodSummary {
    status::PodSummary {
        namespace: p.spec.namespace.clone(),
        name: p.spec.name.clone(),
        ips: p.spec.ips.iter().map(ToString::to_string).collect(),
        enabled: p.enabled,
        netns_cookie: p.netns_cookie(),
        pod_id: p.id,
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/ready") => {
            if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.metrics) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::GET, "/status") => json(&state.status().await),
        (&Method::GET, "/debug/maps") => match PinnedMaps::open(&state.pin_dir) {
            Ok(maps) => json(&MapDump::read(&maps)),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        (&Method::POST, "/sockmap") => {
            let query = req.uri().query().unwrap_or_default();
            match query.split('&').find_map(|kv| kv.strip_prefix("enabled=")) {
                Some(v @ ("true" | "false")) => match state.sockmap.set(v == "true") {
                    Ok(()) => text(StatusCode::OK, format!("sockmap enabled={v}\n")),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                },
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "expected ?enabled=true or ?enabled=false\n",
                ),
            }
        }
        (&Method::GET, "/route") => match &state.l7 {
            Some(engine) => {
                let query = req.uri().query().unwrap_or_default();
                let (status, is_json, body) = nodemesh_http::admin::explain_query(engine, query);
                let mut r = text(status, body);
                if is_json {
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                }
                r
            }
            None => text(StatusCode::NOT_FOUND, "no L7 proxy configured (proxy.l7)\n"),
        },
        (&Method::GET, "/xds") => match state.l7.as_ref().and_then(|e| e.xds_status()) {
            Some(v) => json(&v),
            None => text(
                StatusCode::NOT_FOUND,
                "no xDS client (the L7 bootstrap has no dynamic_resources)\n",
            ),
        },
        (&Method::GET, "/config_dump") => match state.l7.as_ref().and_then(|e| e.config_dump()) {
            Some(v) => json(&v),
            None => text(
                StatusCode::NOT_FOUND,
                "no xDS client (the L7 bootstrap has no dynamic_resources)\n",
            ),
        },
        (&Method::GET, "/clusters") => match &state.l7 {
            Some(engine) => text(StatusCode::OK, nodemesh_http::admin::clusters(engine)),
            None => text(StatusCode::NOT_FOUND, "no L7 proxy configured (proxy.l7)\n"),
        },
        (
            _,
            "/healthz" | "/ready" | "/metrics" | "/status" | "/debug/maps" | "/sockmap" | "/route"
            | "/clusters" | "/xds" | "/config_dump",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

async fn serve_conn<S>(state: Arc<AdminState>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(state.clone(), req));
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, "admin connection ended with an error");
    }
}

/// Serves admin on both listeners until `stop` turns true; the listeners are closed when
/// this returns.
pub async fn serve(
    state: Arc<AdminState>,
    tcp: TcpListener,
    unix: UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            r = tcp.accept() => match r {
                Ok((s, _)) => { tokio::spawn(serve_conn(state.clone(), s)); }
                Err(e) => { warn!(error = %e, "admin accept failed"); tokio::time::sleep(std::time::Duration::from_millis(50)).await; }
            },
            r = unix.accept() => match r {
                Ok((s, _)) => { tokio::spawn(serve_conn(state.clone(), s)); }
                Err(e) => { warn!(error = %e, "admin accept failed"); tokio::time::sleep(std::time::Duration::from_millis(50)).await; }
            },
        }
    }
}
