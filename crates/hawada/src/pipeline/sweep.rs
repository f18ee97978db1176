//! A sweep: one recipe run at several latency targets (fractions of keep-all), each in its own
//! run directory, all sharing the first run's profile (keep-all latency, proxy fit; the site
//! tables are cached anyway), so the targets are judged against the same keep-all measurement,
//! and its teacher samples, teacher baseline or corrected teacher, which no target changes
//! (`run_dir::SHARED_ACROSS_TARGETS`). `sweep.json`, `sweep.html` and `plots/sweep-*.png` show
//! the trade-off they trace.

use crate::error::{Error, Result};
use crate::progress::Observer;
use crate::recipe::Recipe;
use crate::run_dir::{Sweep, SweepDir, SweepPoint, SHARED_ACROSS_TARGETS};
use std::path::Path;

/// Runs `recipe` at each of `fractions` (in order) in `dir/t<fraction>`, resuming any run
/// already there, then writes `dir/sweep.json` and the sweep charts.
pub fn sweep(
    recipe: &Recipe,
    recipe_file: &Path,
    dir: &SweepDir,
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
    let first_run = dir.target(fractions[0]);
    for (&fraction, recipe) in fractions.iter().zip(&recipes) {
        let run_dir = dir.target(fraction);
        if run_dir != first_run {
            let root = run_dir.root();
            std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
            for shared in SHARED_ACROSS_TARGETS {
                copy_missing(&shared(&first_run), &shared(&run_dir))?;
            }
        }
        tracing::info!(fraction, run_dir = %run_dir.root().display(), "sweep: next target");
        let summary = super::run(recipe, recipe_file, &run_dir, observer)?;
        points.push(SweepPoint {
            target_fraction: fraction,
            run_dir: SweepDir::target_name(fraction),
            summary,
        });
    }
    let sweep = Sweep {
        recipe: recipe_file.display().to_string(),
        random_init: recipe.model.random_init,
        points,
    };
    crate::io::json::write(&dir.sweep(), &sweep)?;
    crate::report::write_sweep_report(dir, &sweep)?;
    Ok(sweep)
}

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
pub fn write_report(dir: &SweepDir) -> Result<()> {
    let sweep: Sweep = crate::io::json::read(&dir.sweep())?;
    crate::report::write_sweep_report(dir, &sweep)
}
