//! What every stage of one run shares: the run directory, device and dtype resolved once, the
//! metrics log, the progress observer and the worker processes; and the checks a recipe must
//! pass against its loaded model before any stage runs.

use crate::dist::Workers;
use crate::error::{Error, Result};
use crate::families;
use crate::model::{Family, Workload};
use crate::progress::Observer;
use crate::recipe::{DataFormat, Recipe};
use crate::run_dir::{check_same_recipe, MetricsLog, RunDir, RunLock};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// What every stage of one run shares.
pub struct RunEnv<'a> {
    pub run_dir: &'a RunDir,
    pub device: Device,
    pub kind: Kind,
    pub metrics: MetricsLog,
    pub observer: &'a dyn Observer,
    /// The processes of this run (one unless launched with several workers); rank 0 measures
    /// and writes.
    pub workers: Workers,
    /// Released when the run ends (rank 0 only).
    _lock: Option<RunLock>,
}

impl<'a> RunEnv<'a> {
    /// Creates the run directory, writes the resolved recipe, seeds, resolves device and dtype.
    pub fn open(
        recipe: &Recipe,
        recipe_file: &Path,
        run_dir: &'a RunDir,
        observer: &'a dyn Observer,
    ) -> Result<Self> {
        let root = run_dir.root();
        check_is_directory(root)?;
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let resolved = toml::to_string(recipe)
            .map_err(|e| Error::Invalid(format!("recipe does not serialise: {e}")))?;
        let recipe_device = recipe.device.resolve()?;
        let workers = Workers::from_env(recipe_device)?;
        let device = workers.device(recipe_device);
        recipe.check_batches_split(recipe_file, workers.world)?;
        // Rank 0 writes for every worker: its lock stands for the run.
        let lock = workers
            .is_leader()
            .then(|| RunLock::acquire(run_dir))
            .transpose()?;
        // Before recipe.toml is rewritten: it records what made the directory's records.
        check_same_recipe(run_dir, &resolved)?;
        if workers.is_leader() {
            crate::io::write_atomic(&run_dir.recipe(), resolved.as_bytes())?;
        }
        tch::manual_seed(recipe.seed as i64);
        if let Device::Cuda(_) = device {
            crate::cuda::tune_cudnn_for_fixed_shapes();
        }
        Ok(RunEnv {
            run_dir,
            device,
            kind: recipe.dtype.kind(),
            metrics: MetricsLog::new(run_dir.metrics()),
            observer,
            workers,
            _lock: lock,
        })
    }

    /// Where this run caches and finds its site tables.
    pub fn cache_dir(&self, recipe: &Recipe) -> PathBuf {
        self.run_dir.resolve_cache_dir(&recipe.latency.cache_dir)
    }
}

/// A run directory must be a directory or not exist yet; a file or a dangling symlink in its
/// place is named as such rather than as `File exists (os error 17)`.
fn check_is_directory(root: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() && !root.exists() {
        return Err(Error::run_dir(
            root,
            "is a symlink to a missing path; point --run-dir at a directory, or remove the link",
        ));
    }
    if !root.is_dir() {
        return Err(Error::run_dir(
            root,
            "exists but is not a directory; --run-dir must name a new directory or a previous run's",
        ));
    }
    Ok(())
}

/// Sequence lengths the recipe asks for must fit the model's context.
pub fn check_lengths(model: &dyn Family, recipe: &Recipe, recipe_file: &Path) -> Result<()> {
    let Some(max) = model.max_tokens() else {
        return Ok(());
    };
    let timed = match recipe.latency.workload() {
        Workload::Forward { tokens, .. } | Workload::Prefill { tokens, .. } => {
            ("latency.tokens", tokens)
        }
        Workload::Decode { context, .. } => ("latency.context", context + 1),
        Workload::Generate {
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
/// model holds no weights yet, or a teacher trained by another `[teacher_training]`), which
/// needs the data.
pub fn needs_teacher_training(recipe: &Recipe) -> bool {
    recipe.teacher_training.is_some()
        && !recipe.model.random_init
        && (!families::has_weights(&recipe.model.dir)
            || super::teacher::cached_teacher_is_stale(recipe))
}

/// Default run directory of a recipe: `runs/<name>`.
pub fn default_run_dir(recipe: &Recipe) -> PathBuf {
    PathBuf::from("runs").join(&recipe.name)
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
