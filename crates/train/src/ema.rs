//! The EMA reference, the paper's third PPO trick: `θ_ref ← (1 − η) θ_ref + η θ_actor` after
//! every iteration (ReaLHF's η = 0.001).
//!
//! In bf16 that update cannot be applied to the reference's own weights: `r·0.999` rounds back
//! to `r` and `0.001·a` is under half an ulp, so the reference would silently stay frozen. The
//! EMA therefore runs on an fp32 shadow of the reference, moved towards the actor's fp32 master
//! weights and rounded into the bf16 weights the reference computes with. A checkpoint saves
//! the shadow as the reference's weights. An fp32 reference is its own shadow.
//!
//! The rounding is dithered, not to nearest. Rounded to nearest, a weight that started on the
//! bf16 grid (as every weight of a bf16 model does) stays put until its shadow has drifted half
//! an ulp, and the weights of a tensor drift in step, so the reference would move in bursts,
//! hundreds of iterations apart at η = 0.001. With each weight's rounding threshold offset by
//! its own fixed fraction of an ulp (a golden-ratio sequence over the element index; no
//! storage), the thresholds are spread evenly: each iteration, the share of weights that step
//! by one ulp is what the shadow moved, so the reference moves as the formula says from the
//! first iteration on, within one ulp of the shadow (to nearest: half).

use std::collections::HashMap;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::advantage::ema_update;

#[derive(Debug)]
struct Shadowed {
    name: String,
    /// The reference's parameter, in the dtype it computes with.
    var: Tensor,
    /// fp32 copy the EMA runs on when `var` is not fp32.
    shadow: Option<Tensor>,
}

impl Shadowed {
    /// The fp32 tensor the EMA moves.
    fn exact(&self) -> &Tensor {
        self.shadow.as_ref().unwrap_or(&self.var)
    }
}

/// `exact` (fp32) in `kind`. For bf16, the upper half of each fp32 word after adding that
/// element's fixed offset to the lower half: rounding at a threshold spread evenly over the ulp
/// (see the module doc). Any other kind rounds to nearest.
fn dithered(exact: &Tensor, kind: Kind) -> Tensor {
    if kind != Kind::BFloat16 {
        return exact.to_kind(kind);
    }
    // ⌊2^16 / φ⌋: consecutive indices get offsets spread evenly over 0..2^16 (Fibonacci
    // hashing). Products wrap in int32; only their low 16 bits are kept.
    const GOLDEN: i64 = 40_503;
    let index = Tensor::arange(exact.numel() as i64, (Kind::Int, exact.device()))
        .view(exact.size().as_slice());
    let offset = (index * GOLDEN).bitwise_and(0xFFFF);
    // Adding to the bits moves the magnitude for either sign (sign-magnitude floats), and a
    // carry out of the mantissa steps the exponent: the next representable value.
    let bits = exact.contiguous().view_dtype(Kind::Int) + offset;
    bits.bitwise_and(-0x1_0000)
        .view_dtype(Kind::Float)
        .to_kind(Kind::BFloat16)
}

/// The reference model's parameters and their fp32 shadows.
#[derive(Debug)]
pub struct EmaReference {
    params: Vec<Shadowed>,
    eta: f64,
}

