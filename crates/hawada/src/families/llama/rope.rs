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
/// Llama 3.1's low/high 1 and 4, then thresholds fitted to the factors (the line through the
/// smoothed ones; with one smoothed dim, Llama 3.1's ratio 4; with none, thresholds between the
/// scaled and kept dims); the one kept reproduces every factor to 1e-5 relative. `None` when
/// none does (not a llama3 scaling).
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
    match smoothed[..] {
        [] => {
            // No smoothed dim: any thresholds between the scaled and the kept dims will do.
            let x = |i: f64| original * i / (2.0 * std::f64::consts::PI);
            let scaled = inv.iter().zip(factors).filter(|(_, &f)| f as f64 > 1.0);
            let kept = inv.iter().zip(factors).filter(|(_, &f)| f as f64 <= 1.0);
            let a = scaled.map(|(&i, _)| x(i)).fold(0.0, f64::max);
            let b = kept.map(|(&i, _)| x(i)).fold(f64::INFINITY, f64::min);
            if a < b && b.is_finite() {
                candidates.push(with((2.0 * a + b) / 3.0, (a + 2.0 * b) / 3.0));
            }
        }
        // One smoothed dim: Llama 3.1's high/low ratio of 4 fixes the line.
        [(x, s)] => {
            let low = x / (1.0 + 3.0 * s);
            candidates.push(with(low, 4.0 * low));
        }
        [(x0, s0), .., (x1, s1)] => {
            if (x1 - x0).abs() > 0.0 && (s1 - s0).abs() > 0.0 {
                let slope = (s1 - s0) / (x1 - x0);
                let low = x0 - s0 / slope;
                candidates.push(with(low, low + 1.0 / slope));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: RopeScaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: 8192.0,
    };

    #[test]
    fn llama3_inverse_frequencies_are_transformers_ones() {
        // Llama-3.1-8B's rope (θ 500000, head_dim 128): inv_freq from transformers 5.25's
        // ROPE_INIT_FUNCTIONS["llama3"] (f32), high-frequency dims kept, low-frequency ones
        // divided by 8, dims 29..34 smoothed between. Tolerance 1e-6 relative: transformers
        // computes in f32, HawAda in f64 then rounds.
        let expected = [
            (0, 1.0),
            (10, 0.12868738174438477),
            (28, 0.0032114461064338684),
            (29, 0.0021665706299245358),
            (30, 0.0013718936825171113),
            (31, 0.0008567514596506953),
            (32, 0.0005248460220173001),
            (33, 0.0003126936499029398),
            (34, 0.0001785077911335975),
            (35, 9.556212171446532e-05),
            (50, 4.411534519022098e-06),
            (63, 3.068925877869333e-07),
        ];
        let inv = inverse_frequencies(128, 500000.0, LLAMA31);
        let plain = inverse_frequencies(128, 500000.0, RopeScaling::Default);
        for (i, want) in expected {
            let got = inv[i] as f64;
            assert!(
                ((got - want) / want).abs() <= 1e-6,
                "dim {i}: {got} vs {want}"
            );
        }
        // The scaling changes what it should: dims 0..28 unchanged, 35.. divided by 8.
        assert_eq!(inv[10], plain[10]);
        assert!((plain[50] / inv[50] - 8.0).abs() < 1e-5);
        assert!(plain[31] / inv[31] > 1.0 && plain[31] / inv[31] < 8.0);
    }

    /// The factors llama.cpp's converter writes to `rope_freqs.weight` for `scaling`.
    fn converter_factors(head_dim: i64, theta: f64, scaling: RopeScaling) -> Vec<f32> {
        let plain = inverse_frequencies(head_dim, theta, RopeScaling::Default);
        let scaled = inverse_frequencies(head_dim, theta, scaling);
        plain.iter().zip(&scaled).map(|(p, s)| p / s).collect()
    }

    #[test]
    fn gguf_rope_factors_give_back_a_scaling_with_the_same_frequencies() {
        let tiny = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 64.0,
        };
        // Llama 3.1 itself; a tiny head (one smoothed dim) whose original context the GGUF does
        // not record (8192 assumed); and one with no smoothed dim at all.
        for (head_dim, theta, scaling, original) in [
            (128, 500000.0, LLAMA31, 8192.0),
            (8, 10000.0, tiny, 8192.0),
            (4, 10000.0, tiny, 8192.0),
        ] {
            let factors = converter_factors(head_dim, theta, scaling);
            let fitted = llama3_from_factors(&factors, head_dim, theta, original).unwrap();
            let (a, b) = (
                inverse_frequencies(head_dim, theta, scaling),
                inverse_frequencies(head_dim, theta, fitted),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(((x - y) / x).abs() <= 1e-5, "{a:?} vs {b:?} ({fitted:?})");
            }
        }
        assert_eq!(
            llama3_from_factors(
                &converter_factors(128, 500000.0, LLAMA31),
                128,
                500000.0,
                8192.0
            ),
            Some(LLAMA31)
        );
        // Factors no llama3 scaling makes (rising, then falling): refused.
        let mut odd = vec![1.0f32; 4];
        odd[1] = 3.0;
        assert_eq!(llama3_from_factors(&odd, 8, 10000.0, 8192.0), None);
        assert_eq!(
            llama3_from_factors(&[1.0; 4], 8, 10000.0, 8192.0),
            Some(RopeScaling::Default)
        );
    }
}
