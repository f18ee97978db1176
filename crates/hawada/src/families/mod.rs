//! The family registry: the only place that maps a `config.json` (or a GGUF file) to a model
//! family. `layers` holds the building blocks families share, `slim_widths` the per-layer widths
//! a slim transformer records in its config.

mod layers;
pub mod llama;
pub mod resnet;
pub mod slim_widths;
pub mod vit;

use crate::error::{Error, Result};
use crate::model::Family;
use std::path::Path;
use tch::{Device, Kind};

fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

fn is_onnx(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "onnx")
}

/// Whether `path` holds weights: a GGUF or ONNX file, or a directory with `model.safetensors`
/// (or an index of shards).
pub fn has_weights(path: &Path) -> bool {
    ((is_gguf(path) || is_onnx(path)) && path.is_file())
        || path.join("model.safetensors").exists()
        || path.join("model.safetensors.index.json").exists()
}

/// Checks `path` holds a language model (what `generate` and text data need) before any weight
/// is read: an image model is named as such rather than failing on a missing `vocab_size`.
pub fn check_language_model(path: &Path) -> Result<()> {
    if is_gguf(path) {
        return Ok(());
    }
    if is_onnx(path) {
        return Err(Error::config(
            path,
            "<file>",
            "an ONNX file holds a vision backbone (DINOv2); this needs a language model (a decoder: a GGUF file or an HF directory)",
        ));
    }
    let config_path = path.join("config.json");
    if !config_path.exists() {
        return Err(Error::config(
            &config_path,
            "<file>",
            "missing: a model directory needs config.json (and model.safetensors)",
        ));
    }
    let config = crate::io::json::read_value(&config_path)?;
    match config.get("model_type").and_then(|v| v.as_str()) {
        Some(decoder)
            if llama::SUPPORTED_MODEL_TYPES
                .split(", ")
                .any(|t| t == decoder) =>
        {
            Ok(())
        }
        Some(other @ ("resnet" | "vit" | "dinov2")) => Err(Error::config(
            &config_path,
            "model_type",
            format!(
                "this is a {other} model (images); this needs a language model ({})",
                llama::SUPPORTED_MODEL_TYPES
            ),
        )),
        other => Err(Error::config(
            &config_path,
            "model_type",
            format!(
                "{other:?} is not a supported language model; expected one of {}",
                llama::SUPPORTED_MODEL_TYPES
            ),
        )),
    }
}

/// Loads the model at `path`: a GGUF file (a `llama`, `qwen2` or `qwen3` decoder, dequantised), an
/// ONNX file (a DINOv2 backbone exported from transformers), or a directory (`config.json` +
/// weights) dispatched on `model_type`. With `random_init`, only the config is read and weights are
/// random.
pub fn load(path: &Path, device: Device, kind: Kind, random_init: bool) -> Result<Box<dyn Family>> {
    if is_gguf(path) {
        return Ok(Box::new(llama::from_gguf(path, device, kind)?));
    }
    if is_onnx(path) {
        return Ok(Box::new(vit::from_onnx(path, device, kind)?));
    }
    let dir = path;
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::config(
            &config_path,
            "<file>",
            "missing: a model directory needs config.json (and model.safetensors unless --random-init)",
        ));
    }
    let config = crate::io::json::read_value(&config_path)?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            Error::config(
                &config_path,
                "model_type",
                "missing; expected a string such as \"resnet\"",
            )
        })?
        .to_string();
    match model_type.as_str() {
        "resnet" => resnet::load(dir, config, device, kind, random_init),
        "vit" | "dinov2" => vit::load(dir, config, device, kind, random_init),
        "llama" | "mistral" | "qwen2" | "qwen3" => {
            llama::load(dir, config, device, kind, random_init)
        }
        other => Err(Error::config(
            &config_path,
            "model_type",
            format!(
                "unknown family `{other}`; supported: resnet, vit, dinov2, {}",
                llama::SUPPORTED_MODEL_TYPES
            ),
        )),
    }
}
