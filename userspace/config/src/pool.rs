//! The descriptor pool of Envoy's API and the JSON/YAML mapping built on it.
//!
//! Envoy's files use the canonical protobuf JSON mapping: field names in snake_case or
//! lowerCamelCase, durations as strings ("0.250s"), wrapper types as plain values, and typed
//! extensions as `Any` with an inline `"@type"`. prost-reflect implements that mapping from a
//! descriptor pool; the result is transcoded into envoy-types' generated structs.
//!
//! The decoded pool takes about 2 MiB of heap. A proxy that read a static bootstrap and
//! follows no control plane never needs it again: [`release`] lets it go (it is decoded
//! again, in a few milliseconds, if a later caller asks).
use std::sync::Mutex;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor};

use crate::ConfigError;

static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

/// Every Envoy message type nodemesh can read (see build.rs for the roots). A handle:
/// cheap to clone, and what it (or any descriptor or message from it) holds stays alive.
pub fn pool() -> DescriptorPool {
    POOL.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(|| {
            DescriptorPool::decode(
                &include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"))[..],
            )
            .unwrap_or_else(|e| panic!("the embedded Envoy descriptor set is corrupt: {e}"))
        })
        .clone()
}

/// Drops the shared pool; its memory is freed once no descriptor or message from it is
/// left. For a process done with reading Envoy's API (a static bootstrap, translated).
pub fn release() {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// The descriptor of `full_name` (e.g. `envoy.config.bootstrap.v3.Bootstrap`).
pub fn message(full_name: &str) -> Result<MessageDescriptor, ConfigError> {
    pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ConfigError::UnknownType(full_name.to_owned()))
}

/// Decodes a typed `Any` (an xDS resource, an extension's `typed_config`) by its type URL.
pub fn decode_any(
    any: &envoy_types::pb::google::protobuf::Any,
) -> Result<DynamicMessage, ConfigError> {
    let full_name = any.type_url.rsplit('/').next().unwrap_or_default();
    DynamicMessage::decode(message(full_name)?, any.value.as_slice()).map_err(|e| {
        ConfigError::Mapping {
            type_name: full_name.to_owned(),
            message: e.to_string(),
        }
    })
}

/// Parses `text` (YAML or JSON; JSON is YAML) as a `full_name` message.
///
/// Unknown fields are ignored rather than rejected: dumps from older or newer Envoy and
/// control planes carry fields this version does not know (what Envoy itself does with
/// unknown fields in a bootstrap depends on flags; a reader of config dumps must cope).
/// Go's protojson writes an empty `Any` as `{}`: such values are dropped before parsing.
pub fn parse(text: &str, full_name: &str) -> Result<DynamicMessage, ConfigError> {
    let mut value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    drop_empty_any(&mut value);
    from_json(value, full_name)
}

/// Parses a JSON value as a `full_name` message.
pub fn from_json(value: serde_json::Value, full_name: &str) -> Result<DynamicMessage, ConfigError> {
    let desc = message(full_name)?;
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(desc, value, &options).map_err(|e| {
        ConfigError::Mapping {
            type_name: full_name.to_owned(),
            message: e.to_string(),
        }
    })
}

/// Removes `{}` values of fields that are `Any` in Envoy's API (`typed_config`,
/// `typedConfig`, ...): an empty object has no `@type` and no protobuf meaning.
fn drop_empty_any(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|k, v| !(is_any_field(k) && v.as_object().is_some_and(|o| o.is_empty())));
            map.values_mut().for_each(drop_empty_any);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_empty_any),
        _ => {}
    }
}

fn is_any_field(name: &str) -> bool {
    matches!(
        name,
        "typed_config" | "typedConfig" | "typed_per_filter_config" | "typedPerFilterConfig"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_pool_keeps_what_was_taken_from_it_and_comes_back_when_asked() {
        let held = message("envoy.config.cluster.v3.Cluster").expect("type");
        release();
        // A descriptor taken before still decodes ...
        let cluster =
            DynamicMessage::decode(held.clone(), &[0x0a, 0x01, b'c'][..]).expect("decode");
        assert_eq!(
            cluster
                .get_field_by_name("name")
                .and_then(|v| v.as_str().map(str::to_owned)),
            Some("c".to_owned())
        );
        // ... and the next caller gets the same types from a new pool.
        let again = parse("name: c", "envoy.config.cluster.v3.Cluster").expect("parse");
        assert_eq!(
            prost_reflect::ReflectMessage::descriptor(&again).full_name(),
            held.full_name()
        );
        assert_eq!(
            again
                .get_field_by_name("name")
                .and_then(|v| v.as_str().map(str::to_owned)),
            Some("c".to_owned())
        );
    }

    #[test]
    fn parses_a_bootstrap_with_typed_extensions() {
        let yaml = r#"
static_resources:
  listeners:
  - name: outbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: out
          stream_idle_timeout: 0.250s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend, timeout: 2s }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
    some_future_field: ignored
    typed_extension_protocol_options: {}
"#;
        let msg = parse(yaml, "envoy.config.bootstrap.v3.Bootstrap").expect("parse");
        let typed: envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap =
            msg.transcode_to().expect("transcode");
        let resources = typed.static_resources.expect("static resources");
        assert_eq!(resources.listeners[0].name, "outbound");
        let any = resources.listeners[0].filter_chains[0].filters[0]
            .config_type
            .clone()
            .expect("typed config");
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any) =
            any
        else {
            panic!("typed config")
        };
        assert!(any.type_url.ends_with("HttpConnectionManager"));
        assert_eq!(
            resources.clusters[0].connect_timeout.map(|d| d.seconds),
            Some(1)
        );
    }

    #[test]
    fn syntax_and_type_errors_say_where() {
        assert!(matches!(
            parse("a: [", "envoy.config.bootstrap.v3.Bootstrap"),
            Err(ConfigError::Syntax(_))
        ));
        let e = parse(
            "static_resources: {listeners: 3}",
            "envoy.config.bootstrap.v3.Bootstrap",
        )
        .expect_err("bad type");
        assert!(e.to_string().contains("Bootstrap"), "{e}");
    }
}
