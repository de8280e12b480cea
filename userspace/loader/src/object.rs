//! The kernel programs, built by `build.rs` and embedded in the binary.

/// The eBPF object (empty when built with `AYA_BUILD_SKIP=1`).
pub fn bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh"))
}
