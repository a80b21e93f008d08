//! Group-based policy gradients without a critic: GRPO, RLOO and REINFORCE++-baseline
//! (estimators.rs), with DAPO's dynamic sampling, clip-higher and overlong handling. One
//! iteration, as one loop:
//!
//! 1. sample `group_size` completions for each of the iteration's prompts and score them;
//!    groups whose valid rewards are all equal carry no signal and are dropped, and further
//!    prompts are drawn until the batch holds `rollout_batch_size` informative groups or
//!    `max_extra_draws` draws more have been made (dynamic sampling);
//! 2. make experience: the sampling policy's and the reference's log-probs, each group's
//!    advantages, the KL penalty as a reward where it goes there;
//! 3. epochs over shuffled minibatches of the clipped surrogate, the k3 KL term where it goes
//!    in the loss, an entropy bonus;
//! 4. move the EMA reference, if it is one; log; checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use prefloop_model::{LoraConfig, Model, Precision, SamplingParams};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Part};
use crate::ema::EmaReference;
use crate::error::Result;
use crate::estimators::{
    Estimator, group_advantages, informative, overlong_penalty, token_advantages,
};
use crate::examples::EncodeConfig;
use crate::logprobs::{TokenBatch, TokenLogprobs, token_logprobs, token_logprobs_and_entropy};
use crate::losses::{LossAggregation, k3_kl, masked_mean, policy_loss};
use crate::optim::{AdamW, OptimConfig};
use crate::rollout::{
    IterationRecord, Iterations, PromptExample, RewardFn, Rollout, RolloutRequest, SampledFn,
    check_scores, encode_prompts, exact_weights, pack, prompt_stream, sample, truncated,
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
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    /// Sample → update iterations. Default 10.
    pub iterations: u64,
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
    /// Rows per forward pass inside a minibatch (gradients accumulate, weighted as the
    /// aggregation weighs rows): a memory knob that does not change the result. Default 8.
    pub micro_batch_size: usize,
    /// Rows generated together. Default 64.
    pub generation_batch_size: usize,
    /// Default 256.
    pub max_new_tokens: usize,
    /// Default 1.0 (the paper's).
    pub temperature: f64,
    /// Default 200 (the paper's).
    pub top_k: i64,
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
    /// η of the EMA. Default 0.001.
    pub ema_eta: f64,
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
    pub encode: EncodeConfig,
    /// Seeds the prompt order, the sampling and the minibatch order. Default 0.
    pub seed: u64,
    /// Iterations between checkpoints. Default 1.
    pub checkpoint_every: u64,
    /// LoRA adapters trained instead of every weight (`[lora]`); the reference is then the
    /// base with the adapters off, not a second model. Default: none.
    pub lora: Option<LoraConfig>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            iterations: 10,
            rollout_batch_size: 32,
            group_size: 8,
            num_minibatches: 1,
            epochs: 1,
            micro_batch_size: 8,
            generation_batch_size: 64,
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: 200,
            scale_rewards: true,
            clip_low: 0.2,
            clip_high: 0.28,
            loss_aggregation: LossAggregation::TokenMean,
            kl: KlPenalty::Loss,
            kl_coef: 0.04,
            ema_reference: false,
            ema_eta: 0.001,
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
            encode: EncodeConfig::default(),
            seed: 0,
            checkpoint_every: 1,
            lora: None,
        }
    }
}

