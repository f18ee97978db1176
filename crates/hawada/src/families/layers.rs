//! Layers several families share, as plain structs whose fields are checkpoint names
//! (`weight`, `bias`), built from an `nn::Path` like candle's `with_tracing.rs` layers.

use tch::{nn, Tensor};

/// A dense layer `x·Wᵀ + b`: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Random weights (N(0, 0.02), as HF initialises), zero bias.
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> Self {
        Linear {
            weight: p.randn("weight", &[c_out, c_in], 0.0, 0.02),
            bias: bias.then(|| p.zeros("bias", &[c_out])),
        }
    }

    /// The layers stacked along their outputs: one GEMM computing all of them (inference
    /// copies; the result is outside any VarStore).
    pub fn stacked(parts: &[&Linear]) -> Linear {
        let _guard = tch::no_grad_guard();
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        Linear {
            weight: Tensor::cat(&weights, 0),
            bias: biases.map(|b| Tensor::cat(&b, 0)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}
