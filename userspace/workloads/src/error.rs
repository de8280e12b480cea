/// Why the registry refused a request. Nothing changed when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request itself is malformed; each entry names a field and the problem.
    #[error("invalid pod: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The request is well-formed but does not fit the node (missing netns, wrong cgroup,
    /// an address another pod owns).
    #[error("{0}")]
    Conflict(String),
    /// A configured bound was reached.
    #[error("{0}")]
    Full(String),
    /// The kernel maps could not be updated.
    #[error("updating the pod map failed: {0}")]
    Map(#[from] nodemesh_loader::LoaderError),
}

impl From<RegistryError> for tonic::Status {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::Invalid(_) => Self::invalid_argument(message),
            RegistryError::Conflict(_) => Self::failed_precondition(message),
            RegistryError::Full(_) => Self::resource_exhausted(message),
            RegistryError::Map(_) => Self::internal(message),
        }
    }
}