impl GroupConfig {
    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let check = crate::error::ensure;
        crate::error::at_least_one(&[
            ("iterations", self.iterations),
            ("rollout_batch_size", self.rollout_batch_size as u64),
            ("epochs", self.epochs as u64),
            ("micro_batch_size", self.micro_batch_size as u64),
            ("generation_batch_size", self.generation_batch_size as u64),
            ("max_new_tokens", self.max_new_tokens as u64),
            ("checkpoint_every", self.checkpoint_every),
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
            (0.0..=1.0).contains(&self.ema_eta),
            "ema_eta",
            "must be in [0, 1]",
        )?;
        check(
            self.overlong != Overlong::Penalty || self.overlong_buffer <= self.max_new_tokens,
            "overlong_buffer",
            "must not exceed max_new_tokens",
        )?;
        check(
            !(self.ema_reference && self.lora.is_some()),
            "ema_reference",
            "needs full fine-tuning: with LoRA the reference is the base, the adapters off",
        )?;
        crate::validate_online_lora(self.lora.as_ref())?;
        self.encode.validate()?;
        self.actor.validate()
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: 1.0,
            max_new_tokens: self.max_new_tokens,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    /// Whether the run needs a reference model at all.
    fn uses_reference(&self) -> bool {
        self.kl_coef > 0.0
    }

    /// Optimiser steps of the whole run, which the schedule spans.
    fn total_steps(&self) -> u64 {
        self.iterations * (self.epochs * self.num_minibatches) as u64
    }
}

/// The models a group estimator holds: the policy, and the reference when a KL penalty needs
/// one and the policy has no LoRA adapters to switch off.
#[derive(Debug)]
pub struct GroupModels {
    pub actor: Model,
    pub reference: Option<Model>,
}

impl GroupModels {
    /// The policy (with fresh adapters when `config` has `lora`; and, when `config` has a KL
    /// penalty and no LoRA, the reference) from the weights at `path` (the embedded default
    /// when None), in `precision`.
    pub fn load(
        path: Option<&Path>,
        device: tch::Device,
        precision: Precision,
        config: &GroupConfig,
    ) -> Result<Self> {
        let reference = match config.uses_reference() && config.lora.is_none() {
            true => {
                let mut reference = Model::load(path, device, precision)?;
                reference.vs.freeze();
                Some(reference)
            }
            false => None,
        };
        let actor = Model::load(path, device, precision)?;
        Ok(Self {
            actor: crate::with_lora(actor, config.lora.as_ref(), config.seed)?,
            reference,
        })
    }

    fn parts<'a>(
        &'a self,
        actor: &'a mut AdamW,
        ema: Option<&'a mut EmaReference>,
    ) -> Vec<Part<'a>> {
        let mut parts = vec![Part::trained("policy", self.actor.trainable(), actor)];
        if let Some(reference) = &self.reference {
            parts.push(Part {
                name: "reference",
                vs: &reference.vs,
                optimizer: None,
                ema,
            });
        }
        parts
    }
}

/// Where an iteration's sampling stands across draws.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Cursor {
    /// Positions of the prompt stream used so far (the next draw starts here).
    position: usize,
}

/// The groups an iteration sampled and the informative ones it trains on.
#[derive(Debug)]
struct Groups {
    /// Every rollout sampled this iteration, draw after draw, and its score.
    rollouts: Vec<Rollout>,
    scores: Vec<f32>,
    /// Kept groups: their first row in `rollouts`.
    kept: Vec<usize>,
    /// Prompt index and answer tokens of every rollout.
    prompt_of: Vec<usize>,
    answers: Vec<Vec<u32>>,
    sampled_groups: usize,
    draws: usize,
    tokens: usize,
    /// Seconds spent in the reward function.
    scoring: f64,
}

