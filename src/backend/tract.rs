//! The tract backend: the bundle's `portable` graph run by tract-onnx, pure Rust.
//!
//! The graph keeps its symbolic `seq`, `past_seq` and `total_seq` dimensions: tract optimizes it
//! once at load (batch fixed to 1) and the same plan serves prefill and every decode step, so
//! nothing is re-optimized per token. Each session keeps its own tract state (scratch buffers
//! reused across calls) and its KV cache as the values the graph returned last: `present.*`
//! becomes the next call's `past_key_values.*` without a copy on our side (the graph's Concat
//! copies the old positions, as in ONNX Runtime).
//!
//! Profile `ort` graphs use ONNX Runtime contrib ops and are refused up front; a graph tract
//! cannot load is an error naming what it choked on. `tract` types stay in this module.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::prelude::*;

use super::{Backend, LoadOptions, Logits, Session};
use crate::bundle::{Bundle, ModelConfig};

type Plan = TypedSimplePlan;

pub struct TractBackend {
    plan: Arc<Plan>,
    io: Arc<Io>,
    config: ModelConfig,
    threads: usize,
}

/// Where each named input and output sits in the plan's order.
struct Io {
    input_ids: usize,
    attention_mask: usize,
    position_ids: Option<usize>,
    past: Vec<usize>,
    logits: usize,
    present: Vec<usize>,
    n_inputs: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
}

impl TractBackend {
    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        if v.profile != "portable" {
            bail!(
                "variant {variant} has profile {}: tract runs only profile portable graphs (profile ort uses ONNX Runtime's contrib ops GroupQueryAttention, SkipSimplifiedLayerNormalization and MatMulNBits); use {} or the ort backend",
                v.profile,
                variant.trim_end_matches("-ort")
            );
        }
        if v.kv_dtype.as_deref().is_some_and(|d| d != "float32") {
            bail!(
                "variant {variant} keeps its KV cache as {:?}: the tract backend feeds float32",
                v.kv_dtype
            );
        }
        Self::load_graph(&bundle.dir.join(&v.graph), &bundle.config, variant, options)
    }

    fn load_graph(
        graph: &Path,
        config: &ModelConfig,
        label: &str,
        options: &LoadOptions,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let model = tract_onnx::onnx()
            .model_for_path(graph)
            .map_err(|e| anyhow!("tract cannot read {label} ({}): {e:#}", graph.display()))?;
        let parsed = started.elapsed();
        let mut typed = model
            .into_typed()
            .map_err(|e| anyhow!("tract cannot type the {label} graph: {e:#}"))?;
        // Batch 1 is all a session runs; fixing it lets tract simplify every shape expression.
        let batch = typed.symbols.sym("batch");
        typed = typed
            .set_symbols(&HashMap::from([(batch, TDim::Val(1))]))
            .map_err(|e| anyhow!("tract cannot fix batch = 1 in {label}: {e:#}"))?;
        let folded = fold_constants(&mut typed)
            .map_err(|e| anyhow!("tract cannot fold the {label} weights: {e:#}"))?;
        let typed = typed
            .into_optimized()
            .map_err(|e| anyhow!("tract cannot optimize the {label} graph: {e:#}"))?;
        let io = Io::find(&typed, config, label)?;
        let run_options = RunOptions {
            executor: (threads > 1)
                .then(|| multithread::Executor::multithread_with_name(threads, "tract")),
            ..Default::default()
        };
        let plan = typed
            .into_runnable_with_options(&run_options)
            .map_err(|e| anyhow!("tract cannot plan the {label} graph: {e:#}"))?;
        tracing::info!(
            variant = label,
            threads,
            parse_s = parsed.as_secs_f64(),
            folded,
            load_s = started.elapsed().as_secs_f64(),
            "tract backend loaded (symbolic seq/past, optimized once)"
        );
        Ok(Self {
            plan,
            io: Arc::new(io),
            config: config.clone(),
            threads,
        })
    }
}

