//! A slim ResNet for a keep-set: the sliced tensors in a model whose config records the kept
//! stem, stream and inner widths.

use super::Resnet;
use crate::error::{Error, Result};
use crate::export::slice::slice_tensors;
use crate::io::safetensors::{load_into, named_tensors};
use crate::model::KeepSet;
use std::path::Path;

impl Resnet {
    /// The slim model `keep` selects, in this model's dtype and device.
    pub(super) fn slim_model(&self, keep: &KeepSet) -> Result<Resnet> {
        let tensors = slice_tensors(&self.groups, &named_tensors(&self.vs), keep)?;
        let width_of = |g: Option<usize>, current: i64| match g {
            Some(g) => keep.0[g].len() as i64 * self.groups[g].unit_width,
            None => current,
        };
        let mut cfg = self.cfg.clone();
        cfg.stem_width = Some(width_of(self.gate_index.stem, self.stem_width));
        cfg.stream_widths = Some(
            self.stream_widths
                .iter()
                .enumerate()
                .map(|(s, &w)| width_of(self.gate_index.streams[s], w))
                .collect(),
        );
        cfg.inner_widths = Some(
            self.layers
                .iter()
                .flatten()
                .map(|b| {
                    b.inner_groups
                        .iter()
                        .map(|&g| keep.0[g].len() as i64 * self.groups[g].unit_width)
                        .collect()
                })
                .collect(),
        );
        if let Some(empty) = cfg
            .inner_widths
            .iter()
            .flatten()
            .flatten()
            .chain(cfg.stream_widths.iter().flatten())
            .find(|&&w| w == 0)
        {
            return Err(Error::Invalid(format!(
                "keep-set removes every unit of a site (width {empty}); min_keep must be ≥ 1"
            )));
        }
        let kind = self.vs.kind();
        let mut slim = Resnet::new(cfg, self.vs.device(), Path::new("<slim config>"))?;
        slim.vs.set_kind(kind);
        load_into(&slim.vs, &tensors, Path::new("<sliced tensors>"))?;
        Ok(slim)
    }
}
