//! PPO with an actor, a critic, a reference and a reward, over the online core (online.rs;
//! docs/ARCHITECTURE.md): one rollout per prompt of the iteration's share; experience with the critic's
//! values, per-token rewards (the KL penalty everywhere, the clipped score at the last action)
//! and GAE advantages; the critic trained beside the actor on every micro-batch. Each of the
//! paper's tricks (advantage normalisation, large batch, EMA reference; value normalisation
//! too) is a config switch, so the paper's ablation is four configs.

use std::path::Path;

use prefloop_model::{Batching, Generator, InProcess, Precision};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::advantage::{
    RunningMoments, gae, kl_penalised_rewards, last_token_one_hot, normalise_advantages,
};
use crate::checkpoint::Part;
use crate::error::{Result, TrainError};
use crate::logprobs::{TokenBatch, token_logprobs_and_entropy};
use crate::losses::{LossAggregation, masked_mean, value_loss};
use crate::online::{
    Algorithm, Experience, Metrics, OnlineConfig, Policy, Prompts, Sampled, ScoreFn, Settings,
    Sums, SurrogateLoss, Trainer, train_online,
};
use crate::optim::{AdamW, OptimConfig};
use crate::reward::RewardModel;
use crate::rollout::{
    IterationRecord, PromptExample, RewardFn, RolloutRequest, pack, prompt_stream, sample,
    truncated,
};

/// Where the critic is saved under the output directory (the actor goes to `policy`).
pub const CRITIC_DIR: &str = "critic";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Not `deny_unknown_fields`, which serde does not take with `flatten`: whoever reads the
// config refuses the keys nothing took (prefloop_pipeline::unknown_keys).
#[serde(default)]
pub struct PpoConfig {
    /// What every online algorithm has (online.rs), with its defaults.
    #[serde(flatten)]
    pub online: OnlineConfig,
    /// Rollouts per iteration, one per prompt (the paper's large batch: 512). Default 512.
    pub rollout_batch_size: usize,
    /// Minibatches each rollout batch is cut into per PPO epoch (one optimiser step each;
    /// always this many, the last ones a row larger when the batch does not divide). Default 4.
    pub num_minibatches: usize,
    /// Passes over each rollout batch: 5 for dialogue, 16 for code in the paper. Default 5.
    pub ppo_epochs: usize,
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
    /// With `lora` the reference is the actor's base with its adapters off, which cannot move:
    /// the EMA is then off whatever this says (a warning says so when it says true). Default
    /// true.
    pub ema_reference: bool,
    /// Actor optimiser; lr defaults to 1e-5. Its warmup and schedule count optimiser steps:
    /// iterations × ppo_epochs × num_minibatches.
    pub actor: OptimConfig,
    /// Critic optimiser; lr defaults to 5e-6; scheduled as the actor's.
    pub critic: OptimConfig,
}

impl Default for PpoConfig {
    fn default() -> Self {
        let optim = |lr| OptimConfig {
            lr,
            ..OptimConfig::default()
        };
        Self {
            online: OnlineConfig::default(),
            rollout_batch_size: 512,
            num_minibatches: 4,
            ppo_epochs: 5,
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
            actor: optim(1e-5),
            critic: optim(5e-6),
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
    /// Whether the EMA moves the reference: as `ema_reference` says, with full fine-tuning.
    pub fn moves_reference(&self) -> bool {
        self.ema_reference && self.online.lora.is_none()
    }

    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let check = crate::error::ensure;
        self.online.validate()?;
        crate::error::at_least_one(&[("ppo_epochs", self.ppo_epochs as u64)])?;
        check(
            self.num_minibatches > 0 && self.rollout_batch_size >= self.num_minibatches,
            "num_minibatches",
            "must be between 1 and rollout_batch_size",
        )?;
        self.actor.validate()?;
        self.critic.validate()
    }
}

/// The models PPO holds: the policy (the actor and its reference, which with LoRA is the
/// actor's base, adapters off) and the critic (a trunk with a value head).
#[derive(Debug)]
pub struct PpoModels {
    pub policy: Policy,
    pub critic: RewardModel,
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
        let (lora, seed) = (config.online.lora.as_ref(), config.online.seed);
        let policy = Policy::load(path, device, precision, lora, seed, true)?;
        let critic = prefloop_model::Model::load(path, device, precision)?;
        Ok(Self {
            policy,
            critic: RewardModel::new(crate::with_lora(critic, lora, !seed)?)?,
        })
    }
}

