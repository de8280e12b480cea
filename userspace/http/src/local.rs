//! Responses the proxy makes itself, as Envoy makes them: the status, the response flag
//! that says why, a short text body, and for gRPC requests a trailers-only gRPC response
//! (HTTP 200, `grpc-status` mapped from the HTTP status, `grpc-message` the text).
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use crate::{BoxError, headers::names, router::RespBody};

/// Envoy's response flags for the replies nodemesh generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// No route matched (`NR`).
    NoRoute,
    /// The route's cluster does not exist (`NC`).
    NoCluster,
    /// No healthy upstream host (`UH`).
    NoHealthyUpstream,
    /// Upstream connection failure (`UF`).
    UpstreamConnectFailure,
    /// A circuit breaker is open (`UO`).
    UpstreamOverflow,
    /// Upstream request timeout (`UT`).
    UpstreamTimeout,
    /// The upstream connection terminated before the response (`UC`).
    UpstreamConnectionTermination,
    /// The upstream reset the stream (`UR`).
    UpstreamRemoteReset,
    /// Shed by a per-source limit (`OM`: Envoy's overload flag).
    Overloaded,
    /// Direct response from the route (`DR`... Envoy logs none; nodemesh counts these).
    DirectResponse,
    /// Redirect from the route.
    Redirect,
    /// Malformed request (`DPE`).
    ProtocolError,
    /// Upgrade not allowed (`UPE`? Envoy logs none).
    UpgradeRefused,
    /// Nothing moved on the stream for the stream or route idle timeout (`SI`).
    StreamIdleTimeout,
    /// The stream outlived its maximum duration: the gRPC deadline under
    /// `max_stream_duration` (`DT`; gRPC clients get DEADLINE_EXCEEDED).
    StreamDurationTimeout,
    /// The request was not received within `request_timeout` (Envoy sets no flag; its
    /// response details say `request_overall_timeout`).
    RequestTimeout,
    /// Denied by RBAC (Envoy sets no flag, only the response code details; nodemesh names
    /// it `RBAC` so that denies are counted and logged as such).
    RbacDenied,
    /// Rate limited, locally or by the global quota (`RL`).
    RateLimited,
    /// The global quota's Redis is unreachable and the quota fails closed (`RLSE`).
    RateLimitServiceError,
}

impl Flag {
    /// The flag as access logs and `istio_requests_total{response_flags}` show it: Envoy
    /// sets none for direct responses, redirects and refused upgrades, nor for a request
    /// timeout (its details say `request_overall_timeout`).
    pub fn log_flag(self) -> Option<&'static str> {
        match self {
            Self::DirectResponse | Self::Redirect | Self::UpgradeRefused | Self::RequestTimeout => {
                None
            }
            f => Some(f.as_str()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "NR",
            Self::NoCluster => "NC",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamConnectFailure => "UF",
            Self::UpstreamOverflow => "UO",
            Self::UpstreamTimeout => "UT",
            Self::UpstreamConnectionTermination => "UC",
            Self::UpstreamRemoteReset => "UR",
            Self::Overloaded => "OM",
            Self::DirectResponse => "DR",
            Self::Redirect => "RD",
            Self::ProtocolError => "DPE",
            Self::UpgradeRefused => "UPGRADE",
            Self::StreamIdleTimeout => "SI",
            Self::StreamDurationTimeout => "DT",
            Self::RequestTimeout => "request_overall_timeout",
            Self::RbacDenied => "RBAC",
            Self::RateLimited => "RL",
            Self::RateLimitServiceError => "RLSE",
        }
    }
}

/// Envoy's HTTP to gRPC status mapping for local replies.
pub fn grpc_status_of(status: u16) -> u8 {
    match status {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed()
}

/// A local reply.
pub fn reply(status: u16, flag: Flag, text: &str, grpc: bool) -> Response<RespBody> {
    let mut response = if grpc {
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            names::GRPC_STATUS,
            HeaderValue::from(u16::from(if flag == Flag::StreamDurationTimeout {
                4 // DEADLINE_EXCEEDED
            } else {
                grpc_status_of(status)
            })),
        );
        if let Ok(v) = HeaderValue::from_str(&percent_encode(text)) {
            h.insert(names::GRPC_MESSAGE, v);
        }
        r
    } else {
        let mut r = Response::new(full(Bytes::copy_from_slice(text.as_bytes())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if !text.is_empty() {
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        r
    };
    if flag == Flag::UpstreamOverflow {
        response
            .headers_mut()
            .insert(names::X_ENVOY_OVERLOADED, HeaderValue::from_static("true"));
    }
    response.extensions_mut().insert(flag);
    response
}

/// gRPC's `grpc-message` encoding: percent-encode what is not printable ASCII or `%`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Envoy's text for a failed upstream request.
pub fn reset_text(reason: &str) -> String {
    format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_get_trailers_only_replies() {
        let r = reply(503, Flag::NoHealthyUpstream, "no healthy upstream", true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream");
        let r = reply(
            504,
            Flag::UpstreamTimeout,
            "upstream request timeout",
            false,
        );
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(percent_encode("a%b\n"), "a%25b%0A");
    }
}
