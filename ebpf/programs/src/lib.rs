//! Host-side face of the kernel programs crate.
//!
//! The programs live in the `nodemesh` binary target (`src/main.rs`), built for
//! `bpfel-unknown-none` by `userspace/loader`'s build script. This library target exists only
//! so that the loader can name this crate as a build dependency and be rebuilt when it changes.
#![no_std]
