//! `hawada run`: chains the stages of DESIGN §1 over a run directory and resumes after a crash
//! (each stage either reloads its recorded output or resumes from its checkpoint). With the CLI,
//! the only caller of `families::load`.

use crate::data::{load_vocabulary, BatchShape, Examples, ImageDataset, Metric, TextDataset};
use crate::dist::Workers;
use crate::error::{Error, Result};
use crate::eval;
use crate::export::search::{candidates, cuts_meeting_target, search, Measurement, SearchContext};
use crate::families;
use crate::finetune::{train_weights, Objective, Validation, WeightTraining};
use crate::gates::{enforce_follows, floor_units, Gates};
use crate::latency::forward::{
    inference_copy, measure_against_keep_all, measure_model, measure_pair,
};
use crate::latency::measure::{device_name, LatencyStats};
use crate::latency::proxy::{Fidelity, LatencyProxy, Sample};
use crate::latency::tables::{
    cache_key, load_cached, measure_tables, store_cached, SiteTables, TableCost, TableOptions,
};
use crate::model::{Family, KeepSet, Masks, Output, UnitKind};
use crate::optim::seed_step;
use crate::progress::Observer;
use crate::recipe::{DataFormat, Recipe, TeacherSamples};
use crate::report::{
    DistilledFrom, LatencyPair, Params, PatchCosine, PhotoQuality, ProxySummary, Quality, Summary,
};
use crate::train::{adapt, AdaptContext, MetricsLog, Models};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One whole-model measurement of a sub-architecture (ms rescaled to the profile's keep-all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub keep: KeepSet,
    pub ms: f64,
}

/// The profile stage's record (`profile.json`), reused on resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub device: String,
    pub keep_all: LatencyStats,
    pub target_ms: f64,
    /// Sub-architectures (keep-all first) the proxies are fitted to.
    pub fit: Vec<Measured>,
    /// Further ones, held out to judge them.
    pub holdout: Vec<Measured>,
    /// Fidelity on `holdout` of the FLOP proxy and of the measured-table proxy.
    pub fidelity_flops: Fidelity,
    pub fidelity_table: Fidelity,
    /// Which proxy trains the gates: "table" or "flops".
    pub proxy_used: String,
    /// Cache key and size of the site tables.
    pub tables_key: String,
    pub table_measurements: usize,
}

impl Profile {
    pub fn fidelity(&self) -> Fidelity {
        if self.proxy_used == "table" {
            self.fidelity_table
        } else {
            self.fidelity_flops
        }
    }
}

/// `proxy` fitted to the `fit` measurements; its fidelity on `holdout`.
fn fit_proxy(
    mut proxy: LatencyProxy,
    fit: &[Measured],
    holdout: &[Measured],
) -> (LatencyProxy, Fidelity) {
    for m in fit {
        proxy.add_sample(Sample {
            cost: proxy.cost_of_keep(&m.keep),
            ms: m.ms,
        });
    }
    let held: Vec<Sample> = holdout
        .iter()
        .map(|m| Sample {
            cost: proxy.cost_of_keep(&m.keep),
            ms: m.ms,
        })
        .collect();
    let fidelity = proxy.fidelity(&held);
    (proxy, fidelity)
}

/// Site tables for `model` on this device: from the cache, or measured and cached.
fn site_tables(model: &dyn Family, recipe: &Recipe, env: &RunEnv<'_>) -> Result<SiteTables> {
    let options = TableOptions {
        grid_step: recipe.latency.table_grid_step,
        protocol: recipe.latency.table_protocol(),
        batch: recipe.latency.batch,
    };
    let workload = recipe.latency.workload();
    let (name, driver) = match env.device {
        Device::Cuda(i) => {
            let info = crate::cuda::device_info(i)?;
            (info.name, info.cuda_driver.to_string())
        }
        other => (device_name(other), "none".to_string()),
    };
    let sites = model.cost_sites(workload);
    let key = cache_key(&name, &driver, env.kind, &options, &sites, model.groups());
    if let Some(tables) = load_cached(&recipe.latency.cache_dir, &key) {
        tracing::info!(key, "site tables from cache");
        return Ok(tables);
    }
    let tables = measure_tables(
        &sites,
        model.groups(),
        options,
        (env.kind, env.device),
        key,
        env.observer,
    );
    store_cached(&recipe.latency.cache_dir, &tables)?;
    Ok(tables)
}

