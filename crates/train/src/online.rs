//! The online core: what PPO (ppo.rs) and the group estimators (group.rs) share, laid out as
//! OpenRLHF's `fit`. A [`Trainer`] holds the policy and its reference (a frozen copy, moved
//! by an EMA when asked, or the policy's base with its LoRA adapters off), the policy's
//! optimiser, the run's prompts and the bookkeeping of iterations (resume, metrics,
//! checkpoints). Whoever drives it (the pipeline's rounds, or [`train_online`] for the
//! `prefloop train` commands) runs each iteration as
//!
//! 1. [`Trainer::sample`]: the algorithm asks a [`Generator`] for rollouts and the caller's
//!    reward function for their scores;
//! 2. [`Trainer::update`]: the algorithm makes [`Experience`]; epochs over shuffled
//!    minibatches of the clipped surrogate, in micro-batches; the reference moves; the
//!    iteration is logged and checkpointed.
//!
//! An [`Algorithm`] says only how it samples, how it makes experience, and what it adds to
//! the policy's loss (PPO: its critic): a new online algorithm is one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prefloop_model::{Generator, LoraConfig, Model, Precision, SamplingParams};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Part};
use crate::ema::EmaReference;
use crate::error::{Result, TrainError};
use crate::examples::EncodeConfig;
use crate::logprobs::{TokenBatch, TokenLogprobs, token_logprobs};
use crate::losses::{LossAggregation, k3_kl, masked_mean, policy_loss};
use crate::optim::{AdamW, OptimConfig};
use crate::rollout::{
    IterationRecord, Iterations, PromptExample, RewardFn, Rollout, SampledFn, encode_prompts,
    exact_weights, truncated,
};

/// The settings every online algorithm has, with the same defaults for each (`#[serde(flatten)]`
/// into PPO's and the group estimators' configs, so they stay keys of `[ppo]` and `[group]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OnlineConfig {
    /// Sample → update iterations (in a run, one per round: `rounds`). Default 10.
    pub iterations: u64,
    /// Rows generated together. Default 64.
    pub generation_batch_size: usize,
    /// Rows per forward pass inside a minibatch (gradients accumulate, each micro-batch weighted
    /// as the loss weighs its rows): a memory knob that does not change the result. Default 8.
    pub micro_batch_size: usize,
    /// Default 256.
    pub max_new_tokens: usize,
    /// Default 1.0 (the paper's).
    pub temperature: f64,
    /// Default 200 (the paper's).
    pub top_k: i64,
    /// η of the EMA that moves the reference towards the policy after every iteration, when
    /// it moves (`ema_reference`). Default 0.001 (ReaLHF).
    pub ema_eta: f64,
    pub encode: EncodeConfig,
    /// Seeds the prompt order, the sampling and the minibatch order. Default 0.
    pub seed: u64,
    /// Iterations between checkpoints. Default 1.
    pub checkpoint_every: u64,
    /// LoRA adapters trained instead of every weight (`[lora]`, no dropout); the reference is
    /// then the policy's base with its adapters off, not a second model (so it cannot move),
    /// and PPO's critic trains adapters and its value head. Default: none, full fine-tuning.
    pub lora: Option<LoraConfig>,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        Self {
            iterations: 10,
            generation_batch_size: 64,
            micro_batch_size: 8,
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: 200,
            ema_eta: 0.001,
            encode: EncodeConfig::default(),
            seed: 0,
            checkpoint_every: 1,
            lora: None,
        }
    }
}

impl OnlineConfig {
    /// How rollouts are sampled.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: 1.0,
            max_new_tokens: self.max_new_tokens,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    /// Every setting checked before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        crate::error::at_least_one(&[
            ("iterations", self.iterations),
            ("micro_batch_size", self.micro_batch_size as u64),
            ("generation_batch_size", self.generation_batch_size as u64),
            ("max_new_tokens", self.max_new_tokens as u64),
            ("checkpoint_every", self.checkpoint_every),
        ])?;
        crate::error::ensure(
            (0.0..=1.0).contains(&self.ema_eta),
            "ema_eta",
            "must be in [0, 1]",
        )?;
        crate::validate_online_lora(self.lora.as_ref())?;
        self.encode.validate()
    }
}