/// PPO as an online algorithm: its config, and the critic it trains beside the policy.
#[derive(Debug)]
pub struct Ppo<'m> {
    config: &'m PpoConfig,
    critic: &'m RewardModel,
    critic_opt: AdamW,
}

impl<'m> Ppo<'m> {
    /// PPO under `config` (checked here), training `critic`.
    pub fn new(config: &'m PpoConfig, critic: &'m RewardModel) -> Result<Self> {
        config.validate()?;
        if config.ema_reference && !config.moves_reference() {
            tracing::warn!(
                "ema_reference = true with lora: the reference is the base with the adapters \
                 off, which cannot move; the EMA is off"
            );
        }
        Ok(Self {
            config,
            critic,
            critic_opt: AdamW::new(critic.model.trainable(), config.critic.clone())?,
        })
    }
}

/// What PPO keeps of its rollouts for the experience: the prompt of each, one per prompt of
/// the iteration's share, and its completion's token ids.
#[derive(Debug)]
pub struct Chosen {
    prompts: Vec<usize>,
    answers: Vec<Vec<u32>>,
}

impl Algorithm for Ppo<'_> {
    type State = RunningMoments;
    type Detail = Chosen;

    fn name(&self) -> String {
        "ppo".into()
    }

    fn settings(&self) -> Settings<'_> {
        let config = self.config;
        Settings {
            online: &config.online,
            optimizer: &config.actor,
            epochs: config.ppo_epochs,
            num_minibatches: config.num_minibatches,
            ema_reference: config.moves_reference(),
            loss: SurrogateLoss {
                clip_low: config.clip_eps,
                clip_high: config.clip_eps,
                aggregation: LossAggregation::TokenMean,
                kl_coef: None,
                entropy_coef: 0.0,
            },
        }
    }

    fn sample<G: Generator, E: From<TrainError>>(
        &self,
        prompts: &Prompts,
        iteration: u64,
        _: &mut RunningMoments,
        generator: &mut G,
        reward: &mut ScoreFn<E>,
    ) -> std::result::Result<Sampled<Chosen>, E> {
        let (size, seed) = (self.config.rollout_batch_size, self.config.online.seed);
        let first = iteration as usize * size;
        let chosen = prompt_stream(prompts.examples.len(), seed, first, size);
        let requests = rollout_requests(&chosen, seed, iteration);
        let generated = sample(
            generator,
            &prompts.encoded,
            prompts.examples,
            &requests,
            &self.config.online.sampling(),
        )?;
        let scores = reward(&generated.rollouts)?;
        Ok(Sampled {
            rollouts: generated.rollouts,
            scores,
            detail: Chosen {
                prompts: chosen,
                answers: generated.answers,
            },
        })
    }

    fn experience(
        &mut self,
        policy: &Policy,
        prompts: &Prompts,
        sampled: &Sampled<Chosen>,
        moments: &mut RunningMoments,
        metrics: &mut Metrics,
    ) -> Option<Experience> {
        let batch = pack(
            &policy.actor,
            &prompts.encoded,
            &sampled.detail.prompts,
            &sampled.detail.answers,
            &self.config.online.sampling(),
        );
        let truncated = truncated(&sampled.rollouts);
        let e = make_experience(
            policy,
            self.critic,
            batch,
            (&sampled.scores, &truncated),
            self.config,
            moments,
        );
        metrics.insert("explained_variance".into(), explained_variance(&e));
        Some(e)
    }

    /// The critic's clipped value loss on the micro-batch.
    fn micro_batch(
        &mut self,
        e: &Experience,
        rows: &Tensor,
        batch: &TokenBatch,
        weight: f64,
        sums: &mut Sums,
    ) {
        let pick = |t: &Option<Tensor>| t.as_ref().expect("PPO's").index_select(0, rows);
        let critic = &self.critic.model.decoder;
        let hidden = critic.training(|| batch.hidden(critic));
        let t = hidden.size()[1] - 1;
        let values = self
            .critic
            .head
            .per_token(&hidden.narrow(1, 0, t))
            .to_kind(Kind::Float);
        let loss = value_loss(
            &values,
            &pick(&e.values),
            &pick(&e.returns),
            &batch.loss_mask,
            self.config.value_clip,
        );
        (&loss * weight).backward();
        self.critic_opt.accumulate();
        sums.add("value_loss", loss.double_value(&[]), weight);
    }

    fn step(&mut self, position: u64, total: u64, sums: &mut Sums) {
        sums.add("critic_grad_norm", self.critic_opt.clip_grad_norm(), 1.0);
        let lr = self.config.critic.lr_at(position, total);
        sums.add("critic_lr", lr, 1.0);
        self.critic_opt.step(lr);
        self.critic_opt.zero_grad();
    }

    fn after_update(&self, moments: &RunningMoments, metrics: &mut Metrics) {
        metrics.insert("value_norm/mean".into(), moments.mean);
        metrics.insert("value_norm/std".into(), moments.std());
    }

    fn parts(&mut self) -> Vec<Part<'_>> {
        vec![Part::trained(
            "critic",
            self.critic.model.trainable(),
            &mut self.critic_opt,
        )]
    }

    fn save(&self, out: &Path) -> Result<()> {
        self.critic.model.save(&out.join(CRITIC_DIR))?;
        Ok(())
    }
}

