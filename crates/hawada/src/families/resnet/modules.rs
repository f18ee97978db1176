//! ResNet's modules as plain structs whose fields are torchvision's names (`conv1`, `bn1`,
//! `downsample`, `fc`): bias-free convolutions, batch norms (foldable into the conv before them),
//! the Basic and Bottleneck blocks, and the channels-last layout cuDNN prefers.

use super::super::layers::Linear;
use super::config::BlockType;
use crate::model::{Masks, Phase};
use tch::{nn, Tensor};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
pub(super) const BN_TENSORS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// Convolution without bias (every torchvision ResNet conv).
#[derive(Debug)]
pub(super) struct Conv2d {
    pub(super) weight: Tensor,
    /// Only after batch-norm folding (torchvision's convs have none).
    pub(super) bias: Option<Tensor>,
    pub(super) stride: i64,
    pub(super) padding: i64,
}

impl Conv2d {
    pub(super) fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Self {
        let fan_out = (c_out * kernel * kernel) as f64;
        let weight = p.randn(
            "weight",
            &[c_out, c_in, kernel, kernel],
            0.0,
            (2.0 / fan_out).sqrt(),
        );
        Conv2d {
            weight,
            bias: None,
            stride,
            padding: kernel / 2,
        }
    }
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride],
            [self.padding],
            [1],
            1,
        )
    }
}

#[derive(Debug)]
pub(super) struct BatchNorm2d {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) running_mean: Tensor,
    pub(super) running_var: Tensor,
    /// Folded into the preceding convolution: the identity.
    pub(super) folded: bool,
}

impl BatchNorm2d {
    pub(super) fn new(p: nn::Path, c: i64) -> Self {
        BatchNorm2d {
            weight: p.ones("weight", &[c]),
            bias: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            folded: false,
        }
    }
    pub(super) fn forward(&self, x: &Tensor, phase: Phase) -> Tensor {
        if self.folded {
            return x.shallow_clone();
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            phase == Phase::Train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

/// The classifier `fc`, initialised as torchvision does: U(±1/√in) weight and bias.
pub(super) fn classifier(p: nn::Path, c_in: i64, c_out: i64) -> Linear {
    let bound = 1.0 / (c_in as f64).sqrt();
    Linear {
        weight: p.uniform("weight", &[c_out, c_in], -bound, bound),
        bias: Some(p.uniform("bias", &[c_out], -bound, bound)),
    }
}

/// `[n, c, h, w]` with NHWC strides: PyTorch's channels-last memory format, which cuDNN runs
/// natively on tensor cores.
pub(super) fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Folds eval-mode batch-norm into the convolution before it: `w·s`, bias `β − μ·s`,
/// `s = γ/√(σ² + ε)`. The new tensors are not the VarStore's, which keeps the checkpoint layout.
pub(super) fn fold(conv: &mut Conv2d, bn: &mut BatchNorm2d) {
    let _guard = tch::no_grad_guard();
    let scale = &bn.weight / (&bn.running_var + BN_EPS).sqrt();
    conv.weight = &conv.weight * scale.view([-1, 1, 1, 1]);
    conv.bias = Some(&bn.bias - &bn.running_mean * &scale);
    bn.folded = true;
}

/// BasicBlock (conv1, conv2) or Bottleneck (conv1 1×1, conv2 3×3 strided, conv3 1×1).
#[derive(Debug)]
pub(super) struct Block {
    pub(super) conv1: Conv2d,
    pub(super) bn1: BatchNorm2d,
    pub(super) conv2: Conv2d,
    pub(super) bn2: BatchNorm2d,
    pub(super) conv3: Option<(Conv2d, BatchNorm2d)>,
    pub(super) downsample: Option<(Conv2d, BatchNorm2d)>,
    /// Gate group of each inner width (conv1 out; and conv2 out for a Bottleneck).
    pub(super) inner_groups: Vec<usize>,
}

pub(super) fn mask(x: Tensor, masks: &Masks, group: Option<usize>) -> Tensor {
    match group.and_then(|g| masks.get(g)) {
        Some(m) => x * m.view([1, -1, 1, 1]),
        None => x,
    }
}

impl Block {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        masks: &Masks,
        phase: Phase,
        out_group: Option<usize>,
    ) -> Tensor {
        let mut h = self.bn1.forward(&self.conv1.forward(x), phase).relu_();
        h = mask(h, masks, Some(self.inner_groups[0]));
        h = self.bn2.forward(&self.conv2.forward(&h), phase);
        if let Some((conv3, bn3)) = &self.conv3 {
            h = mask(h.relu_(), masks, Some(self.inner_groups[1]));
            h = bn3.forward(&conv3.forward(&h), phase);
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => mask(bn.forward(&conv.forward(x), phase), masks, out_group),
            None => x.shallow_clone(),
        };
        let mut out = mask(h, masks, out_group);
        let _ = out.g_add_(&identity);
        out.relu_()
    }
}

/// The shape of one block: its input and output (stream) widths, inner widths, stride and
/// whether it opens with a downsample.
pub(super) struct BlockShape<'a> {
    pub in_width: i64,
    pub inner: &'a [i64],
    pub out_width: i64,
    pub stride: i64,
    pub downsample: bool,
}

impl Block {
    /// A block of `block_type` and `shape` under `p` (`layer{s}.{b}`), random weights; its
    /// inner widths are gated by `inner_groups`.
    pub(super) fn new(
        p: &nn::Path,
        block_type: BlockType,
        shape: BlockShape,
        inner_groups: Vec<usize>,
    ) -> Self {
        let BlockShape {
            in_width,
            inner: widths,
            out_width,
            stride,
            downsample,
        } = shape;
        let (conv1, conv2, conv3) = match block_type {
            BlockType::Basic => (
                Conv2d::new(p / "conv1", in_width, widths[0], 3, stride),
                Conv2d::new(p / "conv2", widths[0], out_width, 3, 1),
                None,
            ),
            BlockType::Bottleneck => (
                Conv2d::new(p / "conv1", in_width, widths[0], 1, 1),
                Conv2d::new(p / "conv2", widths[0], widths[1], 3, stride),
                Some((
                    Conv2d::new(p / "conv3", widths[1], out_width, 1, 1),
                    BatchNorm2d::new(p / "bn3", out_width),
                )),
            ),
        };
        let bn1 = BatchNorm2d::new(p / "bn1", widths[0]);
        let bn2 = BatchNorm2d::new(p / "bn2", conv2.weight.size()[0]);
        let downsample = downsample.then(|| {
            let dp = p / "downsample";
            (
                Conv2d::new(&dp / "0", in_width, out_width, 1, stride),
                BatchNorm2d::new(&dp / "1", out_width),
            )
        });
        Block {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            downsample,
            inner_groups,
        }
    }
}