/// The scores of one draw of rollouts, in order, as the driver of a trainer computes them (with
/// its own error type, so a pipeline's errors stay typed through the trainer).
pub type ScoreFn<'a, E> = dyn FnMut(&[Rollout]) -> std::result::Result<Vec<f32>, E> + 'a;

/// Metrics of one iteration, by name.
pub type Metrics = BTreeMap<String, f64>;

/// The policy being trained and the reference its KL is measured to.
#[derive(Debug)]
pub struct Policy {
    pub actor: Model,
    /// A frozen copy of the starting policy; None where the reference is the actor's base
    /// with its LoRA adapters off, or where nothing needs a reference.
    pub reference: Option<Model>,
    /// Whether the run measures KL to a reference at all.
    uses_reference: bool,
}

impl Policy {
    /// The actor from the weights at `path` (the embedded default when None) in `precision`,
    /// with fresh adapters seeded by `seed` when `lora` is set; and a frozen reference copy
    /// when `uses_reference` and the actor has no adapters to switch off.
    pub fn load(
        path: Option<&Path>,
        device: tch::Device,
        precision: Precision,
        lora: Option<&LoraConfig>,
        seed: u64,
        uses_reference: bool,
    ) -> Result<Self> {
        let reference = match uses_reference && lora.is_none() {
            true => {
                let mut reference = Model::load(path, device, precision)?;
                reference.vs.freeze();
                Some(reference)
            }
            false => None,
        };
        let actor = Model::load(path, device, precision)?;
        Ok(Self {
            actor: crate::with_lora(actor, lora, seed)?,
            reference,
            uses_reference,
        })
    }

    /// log π_ref of the batch's tokens, (B, T-1): the reference's, the actor's with its
    /// adapters off, or `old` (log π_old) where the run has no reference.
    pub fn reference_logprobs(&self, batch: &TokenBatch, old: &Tensor) -> Tensor {
        let actor = &self.actor.decoder;
        match &self.reference {
            Some(reference) => token_logprobs(&reference.decoder, batch),
            None if self.uses_reference => actor.without_adapters(|| token_logprobs(actor, batch)),
            None => old.shallow_clone(),
        }
    }
}

/// What the update trains on: N rollouts of prompt + completion, right-padded to T tokens.
/// Per-token tensors are (N, T-1) and aligned with the next-token targets: position t is the
/// action `input_ids[:, t+1]` taken in state `input_ids[:, ..=t]`.
#[derive(Debug)]
pub struct Experience {
    /// Token ids, attention mask, and `loss_mask` (N, T-1): 1 on completion tokens.
    pub batch: TokenBatch,
    /// (N, T-1) the completion tokens that carry loss: `batch.loss_mask` less the rows an
    /// algorithm leaves out (the group estimators' overlong-masked rows).
    pub loss_mask: Tensor,
    /// (N, T-1) log π_old(a_t | s_t), the policy that sampled, recomputed in one fp32 forward.
    pub old_logprobs: Tensor,
    /// (N, T-1) log π_ref(a_t | s_t) (log π_old where the run has no reference).
    pub reference_logprobs: Tensor,
    /// (N, T-1) per-token advantages.
    pub advantages: Tensor,
    /// (N, T-1) the policy's entropy at each position (a diagnostic).
    pub entropy: Tensor,
    /// (N, T-1) a critic's V(s_t) at sampling time, on its (normalised) scale; PPO's.
    pub values: Option<Tensor>,
    /// (N, T-1) value targets A + V on the critic's scale; PPO's.
    pub returns: Option<Tensor>,
}

/// One iteration's rollouts and their scores, as the caller records them, and what the
/// algorithm keeps of them for its experience (`detail`).
#[derive(Debug)]
pub struct Sampled<D> {
    pub rollouts: Vec<Rollout>,
    pub scores: Vec<f32>,
    pub detail: D,
}

