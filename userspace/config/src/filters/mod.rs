//! The filters in front of the router and the TCP proxy: authorization (RBAC), local rate
//! limits and nodemesh's global quota, read into the model here like every other resource
//! (field-by-field support check, Envoy's defaults written out, errors naming the field).
//! `nodemesh-policy` compiles what this module produces into its evaluation form.
//! [`istio`] lists the filters istiod adds that nodemesh knowingly does not run.
pub mod istio;
pub mod quota;
pub mod ratelimit;
pub mod rbac;

use std::sync::Arc;

use envoy_types::pb::{
    envoy::extensions::filters::{
        http::{local_ratelimit::v3 as lrl_pb, rbac::v3 as http_rbac_pb},
        network::rbac::v3 as net_rbac_pb,
    },
    google::protobuf::Any,
};
use prost_reflect::{DynamicMessage, ReflectMessage as _, Value};

use crate::{
    convert::{decode_dynamic, type_name},
    support::{self, Diagnostics},
};

pub const HTTP_RBAC_URL: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
pub const HTTP_RBAC_PER_ROUTE_URL: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
pub const NETWORK_RBAC_URL: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";
pub const LOCAL_RATELIMIT_URL: &str =
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const TYPED_STRUCTS: &[&str] = &["xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"];

/// An HTTP filter nodemesh runs before the router, in the order configured.
#[derive(Debug, Clone)]
pub enum HttpFilterConfig {
    Rbac(Arc<rbac::Rbac>),
    LocalRateLimit(Arc<ratelimit::LocalRateLimit>),
    GlobalQuota(Arc<quota::GlobalQuota>),
}

/// A route's or virtual host's `typed_per_filter_config` entry.
#[derive(Debug, Clone)]
pub enum PerRoute {
    /// `RBACPerRoute`: `None` turns RBAC off for the route.
    Rbac(Option<Arc<rbac::Rbac>>),
    LocalRateLimit(Arc<ratelimit::LocalRateLimit>),
    /// The global quota off for the route (`true`) or explicitly on.
    GlobalQuotaDisabled(bool),
}

/// A network filter in front of the terminal one.
#[derive(Debug, Clone)]
pub enum NetworkPolicy {
    Rbac(Arc<rbac::Rbac>),
}

/// Decodes and checks a typed extension.
fn decode<T: prost::Message + Default>(any: &Any, at: &str, diags: &mut Diagnostics) -> Option<T> {
    match decode_dynamic(any) {
        Ok(msg) => support::check(&msg, at, diags),
        Err(e) => {
            diags.error(format!("{at}: {e}"));
            return None;
        }
    }
    T::decode(any.value.as_slice())
        .map_err(|e| diags.error(format!("{at}: {e}")))
        .ok()
}

