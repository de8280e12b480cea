//! Header handling shared by requests and responses: hop-by-hop headers, configured
//! mutations, request ids.
use http::{HeaderMap, HeaderName, HeaderValue, header};
use nodemesh_config::model::{AppendAction, HeaderMutations, HeaderValueOption};

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1 and those named by `Connection`.
/// `te: trailers` survives (gRPC needs it); `upgrade` survives when `keep_upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most heads carry none of them: one pass over the names before any hashed removal.
    let hop_by_hop = |k: &HeaderName| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::UPGRADE
            || k == header::TRANSFER_ENCODING
            || k.as_str() == "keep-alive"
            || k.as_str() == "proxy-connection"
    };
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
        headers.remove(header::CONNECTION);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The upgrade a request asks for (`Connection: upgrade` + `Upgrade: x`), lower case.
pub fn upgrade_of(headers: &HeaderMap) -> Option<String> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
}

/// Which side of the exchange a mutation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// Applies levels of mutations in order (most specific first, as Envoy does by default):
/// each level removes, then adds.
pub fn apply(headers: &mut HeaderMap, levels: &[&HeaderMutations], side: Side) {
    for level in levels {
        let (add, remove) = match side {
            Side::Request => (&level.request_add, &level.request_remove),
            Side::Response => (&level.response_add, &level.response_remove),
        };
        for name in remove {
            headers.remove(name.as_str());
        }
        for option in add {
            add_one(headers, option);
        }
    }
}

/// Adds header options a filter asked for.
pub fn apply_options(headers: &mut HeaderMap, options: &[HeaderValueOption]) {
    for option in options {
        add_one(headers, option);
    }
}

fn add_one(headers: &mut HeaderMap, option: &HeaderValueOption) {
    if option.value.is_empty() && !option.keep_empty_value {
        return;
    }
    let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(option.name.as_bytes()),
        HeaderValue::from_str(&option.value),
    ) else {
        // Names and values were validated with the configuration.
        return;
    };
    match option.append {
        AppendAction::AppendIfExistsOrAdd => {
            headers.append(name, value);
        }
        AppendAction::AddIfAbsent => {
            if !headers.contains_key(&name) {
                headers.insert(name, value);
            }
        }
        AppendAction::OverwriteIfExistsOrAdd => {
            headers.insert(name, value);
        }
        AppendAction::OverwriteIfExists => {
            if headers.contains_key(&name) {
                headers.insert(name, value);
            }
        }
    }
}

/// The names the request path reads and writes, as constants: a name given as `&str` is
/// parsed and checked again at every lookup (~400 instructions each, callgrind), a
/// `HeaderName` constant is built at compile time.
pub mod names {
    use http::HeaderName;

    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FORWARDED_CLIENT_CERT: HeaderName =
        HeaderName::from_static("x-forwarded-client-cert");
    pub const X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
    pub const X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
        HeaderName::from_static("x-envoy-external-address");
    pub const X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
    pub const X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
        HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
    pub const X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
    pub const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
        HeaderName::from_static("x-envoy-upstream-service-time");
    pub const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
    pub const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
    pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
}

/// A random UUID (version 4), Envoy's `x-request-id` format.
pub fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    // 8-4-4-4-12 hex digits, written in place (this runs for every request).
    let mut id = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id[at] = b'-';
            at += 1;
        }
        id[at] = HEX[usize::from(b >> 4)];
        id[at + 1] = HEX[usize::from(b & 0x0f)];
        at += 2;
    }
    HeaderValue::from_bytes(&id).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &str, value: &str, append: AppendAction) -> HeaderValueOption {
        HeaderValueOption {
            name: name.into(),
            value: value.into(),
            append,
            keep_empty_value: false,
        }
    }

    #[test]
    fn mutations_apply_most_specific_first() {
        let route = HeaderMutations {
            request_add: vec![
                opt("x-a", "route", AppendAction::OverwriteIfExistsOrAdd),
                opt("x-b", "route", AppendAction::AppendIfExistsOrAdd),
            ],
            request_remove: vec!["x-gone".into()],
            ..HeaderMutations::default()
        };
        let vhost = HeaderMutations {
            request_add: vec![
                opt("x-a", "vhost", AppendAction::AddIfAbsent),
                opt("x-b", "vhost", AppendAction::AppendIfExistsOrAdd),
                opt("x-c", "vhost", AppendAction::OverwriteIfExists),
            ],
            ..HeaderMutations::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-gone", HeaderValue::from_static("1"));
        apply(&mut h, &[&route, &vhost], Side::Request);
        assert_eq!(h["x-a"], "route");
        let b: Vec<_> = h.get_all("x-b").iter().collect();
        assert_eq!(b, ["route", "vhost"]);
        assert!(!h.contains_key("x-c") && !h.contains_key("x-gone"));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        let id = request_id();
        let b = id.as_bytes();
        assert_eq!(id.len(), 36);
        for (i, c) in b.iter().enumerate() {
            match i {
                8 | 13 | 18 | 23 => assert_eq!(*c, b'-', "{id:?}"),
                _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id:?}"),
            }
        }
        assert_eq!(b[14], b'4', "version 4: {id:?}");
        assert!(b"89ab".contains(&b[19]), "RFC 4122 variant: {id:?}");
        assert_ne!(request_id(), id, "random");
    }
}
