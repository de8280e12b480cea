//! From a pod's UID to its cgroup and network namespace on this node.
//!
//! kubelet names a pod's cgroup after its UID and QoS class, in one of two layouts chosen
//! by its cgroup driver (`--cgroup-driver`):
//!
//! | QoS | systemd (root `kubepods.slice`) | cgroupfs (root `kubepods`) |
//! |---|---|---|
//! | Guaranteed | `kubepods-pod<uid_>.slice` | `pod<uid>` |
//! | Burstable | `kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `burstable/pod<uid>` |
//! | BestEffort | `kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` | `besteffort/pod<uid>` |
//!
//! (`uid_` is the UID with `-` replaced by `_`, as systemd unit names need.) The container
//! runtime puts each container in a child of that directory (`cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, or `<id>` with cgroupfs), the sandbox ("pause") container included.
//! Every container of a pod shares the pod's network namespace, so any process found in
//! the pod's cgroup tree gives it: `<proc>/<pid>/ns/net`. The driver is told by the root's
//! name: a root ending in `.slice` is systemd's.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// A pod's QoS class (`status.qosClass`), which picks its cgroup's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// `status.qosClass` as the API writes it; `None` for anything else.
    pub fn from_api(class: &str) -> Option<Self> {
        match class {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }
}

/// kubelet's cgroup driver, as seen from the pods' root cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl Driver {
    pub fn of_root(root: &Path) -> Self {
        match root.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.ends_with(".slice") => Self::Systemd,
            _ => Self::Cgroupfs,
        }
    }
}

/// The pod's cgroup directory as kubelet names it, below `root` (the `kubepods` cgroup).
pub fn pod_cgroup(root: &Path, driver: Driver, uid: &str, qos: Qos) -> PathBuf {
    match driver {
        Driver::Systemd => {
            let uid = uid.replace('-', "_");
            match qos {
                Qos::Guaranteed => root.join(format!("kubepods-pod{uid}.slice")),
                Qos::Burstable => root
                    .join("kubepods-burstable.slice")
                    .join(format!("kubepods-burstable-pod{uid}.slice")),
                Qos::BestEffort => root
                    .join("kubepods-besteffort.slice")
                    .join(format!("kubepods-besteffort-pod{uid}.slice")),
            }
        }
        Driver::Cgroupfs => match qos {
            Qos::Guaranteed => root.join(format!("pod{uid}")),
            Qos::Burstable => root.join("burstable").join(format!("pod{uid}")),
            Qos::BestEffort => root.join("besteffort").join(format!("pod{uid}")),
        },
    }
}

/// Where a pod lives on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pod's cgroup (kubelet's pod-level directory).
    pub cgroup: PathBuf,
    /// `<proc>/<pid>/ns/net` of a process of the pod.
    pub netns: PathBuf,
    pub pid: u32,
}

/// Why a pod was not found (yet): most often its containers have not started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoverError {
    #[error("no cgroup for pod {uid} under {root} (looked for {looked})")]
    NoCgroup {
        uid: String,
        root: PathBuf,
        looked: String,
    },
    #[error("no process in the cgroup {0} yet")]
    NoProcess(PathBuf),
    #[error("pod UID {0:?} is not a UID")]
    BadUid(String),
}

/// Finds the pod with `uid` under `root`, with `qos` when the API said (else every class
/// is tried), and a process of it in `proc` (the host's /proc).
pub fn find_pod(
    root: &Path,
    proc: &Path,
    uid: &str,
    qos: Option<Qos>,
) -> Result<Found, DiscoverError> {
    // A UID goes into a path: only hex digits and dashes, or it could climb out of `root`.
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(DiscoverError::BadUid(uid.to_owned()));
    }
    let driver = Driver::of_root(root);
    let classes = match qos {
        Some(q) => vec![q],
        None => vec![Qos::Guaranteed, Qos::Burstable, Qos::BestEffort],
    };
    let candidates: Vec<PathBuf> = classes
        .into_iter()
        .map(|q| pod_cgroup(root, driver, uid, q))
        .collect();
    let Some(cgroup) = candidates.iter().find(|c| c.is_dir()).cloned() else {
        return Err(DiscoverError::NoCgroup {
            uid: uid.to_owned(),
            root: root.to_owned(),
            looked: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mut pids = Vec::new();
    collect_pids(&cgroup, 3, &mut pids);
    // The lowest pid is usually the sandbox's, started first; any of them would do.
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        let netns = proc.join(pid.to_string()).join("ns").join("net");
        if fs::metadata(&netns).is_ok() {
            return Ok(Found { cgroup, netns, pid });
        }
    }
    Err(DiscoverError::NoProcess(cgroup))
}

/// Pids in `dir`'s `cgroup.procs` and its children's, `depth` levels down. A pid of 0 is
/// one the reader's pid namespace cannot see (an agent without `hostPID`): skipped.
fn collect_pids(dir: &Path, depth: u32, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .filter(|p| *p != 0),
        );
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), depth - 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6d1f7b3c-2a8e-4c1b-9e0f-3b6a5d4c2e1f";

    #[test]
    fn kubelet_names_for_both_drivers() {
        let sd = Path::new("/sys/fs/cgroup/kubepods.slice");
        assert_eq!(Driver::of_root(sd), Driver::Systemd);
        assert_eq!(
            pod_cgroup(sd, Driver::Systemd, UID, Qos::Burstable),
            sd.join("kubepods-burstable.slice/kubepods-burstable-pod6d1f7b3c_2a8e_4c1b_9e0f_3b6a5d4c2e1f.slice")
        );
        assert_eq!(
            pod_cgroup(sd, Driver::Systemd, UID, Qos::Guaranteed),
            sd.join("kubepods-pod6d1f7b3c_2a8e_4c1b_9e0f_3b6a5d4c2e1f.slice")
        );
        let fs = Path::new("/sys/fs/cgroup/kubepods");
        assert_eq!(Driver::of_root(fs), Driver::Cgroupfs);
        assert_eq!(
            pod_cgroup(fs, Driver::Cgroupfs, UID, Qos::BestEffort),
            fs.join(format!("besteffort/pod{UID}"))
        );
        assert_eq!(
            pod_cgroup(fs, Driver::Cgroupfs, UID, Qos::Guaranteed),
            fs.join(format!("pod{UID}"))
        );
    }

    #[test]
    fn a_uid_cannot_name_another_path() {
        assert_eq!(
            find_pod(
                Path::new("/nonexistent"),
                Path::new("/proc"),
                "../../x",
                None
            ),
            Err(DiscoverError::BadUid("../../x".into()))
        );
        assert!(matches!(
            find_pod(Path::new("/nonexistent"), Path::new("/proc"), UID, None),
            Err(DiscoverError::NoCgroup { .. })
        ));
    }
}
