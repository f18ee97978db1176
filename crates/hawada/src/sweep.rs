//! A sweep: one recipe run at several latency targets (fractions of keep-all), each in its own
//! run directory, all sharing the first run's profile (keep-all latency, proxy fit; the site
//! tables are cached anyway), so the targets are judged against the same keep-all measurement,
//! and its teacher baseline or corrected teacher, which no target changes.
//! `sweep.json`, `sweep.html` and `plots/sweep-*.png` show the trade-off they trace.

use crate::error::{Error, Result};
use crate::progress::Observer;
use crate::recipe::Recipe;
use crate::report::Summary;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One target of a sweep and what its run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub target_fraction: f64,
    /// Relative to the sweep directory.
    pub run_dir: String,
    pub summary: Summary,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub recipe: String,
    /// The teacher has random weights: its quality columns mean nothing, only speed and the
    /// agreement with the teacher do.
    pub random_init: bool,
    pub points: Vec<SweepPoint>,
}

/// Runs `recipe` at each of `fractions` (in order) in `dir/t<fraction>`, resuming any run
/// already there, then writes `dir/sweep.json` and the sweep charts.
pub fn sweep(
    recipe: &Recipe,
    recipe_file: &Path,
    dir: &Path,
    fractions: &[f64],
    observer: &dyn Observer,
) -> Result<Sweep> {
    if fractions.is_empty() {
        return Err(Error::Invalid(
            "a sweep needs at least one target fraction".into(),
        ));
    }
    let recipes = fractions
        .iter()
        .map(|&f| recipe.at_fraction(f, recipe_file))
        .collect::<Result<Vec<_>>>()?;
    let mut points = Vec::new();
    let mut first_run: Option<PathBuf> = None;
    for (&fraction, recipe) in fractions.iter().zip(&recipes) {
        let name = format!("t{fraction}");
        let run_dir = dir.join(&name);
        if let Some(first) = &first_run {
            std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
            for shared in SHARED {
                copy_missing(&first.join(shared), &run_dir.join(shared))?;
            }
        }
        tracing::info!(fraction, run_dir = %run_dir.display(), "sweep: next target");
        let summary = crate::run::run(recipe, recipe_file, &run_dir, observer)?;
        first_run.get_or_insert(run_dir);
        points.push(SweepPoint {
            target_fraction: fraction,
            run_dir: name,
            summary,
        });
    }
    let sweep = Sweep {
        recipe: recipe_file.display().to_string(),
        random_init: recipe.model.random_init,
        points,
    };
    crate::io::hf_config::write(&dir.join("sweep.json"), &sweep)?;
    crate::report::write_sweep_report(dir, &sweep)?;
    Ok(sweep)
}

/// What the first target's run leaves that every later target reuses (as a resumed run would):
/// the profile, the teacher's samples, the corrected teacher, and the teacher baseline's
/// quality, in that order: the corrected teacher is copied before the record that says it is
/// complete.
const SHARED: [&str; 4] = [
    "profile.json",
    "teacher-samples.safetensors",
    "teacher-corrected",
    "teacher-baseline.json",
];

/// Copies the file or flat directory `from` to `to` unless `to` exists or `from` does not.
fn copy_missing(from: &Path, to: &Path) -> Result<()> {
    if to.exists() || !from.exists() {
        return Ok(());
    }
    if !from.is_dir() {
        std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
        return Ok(());
    }
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let file = entry.map_err(|e| Error::io(from, e))?.path();
        if let Some(name) = file.file_name() {
            std::fs::copy(&file, to.join(name)).map_err(|e| Error::io(&file, e))?;
        }
    }
    Ok(())
}

/// Rewrites `sweep.html` and the charts of a finished sweep from its `sweep.json`.
pub fn write_report(dir: &Path) -> Result<()> {
    let path = dir.join("sweep.json");
    let sweep: Sweep =
        crate::io::hf_config::parse(&path, crate::io::hf_config::read_value(&path)?)?;
    crate::report::write_sweep_report(dir, &sweep)
}
