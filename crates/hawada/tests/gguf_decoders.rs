//! Decoder GGUF files as llama.cpp's converter writes them, made here from tiny random models: a
//! Llama with llama3 rope scaling (its `rope_freqs.weight` factors, q/k rows permuted), a Qwen2
//! (q/k/v biases, `qwen2` keys, rows unpermuted) and a Qwen3 (per-head q/k norms) load with the
//! logits of the HF model they came from (f32, max abs ≤ 1e-4 × max |logit|), their exports name
//! the rope scaling and keep the architecture; features this reader does not handle (an
//! architecture, a metadata key, a tensor, a quantised tensor of the wrong size) are errors naming
//! them.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;
mod tiny_llama;

use common::max_abs;
use hawada::families::{self, llama::LlamaConfig};
use hawada::model::{Family, Masks, Phase};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tiny_llama::{model, model_of};

/// A GGUF metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// A GGUF v3 file: metadata, then tensors (`dims` in GGUF order, innermost first) of ggml type
/// `ggml_type` and raw `data`, each aligned to 32 bytes.
#[derive(Default)]
struct GgufFile {
    metadata: Vec<(String, Meta)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufFile {
    fn meta(&mut self, key: &str, value: Meta) {
        self.metadata.push((key.to_string(), value));
    }

    /// An f32 tensor in reference order (`[rows, cols]`), stored as GGUF does.
    fn f32_tensor(&mut self, name: &str, t: &Tensor) {
        let values: Vec<f32> = Vec::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap();
        let dims = t.size().iter().rev().map(|&d| d as u64).collect();
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name.to_string(), dims, 0, data));
    }

    fn write(&self, path: &Path) {
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut b, key);
            match value {
                Meta::U32(v) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(v.to_le_bytes());
                }
                Meta::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    string(&mut b, s);
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, ggml_type, data) in &self.tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ggml_type.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        for (_, _, _, data) in &self.tensors {
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
            b.extend(data);
        }
        std::fs::write(path, b).unwrap();
    }
}

/// GGUF name of an HF decoder tensor (the inverse of the reader's map).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let tail = tail
        .replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("self_attn.q_norm", "attn_q_norm")
        .replace("self_attn.k_norm", "attn_k_norm")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("input_layernorm", "attn_norm");
    format!("blk.{layer}.{tail}")
}

/// llama.cpp's `LlamaModel.permute`: HF's half-split rotary rows to interleaved pairs.
fn permute(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let rows = size[0];
    let rest: Vec<i64> = size[1..].to_vec();
    let mut shape = vec![heads, 2, rows / heads / 2];
    shape.extend(&rest);
    w.reshape(shape.as_slice())
        .transpose(1, 2)
        .reshape(size.as_slice())
}

/// The converter's llama3 `rope_freqs` factors (convert_hf_to_gguf.py, `LlamaModel`): 1 for
/// short wavelengths, `factor` for long ones, `1 / ((1 − s)/factor + s)` between.
fn llama3_factors(
    head_dim: i64,
    theta: f64,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// `model`'s weights and config as a GGUF of `arch` (`llama` permutes q/k rows).
fn to_gguf(model: &dyn Family, cfg: &LlamaConfig, arch: &'static str) -> GgufFile {
    let mut file = GgufFile::default();
    file.meta("general.architecture", Meta::Str(arch));
    let key = |k: &str| format!("{arch}.{k}");
    for (k, v) in [
        ("block_count", cfg.num_hidden_layers as u32),
        ("context_length", cfg.max_position_embeddings as u32),
        ("embedding_length", cfg.hidden_size as u32),
        ("feed_forward_length", cfg.intermediate_size as u32),
        ("attention.head_count", cfg.num_attention_heads as u32),
        ("attention.head_count_kv", cfg.kv_heads() as u32),
        ("attention.key_length", cfg.head_dim() as u32),
        ("rope.dimension_count", cfg.head_dim() as u32),
        ("vocab_size", cfg.vocab_size as u32),
    ] {
        file.meta(&key(k), Meta::U32(v));
    }
    file.meta(
        &key("rope.freq_base"),
        Meta::F32(cfg.rope_theta.unwrap() as f32),
    );
    file.meta(
        &key("attention.layer_norm_rms_epsilon"),
        Meta::F32(cfg.rms_norm_eps as f32),
    );
    for (name, t) in model.var_store().variables() {
        let t = match (arch, name.contains("q_proj"), name.contains("k_proj")) {
            ("llama", true, _) => permute(&t, cfg.num_attention_heads),
            ("llama", _, true) => permute(&t, cfg.kv_heads()),
            _ => t,
        };
        file.f32_tensor(&gguf_name(&name), &t);
    }
    file
}

fn logits(model: &dyn Family, x: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(x, &Masks::none(model.groups().len()), Phase::Eval))
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    max_abs(a, b) <= 1e-4 * b.abs().max().double_value(&[])
}

