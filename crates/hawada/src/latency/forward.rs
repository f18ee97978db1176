//! Timing model forwards: the inference copy a deployment would run (sliced, fused), its input
//! in the preferred layout, and the forward timed through `measure` (alone or round-robin).

use crate::cuda::CudaGraph;
use crate::error::Result;
use crate::latency::measure::{measure, measure_interleaved, LatencyStats, TimingProtocol};
use crate::model::{Family, KeepSet, Masks, NormFolding, Phase};
use tch::Tensor;

/// A short A/B between the two inference rewrites of one copy; the full protocol then times
/// the winner.
const CHOICE_PROTOCOL: TimingProtocol = TimingProtocol {
    warmup_runs: 3,
    timed_runs: 5,
    cuda_graphs: false,
};

/// The model a deployment would run for `keep` at `batch`: sliced, in the device's layout, with
/// normalisation folded or not, whichever measured faster here. Every latency HawAda reports is
/// of such a copy.
pub fn inference_copy(model: &dyn Family, keep: &KeepSet, batch: i64) -> Result<Box<dyn Family>> {
    let mut kept = model.slim(keep)?;
    kept.fuse_for_inference(NormFolding::Keep)?;
    if !kept.can_fold_norms() {
        return Ok(kept);
    }
    let mut folded = model.slim(keep)?;
    folded.fuse_for_inference(NormFolding::Fold)?;
    let [keep_ms, fold_ms] = measure_pair(kept.as_ref(), folded.as_ref(), batch, CHOICE_PROTOCOL);
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

/// One ungated forward of `model` on `x`, ready to time: eager, or replayed from a CUDA graph
/// when `protocol.cuda_graphs` asks and the device is CUDA. A capture that fails falls back to
/// eager, with a warning.
fn forward_workload<'a>(
    model: &'a dyn Family,
    x: &'a Tensor,
    protocol: TimingProtocol,
) -> Box<dyn FnMut() + 'a> {
    let masks = Masks::none(model.groups().len());
    let device = model.var_store().device();
    if protocol.cuda_graphs && device.is_cuda() {
        match CudaGraph::capture(device, || model.forward(x, &masks, Phase::Eval)) {
            Ok((graph, _output)) => {
                return Box::new(move || {
                    if let Err(e) = graph.replay() {
                        tracing::warn!(error = %e, "CUDA graph replay failed");
                    }
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "CUDA graph capture failed; timing eager forwards")
            }
        }
    }
    Box::new(move || {
        let _ = model.forward(x, &masks, Phase::Eval);
    })
}

/// Times the ungated forward of `model` on a random input of `batch`.
pub fn measure_model(model: &dyn Family, batch: i64, protocol: TimingProtocol) -> LatencyStats {
    let device = model.var_store().device();
    let kind = model.var_store().kind();
    let _guard = tch::no_grad_guard();
    let x = model.prepare_input(Tensor::randn(model.input_shape(batch), (kind, device)));
    let mut run = forward_workload(model, &x, protocol);
    measure(device, protocol, &mut run)
}

/// `model` timed round-robin with `keep_all` and rescaled so that keep-all reads
/// `reference_keep_all_ms`: drift of a shared machine's speed between this measurement and the
/// reference cancels out.
pub fn measure_against_keep_all(
    keep_all: &dyn Family,
    model: &dyn Family,
    reference_keep_all_ms: f64,
    batch: i64,
    protocol: TimingProtocol,
) -> LatencyStats {
    let [keep_all_now, model_now] = measure_pair(keep_all, model, batch, protocol);
    tracing::debug!(
        keep_all_now = keep_all_now.mean,
        model_now = model_now.mean,
        reference_keep_all_ms,
        "drift-corrected pair"
    );
    model_now.scaled(reference_keep_all_ms / keep_all_now.mean)
}

/// Times two models round-robin on the same random input (see `measure_interleaved`).
pub fn measure_pair(
    a: &dyn Family,
    b: &dyn Family,
    batch: i64,
    protocol: TimingProtocol,
) -> [LatencyStats; 2] {
    let device = a.var_store().device();
    let _guard = tch::no_grad_guard();
    let x = a.prepare_input(Tensor::randn(
        a.input_shape(batch),
        (a.var_store().kind(), device),
    ));
    let (mut run_a, mut run_b) = (
        forward_workload(a, &x, protocol),
        forward_workload(b, &x, protocol),
    );
    let stats = measure_interleaved(device, protocol, &mut [&mut run_a, &mut run_b]);
    [stats[0], stats[1]]
}