/// Runs the group estimator from the prompts; saves `<out>/policy`. `reward` scores each draw's
/// rollouts; `on_sampled` sees every rollout of an iteration with its score once sampling is
/// done (before the update), for whoever keeps them. Killed, the same call resumes from the last
/// checkpoint (policy, optimiser, reference, the prompt stream's position), and an iteration it
/// redoes samples the same rollouts.
#[allow(clippy::too_many_arguments)] // the run's inputs, each documented above
pub fn train_group(
    models: &GroupModels,
    prompts: &[PromptExample],
    estimator: Estimator,
    reward: &mut RewardFn,
    on_sampled: &mut SampledFn,
    config: &GroupConfig,
    out: &Path,
    mut on_iteration: impl FnMut(&IterationRecord, u64),
) -> Result<Vec<IterationRecord>> {
    config.validate()?;
    let actor = &models.actor;
    let Some(encoded) = encode_prompts(actor, prompts, &config.encode, out)? else {
        return Ok(Vec::new());
    };
    let mut actor_opt = AdamW::new(actor.trainable(), config.actor.clone())?;
    let mut ema = match (&models.reference, config.ema_reference) {
        (Some(reference), true) => Some(EmaReference::new(&reference.vs, config.ema_eta)),
        _ => None,
    };
    let (mut log, start, mut cursor): (_, _, Cursor) = Iterations::resume(
        out,
        &mut models.parts(&mut actor_opt, ema.as_mut()),
        (config.seed, prompts.len()),
        (config.iterations, config.checkpoint_every),
    )?;

    for iteration in start..config.iterations {
        let mut metrics = BTreeMap::new();

        // 1. Sample and score, drawing more prompts while groups carry no signal.
        let began = Instant::now();
        let groups = draw_groups(
            actor,
            &encoded,
            prompts,
            config,
            iteration,
            &mut cursor,
            reward,
        )?;
        on_sampled(iteration, &groups.rollouts, &groups.scores)?;
        let seconds = began.elapsed().as_secs_f64() - groups.scoring;
        metrics.insert("time/generate".into(), seconds);
        metrics.insert("time/score".into(), groups.scoring);
        metrics.insert(
            "generate/tokens_per_s".into(),
            groups.tokens as f64 / seconds.max(1e-9),
        );
        let count = groups.scores.len() as f64;
        let mean = groups.scores.iter().map(|&s| f64::from(s)).sum::<f64>() / count;
        let var = groups
            .scores
            .iter()
            .map(|&s| (f64::from(s) - mean).powi(2))
            .sum::<f64>()
            / (count - 1.0).max(1.0);
        metrics.insert("reward/mean".into(), mean);
        metrics.insert("reward/std".into(), var.sqrt());
        metrics.insert(
            "truncated".into(),
            truncated(&groups.rollouts)
                .iter()
                .map(|&t| f64::from(t))
                .sum::<f64>()
                / count,
        );
        metrics.insert("groups/sampled".into(), groups.sampled_groups as f64);
        metrics.insert("groups/kept".into(), groups.kept.len() as f64);
        metrics.insert(
            "groups/dropped_fraction".into(),
            1.0 - groups.kept.len() as f64 / groups.sampled_groups as f64,
        );
        metrics.insert("groups/draws".into(), groups.draws as f64);

        if groups.kept.is_empty() {
            tracing::warn!(
                iteration,
                "no group carried signal: the policy is not updated"
            );
        } else {
            // 2. Experience.
            let began = Instant::now();
            let experience = make_experience(models, &encoded, &groups, estimator, config);
            let mask = &experience.loss_mask;
            let kl = (&experience.old_logprobs - &experience.reference_logprobs) * mask;
            metrics.insert("kl".into(), masked_mean(&kl, mask).double_value(&[]));
            metrics.insert(
                "entropy".into(),
                masked_mean(&experience.entropy, mask).double_value(&[]),
            );
            metrics.insert(
                "response_length".into(),
                experience
                    .batch
                    .loss_mask
                    .sum_dim_intlist([1].as_slice(), false, Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]),
            );
            metrics.insert("time/experience".into(), began.elapsed().as_secs_f64());

            // 3. Train.
            let began = Instant::now();
            metrics.extend(train_on(
                models,
                &experience,
                config,
                iteration,
                &mut actor_opt,
            ));
            metrics.insert("time/train".into(), began.elapsed().as_secs_f64());
        }

        // 4. The reference.
        let began = Instant::now();
        if let Some(ema) = &mut ema {
            let shift = ema.update(&exact_weights(actor, &actor_opt));
            metrics.insert("ema/reference_shift".into(), shift);
        }
        metrics.insert(
            "time/reference_update".into(),
            began.elapsed().as_secs_f64(),
        );

        let record = IterationRecord {
            step: iteration + 1,
            metrics,
        };
        let parts = models.parts(&mut actor_opt, ema.as_mut());
        log.finish(record, &mut on_iteration, &parts, &cursor)?;
    }
    actor.save(&out.join(crate::POLICY_DIR))?;
    checkpoint::remove_all(out)?;
    Ok(log.records())
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
                        config.max_new_tokens,
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

