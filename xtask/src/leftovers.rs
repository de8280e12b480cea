//! What the node tests leave in the kernel when they crash: network namespaces, cgroups,
//! bpffs pins and programs attached to those cgroups, all named `nodemesh-sim-<label>-<pid>-<n>`
//! by the `nodemesh-simnode` fixture (`<pid>` is the creating process), and the podman
//! containers of the image tests, `nmimg-<label>-<pid>-<n>` (`tests/src/container.rs`).
//!
//! One listing serves both the sweep before the node tests (remove what dead runs left) and
//! the check after them (fail if this run left anything). An entry whose creator is still
//! alive belongs to a concurrent run and is never touched; a name without a pid is not ours.
//!
//! This is deliberately a small copy of the fixture's own knowledge (its `sweep_stale()`)
//! so that xtask does not depend on the crates it builds and tests.
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util;

/// The prefix of every kernel object a node test creates.
pub const PREFIX: &str = "nodemesh-sim-";
/// The prefix of the image tests' containers.
pub const CONTAINER_PREFIX: &str = "nmimg-";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Netns,
    Cgroup,
    BpffsPin,
    /// A BPF program attached to (a cgroup below) a `nodemesh-sim-*` cgroup.
    CgroupAttachment,
    /// A podman container of the image tests.
    Container,
}

/// Who made a leftover, from the pid in its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The creator is gone: the leftover is stale.
    Dead(u32),
    /// The creator still runs: a concurrent run's, not to be touched.
    Alive(u32),
    /// No pid in the name: not made by the fixture, not ours.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Leftover {
    pub kind: Kind,
    /// The netns name, or the path in cgroupfs or bpffs.
    pub location: String,
    pub owner: Owner,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Netns => "netns",
            Kind::Cgroup => "cgroup",
            Kind::BpffsPin => "bpffs",
            Kind::CgroupAttachment => "attached bpf program(s) on",
            Kind::Container => "container",
        };
        let owner = match self.owner {
            Owner::Dead(pid) => format!("creator pid {pid} gone"),
            Owner::Alive(pid) => format!("creator pid {pid} alive"),
            Owner::Unknown => "no creator pid in the name".into(),
        };
        write!(f, "{kind} {} ({owner})", self.location)
    }
}

/// Where to look. [`Places::system`] is the machine's; tests point at temporary folders.
#[derive(Debug, Clone)]
pub struct Places {
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
    /// Query `ip netns` and `bpftool` (the machine's global state).
    pub system_tools: bool,
}

impl Places {
    pub fn system() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified"),
            bpffs_root: PathBuf::from("/sys/fs/bpf"),
            system_tools: true,
        }
    }
}

/// The pid of the process that created `name` (`nodemesh-sim-<label>-<pid>-<n>`): the
/// second-to-last `-`-separated field. `None` for anything not in that shape.
pub fn creator_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(PREFIX)
        .or_else(|| name.strip_prefix(CONTAINER_PREFIX))?;
    let mut fields = rest.rsplit('-');
    let (_n, pid) = (fields.next()?, fields.next()?);
    pid.parse().ok().filter(|&pid| pid > 0)
}

fn owner_of(name: &str) -> Owner {
    match creator_pid(name) {
        None => Owner::Unknown,
        // ESRCH is the only proof of death; EPERM means it exists under another user.
        Some(pid) => match kill(Pid::from_raw(pid as i32), None) {
            Err(Errno::ESRCH) => Owner::Dead(pid),
            _ => Owner::Alive(pid),
        },
    }
}