/// The clipped surrogate as an algorithm configures it.
#[derive(Debug, Clone, Copy)]
pub struct SurrogateLoss {
    pub clip_low: f64,
    pub clip_high: f64,
    pub aggregation: LossAggregation,
    /// β of the k3 KL to the reference added to the loss (GRPO); None: no KL in the loss.
    pub kl_coef: Option<f64>,
    /// Weight of an entropy bonus subtracted from the loss (0: none).
    pub entropy_coef: f64,
}

/// How an online algorithm trains, read from its config.
#[derive(Debug, Clone)]
pub struct Settings<'c> {
    pub online: &'c OnlineConfig,
    /// Passes over each iteration's experience.
    pub epochs: usize,
    /// Minibatches each pass is cut into (one optimiser step each; always this many parts,
    /// the last rows going to the last parts when they do not divide).
    pub num_minibatches: usize,
    /// Whether the EMA moves the reference after every iteration.
    pub ema_reference: bool,
    pub loss: SurrogateLoss,
    pub optimizer: &'c OptimConfig,
}

impl Settings<'_> {
    /// Optimiser steps of the whole run, which the learning-rate schedule spans.
    fn total_steps(&self) -> u64 {
        self.online.iterations * (self.epochs * self.num_minibatches) as u64
    }
}

/// The run's prompts, and the same encoded for the actor.
#[derive(Debug)]
pub struct Prompts<'p> {
    pub examples: &'p [PromptExample],
    pub encoded: Vec<Vec<u32>>,
}

/// Running sums of weighted metrics over an iteration's optimiser steps.
#[derive(Debug, Default)]
pub struct Sums(BTreeMap<String, f64>);

impl Sums {
    pub fn add(&mut self, name: &str, value: f64, weight: f64) {
        *self.0.entry(name.to_string()).or_default() += value * weight;
    }
}

/// What an online algorithm adds to the core.
pub trait Algorithm {
    /// What a checkpoint carries beside the weights (PPO's value-normalisation moments, the
    /// group estimators' position in the prompt stream).
    type State: Serialize + DeserializeOwned + Default;
    /// What it keeps of an iteration's sampling for its experience.
    type Detail;

    /// Its name, for logs.
    fn name(&self) -> String;

    fn settings(&self) -> Settings<'_>;

    /// Samples iteration `iteration`'s rollouts from `generator` and scores them with
    /// `reward`, drawing more where the algorithm wants them.
    fn sample<G: Generator, E: From<TrainError>>(
        &self,
        prompts: &Prompts,
        iteration: u64,
        state: &mut Self::State,
        generator: &mut G,
        reward: &mut ScoreFn<E>,
    ) -> std::result::Result<Sampled<Self::Detail>, E>;

    /// The experience the update trains on, with the algorithm's own metrics; None where
    /// nothing sampled carries signal and the policy is not updated.
    fn experience(
        &mut self,
        policy: &Policy,
        prompts: &Prompts,
        sampled: &Sampled<Self::Detail>,
        state: &mut Self::State,
        metrics: &mut Metrics,
    ) -> Option<Experience>;

    /// What the algorithm trains beside the policy on a micro-batch (`rows` of `e`, its
    /// tokens `batch`, weighted by `weight` in its minibatch): PPO's critic.
    fn micro_batch(
        &mut self,
        _e: &Experience,
        _rows: &Tensor,
        _batch: &TokenBatch,
        _weight: f64,
        _sums: &mut Sums,
    ) {
    }

    /// The optimiser step of what it trains beside the policy, at the step's `position` of
    /// `total` in the run.
    fn step(&mut self, _position: u64, _total: u64, _sums: &mut Sums) {}

    /// Its own metrics once the iteration is trained.
    fn after_update(&self, _state: &Self::State, _metrics: &mut Metrics) {}