impl EmaReference {
    /// Shadows every variable of `reference`; `eta` is η.
    pub fn new(reference: &VarStore, eta: f64) -> Self {
        let mut named: Vec<(String, Tensor)> = reference.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, var)| Shadowed {
                shadow: (var.kind() != Kind::Float)
                    .then(|| var.detach().to_kind(Kind::Float).copy()),
                name,
                var,
            })
            .collect();
        Self { params, eta }
    }

    /// One EMA step towards `actor` (fp32 weights by name: the actor optimiser's masters, or
    /// the actor's own fp32 parameters). Returns how far the weights the reference computes
    /// with moved, against how far the formula moves them:
    /// `Σ|θ_ref,new − θ_ref,old| / Σ|η (θ_actor − θ_ref,old)|` (1.0 = exactly as the formula;
    /// 0 = frozen). Under rounding to bf16 each weight moves by whole ulps now and then, so the
    /// ratio of sums, not of norms, is the one whose expectation is 1.
    pub fn update(&mut self, actor: &HashMap<String, Tensor>) -> f64 {
        tch::no_grad(|| {
            let (mut moved, mut expected) = (0.0, 0.0);
            for p in &mut self.params {
                let Some(a) = actor.get(&p.name) else {
                    continue;
                };
                let exact = p.exact().shallow_clone();
                let before = p.var.to_kind(Kind::Float).copy();
                expected += ((a.to_kind(Kind::Float) - &exact).abs().sum(Kind::Double) * self.eta)
                    .double_value(&[]);
                ema_update(
                    std::slice::from_ref(&exact),
                    std::slice::from_ref(a),
                    self.eta,
                );
                if p.shadow.is_some() {
                    p.var.copy_(&dithered(&exact, p.var.kind()));
                }
                moved += (p.var.to_kind(Kind::Float) - before)
                    .abs()
                    .sum(Kind::Double)
                    .double_value(&[]);
            }
            if expected > 0.0 {
                moved / expected
            } else {
                1.0
            }
        })
    }

    /// The exact (fp32) value of every parameter that has a shadow, by name, for a
    /// checkpoint.
    pub fn shadows(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.shadow.as_ref()?.shallow_clone())))
            .collect()
    }

    /// Restores parameter `name` from a checkpoint's exact value: the shadow takes it, the
    /// weight the reference computes with its rounding, as [`EmaReference::update`] rounds.
    /// Returns false for a name the reference does not have.
    pub fn restore(&mut self, name: &str, value: &Tensor) -> bool {
        let Some(p) = self.params.iter_mut().find(|p| p.name == name) else {
            return false;
        };
        tch::no_grad(|| match &mut p.shadow {
            Some(shadow) => {
                shadow.copy_(value);
                p.var.copy_(&dithered(shadow, p.var.kind()));
            }
            None => p.var.copy_(value),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn store(kind: Kind, values: &Tensor) -> VarStore {
        let mut vs = VarStore::new(Device::Cpu);
        let mut w = vs
            .root()
            .var("w", &values.size(), tch::nn::Init::Const(0.0));
        tch::no_grad(|| w.copy_(values));
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs
    }

    #[test]
    fn in_bf16_the_reference_moves_as_the_formula_says_and_without_a_shadow_it_would_not() {
        tch::manual_seed(3);
        let start = Tensor::randn([256, 256], (Kind::Float, Device::Cpu)) * 0.05;
        let actor = &start + Tensor::randn([256, 256], (Kind::Float, Device::Cpu)) * 0.01;
        let actor = HashMap::from([("w".to_string(), actor)]);

        let vs = store(Kind::BFloat16, &start);
        let mut ema = EmaReference::new(&vs, 0.001);
        let shifts: Vec<f64> = (0..5).map(|_| ema.update(&actor)).collect();
        assert!(
            shifts.iter().all(|s| (0.9..1.1).contains(s)),
            "bf16 shifts {shifts:?}"
        );
        // And the reference stays within one ulp of its shadow: 2^-7 relative at most.
        let (var, shadow) = (&ema.params[0].var, ema.params[0].shadow.as_ref().unwrap());
        let gap = (var.to_kind(Kind::Float) - shadow).abs() - shadow.abs() * (2f64).powi(-7);
        assert!(gap.max().double_value(&[]) <= 0.0);

        // The update applied in the bf16 tensor itself: most of it rounds away.
        let naive = start.to_kind(Kind::BFloat16);
        let before = naive.to_kind(Kind::Float);
        ema_update(
            std::slice::from_ref(&naive),
            &[actor["w"].shallow_clone()],
            0.001,
        );
        let sum = |t: Tensor| t.abs().sum(Kind::Double).double_value(&[]);
        let naive_shift =
            sum(naive.to_kind(Kind::Float) - &before) / sum((&actor["w"] - &before) * 0.001);
        assert!(naive_shift < 0.5, "in-place bf16 shift {naive_shift}");

        let vs = store(Kind::Float, &start);
        let shift = EmaReference::new(&vs, 0.001).update(&actor);
        assert!((shift - 1.0).abs() < 1e-3, "fp32 shift {shift}");
    }
}
