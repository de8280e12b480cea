//! bpf-linker, linked against the nightly rustc's own LLVM (toolchain.md, step 2): Debian's
//! LLVM 14 cannot read the bitcode of rustc's LLVM, and no other LLVM is installed.
//!
//! Which LLVM an installed bpf-linker was built for (`bpf-linker --version` does not say):
//! 1. the `libLLVM` it is dynamically linked to, as `ldd` reports it: the truth for the
//!    recipe's build, which links the nightly's `libLLVM.so.<major>...` through an rpath;
//! 2. otherwise the stamp `$CARGO_HOME/nodemesh-bpf-linker.stamp` (`llvm-major=<N>`), written
//!    after every install by this step.
//!
//! It is rebuilt when that major differs from the current nightly's, when it is unknown, or
//! when the binary does not start (a nightly update removes the exact `libLLVM` file it
//! links, so `bpf-linker --version` fails then).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

use super::NIGHTLY;
use crate::steps::Check;
use crate::util;

const STAMP: &str = "nodemesh-bpf-linker.stamp";

/// The LLVM inside the nightly toolchain.
#[derive(Debug)]
struct NightlyLlvm {
    major: u32,
    /// `<sysroot>/lib`, holding `libLLVM-<major>-rust-<version>.so`.
    lib_dir: PathBuf,
    /// The library's name for `-l dylib=`: `LLVM-<major>-rust-<version>`.
    lib_name: String,
}

