//! The connection manager's `access_log`: `envoy.access_loggers.file` (and its stdout /
//! stderr cousins) with Envoy's format strings, read into [`AccessLog`].
//!
//! A format is parsed here, once per configuration, into [`Segment`]s of literals and
//! command operators ([`LogField`]), so a bad operator is a configuration error naming the
//! field, never a surprise in the log. nodemesh renders what it parsed in
//! `nodemesh-telemetry`'s batching writer.
//!
//! Without `log_format`, nodemesh writes JSON lines with the fields of Istio's JSON access
//! log encoding ([`DEFAULT_JSON`]), where Envoy would write its default text line: JSON
//! lines are what log pipelines take, and the fields and values are the same.
use envoy_types::pb::{
    envoy::{
        config::{accesslog::v3 as accesslog, core::v3 as core},
        extensions::access_loggers::file::v3 as file,
    },
    google::protobuf::{Struct, value::Kind},
};

use crate::{
    convert::{decode_dynamic, type_name},
    support::{self, Diagnostics},
};

pub const FILE_URL: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
pub const STDOUT_URL: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
pub const STDERR_URL: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Istio's JSON access log fields (`meshConfig.accessLogEncoding: JSON`).
pub const DEFAULT_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
    // nodemesh's own, for the operator: who the node proxy served.
    ("source_principal", "%DOWNSTREAM_PEER_URI_SAN%"),
];

/// One configured access log.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// A file path; `/dev/stdout` and `/dev/stderr` for the stream loggers.
    pub path: String,
    /// Shared with every entry queued for it.
    pub format: std::sync::Arc<LogFormat>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// One JSON object per line; a value that is exactly one operator keeps its type
    /// (numbers stay numbers), as Envoy's `json_format` does.
    Json(Vec<(String, Vec<Segment>)>),
    /// `text_format`: rendered as is (Envoy adds no newline; nodemesh does when missing, one
    /// entry per line).
    Text(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Literal(String),
    Field(LogField),
}

/// The command operators nodemesh renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogField {
    StartTime,
    /// `%REQ(A?B)%`: header `A`, else `B` (pseudo-headers `:method`, `:path`, `:authority`,
    /// `:scheme` included), lower case.
    Request(String, Option<String>),
    Response(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    RouteName,
    /// The trusted client address (`remote_ip`); `port`: with the peer's port.
    DownstreamRemote {
        port: bool,
    },
    DownstreamDirectRemote {
        port: bool,
    },
    DownstreamLocal {
        port: bool,
    },
    /// The source's identity (the peer certificate's URI SAN once mTLS lands).
    DownstreamPeerUriSan,
    /// Operators Envoy has whose value nodemesh never knows: always `-` (null in JSON).
    Unavailable(String),
}

/// Operators accepted and always empty (nodemesh has no upstream TLS, no filter state).
const UNAVAILABLE: &[&str] = &[
    "CONNECTION_TERMINATION_DETAILS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "UPSTREAM_LOCAL_ADDRESS",
    "REQUESTED_SERVER_NAME",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "CONNECTION_ID",
];

/// Parses an Envoy format string into literals and operators.
pub fn parse(format: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        let after = &rest[start + 1..];
        // `%%` is a literal percent sign.
        if let Some(tail) = after.strip_prefix('%') {
            push_literal(&mut out, &rest[..=start]);
            rest = tail;
            continue;
        }
        let end = after
            .find('%')
            .ok_or_else(|| format!("unterminated command operator in {format:?}"))?;
        push_literal(&mut out, &rest[..start]);
        out.push(Segment::Field(operator(&after[..end])?));
        rest = &after[end + 1..];
    }
    push_literal(&mut out, rest);
    Ok(out)
}

fn push_literal(out: &mut Vec<Segment>, s: &str) {
    if s.is_empty() {
        return;
    }
    if let Some(Segment::Literal(l)) = out.last_mut() {
        l.push_str(s);
    } else {
        out.push(Segment::Literal(s.to_owned()));
    }
}

