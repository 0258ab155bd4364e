//! The decoder-with-past interface a graph must have (names, element types, KV shapes), read
//! from the ONNX Runtime session.

use anyhow::{bail, Context, Result};
use ort::session::Session as OrtSession;
use ort::value::{Outlet, TensorElementType, ValueType};

use crate::bundle::ModelConfig;

/// The optional input that limits the logits to the last positions (transformers' name).
pub const LOGITS_TO_KEEP: &str = "logits_to_keep";

/// Graph I/O names and the shapes the cache needs.
#[derive(Debug, Clone)]
pub struct GraphIo {
    pub has_position_ids: bool,
    /// The graph takes `logits_to_keep` (profile `ort`): logits only for that many positions,
    /// counted from the end.
    pub keeps_logits: bool,
    pub past: Vec<String>,
    pub present: Vec<String>,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// float16 KV caches (profile `gpu`), else float32.
    pub kv_f16: bool,
    pub vocab: usize,
}

impl GraphIo {
    /// Checks the graph has the decoder-with-past interface this backend feeds.
    pub fn check(session: &OrtSession, config: &ModelConfig, label: &str) -> Result<Self> {
        let input = |name: &str| session.inputs().iter().find(|i| i.name() == name);
        let output = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let expect = |found: Option<&Outlet>,
                      name: &str,
                      ty: TensorElementType|
         -> Result<Vec<i64>> {
            match found.map(|o| o.dtype()) {
                None => bail!("{label}: the graph has no {name:?} (not a decoder-with-past graph with the Optimum / ONNX Runtime GenAI names)"),
                Some(ValueType::Tensor { ty: t, shape, .. }) if *t == ty => Ok(shape.to_vec()),
                Some(other) => bail!("{label}: {name:?} is {other}, expected a {ty} tensor"),
            }
        };
        expect(input("input_ids"), "input_ids", TensorElementType::Int64)?;
        expect(
            input("attention_mask"),
            "attention_mask",
            TensorElementType::Int64,
        )?;
        let has_position_ids = match input("position_ids") {
            Some(_) => {
                expect(
                    input("position_ids"),
                    "position_ids",
                    TensorElementType::Int64,
                )?;
                true
            }
            None => false,
        };
        let keeps_logits = match input(LOGITS_TO_KEEP) {
            Some(found) => {
                expect(Some(found), LOGITS_TO_KEEP, TensorElementType::Int64)?;
                true
            }
            None => false,
        };
        let logits = expect(output("logits"), "logits", TensorElementType::Float32)?;
        let layers = config.num_hidden_layers;
        let found = session
            .inputs()
            .iter()
            .filter(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".key"))
            .count();
        if found != layers {
            bail!("{label}: the graph has {found} past_key_values.*.key inputs, config.json says {layers} layers");
        }
        let (kvh, hd) = (config.kv_heads(), config.head_dim());
        // The first past input's element type is the cache's; every other must agree.
        let kv_type = match input("past_key_values.0.key").map(|o| o.dtype()) {
            Some(ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            }) => TensorElementType::Float16,
            _ => TensorElementType::Float32,
        };
        let mut past = Vec::new();
        let mut present = Vec::new();
        for i in 0..layers {
            for kind in ["key", "value"] {
                let p = format!("past_key_values.{i}.{kind}");
                let shape = expect(input(&p), &p, kv_type)
                    .context("the ort backend feeds float32 or float16 KV caches")?;
                let fixed = |ax: usize, want: usize| {
                    shape.get(ax).is_none_or(|&d| d < 0 || d as usize == want)
                };
                if shape.len() != 4 || !fixed(1, kvh) || !fixed(3, hd) {
                    bail!("{label}: {p} has shape {shape:?}, expected [batch, {kvh}, past_seq, {hd}] from config.json");
                }
                let q = format!("present.{i}.{kind}");
                expect(output(&q), &q, kv_type)?;
                past.push(p);
                present.push(q);
            }
        }
        let vocab = config.vocab_size;
        if logits
            .last()
            .is_some_and(|&d| d >= 0 && d as usize != vocab)
        {
            bail!(
                "{label}: logits have {} entries per position, config.json says vocab_size {vocab}",
                logits[logits.len() - 1]
            );
        }
        Ok(Self {
            has_position_ids,
            keeps_logits,
            past,
            present,
            kv_heads: kvh,
            head_dim: hd,
            kv_f16: kv_type == TensorElementType::Float16,
            vocab,
        })
    }
}
