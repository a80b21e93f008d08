//! prefloop-train: the trainers. SFT, a Bradley–Terry reward model, DPO/IPO, PPO and the
//! group estimators (GRPO, RLOO, REINFORCE++-baseline) over the tch policy: the offline ones
//! share one optimisation loop (fit.rs: AdamW, schedules, clipping, accumulation, atomic
//! checkpoints that resume exactly), the online ones one core (online.rs: policy and
//! reference, experience, the update loop, resume) that each algorithm plugs into, sampling
//! through the model crate's `Generator`; completion log-probs are computed in chunks.

mod advantage;
pub mod checkpoint;
mod dpo;
mod ema;
mod error;
mod estimators;
mod examples;
mod fit;
mod group;
mod logprobs;
mod losses;
mod online;
mod optim;
mod ppo;
mod reward;
mod rollout;
mod sft;
mod tensorfile;

use std::path::Path;

pub use advantage::{
    RunningMoments, ema_update, gae, kl_penalised_rewards, last_token_one_hot, normalise_advantages,
};
pub use dpo::{DpoConfig, REFERENCE_DIR, Share, dpo_backward, reference_logps, train_dpo};
pub use ema::EmaReference;
pub use error::{Result, TrainError};
pub use estimators::{
    Estimator, group_advantages, informative, overlong_penalty, token_advantages,
};
pub use examples::{EncodeConfig, Encoder, PairExample, Sequence, pair_examples};
pub use fit::{ExampleWeights, LoopConfig, METRICS_FILE, MicroBatch, StepRecord, fit};
pub use group::{
    Cursor, Group, GroupConfig, Groups, KlPenalty, Overlong, SamplingFilter, train_group,
};
pub use logprobs::{TokenBatch, TokenLogprobs, log_ratios, sequence_sum, token_logprobs};
pub use losses::{
    LossAggregation, PolicyLossOutput, PreferenceLoss, PreferenceOutput, bradley_terry_loss, k3_kl,
    masked_mean, policy_loss, preference_loss, sft_loss, value_loss,
};
pub use online::{
    Algorithm, Experience, KL_TO_REFERENCE, Metrics, OnlineConfig, Policy, Prompts, Sampled,
    ScoreFn, Settings, Sums, SurrogateLoss, Timed, Trainer, train_online,
};
pub use optim::{AdamW, OptimConfig, Schedule};
pub use ppo::{CRITIC_DIR, Chosen, Ppo, PpoConfig, PpoModels, Truncated, train_ppo};
pub use prefloop_model::LoraConfig;
pub use reward::{
    EVAL_FILE, REWARD_MODEL_DIR, RewardConfig, RewardEval, RewardModel, RewardReport, evaluate,
    train_reward_model,
};
pub use rollout::{IterationRecord, PromptExample, RewardFn, Rollout, SampledFn, prompt_stream};
pub use sft::{SftConfig, train_sft};

/// Where a trained policy is saved under a trainer's output directory.
pub const POLICY_DIR: &str = "policy";

/// Saves the trained policy as a Hugging Face directory at `<out>/policy`.
fn finish_policy(model: &prefloop_model::Model, out: &Path) -> Result<()> {
    model.save(&out.join(POLICY_DIR))?;
    Ok(())
}

/// The model a trainer is handed: with fresh LoRA adapters (A seeded by `seed`, B zero, the
/// base frozen) when `lora` is set, else as it is.
pub fn with_lora(
    model: prefloop_model::Model,
    lora: Option<&prefloop_model::LoraConfig>,
    seed: u64,
) -> Result<prefloop_model::Model> {
    Ok(match lora {
        Some(lora) => model.with_lora(lora, seed)?,
        None => model,
    })
}

/// A trainer config's `lora` table checked before any work starts.
fn validate_lora(lora: Option<&prefloop_model::LoraConfig>) -> Result<()> {
    match lora.map(prefloop_model::LoraConfig::validate) {
        Some(Err(message)) => Err(TrainError::Config {
            field: "lora",
            message,
        }),
        _ => Ok(()),
    }
}

/// An online trainer's `lora` table: as [`validate_lora`], and no dropout. The old log-probs
/// (and PPO's old values) are computed without it and the update's with it, so with dropout
/// the first, on-policy minibatch's ratio would not be 1 (TRL's RL trainers use none either).
fn validate_online_lora(lora: Option<&prefloop_model::LoraConfig>) -> Result<()> {
    validate_lora(lora)?;
    error::ensure(
        lora.is_none_or(|l| l.dropout == 0.0),
        "lora",
        "lora.dropout: PPO and the group estimators take no adapter dropout (it would make \
         the on-policy ratio differ from 1); set it to 0",
    )
}
