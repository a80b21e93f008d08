//! The losses of DESIGN §4, as plain tensor functions: SFT, Bradley–Terry, DPO and IPO, the
//! clipped policy surrogate (PPO's, and the group estimators' with clip-higher and the peers'
//! loss aggregations), the k3 KL term, and PPO's clipped value loss. Every golden test in
//! tests/golden.rs checks one of them against PyTorch on the same inputs.

use tch::{Kind, Tensor};

/// Mean of `values` over the positions where `mask` (same shape, 0/1) is 1.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    (values * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

/// Negative log-likelihood per completion token: `-Σ log π · mask / Σ mask`.
pub fn sft_loss(token_logprobs: &Tensor, loss_mask: &Tensor) -> Tensor {
    -masked_mean(token_logprobs, loss_mask)
}

/// Which preference loss is applied to the log-ratio difference h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLoss {
    /// DPO: `-log σ(β h)`.
    Sigmoid,
    /// IPO: `(h - 1/(2β))²`, on log-probs averaged over each answer's tokens (the IPO
    /// authors' form, and TRL's): a summed h would grow with the answers' length while the
    /// target 1/(2β) stays put.
    Ipo,
}

impl PreferenceLoss {
    /// The sequence log-prob this loss reads, from a sequence's summed token log-probs
    /// `sums` and its answer `tokens` (both (B,)): the sum for DPO, the per-token mean for IPO.
    /// Policy and reference log-probs both go through it.
    pub fn sequence_logps(self, sums: &Tensor, tokens: &Tensor) -> Tensor {
        match self {
            Self::Sigmoid => sums.shallow_clone(),
            Self::Ipo => sums / tokens.to_kind(Kind::Float).clamp_min(1.0),
        }
    }
}

/// A preference loss and TRL's reward statistics of the batch.
#[derive(Debug)]
pub struct PreferenceOutput {
    /// Scalar: mean loss over the pairs.
    pub loss: Tensor,
    /// (B,) β (log π(y_w|x) - log π_ref(y_w|x)), detached: TRL's `rewards/chosen`.
    pub chosen_rewards: Tensor,
    /// (B,) β (log π(y_l|x) - log π_ref(y_l|x)), detached: TRL's `rewards/rejected`.
    pub rejected_rewards: Tensor,
}

/// DPO or IPO on h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)).
/// All inputs are (B,) sequence log-probs as `kind` reads them
/// ([`PreferenceLoss::sequence_logps`]: sums for DPO, per-token means for IPO).
pub fn preference_loss(
    kind: PreferenceLoss,
    beta: f64,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &Tensor,
    reference_rejected: &Tensor,
) -> PreferenceOutput {
    let chosen_ratio = policy_chosen - reference_chosen;
    let rejected_ratio = policy_rejected - reference_rejected;
    let h = &chosen_ratio - &rejected_ratio;
    let losses = match kind {
        PreferenceLoss::Sigmoid => -(h * beta).log_sigmoid(),
        PreferenceLoss::Ipo => (h - 1.0 / (2.0 * beta)).square(),
    };
    PreferenceOutput {
        loss: losses.mean(Kind::Float),
        chosen_rewards: chosen_ratio.detach() * beta,
        rejected_rewards: rejected_ratio.detach() * beta,
    }
}

/// Bradley–Terry: `-mean log σ(r(x, y_w) - r(x, y_l))` over (B,) scores.
pub fn bradley_terry_loss(chosen_scores: &Tensor, rejected_scores: &Tensor) -> Tensor {
    -(chosen_scores - rejected_scores)
        .log_sigmoid()
        .mean(Kind::Float)
}

/// How per-token losses become one loss, in the peers' names (veRL's `loss_agg_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Mean over every completion token of the batch (DAPO; PPO's): long answers weigh more.
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token sum (veRL's `seq-mean-token-sum`): no
    /// length normalisation, and a loss that grows with the answers' length.
    SeqMeanTokenSum,
    /// Dr. GRPO (TRL's `dr_grpo`, veRL's `seq-mean-token-sum-norm`): each sequence's token
    /// sum divided by the constant token budget `max_new_tokens`, averaged over sequences, so
    /// neither an answer's length nor the batch's scales a token's gradient.
    SeqMeanTokenSumNorm,
    /// Mean over sequences of each sequence's token mean (the original GRPO).
    SeqMeanTokenMean,
}

impl LossAggregation {
    /// Per-token values (B, T) under `mask` (B, T) as one scalar. `budget` is the rollouts'
    /// token budget (`max_new_tokens`), the constant Dr. GRPO divides by; the other forms
    /// ignore it.
    pub fn apply(self, values: &Tensor, mask: &Tensor, budget: usize) -> Tensor {
        let dims = [1].as_slice();
        match self {
            Self::TokenMean => masked_mean(values, mask),
            Self::SeqMeanTokenSum | Self::SeqMeanTokenSumNorm | Self::SeqMeanTokenMean => {
                let sums = (values * mask).sum_dim_intlist(dims, false, Kind::Float); // (B,)
                let tokens = mask.sum_dim_intlist(dims, false, Kind::Float);
                // Sequences without a loss token (masked out) do not count.
                let rows = tokens.gt(0.0).to_kind(Kind::Float);
                let per_row = match self {
                    Self::SeqMeanTokenMean => sums / tokens.clamp_min(1.0),
                    Self::SeqMeanTokenSumNorm => sums / budget.max(1) as f64,
                    _ => sums,
                };
                (per_row * &rows).sum(Kind::Float) / rows.sum(Kind::Float).clamp_min(1.0)
            }
        }
    }

