//! The run directory, typed: every file and folder a run writes is named here once, and the
//! records those files hold live beside it (`summary`, `records`), so that the pipeline writes
//! them, `report` reads and draws them, and neither imports the other's code.
//!
//! ```text
//! <run>/recipe.toml                 the resolved recipe
//!       profile.json                keep-all latency, proxy fit and fidelity
//!       teacher-samples.safetensors the teacher's sampled text (finetune.teacher_samples)
//!       teacher-corrected/          the corrected teacher (finetune.correct_teacher)
//!       teacher-baseline.json       the fine-tuned whole teacher's quality
//!       gates.safetensors, gates.json
//!       export.json                 the export search's pick and its scores
//!       finetune.json               `hawada finetune`'s before and after
//!       slim-before-finetune/, slim/
//!       metrics.jsonl, latency.json, summary.json, report.html, plots/
//!       memory/rank<N>.json, checkpoints/<stage>/, teacher/ (smoke runs)
//!       run.lock                    the pid of the run writing it, while it runs
//! ```

mod lock;
pub mod metrics;
pub mod records;
mod resume;
pub mod summary;

pub use lock::RunLock;
pub use metrics::{MetricsLog, StepMetrics};
pub use records::{
    Evaluation, Export, FinetuneRecord, Measured, Profile, StageMemory, Sweep, SweepPoint,
    TeacherBaseline,
};
pub use resume::check_same_recipe;
pub use summary::Summary;

use std::path::{Path, PathBuf};

/// One run's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

/// Files of the first target's run that every later target of a sweep reuses, as a resumed
/// run would: the profile, the teacher's samples, the corrected teacher, and the teacher
/// baseline's quality, in that order (the corrected teacher is copied before the record that
/// says it is complete).
pub const SHARED_ACROSS_TARGETS: [fn(&RunDir) -> PathBuf; 4] = [
    RunDir::profile,
    RunDir::teacher_samples,
    RunDir::teacher_corrected,
    RunDir::teacher_baseline,
];

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Held by the run writing this directory: its pid ([`RunLock`]).
    pub fn lock(&self) -> PathBuf {
        self.root.join("run.lock")
    }
    /// The recipe as resolved (defaults filled in).
    pub fn recipe(&self) -> PathBuf {
        self.root.join("recipe.toml")
    }
    pub fn profile(&self) -> PathBuf {
        self.root.join("profile.json")
    }
    pub fn teacher_samples(&self) -> PathBuf {
        self.root.join("teacher-samples.safetensors")
    }
    pub fn teacher_corrected(&self) -> PathBuf {
        self.root.join("teacher-corrected")
    }
    pub fn teacher_baseline(&self) -> PathBuf {
        self.root.join("teacher-baseline.json")
    }
    /// A smoke run's self-trained teacher (never the recipe's cache).
    pub fn smoke_teacher(&self) -> PathBuf {
        self.root.join("teacher")
    }
    /// A smoke run's site tables (its latencies are no measurement, so never the shared cache).
    pub fn smoke_latency_cache(&self) -> PathBuf {
        self.root.join("latency-cache")
    }
    /// Where the trained gates are saved (`gates.safetensors` + `gates.json`, the pair
    /// [`crate::gates::Gates::save`] names).
    pub fn gates(&self) -> PathBuf {
        self.root.clone()
    }
    pub fn export(&self) -> PathBuf {
        self.root.join("export.json")
    }
    pub fn slim_before_finetune(&self) -> PathBuf {
        self.root.join("slim-before-finetune")
    }
    pub fn slim(&self) -> PathBuf {
        self.root.join("slim")
    }
    /// What `hawada finetune` did (a fine-tune outside `run`).
    pub fn finetune(&self) -> PathBuf {
        self.root.join("finetune.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn latency(&self) -> PathBuf {
        self.root.join("latency.json")
    }
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }
    pub fn report(&self) -> PathBuf {
        self.root.join("report.html")
    }
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }
    /// Device memory of one worker's training stages.
    pub fn memory(&self, rank: usize) -> PathBuf {
        self.root.join("memory").join(format!("rank{rank}.json"))
    }
    /// Checkpoints of one training stage (`adapt`, `finetune`, `teacher-baseline`, `teacher`).
    pub fn checkpoints(&self, stage: &str) -> PathBuf {
        self.root.join("checkpoints").join(stage)
    }
    /// Where a relative `latency.cache_dir` lives: beside the run directory, so runs of one
    /// folder share their site tables and nothing is written relative to the working directory.
    pub fn resolve_cache_dir(&self, cache_dir: &Path) -> PathBuf {
        if cache_dir.is_absolute() {
            return cache_dir.to_path_buf();
        }
        self.root
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .join(cache_dir)
    }
}

/// A sweep's directory: one run directory per target, and the sweep's own records.
#[derive(Debug, Clone)]
pub struct SweepDir {
    root: PathBuf,
}

impl SweepDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SweepDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The target's run directory name, relative to the sweep directory.
    pub fn target_name(fraction: f64) -> String {
        format!("t{fraction}")
    }
    pub fn target(&self, fraction: f64) -> RunDir {
        RunDir::new(self.root.join(Self::target_name(fraction)))
    }
    pub fn sweep(&self) -> PathBuf {
        self.root.join("sweep.json")
    }
    pub fn report(&self) -> PathBuf {
        self.root.join("sweep.html")
    }
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }
    /// Whether `dir` holds a sweep (its `sweep.json`) rather than one run.
    pub fn holds_sweep(dir: &Path) -> bool {
        SweepDir::new(dir).sweep().exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_cache_dir_lives_beside_the_run_directory_and_an_absolute_one_stays() {
        let run = RunDir::new("/tmp/runs/fmnist");
        assert_eq!(
            run.resolve_cache_dir(Path::new(".cache/latency")),
            Path::new("/tmp/runs/.cache/latency")
        );
        assert_eq!(
            run.resolve_cache_dir(Path::new("/var/cache/hawada")),
            Path::new("/var/cache/hawada")
        );
    }

    #[test]
    fn a_sweep_shares_the_files_a_resumed_run_reuses_and_no_others() {
        let run = RunDir::new("r");
        let shared: Vec<PathBuf> = SHARED_ACROSS_TARGETS.iter().map(|f| f(&run)).collect();
        assert_eq!(shared[0], run.profile());
        assert!(shared.contains(&run.teacher_corrected()));
        assert!(!shared.contains(&run.summary()) && !shared.contains(&run.export()));
    }
}
