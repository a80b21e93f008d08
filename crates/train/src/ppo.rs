//! PPO with an actor, a critic, a reference and a reward (DESIGN §4), laid out as OpenRLHF's
//! `fit()`: generate rollouts → make experience → train actor and critic over minibatches for
//! several PPO epochs → update the reference (EMA) → log. Each of the paper's tricks
//! (advantage normalisation, large batch, EMA reference; value normalisation too) is a config
//! switch, so the paper's ablation is four configs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use prefloop_model::{LoraConfig, Model, Precision, SamplingParams};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::advantage::{
    RunningMoments, gae, kl_penalised_rewards, last_token_one_hot, normalise_advantages,
};
use crate::checkpoint::{self, Part};
use crate::ema::EmaReference;
use crate::error::Result;
use crate::examples::EncodeConfig;
use crate::logprobs::{TokenBatch, TokenLogprobs, token_logprobs, token_logprobs_and_entropy};
use crate::losses::{LossAggregation, masked_mean, policy_loss, value_loss};
use crate::optim::{AdamW, OptimConfig};
use crate::reward::RewardModel;
use crate::rollout::{
    IterationRecord, Iterations, PromptExample, RewardFn, RolloutRequest, check_scores,
    encode_prompts, exact_weights, pack, prompt_stream, sample, truncated,
};

/// Where the critic is saved under the output directory (the actor goes to `policy`).
pub const CRITIC_DIR: &str = "critic";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Rollout → train iterations. Default 10.
    pub iterations: u64,
    /// Rollouts per iteration, one per prompt (the paper's large batch: 512). Default 512.
    pub rollout_batch_size: usize,
    /// Minibatches each rollout batch is cut into per PPO epoch (one optimiser step each).
    /// Default 4.
    pub num_minibatches: usize,
    /// Passes over each rollout batch: 5 for dialogue, 16 for code in the paper. Default 5.
    pub ppo_epochs: usize,
    /// Rows per forward pass inside a minibatch (gradients accumulate, each micro-batch
    /// weighted by its share of the minibatch's tokens, as the losses are token means): a
    /// memory knob that does not change the result. Default 8.
    pub micro_batch_size: usize,
    /// Rows generated together. Default 64.
    pub generation_batch_size: usize,
    /// Default 256.
    pub max_new_tokens: usize,
    /// Default 1.0.
    pub temperature: f64,
    /// Default 200.
    pub top_k: i64,
    /// β_KL of the per-token penalty `-β_KL (log π - log π_ref)`. Default 0.1.
    pub kl_coef: f64,
    /// The score is clipped to ±this. Default 20.
    pub reward_clip: f64,
    /// GAE discount γ. Default 1.
    pub gamma: f64,
    /// GAE λ. Default 1.
    pub lambda: f64,
    /// Rollouts cut at `max_new_tokens` before the policy ended them: `bootstrap` gives them
    /// no score and lets GAE bootstrap from the critic's value of the state they stopped in
    /// (ReaLHF, the paper's code); `score` scores them as if they had ended. Default bootstrap.
    pub truncated: Truncated,
    /// Clip ε of the surrogate. Default 0.2.
    pub clip_eps: f64,
    /// Clip of the value loss around the rollout's values. Default 0.2.
    pub value_clip: f64,
    /// Whiten advantages over each rollout batch. Default true.
    pub advantage_normalisation: bool,
    /// The critic learns normalised returns (running mean and std). Default true.
    pub value_normalisation: bool,
    /// `π_ref ← (1-η) π_ref + η π_actor` after every iteration; off keeps the starting policy.
    /// Default true.
    pub ema_reference: bool,
    /// η of the EMA. Default 0.001 (ReaLHF).
    pub ema_eta: f64,
    /// Actor optimiser; lr defaults to 1e-5. Its warmup and schedule count optimiser steps:
    /// iterations × ppo_epochs × minibatches.
    pub actor: OptimConfig,
    /// Critic optimiser; lr defaults to 5e-6; scheduled as the actor's.
    pub critic: OptimConfig,
    pub encode: EncodeConfig,
    /// Seeds prompt order and sampling. Default 0.
    pub seed: u64,
    /// Iterations between checkpoints. Default 1.
    pub checkpoint_every: u64,
    /// LoRA adapters trained instead of every weight (`[lora]`), on the actor and on the
    /// critic (its adapters and value head); the reference is then the actor with its
    /// adapters switched off, with no second copy of the model, so `ema_reference` must be
    /// off. Default: none, full fine-tuning.
    pub lora: Option<LoraConfig>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        let optim = |lr| OptimConfig {
            lr,
            ..OptimConfig::default()
        };
        Self {
            iterations: 10,
            rollout_batch_size: 512,
            num_minibatches: 4,
            ppo_epochs: 5,
            micro_batch_size: 8,
            generation_batch_size: 64,
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: 200,
            kl_coef: 0.1,
            reward_clip: 20.0,
            gamma: 1.0,
            lambda: 1.0,
            truncated: Truncated::Bootstrap,
            clip_eps: 0.2,
            value_clip: 0.2,
            advantage_normalisation: true,
            value_normalisation: true,
            ema_reference: true,
            ema_eta: 0.001,
            actor: optim(1e-5),
            critic: optim(5e-6),
            encode: EncodeConfig::default(),
            seed: 0,
            checkpoint_every: 1,
            lora: None,
        }
    }
}