/// Runs PPO from the prompts; saves `<out>/policy` and `<out>/critic`. Killed, the same call
/// resumes from the last checkpoint (the actor, critic, reference, both optimisers and the
/// value-normalisation moments).
pub fn train_ppo<E: From<TrainError>>(
    models: &PpoModels,
    prompts: &[PromptExample],
    reward: &mut RewardFn<E>,
    config: &PpoConfig,
    out: &Path,
    on_iteration: impl FnMut(&IterationRecord, u64),
) -> std::result::Result<Vec<IterationRecord>, E> {
    let ppo = Ppo::new(config, &models.critic)?;
    let Some(trainer) = Trainer::start(&models.policy, ppo, prompts, out)? else {
        return Ok(Vec::new());
    };
    let batching = Batching::new(config.online.generation_batch_size);
    let mut generator = InProcess::new(&models.policy.actor, batching);
    train_online(
        trainer,
        &mut generator,
        reward,
        &mut |_, _, _| Ok(()),
        on_iteration,
    )
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

/// PPO's experience of B rollouts from their `(scores, truncated)`: the actor's and the
/// reference's log-probs, the critic's values, per-token rewards (the KL penalty everywhere,
/// the clipped score at the last action), GAE advantages (whitened when advantage
/// normalisation is on) and returns.
fn make_experience(
    policy: &Policy,
    critic: &RewardModel,
    batch: TokenBatch,
    (scores, truncated): (&[f32], &[f32]),
    config: &PpoConfig,
    moments: &mut RunningMoments,
) -> Experience {
    let device = batch.input_ids.device();
    let mask = batch.loss_mask.shallow_clone();
    let t = mask.size()[1];
    let (old_logprobs, entropy) = token_logprobs_and_entropy(&policy.actor.decoder, &batch);
    let reference_logprobs = policy.reference_logprobs(&batch, &old_logprobs);
    let all_values = tch::no_grad(|| critic_values(critic, &batch)); // (B, T)
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
        loss_mask: mask,
        old_logprobs,
        reference_logprobs,
        advantages,
        entropy,
        values: Some(values),
        returns: Some(returns),
    }
}

/// `1 - Var(returns - values) / Var(returns)` over the completion tokens.
fn explained_variance(e: &Experience) -> f64 {
    let (Some(returns), Some(values)) = (&e.returns, &e.values) else {
        return f64::NAN;
    };
    let mask = &e.loss_mask;
    let var = |x: &Tensor| {
        let mean = masked_mean(x, mask);
        masked_mean(&(x - mean).square(), mask).double_value(&[])
    };
    let total = var(returns);
    if total <= 0.0 {
        return f64::NAN;
    }
    1.0 - var(&(returns - values)) / total
}
