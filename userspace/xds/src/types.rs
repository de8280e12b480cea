//! The resource types nodemesh exchanges over ADS, and a set of named resources of each.
//!
//! The client and the control plane share this vocabulary: a resource is kept both as the
//! `Any` it travelled in (re-sent or dumped as is) and decoded against the descriptor pool
//! (checked and translated by `nodemesh-config`).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DynamicMessage, Value};

/// A resource type of ADS. The order is the warming order Envoy uses: clusters before
/// their endpoints, both before the listeners and routes that send traffic to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Cluster,
    Endpoints,
    Listener,
    Route,
    Secret,
}

impl ResourceType {
    /// Every type, in warming order.
    pub const ALL: [Self; 5] = [
        Self::Cluster,
        Self::Endpoints,
        Self::Listener,
        Self::Route,
        Self::Secret,
    ];

    /// The protobuf message of the type.
    pub fn message_name(self) -> &'static str {
        match self {
            Self::Cluster => "envoy.config.cluster.v3.Cluster",
            Self::Endpoints => "envoy.config.endpoint.v3.ClusterLoadAssignment",
            Self::Listener => "envoy.config.listener.v3.Listener",
            Self::Route => "envoy.config.route.v3.RouteConfiguration",
            Self::Secret => "envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    /// The message's short name (`Cluster`, `RouteConfiguration`, ...), for messages.
    pub fn kind(self) -> &'static str {
        let name = self.message_name();
        name.rsplit('.').next().unwrap_or(name)
    }

    /// The type URL on the wire (`type.googleapis.com/<message>`).
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Self::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            Self::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Self::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Self::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    /// The type of a type URL; any host part before the last `/` is accepted, as protobuf's
    /// `Any` allows.
    pub fn from_type_url(url: &str) -> Option<Self> {
        let name = url.rsplit('/').next()?;
        Self::ALL.into_iter().find(|t| t.message_name() == name)
    }

    /// The xDS service name operators know it by (`cds`, `eds`, `lds`, `rds`, `sds`).
    pub fn short(self) -> &'static str {
        match self {
            Self::Cluster => "cds",
            Self::Endpoints => "eds",
            Self::Listener => "lds",
            Self::Route => "rds",
            Self::Secret => "sds",
        }
    }

    /// Whether a client subscribes to every resource of the type (Envoy's wildcard
    /// subscriptions are CDS and LDS); the other types are asked for by name.
    pub fn is_wildcard(self) -> bool {
        matches!(self, Self::Cluster | Self::Listener)
    }

    /// The field holding a resource's name.
    fn name_field(self) -> &'static str {
        match self {
            Self::Endpoints => "cluster_name",
            _ => "name",
        }
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// One named resource.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    /// The version the server gave it (delta), or the response's version (state of the
    /// world).
    pub version: String,
    pub any: Any,
    pub message: DynamicMessage,
}

/// Why a resource could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("type {found:?} in a {expected} response")]
    WrongType {
        expected: ResourceType,
        found: String,
    },
    #[error("{ty} resource of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        ty: ResourceType,
        size: usize,
        limit: usize,
    },
    #[error("{ty} resource does not decode: {message}")]
    Decode { ty: ResourceType, message: String },
    #[error("{ty} resource has no name")]
    Unnamed { ty: ResourceType },
}

impl Resource {
    /// Decodes `any` as a resource of type `ty`, refusing one over `limit` bytes.
    pub fn decode(
        ty: ResourceType,
        any: Any,
        version: &str,
        limit: usize,
    ) -> Result<Self, ResourceError> {
        if ResourceType::from_type_url(&any.type_url) != Some(ty) {
            return Err(ResourceError::WrongType {
                expected: ty,
                found: any.type_url,
            });
        }
        if any.value.len() > limit {
            return Err(ResourceError::TooLarge {
                ty,
                size: any.value.len(),
                limit,
            });
        }
        let message =
            nodemesh_config::pool::decode_any(&any).map_err(|e| ResourceError::Decode {
                ty,
                message: e.to_string(),
            })?;
        let name = match message.get_field_by_name(ty.name_field()).as_deref() {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ResourceError::Unnamed { ty }),
        };
        Ok(Self {
            name,
            version: version.to_owned(),
            any,
            message,
        })
    }
}

/// Named resources of every type.
#[derive(Debug, Clone, Default)]
pub struct ResourceSet {
    /// Shared, so that a candidate set (a copy of the accepted one plus a response) costs
    /// a map of pointers, not a copy of every resource.
    by_type: BTreeMap<ResourceType, BTreeMap<String, Arc<Resource>>>,
}

impl ResourceSet {
    /// The resources of `ty`, by name.
    pub fn of(&self, ty: ResourceType) -> impl Iterator<Item = &Resource> {
        self.by_type
            .get(&ty)
            .into_iter()
            .flat_map(|m| m.values().map(Arc::as_ref))
    }

    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Resource> {
        self.by_type.get(&ty)?.get(name).map(Arc::as_ref)
    }

    pub fn names(&self, ty: ResourceType) -> BTreeSet<String> {
        self.by_type
            .get(&ty)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self, ty: ResourceType) -> usize {
        self.by_type.get(&ty).map_or(0, BTreeMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.values().all(BTreeMap::is_empty)
    }

    /// Adds or replaces a resource.
    pub fn insert(&mut self, ty: ResourceType, resource: Resource) {
        self.by_type
            .entry(ty)
            .or_default()
            .insert(resource.name.clone(), Arc::new(resource));
    }

    pub fn remove(&mut self, ty: ResourceType, name: &str) -> Option<Arc<Resource>> {
        self.by_type.get_mut(&ty)?.remove(name)
    }

    /// Replaces every resource of `ty`.
    pub fn replace(&mut self, ty: ResourceType, resources: impl IntoIterator<Item = Resource>) {
        self.by_type.insert(
            ty,
            resources
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect(),
        );
    }

    /// Keeps only the resources of `ty` that `keep` accepts.
    pub fn retain(&mut self, ty: ResourceType, mut keep: impl FnMut(&str) -> bool) {
        if let Some(m) = self.by_type.get_mut(&ty) {
            m.retain(|name, _| keep(name));
        }
    }

    /// The configuration these resources make on top of `base` (a bootstrap's static
    /// resources), ready for [`nodemesh_config::translate`]. Secrets are not part of it.
    pub fn to_config(&self, base: &nodemesh_config::Resources) -> nodemesh_config::Resources {
        let mut out = base.clone();
        out.dynamic = true;
        let messages =
            |ty| -> Vec<DynamicMessage> { self.of(ty).map(|r| r.message.clone()).collect() };
        out.clusters.extend(messages(ResourceType::Cluster));
        out.assignments.extend(messages(ResourceType::Endpoints));
        out.listeners.extend(messages(ResourceType::Listener));
        out.routes.extend(messages(ResourceType::Route));
        out
    }
}
