//! The agent's life: start-up order, the two runtimes, and how it ends.
//!
//! Start-up, in this order (each step's failure is fatal and says what is missing):
//! 1. kernel programs: probe, load against the pinned maps, attach or adopt (`nodemesh-loader`);
//! 2. `NM_CONFIG`: the proxy address, and the sockmap switch after its self-test;
//! 3. a running predecessor? ask it for the proxy (see [`crate::handoff`]); it stops its
//!    registry and admin first, so the state file read next is final;
//! 4. the pod registry, restored from the state file and reconciled with the pod map;
//! 5. the proxy on the listener (the predecessor's, or a fresh one), then the connections
//!    the predecessor hands over;
//! 6. the registry API, the Kubernetes pod source when `kubernetes.enabled` (it feeds the
//!    same registry), admin, and the handoff socket for the next agent; ready.
//!
//! Runtimes (the ztunnel arrangement, with Envoy's workers): the *data plane* is one
//! single-threaded runtime per worker thread ([`nodemesh_http::workers`]; a connection and
//! its upstream connections live on one worker, so a request never wakes another thread),
//! running only the proxy; admin, the registry API and the handoff run on a
//! single-threaded *control* runtime on the main thread, so a slow scrape or a burst of
//! registry calls cannot add latency to proxied traffic.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nodemesh_http::workers::Workers;
use nodemesh_loader::{
    Datapath, DatapathConfig,
    maps::{OrigDstMap, PodMap},
};
use nodemesh_proxy::{Outbound, handoff, metrics::ProxyMetrics, orig_dst::KernelOrigDst, outbound};
use nodemesh_workloads::{Registry, RegistryConfig, api::RegistryService};
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, watch},
};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    config::AgentConfig,
    handoff::{Predecessor, Successor},
    metrics::EbpfCollector,
    sockmap::SockmapSwitch,
};

/// Runs the agent until it is told to stop or hands over to a successor.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let workers = match cfg.runtime.worker_threads {
        0 => std::thread::available_parallelism().map_or(2, usize::from),
        n => n,
    };
    let dataplane =
        Workers::start(workers, "nm-dataplane").context("starting the data-plane workers")?;
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let result = control.block_on(agent(cfg, dataplane.clone()));
    dataplane.shutdown(Duration::from_secs(1));
    result
}

/// Removes nodemesh from the node: everything attached and pinned under `bpffs_dir`.
pub fn cleanup(cfg: &AgentConfig) -> anyhow::Result<()> {
    let report = nodemesh_loader::cleanup(&cfg.bpffs_dir)
        .with_context(|| format!("removing what is pinned under {}", cfg.bpffs_dir.display()))?;
    for path in &report.removed {
        info!(%path, "removed");
    }
    for file in [
        cfg.state_file(),
        cfg.registry_socket(),
        cfg.admin_socket(),
        cfg.handoff_socket(),
    ] {
        if std::fs::remove_file(&file).is_ok() {
            info!(path = %file.display(), "removed");
        }
    }
    let _ = std::fs::remove_dir(&cfg.run_dir);
    info!(
        removed = report.removed.len(),
        "nodemesh removed from this node"
    );
    Ok(())
}

