//! Evaluation: the task metric of a split (accuracy where labels are classes, perplexity where
//! they are next tokens, cosine similarity to the teacher for a backbone's features), agreement
//! with the teacher and KL to it.

use crate::data::{Examples, Metric};
use crate::model::{Family, Masks, Output, Phase};
use tch::{Kind, Reduction, Tensor};

fn outputs(model: &dyn Family, masks: &Masks, x: &Tensor) -> Tensor {
    model.forward(&model.prepare_input(x.shallow_clone()), masks, Phase::Eval)
}

fn ungated(model: &dyn Family) -> Masks {
    Masks::none(model.groups().len())
}

/// The metric a model is judged by on `data`: the split's own, or for a model that outputs
/// features, their cosine similarity to the teacher's.
pub fn metric_for(model: &dyn Family, data: &dyn Examples) -> Metric {
    match model.output() {
        Output::Logits => data.metric(),
        Output::Features => Metric::ClsCosine,
    }
}

/// The size of the last axis of `model`'s output (classes, vocabulary or hidden size), from one
/// example of `data` (0 for an empty split).
pub fn output_width(model: &dyn Family, data: &dyn Examples, kind: Kind) -> i64 {
    let _guard = tch::no_grad_guard();
    let Some((x, _)) = data.batches(1, kind).next() else {
        return 0;
    };
    let out = outputs(model, &ungated(model), &x);
    out.size()[out.dim() - 1]
}

/// `metric` of `model` on `data` (see [`Metric`]; `teacher` is the reference of
/// `ClsCosine`), evaluated in batches of `batch` in `kind`.
pub fn quality(
    model: &dyn Family,
    teacher: &dyn Family,
    data: &dyn Examples,
    metric: Metric,
    batch: i64,
    kind: Kind,
) -> f64 {
    if metric == Metric::ClsCosine {
        return feature_cosine(model, &ungated(model), teacher, data, batch, kind).cls;
    }
    let _guard = tch::no_grad_guard();
    let masks = ungated(model);
    let (mut sum, mut count) = (0.0, 0i64);
    for (x, y) in data.batches(batch, kind) {
        let logits = outputs(model, &masks, &x);
        let classes = logits.size()[logits.dim() - 1];
        let (flat, targets) = (logits.reshape([-1, classes]), y.reshape([-1]));
        count += targets.size()[0];
        sum += match metric {
            Metric::Top1Accuracy => flat
                .argmax(-1, false)
                .eq_tensor(&targets)
                .sum(Kind::Int64)
                .int64_value(&[]) as f64,
            Metric::Perplexity => flat
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(&targets, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]),
            Metric::ClsCosine => unreachable!("handled above"),
        };
    }
    let mean = sum / count.max(1) as f64;
    match metric {
        Metric::Top1Accuracy => 100.0 * mean,
        Metric::Perplexity => mean.exp(),
        Metric::ClsCosine => unreachable!("handled above"),
    }
}

/// Mean cosine similarity of a backbone's hidden states `[batch, tokens, hidden]` to the
/// teacher's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureCosine {
    /// Of the cls embedding (token 0).
    pub cls: f64,
    /// Of the patch features (tokens 1..), averaged over patches and images.
    pub patches: f64,
}

/// [`FeatureCosine`] of `student` under `masks` against the ungated `teacher` on `data`.
pub fn feature_cosine(
    student: &dyn Family,
    masks: &Masks,
    teacher: &dyn Family,
    data: &dyn Examples,
    batch: i64,
    kind: Kind,
) -> FeatureCosine {
    let _guard = tch::no_grad_guard();
    let (mut cls, mut patches, mut images) = (0.0, 0.0, 0i64);
    for (x, _) in data.batches(batch, kind) {
        let s = outputs(student, masks, &x).to_kind(Kind::Float);
        let t = outputs(teacher, &ungated(teacher), &x).to_kind(Kind::Float);
        let cosine = Tensor::cosine_similarity(&s, &t, -1, 1e-8); // [batch, tokens]
        let n = cosine.size()[0];
        images += n;
        cls += cosine.select(1, 0).sum(Kind::Double).double_value(&[]);
        patches += cosine
            .narrow(1, 1, cosine.size()[1] - 1)
            .mean_dim(1, false, Kind::Double)
            .sum(Kind::Double)
            .double_value(&[]);
    }
    let images = images.max(1) as f64;
    FeatureCosine {
        cls: cls / images,
        patches: patches / images,
    }
}

/// Agreement with the teacher in percent, for a model under given masks: of top-1 predictions
/// (examples, or tokens) for logits; 100 × the mean cosine similarity of cls and patch features
/// (weighted equally) for a backbone.
pub fn agreement(
    student: &dyn Family,
    masks: &Masks,
    teacher: &dyn Family,
    data: &dyn Examples,
    batch: i64,
    kind: Kind,
) -> f64 {
    if student.output() == Output::Features {
        let cosine = feature_cosine(student, masks, teacher, data, batch, kind);
        return 50.0 * (cosine.cls + cosine.patches);
    }
    let _guard = tch::no_grad_guard();
    let (mut same, mut count) = (0i64, 0i64);
    for (x, _) in data.batches(batch, kind) {
        let s = outputs(student, masks, &x).argmax(-1, false);
        let t = outputs(teacher, &ungated(teacher), &x).argmax(-1, false);
        count += s.numel() as i64;
        same += s.eq_tensor(&t).sum(Kind::Int64).int64_value(&[]);
    }
    100.0 * same as f64 / count.max(1) as f64
}

/// Mean KL(teacher ‖ model) per prediction (nats), ungated; `None` for a backbone, whose
/// outputs are no distributions.
pub fn kl_to_teacher(
    model: &dyn Family,
    teacher: &dyn Family,
    data: &dyn Examples,
    batch: i64,
    kind: Kind,
) -> Option<f64> {
    if model.output() == Output::Features {
        return None;
    }
    let _guard = tch::no_grad_guard();
    let (mut sum, mut count) = (0.0, 0i64);
    for (x, _) in data.batches(batch, kind) {
        let s = outputs(model, &ungated(model), &x);
        let t = outputs(teacher, &ungated(teacher), &x);
        let rows = s.numel() as i64 / s.size()[s.dim() - 1];
        count += rows;
        sum += crate::distill::kd_kl(&s, &t, 1.0).double_value(&[]) * rows as f64;
    }
    Some(sum / count.max(1) as f64)
}
