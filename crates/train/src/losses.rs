//! The losses of DESIGN §4, as plain tensor functions: SFT, Bradley–Terry, DPO and IPO, and
//! PPO's clipped policy and value losses. Every golden test in tests/golden.rs checks one of
//! them against PyTorch on the same inputs.

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
    /// IPO: `(h - 1/(2β))²`.
    Ipo,
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
/// All inputs are (B,) sequence log-probs summed over completion tokens.
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

/// PPO's clipped surrogate and its diagnostics.
#[derive(Debug)]
pub struct PolicyLossOutput {
    /// Scalar: masked mean of `max(-A r, -A clip(r, 1-ε, 1+ε))`.
    pub loss: Tensor,
    /// Fraction of tokens where the clipped term was the larger (detached scalar).
    pub clip_fraction: Tensor,
    /// Masked mean of `(r - 1) - log r`, the k3 estimator of KL(old ‖ new) (detached scalar).
    pub approx_kl: Tensor,
}

/// The clipped surrogate objective over (B, T) per-token log-probs, advantages and mask.
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> PolicyLossOutput {
    let log_ratio = logprobs - old_logprobs;
    let ratio = log_ratio.exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps);
    let loss = masked_mean(&unclipped.maximum(&clipped), mask);
    let (clip_fraction, approx_kl) = tch::no_grad(|| {
        let clip_fraction = masked_mean(&clipped.gt_tensor(&unclipped).to_kind(Kind::Float), mask);
        let approx_kl = masked_mean(&(ratio.detach() - 1.0 - log_ratio.detach()), mask);
        (clip_fraction, approx_kl)
    });
    PolicyLossOutput {
        loss,
        clip_fraction,
        approx_kl,
    }
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
