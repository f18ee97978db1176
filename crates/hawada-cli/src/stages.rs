//! The pipeline's commands: `run`, `sweep`, `profile`, and the stage commands `export`,
//! `finetune`, `eval`; the recipe they read resolved once, and
//! the data it names fetched before any worker starts.

use crate::print::{
    print_evaluation, print_export, print_finetune, print_profile, print_sweep, print_table,
};
use crate::progress;
use crate::workers::{launch_workers, stop_when_launcher_dies};
use anyhow::{bail, Context};
use hawada::recipe::{Recipe, Target, DEFAULT_RECIPE};
use hawada::run_dir::{RunDir, SweepDir};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `hawada run`: every stage of a recipe in its run directory, on one process or as `gpus`
/// workers.
pub fn run(
    recipe: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    smoke: bool,
    gpus: Option<usize>,
) -> anyhow::Result<ExitCode> {
    if gpus == Some(0) {
        bail!("--gpus 0: give the number of worker processes, at least 1");
    }
    let (recipe, file, run_dir) = resolve_recipe(recipe.as_deref(), smoke, run_dir, "")?;
    // Fetched once, before any worker starts: workers fetching at once would race.
    ensure_data(&recipe)?;
    let workers = gpus.unwrap_or(recipe.gpus);
    if workers > 1 && std::env::var_os("WORLD_SIZE").is_none() {
        recipe.check_batches_split(&file, workers)?;
        let device = recipe.device.resolve()?;
        let visible = tch::Cuda::device_count() as usize;
        if device.is_cuda() && workers > visible {
            anyhow::bail!("--gpus {workers}: this machine shows {visible} CUDA device(s)");
        }
        return launch_workers(workers);
    }
    stop_when_launcher_dies();
    // Rank 0 shows progress and prints the result; the other workers stay quiet.
    let leader = std::env::var("RANK").map_or(true, |rank| rank.trim() == "0");
    let bars = progress::Bars::default();
    let observer: &dyn hawada::progress::Observer = if leader {
        &bars
    } else {
        &hawada::progress::Silent
    };
    let summary = hawada::pipeline::run(&recipe, &file, &RunDir::new(&run_dir), observer)
        .with_context(|| format!("run `{}` in {}", recipe.name, run_dir.display()))?;
    if leader {
        print_table(&summary, &run_dir);
        if smoke {
            println!("(a smoke run: the recipe runs; its numbers are no measurement)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hawada sweep`: the recipe at several targets.
pub fn sweep(
    recipe: PathBuf,
    targets: Vec<f64>,
    run_dir: Option<PathBuf>,
    smoke: bool,
) -> anyhow::Result<()> {
    if let Some(bad) = targets.iter().find(|t| !(**t > 0.0 && **t <= 1.0)) {
        bail!("--targets: {bad} is not a latency target; each must be a fraction of keep-all latency in (0, 1]");
    }
    let (recipe, file, dir) = resolve_recipe(Some(&recipe), smoke, run_dir, "-sweep")?;
    if recipe.gpus > 1 {
        bail!(
            "{}: `gpus = {}`, but a sweep runs in one process on one device; run each target with `hawada run --gpus {}` instead",
            file.display(),
            recipe.gpus,
            recipe.gpus
        );
    }
    ensure_data(&recipe)?;
    let bars = progress::Bars::default();
    let sweep = hawada::pipeline::sweep(&recipe, &file, &SweepDir::new(&dir), &targets, &bars)
        .with_context(|| format!("sweep of `{}` in {}", recipe.name, dir.display()))?;
    print_sweep(&sweep, &dir);
    Ok(())
}

/// `hawada profile`: keep-all latency, site tables, proxy fidelity.
pub fn profile(recipe: PathBuf, run_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let file = recipe;
    let recipe =
        Recipe::from_file(&file).with_context(|| format!("reading recipe {}", file.display()))?;
    if hawada::pipeline::needs_teacher_training(&recipe) {
        ensure_data(&recipe)?;
    }
    let run_dir = run_dir.unwrap_or_else(|| hawada::pipeline::default_run_dir(&recipe));
    let observer = progress::Bars::default();
    let p = hawada::pipeline::profile(&recipe, &file, &RunDir::new(&run_dir), &observer)
        .with_context(|| format!("profiling `{}` in {}", recipe.name, run_dir.display()))?;
    print_profile(&recipe, &p, &run_dir);
    Ok(())
}

/// `hawada export`: the export search from saved gates.
pub fn export(
    recipe_file: &Path,
    gates: Option<PathBuf>,
    (ms, fraction): (Option<f64>, Option<f64>),
    run_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut recipe = read_recipe(recipe_file)?;
    let target = match (ms, fraction) {
        (Some(ms), _) => Some(Target::ms_checked(ms).map_err(|e| anyhow::anyhow!("--ms: {e}"))?),
        (None, Some(f)) => {
            Some(Target::fraction(f).map_err(|e| anyhow::anyhow!("--fraction: {e}"))?)
        }
        (None, None) => None,
    };
    if let Some(target) = target {
        recipe = recipe.with_target(target);
    }
    ensure_data(&recipe)?;
    let run_dir =
        RunDir::new(run_dir.unwrap_or_else(|| hawada::pipeline::default_run_dir(&recipe)));
    // A gates file names its pair's directory.
    let gates_dir = match gates {
        Some(path) if path.is_file() => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        Some(dir) => dir,
        None => run_dir.gates(),
    };
    let bars = progress::Bars::default();
    let export =
        hawada::pipeline::export_from_gates(&recipe, recipe_file, &run_dir, &gates_dir, &bars)
            .with_context(|| {
                format!(
                    "exporting `{}` from the gates in {} into {}",
                    recipe.name,
                    gates_dir.display(),
                    run_dir.root().display()
                )
            })?;
    print_export(&export, &run_dir);
    Ok(())
}

/// `hawada finetune`: a slim model distilled from `teacher`.
pub fn finetune(
    slim: &Path,
    teacher: PathBuf,
    recipe_file: &Path,
    run_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut recipe = read_recipe(recipe_file)?;
    recipe.model.dir = teacher;
    recipe.model.random_init = false;
    ensure_data(&recipe)?;
    let run_dir = RunDir::new(run_dir.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-finetune",
            hawada::pipeline::default_run_dir(&recipe).display()
        ))
    }));
    let bars = progress::Bars::default();
    let record = hawada::pipeline::finetune_model(&recipe, recipe_file, slim, &run_dir, &bars)
        .with_context(|| {
            format!(
                "fine-tuning {} in {}",
                slim.display(),
                run_dir.root().display()
            )
        })?;
    print_finetune(&record, &run_dir);
    Ok(())
}

