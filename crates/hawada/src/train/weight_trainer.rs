//! The weight trainer: a (slim or fresh) model's weights trained by KD fine-tuning from the
//! frozen teacher (DESIGN §1.5) or, for self-trained teachers, plain supervised training on
//! labels. Knows no gates. Checkpoints the weights atomically every `checkpoint_every` steps and
//! resumes from them. With several workers, gradients and the loss are averaged over ranks and
//! rank 0 writes.

use super::{
    check_finite, checkpoint_due, create_checkpoint_dir, descend, diverged, read_state,
    save_weights,
};
use crate::dist::Workers;
use crate::distill;
use crate::error::{Error, Result};
use crate::io::safetensors::load_file_into;
use crate::model::{Family, Masks, Phase};
use crate::optim::{remove_saved_moments, seed_step, Adam};
use crate::progress::Observer;
use crate::run_dir::MetricsLog;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What a weight-training loop needs: the batches and how to score them.
pub enum Objective<'a> {
    /// Match the teacher's tempered distribution (or its hidden states, for backbones), mixed
    /// with cross-entropy on the labels at `label_weight` (0: distillation alone).
    Distill {
        teacher: &'a dyn Family,
        temperature: f64,
        label_weight: f64,
    },
    /// Cross-entropy on labels.
    Labels,
}

/// Options of one weight-training run.
pub struct WeightTraining<'a> {
    pub stage: &'a str,
    pub steps: i64,
    pub lr: f64,
    pub checkpoint_every: i64,
    pub checkpoint_dir: &'a Path,
    /// The run's seed: each step reseeds from it (`optim::seed_step`).
    pub seed: u64,
    /// The processes training together; `next_batch` yields this rank's rows.
    pub workers: &'a Workers,
    /// Scores the model on held-out data at every checkpoint, and training ends with the
    /// best-scoring weights instead of the last.
    pub keep_best: Option<Validation<'a>>,
}

/// A score of the model on data it does not train on (rank 0 computes it).
pub struct Validation<'a> {
    pub score: &'a dyn Fn(&dyn Family) -> f64,
    pub higher_is_better: bool,
}

impl Validation<'_> {
    fn improves(&self, score: f64, best: Option<&Best>) -> bool {
        best.is_none_or(|best| {
            if self.higher_is_better {
                score > best.score
            } else {
                score < best.score
            }
        })
    }
}

/// The best-scoring checkpoint so far (its weights: `best.safetensors`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Best {
    step: i64,
    score: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WeightState {
    step: i64,
    #[serde(default)]
    best: Option<Best>,
}

#[derive(Serialize)]
struct WeightMetrics<'a> {
    stage: &'a str,
    step: i64,
    loss: f64,
    lr: f64,
}

/// The held-out score at a checkpoint. `step` is the index of the last step done, like the loss
/// lines': a resume from that checkpoint then keeps the line (`MetricsLog::truncate_from`).
#[derive(Serialize)]
struct ValidationMetrics<'a> {
    stage: &'a str,
    step: i64,
    validation: f64,
}

/// The files of a weight-training checkpoint.
struct CheckpointFiles {
    state: PathBuf,
    weights: PathBuf,
    adam: PathBuf,
    best: PathBuf,
}

impl CheckpointFiles {
    fn in_dir(dir: &Path) -> Self {
        CheckpointFiles {
            state: dir.join("state.json"),
            weights: dir.join("model.safetensors"),
            adam: dir.join("adam.safetensors"),
            best: dir.join("best.safetensors"),
        }
    }
}

/// Trains every weight of `model` for `opts.steps` Adam steps with a cosine learning-rate decay.
/// `next_batch` yields `(inputs, labels)` on the model's device.
pub fn train_weights(
    model: &mut dyn Family,
    objective: Objective<'_>,
    next_batch: &mut dyn FnMut() -> (Tensor, Tensor),
    opts: &WeightTraining<'_>,
    metrics: &MetricsLog,
    observer: &dyn Observer,
) -> Result<()> {
    create_checkpoint_dir(opts.checkpoint_dir)?;
    let files = CheckpointFiles::in_dir(opts.checkpoint_dir);
    let WeightState { step: start, best } = resume(model, &files, opts.stage)?;
    let leader = opts.workers.is_leader();
    if leader {
        metrics.truncate_from(opts.stage, start)?;
    }
    model.var_store_mut().unfreeze();
    let mut opt = Adam::new(model.var_store(), opts.lr);
    if start > 0 && files.adam.exists() {
        opt.load(&files.adam)?;
    }
    let mut trainer = WeightTrainer {
        model,
        objective,
        opts,
        metrics,
        files,
        opt,
        best,
    };
    observer.begin(opts.stage, opts.steps as u64);
    for step in start..opts.steps {
        let loss = trainer.train_step(step, next_batch)?;
        observer.advance(step as u64 + 1, &format!("loss {loss:.4}"));
        if checkpoint_due(step + 1, opts.checkpoint_every, opts.steps) {
            trainer.checkpoint(step)?;
        }
    }
    observer.end();
    trainer.keep_best()?;
    if leader {
        remove_saved_moments(&trainer.files.adam)?;
    }
    trainer.model.var_store_mut().freeze();
    Ok(())
}

