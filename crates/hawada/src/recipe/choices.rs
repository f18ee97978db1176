//! The recipe's choices among fixed values, each an enum resolved once when the recipe is read:
//! the latency target, the dtype and the device.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// The latency target (`[target]`): absolute, or a fraction of keep-all; exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TargetSection", into = "TargetSection")]
pub enum Target {
    /// Milliseconds on the device, for the recipe's workload.
    Ms(f64),
    /// A fraction in (0, 1] of the keep-all latency measured by the profile.
    Fraction(f64),
}

impl Target {
    /// The target in ms, given the keep-all latency.
    pub fn ms(self, keep_all_ms: f64) -> f64 {
        match self {
            Target::Ms(ms) => ms,
            Target::Fraction(fraction) => fraction * keep_all_ms,
        }
    }

    /// An absolute target, checked: a positive number of ms.
    pub fn ms_checked(ms: f64) -> std::result::Result<Target, String> {
        Target::try_from(TargetSection {
            ms: Some(ms),
            fraction: None,
        })
    }

    /// A relative target, checked: `fraction` in (0, 1].
    pub fn fraction(fraction: f64) -> std::result::Result<Target, String> {
        Target::try_from(TargetSection {
            ms: None,
            fraction: Some(fraction),
        })
    }

    /// Whether `slim_ms` meets the target: against its ms, or for a relative target its ratio
    /// to keep-all measured alongside against the fraction.
    pub fn is_met(self, slim_ms: f64, keep_all_ms: f64) -> bool {
        slim_ms <= self.ms(keep_all_ms)
    }
}

/// `[target]` as written: `ms = …` or `fraction = …`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fraction: Option<f64>,
}

impl TryFrom<TargetSection> for Target {
    type Error = String;
    fn try_from(section: TargetSection) -> std::result::Result<Self, String> {
        match (section.ms, section.fraction) {
            (Some(ms), None) if ms > 0.0 && ms.is_finite() => Ok(Target::Ms(ms)),
            (Some(ms), None) => Err(format!("target.ms must be a positive number, found {ms}")),
            (None, Some(f)) if f > 0.0 && f <= 1.0 => Ok(Target::Fraction(f)),
            (None, Some(f)) => Err(format!(
                "target.fraction must be in (0, 1] of keep-all latency, found {f}"
            )),
            _ => Err("give exactly one of `target.ms` or `target.fraction`".into()),
        }
    }
}

impl From<Target> for TargetSection {
    fn from(target: Target) -> Self {
        match target {
            Target::Ms(ms) => TargetSection {
                ms: Some(ms),
                fraction: None,
            },
            Target::Fraction(f) => TargetSection {
                ms: None,
                fraction: Some(f),
            },
        }
    }
}

/// The weights' dtype (`dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
        }
    }
    /// The name recipes and summaries spell it with.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
    /// A dtype name (`f32`, `bf16`, `f16`), as the CLI's `--dtype` gives it.
    pub fn parse(name: &str) -> Option<Dtype> {
        [Dtype::F32, Dtype::Bf16, Dtype::F16]
            .into_iter()
            .find(|d| d.name() == name)
    }
}

/// The device a recipe asks for (`device`); [`DeviceChoice::resolve`] checks it exists here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        match name.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{other}`; expected auto, cpu, cuda or cuda:N")
                }),
        }
    }
}

impl From<DeviceChoice> for String {
    fn from(choice: DeviceChoice) -> String {
        match choice {
            DeviceChoice::Auto => "auto".into(),
            DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

impl DeviceChoice {
    /// The device, resolved: `auto` picks CUDA when present. Asking for CUDA without one is an
    /// error.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(index) => {
                let visible = tch::Cuda::device_count();
                if tch::Cuda::is_available() && (index as i64) < visible {
                    Ok(Device::Cuda(index))
                } else {
                    Err(Error::Device { device: String::from(self), reason: format!("CUDA device {index} requested but libtorch sees {visible} CUDA device(s); use device = \"cpu\" or run on the GPU machine") })
                }
            }
        }
    }
}
