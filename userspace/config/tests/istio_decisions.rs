//! The edges of what is accepted from istiod-shaped resources: the shapes next to the
//! accepted ones that must still be refused (the accepted ones are in
//! tests/corpus/istio, checked by nodemesh-xds's istio_shapes test).
use nodemesh_config::{Resources, model::PortPredicate, pool, translate};

fn resources(listeners: &[&str], clusters: &[&str], routes: &[&str]) -> Resources {
    let parse = |items: &[&str], ty: &str| {
        items
            .iter()
            .map(|y| pool::parse(y, ty).unwrap_or_else(|e| panic!("{ty}: {e}")))
            .collect()
    };
    Resources {
        listeners: parse(listeners, "envoy.config.listener.v3.Listener"),
        clusters: parse(clusters, "envoy.config.cluster.v3.Cluster"),
        routes: parse(routes, "envoy.config.route.v3.RouteConfiguration"),
        dynamic: true,
        ..Resources::default()
    }
}

fn errors(r: &Resources) -> Vec<String> {
    translate(r).diagnostics.errors
}

fn assert_error(r: &Resources, expected: &str) {
    let e = errors(r);
    assert!(
        e.iter().any(|e| e.contains(expected)),
        "no error contains {expected:?}: {e:#?}"
    );
}

const CLUSTER: &str = r#"
name: outbound|8080||reviews.default.svc.cluster.local
type: EDS
eds_cluster_config: { eds_config: { ads: {} } }
"#;

const TLS_SOCKET: &str = r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: reviews
"#;

#[test]
fn only_istios_automatic_mtls_match_is_downgraded_to_plaintext() {
    let istio = format!(
        "{CLUSTER}transport_socket_matches:\n  - name: tlsMode-istio\n    match: {{ tlsMode: istio }}{TLS_SOCKET}"
    );
    let t = translate(&resources(&[], &[&istio], &[]));
    assert!(
        t.diagnostics.errors.is_empty(),
        "{:?}",
        t.diagnostics.errors
    );
    assert!(
        t.diagnostics
            .warnings
            .iter()
            .any(|w| w.contains("plaintext"))
    );

    for other in [
        "{}",
        "{ tlsMode: istio, extra: x }",
        "{ tlsMode: disabled }",
    ] {
        let c = format!(
            "{CLUSTER}transport_socket_matches:\n  - name: m\n    match: {other}{TLS_SOCKET}"
        );
        assert_error(
            &resources(&[], &[&c], &[]),
            "transport_socket_matches[m]: upstream TLS (UpstreamTlsContext) is not supported yet",
        );
    }
}

#[test]
fn upstream_bind_config_is_only_ignored_for_istios_loopback_guard() {
    for (source, ok) in [
        ("{ address: 127.0.0.6, port_value: 0 }", true),
        ("{ address: '::6', port_value: 0 }", true),
        ("{ address: 198.18.0.5, port_value: 0 }", false),
        ("{ address: 127.0.0.6, port_value: 4000 }", false),
    ] {
        let c = format!("{CLUSTER}upstream_bind_config: {{ source_address: {source} }}\n");
        let e = errors(&resources(&[], &[&c], &[]));
        assert_eq!(e.is_empty(), ok, "{source}: {e:?}");
    }
}

