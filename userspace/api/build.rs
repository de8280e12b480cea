//! Compiles the project's own .proto files (`proto/` at the workspace root) with protox, a
//! protobuf compiler written in Rust, so no `protoc` binary is needed on the build machine.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "nodemesh/registry/v1/registry.proto",
        "nodemesh/echo/v1/echo.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
