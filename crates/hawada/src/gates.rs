//! Gates (DESIGN §3): one logit per unit of every group, in a VarStore of their own.
//! Training masks are sampled (hard-concrete L0, Louizos et al. 2018, or straight-through
//! logistic noise); eval masks are hard (`logit > 0`); the expected keep probability
//! `p = sigmoid(logit / τ)` feeds the latency proxy. `min_keep` and the `follows` rule (a query head
//! needs its KV group) are enforced here and only here. Gates never know which tensor they scale.

use crate::error::{Error, Result};
use crate::model::{Group, KeepSet, Masks, UnitKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

/// How training masks are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateSampling {
    /// Hard-concrete (L0) relaxation: stretched, clamped concrete sample.
    HardConcrete,
    /// Straight-through: hard 0/1 forward, logistic-sigmoid gradient backward.
    StraightThrough,
}

/// Which masks a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Stochastic masks for training.
    Sample,
    /// Hard 0/1 masks from `logit > 0` (plus `min_keep`, `follows`).
    Hard,
}

/// Gate options, from the recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateOptions {
    #[serde(default = "default_init_logit")]
    pub init_logit: f64,
    #[serde(default = "default_sampling")]
    pub sampling: GateSampling,
    /// Temperature τ of `p = sigmoid(l / τ)` and of the samplers.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Fewest units kept per group.
    #[serde(default = "default_min_keep")]
    pub min_keep: i64,
}

fn default_init_logit() -> f64 {
    3.0
}
fn default_sampling() -> GateSampling {
    GateSampling::HardConcrete
}
fn default_temperature() -> f64 {
    2.0 / 3.0
}
fn default_min_keep() -> i64 {
    1
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            init_logit: default_init_logit(),
            sampling: default_sampling(),
            temperature: default_temperature(),
            min_keep: default_min_keep(),
        }
    }
}

// Hard-concrete stretch interval (γ, ζ) of Louizos et al.
const HC_GAMMA: f64 = -0.1;
const HC_ZETA: f64 = 1.1;

/// The description saved beside the gate logits (`gates.json`): enough to replay an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatesDescription {
    pub options: GateOptions,
    pub groups: Vec<Group>,
}

/// The gate logits of a model: one f32 variable `[Σ len]` holding every group's logits in order,
/// so that sampling, the keep probability and the optimizer step each run as a handful of
/// kernels whatever the number of groups.
pub struct Gates {
    vs: VarStore,
    flat: Tensor,
    /// Per-group views of `flat`.
    logits: Vec<Tensor>,
    /// `[Σ len]` i64: each unit's `unit_width`, to expand unit masks to channels in one op.
    unit_widths: Tensor,
    groups: Vec<Group>,
    options: GateOptions,
}

/// The first gate group where `saved` and `model` differ, said for a person; `None` if they
/// are the same.
fn first_difference(saved: &[Group], model: &[Group]) -> Option<String> {
    for (i, (s, m)) in saved.iter().zip(model).enumerate() {
        if s != m {
            return Some(if s.name != m.name {
                format!(
                    "group {i} is `{}` in the gates file and `{}` in the model",
                    s.name, m.name
                )
            } else {
                format!(
                    "group `{}` differs ({} units of {:?} × {} in the gates file, {} units of {:?} × {} in the model)",
                    s.name, s.len, s.kind, s.unit_width, m.len, m.kind, m.unit_width
                )
            });
        }
    }
    (saved.len() != model.len()).then(|| {
        format!(
            "the gates file has {} groups, the model {}",
            saved.len(),
            model.len()
        )
    })
}

/// The gate logits saved in `dir`, one tensor per group.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join("gates.safetensors")
}

/// The description of the gates saved in `dir` (options, groups: sites, kinds, lengths).
pub fn description_path(dir: &Path) -> PathBuf {
    dir.join("gates.json")
}

