//! Rotary position embeddings as LLaMA applies them: the config's rope convention (transformers 4
//! `rope_theta` + `rope_scaling`, or transformers 5 `rope_parameters`; default, linear or Llama
//! 3.1 scaling), the inverse frequencies, HF's half-split `rotate_half` rotation, and the llama3
//! parameters behind a GGUF's per-frequency factors (`rope_freqs.weight`).

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::io::gguf::{RopeFactors, ROPE_FREQS};
use std::path::Path;
use tch::{Kind, Tensor};

/// Rotary frequencies: base θ and the scaling rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RopeScaling {
    Default,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

impl RopeScaling {
    /// The HF `rope_scaling` object of this rule (`None` for the default).
    fn to_json(self) -> Option<serde_json::Value> {
        match self {
            RopeScaling::Default => None,
            RopeScaling::Linear { factor } => {
                Some(serde_json::json!({ "rope_type": "linear", "factor": factor }))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => Some(serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_positions,
            })),
        }
    }
}

impl LlamaConfig {
    /// Sets `rope_scaling` to the llama3 scaling a GGUF's `rope_freqs.weight` factors stand for
    /// (see [`llama3_from_factors`]), so that the model applies it and its export names it; an
    /// error names `file` and the tensor when the factors are no llama3 scaling.
    pub(super) fn set_rope_factors(&mut self, rope: &RopeFactors, file: &Path) -> Result<()> {
        let (theta, _) = self.rope(file)?;
        let scaling =
            llama3_from_factors(&rope.factors, self.head_dim(), theta, rope.original_context)
                .ok_or_else(|| Error::Data {
                    file: file.to_path_buf(),
                    reason: format!(
                "tensor `{ROPE_FREQS}`: its {} factors are not a llama3 rope scaling of head_dim \
                 {} and θ {theta} (the only per-frequency scaling supported)",
                rope.factors.len(),
                self.head_dim()
            ),
                })?;
        self.rope_scaling = scaling.to_json();
        self.rope_parameters = None;
        Ok(())
    }

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
                Error::config(
                    file,
                    field,
                    format!("{rope_type} rope needs a number `{key}`"),
                )
            })
        };
        match rope_type {
            "default" => Ok((theta, RopeScaling::Default)),
            "linear" => Ok((
                theta,
                RopeScaling::Linear {
                    factor: number("factor")?,
                },
            )),
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
                format!("rope type `{other}` is not supported; expected default, linear or llama3"),
            )),
        }
    }
}

/// Inverse frequencies `θ^(−2i/d)`, scaled as asked (transformers'
/// `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).
pub(super) fn inverse_frequencies(head_dim: i64, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    unscaled_inverse_frequencies(head_dim, theta)
        .into_iter()
        .map(|inv| {
            if let RopeScaling::Linear { factor } = scaling {
                return (inv / factor) as f32;
            }
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

fn unscaled_inverse_frequencies(head_dim: i64, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// The llama3 rope scaling whose inverse frequencies are `θ^(−2i/d) / factors[i]`, as llama.cpp
/// applies a GGUF's `rope_freqs.weight` (its converter writes `factor` for long wavelengths, 1
/// for short ones and `1 / ((1 − s)/factor + s)` between). Only the wavelength thresholds
/// `original / low_freq_factor` and `original / high_freq_factor` matter, so `original` (the
/// GGUF's original context length, or 8192 as the converter assumes) fixes the scale. Tried:
/// Llama 3.1's low/high 1 and 4, then the line through the smoothed factors; the one kept
/// reproduces every factor to 1e-5 relative. `None` when none does (not a llama3 scaling).
pub(super) fn llama3_from_factors(
    factors: &[f32],
    head_dim: i64,
    theta: f64,
    original: f64,
) -> Option<RopeScaling> {
    let inv = unscaled_inverse_frequencies(head_dim, theta);
    if factors.len() != inv.len() || factors.iter().any(|f| !(f.is_finite() && *f >= 1.0)) {
        return None;
    }
    let factor = factors.iter().fold(1f32, |m, &f| m.max(f)) as f64;
    if factor == 1.0 {
        return Some(RopeScaling::Default);
    }
    let with = |low_freq_factor: f64, high_freq_factor: f64| RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_positions: original,
    };
    let reproduces = |scaling: RopeScaling| {
        let scaled = inverse_frequencies(head_dim, theta, scaling);
        scaled.iter().zip(&inv).zip(factors).all(|((&s, &i), &f)| {
            let expected = i / f as f64;
            ((s as f64 - expected) / expected).abs() <= 1e-5
        })
    };
    // Between the thresholds s = (x − low)/(high − low), x = original / wavelength.
    let smoothed: Vec<(f64, f64)> = inv
        .iter()
        .zip(factors)
        .filter(|(_, &f)| f as f64 > 1.0 + 1e-6 && (f as f64) < factor * (1.0 - 1e-6))
        .map(|(&i, &f)| {
            let x = original * i / (2.0 * std::f64::consts::PI);
            let s = (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (x, s)
        })
        .collect();
    let mut candidates = vec![with(1.0, 4.0)];
    if let (Some(&(x0, s0)), Some(&(x1, s1))) = (smoothed.first(), smoothed.last()) {
        if (x1 - x0).abs() > 0.0 && (s1 - s0).abs() > 0.0 {
            let slope = (s1 - s0) / (x1 - x0);
            let low = x0 - s0 / slope;
            candidates.push(with(low, low + 1.0 / slope));
        }
    }
    candidates.into_iter().find(|&c| reproduces(c))
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
