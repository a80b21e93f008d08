//! The group estimators as rounds: one iteration per round, as PPO's (ppo_rounds.rs). The
//! trainer samples `group_size` rollouts per problem and may draw further problems while
//! groups carry no signal, so it asks for rewards draw by draw; they are scored in memory, and
//! once the iteration's sampling is done, all its rollouts become the round's samples stage
//! and their scores its scores stage, before the update. A run killed during sampling redoes
//! the iteration from the trainer's checkpoint with the same rollouts; one killed during the
//! update finds the stages complete and reads the rewards back instead of scoring again.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use prefloop_core::Score;
use prefloop_model::{Model, best_device};
use prefloop_train::{GroupModels, IterationRecord, Rollout, train_group};

use crate::error::Result;
use crate::online::Online;
use crate::ppo_rounds::{as_samples, write_stage};
use crate::rounds::{RoundMetrics, Run};
use crate::run_dir::Stage;

/// Where the group trainer keeps its checkpoints, metrics, and finally `policy/`.
pub const GROUP_DIR: &str = "group";

impl Run<'_> {
    /// Runs the group estimator's rounds; returns the trained policy's directory.
    pub(crate) fn group_rounds(
        &mut self,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<PathBuf> {
        let (dir, config) = (self.dir, self.config);
        let estimator = config.algorithm.estimator().expect("a group algorithm");
        let out = dir.root().join(GROUP_DIR);
        let policy = out.join(prefloop_train::POLICY_DIR);
        if self.already_trained(&policy, on_round)? {
            return Ok(policy);
        }
        let group = config.group_config();
        let models =
            GroupModels::load(config.model.as_deref(), best_device(), config.dtype, &group)?;
        let prompts = self.prompt_examples();
        let name = format!("{estimator:?}").to_lowercase();
        let online = Online::new(self, &name, policy);
        // The score rows of the iteration being sampled, draw after draw.
        let pending: RefCell<Vec<Score>> = RefCell::new(Vec::new());
        let mut reward = |iteration: u64, rollouts: &[Rollout]| {
            let mut run = online.run.borrow_mut();
            let pending = &mut pending.borrow_mut();
            let scored = run.score_draw(iteration as u32, &models.actor, rollouts, pending);
            scored.map_err(|e| online.fail(e))
        };
        let mut on_sampled = |iteration: u64, rollouts: &[Rollout], _: &[f32]| {
            let scores = std::mem::take(&mut *pending.borrow_mut());
            let mut run = online.run.borrow_mut();
            let recorded = run.record_iteration(iteration as u32, rollouts, scores);
            recorded.map_err(|e| online.fail(e))
        };
        let on_iteration = |record: &IterationRecord, _: u64| {
            online.iteration(record, on_round, ["reward/mean", "groups/dropped_fraction"]);
        };
        let trained = train_group(
            &models,
            &prompts,
            estimator,
            &mut reward,
            &mut on_sampled,
            &group,
            &out,
            on_iteration,
        );
        online.finish(trained)
    }

    /// The rewards of one draw: read back where the round's scores are already complete (an
    /// iteration redone after a kill during its update), else scored now and kept in
    /// `pending` until the iteration's sampling is done. The actor that sampled them, not yet
    /// updated, is the round's policy for the held-out evaluation.
    fn score_draw(
        &mut self,
        round: u32,
        actor: &Model,
        rollouts: &[Rollout],
        pending: &mut Vec<Score>,
    ) -> Result<Vec<f32>> {
        let (dir, config) = (self.dir, self.config);
        self.begin_round(round, &dir.root().join(GROUP_DIR))?;
        self.evaluate_policy(round, actor)?;
        let samples = as_samples(config, round, rollouts);
        if self.state.is_complete(round, Stage::Score) {
            return self.stored_rewards(round, &samples);
        }
        let began = Instant::now();
        let scores = self.score(&samples)?;
        let seconds = began.elapsed().as_secs_f64();
        let entry = &mut self.state.rounds[round as usize];
        *entry.measured.entry("time/score".into()).or_default() += seconds;
        let rewards = scores.iter().map(|s| s.reward).collect();
        pending.extend(scores);
        Ok(rewards)
    }

    /// The iteration's rollouts as the round's samples, and their scores, once sampling is
    /// done.
    fn record_iteration(
        &mut self,
        round: u32,
        rollouts: &[Rollout],
        scores: Vec<Score>,
    ) -> Result<()> {
        let (dir, config) = (self.dir, self.config);
        if !self.state.is_complete(round, Stage::Generate) {
            write_stage(
                &dir.stage_dir(round, Stage::Generate),
                &as_samples(config, round, rollouts),
            )?;
            self.complete(round, Stage::Generate, 0.0, &[])?;
        }
        if !self.state.is_complete(round, Stage::Score) {
            write_stage(&dir.stage_dir(round, Stage::Score), &scores)?;
            let seconds = self.state.rounds[round as usize]
                .measured
                .remove("time/score")
                .unwrap_or_default();
            let detail = self.scorer.calibration_detail(config);
            self.complete(round, Stage::Score, seconds, &detail)?;
        }
        Ok(())
    }
}
