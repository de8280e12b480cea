//! `tracing` setup for the binaries.
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. `RUST_LOG` wins over `default_filter` (e.g. `info`,
/// `nodemesh=debug`). Records of the `log` crate (the kernel programs' aya-log messages)
/// are forwarded too.
pub fn init(default_filter: &str, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .map_err(|e| format!("log filter {default_filter:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    // stderr, like Envoy: stdout stays free for a command's own output.
    let result = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_target(true).with_writer(std::io::stderr))
            .try_init()
    };
    result.map_err(|e| e.to_string())
}