fn listener_with_http_filter(filter: &str) -> String {
    format!(
        r#"
name: l
address: {{ socket_address: {{ address: 0.0.0.0, port_value: 8080 }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: l
      rds: {{ route_config_name: r, config_source: {{ ads: {{}} }} }}
      http_filters:
{filter}
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

#[test]
fn fault_and_cors_are_accepted_only_while_they_do_nothing() {
    let empty = listener_with_http_filter(
        "      - name: envoy.filters.http.fault\n        typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault }",
    );
    assert!(errors(&resources(&[&empty], &[], &[])).is_empty());
    let abort = listener_with_http_filter(
        "      - name: envoy.filters.http.fault\n        typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: { http_status: 503, percentage: { numerator: 100 } } }",
    );
    assert_error(
        &resources(&[&abort], &[], &[]),
        "\"envoy.filters.http.fault\".abort: not supported",
    );
    let cors_route = r#"
name: r
virtual_hosts:
- name: v
  domains: ["*"]
  typed_per_filter_config:
    envoy.filters.http.cors:
      "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
      allow_origin_string_match: [ { exact: "https://shop.example" } ]
  routes: [ { match: { prefix: / }, direct_response: { status: 200 } } ]
"#;
    assert_error(
        &resources(&[], &[], &[cors_route]),
        "CORS policies (a VirtualService `corsPolicy`) are not implemented",
    );
}

#[test]
fn other_wasm_plugins_are_not_mistaken_for_istios() {
    // A null-VM plugin that is not stats or metadata exchange (attributegen rewrites
    // attributes other filters read): refused, not ignored.
    let attributegen = listener_with_http_filter(
        r#"      - name: istio.attributegen
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
          config:
            vm_config: { runtime: envoy.wasm.runtime.null, code: { local: { inline_string: envoy.wasm.attributegen } } }"#,
    );
    assert_error(
        &resources(&[&attributegen], &[], &[]),
        "\"istio.attributegen\": HTTP filter type envoy.extensions.filters.http.wasm.v3.Wasm is not supported",
    );
    // Istio's stats plugin compiled to real Wasm is not the null VM either.
    let v8 = listener_with_http_filter(
        r#"      - name: istio.stats
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
          config:
            vm_config: { runtime: envoy.wasm.runtime.v8, code: { local: { inline_string: envoy.wasm.stats } } }"#,
    );
    assert!(!errors(&resources(&[&v8], &[], &[])).is_empty());
    // A TypedStruct of a type nodemesh does not know.
    let unknown = listener_with_http_filter(
        r#"      - name: example.custom
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/example.Custom
          value: {}"#,
    );
    assert_error(&resources(&[&unknown], &[], &[]), "example.Custom");
}

#[test]
fn a_tls_chain_closes_and_other_transport_sockets_are_refused() {
    let chain = |socket: &str| {
        format!(
            r#"
name: virtualInbound
address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15006 }} }}
filter_chains:
- name: c
  filter_chain_match: {{ destination_port: 9080, transport_protocol: tls }}
  transport_socket: {socket}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c }}
"#
        )
    };
    let tls = chain(
        r#"{ name: envoy.transport_sockets.tls, typed_config: { "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext } }"#,
    );
    let t = translate(&resources(&[&tls], &[], &[]));
    let s = t.snapshot.expect("accepted");
    assert_eq!(
        s.listeners[0].filter_chains[0].policies.len(),
        1,
        "the closing policy"
    );
    let raw = chain(
        r#"{ name: envoy.transport_sockets.raw_buffer, typed_config: { "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer } }"#,
    );
    let s = translate(&resources(&[&raw], &[], &[]))
        .snapshot
        .expect("accepted");
    assert!(s.listeners[0].filter_chains[0].policies.is_empty());
    let other = chain("{ name: envoy.transport_sockets.alts }");
    assert_error(
        &resources(&[&other], &[], &[]),
        "transport socket envoy.transport_sockets.alts is not supported",
    );
}

#[test]
fn listener_filter_predicates_are_port_conditions() {
    let l = r#"
name: virtualInbound
address: { socket_address: { address: 0.0.0.0, port_value: 15006 } }
listener_filters:
- name: envoy.filters.listener.http_inspector
  typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }
  filter_disabled:
    not_match:
      or_match:
        rules:
        - destination_port_range: { start: 8000, end: 8100 }
        - destination_port_range: { start: 9080, end: 9081 }
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c }
"#;
    let s = translate(&resources(&[l], &[], &[]))
        .snapshot
        .expect("accepted");
    let listener = &s.listeners[0];
    assert!(matches!(
        listener.http_inspector_disabled,
        Some(PortPredicate::Not(_))
    ));
    // Disabled everywhere except the listed ports (Istio's "include" form).
    let detects_http = |port| listener.inspectors_for(port).0;
    let on: Vec<u16> = [3306, 7999, 8000, 8099, 8100, 9079, 9080, 9081]
        .into_iter()
        .filter(|p| detects_http(*p))
        .collect();
    assert_eq!(on, [8000, 8099, 9080]);

    let on_original_dst = l.replace(
        "envoy.filters.listener.http_inspector\n  typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }",
        "envoy.filters.listener.original_dst\n  typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }",
    );
    assert_error(
        &resources(&[&on_original_dst], &[], &[]),
        "filter_disabled: not supported for original_dst",
    );
}
