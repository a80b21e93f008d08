//! Group-based policy gradients without a critic: GRPO, RLOO and REINFORCE++-baseline
//! (estimators.rs), with DAPO's dynamic sampling, clip-higher and overlong handling, over the
//! online core (online.rs). What the group estimators add to it:
//!
//! - sampling: `group_size` completions for each of the iteration's prompts, scored; groups
//!   whose valid rewards are all equal carry no signal and are dropped, and further prompts
//!   are drawn until the batch holds `rollout_batch_size` informative groups or
//!   `max_extra_draws` draws more have been made (dynamic sampling);
//! - experience: each group's advantages, the KL penalty as a reward where it goes there;
//! - the loss: the k3 KL term where it goes in the loss, an entropy bonus.

use std::collections::HashMap;
use std::path::Path;

use prefloop_model::{Batching, Generator, InProcess, Precision};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, TrainError};
use crate::estimators::{
    Estimator, group_advantages, informative, overlong_penalty, token_advantages,
};
use crate::logprobs::token_logprobs_and_entropy;
use crate::losses::LossAggregation;
use crate::online::{
    Algorithm, Experience, Metrics, OnlineConfig, Policy, Prompts, Sampled, ScoreFn, Settings,
    SurrogateLoss, Trainer, train_online,
};
use crate::optim::OptimConfig;
use crate::rollout::{
    IterationRecord, PromptExample, RewardFn, Rollout, RolloutRequest, SampledFn, pack,
    prompt_stream, sample,
};

/// Where the KL penalty to the reference goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlPenalty {
    /// `kl_coef` × the k3 estimate in the loss, aggregated as the surrogate (GRPO).
    Loss,
    /// `−kl_coef (log π − log π_ref)` per token as a reward, its return to go added to each
    /// token's advantage (k1, as PPO; REINFORCE++).
    Reward,
}

/// See [`GroupConfig::dynamic_sampling_on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingFilter {
    Reward,
    Score,
}

/// What happens to a completion cut at `max_new_tokens` before the policy ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Trained on like any other.
    Keep,
    /// No loss, and left out of its group's statistics (DAPO's overlong filtering).
    Mask,
    /// DAPO's soft overlong punishment added to its reward: 0 up to `max_new_tokens −
    /// overlong_buffer` tokens, then falling linearly to `−overlong_penalty` at the budget.
    Penalty,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Not `deny_unknown_fields`, which serde does not take with `flatten`: whoever reads the
