//! The pod registry: the single writer of the pod map.
//!
//! Requests come from the registry API (and later the Kubernetes watcher). Each one is
//! checked completely before anything changes; then the kernel map is updated *before* the
//! call returns (a pod's first connection must already be captured), the in-memory state
//! is updated, a new immutable [`PodTable`] is published for the data path (readers never
//! lock), and the state file is rewritten for the next agent.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use arc_swap::ArcSwap;
use nodemesh_common::{POD_ACCELERATE, POD_CAPTURE, PodEntry};
use nodemesh_loader::{LoaderError, maps::PodMap};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
};
use tracing::{info, warn};

use crate::{
    RegistryError,
    netns::{self, Netns},
    pod::{PodInfo, PodSpec},
    selector::LabelSelector,
    store::{State, Store, StoredPod},
};

/// Where the registry writes pods: the kernel's pod map.
pub trait PodMapWriter: Send {
    fn upsert(&mut self, netns_cookie: u64, entry: PodEntry) -> Result<(), LoaderError>;
    fn remove(&mut self, netns_cookie: u64) -> Result<(), LoaderError>;
    fn entries(&self) -> Vec<(u64, PodEntry)>;
}

impl PodMapWriter for PodMap {
    fn upsert(&mut self, netns_cookie: u64, entry: PodEntry) -> Result<(), LoaderError> {
        self.insert(netns_cookie, entry)
    }

    fn remove(&mut self, netns_cookie: u64) -> Result<(), LoaderError> {
        PodMap::remove(self, netns_cookie)
    }

    fn entries(&self) -> Vec<(u64, PodEntry)> {
        PodMap::entries(self)
    }
}

/// What the registry needs from the agent configuration.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Namespaces whose labels match get the mesh.
    pub namespace_selector: LabelSelector,
    /// The cgroup the programs are attached to; pods' cgroups must be below it.
    pub attach_cgroup: PathBuf,
    pub max_pods: usize,
    /// Where the state survives restarts; `None` keeps it in memory only.
    pub state_file: Option<PathBuf>,
}

/// The data path's view of the pods: immutable, swapped whole on every change.
#[derive(Debug, Default)]
pub struct PodTable {
    by_cookie: HashMap<u64, Arc<PodInfo>>,
    by_ip: HashMap<IpAddr, Arc<PodInfo>>,
}

impl PodTable {
    /// The pod owning a network namespace.
    pub fn by_netns_cookie(&self, cookie: u64) -> Option<&Arc<PodInfo>> {
        self.by_cookie.get(&cookie)
    }

    /// The pod owning an address (a destination on this node).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<PodInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty()
    }
}

/// A cheap, clonable, lock-free handle on the current [`PodTable`].
pub type SharedPodTable = Arc<ArcSwap<PodTable>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodsLabels {
    enabled: &'static str,
}

#[derive(Debug, Default, Clone)]
struct RegistryMetrics {
    requests: Family<RequestLabels, Counter>,
    pods: Family<PodsLabels, Gauge>,
    persist_errors: Counter,
}

impl RegistryMetrics {
    fn register(&self, metrics: &mut Metrics) {
        metrics.register(
            "nodemesh_registry_requests",
            "Pod registry requests by operation and result (ok, invalid, conflict, full, failed)",
            self.requests.clone(),
        );
        metrics.register(
            "nodemesh_registry_pods",
            "Pods known to the agent",
            self.pods.clone(),
        );
        metrics.register(
            "nodemesh_registry_persist_errors",
            "Failures to write the registry state file",
            self.persist_errors.clone(),
        );
    }
}

/// What [`Registry::restore`] did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    pub restored: usize,
    pub dropped: Vec<String>,
    pub stale_map_entries: usize,
}

/// The registry. Not `Sync` by itself: the agent wraps it in a mutex (writes are rare and
/// never on the data path).
pub struct Registry<M> {
    cfg: RegistryConfig,
    map: M,
    pods: BTreeMap<(String, String), Arc<PodInfo>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    next_id: u32,
    table: SharedPodTable,
    store: Option<Store>,
    home_cookie: u64,
    metrics: RegistryMetrics,
}