/// Profiles `model` (or reloads `profile.json`): keep-all latency, random sub-architectures
/// measured against keep-all, site tables, the FLOP and table proxies fitted and judged on
/// held-out sub-architectures. Returns the record and the proxy that trains the gates.
pub fn profile_stage(
    model: &dyn Family,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<(Profile, LatencyProxy)> {
    let (device, observer) = (env.device, env.observer);
    let protocol = recipe.latency.protocol();
    let workload = recipe.latency.workload();
    let sites = model.cost_sites(workload);
    let tables = site_tables(model, recipe, env)?;
    let flops = || LatencyProxy::with_flop_cost(&sites, model.groups(), device);
    let table = || {
        LatencyProxy::new(
            &sites,
            model.groups(),
            Box::new(TableCost::new(&tables, device)),
            device,
        )
    };
    let profile_path = env.run_dir.join("profile.json");
    let profile: Profile = if profile_path.exists() {
        // A profile does not depend on the target: a sweep shares one among its targets.
        let stored: Profile = read_json(&profile_path)?;
        let target_ms = target_ms(recipe, stored.keep_all.mean);
        let retargeted = target_ms != stored.target_ms;
        let profile = Profile {
            target_ms,
            ..stored
        };
        if retargeted && env.workers.is_leader() {
            crate::io::hf_config::write(&profile_path, &profile)?;
        }
        profile
    } else {
        let n_archs = recipe.latency.fit_archs + recipe.latency.holdout_archs;
        observer.begin("profile", n_archs as u64 + 1);
        let keep_all_model = inference_copy(model, &KeepSet::all(model.groups()), workload)?;
        let keep_all = measure_model(keep_all_model.as_ref(), workload, protocol)?;
        observer.advance(1, &format!("keep-all {:.2} ms", keep_all.mean));
        let mut fit = vec![Measured {
            keep: KeepSet::all(model.groups()),
            ms: keep_all.mean,
        }];
        for i in 0..n_archs {
            let keep = random_keep(model, recipe.gates.min_keep);
            let sub = inference_copy(model, &keep, workload)?;
            let ms = measure_against_keep_all(
                keep_all_model.as_ref(),
                sub.as_ref(),
                keep_all.mean,
                workload,
                protocol,
            )?
            .mean;
            fit.push(Measured { keep, ms });
            observer.advance(i as u64 + 2, &format!("sub-architecture {ms:.2} ms"));
        }
        observer.end();
        let holdout = fit.split_off(recipe.latency.fit_archs + 1);
        let target_ms = target_ms(recipe, keep_all.mean);
        let (_, fidelity_flops) = fit_proxy(flops(), &fit, &holdout);
        let (_, fidelity_table) = fit_proxy(table(), &fit, &holdout);
        let profile = Profile {
            device: device_name(device),
            keep_all,
            target_ms,
            fit,
            holdout,
            fidelity_flops,
            fidelity_table,
            proxy_used: recipe.latency.cost.clone(),
            tables_key: tables.key.clone(),
            table_measurements: tables.measurements,
        };
        crate::io::hf_config::write(&profile_path, &profile)?;
        profile
    };
    let chosen = if profile.proxy_used == "table" {
        table()
    } else {
        flops()
    };
    let (proxy, _) = fit_proxy(chosen, &profile.fit, &profile.holdout);
    tracing::info!(
        keep_all_ms = profile.keep_all.mean,
        target_ms = profile.target_ms,
        table_mape = profile.fidelity_table.mape,
        table_spearman = profile.fidelity_table.spearman,
        flops_mape = profile.fidelity_flops.mape,
        flops_spearman = profile.fidelity_flops.spearman,
        "profiled"
    );
    Ok((profile, proxy))
}

/// Cuts the export search measures on its way to one that meets the target (one is usually
/// enough; the proxy's error near the target rarely needs more than one correction).
const AT_TARGET_ATTEMPTS: usize = 3;

/// The recipe's latency target in ms, given the keep-all latency.
fn target_ms(recipe: &Recipe, keep_all_ms: f64) -> f64 {
    match (recipe.target.ms, recipe.target.fraction) {
        (Some(ms), _) => ms,
        (None, Some(f)) => f * keep_all_ms,
        (None, None) => unreachable!("validated: exactly one target"),
    }
}

/// A random sub-architecture: an overall keep fraction drawn from [0.25, 1], each group keeping
/// that fraction ± 0.15 of its units (a sublayer: kept with that probability), the `follows`
/// rule applied. Drawing the overall size first spreads the whole-model latencies over the range
/// the gates and the export search explore; independent per-group fractions would average out
/// to nearly one size, and a proxy's ranking would be judged on noise.
fn random_keep(model: &dyn Family, min_keep: i64) -> KeepSet {
    let uniform = || Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]);
    let overall = 0.25 + 0.75 * uniform();
    let groups = model.groups();
    let flat: Vec<Vec<f32>> = groups.iter().map(|g| vec![0.0; g.len as usize]).collect();
    let keep = KeepSet(
        groups
            .iter()
            .map(|g| {
                let k = if g.kind == UnitKind::Sublayer {
                    g.len * i64::from(uniform() < overall)
                } else {
                    let fraction = (overall + 0.3 * (uniform() - 0.5)).clamp(0.25, 1.0);
                    ((g.len as f64 * fraction).round() as i64)
                        .clamp(floor_units(g, min_keep), g.len)
                };
                let mut kept = Vec::<i64>::try_from(
                    &Tensor::randperm(g.len, (Kind::Int64, Device::Cpu)).narrow(0, 0, k),
                )
                .expect("randperm gives i64");
                kept.sort_unstable();
                kept
            })
            .collect(),
    );
    enforce_follows(groups, &flat, keep)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    crate::io::hf_config::parse(path, crate::io::hf_config::read_value(path)?)
}