fn operator(op: &str) -> Result<LogField, String> {
    // `%REQ(X):10%`: the length limit is accepted and not applied.
    let (name, arg) = match op.split_once('(') {
        Some((name, rest)) => {
            let (arg, _) = rest
                .split_once(')')
                .ok_or_else(|| format!("%{op}%: missing `)`"))?;
            (name, Some(arg))
        }
        None => (op.split(':').next().unwrap_or(op), None),
    };
    let headers = |arg: Option<&str>| -> Result<(String, Option<String>), String> {
        let arg = arg
            .filter(|a| !a.is_empty())
            .ok_or(format!("%{op}%: needs a header name"))?;
        Ok(match arg.split_once('?') {
            Some((a, b)) => (a.to_ascii_lowercase(), Some(b.to_ascii_lowercase())),
            None => (arg.to_ascii_lowercase(), None),
        })
    };
    Ok(match name {
        "START_TIME" => LogField::StartTime,
        "REQ" => {
            let (a, b) = headers(arg)?;
            LogField::Request(a, b)
        }
        "RESP" => {
            let (a, b) = headers(arg)?;
            LogField::Response(a, b)
        }
        "PROTOCOL" => LogField::Protocol,
        "RESPONSE_CODE" => LogField::ResponseCode,
        "RESPONSE_FLAGS" | "RESPONSE_FLAGS_LONG" => LogField::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => LogField::ResponseCodeDetails,
        "BYTES_RECEIVED" => LogField::BytesReceived,
        "BYTES_SENT" => LogField::BytesSent,
        "DURATION" => LogField::Duration,
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => LogField::UpstreamHost,
        // nodemesh ignores `alt_stat_name`, so the cluster's name is always the raw one
        // (Istio's default format uses the RAW form).
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => LogField::UpstreamCluster,
        "ROUTE_NAME" => LogField::RouteName,
        "DOWNSTREAM_REMOTE_ADDRESS" => LogField::DownstreamRemote { port: true },
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => LogField::DownstreamRemote { port: false },
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => LogField::DownstreamDirectRemote { port: true },
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            LogField::DownstreamDirectRemote { port: false }
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => LogField::DownstreamLocal { port: true },
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => LogField::DownstreamLocal { port: false },
        "DOWNSTREAM_PEER_URI_SAN" => LogField::DownstreamPeerUriSan,
        n if UNAVAILABLE.contains(&n) => LogField::Unavailable(n.to_owned()),
        _ => {
            return Err(format!(
                "command operator %{op}% is not supported by nodemesh"
            ));
        }
    })
}

/// The default format (Istio's JSON fields).
pub fn default_format() -> LogFormat {
    LogFormat::Json(
        DEFAULT_JSON
            .iter()
            .map(|(k, v)| ((*k).to_owned(), parse(v).unwrap_or_default()))
            .collect(),
    )
}

/// The HCM's `access_log` list. Filters (`filter`) are not supported: an error, since
/// logging everything a filter would have dropped can flood a sink.
pub fn translate(
    logs: &[accesslog::AccessLog],
    at: &str,
    diags: &mut Diagnostics,
) -> Vec<AccessLog> {
    let mut out = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let at = format!("{at}.access_log[{i}]");
        if log.filter.is_some() {
            diags.error(format!("{at}.filter: access log filters are not supported"));
            continue;
        }
        let Some(accesslog::access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            diags.error(format!("{at}: typed_config is required"));
            continue;
        };
        if let Some(l) = one(any, &at, diags) {
            out.push(l);
        }
    }
    out
}

fn one(
    any: &envoy_types::pb::google::protobuf::Any,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<AccessLog> {
    use prost::Message as _;
    let url = type_name(any);
    match decode_dynamic(any) {
        Ok(msg) => support::check(&msg, at, diags),
        Err(e) => {
            diags.error(format!("{at}: {e}"));
            return None;
        }
    }
    let (path, format) = match url {
        FILE_URL => {
            let f = file::FileAccessLog::decode(any.value.as_slice())
                .map_err(|e| diags.error(format!("{at}: {e}")))
                .ok()?;
            if f.path.is_empty() {
                diags.error(format!("{at}.path: a file access log needs a path"));
                return None;
            }
            #[expect(deprecated, reason = "istiod and older bootstraps still send these")]
            let format = match &f.access_log_format {
                None => Ok(default_format()),
                Some(file::file_access_log::AccessLogFormat::Format(s)) => {
                    parse(s).map(LogFormat::Text)
                }
                Some(
                    file::file_access_log::AccessLogFormat::JsonFormat(s)
                    | file::file_access_log::AccessLogFormat::TypedJsonFormat(s),
                ) => json(s),
                Some(file::file_access_log::AccessLogFormat::LogFormat(s)) => substitution(s),
            };
            (f.path, format)
        }
        STDOUT_URL | STDERR_URL => {
            let path = if url == STDOUT_URL {
                "/dev/stdout"
            } else {
                "/dev/stderr"
            };
            let format = stream_format(any, diags, at);
            (path.to_owned(), format)
        }
        other => {
            diags.error(format!(
                "{at}: access logger {other} is not supported (file, stdout, stderr are)"
            ));
            return None;
        }
    };
    match format {
        Ok(format) => Some(AccessLog {
            path,
            format: std::sync::Arc::new(format),
        }),
        Err(e) => {
            diags.error(format!("{at}: {e}"));
            None
        }
    }
}

fn stream_format(
    any: &envoy_types::pb::google::protobuf::Any,
    diags: &mut Diagnostics,
    at: &str,
) -> Result<LogFormat, String> {
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;
    use prost::Message as _;
    // Both stream loggers have the same shape (field 1: log_format).
    let f = stream::StdoutAccessLog::decode(any.value.as_slice())
        .map_err(|e| diags.error(format!("{at}: {e}")))
        .map_err(|()| "undecodable".to_owned())?;
    match f.access_log_format {
        None => Ok(default_format()),
        Some(stream::stdout_access_log::AccessLogFormat::LogFormat(s)) => substitution(&s),
    }
}

fn substitution(s: &core::SubstitutionFormatString) -> Result<LogFormat, String> {
    use core::substitution_format_string::Format;
    #[expect(
        deprecated,
        reason = "text_format is what most configurations still use"
    )]
    match &s.format {
        None => Ok(default_format()),
        Some(Format::TextFormat(t)) => parse(t).map(LogFormat::Text),
        Some(Format::JsonFormat(j)) => json(j),
        Some(Format::TextFormatSource(src)) => match &src.specifier {
            Some(core::data_source::Specifier::InlineString(t)) => parse(t).map(LogFormat::Text),
            Some(core::data_source::Specifier::InlineBytes(b)) => {
                parse(&String::from_utf8_lossy(b)).map(LogFormat::Text)
            }
            _ => {
                Err("text_format_source: only inline_string and inline_bytes are supported".into())
            }
        },
    }
}