    /// Checkpoint parts of what it trains beside the policy.
    fn parts(&mut self) -> Vec<Part<'_>> {
        Vec::new()
    }

    /// Saves what it trained beside the policy under `out`.
    fn save(&self, _out: &Path) -> Result<()> {
        Ok(())
    }
}

/// An online run in progress: see the module's documentation.
#[derive(Debug)]
pub struct Trainer<'m, A: Algorithm> {
    policy: &'m Policy,
    algorithm: A,
    prompts: Prompts<'m>,
    optimizer: AdamW,
    ema: Option<EmaReference>,
    log: Iterations,
    state: A::State,
    next: u64,
    out: PathBuf,
}

impl<'m, A: Algorithm> Trainer<'m, A> {
    /// Starts, or resumes from the newest checkpoint under `out`, `algorithm` on `policy`
    /// over `prompts`; None where `out` already holds the trained policy.
    pub fn start(
        policy: &'m Policy,
        algorithm: A,
        prompts: &'m [PromptExample],
        out: &Path,
    ) -> Result<Option<Self>> {
        let settings = algorithm.settings();
        let online = settings.online;
        let Some(encoded) = encode_prompts(&policy.actor, prompts, &online.encode, out)? else {
            return Ok(None);
        };
        let mut optimizer = AdamW::new(policy.actor.trainable(), settings.optimizer.clone())?;
        let mut ema = match (&policy.reference, settings.ema_reference) {
            (Some(reference), true) => Some(EmaReference::new(&reference.vs, online.ema_eta)),
            _ => None,
        };
        let (seed, iterations, every) = (online.seed, online.iterations, online.checkpoint_every);
        let mut algorithm = algorithm;
        let (log, next, state) = {
            let mut parts = policy_parts(policy, &mut optimizer, ema.as_mut());
            parts.extend(algorithm.parts());
            Iterations::resume(out, &mut parts, (seed, prompts.len()), (iterations, every))?
        };
        Ok(Some(Self {
            policy,
            algorithm,
            prompts: Prompts {
                examples: prompts,
                encoded,
            },
            optimizer,
            ema,
            log,
            state,
            next,
            out: out.to_owned(),
        }))
    }

    /// The next iteration to run (0-based), or None when every one has run.
    pub fn next_iteration(&self) -> Option<u64> {
        (self.next < self.algorithm.settings().online.iterations).then_some(self.next)
    }

    /// The algorithm's name, for logs.
    pub fn name(&self) -> String {
        self.algorithm.name()
    }

    /// Samples and scores the next iteration's rollouts (see [`Algorithm::sample`]).
    pub fn sample<G: Generator, E: From<TrainError>>(
        &mut self,
        generator: &mut G,
        reward: &mut ScoreFn<E>,
    ) -> std::result::Result<Timed<Sampled<A::Detail>>, E> {
        let began = Instant::now();
        let iteration = self.next;
        let mut scoring = 0.0;
        let mut timed_reward = |rollouts: &[Rollout]| -> std::result::Result<Vec<f32>, E> {
            let began = Instant::now();
            let scores = reward(rollouts);
            scoring += began.elapsed().as_secs_f64();
            let scores = scores?;
            check_scores(&scores, rollouts)?;
            Ok(scores)
        };
        let sampled = self.algorithm.sample(
            &self.prompts,
            iteration,
            &mut self.state,
            generator,
            &mut timed_reward,
        )?;
        Ok(Timed {
            sampled,
            seconds: began.elapsed().as_secs_f64() - scoring,
            scoring,
        })
    }

