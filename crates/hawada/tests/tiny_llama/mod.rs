//! The tiny LLaMA (GQA 4:2, llama3 rope scaling) the LLaMA tests share, with weights made
//! larger than their init; `model_of` does the same for another config (the tiny Qwen2).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::families::llama::{Llama, LlamaConfig};
use hawada::model::Family;
use std::path::Path;
use tch::{Device, Tensor};

/// The tiny config on CPU in f32, its weights drawn from `seed`.
pub fn model(seed: i64) -> Llama {
    model_of(LlamaConfig::tiny(), seed)
}

/// A model of `cfg` on CPU in f32, its weights (biases too) drawn from `seed`.
pub fn model_of(cfg: LlamaConfig, seed: i64) -> Llama {
    tch::manual_seed(seed);
    let model = Llama::new(cfg, Device::Cpu, Path::new("test")).unwrap();
    // Larger weights than the 0.02 init and non-trivial norms, so masking shows everywhere.
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            let noise = Tensor::randn_like(&t) * if name.contains("norm") { 0.3 } else { 0.2 };
            let _ = t.g_add_(&noise);
        }
    });
    model
}