// config refuses the keys nothing took (prefloop_pipeline::unknown_keys).
#[serde(default)]
pub struct GroupConfig {
    /// What every online algorithm has (online.rs), with its defaults.
    #[serde(flatten)]
    pub online: OnlineConfig,
    /// Groups (prompts) per iteration. Default 32.
    pub rollout_batch_size: usize,
    /// Completions sampled per prompt (TRL's `num_generations`, veRL's `n`). Default 8.
    pub group_size: usize,
    /// Minibatches each iteration's rollouts are cut into per epoch (one optimiser step
    /// each; a part left without rows when dynamic sampling kept few is skipped, its place in
    /// the learning-rate schedule with it). Default 1: one on-policy step per iteration.
    pub num_minibatches: usize,
    /// Passes over each iteration's rollouts. Default 1.
    pub epochs: usize,
    /// GRPO divides by the group's standard deviation; false is Dr. GRPO. Default true.
    pub scale_rewards: bool,
    /// Lower clip ε of the ratio. Default 0.2.
    pub clip_low: f64,
    /// Upper clip ε (DAPO's clip-higher: above `clip_low`). Default 0.28.
    pub clip_high: f64,
    /// `token_mean` (DAPO), `seq_mean_token_sum_norm` (Dr. GRPO: token sums over
    /// `max_new_tokens`), `seq_mean_token_sum` (veRL's, unnormalised) or `seq_mean_token_mean`
    /// (GRPO). Default token_mean.
    pub loss_aggregation: LossAggregation,
    /// Where the KL penalty goes: `loss` (k3) or `reward` (k1). Default loss.
    pub kl: KlPenalty,
    /// β of the KL penalty; 0 drops it and the reference model (DAPO). Default 0.04 (GRPO).
    pub kl_coef: f64,
    /// Move the reference towards the policy after every iteration, as PPO's EMA reference;
    /// off keeps the starting policy. Default false.
    pub ema_reference: bool,
    /// Drop groups whose rewards are all equal and draw further prompts. Default true.
    pub dynamic_sampling: bool,
    /// What dynamic sampling compares within a group: `reward`, the reward the estimator
    /// sees (after the overlong penalty), or `score`, the scorer's own (DAPO's filter on
    /// accuracy: a group that all pass or all fail is dropped even where the length penalty
    /// tells its members apart). Default reward.
    pub dynamic_sampling_on: SamplingFilter,
    /// Draws of prompts past the first an iteration may make to fill its batch. Default 2.
    pub max_extra_draws: usize,
    /// `keep`, `mask` or `penalty`. Default mask.
    pub overlong: Overlong,
    /// Tokens before `max_new_tokens` where the soft penalty starts. Default 64.
    pub overlong_buffer: usize,
    /// The soft penalty at `max_new_tokens`. Default 1.0.
    pub overlong_penalty: f64,
    /// Weight of an entropy bonus (subtracted from the loss). Default 0.
    pub entropy_coef: f64,
    /// The policy's optimiser; lr defaults to 1e-6. Warmup and schedule count optimiser steps.
    pub actor: OptimConfig,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            online: OnlineConfig::default(),
            rollout_batch_size: 32,
            group_size: 8,
            num_minibatches: 1,
            epochs: 1,
            scale_rewards: true,
            clip_low: 0.2,
            clip_high: 0.28,
            loss_aggregation: LossAggregation::TokenMean,
            kl: KlPenalty::Loss,
            kl_coef: 0.04,
            ema_reference: false,
            dynamic_sampling: true,
            dynamic_sampling_on: SamplingFilter::Reward,
            max_extra_draws: 2,
            overlong: Overlong::Mask,
            overlong_buffer: 64,
            overlong_penalty: 1.0,
            entropy_coef: 0.0,
            actor: OptimConfig {
                lr: 1e-6,
                ..OptimConfig::default()
            },
        }
    }
}

impl GroupConfig {
    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let check = crate::error::ensure;
        self.online.validate()?;
        crate::error::at_least_one(&[
            ("rollout_batch_size", self.rollout_batch_size as u64),
            ("epochs", self.epochs as u64),
        ])?;
        check(
            self.group_size >= 2,
            "group_size",
            "must be at least 2: a group is its own baseline",
        )?;
        check(
            self.num_minibatches > 0
                && self.num_minibatches <= self.rollout_batch_size * self.group_size,
            "num_minibatches",
            "must be between 1 and the rollouts of an iteration",
        )?;
        check(
            self.clip_low >= 0.0 && self.clip_low < 1.0,
            "clip_low",
            "must be in [0, 1)",
        )?;
        check(self.clip_high >= 0.0, "clip_high", "must be ≥ 0")?;
        check(self.kl_coef >= 0.0, "kl_coef", "must be ≥ 0")?;
        check(
            self.overlong != Overlong::Penalty
                || self.overlong_buffer <= self.online.max_new_tokens,
            "overlong_buffer",
            "must not exceed max_new_tokens",
        )?;
        check(
            !(self.ema_reference && self.online.lora.is_some()),
            "ema_reference",
            "needs full fine-tuning: with LoRA the reference is the base, the adapters off",
        )?;
        self.actor.validate()
    }

    /// Whether the run measures KL to a reference at all.
    pub fn uses_reference(&self) -> bool {
        self.kl_coef > 0.0
    }

    /// The policy this config trains, from the weights at `path` (the embedded default when
    /// None) in `precision`: with fresh adapters when it has `lora`, and with a reference copy
    /// when it has a KL penalty and no adapters to switch off.
    pub fn load_policy(
        &self,
        path: Option<&Path>,
        device: tch::Device,
        precision: Precision,
    ) -> Result<Policy> {
        let (lora, seed) = (self.online.lora.as_ref(), self.online.seed);
        Policy::load(path, device, precision, lora, seed, self.uses_reference())
    }
}

/// A group estimator as an online algorithm.
#[derive(Debug)]
pub struct Group<'c> {
    config: &'c GroupConfig,
    estimator: Estimator,
}

impl<'c> Group<'c> {
    /// `estimator` under `config` (checked here).
    pub fn new(config: &'c GroupConfig, estimator: Estimator) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, estimator })
    }
}

