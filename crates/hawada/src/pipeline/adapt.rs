//! The adapt stage (DESIGN §3, §5): gates trained against the frozen teacher under the latency
//! budget, resumable from `checkpoints/adapt`; the trained gates are saved in the run directory.

use super::env::RunEnv;
use super::finetune::trainable_copy;
use super::oom::out_of_memory_as_error;
use super::timing::Timing;
use crate::cuda::DeviceMemory;
use crate::data::Examples;
use crate::error::Result;
use crate::gates::Gates;
use crate::latency::proxy::LatencyProxy;
use crate::model::{Family, KeepSet};
use crate::recipe::Recipe;
use crate::train::{adapt, AdaptContext, AdaptOutcome, Models};

/// The trained gates, the keep-set they ended with, and the student they gated.
pub struct Adapted {
    pub gates: Gates,
    pub outcome: AdaptOutcome,
    /// A copy of the teacher whose weights trained beside the gates (`adapt.train_weights`).
    trained_student: Option<Box<dyn Family>>,
    /// Peak device memory while the gates trained (`None` on the CPU).
    pub peak_memory: Option<DeviceMemory>,
}

impl Adapted {
    /// The model the gates were trained on: the teacher itself, or its trained copy.
    pub fn student<'a>(&'a self, teacher: &'a dyn Family) -> &'a dyn Family {
        self.trained_student.as_deref().unwrap_or(teacher)
    }
}

/// Trains the gates (resuming from their checkpoint) and saves them.
pub fn stage(
    teacher: &dyn Family,
    proxy: &mut LatencyProxy,
    target_ms: f64,
    timing: &Timing<'_>,
    train: &dyn Examples,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<Adapted> {
    let (device, kind, workers) = (env.device, env.kind, &env.workers);
    let mut gates = Gates::new(teacher.groups(), recipe.gates.clone(), device)?;
    let trained_student = recipe
        .adapt
        .train_weights
        .then(|| trainable_copy(teacher))
        .transpose()?;
    let student = trained_student.as_deref().unwrap_or(teacher);
    let mut next_input = || workers.shard(&train.random_batch(recipe.adapt.batch, kind).0);
    let mut measure_keep = |keep: &KeepSet| timing.probe(keep);
    let adapt_batch = ("gate training", "adapt.batch", recipe.adapt.batch);
    crate::cuda::reset_peak_memory(device);
    let outcome = out_of_memory_as_error(device, adapt_batch, || {
        adapt(
            Models { teacher, student },
            &mut gates,
            proxy,
            &recipe.adapt,
            target_ms,
            AdaptContext {
                next_batch: &mut next_input,
                measure_keep: &mut measure_keep,
                checkpoint_dir: &env.run_dir.checkpoints("adapt"),
                metrics: &env.metrics,
                observer: env.observer,
                seed: recipe.seed,
                workers,
            },
        )
    })?;
    let peak_memory = crate::cuda::device_memory(device);
    if workers.is_leader() {
        gates.save(&env.run_dir.gates())?;
    }
    Ok(Adapted {
        gates,
        outcome,
        trained_student,
        peak_memory,
    })
}
