//! Helpers the family invariant tests share.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use hawada::families;
use hawada::model::Family;
use tch::{Device, Kind, Tensor};

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Saves `model`, loads it back, saves again; asserts `config.json` and `model.safetensors` are
/// byte-identical (export → load → export is the identity) and returns the loaded model.
pub fn export_roundtrip(model: &dyn Family) -> Box<dyn Family> {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a"), dir.path().join("b"));
    model.save(&first).unwrap();
    let loaded = families::load(&first, Device::Cpu, Kind::Float, false).unwrap();
    loaded.save(&second).unwrap();
    for file in ["config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(first.join(file)).unwrap(),
            std::fs::read(second.join(file)).unwrap(),
            "{file}"
        );
    }
    loaded
}
