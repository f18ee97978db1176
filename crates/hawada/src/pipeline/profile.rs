//! The profile stage (DESIGN §4): keep-all latency, random sub-architectures measured against
//! keep-all, the site tables (cached per device, dtype, shapes and model), and both proxies
//! fitted and judged on held-out sub-architectures. `profile.json` is its record; it does not
//! depend on the target, so a sweep shares it.

use super::env::RunEnv;
use super::oom::out_of_memory_as_error;
use crate::error::Result;
use crate::gates::{enforce_follows, floor_units};
use crate::latency::inference::{inference_copy, measure_against_keep_all, measure_model};
use crate::latency::measure::device_name;
use crate::latency::proxy::{Fidelity, LatencyProxy, ProxyCost, Sample};
use crate::latency::tables::{
    cache_key, load_cached, measure_tables, store_cached, SiteTables, TableCost, TableOptions,
};
use crate::model::{Family, KeepSet, UnitKind};
use crate::recipe::Recipe;
use crate::run_dir::{Measured, Profile};
use tch::{Device, Kind, Tensor};

/// The profile on rank 0 (measured, or read back), then on the other ranks read from its
/// `profile.json` and the cached site tables; returns the record and the proxy that trains the
/// gates.
pub fn stage(
    model: &dyn Family,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<(Profile, LatencyProxy)> {
    let latency_batch = ("latency measurement", "latency.batch", recipe.latency.batch);
    let mut profiled = None;
    env.workers.from_leader("profile", || {
        profiled = Some(out_of_memory_as_error(env.device, latency_batch, || {
            profile_stage(model, recipe, env)
        })?);
        Ok(())
    })?;
    match profiled {
        Some(profiled) => Ok(profiled),
        None => profile_stage(model, recipe, env),
    }
}

/// `proxy` fitted to the `fit` measurements; its fidelity on `holdout`.
fn fit_proxy(
    mut proxy: LatencyProxy,
    fit: &[Measured],
    holdout: &[Measured],
) -> (LatencyProxy, Fidelity) {
    for m in fit {
        proxy.add_sample(Sample {
            cost: proxy.cost_of_keep(&m.keep),
            ms: m.ms,
        });
    }
    let held: Vec<Sample> = holdout
        .iter()
        .map(|m| Sample {
            cost: proxy.cost_of_keep(&m.keep),
            ms: m.ms,
        })
        .collect();
    let fidelity = proxy.fidelity(&held);
    (proxy, fidelity)
}

/// Site tables for `model` on this device: from the cache, or measured and cached.
fn site_tables(model: &dyn Family, recipe: &Recipe, env: &RunEnv<'_>) -> Result<SiteTables> {
    let options = TableOptions {
        grid_step: recipe.latency.table_grid_step,
        protocol: recipe.latency.table_protocol(),
        batch: recipe.latency.batch,
    };
    let workload = recipe.latency.workload();
    let (name, driver) = match env.device {
        Device::Cuda(i) => {
            let info = crate::cuda::device_info(i)?;
            (info.name, info.cuda_driver.to_string())
        }
        other => (device_name(other), "none".to_string()),
    };
    let sites = model.cost_sites(workload);
    let key = cache_key(&name, &driver, env.kind, &options, &sites, model.groups());
    let cache_dir = env.cache_dir(recipe);
    if let Some(tables) = load_cached(&cache_dir, &key) {
        tracing::info!(key, "site tables from cache");
        return Ok(tables);
    }
    let tables = measure_tables(
        &sites,
        model.groups(),
        options,
        (env.kind, env.device),
        key,
        env.observer,
    );
    store_cached(&cache_dir, &tables)?;
    Ok(tables)
}

/// Profiles `model` (or reloads `profile.json`): keep-all latency, random sub-architectures
/// measured against keep-all, site tables, the FLOP and table proxies fitted and judged on
/// held-out sub-architectures. Returns the record and the proxy that trains the gates.
pub fn profile_stage(
    model: &dyn Family,
    recipe: &Recipe,
    env: &RunEnv<'_>,
) -> Result<(Profile, LatencyProxy)> {
    let tables = site_tables(model, recipe, env)?;
    let proxies = Proxies {
        model,
        tables: &tables,
        recipe,
        device: env.device,
    };
    let profile_path = env.run_dir.profile();
    let profile: Profile = if profile_path.exists() {
        // A profile does not depend on the target: a sweep shares one among its targets.
        let stored: Profile = crate::io::json::read(&profile_path)?;
        let target_ms = recipe.target.ms(stored.keep_all.mean);
        let retargeted = target_ms != stored.target_ms;
        let profile = Profile {
            target_ms,
            ..stored
        };
        if retargeted && env.workers.is_leader() {
            crate::io::json::write(&profile_path, &profile)?;
        }
        profile
    } else {
        let profile = measure_profile(model, recipe, env, &proxies)?;
        crate::io::json::write(&profile_path, &profile)?;
        profile
    };
    let (proxy, _) = fit_proxy(
        proxies.build(profile.proxy_used),
        &profile.fit,
        &profile.holdout,
    );
    tracing::info!(
        keep_all_ms = profile.keep_all.mean,
        target_ms = profile.target_ms,
        table_mape = profile.fidelity_table.mape,
        table_spearman = profile.fidelity_table.spearman,
        flops_mape = profile.fidelity_flops.mape,
        flops_spearman = profile.fidelity_flops.spearman,
        "profiled"
    );
    Ok((profile, proxy))
}

/// Builds either proxy over one model's cost sites.
struct Proxies<'a> {
    model: &'a dyn Family,
    tables: &'a SiteTables,
    recipe: &'a Recipe,
    device: Device,
}

