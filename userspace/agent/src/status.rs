//! The status document: what `nodemesh status` shows and `/status` serves. One type for
//! both sides so that the CLI and the agent cannot drift apart.
use serde::{Deserialize, Serialize};

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub ready: bool,
    pub datapath: Datapath,
    pub counters: Vec<ProgramCounters>,
    pub maps: Option<nodemesh_loader::maps::MapSizes>,
    pub pods: Vec<PodSummary>,
    pub proxy: ProxySummary,
    /// Where the pods come from: `None` for the registry API only, else Kubernetes.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSummary>,
    /// The xDS client's state (`nodemesh_xds::client::Status`), when the L7 bootstrap has
    /// `dynamic_resources`.
    #[serde(default)]
    pub xds: Option<serde_json::Value>,
}

/// The Kubernetes pod source, when `kubernetes.enabled`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubernetesSummary {
    pub node_name: String,
    pub api_server: String,
    /// Pods of this node not found on the node yet (containers starting, or refused).
    pub pending_pods: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Datapath {
    pub pin_dir: String,
    pub cgroup: String,
    pub programs: Vec<Program>,
    pub features: Vec<Feature>,
    pub sockmap: Sockmap,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub attach_point: String,
    /// attached, adopted (kept from the previous agent) or replaced.
    pub outcome: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    pub feature: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sockmap {
    pub enabled: bool,
    /// auto, on or off, from the config.
    pub mode: String,
    pub selftest: Option<nodemesh_loader::selftest::SelfTestReport>,
}

/// The counters of one program, grouped the way operators ask about them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProgramCounters {
    pub program: String,
    pub hit: u64,
    pub miss: u64,
    pub fallback: u64,
    pub failure: u64,
    /// Every counter by name.
    pub detail: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodSummary {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<String>,
    pub enabled: bool,
    pub netns_cookie: u64,
    pub pod_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySummary {
    pub listen: String,
    pub active_connections: u64,
}

/// Groups raw counters by program.
pub fn group_counters(raw: &[(nodemesh_common::CounterInfo, u64)]) -> Vec<ProgramCounters> {
    use nodemesh_common::CounterKind;
    let mut out: Vec<ProgramCounters> = Vec::new();
    for (info, value) in raw {
        let idx = match out.iter().position(|p| p.program == info.program) {
            Some(i) => i,
            None => {
                out.push(ProgramCounters {
                    program: info.program.to_owned(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let p = &mut out[idx];
        // Byte counters are not events: keep them out of the hit/miss tallies.
        if !info.name.ends_with("_bytes") {
            match info.kind {
                CounterKind::Hit => p.hit += value,
                CounterKind::Miss => p.miss += value,
                CounterKind::Fallback => p.fallback += value,
                CounterKind::Failure => p.failure += value,
            }
        }
        p.detail.push((info.name.to_owned(), *value));
    }
    out
}

/// `GET /debug/maps`: the pod and original-destination maps, decoded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapDump {
    pub pods: Vec<PodMapEntry>,
    pub pending: Vec<PendingEntry>,
    pub orig_dst: Vec<OrigDstEntry>,
    pub accelerated: Vec<SocketEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodMapEntry {
    pub netns_cookie: u64,
    pub pod_id: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingEntry {
    pub socket_cookie: u64,
    pub original_dst: String,
    pub netns_cookie: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrigDstEntry {
    pub client: String,
    pub proxy: String,
    pub original_dst: String,
    pub netns_cookie: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketEntry {
    pub local: String,
    pub remote: String,
}

impl MapDump {
    /// Reads every map under `pin_dir` (works with or without a running agent).
    pub fn read(maps: &nodemesh_loader::maps::PinnedMaps) -> Self {
        use nodemesh_loader::addr;
        Self {
            pods: maps
                .pods
                .entries()
                .into_iter()
                .map(|(netns_cookie, e)| PodMapEntry {
                    netns_cookie,
                    pod_id: e.pod_id,
                    flags: e.flags,
                })
                .collect(),
            pending: maps
                .pending
                .entries()
                .into_iter()
                .map(|(socket_cookie, o)| PendingEntry {
                    socket_cookie,
                    original_dst: addr::orig_dst_addr(&o).to_string(),
                    netns_cookie: o.netns_cookie,
                })
                .collect(),
            orig_dst: maps
                .orig_dst
                .entries()
                .into_iter()
                .map(|(k, o)| {
                    let (client, proxy) = addr::key_addrs(&k);
                    OrigDstEntry {
                        client: client.to_string(),
                        proxy: proxy.to_string(),
                        original_dst: addr::orig_dst_addr(&o).to_string(),
                        netns_cookie: o.netns_cookie,
                    }
                })
                .collect(),
            accelerated: maps
                .fast_path
                .accelerated()
                .iter()
                .map(|k| {
                    let (local, remote) = addr::key_addrs(k);
                    SocketEntry {
                        local: local.to_string(),
                        remote: remote.to_string(),
                    }
                })
                .collect(),
        }
    }
}