impl Gates {
    /// One logit per unit, initialised to `options.init_logit`, on `device` in f32.
    pub fn new(groups: &[Group], options: GateOptions, device: Device) -> Result<Self> {
        if options.temperature <= 0.0 {
            return Err(Error::Invalid(format!(
                "gates.temperature must be > 0, found {}",
                options.temperature
            )));
        }
        if options.min_keep < 1 {
            return Err(Error::Invalid(format!(
                "gates.min_keep must be ≥ 1, found {}",
                options.min_keep
            )));
        }
        let vs = VarStore::new(device);
        let total: i64 = groups.iter().map(|g| g.len).sum();
        let flat = vs
            .root()
            .var("logits", &[total], nn::Init::Const(options.init_logit));
        let logits = split(groups, &flat);
        let widths: Vec<i64> = groups
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.unit_width, g.len as usize))
            .collect();
        let unit_widths = Tensor::from_slice(&widths).to_device(device);
        Ok(Gates {
            vs,
            flat,
            logits,
            unit_widths,
            groups: groups.to_vec(),
            options,
        })
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }
    pub fn options(&self) -> &GateOptions {
        &self.options
    }
    /// Logits per group, `[len]` f32 (views of one variable).
    pub fn logits(&self) -> &[Tensor] {
        &self.logits
    }

    /// Expected keep probability per unit, `[len]` f32 per group, differentiable in the logits.
    pub fn expected_keep(&self) -> Vec<Tensor> {
        self.apply_follows(split(
            &self.groups,
            &(&self.flat / self.options.temperature).sigmoid(),
        ))
    }

    /// Multiplies each follower's values by its parent's (expanded), so a unit whose parent is
    /// gone is gone too.
    fn apply_follows(&self, mut values: Vec<Tensor>) -> Vec<Tensor> {
        for (i, g) in self.groups.iter().enumerate() {
            if let Some(parent) = g.follows {
                let ratio = g.len / self.groups[parent].len;
                let expanded = values[parent].repeat_interleave_self_int(ratio, 0, None);
                values[i] = &values[i] * expanded;
            }
        }
        values
    }

    /// Channel masks for a forward in the model's `kind`.
    pub fn masks(&self, mode: GateMode, kind: Kind) -> Masks {
        match mode {
            GateMode::Sample => {
                let sampled = self.sample(&self.flat);
                let units = if self.groups.iter().any(|g| g.follows.is_some()) {
                    Tensor::cat(&self.apply_follows(split(&self.groups, &sampled)), 0)
                } else {
                    sampled
                };
                Masks::from_units(&self.groups, &units.to_kind(kind), &self.unit_widths)
            }
            GateMode::Hard => {
                Masks::from_keep(&self.groups, &self.keep_set(), (kind, self.vs.device()))
            }
        }
    }

    fn sample(&self, logit: &Tensor) -> Tensor {
        let tau = self.options.temperature;
        let u = logit.rand_like().clamp(1e-6, 1.0 - 1e-6);
        let noise = u.log() - (-&u + 1.0).log();
        match self.options.sampling {
            GateSampling::HardConcrete => {
                let s = ((noise + logit) / tau).sigmoid();
                (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
            }
            GateSampling::StraightThrough => {
                let soft = ((noise + logit) / tau).sigmoid();
                let hard = soft.gt(0.5).to_kind(Kind::Float);
                &soft + (hard - soft.detach())
            }
        }
    }

    /// Kept unit indices per group: `logit > 0`, at least `min_keep` (top logits), and the
    /// `follows` rule in both directions.
    pub fn keep_set(&self) -> KeepSet {
        let _guard = tch::no_grad_guard();
        let logits = self.host_logits();
        keep_from_logits(&self.groups, &logits, self.options.min_keep)
    }

    /// Logits per group on the host (a device sync).
    pub fn host_logits(&self) -> Vec<Vec<f32>> {
        let host = self.flat.detach().to_device(Device::Cpu);
        split(&self.groups, &host)
            .iter()
            .map(|l| Vec::<f32>::try_from(l).expect("gate logits are a 1-D f32 tensor"))
            .collect()
    }

    /// Writes `gates.safetensors` and `gates.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: BTreeMap<String, Tensor> = self
            .groups
            .iter()
            .zip(&self.logits)
            .map(|(g, l)| (g.name.clone(), l.detach()))
            .collect();
        crate::io::safetensors::write(&weights_path(dir), &tensors)?;
        let desc = GatesDescription {
            options: self.options.clone(),
            groups: self.groups.clone(),
        };
        crate::io::json::write(&description_path(dir), &desc)
    }

    /// Loads logits saved by [`Gates::save`]; the groups must match the model's exactly.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let json = description_path(dir);
        let desc: GatesDescription =
            crate::io::json::parse(&json, crate::io::json::read_value(&json)?)?;
        if let Some(reason) = first_difference(&desc.groups, &self.groups) {
            return Err(Error::config(
                &json,
                "groups",
                format!("these gates do not match this model: {reason} (gates of another model or config?)"),
            ));
        }
        let file = weights_path(dir);
        let tensors = crate::io::safetensors::read(&file)?;
        let _guard = tch::no_grad_guard();
        for (g, l) in self.groups.iter().zip(&self.logits) {
            let src = tensors.get(&g.name).ok_or_else(|| Error::MissingTensor {
                file: file.clone(),
                name: g.name.clone(),
            })?;
            if src.size() != l.size() {
                return Err(Error::ShapeMismatch {
                    file: file.clone(),
                    tensor: g.name.clone(),
                    expected: l.size(),
                    found: src.size(),
                });
            }
            l.shallow_clone().copy_(src);
        }
        Ok(())
    }
}

