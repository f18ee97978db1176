//! The out-of-memory guard: a device running out of memory during a stage becomes an error that
//! names the stage's batch field and a smaller value, instead of libtorch's panic. CUDA and the
//! CPU allocator word it differently; both get the same guidance.

use crate::error::{Error, Result};
use crate::latency::measure::device_name;
use tch::Device;

/// Runs one stage, turning the device running out of memory into an error that names the
/// stage's batch field and suggests half of it. libtorch reports it as an error, which tch's
/// plain tensor methods raise as a panic: that panic is caught here, any other one goes on.
/// `(stage, field, batch)` describe the stage.
pub fn out_of_memory_as_error<T>(
    device: Device,
    (stage, field, batch): (&str, &str, i64),
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let advice = format!(
        "out of memory during {stage} at {field} = {batch}; try a smaller {field} (e.g. {})",
        (batch / 2).max(1)
    );
    allocation_failure_as_error(device, &advice, run)
}

/// Loads a model, turning the device running out of memory into an error naming the model:
/// a model too large for the device has no batch to lower.
pub fn model_out_of_memory_as_error<T>(
    device: Device,
    model: &std::path::Path,
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let advice = format!(
        "out of memory loading the model {}; it does not fit this device: use a smaller model (check its config's sizes), dtype = \"bf16\", or a device with more memory",
        model.display()
    );
    allocation_failure_as_error(device, &advice, run)
}

/// Runs `run`; an allocation failure, returned or raised as tch's panic, becomes
/// `Error::Device` with `advice` and libtorch's own sentence (how much was asked for, what the
/// allocator held). Any other panic goes on.
fn allocation_failure_as_error<T>(
    device: Device,
    advice: &str,
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let error = |message: &str| Error::Device {
        device: device_name(device),
        reason: format!(
            "{advice} ({})",
            message
                .lines()
                .find(|line| is_out_of_memory(line))
                .unwrap_or(message)
                .trim()
                .trim_start_matches("Torch(\"")
        ),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Err(e)) if is_out_of_memory(&e.to_string()) => Err(error(&e.to_string())),
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if is_out_of_memory(message) {
                Err(error(message))
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// Whether a libtorch message reports an allocation failure: CUDA's "out of memory", or the CPU
/// allocator's "can't allocate memory" / "not enough memory" (`DefaultCPUAllocator`).
pub fn is_out_of_memory(message: &str) -> bool {
    [
        "out of memory",
        "can't allocate memory",
        "not enough memory",
    ]
    .iter()
    .any(|wording| message.contains(wording))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_device_memory_names_the_batch_field_and_a_smaller_value() {
        let stage = ("gate training", "adapt.batch", 64);
        let err = out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
            panic!("Torch(\"CUDA out of memory. Tried to allocate 1002.00 MiB\")")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gate training") && err.contains("adapt.batch = 64") && err.contains("32"),
            "{err}"
        );
        // The same from a fallible op's error.
        let err = out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
            Err(Error::Invalid("CUDA out of memory".into()))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("adapt.batch"), "{err}");
        // Other panics are not swallowed.
        let other = std::panic::catch_unwind(|| {
            out_of_memory_as_error(Device::Cpu, stage, || -> Result<()> {
                panic!("index out of range")
            })
        });
        assert!(other.is_err());
        assert_eq!(
            out_of_memory_as_error(Device::Cpu, stage, || Ok(7)).unwrap(),
            7
        );
    }

    #[test]
    fn a_model_too_large_for_the_device_is_named_with_what_to_do() {
        let model = std::path::Path::new("models/huge");
        let err = model_out_of_memory_as_error(Device::Cpu, model, || -> Result<()> {
            panic!("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("loading the model models/huge")
                && err.contains("smaller model")
                && err.contains("68719476736 bytes"),
            "{err}"
        );
    }
}
