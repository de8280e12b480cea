//! The watcher: pods of this node and namespaces' labels, from the API server into the
//! registry.
//!
//! Thin on purpose. kube-rs's `watcher` does list + watch, resumes from the last
//! `resourceVersion`, relists when the server says the version is too old (410), and backs
//! off on errors; this module turns its events into registry calls:
//!
//! - a pod with an address, not `hostNetwork`, not finished, whose cgroup and a process
//!   are found on the node ([`crate::discover`]) → `Registry::add_pod` (skipped when the
//!   registry already has exactly that pod, so a relist or an agent restart changes
//!   nothing, and established connections are never touched);
//! - a pod not found yet (containers still starting) waits in `pending` and is retried
//!   every `retry_interval` and on its next event;
//! - a deleted or finished pod → `Registry::remove_pod` (its map entry goes);
//! - a namespace's labels → `Registry::set_namespace_labels` (the selector decides);
//! - after a complete (re)list, pods and namespaces the registry knows but the list did not
//!   have are removed: what happened while the agent was not watching is reconciled.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use nodemesh_workloads::{PodMapWriter, Registry, RegistryError, pod::PodSpec};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::discover::{self, Qos};

/// What the watcher needs to know about the node.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// kubelet's pods cgroup (`kubepods.slice` or `kubepods`), where pods are looked for.
    pub kubepods_cgroup: PathBuf,
    /// The host's /proc.
    pub proc_path: PathBuf,
    /// How often pods not found on the node yet are looked for again.
    pub retry_interval: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    kind: &'static str,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: &'static str,
}

/// The watcher's metrics: events by kind, errors by reason, pods waiting to be found.
#[derive(Debug, Default, Clone)]
pub struct SourceMetrics {
    events: Family<EventLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    pending: Gauge,
}

impl SourceMetrics {
    pub fn register(metrics: &mut Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "nodemesh_kube_events",
            "Kubernetes watch events handled, by kind (pod, namespace) and event",
            m.events.clone(),
        );
        metrics.register(
            "nodemesh_kube_errors",
            "Kubernetes pod source errors by reason (watch, bad_object, registry)",
            m.errors.clone(),
        );
        metrics.register(
            "nodemesh_kube_pending_pods",
            "Pods of this node whose cgroup or processes are not found on the node yet",
            m.pending.clone(),
        );
        m
    }

    /// Pods of this node waiting to be found on the node.
    pub fn pending_pods(&self) -> i64 {
        self.pending.get()
    }

    fn event(&self, kind: &'static str, event: &'static str) {
        self.events
            .get_or_create(&EventLabels { kind, event })
            .inc();
    }

    fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { reason }).inc();
    }
}

type Key = (String, String);

struct Source<M> {
    cfg: SourceConfig,
    registry: Arc<Mutex<Registry<M>>>,
    metrics: SourceMetrics,
    /// Pods of this node that could not be registered yet, with the last object seen.
    pending: BTreeMap<Key, Pod>,
    /// During a (re)list: the pods / namespaces listed so far.
    listing_pods: Option<BTreeSet<Key>>,
    listing_namespaces: Option<BTreeSet<String>>,
}

/// Watches until the streams end (they do not: the watcher retries with backoff).
pub async fn run<M: PodMapWriter + 'static>(
    client: Client,
    cfg: SourceConfig,
    registry: Arc<Mutex<Registry<M>>>,
    metrics: SourceMetrics,
) {
    let selector = format!("spec.nodeName={}", cfg.node_name);
    let pods: BoxStream<'static, _> = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&selector),
    )
    .default_backoff()
    .boxed();
    let namespaces: BoxStream<'static, _> =
        watcher(Api::<Namespace>::all(client), watcher::Config::default())
            .default_backoff()
            .boxed();
    info!(node = %cfg.node_name, kubepods = %cfg.kubepods_cgroup.display(), "watching the node's pods and the namespaces");
    let mut retry = tokio::time::interval(cfg.retry_interval);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut source = Source {
        cfg,
        registry,
        metrics,
        pending: BTreeMap::new(),
        listing_pods: None,
        listing_namespaces: None,
    };
    let (mut pods, mut namespaces) = (pods, namespaces);
    loop {
        tokio::select! {
            Some(ev) = namespaces.next() => match ev {
                Ok(ev) => source.namespace_event(ev).await,
                Err(e) => source.watch_error("namespaces", &e),
            },
            Some(ev) = pods.next() => match ev {
                Ok(ev) => source.pod_event(ev).await,
                Err(e) => source.watch_error("pods", &e),
            },
            _ = retry.tick() => source.retry_pending().await,
            else => break,
        }
    }
}

