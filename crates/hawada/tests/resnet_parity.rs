//! Parity with torchvision on golden fixtures (fixtures/resnet, made by make_fixtures.py): the same
//! closed-form weights through our ResNet-18/50 and torchvision's must give the same logits.
//! Tolerance (f32, CPU): max abs diff ≤ 1e-4 × max |logit|.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::families::resnet::{Resnet, ResnetConfig};
use hawada::model::{Family, Masks, Phase};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `sin(arange(n)·0.37 + index·1.3)` in f64, as the fixture script computes it.
fn pattern(index: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 + index as f64 * 1.3)
        .sin()
        .reshape(shape)
}

fn fill(model: &Resnet) {
    let vars = model.var_store().variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    tch::no_grad(|| {
        for (i, name) in names.into_iter().enumerate() {
            let mut t = vars[name].shallow_clone();
            let p = pattern(i, &t.size());
            let v = if name.ends_with("running_var") {
                (p + 1.0) * 0.25 + 1.0
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                p * 0.1
            } else if t.dim() == 1 {
                p * 0.1 + 1.0
            } else {
                let fan_in: i64 = t.size()[1..].iter().product();
                p * (2.0 / fan_in as f64).sqrt()
            };
            t.copy_(&v.to_kind(Kind::Float));
        }
    });
}

fn check(name: &str, cfg: ResnetConfig) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/resnet")
        .join(format!("{name}.safetensors"));
    let fixture = hawada::io::safetensors::read(&file).unwrap();
    let model = Resnet::new(cfg, Device::Cpu, Path::new("test")).unwrap();
    fill(&model);
    let expected_input = pattern(10_000, &[2, 3, 64, 64]).to_kind(Kind::Float);
    assert_eq!(
        (&fixture["input"] - &expected_input)
            .abs()
            .max()
            .double_value(&[]),
        0.0,
        "input pattern differs from the fixture's"
    );
    let logits = tch::no_grad(|| {
        model.forward(
            &fixture["input"],
            &Masks::none(model.groups().len()),
            Phase::Eval,
        )
    });
    let expected = &fixture["logits"];
    let scale = expected.abs().max().double_value(&[]);
    let diff = (&logits - expected).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "{name}: max abs diff {diff} vs logit scale {scale}"
    );
}

#[test]
fn resnet18_matches_torchvision() {
    check(
        "resnet18",
        ResnetConfig {
            image_size: 64,
            ..ResnetConfig::resnet18()
        },
    );
}

#[test]
fn resnet50_matches_torchvision() {
    check(
        "resnet50",
        ResnetConfig {
            image_size: 64,
            ..ResnetConfig::resnet50()
        },
    );
}
