//! Stable small ids for VIPs and backends: an id stays with its key for as long as the key is
//! applied, and a freed id goes to the back of the queue, so it is reused as late as possible
//! (conntrack entries may still name it for a while).

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

/// Ids `0..capacity` handed out to keys, first free first.
#[derive(Clone, Debug)]
pub(crate) struct Ids<K> {
    by_key: HashMap<K, u32>,
    free: VecDeque<u32>,
}

impl<K: Hash + Eq + Clone> Ids<K> {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            by_key: HashMap::new(),
            free: (0..capacity).collect(),
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The key's id, assigning the first free one to a new key; `None` when none is free.
    pub(crate) fn get_or_assign(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.by_key.get(key) {
            return Some(id);
        }
        let id = self.free.pop_front()?;
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    /// Takes over an id already in use (found in pinned maps).
    pub(crate) fn adopt(&mut self, key: K, id: u32) {
        self.free.retain(|&f| f != id);
        self.by_key.insert(key, id);
    }

    /// Frees the key's id (to the back of the queue); returns it.
    pub(crate) fn release(&mut self, key: &K) -> Option<u32> {
        let id = self.by_key.remove(key)?;
        self.free.push_back(id);
        Some(id)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.by_key.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ids_are_reused_last() {
        let mut ids = Ids::new(3);
        assert_eq!(ids.get_or_assign(&"a"), Some(0));
        assert_eq!(ids.get_or_assign(&"b"), Some(1));
        assert_eq!(ids.release(&"a"), Some(0));
        assert_eq!(ids.get_or_assign(&"c"), Some(2));
        assert_eq!(ids.get_or_assign(&"d"), Some(0));
        assert_eq!(ids.get_or_assign(&"e"), None);
        assert_eq!(ids.get_or_assign(&"b"), Some(1), "a key keeps its id");
    }
}
