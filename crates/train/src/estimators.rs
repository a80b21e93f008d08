//! Advantages from a group of samples of the same prompt, without a critic (DESIGN §4): GRPO,
//! RLOO and REINFORCE++-baseline, in the peers' names, plus the two reward shapings the
//! group trainer applies first: DAPO's soft overlong penalty and the KL penalty as a per-token
//! reward. Rollouts are laid out group after group: row `g · K + k` is member k of group g.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::advantage::normalise_advantages;

/// How a rollout's advantage is computed from its group (TRL `loss_type`, OpenRLHF
/// `--advantage_estimator`, veRL `adv_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// GRPO: `(r − mean_g) / (std_g + ε)`; without the division (`scale_rewards = false`),
    /// Dr. GRPO.
    Grpo,
    /// RLOO: `r_i − mean_{j≠i} r_j`, the leave-one-out baseline.
    Rloo,
    /// REINFORCE++-baseline: `r − mean_g`, then whitened over the batch's tokens.
    ReinforcePp,
}

impl std::str::FromStr for Estimator {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grpo" => Ok(Self::Grpo),
            "rloo" => Ok(Self::Rloo),
            "reinforce_pp" | "reinforce++" => Ok(Self::ReinforcePp),
            other => Err(format!(
                "unknown estimator {other:?} (grpo, rloo, reinforce_pp)"
            )),
        }
    }
}

/// GRPO's ε under the group's standard deviation (TRL's).
const STD_EPS: f64 = 1e-4;

/// Sequence advantages (N,) of `rewards` (N,), groups of `group_size`. Members with `valid`
/// 0 (N,) stay out of their group's statistics and get 0, as does every member of a group with
/// fewer than two valid ones (no baseline to compare with). GRPO's standard deviation is the
/// unbiased one over the valid members, as `torch.std`.
pub fn group_advantages(
    rewards: &Tensor,
    valid: &Tensor,
    group_size: i64,
    estimator: Estimator,
    scale_by_std: bool,
) -> Tensor {
    let r = rewards.to_kind(Kind::Float).view([-1, group_size]); // (G, K)
    let v = valid.to_kind(Kind::Float).view([-1, group_size]);
    let dims = [1].as_slice();
    let n = v.sum_dim_intlist(dims, true, Kind::Float); // (G, 1)
    let sum = (&r * &v).sum_dim_intlist(dims, true, Kind::Float);
    let mean = &sum / n.clamp_min(1.0);
    let centred = (&r - &mean) * &v;
    let advantages = match estimator {
        Estimator::Grpo if scale_by_std => {
            let var = centred.square().sum_dim_intlist(dims, true, Kind::Float)
                / (&n - 1.0).clamp_min(1.0);
            &centred / (var.sqrt() + STD_EPS)
        }
        Estimator::Grpo | Estimator::ReinforcePp => centred,
        // r_i − (Σ r − r_i)/(n − 1) = n/(n − 1) · (r_i − mean).
        Estimator::Rloo => &centred * (&n / (&n - 1.0).clamp_min(1.0)),
    };
    let baseline = n.ge(2.0).to_kind(Kind::Float);
    (advantages * v * baseline).view([-1])
}

/// Per-token advantages (N, T): each sequence's advantage at every one of its loss tokens,
/// plus, when `kl_rewards` (N, T) is given (the KL penalty as a reward, −β(log π − log π_ref)
/// per token), its return to go from each token. REINFORCE++-baseline then whitens over the
/// batch's loss tokens.
pub fn token_advantages(
    sequence: &Tensor,
    mask: &Tensor,
    kl_rewards: Option<&Tensor>,
    estimator: Estimator,
) -> Tensor {
    let mut advantages = sequence.unsqueeze(1) * mask;
    if let Some(kl) = kl_rewards {
        // Σ_{t' ≥ t}: a reversed cumulative sum.
        let to_go = (kl * mask).flip([1]).cumsum(1, Kind::Float).flip([1]);
        advantages += to_go * mask;
    }
    match estimator {
        Estimator::ReinforcePp => normalise_advantages(&advantages, mask),
        _ => advantages,
    }
}

/// DAPO's soft overlong punishment of a completion of `length` tokens under a budget of
/// `max_new_tokens`: 0 up to `max_new_tokens − buffer`, then falling linearly to −`factor`
/// at the budget.
pub fn overlong_penalty(length: usize, max_new_tokens: usize, buffer: usize, factor: f64) -> f64 {
    let free = max_new_tokens.saturating_sub(buffer);
    if length <= free {
        0.0
    } else if length > max_new_tokens {
        -factor
    } else {
        // Here buffer > 0: free < length ≤ max_new_tokens.
        (free as f64 - length as f64) / buffer as f64 * factor
    }
}

/// Whether a group carries signal: at least two valid members, not all rewarded alike.
pub fn informative(rewards: &[f32], valid: &[bool]) -> bool {
    let kept: Vec<f32> = rewards
        .iter()
        .zip(valid)
        .filter(|(_, v)| **v)
        .map(|(r, _)| *r)
        .collect();
    let (lo, hi) = kept
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
    kept.len() >= 2 && hi - lo > 1e-6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlong_penalty_is_zero_then_linear_to_the_factor() {
        assert_eq!(overlong_penalty(90, 128, 32, 1.0), 0.0);
        assert_eq!(overlong_penalty(96, 128, 32, 1.0), 0.0);
        assert_eq!(overlong_penalty(112, 128, 32, 1.0), -0.5);
        assert_eq!(overlong_penalty(128, 128, 32, 2.0), -2.0);
        assert_eq!(overlong_penalty(128, 128, 0, 1.0), 0.0);
    }

    #[test]
    fn a_group_alike_or_of_one_valid_member_carries_no_signal() {
        assert!(informative(&[1.0, 0.0, 0.0], &[true; 3]));
        assert!(!informative(&[10.0; 4], &[true; 4]));
        assert!(!informative(&[1.0, 0.0], &[true, false]));
        assert!(!informative(&[1.0, 0.0, 0.0], &[true, false, false]));
        assert!(informative(&[1.0, 0.0, 5.0], &[false, true, true]));
    }
}
