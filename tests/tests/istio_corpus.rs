//! The Istio-shaped corpus (corpus/istio) is configuration Envoy accepts: each accepted
//! folder, made into a bootstrap, passes `envoy --mode validate` (Envoy 1.40 from
//! `cargo xtask setup`, not root). Upstream Envoy lacks Istio's own extensions (the stats
//! plugin, metadata exchange, ALPN override, null-VM Wasm plugins), so filters of those
//! types are left out; everything else is validated as written, with RDS routes inlined
//! and EDS assignments made static (validate mode fetches nothing). What nodemesh does with
//! the same folders is userspace/xds/tests/istio_shapes.rs.
use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::{Value, json};

/// Types only Istio's proxy builds in.
const ISTIO_ONLY: &[&str] = &[
    "stats.PluginConfig",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "udpa.type.v1.TypedStruct",
    "envoy.extensions.filters.http.wasm.v3.Wasm",
    "envoy.extensions.filters.network.wasm.v3.Wasm",
];

fn type_of(v: &Value) -> &str {
    v.pointer("/typed_config/@type")
        .and_then(Value::as_str)
        .and_then(|t| t.rsplit('/').next())
        .unwrap_or_default()
}

/// Leaves out Istio-only filters (HTTP, network and cluster filters); returns their names.
fn strip_istio_filters(v: &mut Value, dropped: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for key in ["filters", "http_filters"] {
                if let Some(Value::Array(list)) = map.get_mut(key) {
                    list.retain(|f| {
                        let istio = ISTIO_ONLY.contains(&type_of(f));
                        if istio {
                            dropped.push(f["name"].as_str().unwrap_or("?").to_owned());
                        }
                        !istio
                    });
                }
            }
            map.values_mut()
                .for_each(|v| strip_istio_filters(v, dropped));
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| strip_istio_filters(v, dropped)),
        _ => {}
    }
}

fn inline_rds(v: &mut Value, routes: &BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            if let Some(rds) = map.remove("rds") {
                let name = rds["route_config_name"].as_str().expect("an RDS name");
                let rc = routes
                    .get(name)
                    .unwrap_or_else(|| panic!("route {name} is in the folder"));
                map.insert("route_config".into(), rc.clone());
            }
            map.values_mut().for_each(|v| inline_rds(v, routes));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| inline_rds(v, routes)),
        _ => {}
    }
}

fn bootstrap(dir: &Path) -> (Value, Vec<String>) {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("the case folder")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let doc: Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("YAML");
        for mut r in doc["resources"].as_array().cloned().unwrap_or_default() {
            let ty = r["@type"]
                .as_str()
                .expect("@type")
                .rsplit('/')
                .next()
                .expect("a name")
                .to_owned();
            r.as_object_mut().expect("a mapping").remove("@type");
            by_type.entry(ty).or_default().push(r);
        }
    }
    let mut take = |ty: &str| by_type.remove(ty).unwrap_or_default();
    let routes: BTreeMap<String, Value> = take("envoy.config.route.v3.RouteConfiguration")
        .into_iter()
        .map(|r| (r["name"].as_str().expect("named").to_owned(), r))
        .collect();
    let assignments: BTreeMap<String, Value> =
        take("envoy.config.endpoint.v3.ClusterLoadAssignment")
            .into_iter()
            .map(|c| (c["cluster_name"].as_str().expect("named").to_owned(), c))
            .collect();
    let mut listeners = Value::Array(take("envoy.config.listener.v3.Listener"));
    inline_rds(&mut listeners, &routes);
    let mut clusters = take("envoy.config.cluster.v3.Cluster");
    for c in &mut clusters {
        if c["type"] == "EDS" {
            let name = c["name"].as_str().expect("named").to_owned();
            let map = c.as_object_mut().expect("a mapping");
            map.remove("eds_cluster_config");
            map.insert("type".into(), json!("STATIC"));
            map.insert("load_assignment".into(), assignments[&name].clone());
        }
    }
    // The SDS cluster Istio's bootstrap has (the secrets are never fetched here).
    clusters.push(json!({
        "name": "sds-grpc", "type": "STATIC",
        "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} } } },
        "load_assignment": { "cluster_name": "sds-grpc", "endpoints": [ { "lb_endpoints": [ { "endpoint": {
            "address": { "pipe": { "path": "./var/run/secrets/workload-spiffe-uds/socket" } } } } ] } ] }
    }));
    let mut boot = json!({
        "node": { "id": "sidecar~198.18.20.10~productpage.default~default.svc.cluster.local", "cluster": "productpage.default" },
        "static_resources": { "listeners": listeners, "clusters": clusters },
    });
    let mut dropped = Vec::new();
    strip_istio_filters(&mut boot, &mut dropped);
    (boot, dropped)
}

#[test]
fn the_accepted_istio_cases_are_valid_envoy_configuration() {
    let envoy = nodemesh_tests::differential::envoy_path().expect("Envoy");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/istio");
    for case in ["sidecar", "waypoint_like", "optional_filter"] {
        let (boot, dropped) = bootstrap(&corpus.join(case));
        if case != "optional_filter" {
            assert!(
                dropped.iter().any(|d| d == "istio.stats"),
                "{case}: the Istio-only filters were found and left out: {dropped:?}"
            );
        }
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(file.path(), serde_json::to_vec(&boot).expect("JSON")).expect("write");
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "--log-level", "error", "-c"])
            .arg(file.path())
            .output()
            .expect("run envoy");
        assert!(
            out.status.success(),
            "{case}: Envoy refuses it:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
