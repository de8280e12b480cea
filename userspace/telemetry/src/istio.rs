//! Istio's standard metrics as the node proxy reports them: `istio_tcp_*` for connections
//! and `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes` for HTTP requests.
//!
//! Labels are Istio's names. Cardinality is bounded by construction: workloads are the
//! node's pods plus `unknown` (a destination's IP never becomes a label value), services
//! are cluster names from the configuration, response codes are clamped to 0..=599 and
//! flags come from a fixed set.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        histogram::Histogram,
    },
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
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
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

/// The request-level label set of `istio_requests_total` and the HTTP histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// The routed cluster (Istio: the service's host name; the cluster's name carries it).
    pub destination_service: String,
    pub destination_service_name: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// gRPC status for gRPC requests when the proxy saw it in the response head, else "".
    pub grpc_response_status: String,
    /// Envoy's short flag, or `-`.
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// One request's labels, borrowed from the request: what [`HttpMetrics::record`] finds the
/// request's series by, so that a request allocates no label strings once its label set
/// has been seen.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels<'a> {
    source: Workload<'a>,
    destination: Workload<'a>,
    service: &'a str,
    grpc: bool,
    response_code: u16,
    grpc_status: &'a str,
    flags: &'static str,
}

impl<'a> RequestLabels<'a> {
    /// Normalised as the label values are: an unknown service is [`UNKNOWN`], a response
    /// code outside 0..=599 is 0, a gRPC status outside 0..=16 is "".
    pub fn new(
        source: Workload<'a>,
        destination: Workload<'a>,
        service: Option<&'a str>,
        grpc: bool,
        response_code: u16,
        grpc_status: Option<&'a str>,
        flags: Option<&'static str>,
    ) -> Self {
        Self {
            source,
            destination,
            service: service.unwrap_or(UNKNOWN),
            grpc,
            response_code: if response_code < 600 {
                response_code
            } else {
                0
            },
            // A valid gRPC status is 0..=16; anything else is not a label value.
            grpc_status: grpc_status
                .filter(|s| s.parse::<u8>().is_ok_and(|n| n <= 16))
                .unwrap_or(""),
            flags: flags.unwrap_or("-"),
        }
    }

    /// The owned label set.
    pub fn to_labels(&self) -> HttpLabels {
        HttpLabels {
            reporter: "source",
            source_workload: self.source.name.to_owned(),
            source_workload_namespace: self.source.namespace.to_owned(),
            source_principal: self.source.principal.to_owned(),
            destination_workload: self.destination.name.to_owned(),
            destination_workload_namespace: self.destination.namespace.to_owned(),
            destination_principal: self.destination.principal.to_owned(),
            destination_service: self.service.to_owned(),
            destination_service_name: self.service.to_owned(),
            request_protocol: self.protocol(),
            response_code: self.response_code,
            grpc_response_status: self.grpc_status.to_owned(),
            response_flags: self.flags,
            connection_security_policy: "none",
        }
    }

    fn protocol(&self) -> &'static str {
        if self.grpc { "grpc" } else { "http" }
    }

    /// Whether `labels` is this label set.
    fn is(&self, labels: &HttpLabels) -> bool {
        let workload = |w: &Workload<'_>, name: &str, namespace: &str, principal: &str| {
            w.name == name && w.namespace == namespace && w.principal == principal
        };
        self.response_code == labels.response_code
            && self.flags == labels.response_flags
            && self.protocol() == labels.request_protocol
            && self.service == labels.destination_service
            && self.grpc_status == labels.grpc_response_status
            && workload(
                &self.source,
                &labels.source_workload,
                &labels.source_workload_namespace,
                &labels.source_principal,
            )
            && workload(
                &self.destination,
                &labels.destination_workload,
                &labels.destination_workload_namespace,
                &labels.destination_principal,
            )
    }
}

/// Buckets of a histogram family.
#[derive(Clone, Debug)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Istio's duration buckets (milliseconds).
const DURATION_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes): 1 to 10^8 in powers of ten.
const SIZE_BYTES: &[f64] = &[1.0, 10.0, 100.0, 1000.0, 1e4, 1e5, 1e6, 1e7, 1e8];