/// What every stage of one run shares.
pub struct RunEnv<'a> {
    pub run_dir: &'a Path,
    pub device: Device,
    pub kind: Kind,
    pub metrics: MetricsLog,
    pub observer: &'a dyn Observer,
    /// The processes of this run (one unless launched with several workers); rank 0 measures
    /// and writes.
    pub workers: Workers,
}

/// Loads the teacher, training it first when the recipe says so and no cached model exists.
fn teacher(
    recipe: &Recipe,
    recipe_file: &Path,
    train: Option<&dyn Examples>,
    env: &RunEnv<'_>,
) -> Result<Box<dyn Family>> {
    let (device, kind) = (env.device, env.kind);
    let dir = &recipe.model.dir;
    let has_weights = families::has_weights(dir);
    if !has_weights && !recipe.model.random_init {
        // Rank 0 trains it alone; the others wait and load it.
        env.workers
            .from_leader("teacher", || train_teacher(recipe, recipe_file, train, env))?;
    }
    let mut model = families::load(dir, device, kind, recipe.model.random_init)?;
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
    crate::io::hf_config::write(&dir.join("config.json"), &spec.config)?;
    let mut model = families::load(dir, device, Kind::Float, true)?;
    let steps = (spec.epochs * train.len() as f64 / spec.batch as f64).ceil() as i64;
    let mut next = || train.random_batch(spec.batch, Kind::Float);
    let opts = WeightTraining {
        stage: "teacher",
        steps,
        lr: spec.lr,
        checkpoint_every: 200,
        checkpoint_dir: &run_dir.join("checkpoints/teacher"),
        seed: recipe.seed,
        workers: &Workers::single(),
        keep_best: None,
    };
    train_weights(
        model.as_mut(),
        Objective::Labels,
        &mut next,
        &opts,
        metrics,
        observer,
    )?;
    model.save(dir)?;
    Ok(())
}

/// The splits a run uses: training examples, a held-out calibration tail of the training
/// split, and the test split for quality.
struct Splits {
    train: Box<dyn Examples>,
    calibration: Box<dyn Examples>,
    test: Box<dyn Examples>,
    /// Text models: the tokenizer the data was cut with, saved beside every export.
    tokenizer: Option<tokenizers::Tokenizer>,
    /// Text data: the training split's sequences (the same storage as `train`), which
    /// `finetune.teacher_samples` takes its prompts from and extends.
    text_train: Option<TextDataset>,
}

fn load_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    match recipe.data.format {
        DataFormat::Idx => load_image_splits(recipe, device),
        DataFormat::Text => load_text_splits(recipe, device),
    }
}

/// Documents tokenised with the model's tokenizer; the calibration tail is `data.holdout`
/// sequences of the training split.
fn load_text_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    let vocabulary = load_vocabulary(recipe.data.tokenizer.as_ref().unwrap_or(&recipe.model.dir))?;
    let (full_train, mut test) = TextDataset::load_dir(
        &recipe.data.dir,
        &vocabulary.tokenizer,
        recipe.data.seq_len,
        recipe.data.test_documents,
        vocabulary.eos,
        device,
    )?;
    if let Some(limit) = recipe.data.test_limit {
        test = test.slice(0, limit);
    }
    let holdout = recipe.data.holdout.clamp(1, full_train.len() - 1);
    let train_len = full_train.len() - holdout;
    Ok(Splits {
        train: Box::new(full_train.slice(0, train_len)),
        calibration: Box::new(full_train.slice(train_len, holdout)),
        test: Box::new(test),
        tokenizer: Some(vocabulary.tokenizer),
        text_train: Some(full_train.slice(0, train_len)),
    })
}

fn load_image_splits(recipe: &Recipe, device: Device) -> Result<Splits> {
    let mut full_train = ImageDataset::load_idx(&recipe.data.dir, "train", device)?;
    let mut test = ImageDataset::load_idx(&recipe.data.dir, "t10k", device)?;
    if recipe.data.image_size.is_some() || recipe.data.channels.is_some() {
        let shape = BatchShape {
            image_size: recipe
                .data
                .image_size
                .unwrap_or(full_train.images.size()[2]),
            channels: recipe.data.channels.unwrap_or(1),
        };
        full_train.batch_shape = Some(shape);
        test.batch_shape = Some(shape);
    }
    if let Some(limit) = recipe.data.test_limit {
        test = test.take(limit);
    }
    let holdout = recipe.data.holdout.clamp(1, full_train.len() - 1);
    Ok(Splits {
        train: Box::new(full_train.take(full_train.len() - holdout)),
        calibration: Box::new(full_train.slice(full_train.len() - holdout, holdout)),
        test: Box::new(test),
        tokenizer: None,
        text_train: None,
    })
}

/// Creates the run directory, writes the resolved recipe, seeds, resolves device and dtype.
fn open_run<'a>(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &'a Path,
    observer: &'a dyn Observer,
) -> Result<RunEnv<'a>> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let resolved = toml::to_string(recipe)
        .map_err(|e| Error::Invalid(format!("recipe does not serialise: {e}")))?;
    let recipe_device = recipe.device(recipe_file)?;
    let workers = Workers::from_env(recipe_device)?;
    let device = workers.device(recipe_device);
    recipe.check_batches_split(recipe_file, workers.world)?;
    let kind = recipe.kind(recipe_file)?;
    if workers.is_leader() {
        crate::io::write_atomic(&run_dir.join("recipe.toml"), resolved.as_bytes())?;
    }
    tch::manual_seed(recipe.seed as i64);
    if let Device::Cuda(_) = device {
        crate::cuda::tune_cudnn_for_fixed_shapes();
    }
    Ok(RunEnv {
        run_dir,
        device,
        kind,
        metrics: MetricsLog::new(run_dir.join("metrics.jsonl")),
        observer,
        workers,
    })
}

