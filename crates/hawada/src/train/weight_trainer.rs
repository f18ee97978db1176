//! Weight training of a (slim or fresh) model: KD fine-tuning from the frozen teacher (DESIGN §1.5)
//! and, for self-trained teachers, plain supervised training on labels. Knows no gates.
//! Checkpoints the weights atomically every `checkpoint_every` steps and resumes from them. With
//! several workers, gradients and the loss are averaged over ranks and rank 0 writes.

use crate::dist::{averaged_scalars, Workers};
use crate::distill;
use crate::error::{Error, Result};
use crate::io::safetensors::{load_file_into, named_tensors};
use crate::model::{Family, Masks, Phase};
use crate::optim::{remove_saved_moments, seed_step, Adam};
use crate::progress::Observer;
use crate::train::{gradients, MetricsLog};
use serde::{Deserialize, Serialize};
use std::path::Path;
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
    std::fs::create_dir_all(opts.checkpoint_dir).map_err(|e| Error::io(opts.checkpoint_dir, e))?;
    let state_file = opts.checkpoint_dir.join("state.json");
    let weights_file = opts.checkpoint_dir.join("model.safetensors");
    let adam_file = opts.checkpoint_dir.join("adam.safetensors");
    let best_file = opts.checkpoint_dir.join("best.safetensors");
    let mut start = 0;
    let mut best = None;
    if state_file.exists() && weights_file.exists() {
        let state: WeightState = crate::io::hf_config::parse(
            &state_file,
            crate::io::hf_config::read_value(&state_file)?,
        )?;
        load_file_into(model.var_store(), &weights_file)?;
        start = state.step;
        best = state.best;
        tracing::info!(
            stage = opts.stage,
            step = start,
            "resuming weight training from checkpoint"
        );
    }
    let leader = opts.workers.is_leader();
    if leader {
        metrics.truncate_from(opts.stage, start)?;
    }
    model.var_store_mut().unfreeze();
    let mut opt = Adam::new(model.var_store(), opts.lr);
    if start > 0 && adam_file.exists() {
        opt.load(&adam_file)?;
    }
    let no_masks = Masks::none(model.groups().len());
    observer.begin(opts.stage, opts.steps as u64);
    for step in start..opts.steps {
        let lr =
            opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / opts.steps as f64).cos());
        opt.set_lr(lr);
        seed_step(opts.seed, opts.stage, step);
        let (x, y) = next_batch();
        let x = model.prepare_input(x);
        let logits = model.forward(&x, &no_masks, Phase::Train);
        let loss = match &objective {
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
                    &y,
                    *temperature,
                    *label_weight,
                )
            }
            Objective::Labels => distill::cross_entropy(&logits, &y),
        };
        opt.zero_grad();
        loss.backward();
        opts.workers.average(&gradients(model.var_store()))?;
        opt.step();
        let [loss_value] = averaged_scalars(opts.workers, [&loss])?;
        if !loss_value.is_finite() {
            return Err(Error::Training {
                step,
                reason: format!(
                    "{} loss is {loss_value}; the last good checkpoint is in {}",
                    opts.stage,
                    opts.checkpoint_dir.display()
                ),
            });
        }
        if leader {
            metrics.append(&WeightMetrics {
                stage: opts.stage,
                step,
                loss: loss_value,
                lr,
            })?;
        }
        observer.advance(step as u64 + 1, &format!("loss {loss_value:.4}"));
        let done = step + 1;
        if done % opts.checkpoint_every == 0 || done == opts.steps {
            if let Some(validation) = &opts.keep_best {
                let key = format!("{}-validation-{done}", opts.stage);
                let score = opts.workers.from_leader(&key, || {
                    let _guard = tch::no_grad_guard();
                    Ok((validation.score)(&*model))
                })?;
                if validation.improves(score, best.as_ref()) {
                    best = Some(Best { step: done, score });
                    if leader {
                        let weights = named_tensors(model.var_store());
                        crate::io::safetensors::write(&best_file, &weights)?;
                    }
                }
                if leader {
                    metrics.append(&ValidationMetrics {
                        stage: opts.stage,
                        step,
                        validation: score,
                    })?;
                }
            }
            if leader {
                crate::io::safetensors::write(&weights_file, &named_tensors(model.var_store()))?;
                opt.save(&adam_file)?;
                crate::io::hf_config::write(&state_file, &WeightState { step: done, best })?;
            }
        }
    }
    observer.end();
    // The stage's weights become the best checkpoint's: `model.safetensors` is replaced by
    // it, so a resume of the finished stage loads them too.
    if let Some(best) = best {
        let replaced = opts
            .workers
            .from_leader(&format!("{}-best", opts.stage), || {
                if !best_file.exists() {
                    return Ok(false);
                }
                std::fs::rename(&best_file, &weights_file).map_err(|e| Error::io(&best_file, e))?;
                Ok(true)
            })?;
        if replaced {
            load_file_into(model.var_store(), &weights_file)?;
            tracing::info!(
                stage = opts.stage,
                step = best.step,
                score = best.score,
                "kept the best-scoring checkpoint"
            );
        }
    }
    if leader {
        remove_saved_moments(&adam_file)?;
    }
    model.var_store_mut().freeze();
    Ok(())
}