/// What a rollout cut at `max_new_tokens` is worth (see [`PpoConfig::truncated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncated {
    Bootstrap,
    Score,
}

impl PpoConfig {
    /// How rollouts are sampled.
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

    /// Minibatches per PPO epoch: the rollout batch cut into `num_minibatches` equal parts
    /// (the last may be smaller, or there may be fewer when the batch does not divide).
    fn minibatches(&self) -> usize {
        let size = self.rollout_batch_size.div_ceil(self.num_minibatches);
        self.rollout_batch_size.div_ceil(size)
    }

    /// Optimiser steps of the whole run, which the learning-rate schedules span.
    fn total_steps(&self) -> u64 {
        self.iterations * (self.ppo_epochs * self.minibatches()) as u64
    }

    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let check = crate::error::ensure;
        crate::error::at_least_one(&[
            ("iterations", self.iterations),
            ("ppo_epochs", self.ppo_epochs as u64),
            ("micro_batch_size", self.micro_batch_size as u64),
            ("generation_batch_size", self.generation_batch_size as u64),
            ("max_new_tokens", self.max_new_tokens as u64),
            ("checkpoint_every", self.checkpoint_every),
        ])?;
        check(
            self.num_minibatches > 0 && self.rollout_batch_size >= self.num_minibatches,
            "num_minibatches",
            "must be between 1 and rollout_batch_size",
        )?;
        check(
            (0.0..=1.0).contains(&self.ema_eta),
            "ema_eta",
            "must be in [0, 1]",
        )?;
        check(
            !(self.ema_reference && self.lora.is_some()),
            "ema_reference",
            "with lora the reference is the base with the adapters off and cannot move: \
             set ema_reference = false",
        )?;
        crate::validate_online_lora(self.lora.as_ref())?;
        self.encode.validate()?;
        self.actor.validate()?;
        self.critic.validate()
    }
}

