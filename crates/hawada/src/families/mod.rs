//! The family registry: the only place that maps a `config.json` to a model family.

pub mod resnet;
pub mod vit;

use crate::error::{Error, Result};
use crate::model::Family;
use std::path::Path;
use tch::{Device, Kind};

/// Loads the model in `dir` (`config.json` + `model.safetensors`), dispatching on `model_type`.
/// With `random_init`, only `config.json` is read and weights are random.
pub fn load(dir: &Path, device: Device, kind: Kind, random_init: bool) -> Result<Box<dyn Family>> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::config(
            &config_path,
            "<file>",
            "missing: a model directory needs config.json (and model.safetensors unless --random-init)",
        ));
    }
    let config = crate::io::hf_config::read_value(&config_path)?;
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
        "vit" => vit::load(dir, config, device, kind, random_init),
        other => Err(Error::config(
            &config_path,
            "model_type",
            format!("unknown family `{other}`; supported: resnet, vit"),
        )),
    }
}
