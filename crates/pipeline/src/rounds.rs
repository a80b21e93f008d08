//! A run and its dispatch: the rounds of the configured algorithm, DPO-Iter's
//! (dpo_iter.rs) or the online core's (online_rounds.rs), then an optional last round that
//! generates and scores with the final policy; and what every round kind shares: beginning a
//! round, choosing its prompts, marking its stages complete, scoring (score.rs's `Scorer`).
//! What a round samples from is inputs.rs's; what it measured, metrics.rs's.
//!
//! Every stage writes durably and is marked complete in `state.json` only after its output is
//! whole, so the same call after a kill at any point continues where the run stood.

use std::collections::BTreeMap;
use std::path::Path;

use prefloop_core::{Sample, Score};
use prefloop_data::Manifest;
use prefloop_model::{Model, best_device};

use crate::config::{Algorithm, RunConfig, ScorerKind};
use crate::error::{PipelineError, Result};
use crate::generate::PromptRow;
use crate::inputs::{Inputs, program_fields};
use crate::metrics::RoundMetrics;
use crate::prompt_source::{RoundPrompts, choose, per_round, recorded};
use crate::run_dir::{RoundState, RunDir, RunState, Stage};
use crate::score::{Scorer, Task};

/// Runs (or continues) every round of the run at `dir` under `config`. `on_round` sees each
/// round's metrics as the round completes.
pub fn run_rounds(
    dir: &RunDir,
    config: &RunConfig,
    mut on_round: impl FnMut(u32, &RoundMetrics),
) -> Result<RunState> {
    let state = dir.state()?;
    let inputs = Inputs::load(dir, config)?;
    inputs.check_held_out(config)?;
    let mut run = Run {
        dir,
        config,
        inputs,
        scorer: Scorer::new(&config.score, config.dtype, config.score_encoding()),
        state,
    };
    if config.score.uses(ScorerKind::Program) && !run.state.finished {
        // A changed reward program stops the run before anything is sampled with it.
        run.check_program()?;
    }
    let last_policy = match config.algorithm {
        Algorithm::DpoIter => match run.dpo_iter_rounds(&mut on_round)? {
            Some(policy) => policy,
            None => return Ok(run.state),
        },
        Algorithm::Ppo | Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp => {
            run.online_rounds(&mut on_round)?
        }
    };
    if config.final_generation {
        let round = config.rounds;
        run.begin_round(round, &last_policy)?;
        run.plan_final_round(round)?;
        run.sample_round(round, &last_policy)?;
        run.finish_round(round, &mut on_round)?;
    }
    if !run.state.finished {
        run.state.finished = true;
        dir.save_state(&run.state)?;
    }
    Ok(run.state)
}

/// A run in progress: where it lives, what it was configured with, what its rounds sample
/// from and score with, and how far it has come.
pub(crate) struct Run<'a> {
    pub dir: &'a RunDir,
    pub config: &'a RunConfig,
    pub inputs: Inputs,
    pub scorer: Scorer,
    pub state: RunState,
}

