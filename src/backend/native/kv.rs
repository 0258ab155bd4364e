//! The KV cache: keys (after RoPE, as transformers caches them) and values of every layer,
//! laid out `[kv_heads, capacity, head_dim]` per layer like the ONNX past tensors, allocated
//! once per session at its full capacity and written in place.
//!
//! Elements (`LoadOptions::kv_cache`, from `--kv-cache`, `QWEN2_EDGE_KV_CACHE` or
//! `[model] kv_cache`): f32 (the bundle's `kv_dtype`, exact), f16 (half the memory and half the
//! bytes attention reads per token), or int8 with one f32 scale per block of 32 elements of a
//! head at a position (symmetric, `scale = max |x| / 127`: 1.125 bytes an element, 28% of
//! f32). It costs accuracy: the demo model's perplexity (int8 weights, 2048 tokens of the GPL)
//! is 6.25 with f32 or f16 keys and values, 6.70 with int8 (one scale per whole head vector:
//! 6.97; per 16 elements: 6.69); f16 is the better trade where memory allows. At 4096 positions the 0.5B model's f32 cache is 100 MB, a third of what the int4
//! weights stream per token.

use std::io::{self, Read, Write};

use half::f16;

use super::kernels::KvRef;
use super::model::Dims;
use crate::backend::KvCacheType;

/// Keys and values of every layer in one element type, `width` elements per head and position.
struct Planes<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
    width: usize,
}

impl<T: Copy> Planes<T> {
    /// `vec![zero; n]` of a primitive zero asks the allocator for zeroed memory, which the OS
    /// hands out lazily: a long context reserves address space, and resident memory grows only
    /// as it fills.
    fn new(layers: usize, per_layer: usize, width: usize, zero: T) -> Self {
        Self {
            keys: (0..layers).map(|_| vec![zero; per_layer]).collect(),
            values: (0..layers).map(|_| vec![zero; per_layer]).collect(),
            width,
        }
    }

    /// A copy of positions `pos0..pos0 + n` of every layer and head, keys then values.
    fn gather(&self, geometry: (usize, usize), pos0: usize, n: usize) -> (Vec<T>, Vec<T>) {
        let (kv_heads, capacity) = geometry;
        let w = self.width;
        let copy = |store: &[Vec<T>]| {
            let mut out = Vec::with_capacity(store.len() * kv_heads * n * w);
            for layer in store {
                for g in 0..kv_heads {
                    let at = (g * capacity + pos0) * w;
                    out.extend_from_slice(&layer[at..at + n * w]);
                }
            }
            out
        };
        (copy(&self.keys), copy(&self.values))
    }

    /// Writes what `gather` copied at positions `pos0..pos0 + n`.
    fn scatter(&mut self, geometry: (usize, usize), pos0: usize, n: usize, k: &[T], v: &[T]) {
        let (kv_heads, capacity) = geometry;
        let w = self.width;
        for (store, data) in [(&mut self.keys, k), (&mut self.values, v)] {
            let mut src = data.chunks_exact(n * w);
            for layer in store.iter_mut() {
                for g in 0..kv_heads {
                    let at = (g * capacity + pos0) * w;
                    if let Some(part) = src.next() {
                        layer[at..at + n * w].copy_from_slice(part);
                    }
                }
            }
        }
    }
}

enum Store {
    F32(Planes<f32>),
    F16(Planes<f16>),
    I8 {
        q: Planes<i8>,
        /// One scale per block of `kv_block(head_dim)` elements.
        scales: Planes<f32>,
    },
}

/// Elements per int8 scale: 32, or the whole head vector when head_dim is not a multiple of it.
pub(super) fn kv_block(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(32) {
        32
    } else {
        head_dim
    }
}