/// The step and best checkpoint saved in `files`, with the weights restored to that step;
/// step 0 where no checkpoint was written.
fn resume(model: &dyn Family, files: &CheckpointFiles, stage: &str) -> Result<WeightState> {
    if !(files.state.exists() && files.weights.exists()) {
        return Ok(WeightState {
            step: 0,
            best: None,
        });
    }
    let state: WeightState = read_state(&files.state)?;
    load_file_into(model.var_store(), &files.weights)?;
    check_finite(model.var_store(), &files.weights)?;
    tracing::info!(
        stage,
        step = state.step,
        "resuming weight training from checkpoint"
    );
    Ok(state)
}

/// The learning rate of `step`: `lr` decayed along a half cosine to zero at `steps`.
fn cosine_lr(lr: f64, step: i64, steps: i64) -> f64 {
    lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos())
}

/// One weight-training run in progress.
struct WeightTrainer<'a, 'o> {
    model: &'a mut dyn Family,
    objective: Objective<'o>,
    opts: &'a WeightTraining<'a>,
    metrics: &'a MetricsLog,
    files: CheckpointFiles,
    opt: Adam,
    best: Option<Best>,
}

impl WeightTrainer<'_, '_> {
    /// One Adam step on the next batch; returns the loss averaged over the workers.
    fn train_step(
        &mut self,
        step: i64,
        next_batch: &mut dyn FnMut() -> (Tensor, Tensor),
    ) -> Result<f64> {
        let stage = self.opts.stage;
        let lr = cosine_lr(self.opts.lr, step, self.opts.steps);
        self.opt.set_lr(lr);
        seed_step(self.opts.seed, stage, step);
        let (x, y) = next_batch();
        let loss = self.loss(x, &y);
        let [loss] = descend(
            &loss,
            &mut [&mut self.opt],
            &[self.model.var_store()],
            self.opts.workers,
            [&loss],
        )?;
        if !loss.is_finite() {
            let what = format!("{stage} loss is {loss}");
            return Err(diverged(step, what, self.opts.checkpoint_dir));
        }
        if self.opts.workers.is_leader() {
            self.metrics.append(&WeightMetrics {
                stage,
                step,
                loss,
                lr,
            })?;
        }
        Ok(loss)
    }

    /// The objective's loss on inputs `x` with labels `y`.
    fn loss(&self, x: Tensor, y: &Tensor) -> Tensor {
        let model = &*self.model;
        let x = model.prepare_input(x);
        let logits = model.forward(&x, &Masks::none(model.groups().len()), Phase::Train);
        match &self.objective {
            Objective::Distill {
                teacher,
                temperature,
                label_weight,
            } => {
                let target = tch::no_grad(|| {
                    teacher.forward(&x, &Masks::none(teacher.groups().len()), Phase::Eval)
                });
                distill::to_teacher_and_labels(
                    model.output(),
                    &logits,
                    &target,
                    y,
                    *temperature,
                    *label_weight,
                )
            }
            Objective::Labels => distill::cross_entropy(&logits, y),
        }
    }

    /// After `step`: the held-out score (with `keep_best`), then the weights, the moments and
    /// last the state that names their step.
    fn checkpoint(&mut self, step: i64) -> Result<()> {
        self.validate(step)?;
        if self.opts.workers.is_leader() {
            save_weights(self.model.var_store(), &self.files.weights)?;
            self.opt.save(&self.files.adam)?;
            let state = WeightState {
                step: step + 1,
                best: self.best,
            };
            crate::io::json::write(&self.files.state, &state)?;
        }
        Ok(())
    }

    /// With `keep_best`: scores the model after `step` (rank 0) and keeps its weights as
    /// `best.safetensors` if it is the best so far.
    fn validate(&mut self, step: i64) -> Result<()> {
        let Some(validation) = &self.opts.keep_best else {
            return Ok(());
        };
        let (stage, workers, done) = (self.opts.stage, self.opts.workers, step + 1);
        let model = &*self.model;
        let score = workers.from_leader(&format!("{stage}-validation-{done}"), || {
            let _guard = tch::no_grad_guard();
            Ok((validation.score)(model))
        })?;
        if validation.improves(score, self.best.as_ref()) {
            self.best = Some(Best { step: done, score });
            if workers.is_leader() {
                save_weights(model.var_store(), &self.files.best)?;
            }
        }
        if workers.is_leader() {
            self.metrics.append(&ValidationMetrics {
                stage,
                step,
                validation: score,
            })?;
        }
        Ok(())
    }

    /// The stage's weights become the best checkpoint's: `model.safetensors` is replaced by it,
    /// so a resume of the finished stage loads them too.
    fn keep_best(&mut self) -> Result<()> {
        let Some(best) = self.best else {
            return Ok(());
        };
        let files = &self.files;
        let key = format!("{}-best", self.opts.stage);
        let replaced = self.opts.workers.from_leader(&key, || {
            if !files.best.exists() {
                return Ok(false);
            }
            std::fs::rename(&files.best, &files.weights).map_err(|e| Error::io(&files.best, e))?;
            Ok(true)
        })?;
        if replaced {
            load_file_into(self.model.var_store(), &files.weights)?;
            tracing::info!(
                stage = self.opts.stage,
                step = best.step,
                score = best.score,
                "kept the best-scoring checkpoint"
            );
        }
        Ok(())
    }
}
