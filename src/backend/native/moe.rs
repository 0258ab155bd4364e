//! Qwen2-MoE's sparse MLP (transformers' `Qwen2MoeSparseMoeBlock`), docs/architecture.md
//! ("Mixture of experts").
//!
//! Per token: router logits over the experts, their softmax in f32, the `top_k` most probable
//! experts (weights renormalized to sum 1 when `norm_topk_prob`), each a SwiGLU MLP of its own;
//! plus a shared expert scaled by `sigmoid(shared_expert_gate · x)`. Only the selected experts'
//! weights are read: the rows of a forward call are grouped by expert, and each expert runs once
//! over its rows. Sums follow transformers' order (routed experts by index from zero, then the
//! shared expert), and each row's arithmetic is independent of the others' routing, so batching
//! and `Head::Each` keep their bit-for-bit guarantees.

use anyhow::Result;

use super::kernels::pool::Pool;
use super::kernels::{Kernels, Rows, Scratch};
use super::model::Mlp;
use super::weights::Scope;
use crate::bundle::MoeConfig;

pub struct SparseMlp {
    /// `[experts, hidden]`, float32 in every variant (routing decisions are sensitive to it).
    router: Vec<f32>,
    experts: Vec<Mlp>,
    shared: Mlp,
    /// `[hidden]`: the shared expert's gate.
    shared_gate: Vec<f32>,
    top_k: usize,
    norm_topk_prob: bool,
}

/// One token's choice: an expert and its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub expert: usize,
    pub weight: f32,
}

/// Buffers of the sparse MLP for up to `rows` rows, allocated once per backend.
#[derive(Default)]
pub struct MoeBuffers {
    logits: Vec<f32>,
    choices: Vec<Choice>,
    /// One expert's rows: their indices in the call, gathered inputs, outputs.
    members: Vec<(usize, f32)>,
    gathered: Vec<f32>,
    expert_out: Vec<f32>,
}

impl MoeBuffers {
    /// For `experts` experts of which each row uses `top_k` (a dense model: 0 and 0, nothing
    /// allocated).
    pub fn new(experts: usize, top_k: usize, rows: usize, hidden: usize) -> Self {
        if experts == 0 {
            return Self::default();
        }
        Self {
            logits: vec![0.0; rows * experts],
            choices: vec![
                Choice {
                    expert: 0,
                    weight: 0.0
                };
                rows * top_k
            ],
            members: Vec::with_capacity(rows),
            gathered: vec![0.0; rows * hidden],
            expert_out: vec![0.0; rows * hidden],
        }
    }
}

/// The MLP buffers the experts share with the dense layers (`Workspace::gate`, `up`).
pub struct MlpBuffers<'a> {
    pub gate: &'a mut [f32],
    pub up: &'a mut [f32],
    pub scratch: &'a mut Scratch,
}