pub struct KvCache {
    store: Store,
    capacity: usize,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// `x` as int8 with one scale per block (`max |x| / 127`; an all-zero block gets 1).
fn quantize(x: &[f32], q: &mut [i8], scales: &mut [f32]) {
    let block = x.len() / scales.len();
    for ((x, q), scale) in x.chunks(block).zip(q.chunks_mut(block)).zip(scales) {
        let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v / *scale).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

impl KvCache {
    pub fn new(d: &Dims, capacity: usize, element: KvCacheType) -> Self {
        let per_layer = d.kv_heads * capacity * d.head_dim;
        let (layers, hd) = (d.layers, d.head_dim);
        let store = match element {
            KvCacheType::F32 => Store::F32(Planes::new(layers, per_layer, hd, 0.0)),
            KvCacheType::F16 => Store::F16(Planes::new(layers, per_layer, hd, f16::ZERO)),
            KvCacheType::Int8 => {
                let blocks = hd / kv_block(hd);
                Store::I8 {
                    q: Planes::new(layers, per_layer, hd, 0),
                    scales: Planes::new(layers, d.kv_heads * capacity * blocks, blocks, 0.0),
                }
            }
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
                let slot = g * self.capacity + pos0 + r;
                let (dst, src) = (slot * hd, r * width + g * hd);
                let (ks, vs) = (&k[src..src + hd], &v[src..src + hd]);
                match &mut self.store {
                    Store::F32(p) => {
                        p.keys[layer][dst..dst + hd].copy_from_slice(ks);
                        p.values[layer][dst..dst + hd].copy_from_slice(vs);
                    }
                    Store::F16(p) => {
                        for (d, &s) in p.keys[layer][dst..dst + hd].iter_mut().zip(ks) {
                            *d = f16::from_f32(s);
                        }
                        for (d, &s) in p.values[layer][dst..dst + hd].iter_mut().zip(vs) {
                            *d = f16::from_f32(s);
                        }
                    }
                    Store::I8 { q, scales } => {
                        let nb = scales.width;
                        let at = slot * nb;
                        let (kq, ksc) = (&mut q.keys[layer], &mut scales.keys[layer]);
                        quantize(ks, &mut kq[dst..dst + hd], &mut ksc[at..at + nb]);
                        let (vq, vsc) = (&mut q.values[layer], &mut scales.values[layer]);
                        quantize(vs, &mut vq[dst..dst + hd], &mut vsc[at..at + nb]);
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
        let geometry = (self.kv_heads, self.capacity);
        let (keys, values) = match &self.store {
            Store::F32(p) => {
                let (k, v) = p.gather(geometry, pos0, n);
                (KvData::F32(k), KvData::F32(v))
            }
            Store::F16(p) => {
                let (k, v) = p.gather(geometry, pos0, n);
                (KvData::F16(k), KvData::F16(v))
            }
            Store::I8 { q, scales } => {
                let (k, v) = q.gather(geometry, pos0, n);
                let (ks, vs) = scales.gather(geometry, pos0, n);
                (KvData::I8(k, ks), KvData::I8(v, vs))
            }
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
        let n = block.positions;
        let layers = match &self.store {
            Store::F32(p) => p.keys.len(),
            Store::F16(p) => p.keys.len(),
            Store::I8 { q, .. } => q.keys.len(),
        };
        let elements = layers * self.kv_heads * n * self.head_dim;
        if pos0 > self.len || pos0 + n > self.capacity || block.elements() != elements {
            return false;
        }
        let geometry = (self.kv_heads, self.capacity);
        match (&mut self.store, &block.keys, &block.values) {
            (Store::F32(p), KvData::F32(k), KvData::F32(v)) => p.scatter(geometry, pos0, n, k, v),
            (Store::F16(p), KvData::F16(k), KvData::F16(v)) => p.scatter(geometry, pos0, n, k, v),
            (Store::I8 { q, scales }, KvData::I8(k, ks), KvData::I8(v, vs)) => {
                q.scatter(geometry, pos0, n, k, v);
                scales.scatter(geometry, pos0, n, ks, vs);
            }
            _ => return false,
        }
        self.len = pos0 + n;
        true
    }

    pub(super) fn layer(&self, layer: usize) -> (KvRef<'_>, KvRef<'_>) {
        match &self.store {
            Store::F32(p) => (KvRef::F32(&p.keys[layer]), KvRef::F32(&p.values[layer])),
            Store::F16(p) => (KvRef::F16(&p.keys[layer]), KvRef::F16(&p.values[layer])),
            Store::I8 { q, scales } => (
                KvRef::I8 {
                    q: &q.keys[layer],
                    scales: &scales.keys[layer],
                    block: kv_block(self.head_dim),
                },
                KvRef::I8 {
                    q: &q.values[layer],
                    scales: &scales.values[layer],
                    block: kv_block(self.head_dim),
                },
            ),
        }
    }
}

enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Elements and their scales (one per block).
    I8(Vec<i8>, Vec<f32>),
}

impl KvData {
    fn len(&self) -> usize {
        match self {
            KvData::F32(v) => v.len(),
            KvData::F16(v) => v.len(),
            KvData::I8(v, _) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvData::F32(v) => v.len() * 4,
            KvData::F16(v) => v.len() * 2,
            KvData::I8(v, s) => v.len() + s.len() * 4,
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

    /// The keys, then the values, little-endian (int8: the elements, then their scales).
    pub(super) fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        for data in [&self.keys, &self.values] {
            let mut bytes = Vec::with_capacity(data.bytes());
            match data {
                KvData::F32(v) => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                KvData::F16(v) => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                KvData::I8(v, s) => {
                    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                    bytes.extend(s.iter().flat_map(|x| x.to_le_bytes()));
                }
            }
            w.write_all(&bytes)?;
        }
        Ok(())
    }

    /// What `write_to` wrote, for a block of `shape`.
    pub(super) fn read_from(r: &mut impl Read, shape: BlockShape) -> io::Result<Self> {
        let n = shape.elements;
        let mut read = || -> io::Result<KvData> {
            let mut bytes = vec![0; shape.bytes() / 2];
            r.read_exact(&mut bytes)?;
            let floats = |b: &[u8]| -> Vec<f32> {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            };
            Ok(match shape.element {
                KvCacheType::F32 => KvData::F32(floats(&bytes)),
                KvCacheType::F16 => KvData::F16(
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
                KvCacheType::Int8 => KvData::I8(
                    bytes[..n].iter().map(|&b| b as i8).collect(),
                    floats(&bytes[n..]),
                ),
            })
        };
        let keys = read()?;
        let values = read()?;
        Ok(KvBlock {
            positions: shape.positions,
            keys,
            values,
        })
    }
}

/// What a model's block of `positions` positions holds: what a saved block read back must be
/// (the prefix cache's file, prefix.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub element: KvCacheType,
    pub positions: usize,
    /// Elements of the keys (as many of the values): layers × kv_heads × positions × head_dim.
    pub elements: usize,
    /// int8: elements per scale.
    pub scale_block: usize,
}

impl BlockShape {
    pub fn of(d: &Dims, element: KvCacheType, positions: usize) -> Self {
        Self {
            element,
            positions,
            elements: d.layers * d.kv_heads * positions * d.head_dim,
            scale_block: kv_block(d.head_dim),
        }
    }

    /// Bytes of the keys and values together (`KvBlock::bytes` of such a block).
    pub fn bytes(&self) -> usize {
        2 * match self.element {
            KvCacheType::F32 => self.elements * 4,
            KvCacheType::F16 => self.elements * 2,
            KvCacheType::Int8 => self.elements + self.elements / self.scale_block * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims {
            vocab: 10,
            hidden: 128,
            intermediate: 8,
            ffn_width: 8,
            experts: 0,
            top_k: 0,
            layers: 2,
            heads: 2,
            kv_heads: 2,
            head_dim: 64,
            eps: 1e-6,
            dual_chunk: None,
        }
    }

    /// Keys and values of `n` positions, with an outlier channel as Qwen2's keys have.
    fn rows(n: usize) -> Vec<f32> {
        (0..n * 128)
            .map(|i| {
                if i % 64 == 5 {
                    40.0
                } else {
                    ((i as f32) * 0.37).sin()
                }
            })
            .collect()
    }

    #[test]
    fn int8_round_trips_within_half_a_step_of_its_block() {
        let d = dims();
        let mut c = KvCache::new(&d, 8, KvCacheType::Int8);
        let x = rows(3);
        c.store(0, 0, 3, &x, &x);
        c.advance(3);
        let KvRef::I8 { q, scales, block } = c.layer(0).0 else {
            panic!("an int8 cache")
        };
        assert_eq!(block, 32);
        for r in 0..3 {
            for g in 0..2 {
                for e in 0..64 {
                    let slot = g * 8 + r;
                    let got = q[slot * 64 + e] as f32 * scales[slot * 2 + e / 32];
                    let want = x[r * 128 + g * 64 + e];
                    let step = scales[slot * 2 + e / 32];
                    assert!((got - want).abs() <= step / 2.0 + 1e-6, "{got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn blocks_copy_out_and_in_unchanged() {
        let d = dims();
        for element in [KvCacheType::F32, KvCacheType::F16, KvCacheType::Int8] {
            let mut a = KvCache::new(&d, 8, element);
            let x = rows(5);
            for layer in 0..2 {
                a.store(layer, 0, 5, &x, &x);
            }
            a.advance(5);
            let mut b = KvCache::new(&d, 8, element);
            assert!(b.copy_in(0, &a.copy_out(0, 3)));
            assert!(b.copy_in(3, &a.copy_out(3, 2)));
            assert_eq!(b.len(), 5);
            let bits = |c: &KvCache, layer| match c.layer(layer).1 {
                KvRef::F32(v) => v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                KvRef::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
                KvRef::I8 { q, scales, .. } => q
                    .iter()
                    .map(|&x| x as u32)
                    .chain(scales.iter().map(|s| s.to_bits()))
                    .collect(),
            };
            assert_eq!(bits(&a, 1), bits(&b, 1), "{element}");
            // Another element type does not fit.
            let mut other = KvCache::new(&d, 8, KvCacheType::F16);
            if element != KvCacheType::F16 {
                assert!(!other.copy_in(0, &a.copy_out(0, 3)));
            }
        }
    }
}
