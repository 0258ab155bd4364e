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
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::kv::{BlockShape, KvBlock};

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

/// The first bytes of a saved prefix cache (`PrefixCache::save`); the digit is the format's
/// version.
const MAGIC: &[u8; 8] = b"Q2EPFX01";

/// A reader or writer that hashes what passes through it (a saved cache's checksum).
struct Hashing<T> {
    inner: T,
    hash: Sha256,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
        }
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A saved cache that ends early says so (not "failed to fill whole buffer").
fn truncated(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(e.kind(), "the file ends early (truncated)")
    } else {
        e
    }
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

    /// Writes every block to `path` (replaced atomically: a new file renamed over it, readable
    /// by its owner only, as prompts can be private) for `restore` at the next start of the
    /// same model; `identity` names what the keys and values were computed with. Returns the
    /// blocks written.
    ///
    /// The file: `MAGIC`, `identity`, the block count (u64), each block (its parent's index in
    /// the file as u32, `u32::MAX` at a chain's start; its `BLOCK` tokens as u32; its keys and
    /// values, `KvBlock::write_to`), then the SHA-256 of everything before. Blocks are in order
    /// of last use, most recent first, so parents precede their children (a chain is touched
    /// from its end back to its start) and a smaller budget keeps the most recent chains.
    pub fn save(&self, path: &Path, identity: &[u8; 32]) -> Result<usize> {
        let mut order: Vec<(&u64, &Entry)> = self.entries.iter().collect();
        order.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_used));
        let mut index = HashMap::new();
        let mut kept = Vec::new();
        for (key, e) in order {
            // A block whose parent was replaced (a hash collision) is unreachable: left out.
            let parent = match e.parent {
                0 => u32::MAX,
                p => match index.get(&p) {
                    Some(&i) => i,
                    None => continue,
                },
            };
            index.insert(*key, kept.len() as u32);
            kept.push((parent, e));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        // Unique per save: an old and a new version of a model may save at once (a reload).
        static SAVES: AtomicU64 = AtomicU64::new(0);
        let temp = path.with_file_name(format!(
            ".{name}.{}-{}.tmp",
            std::process::id(),
            SAVES.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| -> io::Result<()> {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            let mut w = Hashing::new(BufWriter::new(file));
            w.write_all(MAGIC)?;
            w.write_all(identity)?;
            w.write_all(&(kept.len() as u64).to_le_bytes())?;
            for (parent, e) in &kept {
                w.write_all(&parent.to_le_bytes())?;
                for t in &e.tokens {
                    w.write_all(&t.to_le_bytes())?;
                }
                e.kv.write_to(&mut w)?;
            }
            let digest = w.hash.finalize();
            let mut out = w.inner;
            out.write_all(&digest)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&temp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(kept.len())
    }

    /// Loads what `save` wrote into this (empty) cache, as far as its budget takes the blocks
    /// in the file's order. `Ok(None)`: there is no file. An error (nothing loaded): the file
    /// is damaged or truncated, or was saved for another `identity` or block `shape`.
    pub fn restore(
        &mut self,
        path: &Path,
        identity: &[u8; 32],
        shape: BlockShape,
    ) -> Result<Option<usize>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let context = || format!("saved prefix cache {}", path.display());
        let mut r = Hashing::new(BufReader::new(file));
        let mut head = [0u8; 8 + 32 + 8];
        r.read_exact(&mut head)
            .map_err(truncated)
            .with_context(context)?;
        if &head[..8] != MAGIC {
            bail!("{}: not a prefix cache file", context());
        }
        if &head[8..40] != identity {
            bail!(
                "{}: saved by another model version, variant, KV cache type or kernel set",
                context()
            );
        }
        let count = u64::from_le_bytes(head[40..].try_into().unwrap_or_default());
        if shape.positions != BLOCK || count > usize::MAX as u64 {
            bail!("{}: unusable block count or shape", context());
        }
        // Blocks are checked against the digest before any is used: read into a new table.
        let mut loaded: Vec<Option<(u64, Entry)>> = Vec::new();
        let mut used = 0;
        for i in 0..count as usize {
            let mut parent = [0u8; 4];
            r.read_exact(&mut parent)
                .map_err(truncated)
                .with_context(context)?;
            let mut tokens = vec![0u8; 4 * BLOCK];
            r.read_exact(&mut tokens)
                .map_err(truncated)
                .with_context(context)?;
            let kv = KvBlock::read_from(&mut r, shape)
                .map_err(truncated)
                .with_context(context)?;
            let tokens: Vec<u32> = tokens
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let parent = match u32::from_le_bytes(parent) {
                u32::MAX => Some(0),
                p if (p as usize) < i => loaded[p as usize].as_ref().map(|(key, _)| *key),
                _ => bail!("{}: block {i} names a later parent", context()),
            };
            // Over the budget, or after a block left out: not kept (still read, to check it).
            let fits = used + kv.bytes() <= self.budget;
            loaded.push(parent.filter(|_| fits).map(|parent| {
                used += kv.bytes();
                let key = block_key(parent, &tokens);
                let entry = Entry {
                    parent,
                    tokens,
                    kv: Arc::new(kv),
                    // The file's first block is the most recently used.
                    last_used: count - i as u64,
                };
                (key, entry)
            }));
        }
        let digest = r.hash.finalize();
        let mut stored = [0u8; 32];
        r.inner
            .read_exact(&mut stored)
            .map_err(truncated)
            .with_context(context)?;
        let more = r.inner.read(&mut [0u8; 1]).with_context(context)?;
        if stored[..] != digest[..] || more != 0 {
            bail!("{}: damaged (its checksum does not match)", context());
        }
        let entries: HashMap<u64, Entry> = loaded.into_iter().flatten().collect();
        let restored = entries.len();
        self.used = entries.values().map(|e| e.kv.bytes()).sum();
        self.clock = count;
        self.entries = entries;
        Ok(Some(restored))
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
    use crate::backend::native::kv::{BlockShape, KvCache};
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

    fn dims() -> Dims {
        Dims {
            vocab: 10,
            hidden: 64,
            intermediate: 2,
            ffn_width: 2,
            experts: 0,
            top_k: 0,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            eps: 1e-6,
            dual_chunk: None,
        }
    }

    /// A cache of `element` filled with distinct values at every position.
    fn varied(element: KvCacheType, positions: usize) -> KvCache {
        let d = dims();
        let mut c = KvCache::new(&d, positions, element);
        let width = d.kv_heads * d.head_dim;
        for layer in 0..d.layers {
            let k: Vec<f32> = (0..positions * width)
                .map(|i| (i as f32 * 0.37 + layer as f32).sin())
                .collect();
            let v: Vec<f32> = k.iter().map(|x| x * -2.5 + 0.125).collect();
            c.store(layer, 0, positions, &k, &v);
        }
        c.advance(positions);
        c
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("qwen2-edge-prefix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("model.prefix-cache")
    }

    /// The keys and values of positions `0..n` of `c`, as bytes (for exact comparisons).
    fn bytes_of(c: &KvCache, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        c.copy_out(0, n).write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn a_saved_cache_restores_the_same_blocks_bit_for_bit() {
        for element in [KvCacheType::F32, KvCacheType::F16, KvCacheType::Int8] {
            let kv = varied(element, 3 * BLOCK);
            let mut p = PrefixCache::new(1 << 20);
            let a = prompt(0, 3);
            let b = prompt(7000, 1);
            p.insert(&a, |pos0, n| kv.copy_out(pos0, n));
            p.insert(&b, |pos0, n| kv.copy_out(pos0, n));
            let file = temp_file(&format!("roundtrip-{}", element.as_str()));
            let id = [7u8; 32];
            assert_eq!(p.save(&file, &id).unwrap(), 4);
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&file).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "prompts stay private");

            let shape = BlockShape::of(&dims(), element, BLOCK);
            let mut back = PrefixCache::new(1 << 20);
            assert_eq!(back.restore(&file, &id, shape).unwrap(), Some(4));
            assert_eq!(back.stats().bytes, p.stats().bytes);
            let blocks = back.lookup(&a);
            assert_eq!(blocks.len(), 3, "{element:?}");
            let mut fresh = KvCache::new(&dims(), 3 * BLOCK, element);
            for (i, block) in blocks.iter().enumerate() {
                assert!(fresh.copy_in(i * BLOCK, block));
            }
            assert_eq!(bytes_of(&fresh, 3 * BLOCK), bytes_of(&kv, 3 * BLOCK));
            assert_eq!(back.lookup(&b).len(), 1);
            let _ = std::fs::remove_dir_all(file.parent().unwrap());
        }
    }

    #[test]
    fn a_smaller_budget_restores_the_most_recent_chains_whole() {
        let kv = varied(KvCacheType::F32, 2 * BLOCK);
        let block_bytes = kv.copy_out(0, BLOCK).bytes();
        let mut p = PrefixCache::new(1 << 20);
        let (old, new) = (prompt(0, 2), prompt(9000, 2));
        p.insert(&old, |pos0, n| kv.copy_out(pos0, n));
        p.insert(&new, |pos0, n| kv.copy_out(pos0, n));
        let file = temp_file("budget");
        let id = [1u8; 32];
        p.save(&file, &id).unwrap();
        let shape = BlockShape::of(&dims(), KvCacheType::F32, BLOCK);
        let mut back = PrefixCache::new(3 * block_bytes);
        // The most recent chain whole, then the older chain's start.
        assert_eq!(back.restore(&file, &id, shape).unwrap(), Some(3));
        // The order of use carries over: one more block evicts the older chain's start first.
        back.insert(&prompt(20_000, 1), |pos0, n| kv.copy_out(pos0, n));
        assert_eq!(back.lookup(&new).len(), 2);
        assert_eq!(back.lookup(&old).len(), 0);
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    }

    #[test]
    fn a_damaged_foreign_or_missing_file_restores_nothing() {
        let kv = varied(KvCacheType::F16, 2 * BLOCK);
        let mut p = PrefixCache::new(1 << 20);
        p.insert(&prompt(0, 2), |pos0, n| kv.copy_out(pos0, n));
        let file = temp_file("damaged");
        let id = [3u8; 32];
        p.save(&file, &id).unwrap();
        let good = std::fs::read(&file).unwrap();
        let shape = BlockShape::of(&dims(), KvCacheType::F16, BLOCK);
        let restore = |bytes: &[u8], id: &[u8; 32], shape: BlockShape| {
            std::fs::write(&file, bytes).unwrap();
            let mut back = PrefixCache::new(1 << 20);
            let result = back.restore(&file, id, shape);
            if result.is_err() {
                assert_eq!(back.stats().blocks, 0, "nothing kept");
            }
            result.map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(restore(&good, &id, shape), Ok(()));
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        let e = restore(&flipped, &id, shape).unwrap_err();
        assert!(e.contains("damaged"), "{e}");
        let e = restore(&good[..good.len() - 40], &id, shape).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let mut longer = good.clone();
        longer.push(0);
        assert!(restore(&longer, &id, shape).is_err());
        let e = restore(&good, &[4u8; 32], shape).unwrap_err();
        assert!(e.contains("another model version"), "{e}");
        let e = restore(
            b"not a cache at all, but long enough to hold a header",
            &id,
            shape,
        )
        .unwrap_err();
        assert!(e.contains("not a prefix cache"), "{e}");
        // Blocks of another shape (here: int8 elements) read as garbage and fail the checksum.
        let int8 = BlockShape::of(&dims(), KvCacheType::Int8, BLOCK);
        assert!(restore(&good, &id, int8).is_err());
        std::fs::remove_file(&file).unwrap();
        let mut back = PrefixCache::new(1 << 20);
        assert_eq!(back.restore(&file, &id, shape).unwrap(), None);
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
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
