//! "Which route and cluster would this request take?" — answered by the same selection code
//! the data path runs, for `nodemesh config route` and the admin port's `/route`.
use std::net::SocketAddr;

use http::HeaderMap;
use nodemesh_config::model::{ClusterTarget, NetworkFilter, RouteAction, RouteSource, Snapshot};
use serde::Serialize;

use crate::{
    detect::Detected,
    listener::{self, ConnectionView},
    route::{self, RequestView},
};

/// The question.
#[derive(Debug, Clone)]
pub struct Query {
    /// A listener by name.
    pub listener: String,
    /// The connection's destination (default: the listener's address).
    pub destination: Option<SocketAddr>,
    pub host: String,
    pub path: String,
    pub method: String,
    pub headers: HeaderMap,
}

/// The answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub listener: String,
    pub filter_chain: String,
    pub route_config: Option<String>,
    pub virtual_host: Option<String>,
    /// The route's name, or its index in the virtual host.
    pub route: Option<String>,
    /// `cluster`, `weighted_clusters`, `cluster_header`, `direct_response`, `redirect`,
    /// `tcp_proxy`, or `no_route`.
    pub action: String,
    /// The clusters the request can go to (with weights for weighted clusters).
    pub clusters: Vec<(String, u32)>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
}

/// Explains `q` against `snapshot`.
pub fn explain(snapshot: &Snapshot, q: &Query) -> Result<Explanation, String> {
    let listener = snapshot
        .listener(&q.listener)
        .ok_or_else(|| format!("no listener named {:?}", q.listener))?;
    let detected = Detected {
        transport: "raw_buffer",
        application_protocols: vec!["http/1.1".to_owned()],
        http: Some(crate::detect::HttpVersion::Http1),
        server_name: None,
    };
    let destination = q.destination.unwrap_or(listener.address);
    let view = ConnectionView {
        destination,
        source: SocketAddr::from(([198, 18, 0, 1], 40000)),
        detected: &detected,
    };
    let chain = listener::select_chain(listener, &view).ok_or_else(|| {
        format!(
            "no filter chain of listener {:?} matches {destination}",
            listener.name
        )
    })?;
    let mut out = Explanation {
        listener: listener.name.clone(),
        filter_chain: chain.name.clone(),
        route_config: None,
        virtual_host: None,
        route: None,
        action: "no_route".to_owned(),
        clusters: Vec::new(),
        timeout_ms: None,
        retries: None,
    };
    let hcm = match &chain.filter {
        NetworkFilter::Tcp(tcp) => {
            out.action = "tcp_proxy".to_owned();
            out.clusters = targets(&tcp.target);
            return Ok(out);
        }
        NetworkFilter::Http(hcm) => hcm,
    };
    let routes = match &hcm.routes {
        RouteSource::Inline(rc) => rc.clone(),
        RouteSource::Named(name) => snapshot
            .routes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("route configuration {name:?} is not loaded"))?,
    };
    out.route_config = Some(routes.name.clone());
    let view = RequestView {
        host: &q.host,
        path: &q.path,
        method: &q.method,
        scheme: "http",
        headers: &q.headers,
    };
    out.virtual_host = route::virtual_host(&routes, &q.host).map(|vh| vh.name.clone());
    let Some(selected) = route::select(&routes, &view) else {
        return Ok(out);
    };
    out.route = Some(if selected.route.name.is_empty() {
        selected.index.to_string()
    } else {
        selected.route.name.clone()
    });
    match &selected.route.action {
        RouteAction::DirectResponse { status, .. } => {
            out.action = format!("direct_response {status}")
        }
        RouteAction::Redirect(r) => out.action = format!("redirect {}", r.status),
        RouteAction::Forward(f) => {
            out.action = match &f.target {
                ClusterTarget::Named(_) => "cluster",
                ClusterTarget::Weighted(_) => "weighted_clusters",
                ClusterTarget::Header(_) => "cluster_header",
            }
            .to_owned();
            out.clusters = match &f.target {
                ClusterTarget::Header(_) => route::pick_cluster(&f.target, &q.headers)
                    .map(|(name, _)| vec![(name.into_owned(), 1)])
                    .unwrap_or_default(),
                target => targets(target),
            };
            out.timeout_ms = f.timeout.map(|t| t.as_millis() as u64);
            out.retries = f
                .retry
                .as_ref()
                .or(selected.virtual_host.retry.as_ref())
                .map(|r| r.num_retries);
        }
    }
    Ok(out)
}

fn targets(target: &ClusterTarget) -> Vec<(String, u32)> {
    match target {
        ClusterTarget::Named(name) => vec![(name.clone(), 1)],
        ClusterTarget::Weighted(ws) => ws.iter().map(|w| (w.cluster.clone(), w.weight)).collect(),
        ClusterTarget::Header(_) => Vec::new(),
    }
}