async fn agent(cfg: AgentConfig, data: Workers) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating the run directory {}", cfg.run_dir.display()))?;

    // 1. Kernel programs.
    let datapath_cfg = DatapathConfig {
        cgroup: cfg.cgroup_path.clone(),
        bpffs_dir: cfg.bpffs_dir.clone(),
        max_pods: cfg.limits.max_pods,
        max_connections: cfg.limits.max_connections,
        kernel_log_level: cfg.log.kernel,
    };
    let mut datapath = Datapath::load(&datapath_cfg).context("loading the kernel programs")?;
    if let Some(logs) = datapath.take_logger() {
        tokio::spawn(pump_kernel_logs(logs));
    }
    let pin_dir = datapath.pin_dir().to_owned();

    // 2. NM_CONFIG and the sockmap switch.
    let sockmap = {
        let (pin_dir, proxy, mode, timeout) = (
            pin_dir.clone(),
            cfg.proxy.clone(),
            cfg.sockmap.mode,
            cfg.sockmap.selftest_timeout,
        );
        tokio::task::spawn_blocking(move || SockmapSwitch::init(&pin_dir, &proxy, mode, timeout))
            .await
            .context("sockmap self-test task")?
            .context("configuring the kernel programs")?
    };
    let sockmap = Arc::new(sockmap);

    // 3. A predecessor to take over from?
    let mut predecessor = if cfg.handoff.enabled {
        Predecessor::connect(&cfg.handoff_socket())
            .await
            .context("asking the running agent to hand over")?
    } else {
        None
    };
    let inherited_listener = match &mut predecessor {
        Some(p) => p
            .take_listener()
            .await
            .context("receiving the proxy listener")?,
        None => None,
    };

    // 4. The pod registry.
    let mut metrics = prometheus_client::registry::Registry::default();
    metrics.register_collector(Box::new(EbpfCollector::new(pin_dir.clone())));
    data.register(&mut metrics);
    let selector = cfg.selector().context("namespace_selector")?;
    let mut registry = Registry::new(
        RegistryConfig {
            namespace_selector: selector,
            attach_cgroup: cfg.cgroup_path.clone(),
            max_pods: cfg.limits.max_pods as usize,
            state_file: Some(cfg.state_file()),
        },
        PodMap::open(&pin_dir).context("opening the pod map")?,
        &mut metrics,
    )
    .context("starting the pod registry")?;
    registry.restore().context("restoring the pod registry")?;
    let table = registry.table();
    let registry = Arc::new(Mutex::new(registry));

    // 5. The proxy.
    let proxy_metrics = ProxyMetrics::register(&mut metrics);
    let orig_dst = Arc::new(KernelOrigDst::new(
        OrigDstMap::open(&pin_dir).context("opening NM_ORIG_DST")?,
    ));
    // A control plane alone turns the L7 proxy on, with nothing static.
    let l7_config = cfg.proxy.l7.clone().or_else(|| {
        (!cfg.control_plane.is_empty()).then(nodemesh_proxy::config::L7Config::default)
    });
    let l7 = match &l7_config {
        Some(l7) => {
            let engine = start_l7(&cfg, l7, &table, &data, &mut metrics)?;
            // The bootstrap's parse is over: give its memory back.
            nodemesh_config::memory::release_free_memory();
            engine.reporter().set_tcp_metrics(proxy_metrics.tcp());
            Some(engine)
        }
        None => None,
    };
    let outbound = Outbound::new(
        cfg.proxy.clone(),
        orig_dst,
        table,
        proxy_metrics,
        l7.clone(),
    );
    let listener = match inherited_listener {
        Some(l) => l,
        None => outbound::bind(&cfg.proxy)
            .with_context(|| format!("binding the proxy listener {}", cfg.proxy.listen))?,
    };
    let (stop_accept, stop_accept_rx) = watch::channel(false);
    let accept = data.home().spawn({
        let (outbound, workers) = (outbound.clone(), data.clone());
        async move {
            let listener = TcpListener::from_std(listener)?;
            Ok::<_, std::io::Error>(outbound.serve(listener, workers, stop_accept_rx).await)
        }
    });
    if let Some(p) = predecessor.take() {
        p.receive_connections(outbound.clone(), data.clone());
    }

    // 6. Registry API, admin, handoff socket.
    let (stop_servers, stop_servers_rx) = watch::channel(false);
    let registry_api = serve_registry(&cfg, registry.clone(), stop_servers_rx.clone())?;
    let mut kube_summary = None;
    let kube_source = if cfg.kubernetes.enabled {
        let source_metrics = nodemesh_kube::SourceMetrics::register(&mut metrics);
        let (client, api_server) = kube_client(&cfg).await?;
        kube_summary = Some((
            cfg.kubernetes.node_name.clone(),
            api_server,
            source_metrics.clone(),
        ));
        let source = nodemesh_kube::SourceConfig {
            node_name: cfg.kubernetes.node_name.clone(),
            kubepods_cgroup: cfg.kubepods_cgroup().to_owned(),
            proc_path: cfg.kubernetes.proc_path.clone(),
            retry_interval: cfg.kubernetes.retry_interval,
        };
        Some(tokio::spawn(nodemesh_kube::run(
            client,
            source,
            registry.clone(),
            source_metrics,
        )))
    } else {
        None
    };
    let admin_state = Arc::new(AdminState {
        ready: false.into(),
        metrics,
        pin_dir: pin_dir.clone(),
        cgroup: cfg.cgroup_path.clone(),
        programs: datapath.programs().to_vec(),
        checks: datapath.checks().to_vec(),
        sockmap,
        registry: registry.clone(),
        outbound: outbound.clone(),
        l7,
        proxy_listen: cfg.proxy.listen,
        kubernetes: kube_summary,
    });
    let admin_tcp = bind_admin_tcp(&cfg).await?;
    let admin_unix = bind_unix(&cfg.admin_socket())?;
    let admin = tokio::spawn(admin::serve(
        admin_state.clone(),
        admin_tcp,
        admin_unix,
        stop_servers_rx,
    ));
    let handoff_listener = if cfg.handoff.enabled {
        Some(handoff::Listener::bind(&cfg.handoff_socket()).context("binding the handoff socket")?)
    } else {
        None
    };
    admin_state.ready.store(true, Ordering::Relaxed);
    info!(
        proxy = %cfg.proxy.listen,
        admin = %cfg.admin.listen,
        registry = %cfg.registry_socket().display(),
        "nodemesh agent ready"
    );

    // Until a signal or a successor.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let successor = async {
        match &handoff_listener {
            Some(l) => l.accept().await,
            None => std::future::pending().await,
        }
    };
    let stopping = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: draining"); None }
        _ = sigint.recv() => { info!("SIGINT: draining"); None }
        r = successor => match r {
            Ok(channel) => Some(channel),
            Err(e) => { error!(error = %e, "handoff socket failed; draining"); None }
        },
    };

    // Stop taking new work: registry and admin first (a successor needs their sockets and
    // a final state file), then the accept loop.
    admin_state.ready.store(false, Ordering::Relaxed);
    // The pod source stops with the registry API: a successor reads a final state file and
    // takes over the watch.
    if let Some(task) = &kube_source {
        task.abort();
    }
    let _ = stop_servers.send(true);
    // The registry API shuts down gracefully, which waits for clients to hang up; a client
    // that never does must not hold the agent (or its successor) hostage.
    for (what, task) in [("registry API", registry_api), ("admin", admin)] {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            warn!(server = what, "did not stop in time; closing it");
            abort.abort();
        }
    }
    let _ = stop_accept.send(true);
    let listener = match accept.await {
        Ok(Ok(l)) => Some(l),
        Ok(Err(e)) => {
            warn!(error = %e, "proxy listener failed");
            None
        }
        Err(e) => {
            warn!(error = %e, "accept task failed");
            None
        }
    };
    let _guard = data.home().enter();
    let listener = listener.and_then(|l| l.into_std().ok());

    match stopping {
        Some(channel) => {
            Successor::new(channel, &outbound, cfg.handoff.park_timeout)
                .hand_over(listener)
                .await;
        }
        None => {
            // No successor yet: close the listener (new connects are refused until an agent
            // binds again), keep relaying, and still hand over if a successor appears.
            drop(listener);
            if let Some(l) = &handoff_listener {
                tokio::select! {
                    () = wait_idle(&outbound) => {}
                    r = l.accept() => if let Ok(channel) = r {
                        Successor::new(channel, &outbound, cfg.handoff.park_timeout).hand_over(None).await;
                    },
                    () = tokio::time::sleep(cfg.handoff.drain_timeout) => {}
                }
            }
        }
    }
    drain(&outbound, cfg.handoff.drain_timeout).await;
    drop(handoff_listener);
    info!("nodemesh agent stopped; the kernel programs stay attached");
    Ok(())
}

