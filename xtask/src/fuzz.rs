//! `cargo xtask fuzz`: every cargo-fuzz target under `fuzz/`, each for a bounded time.
//!
//! The fuzz crate is outside the workspace (nightly, sanitizer flags, its own target
//! directory under `fuzz/target`, kept between runs). Each run starts from the target's
//! corpus in `fuzz/corpus/<target>` (checked-in seeds plus whatever earlier runs found);
//! a crash fails the step and leaves its reproducer in `fuzz/artifacts/<target>`.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::steps::{Check, Steps};
use crate::util;
use crate::workspace::Workspace;

/// The targets, in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "detect",
    "config",
    "grpc_timeout",
    "sanitize",
    "xds_resource",
];

/// cargo-fuzz, installed from crates.io when missing.
pub fn check_cargo_fuzz() -> anyhow::Result<Check> {
    match util::output(Command::new("cargo").args(["fuzz", "--version"])) {
        Ok(out) if out.status.success() => Ok(Check::Present(
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )),
        _ => Ok(Check::Missing("cargo-fuzz not installed".into())),
    }
}

pub fn install_cargo_fuzz() -> anyhow::Result<()> {
    util::run(
        Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]),
        "check the network access to crates.io, then rerun",
    )
}

/// Runs every target for `seconds`.
pub fn run(ws: &Workspace, steps: &mut Steps, seconds: u32) -> anyhow::Result<()> {
    steps.ensure(
        "setup: cargo-fuzz",
        "cargo fuzz (crates.io)",
        check_cargo_fuzz,
        install_cargo_fuzz,
    )?;
    let fuzz_dir = ws.root.join("fuzz");
    for target in TARGETS {
        steps.run(&format!("fuzz: {target}"), &format!("{seconds} s of libFuzzer"), || {
            let corpus = fuzz_dir.join("corpus").join(target);
            std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=4096"]);
            let fix = format!(
                "a crash: the reproducer is in fuzz/artifacts/{target}; rerun it with `cargo +nightly \
                 fuzz run {target} fuzz/artifacts/{target}/<file>` from fuzz/, fix, and add it to the \
                 unit tests"
            );
            let status = cmd.status().with_context(|| util::display(&cmd))?;
            if !status.success() {
                bail!("{}: {status}\n    fix: {fix}", util::display(&cmd));
            }
            Ok(())
        })?;
    }
    Ok(())
}
