//! The stages of DESIGN §1 over a run directory. Each stage reads its record from the run
//! directory when it is there and valid, else computes and writes it, so a rerun resumes after
//! a crash (training stages from their checkpoints). With the CLI, the only caller of
//! `families::load`.

mod adapt;
mod commands;
mod env;
mod export;
mod finetune;
mod oom;
mod profile;
mod scoring;
mod splits;
mod summary;
mod sweep;
mod teacher;
mod timing;

pub use commands::{evaluate, export_from_gates, finetune_model};
pub use env::{default_run_dir, needs_teacher_training, save_model, RunEnv};
pub use oom::{is_out_of_memory, out_of_memory_as_error};
pub use sweep::{sweep, write_report as write_sweep_report};

use crate::error::Result;
use crate::progress::Observer;
use crate::recipe::Recipe;
use crate::run_dir::{Profile, RunDir, StageMemory, Summary};
use std::path::Path;
use std::time::Instant;

/// Runs every stage of `recipe` in `run_dir` (created if needed); returns the summary, also
/// written as `summary.json` with `report.html` beside it.
pub fn run(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &RunDir,
    observer: &dyn Observer,
) -> Result<Summary> {
    let started = Instant::now();
    let env = RunEnv::open(recipe, recipe_file, run_dir, observer)?;
    let splits = splits::load_splits(recipe, env.device)?;
    let (teacher, finetune_data) = teacher::prepare(recipe, recipe_file, &splits, &env)?;
    let model = teacher.model.as_ref();
    let scoring = scoring::Scoring::of_teacher(&teacher, &splits, recipe, recipe_file, &env)?;
    let (profile, mut proxy) = profile::stage(model, recipe, &env)?;
    let timing = timing::Timing::new(model, recipe, &profile, &env)?;
    let mut memory = StageMemory::new(env.device, env.workers.rank);

    let train = splits.train.as_ref();
    let target_ms = profile.target_ms;
    let adapted = adapt::stage(model, &mut proxy, target_ms, &timing, train, recipe, &env)?;
    memory.adapt = adapted.peak_memory;
    memory.write(run_dir)?;

    let (export, mut slim) = export::stage(
        &export::ExportInputs {
            teacher: model,
            student: adapted.student(model),
            gates: &adapted.gates,
            as_trained: &adapted.outcome.keep,
            proxy: &proxy,
            target_ms: profile.target_ms,
            timing: &timing,
            scoring: &scoring,
            tokenizer: splits.tokenizer.as_ref(),
        },
        recipe,
        &env,
    )?;

    let weight_data =
        finetune::WeightData::new(&splits, finetune_data.train(&splits), teacher.metric);
    let teacher_finetuned = finetune::stage(
        slim.as_mut(),
        (model, teacher.corrected_quality),
        recipe,
        &weight_data,
        &mut memory,
        &env,
    )?;
    memory.write(run_dir)?;

    let finished = summary::Finished {
        teacher: &teacher,
        profile: &profile,
        proxy: &proxy,
        adapted: &adapted,
        export: &export,
        slim: slim.as_ref(),
        teacher_finetuned,
        timing: &timing,
        scoring: &scoring,
        tokenizer: splits.tokenizer.as_ref(),
        started,
    };
    let summary = summary::stage(&finished, recipe, &env)?;
    env.workers.finish()?;
    Ok(summary)
}

/// `hawada profile`: the teacher and the profile stage only; returns the profile (also in
/// `profile.json` of `run_dir`, which a later `hawada run` there reuses).
pub fn profile(
    recipe: &Recipe,
    recipe_file: &Path,
    run_dir: &RunDir,
    observer: &dyn Observer,
) -> Result<Profile> {
    let env = RunEnv::open(recipe, recipe_file, run_dir, observer)?;
    // Data only matters here when the teacher must be trained first.
    let splits = needs_teacher_training(recipe)
        .then(|| splits::load_splits(recipe, env.device))
        .transpose()?;
    let train = splits.as_ref().map(|s| s.train.as_ref());
    let model = teacher::load(recipe, recipe_file, train, &env)?;
    env::check_lengths(model.as_ref(), recipe, recipe_file)?;
    Ok(profile::profile_stage(model.as_ref(), recipe, &env)?.0)
}
