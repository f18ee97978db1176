//! DESIGN §2 invariants for the LLaMA family on CPU in f32 (GQA 4:2, llama3 rope scaling; the Qwen2
//! variant, whose q/k/v biases go with their heads; Qwen3's per-head q/k norms), the KV-cache
//! decode against the full forward, and parity with HF transformers' `LlamaForCausalLM`,
//! `Qwen2ForCausalLM` and `MistralForCausalLM`, `Qwen3ForCausalLM` on golden fixtures
//! (fixtures/llama, fixtures/qwen2, fixtures/mistral, fixtures/qwen3, made by the make_fixtures.py
//! scripts; tolerance: max abs ≤ 1e-4 × max |logit|).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;
mod tiny_llama;

use common::max_abs;
use hawada::families::{
    self,
    llama::{Llama, LlamaConfig},
};
use hawada::gates::enforce_follows;
use hawada::model::{Family, KeepSet, Masks, Phase, UnitKind, Workload};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tiny_llama::{model, model_of};

const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

fn forward(model: &dyn Family, x: &Tensor, masks: &Masks) -> Tensor {
    tch::no_grad(|| model.forward(x, masks, Phase::Eval))
}

#[test]
fn keep_all_gated_equals_teacher() {
    let model = model(1);
    let x = model.random_input(3, 10);
    let teacher = forward(&model, &x, &Masks::none(model.groups().len()));
    let gated = forward(
        &model,
        &x,
        &Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS),
    );
    assert_eq!(teacher.size(), vec![3, 10, 64]);
    assert!(max_abs(&teacher, &gated) <= 1e-5);
}

fn random_keep(model: &Llama, seed: u64) -> KeepSet {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let groups = model.groups();
    let keep = KeepSet(
        groups
            .iter()
            .map(|g| {
                let mut kept: Vec<i64> = (0..g.len).filter(|_| next() % 3 != 0).collect();
                // Whole sublayers may go; other groups keep at least one unit.
                if kept.is_empty() && g.kind != UnitKind::Sublayer {
                    kept.push(0);
                }
                kept
            })
            .collect(),
    );
    let logits: Vec<Vec<f32>> = groups
        .iter()
        .map(|g| (0..g.len).map(|_| (next() % 100) as f32).collect())
        .collect();
    enforce_follows(groups, &logits, keep)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn slim_equals_hard_masked(seed in 0u64..10_000) {
        let model = model(seed as i64);
        let keep = random_keep(&model, seed);
        let x = model.random_input(2, 9);
        let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
        let slim = model.slim(&keep).unwrap();
        let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
        let scale = masked.abs().max().double_value(&[]).max(1e-6);
        prop_assert!(max_abs(&masked, &out) / scale <= 1e-4);
    }
}

#[test]
fn every_query_head_keeps_its_own_kv_head_after_export() {
    // Keep KV group 1 only, and its second query head: the slim model must attend that head
    // to KV head 1's keys, which the masked model shows.
    let model = model(5);
    let mut keep = KeepSet::all(model.groups());
    for (i, g) in model.groups().iter().enumerate() {
        match g.kind {
            UnitKind::KvGroups => keep.0[i] = vec![1],
            UnitKind::Heads => keep.0[i] = vec![3],
            _ => {}
        }
    }
    let x = model.random_input(1, 7);
    let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
    let slim = model.slim(&keep).unwrap();
    let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
    assert!(max_abs(&masked, &out) <= 1e-4 * masked.abs().max().double_value(&[]));
    let cfg = slim.config_json();
    assert_eq!(cfg["num_attention_heads"], 1);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert!(
        cfg.get("hawada_heads").is_none(),
        "uniform widths give a stock config"
    );
}