    /// What one row counts for when a minibatch is cut into micro-batches: its loss tokens for
    /// a token mean, 1 (if it has any) for a mean over sequences. A micro-batch's loss weighted
    /// by its rows' share is then the minibatch's loss.
    pub fn row_weight(self, loss_tokens: f64) -> f64 {
        match self {
            Self::TokenMean => loss_tokens,
            _ => f64::from(u8::from(loss_tokens > 0.0)),
        }
    }
}

/// The bound on a token's log-ratio log π − log π_old in the surrogate (veRL's).
pub const LOG_RATIO_CLAMP: f64 = 20.0;

/// The clipped surrogate and its diagnostics.
#[derive(Debug)]
pub struct PolicyLossOutput {
    /// Scalar: the aggregation of `max(-A r, -A clip(r, 1-ε_low, 1+ε_high))`.
    pub loss: Tensor,
    /// Share of tokens where the clipped term was the larger (detached scalar).
    pub clip_fraction: Tensor,
    /// Share of tokens clipped below (A < 0, r < 1 - ε_low).
    pub clip_low_fraction: Tensor,
    /// Share of tokens clipped above (A > 0, r > 1 + ε_high).
    pub clip_high_fraction: Tensor,
    /// Masked mean of `(r - 1) - log r`, the k3 estimator of KL(old ‖ new) (detached scalar).
    pub approx_kl: Tensor,
}

/// The clipped surrogate objective over (B, T) per-token log-probs, advantages and mask, with
/// separate lower and upper clips (DAPO's clip-higher; PPO's symmetric clip when equal),
/// aggregated by `aggregation` (`budget`: the token budget, see [`LossAggregation::apply`]).
#[allow(clippy::too_many_arguments)] // the surrogate's inputs, each documented above
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_low: f64,
    clip_high: f64,
    aggregation: LossAggregation,
    budget: usize,
) -> PolicyLossOutput {
    // Clamped as veRL clamps it (±20): a far-off token's ratio cannot overflow to inf and
    // poison the loss (its clipped term carries no gradient anyway).
    let log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    let ratio = log_ratio.exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high);
    let loss = aggregation.apply(&unclipped.maximum(&clipped), mask, budget);
    tch::no_grad(|| {
        let share = |t: Tensor| masked_mean(&t.to_kind(Kind::Float), mask);
        let active = clipped.gt_tensor(&unclipped);
        PolicyLossOutput {
            loss,
            clip_fraction: share(active.shallow_clone()),
            clip_low_fraction: share(active.logical_and(&advantages.lt(0.0))),
            clip_high_fraction: share(active.logical_and(&advantages.gt(0.0))),
            approx_kl: masked_mean(&(ratio.detach() - 1.0 - log_ratio.detach()), mask),
        }
    })
}

/// The k3 estimator of KL(π ‖ π_ref) per token, `exp(ref - lp) - (ref - lp) - 1` (Schulman;
/// GRPO's KL term): unbiased, never negative, differentiable through `logprobs`.
pub fn k3_kl(logprobs: &Tensor, reference_logprobs: &Tensor) -> Tensor {
    let delta = reference_logprobs - logprobs;
    delta.exp() - delta - 1.0
}

/// The clipped value loss: `0.5 · masked mean of max((V - R)², (clip(V, V_old ± ε) - R)²)`.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> Tensor {
    let clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps);
    let unclipped_error = (values - returns).square();
    let clipped_error = (clipped - returns).square();
    masked_mean(&unclipped_error.maximum(&clipped_error), mask) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log-ratio of 100 (a token the old policy all but ruled out) made the ratio inf and
    /// the loss NaN; clamped at ±20 as veRL does, both stay finite.
    #[test]
    fn a_huge_log_ratio_cannot_overflow_the_surrogate() {
        let logprobs = Tensor::from_slice(&[-0.1f32, -0.5]).view([1, 2]);
        let old = Tensor::from_slice(&[-100.1f32, -0.5]).view([1, 2]);
        let advantages = Tensor::from_slice(&[-1.0f32, 1.0]).view([1, 2]);
        let mask = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
        let out = policy_loss(
            &logprobs,
            &old,
            &advantages,
            &mask,
            0.2,
            0.2,
            LossAggregation::TokenMean,
            2,
        );
        let loss = out.loss.double_value(&[]);
        assert!(loss.is_finite(), "loss {loss}");
        assert!(
            (loss - (20f64.exp() - 1.0) / 2.0).abs() / loss < 1e-5,
            "loss {loss}"
        );
        assert!(out.approx_kl.double_value(&[]).is_finite());
    }
}