/// Every `nodemesh-sim-*` object on the machine, whoever made it.
pub fn list(places: &Places) -> anyhow::Result<Vec<Leftover>> {
    let mut found = Vec::new();
    if places.system_tools {
        let netns = util::stdout(Command::new("ip").args(["netns", "list"]))
            .context("cannot list network namespaces (iproute2 is installed by setup)")?;
        for name in parse_netns_list(&netns) {
            found.push(Leftover {
                kind: Kind::Netns,
                owner: owner_of(&name),
                location: name,
            });
        }
    }
    for (kind, root) in [
        (Kind::Cgroup, &places.cgroup_root),
        (Kind::BpffsPin, &places.bpffs_root),
    ] {
        for (name, path) in prefixed_entries(root)? {
            found.push(Leftover {
                kind,
                owner: owner_of(&name),
                location: path.display().to_string(),
            });
        }
    }
    if places.system_tools && find_in_path("bpftool") {
        let out = util::output(
            Command::new("bpftool")
                .args(["cgroup", "tree"])
                .arg(&places.cgroup_root),
        )?;
        if !out.status.success() {
            // A concurrent test removing its cgroup mid-walk makes bpftool complain; what it
            // printed is still worth checking, so report and go on.
            println!(
                "    note: `bpftool cgroup tree` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for (path, owner_name) in parse_cgroup_tree(&String::from_utf8_lossy(&out.stdout)) {
            found.push(Leftover {
                kind: Kind::CgroupAttachment,
                owner: owner_of(&owner_name),
                location: path,
            });
        }
    }
    if places.system_tools && find_in_path("podman") {
        let names =
            util::stdout(Command::new("podman").args(["ps", "--all", "--format", "{{.Names}}"]))
                .context("cannot list podman containers")?;
        for name in names.lines().filter(|n| n.starts_with(CONTAINER_PREFIX)) {
            found.push(Leftover {
                kind: Kind::Container,
                owner: owner_of(name),
                location: name.to_owned(),
            });
        }
    }
    found.sort_by(|a, b| (a.kind, &a.location).cmp(&(b.kind, &b.location)));
    Ok(found)
}

/// Removes the leftovers whose creator is dead; returns what was removed. Processes still
/// running inside a stale cgroup or netns (servers of a crashed test) are killed first, by
/// pid. Attachments go away with their cgroup.
pub fn sweep(leftovers: &[Leftover]) -> anyhow::Result<Vec<String>> {
    let stale = |kind| {
        leftovers
            .iter()
            .filter(move |l| l.kind == kind && matches!(l.owner, Owner::Dead(_)))
    };
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    let mut note = |what: &Leftover, result: anyhow::Result<()>| match result {
        Ok(()) => removed.push(what.to_string()),
        Err(e) => failed.push(format!("{what}: {e:#}")),
    };
    // First: a stale agent container holds pins and attachments of its node.
    for l in stale(Kind::Container) {
        note(
            l,
            util::stdout(Command::new("podman").args([
                "rm",
                "--force",
                "--time",
                "0",
                &l.location,
            ]))
            .map(drop),
        );
    }
    for l in stale(Kind::Cgroup) {
        if let Err(e) = kill_cgroup(Path::new(&l.location)) {
            println!("    note: {l}: {e:#}");
        }
    }
    for l in stale(Kind::Netns) {
        kill_netns_pids(&l.location);
    }
    for l in stale(Kind::BpffsPin) {
        note(l, remove_bpffs(Path::new(&l.location)));
    }
    for l in stale(Kind::Cgroup) {
        note(l, remove_cgroup_tree(Path::new(&l.location)));
    }
    for l in stale(Kind::Netns) {
        note(
            l,
            util::stdout(Command::new("ip").args(["netns", "delete", &l.location])).map(drop),
        );
    }
    if !failed.is_empty() {
        bail!("could not remove:\n  {}", failed.join("\n  "));
    }
    Ok(removed)
}

fn prefixed_entries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {}", root.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", root.display()))?;
        if let Ok(name) = entry.file_name().into_string()
            && name.starts_with(PREFIX)
        {
            found.push((name, entry.path()));
        }
    }
    Ok(found)
}

/// `ip netns list` prints `name` or `name (id: N)` per line.
fn parse_netns_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// From `bpftool cgroup tree` output (a cgroup path at column 0, then one indented line per
/// attached program), the paths with programs that lie in a `nodemesh-sim-*` cgroup, each with
/// that cgroup's name (it carries the creator's pid).
fn parse_cgroup_tree(text: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if line.starts_with('/') {
            let path = line.trim();
            current = Path::new(path)
                .components()
                .filter_map(|c| c.as_os_str().to_str())
                .find(|c| c.starts_with(PREFIX))
                .map(|owner| (path.to_owned(), owner.to_owned()));
        } else if !line.trim().is_empty()
            && line.starts_with(char::is_whitespace)
            && let Some(entry) = &current
            && found.last() != Some(entry)
        {
            found.push(entry.clone());
        }
    }
    found
}

/// Kills every process in the cgroup subtree and waits (briefly) until it is empty.
fn kill_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    // cgroup.kill (5.14+) SIGKILLs the whole subtree atomically.
    std::fs::write(cgroup.join("cgroup.kill"), "1")
        .with_context(|| format!("write {}/cgroup.kill", cgroup.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = std::fs::read_to_string(cgroup.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l.trim() == "populated 0") || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_netns_pids(name: &str) {
    let Ok(pids) = util::stdout(Command::new("ip").args(["netns", "pids", name])) else {
        return;
    };
    let me = std::process::id();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        if pid != me && pid > 1 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn remove_bpffs(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.with_context(|| format!("remove {}", path.display()))
}

/// Removes a cgroup and its descendants, deepest first (only empty cgroups can be removed;
/// their control files go with them).
fn remove_cgroup_tree(cgroup: &Path) -> anyhow::Result<()> {
    let children = std::fs::read_dir(cgroup)
        .with_context(|| format!("list {}", cgroup.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path());
    for child in children {
        remove_cgroup_tree(&child)?;
    }
    std::fs::remove_dir(cgroup).with_context(|| format!("rmdir {}", cgroup.display()))
}

fn find_in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests;
