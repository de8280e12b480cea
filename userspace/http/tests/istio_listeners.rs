//! Two decisions about istiod's listeners, on real sockets: a TLS-terminating filter chain
//! (Istio's inbound mTLS) closes its connections instead of serving them or letting them
//! fall to the plaintext chain, and an inspector's `filter_disabled` keeps a server-first
//! protocol from waiting on detection (istiod disables HTTP detection on such ports and
//! sets `listener_filters_timeout: 0s`, which means "wait for ever").
mod common;

use std::time::Duration;

use common::{Upstream, free_port, get, start};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

/// A TLS 1.3 ClientHello with SNI and ALPN, as an Istio client sidecar sends it.
fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let len16 = |n: usize| u16::try_from(n).expect("fits").to_be_bytes();
    let mut sni_entry = vec![0u8];
    sni_entry.extend(len16(sni.len()));
    sni_entry.extend(sni.as_bytes());
    let mut protocols = Vec::new();
    for p in alpn {
        protocols.push(u8::try_from(p.len()).expect("fits"));
        protocols.extend(p.as_bytes());
    }
    let mut extensions = Vec::new();
    for (kind, list) in [(0u16, sni_entry), (16u16, protocols)] {
        extensions.extend(kind.to_be_bytes());
        extensions.extend(len16(list.len() + 2));
        extensions.extend(len16(list.len()));
        extensions.extend(list);
    }
    let mut body = vec![3, 3];
    body.extend([0x5a; 32]);
    body.push(32);
    body.extend([0xa5; 32]);
    body.extend(len16(6));
    body.extend([0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend([1, 0]);
    body.extend(len16(extensions.len()));
    body.extend(extensions);
    let mut handshake = vec![1];
    handshake.extend(&u32::try_from(body.len()).expect("fits").to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(len16(handshake.len()));
    record.extend(handshake);
    record
}

#[tokio::test]
async fn an_mtls_chain_closes_its_connections_and_the_plaintext_chain_serves() {
    let web = Upstream::start("web").await;
    // Where the TLS chain would send its bytes, were it served.
    let tls_upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    tls_upstream.set_nonblocking(true).expect("nonblocking");
    let tls_port = tls_upstream.local_addr().expect("addr").port();
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
    filter_chains:
    - name: mtls
      filter_chain_match: {{ transport_protocol: tls, application_protocols: [istio-http/1.1, istio-h2] }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: tls, cluster: tls }}
    - name: plaintext
      filter_chain_match: {{ transport_protocol: raw_buffer }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plaintext
          route_config:
            virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: web }} }} ] }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: web
    load_assignment: {{ cluster_name: web, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {web} }} }} }} }} ] }} ] }}
  - name: tls
    load_assignment: {{ cluster_name: tls, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tls_port} }} }} }} }} ] }} ] }}
"#,
        web = web.addr.port()
    );
    let (_proxy, addr) = start(&yaml).await;

    let mut tls = TcpStream::connect(addr).await.expect("connect");
    tls.write_all(&client_hello(
        "productpage.default.svc.cluster.local",
        &["istio-http/1.1"],
    ))
    .await
    .expect("send the ClientHello");
    let mut rest = Vec::new();
    // Closed by the proxy: end of stream (or a reset), and nothing answered. Were the chain
    // served, the upstream (which never answers) would hold the connection open: the bound
    // only turns that hang into a failure.
    let _ = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut rest))
        .await
        .expect("the TLS chain's connection was not closed");
    assert!(rest.is_empty(), "the TLS chain answered {rest:?}");
    assert!(
        matches!(tls_upstream.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the TLS chain's upstream was connected to"
    );

    let got = get(addr, "productpage:9080", "/", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(web.count(), 1);
}

#[tokio::test]
async fn a_server_first_port_is_not_held_by_a_disabled_http_inspector() {
    // A server that speaks first (MySQL, SMTP): the client sends nothing until greeted.
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server_port = server.local_addr().expect("addr").port();
    let greeter = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = server.accept().await else {
                continue;
            };
            let _ = s.write_all(b"220 ready\r\n").await;
        }
    });
    let port = free_port();
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
      filter_disabled:
        or_match:
          rules:
          - destination_port_range: {{ start: {port}, end: {next} }}
    listener_filters_timeout: 0s
    continue_on_listener_filters_timeout: true
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: db, cluster: db }}
  clusters:
  - name: db
    load_assignment: {{ cluster_name: db, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {server_port} }} }} }} }} ] }} ] }}
"#,
        next = port + 1
    );
    let (_proxy, addr) = start(&yaml).await;
    let client = TcpStream::connect(addr).await.expect("connect");
    let mut line = String::new();
    // Not a timing assertion: with the inspector running, inspection never ends (timeout
    // 0s) and this read would wait for ever; the bound only turns a hang into a failure.
    tokio::time::timeout(
        Duration::from_secs(60),
        BufReader::new(client).read_line(&mut line),
    )
    .await
    .expect("the greeting never came: HTTP detection ran on a disabled port")
    .expect("read the greeting");
    assert_eq!(line, "220 ready\r\n");
    greeter.abort();
}