/// Everything PPO trains on from one rollout batch: B rollouts of prompt + completion,
/// right-padded to T tokens. Per-token tensors are (B, T-1) and aligned with the next-token
/// targets: position t is the action `input_ids[:, t+1]` taken in state `input_ids[:, ..=t]`.
#[derive(Debug)]
pub struct Experience {
    /// Token ids, attention mask, and `loss_mask` (B, T-1): 1 on completion tokens (the
    /// actions), 0 on prompt and padding.
    pub batch: TokenBatch,
    /// (B, T-1) log π_old(a_t | s_t): the actor that sampled, recomputed in one fp32 forward.
    pub old_logprobs: Tensor,
    /// (B, T-1) log π_ref(a_t | s_t).
    pub reference_logprobs: Tensor,
    /// (B, T-1) the critic's V(s_t) at sampling time, on the critic's (normalised) scale.
    pub values: Tensor,
    /// (B,) the reward function's score of each completion, before clipping.
    pub scores: Tensor,
    /// (B,) 1.0 where the rollout was cut at `max_new_tokens` before the policy ended it.
    pub truncated: Tensor,
    /// (B, T-1) per-token rewards: KL penalty everywhere, clipped score at the last action.
    pub rewards: Tensor,
    /// (B, T-1) GAE advantages (whitened when advantage normalisation is on).
    pub advantages: Tensor,
    /// (B, T-1) value targets A + V, on the critic's scale.
    pub returns: Tensor,
    /// (B, T-1) the actor's entropy at each position (a diagnostic).
    pub entropy: Tensor,
}

/// The models PPO holds: the actor (the policy being trained), the critic (a trunk with a
/// value head) and the reference, which with LoRA is the actor's base (adapters off).
#[derive(Debug)]
pub struct PpoModels {
    pub actor: Model,
    pub critic: RewardModel,
    /// None with LoRA.
    pub reference: Option<Model>,
}

impl PpoModels {
    /// Actor, critic trunk and reference all start from the weights at `path` (the embedded
    /// default when None), in `precision`; the critic's value head starts at zero. With
    /// `config.lora`, actor and critic get fresh adapters and there is no reference copy.
    pub fn load(
        path: Option<&Path>,
        device: tch::Device,
        precision: Precision,
        config: &PpoConfig,
    ) -> Result<Self> {
        let lora = config.lora.as_ref();
        let reference = match lora {
            Some(_) => None,
            None => {
                let mut reference = Model::load(path, device, precision)?;
                reference.vs.freeze();
                Some(reference)
            }
        };
        let actor = Model::load(path, device, precision)?;
        let critic = Model::load(path, device, precision)?;
        Ok(Self {
            actor: crate::with_lora(actor, lora, config.seed)?,
            critic: RewardModel::new(crate::with_lora(critic, lora, !config.seed)?)?,
            reference,
        })
    }

    /// log π_ref of the batch's tokens: the reference's, or the actor's with its adapters off.
    fn reference_logprobs(&self, batch: &TokenBatch) -> Tensor {
        match &self.reference {
            Some(reference) => token_logprobs(&reference.decoder, batch),
            None => self
                .actor
                .decoder
                .without_adapters(|| token_logprobs(&self.actor.decoder, batch)),
        }
    }
}

impl PpoModels {
    /// What a checkpoint holds: the actor and critic with their optimisers, the reference
    /// with its EMA shadow (when the EMA moves it).
    fn parts<'a>(
        &'a self,
        actor: &'a mut AdamW,
        critic: &'a mut AdamW,
        ema: Option<&'a mut EmaReference>,
    ) -> Vec<Part<'a>> {
        let mut parts = vec![
            Part::trained("policy", self.actor.trainable(), actor),
            Part::trained("critic", self.critic.model.trainable(), critic),
        ];
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

