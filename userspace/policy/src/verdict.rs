//! The outcome of the checks for one request.
use nodemesh_config::model::HeaderValueOption;

/// Whether a request goes on, and what the filters add to it.
#[derive(Debug, Default)]
pub enum Verdict {
    #[default]
    Continue,
    /// Goes on, with headers the filters add (`request_headers_to_add_when_not_enforced`,
    /// `x-ratelimit-*` on the response).
    ContinueWith {
        request_headers: Vec<HeaderValueOption>,
        response_headers: Vec<(String, String)>,
    },
    Deny(Denial),
}

/// A request answered by the proxy, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    pub body: &'static str,
    /// The response flag (`RBAC`, `RL`, `RLSE`).
    pub flag: &'static str,
    /// Envoy's `%RESPONSE_CODE_DETAILS%`, e.g. `rbac_access_denied_matched_policy[ns[a]-policy[b]-rule[0]]`.
    pub details: String,
    /// The gRPC status for gRPC requests.
    pub grpc_status: u8,
    pub headers: Vec<(String, String)>,
}
