//! Debian packages: install only the missing ones, with one `apt-get update` first.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::steps::Check;
use crate::util;

pub fn check(packages: &[&str]) -> anyhow::Result<Check> {
    let missing = missing(packages)?;
    Ok(if missing.is_empty() {
        Check::Present(format!("{} packages installed", packages.len()))
    } else if !util::is_root() && util::unprivileged_requested() {
        Check::NotNeeded(format!(
            "not root and NODEMESH_UNPRIVILEGED=1; missing, needed by the privileged tests: {}",
            missing.join(" ")
        ))
    } else {
        Check::Missing(format!("missing: {}", missing.join(" ")))
    })
}

pub fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "installing {} needs root; run `sudo cargo xtask setup` (or install them by hand)",
            missing.join(" ")
        );
    }
    let fix = "check that apt can reach the Debian mirrors (see the output above), then run \
               `cargo xtask setup` again";
    util::run(Command::new("apt-get").arg("update"), fix)?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        fix,
    )?;
    let still = self::missing(packages)?;
    if !still.is_empty() {
        bail!(
            "apt-get succeeded but {} are still not installed",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing<'a>(packages: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let mut missing = Vec::new();
    for &package in packages {
        if !installed(package)? {
            missing.push(package);
        }
    }
    Ok(missing)
}

fn installed(package: &str) -> anyhow::Result<bool> {
    // Unknown packages make dpkg-query exit non-zero: that is "not installed", not an error.
    let out = util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("dpkg-query is missing: setup supports Debian (12) machines only")?;
    Ok(out.status.success() && is_installed_status(&String::from_utf8_lossy(&out.stdout)))
}

/// `dpkg-query -f '${Status}'` prints "want flag status"; only "install ok installed" is a
/// usable package ("deinstall ok config-files" is a removed one).
fn is_installed_status(status: &str) -> bool {
    status.trim() == "install ok installed"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fully_installed_packages_count() {
        assert!(is_installed_status("install ok installed"));
        assert!(!is_installed_status("deinstall ok config-files"));
        assert!(!is_installed_status("install ok unpacked"));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn an_unknown_package_is_missing() {
        let missing = missing(&["nodemesh-no-such-package-xyz"]).expect("dpkg-query runs");
        assert_eq!(missing, ["nodemesh-no-such-package-xyz"]);
    }
}
