//! The stage commands beside `run`: `hawada export` (the export search from saved gates, ours or
//! another run's), `hawada finetune` (a slim model distilled from a teacher on any device) and
//! `hawada eval` (a model's quality against a teacher). Each calls the same stage code `run`
//! does; each writes its records into its run directory.

use super::env::{save_model, RunEnv};
use super::export::{self, ExportInputs};
use super::finetune::{finetune_weights, WeightData};
use super::profile;
use super::scoring::Scoring;
use super::splits::load_splits;
use super::teacher;
use super::timing::Timing;
use crate::error::{Error, Result};
use crate::eval;
use crate::families;
use crate::gates::Gates;
use crate::model::Family;
use crate::progress::Observer;
use crate::recipe::Recipe;
use crate::run_dir::{Evaluation, Export, FinetuneRecord, RunDir};
use std::path::Path;

/// `hawada export`: the teacher, the profile (reused when `run_dir` has one), the gates saved
/// in `gates_dir` (which must fit the model), and the export search at the recipe's target;
/// writes `gates.*` (when they came from elsewhere), `export.json`, `slim-before-finetune/` and
/// `plots/pareto.png` into `run_dir`.
pub fn export_from_gates(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &RunDir,
    gates_dir: &Path,
    observer: &dyn Observer,
) -> Result<Export> {
    if recipe.adapt.train_weights {
        return Err(Error::config(
            recipe_file,
            "adapt.train_weights",
            "the gates were trained on a copy of the teacher whose weights changed; export from gates slices the teacher's own weights, so run `hawada run` in that run directory instead",
        ));
    }
    let env = RunEnv::open(recipe, recipe_file, run_dir, observer)?;
    let splits = load_splits(recipe, env.device)?;
    let (teacher, _) = teacher::prepare(recipe, recipe_file, &splits, &env)?;
    let model = teacher.model.as_ref();
    let scoring = Scoring::of_teacher(&teacher, &splits, recipe, recipe_file, &env)?;
    let (profile, proxy) = profile::stage(model, recipe, &env)?;
    let timing = Timing::new(model, recipe, &profile, &env)?;
    let mut gates = Gates::new(model.groups(), recipe.gates.clone(), env.device)?;
    gates.load(gates_dir)?;
    let new_gates = gates_dir != run_dir.gates();
    if env.workers.is_leader() && new_gates {
        gates.save(&run_dir.gates())?;
        forget_export_of_other_gates(run_dir)?;
    }
    let as_trained = gates.keep_set();
    let inputs = ExportInputs {
        teacher: model,
        student: model,
        gates: &gates,
        as_trained: &as_trained,
        proxy: &proxy,
        target_ms: profile.target_ms,
        timing: &timing,
        scoring: &scoring,
        tokenizer: splits.tokenizer.as_ref(),
    };
    let (record, _) = export::stage(&inputs, recipe, &env)?;
    if env.workers.is_leader() {
        crate::report::write_export_chart(run_dir, &record)?;
    }
    env.workers.finish()?;
    Ok(record)
}

/// Removes `export.json` when the gates came from elsewhere: it was picked from other gates, and
/// the export searches again. (A changed target never reaches here: `RunEnv::open` refuses a run
/// directory made by another recipe.)
fn forget_export_of_other_gates(run_dir: &RunDir) -> Result<()> {
    let path = run_dir.export();
    if path.exists() {
        tracing::info!(path = %path.display(), "export searched again: the recorded one is for other gates");
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// `hawada finetune`: the slim model in `slim_dir` distilled from the recipe's teacher on the
/// recipe's data as `[finetune]` says, resumable from `checkpoints/finetune`; writes `slim/` and
/// `finetune.json` (quality and KL to the teacher before and after) into `run_dir`.
pub fn finetune_model(
    recipe: &Recipe,
    recipe_file: &Path,
    slim_dir: &Path,
    run_dir: &RunDir,
    observer: &dyn Observer,
) -> Result<FinetuneRecord> {
    let env = RunEnv::open(recipe, recipe_file, run_dir, observer)?;
    let splits = load_splits(recipe, env.device)?;
    let (teacher, finetune_data) = teacher::prepare(recipe, recipe_file, &splits, &env)?;
    let scoring = Scoring::of_teacher(&teacher, &splits, recipe, recipe_file, &env)?;
    let mut slim = families::load(slim_dir, env.device, env.kind, false)?;
    slim.to_device_layout();
    let before = (
        scoring.quality(slim.as_ref()),
        scoring.kl_to_teacher(slim.as_ref()),
    );
    let data = WeightData::new(&splits, finetune_data.train(&splits), teacher.metric);
    let model = teacher.model.as_ref();
    finetune_weights("finetune", slim.as_mut(), model, recipe, &data, &env)?;
    let record = FinetuneRecord {
        slim_from: slim_dir.display().to_string(),
        teacher: recipe.model.dir.display().to_string(),
        metric: teacher.metric.name().into(),
        teacher_quality: teacher.quality,
        before: before.0,
        after: scoring.quality(slim.as_ref()),
        kl_to_teacher_before: before.1,
        kl_to_teacher_after: scoring.kl_to_teacher(slim.as_ref()),
        steps: recipe.finetune.steps,
    };
    if env.workers.is_leader() {
        save_model(slim.as_ref(), splits.tokenizer.as_ref(), &run_dir.slim())?;
        crate::io::json::write(&run_dir.finetune(), &record)?;
    }
    env.workers.finish()?;
    Ok(record)
}

/// `hawada eval`: the recipe's quality metric of the model in `model_dir` on the test split,
/// beside the recipe's teacher, and the model's KL to it. Writes nothing.
pub fn evaluate(recipe: &Recipe, recipe_file: &Path, model_dir: &Path) -> Result<Evaluation> {
    let (device, kind) = (recipe.device.resolve()?, recipe.dtype.kind());
    if !families::has_weights(&recipe.model.dir) {
        return Err(Error::config(
            recipe_file,
            "model.dir",
            format!(
                "{} holds no weights to compare with; give the teacher the model was made from",
                recipe.model.dir.display()
            ),
        ));
    }
    let splits = load_splits(recipe, device)?;
    let load = |dir: &Path| -> Result<Box<dyn Family>> {
        let mut model = families::load(dir, device, kind, false)?;
        model.var_store_mut().freeze();
        model.to_device_layout();
        Ok(model)
    };
    let teacher = load(&recipe.model.dir)?;
    let model = load(model_dir)?;
    let metric = eval::metric_for(teacher.as_ref(), splits.test.as_ref());
    let scoring = Scoring::new(
        teacher.as_ref(),
        &splits,
        metric,
        recipe,
        recipe_file,
        (kind, device),
    )?;
    Ok(Evaluation {
        model: model_dir.display().to_string(),
        teacher: recipe.model.dir.display().to_string(),
        metric: metric.name().into(),
        quality: scoring.quality(model.as_ref()),
        teacher_quality: scoring.quality(teacher.as_ref()),
        kl_to_teacher: scoring.kl_to_teacher(model.as_ref()),
        params: model.num_params(),
        teacher_params: teacher.num_params(),
    })
}
