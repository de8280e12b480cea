//! xDS for nodemesh.
//!
//! - [`types`]: the ADS resource types and a set of named resources, shared by both ends.
//! - [`client`]: the ADS client the agent and `nodemesh proxy -c` follow.
//! - [`dump`]: the live configuration as an Envoy config dump.
//! - [`startup`]: a bootstrap file read once into the first snapshot and the control plane
//!   to follow, for the agent and `nodemesh proxy -c` alike.
//! - [`files`] and [`server`]: `nodemesh controlplane`, which serves a folder of resource
//!   files.
//!
//! Both ends speak `envoy.service.discovery.v3.AggregatedDiscoveryService` over gRPC
//! (tonic, with envoy-types' generated service code), in both variants: state of the world
//! (`StreamAggregatedResources`) and incremental (`DeltaAggregatedResources`). Resources
//! are translated by `nodemesh-config`, the same translation a bootstrap file goes through.
pub mod client;
pub mod dump;
pub mod files;
pub mod refs;
pub mod server;
pub mod startup;
pub mod types;

pub use types::{Resource, ResourceError, ResourceSet, ResourceType};
