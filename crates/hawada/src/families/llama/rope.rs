//! Rotary position embeddings as LLaMA applies them: the config's rope convention (transformers 4
//! `rope_theta` + `rope_scaling`, or transformers 5 `rope_parameters`; default or Llama 3.1
//! scaling), the inverse frequencies, and HF's half-split `rotate_half` rotation.

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Rotary frequencies: base θ and the scaling rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RopeScaling {
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

impl LlamaConfig {
    /// Rope base θ and scaling rule; errors name the rope field of `file`.
    pub(super) fn rope(&self, file: &Path) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let field = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let Some(params) = params.filter(|p| !p.is_null()) else {
            return Ok((theta, RopeScaling::Default));
        };
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let number = |key: &str| {
            params.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                Error::config(file, field, format!("llama3 rope needs a number `{key}`"))
            })
        };
        match rope_type {
            "default" => Ok((theta, RopeScaling::Default)),
            "llama3" => Ok((
                theta,
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_positions: number("original_max_position_embeddings")?,
                },
            )),
            other => Err(Error::config(
                file,
                field,
                format!("rope type `{other}` is not supported; expected default or llama3"),
            )),
        }
    }
}

/// Inverse frequencies `θ^(−2i/d)`, Llama-3.1-scaled when asked (transformers'
/// `_compute_llama3_parameters`).
pub(super) fn inverse_frequencies(head_dim: i64, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let inv = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } = scaling
            else {
                return inv as f32;
            };
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let low_freq_wavelen = original_max_positions / low_freq_factor;
            let high_freq_wavelen = original_max_positions / high_freq_factor;
            let scaled = if wavelen > low_freq_wavelen {
                inv / factor
            } else if wavelen < high_freq_wavelen {
                inv
            } else {
                let smooth = (original_max_positions / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            scaled as f32
        })
        .collect()
}

/// Cos and sin of the rotary angles for a run of positions, `[tokens, head_dim]`, in the
/// model's dtype (computed in f32 as transformers does).
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// The angles of positions `[start, start + tokens)` for `inv_freq` (`[head_dim / 2]`, f32),
    /// as `kind`.
    pub(super) fn new(inv_freq: &Tensor, start: i64, tokens: i64, kind: Kind) -> Rotary {
        let positions =
            Tensor::arange_start(start, start + tokens, (Kind::Float, inv_freq.device()));
        let freqs = positions.outer(inv_freq);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        Rotary {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }

    /// HF's `rotate_half` convention: `x·cos + [−x₂, x₁]·sin`, halves of the head.
    pub(super) fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
        x * &self.cos + rotated * &self.sin
    }
}
