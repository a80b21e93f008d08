//! PPO and the group estimators as rounds: one iteration of the online core
//! (prefloop-train's `Trainer`) per round, driven from here as a DPO-Iter round is: the held-out
//! evaluation of the actor as it stands → sample and score (the trainer asks for rewards draw
//! by draw: the group estimators draw again while groups carry no signal) → the iteration's
//! rollouts as the round's samples stage and their scores as its scores stage → the update →
//! the trainer's record as the round's metrics. The trainer's checkpoints (policy, reference,
//! optimisers, PPO's critic) make a killed run continue where it stood: an iteration it redoes
//! samples the same rollouts, and one killed during its update finds the stages complete and
//! reads the rewards back instead of scoring again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::{Sample, Score};
use prefloop_data::{Manifest, StageReader, StageWriter, WriterOptions};
use prefloop_model::{Batching, Generator, InProcess, best_device};
use prefloop_train::{
    Group, IterationRecord, Policy, Ppo, PpoModels, PromptExample, Rollout, Trainer,
};

use crate::config::RunConfig;
use crate::error::Result;
use crate::metrics::RoundMetrics;
use crate::rounds::{Run, policy_name};
use crate::run_dir::Stage;
use crate::score::rollout_samples;

/// Where the PPO trainer keeps its checkpoints, metrics, and finally `policy/` and `critic/`.
pub const PPO_DIR: &str = "ppo";

/// Where the group trainer keeps its checkpoints, metrics, and finally `policy/`.
pub const GROUP_DIR: &str = "group";

