//! How a run scores a model against its teacher on held-out data: the recipe's quality metric
//! on the test split, the patch-feature cosine of backbones, agreement on the photo folder
//! (`data.photos`), KL to the teacher, and agreement on the calibration split under hard masks
//! (the export search's score).

use super::env::RunEnv;
use super::splits::Splits;
use super::teacher::Teacher;
use crate::data::{Examples, ImageDataset, Metric};
use crate::error::{Error, Result};
use crate::eval;
use crate::model::{Family, KeepSet, Masks, Output};
use crate::recipe::{DataFormat, Recipe};
use crate::run_dir::summary::PhotoQuality;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

pub struct Scoring<'a> {
    teacher: &'a dyn Family,
    test: &'a dyn Examples,
    calibration: &'a dyn Examples,
    pub metric: Metric,
    batch: i64,
    kind: Kind,
    /// The recipe's photo folder and its images.
    photos: Option<(PathBuf, ImageDataset)>,
}

impl<'a> Scoring<'a> {
    pub fn new(
        teacher: &'a dyn Family,
        splits: &'a Splits,
        metric: Metric,
        recipe: &Recipe,
        recipe_file: &Path,
        (kind, device): (Kind, Device),
    ) -> Result<Self> {
        let photos = match (&recipe.data.photos, recipe.data.format) {
            (Some(dir), DataFormat::Idx) => {
                let size = recipe.data.image_size.unwrap_or(28);
                Some((
                    dir.clone(),
                    ImageDataset::load_png_folder(dir, size, device)?,
                ))
            }
            (Some(_), DataFormat::Text) => {
                return Err(Error::config(
                    recipe_file,
                    "data.photos",
                    "photos go with image data (format = \"idx\")",
                ))
            }
            (None, _) => None,
        };
        Ok(Scoring {
            teacher,
            test: splits.test.as_ref(),
            calibration: splits.calibration.as_ref(),
            metric,
            batch: recipe.eval.batch,
            kind,
            photos,
        })
    }

    /// Scoring against the run's teacher, in the run's dtype and device.
    pub fn of_teacher(
        teacher: &'a Teacher,
        splits: &'a Splits,
        recipe: &Recipe,
        recipe_file: &Path,
        env: &RunEnv<'_>,
    ) -> Result<Self> {
        Scoring::new(
            teacher.model.as_ref(),
            splits,
            teacher.metric,
            recipe,
            recipe_file,
            (env.kind, env.device),
        )
    }

    /// The recipe's metric on the test split.
    pub fn quality(&self, model: &dyn Family) -> f64 {
        eval::quality(
            model,
            self.teacher,
            self.test,
            self.metric,
            self.batch,
            self.kind,
        )
    }

    /// Backbones: mean cosine of patch features to the teacher's on the test split.
    pub fn patch_cosine(&self, model: &dyn Family) -> Option<f64> {
        (model.output() == Output::Features).then(|| {
            let masks = Masks::none(model.groups().len());
            eval::feature_cosine(
                model,
                &masks,
                self.teacher,
                self.test,
                self.batch,
                self.kind,
            )
            .patches
        })
    }

    /// Agreement with the teacher on the photo folder: the cls cosine for a backbone, top-1
    /// agreement in percent for a classifier.
    pub fn photos(&self, model: &dyn Family) -> Option<f64> {
        self.photos.as_ref().map(|(_, data)| {
            let masks = Masks::none(model.groups().len());
            let (teacher, batch, kind) = (self.teacher, self.batch, self.kind);
            match model.output() {
                Output::Features => {
                    eval::feature_cosine(model, &masks, teacher, data, batch, kind).cls
                }
                Output::Logits => eval::agreement(model, &masks, teacher, data, batch, kind),
            }
        })
    }

    /// The photo scores of the slim model before and after fine-tuning, for the summary.
    pub fn photo_quality(
        &self,
        before_finetune: Option<f64>,
        slim: &dyn Family,
    ) -> Option<PhotoQuality> {
        let (dir, data) = self.photos.as_ref()?;
        Some(PhotoQuality {
            dir: dir.display().to_string(),
            images: data.len(),
            metric: match self.teacher.output() {
                Output::Features => "cls_cosine_to_teacher",
                Output::Logits => "top1_agreement_percent",
            }
            .into(),
            slim_before_finetune: before_finetune?,
            slim: self.photos(slim)?,
        })
    }

    /// Mean KL(teacher ‖ model) per prediction on the test split (language models and
    /// classifiers).
    pub fn kl_to_teacher(&self, model: &dyn Family) -> Option<f64> {
        eval::kl_to_teacher(model, self.teacher, self.test, self.batch, self.kind)
    }

    /// Agreement in percent of `student` under the hard mask of `keep` with the teacher on the
    /// calibration split: what the export search ranks candidates by.
    pub fn calibration_agreement(&self, student: &dyn Family, keep: &KeepSet) -> f64 {
        let device = student.var_store().device();
        let hard = Masks::from_keep(student.groups(), keep, (self.kind, device));
        eval::agreement(
            student,
            &hard,
            self.teacher,
            self.calibration,
            self.batch,
            self.kind,
        )
    }
}