impl<M: PodMapWriter + 'static> Source<M> {
    fn watch_error(&self, what: &str, e: &watcher::Error) {
        self.metrics.error("watch");
        warn!(watch = what, error = %e, "Kubernetes watch failed; retrying with backoff");
    }

    async fn namespace_event(&mut self, ev: watcher::Event<Namespace>) {
        match ev {
            watcher::Event::Init => {
                self.metrics.event("namespace", "init");
                self.listing_namespaces = Some(BTreeSet::new());
            }
            watcher::Event::InitApply(ns) | watcher::Event::Apply(ns) => {
                self.metrics.event("namespace", "apply");
                let Some(name) = ns.metadata.name.clone() else {
                    self.metrics.error("bad_object");
                    return warn!("a namespace without a name; ignored");
                };
                if let Some(seen) = &mut self.listing_namespaces {
                    seen.insert(name.clone());
                }
                self.set_labels(&name, ns.metadata.labels.unwrap_or_default())
                    .await;
            }
            watcher::Event::Delete(ns) => {
                self.metrics.event("namespace", "delete");
                if let Some(name) = ns.metadata.name {
                    self.set_labels(&name, BTreeMap::new()).await;
                }
            }
            watcher::Event::InitDone => {
                self.metrics.event("namespace", "init_done");
                let Some(seen) = self.listing_namespaces.take() else {
                    return;
                };
                let gone: Vec<String> = {
                    let registry = self.registry.lock().await;
                    registry
                        .namespaces()
                        .iter()
                        .filter(|(n, labels)| !seen.contains(*n) && !labels.is_empty())
                        .map(|(n, _)| n.clone())
                        .collect()
                };
                for name in gone {
                    self.set_labels(&name, BTreeMap::new()).await;
                }
            }
        }
    }

    async fn set_labels(&self, namespace: &str, labels: BTreeMap<String, String>) {
        let mut registry = self.registry.lock().await;
        if registry.namespaces().get(namespace) == Some(&labels)
            || (labels.is_empty() && !registry.namespaces().contains_key(namespace))
        {
            return;
        }
        if let Err(e) = registry.set_namespace_labels(namespace, labels) {
            self.metrics.error("registry");
            warn!(namespace, error = %e, "namespace labels refused by the registry");
        }
    }

    async fn pod_event(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => {
                self.metrics.event("pod", "init");
                self.listing_pods = Some(BTreeSet::new());
            }
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                self.metrics.event("pod", "apply");
                let Some(key) = key_of(&pod) else {
                    self.metrics.error("bad_object");
                    return warn!("a pod without a name or namespace; ignored");
                };
                if let Some(seen) = &mut self.listing_pods {
                    seen.insert(key.clone());
                }
                self.apply_pod(key, pod).await;
            }
            watcher::Event::Delete(pod) => {
                self.metrics.event("pod", "delete");
                if let Some(key) = key_of(&pod) {
                    self.pending.remove(&key);
                    self.remove(&key, "deleted").await;
                }
            }
            watcher::Event::InitDone => {
                self.metrics.event("pod", "init_done");
                let Some(seen) = self.listing_pods.take() else {
                    return;
                };
                self.pending.retain(|k, _| seen.contains(k));
                let gone: Vec<Key> = {
                    let registry = self.registry.lock().await;
                    registry
                        .list(None)
                        .iter()
                        .map(|p| (p.spec.namespace.clone(), p.spec.name.clone()))
                        .filter(|k| !seen.contains(k))
                        .collect()
                };
                for key in gone {
                    self.remove(&key, "not on this node any more").await;
                }
            }
        }
        self.metrics.pending.set(self.pending.len() as i64);
    }

    async fn retry_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for (key, pod) in pending {
            self.apply_pod(key, pod).await;
        }
        self.metrics.pending.set(self.pending.len() as i64);
    }

    async fn apply_pod(&mut self, key: Key, pod: Pod) {
        let (namespace, name) = (&key.0, &key.1);
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            // Shares the node's network namespace: not a pod the mesh can tell apart.
            debug!(pod = %name, namespace = %namespace, "hostNetwork pod: not meshed");
            self.pending.remove(&key);
            return;
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            self.pending.remove(&key);
            return self.remove(&key, phase).await;
        }
        let ips = pod_ips(&pod);
        if ips.is_empty() {
            self.pending.insert(key, pod);
            return;
        }
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let qos = status
            .and_then(|s| s.qos_class.as_deref())
            .and_then(Qos::from_api);
        let found = match discover::find_pod(
            &self.cfg.kubepods_cgroup,
            &self.cfg.proc_path,
            uid,
            qos,
        ) {
            Ok(found) => found,
            Err(e @ discover::DiscoverError::BadUid(_)) => {
                self.metrics.error("bad_object");
                self.pending.remove(&key);
                return warn!(pod = %name, namespace = %namespace, error = %e, "pod ignored");
            }
            Err(e) => {
                debug!(pod = %name, namespace = %namespace, error = %e, "pod not on the node yet; will look again");
                self.pending.insert(key, pod);
                return;
            }
        };
        let new = PodSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips: ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .collect(),
            netns_path: found.netns,
            cgroup_path: found.cgroup,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            workload: String::new(),
        };
        let mut registry = self.registry.lock().await;
        let current = registry
            .list(Some(namespace))
            .into_iter()
            .find(|p| p.spec.name == *name);
        if let Some(current) = current
            && same_pod(&current.spec, &new)
        {
            self.pending.remove(&key);
            return;
        }
        // The registry validates the whole pod (names, labels, addresses, the cgroup under
        // the attach point) exactly as for the local API.
        let api_pod = nodemesh_workloads::pod::PodSpec::to_api(&new);
        match registry.add_api_pod(Some(api_pod)) {
            Ok(info) => {
                self.pending.remove(&key);
                info!(pod = %name, namespace = %namespace, id = info.id, enabled = info.enabled, netns = %new.netns_path.display(), "pod from Kubernetes registered");
            }
            Err(e @ RegistryError::Invalid(_)) => {
                self.metrics.error("registry");
                self.pending.remove(&key);
                warn!(pod = %name, namespace = %namespace, error = %e, "pod refused by the registry");
            }
            Err(e) => {
                // Conflicts (an address still held by a pod whose deletion is not seen yet)
                // and full maps may clear: look again later.
                self.metrics.error("registry");
                warn!(pod = %name, namespace = %namespace, error = %e, "pod refused by the registry; will try again");
                self.pending.insert(key, pod);
            }
        }
    }

    async fn remove(&self, key: &Key, why: &str) {
        let mut registry = self.registry.lock().await;
        match registry.remove_pod(&key.0, &key.1) {
            Ok(true) => info!(pod = %key.1, namespace = %key.0, why, "pod removed"),
            Ok(false) => {}
            Err(e) => {
                self.metrics.error("registry");
                warn!(pod = %key.1, namespace = %key.0, error = %e, "could not remove a pod");
            }
        }
    }
}

