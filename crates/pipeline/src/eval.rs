//! Held-out evaluation (`[eval]`): a round's policy sampled on prompts no round trains on,
//! scored by the run's scorer into `round-NNNN/eval/{samples,scores}`, and summarised in the
//! round's metrics as `eval/reward/mean|std` and `eval/kl_to_start`, the KL of the round's
//! policy to the starting one on those samples. DPO-Iter evaluates the policy a round samples
//! from; PPO and the group estimators evaluate the actor as it samples the iteration's
//! rollouts, before their update; the final generation evaluates the final policy. Resumable
//! as the round's own stages are: a killed evaluation continues after the rows it wrote.

use std::path::Path;
use std::time::Instant;

use prefloop_data::{Manifest, stage_stats};
use prefloop_model::{Batching, InProcess, Model, best_device};
use prefloop_train::Encoder;

use crate::config::GenerateConfig;
use crate::error::Result;
use crate::generate::{PromptRow, generate_stage, row_seed};
use crate::inputs::program_fields;
use crate::metrics::mean_log_ratio;
use crate::rounds::{Run, policy_name};
use crate::run_dir::Stage;
use crate::score::{Task, score_stage_with};
use crate::shard::Shard;

/// Under a round's directory: the held-out evaluation's samples and scores stages.
pub const EVAL_DIR: &str = "eval";
/// The round metric of the held-out evaluation.
const EVAL_REWARD: &str = "eval/reward/mean";
/// Mixed into the held-out rows' seeds.
const EVAL_SEED: u64 = 0x6576_616c; // "eval"

impl Run<'_> {
    /// Whether round `round` is still to be evaluated: every `eval.every`-th round and the
    /// final generation's, once.
    pub(crate) fn eval_due(&self, round: u32) -> bool {
        let eval = &self.config.eval;
        eval.prompts.is_some()
            && (round.is_multiple_of(eval.every) || round == self.config.rounds)
            && !self.state.rounds[round as usize]
                .measured
                .contains_key(EVAL_REWARD)
    }

    /// The round's policy, loaded into `model` unless it is there already, on the held-out
    /// prompts.
    pub(crate) fn evaluate(&mut self, round: u32, model: &mut Option<Model>) -> Result<()> {
        if !self.eval_due(round) {
            return Ok(());
        }
        self.load_policy(round, model)?;
        self.evaluate_policy(round, model.as_ref().expect("loaded"))
    }

    /// `policy`, round `round`'s, on the held-out prompts, if the round is due.
    pub(crate) fn evaluate_policy(&mut self, round: u32, policy: &Model) -> Result<()> {
        let (dir, config) = (self.dir, self.config);
        let Some(path) = config
            .eval
            .prompts
            .as_deref()
            .filter(|_| self.eval_due(round))
        else {
            return Ok(());
        };
        let began = Instant::now();
        let prompts = crate::generate::read_prompts(path)?;
        let eval_dir = dir.round_dir(round).join(EVAL_DIR);
        let (samples, scores) = (
            eval_dir.join(Stage::Generate.dir_name()),
            eval_dir.join(Stage::Score.dir_name()),
        );
        let complete = |stage: &Path| -> Result<bool> {
            Ok(Manifest::load(stage)?.is_some_and(|m| m.complete))
        };
        if !complete(&samples)? {
            self.generate_eval(round, policy, &prompts, &samples)?;
        }
        if !complete(&scores)? {
            self.score_eval(&prompts, &samples, &scores)?;
        }
        let kl = self.kl_to_start(round, policy, &samples)?;
        let stats = stage_stats(&samples, &scores, &[])?;
        let entry = &mut self.state.rounds[round as usize];
        if let Some(kl) = kl {
            entry.measured.insert("eval/kl_to_start".into(), kl);
        }
        if let Some(stats) = stats.first() {
            entry.measured.insert(EVAL_REWARD.into(), stats.reward_mean);
            entry
                .measured
                .insert("eval/reward/std".into(), stats.reward_std);
        }
        entry
            .measured
            .insert("time/eval".into(), began.elapsed().as_secs_f64());
        dir.save_state(&self.state)
    }

    /// KL(π_round ‖ π_start) on the held-out samples (`eval.kl_to_start`): 0 for round 0's
    /// policy, which is the start, and for a DPO-Iter round whose earlier rounds trained
    /// nothing.
    fn kl_to_start(&self, round: u32, policy: &Model, samples: &Path) -> Result<Option<f64>> {
        let config = self.config;
        if !config.eval.kl_to_start {
            return Ok(None);
        }
        let start = config.model.as_deref();
        let sampled_from = &self.state.rounds[round as usize].policy;
        if round == 0 || sampled_from.as_path() == start.unwrap_or(Path::new("")) {
            return Ok(Some(0.0));
        }
        let reference = Model::load(start, best_device(), config.dtype)?;
        mean_log_ratio(config, policy, &reference, samples).map(Some)
    }

    /// The held-out prompts sampled from `policy` into `out`.
    fn generate_eval(
        &mut self,
        round: u32,
        policy: &Model,
        prompts: &[PromptRow],
        out: &Path,
    ) -> Result<()> {
        let config = self.config;
        let generate = GenerateConfig {
            n: config.eval.n.unwrap_or(config.generate.n),
            ..config.generate.clone()
        };
        // Seeds of their own: the held-out rows never repeat a training row's draws.
        let seed = row_seed(config.generate.seed ^ EVAL_SEED, u64::from(round));
        let encoder = Encoder::new(&policy.tokenizer, config.score_encoding())?;
        let mut generator = InProcess::new(policy, Batching::new(generate.batch_size));
        generate_stage(
            &mut generator,
            &encoder,
            prompts,
            &generate,
            &policy_name(config, round),
            round,
            seed,
            Shard::WHOLE,
            out,
        )?;
        Ok(())
    }

    /// The held-out samples scored by the run's scorer into `scores`.
    fn score_eval(&mut self, prompts: &[PromptRow], samples: &Path, scores: &Path) -> Result<()> {
        let fields = program_fields(prompts);
        let task = Task {
            problems: &self.inputs.by_id,
            fields: &fields,
        };
        score_stage_with(&mut self.scorer, task, samples, Shard::WHOLE, scores)?;
        // Each scorer's mean is the training rows' to report.
        self.scorer.part_means();
        Ok(())
    }
}
