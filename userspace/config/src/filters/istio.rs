//! The filters istiod adds to every listener and cluster that nodemesh knowingly does not run.
//!
//! istiod does not mark them optional, so a proxy that refuses unknown filters refuses all
//! of Istio's configuration. Each one here is recognised by its configuration's type (never
//! by the filter's name, which is free text), is reported once as a warning naming the
//! filter and saying what is not done, and changes nothing a request or connection sees
//! other than what that warning says:
//!
//! - `istio.stats` (`stats.PluginConfig`, as its own type, in a `TypedStruct`, or as the
//!   null-VM Wasm plugin `envoy.wasm.stats` of older releases): it only records Istio's
//!   metrics inside Envoy; nodemesh reports the same metric families itself
//!   (`nodemesh-telemetry`).
//! - `istio.metadata_exchange` over HTTP (`io.istio.http.peer_metadata.Config`, or the Wasm
//!   plugin `envoy.wasm.metadata_exchange`): it adds `x-envoy-peer-metadata(-id)` headers so
//!   that the peer's telemetry can label this workload; they are not added.
//! - `istio.metadata_exchange` on TCP chains and clusters
//!   (`envoy.tcp.metadataexchange.config.MetadataExchange`): it only acts on connections
//!   that negotiated the ALPN `istio-peer-exchange` over Istio mTLS, which nodemesh neither
//!   terminates nor originates.
//! - `istio.alpn` (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`): it sets the
//!   ALPN list of upstream TLS connections; nodemesh opens none.
//! - `envoy.filters.http.grpc_stats`: statistics and filter state only.
//!
//! `envoy.filters.http.fault` and `envoy.filters.http.cors` are different: istiod adds them
//! with an empty configuration, and the policies come per route. An empty one does nothing
//! in Envoy either, so it is accepted without a warning; a fault to inject or a CORS policy
//! (per route or in the filter) is an error, because nodemesh implements neither.
//!
//! Any other Wasm plugin (an Istio `WasmPlugin`, user code) is not recognised here: it is an
//! error, or skipped with a warning when the filter is `is_optional`.
use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DynamicMessage, ReflectMessage as _, SerializeOptions, Value};

use crate::{
    convert::{decode_dynamic, type_name},
    support::{self, Diagnostics},
};

const STATS: &str = "Istio's telemetry filter only records Istio's metrics inside the proxy; \
                     nodemesh reports the same metric families itself";
const PEER_METADATA: &str = "the x-envoy-peer-metadata headers Istio's telemetry uses to label \
                             peers are not added (peers label this workload unknown)";
const TCP_METADATA_EXCHANGE: &str = "it only acts on connections that negotiated ALPN \
                                     istio-peer-exchange over Istio mTLS, which nodemesh \
                                     neither terminates nor originates";
const ALPN: &str = "it sets the ALPN of upstream TLS connections, and nodemesh opens none";
const GRPC_STATS: &str = "it only records gRPC statistics";

const STATS_URL: &str = "stats.PluginConfig";
const PEER_METADATA_URL: &str = "io.istio.http.peer_metadata.Config";
const TCP_MX_URL: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";
const ALPN_URL: &str = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";
const GRPC_STATS_URL: &str = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";
const HTTP_WASM_URL: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
const NETWORK_WASM_URL: &str = "envoy.extensions.filters.network.wasm.v3.Wasm";
const FAULT_URL: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
const CORS_URL: &str = "envoy.extensions.filters.http.cors.v3.Cors";
pub(crate) const CORS_POLICY_URL: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";
pub(crate) const FAULT_PER_ROUTE_URL: &str = FAULT_URL;
const TYPED_STRUCTS: &[&str] = &["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// Where a filter sits, which decides what a metadata exchange does there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Http,
    Network,
    Cluster,
}