/// Runs PPO from the prompts; saves `<out>/policy` and `<out>/critic`. Killed, the same call
/// resumes from the last checkpoint (the actor, critic, reference, both optimisers and the
/// value-normalisation moments).
pub fn train_ppo(
    models: &PpoModels,
    prompts: &[PromptExample],
    reward: &mut RewardFn,
    config: &PpoConfig,
    out: &Path,
    mut on_iteration: impl FnMut(&IterationRecord, u64),
) -> Result<Vec<IterationRecord>> {
    config.validate()?;
    let (actor, critic) = (&models.actor, &models.critic);
    let Some(encoded) = encode_prompts(actor, prompts, &config.encode, out)? else {
        return Ok(Vec::new());
    };
    let mut actor_opt = AdamW::new(actor.trainable(), config.actor.clone())?;
    let mut critic_opt = AdamW::new(critic.model.trainable(), config.critic.clone())?;
    let mut ema = match (&models.reference, config.ema_reference) {
        (Some(reference), true) => Some(EmaReference::new(&reference.vs, config.ema_eta)),
        _ => None,
    };
    let (mut log, start, mut moments): (_, _, RunningMoments) = Iterations::resume(
        out,
        &mut models.parts(&mut actor_opt, &mut critic_opt, ema.as_mut()),
        (config.seed, prompts.len()),
        (config.iterations, config.checkpoint_every),
    )?;

    for iteration in start..config.iterations {
        let mut metrics = BTreeMap::new();

        // 1. Generate: one rollout per prompt of this iteration's share.
        let began = Instant::now();
        let first = iteration as usize * config.rollout_batch_size;
        let chosen = prompt_stream(prompts.len(), config.seed, first, config.rollout_batch_size);
        let requests = rollout_requests(&chosen, config.seed, iteration);
        let params = config.sampling();
        let sampled = sample(
            actor,
            &encoded,
            prompts,
            &requests,
            &params,
            config.generation_batch_size,
        )?;
        let batch = pack(actor, &encoded, &chosen, &sampled.answers, &params);
        let rollouts = sampled.rollouts;
        metrics.insert("time/generate".into(), began.elapsed().as_secs_f64());
        metrics.insert(
            "generate/tokens_per_s".into(),
            sampled.tokens as f64 / began.elapsed().as_secs_f64().max(1e-9),
        );

        // 2. Make experience: score, log-probs, values, rewards, advantages.
        let began = Instant::now();
        let scores = reward(iteration, &rollouts)?;
        check_scores(&scores, &rollouts)?;
        let truncated = truncated(&rollouts);
        let experience = make_experience(models, batch, &scores, &truncated, config, &mut moments);
        let mask = &experience.batch.loss_mask;
        let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        metrics.insert("truncated".into(), mean(&experience.truncated));
        let kl = (&experience.old_logprobs - &experience.reference_logprobs) * mask;
        metrics.insert("reward/mean".into(), mean(&experience.scores));
        metrics.insert(
            "reward/std".into(),
            experience.scores.std(true).double_value(&[]),
        );
        metrics.insert("kl".into(), masked_mean(&kl, mask).double_value(&[]));
        metrics.insert(
            "kl/sequence".into(),
            mean(&kl.sum_dim_intlist([1].as_slice(), false, Kind::Float)),
        );
        metrics.insert(
            "entropy".into(),
            masked_mean(&experience.entropy, mask).double_value(&[]),
        );
        metrics.insert(
            "response_length".into(),
            mean(&mask.sum_dim_intlist([1].as_slice(), false, Kind::Float)),
        );
        metrics.insert("explained_variance".into(), explained_variance(&experience));
        metrics.insert("time/experience".into(), began.elapsed().as_secs_f64());

        // 3. Train: PPO epochs over shuffled minibatches, actor then critic per minibatch.
        let began = Instant::now();
        let sums = train_on(
            models,
            &experience,
            config,
            iteration,
            &mut actor_opt,
            &mut critic_opt,
        );
        metrics.extend(sums);
        metrics.insert("time/train".into(), began.elapsed().as_secs_f64());

        // 4. Update the reference.
        let began = Instant::now();
        if let Some(ema) = &mut ema {
            let shift = ema.update(&exact_weights(actor, &actor_opt));
            metrics.insert("ema/reference_shift".into(), shift);
        }
        metrics.insert(
            "time/reference_update".into(),
            began.elapsed().as_secs_f64(),
        );
        metrics.insert("value_norm/mean".into(), moments.mean);
        metrics.insert("value_norm/std".into(), moments.std());

        let record = IterationRecord {
            step: iteration + 1,
            metrics,
        };
        let parts = models.parts(&mut actor_opt, &mut critic_opt, ema.as_mut());
        log.finish(record, &mut on_iteration, &parts, &moments)?;
    }
    actor.save(&out.join(crate::POLICY_DIR))?;
    critic.model.save(&out.join(CRITIC_DIR))?;
    checkpoint::remove_all(out)?;
    Ok(log.records())
}

