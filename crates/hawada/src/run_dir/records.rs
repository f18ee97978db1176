//! The records the stages of a run write into its directory, each read back on resume (a
//! stage whose record is present and valid is not run again).

use super::summary::Summary;
use crate::export::search::Candidate;
use crate::latency::measure::LatencyStats;
use crate::latency::proxy::{Fidelity, ProxyCost};
use crate::model::KeepSet;
use serde::{Deserialize, Serialize};

/// One whole-model measurement of a sub-architecture (ms rescaled to the profile's keep-all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub keep: KeepSet,
    pub ms: f64,
}

/// `profile.json`: the profile stage's record.
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
    /// Which proxy trains the gates.
    pub proxy_used: ProxyCost,
    /// Cache key and size of the site tables.
    pub tables_key: String,
    pub table_measurements: usize,
}

impl Profile {
    /// The fidelity of the proxy that trains the gates.
    pub fn fidelity(&self) -> Fidelity {
        match self.proxy_used {
            ProxyCost::Table => self.fidelity_table,
            ProxyCost::Flops => self.fidelity_flops,
        }
    }
}

/// `export.json`: what rank 0's export stage decided, for every rank: the keep-set, and the
/// slim model's scores before fine-tuning for the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    pub keep: KeepSet,
    pub search_table: Vec<Candidate>,
    pub quality: f64,
    pub patch_cosine: Option<f64>,
    pub photos: Option<f64>,
    /// Why the search hardly searched, when it measured fewer than four candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_warning: Option<String>,
}

/// `finetune.json`: what `hawada finetune` did to a slim model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneRecord {
    /// The directory the slim model was read from.
    pub slim_from: String,
    /// The teacher it was distilled from (`model.dir`).
    pub teacher: String,
    pub metric: String,
    pub teacher_quality: f64,
    pub before: f64,
    pub after: f64,
    /// Mean KL(teacher ‖ slim) per prediction on the test split, nats (language models and
    /// classifiers).
    pub kl_to_teacher_before: Option<f64>,
    pub kl_to_teacher_after: Option<f64>,
    pub steps: i64,
}

/// What `hawada eval` measured: a model's quality beside its teacher's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub model: String,
    pub teacher: String,
    pub metric: String,
    pub quality: f64,
    pub teacher_quality: f64,
    pub kl_to_teacher: Option<f64>,
    pub params: i64,
    pub teacher_params: i64,
}

/// `teacher-baseline.json`: the quality of the whole teacher fine-tuned like the slim model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherBaseline {
    pub quality: f64,
}

/// `memory/rank<N>.json`: device memory of one worker's training stages, what a GPU must hold
/// for a recipe, per worker. The adapt figure on rank 0 includes its keep-all inference copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMemory {
    pub rank: usize,
    pub device: String,
    /// Peak while the gates trained (`None` on the CPU).
    pub adapt: Option<crate::cuda::DeviceMemory>,
    /// Peak while the slim model was fine-tuned.
    pub finetune: Option<crate::cuda::DeviceMemory>,
}

/// One target of a sweep and what its run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub target_fraction: f64,
    /// Relative to the sweep directory.
    pub run_dir: String,
    pub summary: Summary,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub recipe: String,
    /// The teacher has random weights: its quality columns mean nothing, only speed and the
    /// agreement with the teacher do.
    pub random_init: bool,
    pub points: Vec<SweepPoint>,
}

impl StageMemory {
    /// Nothing measured yet, for worker `rank` on `device`.
    pub fn new(device: tch::Device, rank: usize) -> Self {
        StageMemory {
            rank,
            device: crate::latency::measure::device_name(device),
            adapt: None,
            finetune: None,
        }
    }

    /// Writes `memory/rank<N>.json` in `run_dir`.
    pub fn write(&self, run_dir: &super::RunDir) -> crate::error::Result<()> {
        let path = run_dir.memory(self.rank);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        }
        crate::io::json::write(&path, self)
    }
}
