//! AdamW with weight-decay groups and fp32 master weights, a warmup-then-cosine/constant
//! learning-rate schedule, and global gradient-norm clipping.
//!
//! Written out rather than taken from tch's `nn::Optimizer` because a checkpoint must hold the
//! optimiser's moments (tch's C++ optimisers do not expose them), so a resumed run continues
//! exactly. The update is PyTorch's `torch.optim.AdamW` (decoupled decay, bias correction).
//!
//! Master weights and gradient sums: when the model's parameters are not fp32 (bf16), the
//! optimiser keeps an fp32 copy of each one and an fp32 sum of its gradients. Trainers call
//! [`AdamW::accumulate`] after every backward pass, which moves the bf16 `.grad` into the fp32
//! sum, so gradients add up in fp32 across log-softmax chunks, micro-batches and accumulation
//! steps (bf16 keeps 8 bits of mantissa: summed there, small contributions vanish). The update
//! is applied to the fp32 copy, then rounded into the model's parameter, so small updates
//! accumulate too. An fp32 model is updated in place and its `.grad` already sums in fp32.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn::VarStore};

use crate::error::Result;

/// After `warmup_steps` of linear warmup, the learning rate stays put or follows a cosine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Half a cosine from the peak down to `min_lr_ratio · lr` at the last step.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate. Default 1e-6 (the paper's DPO rate).
    pub lr: f64,
    /// Decoupled weight decay on matrices and embeddings; biases and norm weights (every 1-D
    /// parameter) never decay, as in Hugging Face's Trainer. Default 0.0.
    pub weight_decay: f64,
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.999.
    pub beta2: f64,
    /// Default 1e-8.
    pub eps: f64,
    /// Linear warmup from lr/warmup_steps to lr. Default 0.
    pub warmup_steps: u64,
    /// Default constant.
    pub schedule: Schedule,
    /// Floor of the cosine schedule as a fraction of lr. Default 0.0.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off. Default 1.0.
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimConfig {
    /// The learning rate of optimiser step `step` (0-based) out of `total_steps`.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let check = crate::error::ensure;
        check(self.lr > 0.0, "lr", "must be positive")?;
        check(self.weight_decay >= 0.0, "weight_decay", "must be ≥ 0")?;
        check(
            (0.0..1.0).contains(&self.beta1),
            "beta1",
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&self.beta2),
            "beta2",
            "must be in [0, 1)",
        )?;
        check(self.eps > 0.0, "eps", "must be positive")?;
        check(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "min_lr_ratio",
            "must be in [0, 1]",
        )?;
        check(self.max_grad_norm >= 0.0, "max_grad_norm", "must be ≥ 0")
    }
}

#[derive(Debug)]
struct Param {
    name: String,
    /// The model's parameter (what forward passes read).
    var: Tensor,
    /// fp32 copy when `var` is not fp32; the update is applied here.
    master: Option<Tensor>,
    /// fp32 sum of the gradients collected since the last step, when `var` is not fp32
    /// (allocated at the first gradient).
    grad_sum: Option<Tensor>,
    /// Whether any gradient reached this parameter since the last step: parameters without
    /// one are skipped, as PyTorch skips those whose `.grad` is None.
    has_grad: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

impl Param {
    /// The fp32 tensor the update is applied to.
    fn target(&self) -> &Tensor {
        self.master.as_ref().unwrap_or(&self.var)
    }

    /// Moves a bf16 `.grad` into the fp32 sum (fp32 parameters keep theirs in `.grad`).
    fn accumulate(&mut self) {
        if self.master.is_none() {
            self.has_grad |= self.var.grad().defined();
            return;
        }
        let mut grad = self.var.grad();
        if !grad.defined() {
            return;
        }
        let g = grad.to_kind(Kind::Float);
        match &mut self.grad_sum {
            Some(sum) => {
                let _ = sum.g_add_(&g);
            }
            None => self.grad_sum = Some(g.copy()),
        }
        let _ = grad.zero_();
        self.has_grad = true;
    }

    /// The fp32 gradient the update reads, if any reached the parameter.
    fn grad(&self) -> Option<Tensor> {
        if !self.has_grad {
            return None;
        }
        match &self.grad_sum {
            Some(sum) => Some(sum.shallow_clone()),
            None => Some(self.var.grad()),
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: OptimConfig,
    /// Optimiser steps taken (PyTorch's `state["step"]`, for bias correction).
    steps: u64,
}

impl AdamW {
    /// Every trainable variable of `vs`, in name order.
    pub fn new(vs: &VarStore, config: OptimConfig) -> Result<Self> {
        config.validate()?;
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, var)| {
                let master =
                    (var.kind() != Kind::Float).then(|| var.detach().to_kind(Kind::Float).copy());
                let zeros = || Tensor::zeros_like(master.as_ref().unwrap_or(&var));
                Param {
                    decay: var.dim() > 1,
                    exp_avg: zeros(),
                    exp_avg_sq: zeros(),
                    name,
                    var,
                    master,
                    grad_sum: None,
                    has_grad: false,
                }
            })
            .collect();
        Ok(Self {
            params,
            config,
            steps: 0,
        })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Optimiser steps taken so far (restored from a checkpoint on resume).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.var.zero_grad();
            if let Some(sum) = &mut p.grad_sum {
                let _ = sum.zero_();
            }
            p.has_grad = false;
        }
    }

