//! The two trainers of a run and what they share. The gate trainer ([`adapt`], DESIGN §5) learns
//! which units the model can lose under a latency target; the weight trainer ([`train_weights`])
//! fine-tunes a slim (or fresh) model's weights. Both checkpoint atomically and resume from the
//! last checkpoint with the same steps an uninterrupted run takes: each step reseeds from the
//! run's seed (`optim::seed_step`) and the Adam moments are saved beside the weights. With several
//! workers (`dist`) gradients and losses are averaged over ranks and rank 0 writes. Both append
//! to `metrics.jsonl` through [`MetricsLog`]. Contains no family code and no slicing.

mod gate_trainer;
mod weight_trainer;

pub use gate_trainer::{
    adapt, step_losses, AdaptContext, AdaptOutcome, AdaptState, Lagrangian, Models, Probe,
    StepLosses,
};
pub use weight_trainer::{train_weights, Objective, Validation, WeightTraining};

use crate::dist::{averaged_scalars, Workers};
use crate::error::{Error, Result};
use crate::optim::Adam;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Tensor};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub stage: String,
    pub step: i64,
    pub loss: f64,
    pub kd: f64,
    pub v: f64,
    pub lambda: f64,
    /// The proxy at the expected widths (what the gates' gradient follows).
    pub proxy_ms: f64,
    /// The proxy at the current hard architecture (the keep-set export would take now); `v`
    /// takes this value on steps without a probe.
    #[serde(default)]
    pub kept_proxy_ms: Option<f64>,
    /// Measured at this step (a probe), if any.
    pub real_ms: Option<f64>,
    pub last_real_ms: Option<f64>,
    /// Kept units per group under hard masks (probe steps only: reading them syncs the device).
    pub kept: Option<Vec<usize>>,
    /// Wall seconds of the training step, the probe left out (batch, forwards, backward,
    /// gradient averaging, update, reading the losses).
    #[serde(default)]
    pub step_s: Option<f64>,
}

/// Appends metric lines to `metrics.jsonl`, one JSON object per line.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> Self {
        MetricsLog { path }
    }

    /// Drops lines of `stage` at or after `step` (written after the checkpoint a resume starts
    /// from), so the resumed run continues the file without duplicates.
    pub fn truncate_from(&self, stage: &str, step: i64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(
                |line| match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) => {
                        !(v["stage"] == stage && v["step"].as_i64().is_some_and(|s| s >= step))
                    }
                    Err(_) => false, // a line cut by a crash
                },
            )
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        crate::io::write_atomic(&self.path, body.as_bytes())
    }

    pub fn append<T: Serialize>(&self, line: &T) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let text = serde_json::to_string(line).map_err(|e| Error::Invalid(e.to_string()))?;
        writeln!(file, "{text}").map_err(|e| Error::io(&self.path, e))
    }

    /// Every line of the file, parsed (a line cut by a crash is skipped).
    pub fn read(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The gradients of a store's trainable variables (undefined before the first backward).
pub fn gradients(store: &VarStore) -> Vec<Tensor> {
    store
        .trainable_variables()
        .iter()
        .map(Tensor::grad)
        .collect()
}

/// One descent step on `loss`: every optimiser's gradients cleared, the loss backpropagated, the
/// gradients of `stores` averaged over the workers, every optimiser stepped. Returns `scalars`
/// averaged over the workers and read to the host (one sync), so every rank decides on the same
/// values.
fn descend<const N: usize>(
    loss: &Tensor,
    optimizers: &mut [&mut Adam],
    stores: &[&VarStore],
    workers: &Workers,
    scalars: [&Tensor; N],
) -> Result<[f64; N]> {
    for optimizer in optimizers.iter_mut() {
        optimizer.zero_grad();
    }
    loss.backward();
    let grads: Vec<Tensor> = stores.iter().flat_map(|store| gradients(store)).collect();
    workers.average(&grads)?;
    for optimizer in optimizers.iter_mut() {
        optimizer.step();
    }
    averaged_scalars(workers, scalars)
}

/// The error of a step whose loss is not finite; `loss` describes it (what, and its value).
fn diverged(step: i64, loss: String, checkpoint_dir: &Path) -> Error {
    Error::Training {
        step,
        reason: format!(
            "{loss}; the last good checkpoint is in {}",
            checkpoint_dir.display()
        ),
    }
}

fn create_checkpoint_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// A trainer's saved state (JSON), as its checkpoint wrote it.
fn read_state<T: DeserializeOwned>(file: &Path) -> Result<T> {
    crate::io::hf_config::parse(file, crate::io::hf_config::read_value(file)?)
}

/// Writes every variable of `store` to `file` (safetensors, atomically).
fn save_weights(store: &VarStore, file: &Path) -> Result<()> {
    crate::io::safetensors::write(file, &crate::io::safetensors::named_tensors(store))
}

/// Whether the step count `done` ends a checkpoint interval or the stage.
fn checkpoint_due(done: i64, checkpoint_every: i64, steps: i64) -> bool {
    done % checkpoint_every == 0 || done == steps
}
