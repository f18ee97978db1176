//! Strict safetensors read/write. `VarStore::load` silently ignores extra tensors and adopts the
//! file's dtype; loading through here checks names in both directions and every shape, naming the
//! file and tensor on any mismatch, then copies into the existing variables (keeping their dtype).

use crate::error::{Error, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};

/// Checkpoint keys that torchvision/HF files carry but that are not model state here.
pub const IGNORED_KEYS: &[&str] = &["num_batches_tracked", "rotary_emb.inv_freq"];

fn is_ignored(name: &str) -> bool {
    IGNORED_KEYS.iter().any(|k| name.ends_with(k))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file onto the CPU, keeping each file dtype.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::BadSafetensors {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::DtypeMismatch {
            file: path.to_path_buf(),
            tensor: name.clone(),
            found: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| Error::torch("from_data_size", &name, e))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes named tensors (any device; copied to CPU) as safetensors, atomically.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut host: Vec<(String, Tensor, Dtype)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| Error::DtypeMismatch {
            file: path.to_path_buf(),
            tensor: name.clone(),
            found: format!("{:?}", t.kind()),
        })?;
        host.push((
            name.clone(),
            t.to_device(tch::Device::Cpu).contiguous(),
            dtype,
        ));
    }
    let mut buffers: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::with_capacity(host.len());
    for (name, t, dtype) in &host {
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)
            .map_err(|e| Error::torch("copy_data", name, e))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), bytes, shape, *dtype));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(name, bytes, shape, dtype)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::BadSafetensors {
                    file: path.to_path_buf(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| Error::BadSafetensors {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    super::write_atomic(path, &bytes)
}

/// Copies `tensors` into the variables of `vs`: every variable must be present with its exact
/// shape, every tensor must be a variable (bar [`IGNORED_KEYS`]), and floats are cast to the
/// variable's dtype. `file` names the source in errors.
pub fn load_into(vs: &VarStore, tensors: &BTreeMap<String, Tensor>, file: &Path) -> Result<()> {
    let vars = vs.variables();
    for name in tensors.keys() {
        if !vars.contains_key(name) && !is_ignored(name) {
            return Err(Error::UnexpectedTensor {
                file: file.to_path_buf(),
                name: name.clone(),
            });
        }
    }
    for (name, var) in &vars {
        let src = tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: file.to_path_buf(),
            name: name.clone(),
        })?;
        copy_into_variable(var, name, src, file)?;
    }
    Ok(())
}

/// Copies `src` into the variable `var` named `name` (its exact shape, a float dtype, cast to
/// the variable's), the one-tensor check of [`load_into`]; `file` names the source in errors.
pub fn copy_into_variable(var: &Tensor, name: &str, src: &Tensor, file: &Path) -> Result<()> {
    if src.size() != var.size() {
        return Err(Error::ShapeMismatch {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            expected: var.size(),
            found: src.size(),
        });
    }
    if !src.is_floating_point() {
        return Err(Error::DtypeMismatch {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            found: format!("{:?}", src.kind()),
        });
    }
    let _guard = tch::no_grad_guard();
    let mut dst = var.shallow_clone();
    dst.f_copy_(src)
        .map_err(|e| Error::torch("copy_", name, e))?;
    Ok(())
}

/// Reads `file` and loads it into `vs` with the checks of [`load_into`].
pub fn load_file_into(vs: &VarStore, file: &Path) -> Result<()> {
    load_into(vs, &read(file)?, file)
}

/// All variables of a store by name, as CPU-side handles (shallow).
pub fn named_tensors(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}
