//! The two trainers: the gate trainer (adaptation) and the weight trainer (fine-tuning).

mod gate_trainer;
mod weight_trainer;

pub use gate_trainer::*;
pub use weight_trainer::*;
