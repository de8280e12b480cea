//! Shared harness of the node tests (see `tests/README.md`): a simulated node with the real
//! nodemesh agent ([`mesh::MeshNode`]) and a client for its admin socket ([`http`]); the
//! agent's container image run as the DaemonSet runs it ([`container`]).
//!
//! The tests themselves live in `tests/*.rs`; each needs root and fails loudly without it
//! (unless `NODEMESH_UNPRIVILEGED=1` says the machine has none).

pub mod container;
pub mod differential;
pub mod http;
pub mod kubeapi;
pub mod kubelet;
pub mod mesh;
pub mod xds;
