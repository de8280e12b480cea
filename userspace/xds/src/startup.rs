//! Where a proxy starts: a configuration file read once into its first snapshot and, when
//! it names a control plane, the ADS client's configuration.
//!
//! The control plane comes from the bootstrap's `dynamic_resources` (as Envoy reads it) or
//! from the agent's `control_plane` setting, never both: two sources of truth for the same
//! resources would be a configuration error the operator should fix, not one nodemesh
//! should arbitrate. A config dump (`/config_dump` output) is a finished configuration and
//! follows nothing. The agent and `nodemesh proxy -c` both start here, so they make the
//! same decision from the same file.
use anyhow::bail;
use nodemesh_config::{Source, Translated};

use crate::client::ClientConfig;

/// The agent's `control_plane` setting: follow `authority` (`host:port`) as `node_id`.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub authority: String,
    pub node_id: String,
}

/// What a proxy starts from.
#[derive(Debug)]
pub struct Start {
    /// The static resources, translated: the first snapshot served. Its diagnostics are the
    /// caller's to report; with errors, there is no snapshot and no control plane.
    pub translated: Translated,
    /// The control plane to follow, if any.
    pub xds: Option<ClientConfig>,
}

/// Reads `text` (a bootstrap or a config dump) once.
pub fn read(text: &str, control_plane: Option<ControlPlane>) -> anyhow::Result<Start> {
    let res = match nodemesh_config::read_source(text)? {
        Source::Dump(translated) => {
            if let Some(cp) = control_plane {
                bail!(
                    "the file is a config dump, a finished configuration; it cannot also follow \
                     the control plane at {}",
                    cp.authority
                );
            }
            return Ok(Start {
                translated: *translated,
                xds: None,
            });
        }
        Source::Bootstrap(res) => *res,
    };
    let translated = nodemesh_config::translate_bootstrap(&res);
    let Some(snapshot) = &translated.snapshot else {
        return Ok(Start {
            translated,
            xds: None,
        });
    };
    let xds = match (res.ads.is_some(), control_plane) {
        (true, Some(cp)) => bail!(
            "control_plane ({}) and the bootstrap's dynamic_resources both name a control \
             plane; keep one",
            cp.authority
        ),
        (true, None) => Some(ClientConfig::from_translated_bootstrap(res, snapshot)?),
        (false, Some(cp)) => Some(ClientConfig::for_control_plane(
            &cp.authority,
            cp.node_id,
            res,
        )),
        (false, None) => None,
    };
    Ok(Start { translated, xds })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATIC: &str = "static_resources: {}\n";
    const ADS: &str = r#"
dynamic_resources:
  ads_config: { api_type: GRPC, grpc_services: [ { envoy_grpc: { cluster_name: xds } } ] }
  lds_config: { ads: {} }
  cds_config: { ads: {} }
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: xds
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 198.18.7.1, port_value: 15010 } } } } ] } ]
"#;

    fn cp() -> ControlPlane {
        ControlPlane {
            authority: "198.18.7.2:15010".into(),
            node_id: "nodemesh~198.18.7.3~node".into(),
        }
    }

    #[test]
    fn a_static_bootstrap_follows_nothing_unless_the_agent_names_a_control_plane() {
        let alone = read(STATIC, None).expect("static");
        assert!(alone.translated.snapshot.is_some());
        assert!(alone.xds.is_none());
        let agent = read(STATIC, Some(cp())).expect("with control_plane");
        let xds = agent.xds.expect("follows the control plane");
        assert_eq!(xds.server, "198.18.7.2:15010");
        assert_eq!(xds.ads.node.id, "nodemesh~198.18.7.3~node");
    }

    #[test]
    fn dynamic_resources_name_the_server_from_the_ads_cluster() {
        let start = read(ADS, None).expect("ads bootstrap");
        assert_eq!(start.xds.expect("follows ADS").server, "198.18.7.1:15010");
        let snapshot = start.translated.snapshot.expect("static snapshot");
        assert!(snapshot.clusters.contains_key("xds"));
    }

    #[test]
    fn two_control_planes_or_a_dump_with_one_are_refused() {
        let both = read(ADS, Some(cp())).expect_err("two control planes");
        assert!(both.to_string().contains("keep one"), "{both}");
        let dump = r#"{"configs": []}"#;
        assert!(read(dump, None).expect("a dump").xds.is_none());
        let err = read(dump, Some(cp())).expect_err("a dump cannot follow");
        assert!(err.to_string().contains("config dump"), "{err}");
    }

    #[test]
    fn errors_in_the_static_resources_leave_no_snapshot_and_no_client() {
        // The ADS bootstrap with a route to a cluster that does not exist.
        let bad = format!(
            "{ADS}{}",
            r#"  listeners:
  - name: l
    address: { socket_address: { address: 198.18.7.3, port_value: 8080 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
          route_config:
            virtual_hosts:
            - { name: all, domains: ["*"], routes: [ { match: { prefix: "/" }, route: { cluster: nope } } ] }
"#
        );
        let start = read(&bad, None).expect("read, with diagnostics");
        assert!(start.translated.snapshot.is_none());
        assert!(
            start
                .translated
                .diagnostics
                .errors
                .iter()
                .any(|e| e.contains("nope")),
            "{:?}",
            start.translated.diagnostics.errors
        );
        assert!(start.xds.is_none());
    }
}