/// Where an iteration's sampling stands across draws.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Positions of the prompt stream used so far (the next draw starts here).
    position: usize,
}

/// The groups an iteration sampled (its rollouts, draw after draw) and the informative ones
/// it trains on.
#[derive(Debug)]
pub struct Groups {
    /// Kept groups: their first row in the iteration's rollouts.
    kept: Vec<usize>,
    /// Prompt index and answer tokens of every rollout.
    prompt_of: Vec<usize>,
    answers: Vec<Vec<u32>>,
    sampled_groups: usize,
    draws: usize,
}

impl Algorithm for Group<'_> {
    type State = Cursor;
    type Detail = Groups;

    fn name(&self) -> String {
        format!("{:?}", self.estimator).to_lowercase()
    }

    fn settings(&self) -> Settings<'_> {
        let config = self.config;
        let kl_in_loss = config.kl == KlPenalty::Loss && config.uses_reference();
        Settings {
            online: &config.online,
            epochs: config.epochs,
            num_minibatches: config.num_minibatches,
            ema_reference: config.ema_reference,
            loss: SurrogateLoss {
                clip_low: config.clip_low,
                clip_high: config.clip_high,
                aggregation: config.loss_aggregation,
                kl_coef: kl_in_loss.then_some(config.kl_coef),
                entropy_coef: config.entropy_coef,
            },
            optimizer: &config.actor,
        }
    }

    /// Draws groups until the batch is full of informative ones (dynamic sampling) or the
    /// draws run out. Rollout seeds come from their position in the prompt stream, so a
    /// resumed iteration draws the same rollouts.
    fn sample<G: Generator, E: From<TrainError>>(
        &self,
        prompts: &Prompts,
        iteration: u64,
        cursor: &mut Cursor,
        generator: &mut G,
        reward: &mut ScoreFn<E>,
    ) -> std::result::Result<Sampled<Groups>, E> {
        let config = self.config;
        let k = config.group_size;
        let wanted = config.rollout_batch_size;
        let (mut rollouts, mut scored) = (Vec::new(), Vec::new());
        let mut groups = Groups {
            kept: Vec::new(),
            prompt_of: Vec::new(),
            answers: Vec::new(),
            sampled_groups: 0,
            draws: 0,
        };
        let mut seen: HashMap<usize, u32> = HashMap::new();
        let draws = if config.dynamic_sampling {
            1 + config.max_extra_draws
        } else {
            1
        };
        while groups.kept.len() < wanted && groups.draws < draws {
            // Each further draw asks for the missing groups over the share found informative
            // so far.
            let missing = wanted - groups.kept.len();
            let size = if groups.draws == 0 {
                wanted
            } else {
                let share = groups.kept.len() as f64 / groups.sampled_groups as f64;
                let size = if share > 0.0 {
                    (missing as f64 / share).ceil() as usize
                } else {
                    wanted
                };
                size.clamp(missing, wanted)
            };
            let first = cursor.position;
            let seed = config.online.seed;
            let chosen = prompt_stream(prompts.examples.len(), seed, first, size);
            cursor.position += size;
            let requests: Vec<RolloutRequest> = chosen
                .iter()
                .enumerate()
                .flat_map(|(j, &prompt)| {
                    let occurrence = seen.entry(prompt).or_default();
                    let base = *occurrence * k as u32;
                    *occurrence += 1;
                    (0..k).map(move |member| RolloutRequest {
                        prompt,
                        // Unique over the run: the stream position and the member.
                        seed: seed ^ ((((first + j) as u64) << 16) | member as u64),
                        sample_idx: base + member as u32,
                    })
                })
                .collect();
            let generated = sample(
                generator,
                &prompts.encoded,
                prompts.examples,
                &requests,
                &config.online.sampling(),
            )?;
            let scores = reward(&generated.rollouts)?;
            let (rewards, valid) = shaped(config, &generated.rollouts, &scores);
            let offset = rollouts.len();
            for g in 0..size {
                let rows = g * k..(g + 1) * k;
                let keep = keeps(
                    config,
                    &rewards[rows.clone()],
                    &scores[rows.clone()],
                    &valid[rows],
                );
                if keep && groups.kept.len() < wanted {
                    groups.kept.push(offset + g * k);
                }
            }
            groups.sampled_groups += size;
            groups.draws += 1;
            groups.prompt_of.extend(requests.iter().map(|r| r.prompt));
            groups.answers.extend(generated.answers);
            rollouts.extend(generated.rollouts);
            scored.extend(scores);
            tracing::debug!(
                iteration,
                draw = groups.draws,
                kept = groups.kept.len(),
                "drew groups"
            );
        }
        Ok(Sampled {
            rollouts,
            scores: scored,
            detail: groups,
        })
    }

    fn experience(
        &mut self,
        policy: &Policy,
        prompts: &Prompts,
        sampled: &Sampled<Groups>,
        _: &mut Cursor,
        metrics: &mut Metrics,
    ) -> Option<Experience> {
        let groups = &sampled.detail;
        metrics.insert("groups/sampled".into(), groups.sampled_groups as f64);
        metrics.insert("groups/kept".into(), groups.kept.len() as f64);
        metrics.insert(
            "groups/dropped_fraction".into(),
            1.0 - groups.kept.len() as f64 / groups.sampled_groups as f64,
        );
        metrics.insert("groups/draws".into(), groups.draws as f64);
        if groups.kept.is_empty() {
            return None;
        }
        Some(make_experience(
            policy,
            &prompts.encoded,
            sampled,
            self.estimator,
            self.config,
        ))
    }
}