#[test]
fn dropped_sublayers_leave_the_export_and_it_still_equals_the_masked_model() {
    let model = model(7);
    let mut keep = KeepSet::all(model.groups());
    for (i, g) in model.groups().iter().enumerate() {
        if g.name == "model.layers.0.self_attn.sublayer" || g.name == "model.layers.1.mlp.sublayer"
        {
            keep.0[i].clear();
        }
    }
    let x = model.random_input(2, 6);
    let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
    let slim = model.slim(&keep).unwrap();
    let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
    assert!(max_abs(&masked, &out) <= 1e-4 * masked.abs().max().double_value(&[]));
    let names: Vec<String> = slim.var_store().variables().into_keys().collect();
    assert!(!names
        .iter()
        .any(|n| n.starts_with("model.layers.0.self_attn.")
            || n.starts_with("model.layers.0.input_layernorm.")
            || n.starts_with("model.layers.1.mlp.")));
    let cfg = slim.config_json();
    assert_eq!(
        cfg["hawada_attention_layers"],
        serde_json::json!([false, true])
    );
    assert_eq!(cfg["hawada_mlp_layers"], serde_json::json!([true, false]));
    // Decoding through a slim model without attention in a layer works too.
    let mut step = slim
        .cached_workload(Workload::Decode {
            batch: 2,
            context: 4,
        })
        .unwrap();
    assert_eq!(tch::no_grad(&mut step).size(), vec![2, 1, 64]);
}

#[test]
fn decoding_with_the_kv_cache_equals_the_full_forward() {
    let model = model(2);
    let ids = model.random_input(2, 8);
    let full = forward(&model, &ids, &Masks::none(model.groups().len()));
    let cache = model.new_cache(2, 8);
    let masks = Masks::none(model.groups().len());
    let prefill =
        tch::no_grad(|| model.forward_cached(&ids.narrow(1, 0, 5), &masks, Some((&cache, 0))));
    assert!(max_abs(&prefill, &full.narrow(1, 0, 5)) <= 1e-5);
    for position in 5..8 {
        let step = tch::no_grad(|| {
            model.forward_cached(
                &ids.narrow(1, position, 1),
                &masks,
                Some((&cache, position)),
            )
        });
        assert!(
            max_abs(&step, &full.narrow(1, position, 1)) <= 1e-5,
            "position {position}"
        );
    }
}

#[test]
fn groups_cover_every_width_axis_once_and_heads_follow_kv_groups() {
    let model = model(0);
    let mut seen: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for g in model.groups() {
        for m in &g.members {
            *seen.entry((m.tensor.clone(), m.axis)).or_default() += 1;
        }
    }
    assert!(seen.values().all(|&n| n == 1));
    let names: Vec<String> = model.var_store().variables().into_keys().collect();
    for layer in 0..2 {
        for (proj, axis) in [
            ("self_attn.q_proj", 0),
            ("self_attn.k_proj", 0),
            ("self_attn.v_proj", 0),
            ("self_attn.o_proj", 1),
            ("mlp.gate_proj", 0),
            ("mlp.up_proj", 0),
            ("mlp.down_proj", 1),
        ] {
            let tensor = format!("model.layers.{layer}.{proj}.weight");
            assert!(names.contains(&tensor), "{tensor}");
            assert_eq!(seen.get(&(tensor.clone(), axis)), Some(&1), "{tensor}");
        }
    }
    for g in model.groups() {
        if g.kind == UnitKind::Heads {
            let parent = g.follows.expect("query heads follow their KV group");
            assert_eq!(model.groups()[parent].kind, UnitKind::KvGroups);
        }
    }
    // gate_proj and up_proj rows and down_proj columns go together.
    let mlp = model
        .groups()
        .iter()
        .find(|g| g.name.ends_with(".0.mlp"))
        .unwrap();
    let tensors: Vec<&str> = mlp.members.iter().map(|m| m.tensor.as_str()).collect();
    assert_eq!(
        tensors,
        [
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight"
        ]
    );
}

#[test]
fn export_load_export_is_identity_with_per_layer_widths() {
    let model = model(3);
    let mut keep = random_keep(&model, 11);
    // Layer 0 keeps everything: the widths differ per layer.
    for (i, g) in model.groups().iter().enumerate() {
        if g.name.starts_with("model.layers.0.") {
            keep.0[i] = (0..g.len).collect();
        }
    }
    let slim = model.slim(&keep).unwrap();
    assert!(slim.config_json().get("hawada_heads").is_some());
    common::export_roundtrip(slim.as_ref());
}

#[test]
fn matches_hf_transformers_llama_with_gqa_and_llama3_rope() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama");
    let model = families::load(&root.join("model"), Device::Cpu, Kind::Float, false).unwrap();
    let io = hawada::io::safetensors::read(&root.join("io.safetensors")).unwrap();
    let logits = forward(
        model.as_ref(),
        &io["input_ids"],
        &Masks::none(model.groups().len()),
    );
    let scale = io["logits"].abs().max().double_value(&[]);
    let diff = max_abs(&logits, &io["logits"]);
    assert!(
        diff <= 1e-4 * scale,
        "max abs diff {diff} vs logit scale {scale}"
    );
}

