//! What a decision may look at: the connection and, for HTTP, the request.
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The connection (and request) being decided on.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The downstream peer (`direct_remote_ip`).
    pub peer: SocketAddr,
    /// The client address after `x-forwarded-for` processing (`remote_ip`): the peer unless
    /// the connection manager trusts forwarded addresses.
    pub remote_ip: IpAddr,
    /// Where the client meant to go (the original destination in the node proxy).
    pub destination: SocketAddr,
    /// The peer's authenticated identity (a SPIFFE id), when known.
    pub principal: Option<&'a str>,
    /// The source workload's namespace, when known (`istio_authn` metadata).
    pub namespace: Option<&'a str>,
    /// SNI, when TLS was detected.
    pub server_name: Option<&'a str>,
    pub http: Option<HttpAttributes<'a>>,
}

/// An HTTP request's head.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// `:authority` / `Host`.
    pub authority: &'a str,
    /// `:path`, with the query.
    pub path: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The routed cluster, when the route forwards to a named one.
    pub cluster: Option<&'a str>,
}

impl HttpAttributes<'_> {
    /// A header as Envoy's matchers see it: pseudo-headers by their names, several values
    /// joined with `,`.
    pub fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match name {
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":authority" | "host" => return Some(Cow::Borrowed(self.authority)),
            ":path" => return Some(Cow::Borrowed(self.path)),
            ":scheme" => return Some(Cow::Borrowed(self.scheme)),
            _ => {}
        }
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let first = first.to_str().ok()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{}", second.to_str().unwrap_or(""));
                for v in values {
                    joined.push(',');
                    joined.push_str(v.to_str().unwrap_or(""));
                }
                Some(Cow::Owned(joined))
            }
        }
    }

    /// The path without the query string (`url_path`).
    pub fn url_path(&self) -> &str {
        self.path
            .split_once(['?', '#'])
            .map_or(self.path, |(p, _)| p)
    }
}
