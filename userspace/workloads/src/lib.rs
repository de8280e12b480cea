//! The pods on this node, as the mesh sees them.
//!
//! Owns: the pod registry (the only writer of the kernel's pod map, [`registry`]), the
//! validation of pod and namespace input ([`pod`]), the namespace label selector that
//! switches the mesh on per namespace ([`selector`]), pods' network namespaces ([`netns`]),
//! the registry's state file, and its gRPC API on a unix socket ([`api`]).
//!
//! Must not: touch the data path's connections (it only publishes an immutable
//! [`registry::PodTable`] the proxy reads), or call into Kubernetes (the Kubernetes pod
//! source, `nodemesh-kube`, is just another caller of [`registry::Registry`]).

pub mod api;
mod error;
pub mod netns;
pub mod pod;
pub mod registry;
pub mod selector;
mod store;

pub use error::RegistryError;
pub use registry::{PodMapWriter, PodTable, Registry, RegistryConfig, SharedPodTable};