pub fn check() -> anyhow::Result<Check> {
    let nightly = nightly_llvm()?;
    let version = match util::output(Command::new("bpf-linker").arg("--version")) {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => {
            return Ok(Check::Missing(format!(
                "installed bpf-linker does not start ({}), rebuilding",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Err(_) => return Ok(Check::Missing("bpf-linker not installed".into())),
    };
    let built_for = find_in_path("bpf-linker")
        .and_then(|path| linked_llvm_major(&path))
        .or_else(read_stamp);
    Ok(verdict(&version, built_for, nightly.major))
}

/// Whether `version`, built for LLVM `built_for` (if known), fits the nightly's LLVM.
fn verdict(version: &str, built_for: Option<u32>, nightly_major: u32) -> Check {
    match built_for {
        Some(major) if major == nightly_major => Check::Present(format!("{version}, LLVM {major}")),
        Some(major) => Check::Missing(format!(
            "{version} was built for LLVM {major}, nightly has LLVM {nightly_major}: rebuilding"
        )),
        None => Check::Missing(format!(
            "cannot tell which LLVM {version} was built for (no libLLVM in ldd, no stamp): \
             rebuilding"
        )),
    }
}

pub fn install() -> anyhow::Result<()> {
    let nightly = nightly_llvm()?;
    let lib_dir = nightly.lib_dir.display();
    let rustflags = format!(
        "-L native={lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}",
        nightly.lib_name
    );
    util::run(
        Command::new("cargo")
            .env("RUSTFLAGS", rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            // --force: a bpf-linker of the same version that no longer starts (its libLLVM
            // is gone after a nightly update) or links another LLVM is still "installed".
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .arg("--features")
            .arg(format!("llvm-{},no-llvm-linking", nightly.major)),
        "see shared/design/toolchain.md step 2 (crates.io must be reachable); run \
         `cargo xtask setup` again when fixed",
    )?;
    util::stdout(Command::new("bpf-linker").arg("--version")).context(
        "bpf-linker was installed but does not run; is $CARGO_HOME/bin (~/.cargo/bin) on PATH?",
    )?;
    let stamp = stamp_path()?;
    std::fs::write(&stamp, format!("llvm-major={}\n", nightly.major))
        .with_context(|| format!("write {}", stamp.display()))
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let fix = "a `nightly` toolchain must be installed (`rustup toolchain list`)";
    let vv =
        util::stdout(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"])).context(fix)?;
    let major = llvm_major(&vv).ok_or_else(|| anyhow!("no `LLVM version:` in `rustc -vV`"))?;
    let sysroot =
        util::stdout(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .context(fix)?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let lib_name = rust_llvm_lib(&lib_dir, major)?;
    Ok(NightlyLlvm {
        major,
        lib_dir,
        lib_name,
    })
}

/// `LLVM-<major>-rust-<version>` for the first `libLLVM-<major>-rust-*.so` in `lib_dir`.
fn rust_llvm_lib(lib_dir: &Path, major: u32) -> anyhow::Result<String> {
    let prefix = format!("libLLVM-{major}-rust-");
    let mut names: Vec<String> = std::fs::read_dir(lib_dir)
        .with_context(|| format!("list {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".so"))
        .collect();
    names.sort();
    let Some(first) = names.first() else {
        bail!(
            "the nightly toolchain has no {prefix}*.so in {}; it cannot link bpf-linker",
            lib_dir.display()
        );
    };
    let name = first.strip_prefix("lib").unwrap_or(first);
    Ok(name.strip_suffix(".so").unwrap_or(name).to_owned())
}

/// The major of `LLVM version: 22.1.4` in `rustc -vV` output.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
}

/// The LLVM major `binary` loads, from `ldd`: `libLLVM.so.22.1-rust-...` or `libLLVM-22...`.
fn linked_llvm_major(binary: &Path) -> Option<u32> {
    let out = util::output(Command::new("ldd").arg(binary)).ok()?;
    ldd_llvm_major(&String::from_utf8_lossy(&out.stdout))
}

fn ldd_llvm_major(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let lib = line.split_whitespace().next()?;
        let rest = lib
            .strip_prefix("libLLVM.so.")
            .or_else(|| lib.strip_prefix("libLLVM-"))?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

fn stamp_path() -> anyhow::Result<PathBuf> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME").context("neither CARGO_HOME nor HOME")?)
            .join(".cargo"),
    };
    Ok(cargo_home.join(STAMP))
}

fn read_stamp() -> Option<u32> {
    parse_stamp(&std::fs::read_to_string(stamp_path().ok()?).ok()?)
}

fn parse_stamp(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("llvm-major="))
        .and_then(|v| v.trim().parse().ok())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_from_rustc() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn reads_the_linked_llvm_from_ldd() {
        let rust_llvm = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1-rust-1.97.0-nightly => \
                         /root/.rustup/toolchains/nightly/lib/libLLVM.so.22.1-rust-1.97.0-nightly \
                         (0x00007f0e)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        assert_eq!(ldd_llvm_major(rust_llvm), Some(22));
        let old_name = "\tlibLLVM-21-rust-1.95.0-nightly.so => not found\n";
        assert_eq!(ldd_llvm_major(old_name), Some(21));
        assert_eq!(
            ldd_llvm_major("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"),
            None
        );
    }

    #[test]
    fn rebuilds_unless_built_for_the_nightly_llvm() {
        assert!(matches!(
            verdict("bpf-linker 0.13.0", Some(22), 22),
            Check::Present(_)
        ));
        assert!(matches!(
            verdict("bpf-linker 0.13.0", Some(21), 22),
            Check::Missing(_)
        ));
        assert!(matches!(
            verdict("bpf-linker 0.13.0", None, 22),
            Check::Missing(_)
        ));
    }

    #[test]
    fn stamp_round_trip() {
        assert_eq!(parse_stamp("llvm-major=22\n"), Some(22));
        assert_eq!(parse_stamp("garbage"), None);
    }

    #[test]
    fn finds_the_rust_llvm_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a9.so",
        ] {
            std::fs::write(dir.path().join(f), b"").expect("write");
        }
        let lib = rust_llvm_lib(dir.path(), 22).expect("found");
        assert_eq!(lib, "LLVM-22-rust-1.97.0-nightly");
        assert!(rust_llvm_lib(dir.path(), 21).is_err());
    }
}
