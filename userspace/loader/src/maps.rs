//! Typed handles to the pinned maps.
//!
//! Every component opens the maps it needs from the pin directory on its own (each open is a
//! new file descriptor), so there is no shared mutable handle to pass around and the CLI can
//! read the same maps while the agent runs, or after it stopped.
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use nodemesh_common::{COUNTERS, Config, CounterInfo, OrigDst, PodEntry, SockKey, map_names};

use crate::LoaderError;

fn open(dir: &Path, name: &str) -> Result<Map, LoaderError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| LoaderError::map(name, format!("open pinned {}: {e}", path.display())))?;
    Map::from_map_data(data).map_err(|e| LoaderError::map(name, e))
}

fn typed<T>(dir: &Path, name: &str) -> Result<T, LoaderError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(open(dir, name)?).map_err(|e| LoaderError::map(name, e))
}

/// aya reports a missing key on delete as the syscall's ENOENT, on lookup as `KeyNotFound`.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `Ok(None)` for a missing key, so that callers only see real failures as errors.
fn found<V>(r: Result<V, MapError>, map: &str) -> Result<Option<V>, LoaderError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(LoaderError::map(map, e)),
    }
}

/// aya's array and sockhash handles have no `Debug`; name the map instead.
macro_rules! debug_as_name {
    ($($ty:ident => $name:expr),* $(,)?) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($name)
            }
        }
    )*};
}

debug_as_name!(ConfigMap => map_names::CONFIG, FastPathMaps => "NM_SOCKS+NM_ACCEL", StatsMap => map_names::STATS);

/// `NM_CONFIG`.
pub struct ConfigMap(Array<MapData, Config>);

impl ConfigMap {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        typed(dir, map_names::CONFIG).map(Self)
    }

    pub fn get(&self) -> Result<Config, LoaderError> {
        self.0
            .get(&0, 0)
            .map_err(|e| LoaderError::map(map_names::CONFIG, e))
    }

    pub fn set(&mut self, cfg: Config) -> Result<(), LoaderError> {
        self.0
            .set(0, cfg, 0)
            .map_err(|e| LoaderError::map(map_names::CONFIG, e))
    }
}

/// `NM_PODS`: netns cookie -> pod.
#[derive(Debug)]
pub struct PodMap(HashMap<MapData, u64, PodEntry>);

impl PodMap {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        typed(dir, map_names::PODS).map(Self)
    }

    /// Fails with a clear error when the map is full (`max_pods` in the agent config).
    pub fn insert(&mut self, netns_cookie: u64, entry: PodEntry) -> Result<(), LoaderError> {
        self.0.insert(netns_cookie, entry, 0).map_err(|e| match &e {
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                LoaderError::map(
                    map_names::PODS,
                    "full: raise `limits.max_pods` in the agent config",
                )
            }
            _ => LoaderError::map(map_names::PODS, e),
        })
    }

    /// Removing a missing entry is not an error.
    pub fn remove(&mut self, netns_cookie: u64) -> Result<(), LoaderError> {
        match self.0.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(LoaderError::map(map_names::PODS, e)),
        }
    }

    pub fn get(&self, netns_cookie: u64) -> Result<Option<PodEntry>, LoaderError> {
        found(self.0.get(&netns_cookie, 0), map_names::PODS)
    }

    pub fn entries(&self) -> Vec<(u64, PodEntry)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

/// `NM_ORIG_DST`: what the proxy consumes after `accept()`.
#[derive(Debug)]
pub struct OrigDstMap(HashMap<MapData, SockKey, OrigDst>);

impl OrigDstMap {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        typed(dir, map_names::ORIG_DST).map(Self)
    }

    /// Looks up and removes the record of the connection `key` (the client's view).
    pub fn take(&mut self, key: &SockKey) -> Result<Option<OrigDst>, LoaderError> {
        let orig = found(self.0.get(key, 0), map_names::ORIG_DST)?;
        if orig.is_some() {
            // Best effort: sockops also removes it when the client socket closes, and the
            // map is an LRU, so a failed delete cannot leak for long.
            let _ = self.0.remove(key);
        }
        Ok(orig)
    }

    pub fn entries(&self) -> Vec<(SockKey, OrigDst)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

/// `NM_PENDING`: socket cookie -> original destination, between connect and establishment.
#[derive(Debug)]
pub struct PendingMap(HashMap<MapData, u64, OrigDst>);

impl PendingMap {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        typed(dir, map_names::PENDING).map(Self)
    }

    pub fn entries(&self) -> Vec<(u64, OrigDst)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

/// `NM_SOCKS` and `NM_ACCEL`: the fast path's sockets.
pub struct FastPathMaps {
    pub socks: SockHash<MapData, SockKey>,
    pub accel: HashMap<MapData, SockKey, u32>,
}

impl FastPathMaps {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        Ok(Self {
            socks: typed(dir, map_names::SOCKS)?,
            accel: typed(dir, map_names::ACCEL)?,
        })
    }

    /// Sockets currently marked as accelerated.
    pub fn accelerated(&self) -> Vec<SockKey> {
        self.accel.keys().filter_map(Result::ok).collect()
    }

    /// Number of sockets in the SockHash.
    pub fn sockhash_len(&self) -> usize {
        self.socks.keys().filter_map(Result::ok).count()
    }
}

/// `NM_STATS`: per-CPU counters.
pub struct StatsMap(PerCpuArray<MapData, u64>);

impl StatsMap {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        typed(dir, map_names::STATS).map(Self)
    }

    /// Every counter summed over CPUs, in the order of [`COUNTERS`].
    pub fn read(&self) -> Result<Vec<(CounterInfo, u64)>, LoaderError> {
        COUNTERS
            .iter()
            .map(|info| {
                let per_cpu = self
                    .0
                    .get(&(info.counter as u32), 0)
                    .map_err(|e| LoaderError::map(map_names::STATS, e))?;
                Ok((*info, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Sizes of every map, for `nodemesh status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MapSizes {
    pub pods: usize,
    pub pending: usize,
    pub orig_dst: usize,
    pub sockhash: usize,
    pub accelerated: usize,
}

/// All of the maps, opened read-mostly for reporting.
#[derive(Debug)]
pub struct PinnedMaps {
    pub dir: PathBuf,
    pub config: ConfigMap,
    pub pods: PodMap,
    pub pending: PendingMap,
    pub orig_dst: OrigDstMap,
    pub fast_path: FastPathMaps,
    pub stats: StatsMap,
}

impl PinnedMaps {
    /// Opens every map pinned under `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        Ok(Self {
            dir: dir.to_owned(),
            config: ConfigMap::open(dir)?,
            pods: PodMap::open(dir)?,
            pending: PendingMap::open(dir)?,
            orig_dst: OrigDstMap::open(dir)?,
            fast_path: FastPathMaps::open(dir)?,
            stats: StatsMap::open(dir)?,
        })
    }

    pub fn sizes(&self) -> MapSizes {
        MapSizes {
            pods: self.pods.entries().len(),
            pending: self.pending.entries().len(),
            orig_dst: self.orig_dst.entries().len(),
            sockhash: self.fast_path.sockhash_len(),
            accelerated: self.fast_path.accelerated().len(),
        }
    }
}