/// Runs the group estimator from the prompts; saves `<out>/policy`. `reward` scores each draw's
/// rollouts; `on_sampled` sees every rollout of an iteration with its score once sampling is
/// done (before the update), for whoever keeps them. Killed, the same call resumes from the last
/// checkpoint (policy, optimiser, reference, the prompt stream's position), and an iteration it
/// redoes samples the same rollouts.
#[allow(clippy::too_many_arguments)] // the run's inputs, each documented above
pub fn train_group<E: From<TrainError>>(
    policy: &Policy,
    prompts: &[PromptExample],
    estimator: Estimator,
    reward: &mut RewardFn<E>,
    on_sampled: &mut SampledFn<E>,
    config: &GroupConfig,
    out: &Path,
    on_iteration: impl FnMut(&IterationRecord, u64),
) -> std::result::Result<Vec<IterationRecord>, E> {
    let group = Group::new(config, estimator)?;
    let Some(trainer) = Trainer::start(policy, group, prompts, out)? else {
        return Ok(Vec::new());
    };
    let batching = Batching::new(config.online.generation_batch_size);
    let mut generator = InProcess::new(&policy.actor, batching);
    train_online(trainer, &mut generator, reward, on_sampled, on_iteration)
}

/// The rewards the estimator sees and which members count, after overlong handling.
fn shaped(config: &GroupConfig, rollouts: &[Rollout], scores: &[f32]) -> (Vec<f32>, Vec<bool>) {
    rollouts
        .iter()
        .zip(scores)
        .map(|(r, &score)| {
            let cut = r.finish == prefloop_core::Finish::Length;
            match config.overlong {
                Overlong::Keep => (score, true),
                Overlong::Mask => (score, !cut),
                Overlong::Penalty => {
                    // The length DAPO (veRL) measures: every response token, the EOS the
                    // policy sampled included.
                    let eos = usize::from(r.finish == prefloop_core::Finish::Stop);
                    let penalty = overlong_penalty(
                        r.num_tokens as usize + eos,
                        config.online.max_new_tokens,
                        config.overlong_buffer,
                        config.overlong_penalty,
                    );
                    (score + penalty as f32, true)
                }
            }
        })
        .unzip()
}

/// Whether dynamic sampling keeps a group of these shaped `rewards`, scorer's `scores` and
/// members that count (`valid`).
fn keeps(config: &GroupConfig, rewards: &[f32], scores: &[f32], valid: &[bool]) -> bool {
    let compared = match config.dynamic_sampling_on {
        SamplingFilter::Reward => rewards,
        SamplingFilter::Score => scores,
    };
    !config.dynamic_sampling || informative(compared, valid)
}

