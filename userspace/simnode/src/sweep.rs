//! Removing a node's kernel objects: by the node itself on drop, and by [`sweep_stale`] for
//! nodes whose test process died before it could.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{BPFFS_ROOT, SimError, cgroup2_root, cmd::ip};

/// The prefix of every object a simulated node creates.
pub const PREFIX: &str = "nodemesh-sim-";

/// Kills what runs in the node's cgroups and namespaces, then removes the namespaces, the
/// cgroups (bottom-up), the bpffs directory and the work directory.
pub(crate) fn remove_node(
    cgroup_root: &Path,
    namespaces: &[String],
    bpffs_dir: &Path,
    work_dir: Option<&PathBuf>,
) -> Result<(), SimError> {
    let mut first_error = None;
    let mut note = |r: Result<(), SimError>| {
        if let Err(e) = r
            && first_error.is_none()
        {
            first_error = Some(e);
        }
    };
    note(kill_cgroup(cgroup_root));
    for ns in namespaces {
        note(kill_netns(ns));
        if Path::new("/var/run/netns").join(ns).exists() {
            note(ip(&["netns", "del", ns]).map(drop));
        }
    }
    note(remove_cgroup_tree(cgroup_root));
    if bpffs_dir.exists() {
        // Unlinking pins detaches pinned links; the agent's own cleanup is the proper path,
        // this is the safety net.
        note(
            std::fs::remove_dir_all(bpffs_dir).map_err(|e| SimError::io("removing", bpffs_dir, e)),
        );
    }
    if let Some(dir) = work_dir
        && dir.exists()
    {
        note(std::fs::remove_dir_all(dir).map_err(|e| SimError::io("removing", dir, e)));
    }
    first_error.map_or(Ok(()), Err)
}

/// SIGKILL every process in the cgroup subtree and wait until it is empty.
fn kill_cgroup(root: &Path) -> Result<(), SimError> {
    if !root.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(root);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if Instant::now() > deadline {
            return Err(SimError::Other(format!(
                "processes {pids:?} in {} survive SIGKILL",
                root.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(cgroup_pids(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL processes whose network namespace is `ns` (found by inode under /proc).
fn kill_netns(ns: &str) -> Result<(), SimError> {
    let Ok(target) = std::fs::metadata(Path::new("/var/run/netns").join(ns)) else {
        return Ok(());
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(());
    };
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(m) = std::fs::metadata(entry.path().join("ns/net"))
            && m.ino() == target.ino()
            && m.dev() == target.dev()
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    Ok(())
}

/// rmdir bottom-up; a just-emptied cgroup can be busy for a moment, so retry briefly.
fn remove_cgroup_tree(dir: &Path) -> Result<(), SimError> {
    if !dir.exists() {
        return Ok(());
    }
    for sub in subdirs(dir) {
        remove_cgroup_tree(&sub)?;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(SimError::io("removing cgroup", dir, e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The pid that created `name` (`...-<pid>-<n>`), if it follows the naming scheme.
fn creator_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut fields = rest.rsplit('-');
    let (_n, pid) = (fields.next()?, fields.next()?);
    pid.parse().ok().filter(|&p| p > 0)
}

fn is_dead(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

/// Removes what simulated nodes of dead processes left behind; returns what it removed.
/// Objects of live processes (concurrent runs) and names outside the scheme are left alone.
pub fn sweep_stale() -> Vec<String> {
    let stale = |name: &str| creator_pid(name).is_some_and(is_dead);
    let list = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|es| {
                es.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.starts_with(PREFIX) && stale(n))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut removed = Vec::new();
    for ns in list(Path::new("/var/run/netns")) {
        if kill_netns(&ns)
            .and_then(|()| ip(&["netns", "del", &ns]).map(drop))
            .is_ok()
        {
            removed.push(format!("netns {ns}"));
        }
    }
    let cgroups = cgroup2_root();
    for name in list(&cgroups) {
        let dir = cgroups.join(&name);
        if kill_cgroup(&dir)
            .and_then(|()| remove_cgroup_tree(&dir))
            .is_ok()
        {
            removed.push(dir.display().to_string());
        }
    }
    for root in [Path::new(BPFFS_ROOT).to_path_buf(), std::env::temp_dir()] {
        for name in list(&root) {
            let path = root.join(&name);
            if std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path.display().to_string());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_follows_the_naming_scheme() {
        assert_eq!(creator_pid("nodemesh-sim-capture-1234-0"), Some(1234));
        assert_eq!(creator_pid("nodemesh-sim-capture.web-1-1234-7"), Some(1234));
        assert_eq!(creator_pid("nodemesh-sim-nopid"), None);
        assert_eq!(creator_pid("other-1234-0"), None);
    }
}
