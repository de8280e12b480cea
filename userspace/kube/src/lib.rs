//! Kubernetes as the source of the node's pods.
//!
//! Owns: watching the pods scheduled on this node (`fieldSelector=spec.nodeName=<node>`) and
//! every namespace's labels with kube-rs ([`source`]), and finding each pod's cgroup and
//! network namespace on the node from kubelet's cgroup layout and the processes in it
//! ([`discover`]). What it learns goes into the same [`nodemesh_workloads::Registry`] the
//! local gRPC API feeds, through the same validated calls.
//!
//! Must not: write to the API server (the agent's RBAC is get/list/watch on pods and
//! namespaces), touch the kernel maps itself (the registry is their only writer), or decide
//! which namespaces are in the mesh (the registry's selector does).
pub mod discover;
pub mod source;

pub use source::{SourceConfig, SourceMetrics, run};