/// Per-group views `[len]` of a `[Σ len]` tensor.
fn split(groups: &[Group], flat: &Tensor) -> Vec<Tensor> {
    let mut offset = 0;
    groups
        .iter()
        .map(|g| {
            let view = flat.narrow(0, offset, g.len);
            offset += g.len;
            view
        })
        .collect()
}

/// The fewest units a group may keep: `min_keep` (at most its length), except a sublayer gate,
/// whose point is that the whole sublayer may go.
pub fn floor_units(group: &Group, min_keep: i64) -> i64 {
    match group.kind {
        UnitKind::Sublayer => 0,
        _ => min_keep.min(group.len),
    }
}

/// The keep rule on host values (see [`Gates::keep_set`]); separate so it is testable without
/// tensors.
pub fn keep_from_logits(groups: &[Group], logits: &[Vec<f32>], min_keep: i64) -> KeepSet {
    let keep = KeepSet(
        groups
            .iter()
            .zip(logits)
            .map(|(g, values)| {
                let mut kept: Vec<i64> = (0..values.len())
                    .filter(|&i| values[i] > 0.0)
                    .map(|i| i as i64)
                    .collect();
                let floor = floor_units(g, min_keep) as usize;
                if kept.len() < floor {
                    kept = top_units(values, floor, |_| true);
                }
                kept
            })
            .collect(),
    );
    enforce_follows(groups, logits, keep)
}

/// The `count` highest-logit units among those `allowed`, ascending (ties: lower index first).
pub fn top_units(logits: &[f32], count: usize, allowed: impl Fn(usize) -> bool) -> Vec<i64> {
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| allowed(i)).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = order.into_iter().take(count).map(|i| i as i64).collect();
    kept.sort_unstable();
    kept
}