/// Sequence lengths the recipe asks for must fit the model's context.
fn check_lengths(model: &dyn Family, recipe: &Recipe, recipe_file: &Path) -> Result<()> {
    let Some(max) = model.max_tokens() else {
        return Ok(());
    };
    let latency = &recipe.latency;
    let timed = match latency.workload() {
        crate::model::Workload::Forward { tokens, .. }
        | crate::model::Workload::Prefill { tokens, .. } => ("latency.tokens", tokens),
        crate::model::Workload::Decode { context, .. } => ("latency.context", context + 1),
        crate::model::Workload::Generate {
            prompt, new_tokens, ..
        } => ("latency.tokens", prompt + new_tokens),
    };
    let text =
        (recipe.data.format == DataFormat::Text).then_some(("data.seq_len", recipe.data.seq_len));
    for (field, tokens) in std::iter::once(timed).chain(text) {
        if tokens > max {
            return Err(Error::config(
                recipe_file,
                field,
                format!("needs {tokens} tokens per sequence; the model's context is {max}"),
            ));
        }
    }
    Ok(())
}

/// Whether the recipe's teacher must first be trained (it has `[teacher_training]`, and its
/// model holds no weights yet), which needs the data.
pub fn needs_teacher_training(recipe: &Recipe) -> bool {
    recipe.teacher_training.is_some()
        && !recipe.model.random_init
        && !families::has_weights(&recipe.model.dir)
}

/// `hawada profile`: the teacher and the profile stage only; returns the profile (also in
/// `profile.json` of `run_dir`, which a later `hawada run` there reuses).
pub fn profile(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &Path,
    observer: &dyn Observer,
) -> Result<Profile> {
    let env = open_run(recipe, recipe_file, run_dir, observer)?;
    // Data only matters here when the teacher must be trained first.
    let splits = if needs_teacher_training(recipe) {
        Some(load_splits(recipe, env.device)?)
    } else {
        None
    };
    let train = splits.as_ref().map(|s| s.train.as_ref());
    let model = teacher(recipe, recipe_file, train, &env)?;
    check_lengths(model.as_ref(), recipe, recipe_file)?;
    Ok(profile_stage(model.as_ref(), recipe, &env)?.0)
}

