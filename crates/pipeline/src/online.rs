//! What the online algorithms' rounds share (PPO in ppo_rounds.rs, the group estimators in
//! group_rounds.rs): the trainer runs every iteration in one call and calls back into the run
//! (for rewards, for each finished iteration); this holds the run across those callbacks, shows
//! the progress, and keeps the first error a callback met, so the trainer's own error (a
//! reward function that failed) does not hide what went wrong.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_train::{IterationRecord, PromptExample, TrainError};

use crate::error::{PipelineError, Result};
use crate::rounds::{RoundMetrics, Run};
use crate::run_dir::Stage;

impl Run<'_> {
    /// The trained policy at `policy` if every round already trained (a finished run called
    /// again): the rounds' metrics are reported and there is nothing to do.
    pub(crate) fn already_trained(
        &mut self,
        policy: &Path,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<bool> {
        let rounds = self.config.rounds;
        if !(0..rounds).all(|r| self.state.is_complete(r, Stage::Train)) || !policy.exists() {
            return Ok(false);
        }
        for round in 0..rounds {
            self.finish_round(round, on_round)?;
        }
        self.dir.publish_policy(policy)?;
        Ok(true)
    }

    /// The run's prompts as the trainers take them.
    pub(crate) fn prompt_examples(&self) -> Vec<PromptExample> {
        self.inputs
            .prompts
            .iter()
            .map(|p| PromptExample {
                problem_id: p.problem_id.clone(),
                prompt: p.prompt.clone(),
            })
            .collect()
    }
}

/// A run lent to an online trainer's callbacks.
pub(crate) struct Online<'r, 'a> {
    pub run: RefCell<&'r mut Run<'a>>,
    failure: RefCell<Option<PipelineError>>,
    bar: ProgressBar,
    /// Where the trainer saves the trained policy.
    policy: PathBuf,
}

impl<'r, 'a> Online<'r, 'a> {
    /// `name` labels the progress bar; `policy` is where the trainer will save the policy.
    pub fn new(run: &'r mut Run<'a>, name: &str, policy: PathBuf) -> Self {
        let bar = ProgressBar::new(u64::from(run.config.rounds));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {bar:40} {pos}/{len} iterations {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("a valid template"),
        );
        bar.set_prefix(name.to_owned());
        Self {
            run: RefCell::new(run),
            failure: RefCell::new(None),
            bar,
            policy,
        }
    }

    /// A callback's error for the trainer, keeping the error itself to report.
    pub fn fail(&self, e: PipelineError) -> TrainError {
        let message = e.to_string();
        let path = self.run.borrow().dir.root().to_owned();
        self.failure.borrow_mut().get_or_insert(e);
        TrainError::Data { path, message }
    }

    /// The trainer's record of an iteration: shown, and recorded as the round's metrics.
    pub fn iteration(
        &self,
        record: &IterationRecord,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
        shown: [&str; 2],
    ) {
        let round = (record.step - 1) as u32;
        self.bar.set_position(record.step);
        let metric = |key: &str| record.metrics.get(key).copied().unwrap_or(f64::NAN);
        self.bar.set_message(format!(
            "{} {:.3} · {} {:.4}",
            shown[0],
            metric(shown[0]),
            shown[1],
            metric(shown[1])
        ));
        let result = self.bar.suspend(|| {
            self.run
                .borrow_mut()
                .finish_iteration(round, record, &self.policy, on_round)
        });
        if let Err(e) = result {
            tracing::error!(round, error = %e, "recording the round failed");
            self.failure.borrow_mut().get_or_insert(e);
        }
    }

    /// The trained policy, or the first error a callback met, else the trainer's.
    pub fn finish<T>(self, trained: prefloop_train::Result<T>) -> Result<PathBuf> {
        self.bar.finish_and_clear();
        if let Some(e) = self.failure.into_inner() {
            return Err(e);
        }
        trained?;
        self.run.borrow().dir.publish_policy(&self.policy)?;
        Ok(self.policy)
    }
}