#[test]
fn matches_hf_transformers_qwen2_mistral_and_qwen3_and_exports_keep_their_type() {
    // fixtures/qwen2/make_fixtures.py: tiny random Qwen2ForCausalLM (q/k/v biases),
    // MistralForCausalLM and Qwen3ForCausalLM (per-head q/k norms).
    for (name, architecture) in [
        ("qwen2", "Qwen2ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
    ] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(name);
        let model = families::load(&root.join("model"), Device::Cpu, Kind::Float, false).unwrap();
        let io = hawada::io::safetensors::read(&root.join("io.safetensors")).unwrap();
        let logits = forward(
            model.as_ref(),
            &io["input_ids"],
            &Masks::none(model.groups().len()),
        );
        let scale = io["logits"].abs().max().double_value(&[]);
        let diff = max_abs(&logits, &io["logits"]);
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max abs diff {diff} vs logit scale {scale}"
        );
        let exported = common::export_roundtrip(model.as_ref()).config_json();
        assert_eq!(exported["model_type"], name);
        assert_eq!(exported["architectures"], serde_json::json!([architecture]));
        // transformers' own keys travel: a null window stays null (Mistral's default is 4096).
        assert_eq!(exported["sliding_window"], serde_json::Value::Null);
    }
}

#[test]
fn fused_inference_copy_equals_the_model_prefill_and_decode() {
    let model = model(9);
    let mut fused = Llama::new(LlamaConfig::tiny(), Device::Cpu, Path::new("copy")).unwrap();
    hawada::io::safetensors::load_into(
        fused.var_store(),
        &hawada::io::safetensors::named_tensors(model.var_store()),
        Path::new("copy"),
    )
    .unwrap();
    fused
        .fuse_for_inference(hawada::model::NormFolding::Keep)
        .unwrap();
    let ids = model.random_input(2, 7);
    let masks = Masks::none(model.groups().len());
    let (plain_cache, fused_cache) = (model.new_cache(2, 7), fused.new_cache(2, 7));
    let (prompt, next) = (ids.narrow(1, 0, 6), ids.narrow(1, 6, 1));
    tch::no_grad(|| {
        for (a, b) in [
            (
                model.forward_cached(&prompt, &masks, Some((&plain_cache, 0))),
                fused.forward_cached(&prompt, &masks, Some((&fused_cache, 0))),
            ),
            (
                model.forward_cached(&next, &masks, Some((&plain_cache, 6))),
                fused.forward_cached(&next, &masks, Some((&fused_cache, 6))),
            ),
        ] {
            assert!(max_abs(&a, &b) <= 1e-5);
        }
    });
}

#[test]
fn a_generation_workload_runs_prefill_then_steps_and_its_sites_count_every_step() {
    let model = model(4);
    let generate = Workload::Generate {
        batch: 2,
        prompt: 6,
        new_tokens: 3,
    };
    let mut run = model.cached_workload(generate).unwrap();
    assert_eq!(tch::no_grad(&mut run).size(), vec![2, 1, 64]);
    let sites = model.cost_sites(generate);
    let prefill: Vec<_> = sites
        .iter()
        .filter(|s| s.name.starts_with("prefill."))
        .collect();
    let decode: Vec<_> = sites
        .iter()
        .filter(|s| s.name.starts_with("decode."))
        .collect();
    assert_eq!(prefill.len(), decode.len());
    assert!(prefill.iter().all(|s| s.calls == 1.0));
    assert!(decode.iter().all(|s| s.calls == 3.0));
    // A forward has no cache to decode with.
    assert!(model
        .cached_workload(Workload::Forward {
            batch: 1,
            tokens: 4
        })
        .is_err());
}

#[test]
fn a_prefill_workload_returns_last_token_logits_and_costs_what_a_forward_of_its_tokens_does() {
    let model = model(4);
    let prefill = Workload::Prefill {
        batch: 2,
        tokens: 6,
    };
    let mut run = model.cached_workload(prefill).unwrap();
    let logits = tch::no_grad(&mut run);
    assert_eq!(logits.size(), vec![2, 1, 64]);
    assert!(logits.std(false).double_value(&[]) > 0.0);
    let names =
        |w: Workload| -> Vec<String> { model.cost_sites(w).into_iter().map(|s| s.name).collect() };
    // Neither workload has an lm_head site (it is never pruned; the fit's constant holds it).
    assert_eq!(
        names(prefill),
        names(Workload::Forward {
            batch: 2,
            tokens: 6
        })
    );
}