/// Runs every stage of `recipe` in `run_dir` (created if needed); returns the summary, also written
/// as `summary.json` with `report.html` beside it.
pub fn run(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &Path,
    observer: &dyn Observer,
) -> Result<Summary> {
    let started = Instant::now();
    let env = open_run(recipe, recipe_file, run_dir, observer)?;
    let (device, kind, metrics) = (env.device, env.kind, &env.metrics);
    let Splits {
        train,
        calibration,
        test,
        tokenizer,
        text_train,
    } = load_splits(recipe, device)?;
    let loaded = teacher(recipe, recipe_file, Some(train.as_ref()), &env)?;
    check_lengths(loaded.as_ref(), recipe, recipe_file)?;
    if recipe.finetune.label_weight > 0.0 && loaded.output() == Output::Features {
        return Err(Error::config(
            recipe_file,
            "finetune.label_weight",
            "the model outputs features (a backbone), which have no labels to score; set it to 0",
        ));
    }
    if let (Some(tokenizer), Some(vocab)) = (&tokenizer, loaded.vocab_size()) {
        let ids = tokenizer.get_vocab_size(true) as i64;
        if ids > vocab {
            return Err(Error::config(
                recipe_file,
                "data.tokenizer",
                format!("the tokenizer has {ids} token ids; the model embeds only {vocab}"),
            ));
        }
    }
    tracing::info!(
        family = loaded.family(),
        groups = loaded.groups().len(),
        params = loaded.num_params(),
        "teacher loaded"
    );
    let metric = eval::metric_for(loaded.as_ref(), test.as_ref());
    let eval_batch = ("evaluation", "eval.batch", recipe.eval.batch);
    let workers = &env.workers;
    let teacher_quality = workers.from_leader("teacher-quality", || {
        out_of_memory_as_error(device, eval_batch, || {
            Ok(eval::quality(
                loaded.as_ref(),
                loaded.as_ref(),
                test.as_ref(),
                metric,
                recipe.eval.batch,
                kind,
            ))
        })
    })?;
    // Sampled from the original teacher, before any correction, so that the corrected
    // teacher and the slim model learn from the same text.
    let finetune_train = match (&recipe.finetune.teacher_samples, &text_train) {
        (Some(samples), Some(text)) => Some(with_teacher_samples(
            loaded.as_ref(),
            text,
            samples,
            recipe,
            &env,
        )?),
        _ => None,
    };
    let weight_data = WeightData {
        train: finetune_train
            .as_ref()
            .map_or(train.as_ref(), |t| t as &dyn Examples),
        calibration: calibration.as_ref(),
        test: test.as_ref(),
        metric,
    };
    // From here on `model` is the teacher of every stage: the one loaded, or with
    // `finetune.correct_teacher` the whole teacher fine-tuned on the data.
    let (model, corrected_quality) = if recipe.finetune.correct_teacher {
        let (corrected, quality) =
            correct_teacher(loaded, recipe, &weight_data, tokenizer.as_ref(), &env)?;
        (corrected, Some(quality))
    } else {
        (loaded, None)
    };
    let quality_of = |m: &dyn Family| {
        eval::quality(
            m,
            model.as_ref(),
            test.as_ref(),
            metric,
            recipe.eval.batch,
            kind,
        )
    };
    let patch_cosine_of = |m: &dyn Family| {
        (m.output() == Output::Features).then(|| {
            let masks = Masks::none(m.groups().len());
            eval::feature_cosine(
                m,
                &masks,
                model.as_ref(),
                test.as_ref(),
                recipe.eval.batch,
                kind,
            )
            .patches
        })
    };
    let photos = match (&recipe.data.photos, recipe.data.format) {
        (Some(dir), DataFormat::Idx) => {
            let size = recipe.data.image_size.unwrap_or(28);
            Some((dir, ImageDataset::load_png_folder(dir, size, device)?))
        }
        (Some(_), DataFormat::Text) => {
            return Err(Error::config(
                recipe_file,
                "data.photos",
                "photos go with image data (format = \"idx\")",
            ))
        }
        (None, _) => None,
    };
    let photo_score = |m: &dyn Family| {
        photos.as_ref().map(|(_, data)| {
            let masks = Masks::none(m.groups().len());
            let batch = recipe.eval.batch;
            match m.output() {
                Output::Features => {
                    eval::feature_cosine(m, &masks, model.as_ref(), data, batch, kind).cls
                }
                Output::Logits => eval::agreement(m, &masks, model.as_ref(), data, batch, kind),
            }
        })
    };
    tracing::info!(metric = metric.name(), teacher_quality, "teacher evaluated");

    // Profile: keep-all latency, site tables, both proxies fitted and judged.
    let protocol = recipe.latency.protocol();
    let workload = recipe.latency.workload();
    let latency_batch = ("latency measurement", "latency.batch", recipe.latency.batch);
    // Rank 0 measures; the other ranks then read its profile.json and the cached site tables.
    let mut profiled = None;
    workers.from_leader("profile", || {
        profiled = Some(out_of_memory_as_error(device, latency_batch, || {
            profile_stage(model.as_ref(), recipe, &env)
        })?);
        Ok(())
    })?;
    let (profile, mut proxy) = match profiled {
        Some(profiled) => profiled,
        None => profile_stage(model.as_ref(), recipe, &env)?,
    };

    // Adapt. The student is the teacher itself, or a copy when its weights train too.
    let mut gates = Gates::new(model.groups(), recipe.gates.clone(), device)?;
    let student_copy = recipe
        .adapt
        .train_weights
        .then(|| trainable_copy(model.as_ref()))
        .transpose()?;
    let student: &dyn Family = student_copy.as_deref().unwrap_or(model.as_ref());
    let mut next_input = || workers.shard(&train.random_batch(recipe.adapt.batch, kind).0);
    let relative_target = recipe.target.fraction.is_some();
    // Only rank 0 measures, so only it holds the keep-all inference copy.
    let keep_all_model = workers
        .is_leader()
        .then(|| inference_copy(model.as_ref(), &KeepSet::all(model.groups()), workload))
        .transpose()?;
    let keep_all_model = || {
        keep_all_model
            .as_deref()
            .expect("rank 0 holds the keep-all copy and alone measures")
    };
    let mut measure_keep = |keep: &KeepSet| -> Result<LatencyStats> {
        let slim = inference_copy(model.as_ref(), keep, workload)?;
        if !relative_target {
            return measure_model(slim.as_ref(), workload, protocol);
        }
        // A relative target is checked against keep-all measured alongside.
        measure_against_keep_all(
            keep_all_model(),
            slim.as_ref(),
            profile.keep_all.mean,
            workload,
            protocol,
        )
    };
    let adapt_batch = ("gate training", "adapt.batch", recipe.adapt.batch);
    let mut memory = StageMemory::new(device, workers.rank);
    crate::cuda::reset_peak_memory(device);
    let outcome = out_of_memory_as_error(device, adapt_batch, || {
        adapt(
            Models {
                teacher: model.as_ref(),
                student,
            },
            &mut gates,
            &mut proxy,
            &recipe.adapt,
            profile.target_ms,
            AdaptContext {
                next_batch: &mut next_input,
                measure_keep: &mut measure_keep,
                checkpoint_dir: &run_dir.join("checkpoints/adapt"),
                metrics,
                observer,
                seed: recipe.seed,
                workers,
            },
        )
    })?;
    memory.adapt = crate::cuda::device_memory(device);
    memory.write(run_dir)?;
    if workers.is_leader() {
        gates.save(run_dir)?;
    }

    // Export: the GPU-friendly search over roundings of the trained keep-set and of the cuts of
    // the same logits that the proxy (refitted by every probe) puts at the target, corrected by
    // measuring them; every candidate measured (against keep-all, drift-cancelled) and scored
    // on the calibration batch.
    let logits = gates.host_logits();
    let mut measure_candidate = |keep: &KeepSet| -> Result<Measurement> {
        let slim = inference_copy(model.as_ref(), keep, workload)?;
        let latency = measure_against_keep_all(
            keep_all_model(),
            slim.as_ref(),
            profile.keep_all.mean,
            workload,
            protocol,
        )?;
        Ok(Measurement {
            latency,
            params: slim.num_params(),
        })
    };
    let mut score = |keep: &KeepSet| {
        let hard = Masks::from_keep(model.groups(), keep, (kind, device));
        eval::agreement(
            student,
            &hard,
            model.as_ref(),
            calibration.as_ref(),
            recipe.eval.batch,
            kind,
        )
    };
    // Rank 0 searches and scores; every rank slims its student to the keep-set it picked.
    let mut exported_slim = None;
    // The pick is recorded (`export.json`) and reused on resume: searching again would time the
    // candidates again and could pick another shape than the fine-tune checkpoint holds.
    let export_path = run_dir.join("export.json");
    let export = workers.from_leader("export", || {
        if export_path.exists() {
            return read_json::<Export>(&export_path);
        }
        let (search_table, searched, pick) =
            out_of_memory_as_error(device, latency_batch, || {
                let cuts = cuts_meeting_target(
                    model.groups(),
                    &logits,
                    recipe.gates.min_keep,
                    profile.target_ms,
                    &|keep| proxy.predict_keep_ms(keep),
                    &mut |keep| Ok(measure_candidate(keep)?.latency.mean),
                    AT_TARGET_ATTEMPTS,
                )?;
                let mut bases = vec![("as trained".to_string(), outcome.keep.clone())];
                bases.extend(cuts);
                let listed = candidates(
                    model.groups(),
                    &logits,
                    &bases,
                    recipe.gates.min_keep,
                    &recipe.export,
                );
                search(
                    model.groups(),
                    listed,
                    profile.target_ms,
                    SearchContext {
                        measure: &mut measure_candidate,
                        score: &mut score,
                        observer,
                    },
                )
            })?;
        let keep = searched[pick].clone();
        let calibration_agreement = search_table[pick].agreement;
        let mut slim = student.slim(&keep)?;
        save_model(
            slim.as_ref(),
            tokenizer.as_ref(),
            &run_dir.join("slim-before-finetune"),
        )?;
        slim.to_device_layout();
        let before = Export {
            quality: quality_of(slim.as_ref()),
            patch_cosine: patch_cosine_of(slim.as_ref()),
            photos: photo_score(slim.as_ref()),
            keep,
            search_table,
        };
        tracing::info!(picked = %before.search_table[pick].name, slim_before = before.quality, calibration_agreement, "exported");
        crate::io::hf_config::write(&export_path, &before)?;
        exported_slim = Some(slim);
        Ok(before)
    })?;
    let mut slim = match exported_slim {
        Some(slim) => slim,
        None => {
            let mut slim = student.slim(&export.keep)?;
            slim.to_device_layout();
            slim
        }
    };
    let Export {
        keep,
        search_table,
        quality: slim_before,
        patch_cosine: patches_before,
        photos: photos_before,
    } = export;

    // Fine-tune by distillation (mixed with the labels at `finetune.label_weight`).
    let finetune = &recipe.finetune;
    if finetune.steps > 0 {
        crate::cuda::reset_peak_memory(device);
        finetune_weights(
            "finetune",
            slim.as_mut(),
            model.as_ref(),
            recipe,
            &weight_data,
            &env,
        )?;
        memory.finetune = crate::cuda::device_memory(device);
    }
    let teacher_finetuned = if corrected_quality.is_some() {
        corrected_quality
    } else if finetune.teacher_baseline && finetune.steps > 0 {
        Some(teacher_baseline(
            model.as_ref(),
            recipe,
            &weight_data,
            None,
            &env,
        )?)
    } else {
        None
    };
    memory.write(run_dir)?;
    // Rank 0 evaluates, measures and writes; the others return its summary.
    let summary = workers.from_leader("summary", || {
        out_of_memory_as_error(device, eval_batch, || {
            save_model(slim.as_ref(), tokenizer.as_ref(), &run_dir.join("slim"))?;
            let slim_quality = quality_of(slim.as_ref());
            let slim_patch_cosine = patches_before.zip(patch_cosine_of(slim.as_ref())).map(
                |(before_finetune, after_finetune)| PatchCosine {
                    before_finetune,
                    after_finetune,
                },
            );
            let slim_kl = eval::kl_to_teacher(
                slim.as_ref(),
                model.as_ref(),
                test.as_ref(),
                recipe.eval.batch,
                kind,
            );

            // Final measurement: keep-all and slim in the same process, back to back.
            observer.begin("measure", 2);
            let slim_inference = inference_copy(slim.as_ref(), &KeepSet::all(slim.groups()), workload)?;
            let [keep_all, slim_latency] = measure_pair(
                keep_all_model(),
                slim_inference.as_ref(),
                workload,
                protocol,
            )?;
            observer.advance(2, "keep-all and slim, interleaved");
            observer.end();
            let widths: Vec<i64> = model
                .groups()
                .iter()
                .zip(&keep.0)
                .map(|(g, k)| k.len() as i64 * g.unit_width)
                .collect();
            let summary = Summary {
                family: model.family().to_string(),
                model: recipe
                    .model
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| recipe.name.clone()),
                device: device_name(device),
                dtype: recipe.dtype.clone(),
                target_ms: profile.target_ms,
                latency_ms: LatencyPair {
                    keep_all,
                    slim: slim_latency,
                },
                timing: if protocol.cuda_graphs && device.is_cuda() {
                    "cuda_graph"
                } else {
                    "eager"
                }
                .into(),
                speedup: keep_all.mean / slim_latency.mean,
                params: Params {
                    teacher: model.num_params(),
                    slim: slim.num_params(),
                },
                quality: Quality {
                    metric: metric.name().into(),
                    teacher: teacher_quality,
                    teacher_finetuned,
                    distilled_from: Some(if corrected_quality.is_some() {
                        DistilledFrom::TeacherFinetuned
                    } else {
                        DistilledFrom::Teacher
                    }),
                    finetune_teacher_samples: recipe
                        .finetune
                        .teacher_samples
                        .as_ref()
                        .map(|samples| samples.sequences),
                    slim_before_finetune: slim_before,
                    slim: slim_quality,
                    slim_kl_to_teacher: slim_kl,
                    slim_patch_cosine_to_teacher: slim_patch_cosine,
                    photos: photos
                        .as_ref()
                        .zip(photos_before)
                        .zip(photo_score(slim.as_ref()))
                        .map(|(((dir, data), slim_before_finetune), slim)| PhotoQuality {
                            dir: dir.display().to_string(),
                            images: data.len(),
                            metric: match model.output() {
                                Output::Features => "cls_cosine_to_teacher",
                                Output::Logits => "top1_agreement_percent",
                            }
                            .into(),
                            slim_before_finetune,
                            slim,
                        }),
                },
                proxy: ProxySummary {
                    mape: profile.fidelity().mape,
                    spearman: profile.fidelity().spearman,
                    n: profile.fidelity().n,
                    cost: proxy.cost_name().into(),
                },
                proxy_flops: profile.fidelity_flops,
                proxy_table: profile.fidelity_table,
                search: search_table.clone(),
                wall_s: started.elapsed().as_secs_f64(),
                slim_widths: model
                    .groups()
                    .iter()
                    .map(|g| g.name.clone())
                    .zip(widths)
                    .collect(),
                adapt_steps: outcome.steps,
                target_met: Some(match recipe.target.fraction {
                    Some(fraction) => slim_latency.mean <= fraction * keep_all.mean,
                    None => slim_latency.mean <= profile.target_ms,
                }),
                workload: Some(workload),
            };
            let latency_json = serde_json::json!({ "profile": profile, "probes": outcome.probes, "search": search_table, "final": { "keep_all": keep_all, "slim": slim_latency } });
            crate::io::hf_config::write(&run_dir.join("latency.json"), &latency_json)?;
            summary.write(&run_dir.join("summary.json"))?;
            crate::report::write_html(run_dir)?;
            Ok(summary)
        })
    })?;
    workers.finish()?;
    Ok(summary)
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
    let path = env.run_dir.join("teacher-samples.safetensors");
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

