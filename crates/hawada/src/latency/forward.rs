//! Timing model forwards: the inference copy a deployment would run (sliced, fused), its input
//! in the preferred layout, and the forward timed through `measure` (alone or round-robin).

use crate::error::Result;
use crate::latency::measure::{measure, measure_interleaved, LatencyStats, TimingProtocol};
use crate::model::{Family, KeepSet, Masks, NormFolding, Phase};
use tch::Tensor;

/// A short A/B between the two inference rewrites of one copy; the full protocol then times
/// the winner.
const CHOICE_PROTOCOL: TimingProtocol = TimingProtocol {
    warmup_runs: 3,
    timed_runs: 5,
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

/// Times the ungated forward of `model` on a random input of `batch`.
pub fn measure_model(model: &dyn Family, batch: i64, protocol: TimingProtocol) -> LatencyStats {
    let device = model.var_store().device();
    let kind = model.var_store().kind();
    let x = model.prepare_input(Tensor::randn(model.input_shape(batch), (kind, device)));
    let masks = Masks::none(model.groups().len());
    let _guard = tch::no_grad_guard();
    measure(device, protocol, || {
        let _ = model.forward(&x, &masks, Phase::Eval);
    })
}

/// Times two models round-robin on the same random input (see `measure_interleaved`).
pub fn measure_pair(
    a: &dyn Family,
    b: &dyn Family,
    batch: i64,
    protocol: TimingProtocol,
) -> [LatencyStats; 2] {
    let device = a.var_store().device();
    let x = a.prepare_input(Tensor::randn(
        a.input_shape(batch),
        (a.var_store().kind(), device),
    ));
    let (masks_a, masks_b) = (Masks::none(a.groups().len()), Masks::none(b.groups().len()));
    let _guard = tch::no_grad_guard();
    let stats = measure_interleaved(
        device,
        protocol,
        &mut [
            &mut || {
                let _ = a.forward(&x, &masks_a, Phase::Eval);
            },
            &mut || {
                let _ = b.forward(&x, &masks_b, Phase::Eval);
            },
        ],
    );
    [stats[0], stats[1]]
}
