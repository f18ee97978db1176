//! Evaluation: the task metric of a split (accuracy where labels are classes, perplexity where
//! they are next tokens), top-1 agreement with the teacher and KL to it.

use crate::data::{Examples, Metric};
use crate::model::{Family, Masks, Phase};
use tch::{Kind, Reduction, Tensor};

fn logits(model: &dyn Family, masks: &Masks, x: &Tensor) -> Tensor {
    model.forward(&model.prepare_input(x.shallow_clone()), masks, Phase::Eval)
}

fn ungated(model: &dyn Family) -> Masks {
    Masks::none(model.groups().len())
}

/// The split's metric for `model` (see [`Metric`]), evaluated in batches of `batch` in `kind`.
pub fn quality(model: &dyn Family, data: &dyn Examples, batch: i64, kind: Kind) -> f64 {
    let _guard = tch::no_grad_guard();
    let masks = ungated(model);
    let (mut sum, mut count) = (0.0, 0i64);
    for (x, y) in data.batches(batch, kind) {
        let logits = logits(model, &masks, &x);
        let classes = logits.size()[logits.dim() - 1];
        let (flat, targets) = (logits.reshape([-1, classes]), y.reshape([-1]));
        count += targets.size()[0];
        sum += match data.metric() {
            Metric::Top1Accuracy => flat
                .argmax(-1, false)
                .eq_tensor(&targets)
                .sum(Kind::Int64)
                .int64_value(&[]) as f64,
            Metric::Perplexity => flat
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(&targets, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]),
        };
    }
    let mean = sum / count.max(1) as f64;
    match data.metric() {
        Metric::Top1Accuracy => 100.0 * mean,
        Metric::Perplexity => mean.exp(),
    }
}

/// Top-1 agreement with the teacher in percent of predictions (examples, or tokens), for a
/// model under given masks.
pub fn agreement(
    student: &dyn Family,
    masks: &Masks,
    teacher: &dyn Family,
    data: &dyn Examples,
    batch: i64,
    kind: Kind,
) -> f64 {
    let _guard = tch::no_grad_guard();
    let (mut same, mut count) = (0i64, 0i64);
    for (x, _) in data.batches(batch, kind) {
        let s = logits(student, masks, &x).argmax(-1, false);
        let t = logits(teacher, &ungated(teacher), &x).argmax(-1, false);
        count += s.numel() as i64;
        same += s.eq_tensor(&t).sum(Kind::Int64).int64_value(&[]);
    }
    100.0 * same as f64 / count.max(1) as f64
}

/// Mean KL(teacher ‖ model) per prediction (nats), ungated.
pub fn kl_to_teacher(
    model: &dyn Family,
    teacher: &dyn Family,
    data: &dyn Examples,
    batch: i64,
    kind: Kind,
) -> f64 {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut count) = (0.0, 0i64);
    for (x, _) in data.batches(batch, kind) {
        let s = logits(model, &ungated(model), &x);
        let t = logits(teacher, &ungated(teacher), &x);
        let rows = s.numel() as i64 / s.size()[s.dim() - 1];
        count += rows;
        sum += crate::distill::kd_kl(&s, &t, 1.0).double_value(&[]) * rows as f64;
    }
    sum / count.max(1) as f64
}