/// Evaluates, once at load, every node whose inputs are all constants: the fp16 → f32 casts
/// and the int8 / int4 dequantization of the weights. tract's own constant folding skips a fold
/// whose output is larger than its input (above 4 MB), which leaves those casts in the graph: it
/// then converts and re-packs every weight at every step (measured on the demo model: fp16
/// decode 12× slower than fp32, int8 8×). Folded, the weights are float32 (fp32 memory) and
/// run at fp32 speed. Returns the number of nodes folded.
fn fold_constants(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::ops::source::TypedSource;
    // Folded inputs stay in the graph until compaction: compact every so often so the load
    // does not hold every weight in both forms at once.
    const COMPACT_EVERY_BYTES: usize = 256 << 20;
    let mut folded = 0;
    loop {
        let mut pending = 0usize;
        let mut progressed = false;
        for id in model.eval_order()? {
            let node = &model.nodes()[id];
            if node.inputs.is_empty() || node.op_is::<Const>() || node.op_is::<TypedSource>() {
                continue;
            }
            let Some(inputs) = model
                .node_input_facts(id)?
                .iter()
                .map(|f| f.konst.clone().map(|k| k.into_tvalue()))
                .collect::<Option<TVec<TValue>>>()
            else {
                continue;
            };
            // Ops that cannot be evaluated out of a plan (stateful, too early) stay as they are.
            let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else {
                continue;
            };
            let name = node.name.clone();
            let mut patch = TypedModelPatch::default();
            for (ix, t) in outputs.into_iter().enumerate() {
                pending += t.volume() * t.datum_type().size_of();
                let wire = patch.add_const(format!("{name}.folded.{ix}"), t.into_arc_tensor())?;
                patch.shunt_outside(model, OutletId::new(id, ix), wire)?;
            }
            patch.apply(model)?;
            folded += 1;
            progressed = true;
            if pending > COMPACT_EVERY_BYTES {
                break;
            }
        }
        model.compact()?;
        if !progressed {
            return Ok(folded);
        }
    }
}

impl Io {
    fn find(model: &TypedModel, config: &ModelConfig, label: &str) -> Result<Self> {
        let inputs: Vec<String> = model
            .inputs
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs: Vec<String> = model
            .outputs
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map_or_else(|| model.node(o.node).name.clone(), str::to_string)
            })
            .collect();
        let pos = |list: &[String], name: &str| list.iter().position(|n| n == name);
        let need = |list: &[String], name: &str, what: &str| {
            pos(list, name).ok_or_else(|| anyhow!("{label}: the graph has no {what} {name:?}"))
        };
        let layers = config.num_hidden_layers;
        let mut past = Vec::new();
        let mut present = Vec::new();
        for i in 0..layers {
            for kind in ["key", "value"] {
                past.push(need(
                    &inputs,
                    &format!("past_key_values.{i}.{kind}"),
                    "input",
                )?);
                present.push(need(&outputs, &format!("present.{i}.{kind}"), "output")?);
            }
        }
        let io = Self {
            input_ids: need(&inputs, "input_ids", "input")?,
            attention_mask: need(&inputs, "attention_mask", "input")?,
            position_ids: pos(&inputs, "position_ids"),
            past,
            logits: need(&outputs, "logits", "output")?,
            present,
            n_inputs: inputs.len(),
            kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
            vocab: config.vocab_size,
        };
        let expected = 2 + usize::from(io.position_ids.is_some()) + 2 * layers;
        if io.n_inputs != expected {
            bail!(
                "{label}: the graph has {} inputs ({inputs:?}), expected {expected}",
                io.n_inputs
            );
        }
        Ok(io)
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        format!("cpu (tract-onnx, {} threads)", self.threads)
    }

    fn create_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        let state = self
            .plan
            .spawn()
            .map_err(|e| anyhow!("tract cannot start a session: {e:#}"))?;
        let mut s = TractSession {
            state,
            io: Arc::clone(&self.io),
            past: Vec::new(),
            len: 0,
            capacity,
            logits: Vec::new(),
        };
        s.reset()?;
        Ok(Box::new(s))
    }
}

