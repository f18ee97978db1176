//! Property harness over the parsers of user files (GGUF, ONNX, safetensors, recipe TOML, config
//! JSON):
//! mutated and truncated inputs give `Ok` or an error, never a panic. The stand-in for a
//! `cargo fuzz` target that runs in CI in seconds.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::families::{self, resnet::ResnetConfig};
use hawada::io::gguf::Gguf;
use hawada::recipe::{Recipe, DEFAULT_RECIPE};
use proptest::prelude::*;
use std::path::Path;
use tch::{Device, Kind};

/// A valid GGUF v3 with llama metadata and one Q4_1 tensor of 64 elements.
fn valid_gguf() -> Vec<u8> {
    let string = |s: &str| {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    };
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(2u64.to_le_bytes());
    bytes.extend(string("general.architecture"));
    bytes.extend(8u32.to_le_bytes());
    bytes.extend(string("llama"));
    bytes.extend(string("llama.attention.head_count"));
    bytes.extend(4u32.to_le_bytes());
    bytes.extend(2u32.to_le_bytes());
    bytes.extend(string("blk.0.attn_q.weight"));
    bytes.extend(2u32.to_le_bytes());
    bytes.extend(32u64.to_le_bytes()); // a row of one Q4_1 block
    bytes.extend(2u64.to_le_bytes());
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    while !bytes.len().is_multiple_of(32) {
        bytes.push(0);
    }
    bytes.extend([0x11u8; 40]);
    bytes
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
    for &(at, value) in edits {
        let i = at % bytes.len();
        bytes[i] = value;
    }
    bytes.truncate(bytes.len() - cut % bytes.len());
    bytes
}

fn exercise_gguf(path: &Path) {
    if let Ok(gguf) = Gguf::open(path) {
        let names: Vec<String> = gguf.tensor_names().map(str::to_string).collect();
        for name in names {
            let _ = gguf.tensor(&name);
        }
        let _ = hawada::io::gguf::decoder_config(&gguf);
        let _ = hawada::io::gguf::decoder_tensors(&gguf);
        let _ = hawada::data::tokenizer_from_gguf(&gguf);
    }
}

#[test]
fn the_valid_gguf_parses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, valid_gguf()).unwrap();
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(
        gguf.tensor("blk.0.attn_q.weight").unwrap().size(),
        vec![2, 32]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_gguf_never_panics(edits in prop::collection::vec((0usize..400, any::<u8>()), 0..8), cut in 0usize..400) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, mutate(valid_gguf(), &edits, cut)).unwrap();
        exercise_gguf(&path);
    }

    #[test]
    fn mutated_onnx_never_panics(edits in prop::collection::vec((0usize..80_000, any::<u8>()), 0..8), cut in 0usize..80_000) {
        // The tiny DINOv2 torch.onnx export of fixtures/dinov2, mutated, imported end to end.
        let onnx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/dinov2/model.onnx");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, mutate(std::fs::read(onnx).unwrap(), &edits, cut)).unwrap();
        let _ = families::load(&path, Device::Cpu, Kind::Float, false);
    }

    #[test]
    fn mutated_safetensors_never_panic(edits in prop::collection::vec((0usize..4096, any::<u8>()), 0..8), cut in 0usize..4096) {
        let dir = tempfile::tempdir().unwrap();
        let model = hawada::families::resnet::Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("t")).unwrap();
        use hawada::model::Family;
        model.save(dir.path()).unwrap();
        let file = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, mutate(bytes, &edits, cut)).unwrap();
        let _ = families::load(dir.path(), Device::Cpu, Kind::Float, false);
    }

    #[test]
    fn mutated_recipes_never_panic(edits in prop::collection::vec((0usize..4000, 32u8..127), 0..6), cut in 0usize..4000) {
        let bytes = mutate(DEFAULT_RECIPE.as_bytes().to_vec(), &edits, cut);
        let text = String::from_utf8_lossy(&bytes);
        let _ = Recipe::parse(&text, Path::new("r.toml"));
    }

    #[test]
    fn mutated_configs_never_panic(edits in prop::collection::vec((0usize..1000, 32u8..127), 0..6), cut in 0usize..1000, family in 0usize..3) {
        let config = match family {
            0 => serde_json::to_string(&ResnetConfig::tiny()).unwrap(),
            1 => serde_json::to_string(&hawada::families::vit::VitConfig::tiny()).unwrap(),
            _ => serde_json::to_string(&hawada::families::llama::LlamaConfig::tiny()).unwrap(),
        };
        let dir = tempfile::tempdir().unwrap();
        let text = mutate(config.into_bytes(), &edits, cut);
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let _ = families::load(dir.path(), Device::Cpu, Kind::Float, true);
    }
}
