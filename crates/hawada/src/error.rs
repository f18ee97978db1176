//! The one library error type. Every variant names the file, tensor or field a user must look at.

use std::path::PathBuf;

/// Result alias for the whole library.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor { file: PathBuf, name: String },
    #[error(
        "{file}: unexpected tensor `{name}` (not part of this model; wrong config or wrong file?)"
    )]
    UnexpectedTensor { file: PathBuf, name: String },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        file: PathBuf,
        tensor: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{file}: tensor `{tensor}` has dtype {found}, expected a floating-point dtype (f32, f16, bf16, f64)")]
    DtypeMismatch {
        file: PathBuf,
        tensor: String,
        found: String,
    },
    #[error("{file}: not a valid safetensors file: {reason}")]
    BadSafetensors { file: PathBuf, reason: String },
    #[error("{file}: field `{field}`: {reason}")]
    Config {
        file: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Data { file: PathBuf, reason: String },
    #[error("asset `{name}`: {reason}")]
    Asset { name: String, reason: String },
    #[error("torch error in {op} ({tensor}): {source}")]
    Torch {
        op: String,
        tensor: String,
        #[source]
        source: tch::TchError,
    },
    #[error("device `{device}`: {reason}")]
    Device { device: String, reason: String },
    #[error("training stopped at step {step}: {reason}")]
    Training { step: i64, reason: String },
    /// A run directory that cannot be used as it is: not a directory, locked by another run,
    /// or made by another recipe.
    #[error("run directory {dir}: {reason}")]
    RunDir { dir: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn torch(op: &str, tensor: &str, source: tch::TchError) -> Self {
        Error::Torch {
            op: op.to_string(),
            tensor: tensor.to_string(),
            source,
        }
    }

    pub fn run_dir(dir: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::RunDir {
            dir: dir.into(),
            reason: reason.into(),
        }
    }

    pub fn config(file: impl Into<PathBuf>, field: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
