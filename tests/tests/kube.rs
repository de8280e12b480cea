//! Kubernetes as the pod source: the real agent watches a fixture API server
//! (`tests/src/kubeapi.rs`) that serves recorded pod and namespace objects
//! (`tests/corpus/kube/`), and finds each pod on a simulated node whose cgroups are named as
//! kubelet names them, with real processes in real network namespaces.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodemesh_api::registry as api;
use nodemesh_kube::discover::{self, DiscoverError, Qos};
use nodemesh_simnode::{SimNode, require_root};
use nodemesh_tests::{
    kubeapi::KubeApi,
    kubelet::{Kubelet, Layout, Spec},
    mesh::{AgentOptions, MeshNode, metric},
};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const PORT: u16 = 8080;

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

#[test]
fn pods_are_found_in_both_kubelet_cgroup_layouts() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut sim = SimNode::new("kubediscover")?;
    let mut kubelet = Kubelet::default();
    let a = sim.add_pod("a", "shop")?;
    let b = sim.add_pod("b", "shop")?;
    let c = sim.add_pod("c", "shop")?;
    let sd_root = sim.cgroup_root().join("kubepods.slice");
    let fs_root = sim.cgroup_root().join("kubepods");
    let id = |n: char| n.to_string().repeat(64);
    let (ua, ub, uc) = (
        "11111111-2222-4333-8444-555555555555",
        "66666666-7777-4888-9999-aaaaaaaaaaaa",
        "bbbbbbbb-cccc-4ddd-8eee-ffffffffffff",
    );
    let cg_a = kubelet.start(
        &sim,
        &a,
        &sd_root,
        Spec {
            layout: Layout::Systemd,
            uid: ua,
            qos: "Burstable",
            container: &id('a'),
        },
    )?;
    let cg_b = kubelet.start(
        &sim,
        &b,
        &fs_root,
        Spec {
            layout: Layout::Cgroupfs,
            uid: ub,
            qos: "BestEffort",
            container: &id('b'),
        },
    )?;
    let cg_c = kubelet.start(
        &sim,
        &c,
        &sd_root,
        Spec {
            layout: Layout::Systemd,
            uid: uc,
            qos: "Guaranteed",
            container: &id('c'),
        },
    )?;

    for (root, uid, qos, cgroup, pod) in [
        (&sd_root, ua, Qos::Burstable, &cg_a, &a),
        (&fs_root, ub, Qos::BestEffort, &cg_b, &b),
        (&sd_root, uc, Qos::Guaranteed, &cg_c, &c),
    ] {
        for qos in [Some(qos), None] {
            let found = discover::find_pod(root, Path::new("/proc"), uid, qos)
                .unwrap_or_else(|e| panic!("{uid}: {e}"));
            assert_eq!(&found.cgroup, cgroup);
            // The same network namespace as the pod's: nsfs inodes name namespaces.
            assert_eq!(inode(&found.netns), inode(&pod.netns_path), "{uid}");
            assert_ne!(inode(&found.netns), inode(Path::new("/proc/self/ns/net")));
        }
    }
    // The wrong QoS class, an unknown pod, and a pod whose containers have not started.
    assert!(matches!(
        discover::find_pod(&sd_root, Path::new("/proc"), ua, Some(Qos::BestEffort)),
        Err(DiscoverError::NoCgroup { .. })
    ));
    let empty = sd_root.join("kubepods-besteffort.slice/kubepods-besteffort-pod12345678_0000_4000_8000_000000000000.slice");
    std::fs::create_dir_all(&empty)?;
    kubelet.dirs.push(sd_root.join("kubepods-besteffort.slice"));
    kubelet.dirs.push(empty.clone());
    assert_eq!(
        discover::find_pod(
            &sd_root,
            Path::new("/proc"),
            "12345678-0000-4000-8000-000000000000",
            Some(Qos::BestEffort)
        ),
        Err(DiscoverError::NoProcess(empty))
    );
    drop(kubelet);
    sim.cleanup()?;
    Ok(())
}