/// Makes a keep-set obey every `follows` link, as grouped-query attention needs: a follower unit
/// goes when its parent unit goes; a parent unit none of whose followers survive goes too; and
/// every kept parent keeps the same number of followers (the mean, rounded, at least one), the
/// top ones by logit with units already kept first, so the slim model is stock GQA (a fixed
/// number of query heads per KV head).
pub fn enforce_follows(groups: &[Group], logits: &[Vec<f32>], mut keep: KeepSet) -> KeepSet {
    for (i, g) in groups.iter().enumerate() {
        let Some(parent) = g.follows else { continue };
        let ratio = (g.len / groups[parent].len).max(1);
        let parent_of = |u: i64| u / ratio;
        let followers: Vec<i64> = keep.0[i]
            .iter()
            .copied()
            .filter(|&u| keep.0[parent].contains(&parent_of(u)))
            .collect();
        let mut parents: Vec<i64> = keep.0[parent]
            .iter()
            .copied()
            .filter(|&p| followers.iter().any(|&u| parent_of(u) == p))
            .collect();
        if parents.is_empty() {
            // No kept parent has a kept follower: keep the best follower of a kept parent (of
            // any parent, if none is kept), and its parent.
            let open = &keep.0[parent];
            let best = top_units(&logits[i], 1, |u| {
                open.is_empty() || open.contains(&parent_of(u as i64))
            });
            parents = best.iter().map(|&u| parent_of(u)).collect();
        }
        let per_parent = ((followers.len() as f64 / parents.len() as f64).round() as i64)
            .clamp(1, ratio) as usize;
        // Already-kept units rank above the rest; logits order within each class.
        let rank: Vec<f32> = (0..g.len)
            .map(|u| logits[i][u as usize] + if followers.contains(&u) { 1e6 } else { 0.0 })
            .collect();
        let mut kept = Vec::new();
        for &p in &parents {
            kept.extend(top_units(&rank, per_parent, |u| parent_of(u as i64) == p));
        }
        kept.sort_unstable();
        keep.0[i] = kept;
        keep.0[parent] = parents;
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, len: i64, follows: Option<usize>) -> Group {
        Group {
            name: name.into(),
            kind: UnitKind::Heads,
            len,
            unit_width: 1,
            members: vec![],
            follows,
        }
    }

    #[test]
    fn hard_keep_respects_min_keep_with_top_logits() {
        let groups = [group("a", 4, None)];
        let keep = keep_from_logits(&groups, &[vec![-3.0, -1.0, -2.0, -0.5]], 2);
        assert_eq!(keep.0[0], vec![1, 3]);
    }

    #[test]
    fn kept_parents_keep_equal_numbers_of_followers() {
        // 2 KV groups × 3 query heads; the trained set keeps 3 heads of KV 0 and 1 of KV 1.
        let groups = [group("kv", 2, None), group("q", 6, Some(0))];
        let logits = [vec![1.0, 1.0], vec![1.0, 2.0, 0.5, -1.0, 3.0, -2.0]];
        let keep = keep_from_logits(&groups, &logits, 1);
        // Mean 2 per KV group: KV 0 keeps its best two (0, 1); KV 1 keeps head 4 and its next
        // best (3).
        assert_eq!(keep.0[1], vec![0, 1, 3, 4]);
        assert_eq!(keep.0[0], vec![0, 1]);
    }

    #[test]
    fn follower_needs_parent_and_parent_needs_a_follower() {
        // 2 KV groups, 4 query heads (2 per group).
        let groups = [group("kv", 2, None), group("q", 4, Some(0))];
        // KV 0 closed → heads 0,1 go even with open logits; KV 1 open but its heads closed → goes.
        let keep = keep_from_logits(&groups, &[vec![-1.0, 1.0], vec![1.0, 1.0, -1.0, -1.0]], 1);
        // min_keep keeps the best allowed head of KV 1 (heads 2,3 tie: the first).
        assert_eq!(keep.0[1], vec![2]);
        assert_eq!(keep.0[0], vec![1]);
    }

    #[test]
    fn expected_keep_has_gradient_and_init_value() {
        let gates = Gates::new(
            &[group("layer1.a", 3, None)],
            GateOptions::default(),
            Device::Cpu,
        )
        .unwrap();
        let p = &gates.expected_keep()[0];
        let expected = 1.0 / (1.0 + (-3.0f64 / (2.0 / 3.0)).exp());
        assert!((p.double_value(&[0]) - expected).abs() < 1e-6);
        p.sum(Kind::Float).backward();
        assert!(
            gates.var_store().trainable_variables()[0]
                .grad()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
    }

    #[test]
    fn save_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let gates = Gates::new(
            &[group("layer1.a", 3, None)],
            GateOptions::default(),
            Device::Cpu,
        )
        .unwrap();
        tch::no_grad(|| {
            gates.logits()[0]
                .shallow_clone()
                .copy_(&Tensor::from_slice(&[1.0f32, -2.0, 0.5]))
        });
        gates.save(dir.path()).unwrap();
        let mut other = Gates::new(
            &[group("layer1.a", 3, None)],
            GateOptions::default(),
            Device::Cpu,
        )
        .unwrap();
        other.load(dir.path()).unwrap();
        assert_eq!(other.keep_set(), KeepSet(vec![vec![0, 2]]));
    }
}
