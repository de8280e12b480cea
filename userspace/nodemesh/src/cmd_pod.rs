//! `nodemesh pod ...` and `nodemesh namespace ...`: clients of the registry API.
use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use nodemesh_api::registry as api;

#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Register a pod (or replace the pod with the same namespace and name).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        /// The pod's addresses (repeat for several).
        #[arg(long = "ip", required = true)]
        ips: Vec<String>,
        /// The pod's network namespace file.
        #[arg(long)]
        netns: String,
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: String,
        /// Labels as key=value (repeat for several).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        service_account: String,
        #[arg(long, default_value = "")]
        workload: String,
    },
    /// Unregister a pod.
    Remove {
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
    },
    /// List the pods.
    List {
        #[arg(long, default_value = "")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Replace a namespace's labels, e.g. `nodemesh namespace label shop nodemesh.io/acceleration=enabled`.
    Label {
        namespace: String,
        #[arg(value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

async fn client(
    run_dir: &Path,
) -> anyhow::Result<api::pod_registry_client::PodRegistryClient<tonic::transport::Channel>> {
    let socket = run_dir.join("registry.sock");
    nodemesh_workloads::api::connect(&socket)
        .await
        .with_context(|| {
            format!(
                "no agent answers at {} (is it running? --run-dir)",
                socket.display()
            )
        })
}

fn status_err(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code(), e.message())
}

fn print_status(s: &api::PodStatus) {
    let pod = s.pod.clone().unwrap_or_default();
    println!(
        "{}/{}\tmesh={}\tnetns_cookie={}\tid={}\tips={}",
        pod.namespace,
        pod.name,
        if s.enabled { "yes" } else { "no" },
        s.netns_cookie,
        s.pod_id,
        pod.ips.join(",")
    );
}

pub async fn pod(run_dir: &Path, cmd: PodCommand) -> anyhow::Result<()> {
    let mut c = client(run_dir).await?;
    match cmd {
        PodCommand::Add {
            name,
            namespace,
            ips,
            netns,
            cgroup,
            labels,
            service_account,
            workload,
        } => {
            let pod = api::Pod {
                name,
                namespace,
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                ips,
                netns_path: netns,
                cgroup_path: cgroup,
                service_account,
                workload,
            };
            let r = c
                .add_pod(api::AddPodRequest { pod: Some(pod) })
                .await
                .map_err(status_err)?
                .into_inner();
            match r.status {
                Some(s) => print_status(&s),
                None => bail!("the agent answered without a status"),
            }
        }
        PodCommand::Remove { name, namespace } => {
            let r = c
                .remove_pod(api::RemovePodRequest { namespace, name })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "{}",
                if r.removed {
                    "removed"
                } else {
                    "not registered"
                }
            );
        }
        PodCommand::List { namespace } => {
            let r = c
                .list_pods(api::ListPodsRequest { namespace })
                .await
                .map_err(status_err)?
                .into_inner();
            for s in &r.pods {
                print_status(s);
            }
        }
    }
    Ok(())
}

pub async fn namespace(run_dir: &Path, cmd: NamespaceCommand) -> anyhow::Result<()> {
    let mut c = client(run_dir).await?;
    match cmd {
        NamespaceCommand::Label { namespace, labels } => {
            let r = c
                .set_namespace_labels(api::SetNamespaceLabelsRequest {
                    namespace,
                    labels: labels.into_iter().collect(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for s in &r.pods {
                print_status(s);
            }
        }
    }
    Ok(())
}