/// The kept groups' experience: N = groups × group_size rows, their advantages from each
/// group's rewards (after overlong handling), the KL penalty as a reward where it goes there.
fn make_experience(
    policy: &Policy,
    encoded: &[Vec<u32>],
    sampled: &Sampled<Groups>,
    estimator: Estimator,
    config: &GroupConfig,
) -> Experience {
    let (k, groups) = (config.group_size, &sampled.detail);
    let rows: Vec<usize> = groups
        .kept
        .iter()
        .flat_map(|&first| first..first + k)
        .collect();
    let prompt_of: Vec<usize> = rows.iter().map(|&r| groups.prompt_of[r]).collect();
    let answers: Vec<Vec<u32>> = rows.iter().map(|&r| groups.answers[r].clone()).collect();
    let rollouts: Vec<Rollout> = rows.iter().map(|&r| sampled.rollouts[r].clone()).collect();
    let scores: Vec<f32> = rows.iter().map(|&r| sampled.scores[r]).collect();
    let (rewards, valid) = shaped(config, &rollouts, &scores);
    let batch = pack(
        &policy.actor,
        encoded,
        &prompt_of,
        &answers,
        &config.online.sampling(),
    );
    let device = batch.input_ids.device();
    let valid = Tensor::from_slice(
        &valid
            .iter()
            .map(|&v| f32::from(u8::from(v)))
            .collect::<Vec<_>>(),
    )
    .to_device(device);
    let loss_mask = &batch.loss_mask * valid.unsqueeze(1);
    let (old_logprobs, entropy) = token_logprobs_and_entropy(&policy.actor.decoder, &batch);
    let reference_logprobs = policy.reference_logprobs(&batch, &old_logprobs);
    let rewards = Tensor::from_slice(&rewards).to_device(device);
    let sequence = group_advantages(&rewards, &valid, k as i64, estimator, config.scale_rewards);
    let kl_rewards = (config.kl == KlPenalty::Reward && config.uses_reference())
        .then(|| (&old_logprobs - &reference_logprobs) * -config.kl_coef);
    let advantages = token_advantages(&sequence, &loss_mask, kl_rewards.as_ref(), estimator);
    Experience {
        batch,
        loss_mask,
        old_logprobs,
        reference_logprobs,
        advantages,
        entropy,
        values: None,
        returns: None,
    }
}

#[cfg(test)]
mod tests {
    use prefloop_core::Finish;

    use super::*;

    fn rollout(num_tokens: u32, finish: Finish) -> Rollout {
        Rollout {
            problem_id: "p".into(),
            prompt: "q".into(),
            completion: "a".into(),
            sample_idx: 0,
            seed: 0,
            num_tokens,
            logprob_sum: 0.0,
            finish,
        }
    }

    /// veRL's DAPO reward manager measures a response with its EOS token: 192 tokens and an
    /// EOS under a budget of 256 with a buffer of 64 is one token into the buffer.
    #[test]
    fn the_overlong_penalty_counts_the_eos_token_as_dapo_does() {
        let config = GroupConfig {
            online: OnlineConfig {
                max_new_tokens: 256,
                ..OnlineConfig::default()
            },
            overlong: Overlong::Penalty,
            overlong_buffer: 64,
            overlong_penalty: 1.0,
            ..GroupConfig::default()
        };
        let rollouts = [
            rollout(192, Finish::Stop),
            rollout(192, Finish::StopString),
            rollout(256, Finish::Length),
        ];
        let (rewards, valid) = shaped(&config, &rollouts, &[1.0, 1.0, 1.0]);
        assert_eq!(rewards, [1.0 - 1.0 / 64.0, 1.0, 0.0]);
        assert_eq!(valid, [true, true, true]);
    }

    /// Members told apart only by the overlong penalty: kept when the filter reads the
    /// rewards, dropped when it reads the scores (DAPO's filter on accuracy).
    #[test]
    fn dynamic_sampling_on_scores_drops_a_group_the_length_penalty_alone_splits() {
        let (rewards, scores, valid) = ([1.0, 0.98], [1.0, 1.0], [true, true]);
        let on = |filter| GroupConfig {
            dynamic_sampling_on: filter,
            ..GroupConfig::default()
        };
        assert!(keeps(
            &on(SamplingFilter::Reward),
            &rewards,
            &scores,
            &valid
        ));
        assert!(!keeps(
            &on(SamplingFilter::Score),
            &rewards,
            &scores,
            &valid
        ));
        let off = GroupConfig {
            dynamic_sampling: false,
            ..on(SamplingFilter::Score)
        };
        assert!(keeps(&off, &rewards, &scores, &valid));
    }
}
