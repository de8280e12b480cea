//! The registry's state file, so that a restarted agent knows the pods it served.
//!
//! Written atomically (temporary file + rename) after every change; read once at start.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::pod::PodSpec;

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub version: u32,
    pub next_id: u32,
    pub pods: Vec<StoredPod>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredPod {
    pub id: u32,
    pub spec: PodSpec,
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an empty one when there is no file yet.
    pub fn load(&self) -> io::Result<State> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(e),
        };
        let state: State = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.version != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "state version {} (this agent reads {VERSION})",
                    state.version
                ),
            ));
        }
        Ok(state)
    }

    pub fn save(&self, state: &mut State) -> io::Result<()> {
        state.version = VERSION;
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }
}
