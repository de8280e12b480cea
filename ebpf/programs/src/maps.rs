//! Every map the programs use, and the small helpers around them.
//!
//! Maps that carry state across an agent restart are pinned by name under the agent's
//! pin directory (`PinningType::ByName` via `::pinned`); the agent adopts them on start.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use nodemesh_common::{Config, Counter, OrigDst, PodEntry, SockKey, defaults};

#[map(name = "NM_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "NM_PODS")]
pub static PODS: HashMap<u64, PodEntry> = HashMap::pinned(defaults::MAX_PODS, 0);

#[map(name = "NM_PENDING")]
pub static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(defaults::MAX_PENDING, 0);

#[map(name = "NM_ORIG_DST")]
pub static ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(defaults::MAX_ORIG_DST, 0);

#[map(name = "NM_SOCKS")]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(defaults::MAX_SOCKS, 0);

/// Not an LRU: an evicted entry would let a socket that already fell back to the stack
/// redirect again and reorder its stream. Entries are removed when the socket closes.
#[map(name = "NM_ACCEL")]
pub static ACCEL: HashMap<SockKey, u32> = HashMap::pinned(defaults::MAX_SOCKS, 0);

#[map(name = "NM_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    add(counter, 1);
}

/// Adds `n` to `counter` on this CPU.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only ever touched by programs running on this CPU, and
        // BPF programs are not preempted by each other on one CPU for these hook types.
        unsafe { *slot += n };
    }
}

/// The agent's run-time configuration; `None` until the agent has written it.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    let cfg = CONFIG.get(0)?;
    // A zero port means the agent has not configured the proxy yet: capture nothing.
    if cfg.proxy_port == 0 { None } else { Some(cfg) }
}

/// The pod that owns network namespace `netns_cookie`, if it is mesh-enabled.
#[inline(always)]
pub fn pod(netns_cookie: u64) -> Option<PodEntry> {
    // SAFETY: the value is plain data copied out of the map.
    unsafe { PODS.get(netns_cookie) }.copied()
}
