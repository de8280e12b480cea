//! nodemesh's automation, `cargo xtask <cmd>` (alias in `.cargo/config.toml`): what cargo
//! cannot do alone.
//!
//! - `setup`: install what a fresh machine lacks (nightly rust-src, bpf-linker on the
//!   nightly's LLVM, Debian packages, bpffs, a PyPI virtualenv); idempotent.
//! - `build [--release]`: setup, then every host binary (kernel programs embedded).
//! - `test [--unit] [--filter NAME] [--skip-setup]`: everything CI runs (`.ci/run`).
//! - `image`: setup, then the container image with podman, base images made locally.
//! - `demo`, `bench`: setup, release build, then the demo or the benchmarks.
//! - `fuzz [--seconds N]`: every cargo-fuzz target under `fuzz/` for N seconds each.
//!
//! Each step prints `==> step: what`; a failure names the step and says what to do; every
//! command ends with a summary of the steps and their durations.
//!
//! xtask must not depend on the workspace's own crates: it builds and tests them, so it has
//! to compile when they do not.
mod bench;
mod cmd_build;
mod cmd_test;
mod demo;
mod fuzz;
mod image;
mod leftovers;
mod setup;
mod steps;
mod util;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::steps::Steps;
use crate::workspace::Workspace;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "nodemesh's setup, build, test, demo and bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what this machine lacks (idempotent; needs root for apt and mount).
    Setup,
    /// Setup, then build every binary of the workspace.
    Build {
        #[arg(long)]
        release: bool,
        /// Do not run setup first.
        #[arg(long)]
        skip_setup: bool,
    },
    /// Everything CI runs: fmt, clippy, unit tests, build, privileged node tests.
    Test {
        /// Stop after fmt, clippy, unit tests and build (no root needed).
        #[arg(long)]
        unit: bool,
        /// Run only the node tests whose name contains NAME.
        #[arg(long, value_name = "NAME")]
        filter: Option<String>,
        /// Do not run setup first.
        #[arg(long)]
        skip_setup: bool,
    },
    /// Setup, then the container image (deploy/Dockerfile) with podman, without a registry.
    Image {
        #[arg(long)]
        skip_setup: bool,
    },
    /// Setup, release build, then the demo on a simulated node.
    Demo {
        /// Leave the simulated node up afterwards.
        #[arg(long)]
        keep: bool,
        /// Use a debug build instead of a release build.
        #[arg(long)]
        debug: bool,
        #[arg(long)]
        skip_setup: bool,
        /// `basic`, or `namespaces` (pods from a Kubernetes API, one namespace accelerated).
        #[arg(long, default_value = "basic")]
        scenario: String,
    },
    /// Every fuzz target (cargo fuzz, nightly) for a bounded time each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        #[arg(long)]
        skip_setup: bool,
    },
    /// Setup, release build, then the data-path benchmarks.
    Bench {
        /// A short smoke run.
        #[arg(long)]
        quick: bool,
        /// Where results go [default: <target dir>/bench].
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Only this part (repeatable): tcp, http.
        #[arg(long = "part")]
        parts: Vec<String>,
        #[arg(long)]
        skip_setup: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut steps = Steps::new();
    let result = run(cli.cmd, &mut steps);
    steps.print_summary();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut chain = e.chain();
            if let Some(first) = chain.next() {
                eprintln!("error: {first}");
            }
            for cause in chain {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, steps: &mut Steps) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let setup = |steps: &mut Steps, skip: bool| {
        if skip {
            steps.skip("setup", "--skip-setup");
            Ok(())
        } else {
            setup::run(&ws, steps)
        }
    };
    match cmd {
        Cmd::Setup => setup(steps, false),
        Cmd::Build {
            release,
            skip_setup,
        } => {
            setup(steps, skip_setup)?;
            cmd_build::build_bins(&ws, steps, release)
        }
        Cmd::Test {
            unit,
            filter,
            skip_setup,
        } => cmd_test::run(
            &ws,
            steps,
            &cmd_test::TestOpts {
                unit,
                filter,
                skip_setup,
            },
        ),
        Cmd::Image { skip_setup } => {
            setup(steps, skip_setup)?;
            let conf = image::build(&ws, steps)?;
            println!(
                "    run it with: CONTAINERS_CONF={} podman run --rm {} --version",
                conf.display(),
                image::IMAGE
            );
            Ok(())
        }
        Cmd::Demo {
            keep,
            debug,
            skip_setup,
            scenario,
        } => {
            setup(steps, skip_setup)?;
            let release = !debug;
            cmd_build::build_bins(&ws, steps, release)?;
            let opts = demo::DemoOpts {
                release,
                bin_dir: ws.bin_dir(release),
                keep,
                scenario,
            };
            steps.run("demo", "a simulated node, end to end", || demo::run(&opts))
        }
        Cmd::Fuzz {
            seconds,
            skip_setup,
        } => {
            setup(steps, skip_setup)?;
            fuzz::run(&ws, steps, seconds)
        }
        Cmd::Bench {
            quick,
            out_dir,
            parts,
            skip_setup,
        } => {
            setup(steps, skip_setup)?;
            cmd_build::build_bins(&ws, steps, true)?;
            let opts = bench::BenchOpts {
                quick,
                out_dir: out_dir.unwrap_or_else(|| ws.target_dir.join("bench")),
                bin_dir: ws.bin_dir(true),
                parts,
            };
            steps.run("bench", "data-path benchmarks", || bench::run(&opts))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_options_parse() {
        let cli = Cli::try_parse_from(["xtask", "test", "--unit", "--filter", "redirect"])
            .expect("parses");
        assert!(matches!(
            cli.cmd,
            Cmd::Test { unit: true, filter: Some(ref f), skip_setup: false } if f == "redirect"
        ));
    }
}