pub struct TractSession {
    state: TypedSimpleState,
    io: Arc<Io>,
    /// `past_key_values.*` for the next call, in `io.past` order.
    past: Vec<TValue>,
    len: usize,
    capacity: usize,
    logits: Vec<f32>,
}

impl TractSession {
    fn reset(&mut self) -> Result<()> {
        let (kvh, hd) = (self.io.kv_heads, self.io.head_dim);
        self.past = (0..self.io.past.len())
            .map(|_| Tensor::zero::<f32>(&[1, kvh, 0, hd]).map(Tensor::into_tvalue))
            .collect::<TractResult<_>>()
            .map_err(|e| anyhow!("{e:#}"))?;
        self.len = 0;
        Ok(())
    }
}

fn i64_tensor(data: Vec<i64>) -> Result<TValue> {
    let n = data.len();
    Ok(Tensor::from_shape(&[1, n], &data)
        .map_err(|e| anyhow!("{e:#}"))?
        .into_tvalue())
}

impl Session for TractSession {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            if let Err(e) = self.reset() {
                tracing::error!(error = %e, "cannot reset the tract KV cache");
            }
            return;
        }
        // The graph takes the past as one tensor per layer, so the kept prefix is copied once;
        // this happens when a prompt reuses part of the previous one, never per token.
        let sliced: TractResult<Vec<TValue>> = self
            .past
            .iter()
            .map(|t| t.slice(2, 0, len).map(Tensor::into_tvalue))
            .collect();
        match sliced {
            Ok(past) => {
                self.past = past;
                self.len = len;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot truncate the tract KV cache; starting over");
                let _ = self.reset();
            }
        }
    }

    fn vocab(&self) -> usize {
        self.io.vocab
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
        let io = Arc::clone(&self.io);
        let vocab = io.vocab;
        let past = self.len;
        let n = tokens.len();
        let total = past + n;
        let mut slots: Vec<Option<TValue>> = vec![None; io.n_inputs];
        slots[io.input_ids] = Some(i64_tensor(tokens.iter().map(|&t| i64::from(t)).collect())?);
        let mask =
            Tensor::from_shape(&[1, total], &vec![1i64; total]).map_err(|e| anyhow!("{e:#}"))?;
        slots[io.attention_mask] = Some(mask.into_tvalue());
        if let Some(ix) = io.position_ids {
            slots[ix] = Some(i64_tensor((past as i64..total as i64).collect())?);
        }
        for (ix, value) in io.past.iter().zip(self.past.drain(..)) {
            slots[*ix] = Some(value);
        }
        let inputs: TVec<TValue> = slots
            .into_iter()
            .map(|s| s.ok_or_else(|| anyhow!("internal: an input of the tract graph was not set")))
            .collect::<Result<_>>()?;
        let outputs = match self.state.run(inputs) {
            Ok(o) => o,
            Err(e) => {
                // The cache values went into the failed call: start the sequence over.
                let _ = self.reset();
                return Err(anyhow!("tract run failed: {e:#}"));
            }
        };
        let logits = outputs
            .get(io.logits)
            .context("the graph returned no logits")?;
        let view = logits.try_as_plain_ram().map_err(|e| anyhow!("{e:#}"))?;
        let data = view
            .as_slice::<f32>()
            .map_err(|e| anyhow!("logits: {e:#}"))?;
        if data.len() != n * vocab {
            bail!("logits have {} values, expected {n} × {vocab}", data.len());
        }
        let rows = match which {
            Logits::Last => &data[(n - 1) * vocab..],
            Logits::All | Logits::Each => data,
        };
        self.logits.clear();
        self.logits.extend_from_slice(rows);
        self.past = io
            .present
            .iter()
            .map(|&ix| {
                outputs
                    .get(ix)
                    .cloned()
                    .context("the graph returned too few outputs")
            })
            .collect::<Result<_>>()?;
        self.len = total;
        Ok(&mut self.logits)
    }
}
