//! The kernel side of nodemesh, seen from userspace.
//!
//! Owns: probing the kernel for what the programs need ([`probe`]), loading the embedded
//! object, attaching it to the pods' cgroup, pinning programs/links/maps under bpffs and
//! adopting them on restart ([`datapath`]), typed handles to every map ([`maps`]), the
//! conversions between socket addresses and map keys ([`addr`]), and the start-up self-test
//! of the sockmap fast path ([`selftest`]).
//!
//! Must not: decide policy (which pods are enabled is the workloads crate's business), or
//! touch anything but the configured cgroup and pin directory.

pub mod addr;
pub mod datapath;
mod error;
pub mod maps;
mod object;
pub mod probe;
pub mod selftest;
mod sys;

pub use datapath::{Datapath, DatapathConfig, KernelLogLevel, cleanup, pin_dir};
pub use error::LoaderError;
