//! The teacher stage: load the teacher (training the self-trained one first), check the recipe
//! fits it, score it, extend the fine-tune's data with its samples, and with
//! `finetune.correct_teacher` replace it by the corrected teacher. Also the teacher baseline:
//! the whole teacher fine-tuned like the slim model.

use super::env::{check_lengths, RunEnv};
use super::finetune::{teacher_baseline, WeightData};
use super::oom::{model_out_of_memory_as_error, out_of_memory_as_error};
use super::splits::Splits;
use crate::data::{Examples, Metric, TextDataset};
use crate::dist::Workers;
use crate::error::{Error, Result};
use crate::eval;
use crate::families;
use crate::model::{Family, Output};
use crate::optim::seed_step;
use crate::recipe::{Recipe, TeacherSamples};
use crate::train::{train_weights, Objective, WeightTraining};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The teacher every stage after this one learns from and is compared with.
pub struct Teacher {
    /// The model as loaded, or with `finetune.correct_teacher` the corrected teacher.
    pub model: Box<dyn Family>,
    /// The loaded teacher's quality on the test split.
    pub quality: f64,
    /// The corrected teacher's quality, when it replaced the loaded one.
    pub corrected_quality: Option<f64>,
    pub metric: Metric,
}

/// The fine-tune's training data: the training split, extended by the teacher's samples when
/// `finetune.teacher_samples` asks for them.
pub struct FinetuneData {
    extended: Option<TextDataset>,
}

impl FinetuneData {
    /// The examples weight training draws from.
    pub fn train<'a>(&'a self, splits: &'a Splits) -> &'a dyn Examples {
        self.extended
            .as_ref()
            .map_or(splits.train.as_ref(), |t| t as &dyn Examples)
    }
}

/// Loads and checks the teacher, scores it, samples its text for the fine-tune, and corrects
/// it when the recipe asks: the teacher stage of a run.
pub fn prepare(
    recipe: &Recipe,
    recipe_file: &Path,
    splits: &Splits,
    env: &RunEnv<'_>,
) -> Result<(Teacher, FinetuneData)> {
    let loaded = load(recipe, recipe_file, Some(splits.train.as_ref()), env)?;
    check_fits(loaded.as_ref(), splits, recipe, (recipe_file, env.kind))?;
    tracing::info!(
        family = loaded.family(),
        groups = loaded.groups().len(),
        params = loaded.num_params(),
        "teacher loaded"
    );
    let metric = eval::metric_for(loaded.as_ref(), splits.test.as_ref());
    let eval_batch = ("evaluation", "eval.batch", recipe.eval.batch);
    let quality = env.workers.from_leader("teacher-quality", || {
        out_of_memory_as_error(env.device, eval_batch, || {
            Ok(eval::quality(
                loaded.as_ref(),
                loaded.as_ref(),
                splits.test.as_ref(),
                metric,
                recipe.eval.batch,
                env.kind,
            ))
        })
    })?;
    // Sampled from the original teacher, before any correction, so that the corrected
    // teacher and the slim model learn from the same text.
    let finetune_data = FinetuneData {
        extended: match (&recipe.finetune.teacher_samples, &splits.text_train) {
            (Some(samples), Some(text)) => Some(with_teacher_samples(
                loaded.as_ref(),
                text,
                samples,
                recipe,
                env,
            )?),
            _ => None,
        },
    };
    let data = WeightData::new(splits, finetune_data.train(splits), metric);
    let (model, corrected_quality) = if recipe.finetune.correct_teacher {
        let (corrected, quality) =
            correct_teacher(loaded, recipe, &data, splits.tokenizer.as_ref(), env)?;
        (corrected, Some(quality))
    } else {
        (loaded, None)
    };
    tracing::info!(metric = metric.name(), quality, "teacher evaluated");
    let teacher = Teacher {
        model,
        quality,
        corrected_quality,
        metric,
    };
    Ok((teacher, finetune_data))
}

/// What the recipe asks of the teacher must fit it: sequence lengths, image channels, labels,
/// vocabulary. `kind` is the model's dtype.
fn check_fits(
    model: &dyn Family,
    splits: &Splits,
    recipe: &Recipe,
    (recipe_file, kind): (&Path, Kind),
) -> Result<()> {
    check_lengths(model, recipe, recipe_file)?;
    check_images(model, splits.test.as_ref(), recipe_file)?;
    if recipe.finetune.label_weight > 0.0 {
        for data in [splits.train.as_ref(), splits.test.as_ref()] {
            check_labels(model, data, "finetune.label_weight", recipe, kind)?;
        }
    }
    if recipe.finetune.label_weight > 0.0 && model.output() == Output::Features {
        return Err(Error::config(
            recipe_file,
            "finetune.label_weight",
            "the model outputs features (a backbone), which have no labels to score; set it to 0",
        ));
    }
    if let (Some(tokenizer), Some(vocab)) = (&splits.tokenizer, model.vocab_size()) {
        let ids = tokenizer.get_vocab_size(true) as i64;
        if ids > vocab {
            return Err(Error::config(
                recipe_file,
                "data.tokenizer",
                format!("the tokenizer has {ids} token ids; the model embeds only {vocab}"),
            ));
        }
    }
    Ok(())
}

