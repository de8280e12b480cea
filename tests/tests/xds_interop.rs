//! Envoy is a real client of `nodemesh controlplane`, and routes as `nodemesh proxy -c` does
//! on what it serves.
//!
//! The control plane serves `tests/corpus/xds/v1/` (EDS clusters `a` and `b`, STATIC `c`,
//! an HTTP listener on RDS and a tcp_proxy listener), rendered with this run's ports. Each
//! client starts from the same ADS bootstrap (`corpus/xds/bootstrap.yaml`, its own node id)
//! and is taken through the stages: v1, then v2's files written over the folder (a route
//! swap and a modified EDS cluster whose endpoints did not change), then v3's (cluster
//! `b`'s endpoint moved), the control plane hot-reloading each. At every stage the stream
//! must hold everything it was sent (on the control plane's `/status`: `acked == sent`,
//! no NACK), the client must show no rejection (Envoy's `/stats`, nodemesh's `/xds`), and
//! the requests of `corpus/xds/requests.yaml` must reach the upstream the stage names.
//! nodemesh's answers must equal Envoy's, compared as `differential.rs` compares them.
//!
//! Clients run one after the other (they bind the same listener ports): Envoy over state
//! of the world, nodemesh over state of the world, then both over delta. Needs Envoy from
//! `cargo xtask setup` and a built `nodemesh` (`cargo build -p nodemesh`); not root.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodemesh_tests::{
    differential::{self, CaseRequest, Compare, Observation, Proxy, Running},
    http::tcp_get,
};
use serde::Deserialize;
use serde_json::Value;

/// The folder's stages, each written over the previous one.
const STAGES: [&str; 3] = ["v1", "v2", "v3"];
/// The types every client subscribes to here (no secrets in the corpus).
const TYPES: [&str; 4] = ["cds", "eds", "lds", "rds"];

/// One entry of `requests.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    request: CaseRequest,
    /// Who answers at each stage; `None`: a local reply.
    upstream: Vec<Option<String>>,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/xds")
}

/// Fails after 30 s with what was last seen: a client that never gets there is a failure,
/// not a hang.
struct Deadline {
    what: String,
    until: Instant,
}

