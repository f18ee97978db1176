//! HawAda: adapt a pretrained network to one GPU. Gates learn what the model can lose under a
//! latency budget measured on the target device; the model is then physically slimmed and
//! fine-tuned by distillation from the original. See DESIGN.md for the algorithm.

pub mod bench;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod distill;
pub mod error;
pub mod eval;
pub mod export;
pub mod families;
pub mod gates;
pub mod io;
pub mod latency;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod run_dir;
pub mod train;

pub use error::{Error, Result};
