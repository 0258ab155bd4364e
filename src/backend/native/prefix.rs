//! The prefix cache: keys and values of prompt prefixes computed before, shared by every
//! session of a backend, so a request that starts like an earlier one (the same system
//! prompt, the same tool list, the earlier turns of a conversation) prefills only the rest.
//!
//! Prefixes are kept in blocks of `BLOCK` positions. A block is named by a hash chained over
//! every token before its end (a block's keys and values depend on all of them) and stores its
//! own tokens and its parent's name, which a lookup compares: a hit is exact, not a guess.
//! Memory is bounded by a byte budget with least-recently-used eviction; a chain is touched
//! from its end back to its start, so the deepest blocks are evicted first and a shared system
//! prompt outlives the questions that followed it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use super::kv::KvBlock;

/// Positions per block: 32 keeps the part of a prompt that cannot be reused short (at most 31
/// positions after the last whole block) at 0.8 MB per block for the 0.5B model's f32 cache.
pub const BLOCK: usize = 32;

struct Entry {
    parent: u64,
    tokens: Vec<u32>,
    kv: Arc<KvBlock>,
    last_used: u64,
}

/// What `stats` reports (as `prefix_cache`, on the wire as is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefixStats {
    /// Prompts (of at least one whole 32-token block) that reused at least one block, from
    /// the cache or already held by their session (a service slot).
    pub hits: u64,
    /// Prompts of at least one whole block that reused less.
    pub misses: u64,
    /// Prompt positions reused instead of computed.
    pub tokens_saved: u64,
    pub blocks: usize,
    pub bytes: usize,
    pub budget_bytes: usize,
}

pub struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: HashMap<u64, Entry>,
    hits: u64,
    misses: u64,
    tokens_saved: u64,
}

