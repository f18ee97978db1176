//! Timing model workloads: the inference copy a deployment would run (sliced, fused), its input
//! in the preferred layout, and the workload (a forward, or a decoding step with a KV cache)
//! timed through `measure` (alone or round-robin).

use crate::error::Result;
use crate::latency::measure::{
    measure, measure_interleaved, replayable, LatencyStats, TimingProtocol,
};
use crate::model::{Family, KeepSet, Masks, NormFolding, Phase, Workload};
use tch::Tensor;

/// A short A/B between the two inference rewrites of one copy; the full protocol then times
/// the winner.
const CHOICE_PROTOCOL: TimingProtocol = TimingProtocol {
    warmup_runs: 3,
    timed_runs: 5,
    cuda_graphs: false,
};

/// The model a deployment would run for `keep` on `workload`: sliced, in the device's layout,
/// with normalisation folded or not, whichever measured faster here. Every latency HawAda
/// reports is of such a copy.
pub fn inference_copy(
    model: &dyn Family,
    keep: &KeepSet,
    workload: Workload,
) -> Result<Box<dyn Family>> {
    let mut kept = model.slim(keep)?;
    kept.fuse_for_inference(NormFolding::Keep)?;
    if !kept.can_fold_norms() {
        return Ok(kept);
    }
    let mut folded = model.slim(keep)?;
    folded.fuse_for_inference(NormFolding::Fold)?;
    let [keep_ms, fold_ms] =
        measure_pair(kept.as_ref(), folded.as_ref(), workload, CHOICE_PROTOCOL)?;
    tracing::debug!(
        keep_ms = keep_ms.mean,
        fold_ms = fold_ms.mean,
        "norm folding A/B"
    );
    Ok(if fold_ms.mean < keep_ms.mean {
        folded
    } else {
        kept
    })
}

/// The untimed call of `workload` on `model`: a forward of a random input, or the model's own
/// cached call (prefill, decoding step, generation).
pub fn workload_call<'a>(
    model: &'a dyn Family,
    workload: Workload,
) -> Result<Box<dyn FnMut() -> Tensor + 'a>> {
    match workload {
        Workload::Forward { batch, tokens } => {
            let x = model.prepare_input(model.random_input(batch, tokens));
            let masks = Masks::none(model.groups().len());
            Ok(Box::new(move || model.forward(&x, &masks, Phase::Eval)))
        }
        Workload::Prefill { .. } | Workload::Decode { .. } | Workload::Generate { .. } => {
            model.cached_workload(workload)
        }
    }
}

/// `workload` on `model`, ready to time: eager, or replayed from a CUDA graph when
/// `protocol.cuda_graphs` asks and the device is CUDA. A capture that fails falls back to
/// eager, with a warning.
pub fn timed_workload<'a>(
    model: &'a dyn Family,
    workload: Workload,
    protocol: TimingProtocol,
) -> Result<Box<dyn FnMut() + 'a>> {
    let call = workload_call(model, workload)?;
    Ok(replayable(model.var_store().device(), protocol, call))
}

/// Times `workload` on `model`.
pub fn measure_model(
    model: &dyn Family,
    workload: Workload,
    protocol: TimingProtocol,
) -> Result<LatencyStats> {
    let device = model.var_store().device();
    let _guard = tch::no_grad_guard();
    let stats = {
        let mut run = timed_workload(model, workload, protocol)?;
        measure(device, protocol, &mut run)
    };
    crate::cuda::release_cached_memory(device);
    Ok(stats)
}

/// `model` timed round-robin with `keep_all` and rescaled so that keep-all reads
/// `reference_keep_all_ms`: drift of a shared machine's speed between this measurement and the
/// reference cancels out.
pub fn measure_against_keep_all(
    keep_all: &dyn Family,
    model: &dyn Family,
    reference_keep_all_ms: f64,
    workload: Workload,
    protocol: TimingProtocol,
) -> Result<LatencyStats> {
    let [keep_all_now, model_now] = measure_pair(keep_all, model, workload, protocol)?;
    tracing::debug!(
        keep_all_now = keep_all_now.mean,
        model_now = model_now.mean,
        reference_keep_all_ms,
        "drift-corrected pair"
    );
    Ok(model_now.scaled(reference_keep_all_ms / keep_all_now.mean))
}

/// Times `workload` on two models round-robin (see `measure_interleaved`).
pub fn measure_pair(
    a: &dyn Family,
    b: &dyn Family,
    workload: Workload,
    protocol: TimingProtocol,
) -> Result<[LatencyStats; 2]> {
    let device = a.var_store().device();
    let _guard = tch::no_grad_guard();
    let stats = {
        let (mut run_a, mut run_b) = (
            timed_workload(a, workload, protocol)?,
            timed_workload(b, workload, protocol)?,
        );
        measure_interleaved(device, protocol, &mut [&mut run_a, &mut run_b])
    };
    // The graphs are gone; their memory pools are not, until released.
    crate::cuda::release_cached_memory(device);
    Ok([stats[0], stats[1]])
}
