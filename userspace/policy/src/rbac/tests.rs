use std::net::SocketAddr;

use http::HeaderMap;
use nodemesh_config::filters::{HTTP_RBAC_URL, HttpFilterConfig, http_filter_from_yaml};

use super::*;
use crate::{HttpAttributes, stats::RbacStats};

fn engine(yaml: &str) -> Arc<Engine> {
    match http_filter_from_yaml(HTTP_RBAC_URL, yaml).expect("valid RBAC") {
        HttpFilterConfig::Rbac(r) => Engine::compile("rbac", &r, RbacStats::default()),
        other => panic!("not rbac: {other:?}"),
    }
}

struct Req {
    method: &'static str,
    path: &'static str,
    headers: HeaderMap,
    peer: SocketAddr,
    dst: SocketAddr,
    principal: Option<&'static str>,
}

impl Req {
    fn new(method: &'static str, path: &'static str) -> Self {
        Self {
            method,
            path,
            headers: HeaderMap::new(),
            peer: "198.18.0.2:40000".parse().expect("peer"),
            dst: "198.18.0.3:8080".parse().expect("dst"),
            principal: None,
        }
    }

    fn attrs(&self) -> Attributes<'_> {
        Attributes {
            peer: self.peer,
            remote_ip: self.peer.ip(),
            destination: self.dst,
            principal: self.principal,
            namespace: None,
            server_name: None,
            http: Some(HttpAttributes {
                method: self.method,
                authority: "api.example.com",
                path: self.path,
                scheme: "http",
                headers: &self.headers,
                cluster: None,
            }),
        }
    }
}

#[test]
fn allow_matches_and_denies_the_rest_with_none() {
    let e = engine(
        r#"
rules:
  action: ALLOW
  policies:
    b-readers:
      permissions: [ { and_rules: { rules: [ { header: { name: ":method", string_match: { exact: GET } } }, { url_path: { path: { prefix: /public/ } } } ] } } ]
      principals: [ { any: true } ]
"#,
    );
    assert_eq!(
        e.check(&Req::new("GET", "/public/x?q=1").attrs()),
        Outcome::Allowed {
            matched: Some("b-readers".into())
        }
    );
    let denied = e.check(&Req::new("POST", "/public/x").attrs());
    assert_eq!(
        denied.details().as_deref(),
        Some("rbac_access_denied_matched_policy[none]")
    );
}

#[test]
fn deny_names_the_first_matching_policy_in_name_order() {
    let e = engine(
        r#"
rules:
  action: DENY
  policies:
    z-admin: { permissions: [ { url_path: { path: { prefix: /admin } } } ], principals: [ { any: true } ] }
    a-admin-post:
      permissions: [ { url_path: { path: { prefix: /admin } } } ]
      principals: [ { not_id: { direct_remote_ip: { address_prefix: 198.18.1.0, prefix_len: 24 } } } ]
"#,
    );
    let out = e.check(&Req::new("GET", "/admin/users").attrs());
    assert_eq!(
        out.details().as_deref(),
        Some("rbac_access_denied_matched_policy[a-admin-post]")
    );
    assert!(e.check(&Req::new("GET", "/shop").attrs()).allowed());
}

#[test]
fn authenticated_principals_need_an_identity() {
    let e = engine(
        r#"
rules:
  action: ALLOW
  policies:
    from-web:
      permissions: [ { any: true } ]
      principals: [ { authenticated: { principal_name: { exact: "spiffe://cluster.local/ns/shop/sa/web" } } } ]
    ns-shop:
      permissions: [ { destination_port: 9090 } ]
      principals: [ { authenticated: { principal_name: { safe_regex: { regex: ".*/ns/shop/.*" } } } } ]
"#,
    );
    let mut r = Req::new("GET", "/");
    assert!(!e.check(&r.attrs()).allowed(), "no identity: no match");
    r.principal = Some("spiffe://cluster.local/ns/shop/sa/web");
    assert!(e.check(&r.attrs()).allowed());
    r.principal = Some("spiffe://cluster.local/ns/shop/sa/other");
    assert!(!e.check(&r.attrs()).allowed(), "port 8080 is not 9090");
    r.dst = "198.18.0.3:9090".parse().expect("dst");
    assert_eq!(
        e.check(&r.attrs()),
        Outcome::Allowed {
            matched: Some("ns-shop".into())
        }
    );
}

#[test]
fn shadow_rules_never_deny() {
    let e = engine(
        r#"
shadow_rules:
  action: DENY
  policies:
    all: { permissions: [ { any: true } ], principals: [ { any: true } ] }
"#,
    );
    assert!(e.check(&Req::new("GET", "/").attrs()).allowed());
}

#[test]
fn the_index_finds_the_same_policy_as_a_scan() {
    // 300 policies on distinct ports, 100 on principals, and a few unfiled ones.
    let mut yaml = String::from("rules:\n  action: ALLOW\n  policies:\n");
    for i in 0..300 {
        yaml.push_str(&format!(
            "    p{i:04}: {{ permissions: [ {{ destination_port: {} }} ], principals: [ {{ any: true }} ] }}\n",
            10000 + i
        ));
    }
    for i in 0..100 {
        yaml.push_str(&format!(
            "    q{i:04}: {{ permissions: [ {{ any: true }} ], principals: [ {{ authenticated: {{ principal_name: {{ exact: \"spiffe://td/ns/n{i}/sa/s\" }} }} }} ] }}\n"
        ));
    }
    yaml.push_str("    r-header: { permissions: [ { header: { name: x-pass, present_match: true } } ], principals: [ { any: true } ] }\n");
    let e = engine(&yaml);
    let mut r = Req::new("GET", "/");
    r.dst = "198.18.0.3:10150".parse().expect("dst");
    assert_eq!(
        e.check(&r.attrs()),
        Outcome::Allowed {
            matched: Some("p0150".into())
        }
    );
    r.dst = "198.18.0.3:80".parse().expect("dst");
    r.principal = Some("spiffe://td/ns/n42/sa/s");
    assert_eq!(
        e.check(&r.attrs()),
        Outcome::Allowed {
            matched: Some("q0042".into())
        }
    );
    r.principal = None;
    assert!(!e.check(&r.attrs()).allowed());
    r.headers.insert("x-pass", "1".parse().expect("value"));
    assert_eq!(
        e.check(&r.attrs()),
        Outcome::Allowed {
            matched: Some("r-header".into())
        }
    );
}