impl Run<'_> {
    /// Adds round `round` to the state, sampling from `policy` (empty: the embedded default).
    pub(crate) fn begin_round(&mut self, round: u32, policy: &Path) -> Result<()> {
        if self.state.round(round).is_none() {
            self.state.rounds.push(RoundState {
                round,
                policy: policy.to_owned(),
                completed: BTreeMap::new(),
                trained: None,
                measured: BTreeMap::new(),
                metrics: BTreeMap::new(),
                prompts: None,
            });
            self.dir.save_state(&self.state)?;
        }
        Ok(())
    }

    /// Reads the reward program and records its hash in the run's state the first time; a
    /// later process (a resume) refuses a program that changed, so every round of a run is
    /// scored by the same function.
    fn check_program(&mut self) -> Result<()> {
        let program = self.scorer.program()?;
        let sha256 = program.sha256().to_owned();
        match &self.state.program_sha256 {
            Some(recorded) if *recorded != sha256 => Err(PipelineError::Config {
                path: self.config.score.program.clone().expect("validated"),
                message: format!(
                    "the reward program changed since the run first read it (sha256 \
                     {recorded}, now {sha256}): restore it, or start a new run"
                ),
            }),
            Some(_) => Ok(()),
            None => {
                self.state.program_sha256 = Some(sha256);
                self.dir.save_state(&self.state)
            }
        }
    }

    /// Chooses and records the prompts of round `round` when the run chooses them round by
    /// round (prompt_source.rs) and the round has not yet; false when a growing source has
    /// nothing new and the run is to stop.
    pub(crate) fn plan_round(&mut self, round: u32) -> Result<bool> {
        if !per_round(self.config) || self.state.rounds[round as usize].prompts.is_some() {
            return Ok(true);
        }
        let earlier: Vec<&RoundPrompts> = self
            .state
            .rounds
            .iter()
            .filter(|r| r.round < round)
            .filter_map(|r| r.prompts.as_ref())
            .collect();
        let Some((prompts, record)) = choose(self.config, &self.inputs.prompts, round, &earlier)?
        else {
            return Ok(false);
        };
        tracing::info!(
            round,
            prompts = prompts.len(),
            files = record.files.len(),
            "round prompts chosen"
        );
        self.state.rounds[round as usize].prompts = Some(record);
        self.state.waiting_for_prompts = None;
        self.dir.save_state(&self.state)?;
        Ok(true)
    }

    /// The final generation measures the final policy on the last trained round's prompts.
    pub(crate) fn plan_final_round(&mut self, round: u32) -> Result<()> {
        if !per_round(self.config) || self.state.rounds[round as usize].prompts.is_some() {
            return Ok(());
        }
        let last = round
            .checked_sub(1)
            .and_then(|r| self.state.round(r))
            .and_then(|r| r.prompts.clone());
        self.state.rounds[round as usize].prompts = last;
        self.dir.save_state(&self.state)
    }

    /// Stops the run at `round`: its source has no new prompts (`when_exhausted = "stop"`).
    pub(crate) fn wait_for_prompts(&mut self, round: u32) -> Result<()> {
        tracing::info!(round, "no new prompts: the run stops before this round");
        self.state.waiting_for_prompts = Some(round);
        self.dir.save_state(&self.state)
    }

    /// What round `round` samples: its recorded choice, or every prompt of the run.
    pub(crate) fn round_prompts(&self, round: u32) -> Result<Vec<PromptRow>> {
        match self.state.round(round).and_then(|r| r.prompts.as_ref()) {
            Some(record) => recorded(record, &self.inputs.prompts),
            None => Ok(self.inputs.prompts.clone()),
        }
    }

    /// Loads the round's policy into `model` unless it is there already.
    pub(crate) fn load_policy(&self, round: u32, model: &mut Option<Model>) -> Result<()> {
        if model.is_none() {
            let policy = &self.state.round(round).expect("begun").policy;
            let path = (!policy.as_os_str().is_empty()).then_some(policy.as_path());
            *model = Some(Model::load(path, best_device(), self.config.dtype)?);
        }
        Ok(())
    }

    /// Marks a stage complete if its shards are all written and its manifest says so. A run
    /// killed after that but before `state.json` recorded it finds the stage done: writing it
    /// again would be refused (and would waste the work). Its wall time went with the killed
    /// process and is recorded as 0; the pairs stage's row count comes from its manifest.
    pub(crate) fn adopt_written(&mut self, round: u32, stage: Stage) -> Result<()> {
        if self.state.is_complete(round, stage) {
            return Ok(());
        }
        let Some(manifest) =
            Manifest::load(&self.dir.stage_dir(round, stage))?.filter(|m| m.complete)
        else {
            return Ok(());
        };
        let detail = match stage {
            Stage::Pairs => vec![("pairs", manifest.rows() as f64)],
            _ => Vec::new(),
        };
        self.complete(round, stage, 0.0, &detail)
    }

    /// The samples' scores from the run's scorer.
    pub(crate) fn score(&mut self, samples: &[Sample]) -> Result<Vec<Score>> {
        let fields = program_fields(&self.inputs.prompts);
        let task = Task {
            problems: &self.inputs.by_id,
            fields: &fields,
        };
        self.scorer.score(samples, task)
    }

    /// Marks round `round`'s score stage complete after `seconds`, with what the scorer
    /// measured (its calibration, each of several scorers' mean).
    pub(crate) fn complete_score(&mut self, round: u32, seconds: f64) -> Result<()> {
        let means = self.scorer.part_means();
        let mut detail = self.scorer.calibration_detail();
        detail.extend(means.iter().map(|(k, v)| (k.as_str(), *v)));
        self.complete(round, Stage::Score, seconds, &detail)
    }

    /// Marks `stage` of `round` complete, with its wall time and what it measured.
    pub(crate) fn complete(
        &mut self,
        round: u32,
        stage: Stage,
        seconds: f64,
        detail: &[(&str, f64)],
    ) -> Result<()> {
        let entry = &mut self.state.rounds[round as usize];
        entry.completed.insert(stage, seconds);
        for (key, value) in detail {
            entry.measured.insert((*key).to_owned(), *value);
        }
        tracing::info!(round, stage = stage.name(), seconds, "stage complete");
        self.dir.save_state(&self.state)
    }
}

/// The `policy` column of round `round`'s samples.
pub(crate) fn policy_name(config: &RunConfig, round: u32) -> String {
    match (config.algorithm, round) {
        (_, 0) => "base".into(),
        (Algorithm::DpoIter, _) => format!("round-{:04}", round - 1),
        (Algorithm::Ppo, _) => format!("ppo-iteration-{round:04}"),
        (Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp, _) => {
            format!("group-iteration-{round:04}")
        }
    }
}
