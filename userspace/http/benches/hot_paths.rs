//! Criterion micro-benchmarks of the request-path work nodemesh-http owns: route selection
//! (virtual host by domain, then the first matching route) on route configurations the size
//! istiod gives a node proxy, and the listener inspectors' protocol sniffing.
//!
//! `cargo bench -p nodemesh-http --bench hot_paths`; the numbers are in the README.
use std::{hint::black_box, sync::Arc};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use nodemesh_config::{
    load_bootstrap,
    model::{NetworkFilter, RouteConfig, RouteSource},
};
use nodemesh_http::{
    detect,
    route::{self, RequestView},
};

/// The outbound route configuration of `services` istiod-shaped services.
fn route_config(services: usize) -> Arc<RouteConfig> {
    let bootstrap = nodemesh_simnode::services::bootstrap(services, 15001);
    let translated = load_bootstrap(&bootstrap).expect("the generated bootstrap parses");
    let snapshot = translated
        .snapshot
        .unwrap_or_else(|| panic!("translation failed: {:?}", translated.diagnostics.errors));
    let chain = &snapshot.listeners[0].filter_chains[0];
    match &chain.filter {
        NetworkFilter::Http(hcm) => match &hcm.routes {
            RouteSource::Inline(rc) => rc.clone(),
            RouteSource::Named(name) => panic!("route configuration {name} is not inline"),
        },
        NetworkFilter::Tcp(_) => panic!("the listener is not HTTP"),
    }
}

fn route_selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_select");
    let headers = HeaderMap::new();
    for services in [10, 100, 1000] {
        let rc = route_config(services);
        // The last service: a scan would pay for every virtual host before it.
        let host = format!("svc-{}.bench.svc.cluster.local:8080", services - 1);
        let request = RequestView {
            host: &host,
            path: "/api/v1/items?page=2",
            method: "GET",
            scheme: "http",
            headers: &headers,
        };
        assert!(
            route::select(&rc, &request).is_some_and(|s| s.index == 2),
            "the catch-all route of the last service"
        );
        group.bench_with_input(BenchmarkId::from_parameter(services), &request, |b, r| {
            b.iter(|| route::select(black_box(&*rc), black_box(r)).map(|s| s.index))
        });
    }
    group.finish();
}

/// A TLS 1.3 ClientHello with SNI and ALPN, as a mesh client sends it.
fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let mut sni_entry = vec![0u8];
    sni_entry.extend((sni.len() as u16).to_be_bytes());
    sni_entry.extend(sni.as_bytes());
    let mut protocols = Vec::new();
    for p in alpn {
        protocols.push(p.len() as u8);
        protocols.extend(p.as_bytes());
    }
    let mut extensions = Vec::new();
    for (kind, list) in [(0u16, sni_entry), (16u16, protocols)] {
        extensions.extend(kind.to_be_bytes());
        extensions.extend((list.len() as u16 + 2).to_be_bytes());
        extensions.extend((list.len() as u16).to_be_bytes());
        extensions.extend(list);
    }
    let mut body = vec![3, 3];
    body.extend([0x5a; 32]); // random
    body.push(32);
    body.extend([0xa5; 32]); // legacy session id
    body.extend(6u16.to_be_bytes());
    body.extend([0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend([1, 0]);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

fn sniffing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sniff");
    let http1 = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: svc-1.bench.svc.cluster.local\r\n\r\n";
    group.bench_function("http_inspector/http1", |b| {
        b.iter(|| {
            matches!(
                detect::http_version(black_box(http1)),
                detect::Verdict::Yes(_)
            )
        })
    });
    group.bench_function("http_inspector/h2_preface", |b| {
        b.iter(|| {
            matches!(
                detect::http_version(black_box(detect::H2_PREFACE)),
                detect::Verdict::Yes(_)
            )
        })
    });
    let hello = client_hello("svc-1.bench.svc.cluster.local", &["h2", "http/1.1"]);
    assert!(
        matches!(detect::client_hello(&hello), detect::Verdict::Yes(ref h) if h.server_name.as_deref() == Some("svc-1.bench.svc.cluster.local")),
        "the ClientHello parses"
    );
    group.bench_function("tls_inspector/client_hello", |b| {
        b.iter(|| {
            matches!(
                detect::client_hello(black_box(&hello)),
                detect::Verdict::Yes(_)
            )
        })
    });
    group.finish();
}

criterion_group!(benches, route_selection, sniffing);
criterion_main!(benches);