fn corpus(file: &str) -> anyhow::Result<Vec<Value>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus/kube")
        .join(file);
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    Ok(list["items"].as_array().context("items")?.clone())
}

fn named(items: &[Value], name: &str) -> Value {
    items
        .iter()
        .find(|o| o["metadata"]["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in the corpus"))
}

fn with_ip(mut pod: Value, ip: &str) -> Value {
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"]["podIP"] = json!(ip);
    pod["status"]["podIPs"] = json!([{ "ip": ip }]);
    pod
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().expect("uid").to_owned()
}

/// Polls the registry until `check` holds for its pods (by `namespace/name`).
fn wait_for(
    node: &MeshNode,
    what: &str,
    check: impl Fn(&BTreeMap<String, api::PodStatus>) -> bool,
) -> anyhow::Result<BTreeMap<String, api::PodStatus>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pods: BTreeMap<String, api::PodStatus> = node
            .list_pods()?
            .pods
            .into_iter()
            .map(|s| {
                let p = s.pod.clone().unwrap_or_default();
                (format!("{}/{}", p.namespace, p.name), s)
            })
            .collect();
        if check(&pods) {
            return Ok(pods);
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: not reached in 20 s; registry: {pods:#?}\nagent log:\n{}",
                node.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn map_cookies(node: &MeshNode) -> anyhow::Result<Vec<u64>> {
    let mut v: Vec<u64> = node.maps()?.pods.iter().map(|p| p.netns_cookie).collect();
    v.sort_unstable();
    Ok(v)
}

const WEB: &str = "shop/web-7d9f8b6c5-x2kqp";
const DB: &str = "store/db-0";
const BATCH: &str = "shop/batch-5x7kz";

#[test]
fn the_agent_follows_the_node_pods_and_namespace_labels_from_the_api() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut node = MeshNode::create("kube", &AgentOptions::default())?;
    let api = KubeApi::start_in(&node.sim.netns_path())?;
    let mut kubelet = Kubelet::default();
    let web = node.sim.add_pod("web", "shop")?;
    let db = node.sim.add_pod("db", "store")?;
    let batch = node.sim.add_pod("batch", "shop")?;
    let root = node.sim.cgroup_root().join("kubepods.slice");

    let pods = corpus("pods.json")?;
    let namespaces = corpus("namespaces.json")?;
    let web_obj = with_ip(named(&pods, "web-7d9f8b6c5-x2kqp"), &web.ip.to_string());
    let db_obj = with_ip(named(&pods, "db-0"), &db.ip.to_string());
    let mut batch_obj = named(&pods, "batch-5x7kz");
    batch_obj["spec"]["nodeName"] = json!(NODE);
    let web_cg = kubelet.start(
        &node.sim,
        &web,
        &root,
        Spec {
            layout: Layout::Systemd,
            uid: &uid(&web_obj),
            qos: "BestEffort",
            container: &"9b".repeat(32),
        },
    )?;
    let db_cg = kubelet.start(
        &node.sim,
        &db,
        &root,
        Spec {
            layout: Layout::Systemd,
            uid: &uid(&db_obj),
            qos: "Burstable",
            container: &"2a".repeat(32),
        },
    )?;
    for ns in &namespaces {
        api.apply("namespaces", ns.clone());
    }
    for p in [
        &web_obj,
        &db_obj,
        &batch_obj,
        &named(&pods, "kube-proxy-4mz9t"),
    ] {
        api.apply("pods", p.clone());
    }
    let kubeconfig = node.sim.work_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    node.append_config(&format!(
        "kubernetes:\n  enabled: true\n  node_name: {NODE}\n  kubeconfig: {}\n  kubepods_cgroup: {}\n  retry_interval: 200ms\n",
        kubeconfig.display(),
        root.display()
    ))?;
    node.start_agent()?;

    // The listed pods: web (shop is labeled) in the mesh, db (store is not) known but out;
    // the pending pod waits, the hostNetwork pod is never taken.
    let pods_now = wait_for(&node, "web and db registered", |p| {
        p.contains_key(WEB) && p.contains_key(DB)
    })?;
    let w = &pods_now[WEB];
    let wp = w.pod.as_ref().expect("pod");
    assert!(w.enabled, "shop is labeled: {w:?}");
    assert_eq!(wp.ips, [web.ip.to_string()]);
    assert_eq!(wp.service_account, "web");
    assert_eq!(wp.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(Path::new(&wp.cgroup_path), web_cg);
    assert_eq!(inode(Path::new(&wp.netns_path)), inode(&web.netns_path));
    let d = &pods_now[DB];
    assert!(!d.enabled, "store is not labeled: {d:?}");
    assert_eq!(Path::new(&d.pod.as_ref().expect("pod").cgroup_path), db_cg);
    assert!(
        !pods_now.contains_key(BATCH),
        "a pod without an address is not registered"
    );
    assert!(
        !pods_now.keys().any(|k| k.starts_with("kube-system/")),
        "hostNetwork pod registered"
    );
    assert_eq!(map_cookies(&node)?, [w.netns_cookie]);
    // `nodemesh status` names the pod source; the pending pod is counted there.
    let source = node
        .status()?
        .kubernetes
        .context("status shows no Kubernetes source")?;
    assert_eq!(source.node_name, NODE);
    assert!(
        source.api_server.starts_with(&api.url()),
        "{}",
        source.api_server
    );
    assert_eq!(source.pending_pods, 1, "batch has no address yet");
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "the pods were not asked for by node: {requests:?}"
    );
    api.wait_watchers("pods", 1, Duration::from_secs(10))?;
    api.wait_watchers("namespaces", 1, Duration::from_secs(10))?;

    // Restart (handoff) under a live connection of the meshed pod: the new agent restores
    // its state, relists, finds nothing to change (same ids, same map entries), and the
    // connection carries on through the node proxy.
    let _echo = node.serve(&db, PORT, &["--mode", "echo"])?;
    let dst = format!("{}:{PORT}", db.ip);
    let mut live = node.spawn_podapp(
        &web,
        &[
            "rr",
            "--connect",
            &dst,
            "--iterations",
            "300",
            "--warmup",
            "0",
            "--interval-ms",
            "10",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        node.status()?.proxy.active_connections,
        1,
        "web's connection is not proxied"
    );
    let lists = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count()
    };
    let (ids_before, cookies_before, lists_before) = (
        wait_for(&node, "steady", |_| true)?,
        map_cookies(&node)?,
        lists(&api),
    );
    node.start_agent()?;
    let after = wait_for(&node, "the new agent listed the pods again", |_| {
        lists(&api) > lists_before
    })?;
    api.wait_watchers("pods", 1, Duration::from_secs(10))?;
    for (k, s) in &ids_before {
        assert_eq!(after[k].pod_id, s.pod_id, "{k} got a new id");
        assert_eq!(after[k].enabled, s.enabled, "{k}");
    }
    assert_eq!(after.len(), ids_before.len());
    assert_eq!(map_cookies(&node)?, cookies_before);
    let done = live.wait_timeout(Duration::from_secs(60))?;
    assert!(
        done.success(),
        "the live connection broke across the restart: {}",
        live.stdout_text()
    );

    // Label store: db joins. Unlabel shop: web leaves. New connections only; the map says so.
    let mut store = named(&namespaces, "store");
    store["metadata"]["labels"]["nodemesh.io/acceleration"] = json!("enabled");
    api.apply("namespaces", store);
    let p = wait_for(&node, "db enabled", |p| {
        p.get(DB).is_some_and(|s| s.enabled)
    })?;
    assert_eq!(map_cookies(&node)?.len(), 2);
    let mut shop = named(&namespaces, "shop");
    shop["metadata"]["labels"]
        .as_object_mut()
        .expect("labels")
        .remove("nodemesh.io/acceleration");
    api.apply("namespaces", shop);
    wait_for(&node, "web disabled", |p| {
        p.get(WEB).is_some_and(|s| !s.enabled)
    })?;
    assert_eq!(map_cookies(&node)?, [p[DB].netns_cookie]);

    // The pending pod starts: its containers appear, then the API gives it an address.
    let batch_cg = kubelet.start(
        &node.sim,
        &batch,
        &root,
        Spec {
            layout: Layout::Systemd,
            uid: &uid(&batch_obj),
            qos: "BestEffort",
            container: &"5c".repeat(32),
        },
    )?;
    batch_obj["status"]["phase"] = json!("Running");
    batch_obj = with_ip(batch_obj, &batch.ip.to_string());
    api.apply("pods", batch_obj.clone());
    let p = wait_for(&node, "batch registered", |p| p.contains_key(BATCH))?;
    assert_eq!(
        Path::new(&p[BATCH].pod.as_ref().expect("pod").cgroup_path),
        batch_cg
    );
    assert!(!p[BATCH].enabled, "shop is unlabeled now");

    // Bad input from the API: a UID that would climb out of the kubepods cgroup is refused,
    // logged and counted, and nothing else changes.
    let mut evil = with_ip(named(&pods, "web-7d9f8b6c5-x2kqp"), "198.18.0.200");
    evil["metadata"]["name"] = json!("evil");
    evil["metadata"]["uid"] = json!("../../../../sys/fs/cgroup");
    api.apply("pods", evil);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &node.metrics()?,
        "nodemesh_kube_errors_total",
        &[("reason", "bad_object")],
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the bad pod was not counted:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !node
            .list_pods()?
            .pods
            .iter()
            .any(|s| s.pod.as_ref().is_some_and(|p| p.name == "evil"))
    );
    assert!(
        node.agent_log().contains("not a UID"),
        "no log line names the problem"
    );
    api.delete("pods", "shop/evil");

    // Pod deleted: its map entry goes.
    api.delete("pods", DB);
    wait_for(&node, "db removed", |p| !p.contains_key(DB))?;
    assert!(
        map_cookies(&node)?.is_empty(),
        "db's map entry is still there"
    );

    let before = wait_for(&node, "steady", |_| true)?;

    // Changes while no agent runs are reconciled from the list at the next start.
    node.stop_agent()?;
    api.delete("pods", BATCH);
    let mut shop = named(&namespaces, "shop");
    shop["metadata"]["labels"]["nodemesh.io/acceleration"] = json!("enabled");
    api.apply("namespaces", shop);
    node.start_agent()?;
    let p = wait_for(&node, "reconciled", |p| {
        !p.contains_key(BATCH) && p.get(WEB).is_some_and(|s| s.enabled)
    })?;
    assert_eq!(p[WEB].pod_id, before[WEB].pod_id);
    assert_eq!(map_cookies(&node)?, [p[WEB].netns_cookie]);
    let metrics = node.metrics()?;
    assert!(
        metrics.contains("nodemesh_kube_events_total"),
        "no watcher metrics"
    );

    // The watches expire (410 Gone) while shop loses its label unseen: the agent lists
    // again and reconciles, then keeps following the new watches.
    let lists_before = lists(&api);
    let mut shop = named(&namespaces, "shop");
    shop["metadata"]["labels"]
        .as_object_mut()
        .expect("labels")
        .remove("nodemesh.io/acceleration");
    api.apply_unseen("namespaces", shop);
    api.expire_watches();
    wait_for(&node, "relisted after 410", |p| {
        p.get(WEB).is_some_and(|s| !s.enabled)
    })?;
    assert!(map_cookies(&node)?.is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    while lists(&api) <= lists_before {
        assert!(Instant::now() < deadline, "the pods were not listed again");
        std::thread::sleep(Duration::from_millis(100));
    }
    api.wait_watchers("namespaces", 1, Duration::from_secs(10))?;
    let mut shop = named(&namespaces, "shop");
    shop["metadata"]["labels"]["nodemesh.io/acceleration"] = json!("enabled");
    api.apply("namespaces", shop);
    wait_for(&node, "following the new watch", |p| {
        p.get(WEB).is_some_and(|s| s.enabled)
    })?;

    drop(api);
    node.stop_agent()?;
    drop(kubelet);
    Ok(())
}
