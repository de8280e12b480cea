//! Metric handles found by borrowed labels.
//!
//! A `prometheus_client` family is looked up by an owned label set: on the request path
//! that is an allocation per label and a SipHash per family, for every request. A
//! [`SeriesCache`] keeps each label set's handles (shared with the families: what is
//! recorded through them is what the families encode) under a hash of the *borrowed*
//! labels, so a request finds its series with one hash, one read lock and a comparison.
//! Bounded as the families it mirrors are.
use std::{
    hash::{BuildHasher, Hash},
    sync::{Arc, RwLock},
};

/// Series of type `T` by the hash of what identifies them.
#[derive(Debug)]
pub struct SeriesCache<T> {
    series: RwLock<foldhash::HashMap<u64, Vec<Arc<T>>>>,
    hasher: foldhash::fast::RandomState,
}

impl<T> Default for SeriesCache<T> {
    fn default() -> Self {
        Self {
            series: RwLock::default(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T> SeriesCache<T> {
    /// The series `key` identifies: the one for which `is` holds among those with `key`'s
    /// hash, or a new one from `make` (called once per series, under the write lock).
    pub fn get_or_insert(
        &self,
        key: impl Hash,
        is: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let hash = self.hasher.hash_one(key);
        let find = |map: &foldhash::HashMap<u64, Vec<Arc<T>>>| {
            map.get(&hash)
                .and_then(|v| v.iter().find(|s| is(s)).cloned())
        };
        if let Some(s) = find(&self.series.read().unwrap_or_else(|p| p.into_inner())) {
            return s;
        }
        let mut map = self.series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = find(&map) {
            return s;
        }
        let series = Arc::new(make());
        map.entry(hash).or_default().push(series.clone());
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_each_series_once_and_tells_equal_hashes_apart() {
        let cache = SeriesCache::<String>::default();
        let mut made = 0;
        let a = cache.get_or_insert(
            "a",
            |s| s == "a",
            || {
                made += 1;
                "a".to_owned()
            },
        );
        let again = cache.get_or_insert("a", |s| s == "a", || unreachable!("made twice"));
        assert!(Arc::ptr_eq(&a, &again));
        // The same hash, another identity (what a collision looks like): a second series.
        let other = cache.get_or_insert("a", |s| s == "b", || "b".to_owned());
        assert_eq!(*other, "b");
        assert_eq!(made, 1);
        assert!(Arc::ptr_eq(
            &other,
            &cache.get_or_insert("a", |s| s == "b", || unreachable!("made twice"))
        ));
    }
}
