//! Per-source-pod connection limits: one pod opening connections without bound must not
//! take the proxy's capacity from the others.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Counts proxied connections per source pod (by netns cookie).
#[derive(Debug)]
pub struct PodLimits {
    max_per_pod: usize,
    active: Mutex<HashMap<u64, usize>>,
}

/// A held slot; releasing it on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<PodLimits>,
    pod: u64,
}

impl PodLimits {
    pub fn new(max_per_pod: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_pod,
            active: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `pod`, or `None` when it already holds `max_per_pod` connections.
    pub fn try_acquire(self: &Arc<Self>, pod: u64) -> Option<Permit> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let n = active.entry(pod).or_insert(0);
        if *n >= self.max_per_pod {
            return None;
        }
        *n += 1;
        Some(Permit {
            limits: self.clone(),
            pod,
        })
    }

    /// Connections `pod` holds now.
    #[cfg(test)]
    pub fn active(&self, pod: u64) -> usize {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pod)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut active = self.limits.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = active.get_mut(&self.pod) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.pod);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_pod_and_released_on_drop() {
        let limits = PodLimits::new(2);
        let a1 = limits.try_acquire(1).expect("first");
        let _a2 = limits.try_acquire(1).expect("second");
        assert!(limits.try_acquire(1).is_none(), "third must be refused");
        let _b = limits.try_acquire(2).expect("another pod is unaffected");
        drop(a1);
        assert_eq!(limits.active(1), 1);
        assert!(limits.try_acquire(1).is_some());
    }
}
