//! A pod as the registry knows it: the validated request ([`PodSpec`]) and what the agent
//! derived from it ([`PodInfo`]).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use nodemesh_api::registry as api;
use serde::{Deserialize, Serialize};

use crate::{RegistryError, netns::Netns};

/// Pod label that takes a pod out of the mesh even when its namespace is in.
pub const POD_OPT_OUT_LABEL: &str = "nodemesh.io/acceleration";
/// The value of [`POD_OPT_OUT_LABEL`] that opts out.
pub const POD_OPT_OUT_VALUE: &str = "disabled";

/// A pod request that passed the shape checks (names, labels, addresses, absolute paths).
/// Checks against the node (the namespace file, the cgroup) happen in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub netns_path: PathBuf,
    pub cgroup_path: PathBuf,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub workload: String,
}

impl PodSpec {
    /// Validates an API pod. Every problem is reported, not just the first.
    pub fn from_api(pod: api::Pod) -> Result<Self, RegistryError> {
        let mut problems = Vec::new();
        check_dns_label("name", &pod.name, &mut problems);
        check_dns_label("namespace", &pod.namespace, &mut problems);
        for (k, v) in &pod.labels {
            check_label(k, v, &mut problems);
        }
        let mut ips = Vec::new();
        for ip in &pod.ips {
            match ip.parse::<IpAddr>() {
                Ok(ip) if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() => {
                    problems.push(format!("ips: {ip} cannot be a pod address"));
                }
                Ok(ip) if ips.contains(&ip) => problems.push(format!("ips: {ip} listed twice")),
                Ok(ip) => ips.push(ip),
                Err(_) => problems.push(format!("ips: {ip:?} is not an IP address")),
            }
        }
        if !ips.iter().any(IpAddr::is_ipv4) && !pod.ips.is_empty() {
            problems.push("ips: at least one IPv4 address is required".into());
        }
        if pod.ips.is_empty() {
            problems.push("ips: at least one address is required".into());
        }
        for (field, path) in [
            ("netns_path", &pod.netns_path),
            ("cgroup_path", &pod.cgroup_path),
        ] {
            if path.is_empty() {
                problems.push(format!("{field}: required"));
            } else if !Path::new(path).is_absolute() {
                problems.push(format!("{field}: {path:?} must be an absolute path"));
            }
        }
        if !pod.service_account.is_empty() {
            check_dns_subdomain("service_account", &pod.service_account, &mut problems);
        }
        if !pod.workload.is_empty() {
            check_dns_subdomain("workload", &pod.workload, &mut problems);
        }
        if !problems.is_empty() {
            return Err(RegistryError::Invalid(problems));
        }
        Ok(Self {
            name: pod.name,
            namespace: pod.namespace,
            labels: pod.labels.into_iter().collect(),
            ips,
            netns_path: pod.netns_path.into(),
            cgroup_path: pod.cgroup_path.into(),
            service_account: pod.service_account,
            workload: pod.workload,
        })
    }

    pub fn to_api(&self) -> api::Pod {
        api::Pod {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone().into_iter().collect(),
            ips: self.ips.iter().map(ToString::to_string).collect(),
            netns_path: self.netns_path.display().to_string(),
            cgroup_path: self.cgroup_path.display().to_string(),
            service_account: self.service_account.clone(),
            workload: self.workload.clone(),
        }
    }

    /// The name metrics use: the explicit workload, else the usual app labels, else the pod.
    pub fn workload_name(&self) -> &str {
        if !self.workload.is_empty() {
            return &self.workload;
        }
        ["app.kubernetes.io/name", "app"]
            .iter()
            .find_map(|k| self.labels.get(*k))
            .map_or(&self.name, |v| v)
    }

    /// Whether the pod opted out with its own label.
    pub fn opted_out(&self) -> bool {
        self.labels
            .get(POD_OPT_OUT_LABEL)
            .is_some_and(|v| v == POD_OPT_OUT_VALUE)
    }
}

