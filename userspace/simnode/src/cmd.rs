//! Running `ip` and friends, with errors that show the command and its stderr.
use std::process::Command;

use crate::SimError;

/// Runs `program args...` and fails with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Result<String, SimError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| SimError::io("running", program, e))?;
    if !out.status.success() {
        return Err(SimError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args...`
pub fn ip(args: &[&str]) -> Result<String, SimError> {
    run("ip", args)
}
