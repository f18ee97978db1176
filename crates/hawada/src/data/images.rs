//! Image datasets as tensors already on the device: IDX files (MNIST / Fashion-MNIST, gzipped)
//! with class labels, judged by top-1 accuracy; and folders of PNG photos without labels, on
//! which a model can only be compared with its teacher.

use super::{Examples, Metric};
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Images `[n, c, h, w]` normalised (IDX: to zero mean / unit std over the dataset; photos: with
/// ImageNet's channel statistics), and labels `[n]` (i64; all 0 for photos), on a device.
pub struct ImageDataset {
    pub images: Tensor,
    pub labels: Tensor,
    pub num_classes: i64,
    /// Applied to every batch: resize to this square size (bilinear) and repeat grey to this
    /// many channels, e.g. Fashion-MNIST as 3×224×224 for ImageNet-shaped models.
    pub batch_shape: Option<BatchShape>,
}

/// Spatial size and channel count batches are brought to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub image_size: i64,
    pub channels: i64,
}

// Fashion-MNIST's training-set pixel mean and std (of x/255).
const PIXEL_MEAN: f64 = 0.2860;
const PIXEL_STD: f64 = 0.3530;
// ImageNet's RGB channel means and stds (of x/255), which ImageNet-trained backbones expect.
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// One PNG as RGB `[3, h, w]` in [0, 1] (grey repeated, alpha dropped, 16-bit reduced to 8).
fn read_png(path: &Path) -> Result<Tensor> {
    let bad = |reason: String| Error::Data {
        file: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let mut pixels = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut pixels)
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(bad("palette left unexpanded".into())),
    };
    let (h, w) = (frame.height as i64, frame.width as i64);
    let hwc = Tensor::from_slice(&pixels[..frame.buffer_size()]).view([h, w, channels]);
    let rgb = match channels {
        1 | 2 => hwc.narrow(2, 0, 1).expand([h, w, 3], false),
        _ => hwc.narrow(2, 0, 3),
    };
    Ok(rgb.permute([2, 0, 1]).to_kind(Kind::Float) / 255.0)
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Data {
            file: path.to_path_buf(),
            reason: format!("not a readable gzip file: {e}"),
        })?;
    Ok(bytes)
}

