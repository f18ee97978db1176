//! Evaluation: task accuracy where labels exist, and agreement with the teacher.

use crate::data::ImageDataset;
use crate::model::{Family, Masks, Phase};
use tch::{Kind, Tensor};

fn logits(model: &dyn Family, x: &Tensor) -> Tensor {
    model.forward(
        &model.prepare_input(x.shallow_clone()),
        &Masks::none(model.groups().len()),
        Phase::Eval,
    )
}

/// Top-1 accuracy in percent over `data`, evaluated in batches of `batch` in `kind`.
pub fn accuracy(model: &dyn Family, data: &ImageDataset, batch: i64, kind: Kind) -> f64 {
    let _guard = tch::no_grad_guard();
    let correct: i64 = data
        .batches(batch, kind)
        .map(|(x, y)| {
            logits(model, &x)
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[])
        })
        .sum();
    100.0 * correct as f64 / data.len().max(1) as f64
}

/// Top-1 agreement with the teacher in percent, for a model under given masks.
pub fn agreement(
    student: &dyn Family,
    masks: &Masks,
    teacher: &dyn Family,
    data: &ImageDataset,
    batch: i64,
    kind: Kind,
) -> f64 {
    let _guard = tch::no_grad_guard();
    let same: i64 = data
        .batches(batch, kind)
        .map(|(x, _)| {
            let s = student
                .forward(
                    &student.prepare_input(x.shallow_clone()),
                    masks,
                    Phase::Eval,
                )
                .argmax(-1, false);
            let t = logits(teacher, &x).argmax(-1, false);
            s.eq_tensor(&t).sum(Kind::Int64).int64_value(&[])
        })
        .sum();
    100.0 * same as f64 / data.len().max(1) as f64
}
