//! JSON files read and written: model configs (`config.json`, Hugging Face style, parsed once
//! into a family's typed config) and a run's records; errors name the file and the field.

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Reads `path` and returns the raw JSON value (used by the family registry to dispatch).
pub fn read_value(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, "<json>", e.to_string()))
}

/// Parses a typed config from a JSON value; `path` names the file in errors.
pub fn parse<T: DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split('`')
            .nth(1)
            .map(str::to_string)
            .unwrap_or_else(|| "<config>".to_string());
        Error::config(path, &field, msg)
    })
}

/// Reads and parses a typed JSON file (a config or a run record); errors name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    parse(path, read_value(path)?)
}

/// Writes a config as pretty JSON, atomically.
pub fn write<T: Serialize>(path: &Path, config: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| Error::config(path, "<json>", e.to_string()))?;
    super::write_atomic(path, text.as_bytes())
}
