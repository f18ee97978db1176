//! `summary.json`: the machine-readable result every run ends with (DESIGN §7). Its keys are
//! stable: add, never rename; tools and checks read it.

use crate::error::Result;
use crate::export::search::Candidate;
use crate::latency::measure::LatencyStats;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyPair {
    pub keep_all: LatencyStats,
    pub slim: LatencyStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub teacher: i64,
    pub slim: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quality {
    /// e.g. `test_top1_accuracy_percent`.
    pub metric: String,
    pub teacher: f64,
    pub slim_before_finetune: f64,
    pub slim: f64,
    /// The whole teacher fine-tuned with the slim model's loss and steps
    /// (`finetune.teacher_baseline`, or before everything else with `correct_teacher`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_finetuned: Option<f64>,
    /// The teacher the slim model was distilled from and is compared with (KL, agreement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled_from: Option<DistilledFrom>,
    /// Sequences the teacher sampled into the fine-tune's training data, beside the real ones
    /// (`finetune.teacher_samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune_teacher_samples: Option<i64>,
    /// Mean KL(teacher ‖ slim) per prediction on the test split, nats; the teacher of
    /// `distilled_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim_kl_to_teacher: Option<f64>,
    /// Backbones: mean cosine similarity of the slim model's patch features to the teacher's on
    /// the test split, before and after fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim_patch_cosine_to_teacher: Option<PatchCosine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub photos: Option<PhotoQuality>,
}

/// `quality.distilled_from`, named after the quality key of that teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistilledFrom {
    /// The teacher as loaded.
    Teacher,
    /// The whole teacher fine-tuned on the data first (`finetune.correct_teacher`).
    TeacherFinetuned,
}

/// Agreement with the teacher on the recipe's photo folder (`data.photos`): the cls cosine for a
/// backbone, top-1 agreement in percent for a classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhotoQuality {
    pub dir: String,
    pub images: i64,
    /// `cls_cosine_to_teacher` or `top1_agreement_percent`.
    pub metric: String,
    pub slim_before_finetune: f64,
    pub slim: f64,
}

/// Patch-feature cosine similarity to the teacher, before and after fine-tuning.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PatchCosine {
    pub before_finetune: f64,
    pub after_finetune: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySummary {
    pub mape: f64,
    pub spearman: f64,
    pub n: usize,
    /// Which site cost the proxy used ("flops" or "table").
    pub cost: String,
}

/// `summary.json`: the machine-readable result every run ends with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub family: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub target_ms: f64,
    pub latency_ms: LatencyPair,
    /// How forwards were launched when timed: "eager" or "cuda_graph" (summaries written before
    /// this key existed were eager).
    #[serde(default = "eager")]
    pub timing: String,
    pub speedup: f64,
    pub params: Params,
    pub quality: Quality,
    pub proxy: ProxySummary,
    /// Fidelity of each proxy on the same held-out sub-architectures.
    pub proxy_flops: crate::latency::proxy::Fidelity,
    pub proxy_table: crate::latency::proxy::Fidelity,
    pub search: Vec<Candidate>,
    /// Why the export search hardly searched, when it measured fewer than four candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_warning: Option<String>,
    pub wall_s: f64,
    /// Kept width per gate group of the exported model, `group name → channels`.
    pub slim_widths: Vec<(String, i64)>,
    pub adapt_steps: i64,
    /// Whether the slim model meets the target: its measured mean against `target_ms`, or for a
    /// relative target its ratio to keep-all measured alongside against the asked fraction.
    /// Absent when noisy timing and the export search disagree (`timing_noise`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// The timed shapes the latencies apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<crate::model::Workload>,
    /// Why the final latencies are not to be trusted, when other work on the device disturbed
    /// them on every try (then `target_met` stands only where the export search agrees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing_noise: Option<String>,
}

fn eager() -> String {
    "eager".into()
}

impl Summary {
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::json::write(path, self)
    }

    /// The export search's pick: the slim model's architecture.
    pub fn picked(&self) -> Option<&Candidate> {
        self.search.iter().find(|c| c.picked)
    }
}

impl Quality {
    /// Decimals to print the metric with: cosines need four to differ; accuracy and perplexity
    /// read well with two.
    pub fn digits(&self) -> usize {
        if self.metric.contains("cosine") {
            4
        } else {
            2
        }
    }

    /// What `teacher_finetuned` is, in a table row: the baseline fine-tuned beside the slim
    /// model, or the corrected teacher the slim model learnt from.
    pub fn teacher_finetuned_label(&self) -> &'static str {
        if self.distilled_from == Some(DistilledFrom::TeacherFinetuned) {
            "teacher corrected first"
        } else {
            "teacher fine-tuned the same way"
        }
    }
}