impl SparseMlp {
    /// Loads layer `mlp`'s router, experts and shared expert.
    pub fn load(mlp: &Scope, cfg: &MoeConfig, hidden: usize) -> Result<Self> {
        let experts = (0..cfg.experts)
            .map(|e| {
                Mlp::load(
                    &mlp.scope(&format!("experts.{e}")),
                    cfg.intermediate,
                    hidden,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            router: mlp.float_matrix("gate.weight", cfg.experts, hidden)?,
            experts,
            shared: Mlp::load(&mlp.scope("shared_expert"), cfg.shared_intermediate, hidden)?,
            shared_gate: mlp.float_matrix("shared_expert_gate.weight", 1, hidden)?,
            top_k: cfg.top_k,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// The shared expert and the routed experts.
    pub fn mlps(&self) -> (&Mlp, &[Mlp]) {
        (&self.shared, &self.experts)
    }

    /// Weight bytes one token reads: the shared expert, `top_k` experts (of average size) and
    /// the router.
    pub fn bytes_per_token(&self) -> usize {
        let experts: usize = self.experts.iter().map(|m| m.bytes()).sum();
        self.shared.bytes()
            + experts * self.top_k / self.experts.len().max(1)
            + (self.router.len() + self.shared_gate.len()) * 4
    }

    /// `out[..n * hidden]` = the block's output for the `n` normalized rows in `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        k: &Kernels,
        pool: &Pool,
        x: &[f32],
        rows: Rows,
        mlp: &mut MlpBuffers<'_>,
        buf: &mut MoeBuffers,
        out: &mut [f32],
    ) {
        let (n, hidden) = (rows.count(), self.shared_gate.len());
        let experts = self.experts.len();
        let x = &x[..n * hidden];
        // Router logits, one dot product per row and expert: the same bits whatever else the
        // call holds.
        for (row, logits) in x.chunks(hidden).zip(buf.logits.chunks_mut(experts)) {
            for (logit, weights) in logits.iter_mut().zip(self.router.chunks(hidden)) {
                *logit = (k.dot_f32)(row, weights);
            }
        }
        for (logits, choices) in buf
            .logits
            .chunks(experts)
            .zip(buf.choices.chunks_mut(self.top_k))
            .take(n)
        {
            route(logits, self.norm_topk_prob, choices);
        }

        let out = &mut out[..n * hidden];
        out.fill(0.0);
        for (e, expert) in self.experts.iter().enumerate() {
            buf.members.clear();
            for (r, choices) in buf.choices.chunks(self.top_k).take(n).enumerate() {
                if let Some(c) = choices.iter().find(|c| c.expert == e) {
                    buf.members.push((r, c.weight));
                }
            }
            let m = buf.members.len();
            if m == 0 {
                continue;
            }
            for (dst, &(r, _)) in buf.gathered.chunks_mut(hidden).zip(&buf.members) {
                dst.copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
            }
            let (gathered, y) = (&buf.gathered[..m * hidden], &mut buf.expert_out);
            expert.forward(k, pool, gathered, rows.with_count(m), mlp, y);
            for (y, &(r, weight)) in y.chunks(hidden).zip(&buf.members) {
                for (o, &v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(y) {
                    *o += v * weight;
                }
            }
        }

        let y = &mut buf.expert_out;
        self.shared.forward(k, pool, x, rows, mlp, y);
        for ((o, y), row) in out
            .chunks_mut(hidden)
            .zip(y.chunks(hidden))
            .zip(x.chunks(hidden))
        {
            let gate = sigmoid((k.dot_f32)(row, &self.shared_gate));
            for (o, &v) in o.iter_mut().zip(y) {
                *o += v * gate;
            }
        }
    }
}

/// The `choices.len()` most probable experts of one token's router `logits`, by decreasing
/// probability (ties: the lower index first), weighted by their softmax probability over all
/// experts — renormalized over the chosen ones when `norm_topk_prob`.
pub fn route(logits: &[f32], norm_topk_prob: bool, choices: &mut [Choice]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    for slot in 0..choices.len() {
        // Top k by selection: k is small (2–8) and the experts few (≤ 64).
        let mut best: Option<usize> = None;
        for (e, &l) in logits.iter().enumerate() {
            let free = !choices[..slot].iter().any(|c| c.expert == e);
            if free && best.is_none_or(|b| l > logits[b]) {
                best = Some(e);
            }
        }
        let expert = best.unwrap_or(0);
        choices[slot] = Choice {
            expert,
            weight: (logits[expert] - max).exp() / total,
        };
    }
    if norm_topk_prob {
        let sum: f32 = choices.iter().map(|c| c.weight).sum();
        for c in choices.iter_mut() {
            c.weight /= sum;
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(logits: &[f32], k: usize, norm: bool) -> Vec<Choice> {
        let mut choices = vec![
            Choice {
                expert: 0,
                weight: 0.0
            };
            k
        ];
        route(logits, norm, &mut choices);
        choices
    }

    #[test]
    fn route_picks_the_most_probable_experts_with_their_softmax_weights() {
        let logits = [0.5, 2.0, -1.0, 1.0];
        let z: f32 = logits.iter().map(|l: &f32| l.exp()).sum();
        let got = routed(&logits, 2, false);
        assert_eq!(got.iter().map(|c| c.expert).collect::<Vec<_>>(), vec![1, 3]);
        assert!((got[0].weight - 2.0f32.exp() / z).abs() < 1e-6);
        assert!((got[1].weight - 1.0f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn route_renormalizes_the_chosen_weights_when_asked() {
        let got = routed(&[0.5, 2.0, -1.0, 1.0], 2, true);
        let want = 1.0 / (1.0 + (-1.0f32).exp()); // e^2 / (e^2 + e^1)
        assert!((got[0].weight - want).abs() < 1e-6);
        assert!((got[0].weight + got[1].weight - 1.0).abs() < 1e-6);
    }

    #[test]
    fn route_breaks_ties_by_the_lower_index_and_takes_each_expert_once() {
        let got = routed(&[1.0, 3.0, 3.0, 3.0], 3, false);
        assert_eq!(
            got.iter().map(|c| c.expert).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let all = routed(&[0.0, 0.0], 2, true);
        assert_eq!(all[0].expert, 0);
        assert_eq!(all[1].expert, 1);
        assert!((all[0].weight - 0.5).abs() < 1e-7);
    }
}
