//! Rotary position embedding frequencies from config.json, as transformers computes them.
//!
//! Two spellings exist: transformers v4 writes `rope_theta` plus an optional `rope_scaling`
//! object (`type` or `rope_type`, `factor`, …); v5 writes one `rope_parameters` object that
//! also carries `rope_theta`. Both are read. Arithmetic is f32 where torch's is (inverse
//! frequencies, angles) and f64 where Python's is (correction range, attention factor), so
//! the angles match transformers' bit for bit in most positions.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

use crate::bundle::ModelConfig;

/// transformers' default base when a config has none.
const DEFAULT_THETA: f64 = 10_000.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// One inverse frequency per rotated pair (head_dim / 2 values).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
}

impl Rope {
    pub fn from_config(cfg: &ModelConfig) -> Result<Self> {
        let params = rope_params(cfg)?;
        let get = |key: &str| params.get(key).filter(|v| !v.is_null());
        let num = |key: &str| -> Result<Option<f64>> {
            get(key)
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| anyhow!("config.json: rope parameter {key} is not a number"))
                })
                .transpose()
        };
        let theta = num("rope_theta")?
            .or(cfg.rope_theta)
            .unwrap_or(DEFAULT_THETA);
        if !(theta.is_finite() && theta > 0.0) {
            bail!("config.json: rope_theta must be positive, got {theta}");
        }
        if let Some(partial) = num("partial_rotary_factor")? {
            if partial != 1.0 {
                bail!("config.json: partial_rotary_factor {partial} is not supported for Qwen2");
            }
        }
        let rope_type = get("rope_type")
            .or_else(|| get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let dim = cfg.head_dim();
        let base = default_inv_freq(theta, dim);
        match rope_type {
            "default" => Ok(Self {
                inv_freq: base,
                attention_scaling: 1.0,
            }),
            "linear" => {
                let factor = num("factor")?
                    .ok_or_else(|| anyhow!("config.json: linear rope scaling needs a factor"))?
                    as f32;
                Ok(Self {
                    inv_freq: base.iter().map(|f| f / factor).collect(),
                    attention_scaling: 1.0,
                })
            }
            "yarn" => {
                let original = match cfg.original_max_position_embeddings {
                    Some(top_level) => top_level as f64,
                    None => num("original_max_position_embeddings")?
                        .unwrap_or(cfg.max_position_embeddings as f64),
                };
                let yarn = Yarn {
                    theta,
                    dim,
                    factor: num("factor")?,
                    attention_factor: num("attention_factor")?,
                    mscale: num("mscale")?,
                    mscale_all_dim: num("mscale_all_dim")?,
                    beta_fast: num("beta_fast")?,
                    beta_slow: num("beta_slow")?,
                    original_max_position_embeddings: original,
                    max_position_embeddings: cfg.max_position_embeddings as f64,
                    truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
                };
                Ok(yarn.compute())
            }
            other => bail!("config.json: rope type {other:?} is not supported by the native backend (default, linear and yarn are)"),
        }
    }

    /// cos and sin of every pair's angle at `pos`, scaled, into `cos` and `sin`.
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((f, c), s) in self.inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            let angle = p * f;
            *c = angle.cos() * self.attention_scaling;
            *s = angle.sin() * self.attention_scaling;
        }
    }
}

/// The RoPE parameter object in either spelling (empty for plain RoPE).
fn rope_params(cfg: &ModelConfig) -> Result<Map<String, Value>> {
    let value = cfg
        .rope_parameters
        .as_ref()
        .filter(|v| !v.is_null())
        .or(cfg.rope_scaling.as_ref().filter(|v| !v.is_null()));
    match value {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(_) => bail!("config.json: rope_parameters / rope_scaling must be an object"),
    }
}

/// `1 / theta^(2i / dim)` in f32, as `torch.arange(0, dim, 2, dtype=float) / dim`.
fn default_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    pos_freqs(theta, dim).iter().map(|p| 1.0 / p).collect()
}

fn pos_freqs(theta: f64, dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..dim)
        .step_by(2)
        .map(|i| base.powf(i as f32 / dim as f32))
        .collect()
}

/// transformers' `_compute_yarn_parameters`.
struct Yarn {
    theta: f64,
    dim: usize,
    factor: Option<f64>,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    original_max_position_embeddings: f64,
    max_position_embeddings: f64,
    truncate: bool,
}

impl Yarn {
    fn compute(&self) -> Rope {
        // No factor: the ratio of the context lengths (DeepSeek-V3 style configs).
        let factor = self
            .factor
            .unwrap_or(self.max_position_embeddings / self.original_max_position_embeddings);
        let get_mscale = |scale: f64, mscale: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * mscale * scale.ln() + 1.0
            }
        };
        // Python truthiness: a zero mscale counts as absent.
        let truthy = |v: Option<f64>| v.filter(|x| *x != 0.0);
        let attention_factor = match self.attention_factor {
            Some(a) => a,
            None => match (truthy(self.mscale), truthy(self.mscale_all_dim)) {
                (Some(m), Some(m_all)) => get_mscale(factor, m) / get_mscale(factor, m_all),
                _ => get_mscale(factor, 1.0),
            },
        };
        let beta_fast = truthy(self.beta_fast).unwrap_or(32.0);
        let beta_slow = truthy(self.beta_slow).unwrap_or(1.0);

        let dim = self.dim as f64;
        let correction_dim = |rotations: f64| {
            dim * (self.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
                / (2.0 * self.theta.ln())
        };
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim - 1.0);
        let high = if low == high { high + 0.001 } else { high };

        let pos = pos_freqs(self.theta, self.dim);
        let factor32 = factor as f32;
        let inv_freq = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let extrapolation = 1.0 / p;
                let interpolation = 1.0 / (factor32 * p);
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation_weight = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
            })
            .collect();
        Rope {
            inv_freq,
            attention_scaling: attention_factor as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> ModelConfig {
        let mut base = serde_json::json!({
            "vocab_size": 10, "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn default_rope() {
        let r = Rope::from_config(&config(serde_json::json!({"rope_theta": 10000.0}))).unwrap();
        assert_eq!(r.inv_freq.len(), 8);
        assert_eq!(r.inv_freq[0], 1.0);
        assert!((r.inv_freq[1] - 10000f32.powf(-2.0 / 16.0)).abs() < 1e-7);
        assert_eq!(r.attention_scaling, 1.0);
    }

    #[test]
    fn v4_and_v5_spellings_agree() {
        let v4 = config(serde_json::json!({"rope_theta": 1e6, "rope_scaling":
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}));
        let v5 = config(serde_json::json!({"rope_parameters":
            {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
             "original_max_position_embeddings": 1024}}));
        let (a, b) = (
            Rope::from_config(&v4).unwrap(),
            Rope::from_config(&v5).unwrap(),
        );
        assert_eq!(a, b);
        // 0.1 * ln(4) + 1
        assert!((a.attention_scaling - 1.138_629_4).abs() < 1e-6);
        // Highest-frequency pair extrapolates, lowest interpolates by the factor.
        let plain = default_inv_freq(1e6, 16);
        assert_eq!(a.inv_freq[0], plain[0]);
        assert!((a.inv_freq[7] - plain[7] / 4.0).abs() < 1e-12);
    }

    #[test]
    fn unknown_type_is_an_error() {
        let c = config(serde_json::json!({"rope_scaling": {"type": "longrope", "factor": 2.0}}));
        assert!(Rope::from_config(&c).is_err());
    }
}
