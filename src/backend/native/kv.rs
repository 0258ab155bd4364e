//! The KV cache: keys (after RoPE, as transformers caches them) and values of every layer,
//! laid out `[kv_heads, capacity, head_dim]` per layer like the ONNX past tensors, allocated
//! once per session at its full capacity and written in place.
//!
//! Elements are f32 (the bundle's `kv_dtype`, exact) or f16 (`LoadOptions::kv_cache`, from
//! `--kv-cache`, `QWEN2_EDGE_KV_CACHE` or `[model] kv_cache`): half the memory for a long context, and half the bytes attention
//! reads per token (at 4096 positions the 0.5B model's f32 cache is 100 MB, a third of what
//! the int4 weights stream per token).

use half::f16;

use super::kernels::KvRef;
use super::model::Dims;
use crate::backend::KvCacheType;

enum Store {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    F16 {
        keys: Vec<Vec<f16>>,
        values: Vec<Vec<f16>>,
    },
}

pub struct KvCache {
    store: Store,
    capacity: usize,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// `vec![0; n]` asks the allocator for zeroed memory, which the OS hands out lazily: a
    /// long context reserves address space, and resident memory grows only as it fills.
    pub fn new(d: &Dims, capacity: usize, element: KvCacheType) -> Self {
        let per_layer = d.kv_heads * capacity * d.head_dim;
        let store = match element {
            KvCacheType::F16 => Store::F16 {
                keys: (0..d.layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
                values: (0..d.layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            },
            KvCacheType::F32 => Store::F32 {
                keys: (0..d.layers).map(|_| vec![0.0; per_layer]).collect(),
                values: (0..d.layers).map(|_| vec![0.0; per_layer]).collect(),
            },
        };
        Self {
            store,
            capacity,
            len: 0,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Counts `n` more positions as filled (after every layer stored them).
    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Writes `n` rows of keys and values (`[n, kv_heads * head_dim]`) at `pos0..`.
    pub(super) fn store(&mut self, layer: usize, pos0: usize, n: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let width = self.kv_heads * hd;
        for r in 0..n {
            for g in 0..self.kv_heads {
                let dst = (g * self.capacity + pos0 + r) * hd;
                let src = r * width + g * hd;
                let (ks, vs) = (&k[src..src + hd], &v[src..src + hd]);
                match &mut self.store {
                    Store::F32 { keys, values } => {
                        keys[layer][dst..dst + hd].copy_from_slice(ks);
                        values[layer][dst..dst + hd].copy_from_slice(vs);
                    }
                    Store::F16 { keys, values } => {
                        for (d, &s) in keys[layer][dst..dst + hd].iter_mut().zip(ks) {
                            *d = f16::from_f32(s);
                        }
                        for (d, &s) in values[layer][dst..dst + hd].iter_mut().zip(vs) {
                            *d = f16::from_f32(s);
                        }
                    }
                }
            }
        }
    }

    /// A copy of positions `pos0..pos0 + n` of every layer (for the prefix cache).
    pub(super) fn copy_out(&self, pos0: usize, n: usize) -> KvBlock {
        assert!(
            pos0 + n <= self.len,
            "copying positions that are not filled"
        );
        fn gather<T: Copy>(store: &[Vec<T>], c: &KvCache, pos0: usize, n: usize) -> Vec<T> {
            let hd = c.head_dim;
            let mut out = Vec::with_capacity(store.len() * c.kv_heads * n * hd);
            for layer in store {
                for g in 0..c.kv_heads {
                    let at = (g * c.capacity + pos0) * hd;
                    out.extend_from_slice(&layer[at..at + n * hd]);
                }
            }
            out
        }
        let (keys, values) = match &self.store {
            Store::F32 { keys, values } => (
                KvData::F32(gather(keys, self, pos0, n)),
                KvData::F32(gather(values, self, pos0, n)),
            ),
            Store::F16 { keys, values } => (
                KvData::F16(gather(keys, self, pos0, n)),
                KvData::F16(gather(values, self, pos0, n)),
            ),
        };
        KvBlock {
            positions: n,
            keys,
            values,
        }
    }

    /// Writes `block` at positions `pos0..` and counts the cache filled up to its end (what
    /// followed is forgotten). False (and nothing written) when the element type or geometry
    /// differs or it does not fit.
    pub(super) fn copy_in(&mut self, pos0: usize, block: &KvBlock) -> bool {
        fn scatter<T: Copy>(
            store: &mut [Vec<T>],
            data: &[T],
            geometry: (usize, usize, usize),
            pos0: usize,
            n: usize,
        ) {
            let (kv_heads, capacity, hd) = geometry;
            let mut src = data.chunks_exact(n * hd);
            for layer in store.iter_mut() {
                for g in 0..kv_heads {
                    let at = (g * capacity + pos0) * hd;
                    if let Some(part) = src.next() {
                        layer[at..at + n * hd].copy_from_slice(part);
                    }
                }
            }
        }
        let n = block.positions;
        let layers = match &self.store {
            Store::F32 { keys, .. } => keys.len(),
            Store::F16 { keys, .. } => keys.len(),
        };
        if pos0 > self.len
            || pos0 + n > self.capacity
            || block.elements() != layers * self.kv_heads * n * self.head_dim
        {
            return false;
        }
        let geometry = (self.kv_heads, self.capacity, self.head_dim);
        match (&mut self.store, &block.keys, &block.values) {
            (Store::F32 { keys, values }, KvData::F32(k), KvData::F32(v)) => {
                scatter(keys, k, geometry, pos0, n);
                scatter(values, v, geometry, pos0, n);
            }
            (Store::F16 { keys, values }, KvData::F16(k), KvData::F16(v)) => {
                scatter(keys, k, geometry, pos0, n);
                scatter(values, v, geometry, pos0, n);
            }
            _ => return false,
        }
        self.len = pos0 + n;
        true
    }

    pub(super) fn layer(&self, layer: usize) -> (KvRef<'_>, KvRef<'_>) {
        match &self.store {
            Store::F32 { keys, values } => (KvRef::F32(&keys[layer]), KvRef::F32(&values[layer])),
            Store::F16 { keys, values } => (KvRef::F16(&keys[layer]), KvRef::F16(&values[layer])),
        }
    }
}

enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvData {
    fn len(&self) -> usize {
        match self {
            KvData::F32(v) => v.len(),
            KvData::F16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvData::F32(v) => v.len() * 4,
            KvData::F16(v) => v.len() * 2,
        }
    }
}

/// Keys and values of a run of positions of every layer, `[layer, kv_heads, positions,
/// head_dim]`, in the cache's element type: what the prefix cache keeps.
pub struct KvBlock {
    positions: usize,
    keys: KvData,
    values: KvData,
}

impl KvBlock {
    fn elements(&self) -> usize {
        self.keys.len().min(self.values.len())
    }

    /// Memory held, for the prefix cache's budget.
    pub fn bytes(&self) -> usize {
        self.keys.bytes() + self.values.bytes()
    }
}
