//! The registry's gRPC API on a unix socket, and a client for it.
use std::{path::Path, sync::Arc};

use hyper_util::rt::TokioIo;
use nodemesh_api::registry::{
    self as api,
    pod_registry_client::PodRegistryClient,
    pod_registry_server::{PodRegistry, PodRegistryServer},
};
use tokio::{net::UnixStream, sync::Mutex};
use tonic::{Request, Response, Status, transport::Channel};

use crate::registry::{PodMapWriter, Registry};

/// Requests larger than this are refused before decoding: a pod is a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The service, sharing the registry with the rest of the agent.
pub struct RegistryService<M> {
    registry: Arc<Mutex<Registry<M>>>,
}

impl<M> std::fmt::Debug for RegistryService<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryService")
    }
}

impl<M: PodMapWriter + 'static> RegistryService<M> {
    pub fn new(registry: Arc<Mutex<Registry<M>>>) -> PodRegistryServer<Self> {
        PodRegistryServer::new(Self { registry }).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl<M: PodMapWriter + 'static> PodRegistry for RegistryService<M> {
    async fn add_pod(
        &self,
        req: Request<api::AddPodRequest>,
    ) -> Result<Response<api::AddPodResponse>, Status> {
        let info = self
            .registry
            .lock()
            .await
            .add_api_pod(req.into_inner().pod)?;
        Ok(Response::new(api::AddPodResponse {
            status: Some(info.status()),
        }))
    }

    async fn remove_pod(
        &self,
        req: Request<api::RemovePodRequest>,
    ) -> Result<Response<api::RemovePodResponse>, Status> {
        let req = req.into_inner();
        let removed = self
            .registry
            .lock()
            .await
            .remove_pod(&req.namespace, &req.name)?;
        Ok(Response::new(api::RemovePodResponse { removed }))
    }

    async fn set_namespace_labels(
        &self,
        req: Request<api::SetNamespaceLabelsRequest>,
    ) -> Result<Response<api::SetNamespaceLabelsResponse>, Status> {
        let req = req.into_inner();
        let pods = self
            .registry
            .lock()
            .await
            .set_namespace_labels(&req.namespace, req.labels.into_iter().collect())?;
        Ok(Response::new(api::SetNamespaceLabelsResponse {
            pods: pods.iter().map(|p| p.status()).collect(),
        }))
    }

    async fn list_pods(
        &self,
        req: Request<api::ListPodsRequest>,
    ) -> Result<Response<api::ListPodsResponse>, Status> {
        let req = req.into_inner();
        let registry = self.registry.lock().await;
        let namespace = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        Ok(Response::new(api::ListPodsResponse {
            pods: registry
                .list(namespace)
                .iter()
                .map(|p| p.status())
                .collect(),
            namespaces: registry
                .namespaces()
                .iter()
                .map(|(ns, labels)| {
                    (
                        ns.clone(),
                        api::NamespaceLabels {
                            labels: labels.clone().into_iter().collect(),
                        },
                    )
                })
                .collect(),
        }))
    }
}

/// A client of the registry socket at `path`.
pub async fn connect(path: &Path) -> Result<PodRegistryClient<Channel>, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector dials the unix socket.
    let channel = tonic::transport::Endpoint::from_static("http://registry.nodemesh.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(PodRegistryClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}
