//! Running external commands: print them, inherit stdio, and turn a failure into an error
//! that names the command line and says what to do.
use std::ffi::OsStr;
use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// Runs `cmd` with inherited stdio. On a non-zero exit the error names the command line
/// and carries `fix`, a sentence telling the reader what to do about it.
pub fn run(cmd: &mut Command, fix: &str) -> anyhow::Result<()> {
    let line = display(cmd);
    println!("    $ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`; {fix}"))?;
    if !status.success() {
        bail!("`{line}` failed ({status}); {fix}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its output whatever the exit status (the caller decides
/// what a failure means). Fails only when the program cannot be started at all.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` quietly and returns its stdout; a non-zero exit is an error.
pub fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}`: output is not UTF-8", display(cmd)))
}

/// The command line as a user would type it (environment overrides first).
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), quote(v?))))
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether this process runs as root (setup's apt and mount steps and the node tests need it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// `NODEMESH_UNPRIVILEGED=1` says this machine cannot run the privileged tests; it is the
/// only way they may be skipped (testing.md: fail loudly otherwise).
pub fn unprivileged_requested() -> bool {
    std::env::var("NODEMESH_UNPRIVILEGED").is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b", "it's"]).env("K", "v w");
        assert_eq!(display(&cmd), r"K='v w' cargo test -- 'a b' 'it'\''s'");
    }

    #[test]
    fn failure_names_the_command_and_the_fix() {
        let err = run(Command::new("false").arg("x"), "do the thing").expect_err("false fails");
        let msg = format!("{err:#}");
        assert!(msg.contains("`false x` failed"), "{msg}");
        assert!(msg.ends_with("do the thing"), "{msg}");
    }
}