impl Proxies<'_> {
    fn build(&self, cost: ProxyCost) -> LatencyProxy {
        let sites = self.model.cost_sites(self.recipe.latency.workload());
        let groups = self.model.groups();
        match cost {
            ProxyCost::Flops => LatencyProxy::with_flop_cost(&sites, groups, self.device),
            ProxyCost::Table => LatencyProxy::new(
                &sites,
                groups,
                Box::new(TableCost::new(self.tables, self.device)),
                self.device,
            ),
        }
    }
}

/// Measures keep-all and the random sub-architectures, and judges both proxies on them.
fn measure_profile(
    model: &dyn Family,
    recipe: &Recipe,
    env: &RunEnv<'_>,
    proxies: &Proxies<'_>,
) -> Result<Profile> {
    let (protocol, workload) = (recipe.latency.protocol(), recipe.latency.workload());
    let observer = env.observer;
    let n_archs = recipe.latency.fit_archs + recipe.latency.holdout_archs;
    observer.begin("profile", n_archs as u64 + 1);
    let keep_all_model = inference_copy(model, &KeepSet::all(model.groups()), workload)?;
    let keep_all = measure_model(keep_all_model.as_ref(), workload, protocol)?;
    observer.advance(1, &format!("keep-all {:.2} ms", keep_all.mean));
    let mut fit = vec![Measured {
        keep: KeepSet::all(model.groups()),
        ms: keep_all.mean,
    }];
    for i in 0..n_archs {
        let keep = random_keep(model, recipe.gates.min_keep);
        let sub = inference_copy(model, &keep, workload)?;
        let ms = measure_against_keep_all(
            keep_all_model.as_ref(),
            sub.as_ref(),
            keep_all.mean,
            workload,
            protocol,
        )?
        .mean;
        fit.push(Measured { keep, ms });
        observer.advance(i as u64 + 2, &format!("sub-architecture {ms:.2} ms"));
    }
    observer.end();
    let holdout = fit.split_off(recipe.latency.fit_archs + 1);
    let (_, fidelity_flops) = fit_proxy(proxies.build(ProxyCost::Flops), &fit, &holdout);
    let (_, fidelity_table) = fit_proxy(proxies.build(ProxyCost::Table), &fit, &holdout);
    Ok(Profile {
        device: device_name(env.device),
        keep_all,
        target_ms: recipe.target.ms(keep_all.mean),
        fit,
        holdout,
        fidelity_flops,
        fidelity_table,
        proxy_used: recipe.latency.cost,
        tables_key: proxies.tables.key.clone(),
        table_measurements: proxies.tables.measurements,
    })
}

/// A random sub-architecture: an overall keep fraction drawn from [0.25, 1], each group keeping
/// that fraction ± 0.15 of its units (a sublayer: kept with that probability), the `follows`
/// rule applied. Drawing the overall size first spreads the whole-model latencies over the range
/// the gates and the export search explore; independent per-group fractions would average out
/// to nearly one size, and a proxy's ranking would be judged on noise.
fn random_keep(model: &dyn Family, min_keep: i64) -> KeepSet {
    let uniform = || Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]);
    let overall = 0.25 + 0.75 * uniform();
    let groups = model.groups();
    let flat: Vec<Vec<f32>> = groups.iter().map(|g| vec![0.0; g.len as usize]).collect();
    let keep = KeepSet(
        groups
            .iter()
            .map(|g| {
                let k = if g.kind == UnitKind::Sublayer {
                    g.len * i64::from(uniform() < overall)
                } else {
                    let fraction = (overall + 0.3 * (uniform() - 0.5)).clamp(0.25, 1.0);
                    ((g.len as f64 * fraction).round() as i64)
                        .clamp(floor_units(g, min_keep), g.len)
                };
                let mut kept = Vec::<i64>::try_from(
                    &Tensor::randperm(g.len, (Kind::Int64, Device::Cpu)).narrow(0, 0, k),
                )
                .expect("randperm gives i64");
                kept.sort_unstable();
                kept
            })
            .collect(),
    );
    enforce_follows(groups, &flat, keep)
}
