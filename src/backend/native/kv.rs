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

    pub(super) fn layer(&self, layer: usize) -> (KvRef<'_>, KvRef<'_>) {
        match &self.store {
            Store::F32 { keys, values } => (KvRef::F32(&keys[layer]), KvRef::F32(&values[layer])),
            Store::F16 { keys, values } => (KvRef::F16(&keys[layer]), KvRef::F16(&values[layer])),
        }
    }
}