/// Waits until no connection is relayed, or `timeout`.
async fn drain(outbound: &Outbound, timeout: Duration) {
    let active = outbound.active_connections();
    if active == 0 {
        return;
    }
    info!(active, ?timeout, "waiting for connections to end");
    if tokio::time::timeout(timeout, wait_idle(outbound))
        .await
        .is_err()
    {
        warn!(
            active = outbound.active_connections(),
            "drain timeout: closing the remaining connections"
        );
    }
}

async fn wait_idle(outbound: &Outbound) {
    while outbound.active_connections() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

async fn bind_admin_tcp(cfg: &AgentConfig) -> anyhow::Result<TcpListener> {
    // A predecessor that just handed over may still be closing its admin socket.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(cfg.admin.listen).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("binding admin {}", cfg.admin.listen)),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("binding admin {}", cfg.admin.listen)),
        None => bail!("binding admin {}", cfg.admin.listen),
    }
}

fn serve_registry(
    cfg: &AgentConfig,
    registry: Arc<Mutex<Registry<PodMap>>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind_unix(&cfg.registry_socket())?;
    let service = RegistryService::new(registry);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
        {
            error!(error = %e, "registry API failed");
        }
    }))
}

/// The API server client: `kubernetes.kubeconfig`, else in-cluster / `$KUBECONFIG`.
async fn kube_client(cfg: &AgentConfig) -> anyhow::Result<(kube::Client, String)> {
    let config = match &cfg.kubernetes.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration (in-cluster service account or $KUBECONFIG)",
        )?,
    };
    let api_server = config.cluster_url.to_string();
    info!(%api_server, node = %cfg.kubernetes.node_name, "Kubernetes pod source");
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    Ok((client, api_server))
}

/// Forwards the kernel programs' aya-log records to the log.
async fn pump_kernel_logs(logs: nodemesh_loader::datapath::KernelLogs) {
    // SAFETY: `KernelLogs` owns its ring buffer's descriptor for as long as the AsyncFd
    // holds it, and nothing else closes it.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(logs) } {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "cannot watch the kernel log buffer"),
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => return warn!(error = %e, "kernel log buffer failed"),
        }
    }
}