/// The data weight training reads: batches from `train`, the calibration split that
/// `finetune.keep_best` scores checkpoints on, and the test split for quality.
struct WeightData<'a> {
    train: &'a dyn Examples,
    calibration: &'a dyn Examples,
    test: &'a dyn Examples,
    metric: Metric,
}

/// Trains `student`'s weights as `[finetune]` says: distillation from `teacher` mixed with the
/// labels at `label_weight`, checkpointed under `checkpoints/<stage>`. The slim model, the
/// teacher baseline and the corrected teacher all train this way, on the same batches.
fn finetune_weights(
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
        checkpoint_dir: &env.run_dir.join("checkpoints").join(stage),
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

/// The teacher baseline (`finetune.teacher_baseline`): a whole copy of `teacher` fine-tuned
/// like the slim model (stage `teacher-baseline`); returns its quality on the test split. That
/// quality is its only result unless `save_to` names a directory for the model (with the
/// tokenizer): `teacher-baseline.json` keeps it, a resumed run reads it back, and the
/// checkpoints (a whole model and its Adam moments) go once it is written.
fn teacher_baseline(
    teacher: &dyn Family,
    recipe: &Recipe,
    data: &WeightData<'_>,
    save_to: Option<(&Path, Option<&tokenizers::Tokenizer>)>,
    env: &RunEnv<'_>,
) -> Result<f64> {
    let baseline_path = env.run_dir.join("teacher-baseline.json");
    if baseline_path.exists() {
        return Ok(read_json::<TeacherBaseline>(&baseline_path)?.quality);
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
        crate::io::hf_config::write(&baseline_path, &TeacherBaseline { quality })?;
        let checkpoints = env.run_dir.join("checkpoints/teacher-baseline");
        std::fs::remove_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
        Ok(quality)
    })
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
    let dir = env.run_dir.join("teacher-corrected");
    let quality = teacher_baseline(teacher.as_ref(), recipe, data, Some((&dir, tokenizer)), env)?;
    drop(teacher);
    let mut corrected = families::load(&dir, env.device, env.kind, false)?;
    corrected.var_store_mut().freeze();
    corrected.to_device_layout();
    tracing::info!(quality, dir = %dir.display(), "teacher corrected: the fine-tuned whole teacher teaches from here on");
    Ok((corrected, quality))
}