#[test]
fn greedy_continuation_through_the_cache_equals_argmax_of_full_forwards() {
    let model = model(7);
    let prompts = model.random_input(3, 5);
    let ids = model.continue_tokens(&prompts, 4, 0.0, None);
    assert_eq!(ids.size(), vec![3, 9]);
    assert_eq!(max_abs(&ids.narrow(1, 0, 5), &prompts), 0.0);
    // Each new token is the argmax of a whole forward over everything before it.
    let masks = Masks::none(model.groups().len());
    for t in 5..9 {
        let logits = forward(&model, &ids.narrow(1, 0, t), &masks);
        let expected = logits.select(1, t - 1).argmax(-1, false);
        assert_eq!(max_abs(&ids.select(1, t), &expected), 0.0, "token {t}");
    }
}

#[test]
fn a_sharded_checkpoint_loads_like_a_single_file() {
    let model = model(6);
    let dir = tempfile::tempdir().unwrap();
    let tensors = hawada::io::safetensors::named_tensors(model.var_store());
    let (first, second): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let part: BTreeMap<String, Tensor> = part.into_iter().map(|(_, kv)| kv).collect();
        for name in part.keys() {
            weight_map.insert(name.clone(), shard.into());
        }
        hawada::io::safetensors::write(&dir.path().join(shard), &part).unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        model.config_json().to_string(),
    )
    .unwrap();
    let loaded = families::load(dir.path(), Device::Cpu, Kind::Float, false).unwrap();
    let x = model.random_input(1, 5);
    let masks = Masks::none(model.groups().len());
    assert!(
        max_abs(
            &forward(&model, &x, &masks),
            &forward(loaded.as_ref(), &x, &masks)
        ) == 0.0
    );
}

fn qwen2(seed: i64) -> Llama {
    model_of(LlamaConfig::tiny_qwen2(), seed)
}

#[test]
fn qwen2_keep_all_gated_equals_teacher_and_its_biases_go_with_their_heads() {
    let model = qwen2(1);
    let names: Vec<String> = model.var_store().variables().into_keys().collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.bias".to_string()));
    assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
    let x = model.random_input(3, 10);
    let teacher = forward(&model, &x, &Masks::none(model.groups().len()));
    let gated = forward(
        &model,
        &x,
        &Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS),
    );
    assert!(max_abs(&teacher, &gated) <= 1e-5);
    // q rows and their bias rows in the head group; k, v and theirs in the KV group.
    for (kind, projs) in [
        (UnitKind::Heads, vec!["q_proj"]),
        (UnitKind::KvGroups, vec!["k_proj", "v_proj"]),
    ] {
        let group = model.groups().iter().find(|g| g.kind == kind).unwrap();
        for proj in projs {
            for part in ["weight", "bias"] {
                let tensor = format!("model.layers.0.self_attn.{proj}.{part}");
                assert!(
                    group
                        .members
                        .iter()
                        .any(|m| m.tensor == tensor && m.axis == 0),
                    "{tensor}"
                );
            }
        }
    }
}

#[test]
fn qwen2_slim_equals_hard_masked_and_exports_as_qwen2() {
    for seed in [3u64, 17, 40] {
        let model = qwen2(seed as i64);
        let keep = random_keep(&model, seed);
        let x = model.random_input(2, 9);
        let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
        let slim = model.slim(&keep).unwrap();
        let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
        let scale = masked.abs().max().double_value(&[]).max(1e-6);
        assert!(max_abs(&masked, &out) / scale <= 1e-4, "seed {seed}");
        let cfg = slim.config_json();
        assert_eq!(cfg["model_type"], "qwen2");
        assert_eq!(
            cfg["architectures"],
            serde_json::json!(["Qwen2ForCausalLM"])
        );
        assert_eq!(cfg["use_sliding_window"], false);
    }
    // Uniform widths: a stock Qwen2 config whose bias rows were sliced with their heads.
    let model = qwen2(5);
    let mut keep = KeepSet::all(model.groups());
    for (i, g) in model.groups().iter().enumerate() {
        match g.kind {
            UnitKind::KvGroups => keep.0[i] = vec![1],
            UnitKind::Heads => keep.0[i] = vec![2],
            _ => {}
        }
    }
    let slim = model.slim(&keep).unwrap();
    let q_bias = &slim.var_store().variables()["model.layers.1.self_attn.q_proj.bias"];
    let teacher_bias = &model.var_store().variables()["model.layers.1.self_attn.q_proj.bias"];
    assert_eq!(max_abs(q_bias, &teacher_bias.narrow(0, 2 * 8, 8)), 0.0);
    assert!(slim.config_json().get("hawada_heads").is_none());
}