impl Deadline {
    fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            until: Instant::now() + Duration::from_secs(30),
        }
    }

    async fn tick(&self, last: &str) -> anyhow::Result<()> {
        if Instant::now() > self.until {
            bail!("{}: not reached after 30 s; last seen: {last}", self.what);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

/// The folder the control plane serves: the corpus with this run's ports filled in.
struct Folder {
    dir: PathBuf,
    /// `upstream.a`, `listen.http`, ... → port.
    ports: BTreeMap<String, u16>,
}

impl Folder {
    fn render(&self, text: &str) -> anyhow::Result<String> {
        let mut text = text.to_owned();
        for (name, port) in &self.ports {
            text = text.replace(&format!("{{{name}}}"), &port.to_string());
        }
        if let Some(at) = text.find("{upstream.").or_else(|| text.find("{listen.")) {
            bail!("unknown placeholder at {:?}", &text[at..]);
        }
        Ok(text)
    }

    /// Writes `stage`'s files over the folder, each through a hidden file renamed into
    /// place, so the control plane never reads half a file.
    fn write_stage(&self, stage: &str) -> anyhow::Result<()> {
        let from = corpus().join(stage);
        for entry in std::fs::read_dir(&from).with_context(|| format!("{}", from.display()))? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let text = self
                .render(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{}", path.display()))?;
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, self.dir.join(name))?;
        }
        Ok(())
    }
}

/// `nodemesh controlplane` serving the folder.
struct ControlPlane {
    process: Running,
    ads: u16,
    admin: SocketAddr,
}

impl ControlPlane {
    async fn start(dir: &Path, work: &Path) -> anyhow::Result<Self> {
        let ports = differential::free_ports(2)?;
        let admin = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let mut cmd = Command::new(nodemesh_simnode::bin_path("nodemesh"));
        cmd.arg("controlplane")
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{}", ports[0])])
            .args(["--admin", &admin.to_string(), "--poll-ms", "100"])
            .env("RUST_LOG", "info,nodemesh_xds=debug");
        let mut process = Running::spawn(cmd, &work.join("controlplane.log"))?;
        differential::wait_listening("nodemesh controlplane", &mut process, admin).await?;
        Ok(Self {
            process,
            ads: ports[0],
            admin,
        })
    }

    async fn status(&mut self) -> anyhow::Result<Value> {
        self.process.check_alive("nodemesh controlplane")?;
        let (code, body) = tcp_get(self.admin, "/status").await?;
        if code != 200 {
            bail!("controlplane /status: {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until the folder as written serves: a version other than `before`, or
    /// exactly `want`.
    async fn wait_reloaded(&mut self, before: &str, want: Option<&str>) -> anyhow::Result<Value> {
        let deadline = Deadline::new("the control plane reloading the folder");
        loop {
            let status = self.status().await?;
            if let Some(e) = status["last_error"].as_str() {
                bail!("the folder does not load: {e}");
            }
            let version = status["version"].as_str().unwrap_or_default();
            if want.map_or(version != before, |w| version == w) {
                return Ok(status);
            }
            deadline.tick(&format!("version {version}")).await?;
        }
    }

    /// Waits until the stream of `node` holds everything it was sent: `acked == sent` for
    /// every type, what was sent the version being served (state of the world: per type;
    /// delta: the set's version, for the types in `fresh`, which changed). A NACK fails at
    /// once.
    async fn wait_synced(
        &mut self,
        node: &str,
        variant: &str,
        fresh: &[&str],
        client: &mut Running,
    ) -> anyhow::Result<Value> {
        let deadline = Deadline::new(format!("{node} holding what the control plane serves"));
        loop {
            client.check_alive(node)?;
            let status = self.status().await?;
            match synced(&status, node, variant, fresh)? {
                None => return Ok(status),
                Some(why) => deadline.tick(&why).await?,
            }
        }
    }
}

/// `None` when `node`'s stream is in sync; what is missing otherwise; an error on a NACK.
fn synced(
    status: &Value,
    node: &str,
    variant: &str,
    fresh: &[&str],
) -> anyhow::Result<Option<String>> {
    let clients = status["clients"].as_array().cloned().unwrap_or_default();
    let Some(client) = clients.iter().find(|c| c["node"] == node) else {
        return Ok(Some(format!("no stream from {node}")));
    };
    if client["variant"] != variant {
        bail!(
            "{node} connected over {} instead of {variant}",
            client["variant"]
        );
    }
    for t in TYPES {
        let ty = &client["types"][t];
        if ty["nacks"].as_u64().unwrap_or(0) != 0 {
            bail!("{node} rejected {t} (NACK): {}", ty["last_nack"]);
        }
        let (sent, acked) = (ty["sent"].as_str(), ty["acked"].as_str());
        let Some(sent) = sent else {
            return Ok(Some(format!("{t}: nothing sent yet")));
        };
        if acked != Some(sent) {
            return Ok(Some(format!("{t}: sent {sent}, acked {acked:?}")));
        }
        let serving = if variant == "sotw" {
            status["versions"][t].as_str()
        } else if fresh.contains(&t) {
            status["version"].as_str()
        } else {
            continue;
        };
        if Some(sent) != serving {
            return Ok(Some(format!("{t}: sent {sent}, serving {serving:?}")));
        }
    }
    Ok(None)
}

/// One client run: which proxy, as which node, over which ADS variant.
#[derive(Debug, Clone, Copy)]
struct Client {
    proxy: Proxy,
    node: &'static str,
    delta: bool,
}

impl Client {
    fn variant(&self) -> &'static str {
        if self.delta { "delta" } else { "sotw" }
    }
}

/// What the whole run needs.
struct Run {
    cp: ControlPlane,
    folder: Folder,
    steps: Vec<Step>,
    work: PathBuf,
    /// The version of the folder at v1.
    first: String,
}

impl Run {
    fn listener(&self, req: &CaseRequest) -> anyhow::Result<SocketAddr> {
        let name = req.listener.as_deref().unwrap_or("http");
        let Some(port) = self.folder.ports.get(&format!("listen.{name}")) else {
            bail!("request {:?}: no listener {name:?}", req.name);
        };
        Ok(SocketAddr::from(([127, 0, 0, 1], *port)))
    }

    /// Takes `client` through every stage; the observations by stage, and every expectation
    /// it missed in `failures`.
    async fn client(
        &mut self,
        client: Client,
        failures: &mut Vec<String>,
    ) -> anyhow::Result<Vec<Vec<Observation>>> {
        let label = client.node;
        // Every client starts from v1 (the previous one left the folder at the last stage).
        self.folder.write_stage(STAGES[0])?;
        let first = self.first.clone();
        let mut status = self.cp.wait_reloaded("", Some(&first)).await?;
        let admin = SocketAddr::from(([127, 0, 0, 1], differential::free_ports(1)?[0]));
        let bootstrap = std::fs::read_to_string(corpus().join("bootstrap.yaml"))?
            .replace("{node}", client.node)
            .replace("{admin}", &admin.port().to_string())
            .replace("{ads}", &self.cp.ads.to_string())
            .replace(
                "{api_type}",
                if client.delta { "DELTA_GRPC" } else { "GRPC" },
            );
        let config = self.work.join(format!("{label}.yaml"));
        std::fs::write(&config, bootstrap)?;
        let mut process = differential::start_proxy(
            client.proxy,
            &config,
            &self.work.join(format!("{label}.log")),
        )?;
        let compare = Compare {
            body: true,
            ..Default::default()
        };
        let mut fresh: Vec<&str> = TYPES.to_vec();
        let mut seen = Vec::new();
        for (i, stage) in STAGES.iter().enumerate() {
            if i > 0 {
                let before = status.clone();
                self.folder.write_stage(stage)?;
                status = self
                    .cp
                    .wait_reloaded(before["version"].as_str().unwrap_or_default(), None)
                    .await?;
                fresh = TYPES
                    .into_iter()
                    .filter(|t| before["versions"][t] != status["versions"][t])
                    .collect();
            }
            let at = format!("{label} at {stage}");
            self.cp
                .wait_synced(client.node, client.variant(), &fresh, &mut process)
                .await
                .with_context(|| format!("{at}\n{}", process.log_text()))?;
            wait_ready(admin, &mut process, &at).await?;
            for step in &self.steps {
                differential::wait_listening(&at, &mut process, self.listener(&step.request)?)
                    .await?;
            }
            match client.proxy {
                Proxy::Envoy => failures.extend(
                    envoy_rejections(admin)
                        .await?
                        .into_iter()
                        .map(|f| format!("{at}: {f}")),
                ),
                Proxy::Nodemesh => failures.extend(
                    nodemesh_rejections(admin)
                        .await?
                        .into_iter()
                        .map(|f| format!("{at}: {f}")),
                ),
            }
            let mut observed = Vec::new();
            for step in &self.steps {
                let req = &step.request;
                let obs = tokio::time::timeout(
                    Duration::from_secs(20),
                    differential::send(self.listener(req)?, req, &compare),
                )
                .await
                .with_context(|| format!("{at}: request {:?} timed out", req.name))?
                .with_context(|| format!("{at}: request {:?}\n{}", req.name, process.log_text()))?;
                let want = step.upstream.get(i).cloned().flatten();
                if obs.get("upstream") != want.as_deref() {
                    failures.push(format!(
                        "{at} / {}: answered by {:?}, the stage routes it to {want:?}",
                        req.name,
                        obs.get("upstream")
                    ));
                }
                if let Some(code) = req.expect_status
                    && obs.status() != code
                {
                    failures.push(format!(
                        "{at} / {}: status {}, expected {code}",
                        req.name,
                        obs.status()
                    ));
                }
                observed.push(obs);
            }
            seen.push(observed);
        }
        drop(process);
        Ok(seen)
    }
}

/// Waits for the admin port's `/ready` to answer 200.
async fn wait_ready(admin: SocketAddr, process: &mut Running, at: &str) -> anyhow::Result<()> {
    let deadline = Deadline::new(format!("{at}: /ready"));
    loop {
        process.check_alive(at)?;
        let last = match tcp_get(admin, "/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code} {body}"),
            Err(e) => format!("{e:#}"),
        };
        deadline.tick(&last).await?;
    }
}

/// What Envoy's `/stats` shows it rejected or gave up waiting for: any `update_rejected`
/// or `init_fetch_timeout` above 0 (a resource that never came: a cluster or listener left
/// warming), and anything still warming.
async fn envoy_rejections(admin: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (code, body) = tcp_get(admin, "/stats").await?;
    if code != 200 {
        bail!("envoy /stats: {code}");
    }
    let stats: BTreeMap<&str, &str> = body.lines().filter_map(|l| l.split_once(": ")).collect();
    let mut out = Vec::new();
    for required in [
        "listener_manager.lds.update_rejected",
        "cluster_manager.cds.update_rejected",
        "cluster_manager.warming_clusters",
        "listener_manager.total_listeners_warming",
    ] {
        if !stats.contains_key(required) {
            out.push(format!("envoy shows no {required}"));
        }
    }
    for (name, value) in &stats {
        let counted = name.ends_with(".update_rejected")
            || name.ends_with(".init_fetch_timeout")
            || name.ends_with("warming_clusters")
            || name.ends_with("total_listeners_warming");
        if counted && *value != "0" {
            out.push(format!("envoy {name} = {value}"));
        }
    }
    Ok(out)
}

/// What nodemesh's `/xds` shows it rejected or still waits for.
async fn nodemesh_rejections(admin: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (code, body) = tcp_get(admin, "/xds").await?;
    if code != 200 {
        bail!("nodemesh /xds: {code}: {body}");
    }
    let xds: Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    if xds["state"] != "connected" {
        out.push(format!("nodemesh xDS state {}", xds["state"]));
    }
    if xds["warming"].as_array().is_some_and(|w| !w.is_empty()) {
        out.push(format!("nodemesh still warming {}", xds["warming"]));
    }
    for t in TYPES {
        let ty = &xds["types"][t];
        if ty["nacks"].as_u64() != Some(0) {
            out.push(format!(
                "nodemesh {t}: nacks {}, last {}",
                ty["nacks"], ty["last_nack"]
            ));
        }
    }
    Ok(out)
}

#[test]
fn envoy_and_nodemesh_follow_the_controlplane_alike() {
    differential::envoy_path().expect("Envoy is needed for the xDS interop test");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let work = tempfile::tempdir().expect("work dir");
    let result = runtime.block_on(interop(work.path()));
    if let Err(e) = result {
        let log = std::fs::read_to_string(work.path().join("controlplane.log")).unwrap_or_default();
        panic!("{e:#}\n--- controlplane log ---\n{log}");
    }
}

async fn interop(work: &Path) -> anyhow::Result<()> {
    let steps: Vec<Step> =
        serde_yaml::from_str(&std::fs::read_to_string(corpus().join("requests.yaml"))?)?;
    let mut upstreams = Vec::new();
    let mut ports = BTreeMap::new();
    for name in ["a", "b", "c", "d"] {
        let up = nodemesh_simnode::echo::start(name, "127.0.0.1:0".parse()?).await?;
        ports.insert(format!("upstream.{name}"), up.addr.port());
        upstreams.push(up);
    }
    for (name, port) in ["http", "tcp"]
        .into_iter()
        .zip(differential::free_ports(2)?)
    {
        ports.insert(format!("listen.{name}"), port);
    }
    let dir = work.join("resources");
    std::fs::create_dir_all(&dir)?;
    let folder = Folder { dir, ports };
    folder.write_stage(STAGES[0])?;
    let mut cp = ControlPlane::start(&folder.dir, work).await?;
    let first = cp.status().await?["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut run = Run {
        cp,
        folder,
        steps,
        work: work.to_owned(),
        first,
    };
    let mut failures = Vec::new();
    let clients = [
        Client {
            proxy: Proxy::Envoy,
            node: "envoy-1",
            delta: false,
        },
        Client {
            proxy: Proxy::Nodemesh,
            node: "nodemesh-1",
            delta: false,
        },
        Client {
            proxy: Proxy::Envoy,
            node: "envoy-delta-1",
            delta: true,
        },
        Client {
            proxy: Proxy::Nodemesh,
            node: "nodemesh-delta-1",
            delta: true,
        },
    ];
    let mut seen = Vec::new();
    for client in clients {
        seen.push(run.client(client, &mut failures).await?);
    }
    // Every run against Envoy over state of the world, request by request.
    let (reference, others) = seen.split_first().context("no runs")?;
    let mut compared = 0;
    for (client, observed) in clients[1..].iter().zip(others) {
        for (stage, (mine, theirs)) in STAGES.iter().zip(observed.iter().zip(reference)) {
            for ((step, m), e) in run.steps.iter().zip(mine).zip(theirs) {
                compared += 1;
                if m != e {
                    failures.push(format!(
                        "{} at {stage} / {}:\n{}",
                        client.node,
                        step.request.name,
                        e.diff(m, clients[0].node, client.node)
                    ));
                }
            }
        }
    }
    println!(
        "{} clients, {} stages, {compared} requests compared with {}",
        clients.len(),
        STAGES.len(),
        clients[0].node
    );
    if !failures.is_empty() {
        bail!(
            "{} failure(s) (work dir {}):\n{}",
            failures.len(),
            work.display(),
            failures.join("\n")
        );
    }
    Ok(())
}
