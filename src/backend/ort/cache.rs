//! The KV cache of one ort session, wired through its IoBinding so that ONNX Runtime reads and
//! writes it where it lives (GPU memory when the provider is on a GPU) and the host copies
//! nothing between steps.
//!
//! * Shared (GroupQueryAttention graphs): one `[1, kv_heads, capacity, head_dim]` buffer per
//!   layer and kind, allocated once and bound as both `past_key_values.*` and `present.*`.
//!   The operator sees the same pointer and appends the new positions in place; truncating is
//!   just forgetting positions.
//! * Chained (Concat graphs): ONNX Runtime allocates `present.*` on the cache's device each
//!   call, and those values are bound as the next call's `past_key_values.*` — moved, never
//!   copied by us (the graph's Concat copies the old positions, which is inherent to it).

use anyhow::{anyhow, bail, Result};
use half::f16;
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::session::{IoBinding, Session as OrtSession, SessionOutputs};
use ort::value::{DynTensorValueType, DynValue, Tensor};

use super::CacheMode;

pub struct CacheLayout<'a> {
    pub past: &'a [String],
    pub present: &'a [String],
    pub kv_heads: usize,
    pub head_dim: usize,
    /// float16 elements (profile `gpu`) instead of float32.
    pub f16: bool,
    pub capacity: usize,
    pub memory: &'a MemoryInfo<'static>,
}

pub struct KvCache {
    len: usize,
    past: Vec<String>,
    present: Vec<String>,
    kv_heads: usize,
    head_dim: usize,
    state: State,
}

enum State {
    /// Bound once at creation as past and present; held here so the buffers visibly live as
    /// long as the session (the binding also keeps them alive).
    Shared { _buffers: Vec<DynValue> },
    /// The values to bind as `past_key_values.*` at the next call, and where ONNX Runtime
    /// should put `present.*`.
    Chained {
        values: Vec<DynValue>,
        memory: MemoryInfo<'static>,
    },
}

impl KvCache {
    pub fn new(
        session: &OrtSession,
        binding: &mut IoBinding,
        mode: CacheMode,
        l: &CacheLayout,
    ) -> Result<Self> {
        let state = match mode {
            CacheMode::Shared => {
                let allocator = if l.memory.allocation_device() == AllocationDevice::CPU {
                    None
                } else {
                    Some(Allocator::new(session, l.memory.clone()).map_err(|e| {
                        anyhow!("cannot allocate the KV cache on {:?}: {e}", l.memory)
                    })?)
                };
                let allocator = allocator.as_ref().unwrap_or(session.allocator());
                let shape = [1usize, l.kv_heads, l.capacity, l.head_dim];
                let mut buffers = Vec::with_capacity(l.past.len());
                for (past, present) in l.past.iter().zip(l.present) {
                    // Left uninitialised on purpose: GroupQueryAttention reads only the
                    // positions below the sequence length it derives from attention_mask, and
                    // untouched pages of a long context cost no memory.
                    let failed = |e| anyhow!("cannot allocate a {shape:?} KV buffer: {e}");
                    let mut t = if l.f16 {
                        Tensor::<f16>::new(allocator, shape)
                            .map_err(failed)?
                            .into_dyn()
                    } else {
                        Tensor::<f32>::new(allocator, shape)
                            .map_err(failed)?
                            .into_dyn()
                    };
                    binding.bind_input(past, &t).map_err(|e| anyhow!("{e}"))?;
                    binding
                        .bind_output(present, &mut t)
                        .map_err(|e| anyhow!("{e}"))?;
                    buffers.push(t);
                }
                State::Shared { _buffers: buffers }
            }
            CacheMode::Chained => State::Chained {
                values: Vec::new(),
                memory: l.memory.clone(),
            },
        };
        let mut cache = Self {
            len: 0,
            past: l.past.to_vec(),
            present: l.present.to_vec(),
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            state,
        };
        cache.reset()?;
        Ok(cache)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Empty `[1, kv_heads, 0, head_dim]` pasts for a chained cache (host memory: zero bytes
    /// to copy wherever the graph runs).
    fn reset(&mut self) -> Result<()> {
        self.len = 0;
        if let State::Chained { values, .. } = &mut self.state {
            values.clear();
            for _ in &self.past {
                let t = Tensor::from_array((
                    [1usize, self.kv_heads, 0, self.head_dim],
                    Vec::<f32>::new(),
                ))
                .map_err(|e| anyhow!("{e}"))?;
                values.push(t.into_dyn());
            }
        }
        Ok(())
    }

    /// Binds the chained cache's current values as the next call's past, and its outputs to
    /// fresh device allocations (a device-bound output keeps the previous call's tensor, whose
    /// shape no longer fits, unless bound again).
    pub fn bind(&self, binding: &mut IoBinding) -> Result<()> {
        if let State::Chained { values, memory } = &self.state {
            for (name, v) in self.past.iter().zip(values) {
                binding.bind_input(name, v).map_err(|e| anyhow!("{e}"))?;
            }
            for name in &self.present {
                binding
                    .bind_output_to_device(name, memory)
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
        Ok(())
    }

    /// After a call that added `n` positions: keep the chained cache's new values.
    pub fn advance(&mut self, n: usize, outputs: &mut SessionOutputs) -> Result<()> {
        if let State::Chained { values, .. } = &mut self.state {
            for (slot, name) in values.iter_mut().zip(&self.present) {
                *slot = outputs
                    .remove(name.as_str())
                    .ok_or_else(|| anyhow!("the graph returned no {name}"))?;
            }
        }
        self.len += n;
        Ok(())
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if len == 0 {
            return self.reset();
        }
        let (kvh, hd) = (self.kv_heads, self.head_dim);
        let cur = self.len;
        if let State::Chained { values, .. } = &mut self.state {
            // A Concat graph takes the past as one tensor, so the kept prefix is copied once
            // (through the host when the cache is on a GPU): only when a prompt reuses part of
            // the previous one, never between decode steps.
            for v in values.iter_mut() {
                let tensor = std::mem::replace(v, empty(kvh, hd)?)
                    .downcast::<DynTensorValueType>()
                    .map_err(|e| anyhow!("{e}"))?;
                let host = if tensor.memory_info().is_cpu_accessible() {
                    tensor
                } else {
                    tensor
                        .to(AllocationDevice::CPU, 0)
                        .map_err(|e| anyhow!("{e}"))?
                };
                let (_, data) = host
                    .try_extract_tensor::<f32>()
                    .map_err(|e| anyhow!("{e}"))?;
                if data.len() != kvh * cur * hd {
                    bail!(
                        "KV cache holds {} values, expected {}",
                        data.len(),
                        kvh * cur * hd
                    );
                }
                let mut kept = Vec::with_capacity(kvh * len * hd);
                for h in 0..kvh {
                    kept.extend_from_slice(&data[h * cur * hd..][..len * hd]);
                }
                *v = Tensor::from_array(([1usize, kvh, len, hd], kept))
                    .map_err(|e| anyhow!("{e}"))?
                    .into_dyn();
            }
        }
        self.len = len;
        Ok(())
    }
}

fn empty(kvh: usize, hd: usize) -> Result<DynValue> {
    Ok(
        Tensor::from_array(([1usize, kvh, 0, hd], Vec::<f32>::new()))
            .map_err(|e| anyhow!("{e}"))?
            .into_dyn(),
    )
}
