//! Knowledge-distillation losses as pure functions of tensors (Hinton et al. 2015).
//! No optimizer, no model, no loop. Reductions run in f32 for range.

use crate::model::Output;
use tch::{Kind, Reduction, Tensor};

/// The distillation loss for what a model outputs: tempered KL on logits ([`kd_kl`]), relative
/// squared error on hidden states ([`relative_mse`]; the temperature does not apply).
pub fn to_teacher(output: Output, student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    match output {
        Output::Logits => kd_kl(student, teacher, temperature),
        Output::Features => relative_mse(student, teacher),
    }
}

/// `(1 − w)·to_teacher + w·cross_entropy`: distillation mixed with the data's own labels at
/// weight `w` (`finetune.label_weight`); `w = 0` is [`to_teacher`] alone, without computing the
/// cross-entropy.
pub fn to_teacher_and_labels(
    output: Output,
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f64,
    label_weight: f64,
) -> Tensor {
    let kd = to_teacher(output, student, teacher, temperature);
    if label_weight == 0.0 {
        return kd;
    }
    kd * (1.0 - label_weight) + cross_entropy(student, labels) * label_weight
}

/// Cross-entropy in f32, classes or next tokens alike: one prediction per row of the flattened
/// logits `[..., classes]`, labels `[...]`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    let classes = logits.size()[logits.dim() - 1];
    logits
        .to_kind(Kind::Float)
        .reshape([-1, classes])
        .cross_entropy_for_logits(&labels.reshape([-1]))
}

/// `T² · KL(softmax(t/T) ‖ softmax(s/T))`, averaged over predictions: logits `[batch, classes]`
/// (one per example) or `[batch, tokens, vocab]` (one per token).
pub fn kd_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let classes = student.size()[student.dim() - 1];
    let rows = student.numel() as i64 / classes.max(1);
    let log_p_student = (student / temperature).log_softmax(-1, Kind::Float);
    let log_p_teacher = (teacher / temperature).log_softmax(-1, Kind::Float);
    let kl = log_p_student.kl_div(&log_p_teacher, Reduction::Sum, true) / rows as f64;
    kl * (temperature * temperature)
}

/// Mean squared error between logits (or hidden states), in f32.
pub fn mse(student: &Tensor, teacher: &Tensor) -> Tensor {
    student
        .to_kind(Kind::Float)
        .mse_loss(&teacher.to_kind(Kind::Float), Reduction::Mean)
}

/// `Σ‖s − t‖² / Σ‖t‖²` over hidden states, in f32: 0 for a perfect match, 1 for a zero student;
/// unlike a plain MSE it does not depend on the features' scale, so the latency penalty weighs
/// the same against it for any backbone.
pub fn relative_mse(student: &Tensor, teacher: &Tensor) -> Tensor {
    let t = teacher.to_kind(Kind::Float);
    (student.to_kind(Kind::Float) - &t)
        .square()
        .sum(Kind::Float)
        / t.square().sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn kl_is_zero_for_identical_logits_and_positive_otherwise() {
        let t = Tensor::randn([4, 10], (Kind::Float, Device::Cpu));
        assert!(kd_kl(&t, &t, 2.0).double_value(&[]).abs() < 1e-6);
        let s = Tensor::randn([4, 10], (Kind::Float, Device::Cpu));
        assert!(kd_kl(&s, &t, 2.0).double_value(&[]) > 1e-3);
    }

    #[test]
    fn relative_mse_is_zero_for_a_match_one_for_zeros_and_scale_free() {
        let t = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        assert!(relative_mse(&t, &t).double_value(&[]).abs() < 1e-7);
        let zeros = t.zeros_like();
        assert!((relative_mse(&zeros, &t).double_value(&[]) - 1.0).abs() < 1e-6);
        let s = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let (a, b) = (
            relative_mse(&s, &t).double_value(&[]),
            relative_mse(&(&s * 10.0), &(&t * 10.0)).double_value(&[]),
        );
        assert!((a - b).abs() < 1e-5 * a);
    }

    #[test]
    fn label_weight_mixes_distillation_and_cross_entropy_linearly() {
        let s = Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu));
        let t = Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 6, 2, 3, 1, 5]).view([2, 3]);
        let value = |w| to_teacher_and_labels(Output::Logits, &s, &t, &y, 2.0, w).double_value(&[]);
        let kd = kd_kl(&s, &t, 2.0).double_value(&[]);
        let ce = cross_entropy(&s, &y).double_value(&[]);
        assert!((value(0.0) - kd).abs() < 1e-6);
        assert!((value(1.0) - ce).abs() < 1e-6);
        assert!((value(0.25) - (0.75 * kd + 0.25 * ce)).abs() < 1e-5);
        // Cross-entropy by hand for the first row: −log softmax(s[0,0])[0].
        let row = s.get(0).get(0);
        let by_hand =
            -(row.get(0).double_value(&[]) - row.exp().sum(Kind::Float).log().double_value(&[]));
        let first = cross_entropy(
            &s.narrow(1, 0, 1).narrow(0, 0, 1),
            &y.narrow(1, 0, 1).narrow(0, 0, 1),
        );
        assert!((first.double_value(&[]) - by_hand).abs() < 1e-5);
    }

    #[test]
    fn kl_matches_hand_computation() {
        let s = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]);
        let t = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        let ps = [1.0 / (1.0 + 1f64.exp()), 1f64.exp() / (1.0 + 1f64.exp())];
        let pt = [ps[1], ps[0]];
        let expected: f64 = pt.iter().zip(&ps).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((kd_kl(&s, &t, 1.0).double_value(&[]) - expected).abs() < 1e-6);
    }
}