/// Images must have the channels the model takes (grey data for an RGB model needs
/// `data.channels = 3`), or the first forward panics inside libtorch.
fn check_images(model: &dyn Family, data: &dyn Examples, recipe_file: &Path) -> Result<()> {
    // `num_channels` is the HF config key of every vision family; read, not sampled, so the
    // check draws nothing from the seeded generator.
    let Some(expected) = model.config_json()["num_channels"].as_i64() else {
        return Ok(());
    };
    let Some((x, _)) = data.batches(1, Kind::Float).next() else {
        return Ok(());
    };
    let found = x.size();
    if found.len() == 4 && found[1] != expected {
        return Err(Error::config(
            recipe_file,
            "data.channels",
            format!(
                "the images have {} channel(s) but the model takes {expected} (num_channels in its config); set data.channels = {expected}",
                found[1]
            ),
        ));
    }
    Ok(())
}

/// Labels trained on (`field` > 0) must be classes the model has: cross-entropy on a label
/// past the last logit is an index error inside libtorch. `kind` is the model's dtype.
fn check_labels(
    model: &dyn Family,
    data: &dyn Examples,
    field: &str,
    recipe: &Recipe,
    kind: Kind,
) -> Result<()> {
    let Some(classes) = data.classes() else {
        return Ok(());
    };
    if model.output() != Output::Logits {
        return Ok(());
    }
    let logits = eval::output_width(model, data, kind);
    if classes > logits {
        return Err(Error::Data {
            file: recipe.data.dir.clone(),
            reason: format!(
                "labels go up to {} but the model has {logits} classes (num_labels); {field} trains on the labels, which must be in [0, {logits})",
                classes - 1
            ),
        });
    }
    Ok(())
}

/// Loads the teacher, training it first when the recipe says so and no cached model exists.
pub fn load(
    recipe: &Recipe,
    recipe_file: &Path,
    train: Option<&dyn Examples>,
    env: &RunEnv<'_>,
) -> Result<Box<dyn Family>> {
    let (device, kind) = (env.device, env.kind);
    let dir = &recipe.model.dir;
    let has_weights = families::has_weights(dir);
    if (!has_weights && !recipe.model.random_init) || cached_teacher_is_stale(recipe) {
        // Rank 0 trains it alone; the others wait and load it.
        env.workers
            .from_leader("teacher", || train_teacher(recipe, recipe_file, train, env))?;
    }
    let mut model = model_out_of_memory_as_error(device, dir, || {
        families::load(dir, device, kind, recipe.model.random_init)
    })?;
    model.var_store_mut().freeze();
    model.to_device_layout();
    Ok(model)
}

/// Trains the self-trained teacher `[teacher_training]` describes into `model.dir`.
fn train_teacher(
    recipe: &Recipe,
    recipe_file: &Path,
    train: Option<&dyn Examples>,
    env: &RunEnv<'_>,
) -> Result<()> {
    let (run_dir, device, metrics, observer) =
        (env.run_dir, env.device, &env.metrics, env.observer);
    let dir = &recipe.model.dir;
    let (Some(spec), Some(train)) = (&recipe.teacher_training, train) else {
        return Err(Error::config(recipe_file, "model.dir", format!("{} holds no model.safetensors; give a model directory, set model.random_init, or add [teacher_training]", dir.display())));
    };
    tracing::info!(dir = %dir.display(), "training the teacher (self-trained, cached for later runs)");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_file = dir.join("config.json");
    let record_file = dir.join(TEACHER_RECORD);
    if config_file.exists() && !record_file.exists() {
        // A folder the user filled, not a cache this trainer made: never overwrite it.
        let found = crate::io::json::read_value(&config_file)?;
        if found != spec.config {
            return Err(Error::config(
                recipe_file,
                "model.dir",
                format!(
                    "{} holds a config.json (and no weights) that [teacher_training] did not write; training would overwrite it. Point model.dir at a new folder for the trained teacher, or add that model's model.safetensors",
                    dir.display()
                ),
            ));
        }
    }
    crate::io::json::write(&config_file, &spec.config)?;
    let mut model = model_out_of_memory_as_error(device, dir, || {
        families::load(dir, device, Kind::Float, true)
    })?;
    check_images(model.as_ref(), train, recipe_file)?;
    check_labels(
        model.as_ref(),
        train,
        "[teacher_training]",
        recipe,
        Kind::Float,
    )?;
    let steps = (spec.epochs * train.len() as f64 / spec.batch as f64).ceil() as i64;
    let mut next = || train.random_batch(spec.batch, Kind::Float);
    let opts = WeightTraining {
        stage: "teacher",
        steps,
        lr: spec.lr,
        checkpoint_every: 200,
        checkpoint_dir: &run_dir.checkpoints("teacher"),
        seed: recipe.seed,
        workers: &Workers::single(),
        keep_best: None,
    };
    let teacher_batch = ("teacher training", "teacher_training.batch", spec.batch);
    out_of_memory_as_error(device, teacher_batch, || {
        train_weights(
            model.as_mut(),
            Objective::Labels,
            &mut next,
            &opts,
            metrics,
            observer,
        )
    })?;
    model.save(dir)?;
    crate::io::json::write(&record_file, &teacher_record(recipe))?;
    Ok(())
}

