//! Pods laid out on a simulated node the way kubelet and containerd lay them out: the
//! pod's cgroup named after its UID and QoS class (systemd or cgroupfs driver), a container
//! cgroup in it, and a process in that container inside the pod's network namespace. What
//! the Kubernetes pod source (`nodemesh-kube`'s `discover`) must find.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use nodemesh_simnode::{Pod, Process, SimNode};

/// Pods laid out as kubelet lays them out; dropping it kills their processes, then removes
/// the cgroups (deepest first), before the node itself goes.
#[derive(Debug, Default)]
pub struct Kubelet {
    procs: Vec<Process>,
    /// Directories created, removed in reverse order on drop.
    pub dirs: Vec<PathBuf>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for mut p in self.procs.drain(..) {
            let _ = p.kill();
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Layout {
    Systemd,
    Cgroupfs,
}

/// A pod as kubelet and the runtime name it: UID, QoS class, container id.
#[derive(Debug)]
pub struct Spec<'a> {
    pub layout: Layout,
    pub uid: &'a str,
    pub qos: &'a str,
    pub container: &'a str,
}

impl Kubelet {
    /// Creates `pod`'s cgroup below `root` (the kubepods cgroup) as kubelet does for `uid`
    /// and `qos`, a container cgroup in it as containerd does, and a process in that
    /// container inside the pod's network namespace. Returns the pod-level cgroup.
    pub fn start(
        &mut self,
        sim: &SimNode,
        pod: &Pod,
        root: &Path,
        spec: Spec<'_>,
    ) -> anyhow::Result<PathBuf> {
        let Spec {
            layout,
            uid,
            qos,
            container: container_id,
        } = spec;
        let u = uid.replace('-', "_");
        let q = qos.to_ascii_lowercase();
        let (parts, container): (Vec<String>, String) = match (layout, qos) {
            (Layout::Systemd, "Guaranteed") => (
                vec![format!("kubepods-pod{u}.slice")],
                format!("cri-containerd-{container_id}.scope"),
            ),
            (Layout::Systemd, _) => (
                vec![
                    format!("kubepods-{q}.slice"),
                    format!("kubepods-{q}-pod{u}.slice"),
                ],
                format!("cri-containerd-{container_id}.scope"),
            ),
            (Layout::Cgroupfs, "Guaranteed") => (vec![format!("pod{uid}")], container_id.into()),
            (Layout::Cgroupfs, _) => (vec![q, format!("pod{uid}")], container_id.into()),
        };
        let mut dir = root.to_owned();
        for part in std::iter::once(String::new()).chain(parts) {
            if !part.is_empty() {
                dir = dir.join(part);
            }
            if !dir.exists() {
                std::fs::create_dir(&dir).with_context(|| format!("{}", dir.display()))?;
                self.dirs.push(dir.clone());
            }
        }
        let pod_cgroup = dir.clone();
        let container = dir.join(container);
        std::fs::create_dir(&container)?;
        self.dirs.push(container.clone());
        let mut cmd = Command::new("sleep");
        cmd.arg("300");
        let in_container = Pod {
            cgroup: container,
            ..pod.clone()
        };
        self.procs.push(sim.spawn_in_pod(&in_container, cmd)?);
        Ok(pod_cgroup)
    }
}
