//! The proxy's own metrics, next to the Istio-named ones from `nodemesh-telemetry`.
use nodemesh_telemetry::istio::TcpMetrics;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Why a connection failed or was refused. The label values are stable API.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorReason {
    /// Accepted a connection the kernel did not redirect (no original destination).
    NoOriginalDestination,
    /// The original destination is the proxy itself.
    Loop,
    /// The source pod is not (or no longer) registered.
    UnknownSourcePod,
    /// The source pod holds `max_connections_per_pod` connections.
    PodConnectionLimit,
    /// Creating the upstream socket in the pod's namespace failed.
    UpstreamSocket,
    ConnectTimeout,
    ConnectRefused,
    ConnectError,
    /// An I/O error while relaying.
    Relay,
    IdleTimeout,
}

impl ErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoOriginalDestination => "no_original_destination",
            Self::Loop => "loop",
            Self::UnknownSourcePod => "unknown_source_pod",
            Self::PodConnectionLimit => "pod_connection_limit",
            Self::UpstreamSocket => "upstream_socket",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectError => "connect_error",
            Self::Relay => "relay_error",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandoffLabels {
    /// `resumed`, or `failed` (a connection received without its sockets, or whose
    /// sockets could not be registered).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PodLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
}

/// Everything the proxy counts.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub(crate) tcp: TcpMetrics,
    pub(crate) errors: Family<ErrorLabels, Counter>,
    pub(crate) active: Family<PodLabels, Gauge>,
    pub(crate) accepted: Counter,
    /// Connections handed to the L7 proxy.
    pub(crate) l7: Counter,
    /// Connections taken over from the previous agent in a restart handoff.
    pub(crate) handoff: Family<HandoffLabels, Counter>,
}

impl ProxyMetrics {
    /// `istio_tcp_*`, shared with the L7 proxy's `tcp_proxy` chains.
    pub fn tcp(&self) -> TcpMetrics {
        self.tcp.clone()
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            tcp: TcpMetrics::register(registry),
            errors: Family::default(),
            active: Family::default(),
            accepted: Counter::default(),
            l7: Counter::default(),
            handoff: Family::default(),
        };
        registry.register(
            "nodemesh_proxy_handoff_connections",
            "Connections taken over from the previous agent at a restart, by result",
            m.handoff.clone(),
        );
        registry.register(
            "nodemesh_proxy_l7_connections",
            "Redirected connections served by the L7 proxy (the rest are relayed at L4)",
            m.l7.clone(),
        );
        registry.register(
            "nodemesh_proxy_connection_errors",
            "Connections the node proxy refused or that failed, by source workload and reason",
            m.errors.clone(),
        );
        registry.register(
            "nodemesh_proxy_active_connections",
            "Proxied connections open now, by source workload (per-pod saturation)",
            m.active.clone(),
        );
        registry.register(
            "nodemesh_proxy_accepted_connections",
            "Connections accepted on the outbound listener",
            m.accepted.clone(),
        );
        m
    }
}