/// Why the filter configured by `any` is not run, if it is one of Istio's telemetry and
/// metadata filters; its warning names the filter.
pub fn ignored(any: &Any, place: Place) -> Option<&'static str> {
    let (url, value) = inner(any)?;
    match (url.as_str(), place) {
        (STATS_URL, Place::Http | Place::Network) => Some(STATS),
        (PEER_METADATA_URL, Place::Http) => Some(PEER_METADATA),
        (TCP_MX_URL, Place::Network | Place::Cluster) => Some(TCP_METADATA_EXCHANGE),
        (ALPN_URL, Place::Http) => Some(ALPN),
        (GRPC_STATS_URL, Place::Http) => Some(GRPC_STATS),
        (HTTP_WASM_URL, Place::Http) | (NETWORK_WASM_URL, Place::Network) => {
            match istio_wasm_plugin(&value?)? {
                "envoy.wasm.stats" => Some(STATS),
                "envoy.wasm.metadata_exchange" if place == Place::Http => Some(PEER_METADATA),
                "envoy.wasm.metadata_exchange" => Some(TCP_METADATA_EXCHANGE),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The warning for a filter [`ignored`] recognised.
pub fn warn(kind: &str, name: &str, any: &Any, reason: &str, diags: &mut Diagnostics) {
    let url = inner(any).map_or_else(|| type_name(any).to_owned(), |(u, _)| u);
    diags.warn(format!(
        "{kind} filter {name:?} ({url}) is ignored: {reason}"
    ));
}

/// The configuration's type for messages: a `TypedStruct` with the type it wraps.
pub fn describe(any: &Any) -> String {
    let outer = type_name(any);
    match inner(any) {
        Some((url, _)) if TYPED_STRUCTS.contains(&outer) => format!("{outer} of {url}"),
        _ => outer.to_owned(),
    }
}

/// Whether `any` is an HTTP filter that does nothing as configured (istiod's empty fault
/// and CORS filters). Set fields are checked: a fault to inject is an error.
pub fn inert_http(any: &Any, at: &str, diags: &mut Diagnostics) -> bool {
    let name = type_name(any);
    if name != FAULT_URL && name != CORS_URL {
        return false;
    }
    match decode_dynamic(any) {
        Ok(msg) => support::check(&msg, at, diags),
        Err(e) => diags.error(format!("{at}: {e}")),
    }
    true
}

/// The configuration's type (inside a `TypedStruct` when wrapped) and, for a `TypedStruct`
/// or a Wasm filter, its value as JSON with the proto field names.
fn inner(any: &Any) -> Option<(String, Option<serde_json::Value>)> {
    let name = type_name(any);
    if !TYPED_STRUCTS.contains(&name) {
        // Only a Wasm filter's configuration is looked into (translation runs on every
        // update; an RBAC filter's policies need not be turned into JSON to be recognised).
        let value = [HTTP_WASM_URL, NETWORK_WASM_URL]
            .contains(&name)
            .then(|| decode_dynamic(any).ok().and_then(|m| json(&m)))
            .flatten();
        return Some((name.to_owned(), value));
    }
    let msg = decode_dynamic(any).ok()?;
    let field = |m: &DynamicMessage, f: &str| {
        m.descriptor()
            .get_field_by_name(f)
            .map(|f| m.get_field(&f).into_owned())
    };
    let url = match field(&msg, "type_url") {
        Some(Value::String(s)) => s.rsplit('/').next().unwrap_or_default().to_owned(),
        _ => return None,
    };
    let value = match field(&msg, "value") {
        Some(Value::Message(v)) => serde_json::to_value(&v).ok(),
        _ => None,
    };
    Some((url, value))
}

fn json(msg: &DynamicMessage) -> Option<serde_json::Value> {
    let options = SerializeOptions::new().use_proto_field_name(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .ok()
}

/// The plugin of a Wasm filter that runs one of Istio's built-in plugins in the null VM
/// (compiled into Istio's proxy, `vm_config.code.local.inline_string`), if it is one.
fn istio_wasm_plugin(value: &serde_json::Value) -> Option<&'static str> {
    let get = |v: &'_ serde_json::Value, snake: &str, camel: &str| {
        v.get(snake).or_else(|| v.get(camel)).cloned()
    };
    let vm = get(&get(value, "config", "config")?, "vm_config", "vmConfig")?;
    let runtime = get(&vm, "runtime", "runtime")?;
    if runtime.as_str() != Some("envoy.wasm.runtime.null") {
        return None;
    }
    let code = get(
        &get(&get(&vm, "code", "code")?, "local", "local")?,
        "inline_string",
        "inlineString",
    )?;
    match code.as_str()? {
        "envoy.wasm.stats" => Some("envoy.wasm.stats"),
        "envoy.wasm.metadata_exchange" => Some("envoy.wasm.metadata_exchange"),
        _ => None,
    }
}