/// Beside a self-trained teacher: what trained it, so that a cached teacher made by another
/// `[teacher_training]` (an untrained one from `epochs = -1`, issue 24) is trained again rather
/// than reused.
const TEACHER_RECORD: &str = "hawada-teacher-training.json";

/// The recipe fields a self-trained teacher depends on.
fn teacher_record(recipe: &Recipe) -> serde_json::Value {
    serde_json::json!({
        "teacher_training": recipe.teacher_training,
        "data_dir": recipe.data.dir,
        "seed": recipe.seed,
    })
}

/// Whether `model.dir` holds a teacher this trainer made from other fields than the recipe's
/// (a folder without the record is the user's, and is used as it is).
pub fn cached_teacher_is_stale(recipe: &Recipe) -> bool {
    if recipe.teacher_training.is_none() || recipe.model.random_init {
        return false;
    }
    let record = recipe.model.dir.join(TEACHER_RECORD);
    crate::io::json::read_value(&record).is_ok_and(|found| found != teacher_record(recipe))
}

/// The training split followed by `samples.sequences` sequences the teacher wrote, each
/// continuing the first `samples.prompt_tokens` tokens of a random training sequence
/// (`finetune.teacher_samples`). Rank 0 samples once into `teacher-samples.safetensors`; every
/// rank, and every resumed run, reads that file.
fn with_teacher_samples(
    teacher: &dyn Family,
    train: &TextDataset,
    samples: &TeacherSamples,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<TextDataset> {
    let path = env.run_dir.teacher_samples();
    let width = recipe.data.seq_len + 1;
    env.workers.from_leader("teacher-samples", || {
        if path.exists() {
            return Ok(());
        }
        let started = Instant::now();
        env.observer
            .begin("teacher samples", samples.sequences as u64);
        let batch = (
            "teacher sampling",
            "finetune.teacher_samples.batch",
            samples.batch,
        );
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < samples.sequences {
            // Each batch's prompts and tokens come from the run's seed alone, as every
            // training step's do.
            seed_step(recipe.seed, "teacher-samples", pieces.len() as i64);
            let n = samples.batch.min(samples.sequences - done);
            let prompts = train
                .random_batch(n, env.kind)
                .0
                .narrow(1, 0, samples.prompt_tokens);
            pieces.push(out_of_memory_as_error(env.device, batch, || {
                teacher.sample_continuations(
                    &prompts,
                    width - samples.prompt_tokens,
                    samples.temperature,
                )
            })?);
            done += n;
            env.observer.advance(done as u64, "");
        }
        env.observer.end();
        let ids = Tensor::cat(&pieces, 0);
        crate::io::safetensors::write(&path, &BTreeMap::from([("ids".to_string(), ids)]))?;
        tracing::info!(
            sequences = samples.sequences,
            tokens = samples.sequences * width,
            seconds = started.elapsed().as_secs_f64(),
            "teacher samples written"
        );
        Ok(())
    })?;
    let ids = crate::io::safetensors::read(&path)?
        .remove("ids")
        .filter(|ids| ids.size() == [samples.sequences, width])
        .ok_or_else(|| Error::Data {
            file: path.clone(),
            reason: format!(
                "expected a tensor `ids` of [{}, {width}] token ids (finetune.teacher_samples.sequences, data.seq_len + 1); delete the file to sample again",
                samples.sequences
            ),
        })?;
    Ok(train.concat(&TextDataset {
        sequences: ids.to_device(env.device),
    }))
}

/// Minitron's teacher correction (`finetune.correct_teacher`): the teacher baseline, saved in
/// `teacher-corrected/` and loaded back frozen, replaces `teacher` for every later stage.
/// Returns it and its quality on the test split.
fn correct_teacher(
    teacher: Box<dyn Family>,
    recipe: &Recipe,
    data: &WeightData<'_>,
    tokenizer: Option<&tokenizers::Tokenizer>,
    env: &RunEnv<'_>,
) -> Result<(Box<dyn Family>, f64)> {
    let dir = env.run_dir.teacher_corrected();
    let quality = teacher_baseline(teacher.as_ref(), recipe, data, Some((&dir, tokenizer)), env)?;
    drop(teacher);
    let mut corrected = families::load(&dir, env.device, env.kind, false)?;
    corrected.var_store_mut().freeze();
    corrected.to_device_layout();
    tracing::info!(quality, dir = %dir.display(), "teacher corrected: the fine-tuned whole teacher teaches from here on");
    Ok((corrected, quality))
}
