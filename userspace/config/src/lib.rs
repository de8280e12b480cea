//! Envoy's v3 configuration, read the way Envoy reads it, into nodemesh's model.
//!
//! Every set field is implemented, ignored with a stated reason (a warning), or an error
//! naming where it is ([`support`]); one translation ([`convert::translate`]) serves
//! bootstraps, config dumps and xDS.
//!
//! # Istio-generated configuration
//!
//! istiod's resources are accepted as it sends them (tests/corpus/istio is the reference).
//! Each of its shapes was decided on its own, never by ignoring what is unknown:
//! - Istio's telemetry and metadata filters (`istio.stats`, `istio.metadata_exchange` on
//!   HTTP, TCP and clusters, `istio.alpn`, `grpc_stats`) are not run; each is recognised by
//!   its configuration's type and reported in a warning naming it and what is not done
//!   ([`filters::istio`]). istiod's empty fault and CORS filters are accepted (they do
//!   nothing); a fault or CORS policy is an error. Any other Wasm plugin or unknown type is
//!   an error naming the filter, or skipped with a warning when `is_optional`.
//! - TLS is not terminated or originated yet ([`tls`]): Istio's inbound mTLS chains are kept
//!   for matching and close their connections; automatic mTLS to mesh endpoints
//!   (`transport_socket_matches` on `tlsMode: istio`) becomes plaintext with a warning; TLS
//!   a DestinationRule asks for on a cluster is an error.
//! - `filter_disabled` of the inspectors is honoured per destination port; the
//!   `original_dst` listener filter hands nothing over (only `use_original_dst` does);
//!   Istio's 127.0.0.6 / ::6 `upstream_bind_config` is not bound (warning).
//! - Not supported, so refused: waypoints' internal listeners, HBONE and
//!   `filter_chain_matcher`.
pub mod access_log;
pub mod convert;
pub mod filters;
pub mod matcher;
pub mod memory;
pub mod model;
pub mod pool;
pub mod support;
pub mod tls;

pub use convert::{
    AdsSource, Resources, Source, Translated, load_bootstrap, load_config_dump, load_file,
    read_bootstrap, read_source, translate, translate_bootstrap,
};

/// What can go wrong reading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error("{type_name}: {message}")]
    Mapping { type_name: String, message: String },
    #[error("unknown message type {0}")]
    UnknownType(String),
}