impl<M> std::fmt::Debug for Registry<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

fn result_label(r: &Result<impl Sized, RegistryError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(RegistryError::Invalid(_)) => "invalid",
        Err(RegistryError::Conflict(_)) => "conflict",
        Err(RegistryError::Full(_)) => "full",
        Err(RegistryError::Map(_)) => "failed",
    }
}

impl<M: PodMapWriter> Registry<M> {
    pub fn new(cfg: RegistryConfig, map: M, metrics: &mut Metrics) -> std::io::Result<Self> {
        let registry_metrics = RegistryMetrics::default();
        registry_metrics.register(metrics);
        Ok(Self {
            store: cfg.state_file.clone().map(Store::new),
            cfg,
            map,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            next_id: 1,
            table: SharedPodTable::default(),
            home_cookie: netns::home_cookie()?,
            metrics: registry_metrics,
        })
    }

    /// The data path's handle on the pod table.
    pub fn table(&self) -> SharedPodTable {
        self.table.clone()
    }

    /// Reloads the state file of a previous agent and makes the pod map agree with it:
    /// pods whose namespace is gone are dropped, entries nobody owns are removed, enabled
    /// pods are (re)written. Established connections are not touched.
    pub fn restore(&mut self) -> Result<RestoreReport, RegistryError> {
        let mut report = RestoreReport::default();
        let state = match &self.store {
            Some(store) => store.load().unwrap_or_else(|e| {
                warn!(path = %store.path().display(), error = %e, "ignoring unreadable registry state");
                State::default()
            }),
            None => State::default(),
        };
        self.namespaces = state.namespaces;
        self.next_id = state.next_id.max(1);
        for StoredPod { id, spec } in state.pods {
            match Netns::open(&spec.netns_path) {
                Ok(netns) => {
                    let enabled = self.is_enabled(&spec);
                    let key = (spec.namespace.clone(), spec.name.clone());
                    self.pods.insert(
                        key,
                        Arc::new(PodInfo {
                            id,
                            spec,
                            netns: Arc::new(netns),
                            enabled,
                        }),
                    );
                    self.next_id = self.next_id.max(id.saturating_add(1));
                    report.restored += 1;
                }
                Err(e) => {
                    warn!(pod = %spec.name, namespace = %spec.namespace, error = %e, "dropping a restored pod: its network namespace is gone");
                    report
                        .dropped
                        .push(format!("{}/{}", spec.namespace, spec.name));
                }
            }
        }
        let desired: HashMap<u64, PodEntry> = self
            .pods
            .values()
            .filter(|p| p.enabled)
            .map(|p| (p.netns_cookie(), map_entry(p.id)))
            .collect();
        for (cookie, _) in self.map.entries() {
            if !desired.contains_key(&cookie) {
                self.map.remove(cookie)?;
                report.stale_map_entries += 1;
            }
        }
        for (cookie, entry) in desired {
            self.map.upsert(cookie, entry)?;
        }
        self.publish();
        info!(
            restored = report.restored,
            dropped = report.dropped.len(),
            stale_map_entries = report.stale_map_entries,
            "registry restored"
        );
        Ok(report)
    }

