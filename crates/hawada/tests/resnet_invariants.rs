//! DESIGN §2 invariants for the ResNet family, on CPU in f32: keep-all gated == teacher,
//! slim == gated under the same hard mask (random keep-sets), export → load → export identity,
//! coupling declared once per width-changing axis, torchvision tensor names.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::max_abs;
use hawada::families::{
    self,
    resnet::{BlockType, Resnet, ResnetConfig},
};
use hawada::model::{Family, KeepSet, Masks, NormFolding, Phase};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

fn bottleneck_tiny() -> ResnetConfig {
    ResnetConfig {
        block_type: BlockType::Bottleneck,
        layers: vec![1, 2],
        base_width: 8,
        ..ResnetConfig::tiny()
    }
}

/// A model whose batch-norm statistics and affine parameters are not the identity, so that
/// masking after BN (where the bias lives) is exercised.
fn model(cfg: ResnetConfig, seed: i64) -> Resnet {
    tch::manual_seed(seed);
    let model = Resnet::new(cfg, Device::Cpu, Path::new("test")).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            if name.contains("running_var") {
                t.copy_(&(Tensor::rand_like(&t) + 0.5));
            } else if name.contains("bn")
                || name.contains("downsample.1")
                || name.contains("running_mean")
            {
                t.copy_(
                    &(Tensor::randn_like(&t) * 0.5
                        + if name.ends_with("weight") { 1.0 } else { 0.0 }),
                );
            }
        }
    });
    model
}

fn input(model: &Resnet, batch: i64) -> Tensor {
    model.random_input(batch, 1)
}

fn configs() -> Vec<ResnetConfig> {
    vec![
        ResnetConfig::tiny(),
        bottleneck_tiny(),
        ResnetConfig {
            layers: vec![2, 2, 2, 2],
            ..ResnetConfig::resnet18_small(16, 1, 16, 10)
        },
        ResnetConfig {
            image_size: 64,
            base_width: 16,
            ..ResnetConfig::resnet18()
        },
    ]
}

#[test]
fn keep_all_gated_equals_teacher() {
    for cfg in configs() {
        let model = model(cfg, 1);
        let x = input(&model, 3);
        let teacher = model.forward(&x, &Masks::none(model.groups().len()), Phase::Eval);
        let all = Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS);
        let gated = model.forward(&x, &all, Phase::Eval);
        assert!(
            max_abs(&teacher, &gated) <= 1e-5,
            "{}",
            max_abs(&teacher, &gated)
        );
    }
}

fn random_keep(model: &Resnet, seed: u64) -> KeepSet {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as i64
    };
    KeepSet(
        model
            .groups()
            .iter()
            .map(|g| {
                let mut kept: Vec<i64> = (0..g.len).filter(|_| next() % 3 != 0).collect();
                if kept.is_empty() {
                    kept.push(next().rem_euclid(g.len));
                }
                kept
            })
            .collect(),
    )
}

