//! Istio's standard TCP metrics (`istio_tcp_*`) as the node proxy reports them.
//!
//! Labels are Istio's names. Cardinality is bounded by construction: workloads are the
//! node's pods plus `unknown` (a destination's IP never becomes a label value).
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// The value Istio uses when a label is not known.
pub const UNKNOWN: &str = "unknown";

/// The connection-level label set of `istio_tcp_*`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source`: the node proxy reports for the client side of the connection.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub request_protocol: &'static str,
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    /// Labels of a plain-TCP connection from one workload to another.
    pub fn tcp(source: Workload<'_>, destination: Workload<'_>) -> Self {
        Self {
            reporter: "source",
            source_workload: source.name.to_owned(),
            source_workload_namespace: source.namespace.to_owned(),
            source_principal: source.principal.to_owned(),
            destination_workload: destination.name.to_owned(),
            destination_workload_namespace: destination.namespace.to_owned(),
            destination_principal: destination.principal.to_owned(),
            request_protocol: "tcp",
            connection_security_policy: "none",
        }
    }
}

/// A workload as metrics name it.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// SPIFFE identity, or [`UNKNOWN`].
    pub principal: &'a str,
}

impl Workload<'static> {
    pub const UNKNOWN: Self = Self {
        name: UNKNOWN,
        namespace: UNKNOWN,
        principal: UNKNOWN,
    };
}

/// `istio_tcp_connections_opened_total` and friends.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// Bytes from the destination back to the source (Istio: "sent during response").
    pub sent_bytes: Family<TcpLabels, Counter>,
    /// Bytes from the source to the destination (Istio: "received during request").
    pub received_bytes: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from the destination to the source of TCP connections",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the source of TCP connections",
            m.received_bytes.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_istio_names_and_labels() {
        let mut registry = Registry::default();
        let m = TcpMetrics::register(&mut registry);
        let src = Workload {
            name: "client",
            namespace: "shop",
            principal: UNKNOWN,
        };
        let labels = TcpLabels::tcp(src, Workload::UNKNOWN);
        m.opened.get_or_create(&labels).inc();
        m.received_bytes.get_or_create(&labels).inc_by(42);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\""), "{text}");
        assert!(
            text.contains("istio_tcp_received_bytes_total{") && text.contains("} 42"),
            "{text}"
        );
    }
}