/// A `TypedStruct`'s inner type URL and its value as JSON.
fn typed_struct(
    any: &Any,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<(String, serde_json::Value)> {
    let msg = decode_dynamic(any)
        .map_err(|e| diags.error(format!("{at}: {e}")))
        .ok()?;
    let field = |m: &DynamicMessage, name: &str| {
        m.descriptor()
            .get_field_by_name(name)
            .map(|f| m.get_field(&f).into_owned())
    };
    let url = match field(&msg, "type_url") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let value = match field(&msg, "value") {
        Some(Value::Message(v)) => serde_json::to_value(&v)
            .map_err(|e| diags.error(format!("{at}.value: {e}")))
            .ok()?,
        _ => serde_json::Value::Object(Default::default()),
    };
    Some((url, value))
}

/// Whether nodemesh implements the HTTP filter of this extension.
pub fn is_http_policy(any: &Any) -> bool {
    let name = type_name(any);
    name == HTTP_RBAC_URL
        || name == LOCAL_RATELIMIT_URL
        || (TYPED_STRUCTS.contains(&name)
            && decode_dynamic(any).is_ok_and(|m| {
                m.descriptor()
                    .get_field_by_name("type_url")
                    .is_some_and(|f| {
                        matches!(m.get_field(&f).as_ref(), Value::String(s) if s == quota::TYPE_URL)
                    })
            }))
}

/// Reads an HTTP filter [`is_http_policy`] accepted.
pub fn http_filter(any: &Any, at: &str, diags: &mut Diagnostics) -> Option<HttpFilterConfig> {
    match type_name(any) {
        HTTP_RBAC_URL => {
            let c: http_rbac_pb::Rbac = decode(any, at, diags)?;
            Some(HttpFilterConfig::Rbac(Arc::new(rbac::http(&c, at, diags)?)))
        }
        LOCAL_RATELIMIT_URL => {
            let c: lrl_pb::LocalRateLimit = decode(any, at, diags)?;
            Some(HttpFilterConfig::LocalRateLimit(Arc::new(
                ratelimit::local(&c, at, diags)?,
            )))
        }
        name if TYPED_STRUCTS.contains(&name) => {
            let (url, value) = typed_struct(any, at, diags)?;
            if url != quota::TYPE_URL {
                diags.error(format!("{at}: TypedStruct of {url:?} is not supported"));
                return None;
            }
            Some(HttpFilterConfig::GlobalQuota(Arc::new(quota::global(
                value, at, diags,
            )?)))
        }
        other => {
            diags.error(format!("{at}: HTTP filter type {other} is not supported"));
            None
        }
    }
}

/// Reads a `typed_per_filter_config` value.
pub fn per_route(any: &Any, at: &str, diags: &mut Diagnostics) -> Option<PerRoute> {
    match type_name(any) {
        HTTP_RBAC_PER_ROUTE_URL => {
            let c: http_rbac_pb::RbacPerRoute = decode(any, at, diags)?;
            match &c.rbac {
                None => Some(PerRoute::Rbac(None)),
                Some(r) => Some(PerRoute::Rbac(Some(Arc::new(rbac::http(
                    r,
                    &format!("{at}.rbac"),
                    diags,
                )?)))),
            }
        }
        LOCAL_RATELIMIT_URL => {
            let c: lrl_pb::LocalRateLimit = decode(any, at, diags)?;
            Some(PerRoute::LocalRateLimit(Arc::new(ratelimit::local(
                &c, at, diags,
            )?)))
        }
        name if TYPED_STRUCTS.contains(&name) => {
            let (url, value) = typed_struct(any, at, diags)?;
            if url != quota::PER_ROUTE_TYPE_URL {
                diags.error(format!(
                    "{at}: TypedStruct of {url:?} is not supported per route"
                ));
                return None;
            }
            Some(PerRoute::GlobalQuotaDisabled(quota::per_route(
                value, at, diags,
            )?))
        }
        istio::FAULT_PER_ROUTE_URL => {
            diags.error(format!(
                "{at}: fault injection (a VirtualService `fault`) is not implemented by nodemesh"
            ));
            None
        }
        istio::CORS_POLICY_URL => {
            diags.error(format!(
                "{at}: CORS policies (a VirtualService `corsPolicy`) are not implemented by nodemesh"
            ));
            None
        }
        other => {
            diags.error(format!(
                "{at}: per-route configuration of type {other} is not supported"
            ));
            None
        }
    }
}

/// Reads a network filter in front of the terminal filter.
pub fn network_filter(any: &Any, at: &str, diags: &mut Diagnostics) -> Option<NetworkPolicy> {
    match type_name(any) {
        NETWORK_RBAC_URL => {
            let c: net_rbac_pb::Rbac = decode(any, at, diags)?;
            Some(NetworkPolicy::Rbac(Arc::new(rbac::network(&c, at, diags)?)))
        }
        _ => {
            diags.error(format!(
                "{at}: network filter type {} is not supported",
                istio::describe(any)
            ));
            None
        }
    }
}

/// Reads one HTTP filter's configuration from YAML (the `typed_config` without `@type`),
/// as a listener's filter would be read: for tests, benchmarks and tools.
pub fn http_filter_from_yaml(type_name: &str, yaml: &str) -> Result<HttpFilterConfig, Vec<String>> {
    use prost::Message as _;
    let msg = crate::pool::parse(yaml, type_name).map_err(|e| vec![e.to_string()])?;
    let any = Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: msg.encode_to_vec(),
    };
    let mut diags = Diagnostics::default();
    match http_filter(&any, "filter", &mut diags) {
        Some(f) if diags.is_ok() => Ok(f),
        _ => Err(diags.errors),
    }
}

/// Reads one network filter's configuration from YAML (see [`http_filter_from_yaml`]).
pub fn network_filter_from_yaml(type_name: &str, yaml: &str) -> Result<NetworkPolicy, Vec<String>> {
    use prost::Message as _;
    let msg = crate::pool::parse(yaml, type_name).map_err(|e| vec![e.to_string()])?;
    let any = Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: msg.encode_to_vec(),
    };
    let mut diags = Diagnostics::default();
    match network_filter(&any, "filter", &mut diags) {
        Some(f) if diags.is_ok() => Ok(f),
        _ => Err(diags.errors),
    }
}
