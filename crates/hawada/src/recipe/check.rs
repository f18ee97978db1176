//! Validation of a parsed recipe: every number in its range, every combination of options
//! meaningful, each error naming the file, the field, the value and what is allowed.

use super::{DataFormat, Recipe, TeacherSamples};
use crate::error::{Error, Result};
use std::path::Path;

impl Recipe {
    pub(super) fn validate(&self, file: &Path) -> Result<()> {
        self.check_name(file)?;
        self.check_positive(file)?;
        self.check_ranges(file)?;
        self.check_batches_split(file, self.gpus)?;
        self.check_finetune(file)?;
        if let Some(samples) = &self.finetune.teacher_samples {
            self.check_teacher_samples(samples, file)?;
        }
        self.device.resolve()?;
        Ok(())
    }

    /// The name is the run directory's last component (`runs/<name>`): one path component of
    /// safe characters, or a recipe `name = "../../x"` writes a run anywhere (issue 24).
    fn check_name(&self, file: &Path) -> Result<()> {
        let name = &self.name;
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.len() > 128 || name.starts_with('.') || !name.chars().all(safe) {
            return Err(Error::config(
                file,
                "name",
                format!(
                    "{name:?} is not a run name: it names the folder runs/<name>, so it must be 1 to 128 letters, digits, `-`, `_` or `.`, not starting with `.`"
                ),
            ));
        }
        Ok(())
    }

    /// Every count, size and rate that must be a positive number.
    fn check_positive(&self, file: &Path) -> Result<()> {
        let (latency, adapt, finetune) = (&self.latency, &self.adapt, &self.finetune);
        let fields = [
            ("latency.batch", latency.batch as f64),
            ("latency.tokens", latency.tokens as f64),
            ("latency.context", latency.context as f64),
            ("latency.new_tokens", latency.new_tokens as f64),
            ("data.seq_len", self.data.seq_len as f64),
            ("latency.timed_runs", latency.timed_runs as f64),
            ("adapt.steps", adapt.steps as f64),
            ("adapt.batch", adapt.batch as f64),
            ("adapt.lr", adapt.lr),
            ("adapt.probe_every", adapt.probe_every as f64),
            ("adapt.checkpoint_every", adapt.checkpoint_every as f64),
            ("adapt.kd_temperature", adapt.kd_temperature),
            ("finetune.batch", finetune.batch as f64),
            (
                "finetune.checkpoint_every",
                finetune.checkpoint_every as f64,
            ),
            ("eval.batch", self.eval.batch as f64),
            ("gpus", self.gpus as f64),
            ("latency.table_grid_step", latency.table_grid_step as f64),
            ("latency.table_timed_runs", latency.table_timed_runs as f64),
        ];
        let samples = finetune.teacher_samples.iter().flat_map(|samples| {
            [
                (
                    "finetune.teacher_samples.sequences",
                    samples.sequences as f64,
                ),
                ("finetune.teacher_samples.batch", samples.batch as f64),
                ("finetune.teacher_samples.temperature", samples.temperature),
            ]
        });
        for (field, value) in fields.into_iter().chain(samples) {
            if !(value > 0.0 && value.is_finite()) {
                return Err(Error::config(
                    file,
                    field,
                    format!("must be a positive number, found {value}"),
                ));
            }
        }
        Ok(())
    }

    /// Numbers with a range narrower than "positive": learning rates, sizes with a sanity
    /// limit, counts that may be zero, weights that may not be negative. Learning rates above
    /// the limits diverge at once (a fine-tune at lr 1e8 ends at loss 3e8, issue 24).
    fn check_ranges(&self, file: &Path) -> Result<()> {
        use Allowed::{AtLeast, Between, NonNegative, UpTo};
        let (data, adapt, finetune) = (&self.data, &self.adapt, &self.finetune);
        let mut fields: Vec<(String, f64, Allowed)> = vec![
            ("finetune.lr".into(), finetune.lr, UpTo(1.0)),
            (
                "finetune.kd_temperature".into(),
                finetune.kd_temperature,
                UpTo(1e3),
            ),
            ("adapt.lr".into(), adapt.lr, UpTo(100.0)),
            ("adapt.weight_lr".into(), adapt.weight_lr, UpTo(1.0)),
            ("adapt.lambda_lr".into(), adapt.lambda_lr, UpTo(1e6)),
            ("adapt.lambda_max".into(), adapt.lambda_max, NonNegative),
            ("adapt.rho".into(), adapt.rho, NonNegative),
            ("adapt.mse_weight".into(), adapt.mse_weight, NonNegative),
            (
                "gates.temperature".into(),
                self.gates.temperature,
                UpTo(1e3),
            ),
            (
                "gates.min_keep".into(),
                self.gates.min_keep as f64,
                AtLeast(1.0),
            ),
            (
                "gates.init_logit".into(),
                self.gates.init_logit,
                Between(-1e3, 1e3),
            ),
            ("data.holdout".into(), data.holdout as f64, AtLeast(1.0)),
            (
                "data.seq_len".into(),
                data.seq_len as f64,
                Between(1.0, 1e6),
            ),
            (
                "latency.batch".into(),
                self.latency.batch as f64,
                Between(1.0, 1e6),
            ),
        ];
        let optional = [
            ("data.test_limit", data.test_limit, Between(1.0, 1e9)),
            ("data.image_size", data.image_size, Between(1.0, 4096.0)),
            ("data.channels", data.channels, Between(1.0, 64.0)),
        ];
        for (field, value, allowed) in optional {
            if let Some(value) = value {
                fields.push((field.into(), value as f64, allowed));
            }
        }
        if data.format == DataFormat::Text {
            let documents = data.test_documents as f64;
            fields.push(("data.test_documents".into(), documents, AtLeast(1.0)));
        }
        if let Some(teacher) = &self.teacher_training {
            fields.extend([
                ("teacher_training.epochs".into(), teacher.epochs, UpTo(1e4)),
                (
                    "teacher_training.batch".into(),
                    teacher.batch as f64,
                    Between(1.0, 1e6),
                ),
                ("teacher_training.lr".into(), teacher.lr, UpTo(1.0)),
            ]);
        }
        let export = &self.export;
        for (name, multiples) in [
            ("channel_multiples", &export.channel_multiples),
            ("head_multiples", &export.head_multiples),
        ] {
            for (i, &multiple) in multiples.iter().enumerate() {
                fields.push((
                    format!("export.{name}[{i}]"),
                    multiple as f64,
                    Between(1.0, 1e6),
                ));
            }
        }
        for (field, value, allowed) in fields {
            if !allowed.contains(value) {
                return Err(Error::config(
                    file,
                    &field,
                    format!("must be {}, found {value}", allowed.describe()),
                ));
            }
        }
        Ok(())
    }

