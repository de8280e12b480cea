//! Rebuild the programs when `bpf-linker` changes: the link step depends on it but cargo
//! cannot see that dependency (see aya-build's notes on artifact dependencies).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