/// Draws groups until the batch is full of informative ones (dynamic sampling) or the draws
/// run out. Rollout seeds come from their position in the prompt stream, so a resumed
/// iteration draws the same rollouts.
fn draw_groups(
    actor: &Model,
    encoded: &[Vec<u32>],
    prompts: &[PromptExample],
    config: &GroupConfig,
    iteration: u64,
    cursor: &mut Cursor,
    reward: &mut RewardFn,
) -> Result<Groups> {
    let k = config.group_size;
    let wanted = config.rollout_batch_size;
    let mut groups = Groups {
        rollouts: Vec::new(),
        scores: Vec::new(),
        kept: Vec::new(),
        prompt_of: Vec::new(),
        answers: Vec::new(),
        sampled_groups: 0,
        draws: 0,
        tokens: 0,
        scoring: 0.0,
    };
    let mut seen: HashMap<usize, u32> = HashMap::new();
    let draws = if config.dynamic_sampling {
        1 + config.max_extra_draws
    } else {
        1
    };
    while groups.kept.len() < wanted && groups.draws < draws {
        // Each further draw asks for the missing groups over the share found informative so far.
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
        let chosen = prompt_stream(prompts.len(), config.seed, first, size);
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
                    seed: config.seed ^ ((((first + j) as u64) << 16) | member as u64),
                    sample_idx: base + member as u32,
                })
            })
            .collect();
        let sampled = sample(
            actor,
            encoded,
            prompts,
            &requests,
            &config.sampling(),
            config.generation_batch_size,
        )?;
        let scoring = Instant::now();
        let scores = reward(iteration, &sampled.rollouts)?;
        groups.scoring += scoring.elapsed().as_secs_f64();
        check_scores(&scores, &sampled.rollouts)?;
        let (rewards, valid) = shaped(config, &sampled.rollouts, &scores);
        let offset = groups.rollouts.len();
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
        groups.tokens += sampled.tokens;
        groups.prompt_of.extend(requests.iter().map(|r| r.prompt));
        groups.answers.extend(sampled.answers);
        groups.rollouts.extend(sampled.rollouts);
        groups.scores.extend(scores);
        tracing::debug!(
            iteration,
            draw = groups.draws,
            kept = groups.kept.len(),
            "drew groups"
        );
    }
    Ok(groups)
}

/// What the update trains on: the kept groups' rollouts, N = groups × group_size rows,
/// right-padded to T tokens; per-token tensors (N, T-1) as PPO's.
#[derive(Debug)]
struct GroupExperience {
    batch: TokenBatch,
    /// (N, T-1) the batch's completion tokens, less those of rows that carry no loss
    /// (overlong-masked).
    loss_mask: Tensor,
    /// (N, T-1) log π_old, the policy that sampled.
    old_logprobs: Tensor,
    /// (N, T-1) log π_ref (log π_old when there is no reference).
    reference_logprobs: Tensor,
    /// (N, T-1) per-token advantages.
    advantages: Tensor,
    /// (N, T-1) the policy's entropy (a diagnostic).
    entropy: Tensor,
}