/// `istio_requests_total` and the HTTP histograms.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration_ms: Family<HttpLabels, Histogram, Buckets>,
    pub request_bytes: Family<HttpLabels, Histogram, Buckets>,
    pub response_bytes: Family<HttpLabels, Histogram, Buckets>,
    /// Each label set's four metrics, found with one hash of the borrowed labels instead of
    /// four lookups of an owned label set (the metrics are shared handles: what is recorded
    /// here is what the families encode). Bounded as the families are (module docs).
    series: Arc<crate::series::SeriesCache<Series>>,
}

/// One label set's metrics.
#[derive(Debug)]
struct Series {
    labels: HttpLabels,
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(Buckets(DURATION_MS)),
            request_bytes: Family::new_with_constructor(Buckets(SIZE_BYTES)),
            response_bytes: Family::new_with_constructor(Buckets(SIZE_BYTES)),
            series: Arc::default(),
        }
    }
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("istio_requests", "Requests", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's head to the response's last byte",
            m.duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request sizes (headers and body)",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response sizes (headers and body)",
            m.response_bytes.clone(),
        );
        m
    }

    /// Records one finished request.
    pub fn record(
        &self,
        labels: &RequestLabels<'_>,
        duration_ms: f64,
        req_bytes: u64,
        resp_bytes: u64,
    ) {
        let series = self.series_of(labels);
        series.requests.inc();
        series.duration_ms.observe(duration_ms);
        series.request_bytes.observe(req_bytes as f64);
        series.response_bytes.observe(resp_bytes as f64);
    }

    fn series_of(&self, labels: &RequestLabels<'_>) -> Arc<Series> {
        self.series.get_or_insert(
            labels,
            |s| labels.is(&s.labels),
            || {
                let owned = labels.to_labels();
                Series {
                    requests: self.requests.get_or_create(&owned).clone(),
                    duration_ms: self.duration_ms.get_or_create(&owned).clone(),
                    request_bytes: self.request_bytes.get_or_create(&owned).clone(),
                    response_bytes: self.response_bytes.get_or_create(&owned).clone(),
                    labels: owned,
                }
            },
        )
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

    #[test]
    fn http_metrics_use_istio_names_and_bounded_labels() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        let src = Workload {
            name: "client",
            namespace: "shop",
            principal: "spiffe://cluster.local/ns/shop/sa/client",
        };
        let request = RequestLabels::new(
            src,
            Workload::UNKNOWN,
            Some("up"),
            true,
            9999,
            Some("bogus"),
            Some("RBAC"),
        );
        let labels = request.to_labels();
        assert_eq!(
            labels.response_code, 0,
            "codes beyond 599 are not label values"
        );
        assert_eq!(labels.grpc_response_status, "");
        m.record(&request, 3.0, 10, 200);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for want in [
            "istio_requests_total{reporter=\"source\",source_workload=\"client\"",
            "request_protocol=\"grpc\"",
            "response_flags=\"RBAC\"",
            "istio_request_duration_milliseconds_bucket{",
            "istio_request_bytes_sum{",
            "istio_response_bytes_count{",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }

    #[test]
    fn a_request_is_recorded_in_its_own_label_sets_series() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        let client = Workload {
            name: "client",
            namespace: "shop",
            principal: UNKNOWN,
        };
        let ok = |code| {
            RequestLabels::new(
                client,
                Workload::UNKNOWN,
                Some("up"),
                false,
                code,
                None,
                None,
            )
        };
        m.record(&ok(200), 1.0, 100, 200);
        // Same labels from other strings: the same series.
        let (name, ns) = (String::from("client"), String::from("shop"));
        let again = Workload {
            name: &name,
            namespace: &ns,
            principal: UNKNOWN,
        };
        m.record(
            &RequestLabels::new(again, Workload::UNKNOWN, Some("up"), false, 200, None, None),
            2.0,
            100,
            200,
        );
        m.record(&ok(503), 1.0, 100, 20);
        assert_eq!(m.requests.get_or_create(&ok(200).to_labels()).get(), 2);
        assert_eq!(m.requests.get_or_create(&ok(503).to_labels()).get(), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_count{"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 2")),
            "{text}"
        );
    }
}
