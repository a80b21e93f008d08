//! PPO as rounds: one PPO iteration per round. The trainer (prefloop-train) samples the
//! iteration's rollouts from the actor; its reward function here writes them as the round's
//! samples stage, scores them (sandboxed tests or a reward model) into the round's scores
//! stage, and hands the rewards back; the trainer's record of the iteration becomes the
//! round's metrics. The trainer's checkpoints (actor, critic, reference, optimisers) make a
//! killed run continue where it stood: an iteration it redoes samples the same rollouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prefloop_core::{Sample, Score};
use prefloop_data::{Manifest, StageReader, StageWriter, WriterOptions};
use prefloop_model::{Model, best_device};
use prefloop_sandbox::score_samples;
use prefloop_train::{Encoder, IterationRecord, PpoModels, Rollout, train_ppo};

use crate::config::{RunConfig, ScorerKind};
use crate::error::Result;
use crate::online::Online;
use crate::rounds::{RoundMetrics, Run, policy_name, program_fields};
use crate::run_dir::Stage;
use crate::score::{reward_options, rm_scores, score_options};

/// Where the PPO trainer keeps its checkpoints, metrics, and finally `policy/` and `critic/`.
pub const PPO_DIR: &str = "ppo";

impl Run<'_> {
    /// Runs the PPO rounds; returns the trained policy's directory.
    pub(crate) fn ppo_rounds(
        &mut self,
        on_round: &mut impl FnMut(u32, &RoundMetrics),
    ) -> Result<PathBuf> {
        let (dir, config) = (self.dir, self.config);
        let out = dir.root().join(PPO_DIR);
        let policy = out.join(prefloop_train::POLICY_DIR);
        if self.already_trained(&policy, on_round)? {
            return Ok(policy);
        }
        let ppo = config.ppo_config();
        let models = PpoModels::load(config.model.as_deref(), best_device(), config.dtype, &ppo)?;
        let prompts = self.prompt_examples();
        let online = Online::new(self, "ppo", policy);
        let mut reward = |iteration: u64, rollouts: &[Rollout]| {
            let recorded =
                online
                    .run
                    .borrow_mut()
                    .record_rollouts(iteration as u32, &models.actor, rollouts);
            recorded.map_err(|e| online.fail(e))
        };
        let on_iteration = |record: &IterationRecord, _: u64| {
            online.iteration(record, on_round, ["reward/mean", "kl"]);
        };
        let trained = train_ppo(&models, &prompts, &mut reward, &ppo, &out, on_iteration);
        online.finish(trained)
    }

    /// The reward function's work for one iteration: the rollouts as the round's samples, their
    /// scores as its scores; returns the rewards in rollout order. The actor that sampled
    /// them, not yet updated, is the round's policy for the held-out evaluation.
    fn record_rollouts(
        &mut self,
        round: u32,
        actor: &Model,
        rollouts: &[Rollout],
    ) -> Result<Vec<f32>> {
        let (dir, config) = (self.dir, self.config);
        self.begin_round(round, &dir.root().join(PPO_DIR))?;
        self.evaluate_policy(round, actor)?;
        let samples = as_samples(config, round, rollouts);
        let samples_dir = dir.stage_dir(round, Stage::Generate);
        if !self.state.is_complete(round, Stage::Generate) {
            write_stage(&samples_dir, &samples)?;
            self.complete(round, Stage::Generate, 0.0, &[])?;
        }
        let scores_dir = dir.stage_dir(round, Stage::Score);
        if self.state.is_complete(round, Stage::Score) {
            // A resumed run redoing an iteration whose scores were written before the kill.
            return self.stored_rewards(round, &samples);
        }
        let began = Instant::now();
        let scores = self.score(&samples)?;
        write_stage(&scores_dir, &scores)?;
        let seconds = began.elapsed().as_secs_f64();
        let detail = self.scorer.calibration_detail(config);
        self.complete(round, Stage::Score, seconds, &detail)?;
        Ok(scores.iter().map(|s| s.reward).collect())
    }

    /// The rewards of `samples`, rolled out again by a resumed run redoing round `round`,
    /// whose samples and scores stages were complete before the kill. A stored score is
    /// reused only where the stored sample of the same key holds the same text: regeneration
    /// need not be bit-identical (a GPU's kernels, another card after a restart), and a reward
    /// must follow the completion it scores. The others are scored again.
    pub(crate) fn stored_rewards(&mut self, round: u32, samples: &[Sample]) -> Result<Vec<f32>> {
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

    /// The samples' scores from the run's scorer.
    pub(crate) fn score(&mut self, samples: &[Sample]) -> Result<Vec<Score>> {
        let config = self.config;
        Ok(match config.score.scorer {
            ScorerKind::Tests => {
                let (sandbox, calibration) = self.scorer.tests()?;
                let options = score_options(&config.score);
                score_samples(sandbox, &self.inputs.by_id, samples, &options, calibration)?
            }
            ScorerKind::Rm => {
                let rm = self.scorer.reward_model(config)?;
                let encoder = Encoder::new(&rm.model.tokenizer, config.score_encoding())?;
                rm_scores(rm, &encoder, samples, config.score.rm_batch_size)?
            }
            ScorerKind::Program => {
                let fields = program_fields(&self.inputs.prompts);
                let (sandbox, program) = self.scorer.program(self.dir, config, &mut self.state)?;
                let options = reward_options(&config.score);
                program.score(sandbox, samples, &|id| fields.get(id).cloned(), &options)?
            }
        })
    }

    /// The trainer's record of iteration `round` becomes the round's metrics; the last round
    /// names the trained policy the trainer saves to `policy`.
    pub(crate) fn finish_iteration(
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

/// Rollouts as the round's sample rows.
pub(crate) fn as_samples(config: &RunConfig, round: u32, rollouts: &[Rollout]) -> Vec<Sample> {
    rollouts
        .iter()
        .map(|r| Sample {
            problem_id: r.problem_id.clone(),
            prompt: r.prompt.clone(),
            completion: r.completion.clone(),
            sample_idx: r.sample_idx,
            round,
            policy: policy_name(config, round),
            seed: r.seed,
            num_tokens: r.num_tokens,
            logprob_sum: r.logprob_sum,
            finish: r.finish,
        })
        .collect()
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
pub(crate) fn write_stage<R: prefloop_core::Record>(dir: &Path, rows: &[R]) -> Result<()> {
    if Manifest::load(dir)?.is_some_and(|m| m.complete) {
        std::fs::remove_dir_all(dir).map_err(crate::PipelineError::io(dir))?;
    }
    let mut writer = StageWriter::<R>::restart(dir, WriterOptions::default())?;
    writer.write(rows)?;
    writer.finish()?;
    Ok(())
}