#[test]
fn a_llama3_rope_gguf_gives_its_hf_models_logits_and_exports_the_scaling() {
    // The tiny Llama: head_dim 8, θ 10000, llama3 factor 8 with low/high 1 and 4 over an
    // original context of 64, which the GGUF does not record (the converter assumes 8192).
    let cfg = LlamaConfig::tiny();
    let model = model(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama3.gguf");
    let mut file = to_gguf(&model, &cfg, "llama");
    let factors = llama3_factors(cfg.head_dim(), 10000.0, 8.0, 1.0, 4.0, 64.0);
    assert!(factors.iter().any(|&f| f > 1.0 && f < 8.0), "{factors:?}");
    file.f32_tensor("rope_freqs.weight", &Tensor::from_slice(&factors));
    file.write(&path);

    let x = model.random_input(2, 40);
    let expected = logits(&model, &x);
    let loaded = families::load(&path, Device::Cpu, Kind::Float, false).unwrap();
    assert!(close(&logits(loaded.as_ref(), &x), &expected));
    let rope = &loaded.config_json()["rope_scaling"];
    assert_eq!(rope["rope_type"], "llama3", "{rope}");
    assert_eq!(rope["factor"], 8.0);
    // The export names the scaling: loaded back as an HF folder, the same logits.
    let exported = common::export_roundtrip(loaded.as_ref());
    assert!(close(&logits(exported.as_ref(), &x), &expected));

    // Without its factors the same GGUF gives other logits: dropping them would show.
    file.tensors
        .retain(|(name, ..)| name != "rope_freqs.weight");
    file.write(&path);
    let unscaled = families::load(&path, Device::Cpu, Kind::Float, false).unwrap();
    assert!(unscaled.config_json().get("rope_scaling").is_none());
    assert!(!close(&logits(unscaled.as_ref(), &x), &expected));
}

#[test]
fn qwen2_and_qwen3_ggufs_give_their_hf_models_logits_and_export_their_type() {
    for (cfg, arch, architecture) in [
        (LlamaConfig::tiny_qwen2(), "qwen2", "Qwen2ForCausalLM"),
        (LlamaConfig::tiny_qwen3(), "qwen3", "Qwen3ForCausalLM"),
    ] {
        let model = model_of(cfg.clone(), 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{arch}.gguf"));
        to_gguf(&model, &cfg, arch).write(&path);
        let x = model.random_input(2, 12);
        let loaded = families::load(&path, Device::Cpu, Kind::Float, false).unwrap();
        assert!(
            close(&logits(loaded.as_ref(), &x), &logits(&model, &x)),
            "{arch}"
        );
        let config = loaded.config_json();
        assert_eq!(config["model_type"], arch);
        assert_eq!(config["architectures"], serde_json::json!([architecture]));
        assert_eq!(config["tie_word_embeddings"], false);
        let exported = common::export_roundtrip(loaded.as_ref());
        assert_eq!(exported.config_json()["model_type"], arch);
    }
}

/// The load error of the tiny Qwen2's GGUF after `edit`.
fn qwen2_gguf_error(edit: impl FnOnce(&mut GgufFile)) -> String {
    let cfg = LlamaConfig::tiny_qwen2();
    let model = model_of(cfg.clone(), 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.gguf");
    let mut file = to_gguf(&model, &cfg, "qwen2");
    edit(&mut file);
    file.write(&path);
    let err = families::load(&path, Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("edited.gguf"), "{err}");
    err
}

#[test]
fn unsupported_gguf_features_are_errors_naming_them() {
    let err = qwen2_gguf_error(|f| f.metadata[0].1 = Meta::Str("gemma2"));
    assert!(
        err.contains("general.architecture")
            && err.contains("gemma2")
            && err.contains("llama, qwen2, qwen3"),
        "{err}"
    );
    let err = qwen2_gguf_error(|f| f.meta("qwen2.attention.sliding_window", Meta::U32(128)));
    assert!(
        err.contains("qwen2.attention.sliding_window") && err.contains("rope.freq_base"),
        "{err}"
    );
    let err = qwen2_gguf_error(|f| f.meta("qwen2.expert_count", Meta::U32(8)));
    assert!(err.contains("qwen2.expert_count"), "{err}");
    let err = qwen2_gguf_error(|f| f.meta("qwen2.rope.scaling.type", Meta::Str("yarn")));
    assert!(
        err.contains("rope.scaling.type") && err.contains("yarn"),
        "{err}"
    );
    let err = qwen2_gguf_error(|f| {
        let t = Tensor::ones([8], (Kind::Float, Device::Cpu));
        f.f32_tensor("blk.0.attn_q_norm.weight", &t);
    });
    assert!(
        err.contains("blk.0.attn_q_norm.weight") && err.contains("attn_q.bias"),
        "{err}"
    );
}

#[test]
fn a_quantised_tensor_of_the_wrong_size_names_the_tensor() {
    // blk.0.ffn_down.weight as Q4_K: its 48-element rows are not whole 256-element blocks.
    let err = qwen2_gguf_error(|f| {
        let t = f
            .tensors
            .iter_mut()
            .find(|(n, ..)| n == "blk.0.ffn_down.weight")
            .unwrap();
        t.2 = 12;
    });
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("Q4_K"),
        "{err}"
    );
    // Dims that claim more data than the tensor has: it runs into the next tensor.
    let err = qwen2_gguf_error(|f| {
        let t = f
            .tensors
            .iter_mut()
            .find(|(n, ..)| n == "blk.0.ffn_down.weight")
            .unwrap();
        t.1[1] *= 2;
    });
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("past"),
        "{err}"
    );
}