    /// Trains on the iteration's rollouts: experience, epochs of the surrogate, the
    /// reference's update; logs and checkpoints the iteration and returns its record.
    pub fn update(&mut self, timed: Timed<Sampled<A::Detail>>) -> Result<IterationRecord> {
        let iteration = self.next;
        let mut metrics = sampled_metrics(&timed);

        // Make experience.
        let began = Instant::now();
        let experience = self.algorithm.experience(
            self.policy,
            &self.prompts,
            &timed.sampled,
            &mut self.state,
            &mut metrics,
        );
        match experience {
            None => tracing::warn!(
                iteration,
                "nothing sampled carried signal: the policy is not updated"
            ),
            Some(experience) => {
                metrics.extend(experience_metrics(&experience));
                metrics.insert("time/experience".into(), began.elapsed().as_secs_f64());

                // Train.
                let began = Instant::now();
                metrics.extend(self.train_on(&experience, iteration));
                metrics.insert("time/train".into(), began.elapsed().as_secs_f64());
            }
        }

        // Move the reference.
        let began = Instant::now();
        if let Some(ema) = &mut self.ema {
            let shift = ema.update(&exact_weights(&self.policy.actor, &self.optimizer));
            metrics.insert("ema/reference_shift".into(), shift);
        }
        metrics.insert(
            "time/reference_update".into(),
            began.elapsed().as_secs_f64(),
        );
        self.algorithm.after_update(&self.state, &mut metrics);

        let record = IterationRecord {
            step: iteration + 1,
            metrics,
        };
        let mut parts = policy_parts(self.policy, &mut self.optimizer, self.ema.as_mut());
        parts.extend(self.algorithm.parts());
        self.log.finish(&record, &parts, &self.state)?;
        self.next += 1;
        Ok(record)
    }

    /// Saves the trained policy at `<out>/policy` (and what the algorithm trained beside
    /// it) and removes the checkpoints; returns the policy's directory.
    pub fn finish(self) -> Result<PathBuf> {
        let policy = self.out.join(crate::POLICY_DIR);
        self.policy.actor.save(&policy)?;
        self.algorithm.save(&self.out)?;
        checkpoint::remove_all(&self.out)?;
        Ok(policy)
    }

