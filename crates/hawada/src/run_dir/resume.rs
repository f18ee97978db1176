//! Resuming a run directory with the recipe that made it. Every record a stage reuses
//! (`profile.json`, the gates, `export.json`, checkpoints) depends on recipe fields; resumed
//! with another target or `latency.batch`, a directory mixed two runs and reported nonsense
//! (issue 24). The directory's `recipe.toml` is the record of what made it: a resumed run must
//! match it in every field that changes a result, or stop, naming the fields, before anything
//! is written.

use super::RunDir;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Fields that change no record: the run's display name, where the data asset is fetched from,
/// where site tables are cached (keyed by what they measure), and what `hawada bench` times.
const IGNORED: [&str; 4] = ["name", "data.asset", "latency.cache_dir", "bench"];

/// Checks `resolved` (the recipe about to run, as TOML) against the `recipe.toml` a previous
/// run left in `run_dir`, if any.
pub fn check_same_recipe(run_dir: &RunDir, resolved: &str) -> Result<()> {
    let path = run_dir.recipe();
    let Ok(previous) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let (before, after) = (flatten(&previous), flatten(resolved));
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let changes: Vec<String> = keys
        .into_iter()
        .filter(|key| {
            !IGNORED
                .iter()
                .any(|ignored| *key == ignored || key.starts_with(&format!("{ignored}.")))
        })
        .filter(|key| before.get(*key) != after.get(*key))
        .map(|key| {
            let show = |v: Option<&String>| v.map_or("(unset)".to_string(), String::clone);
            format!(
                "{key} ({} → {})",
                show(before.get(key)),
                show(after.get(key))
            )
        })
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    Err(Error::run_dir(
        run_dir.root(),
        format!(
            "was made by a recipe that differs in {}; resuming would mix the records of two runs. Use a new --run-dir, or delete {} to start over",
            changes.join(", "),
            run_dir.root().display()
        ),
    ))
}

/// Every leaf of a TOML document by its dotted path (`target.fraction` → `0.6`); text that
/// does not parse is one leaf, so any change to it shows.
fn flatten(text: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    match text.parse::<toml::Table>() {
        Ok(table) => walk("", &toml::Value::Table(table), &mut out),
        Err(_) => {
            out.insert("recipe.toml".into(), text.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_fields_are_listed_and_ignored_ones_pass() {
        let dir = std::env::temp_dir().join(format!("hawada-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run_dir = RunDir::new(&dir);
        let recipe = "name = \"a\"\n[target]\nfraction = 0.6\n[latency]\nbatch = 32\n";
        check_same_recipe(&run_dir, recipe).unwrap();
        std::fs::write(run_dir.recipe(), recipe).unwrap();
        check_same_recipe(&run_dir, &recipe.replace("\"a\"", "\"b\"")).unwrap();
        let changed = recipe
            .replace("0.6", "0.5")
            .replace("batch = 32", "batch = 64\ntokens = 1");
        let err = check_same_recipe(&run_dir, &changed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target.fraction (0.6 → 0.5)")
                && err.contains("latency.batch (32 → 64)")
                && err.contains("latency.tokens ((unset) → 1)")
                && err.contains("--run-dir"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
