//! Timing model forwards: the inference copy a deployment would run (sliced, fused), its input
//! in the preferred layout, and the forward timed through `measure` (alone or round-robin).

use crate::error::Result;
use crate::latency::measure::{measure, measure_interleaved, LatencyStats, TimingProtocol};
use crate::model::{Family, KeepSet, Masks, Phase};
use tch::Tensor;

/// The model a deployment would run for `keep`: sliced, then fused for inference (batch-norm
/// folded, the device's preferred layout). Every latency HawAda reports is of such a copy.
pub fn inference_copy(model: &dyn Family, keep: &KeepSet) -> Result<Box<dyn Family>> {
    let mut copy = model.slim(keep)?;
    copy.fuse_for_inference()?;
    Ok(copy)
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