/// A copy of the whole `model` whose weights train: the student when `adapt.train_weights` is
/// set, and the teacher baseline of `finetune.teacher_baseline`.
fn trainable_copy(model: &dyn Family) -> Result<Box<dyn Family>> {
    let mut copy = model.slim(&KeepSet::all(model.groups()))?;
    copy.var_store_mut().unfreeze();
    copy.to_device_layout();
    Ok(copy)
}

/// Device memory of one worker's training stages (`memory/rank<N>.json`): what a GPU must hold
/// for a recipe, per worker. The adapt figure on rank 0 includes its keep-all inference copy.
#[derive(Serialize)]
struct StageMemory {
    rank: usize,
    device: String,
    /// Peak while the gates trained (`None` on the CPU).
    adapt: Option<crate::cuda::DeviceMemory>,
    /// Peak while the slim model was fine-tuned.
    finetune: Option<crate::cuda::DeviceMemory>,
}

impl StageMemory {
    fn new(device: Device, rank: usize) -> Self {
        StageMemory {
            rank,
            device: device_name(device),
            adapt: None,
            finetune: None,
        }
    }

    fn write(&self, run_dir: &Path) -> Result<()> {
        let dir = run_dir.join("memory");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::io::hf_config::write(&dir.join(format!("rank{}.json", self.rank)), self)
    }
}

