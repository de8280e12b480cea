//! Where the L7 proxy meets `nodemesh-policy`: the compiled filters of every filter chain of
//! the configuration in force, found by [`ChainKey`], and the re-check of open connections
//! after an update.
//!
//! Requests look their chain up in the state current when they start, so a kept-alive
//! connection's next request is checked against a new policy. A connection whose network
//! RBAC a new configuration denies is closed (unless
//! [`crate::Engine::set_close_denied_on_update`] says otherwise).
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use nodemesh_config::model::{FilterChain, Listener, NetworkFilter, Snapshot};
use nodemesh_policy::{Attributes, HttpChain, NetworkChain, chain::Policies};
use tracing::info;

use crate::Engine;

/// A filter chain across configurations: its listener and its name (or position).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChainKey {
    pub listener: Arc<str>,
    pub chain: Arc<str>,
}

impl ChainKey {
    pub fn of(listener: &Listener, chain: &FilterChain) -> Self {
        let name = if !chain.name.is_empty() {
            chain.name.clone()
        } else if listener
            .default_chain
            .as_ref()
            .is_some_and(|d| std::ptr::eq(d, chain))
        {
            "<default>".to_owned()
        } else {
            listener
                .filter_chains
                .iter()
                .position(|c| std::ptr::eq(c, chain))
                .map_or_else(|| "?".to_owned(), |i| format!("#{i}"))
        };
        Self {
            listener: Arc::from(listener.name.as_str()),
            chain: Arc::from(name),
        }
    }
}

/// The connection's side of the attributes, owned (it outlives requests).
#[derive(Debug, Clone)]
pub struct ConnAttrs {
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    pub principal: Option<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    pub server_name: Option<String>,
}

impl ConnAttrs {
    pub fn attributes(&self) -> Attributes<'_> {
        Attributes {
            peer: self.peer,
            remote_ip: self.peer.ip(),
            destination: self.destination,
            principal: self.principal.as_deref(),
            namespace: self.namespace.as_deref(),
            server_name: self.server_name.as_deref(),
            http: None,
        }
    }
}

#[derive(Debug)]
struct ChainPolicies {
    network: Arc<NetworkChain>,
    http: Option<Arc<HttpChain>>,
    /// The chain's inline route configuration, for open connections' next requests.
    routes: Option<Arc<nodemesh_config::model::RouteConfig>>,
}

/// Every chain's compiled filters.
#[derive(Debug, Default)]
pub struct Compiled {
    chains: foldhash::HashMap<ChainKey, ChainPolicies>,
}

impl Compiled {
    pub fn build(snapshot: &Snapshot, policies: &Policies) -> Self {
        let mut chains = HashMap::default();
        for l in &snapshot.listeners {
            for chain in l.filter_chains.iter().chain(l.default_chain.iter()) {
                let http = match &chain.filter {
                    NetworkFilter::Http(h) if !h.filters.is_empty() => {
                        Some(HttpChain::compile(&h.filters, policies))
                    }
                    _ => None,
                };
                let routes = match &chain.filter {
                    NetworkFilter::Http(h) => match &h.routes {
                        nodemesh_config::model::RouteSource::Inline(rc) => Some(rc.clone()),
                        nodemesh_config::model::RouteSource::Named(_) => None,
                    },
                    NetworkFilter::Tcp(_) => None,
                };
                chains.insert(
                    ChainKey::of(l, chain),
                    ChainPolicies {
                        network: NetworkChain::compile(&chain.policies, policies),
                        http,
                        routes,
                    },
                );
            }
        }
        Self { chains }
    }

    /// `Some(details)` when a network filter denies the connection.
    pub fn network_check(&self, key: &ChainKey, conn: &ConnAttrs) -> Option<String> {
        let chain = self.chains.get(key)?;
        if chain.network.is_empty() {
            return None;
        }
        chain.network.check(&conn.attributes())
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The inline route configuration chain `key` has now (none if the chain is gone or
    /// uses RDS).
    pub fn inline_routes(
        &self,
        key: &ChainKey,
    ) -> Option<Arc<nodemesh_config::model::RouteConfig>> {
        self.chains.get(key).and_then(|c| c.routes.clone())
    }

    pub fn http(&self, key: &ChainKey) -> Option<Arc<HttpChain>> {
        self.chains.get(key).and_then(|c| c.http.clone())
    }
}

/// Resolves when an update's network policy denies this connection (and closing is on);
/// never otherwise.
pub async fn watch_denied(engine: Arc<Engine>, key: ChainKey, conn: ConnAttrs) {
    let mut updates = engine.updates();
    loop {
        if updates.changed().await.is_err() {
            return std::future::pending().await;
        }
        let state = engine.state();
        if let Some(details) = state.policies.network_check(&key, &conn)
            && engine.close_denied()
        {
            engine.stats().local_reply("RBAC");
            info!(listener = %key.listener, chain = %key.chain, peer = %conn.peer, %details, "open connection denied by the updated network policy; closing");
            return;
        }
    }
}
