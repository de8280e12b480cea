//! What resources name in other resources, found by walking their messages (typed
//! extensions included): the secrets a client must subscribe to over SDS.
use std::collections::BTreeSet;

use prost_reflect::{DynamicMessage, ReflectMessage as _, Value};

const SDS_SECRET_CONFIG: &str = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig";
const ANY: &str = "google.protobuf.Any";
/// Deeper than any real resource nests; bounds a hostile one.
const MAX_DEPTH: usize = 48;

/// The names of every `SdsSecretConfig` in `messages` (certificates and validation
/// contexts of TLS transport sockets, in filter chains, clusters and
/// `transport_socket_matches`).
pub fn secret_names<'a>(
    messages: impl IntoIterator<Item = &'a DynamicMessage>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in messages {
        walk(m, 0, &mut out);
    }
    out
}

fn walk(msg: &DynamicMessage, depth: usize, out: &mut BTreeSet<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    let desc = msg.descriptor();
    let name = desc.full_name();
    if name == SDS_SECRET_CONFIG {
        if let Some(Value::String(n)) = msg.get_field_by_name("name").as_deref()
            && !n.is_empty()
        {
            out.insert(n.clone());
        }
        return;
    }
    if name == ANY {
        let type_url = match msg.get_field_by_name("type_url").as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => return,
        };
        let value = match msg.get_field_by_name("value").as_deref() {
            Some(Value::Bytes(b)) => b.to_vec(),
            _ => return,
        };
        let any = envoy_types::pb::google::protobuf::Any { type_url, value };
        // An extension this build does not know cannot name a secret it would use.
        if let Ok(inner) = nodemesh_config::pool::decode_any(&any) {
            walk(&inner, depth + 1, out);
        }
        return;
    }
    for (_, value) in msg.fields() {
        walk_value(value, depth + 1, out);
    }
}

fn walk_value(value: &Value, depth: usize, out: &mut BTreeSet<String>) {
    match value {
        Value::Message(m) => walk(m, depth, out),
        Value::List(items) => items.iter().for_each(|v| walk_value(v, depth, out)),
        Value::Map(entries) => entries.values().for_each(|v| walk_value(v, depth, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_secrets_inside_typed_transport_sockets() {
        let cluster = nodemesh_config::pool::parse(
            r#"
name: c
transport_socket_matches:
- name: tlsMode-istio
  match: { tlsMode: istio }
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
      common_tls_context:
        tls_certificate_sds_secret_configs: [{ name: default, sds_config: { ads: {} } }]
        combined_validation_context:
          default_validation_context: {}
          validation_context_sds_secret_config: { name: ROOTCA, sds_config: { ads: {} } }
"#,
            "envoy.config.cluster.v3.Cluster",
        )
        .expect("cluster");
        let plain = nodemesh_config::pool::parse("name: p", "envoy.config.cluster.v3.Cluster")
            .expect("cluster");
        let names = secret_names([&cluster, &plain]);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["ROOTCA".to_owned(), "default".to_owned()]
        );
    }
}
