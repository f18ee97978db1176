//! The two trainers of a run and what they share. The gate trainer ([`adapt`], DESIGN §5) learns
//! which units the model can lose under a latency target; the weight trainer ([`train_weights`])
//! fine-tunes a slim (or fresh) model's weights. Both checkpoint atomically and resume from the
//! last checkpoint with the same steps an uninterrupted run takes: each step reseeds from the
//! run's seed (`optim::seed_step`) and the Adam moments are saved beside the weights. With several
//! workers (`dist`) gradients and losses are averaged over ranks and rank 0 writes. Both append
//! to `metrics.jsonl` through `run_dir::MetricsLog`. Contains no family code and no slicing.

mod gate_trainer;
mod weight_trainer;

pub use gate_trainer::{
    adapt, step_losses, AdaptContext, AdaptOutcome, AdaptState, Lagrangian, Models, Probe,
    StepLosses,
};
pub use gate_trainer::{default_kd_temperature, AdaptOptions};
pub use weight_trainer::{train_weights, Objective, Validation, WeightTraining};

use crate::dist::{averaged_scalars, Workers};
use crate::error::{Error, Result};
use crate::optim::Adam;
use serde::de::DeserializeOwned;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

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
/// Before the first checkpoint there is no good one to name: a loss not finite from the start
/// points at the inputs (weights, data, learning rate), not at the training.
fn diverged(step: i64, loss: String, checkpoint_dir: &Path) -> Error {
    let has_checkpoint = std::fs::read_dir(checkpoint_dir).is_ok_and(|mut d| d.next().is_some());
    let reason = if has_checkpoint {
        format!(
            "{loss}; the last good checkpoint is in {}",
            checkpoint_dir.display()
        )
    } else {
        format!(
            "{loss}, before any checkpoint was written to {} (the teacher's weights, the data or the learning rate are at fault, not a checkpoint)",
            checkpoint_dir.display()
        )
    };
    Error::Training { step, reason }
}

/// Weights read back from a checkpoint must be finite: a NaN saved there would only show as a
/// diverged loss, blamed on training (issue 24). Names the tensor and the file.
fn check_finite(store: &tch::nn::VarStore, file: &Path) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, tensor) in store.variables() {
        if tensor.isfinite().all().int64_value(&[]) == 0 {
            return Err(Error::Data {
                file: file.to_path_buf(),
                reason: format!(
                    "tensor `{name}` holds NaN or infinite values; the checkpoint is corrupt: delete its folder to train this stage again"
                ),
            });
        }
    }
    Ok(())
}

fn create_checkpoint_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// A trainer's saved state (JSON), as its checkpoint wrote it.
fn read_state<T: DeserializeOwned>(file: &Path) -> Result<T> {
    crate::io::json::parse(file, crate::io::json::read_value(file)?)
}

/// Writes every variable of `store` to `file` (safetensors, atomically).
fn save_weights(store: &VarStore, file: &Path) -> Result<()> {
    crate::io::safetensors::write(file, &crate::io::safetensors::named_tensors(store))
}

/// Whether the step count `done` ends a checkpoint interval or the stage.
fn checkpoint_due(done: i64, checkpoint_every: i64, steps: i64) -> bool {
    done % checkpoint_every == 0 || done == steps
}
