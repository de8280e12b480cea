//! What nodemesh supports of Envoy's API, field by field.
//!
//! Every message type nodemesh reads has an entry: the fields it implements, and the fields
//! it ignores because ignoring them cannot change what a request sees (each listed with the
//! reason, reported as a warning once). Any other field that is set is an error naming the
//! field and where it is. A configuration is therefore either honoured as Envoy would honour
//! it, or refused, or accepted with the differences spelled out; never silently different.
//!
//! Typed extensions (`Any`) are not walked here: the translation decodes each one it
//! understands and checks it with [`check`] on its own.
use std::collections::BTreeSet;

use prost_reflect::{DynamicMessage, ReflectMessage as _, Value};

/// How one message type is treated.
#[derive(Debug, Clone, Copy)]
pub enum Rules {
    /// Every field is meaningful to nodemesh as a value (addresses, durations, matchers
    /// handled whole); not walked further.
    Leaf,
    /// The listed fields are implemented (and walked); the ignored ones warn; anything else
    /// set is an error.
    Fields {
        supported: &'static [&'static str],
        ignored: &'static [(&'static str, &'static str)],
    },
}

/// Errors and warnings collected while reading a configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    pub errors: Vec<String>,
    /// Deduplicated: each ignored field is reported once.
    pub warnings: BTreeSet<String>,
}

impl Diagnostics {
    pub fn error(&mut self, msg: impl Into<String>) {
        self.errors.push(msg.into());
    }

    pub fn warn(&mut self, msg: impl Into<String>) {
        self.warnings.insert(msg.into());
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
    }
}

/// Checks every set field of `msg` (recursively, not into `Any`) against [`rules`].
pub fn check(msg: &DynamicMessage, path: &str, diags: &mut Diagnostics) {
    let desc = msg.descriptor();
    let type_name = desc.full_name();
    let Some(rules) = rules(type_name) else {
        diags.error(format!("{path}: {type_name} is not supported"));
        return;
    };
    let Rules::Fields { supported, ignored } = rules else {
        return;
    };
    for (field, value) in msg.fields() {
        let name = field.name();
        let here = format!("{path}.{name}");
        if supported.contains(&name) {
            walk(value, &here, diags);
        } else if let Some((_, reason)) = ignored.iter().find(|(f, _)| *f == name) {
            diags.warn(format!("{type_name}.{name} is ignored: {reason}"));
        } else {
            diags.error(format!("{here}: not supported by nodemesh"));
        }
    }
}

fn walk(value: &Value, path: &str, diags: &mut Diagnostics) {
    match value {
        Value::Message(m) if m.descriptor().full_name() == "google.protobuf.Any" => {}
        Value::Message(m) => check(m, path, diags),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let label = match item {
                    Value::Message(m) => element_name(m).unwrap_or_else(|| i.to_string()),
                    _ => i.to_string(),
                };
                walk(item, &format!("{path}[{label}]"), diags);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries {
                walk(item, &format!("{path}[{key:?}]"), diags);
            }
        }
        _ => {}
    }
}