/// The name of the block holding `tokens` after the block named `parent` (0: the start).
fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 names the start of every chain.
    h.finish().max(1)
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0: off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
            hits: 0,
            misses: 0,
            tokens_saved: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// The blocks of the longest cached prefix of `tokens` (whole blocks only), marked as
    /// recently used.
    pub fn lookup(&mut self, tokens: &[u32]) -> Vec<Arc<KvBlock>> {
        let mut found = Vec::new();
        let mut keys = Vec::new();
        let mut parent = 0;
        for block in tokens.chunks_exact(BLOCK) {
            let key = block_key(parent, block);
            let Some(e) = self.held(key, parent, block) else {
                break;
            };
            found.push(Arc::clone(&e.kv));
            keys.push(key);
            parent = key;
        }
        self.touch(&keys);
        found
    }

    /// Records how many positions of a prompt (of at least one whole block) were reused,
    /// from this cache or already held by the session: a hit from one whole block on.
    pub fn record(&mut self, reused: usize) {
        if reused >= BLOCK {
            self.hits += 1;
            self.tokens_saved += reused as u64;
        } else {
            self.misses += 1;
        }
    }

    /// Offers the whole blocks of `tokens`: `kv(pos0, n)` copies positions `pos0..pos0 + n`
    /// out of the caller's cache, called only for blocks not held yet. Stops when a block does
    /// not fit in the budget.
    pub fn insert(&mut self, tokens: &[u32], mut kv: impl FnMut(usize, usize) -> KvBlock) {
        if !self.is_enabled() {
            return;
        }
        let mut keys = Vec::new();
        let mut parent = 0;
        for (i, block) in tokens.chunks_exact(BLOCK).enumerate() {
            let key = block_key(parent, block);
            if self.held(key, parent, block).is_none() {
                let data = kv(i * BLOCK, BLOCK);
                let bytes = data.bytes();
                // The chain so far is never the victim.
                if !self.make_room(bytes, &keys) {
                    break;
                }
                self.used += bytes;
                // A different block under the same name (a hash collision) is replaced.
                let replaced = self.entries.insert(
                    key,
                    Entry {
                        parent,
                        tokens: block.to_vec(),
                        kv: Arc::new(data),
                        last_used: 0,
                    },
                );
                if let Some(old) = replaced {
                    self.used -= old.kv.bytes();
                }
            }
            keys.push(key);
            parent = key;
        }
        self.touch(&keys);
    }

    /// The entry named `key`, if it holds exactly `block` after `parent`.
    fn held(&self, key: u64, parent: u64, block: &[u32]) -> Option<&Entry> {
        self.entries
            .get(&key)
            .filter(|e| e.parent == parent && e.tokens == block)
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            hits: self.hits,
            misses: self.misses,
            tokens_saved: self.tokens_saved,
            blocks: self.entries.len(),
            bytes: self.used,
            budget_bytes: self.budget,
        }
    }

    /// Marks a chain as just used, its start most recently (evicted last).
    fn touch(&mut self, chain: &[u64]) {
        for key in chain.iter().rev() {
            self.clock += 1;
            if let Some(e) = self.entries.get_mut(key) {
                e.last_used = self.clock;
            }
        }
    }

    /// Evicts least recently used blocks (never those in `keep`) until `bytes` more fit.
    fn make_room(&mut self, bytes: usize, keep: &[u64]) -> bool {
        if bytes > self.budget {
            return false;
        }
        while self.used + bytes > self.budget {
            let victim = self
                .entries
                .iter()
                .filter(|(k, _)| !keep.contains(k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&k, _)| k);
            match victim.and_then(|k| self.entries.remove(&k)) {
                Some(e) => self.used -= e.kv.bytes(),
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::native::kv::KvCache;
    use crate::backend::native::model::Dims;
    use crate::backend::KvCacheType;

    /// A cache of 4 positions × 1 layer × 1 head × 2 dims of f32: 64 bytes per block.
    fn filled(tokens: usize) -> KvCache {
        let d = Dims {
            vocab: 10,
            hidden: 2,
            intermediate: 2,
            ffn_width: 2,
            experts: 0,
            top_k: 0,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            eps: 1e-6,
            dual_chunk: None,
        };
        let mut c = KvCache::new(&d, tokens, KvCacheType::F32);
        c.advance(tokens);
        c
    }

    fn prompt(first: u32, blocks: usize) -> Vec<u32> {
        (0..(blocks * BLOCK) as u32).map(|i| first + i).collect()
    }

    #[test]
    fn finds_the_longest_whole_block_prefix_exactly() {
        let kv = filled(4 * BLOCK);
        let mut p = PrefixCache::new(1 << 20);
        let a = prompt(0, 3);
        p.insert(&a, |pos0, n| kv.copy_out(pos0, n));
        assert_eq!(p.stats().blocks, 3);
        let mut longer = a.clone();
        longer.extend(prompt(1000, 1));
        assert_eq!(p.lookup(&longer).len(), 3);
        let mut changed = a.clone();
        changed[BLOCK + 3] += 1;
        assert_eq!(
            p.lookup(&changed).len(),
            1,
            "stops at the block that differs"
        );
        // The same second block after another first block is another chain.
        let mut other_start = a.clone();
        other_start[0] += 1;
        assert_eq!(p.lookup(&other_start).len(), 0);
    }

    #[test]
    fn stays_within_its_budget_evicting_the_least_recently_used_chain_end_first() {
        let kv = filled(4 * BLOCK);
        let block_bytes = kv.copy_out(0, BLOCK).bytes();
        let mut p = PrefixCache::new(3 * block_bytes);
        let a = prompt(0, 2);
        let b = prompt(5000, 2);
        p.insert(&a, |pos0, n| kv.copy_out(pos0, n));
        p.insert(&b, |pos0, n| kv.copy_out(pos0, n));
        let s = p.stats();
        assert!(s.bytes <= s.budget_bytes && s.blocks == 3, "{s:?}");
        // a's second block went first (deepest of the oldest chain); a's first stays.
        assert_eq!(p.lookup(&a).len(), 1);
        assert_eq!(p.lookup(&b).len(), 2);
        // Too big for the whole budget: nothing inserted, nothing evicted.
        let mut tiny = PrefixCache::new(block_bytes - 1);
        tiny.insert(&a, |pos0, n| kv.copy_out(pos0, n));
        assert_eq!(tiny.stats().blocks, 0);
    }

    #[test]
    fn counts_hits_from_one_whole_block() {
        let mut p = PrefixCache::new(1 << 20);
        p.record(BLOCK - 1);
        p.record(2 * BLOCK);
        let s = p.stats();
        assert_eq!((s.hits, s.misses, s.tokens_saved), (1, 1, 2 * BLOCK as u64));
    }
}