impl Run<'_> {
    /// Runs the online algorithm's rounds; returns the trained policy's directory.
    pub(crate) fn online_rounds(
        &mut self,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<PathBuf> {
        let (dir, config) = (self.dir, self.config);
        let (model, dtype) = (config.model.as_deref(), config.dtype);
        match config.algorithm.estimator() {
            None => {
                let out = dir.root().join(PPO_DIR);
                if self.already_trained(&out, on_round)? {
                    return Ok(out.join(prefloop_train::POLICY_DIR));
                }
                let ppo = config.ppo_config();
                let models = PpoModels::load(model, best_device(), dtype, &ppo)?;
                let algorithm = Ppo::new(&ppo, &models.critic)?;
                let batching = Batching::new(ppo.online.generation_batch_size);
                self.drive(&models.policy, algorithm, batching, &out, on_round)
            }
            Some(estimator) => {
                let out = dir.root().join(GROUP_DIR);
                if self.already_trained(&out, on_round)? {
                    return Ok(out.join(prefloop_train::POLICY_DIR));
                }
                let group = config.group_config();
                let policy = group.load_policy(model, best_device(), dtype)?;
                let algorithm = Group::new(&group, estimator)?;
                let batching = Batching::new(group.online.generation_batch_size);
                self.drive(&policy, algorithm, batching, &out, on_round)
            }
        }
    }

    /// Every remaining iteration of `algorithm` on `policy`, its trainer's files under `out`,
    /// one round each; returns the trained policy's directory.
    fn drive<A: prefloop_train::Algorithm>(
        &mut self,
        policy: &Policy,
        algorithm: A,
        batching: Batching,
        out: &Path,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<PathBuf> {
        let prompts = self.prompt_examples();
        let saved = out.join(prefloop_train::POLICY_DIR);
        let Some(mut trainer) = Trainer::start(policy, algorithm, &prompts, out)? else {
            self.dir.publish_policy(&saved)?;
            return Ok(saved);
        };
        let mut generator = InProcess::new(&policy.actor, batching);
        let bar = progress(&trainer.name(), self.config.rounds);
        while let Some(iteration) = trainer.next_iteration() {
            let round = iteration as u32;
            self.begin_round(round, out)?;
            // The actor that samples the round, not yet updated, is its policy.
            bar.suspend(|| self.evaluate_policy(round, &policy.actor))?;
            let mut pending = Vec::new();
            let sampled = trainer.sample(&mut generator, &mut |rollouts| {
                self.score_draw(round, rollouts, &mut pending)
            })?;
            self.record_iteration(round, &sampled.sampled.rollouts, pending)?;
            let record = bar.suspend(|| trainer.update(sampled))?;
            generator.sync_policy(&policy.actor)?;
            bar.set_position(record.step);
            bar.set_message(record.summary());
            bar.suspend(|| self.finish_iteration(round, &record, &saved, on_round))?;
        }
        bar.finish_and_clear();
        let saved = trainer.finish()?;
        self.dir.publish_policy(&saved)?;
        Ok(saved)
    }

    /// Whether every round already trained and the trainer under `out` saved its policy (a
    /// finished run called again): the rounds' metrics are reported and there is nothing to do.
    fn already_trained(
        &mut self,
        out: &Path,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<bool> {
        let policy = out.join(prefloop_train::POLICY_DIR);
        let rounds = self.config.rounds;
        if !(0..rounds).all(|r| self.state.is_complete(r, Stage::Train)) || !policy.exists() {
            return Ok(false);
        }
        for round in 0..rounds {
            self.finish_round(round, on_round)?;
        }
        self.dir.publish_policy(&policy)?;
        Ok(true)
    }

    /// The run's prompts as the trainers take them.
    fn prompt_examples(&self) -> Vec<PromptExample> {
        self.inputs
            .prompts
            .iter()
            .map(|p| PromptExample {
                problem_id: p.problem_id.clone(),
                prompt: p.prompt.clone(),
            })
            .collect()
    }

    /// The rewards of one draw: read back where the round's scores are already complete (an
    /// iteration redone after a kill during its update), else scored now and kept in
    /// `pending` until the iteration's sampling is done.
    fn score_draw(
        &mut self,
        round: u32,
        rollouts: &[Rollout],
        pending: &mut Vec<Score>,
    ) -> Result<Vec<f32>> {
        let samples = as_samples(self.config, round, rollouts);
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
            self.complete_score(round, seconds)?;
        }
        Ok(())
    }

    /// The rewards of `samples`, rolled out again by a resumed run redoing round `round`,
    /// whose samples and scores stages were complete before the kill. A stored score is
    /// reused only where the stored sample of the same key holds the same text: regeneration
    /// need not be bit-identical (a GPU's kernels, another card after a restart), and a reward
    /// must follow the completion it scores. The others are scored again.
    fn stored_rewards(&mut self, round: u32, samples: &[Sample]) -> Result<Vec<f32>> {
        let dir = self.dir;
        let scored = by_key(&dir.stage_dir(round, Stage::Score), |s: Score| {
            ((s.problem_id, s.sample_idx), s.reward)
        })?;
        let texts = by_key(&dir.stage_dir(round, Stage::Generate), |s: Sample| {
            ((s.problem_id, s.sample_idx), s.completion)
        })?;
        let mut rewards = Vec::with_capacity(samples.len());
        let mut stale = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            let key = (s.problem_id.clone(), s.sample_idx);
            match scored.get(&key) {
                Some(&reward) if texts.get(&key) == Some(&s.completion) => rewards.push(reward),
                _ => {
                    rewards.push(f32::NAN);
                    stale.push(i);
                }
            }
        }
        if !stale.is_empty() {
            tracing::warn!(
                round,
                rescored = stale.len(),
                "completions differ from those scored before the restart: scored again"
            );
            let again: Vec<Sample> = stale.iter().map(|&i| samples[i].clone()).collect();
            for (&i, score) in stale.iter().zip(self.score(&again)?) {
                rewards[i] = score.reward;
            }
        }
        Ok(rewards)
    }

    /// The trainer's record of iteration `round` becomes the round's metrics; the last round
    /// names the trained policy the trainer saves to `policy`.
    fn finish_iteration(
        &mut self,
        round: u32,
        record: &IterationRecord,
        policy: &Path,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<()> {
        let config = self.config;
        let entry = &mut self.state.rounds[round as usize];
        entry.measured.extend(
            record
                .metrics
                .iter()
                .filter(|(k, _)| !k.starts_with("time/"))
                .map(|(k, v)| (k.clone(), *v)),
        );
        // The trainer timed the phases; generation and the update are its to report.
        let time = |key: &str| record.metrics.get(key).copied().unwrap_or_default();
        entry
            .completed
            .insert(Stage::Generate, time("time/generate"));
        let train = time("time/train") + time("time/reference_update");
        self.complete(round, Stage::Train, train, &[])?;
        if round + 1 == config.rounds {
            self.state.rounds[round as usize].trained = Some(policy.to_owned());
        }
        self.finish_round(round, on_round)
    }
}

/// The progress of `rounds` iterations of the algorithm `name`.
fn progress(name: &str, rounds: u32) -> ProgressBar {
    let bar = ProgressBar::new(u64::from(rounds));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:40} {pos}/{len} iterations {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("a valid template"),
    );
    bar.set_prefix(name.to_owned());
    bar
}

/// Rollouts as the round's sample rows.
fn as_samples(config: &RunConfig, round: u32, rollouts: &[Rollout]) -> Vec<Sample> {
    rollout_samples(rollouts, round, &policy_name(config, round))
}

/// Every row of the stage at `dir` as `entry` makes it: a (problem_id, sample_idx) key and a
/// value.
fn by_key<R: prefloop_core::Record, V>(
    dir: &Path,
    entry: impl Fn(R) -> ((String, u32), V),
) -> Result<HashMap<(String, u32), V>> {
    let mut map = HashMap::new();
    for rows in StageReader::<R>::open(dir)? {
        map.extend(rows?.into_iter().map(&entry));
    }
    Ok(map)
}

/// Writes `rows` as the whole stage at `dir`, discarding an unfinished earlier attempt.
fn write_stage<R: prefloop_core::Record>(dir: &Path, rows: &[R]) -> Result<()> {
    if Manifest::load(dir)?.is_some_and(|m| m.complete) {
        std::fs::remove_dir_all(dir).map_err(crate::PipelineError::io(dir))?;
    }
    let mut writer = StageWriter::<R>::restart(dir, WriterOptions::default())?;
    writer.write(rows)?;
    writer.finish()?;
    Ok(())
}
