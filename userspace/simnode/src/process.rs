//! Processes started inside a pod or the node: in its network namespace and cgroup from
//! their first instruction, with output in files (no pipe to fill up and block them).
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::SimError;

/// A started process. Dropping it kills it (SIGKILL, by pid) and reaps it.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SimError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| SimError::io("waiting for", &self.stdout, e))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout`; an error if it is still running then (it keeps running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, SimError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(SimError::Other(format!(
                    "{} still running after {timeout:?}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn send_signal(&self, signal: Signal) -> Result<(), SimError> {
        if self.status.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), signal).map_err(|e| {
            SimError::Other(format!(
                "signal {signal} to {} ({}): {e}",
                self.name,
                self.pid()
            ))
        })
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus, SimError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        let status = self
            .child
            .wait()
            .map_err(|e| SimError::io("reaping", &self.stdout, e))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Everything written to stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Starts `cmd` inside the network namespace file `netns` and the cgroup directory `cgroup`.
pub(crate) fn spawn(
    mut cmd: Command,
    netns: &Path,
    cgroup: &Path,
    logs: &Path,
) -> Result<Process, SimError> {
    static N: AtomicU32 = AtomicU32::new(0);
    let program = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!("{program}-{}", N.fetch_add(1, Ordering::Relaxed));
    let ns = File::open(netns).map_err(|e| SimError::io("opening netns", netns, e))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|e| SimError::io("opening", &procs_path, e))?;
    let stdout = logs.join(format!("{name}.out"));
    let stderr = logs.join(format!("{name}.err"));
    let out = File::create(&stdout).map_err(|e| SimError::io("creating", &stdout, e))?;
    let err = File::create(&stderr).map_err(|e| SimError::io("creating", &stderr, e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setns, write, prctl) on descriptors opened above,
    // which stay open in the child until exec (they are close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            // Die with the test rather than outlive it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Writing 0 moves the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| SimError::io("starting", cmd.get_program(), e))?;
    Ok(Process {
        child,
        name,
        stdout,
        stderr,
        status: None,
    })
}
