//! Envoy's v3 configuration, read the way Envoy reads it, into nodemesh's model.
pub mod access_log;
pub mod convert;
pub mod filters;
pub mod matcher;
pub mod model;
pub mod pool;
pub mod support;
pub mod tls;

pub use convert::{
    AdsSource, Resources, Translated, load_bootstrap, load_config_dump, load_file, read_bootstrap,
    translate,
};

/// What can go wrong reading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error("{type_name}: {message}")]
    Mapping { type_name: String, message: String },
    #[error("unknown message type {0}")]
    UnknownType(String),
}