    /// Epochs over shuffled minibatches of the experience; returns the mean losses and
    /// diagnostics over the optimiser steps.
    fn train_on(&mut self, e: &Experience, iteration: u64) -> Metrics {
        let settings = self.algorithm.settings();
        let loss = settings.loss;
        let n = e.batch.input_ids.size()[0] as usize;
        let device = e.batch.input_ids.device();
        let max_new_tokens = settings.online.max_new_tokens;
        // What each row counts for in its minibatch's loss (its tokens for a token mean), so
        // a micro-batch's loss weighted by its rows' share is the minibatch's.
        let row_weights: Vec<f64> = Vec::<f32>::try_from(
            &e.loss_mask
                .sum_dim_intlist([1].as_slice(), false, Kind::Float)
                .to_device(tch::Device::Cpu),
        )
        .expect("a host f32 tensor")
        .into_iter()
        .map(|tokens| loss.aggregation.row_weight(f64::from(tokens)))
        .collect();
        let (epochs, minibatches) = (settings.epochs, settings.num_minibatches);
        let (micro_batch_size, total_steps) =
            (settings.online.micro_batch_size, settings.total_steps());
        let (optim, seed) = (settings.optimizer.clone(), settings.online.seed);
        let mut sums = Sums::default();
        let mut steps = 0.0;
        let mut rng = StdRng::seed_from_u64(seed ^ iteration.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for epoch in 0..epochs {
            let mut order: Vec<i64> = (0..n as i64).collect();
            order.shuffle(&mut rng);
            for m in 0..minibatches {
                // Always `num_minibatches` parts, however few rows there are, each at its
                // planned place in the learning-rate schedule: the schedule spans
                // `total_steps` and reaches its end with the run, whatever was skipped.
                let minibatch = &order[m * n / minibatches..(m + 1) * n / minibatches];
                let position =
                    (iteration * epochs as u64 + epoch as u64) * minibatches as u64 + m as u64;
                let weight_of =
                    |rows: &[i64]| rows.iter().map(|&r| row_weights[r as usize]).sum::<f64>();
                let total = weight_of(minibatch);
                if total == 0.0 {
                    continue; // every row masked: nothing to learn from
                }
                for micro in minibatch.chunks(micro_batch_size) {
                    let weight = weight_of(micro) / total;
                    if weight == 0.0 {
                        continue;
                    }
                    let rows = Tensor::from_slice(micro).to_device(device);
                    let batch = e.batch.select(&rows);
                    self.policy_micro_batch(
                        e,
                        &rows,
                        &batch,
                        weight,
                        &loss,
                        max_new_tokens,
                        &mut sums,
                    );
                    self.algorithm
                        .micro_batch(e, &rows, &batch, weight, &mut sums);
                }
                sums.add("grad_norm", self.optimizer.clip_grad_norm(), 1.0);
                let lr = optim.lr_at(position, total_steps);
                sums.add("lr", lr, 1.0);
                self.optimizer.step(lr);
                self.optimizer.zero_grad();
                self.algorithm.step(position, total_steps, &mut sums);
                steps += 1.0;
            }
        }
        sums.0
            .into_iter()
            .map(|(k, v)| (k, v / f64::max(steps, 1.0)))
            .collect()
    }

    /// The policy's surrogate on one micro-batch, backpropagated at `weight`.
    #[allow(clippy::too_many_arguments)] // the micro-batch and how it counts
    fn policy_micro_batch(
        &mut self,
        e: &Experience,
        rows: &Tensor,
        batch: &TokenBatch,
        weight: f64,
        settings: &SurrogateLoss,
        max_new_tokens: usize,
        sums: &mut Sums,
    ) {
        let pick = |t: &Tensor| t.index_select(0, rows);
        let mask = pick(&e.loss_mask);
        let decoder = &self.policy.actor.decoder;
        let logprobs = decoder.training(|| match settings.entropy_coef > 0.0 {
            true => TokenLogprobs::with_entropy(decoder, batch),
            false => TokenLogprobs::forward(decoder, batch),
        });
        let aggregation = settings.aggregation;
        let out = policy_loss(
            &logprobs.values,
            &pick(&e.old_logprobs),
            &pick(&e.advantages),
            &mask,
            settings.clip_low,
            settings.clip_high,
            aggregation,
            max_new_tokens,
        );
        let mut loss = out.loss.shallow_clone();
        if let Some(kl_coef) = settings.kl_coef {
            let kl = k3_kl(&logprobs.values, &pick(&e.reference_logprobs));
            let kl = aggregation.apply(&kl, &mask, max_new_tokens);
            sums.add("kl_loss", kl.double_value(&[]), weight);
            loss += kl * kl_coef;
        }
        if let Some(entropy) = &logprobs.entropy {
            loss -= aggregation.apply(entropy, &mask, max_new_tokens) * settings.entropy_coef;
        }
        (&loss * weight).backward();
        logprobs.backward(decoder);
        self.optimizer.accumulate();
        sums.add("policy_loss", out.loss.double_value(&[]), weight);
        sums.add("loss", loss.double_value(&[]), weight);
        sums.add("clip_fraction", out.clip_fraction.double_value(&[]), weight);
        let low = out.clip_low_fraction.double_value(&[]);
        sums.add("clip_fraction/low", low, weight);
        let high = out.clip_high_fraction.double_value(&[]);
        sums.add("clip_fraction/high", high, weight);
        sums.add("approx_kl", out.approx_kl.double_value(&[]), weight);
    }
}

/// An iteration's rollouts with the time spent sampling them and, apart, scoring them.
#[derive(Debug)]
pub struct Timed<S> {
    pub sampled: S,
    pub seconds: f64,
    pub scoring: f64,
}

/// The checkpoint parts of the policy: the actor with its optimiser, the reference with its
/// EMA shadow (when the EMA moves it).
fn policy_parts<'a>(
    policy: &'a Policy,
    optimizer: &'a mut AdamW,
    ema: Option<&'a mut EmaReference>,
) -> Vec<Part<'a>> {
    let mut parts = vec![Part::trained("policy", policy.actor.trainable(), optimizer)];
    if let Some(reference) = &policy.reference {
        parts.push(Part {
            name: "reference",
            vs: &reference.vs,
            optimizer: None,
            ema,
        });
    }
    parts
}

