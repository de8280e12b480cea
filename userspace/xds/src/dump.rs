//! The live configuration as an Envoy config dump (`envoy.admin.v3.ConfigDump` in the
//! protobuf JSON mapping), as Envoy's admin `/config_dump` shows it: the bootstrap's
//! static resources under `static_*`, what the control plane sent under `dynamic_*` with
//! the version each came in. `nodemesh config check` and `nodemesh config route` read it
//! back, and so does any tool made for Envoy's dumps.
//!
//! Secrets are never dumped (Envoy redacts them too).
use prost_reflect::DynamicMessage;
use serde_json::{Map, Value, json};

use crate::types::{ResourceSet, ResourceType};

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";

/// A resource in the JSON mapping with its `@type`, as an `Any` is written.
fn typed(ty: ResourceType, msg: &DynamicMessage) -> Value {
    let mut out = Map::new();
    out.insert("@type".into(), Value::String(ty.type_url().to_owned()));
    if let Ok(Value::Object(fields)) = serde_json::to_value(msg) {
        out.extend(fields);
    }
    Value::Object(out)
}

/// The dump of `base` (the bootstrap's static resources) and `dynamic` (accepted over xDS).
pub fn config_dump(base: &nodemesh_config::Resources, dynamic: &ResourceSet) -> Value {
    let statics = |ty: ResourceType, msgs: &[DynamicMessage], key: &str| -> Vec<Value> {
        msgs.iter().map(|m| json!({ key: typed(ty, m) })).collect()
    };
    let dynamics = |ty: ResourceType, key: &str| -> Vec<Value> {
        dynamic
            .of(ty)
            .map(|r| json!({ "version_info": r.version, key: typed(ty, &r.message) }))
            .collect()
    };
    let listeners: Vec<Value> = dynamic
        .of(ResourceType::Listener)
        .map(|r| {
            json!({
                "name": r.name,
                "active_state": {
                    "version_info": r.version,
                    "listener": typed(ResourceType::Listener, &r.message),
                },
            })
        })
        .collect();
    json!({
        "configs": [
            {
                "@type": format!("{ADMIN}ClustersConfigDump"),
                "static_clusters": statics(ResourceType::Cluster, &base.clusters, "cluster"),
                "dynamic_active_clusters": dynamics(ResourceType::Cluster, "cluster"),
            },
            {
                "@type": format!("{ADMIN}EndpointsConfigDump"),
                "static_endpoint_configs": statics(ResourceType::Endpoints, &base.assignments, "endpoint_config"),
                "dynamic_endpoint_configs": dynamics(ResourceType::Endpoints, "endpoint_config"),
            },
            {
                "@type": format!("{ADMIN}ListenersConfigDump"),
                "static_listeners": statics(ResourceType::Listener, &base.listeners, "listener"),
                "dynamic_listeners": listeners,
            },
            {
                "@type": format!("{ADMIN}RoutesConfigDump"),
                "static_route_configs": statics(ResourceType::Route, &base.routes, "route_config"),
                "dynamic_route_configs": dynamics(ResourceType::Route, "route_config"),
            },
        ]
    })
}