#[test]
fn qwen2_export_load_export_is_identity() {
    let model = qwen2(3);
    let mut keep = random_keep(&model, 11);
    for (i, g) in model.groups().iter().enumerate() {
        if g.name.starts_with("model.layers.0.") {
            keep.0[i] = (0..g.len).collect();
        }
    }
    let slim = model.slim(&keep).unwrap();
    let loaded = common::export_roundtrip(slim.as_ref());
    assert_eq!(loaded.config_json()["model_type"], "qwen2");
    let x = model.random_input(1, 6);
    let masks = Masks::none(slim.groups().len());
    assert_eq!(
        max_abs(
            &forward(slim.as_ref(), &x, &masks),
            &forward(loaded.as_ref(), &x, &masks)
        ),
        0.0
    );
}

#[test]
fn a_sliding_window_that_would_change_results_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut qwen = serde_json::to_value(LlamaConfig::tiny_qwen2()).unwrap();
    qwen["use_sliding_window"] = true.into();
    qwen["sliding_window"] = 64.into();
    qwen["max_window_layers"] = 1.into();
    let mut mistral = serde_json::to_value(LlamaConfig::tiny()).unwrap();
    mistral["model_type"] = "mistral".into();
    mistral["sliding_window"] = 128.into();
    for config in [qwen.clone(), mistral.clone()] {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = families::load(dir.path(), Device::Cpu, Kind::Float, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("sliding_window") && err.contains("config.json"),
            "{err}"
        );
    }
    // A window as long as the context, or one no layer uses, changes nothing: both load.
    qwen["max_window_layers"] = 2.into();
    mistral["sliding_window"] = 256.into();
    for config in [qwen, mistral] {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        families::load(dir.path(), Device::Cpu, Kind::Float, true).unwrap();
    }
}

#[test]
fn qwen3_invariants_hold_with_its_per_head_qk_norms() {
    let model = model_of(LlamaConfig::tiny_qwen3(), 8);
    let names: Vec<String> = model.var_store().variables().into_keys().collect();
    assert!(names.contains(&"model.layers.1.self_attn.k_norm.weight".to_string()));
    let x = model.random_input(2, 9);
    let none = Masks::none(model.groups().len());
    let teacher = forward(&model, &x, &none);
    let all = Masks::from_keep(model.groups(), &KeepSet::all(model.groups()), OPTS);
    assert!(max_abs(&teacher, &forward(&model, &x, &all)) <= 1e-5);
    for seed in [2u64, 9, 31] {
        let keep = random_keep(&model, seed);
        let masked = forward(&model, &x, &Masks::from_keep(model.groups(), &keep, OPTS));
        let slim = model.slim(&keep).unwrap();
        let out = forward(slim.as_ref(), &x, &Masks::none(slim.groups().len()));
        let scale = masked.abs().max().double_value(&[]).max(1e-6);
        assert!(max_abs(&masked, &out) / scale <= 1e-4, "seed {seed}");
        let loaded = common::export_roundtrip(slim.as_ref());
        assert_eq!(loaded.config_json()["model_type"], "qwen3");
    }
    // The fused inference copy norms q and k heads apart from the one GEMM.
    let mut fused = Llama::new(LlamaConfig::tiny_qwen3(), Device::Cpu, Path::new("copy")).unwrap();
    hawada::io::safetensors::load_into(
        fused.var_store(),
        &hawada::io::safetensors::named_tensors(model.var_store()),
        Path::new("copy"),
    )
    .unwrap();
    fused
        .fuse_for_inference(hawada::model::NormFolding::Keep)
        .unwrap();
    assert!(max_abs(&teacher, &forward(&fused, &x, &none)) <= 1e-5);
}
