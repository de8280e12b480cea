//! Where the workspace and its target directory are, asked from `cargo metadata` (the target
//! directory moves with `CARGO_TARGET_DIR` or `build.target-dir`, so it is never hardcoded).
use std::path::PathBuf;

use anyhow::Context as _;

/// The eBPF crate: built only for the BPF target, by the loader's build script.
pub const EBPF_PACKAGE: &str = "nodemesh-ebpf";
/// The privileged, namespaced end-to-end tests.
pub const NODE_TESTS_PACKAGE: &str = "nodemesh-tests";

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> anyhow::Result<Self> {
        // The manifest of this crate sits one level below the workspace root; asking cargo
        // from there works whatever directory `cargo xtask` was started in.
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let metadata = cargo_metadata::MetadataCommand::new()
            .manifest_path(manifest)
            .no_deps()
            .exec()
            .context("`cargo metadata` failed; is the workspace's Cargo.toml valid?")?;
        Ok(Self {
            root: metadata.workspace_root.into_std_path_buf(),
            target_dir: metadata.target_directory.into_std_path_buf(),
        })
    }

    /// The directory cargo puts the host binaries of `profile` in.
    pub fn bin_dir(&self, release: bool) -> PathBuf {
        self.target_dir
            .join(if release { "release" } else { "debug" })
    }

    /// The ignored folder for things setup makes inside the checkout (the virtualenv).
    pub fn build_dir(&self) -> PathBuf {
        self.root.join(".build")
    }

    /// A cargo command that runs in the workspace root.
    pub fn cargo(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("cargo");
        cmd.current_dir(&self.root);
        cmd
    }
}
