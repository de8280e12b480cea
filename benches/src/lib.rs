//! The data-path comparison shared by `cargo xtask bench` and `cargo xtask demo`.
//!
//! One simulated node, one client pod and one echo server pod, and the same
//! request/response workload (`nm-podapp rr`) over three paths:
//! - **direct**: the namespace is not in the mesh; pod to pod over the bridge;
//! - **proxied**: in the mesh with the sockmap switch off: app -> node proxy -> server, each
//!   hop through the TCP/IP stack and the veth pair;
//! - **sockmap**: the same with the switch on: both local hops short-circuited socket to
//!   socket.
//!
//! The paths are switched at run time on the same node (namespace label, sockmap switch),
//! so every round measures all three under the same conditions, interleaved.

pub mod density;
pub mod envoy;
pub mod growth;
pub mod http;
pub mod namespaces;
pub mod parts;
pub mod paths;
pub mod scenarios;
pub mod svg;