fn assert_slim_matches_masked(cfg: ResnetConfig, seed: u64) {
    let model = model(cfg, seed as i64);
    let keep = random_keep(&model, seed);
    let x = input(&model, 2);
    let masked = model.forward(
        &x,
        &Masks::from_keep(model.groups(), &keep, OPTS),
        Phase::Eval,
    );
    let slim = model.slim(&keep).unwrap();
    let out = slim.forward(&x, &Masks::none(slim.groups().len()), Phase::Eval);
    let scale = masked.abs().max().double_value(&[]).max(1e-6);
    assert!(
        max_abs(&masked, &out) / scale <= 1e-4,
        "relative diff {} for keep {:?}",
        max_abs(&masked, &out) / scale,
        keep
    );
    assert!(slim.num_params() < model.num_params() || keep == KeepSet::all(model.groups()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn slim_equals_hard_masked_basic(seed in 0u64..10_000) {
        assert_slim_matches_masked(ResnetConfig::tiny(), seed);
    }

    #[test]
    fn slim_equals_hard_masked_bottleneck(seed in 0u64..10_000) {
        assert_slim_matches_masked(bottleneck_tiny(), seed);
    }
}

#[test]
fn slim_equals_hard_masked_imagenet_stem() {
    assert_slim_matches_masked(
        ResnetConfig {
            image_size: 64,
            base_width: 16,
            ..ResnetConfig::resnet18()
        },
        7,
    );
}

#[test]
fn export_load_export_is_identity() {
    let model = model(bottleneck_tiny(), 3);
    let slim = model.slim(&random_keep(&model, 3)).unwrap();
    let loaded = common::export_roundtrip(slim.as_ref());
    let x = input(&model, 2);
    let none = Masks::none(slim.groups().len());
    assert_eq!(
        max_abs(
            &slim.forward(&x, &none, Phase::Eval),
            &loaded.forward(&x, &none, Phase::Eval)
        ),
        0.0
    );
}

#[test]
fn groups_cover_every_width_changing_axis_exactly_once() {
    for cfg in configs() {
        let model = model(cfg, 0);
        let mut seen: BTreeMap<(String, i64), usize> = BTreeMap::new();
        for g in model.groups() {
            for m in &g.members {
                *seen.entry((m.tensor.clone(), m.axis)).or_default() += 1;
            }
        }
        assert!(
            seen.values().all(|&n| n == 1),
            "an axis is in two groups: {seen:?}"
        );
        for (name, t) in model.var_store().variables() {
            let axes: Vec<i64> = match (name.as_str(), t.dim()) {
                ("conv1.weight", _) => vec![0],
                ("fc.weight", _) => vec![1],
                ("fc.bias", _) => vec![],
                (_, 4) => vec![0, 1],
                (_, 1) => vec![0],
                _ => unreachable!("{name}"),
            };
            for axis in axes {
                assert!(
                    seen.contains_key(&(name.clone(), axis)),
                    "{name} axis {axis} is in no group"
                );
            }
        }
    }
}

#[test]
fn tensor_names_follow_torchvision() {
    let model = Resnet::new(ResnetConfig::resnet18(), Device::Cpu, Path::new("test")).unwrap();
    let vars = model.var_store().variables();
    // torchvision resnet18's state_dict has 122 entries, 20 of them `num_batches_tracked`.
    assert_eq!(vars.len(), 102);
    for name in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.bn2.bias",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    assert_eq!(vars["layer3.0.conv1.weight"].size(), vec![256, 128, 3, 3]);
    let r50 = Resnet::new(ResnetConfig::resnet50(), Device::Cpu, Path::new("test")).unwrap();
    // torchvision resnet50: 320 entries, 53 of them `num_batches_tracked`.
    assert_eq!(r50.var_store().variables().len(), 267);
    assert_eq!(
        r50.var_store().variables()["layer1.0.downsample.0.weight"].size(),
        vec![256, 64, 1, 1]
    );
}

#[test]
fn bad_weights_file_names_the_tensor() {
    let model = model(ResnetConfig::tiny(), 0);
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let file = dir.path().join("model.safetensors");
    let mut tensors = hawada::io::safetensors::read(&file).unwrap();
    tensors.insert("fc.weight".into(), Tensor::zeros([3, 3], OPTS));
    hawada::io::safetensors::write(&file, &tensors).unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("fc.weight") && err.contains("[3, 3]"),
        "{err}"
    );
    std::fs::write(&file, b"\x08\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn unknown_family_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt9"}"#).unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json") && err.contains("gpt9"), "{err}");
}

#[test]
fn folded_batch_norm_matches_the_unfolded_forward() {
    for cfg in configs() {
        let model = model(cfg, 5);
        let x = input(&model, 2);
        let none = Masks::none(model.groups().len());
        let reference = model.forward(&x, &none, Phase::Eval);
        let mut fused = model.slim(&KeepSet::all(model.groups())).unwrap();
        fused.fuse_for_inference(NormFolding::Fold).unwrap();
        let out = fused.forward(&fused.prepare_input(x.shallow_clone()), &none, Phase::Eval);
        let scale = reference.abs().max().double_value(&[]);
        assert!(
            max_abs(&reference, &out) <= 1e-4 * scale,
            "{} vs scale {scale}",
            max_abs(&reference, &out)
        );
    }
}