/// The L7 proxy of `proxy.l7`: its bootstrap read and checked (a configuration with errors
/// stops the agent at start, naming them), its engine started on the data-plane runtime,
/// its statistics in the agent's registry.
/// Starts the ADS client: each snapshot it publishes updates the engine in place (clusters
/// that did not change keep their pools and health; connections the new listeners still
/// match carry on), and its state is on the admin port (`/xds`) and in `nodemesh status`.
/// Must run inside the data-plane runtime.
fn follow_control_plane(
    engine: &Arc<nodemesh_http::Engine>,
    client: nodemesh_xds::client::ClientConfig,
    metrics: &mut prometheus_client::registry::Registry,
) {
    let server = client.server.clone();
    let xds_metrics = nodemesh_xds::client::Metrics::register(metrics);
    let target = Arc::downgrade(engine);
    let client = nodemesh_xds::client::spawn(client, xds_metrics, move |snapshot| {
        if let Some(engine) = target.upgrade() {
            let summary = engine.update(snapshot);
            info!(?summary, "xDS configuration applied");
        }
        std::future::ready(())
    });
    engine.set_config_source(Arc::new(client));
    info!(%server, "following the xDS control plane");
}

/// This node's name for the control plane: the Kubernetes node name when known.
fn node_name(cfg: &AgentConfig) -> String {
    if !cfg.kubernetes.node_name.is_empty() {
        return cfg.kubernetes.node_name.clone();
    }
    std::env::var("NODE_NAME")
        .or_else(|_| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|_| "node".into())
}

fn start_l7(
    cfg: &AgentConfig,
    l7: &nodemesh_proxy::config::L7Config,
    table: &nodemesh_workloads::SharedPodTable,
    data: &Workers,
    metrics: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Arc<nodemesh_http::Engine>> {
    let reading = || format!("reading proxy.l7.bootstrap {}", l7.bootstrap.display());
    let text = if l7.bootstrap.as_os_str().is_empty() {
        "static_resources: {}\n".to_owned()
    } else {
        std::fs::read_to_string(&l7.bootstrap).with_context(reading)?
    };
    // A bootstrap with `dynamic_resources` is followed through its ADS control plane, as
    // `nodemesh proxy -c` and Envoy follow it; so is the agent's `control_plane`. The static
    // resources are the first snapshot.
    let control_plane =
        (!cfg.control_plane.is_empty()).then(|| nodemesh_xds::startup::ControlPlane {
            authority: cfg.control_plane.clone(),
            node_id: format!("nodemesh~{}~{}", cfg.proxy.listen.ip(), node_name(cfg)),
        });
    let nodemesh_xds::startup::Start {
        translated,
        xds: ads,
    } = nodemesh_xds::startup::read(&text, control_plane)
        .with_context(|| format!("proxy.l7.bootstrap {}", l7.bootstrap.display()))?;
    for w in &translated.diagnostics.warnings {
        warn!(bootstrap = %l7.bootstrap.display(), "{w}");
    }
    if !translated.diagnostics.errors.is_empty() {
        for e in &translated.diagnostics.errors {
            error!(bootstrap = %l7.bootstrap.display(), "{e}");
        }
        bail!(
            "proxy.l7.bootstrap {}: {} error(s) (see the log)",
            l7.bootstrap.display(),
            translated.diagnostics.errors.len()
        );
    }
    let snapshot = translated
        .snapshot
        .context("the bootstrap produced no configuration")?;
    let defaults = nodemesh_http::TenantLimits::default();
    let limits = nodemesh_http::TenantLimits {
        max_connections: u32::try_from(cfg.proxy.max_connections_per_pod).unwrap_or(u32::MAX),
        max_requests: l7.max_requests_per_pod.unwrap_or(defaults.max_requests),
        max_pending: l7.max_pending_per_pod.unwrap_or(defaults.max_pending),
    };
    let connector = Arc::new(nodemesh_proxy::outbound::PodConnector::new(
        table.clone(),
        cfg.proxy.mark,
    ));
    let _runtime = data.home().enter();
    let engine = nodemesh_http::Engine::new(snapshot, connector, limits, metrics);
    engine.set_close_denied_on_update(l7.close_denied_on_update);
    if let Some(queue) = l7.access_log_queue {
        engine.set_access_log_queue(queue);
    }
    engine
        .reporter()
        .set_workloads(Arc::new(nodemesh_proxy::outbound::PodNames(table.clone())));
    info!(bootstrap = %l7.bootstrap.display(), listeners = engine.state().snapshot.listeners.len(), "L7 proxy configured");
    match ads {
        Some(client) => follow_control_plane(&engine, client, metrics),
        // Static configuration only: Envoy's API is not read again.
        None => nodemesh_config::pool::release(),
    }
    Ok(engine)
}
