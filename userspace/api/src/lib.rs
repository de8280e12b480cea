//! nodemesh's own gRPC APIs, generated from `proto/` at the workspace root.
//!
//! Only generated code lives here, in its own crate, so that editing the agent does not
//! recompile it.

/// `nodemesh.registry.v1`: the pod registry served on the agent's unix socket.
pub mod registry {
    #![allow(
        missing_docs,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("nodemesh.registry.v1");
}

/// `nodemesh.echo.v1`: the gRPC echo service of the test and benchmark applications.
pub mod echo {
    #![allow(
        missing_docs,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("nodemesh.echo.v1");
}