/// One rollout per chosen prompt; row r of iteration i is seeded with `seed ^ (i << 32) ^ r`.
fn rollout_requests(chosen: &[usize], seed: u64, iteration: u64) -> Vec<RolloutRequest> {
    let mut seen: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
    chosen
        .iter()
        .enumerate()
        .map(|(row, &prompt)| {
            let count = seen.entry(prompt).or_default();
            let sample_idx = *count;
            *count += 1;
            RolloutRequest {
                prompt,
                seed: seed ^ (iteration << 32) ^ row as u64,
                sample_idx,
            }
        })
        .collect()
}

/// The critic's values at every position, (B, T), without a graph: V(s_t) of the state after
/// token t.
fn critic_values(critic: &RewardModel, batch: &TokenBatch) -> Tensor {
    let hidden = batch.hidden(&critic.model.decoder);
    critic.head.per_token(&hidden).to_kind(Kind::Float)
}

fn make_experience(
    models: &PpoModels,
    batch: TokenBatch,
    scores: &[f32],
    truncated: &[f32],
    config: &PpoConfig,
    moments: &mut RunningMoments,
) -> Experience {
    let device = batch.input_ids.device();
    let mask = batch.loss_mask.shallow_clone();
    let t = mask.size()[1];
    let (old_logprobs, entropy) = token_logprobs_and_entropy(&models.actor.decoder, &batch);
    let reference_logprobs = models.reference_logprobs(&batch);
    let all_values = tch::no_grad(|| critic_values(&models.critic, &batch)); // (B, T)
    let values = all_values.narrow(1, 0, t) * &mask;
    let truncated = Tensor::from_slice(truncated).to_device(device);
    let scores = Tensor::from_slice(scores).to_device(device);
    // Rows that bootstrap: their score is not earned, and the value of the state they stopped
    // in (the one after their last action) stands for what would have followed.
    let bootstrapped = match config.truncated {
        Truncated::Bootstrap => truncated.shallow_clone(),
        Truncated::Score => truncated.zeros_like(),
    };
    let last = last_token_one_hot(&mask); // (B, T-1)
    let after_last = Tensor::cat(&[&last.narrow(1, 0, 1).zeros_like(), &last], 1); // (B, T)
    let final_values =
        (&all_values * after_last).sum_dim_intlist([1].as_slice(), false, Kind::Float); // (B,)
    let rewards = kl_penalised_rewards(
        &(&scores * (1.0 - &bootstrapped)),
        &old_logprobs,
        &reference_logprobs,
        &mask,
        config.kl_coef,
        config.reward_clip,
    );
    // GAE runs on the return scale; the critic's outputs are mapped back to it first.
    let (raw_values, raw_final) = if config.value_normalisation {
        (
            moments.denormalise(&values) * &mask,
            moments.denormalise(&final_values),
        )
    } else {
        (values.shallow_clone(), final_values)
    };
    let (advantages, raw_returns) = gae(
        &rewards,
        &raw_values,
        &mask,
        Some(&(raw_final * &bootstrapped)),
        config.gamma,
        config.lambda,
    );
    let returns = if config.value_normalisation {
        moments.update(&raw_returns, &mask);
        moments.normalise(&raw_returns) * &mask
    } else {
        raw_returns
    };
    let advantages = if config.advantage_normalisation {
        normalise_advantages(&advantages, &mask)
    } else {
        advantages
    };
    Experience {
        batch,
        old_logprobs,
        reference_logprobs,
        values,
        scores,
        truncated,
        rewards,
        advantages,
        returns,
        entropy,
    }
}

/// `1 - Var(returns - values) / Var(returns)` over the completion tokens.
fn explained_variance(e: &Experience) -> f64 {
    let mask = &e.batch.loss_mask;
    let var = |x: &Tensor| {
        let mean = masked_mean(x, mask);
        masked_mean(&(x - mean).square(), mask).double_value(&[])
    };
    let total = var(&e.returns);
    if total <= 0.0 {
        return f64::NAN;
    }
    1.0 - var(&(&e.returns - &e.values)) / total
}

