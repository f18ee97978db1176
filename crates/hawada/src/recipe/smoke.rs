//! A recipe shrunk to a smoke run (`hawada run --smoke`).

use super::{DeviceChoice, Dtype, Recipe};
use crate::error::{Error, Result};
use crate::run_dir::RunDir;
use std::path::Path;

impl Recipe {
    /// The recipe at `path` shrunk to a smoke run: every stage, the same model, data, workload
    /// kind and options, on the CPU in f32 with one- or two-example batches, 16-token sequences,
    /// two gate and two fine-tune steps, two timed runs per measurement and site tables at the
    /// full widths only. What it measures is no measurement; it shows the recipe still runs
    /// (CI runs the shipped ones this way). A teacher the recipe would train is trained for one
    /// step into `run_dir/teacher`, never into the recipe's cache. The teacher baseline
    /// (`finetune.teacher_baseline`, also behind `correct_teacher`) is left out: it repeats the
    /// fine-tune on a whole copy, and for a real language model its checkpoints would add
    /// gigabytes to CI's disk; tiny models test it.
    pub fn smoke_from_file(path: &Path, run_dir: &RunDir) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut recipe = Self::deserialize(&text, path)?;
        recipe.device = DeviceChoice::Cpu;
        recipe.dtype = Dtype::F32;
        let latency = &mut recipe.latency;
        latency.batch = latency.batch.min(2);
        latency.tokens = latency.tokens.min(16);
        latency.context = latency.context.min(16);
        latency.new_tokens = latency.new_tokens.min(2);
        latency.warmup_runs = 1;
        latency.timed_runs = 2;
        latency.fit_archs = 1;
        latency.holdout_archs = 2;
        latency.cuda_graphs = false;
        latency.table_grid_step = i64::MAX / 2;
        latency.table_warmup_runs = 1;
        latency.table_timed_runs = 1;
        latency.cache_dir = run_dir.smoke_latency_cache();
        let adapt = &mut recipe.adapt;
        adapt.steps = adapt.steps.min(2);
        adapt.batch = adapt.batch.min(2);
        adapt.probe_every = 1;
        adapt.checkpoint_every = 1;
        let finetune = &mut recipe.finetune;
        finetune.steps = finetune.steps.min(2);
        finetune.batch = finetune.batch.min(2);
        finetune.checkpoint_every = 1;
        finetune.teacher_baseline = false;
        finetune.correct_teacher = false;
        let data = &mut recipe.data;
        data.holdout = data.holdout.min(2);
        data.test_limit = Some(data.test_limit.unwrap_or(4).min(4));
        data.seq_len = data.seq_len.min(16);
        if let Some(samples) = &mut finetune.teacher_samples {
            samples.sequences = samples.sequences.min(4);
            samples.batch = samples.batch.min(2);
            samples.prompt_tokens = samples.prompt_tokens.min(data.seq_len / 2);
        }
        recipe.eval.batch = recipe.eval.batch.min(4);
        if let Some(teacher) = &mut recipe.teacher_training {
            teacher.epochs = 1e-9; // one step
            teacher.batch = teacher.batch.min(2);
            if !crate::families::has_weights(&recipe.model.dir) {
                recipe.model.dir = run_dir.smoke_teacher();
            }
        }
        recipe.validate(path)?;
        Ok(recipe)
    }
}