/// A registered pod with everything the data path needs.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// The agent's handle, stable for the pod's life and across agent restarts.
    pub id: u32,
    pub spec: PodSpec,
    /// The pod's network namespace, kept open: upstream sockets are created in it.
    pub netns: Arc<Netns>,
    /// Whether the mesh handles the pod's new connections.
    pub enabled: bool,
}

impl PodInfo {
    pub fn netns_cookie(&self) -> u64 {
        self.netns.cookie()
    }

    pub fn workload(&self) -> &str {
        self.spec.workload_name()
    }

    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    pub fn status(&self) -> api::PodStatus {
        api::PodStatus {
            pod: Some(self.spec.to_api()),
            enabled: self.enabled,
            netns_cookie: self.netns_cookie(),
            pod_id: self.id,
        }
    }
}

/// Validates a namespace name and its labels.
pub fn validate_namespace(
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), RegistryError> {
    let mut problems = Vec::new();
    check_dns_label("namespace", namespace, &mut problems);
    for (k, v) in labels {
        check_label(k, v, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RegistryError::Invalid(problems))
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn check_dns_label(field: &str, s: &str, problems: &mut Vec<String>) {
    if !is_dns_label(s) {
        problems.push(format!(
            "{field}: {s:?} must be a DNS-1123 label (lowercase alphanumerics and '-', at most 63)"
        ));
    }
}

fn check_dns_subdomain(field: &str, s: &str, problems: &mut Vec<String>) {
    if s.len() > 253 || !s.split('.').all(is_dns_label) {
        problems.push(format!("{field}: {s:?} must be a DNS-1123 subdomain"));
    }
}

/// `name`, `prefix/name`: what Kubernetes accepts as a label key and value.
fn check_label(key: &str, value: &str, problems: &mut Vec<String>) {
    let name_ok = |s: &str| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
    };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    if !prefix_ok || !name_ok(name) {
        problems.push(format!("labels: {key:?} is not a valid label key"));
    }
    if !value.is_empty() && !name_ok(value) {
        problems.push(format!(
            "labels: value {value:?} of {key:?} is not a valid label value"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> api::Pod {
        api::Pod {
            name: "web-1".into(),
            namespace: "shop".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ips: vec!["198.18.0.2".into()],
            netns_path: "/var/run/netns/web".into(),
            cgroup_path: "/sys/fs/cgroup/unified/pods/web".into(),
            service_account: "web".into(),
            workload: String::new(),
        }
    }

    #[test]
    fn a_good_pod_passes() {
        let spec = PodSpec::from_api(pod()).expect("valid");
        assert_eq!(spec.workload_name(), "web");
        assert!(!spec.opted_out());
        assert_eq!(PodSpec::from_api(spec.to_api()).expect("roundtrip"), spec);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut p = pod();
        p.name = "Web_1".into();
        p.ips = vec!["not-an-ip".into(), "127.0.0.1".into()];
        p.netns_path = "relative/path".into();
        p.labels.insert("bad key!".into(), "v".into());
        let Err(RegistryError::Invalid(problems)) = PodSpec::from_api(p) else {
            panic!("must be invalid");
        };
        let text = problems.join("\n");
        for needle in ["name:", "not an IP", "127.0.0.1", "absolute", "label key"] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn ipv6_only_and_empty_fields_are_rejected() {
        let mut p = pod();
        p.ips = vec!["2001:db8::2".into()];
        p.cgroup_path.clear();
        let Err(RegistryError::Invalid(problems)) = PodSpec::from_api(p) else {
            panic!("must be invalid");
        };
        assert!(problems.iter().any(|s| s.contains("IPv4")));
        assert!(problems.iter().any(|s| s.contains("cgroup_path: required")));
    }

    #[test]
    fn opt_out_label() {
        let mut p = pod();
        p.labels
            .insert(POD_OPT_OUT_LABEL.into(), POD_OPT_OUT_VALUE.into());
        assert!(PodSpec::from_api(p).expect("valid").opted_out());
    }
}
