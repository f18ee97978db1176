//! The export stage (DESIGN §6): the GPU-friendly search over roundings of the trained
//! keep-set and of the cuts of the same logits that the proxy (refitted by every probe) puts at
//! the target, corrected by measuring them; every candidate measured (against keep-all,
//! drift-cancelled) and scored on the calibration split. Rank 0 searches and writes
//! `export.json` and `slim-before-finetune/`; every rank slims its student to the pick. The pick
//! is reused on resume: searching again would time the candidates again and could pick another
//! shape than the fine-tune checkpoint holds.

use super::env::{save_model, RunEnv};
use super::oom::out_of_memory_as_error;
use super::scoring::Scoring;
use super::timing::Timing;
use crate::error::Result;
use crate::export::search::{
    candidates, cuts_meeting_target, few_candidates_warning, search, Candidate, SearchContext,
};
use crate::gates::Gates;
use crate::latency::proxy::LatencyProxy;
use crate::model::{Family, KeepSet};
use crate::recipe::Recipe;
use crate::run_dir::Export;

/// Cuts the export search measures on its way to one that meets the target (one is usually
/// enough; the proxy's error near the target rarely needs more than one correction).
const AT_TARGET_ATTEMPTS: usize = 3;

/// What the export stage needs from the stages before it.
pub struct ExportInputs<'a> {
    pub teacher: &'a dyn Family,
    /// The model the gates were trained on (the teacher, or its trained copy); it is sliced.
    pub student: &'a dyn Family,
    pub gates: &'a Gates,
    /// The gates' own keep-set (`logit > 0`, `min_keep`, `follows`).
    pub as_trained: &'a KeepSet,
    pub proxy: &'a LatencyProxy,
    pub target_ms: f64,
    pub timing: &'a Timing<'a>,
    pub scoring: &'a Scoring<'a>,
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
}

/// Searches (or reads `export.json` back) and returns the record and the slim model, on its
/// device layout, ready to fine-tune.
pub fn stage(
    inputs: &ExportInputs<'_>,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<(Export, Box<dyn Family>)> {
    let student = inputs.student;
    let mut exported_slim = None;
    let export_path = env.run_dir.export();
    let export = env.workers.from_leader("export", || {
        if export_path.exists() {
            return crate::io::json::read::<Export>(&export_path);
        }
        let (search_table, searched, pick) = search_candidates(inputs, recipe, env)?;
        let keep = searched[pick].clone();
        let calibration_agreement = search_table[pick].agreement;
        let mut slim = student.slim(&keep)?;
        save_model(
            slim.as_ref(),
            inputs.tokenizer,
            &env.run_dir.slim_before_finetune(),
        )?;
        slim.to_device_layout();
        let scoring = inputs.scoring;
        let search_warning = few_candidates_warning(search_table.len());
        if let Some(warning) = &search_warning {
            tracing::warn!(warning);
        }
        let before = Export {
            quality: scoring.quality(slim.as_ref()),
            patch_cosine: scoring.patch_cosine(slim.as_ref()),
            photos: scoring.photos(slim.as_ref()),
            keep,
            search_table,
            search_warning,
        };
        tracing::info!(picked = %before.search_table[pick].name, slim_before = before.quality, calibration_agreement, "exported");
        crate::io::json::write(&export_path, &before)?;
        exported_slim = Some(slim);
        Ok(before)
    })?;
    let slim = match exported_slim {
        Some(slim) => slim,
        None => {
            let mut slim = student.slim(&export.keep)?;
            slim.to_device_layout();
            slim
        }
    };
    Ok((export, slim))
}

/// The candidates (the trained keep-set and the cuts at the target, each with its roundings),
/// measured and scored; returns the table, their keep-sets and the index of the pick.
fn search_candidates(
    inputs: &ExportInputs<'_>,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<(Vec<Candidate>, Vec<KeepSet>, usize)> {
    let groups = inputs.teacher.groups();
    let logits = inputs.gates.host_logits();
    let student = inputs.student;
    let mut measure = |keep: &KeepSet| inputs.timing.candidate(keep);
    let mut score = |keep: &KeepSet| inputs.scoring.calibration_agreement(student, keep);
    let latency_batch = ("latency measurement", "latency.batch", recipe.latency.batch);
    out_of_memory_as_error(env.device, latency_batch, || {
        let cuts = cuts_meeting_target(
            groups,
            &logits,
            recipe.gates.min_keep,
            inputs.target_ms,
            &|keep| inputs.proxy.predict_keep_ms(keep),
            &mut |keep| Ok(inputs.timing.candidate(keep)?.latency.mean),
            AT_TARGET_ATTEMPTS,
        )?;
        let mut bases = vec![("as trained".to_string(), inputs.as_trained.clone())];
        bases.extend(cuts);
        let listed = candidates(
            groups,
            &logits,
            &bases,
            recipe.gates.min_keep,
            &recipe.export,
        );
        search(
            groups,
            listed,
            inputs.target_ms,
            SearchContext {
                measure: &mut measure,
                score: &mut score,
                observer: env.observer,
            },
        )
    })
}