fn key_of(pod: &Pod) -> Option<Key> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

/// `status.podIPs`, else `status.podIP`.
fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.clone()).collect(),
        _ => status.pod_ip.clone().into_iter().collect(),
    }
}

/// Whether re-registering would change nothing. The network namespace path names one
/// process of the pod; another process of the same pod is the same namespace, so a changed
/// path alone counts only when the registered one is gone.
fn same_pod(current: &PodSpec, new: &PodSpec) -> bool {
    let netns_same = current.netns_path == new.netns_path || current.netns_path.exists();
    netns_same
        && PodSpec {
            netns_path: new.netns_path.clone(),
            ..current.clone()
        } == *new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "status": status,
        }))
        .expect("pod")
    }

    #[test]
    fn addresses_come_from_pod_ips_then_pod_ip() {
        let both = pod(serde_json::json!({
            "podIP": "198.18.0.2",
            "podIPs": [{"ip": "198.18.0.2"}, {"ip": "2001:db8::2"}],
        }));
        assert_eq!(pod_ips(&both), ["198.18.0.2", "2001:db8::2"]);
        let old_style = pod(serde_json::json!({"podIP": "198.18.0.3"}));
        assert_eq!(pod_ips(&old_style), ["198.18.0.3"]);
        assert!(pod_ips(&pod(serde_json::json!({"phase": "Pending"}))).is_empty());
        assert_eq!(key_of(&both), Some(("shop".into(), "web".into())));
    }

    #[test]
    fn a_pod_is_the_same_unless_something_but_a_live_netns_path_changed() {
        let spec = PodSpec {
            name: "web".into(),
            namespace: "shop".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ips: vec!["198.18.0.2".parse().expect("ip")],
            netns_path: "/proc/self/ns/net".into(),
            cgroup_path: "/sys/fs/cgroup/kubepods.slice/x".into(),
            service_account: "web".into(),
            workload: String::new(),
        };
        let other_process = PodSpec {
            netns_path: "/proc/1/ns/net".into(),
            ..spec.clone()
        };
        assert!(same_pod(&spec, &spec));
        // The registered path still names a live process: same namespace, nothing to do.
        assert!(same_pod(&spec, &other_process));
        // The registered process is gone: register again with the new one.
        let gone = PodSpec {
            netns_path: "/proc/nonexistent/ns/net".into(),
            ..spec.clone()
        };
        assert!(!same_pod(&gone, &spec));
        let relabelled = PodSpec {
            labels: [("app".to_owned(), "api".to_owned())].into(),
            ..spec.clone()
        };
        assert!(!same_pod(&spec, &relabelled));
    }
}