    /// Adds or replaces a pod. On success its map entry is in place.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Arc<PodInfo>, RegistryError> {
        let r = self.try_add_pod(spec);
        self.count("add_pod", &r);
        r
    }

    /// [`Registry::add_pod`] for a request straight from the API (`None`: no pod in it),
    /// validated and counted as one request.
    pub fn add_api_pod(
        &mut self,
        pod: Option<nodemesh_api::registry::Pod>,
    ) -> Result<Arc<PodInfo>, RegistryError> {
        let r = pod
            .ok_or_else(|| RegistryError::Invalid(vec!["pod: required".into()]))
            .and_then(PodSpec::from_api)
            .and_then(|spec| self.try_add_pod(spec));
        self.count("add_pod", &r);
        r
    }

    fn try_add_pod(&mut self, spec: PodSpec) -> Result<Arc<PodInfo>, RegistryError> {
        let key = (spec.namespace.clone(), spec.name.clone());
        let previous = self.pods.get(&key).cloned();
        if previous.is_none() && self.pods.len() >= self.cfg.max_pods {
            return Err(RegistryError::Full(format!(
                "the node already has {} pods (limits.max_pods)",
                self.cfg.max_pods
            )));
        }
        self.check_cgroup(&spec)?;
        for ip in &spec.ips {
            if let Some(owner) = self
                .pods
                .iter()
                .find(|(k, p)| **k != key && p.spec.ips.contains(ip))
            {
                return Err(RegistryError::Conflict(format!(
                    "address {ip} already belongs to pod {}/{}",
                    owner.0.0, owner.0.1
                )));
            }
        }
        let netns = Netns::open(&spec.netns_path).map_err(|e| {
            RegistryError::Conflict(format!(
                "network namespace {}: {e}",
                spec.netns_path.display()
            ))
        })?;
        let cookie = netns.cookie();
        if cookie == self.home_cookie {
            return Err(RegistryError::Conflict(format!(
                "{} is the agent's own (the node's) network namespace, not a pod's",
                spec.netns_path.display()
            )));
        }
        if let Some((k, _)) = self
            .pods
            .iter()
            .find(|(k, p)| **k != key && p.netns_cookie() == cookie)
        {
            return Err(RegistryError::Conflict(format!(
                "network namespace {} already belongs to pod {}/{}",
                spec.netns_path.display(),
                k.0,
                k.1
            )));
        }

        let id = previous.as_ref().map_or(self.next_id, |p| p.id);
        let enabled = self.is_enabled(&spec);
        self.write_map(cookie, id, enabled)?;
        if let Some(prev) = &previous
            && prev.netns_cookie() != cookie
        {
            self.map.remove(prev.netns_cookie())?;
        }
        if previous.is_none() {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let info = Arc::new(PodInfo {
            id,
            spec,
            netns: Arc::new(netns),
            enabled,
        });
        info!(pod = %info.spec.name, namespace = %info.spec.namespace, id, netns_cookie = cookie, enabled, replaced = previous.is_some(), "pod registered");
        self.pods.insert(key, info.clone());
        self.commit();
        Ok(info)
    }

    /// Removes a pod; `Ok(false)` if it was not known.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<bool, RegistryError> {
        let r = self.try_remove_pod(namespace, name);
        self.count("remove_pod", &r);
        r
    }

    fn try_remove_pod(&mut self, namespace: &str, name: &str) -> Result<bool, RegistryError> {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(pod) = self.pods.get(&key) else {
            return Ok(false);
        };
        self.map.remove(pod.netns_cookie())?;
        self.pods.remove(&key);
        info!(pod = name, namespace, "pod removed");
        self.commit();
        Ok(true)
    }

    /// Replaces a namespace's labels and applies the selector to its pods.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Arc<PodInfo>>, RegistryError> {
        let r = self.try_set_namespace_labels(namespace, labels);
        self.count("set_namespace_labels", &r);
        r
    }

    fn try_set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Arc<PodInfo>>, RegistryError> {
        crate::pod::validate_namespace(namespace, &labels)?;
        let old = self.namespaces.insert(namespace.to_owned(), labels);
        let changed: Vec<PodInfo> = self
            .pods
            .values()
            .filter(|p| p.spec.namespace == namespace)
            .filter_map(|p| {
                let enabled = self.is_enabled(&p.spec);
                (enabled != p.enabled).then(|| PodInfo {
                    enabled,
                    ..(**p).clone()
                })
            })
            .collect();
        for (i, pod) in changed.iter().enumerate() {
            if let Err(e) = self.write_map(pod.netns_cookie(), pod.id, pod.enabled) {
                // Undo what was switched so the namespace stays consistent.
                for undo in &changed[..i] {
                    let _ = self.write_map(undo.netns_cookie(), undo.id, !undo.enabled);
                }
                match old {
                    Some(old) => self.namespaces.insert(namespace.to_owned(), old),
                    None => self.namespaces.remove(namespace),
                };
                return Err(e.into());
            }
        }
        for pod in changed {
            info!(pod = %pod.spec.name, namespace, enabled = pod.enabled, "namespace labels applied");
            self.pods.insert(
                (pod.spec.namespace.clone(), pod.spec.name.clone()),
                Arc::new(pod),
            );
        }
        self.commit();
        Ok(self.list(Some(namespace)))
    }

    fn write_map(
        &mut self,
        netns_cookie: u64,
        pod_id: u32,
        enabled: bool,
    ) -> Result<(), LoaderError> {
        if enabled {
            self.map.upsert(netns_cookie, map_entry(pod_id))
        } else {
            self.map.remove(netns_cookie)
        }
    }

    /// The pods, optionally of one namespace.
    pub fn list(&self, namespace: Option<&str>) -> Vec<Arc<PodInfo>> {
        self.pods
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn namespaces(&self) -> &BTreeMap<String, BTreeMap<String, String>> {
        &self.namespaces
    }

    fn is_enabled(&self, spec: &PodSpec) -> bool {
        let empty = BTreeMap::new();
        let ns_labels = self.namespaces.get(&spec.namespace).unwrap_or(&empty);
        self.cfg.namespace_selector.matches(ns_labels) && !spec.opted_out()
    }

    fn check_cgroup(&self, spec: &PodSpec) -> Result<(), RegistryError> {
        let canon = |p: &std::path::Path| {
            p.canonicalize()
                .map_err(|e| RegistryError::Conflict(format!("cgroup {}: {e}", p.display())))
        };
        let pod = canon(&spec.cgroup_path)?;
        if !pod.is_dir() {
            return Err(RegistryError::Conflict(format!(
                "cgroup {} is not a directory",
                pod.display()
            )));
        }
        let root = canon(&self.cfg.attach_cgroup)?;
        if !pod.starts_with(&root) {
            return Err(RegistryError::Conflict(format!(
                "cgroup {} is outside {}, where nodemesh's programs are attached: the pod's traffic could not be captured",
                pod.display(),
                root.display()
            )));
        }
        Ok(())
    }

    fn count<T>(&self, op: &'static str, r: &Result<T, RegistryError>) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                op,
                result: result_label(r),
            })
            .inc();
        if let Err(e) = r {
            warn!(op, error = %e, "registry request refused");
        }
    }

    /// Publishes the new table and saves the state.
    fn commit(&mut self) {
        self.publish();
        let Some(store) = &self.store else { return };
        let mut state = State {
            version: 0,
            next_id: self.next_id,
            pods: self
                .pods
                .values()
                .map(|p| StoredPod {
                    id: p.id,
                    spec: p.spec.clone(),
                })
                .collect(),
            namespaces: self.namespaces.clone(),
        };
        if let Err(e) = store.save(&mut state) {
            self.metrics.persist_errors.inc();
            warn!(path = %store.path().display(), error = %e, "could not save the registry state; a restarted agent would not know the latest pods");
        }
    }

    fn publish(&self) {
        let mut table = PodTable::default();
        for pod in self.pods.values() {
            table.by_cookie.insert(pod.netns_cookie(), pod.clone());
            for ip in &pod.spec.ips {
                table.by_ip.insert(*ip, pod.clone());
            }
        }
        let enabled = self.pods.values().filter(|p| p.enabled).count() as i64;
        self.metrics
            .pods
            .get_or_create(&PodsLabels { enabled: "true" })
            .set(enabled);
        self.metrics
            .pods
            .get_or_create(&PodsLabels { enabled: "false" })
            .set(self.pods.len() as i64 - enabled);
        self.table.store(Arc::new(table));
    }
}

fn map_entry(pod_id: u32) -> PodEntry {
    PodEntry {
        pod_id,
        flags: POD_CAPTURE | POD_ACCELERATE,
    }
}
