//! The Qwen2 forward pass, top to bottom (docs/architecture.md, "Backends").
//!
//! token embedding → N × [RMSNorm → attention (q/k/v with bias, RoPE, grouped-query heads
//! over the KV cache, o without bias) → residual → RMSNorm → SwiGLU MLP → residual] →
//! final RMSNorm → LM head (the embedding matrix when tied). Qwen2-MoE's sparse layers replace
//! the MLP with routed experts and a shared expert (`moe.rs`).
//!
//! Memory discipline: the KV cache is allocated once per session (`KvCache`) and the
//! activation buffers once per backend (`Workspace`); keys and values are written straight into
//! their cache slot; nothing allocates per token (a batched step collects its segments). All arithmetic goes through `Kernels`.

use anyhow::{bail, Result};

use super::dual_chunk::{DualChunk, QUERY_COPIES};
use super::kernels::pool::Pool;
use super::kernels::{AttentionRows, AttentionShape, Kernels, Rows, Scratch};
use super::kv::KvCache;
use super::moe::{MlpBuffers, MoeBuffers, SparseMlp};
use super::rope::Rope;
use super::weights::{Matrix, Scope, WeightFile};
use crate::backend::LmHead;
use crate::bundle::ModelConfig;

/// Model sizes, all from config.json.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// The widest MLP (dense, expert or shared expert): the gate and up buffers' width.
    pub ffn_width: usize,
    /// Qwen2-MoE: experts per sparse layer and how many each token uses (0 for dense models).
    pub experts: usize,
    pub top_k: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    /// Dual Chunk Attention's chunks, where config.json asks for it.
    pub dual_chunk: Option<DualChunk>,
}

