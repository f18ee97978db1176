//! Adam (Kingma & Ba 2015) over a VarStore's trainable variables, with its state (moments and
//! step count) saved beside each checkpoint: a run resumed after a crash continues with the same
//! moments, so it takes the same steps an uninterrupted run would (tch's `nn::Adam` keeps its
//! state inside libtorch, out of reach of a checkpoint). Defaults as PyTorch's: β = (0.9, 0.999),
//! ε = 1e-8, no weight decay.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

pub struct Adam {
    lr: f64,
    /// Steps taken (for the bias corrections).
    steps: i64,
    /// Trainable variables by name, with their first and second moments.
    params: BTreeMap<String, (Tensor, Tensor, Tensor)>,
}

impl Adam {
    /// Adam over the variables of `vs` that require gradients.
    pub fn new(vs: &VarStore, lr: f64) -> Self {
        let params = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| {
                let (m, v) = (t.zeros_like(), t.zeros_like());
                (name, (t, m, v))
            })
            .collect();
        Adam {
            lr,
            steps: 0,
            params,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    pub fn zero_grad(&mut self) {
        for (param, _, _) in self.params.values_mut() {
            let mut grad = param.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// One update from the gradients in the variables.
    pub fn step(&mut self) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let correction1 = 1.0 - BETA1.powi(self.steps as i32);
        let correction2 = 1.0 - BETA2.powi(self.steps as i32);
        for (param, m, v) in self.params.values_mut() {
            let grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let _ = m.g_mul_scalar_(BETA1).g_add_(&(&grad * (1.0 - BETA1)));
            let _ = v
                .g_mul_scalar_(BETA2)
                .g_add_(&(grad.square() * (1.0 - BETA2)));
            let denominator = (&*v / correction2).sqrt() + EPS;
            let update = &*m / &denominator * (self.lr / correction1);
            let _ = param.g_sub_(&update);
        }
    }

    /// Writes the moments and the step count to `file` (safetensors, atomically).
    pub fn save(&self, file: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (name, (_, m, v)) in &self.params {
            tensors.insert(format!("{name}.exp_avg"), m.shallow_clone());
            tensors.insert(format!("{name}.exp_avg_sq"), v.shallow_clone());
        }
        tensors.insert("steps".into(), Tensor::from(self.steps));
        crate::io::safetensors::write(file, &tensors)
    }

    /// Reads what [`Adam::save`] wrote, checking every moment's name and shape.
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let tensors = crate::io::safetensors::read(file)?;
        let get = |name: &str| {
            tensors.get(name).ok_or_else(|| Error::MissingTensor {
                file: file.to_path_buf(),
                name: name.to_string(),
            })
        };
        self.steps = get("steps")?.int64_value(&[]);
        let _guard = tch::no_grad_guard();
        for (name, (param, m, v)) in self.params.iter_mut() {
            for (suffix, moment) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let key = format!("{name}.{suffix}");
                let saved = get(&key)?;
                if saved.size() != param.size() {
                    return Err(Error::ShapeMismatch {
                        file: file.to_path_buf(),
                        tensor: key,
                        expected: param.size(),
                        found: saved.size(),
                    });
                }
                moment.copy_(&saved.to_kind(moment.kind()));
            }
        }
        Ok(())
    }
}

/// Removes moments that [`Adam::save`] wrote, once their stage is complete: they only serve to
/// continue it, and for a whole model they weigh twice its weights (2 GB of a 135 M-parameter
/// run's 4 GB). A missing file is fine.
pub fn remove_saved_moments(file: &Path) -> Result<()> {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(file, e)),
        _ => Ok(()),
    }
}

/// Seeds the global generator for one step of a stage from the run's seed, so that a step draws
/// the same batch and gate noise whether the run got there uninterrupted or resumed.
pub fn seed_step(seed: u64, stage: &str, step: i64) {
    // FNV-1a over the stage name, mixed with the step: distinct streams per stage and step.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in stage.bytes().chain(step.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    tch::manual_seed((h >> 1) as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, nn::OptimizerConfig, Device, Kind};

    #[test]
    fn matches_libtorch_adam_and_resumes_from_its_saved_state() {
        // The same quadratic, minimised by libtorch's Adam and by this one.
        let run = |ours: bool, steps: i64, state: Option<&Path>, save: Option<&Path>| {
            let vs = VarStore::new(Device::Cpu);
            let w = vs
                .root()
                .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.0]));
            let target = Tensor::from_slice(&[0.5f32, 0.5, 0.5]);
            let mut theirs = nn::Adam::default().build(&vs, 0.1).unwrap();
            let mut adam = Adam::new(&vs, 0.1);
            if let Some(file) = state {
                let saved = crate::io::safetensors::read(&file.with_extension("w")).unwrap();
                tch::no_grad(|| w.shallow_clone().copy_(&saved["w"]));
                adam.load(file).unwrap();
            }
            for _ in 0..steps {
                let loss = (&w - &target).square().sum(Kind::Float);
                if ours {
                    adam.zero_grad();
                    loss.backward();
                    adam.step();
                } else {
                    theirs.zero_grad();
                    loss.backward();
                    theirs.step();
                }
            }
            if let Some(file) = save {
                adam.save(file).unwrap();
                let mut map = BTreeMap::new();
                map.insert("w".to_string(), w.detach().copy());
                crate::io::safetensors::write(&file.with_extension("w"), &map).unwrap();
            }
            Vec::<f32>::try_from(&w.detach()).unwrap()
        };
        let reference = run(false, 10, None, None);
        let ours = run(true, 10, None, None);
        for (a, b) in reference.iter().zip(&ours) {
            assert!((a - b).abs() < 1e-6, "{reference:?} vs {ours:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adam.safetensors");
        run(true, 4, None, Some(&file));
        let resumed = run(true, 6, Some(&file), None);
        assert_eq!(resumed, ours, "4 + 6 resumed steps equal 10 straight ones");
    }

    #[test]
    fn step_seeds_repeat_and_differ_per_stage_and_step() {
        let draw = |stage: &str, step: i64| {
            seed_step(7, stage, step);
            Tensor::rand([1], (Kind::Float, tch::Device::Cpu)).double_value(&[0])
        };
        assert_eq!(draw("adapt", 3), draw("adapt", 3));
        assert_ne!(draw("adapt", 3), draw("adapt", 4));
        assert_ne!(draw("adapt", 3), draw("finetune", 3));
    }
}