    /// The fine-tune's steps, label weight, and what teacher correction needs of them.
    fn check_finetune(&self, file: &Path) -> Result<()> {
        if self.finetune.steps < 0 {
            return Err(Error::config(file, "finetune.steps", "must be ≥ 0"));
        }
        let w = self.finetune.label_weight;
        if !(0.0..=1.0).contains(&w) {
            return Err(Error::config(
                file,
                "finetune.label_weight",
                format!("must be in [0, 1] (the share of cross-entropy in the loss), found {w}"),
            ));
        }
        if self.finetune.correct_teacher && !(w > 0.0 && self.finetune.steps > 0) {
            return Err(Error::config(
                file,
                "finetune.correct_teacher",
                format!("corrects the teacher on the data's labels; it needs finetune.label_weight > 0 and finetune.steps > 0 (found {w} and {})", self.finetune.steps),
            ));
        }
        Ok(())
    }

    /// What `finetune.teacher_samples` needs of the rest of the recipe (its numbers are
    /// checked positive beside the others).
    fn check_teacher_samples(&self, samples: &TeacherSamples, file: &Path) -> Result<()> {
        let field = |name: &str| format!("finetune.teacher_samples.{name}");
        if self.data.format != DataFormat::Text {
            return Err(Error::config(
                file,
                &field("sequences"),
                "a teacher samples text: it needs text data (data.format = \"text\")",
            ));
        }
        if self.finetune.steps == 0 {
            return Err(Error::config(
                file,
                &field("sequences"),
                "extends the fine-tune's data; it needs finetune.steps > 0",
            ));
        }
        let seq_len = self.data.seq_len;
        if !(1..=seq_len).contains(&samples.prompt_tokens) {
            return Err(Error::config(
                file,
                &field("prompt_tokens"),
                format!(
                    "must be in [1, data.seq_len = {seq_len}] (the teacher continues each prompt to a whole sequence), found {}",
                    samples.prompt_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Every training batch must split evenly over `workers` processes.
    pub fn check_batches_split(&self, file: &Path, workers: usize) -> Result<()> {
        for (field, batch) in [
            ("adapt.batch", self.adapt.batch),
            ("finetune.batch", self.finetune.batch),
        ] {
            if batch % workers as i64 != 0 {
                return Err(Error::config(
                    file,
                    field,
                    format!("{batch} does not split evenly over {workers} workers (gpus); give a multiple of {workers}"),
                ));
            }
        }
        Ok(())
    }
}

/// The range a recipe number must lie in (finite in every case).
#[derive(Debug, Clone, Copy)]
enum Allowed {
    /// `(0, max]`.
    UpTo(f64),
    /// `[min, max]`.
    Between(f64, f64),
    /// `[min, ∞)`.
    AtLeast(f64),
    /// `[0, ∞)`.
    NonNegative,
}

impl Allowed {
    fn contains(self, value: f64) -> bool {
        value.is_finite()
            && match self {
                Allowed::UpTo(max) => value > 0.0 && value <= max,
                Allowed::Between(min, max) => (min..=max).contains(&value),
                Allowed::AtLeast(min) => value >= min,
                Allowed::NonNegative => value >= 0.0,
            }
    }

    fn describe(self) -> String {
        match self {
            Allowed::UpTo(max) => format!("in (0, {max}]"),
            Allowed::Between(min, max) => format!("in [{min}, {max}]"),
            Allowed::AtLeast(min) => format!("at least {min}"),
            Allowed::NonNegative => "zero or more".into(),
        }
    }
}
