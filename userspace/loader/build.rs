//! Builds the kernel programs (`ebpf/programs`, nightly, `bpfel-unknown-none`) and leaves
//! the object in `OUT_DIR/nodemesh`, which `src/object.rs` embeds.
//!
//! Set `AYA_BUILD_SKIP=1` to skip (an empty stand-in object is written so that host-only
//! work such as `cargo doc` still compiles; loading it fails with a clear error).
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if skip {
        let stand_in = out_dir.join("nodemesh");
        if !stand_in.exists() {
            std::fs::write(&stand_in, b"").context("write stand-in object")?;
        }
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "nodemesh-ebpf")
        .ok_or_else(|| anyhow!("package nodemesh-ebpf not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the kernel programs failed; run `cargo xtask setup` (nightly rust-src and \
         bpf-linker are needed)",
    )
}