/// PPO epochs over the experience; returns the mean losses and diagnostics.
fn train_on(
    models: &PpoModels,
    e: &Experience,
    config: &PpoConfig,
    iteration: u64,
    actor_opt: &mut AdamW,
    critic_opt: &mut AdamW,
) -> BTreeMap<String, f64> {
    let b = e.scores.size()[0] as usize;
    let device = e.scores.device();
    // Completion tokens of each row: the losses are token means over a minibatch, so each
    // micro-batch's mean weighs by its share of the minibatch's tokens.
    let row_tokens: Vec<f64> = Vec::<f32>::try_from(
        &e.batch
            .loss_mask
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
            .to_device(tch::Device::Cpu),
    )
    .expect("a host f32 tensor")
    .into_iter()
    .map(f64::from)
    .collect();
    let total_steps = config.total_steps();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut steps = 0.0;
    let mut rng =
        StdRng::seed_from_u64(config.seed ^ iteration.wrapping_mul(0xD1B5_4A32_D192_ED03));
    for _ in 0..config.ppo_epochs {
        let mut order: Vec<i64> = (0..b as i64).collect();
        order.shuffle(&mut rng);
        for minibatch in order.chunks(b.div_ceil(config.num_minibatches)) {
            let tokens = |rows: &[i64]| rows.iter().map(|&r| row_tokens[r as usize]).sum::<f64>();
            let minibatch_tokens = tokens(minibatch).max(1.0);
            let mut add = |name: &str, value: f64, weight: f64| {
                *sums.entry(name.to_string()).or_default() += value * weight;
            };
            for micro in minibatch.chunks(config.micro_batch_size) {
                let weight = tokens(micro) / minibatch_tokens;
                let rows = Tensor::from_slice(micro).to_device(device);
                let batch = e.batch.select(&rows);
                let pick = |t: &Tensor| t.index_select(0, &rows);
                let mask = &batch.loss_mask;

                let actor = &models.actor.decoder;
                let logprobs = actor.training(|| TokenLogprobs::forward(actor, &batch));
                let out = policy_loss(
                    &logprobs.values,
                    &pick(&e.old_logprobs),
                    &pick(&e.advantages),
                    mask,
                    config.clip_eps,
                    config.clip_eps,
                    LossAggregation::TokenMean,
                    config.max_new_tokens,
                );
                (&out.loss * weight).backward();
                logprobs.backward(&models.actor.decoder);
                actor_opt.accumulate();
                add("policy_loss", out.loss.double_value(&[]), weight);
                add("clip_fraction", out.clip_fraction.double_value(&[]), weight);
                add("approx_kl", out.approx_kl.double_value(&[]), weight);

                let critic = &models.critic.model.decoder;
                let hidden = critic.training(|| batch.hidden(critic));
                let t = hidden.size()[1] - 1;
                let values = models
                    .critic
                    .head
                    .per_token(&hidden.narrow(1, 0, t))
                    .to_kind(Kind::Float);
                let loss = value_loss(
                    &values,
                    &pick(&e.values),
                    &pick(&e.returns),
                    mask,
                    config.value_clip,
                );
                (&loss * weight).backward();
                critic_opt.accumulate();
                add("value_loss", loss.double_value(&[]), weight);
            }
            add("actor_grad_norm", actor_opt.clip_grad_norm(), 1.0);
            add("critic_grad_norm", critic_opt.clip_grad_norm(), 1.0);
            let actor_lr = config.actor.lr_at(actor_opt.steps(), total_steps);
            let critic_lr = config.critic.lr_at(critic_opt.steps(), total_steps);
            add("actor_lr", actor_lr, 1.0);
            add("critic_lr", critic_lr, 1.0);
            actor_opt.step(actor_lr);
            critic_opt.step(critic_lr);
            actor_opt.zero_grad();
            critic_opt.zero_grad();
            steps += 1.0;
        }
    }
    sums.into_iter().map(|(k, v)| (k, v / steps)).collect()
}