/// What rank 0's export stage decided, for every rank: the keep-set, and the slim model's
/// scores before fine-tuning for the summary (`export.json`, reused on resume).
#[derive(Serialize, Deserialize)]
struct Export {
    keep: KeepSet,
    search_table: Vec<crate::report::Candidate>,
    quality: f64,
    patch_cosine: Option<f64>,
    photos: Option<f64>,
}

/// `teacher-baseline.json`: the quality of the whole teacher fine-tuned like the slim model.
#[derive(Serialize, Deserialize)]
struct TeacherBaseline {
    quality: f64,
}

/// Runs one stage, turning the device running out of memory into an error that names the
/// stage's batch field and suggests half of it. libtorch reports it as an error, which tch's
/// plain tensor methods raise as a panic: that panic is caught here, any other one goes on.
/// `(stage, field, batch)` describe the stage.
pub fn out_of_memory_as_error<T>(
    device: Device,
    (stage, field, batch): (&str, &str, i64),
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let is_oom = |message: &str| message.contains("out of memory");
    // libtorch's own sentence says how much was asked for and what the allocator held.
    let error = |message: &str| {
        Error::Device {
        device: device_name(device),
        reason: format!(
            "out of memory during {stage} at {field} = {batch}; try a smaller {field} (e.g. {}) ({})",
            (batch / 2).max(1),
            message
                .lines()
                .find(|line| line.contains("out of memory"))
                .unwrap_or(message)
                .trim()
                .trim_start_matches("Torch(\"")
        ),
    }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Err(e)) if is_oom(&e.to_string()) => Err(error(&e.to_string())),
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if is_oom(message) {
                Err(error(message))
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// Writes `model` into `dir` (config + weights), with the tokenizer of text models so that
/// the export loads elsewhere as it is.
pub fn save_model(
    model: &dyn Family,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
) -> Result<()> {
    model.save(dir)?;
    if let Some(tokenizer) = tokenizer {
        let file = dir.join("tokenizer.json");
        tokenizer.save(&file, false).map_err(|e| Error::Data {
            file: file.clone(),
            reason: format!("tokenizer not written: {e}"),
        })?;
    }
    Ok(())
}

/// Default run directory of a recipe: `runs/<name>`.
pub fn default_run_dir(recipe: &Recipe) -> PathBuf {
    PathBuf::from("runs").join(&recipe.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_device_memory_names_the_batch_field_and_a_smaller_value() {
        let stage = ("gate training", "adapt.batch", 64);
        let err = out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
            panic!("Torch(\"CUDA out of memory. Tried to allocate 1002.00 MiB\")")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gate training") && err.contains("adapt.batch = 64") && err.contains("32"),
            "{err}"
        );
        // The same from a fallible op's error.
        let err = out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
            Err(Error::Invalid("CUDA out of memory".into()))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("adapt.batch"), "{err}");
        // Other panics are not swallowed.
        let other = std::panic::catch_unwind(|| {
            out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
                panic!("index out of range")
            })
        });
        assert!(other.is_err());
        assert_eq!(
            out_of_memory_as_error(Device::Cpu, stage, || Ok(7)).unwrap(),
            7
        );
    }
}