/// Checks that the reward function scored every rollout.
fn check_scores(scores: &[f32], rollouts: &[Rollout]) -> Result<()> {
    if scores.len() == rollouts.len() {
        return Ok(());
    }
    Err(TrainError::Config {
        field: "reward",
        message: format!("{} scores for {} rollouts", scores.len(), rollouts.len()),
    })
}

/// The sampling's metrics: time, throughput, and the scores of every rollout sampled.
fn sampled_metrics<D>(timed: &Timed<Sampled<D>>) -> Metrics {
    let (rollouts, scores) = (&timed.sampled.rollouts, &timed.sampled.scores);
    let tokens: f64 = rollouts.iter().map(|r| f64::from(r.num_tokens)).sum();
    let count = scores.len() as f64;
    let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / count;
    let var = scores
        .iter()
        .map(|&s| (f64::from(s) - mean).powi(2))
        .sum::<f64>()
        / (count - 1.0).max(1.0);
    let truncated = truncated(rollouts)
        .iter()
        .map(|&t| f64::from(t))
        .sum::<f64>()
        / count;
    Metrics::from([
        ("time/generate".into(), timed.seconds),
        ("time/score".into(), timed.scoring),
        (
            "generate/tokens_per_s".into(),
            tokens / timed.seconds.max(1e-9),
        ),
        ("reward/mean".into(), mean),
        ("reward/std".into(), var.sqrt()),
        ("truncated".into(), truncated),
    ])
}

/// What every experience measures: the per-token KL of the sampling policy to the reference
/// (and its sum per sequence), the entropy, the completions' length.
fn experience_metrics(e: &Experience) -> Metrics {
    let mask = &e.loss_mask;
    let kl = (&e.old_logprobs - &e.reference_logprobs) * mask;
    let per_row = |t: &Tensor| {
        t.sum_dim_intlist([1].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    Metrics::from([
        (
            KL_TO_REFERENCE.into(),
            masked_mean(&kl, mask).double_value(&[]),
        ),
        (format!("{KL_TO_REFERENCE}/sequence"), per_row(&kl)),
        (
            "entropy".into(),
            masked_mean(&e.entropy, mask).double_value(&[]),
        ),
        ("response_length".into(), per_row(&e.batch.loss_mask)),
    ])
}

/// The metric of the per-token KL of the sampling policy to the reference, k1 averaged over
/// completion tokens (PPO and the group estimators; DPO-Iter's per-sequence KL to the
/// previous policy is another).
pub const KL_TO_REFERENCE: &str = "kl_to_reference";

/// Runs every remaining iteration of `trainer` with `generator` and `reward` (which gets the
/// 0-based iteration and its rollouts), showing each sampled iteration to `on_sampled` before
/// its update and each record to `on_iteration`; saves the trained policy. What the
/// `prefloop train ppo|grpo|…` commands run; the pipeline drives a trainer itself.
pub fn train_online<A: Algorithm, G: Generator, E: From<TrainError>>(
    mut trainer: Trainer<'_, A>,
    generator: &mut G,
    reward: &mut RewardFn<E>,
    on_sampled: &mut SampledFn<E>,
    mut on_iteration: impl FnMut(&IterationRecord, u64),
) -> std::result::Result<Vec<IterationRecord>, E> {
    let total = trainer.algorithm.settings().online.iterations;
    let mut records = Vec::new();
    while let Some(iteration) = trainer.next_iteration() {
        let sampled = trainer.sample(generator, &mut |rollouts| reward(iteration, rollouts))?;
        on_sampled(
            iteration,
            &sampled.sampled.rollouts,
            &sampled.sampled.scores,
        )?;
        let record = trainer.update(sampled)?;
        let synced = generator.sync_policy(&trainer.policy.actor);
        synced.map_err(TrainError::from)?;
        on_iteration(&record, total);
        records.push(record);
    }
    trainer.finish()?;
    Ok(records)
}
