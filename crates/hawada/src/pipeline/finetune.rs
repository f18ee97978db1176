//! The fine-tune stage: KD fine-tuning of the slim model from the teacher (mixed with the
//! labels at `finetune.label_weight`), resumable from its checkpoints; the teacher baseline and
//! the corrected teacher train the same way, on the same batches.

use super::env::save_model;
use super::env::RunEnv;
use super::oom::out_of_memory_as_error;
use super::splits::Splits;
use crate::data::{Examples, Metric};
use crate::error::{Error, Result};
use crate::eval;
use crate::model::{Family, KeepSet};
use crate::recipe::Recipe;
use crate::run_dir::{StageMemory, TeacherBaseline};
use crate::train::{train_weights, Objective, Validation, WeightTraining};
use std::path::Path;

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
    (teacher, corrected_quality): (&dyn Family, Option<f64>),
    recipe: &Recipe,
    data: &WeightData<'_>,
    memory: &mut StageMemory,
    env: &RunEnv<'_>,
) -> Result<Option<f64>> {
    let finetune = &recipe.finetune;
    if finetune.steps > 0 {
        crate::cuda::reset_peak_memory(env.device);
        finetune_weights("finetune", slim, teacher, recipe, data, env)?;
        memory.finetune = crate::cuda::device_memory(env.device);
    }
    if corrected_quality.is_some() {
        return Ok(corrected_quality);
    }
    if finetune.teacher_baseline && finetune.steps > 0 {
        return Ok(Some(teacher_baseline(teacher, recipe, data, None, env)?));
    }
    Ok(None)
}

/// The teacher baseline (`finetune.teacher_baseline`): a whole copy of `teacher` fine-tuned
/// like the slim model (stage `teacher-baseline`); returns its quality on the test split. That
/// quality is its only result unless `save_to` names a directory for the model (with the
/// tokenizer): `teacher-baseline.json` keeps it, a resumed run reads it back, and the
/// checkpoints (a whole model and its Adam moments) go once it is written.
pub fn teacher_baseline(
    teacher: &dyn Family,
    recipe: &Recipe,
    data: &WeightData<'_>,
    save_to: Option<(&Path, Option<&tokenizers::Tokenizer>)>,
    env: &RunEnv<'_>,
) -> Result<f64> {
    let baseline_path = env.run_dir.teacher_baseline();
    if baseline_path.exists() {
        return Ok(crate::io::json::read::<TeacherBaseline>(&baseline_path)?.quality);
    }
    let mut copy = trainable_copy(teacher)?;
    finetune_weights(
        "teacher-baseline",
        copy.as_mut(),
        teacher,
        recipe,
        data,
        env,
    )?;
    let eval_batch = ("evaluation", "eval.batch", recipe.eval.batch);
    env.workers.from_leader("teacher-baseline-quality", || {
        if let Some((dir, tokenizer)) = save_to {
            save_model(copy.as_ref(), tokenizer, dir)?;
        }
        let quality = out_of_memory_as_error(env.device, eval_batch, || {
            Ok(eval::quality(
                copy.as_ref(),
                teacher,
                data.test,
                data.metric,
                recipe.eval.batch,
                env.kind,
            ))
        })?;
        crate::io::json::write(&baseline_path, &TeacherBaseline { quality })?;
        let checkpoints = env.run_dir.checkpoints("teacher-baseline");
        std::fs::remove_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
        Ok(quality)
    })
}

/// A copy of the whole `model` whose weights train: the student when `adapt.train_weights` is
/// set, and the teacher baseline of `finetune.teacher_baseline`.
pub fn trainable_copy(model: &dyn Family) -> Result<Box<dyn Family>> {
    let mut copy = model.slim(&KeepSet::all(model.groups()))?;
    copy.var_store_mut().unfreeze();
    copy.to_device_layout();
    Ok(copy)
}
