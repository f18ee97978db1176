//! DESIGN §2 invariants for the ViT family on CPU in f32, and parity with HF transformers'
//! `ViTForImageClassification` on a golden fixture (fixtures/vit, made by make_fixtures.py;
//! tolerance: max abs ≤ 1e-4 × max |logit|).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::max_abs;
use hawada::families::{
    self,
    vit::{Vit, VitConfig},
};
use hawada::model::{Family, KeepSet, Masks, Phase};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

fn model(seed: i64) -> Vit {
    tch::manual_seed(seed);
    let model = Vit::new(VitConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    // Non-trivial norms and biases so that masking is exercised everywhere.
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            if name.ends_with("bias") || name.contains("layernorm") {
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.3));
            }
        }
    });
    model
}

#[test]
fn keep_all_gated_equals_teacher() {
    let model = model(1);
    let x = model.random_input(3, 1);
    let teacher = model.forward(&x, &Masks::none(model.groups().len()), Phase::Eval);
    let gated = model.forward(
        &x,
        &Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS),
        Phase::Eval,
    );
    assert!(max_abs(&teacher, &gated) <= 1e-5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn slim_equals_hard_masked(seed in 0u64..10_000) {
        let model = model(seed as i64);
        let mut state = seed;
        let keep = KeepSet(model.groups().iter().map(|g| {
            let mut kept: Vec<i64> = (0..g.len).filter(|_| { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (state >> 33) % 3 != 0 }).collect();
            if kept.is_empty() { kept.push(0); }
            kept
        }).collect());
        let x = model.random_input(2, 1);
        let masked = model.forward(&x, &Masks::from_keep(model.groups(), &keep, OPTS), Phase::Eval);
        let slim = model.slim(&keep).unwrap();
        let out = slim.forward(&x, &Masks::none(slim.groups().len()), Phase::Eval);
        let scale = masked.abs().max().double_value(&[]).max(1e-6);
        prop_assert!(max_abs(&masked, &out) / scale <= 1e-4);
    }
}

#[test]
fn export_load_export_is_identity() {
    let model = model(3);
    let keep = KeepSet(
        model
            .groups()
            .iter()
            .map(|g| (0..g.len).step_by(2).collect())
            .collect(),
    );
    let slim = model.slim(&keep).unwrap();
    common::export_roundtrip(slim.as_ref());
}

#[test]
fn a_head_group_covers_q_k_v_rows_and_output_columns_once() {
    let model = model(0);
    let mut seen: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for g in model.groups() {
        for m in &g.members {
            *seen.entry((m.tensor.clone(), m.axis)).or_default() += 1;
        }
    }
    assert!(seen.values().all(|&n| n == 1));
    let heads = &model.groups()[0];
    let names: Vec<&str> = heads.members.iter().map(|m| m.tensor.as_str()).collect();
    for t in [
        "query.weight",
        "query.bias",
        "key.weight",
        "key.bias",
        "value.weight",
        "value.bias",
        "attention.output.dense.weight",
    ] {
        assert!(names.iter().any(|n| n.ends_with(t)), "head group lacks {t}");
    }
    assert_eq!(heads.unit_width, VitConfig::tiny().head_dim());
}

#[test]
fn matches_hf_transformers_vit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vit");
    let model = families::load(&root.join("model"), Device::Cpu, Kind::Float, false).unwrap();
    let io = hawada::io::safetensors::read(&root.join("io.safetensors")).unwrap();
    let logits = tch::no_grad(|| {
        model.forward(
            &io["input"],
            &Masks::none(model.groups().len()),
            Phase::Eval,
        )
    });
    let scale = io["logits"].abs().max().double_value(&[]);
    let diff = max_abs(&logits, &io["logits"]);
    assert!(
        diff <= 1e-4 * scale,
        "max abs diff {diff} vs logit scale {scale}"
    );
}

#[test]
fn dropped_sublayers_leave_the_export_which_equals_the_masked_model_and_reloads() {
    tch::manual_seed(4);
    let cfg = VitConfig {
        sublayer_gates: true,
        ..VitConfig::tiny()
    };
    let model = Vit::new(cfg, Device::Cpu, Path::new("test")).unwrap();
    let mut keep = KeepSet::all(model.groups());
    for (i, g) in model.groups().iter().enumerate() {
        if g.name == "vit.encoder.layer.0.attention.sublayer"
            || g.name == "vit.encoder.layer.1.mlp.sublayer"
        {
            keep.0[i].clear();
        }
    }
    let x = model.random_input(2, 1);
    let masked = tch::no_grad(|| {
        model.forward(
            &x,
            &Masks::from_keep(model.groups(), &keep, OPTS),
            Phase::Eval,
        )
    });
    let slim = model.slim(&keep).unwrap();
    let out = tch::no_grad(|| slim.forward(&x, &Masks::none(slim.groups().len()), Phase::Eval));
    assert!(max_abs(&masked, &out) <= 1e-4 * masked.abs().max().double_value(&[]));
    let names: Vec<String> = slim.var_store().variables().into_keys().collect();
    assert!(!names
        .iter()
        .any(|n| n.starts_with("vit.encoder.layer.0.attention.")
            || n.starts_with("vit.encoder.layer.0.layernorm_before.")
            || n.starts_with("vit.encoder.layer.1.intermediate.")
            || n.starts_with("vit.encoder.layer.1.output.")));
    common::export_roundtrip(slim.as_ref());
}

#[test]
fn the_vit_model_backbone_matches_transformers_and_slims_exactly() {
    // fixtures/vit/backbone: the same weights as a `ViTModel` (no `vit.` prefix, a pooler).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vit");
    let model = families::load(&root.join("backbone"), Device::Cpu, Kind::Float, false).unwrap();
    assert_eq!(model.output(), hawada::model::Output::Features);
    let io = hawada::io::safetensors::read(&root.join("io.safetensors")).unwrap();
    let none = Masks::none(model.groups().len());
    let hidden = tch::no_grad(|| model.forward(&io["input"], &none, Phase::Eval));
    let expected = &io["last_hidden_state"];
    let scale = expected.abs().max().double_value(&[]);
    assert!(max_abs(&hidden, expected) <= 1e-4 * scale);
    let keep = KeepSet(
        model
            .groups()
            .iter()
            .map(|g| (0..g.len).step_by(2).collect())
            .collect(),
    );
    let masked = tch::no_grad(|| {
        model.forward(
            &io["input"],
            &Masks::from_keep(model.groups(), &keep, OPTS),
            Phase::Eval,
        )
    });
    let slim = model.slim(&keep).unwrap();
    let out =
        tch::no_grad(|| slim.forward(&io["input"], &Masks::none(slim.groups().len()), Phase::Eval));
    assert!(max_abs(&masked, &out) <= 1e-4 * masked.abs().max().double_value(&[]));
    let names: Vec<String> = common::export_roundtrip(slim.as_ref())
        .var_store()
        .variables()
        .into_keys()
        .collect();
    assert!(names.contains(&"pooler.dense.weight".to_string()));
}
