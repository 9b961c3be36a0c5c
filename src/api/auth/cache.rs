//! A small map whose entries expire, with a bound on its size.
//!
//! Hand-written (40 lines) rather than a caching crate: each entry needs its own lifetime
//! (allowed answers are kept longer than denied ones, as kubelet does) and the set is
//! small; a general cache such as moka would add a dozen crates to a binary whose size
//! is its idle memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
    max: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(max: usize) -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
            max,
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((expires, v)) if *expires > Instant::now() => Some(v.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max {
            entries.retain(|_, (expires, _)| *expires > now);
            // Still full (a flood of distinct tokens): start over rather than grow; the
            // cost is more reviews, never more memory.
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(key, (now + ttl, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let c = TtlCache::new(2);
        c.insert(1, "a", Duration::from_secs(60));
        c.insert(2, "b", Duration::ZERO);
        assert_eq!(c.get(&1), Some("a"));
        assert_eq!(c.get(&2), None);
        c.insert(3, "c", Duration::from_secs(60));
        c.insert(4, "d", Duration::from_secs(60));
        assert!(c.entries.lock().unwrap().len() <= 2);
        assert_eq!(c.get(&4), Some("d"));
    }
}
