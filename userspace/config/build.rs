//! Compiles the Envoy API's .proto files (shipped inside the `envoy-types` crate package) and
//! the project's small additions (`proto/udpa`, `proto/xds`, and `proto/istio`: the types of
//! Istio's own filters, so that files carrying them can be read) into one descriptor set,
//! which the crate embeds: it drives the canonical protobuf JSON mapping (typed `Any` with `@type`,
//! durations as "0.25s", wrappers) that Envoy's YAML and JSON files use.
use std::path::PathBuf;

use prost::Message as _;

/// The roots: everything they import comes along. Extensions appear inside `Any` fields,
/// so each one that nodemesh understands (or knowingly ignores) is listed.
const ROOTS: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/admin/v3/config_dump.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/network/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/filters/http/grpc_stats/v3/config.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/request_id/uuid/v3/uuid.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/wasm/v3/wasm.proto",
    "envoy/extensions/filters/http/wasm/v3/wasm.proto",
    "envoy/extensions/filters/network/wasm/v3/wasm.proto",
    "udpa/type/v1/typed_struct.proto",
    "xds/type/v3/typed_struct.proto",
    "istio/stats/plugin_config.proto",
    "istio/alpn/filter_config.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metadata = cargo_metadata::MetadataCommand::new().exec()?;
    let envoy = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "envoy-types")
        .ok_or("envoy-types is not in the dependency graph")?;
    let envoy_root = envoy
        .manifest_path
        .parent()
        .ok_or("envoy-types has no root")?
        .join("proto");
    let ours = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|d| envoy_root.join(d).into_std_path_buf())
    .chain([ours.clone()])
    .collect();
    println!("cargo:rerun-if-changed={}", ours.join("udpa").display());
    println!("cargo:rerun-if-changed={}", ours.join("xds").display());
    println!("cargo:rerun-if-changed={}", ours.join("istio").display());
    let mut fds = protox::compile(ROOTS, &includes)?;
    // Comments and source locations are half the set and nothing reads them; every proxy
    // would keep them in memory twice (decoded, and cloned by the pool's name index).
    for file in &mut fds.file {
        file.source_code_info = None;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::write(out, fds.encode_to_vec())?;
    Ok(())
}