impl Dims {
    fn from_config(cfg: &ModelConfig) -> Result<Self> {
        let moe = cfg.moe();
        let moe = moe.as_ref();
        Ok(Self {
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            ffn_width: moe.map_or(cfg.intermediate_size, |m| {
                cfg.intermediate_size
                    .max(m.intermediate)
                    .max(m.shared_intermediate)
            }),
            experts: moe.map_or(0, |m| m.experts),
            top_k: moe.map_or(0, |m| m.top_k),
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps as f32,
            dual_chunk: cfg
                .dual_chunk_attention_config
                .as_ref()
                .map(DualChunk::from_config)
                .transpose()?,
        })
    }

    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Attention {
    q: Matrix,
    q_bias: Vec<f32>,
    k: Matrix,
    k_bias: Vec<f32>,
    v: Matrix,
    v_bias: Vec<f32>,
    o: Matrix,
    shape: AttentionShape,
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))` (a dense layer's, or one expert's).
pub struct Mlp {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl Mlp {
    pub fn load(mlp: &Scope, width: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            gate: mlp.matrix("gate_proj.weight", width, hidden)?,
            up: mlp.matrix("up_proj.weight", width, hidden)?,
            down: mlp.matrix("down_proj.weight", hidden, width)?,
        })
    }

    pub fn matrices(&self) -> [&Matrix; 3] {
        [&self.gate, &self.up, &self.down]
    }

    pub fn bytes(&self) -> usize {
        self.matrices().iter().map(|w| w.bytes()).sum()
    }

    /// `out[..rows * hidden]` = the MLP of the rows of `x`.
    pub fn forward(
        &self,
        k: &Kernels,
        pool: &Pool,
        x: &[f32],
        rows: Rows,
        buf: &mut MlpBuffers<'_>,
        out: &mut [f32],
    ) {
        let (n, width) = (rows.count(), self.gate.rows());
        k.linears(
            pool,
            x,
            rows,
            buf.scratch,
            [
                (self.gate.view(), None, &mut buf.gate[..]),
                (self.up.view(), None, &mut buf.up[..]),
            ],
        );
        k.silu_mul_rows(pool, n, buf.gate, buf.up, width);
        k.linear(
            pool,
            &self.down.view(),
            None,
            buf.gate,
            rows,
            out,
            buf.scratch,
        );
    }
}

/// A layer's feed-forward block.
enum Ffn {
    Dense(Mlp),
    /// Qwen2-MoE's sparse layers.
    Sparse(SparseMlp),
}

impl Ffn {
    /// Its MLPs: the dense one, or the shared expert and then every expert.
    fn mlps(&self) -> impl Iterator<Item = &Mlp> {
        let (first, rest) = match self {
            Ffn::Dense(m) => (m, &[][..]),
            Ffn::Sparse(s) => s.mlps(),
        };
        std::iter::once(first).chain(rest)
    }

    fn bytes_per_token(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.bytes(),
            Ffn::Sparse(s) => s.bytes_per_token(),
        }
    }
}

struct Layer {
    input_norm: Vec<f32>,
    attention: Attention,
    post_attention_norm: Vec<f32>,
    ffn: Ffn,
}

pub struct Model {
    pub dims: Dims,
    /// Gathered one row per token (left in the bundle's layout).
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// The embedding matrix again when tied (a view of it, or its repacked form).
    lm_head: Matrix,
    tied: bool,
    /// The embedding's mapped pages can be dropped after each gather: the LM head does not
    /// read the same pages in place.
    release_embedding: bool,
    rope: Rope,
    kernels: &'static Kernels,
}

/// Which rows of a chunk go through the final norm and the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// None (an early chunk of a longer prompt).
    Skip,
    /// The last row of each segment.
    Last,
    All,
    /// Every row, each bit for bit what it would be run alone: the products take the batched
    /// path (`Rows::Batch`) even for one sequence (speculative decoding's verification).
    Each,
}

/// One sequence's part of a forward call: `tokens` run at positions `cache.len()..`.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// With `Head::Last`: every row of this segment reaches the head, each bit for bit what it
    /// would be alone (a token and its drafts in an engine step), not only its last.
    pub every_row: bool,
}

impl Model {
    pub fn load(
        w: &WeightFile,
        cfg: &ModelConfig,
        kernels: &'static Kernels,
        lm_head: LmHead,
    ) -> Result<Self> {
        let d = Dims::from_config(cfg)?;
        if cfg.hidden_act != "silu" {
            bail!(
                "config.json: hidden_act {:?} is not supported (Qwen2 uses silu)",
                cfg.hidden_act
            );
        }
        let scale = (1.0 / (d.head_dim as f64).sqrt()) as f32;
        let mut layers = Vec::with_capacity(d.layers);
        for i in 0..d.layers {
            let layer = w.scope(&format!("model.layers.{i}"));
            let att = layer.scope("self_attn");
            let [q, k, v] = projections(&att, &d)?;
            let attention = Attention {
                q: q.0,
                q_bias: q.1,
                k: k.0,
                k_bias: k.1,
                v: v.0,
                v_bias: v.1,
                o: att.matrix("o_proj.weight", d.hidden, d.q_width())?,
                shape: AttentionShape {
                    heads: d.heads,
                    kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                    scale,
                    window: cfg.sliding_window_of(i),
                    dual_chunk: d.dual_chunk,
                },
            };
            let mlp = layer.scope("mlp");
            let ffn = match cfg.moe() {
                Some(moe) if moe.is_sparse(i) => {
                    Ffn::Sparse(SparseMlp::load(&mlp, &moe, d.hidden)?)
                }
                _ => Ffn::Dense(Mlp::load(&mlp, d.intermediate, d.hidden)?),
            };
            layers.push(Layer {
                input_norm: layer.vector("input_layernorm.weight", d.hidden)?,
                attention,
                post_attention_norm: layer.vector("post_attention_layernorm.weight", d.hidden)?,
                ffn,
            });
        }
        // The exporter writes lm_head.weight only for an untied head: its presence decides.
        let tied = !w.contains("lm_head.weight");
        if tied && cfg.tie_word_embeddings == Some(false) {
            tracing::warn!("config.json says the LM head is untied but the bundle has no lm_head.weight: using the embedding");
        }
        let head_name = if tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = match lm_head {
            LmHead::Bundle => w.matrix(head_name, d.vocab, d.hidden)?,
            LmHead::Int4 => w.matrix_as_int4(head_name, d.vocab, d.hidden)?,
        };
        Ok(Self {
            dims: d,
            embed: w.embedding("model.embed_tokens.weight", d.vocab, d.hidden)?,
            layers,
            norm: w.vector("model.norm.weight", d.hidden)?,
            release_embedding: !(tied && lm_head.is_mapped()),
            lm_head,
            tied,
            rope: Rope::from_config(cfg)?,
            kernels,
        })
    }

    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// The LM head's rows of the tokens `ids`, int8 ones as int4, for `forward`'s `lm_head`
    /// (a draft model's vocabulary).
    pub fn draft_head_rows(&self, ids: &[u32]) -> Result<Matrix> {
        self.lm_head.select_rows_int8_as_int4(ids)
    }

    /// Weight bytes one decode step streams: every layer matrix and the LM head (embedding
    /// rows are gathered, not streamed).
    pub fn bytes_per_token(&self) -> u64 {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attention;
                let attention: usize = [&a.q, &a.k, &a.v, &a.o].iter().map(|w| w.bytes()).sum();
                attention + l.ffn.bytes_per_token()
            })
            .sum();
        (layers + self.lm_head.bytes()) as u64
    }

    /// Whether every product gives each activation row its one-row result, whatever rows it
    /// runs with: true when all the matrices are quantized (their tiles keep each row's order
    /// of operations). Then a prompt slice may share a forward with other sequences' decode
    /// steps and come out bit for bit as alone; float products sum a prompt's rows in another
    /// order than a decode step's (`Rows`).
    pub fn rows_independent(&self) -> bool {
        self.layers.iter().all(|l| {
            let a = &l.attention;
            [&a.q, &a.k, &a.v, &a.o]
                .into_iter()
                .chain(l.ffn.mlps().flat_map(Mlp::matrices))
                .all(|w| w.view().is_quantized())
        }) && self.lm_head.view().is_quantized()
    }

    /// Whether any product weight is f16 (prefill then needs widening scratch).
    pub fn has_f16_weights(&self) -> bool {
        matches!(self.lm_head.view().data, super::kernels::MatData::F16(_))
    }

    /// Runs the segments' tokens (at most `ws.rows` in all) at their positions, appends their
    /// keys and values to each segment's cache, and writes the requested logits rows to
    /// `logits`. One segment is a prompt chunk (or one decode step); several are one engine
    /// step of several sequences (a decode token each, and with quantized weights a prompt
    /// slice too: `rows_independent`), their rows sharing every weight pass while attention
    /// runs per sequence over its own cache. `lm_head`: rows of the LM head to use instead of
    /// all of them (`draft_head_rows`; a logits row is then as wide as it has rows). The caller
    /// checked the ids against the vocabulary and the room left in each cache.
    pub fn forward(
        &self,
        pool: &Pool,
        segments: &mut [Segment<'_>],
        ws: &mut Workspace,
        head: Head,
        lm_head: Option<&Matrix>,
        logits: &mut [f32],
    ) {
        let (k, d) = (self.kernels, &self.dims);
        let n: usize = segments.iter().map(|s| s.tokens.len()).sum();
        let every_row = segments.iter().any(|s| s.every_row);
        let rows = match (segments.len(), head) {
            (1, Head::Skip | Head::Last | Head::All) if !every_row => Rows::Prompt(n),
            _ => Rows::Batch(n),
        };
        let h = d.hidden;
        let tokens = segments.iter().flat_map(|s| s.tokens);
        for (row, &token) in ws.x.chunks_mut(h).zip(tokens) {
            k.gather_row(&self.embed.view(), token as usize, row);
        }
        if self.release_embedding {
            self.embed.release_gathered_rows();
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            k.rmsnorm_rows(&ws.x[..n * h], &layer.input_norm, d.eps, &mut ws.xn);
            let att = &layer.attention;
            // q, k and v from the same normalized input: one quantization, one parallel loop.
            k.linears(
                pool,
                &ws.xn,
                rows,
                &mut ws.scratch,
                [
                    (att.q.view(), Some(&att.q_bias[..]), &mut ws.q[..]),
                    (att.k.view(), Some(&att.k_bias[..]), &mut ws.k[..]),
                    (att.v.view(), Some(&att.v_bias[..]), &mut ws.v[..]),
                ],
            );
            let (qw, kw) = (d.q_width(), d.kv_width());
            let mut row0 = 0;
            for seg in segments.iter_mut() {
                let (m, pos0) = (seg.tokens.len(), seg.cache.len());
                let q = &mut ws.q[row0 * qw..(row0 + m) * qw];
                match d.dual_chunk {
                    None => self.rotate(|p| p, pos0, m, d.heads, q, &mut ws.cos, &mut ws.sin),
                    Some(dca) => {
                        let copies = QUERY_COPIES * qw;
                        let copies = &mut ws.q_copies[row0 * copies..(row0 + m) * copies];
                        self.rotate_copies(dca, pos0, q, copies, &mut ws.cos, &mut ws.sin);
                    }
                }
                let key = &mut ws.k[row0 * kw..(row0 + m) * kw];
                let key_position = |p| d.dual_chunk.map_or(p, |dca| dca.key_position(p));
                self.rotate(
                    key_position,
                    pos0,
                    m,
                    d.kv_heads,
                    key,
                    &mut ws.cos,
                    &mut ws.sin,
                );
                let value = &ws.v[row0 * kw..(row0 + m) * kw];
                seg.cache.store(l, pos0, m, key, value);
                row0 += m;
            }
            // Every segment's attention in one call, each over its own cache.
            let queries = match d.dual_chunk {
                None => &ws.q[..n * qw],
                Some(_) => &ws.q_copies[..n * QUERY_COPIES * qw],
            };
            let segs: &[Segment] = segments;
            let seq = |i: usize| {
                let cache = &*segs[i].cache;
                let (keys, values) = cache.layer(l);
                AttentionRows {
                    keys,
                    values,
                    capacity: cache.capacity(),
                    first_pos: cache.len(),
                    rows: segs[i].tokens.len(),
                }
            };
            let (scores, head_major) = Kernels::attention_scratch(&att.shape, segs.len(), &seq);
            grow(&mut ws.scores, scores);
            grow(&mut ws.head_major, head_major);
            k.attention(
                pool,
                &att.shape,
                queries,
                segs.len(),
                &seq,
                &mut ws.scores,
                &mut ws.head_major,
                &mut ws.attn[..n * qw],
            );
            k.linear(
                pool,
                &att.o.view(),
                None,
                &ws.attn,
                rows,
                &mut ws.xn,
                &mut ws.scratch,
            );
            add_in_place(&mut ws.x[..n * h], &ws.xn[..n * h]);

            // MLP block: down(silu(gate(x)) * up(x)).
            k.rmsnorm_rows(
                &ws.x[..n * h],
                &layer.post_attention_norm,
                d.eps,
                &mut ws.xn,
            );
            let mut mlp_buffers = MlpBuffers {
                gate: &mut ws.gate,
                up: &mut ws.up,
                scratch: &mut ws.scratch,
            };
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    mlp.forward(k, pool, &ws.xn, rows, &mut mlp_buffers, &mut ws.ffn_out)
                }
                Ffn::Sparse(sparse) => sparse.forward(
                    k,
                    pool,
                    &ws.xn,
                    rows,
                    &mut mlp_buffers,
                    &mut ws.moe,
                    &mut ws.ffn_out,
                ),
            }
            add_in_place(&mut ws.x[..n * h], &ws.ffn_out[..n * h]);
        }
        for seg in segments.iter_mut() {
            seg.cache.advance(seg.tokens.len());
        }

        // The rows that reach the head, normalized into consecutive rows of `xn`.
        let mut out_rows = 0;
        let mut end = 0;
        for seg in segments.iter() {
            end += seg.tokens.len();
            let first = match head {
                Head::Skip => return,
                Head::Last if !seg.every_row => end - 1,
                Head::Last | Head::All | Head::Each => end - seg.tokens.len(),
            };
            let m = end - first;
            let dst = &mut ws.xn[out_rows * h..(out_rows + m) * h];
            k.rmsnorm_rows(&ws.x[first * h..end * h], &self.norm, d.eps, dst);
            out_rows += m;
        }
        k.linear(
            pool,
            &lm_head.unwrap_or(&self.lm_head).view(),
            None,
            &ws.xn,
            rows.with_count(out_rows),
            logits,
            &mut ws.scratch,
        );
    }

    /// Dual Chunk Attention's queries: each row of `q` (positions `pos0..`) into `copies` three
    /// times, each copy rotated at its position (`DualChunk::query_positions`).
    fn rotate_copies(
        &self,
        dca: DualChunk,
        pos0: usize,
        q: &[f32],
        copies: &mut [f32],
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        let qw = self.dims.q_width();
        for (r, (row, copies)) in q
            .chunks(qw)
            .zip(copies.chunks_mut(QUERY_COPIES * qw))
            .enumerate()
        {
            for (which, copy) in copies.chunks_mut(qw).enumerate() {
                copy.copy_from_slice(row);
                let at = |p| dca.query_positions(p)[which];
                self.rotate(at, pos0 + r, 1, self.dims.heads, copy, cos, sin);
            }
        }
    }

    /// Applies RoPE to `heads` heads of each of `n` rows in `x`, the rows at positions
    /// `pos0..` rotated at `at(position)` (the position itself but with Dual Chunk Attention).
    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &self,
        at: impl Fn(usize) -> usize,
        pos0: usize,
        n: usize,
        heads: usize,
        x: &mut [f32],
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        let hd = self.dims.head_dim;
        for (r, row) in x.chunks_mut(heads * hd).take(n).enumerate() {
            self.rope.angles(at(pos0 + r), cos, sin);
            for head in row.chunks_mut(hd) {
                (self.kernels.rope)(head, cos, sin);
            }
        }
    }
}

/// A layer's Q, K and V projections (weight, bias): three Hugging Face tensors, or the rows of
/// an `ort` profile variant's fused `qkv_proj` (docs/bundle-format.md).
fn projections(att: &Scope, d: &Dims) -> Result<[(Matrix, Vec<f32>); 3]> {
    let widths = [d.q_width(), d.kv_width(), d.kv_width()];
    if !att.has("qkv_proj.weight") {
        let separate = |name: &str, rows: usize| -> Result<(Matrix, Vec<f32>)> {
            Ok((
                att.matrix(&format!("{name}.weight"), rows, d.hidden)?,
                att.vector(&format!("{name}.bias"), rows)?,
            ))
        };
        return Ok([
            separate("q_proj", widths[0])?,
            separate("k_proj", widths[1])?,
            separate("v_proj", widths[2])?,
        ]);
    }
    let total: usize = widths.iter().sum();
    let bias = att.vector("qkv_proj.bias", total)?;
    let mut first = 0;
    let mut part = |rows: usize| -> Result<(Matrix, Vec<f32>)> {
        let range = first..first + rows;
        first += rows;
        let weight = att.matrix_rows("qkv_proj.weight", total, range.clone(), d.hidden)?;
        Ok((weight, bias[range].to_vec()))
    };
    Ok([part(widths[0])?, part(widths[1])?, part(widths[2])?])
}

/// Lengthens a scratch buffer to at least `len` (the attention scratch of a step with more
/// sequences or rows than any before: grown then, and reused).
fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Activation buffers for up to `rows` tokens at a time, allocated once per backend (one
/// forward runs at a time) and grown when a session with a longer context is created.
pub struct Workspace {
    pub rows: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    /// Dual Chunk Attention's rotated copies of the query rows (empty without it).
    q_copies: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    head_major: Vec<f32>,
    scores: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The feed-forward block's output rows.
    ffn_out: Vec<f32>,
    moe: MoeBuffers,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Quantized activations and widened f16 weights of the linear layers.
    scratch: Scratch,
}

impl Workspace {
    /// Grows the attention scores for a cache of `capacity` positions.
    pub fn reserve_positions(&mut self, d: &Dims, capacity: usize) {
        if self.scores.len() < d.heads * capacity {
            self.scores.resize(d.heads * capacity, 0.0);
        }
    }

    pub fn new(d: &Dims, rows: usize, capacity: usize, scratch: Scratch) -> Self {
        Self {
            rows,
            x: vec![0.0; rows * d.hidden],
            xn: vec![0.0; rows * d.hidden],
            q: vec![0.0; rows * d.q_width()],
            q_copies: match d.dual_chunk {
                Some(_) => vec![0.0; rows * QUERY_COPIES * d.q_width()],
                None => Vec::new(),
            },
            k: vec![0.0; rows * d.kv_width()],
            v: vec![0.0; rows * d.kv_width()],
            attn: vec![0.0; rows * d.q_width()],
            head_major: vec![0.0; rows * d.q_width()],
            scores: vec![0.0; d.heads * capacity],
            gate: vec![0.0; rows * d.ffn_width],
            up: vec![0.0; rows * d.ffn_width],
            ffn_out: vec![0.0; rows * d.hidden],
            moe: MoeBuffers::new(d.experts, d.top_k, rows, d.hidden),
            cos: vec![0.0; d.head_dim / 2],
            sin: vec![0.0; d.head_dim / 2],
            scratch,
        }
    }
}
