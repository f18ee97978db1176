//! How a run times sub-architectures of its teacher after the profile: rank 0 holds one
//! keep-all inference copy and measures every probe, candidate and the final slim model beside
//! it, so that drift of the device between measurements cancels.

use super::env::RunEnv;
use crate::error::Result;
use crate::export::search::Measurement;
use crate::latency::inference::{
    inference_copy, measure_against_keep_all, measure_model, measure_pair,
};
use crate::latency::measure::{LatencyStats, TimingProtocol};
use crate::model::{Family, KeepSet, Workload};
use crate::recipe::{Recipe, Target};
use crate::run_dir::Profile;

pub struct Timing<'a> {
    teacher: &'a dyn Family,
    /// Only rank 0 measures, so only it holds the keep-all inference copy.
    keep_all: Option<Box<dyn Family>>,
    keep_all_ms: f64,
    target: Target,
    pub workload: Workload,
    pub protocol: TimingProtocol,
}

impl<'a> Timing<'a> {
    pub fn new(
        teacher: &'a dyn Family,
        recipe: &Recipe,
        profile: &Profile,
        env: &RunEnv<'_>,
    ) -> Result<Self> {
        let workload = recipe.latency.workload();
        let keep_all = env
            .workers
            .is_leader()
            .then(|| inference_copy(teacher, &KeepSet::all(teacher.groups()), workload))
            .transpose()?;
        Ok(Timing {
            teacher,
            keep_all,
            keep_all_ms: profile.keep_all.mean,
            target: recipe.target,
            workload,
            protocol: recipe.latency.protocol(),
        })
    }

    fn keep_all(&self) -> &dyn Family {
        self.keep_all
            .as_deref()
            .expect("rank 0 holds the keep-all copy and alone measures")
    }

    /// A probe of the gate training: the teacher cut to `keep`, measured alone for an absolute
    /// target; a relative target is checked against keep-all measured alongside.
    pub fn probe(&self, keep: &KeepSet) -> Result<LatencyStats> {
        let slim = inference_copy(self.teacher, keep, self.workload)?;
        match self.target {
            Target::Ms(_) => measure_model(slim.as_ref(), self.workload, self.protocol),
            Target::Fraction(_) => self.beside_keep_all(slim.as_ref()),
        }
    }

    /// An export candidate: the teacher cut to `keep`, measured against keep-all
    /// (drift-cancelled), with its parameter count.
    pub fn candidate(&self, keep: &KeepSet) -> Result<Measurement> {
        let slim = inference_copy(self.teacher, keep, self.workload)?;
        Ok(Measurement {
            latency: self.beside_keep_all(slim.as_ref())?,
            params: slim.num_params(),
        })
    }

    fn beside_keep_all(&self, model: &dyn Family) -> Result<LatencyStats> {
        measure_against_keep_all(
            self.keep_all(),
            model,
            self.keep_all_ms,
            self.workload,
            self.protocol,
        )
    }

    /// The final measurement: keep-all and the (fine-tuned) slim model in the same process,
    /// back to back; returns `[keep_all, slim]`.
    pub fn keep_all_and(&self, slim: &dyn Family) -> Result<[LatencyStats; 2]> {
        let slim_inference = inference_copy(slim, &KeepSet::all(slim.groups()), self.workload)?;
        measure_pair(
            self.keep_all(),
            slim_inference.as_ref(),
            self.workload,
            self.protocol,
        )
    }
}
