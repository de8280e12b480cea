use std::path::PathBuf;

/// What can go wrong while loading, attaching, adopting or reading the kernel side.
/// Each message names the object and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("the kernel lacks features nodemesh needs: {}", .0.join("; "))]
    MissingFeatures(Vec<String>),
    #[error("the embedded eBPF object is empty: this binary was built with AYA_BUILD_SKIP=1")]
    NoObject,
    #[error("loading the eBPF object failed (is the pinned map layout from another version? remove {pin_dir} with `nodemesh agent --cleanup`): {}", chain(.source))]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program} was rejected by the kernel: {}", chain(.source))]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {detail}")]
    Map { map: String, detail: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl LoaderError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn map(map: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Map {
            map: map.into(),
            detail: detail.to_string(),
        }
    }
}

/// `error: cause: cause`, because aya's syscall errors keep the errno in their source.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}
