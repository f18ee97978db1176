//! `metrics.jsonl`: one JSON object per training step of every stage, appended as the trainers
//! go and cut back to the last checkpoint on resume.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub stage: String,
    pub step: i64,
    pub loss: f64,
    pub kd: f64,
    pub v: f64,
    pub lambda: f64,
    /// The proxy at the expected widths (what the gates' gradient follows).
    pub proxy_ms: f64,
    /// The proxy at the current hard architecture (the keep-set export would take now); `v`
    /// takes this value on steps without a probe.
    #[serde(default)]
    pub kept_proxy_ms: Option<f64>,
    /// Measured at this step (a probe), if any.
    pub real_ms: Option<f64>,
    pub last_real_ms: Option<f64>,
    /// Kept units per group under hard masks (probe steps only: reading them syncs the device).
    pub kept: Option<Vec<usize>>,
    /// Wall seconds of the training step, the probe left out (batch, forwards, backward,
    /// gradient averaging, update, reading the losses).
    #[serde(default)]
    pub step_s: Option<f64>,
}

/// Appends metric lines to `metrics.jsonl`, one JSON object per line.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> Self {
        MetricsLog { path }
    }

    /// Drops lines of `stage` at or after `step` (written after the checkpoint a resume starts
    /// from), so the resumed run continues the file without duplicates.
    pub fn truncate_from(&self, stage: &str, step: i64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(
                |line| match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) => {
                        !(v["stage"] == stage && v["step"].as_i64().is_some_and(|s| s >= step))
                    }
                    Err(_) => false, // a line cut by a crash
                },
            )
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        crate::io::write_atomic(&self.path, body.as_bytes())
    }

    pub fn append<T: Serialize>(&self, line: &T) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let text = serde_json::to_string(line).map_err(|e| Error::Invalid(e.to_string()))?;
        writeln!(file, "{text}").map_err(|e| Error::io(&self.path, e))
    }

    /// Every line of the file, parsed (a line cut by a crash is skipped).
    pub fn read(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
