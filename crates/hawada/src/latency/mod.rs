//! Latency: measured (the ground truth), then modelled by a differentiable proxy (DESIGN §4).

pub mod inference;
pub mod measure;
pub mod proxy;
pub mod tables;
