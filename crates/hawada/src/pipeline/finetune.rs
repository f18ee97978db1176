//! The fine-tune stage: KD fine-tuning of the slim model from the teacher (mixed with the
//! labels at `finetune.label_weight`), resumable from its checkpoints; the teacher baseline and
//! the corrected teacher train the same way, on the same batches.

use super::env::RunEnv;
use super::oom::out_of_memory_as_error;
use super::splits::Splits;
use super::teacher::{teacher_baseline, Teacher};
use crate::data::{Examples, Metric};
use crate::error::Result;
use crate::eval;
use crate::finetune::{train_weights, Objective, Validation, WeightTraining};
use crate::model::Family;
use crate::recipe::Recipe;
use crate::run_dir::StageMemory;

/// The data weight training reads: batches from `train`, the calibration split that
/// `finetune.keep_best` scores checkpoints on, and the test split for quality.
pub struct WeightData<'a> {
    train: &'a dyn Examples,
    calibration: &'a dyn Examples,
    pub test: &'a dyn Examples,
    pub metric: Metric,
}

/// Trains `student`'s weights as `[finetune]` says: distillation from `teacher` mixed with the
/// labels at `label_weight`, checkpointed under `checkpoints/<stage>`. The slim model, the
/// teacher baseline and the corrected teacher all train this way, on the same batches.
pub fn finetune_weights(
    stage: &str,
    student: &mut dyn Family,
    teacher: &dyn Family,
    recipe: &Recipe,
    data: &WeightData<'_>,
    env: &RunEnv<'_>,
) -> Result<()> {
    let (finetune, kind, workers) = (&recipe.finetune, env.kind, &env.workers);
    let calibration_score = |m: &dyn Family| {
        eval::quality(
            m,
            teacher,
            data.calibration,
            data.metric,
            recipe.eval.batch,
            kind,
        )
    };
    let mut next = || {
        let (x, y) = data.train.random_batch(finetune.batch, kind);
        (workers.shard(&x), workers.shard(&y))
    };
    let opts = WeightTraining {
        stage,
        steps: finetune.steps,
        lr: finetune.lr,
        checkpoint_every: finetune.checkpoint_every,
        checkpoint_dir: &env.run_dir.checkpoints(stage),
        seed: recipe.seed,
        workers,
        keep_best: finetune.keep_best.then_some(Validation {
            score: &calibration_score,
            higher_is_better: data.metric.higher_is_better(),
        }),
    };
    let batch = ("fine-tuning", "finetune.batch", finetune.batch);
    out_of_memory_as_error(env.device, batch, || {
        train_weights(
            student,
            Objective::Distill {
                teacher,
                temperature: finetune.kd_temperature,
                label_weight: finetune.label_weight,
            },
            &mut next,
            &opts,
            &env.metrics,
            env.observer,
        )
    })
}

impl<'a> WeightData<'a> {
    /// Batches from `train`; calibration and test from the run's splits.
    pub fn new(splits: &'a Splits, train: &'a dyn Examples, metric: Metric) -> Self {
        WeightData {
            train,
            calibration: splits.calibration.as_ref(),
            test: splits.test.as_ref(),
            metric,
        }
    }
}

/// Fine-tunes `slim` (when `finetune.steps > 0`), then, when the recipe asks and the teacher
/// was not corrected already, the teacher baseline. Returns the fine-tuned teacher's quality
/// (the corrected teacher's, or the baseline's).
pub fn stage(
    slim: &mut dyn Family,
    teacher: &Teacher,
    recipe: &Recipe,
    data: &WeightData<'_>,
    memory: &mut StageMemory,
    env: &RunEnv<'_>,
) -> Result<Option<f64>> {
    let finetune = &recipe.finetune;
    if finetune.steps > 0 {
        crate::cuda::reset_peak_memory(env.device);
        finetune_weights("finetune", slim, teacher.model.as_ref(), recipe, data, env)?;
        memory.finetune = crate::cuda::device_memory(env.device);
    }
    if teacher.corrected_quality.is_some() {
        return Ok(teacher.corrected_quality);
    }
    if finetune.teacher_baseline && finetune.steps > 0 {
        return Ok(Some(teacher_baseline(
            teacher.model.as_ref(),
            recipe,
            data,
            None,
            env,
        )?));
    }
    Ok(None)
}
