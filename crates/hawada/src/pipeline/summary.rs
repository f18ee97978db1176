//! The summary stage: rank 0 saves the fine-tuned slim model, scores it, measures keep-all and
//! slim back to back, and writes `summary.json`, `latency.json` and the report.

use super::adapt::Adapted;
use super::env::{save_model, RunEnv};
use super::oom::out_of_memory_as_error;
use super::scoring::Scoring;
use super::teacher::Teacher;
use super::timing::Timing;
use crate::error::Result;
use crate::latency::measure::device_name;
use crate::latency::proxy::LatencyProxy;
use crate::model::Family;
use crate::recipe::Recipe;
use crate::run_dir::summary::{
    DistilledFrom, LatencyPair, Params, PatchCosine, ProxySummary, Quality,
};
use crate::run_dir::{Export, Profile, Summary};
use std::time::Instant;

/// What the summary reports, from the stages before it.
pub struct Finished<'a> {
    pub teacher: &'a Teacher,
    pub profile: &'a Profile,
    pub proxy: &'a LatencyProxy,
    pub adapted: &'a Adapted,
    pub export: &'a Export,
    pub slim: &'a dyn Family,
    /// The whole teacher fine-tuned like the slim model (baseline or corrected teacher).
    pub teacher_finetuned: Option<f64>,
    pub timing: &'a Timing<'a>,
    pub scoring: &'a Scoring<'a>,
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
    pub started: Instant,
}

/// Rank 0 evaluates, measures and writes; the other ranks return its summary.
pub fn stage(finished: &Finished<'_>, recipe: &Recipe, env: &RunEnv<'_>) -> Result<Summary> {
    let eval_batch = ("evaluation", "eval.batch", recipe.eval.batch);
    env.workers.from_leader("summary", || {
        out_of_memory_as_error(env.device, eval_batch, || {
            save_model(finished.slim, finished.tokenizer, &env.run_dir.slim())?;
            let quality = slim_quality(finished, recipe);
            env.observer.begin("measure", 2);
            let ([keep_all, slim], noise) = finished.timing.final_pair(finished.slim)?;
            env.observer.advance(2, "keep-all and slim, interleaved");
            env.observer.end();
            let mut summary =
                summarise(finished, quality, LatencyPair { keep_all, slim }, recipe, env);
            if let Some(noise) = noise {
                judge_through_noise(&mut summary, noise);
            }
            let probes = &finished.adapted.outcome.probes;
            let latency_json = serde_json::json!({ "profile": finished.profile, "probes": probes, "search": summary.search, "final": { "keep_all": keep_all, "slim": slim } });
            crate::io::json::write(&env.run_dir.latency(), &latency_json)?;
            summary.write(&env.run_dir.summary())?;
            crate::report::write_html(env.run_dir)?;
            Ok(summary)
        })
    })
}

/// A final measurement that stayed noisy decides nothing alone: the export search measured the
/// pick against keep-all too. Where both say the target is missed (or met) that stands; where
/// they disagree the summary says it cannot tell (`target_met` absent). `timing_noise` says
/// why either way.
fn judge_through_noise(summary: &mut Summary, noise: String) {
    let search_met = summary.picked().map(|c| c.meets_target);
    if summary.target_met != search_met {
        summary.target_met = None;
    }
    tracing::warn!(noise, "final timing stayed noisy");
    summary.timing_noise = Some(format!(
        "{noise}, after {} measurements",
        super::timing::FINAL_MEASUREMENTS
    ));
}

/// The slim model's quality against the teacher it was distilled from, before and after
/// fine-tuning.
fn slim_quality(finished: &Finished<'_>, recipe: &Recipe) -> Quality {
    let (teacher, export, slim, scoring) = (
        finished.teacher,
        finished.export,
        finished.slim,
        finished.scoring,
    );
    Quality {
        metric: scoring.metric.name().into(),
        teacher: teacher.quality,
        teacher_finetuned: finished.teacher_finetuned,
        distilled_from: Some(if teacher.corrected_quality.is_some() {
            DistilledFrom::TeacherFinetuned
        } else {
            DistilledFrom::Teacher
        }),
        finetune_teacher_samples: recipe
            .finetune
            .teacher_samples
            .as_ref()
            .map(|samples| samples.sequences),
        slim_before_finetune: export.quality,
        slim: scoring.quality(slim),
        slim_kl_to_teacher: scoring.kl_to_teacher(slim),
        slim_patch_cosine_to_teacher: export.patch_cosine.zip(scoring.patch_cosine(slim)).map(
            |(before_finetune, after_finetune)| PatchCosine {
                before_finetune,
                after_finetune,
            },
        ),
        photos: scoring.photo_quality(export.photos, slim),
    }
}

fn summarise(
    finished: &Finished<'_>,
    quality: Quality,
    latency: LatencyPair,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Summary {
    let (model, profile, export) = (
        finished.teacher.model.as_ref(),
        finished.profile,
        finished.export,
    );
    let timing = &finished.timing;
    let fidelity = profile.fidelity();
    Summary {
        family: model.family().to_string(),
        model: recipe
            .model
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| recipe.name.clone()),
        device: device_name(env.device),
        dtype: recipe.dtype.name().into(),
        target_ms: profile.target_ms,
        timing: if timing.protocol.cuda_graphs && env.device.is_cuda() {
            "cuda_graph"
        } else {
            "eager"
        }
        .into(),
        speedup: latency.keep_all.mean / latency.slim.mean,
        params: Params {
            teacher: model.num_params(),
            slim: finished.slim.num_params(),
        },
        quality,
        proxy: ProxySummary {
            mape: fidelity.mape,
            spearman: fidelity.spearman,
            n: fidelity.n,
            cost: finished.proxy.cost_name().into(),
        },
        proxy_flops: profile.fidelity_flops,
        proxy_table: profile.fidelity_table,
        search: export.search_table.clone(),
        search_warning: export.search_warning.clone(),
        wall_s: finished.started.elapsed().as_secs_f64(),
        slim_widths: model
            .groups()
            .iter()
            .zip(&export.keep.0)
            .map(|(g, k)| (g.name.clone(), k.len() as i64 * g.unit_width))
            .collect(),
        adapt_steps: finished.adapted.outcome.steps,
        target_met: Some(
            recipe
                .target
                .is_met(latency.slim.mean, latency.keep_all.mean),
        ),
        workload: Some(timing.workload),
        timing_noise: None,
        latency_ms: latency,
    }
}