/// The `name` of a list element, for readable paths (`listeners[outbound]`).
fn element_name(m: &DynamicMessage) -> Option<String> {
    let field = m.descriptor().get_field_by_name("name")?;
    match m.get_field(&field).as_ref() {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

const NO_EFFECT_ON_TRAFFIC: &str = "it only affects Envoy's own statistics, tracing or internals";

/// The rules for `type_name`, or `None` if nodemesh does not read that type at all.
pub fn rules(type_name: &str) -> Option<Rules> {
    TABLE
        .iter()
        .find(|(names, _)| names.contains(&type_name))
        .map(|(_, rules)| *rules)
}

use Rules::{Fields, Leaf};

/// The table behind [`rules`]: message types and how each is treated.
static TABLE: &[(&[&str], Rules)] = &[
    (
        &[
            "google.protobuf.Duration",
            "google.protobuf.UInt32Value",
            "google.protobuf.BoolValue",
            "google.protobuf.UInt64Value",
            "google.protobuf.Struct",
            "google.protobuf.Value",
            "google.protobuf.ListValue",
            "envoy.config.core.v3.Metadata",
            "envoy.type.v3.FractionalPercent",
            "envoy.type.v3.Percent",
            "envoy.config.core.v3.CidrRange",
            "envoy.type.v3.Int64Range",
            "envoy.type.v3.Int32Range",
            "envoy.config.core.v3.HeaderValue",
            "envoy.config.core.v3.Locality",
            "envoy.config.core.v3.RuntimeFractionalPercent",
            "envoy.config.core.v3.DataSource",
        ],
        Leaf,
    ),
    (
        &["envoy.config.bootstrap.v3.Bootstrap"],
        Fields {
            supported: &["static_resources", "dynamic_resources", "admin", "node"],
            ignored: &[
                ("stats_config", NO_EFFECT_ON_TRAFFIC),
                ("stats_sinks", NO_EFFECT_ON_TRAFFIC),
                ("stats_flush_interval", NO_EFFECT_ON_TRAFFIC),
                ("tracing", NO_EFFECT_ON_TRAFFIC),
                (
                    "layered_runtime",
                    "nodemesh has no runtime overrides; every runtime key takes its default",
                ),
                (
                    "overload_manager",
                    "nodemesh sheds load with its own per-pod limits",
                ),
                ("cluster_manager", NO_EFFECT_ON_TRAFFIC),
                ("watchdogs", NO_EFFECT_ON_TRAFFIC),
                ("watchdog", NO_EFFECT_ON_TRAFFIC),
                ("enable_dispatcher_stats", NO_EFFECT_ON_TRAFFIC),
                ("header_prefix", "nodemesh always uses x-envoy-"),
                ("stats_server_version_override", NO_EFFECT_ON_TRAFFIC),
                ("node_context_params", NO_EFFECT_ON_TRAFFIC),
                ("bootstrap_extensions", NO_EFFECT_ON_TRAFFIC),
                ("fatal_actions", NO_EFFECT_ON_TRAFFIC),
                ("inline_headers", NO_EFFECT_ON_TRAFFIC),
                ("perf_tracing_file_path", NO_EFFECT_ON_TRAFFIC),
                (
                    "default_regex_engine",
                    "regexes are always RE2-compatible, linear time",
                ),
                ("application_log_config", NO_EFFECT_ON_TRAFFIC),
                ("hds_config", NO_EFFECT_ON_TRAFFIC),
                ("flags_path", NO_EFFECT_ON_TRAFFIC),
                ("use_tcp_for_dns_lookups", "DNS uses the system resolver"),
                ("dns_resolution_config", "DNS uses the system resolver"),
                ("typed_dns_resolver_config", "DNS uses the system resolver"),
            ],
        },
    ),
    (
        &["envoy.config.core.v3.Node"],
        Fields {
            supported: &["id", "cluster", "metadata", "locality"],
            ignored: &[
                ("user_agent_name", NO_EFFECT_ON_TRAFFIC),
                ("user_agent_version", NO_EFFECT_ON_TRAFFIC),
                ("user_agent_build_version", NO_EFFECT_ON_TRAFFIC),
                ("extensions", NO_EFFECT_ON_TRAFFIC),
                ("client_features", NO_EFFECT_ON_TRAFFIC),
                ("listening_addresses", NO_EFFECT_ON_TRAFFIC),
                ("dynamic_parameters", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.config.bootstrap.v3.Admin"],
        Fields {
            supported: &["address"],
            ignored: &[
                ("access_log", NO_EFFECT_ON_TRAFFIC),
                ("access_log_path", NO_EFFECT_ON_TRAFFIC),
                ("profile_path", NO_EFFECT_ON_TRAFFIC),
                ("socket_options", NO_EFFECT_ON_TRAFFIC),
                ("ignore_global_conn_limit", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.config.accesslog.v3.AccessLog"],
        Fields {
            // `filter` is refused by the translation itself, with its reason.
            supported: &["name", "typed_config", "filter"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.access_loggers.file.v3.FileAccessLog"],
        Fields {
            supported: &[
                "path",
                "format",
                "json_format",
                "typed_json_format",
                "log_format",
            ],
            ignored: &[],
        },
    ),
    (
        &[
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
        ],
        Fields {
            supported: &["log_format"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.SubstitutionFormatString"],
        Fields {
            supported: &["text_format", "json_format", "text_format_source"],
            ignored: &[
                (
                    "omit_empty_values",
                    "empty values are written as - (null in JSON)",
                ),
                ("content_type", "only local replies use it"),
                ("json_format_options", "keys are written sorted, compact"),
            ],
        },
    ),
    (
        &["envoy.config.bootstrap.v3.Bootstrap.StaticResources"],
        Fields {
            supported: &["listeners", "clusters"],
            ignored: &[(
                "secrets",
                "TLS is not terminated by nodemesh yet; nothing uses them",
            )],
        },
    ),
    (
        &["envoy.config.core.v3.Address"],
        Fields {
            supported: &["socket_address"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.SocketAddress"],
        Fields {
            supported: &["address", "port_value", "protocol", "ipv4_compat"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.listener.v3.Listener"],
        Fields {
            supported: &[
                "name",
                "address",
                "filter_chains",
                "default_filter_chain",
                "listener_filters",
                "listener_filters_timeout",
                "continue_on_listener_filters_timeout",
                "use_original_dst",
                "bind_to_port",
            ],
            ignored: &[
                ("stat_prefix", NO_EFFECT_ON_TRAFFIC),
                ("metadata", NO_EFFECT_ON_TRAFFIC),
                ("traffic_direction", "only informational in Envoy too"),
                (
                    "access_log",
                    "access logs come with nodemesh's own telemetry",
                ),
                (
                    "per_connection_buffer_limit_bytes",
                    "nodemesh sizes its buffers itself (proxy.buffer_size)",
                ),
                ("drain_type", "nodemesh drains every listener the same way"),
                ("socket_options", "socket options are not applied"),
                ("transparent", "the node proxy does not bind transparently"),
                ("freebind", "addresses are bound normally"),
                ("enable_reuse_port", "one listening socket per listener"),
                (
                    "connection_balance_config",
                    "the runtime balances accepted connections",
                ),
                ("tcp_backlog_size", "the backlog is proxy.backlog"),
                (
                    "max_connections_to_accept_per_socket_event",
                    "an internal accept batching knob",
                ),
                ("enable_mptcp", "plain TCP"),
                ("ignore_global_conn_limit", "no global connection limit"),
            ],
        },
    ),
    (
        &["envoy.config.listener.v3.FilterChain"],
        Fields {
            // A TLS `transport_socket` closes the chain's connections (see `crate::tls`).
            supported: &["filter_chain_match", "filters", "name", "transport_socket"],
            ignored: &[
                ("metadata", NO_EFFECT_ON_TRAFFIC),
                ("transport_socket_connect_timeout", "no TLS termination"),
            ],
        },
    ),
    (
        &["envoy.config.listener.v3.FilterChainMatch"],
        Fields {
            supported: &[
                "destination_port",
                "prefix_ranges",
                "server_names",
                "transport_protocol",
                "application_protocols",
                "direct_source_prefix_ranges",
                "source_prefix_ranges",
                "source_ports",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.listener.v3.Filter"],
        Fields {
            supported: &["name", "typed_config"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.listener.v3.ListenerFilter"],
        Fields {
            supported: &["name", "typed_config", "filter_disabled"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.listener.v3.ListenerFilterChainMatchPredicate"],
        Fields {
            supported: &[
                "or_match",
                "and_match",
                "not_match",
                "any_match",
                "destination_port_range",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet"],
        Fields {
            supported: &["rules"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.TransportSocket"],
        Fields {
            // The socket's own configuration is judged whole by `crate::tls`.
            supported: &["name", "typed_config"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.cluster.v3.Cluster.TransportSocketMatch"],
        Fields {
            supported: &["name", "match", "transport_socket"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.cluster.v3.Filter"],
        Fields {
            supported: &["name", "typed_config"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.BindConfig"],
        Fields {
            supported: &["source_address"],
            ignored: &[],
        },
    ),
    (
        // istiod's fault filter is empty (faults come per route, and are refused there).
        &["envoy.extensions.filters.http.fault.v3.HTTPFault"],
        Fields {
            supported: &[],
            ignored: &[
                ("max_active_faults", "no faults are injected"),
                ("disable_downstream_cluster_stats", NO_EFFECT_ON_TRAFFIC),
                ("filter_metadata", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.extensions.filters.http.cors.v3.Cors"],
        Fields {
            supported: &[],
            ignored: &[],
        },
    ),
    (
        &[
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.InternalAddressConfig",
        ],
        Fields {
            supported: &["cidr_ranges"],
            ignored: &[(
                "unix_sockets",
                "nodemesh serves no unix-socket listeners, so no peer is a unix socket",
            )],
        },
    ),
    (
        &["envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"],
        Fields {
            supported: &[
                "codec_type",
                "stat_prefix",
                "rds",
                "route_config",
                "http_filters",
                "use_remote_address",
                "xff_num_trusted_hops",
                "skip_xff_append",
                "via",
                "generate_request_id",
                "preserve_external_request_id",
                "always_set_request_id_in_response",
                "stream_idle_timeout",
                "request_timeout",
                "request_headers_timeout",
                "max_request_headers_kb",
                "common_http_protocol_options",
                "http2_protocol_options",
                "server_name",
                "upgrade_configs",
                "normalize_path",
                "merge_slashes",
                "strip_any_host_port",
                "stream_error_on_invalid_http_message",
                "internal_address_config",
                "forward_client_cert_details",
                "access_log",
            ],
            ignored: &[
                ("tracing", NO_EFFECT_ON_TRAFFIC),
                (
                    "access_log_options",
                    "access logs come with nodemesh's own telemetry",
                ),
                ("set_current_client_cert_details", "no TLS termination"),
                (
                    "request_id_extension",
                    "request ids are UUIDv4, as Envoy's default",
                ),
                (
                    "delayed_close_timeout",
                    "connections close once the response is written",
                ),
                ("drain_timeout", "the agent's own drain applies"),
                ("add_user_agent", NO_EFFECT_ON_TRAFFIC),
                (
                    "local_reply_config",
                    "local replies use nodemesh's default bodies",
                ),
                (
                    "http_protocol_options",
                    "HTTP/1 options take their defaults",
                ),
                (
                    "server_header_transformation",
                    "the server header of upstream responses is passed through",
                ),
                (
                    "path_with_escaped_slashes_action",
                    "escaped slashes are kept as they are",
                ),
                ("early_header_mutation_extensions", NO_EFFECT_ON_TRAFFIC),
                (
                    "proxy_100_continue",
                    "100-continue is handled by the HTTP library",
                ),
                (
                    "represent_ipv4_remote_address_as_ipv4_mapped_ipv6",
                    "IPv4 addresses are written as IPv4",
                ),
            ],
        },
    ),
    (
        &["envoy.extensions.filters.network.http_connection_manager.v3.Rds"],
        Fields {
            supported: &["route_config_name", "config_source"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter"],
        Fields {
            supported: &["name", "typed_config", "is_optional", "disabled"],
            ignored: &[],
        },
    ),
    (
        &[
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        ],
        Fields {
            supported: &["upgrade_type", "enabled"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.HttpProtocolOptions"],
        Fields {
            supported: &[
                "idle_timeout",
                "max_headers_count",
                "max_requests_per_connection",
            ],
            ignored: &[
                (
                    "max_connection_duration",
                    "connections are not recycled by age",
                ),
                ("max_stream_duration", "use the route timeout"),
                (
                    "headers_with_underscores_action",
                    "headers with underscores are allowed",
                ),
            ],
        },
    ),
    (
        &["envoy.config.core.v3.Http2ProtocolOptions"],
        Fields {
            supported: &[
                "max_concurrent_streams",
                "initial_stream_window_size",
                "initial_connection_window_size",
            ],
            ignored: &[
                (
                    "hpack_table_size",
                    "the HTTP/2 library's default table size",
                ),
                ("allow_connect", "extended CONNECT is not proxied"),
                ("max_outbound_frames", "flood limits are nodemesh's own"),
                (
                    "max_outbound_control_frames",
                    "flood limits are nodemesh's own",
                ),
                (
                    "max_consecutive_inbound_frames_with_empty_payload",
                    "flood limits are nodemesh's own",
                ),
                (
                    "max_inbound_priority_frames_per_stream",
                    "flood limits are nodemesh's own",
                ),
                (
                    "max_inbound_window_update_frames_per_data_frame_sent",
                    "flood limits are nodemesh's own",
                ),
                ("connection_keepalive", "no HTTP/2 PING keepalive"),
                (
                    "override_stream_error_on_invalid_http_message",
                    "invalid messages reset the stream",
                ),
                (
                    "stream_error_on_invalid_http_messaging",
                    "invalid messages reset the stream",
                ),
            ],
        },
    ),
    (
        &["envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"],
        Fields {
            supported: &[
                "stat_prefix",
                "cluster",
                "weighted_clusters",
                "idle_timeout",
                "access_log",
            ],
            ignored: &[
                (
                    "access_log_options",
                    "access logs come with nodemesh's own telemetry",
                ),
                ("max_connect_attempts", "one connect attempt"),
                ("metadata_match", "no subset load balancing"),
            ],
        },
    ),
    (
        &["envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster"],
        Fields {
            supported: &["clusters"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight"],
        Fields {
            supported: &["name", "weight"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.http.router.v3.Router"],
        Fields {
            supported: &["suppress_envoy_headers"],
            ignored: &[
                ("dynamic_stats", NO_EFFECT_ON_TRAFFIC),
                ("start_child_span", NO_EFFECT_ON_TRAFFIC),
                (
                    "upstream_log",
                    "access logs come with nodemesh's own telemetry",
                ),
                ("upstream_log_options", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &[
            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        ],
        Fields {
            supported: &[],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"],
        Fields {
            supported: &[],
            ignored: &[
                ("enable_ja3_fingerprinting", NO_EFFECT_ON_TRAFFIC),
                ("initial_read_buffer_size", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.config.route.v3.RouteConfiguration"],
        Fields {
            supported: &[
                "name",
                "virtual_hosts",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "ignore_port_in_host_matching",
            ],
            ignored: &[
                (
                    "validate_clusters",
                    "routes to unknown clusters: an error in a bootstrap, a warning (503 NC) over xDS",
                ),
                ("internal_only_headers", "no internal/external distinction"),
                (
                    "most_specific_header_mutations_wins",
                    "mutations apply route first, then virtual host, then route config",
                ),
                (
                    "max_direct_response_body_size_bytes",
                    "direct response bodies are inline",
                ),
                ("metadata", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.config.route.v3.VirtualHost"],
        Fields {
            supported: &[
                "name",
                "domains",
                "routes",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "retry_policy",
                "include_request_attempt_count",
                "include_attempt_count_in_response",
                "require_tls",
                "typed_per_filter_config",
                "rate_limits",
            ],
            ignored: &[("metadata", NO_EFFECT_ON_TRAFFIC)],
        },
    ),
    (
        &["envoy.config.route.v3.Route"],
        Fields {
            supported: &[
                "name",
                "match",
                "route",
                "redirect",
                "direct_response",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "typed_per_filter_config",
            ],
            ignored: &[
                ("decorator", NO_EFFECT_ON_TRAFFIC),
                ("tracing", NO_EFFECT_ON_TRAFFIC),
                ("metadata", NO_EFFECT_ON_TRAFFIC),
                ("stat_prefix", NO_EFFECT_ON_TRAFFIC),
            ],
        },
    ),
    (
        &["envoy.config.route.v3.RouteMatch"],
        Fields {
            supported: &[
                "prefix",
                "path",
                "safe_regex",
                "path_separated_prefix",
                "case_sensitive",
                "headers",
                "query_parameters",
                "grpc",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions"],
        Fields {
            supported: &[],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.HeaderMatcher"],
        Fields {
            supported: &[
                "name",
                "exact_match",
                "safe_regex_match",
                "range_match",
                "present_match",
                "prefix_match",
                "suffix_match",
                "contains_match",
                "string_match",
                "invert_match",
                "treat_missing_header_as_empty",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.QueryParameterMatcher"],
        Fields {
            supported: &["name", "string_match", "present_match"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.StringMatcher"],
        Fields {
            supported: &[
                "exact",
                "prefix",
                "suffix",
                "safe_regex",
                "contains",
                "ignore_case",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.RegexMatcher"],
        Fields {
            supported: &["regex"],
            ignored: &[(
                "google_re2",
                "deprecated; regexes are RE2-compatible anyway",
            )],
        },
    ),
    (
        &["envoy.type.matcher.v3.RegexMatchAndSubstitute"],
        Fields {
            supported: &["pattern", "substitution"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RouteAction"],
        Fields {
            supported: &[
                "cluster",
                "cluster_header",
                "weighted_clusters",
                "cluster_not_found_response_code",
                "prefix_rewrite",
                "regex_rewrite",
                "host_rewrite_literal",
                "auto_host_rewrite",
                "host_rewrite_header",
                "timeout",
                "idle_timeout",
                "retry_policy",
                "max_stream_duration",
                "max_grpc_timeout",
                "grpc_timeout_offset",
                "upgrade_configs",
                "rate_limits",
            ],
            ignored: &[
                (
                    "hash_policy",
                    "only consistent-hash load balancers use it, and nodemesh has none",
                ),
                ("priority", "one priority level"),
                ("metadata_match", "no subset load balancing"),
                ("cors", "deprecated in Envoy; use the CORS filter"),
                (
                    "internal_redirect_policy",
                    "upstream redirects are returned to the client",
                ),
                ("append_x_forwarded_host", "x-forwarded-host is not added"),
            ],
        },
    ),
    (
        &["envoy.extensions.filters.http.rbac.v3.RBAC"],
        Fields {
            supported: &[
                "rules",
                "shadow_rules",
                "rules_stat_prefix",
                "shadow_rules_stat_prefix",
            ],
            ignored: &[("track_per_rule_stats", NO_EFFECT_ON_TRAFFIC)],
        },
    ),
    (
        &["envoy.extensions.filters.http.rbac.v3.RBACPerRoute"],
        Fields {
            supported: &["rbac"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.network.rbac.v3.RBAC"],
        Fields {
            supported: &[
                "rules",
                "shadow_rules",
                "stat_prefix",
                "shadow_rules_stat_prefix",
                "enforcement_type",
            ],
            ignored: &[("delay_deny", "a denied connection is closed at once")],
        },
    ),
    (
        &["envoy.config.rbac.v3.RBAC"],
        Fields {
            supported: &["action", "policies"],
            ignored: &[(
                "audit_logging_options",
                "not implemented in Envoy either; denies are logged and counted",
            )],
        },
    ),
    (
        &["envoy.config.rbac.v3.Policy"],
        Fields {
            supported: &["permissions", "principals"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.rbac.v3.Permission"],
        Fields {
            supported: &[
                "any",
                "and_rules",
                "or_rules",
                "not_rule",
                "header",
                "url_path",
                "destination_ip",
                "destination_port",
                "destination_port_range",
                "requested_server_name",
                "metadata",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.rbac.v3.Permission.Set"],
        Fields {
            supported: &["rules"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.rbac.v3.Principal"],
        Fields {
            supported: &[
                "any",
                "and_ids",
                "or_ids",
                "not_id",
                "authenticated",
                "source_ip",
                "direct_remote_ip",
                "remote_ip",
                "header",
                "url_path",
                "metadata",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.rbac.v3.Principal.Set"],
        Fields {
            supported: &["ids"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.rbac.v3.Principal.Authenticated"],
        Fields {
            supported: &["principal_name"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.PathMatcher"],
        Fields {
            supported: &["path"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.MetadataMatcher"],
        Fields {
            supported: &["filter", "path", "value", "invert"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.MetadataMatcher.PathSegment"],
        Fields {
            supported: &["key"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.ValueMatcher"],
        Fields {
            supported: &["string_match", "bool_match", "present_match", "list_match"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.matcher.v3.ListMatcher"],
        Fields {
            supported: &["one_of"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"],
        Fields {
            supported: &[
                "stat_prefix",
                "status",
                "token_bucket",
                "filter_enabled",
                "filter_enforced",
                "request_headers_to_add_when_not_enforced",
                "response_headers_to_add",
                "descriptors",
                "stage",
                "local_rate_limit_per_downstream_connection",
                "enable_x_ratelimit_headers",
                "vh_rate_limits",
                "always_consume_default_token_bucket",
                "rate_limited_as_resource_exhausted",
                "rate_limits",
                "enable_retry_after_header",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.v3.TokenBucket"],
        Fields {
            supported: &["max_tokens", "tokens_per_fill", "fill_interval"],
            ignored: &[],
        },
    ),
    (
        &["envoy.type.v3.HttpStatus"],
        Fields {
            supported: &["code"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor"],
        Fields {
            supported: &["entries", "token_bucket", "shadow_mode"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry"],
        Fields {
            supported: &["key", "value"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RateLimit"],
        Fields {
            supported: &["stage", "actions"],
            ignored: &[("disable_key", "there are no runtime overrides")],
        },
    ),
    (
        &["envoy.config.route.v3.RateLimit.Action"],
        Fields {
            supported: &[
                "generic_key",
                "request_headers",
                "remote_address",
                "destination_cluster",
                "header_value_match",
            ],
            ignored: &[],
        },
    ),
    (
        &[
            "envoy.config.route.v3.RateLimit.Action.RemoteAddress",
            "envoy.config.route.v3.RateLimit.Action.DestinationCluster",
        ],
        Fields {
            supported: &[],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RateLimit.Action.GenericKey"],
        Fields {
            supported: &["descriptor_value", "descriptor_key"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RateLimit.Action.RequestHeaders"],
        Fields {
            supported: &["header_name", "descriptor_key", "skip_if_absent"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RateLimit.Action.HeaderValueMatch"],
        Fields {
            supported: &[
                "descriptor_key",
                "descriptor_value",
                "expect_match",
                "headers",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RouteAction.MaxStreamDuration"],
        Fields {
            supported: &[
                "max_stream_duration",
                "grpc_timeout_header_max",
                "grpc_timeout_header_offset",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RouteAction.UpgradeConfig"],
        Fields {
            supported: &["upgrade_type", "enabled"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.WeightedCluster"],
        Fields {
            supported: &["clusters", "total_weight"],
            ignored: &[("runtime_key_prefix", "no runtime overrides")],
        },
    ),
    (
        &["envoy.config.route.v3.WeightedCluster.ClusterWeight"],
        Fields {
            supported: &[
                "name",
                "weight",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "host_rewrite_literal",
            ],
            ignored: &[
                ("metadata_match", "no subset load balancing"),
                (
                    "typed_per_filter_config",
                    "per-filter overrides apply to filters nodemesh does not run yet",
                ),
            ],
        },
    ),
    (
        &["envoy.config.route.v3.RetryPolicy"],
        Fields {
            supported: &[
                "retry_on",
                "num_retries",
                "per_try_timeout",
                "per_try_idle_timeout",
                "retry_back_off",
                "retriable_status_codes",
            ],
            ignored: &[
                (
                    "retry_host_predicate",
                    "a retry may pick the same endpoint again",
                ),
                (
                    "host_selection_retry_max_attempts",
                    "a retry may pick the same endpoint again",
                ),
                ("retry_priority", "one priority level"),
            ],
        },
    ),
    (
        &["envoy.config.route.v3.RetryPolicy.RetryBackOff"],
        Fields {
            supported: &["base_interval", "max_interval"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.DirectResponseAction"],
        Fields {
            supported: &["status", "body"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.route.v3.RedirectAction"],
        Fields {
            supported: &[
                "https_redirect",
                "scheme_redirect",
                "host_redirect",
                "port_redirect",
                "path_redirect",
                "prefix_rewrite",
                "response_code",
                "strip_query",
            ],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.HeaderValueOption"],
        Fields {
            supported: &["header", "append", "append_action", "keep_empty_value"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.cluster.v3.Cluster"],
        Fields {
            supported: &[
                "name",
                "type",
                "eds_cluster_config",
                "connect_timeout",
                "lb_policy",
                "load_assignment",
                "circuit_breakers",
                "http2_protocol_options",
                "typed_extension_protocol_options",
                "health_checks",
                "outlier_detection",
                "dns_lookup_family",
                "dns_refresh_rate",
                "least_request_lb_config",
                "original_dst_lb_config",
                "max_requests_per_connection",
                "common_http_protocol_options",
                // Decided in `crate::tls` and the translation (Istio's shapes are accepted
                // with warnings, anything else that changes the connection is refused).
                "transport_socket",
                "transport_socket_matches",
                "filters",
                "upstream_bind_config",
            ],
            ignored: &[
                ("alt_stat_name", NO_EFFECT_ON_TRAFFIC),
                ("metadata", NO_EFFECT_ON_TRAFFIC),
                (
                    "per_connection_buffer_limit_bytes",
                    "nodemesh sizes its buffers itself",
                ),
                (
                    "respect_dns_ttl",
                    "names are re-resolved every dns_refresh_rate",
                ),
                (
                    "dns_failure_refresh_rate",
                    "names are re-resolved every dns_refresh_rate",
                ),
                (
                    "cleanup_interval",
                    "ORIGINAL_DST hosts are pooled per address and idle out",
                ),
                (
                    "upstream_connection_options",
                    "TCP keepalive is not set on upstream connections",
                ),
                (
                    "common_lb_config",
                    "no panic threshold or locality weighting",
                ),
                (
                    "close_connections_on_host_health_failure",
                    "open connections to unhealthy hosts finish normally",
                ),
                (
                    "ignore_health_on_host_removal",
                    "removed hosts are dropped at once",
                ),
                ("track_cluster_stats", NO_EFFECT_ON_TRAFFIC),
                ("track_timeout_budgets", NO_EFFECT_ON_TRAFFIC),
                ("preconnect_policy", "connections are opened on demand"),
                (
                    "connection_pool_per_downstream_connection",
                    "one pool per endpoint",
                ),
            ],
        },
    ),
    (
        &["envoy.config.cluster.v3.Cluster.EdsClusterConfig"],
        Fields {
            supported: &["service_name", "eds_config"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.ConfigSource"],
        Fields {
            // Resources come from ADS (the bootstrap's `dynamic_resources.ads_config`) or
            // inline. Filesystem subscriptions (`path_config_source`, `path`) and per-type
            // gRPC sources (`api_config_source`) are refused rather than accepted with no
            // endpoints or routes.
            supported: &["resource_api_version", "ads", "initial_fetch_timeout"],
            ignored: &[],
        },
    ),
    (&["envoy.config.core.v3.AggregatedConfigSource"], Leaf),
    (
        &["envoy.config.bootstrap.v3.Bootstrap.DynamicResources"],
        Fields {
            supported: &["ads_config", "lds_config", "cds_config"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.ApiConfigSource"],
        Fields {
            supported: &[
                "api_type",
                "transport_api_version",
                "grpc_services",
                "set_node_on_first_message_only",
            ],
            ignored: &[(
                "rate_limit_settings",
                "updates are applied as they come (each one is translated whole)",
            )],
        },
    ),
    (
        &["envoy.config.core.v3.GrpcService"],
        Fields {
            supported: &["envoy_grpc", "timeout"],
            ignored: &[("initial_metadata", "no headers are added to the xDS stream")],
        },
    ),
    (
        &["envoy.config.core.v3.GrpcService.EnvoyGrpc"],
        Fields {
            supported: &["cluster_name"],
            ignored: &[("authority", "the :authority is the cluster's address")],
        },
    ),
    (
        &["envoy.config.core.v3.PathConfigSource"],
        Fields {
            supported: &["path"],
            ignored: &[(
                "watched_directory",
                "the file is read when the configuration is loaded",
            )],
        },
    ),
    (
        &["envoy.config.endpoint.v3.ClusterLoadAssignment"],
        Fields {
            supported: &["cluster_name", "endpoints"],
            ignored: &[("policy", "no overprovisioning factor or drop overloads")],
        },
    ),
    (
        &["envoy.config.endpoint.v3.LocalityLbEndpoints"],
        Fields {
            supported: &[
                "lb_endpoints",
                "load_balancing_weight",
                "locality",
                "priority",
            ],
            ignored: &[("proximity", "no locality-aware routing")],
        },
    ),
    (
        &["envoy.config.endpoint.v3.LbEndpoint"],
        Fields {
            supported: &["endpoint", "health_status", "load_balancing_weight"],
            ignored: &[(
                "metadata",
                "it selects subsets and transport sockets, and nodemesh has neither (transport_socket_matches warn or fail on their own)",
            )],
        },
    ),
    (
        &["envoy.config.endpoint.v3.Endpoint"],
        Fields {
            supported: &["address", "hostname"],
            ignored: &[(
                "health_check_config",
                "health checks use the endpoint's own address",
            )],
        },
    ),
    (
        &["envoy.config.cluster.v3.CircuitBreakers"],
        Fields {
            supported: &["thresholds"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.cluster.v3.CircuitBreakers.Thresholds"],
        Fields {
            supported: &[
                "priority",
                "max_connections",
                "max_pending_requests",
                "max_requests",
                "max_retries",
            ],
            ignored: &[
                ("retry_budget", "retries are limited by max_retries"),
                ("track_remaining", NO_EFFECT_ON_TRAFFIC),
                (
                    "max_connection_pools",
                    "pools are per endpoint and bounded by max_connections",
                ),
            ],
        },
    ),
    (
        &["envoy.config.core.v3.HealthCheck"],
        Fields {
            supported: &[
                "timeout",
                "interval",
                "unhealthy_threshold",
                "healthy_threshold",
                "http_health_check",
            ],
            ignored: &[
                ("interval_jitter", "checks are evenly spaced"),
                ("interval_jitter_percent", "checks are evenly spaced"),
                (
                    "no_traffic_interval",
                    "the same interval with or without traffic",
                ),
                ("reuse_connection", "each check opens its own connection"),
                ("event_log_path", NO_EFFECT_ON_TRAFFIC),
                ("always_log_health_check_failures", NO_EFFECT_ON_TRAFFIC),
                ("initial_jitter", "checks start at once"),
            ],
        },
    ),
    (
        &["envoy.config.core.v3.HealthCheck.HttpHealthCheck"],
        Fields {
            supported: &["path", "host", "expected_statuses"],
            ignored: &[("codec_client_type", "checks use HTTP/1.1")],
        },
    ),
    (
        &["envoy.config.cluster.v3.OutlierDetection"],
        Fields {
            supported: &[
                "consecutive_5xx",
                "consecutive_gateway_failure",
                "interval",
                "base_ejection_time",
                "max_ejection_percent",
            ],
            ignored: &[
                ("enforcing_consecutive_5xx", "ejection is always enforced"),
                (
                    "enforcing_consecutive_gateway_failure",
                    "ejection is always enforced",
                ),
                ("enforcing_success_rate", "no success-rate ejection"),
                ("success_rate_minimum_hosts", "no success-rate ejection"),
                ("success_rate_request_volume", "no success-rate ejection"),
                ("success_rate_stdev_factor", "no success-rate ejection"),
                (
                    "split_external_local_origin_errors",
                    "local origin errors count as 5xx",
                ),
                (
                    "consecutive_local_origin_failure",
                    "local origin errors count as 5xx",
                ),
                (
                    "enforcing_consecutive_local_origin_failure",
                    "local origin errors count as 5xx",
                ),
                (
                    "max_ejection_time",
                    "ejection time grows without a cap beyond max_ejection_percent",
                ),
            ],
        },
    ),
    (
        &["envoy.config.cluster.v3.Cluster.LeastRequestLbConfig"],
        Fields {
            supported: &["choice_count"],
            ignored: &[("active_request_bias", "requests are counted unweighted")],
        },
    ),
    (
        &["envoy.config.cluster.v3.Cluster.OriginalDstLbConfig"],
        Fields {
            supported: &["use_http_header", "http_header_name"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
        Fields {
            supported: &[
                "explicit_http_config",
                "use_downstream_protocol_config",
                "common_http_protocol_options",
            ],
            ignored: &[(
                "upstream_http_protocol_options",
                "auto SNI/SAN apply to TLS upstreams only",
            )],
        },
    ),
    (
        &["envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig"],
        Fields {
            supported: &["http_protocol_options", "http2_protocol_options"],
            ignored: &[],
        },
    ),
    (
        &["envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig"],
        Fields {
            supported: &["http_protocol_options", "http2_protocol_options"],
            ignored: &[],
        },
    ),
    (
        &["envoy.config.core.v3.Http1ProtocolOptions"],
        Fields {
            supported: &[],
            ignored: &[
                ("allow_absolute_url", "absolute URLs are accepted"),
                ("accept_http_10", "HTTP/1.0 is accepted"),
                (
                    "default_host_for_http_10",
                    "HTTP/1.0 requests need a host header",
                ),
                ("header_key_format", "header names are sent in lower case"),
                ("enable_trailers", "HTTP/1 trailers are not forwarded"),
            ],
        },
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type and field named in the table exists in Envoy's API: a typo here would
    /// silently turn a supported field into an error (or an error into a silent accept).
    #[test]
    fn the_table_names_real_types_and_fields() {
        let pool = crate::pool::pool();
        for (names, rules) in TABLE {
            for name in *names {
                let desc = pool
                    .get_message_by_name(name)
                    .unwrap_or_else(|| panic!("{name} is not an Envoy type"));
                let Rules::Fields { supported, ignored } = rules else {
                    continue;
                };
                for field in supported.iter().chain(ignored.iter().map(|(f, _)| f)) {
                    assert!(
                        desc.get_field_by_name(field).is_some(),
                        "{name} has no field {field}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_fields_are_errors_and_ignored_ones_warn_once() {
        let yaml = r#"
static_resources:
  clusters:
  - name: a
    connect_timeout: 1s
    alt_stat_name: x
    lrs_server: { ads: {} }
  - name: b
    alt_stat_name: y
stats_flush_interval: 5s
"#;
        let msg = crate::pool::parse(yaml, "envoy.config.bootstrap.v3.Bootstrap").expect("parse");
        let mut diags = Diagnostics::default();
        check(&msg, "bootstrap", &mut diags);
        assert_eq!(
            diags.errors,
            vec!["bootstrap.static_resources.clusters[a].lrs_server: not supported by nodemesh"]
        );
        assert_eq!(diags.warnings.len(), 2, "{:?}", diags.warnings);
    }
}