    /// Collects the gradients the last backward pass left in the parameters' `.grad` into the
    /// fp32 sums (see the module doc). Call it after every backward pass; cheap for an fp32
    /// model, where `.grad` is the sum.
    pub fn accumulate(&mut self) {
        tch::no_grad(|| self.params.iter_mut().for_each(Param::accumulate));
    }

    /// Scales the gradients so their global L2 norm is at most `max_grad_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self) -> f64 {
        self.accumulate();
        tch::no_grad(|| {
            let squares: Vec<Tensor> = self
                .params
                .iter()
                .filter_map(|p| Some(p.grad()?.square().sum(Kind::Float)))
                .collect();
            if squares.is_empty() {
                return 0.0;
            }
            let norm = Tensor::stack(&squares, 0)
                .sum(Kind::Float)
                .sqrt()
                .double_value(&[]);
            let max = self.config.max_grad_norm;
            if max > 0.0 && norm > max {
                let coef = max / (norm + 1e-6);
                for p in &self.params {
                    if let Some(mut g) = p.grad() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            }
            norm
        })
    }

    /// One AdamW update at learning rate `lr` with the accumulated gradients.
    pub fn step(&mut self, lr: f64) {
        self.accumulate();
        self.steps += 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let Some(g) = p.grad() else {
                    continue;
                };
                let mut target = p.target().shallow_clone();
                if p.decay && c.weight_decay > 0.0 {
                    let _ = target.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = p.exp_avg.g_mul_scalar_(c.beta1);
                let _ = p.exp_avg.g_add_(&(&g * (1.0 - c.beta1)));
                let _ = p.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = p.exp_avg_sq.g_add_(&(g.square() * (1.0 - c.beta2)));
                let denom = p.exp_avg_sq.sqrt() / bias2.sqrt() + c.eps;
                let _ = target.g_sub_(&(&p.exp_avg / denom * (lr / bias1)));
                if let Some(master) = &p.master {
                    p.var.copy_(master);
                }
            }
        });
    }

    /// Moments by name, plus the step count, for a checkpoint. The master weights are not
    /// here: a checkpoint saves them as the weights themselves ([`AdamW::masters`]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "steps".to_string(),
            Tensor::from_slice(&[self.steps as i64]),
        )];
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("{}.exp_avg_sq", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// The fp32 master weight of each parameter that has one, by name.
    pub fn masters(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.master.as_ref()?.shallow_clone())))
            .collect()
    }

    /// Sets the master weight of parameter `name` (if it has one) from a checkpoint's exact
    /// value.
    pub fn set_master(&mut self, name: &str, value: &Tensor) {
        if let Some(master) = self
            .params
            .iter_mut()
            .find(|p| p.name == name)
            .and_then(|p| p.master.as_mut())
        {
            tch::no_grad(|| master.copy_(value));
        }
    }

    /// Restores what [`AdamW::state_tensors`] saved, one tensor at a time: `read(name, like)`
    /// returns the checkpoint's tensor `name`, checked against the shape of `like` (and an
    /// error naming the file and tensor otherwise).
    pub fn load_state(
        &mut self,
        read: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let steps = read("steps", &Tensor::from_slice(&[0i64]))?;
        for p in &mut self.params {
            for (suffix, moment) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let saved = read(&format!("{}.{suffix}", p.name), moment)?;
                tch::no_grad(|| moment.copy_(&saved));
            }
        }
        self.steps = steps.int64_value(&[0]) as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_ends_at_the_floor() {
        let config = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert_eq!(config.lr_at(0, 14), 0.25);
        assert_eq!(config.lr_at(3, 14), 1.0);
        assert_eq!(config.lr_at(4, 14), 1.0);
        assert!((config.lr_at(9, 14) - 0.55).abs() < 1e-12);
        assert!((config.lr_at(14, 14) - 0.1).abs() < 1e-12);
        let constant = OptimConfig {
            lr: 2.0,
            ..OptimConfig::default()
        };
        assert_eq!(constant.lr_at(100, 10), 2.0);
    }

    #[test]
    fn a_bad_setting_names_its_field() {
        let config = OptimConfig {
            beta2: 1.0,
            ..OptimConfig::default()
        };
        let err = AdamW::new(&VarStore::new(tch::Device::Cpu), config).unwrap_err();
        assert!(err.to_string().contains("beta2"), "{err}");
    }
}