fn make_experience(
    models: &GroupModels,
    encoded: &[Vec<u32>],
    groups: &Groups,
    estimator: Estimator,
    config: &GroupConfig,
) -> GroupExperience {
    let k = config.group_size;
    let rows: Vec<usize> = groups
        .kept
        .iter()
        .flat_map(|&first| first..first + k)
        .collect();
    let prompt_of: Vec<usize> = rows.iter().map(|&r| groups.prompt_of[r]).collect();
    let answers: Vec<Vec<u32>> = rows.iter().map(|&r| groups.answers[r].clone()).collect();
    let rollouts: Vec<Rollout> = rows.iter().map(|&r| groups.rollouts[r].clone()).collect();
    let scores: Vec<f32> = rows.iter().map(|&r| groups.scores[r]).collect();
    let (rewards, valid) = shaped(config, &rollouts, &scores);
    let batch = pack(
        &models.actor,
        encoded,
        &prompt_of,
        &answers,
        &config.sampling(),
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
    let (old_logprobs, entropy) = token_logprobs_and_entropy(&models.actor.decoder, &batch);
    let actor = &models.actor.decoder;
    let reference_logprobs = match &models.reference {
        Some(reference) => token_logprobs(&reference.decoder, &batch),
        // LoRA: the reference is the base the adapters sit on.
        None if config.uses_reference() => actor.without_adapters(|| token_logprobs(actor, &batch)),
        None => old_logprobs.shallow_clone(),
    };
    let rewards = Tensor::from_slice(&rewards).to_device(device);
    let sequence = group_advantages(&rewards, &valid, k as i64, estimator, config.scale_rewards);
    let kl_rewards = (config.kl == KlPenalty::Reward && config.uses_reference())
        .then(|| (&old_logprobs - &reference_logprobs) * -config.kl_coef);
    let advantages = token_advantages(&sequence, &loss_mask, kl_rewards.as_ref(), estimator);
    GroupExperience {
        batch,
        loss_mask,
        old_logprobs,
        reference_logprobs,
        advantages,
        entropy,
    }
}

/// Epochs over shuffled minibatches; returns the mean losses and diagnostics.
fn train_on(
    models: &GroupModels,
    e: &GroupExperience,
    config: &GroupConfig,
    iteration: u64,
    optimizer: &mut AdamW,
) -> BTreeMap<String, f64> {
    let n = e.batch.input_ids.size()[0] as usize;
    let device = e.batch.input_ids.device();
    let aggregation = config.loss_aggregation;
    let row_weights: Vec<f64> = Vec::<f32>::try_from(
        &e.loss_mask
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
            .to_device(tch::Device::Cpu),
    )
    .expect("a host f32 tensor")
    .into_iter()
    .map(|tokens| aggregation.row_weight(f64::from(tokens)))
    .collect();
    let kl_in_loss = config.kl == KlPenalty::Loss && config.uses_reference();
    let total_steps = config.total_steps();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut steps = 0.0;
    let mut rng =
        StdRng::seed_from_u64(config.seed ^ iteration.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let minibatches = config.num_minibatches;
    for epoch in 0..config.epochs {
        let mut order: Vec<i64> = (0..n as i64).collect();
        order.shuffle(&mut rng);
        for m in 0..minibatches {
            // Always `num_minibatches` parts, however few rows dynamic sampling kept, and the
            // learning rate of the step's planned place in the run: the schedule spans
            // `total_steps` and reaches its end with the run, whatever was skipped.
            let minibatch = &order[m * n / minibatches..(m + 1) * n / minibatches];
            let position =
                (iteration * config.epochs as u64 + epoch as u64) * minibatches as u64 + m as u64;
            let weight_of =
                |rows: &[i64]| rows.iter().map(|&r| row_weights[r as usize]).sum::<f64>();
            let total = weight_of(minibatch);
            if total == 0.0 {
                continue; // every row masked: nothing to learn from
            }
            let mut add = |name: &str, value: f64, weight: f64| {
                *sums.entry(name.to_string()).or_default() += value * weight;
            };
            for micro in minibatch.chunks(config.micro_batch_size) {
                let weight = weight_of(micro) / total;
                if weight == 0.0 {
                    continue;
                }
                let rows = Tensor::from_slice(micro).to_device(device);
                let batch = e.batch.select(&rows);
                let pick = |t: &Tensor| t.index_select(0, &rows);
                let mask = pick(&e.loss_mask);
                let decoder = &models.actor.decoder;
                let logprobs = decoder.training(|| match config.entropy_coef > 0.0 {
                    true => TokenLogprobs::with_entropy(decoder, &batch),
                    false => TokenLogprobs::forward(decoder, &batch),
                });
                let out = policy_loss(
                    &logprobs.values,
                    &pick(&e.old_logprobs),
                    &pick(&e.advantages),
                    &mask,
                    config.clip_low,
                    config.clip_high,
                    aggregation,
                    config.max_new_tokens,
                );
                let mut loss = out.loss.shallow_clone();
                if kl_in_loss {
                    let kl = k3_kl(&logprobs.values, &pick(&e.reference_logprobs));
                    let kl = aggregation.apply(&kl, &mask, config.max_new_tokens);
                    add("kl_loss", kl.double_value(&[]), weight);
                    loss += kl * config.kl_coef;
                }
                if let Some(entropy) = &logprobs.entropy {
                    loss -= aggregation.apply(entropy, &mask, config.max_new_tokens)
                        * config.entropy_coef;
                }
                (&loss * weight).backward();
                logprobs.backward(&models.actor.decoder);
                optimizer.accumulate();
                add("policy_loss", out.loss.double_value(&[]), weight);
                add("loss", loss.double_value(&[]), weight);
                add("clip_fraction", out.clip_fraction.double_value(&[]), weight);
                add(
                    "clip_fraction/low",
                    out.clip_low_fraction.double_value(&[]),
                    weight,
                );
                add(
                    "clip_fraction/high",
                    out.clip_high_fraction.double_value(&[]),
                    weight,
                );
                add("approx_kl", out.approx_kl.double_value(&[]), weight);
            }
            add("grad_norm", optimizer.clip_grad_norm(), 1.0);
            let lr = config.actor.lr_at(position, total_steps);
            add("lr", lr, 1.0);
            optimizer.step(lr);
            optimizer.zero_grad();
            steps += 1.0;
        }
    }
    sums.into_iter()
        .map(|(k, v)| (k, v / f64::max(steps, 1.0)))
        .collect()
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
            max_new_tokens: 256,
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
