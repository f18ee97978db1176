//! Keep-sets + groups → physically smaller tensors, by `index_select` along each member's axis.
//! Never decides how many units to keep.

use crate::error::{Error, Result};
use crate::model::{element_indices, Group, KeepSet};
use std::collections::BTreeMap;
use tch::Tensor;

/// Returns `tensors` with every group member sliced to its kept units. Tensors that no group
/// touches are shared (shallow) with the input.
pub fn slice_tensors(
    groups: &[Group],
    tensors: &BTreeMap<String, Tensor>,
    keep: &KeepSet,
) -> Result<BTreeMap<String, Tensor>> {
    if keep.0.len() != groups.len() {
        return Err(Error::Invalid(format!(
            "keep-set has {} groups, the model has {}",
            keep.0.len(),
            groups.len()
        )));
    }
    let _guard = tch::no_grad_guard();
    let mut out: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    for (group, kept) in groups.iter().zip(&keep.0) {
        if let Some(&bad) = kept.iter().find(|&&i| i < 0 || i >= group.len) {
            return Err(Error::Invalid(format!(
                "group `{}`: unit {bad} out of range 0..{}",
                group.name, group.len
            )));
        }
        for member in &group.members {
            let t = out.get(&member.tensor).ok_or_else(|| {
                Error::Invalid(format!(
                    "group `{}` names tensor `{}`, which the model does not have",
                    group.name, member.tensor
                ))
            })?;
            let expected = group.len * member.block;
            if t.size().get(member.axis as usize) != Some(&expected) {
                return Err(Error::Invalid(format!(
                    "group `{}`: tensor `{}` has shape {:?}, expected {expected} along axis {}",
                    group.name,
                    member.tensor,
                    t.size(),
                    member.axis
                )));
            }
            let idx =
                Tensor::from_slice(&element_indices(kept, member.block)).to_device(t.device());
            let sliced = t
                .f_index_select(member.axis, &idx)
                .map_err(|e| Error::torch("index_select", &member.tensor, e))?;
            out.insert(member.tensor.clone(), sliced);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Member, UnitKind};

    #[test]
    fn slices_blocks_along_each_axis() {
        let group = Group {
            name: "g".into(),
            kind: UnitKind::Channels,
            len: 3,
            unit_width: 2,
            members: vec![
                Member {
                    tensor: "a".into(),
                    axis: 0,
                    block: 2,
                },
                Member {
                    tensor: "b".into(),
                    axis: 1,
                    block: 2,
                },
            ],
            follows: None,
        };
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a".to_string(),
            Tensor::arange(6, (tch::Kind::Float, tch::Device::Cpu)),
        );
        tensors.insert(
            "b".to_string(),
            Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([2, 6]),
        );
        let out = slice_tensors(&[group], &tensors, &KeepSet(vec![vec![0, 2]])).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&out["a"]).unwrap(),
            vec![0., 1., 4., 5.]
        );
        assert_eq!(
            Vec::<f32>::try_from(&out["b"].flatten(0, -1)).unwrap(),
            vec![0., 1., 4., 5., 6., 7., 10., 11.]
        );
    }
}
