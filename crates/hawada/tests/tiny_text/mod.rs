//! A tiny random LLaMA with SmolLM2's real tokenizer (from the GGUF the tests fetch) and three
//! short documents: text runs that take seconds on the CPU.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

pub struct TinyText {
    pub model_dir: PathBuf,
    pub texts: PathBuf,
    pub tokenizer_file: PathBuf,
}

/// Writes into `dir` SmolLM2's `tokenizer.json` (49152 ids), `model/config.json` of the tiny
/// LLaMA embedding `vocab_size` ids (the tiny config's 64 when `None`), and `texts/` of three
/// documents.
pub fn tiny_text(dir: &Path, vocab_size: Option<i64>) -> TinyText {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf = hawada::io::gguf::Gguf::open(&gguf).unwrap();
    let tokenizer_file = dir.join("tokenizer.json");
    hawada::data::tokenizer_from_gguf(&gguf)
        .unwrap()
        .save(&tokenizer_file, false)
        .unwrap();
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let mut config = serde_json::to_value(hawada::families::llama::LlamaConfig::tiny()).unwrap();
    if let Some(vocab_size) = vocab_size {
        config["vocab_size"] = vocab_size.into();
    }
    std::fs::write(model_dir.join("config.json"), config.to_string()).unwrap();
    let texts = dir.join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    for (i, text) in [
        "The Congress shall assemble at least once in every year. ",
        "We hold these truths to be self-evident, that all men are created equal. ",
        "Four score and seven years ago our fathers brought forth on this continent. ",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(texts.join(format!("{i}.txt")), text.repeat(12)).unwrap();
    }
    TinyText {
        model_dir,
        texts,
        tokenizer_file,
    }
}