/// `hawada eval`: a model's quality beside its teacher's.
pub fn eval(model: &Path, recipe_file: &Path, teacher: Option<PathBuf>) -> anyhow::Result<()> {
    let mut recipe = read_recipe(recipe_file)?;
    if let Some(teacher) = teacher {
        recipe.model.dir = teacher;
        recipe.model.random_init = false;
    }
    ensure_data(&recipe)?;
    let evaluation = hawada::pipeline::evaluate(&recipe, recipe_file, model)
        .with_context(|| format!("evaluating {}", model.display()))?;
    print_evaluation(&evaluation);
    Ok(())
}

fn read_recipe(file: &Path) -> anyhow::Result<Recipe> {
    Recipe::from_file(file).with_context(|| format!("reading recipe {}", file.display()))
}

/// The recipe to run (a file, its smoke version, or the embedded default), its file name for
/// errors, and the run directory: `run_dir`, or `runs/<name><suffix>` (`runs/<file
/// stem>-smoke<suffix>` for a smoke run).
fn resolve_recipe(
    recipe: Option<&Path>,
    smoke: bool,
    run_dir: Option<PathBuf>,
    suffix: &str,
) -> anyhow::Result<(Recipe, PathBuf, PathBuf)> {
    let default_dir = |recipe: &Recipe| {
        let dir = hawada::pipeline::default_run_dir(recipe);
        PathBuf::from(format!("{}{suffix}", dir.display()))
    };
    Ok(match (recipe, smoke) {
        (Some(path), true) => {
            let run_dir = run_dir.unwrap_or_else(|| {
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                PathBuf::from("runs").join(format!("{stem}-smoke{suffix}"))
            });
            let recipe = Recipe::smoke_from_file(path, &RunDir::new(&run_dir))
                .with_context(|| format!("reading recipe {} for a smoke run", path.display()))?;
            (recipe, path.to_path_buf(), run_dir)
        }
        (Some(path), false) => {
            let recipe = Recipe::from_file(path)
                .with_context(|| format!("reading recipe {}", path.display()))?;
            let run_dir = run_dir.unwrap_or_else(|| default_dir(&recipe));
            (recipe, path.to_path_buf(), run_dir)
        }
        (None, _) => {
            let file = PathBuf::from("<embedded default recipe>");
            let recipe = Recipe::parse(DEFAULT_RECIPE, &file)?;
            let run_dir = run_dir.unwrap_or_else(|| default_dir(&recipe));
            (recipe, file, run_dir)
        }
    })
}

/// Fetches the recipe's data asset with the project script when its directory is missing.
pub fn ensure_data(recipe: &Recipe) -> anyhow::Result<()> {
    if recipe.data.dir.exists() {
        return Ok(());
    }
    let Some(asset) = &recipe.data.asset else {
        bail!(
            "data directory {} does not exist and the recipe names no `data.asset` to fetch",
            recipe.data.dir.display()
        );
    };
    let script = Path::new("scripts/fetch-assets.sh");
    if !script.exists() {
        bail!("data directory {} is missing; run `scripts/fetch-assets.sh {asset}` from the HawAda checkout", recipe.data.dir.display());
    }
    eprintln!(
        "hawada: fetching asset `{asset}` into {}",
        recipe.data.dir.display()
    );
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(asset)
        .status()
        .with_context(|| format!("starting {}", script.display()))?;
    if !status.success() {
        bail!("{} {asset} failed ({status})", script.display());
    }
    Ok(())
}