/// Parses an IDX file: magic `0x0000_08_NN` (u8 data, NN dims), big-endian dims, then data.
pub fn parse_idx(bytes: &[u8], file: &Path) -> Result<(Vec<i64>, Vec<u8>)> {
    let bad = |reason: String| Error::Data {
        file: file.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad(
            "not an IDX file of unsigned bytes (magic 0x000008NN expected)".into(),
        ));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad(format!("truncated header: {ndims} dims announced")));
    }
    let dims: Vec<i64> = (0..ndims)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as i64
        })
        .collect();
    let count: i64 = dims.iter().product();
    if (bytes.len() - header) as i64 != count {
        return Err(bad(format!(
            "dims {dims:?} need {count} bytes of data, found {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

impl ImageDataset {
    /// Loads `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` from `dir`.
    pub fn load_idx(dir: &Path, prefix: &str, device: Device) -> Result<Self> {
        let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        let (idims, pixels) = parse_idx(&read_gz(&images_path)?, &images_path)?;
        let (ldims, labels) = parse_idx(&read_gz(&labels_path)?, &labels_path)?;
        if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
            return Err(Error::Data {
                file: images_path,
                reason: format!(
                    "expected images [n, h, w] and labels [n], found {idims:?} and {ldims:?}"
                ),
            });
        }
        if idims[0] == 0 {
            return Err(Error::Data {
                file: images_path,
                reason: "dataset is empty".into(),
            });
        }
        let images = Tensor::from_slice(&pixels)
            .view([idims[0], 1, idims[1], idims[2]])
            .to_kind(Kind::Float)
            / 255.0;
        let images = ((images - PIXEL_MEAN) / PIXEL_STD).to_device(device);
        let labels = Tensor::from_slice(&labels)
            .to_kind(Kind::Int64)
            .to_device(device);
        let num_classes = labels.max().int64_value(&[]) + 1;
        Ok(ImageDataset {
            images,
            labels,
            num_classes,
            batch_shape: None,
        })
    }

    /// Every `*.png` in `dir` (name order) as RGB: the shorter side resized to `image_size`
    /// (bilinear, antialiased), centre-cropped square, ImageNet-normalised. No labels.
    pub fn load_png_folder(dir: &Path, image_size: i64, device: Device) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Data {
                file: dir.to_path_buf(),
                reason: "holds no .png images (for scikit-image's sample photos run `scripts/fetch-assets.sh skimage-photos`)".into(),
            });
        }
        let mean = Tensor::from_slice(&IMAGENET_MEAN).view([3, 1, 1]);
        let std = Tensor::from_slice(&IMAGENET_STD).view([3, 1, 1]);
        let images = files
            .iter()
            .map(|file| {
                let image = read_png(file)?;
                let (h, w) = (image.size()[1], image.size()[2]);
                let scale = image_size as f64 / h.min(w) as f64;
                let (rh, rw) = (
                    ((h as f64 * scale).round() as i64).max(image_size),
                    ((w as f64 * scale).round() as i64).max(image_size),
                );
                let resized = image
                    .unsqueeze(0)
                    .internal_upsample_bilinear2d_aa([rh, rw], false, None, None)
                    .narrow(2, (rh - image_size) / 2, image_size)
                    .narrow(3, (rw - image_size) / 2, image_size);
                Ok(((resized - &mean) / &std).to_kind(Kind::Float))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let n = images.len() as i64;
        Ok(ImageDataset {
            images: Tensor::cat(&images, 0).to_device(device),
            labels: Tensor::zeros([n], (Kind::Int64, device)),
            num_classes: 0,
            batch_shape: None,
        })
    }

    /// The first `n` examples (a view).
    pub fn take(&self, n: i64) -> ImageDataset {
        self.slice(0, n)
    }

    /// Examples `[start, start + n)` (a view).
    pub fn slice(&self, start: i64, n: i64) -> ImageDataset {
        let n = n.min(self.len() - start).max(0);
        ImageDataset {
            images: self.images.narrow(0, start, n),
            labels: self.labels.narrow(0, start, n),
            num_classes: self.num_classes,
            batch_shape: self.batch_shape,
        }
    }

    fn shape_batch(&self, x: Tensor, kind: Kind) -> Tensor {
        let x = match self.batch_shape {
            Some(BatchShape {
                image_size,
                channels,
            }) => {
                let sized = if x.size()[2] == image_size {
                    x
                } else {
                    x.upsample_bilinear2d([image_size, image_size], false, None, None)
                };
                sized.expand([-1, channels, -1, -1], false).contiguous()
            }
            None => x,
        };
        x.to_kind(kind)
    }
}

impl Examples for ImageDataset {
    fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    fn random_batch(&self, batch: i64, kind: Kind) -> (Tensor, Tensor) {
        let idx = Tensor::randint(self.len(), [batch], (Kind::Int64, self.images.device()));
        (
            self.shape_batch(self.images.index_select(0, &idx), kind),
            self.labels.index_select(0, &idx),
        )
    }

    fn batches(&self, batch: i64, kind: Kind) -> Box<dyn Iterator<Item = (Tensor, Tensor)> + '_> {
        let n = self.len();
        Box::new((0..n).step_by(batch.max(1) as usize).map(move |start| {
            let len = batch.min(n - start);
            (
                self.shape_batch(self.images.narrow(0, start, len), kind),
                self.labels.narrow(0, start, len),
            )
        }))
    }

    fn metric(&self) -> Metric {
        Metric::Top1Accuracy
    }

    fn classes(&self) -> Option<i64> {
        Some(self.num_classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_grey_and_an_rgba_png_as_normalised_rgb_squares() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, color: png::ColorType, pixels: &[u8], w: u32, h: u32| {
            let file = std::fs::File::create(dir.path().join(name)).unwrap();
            let mut encoder = png::Encoder::new(file, w, h);
            encoder.set_color(color);
            encoder.set_depth(png::BitDepth::Eight);
            encoder
                .write_header()
                .unwrap()
                .write_image_data(pixels)
                .unwrap();
        };
        write("a.png", png::ColorType::Grayscale, &[255; 6 * 4], 6, 4);
        write("b.png", png::ColorType::Rgba, &[0; 4 * 4 * 4], 4, 4);
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let data = ImageDataset::load_png_folder(dir.path(), 4, Device::Cpu).unwrap();
        assert_eq!(data.images.size(), [2, 3, 4, 4]);
        // White grey → (1 − mean) / std per channel; black RGBA → −mean / std.
        let white = (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
        assert!((data.images.double_value(&[0, 1, 2, 2]) - white).abs() < 1e-5);
        let black = -IMAGENET_MEAN[0] / IMAGENET_STD[0];
        assert!((data.images.double_value(&[1, 0, 0, 0]) - black).abs() < 1e-5);
        std::fs::write(dir.path().join("c.png"), b"\x89PNG broken").unwrap();
        let err = ImageDataset::load_png_folder(dir.path(), 4, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("c.png") && err.contains("PNG"), "{err}");
    }

    #[test]
    fn parses_a_small_idx_and_rejects_a_truncated_one() {
        let mut bytes = vec![0, 0, 8, 1, 0, 0, 0, 3];
        bytes.extend([7, 8, 9]);
        let (dims, data) = parse_idx(&bytes, Path::new("x")).unwrap();
        assert_eq!(dims, vec![3]);
        assert_eq!(data, vec![7, 8, 9]);
        let err = parse_idx(&bytes[..10], Path::new("x.gz"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.gz") && err.contains("need 3 bytes"),
            "{err}"
        );
    }
}