fn json(s: &Struct) -> Result<LogFormat, String> {
    let mut fields: Vec<(String, Vec<Segment>)> = Vec::new();
    for (key, value) in &s.fields {
        let segments = match &value.kind {
            Some(Kind::StringValue(v)) => parse(v)?,
            Some(Kind::NumberValue(n)) => vec![Segment::Literal(n.to_string())],
            Some(Kind::BoolValue(b)) => vec![Segment::Literal(b.to_string())],
            _ => {
                return Err(format!(
                    "json_format.{key}: only string, number and bool values are supported"
                ));
            }
        };
        fields.push((key.clone(), segments));
    }
    // The map has no order; the log's keys are sorted, as in Envoy's JSON.
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(LogFormat::Json(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_strings_parse_into_literals_and_operators() {
        let s = parse("[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH):256%\" %RESPONSE_CODE% 100%%\n")
            .expect("parses");
        assert_eq!(
            s,
            vec![
                Segment::Literal("[".into()),
                Segment::Field(LogField::StartTime),
                Segment::Literal("] \"".into()),
                Segment::Field(LogField::Request(":method".into(), None)),
                Segment::Literal(" ".into()),
                Segment::Field(LogField::Request(
                    "x-envoy-original-path".into(),
                    Some(":path".into())
                )),
                Segment::Literal("\" ".into()),
                Segment::Field(LogField::ResponseCode),
                Segment::Literal(" 100%\n".into()),
            ]
        );
        assert!(
            parse("%NOT_AN_OPERATOR%")
                .expect_err("unknown operator")
                .contains("NOT_AN_OPERATOR")
        );
        assert!(parse("%REQ()%").is_err());
        assert!(
            parse("50% off").is_err(),
            "an unterminated operator is an error"
        );
        for (_, v) in DEFAULT_JSON {
            parse(v).expect("the default format parses");
        }
    }

    fn hcm_with(access_log: &str) -> crate::Translated {
        let yaml = format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          access_log:
{access_log}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config: {{ virtual_hosts: [ {{ name: a, domains: ["*"], routes: [ {{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }} ] }} ] }}
"#
        );
        crate::load_bootstrap(&yaml).expect("parses")
    }

    #[test]
    fn hcm_access_logs_translate_and_bad_ones_are_errors_naming_the_field() {
        let ok = hcm_with(
            r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/x.log
              log_format: { json_format: { code: "%RESPONSE_CODE%", who: "%REQ(:AUTHORITY)% x", n: 1 } }
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"#,
        );
        assert!(
            ok.diagnostics.errors.is_empty(),
            "{:?}",
            ok.diagnostics.errors
        );
        let snapshot = ok.snapshot.expect("snapshot");
        let crate::model::NetworkFilter::Http(h) = &snapshot.listeners[0].filter_chains[0].filter
        else {
            panic!("an HCM");
        };
        assert_eq!(h.access_logs.len(), 2);
        assert_eq!(h.access_logs[0].path, "/tmp/x.log");
        assert_eq!(
            *h.access_logs[0].format,
            LogFormat::Json(vec![
                ("code".into(), vec![Segment::Field(LogField::ResponseCode)]),
                ("n".into(), vec![Segment::Literal("1".into())]),
                (
                    "who".into(),
                    vec![
                        Segment::Field(LogField::Request(":authority".into(), None)),
                        Segment::Literal(" x".into())
                    ]
                ),
            ])
        );
        assert_eq!(h.access_logs[1].path, "/dev/stdout");
        assert_eq!(*h.access_logs[1].format, default_format());

        let bad = hcm_with(
            r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/x.log
              log_format: { text_format_source: { inline_string: "%NO_SUCH_THING%" } }"#,
        );
        assert!(
            bad.diagnostics
                .errors
                .iter()
                .any(|e| e.contains("access_log[0]") && e.contains("NO_SUCH_THING")),
            "{:?}",
            bad.diagnostics.errors
        );
        let filtered = hcm_with(
            r#"          - name: envoy.access_loggers.file
            filter: { status_code_filter: { comparison: { op: GE, value: { default_value: 400, runtime_key: k } } } }
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/x.log"#,
        );
        assert!(
            filtered
                .diagnostics
                .errors
                .iter()
                .any(|e| e.contains("filter")),
            "{:?}",
            filtered.diagnostics.errors
        );
    }
}
